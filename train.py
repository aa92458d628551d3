"""Distill the teachers into the student, one stage at a time (paper 2.3-2.4, 3.1).

    python train.py --stage 1 --preset toy --out runs/toy      # then --stage 2, 3 and 4
    deepspeed --num_gpus 8 train.py --stage 1 --preset paper --out runs/paper
    python train.py --stage 1 --student S --teacher a=MODEL --teacher b=MODEL@768 --corpus texts.jsonl --out runs/mine

Stage N starts from OUT/stage{N-1} (stage 1 from the preset's base student) and writes OUT/stageN/:
the model (jasper.Jasper.from_pretrained), log.csv (one row per logged step) and eval.json (the
held-out distillation loss before and after). The corpus (OUT/data) and the teachers' vectors
(OUT/teachers) are built once by teachers.py, run by itself or by whichever stage runs first; train.py
then only reads them. A killed run started again with the same command resumes from its last checkpoint
(OUT/stageN/checkpoints) and ends where an uninterrupted run ends.

What the losses compare is the preset's loss_batch (--loss-batch): "global", every rank gathers the student
vectors of all ranks, keeping the gradient of its own shard, so K processes with batch b each train exactly
like one with batch K*b (the toy); or "rank", each rank's loss over its own texts, averaged over the ranks, as
the official training code computes it (the paper preset).
"""

import argparse
import contextlib
import csv
import json
import math
import os
import shutil
import socket
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, replace
from pathlib import Path

import deepspeed
import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm
from transformers import AutoTokenizer

import data
import jasper
import presets
import teachers
from data import InputError
from presets import Preset, StagePlan

EVAL_BATCH = 32  # held-out losses use one batch size in every stage, so they compare


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
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    world = dist.get_world_size()
    shards = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(shards, x.detach().contiguous())
    shards[dist.get_rank()] = x
    return torch.cat(shards)


# ----------------------------------------------------------------------------- data

def prepare_data(out: Path, p: Preset, seed: int, rank: int, world: int, device) -> tuple[data.Corpus, teachers.TeacherCache]:
    """The corpus and the teachers' vectors for it (teachers.py), built by the first stage that runs."""
    try:
        return teachers.prepare(out, p, seed, rank, world, str(device))
    except ImportError as error:  # e.g. NV-Embed-v2's code under this environment's transformers
        raise InputError(f"a teacher does not load in this environment ({error}); encode the teachers first with "
                         f"teachers.py in their own environment (README, \"Paper scale\")") from error


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


# ----------------------------------------------------------------------------- held-out scores

@contextlib.contextmanager
def evaluating(model: torch.nn.Module):
    """No gradients and eval mode (no dropout) inside; the model's mode as it was afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def embed_in_batches(model: jasper.Jasper, batches: Iterable[dict[str, torch.Tensor]]) -> dict[int, torch.Tensor]:
    """{width: (all rows, width)} for several model inputs, without gradients, in eval mode."""
    with evaluating(model):
        vectors, _, _ = forward_in_chunks(model, batches)
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


def recall_at_1(sim: torch.Tensor, captions: list[str]) -> tuple[float, float, float]:
    """sim: (n images, n captions), pair i = (image i, caption i). Returns the share of images whose most
    similar caption is their own caption text, the share of captions whose most similar image carries
    that caption text, and the expected share for a uniformly random pick (equal texts count alike)."""
    names = np.array(captions)
    same = torch.from_numpy(names[:, None] == names[None, :])  # (n, n): caption j's text is caption i's
    rows = torch.arange(len(names))
    return (float(same[rows, sim.argmax(1)].float().mean()), float(same[sim.argmax(0), rows].float().mean()),
            float(same.float().mean()))


def image_batches(processor, images: list, chunk: int, device) -> Iterator[dict[str, torch.Tensor]]:
    """`images` preprocessed `chunk` at a time."""
    for start in range(0, len(images), chunk):
        pixels = processor(images[start:start + chunk], return_tensors="pt")["pixel_values"]
        yield {"pixel_values": pixels.to(device)}


# ----------------------------------------------------------------------------- the two kinds of stage
# A stage is its examples (the last `n_heldout` never train), the loss of a step's global batch, and the
# scores on the held-out examples. Stages 1-3 distill texts, stage 4 images; main() trains either.

def length_blocks(lengths: np.ndarray, n_train: int, size: int) -> tuple[list[np.ndarray], np.ndarray]:
    """The texts in blocks of `size` of similar length, training texts and held-out ones apart: (the blocks'
    text indices, each text's block)."""
    blocks, block_of = [], np.empty(len(lengths), dtype=np.int64)
    for part in (np.arange(n_train), np.arange(n_train, len(lengths))):
        by_length = part[np.argsort(lengths[part], kind="stable")]
        block_of[by_length] = len(blocks) + np.arange(len(part)) // size
        blocks += [by_length[k:k + size] for k in range(0, len(part), size)]
    return blocks, block_of


class TextStage:
    """Stages 1-3 (paper 2.3-2.4): the student's heads against the teachers' target for each text.

    While the encoder is frozen (stage 1) a text's pooled state never changes, so it is computed once and
    reused whenever the text comes up again (another epoch, the held-out scores after training): the same
    loss and gradients as running the encoder every time. The texts are encoded in fixed blocks of similar
    length (training and held-out texts apart), so a text's pooled state does not depend on which batch
    first asked for it: a resumed run computes the very same numbers."""

    def __init__(self, corpus: data.Corpus, cache: teachers.TeacherCache, tokenizer, p: Preset, device,
                 short_teacher: str, reuse_pooled: bool):
        self.corpus, self.cache, self.tokenizer, self.p, self.device = corpus, cache, tokenizer, p, device
        self.short_teacher = short_teacher
        prompt_lengths = np.array([len(p.prompts.get(kind, "")) for kind in data.KINDS])
        self.lengths = corpus.lengths + prompt_lengths[corpus.kinds]  # characters the student reads
        self.n_examples, self.n_heldout = len(corpus), p.heldout
        self.pooled = {} if reuse_pooled else None  # text index -> (H,) pooled state
        if reuse_pooled:
            self.blocks, self.block_of = length_blocks(self.lengths, len(corpus) - p.heldout, p.forward_chunk)

    def student(self, model, indices: np.ndarray) -> tuple[dict[int, torch.Tensor], int]:
        """{width: (len(indices), width)} for these texts (model: the DeepSpeed engine or the Jasper), and how
        many real tokens the encoder ran on."""
        if self.pooled is None:
            vectors, tokens, _ = forward_in_chunks(model, self.chunks(indices))
            return vectors, tokens
        tokens = 0
        for block in dict.fromkeys(self.block_of[i] for i in indices.tolist() if i not in self.pooled):
            with torch.no_grad():  # the encoder is frozen: no gradient reaches it either way
                batch = tokenize(self.tokenizer, self.corpus.prompted(self.blocks[block], self.p.prompts),
                                 self.p.max_length, self.device)
                self.pooled.update(zip(self.blocks[block].tolist(), getattr(model, "module", model).embed_text(**batch)))
            tokens += int(batch["attention_mask"].sum())
        return model(pooled=torch.stack([self.pooled[i] for i in indices.tolist()])), tokens

    def chunks(self, indices: np.ndarray) -> Iterator[dict[str, torch.Tensor]]:
        return text_chunks(self.tokenizer, self.corpus.prompted(indices, self.p.prompts), self.p.forward_chunk,
                           self.p.max_length, self.device)

    def loss(self, engine, idx: np.ndarray, rank: int, world: int) -> tuple[dict[str, torch.Tensor], int]:
        """The loss parts of the global batch `idx` on this rank (over the global batch or this rank's share, as
        the preset's loss_batch says), and the real tokens this rank's encoder ran on."""
        slices = rank_slices(idx, self.lengths, world)
        vectors, tokens = self.student(engine, slices[rank])
        if self.p.loss_batch == "global":  # rows in the order of np.concatenate(slices)
            vectors, rows = {d: gather_with_grad(v) for d, v in vectors.items()}, np.concatenate(slices)
        else:
            rows = slices[rank]
        return jasper.text_distill_loss(vectors, self.target(rows), self.short_teacher), tokens

    def target(self, indices: np.ndarray) -> torch.Tensor:
        """(len(indices), sum of the teachers' widths): the teachers' target for these texts."""
        return jasper.teacher_target(*map(torch.from_numpy, self.cache.rows(indices))).to(self.device)

    def heldout_scores(self, model: jasper.Jasper, indices: np.ndarray) -> dict[str, float]:
        """Every loss part of every head against the teachers' target, and per head "{width}_spearman": how
        well the head orders all held-out text pairs by similarity as the teachers do (Spearman over the
        C(n,2) cosines)."""
        with evaluating(model):
            student, _ = self.student(model, indices)
        target = self.target(indices)
        scores = mean_over_batches(jasper.text_distill_loss, student, target, len(indices))
        i, j = torch.triu_indices(len(indices), len(indices), offset=1)
        teacher_pairs = (target @ target.T)[i, j]
        for width, vectors in student.items():
            scores[f"{width}_spearman"] = spearman((vectors @ vectors.T)[i, j], teacher_pairs)
        return scores


class ImageStage:
    """Stage 4 (paper 2.5): each head's image vector against the same head's vector of the image's caption,
    which the frozen text side computes in the same step (it is the teacher)."""

    def __init__(self, pairs, tokenizer, processor, p: Preset, device):
        self.pairs, self.tokenizer, self.processor, self.p, self.device = pairs, tokenizer, processor, p, device
        self.n_examples, self.n_heldout = len(pairs), p.heldout_pairs

    def embed(self, model, indices: np.ndarray, chunk: int) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """The images' vectors (with gradients if the model trains) and their captions' (the teachers: never, and
        in eval mode, so vector dropout leaves them alone)."""
        images, captions = zip(*(self.pairs[int(i)] for i in indices))
        image, _, _ = forward_in_chunks(model, image_batches(self.processor, list(images), chunk, self.device))
        with evaluating(getattr(model, "module", model)):
            caption, _, _ = forward_in_chunks(model, text_chunks(self.tokenizer, list(captions), chunk,
                                                                 self.p.max_length, self.device))
        return image, caption

    def loss(self, engine, idx: np.ndarray, rank: int, world: int) -> tuple[dict[str, torch.Tensor], int]:
        image, caption = self.embed(engine, idx[rank::world], self.p.forward_chunk)
        if self.p.loss_batch == "global":
            image, caption = ({d: gather_with_grad(v) for d, v in vectors.items()} for vectors in (image, caption))
        return jasper.image_distill_loss(image, caption), 0

    def heldout_scores(self, model: jasper.Jasper, indices: np.ndarray) -> dict[str, float]:
        """The loss parts of every head, and per head recall@1 of image -> caption ("{width}_i2c") and
        caption -> image ("{width}_c2i") among all held-out pairs; a hit is a retrieved item whose caption is
        the query's caption, so repeated captions count alike; "chance" is the hit rate of a random pick."""
        with evaluating(model):
            image, caption = self.embed(model, indices, EVAL_BATCH)
        scores = mean_over_batches(jasper.image_distill_loss, image, caption, len(indices))
        captions = [self.pairs[int(i)][1] for i in indices]
        for width in image:
            recall = recall_at_1((image[width] @ caption[width].T).cpu(), captions)
            scores[f"{width}_i2c"], scores[f"{width}_c2i"], scores["chance"] = recall
        return scores


def image_caption_pairs(p: Preset, seed: int):
    """Stage 4's pairs, indexable: i -> (PIL image, caption): drawn shapes, Infinity-MM's captions from the hub,
    or a folder of tars in Infinity-MM's webdataset format."""
    if p.captions == "shapes":
        return data.ShapeScenes(p.n_pairs, seed, size=p.vision_encoder["image_size"])
    if p.captions == "infinity-mm":
        return data.infinity_mm_captions(p.n_pairs)
    tars = sorted(str(f) for f in Path(p.captions).glob("*.tar"))
    if not tars:
        raise FileNotFoundError(f"captions: {p.captions} is neither shapes, infinity-mm nor a folder of .tar files")
    return data.infinity_mm_captions(p.n_pairs, "webdataset", name=None, data_files=tars)


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
        model = jasper.Jasper.from_pretrained(previous)
        tokenizer = AutoTokenizer.from_pretrained(previous / "text")
        if target_dim is not None and model.config.head_dims[0] != target_dim:
            raise ValueError(f"{previous} has FC1 width {model.config.head_dims[0]}, the teachers give {target_dim}")
    if stage == 3:
        model.add_heads(p.mrl_dims)
    if stage == 4:
        model.add_vision(p.vision_encoder, p.pooler, p.image_tokens)
    model.config = replace(model.config, vector_dropout=p.vector_dropout)
    tokenizer.padding_side = "right"
    return model, tokenizer


def prepare_for_stage(model: jasper.Jasper, stage: int, p: Preset, device) -> dict[str, int]:
    """Freeze all but what the stage trains; no dropout inside the encoders, as in the paper's Qwen2 student (its
    dropout rates are 0), which also makes K ranks train exactly like one (the preset's vector dropout stays).
    Returns {trainable parameter: size}."""
    trainable = jasper.set_trainable(model, stage)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    if p.gradient_checkpointing:
        model.text.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.to(device)
    return trainable


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW's parameter groups as the official training code has them: weight decay on the trainable weights,
    none on biases and normalization weights (LayerNorm, RMSNorm)."""
    norms = {id(w) for m in model.modules() if "Norm" in type(m).__name__ for w in m.parameters(recurse=False)}
    groups = {weight_decay: [], 0.0: []}
    for name, w in model.named_parameters():
        if w.requires_grad:
            groups[0.0 if name.endswith("bias") or id(w) in norms else weight_decay].append(w)
    return [{"params": ws, "weight_decay": decay} for decay, ws in groups.items() if ws]


def deepspeed_engine(model: jasper.Jasper, plan: StagePlan, p: Preset, world: int, device):
    """AdamW (fused: one kernel over all weights), warmup then cosine, gradient clipping, bf16 on GPU; ZeRO-2 over
    more than one rank, as in the paper; one process has nothing to partition, and ZeRO-2 there only adds copies
    (bench.py --step: with torch's unfused AdamW, 1.2x slower)."""
    optimizer = torch.optim.AdamW(parameter_groups(model, p.weight_decay), lr=plan.lr, fused=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_then_cosine(s, plan.steps, p.warmup_share))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule, config={
        "train_micro_batch_size_per_gpu": plan.batch_size // world,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 2 if world > 1 else 0},
        "bf16": {"enabled": device.type == "cuda"},
        "gradient_clipping": 1.0,
        "steps_per_print": 10 ** 9,
    })
    return engine, schedule


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


def save_checkpoint(engine, ckpt_dir: Path, step: int, before: dict, rank: int) -> None:
    """A resumable checkpoint after `step` steps; only the newest one is kept."""
    engine.save_checkpoint(str(ckpt_dir), tag=f"step{step}", client_state={"step": step, "heldout_before": before})
    if rank == 0:
        for old in ckpt_dir.glob("step*"):
            if old.name != f"step{step}":
                shutil.rmtree(old)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", type=int, required=True, choices=[1, 2, 3, 4])
    presets.add_arguments(ap)
    ap.add_argument("--out", type=Path, default=Path("runs/toy"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, help="override the preset's steps for this stage")
    ap.add_argument("--batch-size", type=int, help="override the global batch size")
    ap.add_argument("--lr", type=float, help="override the learning rate")
    ap.add_argument("--checkpoint-every", type=int, help="override the checkpoint interval (steps)")
    ap.add_argument("--forward-chunk", type=int, help="texts per forward pass on each rank")
    ap.add_argument("--gradient-checkpointing", action="store_true", default=None,
                    help="recompute the encoder's activations in backward (less memory, ~1/3 more compute)")
    ap.add_argument("--loss-batch", choices=["global", "rank"],
                    help="what L_sim and L_resim compare: the global batch (gathered over the ranks) or each rank's "
                         "own texts (the official code's way); default: the preset's")
    ap.add_argument("--vector-dropout", type=float, help="dropout on the pooled vector while training (preset's)")
    ap.add_argument("--short-teacher", choices=["target", "fc1", "both"],
                    help="stage 3: what teaches the short MRL heads: the teachers' target (paper 2.4, the default), "
                         "FC1's own vectors (self-distillation, paper 2.4's proposal) or both (mean of the two losses)")
    ap.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    return ap.parse_args(argv)


def settings(args) -> tuple[Preset, StagePlan]:
    """The preset with the command line's overrides, and this stage's plan."""
    p = presets.from_arguments(args)
    p = replace(p, **{k: v for k, v in dict(checkpoint_every=args.checkpoint_every, forward_chunk=args.forward_chunk,
                                            gradient_checkpointing=args.gradient_checkpointing,
                                            loss_batch=args.loss_batch, vector_dropout=args.vector_dropout).items()
                      if v is not None})
    plan = replace(p.stages[args.stage], **{k: v for k, v in dict(steps=args.steps, batch_size=args.batch_size,
                                                                  lr=args.lr).items() if v is not None})
    return p, plan


def check_preconditions(args, p: Preset, plan: StagePlan) -> None:
    """Everything a stage needs that can be checked in an instant, before any corpus, teacher or model loads: a
    missing one raises InputError, which ends the command in one line (on rank 0), not a traceback minutes later
    on every rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    previous = args.out / f"stage{args.stage - 1}"
    meta_file = args.out / "teachers" / "meta.json"
    n_train = p.n_pairs - p.heldout_pairs if args.stage == 4 else p.n_texts - p.heldout
    problem = None
    if args.short_teacher is not None and args.stage != 3:
        problem = "--short-teacher applies to stage 3, where the short MRL heads are trained"
    elif p.loss_batch not in ("global", "rank"):
        problem = f"loss_batch must be global or rank, not {p.loss_batch!r}"
    elif plan.batch_size % world:
        problem = f"the global batch {plan.batch_size} does not split over {world} ranks"
    elif n_train < plan.batch_size:
        problem = f"{n_train} training examples cannot fill a batch of {plan.batch_size}"
    elif args.stage == 4 and p.vision_encoder is None:
        problem = f"the preset {p.name} has no vision encoder for stage 4"
    elif args.stage > 1 and not (previous / "jasper_config.json").is_file():
        problem = f"stage {args.stage} starts from {previous}, which has no finished model: run --stage {args.stage - 1} first"
    elif args.stage in (2, 3) and meta_file.is_file() and fc1_width(previous) != target_width(meta_file):
        problem = (f"{previous} has FC1 width {fc1_width(previous)}, but the teachers in {meta_file.parent} give "
                   f"{target_width(meta_file)}")
    elif args.stage < 4:
        problem = teachers.data_problem(args.out, p, args.seed)
    if problem:
        raise InputError(problem)


def fc1_width(stage_dir: Path) -> int:
    return json.loads((stage_dir / "jasper_config.json").read_text())["head_dims"][0]


def target_width(meta_file: Path) -> int:
    return sum(t["dim"] for t in json.loads(meta_file.read_text())["teachers"])


def main(argv=None):
    args = parse_args(argv)
    p, plan = settings(args)
    check_preconditions(args, p, plan)
    rank, world = setup_distributed()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    torch.manual_seed(args.seed)

    if args.stage == 4:
        model, tokenizer = load_student(args.out, 4, p)
        task = ImageStage(image_caption_pairs(p, args.seed), tokenizer,
                          jasper.load_image_processor(p.vision_encoder), p, device)
    else:
        corpus, cache = prepare_data(args.out, p, args.seed, rank, world, device)
        model, tokenizer = load_student(args.out, args.stage, p, cache.dim)
        n_train = len(corpus) - p.heldout
        task = TextStage(corpus, cache, tokenizer, p, device, args.short_teacher or "target",
                         reuse_pooled=args.stage == 1 and plan.steps * plan.batch_size > n_train)
    n_train = task.n_examples - task.n_heldout
    heldout = np.arange(n_train, task.n_examples)
    trainable = prepare_for_stage(model, args.stage, p, device)
    stage_dir, ckpt_dir = args.out / f"stage{args.stage}", args.out / f"stage{args.stage}" / "checkpoints"
    resuming = (ckpt_dir / "latest").is_file()
    before = None if resuming else task.heldout_scores(model, heldout)
    engine, schedule = deepspeed_engine(model, plan, p, world, device)
    start = 0
    if resuming:
        _, client = engine.load_checkpoint(str(ckpt_dir))
        start, before = client["step"], client["heldout_before"]
    if rank == 0:
        stage_dir.mkdir(parents=True, exist_ok=True)
        log, writer = resume_log(stage_dir / "log.csv", start)
        print(f"stage {args.stage}: {sum(trainable.values()):,} trainable parameters, {plan.steps} steps of "
              f"{plan.batch_size} on {world} rank(s), {task.n_examples} examples ({task.n_heldout} held out)"
              + (f", resuming at step {start}" if start else ""))

    tokens, t0 = 0, time.time()
    bar = tqdm(range(start, plan.steps), initial=start, total=plan.steps, desc=f"stage {args.stage}", disable=rank != 0)
    for step in bar:
        parts, real = task.loss(engine, batch_indices(step, plan.batch_size, n_train, args.seed), rank, world)
        # DeepSpeed averages the ranks' gradients. A global loss sends each rank only its own shard's part of the
        # gradient, so W times that averages to the whole; per-rank losses average to their mean's gradient.
        engine.backward(parts["loss"] * (world if p.loss_batch == "global" else 1))
        lr = schedule.get_last_lr()[0]
        engine.step()
        tokens += real
        if step % p.log_every == 0 or step == plan.steps - 1:
            values = torch.stack([v.detach().float() for v in parts.values()])
            if p.loss_batch == "rank":  # log the mean over the ranks, which the step followed
                dist.all_reduce(values)
                values /= world
            row = {"step": step, "lr": lr, **dict(zip(parts, values.tolist()))}
            if rank == 0:
                if writer is None:
                    writer = csv.DictWriter(log, fieldnames=list(row))
                    writer.writeheader()
                writer.writerow(row)
                log.flush()
                bar.set_postfix(loss=f"{row['loss']:.4f}")
        if (step + 1) % p.checkpoint_every == 0 and step + 1 < plan.steps:
            save_checkpoint(engine, ckpt_dir, step + 1, before, rank)
    elapsed = time.time() - t0
    tokens = torch.tensor(tokens, device=device)
    dist.all_reduce(tokens)

    after = task.heldout_scores(engine.module, heldout)
    if rank == 0:
        log.close()
        save_stage(engine.module, tokenizer, task, stage_dir, p)
        summary = {"stage": args.stage, "preset": p.name, "student": p.student, "world_size": world, "plan": asdict(plan),
                   "steps_run": plan.steps - start, "seconds": round(elapsed, 1),
                   "examples_per_second": round(plan.batch_size * (plan.steps - start) / max(elapsed, 1e-9), 1),
                   **({"tokens_per_second": round(int(tokens) / max(elapsed, 1e-9), 1)} if int(tokens) else {}),
                   "trainable_parameters": sum(trainable.values()),
                   **({"short_teacher": task.short_teacher} if args.stage == 3 else {}),
                   "heldout_before": before, "heldout_after": after}
        (stage_dir / "eval.json").write_text(json.dumps(summary, indent=2) + "\n")
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        print(f"stage {args.stage} done in {elapsed:.0f} s ({summary['examples_per_second']:.1f} examples/s); "
              f"held-out loss {before['loss']:.4f} -> {after['loss']:.4f}; saved {stage_dir}")
    dist.barrier()


def save_stage(model: jasper.Jasper, tokenizer, task, stage_dir: Path, p: Preset) -> None:
    """The model (also a sentence-transformers folder, with the query prompt), its tokenizer and preprocessing."""
    model.save_pretrained(stage_dir, prompts={**p.prompts, "document": ""})
    tokenizer.model_max_length = p.max_length  # sentence-transformers truncates there
    tokenizer.save_pretrained(stage_dir / "text")
    if isinstance(task, ImageStage):
        task.processor.save_pretrained(stage_dir / "vision")


if __name__ == "__main__":
    presets.run_command("train.py", main)
