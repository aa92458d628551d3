"""Distill the teachers into the student, one stage at a time (paper 2.3-2.4, 3.1).

    python train.py --stage 1 --preset toy --out runs/toy      # then --stage 2, --stage 3
    deepspeed --num_gpus 8 train.py --stage 1 --preset paper --out runs/paper

Stage N starts from OUT/stage{N-1} (stage 1 from the preset's base student) and writes OUT/stageN/:
the model (jasper.Jasper.from_pretrained), log.csv (one row per logged step) and eval.json (the
held-out distillation loss before and after). The corpus (OUT/data) and the teachers' vectors
(OUT/teachers) are built once, by whichever stage runs first. A killed run started again with the
same command resumes from its last checkpoint (OUT/stageN/checkpoints) and ends where an
uninterrupted run ends.

The losses see the global batch: every rank gathers the student vectors of all ranks, keeping the
gradient of its own shard, so K processes with batch b each train exactly like one with batch K*b.
"""

import argparse
import csv
import json
import math
import os
import shutil
import socket
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import deepspeed
import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm
from transformers import AutoTokenizer

import data
import jasper

EVAL_BATCH = 32  # held-out losses use one batch size in every stage, so they compare


# ----------------------------------------------------------------------------- presets

@dataclass
class StagePlan:
    batch_size: int  # global: summed over all ranks
    lr: float
    steps: int


@dataclass
class Preset:
    student: str  # the base text encoder (hub id or folder)
    teachers: dict[str, str]  # name -> sentence-transformers model (hub id or folder)
    mrl_dims: list[int]  # FC2-FC4, added in stage 3
    max_length: int
    n_texts: int
    heldout: int  # the last `heldout` texts are never trained on
    stages: dict[int, StagePlan]
    warmup_share: float = 0.1
    checkpoint_every: int = 50
    log_every: int = 1
    forward_chunk: int = 8  # texts per forward pass on a rank (length-sorted, so each pads little)
    gradient_checkpointing: bool = False
    # stage 4 (paper 2.5): a vision encoder learns to put images where the text side puts their captions
    vision_encoder: str | dict | None = None  # hub id / folder, or a SigLIP vision config (random init)
    image_tokens: int = 81  # the pooler's k x k grid, the image's length in the language model
    n_pairs: int = 0  # image-caption pairs, the last `heldout_pairs` never trained on
    heldout_pairs: int = 0


# A small SigLIP vision tower, randomly initialized (no small pretrained one ships offline): 64 x 64
# images in 8 x 8 patches, 2 layers of width 128; the pooler averages its 8 x 8 grid to 4 x 4 tokens.
TOY_VISION = dict(model_type="siglip_vision_model", image_size=64, patch_size=8, hidden_size=128,
                  intermediate_size=512, num_hidden_layers=2, num_attention_heads=4)


def preset(name: str) -> Preset:
    if name == "toy":
        # mirrors the paper: the student starts from one of its teachers (there: Stella; here: MiniLM)
        minilm = data.all_minilm_l6_v2()
        return Preset(student=minilm, teachers={"minilm": minilm, "mpnet": data.all_mpnet_base_v2()},
                      mrl_dims=[256, 128, 64], max_length=128, n_texts=2000, heldout=200,
                      stages={1: StagePlan(32, 2e-3, 300), 2: StagePlan(32, 2e-4, 150), 3: StagePlan(32, 5e-5, 150),
                              4: StagePlan(32, 3e-3, 1000)},
                      vision_encoder=TOY_VISION, image_tokens=16, n_pairs=32_200, heldout_pairs=200)
    if name == "paper":
        return Preset(student="dunzhang/stella_en_1.5B_v5",
                      teachers={"nv_embed_v2": "nvidia/NV-Embed-v2", "stella": "dunzhang/stella_en_1.5B_v5"},
                      mrl_dims=[1024, 512, 256], max_length=512, n_texts=8_000_000, heldout=10_000,
                      # the paper's batch sizes are per GPU (stage 4's 90 cannot be split over 8 GPUs): x 8 here
                      stages={1: StagePlan(8 * 128, 1e-4, 4000), 2: StagePlan(8 * 128, 8e-5, 7000),
                              3: StagePlan(8 * 128, 7e-5, 2200), 4: StagePlan(8 * 90, 1e-4, 3500)},
                      checkpoint_every=500, log_every=10, forward_chunk=16,
                      # 27 x 27 patches of 14 pixels, averaged to 9 x 9 image tokens
                      vision_encoder="google/siglip-so400m-patch14-384", image_tokens=81,
                      n_pairs=8 * 90 * 3500 + 2000, heldout_pairs=2000)
    raise ValueError(f"unknown preset {name!r}: toy or paper")


# ----------------------------------------------------------------------------- distributed

def setup_distributed() -> tuple[int, int]:
    """Plain `python train.py` gets a one-process group; `deepspeed train.py` sets these itself."""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                               verbose=False)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    return dist.get_rank(), dist.get_world_size()


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """(b, d) on each of W ranks -> (W*b, d) in rank order; the gradient flows to this rank's shard."""
    world = dist.get_world_size()
    if world == 1:
        return x
    shards = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(shards, x.detach().contiguous())
    shards[dist.get_rank()] = x
    return torch.cat(shards)


# ----------------------------------------------------------------------------- data

def prepare_data(out: Path, p: Preset, preset_name: str, seed: int, rank: int, world: int,
                 device: str) -> tuple[list[str], data.TeacherCache]:
    """The corpus (OUT/data/texts.jsonl) and the teachers' vectors for it (OUT/teachers), built once."""
    corpus_file, recipe_file = out / "data" / "texts.jsonl", out / "data" / "recipe.json"
    recipe = {"preset": preset_name, "n_texts": p.n_texts, "seed": seed}
    if rank == 0 and not corpus_file.is_file():
        documents, queries = (data.toy_sources(seed) if preset_name == "toy"
                              else (data.fineweb_documents(), data.embedding_data_queries()))
        data.save_corpus(data.make_corpus(documents, queries, p.n_texts, seed), corpus_file)
        recipe_file.write_text(json.dumps(recipe) + "\n")
    dist.barrier()
    if json.loads(recipe_file.read_text()) != recipe:
        raise ValueError(f"{out}/data was made by {recipe_file.read_text().strip()}, not {recipe}: "
                         f"use another --out")
    texts = data.load_corpus(corpus_file)

    folder = out / "teachers"
    created = (folder / "meta.json").is_file()
    missing = data.TeacherCache(folder, texts).missing_chunks() if created else p.teachers
    encoders = {n: data.sentence_transformer_encoder(m, p.max_length, device=device)
                for n, m in p.teachers.items() if n in missing}
    if rank == 0 and not created:
        data.TeacherCache.create(folder, texts, {n: e.dim for n, e in encoders.items()}, models=p.teachers)
    dist.barrier()
    cache = data.TeacherCache(folder, texts)
    cache.fill(texts, encoders, rank, world)
    dist.barrier()
    return texts, cache


def batch_indices(step: int, batch_size: int, n_train: int, seed: int) -> np.ndarray:
    """The global batch of a step: positions step*B ... step*B + B-1 of an endless stream of epochs,
    each a fresh permutation of the training texts. A pure function of the step, so a resumed run
    sees exactly the batches an uninterrupted run sees."""
    positions = np.arange(step * batch_size, (step + 1) * batch_size)
    epochs = positions // n_train
    out = np.empty(batch_size, dtype=np.int64)
    for epoch in np.unique(epochs):
        order = np.random.default_rng([seed, int(epoch)]).permutation(n_train)
        out[epochs == epoch] = order[positions[epochs == epoch] % n_train]
    return out


def rank_slices(idx: np.ndarray, lengths: np.ndarray, world: int) -> list[np.ndarray]:
    """Deal a global batch to the ranks, each rank's texts in order of length.

    Every loss is invariant to the order of the texts in the batch, so the batch may be rearranged
    freely: sorted by length (characters, a free proxy for tokens) and dealt round-robin, every
    rank gets the same spread of lengths (no straggler) and consecutive texts of similar length,
    which each forward chunk then pads only to its own longest (train.text_chunks)."""
    ordered = idx[np.argsort(lengths[idx], kind="stable")]
    return [ordered[r::world] for r in range(world)]


def text_chunks(tokenizer, texts: list[str], chunk: int, max_length: int, device) -> Iterator[dict[str, torch.Tensor]]:
    """`texts` tokenized `chunk` at a time, each chunk padded only to its own longest text."""
    for start in range(0, len(texts), chunk):
        yield tokenize(tokenizer, texts[start:start + chunk], max_length, device)


def forward_in_chunks(model, batches: Iterable[dict[str, torch.Tensor]]) -> tuple[dict[int, torch.Tensor], int, int]:
    """The student's vectors for several tokenized batches, one forward pass each, concatenated; the
    graphs of all of them stay alive for one backward pass.
    Returns ({width: (all rows, width)}, real tokens, padded tokens)."""
    outputs, real, padded = [], 0, 0
    for batch in batches:
        outputs.append(model(**batch))
        if "attention_mask" in batch:  # texts; images have no padding
            real, padded = real + int(batch["attention_mask"].sum()), padded + batch["attention_mask"].numel()
    return {width: torch.cat([o[width] for o in outputs]) for width in outputs[0]}, real, padded


def tokenize(tokenizer, texts: list[str], max_length: int, device) -> dict[str, torch.Tensor]:
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}


# ----------------------------------------------------------------------------- evaluation

def embed_in_batches(model: jasper.Jasper, batches: Iterable[dict[str, torch.Tensor]]) -> dict[int, torch.Tensor]:
    """{width: (all rows, width)} for several model inputs, without gradients, in eval mode."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        vectors, _, _ = forward_in_chunks(model, batches)
    model.train(was_training)
    return vectors


def mean_over_batches(loss, student: dict[int, torch.Tensor], teacher, n: int) -> dict[str, float]:
    """A batch loss averaged over consecutive batches of EVAL_BATCH rows out of n (the last partial batch is
    left out: the batch size changes L_sim's and L_resim's values). teacher: a tensor or {width: tensor}."""
    size = min(EVAL_BATCH, n)
    if size < 3:
        raise ValueError(f"{n} held-out examples: at least 3 are needed for L_resim")
    sums, starts = {}, range(0, n - size + 1, size)
    for start in starts:
        rows = slice(start, start + size)
        part = {w: v[rows] for w, v in teacher.items()} if isinstance(teacher, dict) else teacher[rows]
        for name, value in loss({w: v[rows] for w, v in student.items()}, part).items():
            sums[name] = sums.get(name, 0.0) + float(value)
    return {name: total / len(starts) for name, total in sums.items()}


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks of a 1-d tensor; equal values share the mean of the ranks they span."""
    values, order = x.sort()
    _, group, counts = torch.unique_consecutive(values, return_inverse=True, return_counts=True)
    last = counts.cumsum(0).double()  # the rank of each group's last member
    ranks = torch.empty(len(x), dtype=torch.float64, device=x.device)
    ranks[order] = (last - (counts - 1) / 2)[group]
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation of two 1-d score vectors: Pearson's r of their average ranks."""
    return float(torch.corrcoef(torch.stack([average_ranks(a), average_ranks(b)]))[0, 1])


def heldout_text_scores(model: jasper.Jasper, tokenizer, texts: list[str], cache: data.TeacherCache,
                        indices: np.ndarray, max_length: int, device) -> dict[str, float]:
    """Stages 1-3 on the held-out texts: every loss part of every head against the teachers' target, and
    per head "{width}_spearman", how well the head orders all held-out text pairs by similarity as the
    teachers do (Spearman over the C(n,2) cosines)."""
    student = embed_in_batches(model, text_chunks(tokenizer, [texts[i] for i in indices], EVAL_BATCH,
                                                  max_length, device))
    target = cache.targets(indices).to(device)
    scores = mean_over_batches(jasper.text_distill_loss, student, target, len(indices))
    i, j = torch.triu_indices(len(indices), len(indices), offset=1)
    teacher_pairs = (target @ target.T)[i, j]
    for width, vectors in student.items():
        scores[f"{width}_spearman"] = spearman((vectors @ vectors.T)[i, j], teacher_pairs)
    return scores


def image_batches(processor, images: list, chunk: int, device) -> Iterator[dict[str, torch.Tensor]]:
    """`images` preprocessed `chunk` at a time."""
    for start in range(0, len(images), chunk):
        pixels = processor(images[start:start + chunk], return_tensors="pt")["pixel_values"]
        yield {"pixel_values": pixels.to(device)}


def heldout_image_scores(model: jasper.Jasper, tokenizer, processor, pairs, indices: np.ndarray,
                         max_length: int, device) -> dict[str, float]:
    """Stage 4 on the held-out pairs: the loss parts of every head (image vector against its caption's), and
    per head recall@1 of image -> caption ("{width}_i2c") and caption -> image ("{width}_c2i") retrieval
    among all held-out pairs. A hit is a retrieved item whose caption is the query's caption, so repeated
    captions count alike; "chance" is the hit rate of a random pick."""
    images, captions = zip(*(pairs[int(i)] for i in indices))
    image = embed_in_batches(model, image_batches(processor, list(images), EVAL_BATCH, device))
    caption = embed_in_batches(model, text_chunks(tokenizer, list(captions), EVAL_BATCH, max_length, device))
    scores = mean_over_batches(jasper.image_distill_loss, image, caption, len(indices))
    for width in image:
        recall = recall_at_1((image[width] @ caption[width].T).cpu(), list(captions))
        scores[f"{width}_i2c"], scores[f"{width}_c2i"], scores["chance"] = recall
    return scores


def recall_at_1(sim: torch.Tensor, captions: list[str]) -> tuple[float, float, float]:
    """sim: (n images, n captions), pair i = (image i, caption i). Returns the share of images whose most
    similar caption is their own caption text, the share of captions whose most similar image carries
    that caption text, and the expected share for a uniformly random pick (equal texts count alike)."""
    names = np.array(captions)
    same = torch.from_numpy(names[:, None] == names[None, :])  # (n, n): caption j's text is caption i's
    rows = torch.arange(len(names))
    return (float(same[rows, sim.argmax(1)].float().mean()), float(same[sim.argmax(0), rows].float().mean()),
            float(same.float().mean()))


# ----------------------------------------------------------------------------- training

def warmup_then_cosine(step: int, steps: int, warmup_share: float) -> float:
    """The learning-rate factor: linear warmup over the first share of steps, then cosine to 0."""
    warmup = max(1, round(warmup_share * steps))
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def load_student(out: Path, stage: int, p: Preset, target_dim: int | None = None) -> tuple[jasper.Jasper, object]:
    """Stage 1 starts from the base student with a fresh FC1; stage N from OUT/stage{N-1}. Stage 3 adds
    the short MRL heads, stage 4 a vision encoder and a fresh pooler."""
    if stage == 1:
        model = jasper.Jasper(jasper.JasperConfig(text_encoder=p.student, head_dims=[target_dim]))
        tokenizer = AutoTokenizer.from_pretrained(p.student)
    else:
        previous = out / f"stage{stage - 1}"
        if not (previous / "jasper_config.json").is_file():
            raise FileNotFoundError(f"stage {stage} starts from {previous}: run --stage {stage - 1} first")
        model = jasper.Jasper.from_pretrained(previous)
        tokenizer = AutoTokenizer.from_pretrained(previous / "text")
        if target_dim is not None and model.config.head_dims[0] != target_dim:
            raise ValueError(f"{previous} has FC1 width {model.config.head_dims[0]}, the teachers give {target_dim}")
    if stage == 3:
        model.add_heads(p.mrl_dims)
    if stage == 4:
        if p.vision_encoder is None:
            raise ValueError("this preset has no vision encoder for stage 4")
        model.add_vision(p.vision_encoder, p.image_tokens)
    tokenizer.padding_side = "right"
    return model, tokenizer


def image_caption_pairs(p: Preset, preset_name: str, seed: int):
    """Stage 4's pairs, indexable: i -> (PIL image, caption)."""
    if preset_name == "toy":
        return data.ShapeScenes(p.n_pairs, seed, size=p.vision_encoder["image_size"])
    return data.infinity_mm_captions(p.n_pairs)


def resume_log(log_file: Path, start: int):
    """Open log.csv for appending the rows of steps >= start; the rows of later steps that a killed
    run logged after its last checkpoint are dropped (they are redone). Returns (file, writer or None)."""
    if not start or not log_file.is_file():
        return log_file.open("w", newline=""), None
    with log_file.open() as f:
        reader = csv.DictReader(f)
        fields, kept = reader.fieldnames, [r for r in reader if int(r["step"]) < start]
    tmp = log_file.with_suffix(".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(kept)
    tmp.replace(log_file)  # atomic: a second kill never loses the rows before the checkpoint
    log = log_file.open("a", newline="")
    return log, csv.DictWriter(log, fieldnames=fields)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", type=int, required=True, choices=[1, 2, 3, 4])
    ap.add_argument("--preset", default="toy", choices=["toy", "paper"])
    ap.add_argument("--out", type=Path, default=Path("runs/toy"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, help="override the preset's steps for this stage")
    ap.add_argument("--batch-size", type=int, help="override the global batch size")
    ap.add_argument("--lr", type=float, help="override the learning rate")
    ap.add_argument("--n-texts", type=int, help="override the corpus size (a new --out)")
    ap.add_argument("--heldout", type=int, help="override the number of held-out texts")
    ap.add_argument("--checkpoint-every", type=int, help="override the checkpoint interval (steps)")
    ap.add_argument("--forward-chunk", type=int, help="texts per forward pass on each rank")
    ap.add_argument("--gradient-checkpointing", action="store_true", default=None,
                    help="recompute the encoder's activations in backward (less memory, ~1/3 more compute)")
    ap.add_argument("--short-teacher", choices=["target", "fc1", "both"],
                    help="stage 3: what teaches the short MRL heads: the teachers' target (paper 2.4, the default), "
                         "FC1's own vectors (self-distillation, paper 2.4's proposal) or both (mean of the two losses)")
    ap.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    p = preset(args.preset)
    plan = p.stages[args.stage]
    plan = replace(plan, **{k: v for k, v in dict(steps=args.steps, batch_size=args.batch_size, lr=args.lr).items()
                            if v is not None})
    p = replace(p, **{k: v for k, v in dict(n_texts=args.n_texts, heldout=args.heldout,
                                            checkpoint_every=args.checkpoint_every, forward_chunk=args.forward_chunk,
                                            gradient_checkpointing=args.gradient_checkpointing).items()
                      if v is not None})
    rank, world = setup_distributed()
    if plan.batch_size % world:
        raise ValueError(f"the global batch {plan.batch_size} does not split over {world} ranks")
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    torch.manual_seed(args.seed)

    if args.short_teacher is not None and args.stage != 3:
        raise ValueError("--short-teacher applies to stage 3, where the short MRL heads are trained")
    short_teacher = args.short_teacher or "target"

    out, stage_dir = args.out, args.out / f"stage{args.stage}"
    if args.stage == 4:
        pairs = image_caption_pairs(p, args.preset, args.seed)
        n_examples, n_heldout = len(pairs), p.heldout_pairs
        model, tokenizer = load_student(out, args.stage, p)
        processor = jasper.load_image_processor(p.vision_encoder)
    else:
        texts, cache = prepare_data(out, p, args.preset, args.seed, rank, world, str(device))
        n_examples, n_heldout = len(texts), p.heldout
        lengths = np.array([len(text) for text in texts])
        model, tokenizer = load_student(out, args.stage, p, cache.dim)
    n_train = n_examples - n_heldout
    if n_train < plan.batch_size:
        raise ValueError(f"{n_train} training examples cannot fill a batch of {plan.batch_size}")
    heldout = np.arange(n_train, n_examples)

    def evaluate(module: jasper.Jasper) -> dict[str, float]:
        if args.stage == 4:
            return heldout_image_scores(module, tokenizer, processor, pairs, heldout, p.max_length, device)
        return heldout_text_scores(module, tokenizer, texts, cache, heldout, p.max_length, device)

    def batch_loss(step: int) -> tuple[dict[str, torch.Tensor], int]:
        """The loss parts of the global batch of a step (this rank computes its share), and its real tokens."""
        idx = batch_indices(step, plan.batch_size, n_train, args.seed)
        if args.stage == 4:
            images, captions = zip(*(pairs[int(i)] for i in idx[rank::world]))
            image, _, _ = forward_in_chunks(engine, image_batches(processor, list(images), p.forward_chunk, device))
            with torch.no_grad():  # the caption side is frozen: it is the teacher
                caption, _, _ = forward_in_chunks(engine.module, text_chunks(tokenizer, list(captions), p.forward_chunk,
                                                                             p.max_length, device))
            return jasper.image_distill_loss({d: gather_with_grad(v) for d, v in image.items()},
                                             {d: gather_with_grad(v) for d, v in caption.items()}), 0
        slices = rank_slices(idx, lengths, world)
        vectors, real, _ = forward_in_chunks(engine, text_chunks(tokenizer, [texts[i] for i in slices[rank]],
                                                                 p.forward_chunk, p.max_length, device))
        student = {d: gather_with_grad(v) for d, v in vectors.items()}  # rows in the order of np.concatenate(slices)
        target = cache.targets(np.concatenate(slices)).to(device)
        return jasper.text_distill_loss(student, target, short_teacher), real

    trainable = jasper.set_trainable(model, args.stage)
    for module in model.modules():  # no dropout, as in the paper's Qwen2 student (its dropout rates are 0);
        if isinstance(module, torch.nn.Dropout):  # it also makes K ranks train exactly like one
            module.p = 0.0
    if p.gradient_checkpointing:
        model.text.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.to(device)
    ckpt_dir, log_file = stage_dir / "checkpoints", stage_dir / "log.csv"
    resuming = (ckpt_dir / "latest").is_file()
    before = None if resuming else evaluate(model)

    optimizer = torch.optim.AdamW([w for w in model.parameters() if w.requires_grad], lr=plan.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_then_cosine(s, plan.steps, p.warmup_share))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule, config={
        "train_micro_batch_size_per_gpu": plan.batch_size // world,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 2},
        "bf16": {"enabled": device.type == "cuda"},
        "gradient_clipping": 1.0,
        "steps_per_print": 10 ** 9,
    })

    start = 0
    if resuming:
        _, client = engine.load_checkpoint(str(ckpt_dir))
        start, before = client["step"], client["heldout_before"]
    if rank == 0:
        stage_dir.mkdir(parents=True, exist_ok=True)
        log, writer = resume_log(log_file, start)
        print(f"stage {args.stage}: {sum(trainable.values()):,} trainable parameters, {plan.steps} steps of "
              f"{plan.batch_size} on {world} rank(s), {n_examples} examples ({n_heldout} held out)"
              + (f", resuming at step {start}" if start else ""))

    tokens, t0 = 0, time.time()
    bar = tqdm(range(start, plan.steps), initial=start, total=plan.steps, desc=f"stage {args.stage}",
               disable=rank != 0)
    for step in bar:
        parts, real = batch_loss(step)
        engine.backward(parts["loss"] * world)  # ranks average gradients; each holds only its shard's part
        lr = schedule.get_last_lr()[0]
        engine.step()
        tokens += real

        if rank == 0 and (step % p.log_every == 0 or step == plan.steps - 1):
            row = {"step": step, "lr": lr, **{k: v.item() for k, v in parts.items()}}
            if writer is None:
                writer = csv.DictWriter(log, fieldnames=list(row))
                writer.writeheader()
            writer.writerow(row)
            log.flush()
            bar.set_postfix(loss=f"{row['loss']:.4f}")
        if (step + 1) % p.checkpoint_every == 0 and step + 1 < plan.steps:
            engine.save_checkpoint(str(ckpt_dir), tag=f"step{step + 1}",
                                   client_state={"step": step + 1, "heldout_before": before})
            if rank == 0:
                for old in ckpt_dir.glob("step*"):
                    if old.name != f"step{step + 1}":
                        shutil.rmtree(old)
    elapsed = time.time() - t0
    tokens = torch.tensor(tokens, device=device)
    dist.all_reduce(tokens)
    tokens = int(tokens)

    after = evaluate(engine.module)
    if rank == 0:
        log.close()
        engine.module.save_pretrained(stage_dir, prompts={"query": data.QUERY_PROMPT, "document": ""})
        tokenizer.model_max_length = p.max_length  # sentence-transformers truncates there
        tokenizer.save_pretrained(stage_dir / "text")
        if args.stage == 4:
            processor.save_pretrained(stage_dir / "vision")
        summary = {"stage": args.stage, "preset": args.preset, "world_size": world, "plan": asdict(plan),
                   "steps_run": plan.steps - start, "seconds": round(elapsed, 1),
                   "examples_per_second": round(plan.batch_size * (plan.steps - start) / max(elapsed, 1e-9), 1),
                   **({"tokens_per_second": round(tokens / max(elapsed, 1e-9), 1)} if tokens else {}),
                   "trainable_parameters": sum(trainable.values()),
                   **({"short_teacher": short_teacher} if args.stage == 3 else {}),
                   "heldout_before": before, "heldout_after": after}
        (stage_dir / "eval.json").write_text(json.dumps(summary, indent=2) + "\n")
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        print(f"stage {args.stage} done in {elapsed:.0f} s ({summary['examples_per_second']:.1f} examples/s); "
              f"held-out loss {before['loss']:.4f} -> {after['loss']:.4f}; saved {stage_dir}")
    dist.barrier()


if __name__ == "__main__":
    main()
