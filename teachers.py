"""Encode the training texts with every teacher, once (paper 2.1): the cache train.py learns from.

    python teachers.py --preset toy --out runs/toy
    torchrun --nproc_per_node 8 teachers.py --preset paper --out runs/paper    # in the teachers' environment

It builds the corpus first if OUT/data has none, then fills OUT/teachers: per teacher an (n, width) float16
matrix of unit rows next to a hash of every text, written a chunk of rows at a time, so an interrupted run
resumes where it stopped and the ranks share the chunks (rank r takes chunks r, r + W, ...). On a GPU each
teacher runs in bf16; sentence-transformers sorts each chunk by length before batching it.

This file imports nothing of the training stack (no DeepSpeed, no jasper.py, no transformers of its own), so it
runs in a separate environment where a teacher needs other versions: NV-Embed-v2 runs only with transformers
4.42.4 (requirements-teachers.txt). train.py calls the same code when the cache is missing, and afterwards only
reads it.
"""

import argparse
import hashlib
import inspect
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import commands
import data
import presets
from commands import InputError
from presets import Preset, Teacher

# ----------------------------------------------------------------------------- a teacher

class TeacherEncoder:
    """A teacher as a function (texts, kinds) -> (k, dim) float32 vectors, through sentence-transformers, which
    applies the model's own pooling and dense layers; each text gets the teacher's prompt for its kind. Where the
    model's default output is not the width the teacher must give, its *_Dense_{dim} module replaces the default
    Dense module (Stella v5 loads 2_Dense_1024; its 8192-d vectors come from 2_Dense_8192). Hub ids need network
    once; folders never do."""

    def __init__(self, teacher: Teacher, max_length: int, batch_size: int = 64, device: str | None = None):
        from sentence_transformers import SentenceTransformer
        self.teacher, self.batch_size = teacher, batch_size
        on_gpu = str(device or "").startswith("cuda")
        bf16 = {"model_kwargs": {"torch_dtype": torch.bfloat16}}  # loads a 7B model in half the memory
        if not on_gpu or "model_kwargs" not in inspect.signature(SentenceTransformer).parameters:
            bf16 = {}  # sentence-transformers 2.x (NV-Embed-v2's card) loads in float32; converted below
        self.st = SentenceTransformer(teacher.model, device=device, trust_remote_code=True, **bf16)
        if on_gpu:
            self.st.to(torch.bfloat16)
        self.st.max_seq_length = max_length
        self.st.tokenizer.padding_side = "right"
        self.dim = self.probe_width()
        if teacher.dim is not None and self.dim != teacher.dim:
            self.use_dense_module(teacher.dim)
            self.dim = self.probe_width()
        # sentence-transformers leaves prompt tokens out of the mean only when the prompt comes separately
        self.prompt_in_pooling = all(getattr(m, "include_prompt", True) for m in self.st)
        self.special_tokens = len(self.st.tokenizer("")["input_ids"])  # what the tokenizer adds itself (BOS, ...)

    def probe_width(self) -> int:
        return self.st.encode(["width"], convert_to_tensor=True).shape[-1]

    def use_dense_module(self, dim: int) -> None:
        folder = Path(self.teacher.model)
        if not folder.is_dir():  # a hub id: fetch only that module's folder
            from huggingface_hub import snapshot_download
            folder = Path(snapshot_download(self.teacher.model, allow_patterns=[f"*_Dense_{dim}/*"]))
        found = sorted(folder.glob(f"*_Dense_{dim}"))
        dense = [k for k, module in enumerate(self.st) if type(module).__name__ == "Dense"]
        if not found or not dense:
            have = sorted(p.name for p in folder.glob("*_Dense_*"))
            raise InputError(f"teacher {self.teacher.name} ({self.teacher.model}) gives {self.dim}-d vectors, not "
                             f"{dim}, and has no *_Dense_{dim} module to give them (its Dense modules: {have})")
        module = self.st[dense[-1]]
        self.st[dense[-1]] = type(module).load(str(found[0])).to(self.st.device, next(module.parameters()).dtype)

    def __call__(self, texts: Sequence[str], kinds: Sequence[str]) -> np.ndarray:
        prompts = [self.teacher.prompts.get(kind, "") for kind in kinds]
        if self.teacher.append_eos:
            texts = [self.cut_then_eos(text, prompt) for text, prompt in zip(texts, prompts)]
        if self.prompt_in_pooling:  # the prompt is more text to read: one call
            return self.encode([prompt + text for prompt, text in zip(prompts, texts)])
        vectors = np.empty((len(texts), self.dim), dtype=np.float32)
        for prompt in dict.fromkeys(prompts):  # a prompt given apart stays out of the mean
            rows = [k for k, p in enumerate(prompts) if p == prompt]
            vectors[rows] = self.encode([texts[k] for k in rows], **({"prompt": prompt} if prompt else {}))
        return vectors

    def cut_then_eos(self, text: str, prompt: str) -> str:
        """`text` cut where prompt + text + EOS fills the max length, then the EOS token appended (NV-Embed-v2's
        card appends it to every text; appended before the cut, it would be cut off every long text)."""
        budget = self.st.max_seq_length - self.special_tokens - 1
        tokens = self.st.tokenizer(prompt + text, add_special_tokens=False, return_offsets_mapping=True)
        if len(tokens["input_ids"]) > budget:
            text = text[:max(0, tokens["offset_mapping"][budget - 1][1] - len(prompt))]
        return text + self.st.tokenizer.eos_token

    def encode(self, texts: list[str], **kwargs) -> np.ndarray:
        vectors = self.st.encode(texts, batch_size=self.batch_size, convert_to_tensor=True, show_progress_bar=False,
                                 **kwargs)
        return vectors.float().cpu().numpy()


# ----------------------------------------------------------------------------- the cache

def model_identity(model: str) -> str:
    """A hub id as it is; a local folder as a hash of its file names and sizes and of its JSON files' contents,
    so another copy of the same model is the same teacher (the toy teachers live in each environment's
    site-packages) and the hash costs no reading of weights."""
    folder = Path(model)
    if not folder.is_dir():
        return model
    digest = hashlib.blake2b(digest_size=8)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(folder)}:{path.stat().st_size}".encode())
        if path.suffix == ".json":
            digest.update(path.read_bytes())
    return digest.hexdigest()


def teacher_record(t: Teacher, dim: int | None) -> dict:
    """What meta.json keeps of a teacher: everything that makes its vectors what they are, and where it came from
    ("model": another copy of the same model, with the same "identity", makes the same vectors)."""
    return {"name": t.name, "model": t.model, "identity": model_identity(t.model), "dim": dim,
            "prompts": t.prompts, "append_eos": t.append_eos}


def cache_problem(meta: dict, teachers: Sequence[Teacher], max_length: int) -> str | None:
    """Why a cache with this meta.json cannot serve a run with these teachers and this max length (the field that
    differs), or None. Costs no model load: a local model's identity hashes file names, sizes and configs."""
    if meta["max_length"] != max_length:
        return f"its texts were cut at max_length {meta['max_length']}, this run cuts at {max_length}"
    if [t["name"] for t in meta["teachers"]] != [t.name for t in teachers]:
        return f"it was made by the teachers {[t['name'] for t in meta['teachers']]}, not {[t.name for t in teachers]}"
    for made, teacher in zip(meta["teachers"], teachers):
        asked = teacher_record(teacher, made["dim"] if teacher.dim is None else teacher.dim)
        for key, name in (("identity", "model"), ("dim", "dim"), ("prompts", "prompts"), ("append_eos", "append_eos")):
            if made[key] != asked[key]:
                shown = (made["model"], asked["model"]) if key == "identity" else (made[key], asked[key])
                return f"teacher {teacher.name}'s {name} was {shown[0]!r}, this run's is {shown[1]!r}"
    return None


def cached_teachers(folder: Path) -> tuple[list[Teacher], int]:
    """The teachers that made the cache in `folder`, and the length they truncated at."""
    meta = json.loads((Path(folder) / "meta.json").read_text())
    return ([Teacher(**{k: v for k, v in t.items() if k != "identity"}) for t in meta["teachers"]],
            meta["max_length"])


class TeacherCache:
    """folder/meta.json, folder/hashes.npy (n,) and per teacher folder/{name}.npy (n, dim) float16 (each row
    L2-normalized) with folder/{name}.done.npy, one byte per chunk of rows: written chunk by chunk, so an
    interrupted build resumes where it stopped, and ranks can share the work (rank r takes chunks r, r+W, ...)."""

    def __init__(self, folder: str | Path, hashes: np.ndarray):
        """Open an existing cache for the texts with these hashes (Corpus.hashes); other texts raise ValueError."""
        self.folder = Path(folder)
        if not (self.folder / "meta.json").is_file():
            raise FileNotFoundError(f"no teacher cache in {self.folder} (build it with teachers.py)")
        self.meta = json.loads((self.folder / "meta.json").read_text())
        stored = np.load(self.folder / "hashes.npy")
        if len(stored) != len(hashes):
            raise InputError(f"teacher cache {self.folder} holds {len(stored)} texts, the corpus has {len(hashes)}")
        differ = np.flatnonzero(stored != hashes)
        if len(differ):
            raise InputError(f"teacher cache {self.folder} was built for other texts: {len(differ)} rows differ, "
                             f"first at row {differ[0]}; rebuild it")
        self.vectors = {t["name"]: np.load(self.folder / f"{t['name']}.npy", mmap_mode="r+")
                        for t in self.meta["teachers"]}
        self.done = {t["name"]: np.load(self.folder / f"{t['name']}.done.npy", mmap_mode="r+")
                     for t in self.meta["teachers"]}

    @classmethod
    def create(cls, folder: str | Path, hashes: np.ndarray, teachers: list[dict], chunk_rows: int = 256,
               max_length: int | None = None) -> "TeacherCache":
        """An empty cache for the texts with these hashes; teachers: teacher_record()s, each with its width;
        max_length: where the teachers truncate (recorded, so an evaluation encodes other texts alike)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        n_chunks = -(-len(hashes) // chunk_rows)
        for t in teachers:
            np.lib.format.open_memmap(folder / f"{t['name']}.npy", mode="w+", dtype=np.float16,
                                      shape=(len(hashes), t["dim"])).flush()
            np.save(folder / f"{t['name']}.done.npy", np.zeros(n_chunks, dtype=np.uint8))
        np.save(folder / "hashes.npy", hashes)
        meta = {"n": len(hashes), "chunk_rows": chunk_rows, "max_length": max_length, "teachers": teachers}
        (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")  # last: marks the cache as created
        return cls(folder, hashes)

    @property
    def dim(self) -> int:
        """The width of the target: the teachers' widths added up."""
        return sum(t["dim"] for t in self.meta["teachers"])

    def missing_chunks(self) -> dict[str, list[int]]:
        return {name: np.flatnonzero(done == 0).tolist() for name, done in self.done.items() if not done.all()}

    def fill(self, corpus: data.Corpus, encoders: dict[str, Callable], rank: int = 0, world_size: int = 1) -> None:
        """Encode this rank's missing chunks with each teacher's encoder ((texts, kinds) -> (k, dim) array)."""
        rows = self.meta["chunk_rows"]
        for name, encode in encoders.items():
            todo = [c for c in np.flatnonzero(self.done[name] == 0) if c % world_size == rank]
            total = sum(min(rows, self.meta["n"] - c * rows) for c in todo)
            # a bar where someone watches a terminal (disable=None: none in a log file or a notebook)
            with tqdm(total=total, desc=f"teacher {name}", unit="text", disable=(not todo or rank != 0) or None) as bar:
                for chunk in todo:
                    start, stop = chunk * rows, min((chunk + 1) * rows, self.meta["n"])
                    index = np.arange(start, stop)
                    vectors = np.asarray(encode(corpus.texts(index), corpus.kind_names(index)), dtype=np.float32)
                    if vectors.shape != (stop - start, self.vectors[name].shape[1]):
                        raise ValueError(f"teacher {name} returned shape {vectors.shape} for rows {start}:{stop}")
                    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
                    if not np.isfinite(vectors).all() or (norms == 0).any():
                        raise ValueError(f"teacher {name} gave NaN, inf or zero vectors for rows {start}:{stop}")
                    self.vectors[name][start:stop] = vectors / norms  # unit rows use float16's precision best
                    self.vectors[name].flush()  # the vectors reach the disk before the chunk is marked done
                    self.done[name][chunk] = 1
                    self.done[name].flush()
                    bar.update(stop - start)

    def rows(self, indices: Sequence[int] | np.ndarray) -> list[np.ndarray]:
        """Every teacher's (k, dim) float32 unit rows for these texts, in the order of meta.json."""
        missing = self.missing_chunks()
        if missing:
            raise ValueError(f"teacher cache {self.folder} is incomplete: missing chunks {missing}")
        indices = np.asarray(indices)
        return [np.asarray(v[indices], dtype=np.float32) for v in self.vectors.values()]


# ----------------------------------------------------------------------------- the corpus and its vectors

def corpus_recipe(preset: Preset, seed: int) -> dict:
    return {"corpus": preset.corpus, "n_texts": preset.n_texts, "seed": seed}


def data_problem(out: Path, preset: Preset, seed: int) -> str | None:
    """Why OUT/data or OUT/teachers cannot serve this run (another corpus recipe; other teachers, prompts or max
    length), or None. Reads two small JSON files: it runs before anything loads."""
    recipe_file, meta_file = out / "data" / "recipe.json", out / "teachers" / "meta.json"
    if recipe_file.is_file() and json.loads(recipe_file.read_text()) != corpus_recipe(preset, seed):
        return (f"{out}/data was made by {recipe_file.read_text().strip()}, not {corpus_recipe(preset, seed)}: "
                "use another --out")
    problem = meta_file.is_file() and cache_problem(json.loads(meta_file.read_text()), preset.teachers,
                                                    preset.max_length)
    if problem:
        return f"the teacher cache {meta_file.parent} cannot serve this run: {problem}; use another --out"
    return None


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def prepare(out: Path, preset: Preset, seed: int, rank: int = 0, world: int = 1,
            device: str | None = None) -> tuple[data.Corpus, TeacherCache]:
    """OUT/data/corpus.arrow and the teachers' vectors for it in OUT/teachers, each built once (by every rank
    together where there is work)."""
    corpus_file = out / "data" / "corpus.arrow"
    problem = data_problem(out, preset, seed)
    if problem:
        raise InputError(problem)
    if rank == 0 and not corpus_file.is_file():
        data.save_corpus(presets.corpus_rows(preset, seed), corpus_file)
        (out / "data" / "recipe.json").write_text(json.dumps(corpus_recipe(preset, seed)) + "\n")
    barrier()
    corpus = data.Corpus(corpus_file)

    folder = out / "teachers"
    created = (folder / "meta.json").is_file()
    if created:
        missing = TeacherCache(folder, corpus.hashes).missing_chunks()
    encoders = {t.name: TeacherEncoder(t, preset.max_length, preset.teacher_batch, device)
                for t in preset.teachers if not created or t.name in missing}
    if rank == 0 and not created:
        TeacherCache.create(folder, corpus.hashes, [teacher_record(t, encoders[t.name].dim) for t in preset.teachers],
                            preset.chunk_rows, preset.max_length)
    barrier()
    cache = TeacherCache(folder, corpus.hashes)
    cache.fill(corpus, encoders, rank, world)
    barrier()
    return corpus, cache


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    presets.add_arguments(ap, plan=False)
    ap.add_argument("--out", type=Path, default=Path("runs/toy"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    preset, _ = presets.from_arguments(args)
    problem = data_problem(args.out, preset, args.seed)
    if problem:
        raise InputError(problem)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"
    if world > 1:  # torchrun (or the deepspeed launcher) started W processes: share the chunks
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    corpus, cache = prepare(args.out, preset, args.seed, rank, world, device)
    if rank == 0:
        widths = " + ".join(f"{t['name']} {t['dim']}" for t in cache.meta["teachers"])
        print(f"{len(corpus):,} texts, teachers {widths} = a {cache.dim}-d target, in {args.out / 'teachers'}")


if __name__ == "__main__":
    commands.run("teachers.py", main)
