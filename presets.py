"""What a run trains: the student, the teachers, the texts, the image-caption pairs and each stage's plan.

    presets.load("toy")            # offline, small real models, runs on a laptop CPU (README: quick start)
    presets.load("paper")          # the paper's setting (section 3.1): Stella 1.5B distilled from NV-Embed-v2 + Stella
    presets.load("run.json")       # a file: {"base": "toy" | "paper", any field below: its new value, ...}

train.py, train_minimal.py, teachers.py and evaluate.py read the same preset. Every field is declared once, below:
its type checks a preset file (Preset is a pydantic dataclass, which validates itself), and the command line gets an
option for each plain field (`--max-length 256`, `--gradient-checkpointing`, `--steps 100` for the stage's plan),
with the field's note as its help. `--teacher NAME=MODEL[@WIDTH]` swaps the teachers. This module needs nothing of
the training stack, so teachers.py can run in the teachers' own environment.
"""

import argparse
import json
import types
import typing
from dataclasses import MISSING, field, fields, replace
from pathlib import Path

from pydantic import ConfigDict, ValidationError
from pydantic.dataclasses import dataclass

import data
import toy_data
from commands import InputError

STRICT = ConfigDict(extra="forbid")  # an unknown field is an error, not a silent no-op


def note(text: str, default=MISSING, default_factory=MISSING):
    """A field with its note: the help of its command-line option."""
    return field(default=default, default_factory=default_factory, metadata={"help": text})


@dataclass(frozen=True, config=STRICT)
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


@dataclass(frozen=True, config=STRICT)
class StagePlan:
    batch_size: int = note("texts (stage 4: image-caption pairs) each loss compares: the paper's batch per GPU")
    lr: float = note("the peak learning rate")
    steps: int = note("optimizer steps; the stage stops and saves after the last")
    schedule_steps: int | None = note("the warmup-then-cosine schedule's length, if not `steps`: the learning rate "
                                      "reaches 0 there", None)
    gradient_checkpointing: bool = note("recompute the encoders' activations in backward (less memory)", False)
    cached_gradients: bool = note("two passes per loss batch: vectors without a graph, the loss's gradient for them, "
                                  "then chunk by chunk with a graph (activation memory of one chunk)", False)

    @property
    def schedule_length(self) -> int:
        return self.schedule_steps or self.steps


@dataclass(frozen=True, config=STRICT)
class Preset:
    name: str
    student: str | dict = note("the base text encoder: hub id or folder (or a config dict: random weights)")
    teachers: tuple[Teacher, ...] = note("the frozen teachers; the target is their vectors, concatenated")
    corpus: str = note("the training texts: toy, paper, paper:DIR, jasper, jasper:DIR, FILE.jsonl or a datasets name "
                       "(data.corpus_rows)")
    mrl_dims: tuple[int, ...] = note("the short MRL heads FC2-FC4 that stage 3 adds")
    max_length: int = note("tokens per text; longer texts are cut")
    n_texts: int = note("texts in the corpus (a new --out)")
    heldout: int = note("the last texts of the corpus, never trained on")
    stages: dict[int, StagePlan] = note("each stage's batch, learning rate and steps")
    prompts: dict[str, str] = note("the student's prompt for each kind of text",
                                   default_factory=lambda: dict(data.STELLA_PROMPTS))
    loss_batches: int = note("loss batches per optimizer step: the paper's 8 GPUs each compute the losses over their "
                             "own batch; fewer ranks accumulate, more share a loss batch", 1)
    head_average: str = note("stage 3: which heads' 200 L_sim + 20 L_resim are averaged: all (the release) or short "
                             "(FC1 keeps its eq. 4; jasper.text_distill_loss)", "all")
    warmup_share: float = note("linear warmup over this share of the schedule, then cosine decay to 0", 0.1)
    weight_decay: float = note("AdamW's, on every weight but biases and normalization weights", 0.01)
    vector_dropout: float = note("dropout on the pooled vector before the FC heads, while training", 0.0)
    checkpoint_every: int = note("steps between resumable checkpoints", 50)
    log_every: int = note("steps between rows of log.csv", 1)
    forward_chunk: int = note("texts (images) per forward pass on a rank, length-sorted so each pads little", 8)
    teacher_batch: int = note("texts per teacher forward pass", 64)
    chunk_rows: int = note("texts per unit of resumable teacher work", 256)
    # stage 4 (paper 2.5): a vision encoder learns to put images where the text side puts their captions
    vision_encoder: str | dict | None = note("stage 4's vision tower: hub id, folder or SigLIP config", None)
    pooler: str = note("vision tokens to image tokens: average (the release's, no weights) or mlp", "average")
    image_tokens: int = note("the image's length in the language model", 300)
    captions: str = note("stage 4's pairs: shapes (drawn), infinity-mm (the hub) or a folder of its tars", "shapes")
    n_pairs: int = note("image-caption pairs, the last heldout_pairs never trained on", 0)
    heldout_pairs: int = note("image-caption pairs kept for the held-out scores", 0)


# A small SigLIP vision tower, randomly initialized (no small pretrained one ships offline): 64 x 64
# images in 8 x 8 patches, 2 layers of width 128.
TOY_VISION = dict(model_type="siglip_vision_model", image_size=64, patch_size=8, hidden_size=128,
                  intermediate_size=512, num_hidden_layers=2, num_attention_heads=4)

# The paper's teachers (section 2.1): NV-Embed-v2's 4096-d vectors and Stella v5's 8192-d ones, which it gives
# only through its 2_Dense_8192 module (its modules.json loads 2_Dense_1024). Both take instructions in the
# "Instruct: ...\nQuery: " format: Stella's card defines one for retrieval-like queries and one for symmetric
# texts, and both teachers get those two. NV-Embed-v2's card appends the EOS token to every text.
STELLA = "dunzhang/stella_en_1.5B_v5"
SIGLIP = "google/siglip-so400m-patch14-384"
PAPER_TEACHERS = (Teacher("nv_embed_v2", "nvidia/NV-Embed-v2", 4096, dict(data.STELLA_PROMPTS), append_eos=True),
                  Teacher("stella", STELLA, 8192, dict(data.STELLA_PROMPTS)))


def builtin(name: str) -> Preset:
    if name == "toy":
        # mirrors the paper: the student starts from one of its teachers (there: Stella; here: MiniLM). The toy
        # teachers' cards define no prompt, so they read every text as it is; the student keeps Stella's prompts.
        minilm = toy_data.all_minilm_l6_v2()
        return Preset(name="toy", student=minilm,
                      teachers=(Teacher("minilm", minilm, 384), Teacher("mpnet", toy_data.all_mpnet_base_v2(), 768)),
                      corpus="toy", mrl_dims=(256, 128, 64), max_length=128, n_texts=6000, heldout=200,
                      stages={1: StagePlan(32, 2e-3, 2000), 2: StagePlan(32, 1e-4, 150), 3: StagePlan(32, 5e-5, 200),
                              4: StagePlan(32, 3e-3, 400)},
                      # on a 2-core CPU all-mpnet-base-v2 reads 16 texts at a time 1.3x faster than 64
                      teacher_batch=16,
                      chunk_rows=2048,  # the teachers sort each chunk by length: long chunks pad little
                      vision_encoder=TOY_VISION, pooler="average", image_tokens=16, captions="shapes", n_pairs=13_000,
                      heldout_pairs=200)
    if name == "paper":
        # section 3.1's batches are per GPU, on 8 GPUs: each loss compares 128 texts (stage 4: 90 pairs) and a step
        # follows 8 of them. The official training code (RAG-Retrieval) decays all weights but biases and norms by
        # 0.01, warms up over 5% and averages L_sim and L_resim over all heads; the released config has
        # vector_dropout_p 0.2 and pools SigLIP's 27 x 27 = 729 patch tokens to num_img_tokens 300 at the LM's width.
        # The paper selected the checkpoints at 4000 / 7000 / 2200 / 3500 steps; each schedule spans one pass over
        # the data, as the release's spans its epochs (docs/decisions.md, "The schedule").
        n_texts, heldout, n_pairs, heldout_pairs = 8_000_000, 10_000, 8 * 90 * 3500 + 2000, 2000
        text_pass = -(-(n_texts - heldout) // (8 * 128))  # 7,803 steps
        return Preset(name="paper", student=STELLA, teachers=PAPER_TEACHERS, corpus="paper",
                      mrl_dims=(1024, 512, 256), max_length=512, n_texts=n_texts, heldout=heldout,
                      # memory: what fits 8 x 48 GB with the least recomputation (memory_plan.py, docs/paper-scale.md)
                      stages={1: StagePlan(128, 1e-4, 4000, text_pass), 2: StagePlan(128, 8e-5, 7000, text_pass),
                              3: StagePlan(128, 7e-5, 2200, text_pass, gradient_checkpointing=True),
                              4: StagePlan(90, 1e-4, 3500, gradient_checkpointing=True)},
                      loss_batches=8, head_average="all", warmup_share=0.05, weight_decay=0.01, vector_dropout=0.2,
                      checkpoint_every=500, log_every=10, forward_chunk=16,
                      teacher_batch=128, chunk_rows=8192, vision_encoder=SIGLIP, pooler="average", image_tokens=300,
                      captions="infinity-mm", n_pairs=n_pairs, heldout_pairs=heldout_pairs)
    raise InputError(f"unknown preset {name!r}: toy, paper, or a .json file")


# ----------------------------------------------------------------------------- preset files

def load(spec: str) -> Preset:
    """A built-in preset, or a JSON file {"base": name, field: value, ...} that changes some of its fields (a stage's
    plan field by field: {"stages": {"3": {"steps": 100}}}). A file that cannot serve (not JSON, an unknown field, a
    value of the wrong type) raises InputError naming the problem."""
    if not spec.endswith(".json"):
        return builtin(spec)
    path = Path(spec)
    if not path.is_file():
        raise InputError(f"no preset file {spec}")
    try:
        changes = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise InputError(f"{spec}: not valid JSON ({error.msg} at line {error.lineno})") from None
    if not isinstance(changes, dict):
        raise InputError(f"{spec}: expected an object of preset fields")
    base = builtin(changes.pop("base", "toy"))
    stages, stage_changes = dict(base.stages), changes.pop("stages", {})
    if not isinstance(stage_changes, dict):
        raise InputError(f"{spec}: field 'stages' must be an object of stages, got {json.dumps(stage_changes)[:60]}")
    for key, plan in stage_changes.items():
        if key not in ("1", "2", "3", "4") or not isinstance(plan, dict):
            raise InputError(f"{spec}: stages are \"1\" to \"4\", each an object of plan fields, not {key!r}")
        stages[int(key)] = validated(replace, f"{spec}: stages[{key}]", base.stages[int(key)], **plan)
    return validated(replace, spec, base, name=str(path), stages=stages, **changes)


def validated(make, where: str, *args, **kwargs):
    """make(*args, **kwargs) -> a Preset or StagePlan; pydantic's first complaint becomes one line naming the field."""
    try:
        return make(*args, **kwargs)
    except ValidationError as error:
        problem = error.errors()[0]
        place = ".".join(str(part) for part in problem["loc"])
        raise InputError(f"{where}: field {place!r}: {problem['msg']}, got {json.dumps(problem['input'])[:60]}") \
            from None
    except TypeError as error:  # dataclasses.replace with a name that is no field
        raise InputError(f"{where}: {error}") from None


# ----------------------------------------------------------------------------- the command line

def plain_type(annotation):
    """The int, float, str or bool a field's value can be given as on the command line (`str | dict`: str), or None."""
    options = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) \
        else [annotation]
    plain = [option for option in options if option in (int, float, str, bool)]
    return plain[0] if len(plain) == 1 else None


def option_fields(cls) -> list:
    return [f for f in fields(cls) if f.metadata.get("help") and plain_type(typing.get_type_hints(cls)[f.name])]


def add_arguments(parser: argparse.ArgumentParser, plan: bool = True) -> None:
    """--preset, --teacher, and an option for every plain field of Preset and (plan=True) of a stage's StagePlan."""
    parser.add_argument("--preset", default="toy", help="toy, paper, or a .json file (see presets.py)")
    parser.add_argument("--teacher", action="append", metavar="NAME=MODEL[@WIDTH]",
                        help="another teacher, repeatable; these replace the preset's teachers. A "
                             "sentence-transformers model (hub id or folder), optionally with the width it must give")
    for cls in (Preset, StagePlan) if plan else (Preset,):
        hints = typing.get_type_hints(cls)
        for f in option_fields(cls):
            kind = plain_type(hints[f.name])
            flag = "--" + f.name.replace("_", "-")
            if kind is bool:
                parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=f.metadata["help"])
            else:
                parser.add_argument(flag, type=kind, help=f.metadata["help"])


def from_arguments(args: argparse.Namespace, stage: int | None = None) -> tuple[Preset, StagePlan | None]:
    """The preset with the command line's changes, and the stage's plan with its own (None without a stage)."""
    preset = load(args.preset)
    changes = {f.name: getattr(args, f.name) for f in option_fields(Preset) if getattr(args, f.name) is not None}
    if args.teacher:
        changes["teachers"] = tuple(parse_teacher(t) for t in args.teacher)
        if len({t.name for t in changes["teachers"]}) != len(changes["teachers"]):
            raise InputError(f"teacher names must differ: {[t.name for t in changes['teachers']]}")
    if "student" in changes:
        check_model(changes["student"], "--student")
    preset = validated(replace, "the command line", preset, **changes)
    if stage is None:
        return preset, None
    plan_changes = {f.name: getattr(args, f.name) for f in option_fields(StagePlan)
                    if getattr(args, f.name) is not None}
    return preset, validated(replace, "the command line", preset.stages[stage], **plan_changes)


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


# ----------------------------------------------------------------------------- what a preset's specs name

def corpus_rows(preset: Preset, seed: int) -> list[tuple[str, str]]:
    """The (text, kind) rows of the preset's corpus: the toy's from toy_data, any other through data.corpus_rows."""
    if preset.corpus == "toy":
        return toy_data.toy_corpus(preset.n_texts, seed)
    return data.corpus_rows(preset.corpus, preset.n_texts, seed)


def image_caption_pairs(preset: Preset, seed: int):
    """Stage 4's pairs, indexable: i -> (PIL image, caption): drawn shapes, Infinity-MM's captions from the hub,
    or a folder of tars in Infinity-MM's webdataset format."""
    if preset.captions == "shapes":
        return toy_data.ShapeScenes(preset.n_pairs, seed, size=preset.vision_encoder["image_size"])
    if preset.captions == "infinity-mm":
        return data.infinity_mm_captions(preset.n_pairs)
    tars = sorted(str(f) for f in Path(preset.captions).glob("*.tar"))
    if not tars:
        raise InputError(f"captions: {preset.captions} is neither shapes, infinity-mm nor a folder of .tar files")
    return data.infinity_mm_captions(preset.n_pairs, "webdataset", name=None, data_files=tars)
