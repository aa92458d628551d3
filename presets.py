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
import os
import sys
import types
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import data
from data import InputError


@dataclass(frozen=True)
class Teacher:
    """A frozen embedding model as the target needs it: which model, the width it must give, and the prompt it puts
    before each kind of text (data.KINDS: "query", "symmetric"; a kind it names no prompt for goes in as it is;
    passages always do)."""
    name: str
    model: str  # a sentence-transformers model: hub id or local folder
    dim: int | None = None  # the width it must give; a model whose default module gives another width must ship
    #                         a *_Dense_{dim} folder (Stella v5: 2_Dense_8192); None: whatever it gives
    prompts: dict[str, str] = field(default_factory=dict)  # its model card's, e.g. {"query": "Instruct: ...\nQuery: "}
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
    corpus: str  # see data.corpus_rows: "toy", "paper", "paper:DIR", "jasper", "jasper:DIR", a .jsonl file, a name
    mrl_dims: tuple[int, ...]  # FC2-FC4, added in stage 3
    max_length: int
    n_texts: int
    heldout: int  # the last `heldout` texts are never trained on
    stages: dict[int, StagePlan]
    prompts: dict[str, str] = field(default_factory=lambda: dict(data.STELLA_PROMPTS))  # the student's, by kind
    loss_batch: str = "global"  # what L_sim and L_resim compare: the "global" batch (all ranks) or each "rank"'s
    warmup_share: float = 0.1  # linear warmup over this share of a stage's steps, then cosine decay to 0
    weight_decay: float = 0.01  # AdamW's, on every weight but biases and normalization weights
    vector_dropout: float = 0.0  # dropout on the pooled vector before the FC heads, while training
    checkpoint_every: int = 50
    log_every: int = 1
    forward_chunk: int = 8  # texts per forward pass on a rank (length-sorted, so each pads little)
    gradient_checkpointing: bool = False
    teacher_batch: int = 64  # texts per teacher forward pass
    chunk_rows: int = 256  # texts per unit of resumable teacher work
    # stage 4 (paper 2.5): a vision encoder learns to put images where the text side puts their captions
    vision_encoder: str | dict | None = None  # hub id / folder, or a SigLIP vision config (random init)
    pooler: str = "average"  # jasper.POOLERS: "average" (the release's, no weights) or "mlp" (grid average + MLP)
    image_tokens: int = 300  # the image's length in the language model
    captions: str = "shapes"  # "shapes" (drawn, data.ShapeScenes), "infinity-mm" (the hub) or a folder of its tars
    n_pairs: int = 0  # image-caption pairs, the last `heldout_pairs` never trained on
    heldout_pairs: int = 0


# A small SigLIP vision tower, randomly initialized (no small pretrained one ships offline): 64 x 64
# images in 8 x 8 patches, 2 layers of width 128.
TOY_VISION = dict(model_type="siglip_vision_model", image_size=64, patch_size=8, hidden_size=128,
                  intermediate_size=512, num_hidden_layers=2, num_attention_heads=4)

# The paper's teachers (section 2.1): NV-Embed-v2's 4096-d vectors and Stella v5's 8192-d ones, which it gives
# only through its 2_Dense_8192 module (its modules.json loads 2_Dense_1024). Both take instructions in the
# "Instruct: ...\nQuery: " format: Stella's card defines one for retrieval-like queries and one for symmetric
# texts, and both teachers get those two. NV-Embed-v2's card appends the EOS token to every text.
STELLA = "dunzhang/stella_en_1.5B_v5"
PAPER_TEACHERS = (Teacher("nv_embed_v2", "nvidia/NV-Embed-v2", 4096, dict(data.STELLA_PROMPTS), append_eos=True),
                  Teacher("stella", STELLA, 8192, dict(data.STELLA_PROMPTS)))


def named(name: str) -> Preset:
    if name == "toy":
        # mirrors the paper: the student starts from one of its teachers (there: Stella; here: MiniLM). The toy
        # teachers' cards define no prompt, so they read every text as it is; the student keeps Stella's prompts.
        minilm = data.all_minilm_l6_v2()
        return Preset(name="toy", student=minilm,
                      teachers=(Teacher("minilm", minilm, 384), Teacher("mpnet", data.all_mpnet_base_v2(), 768)),
                      corpus="toy", mrl_dims=(256, 128, 64), max_length=128, n_texts=6000, heldout=200,
                      stages={1: StagePlan(32, 2e-3, 2000), 2: StagePlan(32, 1e-4, 150), 3: StagePlan(32, 5e-5, 200),
                              4: StagePlan(32, 3e-3, 400)},
                      teacher_batch=16,  # on a 2-core CPU all-mpnet-base-v2 reads 16 texts at a time 1.3x faster than 64
                      chunk_rows=2048,  # the teachers sort each chunk by length: long chunks pad little
                      vision_encoder=TOY_VISION, pooler="average", image_tokens=16, captions="shapes", n_pairs=13_000,
                      heldout_pairs=200)
    if name == "paper":
        # the official training code (RAG-Retrieval) computes the losses within each process, decays all weights
        # but biases and norms by 0.01 and warms up over 5%; the released config has vector_dropout_p 0.2 and
        # pools SigLIP's 27 x 27 = 729 patch tokens to num_img_tokens 300 at the LM's width
        return Preset(name="paper", student=STELLA, teachers=PAPER_TEACHERS, corpus="paper",
                      mrl_dims=(1024, 512, 256), max_length=512, n_texts=8_000_000, heldout=10_000,
                      # the paper's batch sizes are per GPU (stage 4's 90 cannot be split over 8 GPUs): x 8 here
                      stages={1: StagePlan(8 * 128, 1e-4, 4000), 2: StagePlan(8 * 128, 8e-5, 7000),
                              3: StagePlan(8 * 128, 7e-5, 2200), 4: StagePlan(8 * 90, 1e-4, 3500)},
                      loss_batch="rank", warmup_share=0.05, weight_decay=0.01, vector_dropout=0.2,
                      checkpoint_every=500, log_every=10, forward_chunk=16, teacher_batch=128, chunk_rows=8192,
                      vision_encoder="google/siglip-so400m-patch14-384", pooler="average", image_tokens=300,
                      captions="infinity-mm", n_pairs=8 * 90 * 3500 + 2000, heldout_pairs=2000)
    raise InputError(f"unknown preset {name!r}: toy, paper, or a .json file")


# ----------------------------------------------------------------------------- preset files

def conforms(value, expected) -> bool:
    """Whether a JSON value fits a field's annotation (int, float, str, bool, X | None, tuple[int, ...], dict[K, V])."""
    origin, args = typing.get_origin(expected), typing.get_args(expected)
    if origin in (typing.Union, types.UnionType):
        return any(conforms(value, a) for a in args)
    if expected is type(None):
        return value is None
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is tuple:
        return isinstance(value, list) and all(conforms(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(conforms(v, args[1]) for v in value.values())
    return isinstance(value, origin or expected)


def described(expected) -> str:
    """An annotation in the words of JSON: "int | None", "a list of int", "an object of str"."""
    origin, args = typing.get_origin(expected), typing.get_args(expected)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(described(a) for a in args)
    if origin is tuple:
        return f"a list of {described(args[0])}"
    if origin is dict:
        return f"an object of {described(args[1])}"
    return "null" if expected is type(None) else "an object" if expected is dict else expected.__name__


def checked(cls, values, where: str) -> dict:
    """`values` (a JSON object) as keyword arguments of the dataclass `cls`: every key one of its fields, every
    value of that field's type; otherwise InputError naming the field."""
    if not isinstance(values, dict):
        raise InputError(f"{where}: expected an object, got {json.dumps(values)[:60]}")
    types_ = typing.get_type_hints(cls)
    unknown = sorted(set(values) - set(types_))
    if unknown:
        raise InputError(f"{where}: unknown fields {unknown}")
    for name, value in values.items():
        if not conforms(value, types_[name]):
            raise InputError(f"{where}: field {name!r} must be {described(types_[name])}, got {json.dumps(value)[:60]}")
    return values


def load(spec: str) -> Preset:
    """A named preset, or a JSON file {"base": name, field: value, ...} that changes some of its fields. A file that
    cannot serve (not JSON, an unknown field, a value of the wrong type) raises InputError naming the problem."""
    if not spec.endswith(".json"):
        return named(spec)
    path = Path(spec)
    if not path.is_file():
        raise InputError(f"no preset file {spec}")
    try:
        changes = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise InputError(f"{spec}: not valid JSON ({error.msg} at line {error.lineno})") from None
    if not isinstance(changes, dict):
        raise InputError(f"{spec}: expected an object of preset fields")
    base = named(changes.pop("base", "toy"))
    checked(Preset, {k: v for k, v in changes.items() if k not in ("teachers", "stages")}, spec)
    if "teachers" in changes:
        if not isinstance(changes["teachers"], list):
            raise InputError(f"{spec}: field 'teachers' must be a list of teachers")
        changes["teachers"] = tuple(Teacher(**checked(Teacher, t, f"{spec}: teachers[{k}]"))
                                    for k, t in enumerate(changes["teachers"]))
    if "stages" in changes:
        if not isinstance(changes["stages"], dict) or not set(changes["stages"]) <= {"1", "2", "3", "4"}:
            raise InputError(f"{spec}: stages are 1, 2, 3 and 4, not {sorted(changes['stages'])}")
        changes["stages"] = {**base.stages, **{int(k): replace(base.stages[int(k)], **checked(
            StagePlan, v, f"{spec}: stages[{k}]")) for k, v in changes["stages"].items()}}
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
    parser.add_argument("--corpus", help="other training texts: a .jsonl file of {\"text\", \"kind\"} rows, "
                                         "jasper[:DIR] (the authors' released texts) or a datasets name")
    parser.add_argument("--n-texts", type=int, help="override the corpus size (a new --out)")
    parser.add_argument("--heldout", type=int, help="override the number of held-out texts")


def check_model(spec: str, flag: str) -> str:
    """A model given as a path (it starts with /, . or ~) must be a folder; a hub id is checked when it loads."""
    if spec.startswith(("/", ".", "~")) and not Path(spec).expanduser().is_dir():
        raise InputError(f"{flag}: no model folder {spec}")
    return spec


def parse_teacher(spec: str) -> Teacher:
    """"NAME=MODEL" or "NAME=MODEL@WIDTH" -> Teacher (no prompts: use a preset file for those)."""
    name, sep, model = spec.partition("=")
    if not sep or not name or not model:
        raise InputError(f"--teacher {spec!r}: expected NAME=MODEL or NAME=MODEL@WIDTH")
    model, at, width = model.rpartition("@") if "@" in model else (model, "", "")
    if at and not width.isdigit():
        raise InputError(f"--teacher {spec!r}: the width after @ must be a number")
    return Teacher(name, check_model(model, f"--teacher {name}"), int(width) if at else None)


def run_command(command: str, main) -> None:
    """Run a command's main(): a bad input (InputError) ends it in one line on stderr, from rank 0 only, with exit
    code 2 and no traceback."""
    try:
        main()
    except InputError as error:
        if os.environ.get("RANK", "0") == "0":
            print(f"{command}: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def from_arguments(args: argparse.Namespace) -> Preset:
    """The preset with the command line's swaps and sizes applied."""
    p = load(args.preset)
    teachers = tuple(parse_teacher(t) for t in args.teacher) if args.teacher else None
    if teachers and len({t.name for t in teachers}) != len(teachers):
        raise InputError(f"teacher names must differ: {[t.name for t in teachers]}")
    changes = dict(student=args.student and check_model(args.student, "--student"), teachers=teachers,
                   corpus=args.corpus, n_texts=args.n_texts, heldout=args.heldout)
    return replace(p, **{k: v for k, v in changes.items() if v is not None})
