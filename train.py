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


def preset(name: str) -> Preset:
    if name == "toy":
        # mirrors the paper: the student starts from one of its teachers (there: Stella; here: MiniLM)
        minilm = data.all_minilm_l6_v2()
        return Preset(student=minilm, teachers={"minilm": minilm, "mpnet": data.all_mpnet_base_v2()},
                      mrl_dims=[256, 128, 64], max_length=128, n_texts=2000, heldout=200,
                      stages={1: StagePlan(32, 2e-3, 300), 2: StagePlan(32, 2e-4, 150), 3: StagePlan(32, 5e-5, 150)})
    if name == "paper":
        return Preset(student="dunzhang/stella_en_1.5B_v5",
                      teachers={"nv_embed_v2": "nvidia/NV-Embed-v2", "stella": "dunzhang/stella_en_1.5B_v5"},
                      mrl_dims=[1024, 512, 256], max_length=512, n_texts=8_000_000, heldout=10_000,
                      stages={1: StagePlan(128, 1e-4, 4000), 2: StagePlan(128, 8e-5, 7000), 3: StagePlan(128, 7e-5, 2200)},
                      checkpoint_every=500, log_every=10, forward_chunk=16)
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
        real, padded = real + int(batch["attention_mask"].sum()), padded + batch["attention_mask"].numel()
    return {width: torch.cat([o[width] for o in outputs]) for width in outputs[0]}, real, padded


def tokenize(tokenizer, texts: list[str], max_length: int, device) -> dict[str, torch.Tensor]:
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def heldout_losses(model: jasper.Jasper, tokenizer, texts: list[str], cache: data.TeacherCache,
                   indices: np.ndarray, max_length: int, device) -> dict[str, float]:
    """Every loss part of every head on the held-out texts, averaged over batches of EVAL_BATCH
    (the last partial batch is left out: batch size changes L_resim's and L_sim's values)."""
    size = min(EVAL_BATCH, len(indices))
    if size < 3:
        raise ValueError(f"{len(indices)} held-out texts: at least 3 are needed for L_resim")
    was_training = model.training
    model.eval()
    sums, batches = {}, 0
    for start in range(0, len(indices) - size + 1, size):
        idx = indices[start:start + size]
        student = model(**tokenize(tokenizer, [texts[i] for i in idx], max_length, device))
        parts = jasper.text_distill_loss(student, cache.targets(idx).to(device))
        for name, value in parts.items():
            sums[name] = sums.get(name, 0.0) + float(value)
        batches += 1
    model.train(was_training)
    return {name: total / batches for name, total in sums.items()}


# ----------------------------------------------------------------------------- training

def warmup_then_cosine(step: int, steps: int, warmup_share: float) -> float:
    """The learning-rate factor: linear warmup over the first share of steps, then cosine to 0."""
    warmup = max(1, round(warmup_share * steps))
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def load_student(out: Path, stage: int, p: Preset, target_dim: int) -> tuple[jasper.Jasper, object]:
    """Stage 1 starts from the base student with a fresh FC1; stage N from OUT/stage{N-1}."""
    if stage == 1:
        model = jasper.Jasper(jasper.JasperConfig(text_encoder=p.student, head_dims=[target_dim]))
        tokenizer = AutoTokenizer.from_pretrained(p.student)
    else:
        previous = out / f"stage{stage - 1}"
        if not (previous / "jasper_config.json").is_file():
            raise FileNotFoundError(f"stage {stage} starts from {previous}: run --stage {stage - 1} first")
        model = jasper.Jasper.from_pretrained(previous)
        tokenizer = AutoTokenizer.from_pretrained(previous / "text")
        if model.config.head_dims[0] != target_dim:
            raise ValueError(f"{previous} has FC1 width {model.config.head_dims[0]}, the teachers give {target_dim}")
    if stage == 3:
        model.add_heads(p.mrl_dims)
    tokenizer.padding_side = "right"
    return model, tokenizer


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
    ap.add_argument("--stage", type=int, required=True, choices=[1, 2, 3])
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

    out, stage_dir = args.out, args.out / f"stage{args.stage}"
    texts, cache = prepare_data(out, p, args.preset, args.seed, rank, world, str(device))
    n_train = len(texts) - p.heldout
    if n_train < plan.batch_size:
        raise ValueError(f"{n_train} training texts cannot fill a batch of {plan.batch_size}")
    heldout = np.arange(n_train, len(texts))
    lengths = np.array([len(text) for text in texts])

    model, tokenizer = load_student(out, args.stage, p, cache.dim)
    trainable = jasper.set_trainable(model, args.stage)
    for module in model.modules():  # no dropout, as in the paper's Qwen2 student (its dropout rates are 0);
        if isinstance(module, torch.nn.Dropout):  # it also makes K ranks train exactly like one
            module.p = 0.0
    if p.gradient_checkpointing:
        model.text.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.to(device)
    ckpt_dir, log_file = stage_dir / "checkpoints", stage_dir / "log.csv"
    resuming = (ckpt_dir / "latest").is_file()
    before = None if resuming else heldout_losses(model, tokenizer, texts, cache, heldout, p.max_length, device)

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
              f"{plan.batch_size} texts on {world} rank(s), {len(texts)} texts ({p.heldout} held out)"
              + (f", resuming at step {start}" if start else ""))

    tokens, t0 = 0, time.time()
    bar = tqdm(range(start, plan.steps), initial=start, total=plan.steps, desc=f"stage {args.stage}",
               disable=rank != 0)
    for step in bar:
        slices = rank_slices(batch_indices(step, plan.batch_size, n_train, args.seed), lengths, world)
        vectors, real, _ = forward_in_chunks(engine, text_chunks(tokenizer, [texts[i] for i in slices[rank]],
                                                                 p.forward_chunk, p.max_length, device))
        student = {d: gather_with_grad(v) for d, v in vectors.items()}  # rows in the order of np.concatenate(slices)
        parts = jasper.text_distill_loss(student, cache.targets(np.concatenate(slices)).to(device))
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

    after = heldout_losses(engine.module, tokenizer, texts, cache, heldout, p.max_length, device)
    if rank == 0:
        log.close()
        engine.module.save_pretrained(stage_dir)
        tokenizer.save_pretrained(stage_dir / "text")
        summary = {"stage": args.stage, "preset": args.preset, "world_size": world, "plan": asdict(plan),
                   "steps_run": plan.steps - start, "seconds": round(elapsed, 1),
                   "tokens_per_second": round(tokens / max(elapsed, 1e-9), 1),
                   "trainable_parameters": sum(trainable.values()),
                   "heldout_before": before, "heldout_after": after}
        (stage_dir / "eval.json").write_text(json.dumps(summary, indent=2) + "\n")
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        print(f"stage {args.stage} done in {elapsed:.0f} s ({summary['tokens_per_second']:.0f} tokens/s); "
              f"held-out loss {before['loss']:.4f} -> {after['loss']:.4f}; saved {stage_dir}")
    dist.barrier()


if __name__ == "__main__":
    main()
