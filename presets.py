"""What a run trains: the student, the teachers, the texts, the image-caption pairs and each stage's plan.

    presets.load("toy")            # offline, small real models, runs on a laptop CPU (README: quick start)
    presets.load("paper")          # the paper's setting (section 3.1): Stella 1.5B distilled from NV-Embed-v2 + Stella
    presets.load("run.json")       # a file: {"base": "toy" | "paper", any field below: its new value, ...}

train.py, teachers.py and evaluate.py read the same preset, and the command line can swap the student, the
teachers and the corpus of any preset (`--student`, `--teacher NAME=MODEL[@WIDTH]`, `--corpus`). This module
needs nothing of the training stack, so teachers.py can run in the teachers' own environment.
"""

import argparse
import json
from dataclasses import dataclass, fields, replace
from pathlib import Path

import data


@dataclass(frozen=True)
class Teacher:
    """A frozen embedding model as the target needs it: which model, the width it must give, and what it puts
    before a query. Passages get nothing before them (every teacher here documents it so)."""
    name: str
    model: str  # a sentence-transformers model: hub id or local folder
    dim: int | None = None  # the width it must give; a model whose default module gives another width must ship
    #                         a *_Dense_{dim} folder (Stella v5: 2_Dense_8192); None: whatever it gives
    query_prompt: str = ""  # e.g. "Instruct: ...\nQuery: "; its model card's
    append_eos: bool = False  # NV-Embed-v2's card appends the tokenizer's EOS token to every text


@dataclass(frozen=True)
class StagePlan:
    batch_size: int  # global: summed over all ranks
    lr: float
    steps: int


@dataclass(frozen=True)
class Preset:
    name: str
    student: str  # the base text encoder (hub id or folder)
    teachers: tuple[Teacher, ...]
    corpus: str  # see data.corpus_sources: "toy", "paper", "paper:DIR", a .jsonl file or a datasets name
    mrl_dims: tuple[int, ...]  # FC2-FC4, added in stage 3
    max_length: int
    n_texts: int
    heldout: int  # the last `heldout` texts are never trained on
    stages: dict[int, StagePlan]
    query_prompt: str = data.QUERY_PROMPT  # what the student puts before a query (Stella v5's s2p prompt)
    warmup_share: float = 0.1
    checkpoint_every: int = 50
    log_every: int = 1
    forward_chunk: int = 8  # texts per forward pass on a rank (length-sorted, so each pads little)
    gradient_checkpointing: bool = False
    teacher_batch: int = 64  # texts per teacher forward pass
    chunk_rows: int = 256  # texts per unit of resumable teacher work
    # stage 4 (paper 2.5): a vision encoder learns to put images where the text side puts their captions
    vision_encoder: str | dict | None = None  # hub id / folder, or a SigLIP vision config (random init)
    image_tokens: int = 81  # the pooler's k x k grid, the image's length in the language model
    captions: str = "shapes"  # "shapes" (drawn, data.ShapeScenes), "infinity-mm" (the hub) or a folder of its tars
    n_pairs: int = 0  # image-caption pairs, the last `heldout_pairs` never trained on
    heldout_pairs: int = 0


# A small SigLIP vision tower, randomly initialized (no small pretrained one ships offline): 64 x 64
# images in 8 x 8 patches, 2 layers of width 128; the pooler averages its 8 x 8 grid to 4 x 4 tokens.
TOY_VISION = dict(model_type="siglip_vision_model", image_size=64, patch_size=8, hidden_size=128,
                  intermediate_size=512, num_hidden_layers=2, num_attention_heads=4)

# The paper's teachers (section 2.1): NV-Embed-v2's 4096-d vectors and Stella v5's 8192-d ones, which it gives
# only through its 2_Dense_8192 module (its modules.json loads 2_Dense_1024). Both take instructions in the
# "Instruct: ...\nQuery: " format; queries get Stella's retrieval instruction from both. NV-Embed-v2's card
# appends the EOS token to every text.
STELLA = "dunzhang/stella_en_1.5B_v5"
PAPER_TEACHERS = (Teacher("nv_embed_v2", "nvidia/NV-Embed-v2", 4096, data.QUERY_PROMPT, append_eos=True),
                  Teacher("stella", STELLA, 8192, data.QUERY_PROMPT))


def named(name: str) -> Preset:
    if name == "toy":
        # mirrors the paper: the student starts from one of its teachers (there: Stella; here: MiniLM)
        minilm = data.all_minilm_l6_v2()
        return Preset(name="toy", student=minilm,
                      teachers=(Teacher("minilm", minilm, 384, data.QUERY_PROMPT),
                                Teacher("mpnet", data.all_mpnet_base_v2(), 768, data.QUERY_PROMPT)),
                      corpus="toy", mrl_dims=(256, 128, 64), max_length=128, n_texts=6000, heldout=200,
                      stages={1: StagePlan(32, 2e-3, 3000), 2: StagePlan(32, 1e-4, 150), 3: StagePlan(32, 5e-5, 200),
                              4: StagePlan(32, 3e-3, 400)},
                      chunk_rows=2048,  # the teachers sort each chunk by length: long chunks pad little
                      vision_encoder=TOY_VISION, image_tokens=16, captions="shapes", n_pairs=13_000, heldout_pairs=200)
    if name == "paper":
        return Preset(name="paper", student=STELLA, teachers=PAPER_TEACHERS, corpus="paper",
                      mrl_dims=(1024, 512, 256), max_length=512, n_texts=8_000_000, heldout=10_000,
                      # the paper's batch sizes are per GPU (stage 4's 90 cannot be split over 8 GPUs): x 8 here
                      stages={1: StagePlan(8 * 128, 1e-4, 4000), 2: StagePlan(8 * 128, 8e-5, 7000),
                              3: StagePlan(8 * 128, 7e-5, 2200), 4: StagePlan(8 * 90, 1e-4, 3500)},
                      checkpoint_every=500, log_every=10, forward_chunk=16, teacher_batch=128, chunk_rows=8192,
                      # 27 x 27 patches of 14 pixels, averaged to 9 x 9 image tokens
                      vision_encoder="google/siglip-so400m-patch14-384", image_tokens=81, captions="infinity-mm",
                      n_pairs=8 * 90 * 3500 + 2000, heldout_pairs=2000)
    raise ValueError(f"unknown preset {name!r}: toy, paper, or a .json file")


def load(spec: str) -> Preset:
    """A named preset, or a JSON file {"base": name, field: value, ...} that changes some of its fields."""
    if not spec.endswith(".json"):
        return named(spec)
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"no preset file {spec}")
    changes = json.loads(path.read_text())
    base = named(changes.pop("base", "toy"))
    unknown = set(changes) - {f.name for f in fields(Preset)}
    if unknown:
        raise ValueError(f"{spec}: unknown preset fields {sorted(unknown)}")
    if "teachers" in changes:
        changes["teachers"] = tuple(Teacher(**t) for t in changes["teachers"])
    if "stages" in changes:
        changes["stages"] = {**base.stages, **{int(k): replace(base.stages[int(k)], **v)
                                               for k, v in changes["stages"].items()}}
    if "mrl_dims" in changes:
        changes["mrl_dims"] = tuple(changes["mrl_dims"])
    return replace(base, name=str(path), **changes)


# ----------------------------------------------------------------------------- the command line

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that choose a preset and swap its models and texts (train.py and teachers.py)."""
    parser.add_argument("--preset", default="toy", help="toy, paper, or a .json file (see presets.py)")
    parser.add_argument("--student", help="another base student (hub id or folder)")
    parser.add_argument("--teacher", action="append", metavar="NAME=MODEL[@WIDTH]",
                        help="another teacher, repeatable; these replace the preset's teachers. A sentence-transformers "
                             "model (hub id or folder), optionally with the width it must give")
    parser.add_argument("--corpus", help="other training texts: a .jsonl file of {\"text\", \"query\"} rows, "
                                         "or a datasets name with a text column")
    parser.add_argument("--n-texts", type=int, help="override the corpus size (a new --out)")
    parser.add_argument("--heldout", type=int, help="override the number of held-out texts")


def parse_teacher(spec: str) -> Teacher:
    """"NAME=MODEL" or "NAME=MODEL@WIDTH" -> Teacher (no query prompt: use a preset file for one)."""
    name, sep, model = spec.partition("=")
    if not sep or not name or not model:
        raise ValueError(f"--teacher {spec!r}: expected NAME=MODEL or NAME=MODEL@WIDTH")
    model, at, width = model.rpartition("@") if "@" in model else (model, "", "")
    if at and not width.isdigit():
        raise ValueError(f"--teacher {spec!r}: the width after @ must be a number")
    return Teacher(name, model, int(width) if at else None)


def from_arguments(args: argparse.Namespace) -> Preset:
    """The preset with the command line's swaps and sizes applied."""
    p = load(args.preset)
    teachers = tuple(parse_teacher(t) for t in args.teacher) if args.teacher else None
    if teachers and len({t.name for t in teachers}) != len(teachers):
        raise ValueError(f"teacher names must differ: {[t.name for t in teachers]}")
    changes = dict(student=args.student, teachers=teachers, corpus=args.corpus, n_texts=args.n_texts,
                   heldout=args.heldout)
    return replace(p, **{k: v for k, v in changes.items() if v is not None})
