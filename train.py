"""Distill the teachers into the student, one stage at a time (paper 2.3-2.5, 3.1), on any number of ranks.

    python train.py --stage 1 --preset toy --out runs/toy      # then --stage 2, 3 and 4
    deepspeed --num_gpus 8 train.py --stage 1 --preset paper --out runs/paper
    python train.py --stage 3 --preset paper --plan --gpus 8 --gpu-memory 48   # the memory plan: no GPU, no weights

train_minimal.py is the method's training in plain PyTorch; read it first. This is the same training, plus:

- DeepSpeed: ZeRO-2 over several ranks, bf16 on GPUs, NCCL there and gloo on CPUs.
- The paper's batch on any number of ranks. A preset's batch size is what each loss compares (the paper's 128 texts
  per GPU) and a step follows `loss_batches` of them (the paper's 8 GPUs). With fewer ranks, each computes several
  loss batches one after another and DeepSpeed accumulates their gradients; with more, a loss batch is shared by
  several ranks, whose vectors are gathered for the loss. Either way a step sees the same texts in the same losses.
- Length-sorted forward chunks (each pads only to its own longest text), optional activation checkpointing and
  cached gradients (two passes: the loss's gradient for every vector first, then the encoder chunk by chunk), so
  activation memory need not grow with the batch. A memory plan (memory_plan.py) says what fits before launch.
- Resuming: a killed run started again with the same command resumes from its last checkpoint
  (OUT/stageN/checkpoints) and ends where an uninterrupted run ends.
- Checks: anything wrong with the inputs stops the command in one line before anything loads; held-out scores before
  and after in OUT/stageN/eval.json, every step's losses in log.csv.

Stage N starts from OUT/stage{N-1} (stage 1 from the preset's base student) and writes OUT/stageN/, a model that
jasper.Jasper.from_pretrained and sentence-transformers both load. The corpus (OUT/data) and the teachers' vectors
(OUT/teachers) are built once by teachers.py, run by itself or by whichever stage runs first.
"""

import argparse
import contextlib
import csv
import io
import json
import math
import os
import shutil
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

if not torch.cuda.is_available():  # said, so that DeepSpeed does not warn that it had to guess
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
import deepspeed  # noqa: E402

import batching
import commands
import data
import export
import jasper
import memory_plan
import metrics
import presets
import teachers
from commands import InputError
from presets import Preset, StagePlan
from train_minimal import batch_indices, freeze_for_stage, learning_rate_factor, load_student, parameter_groups

EVAL_BATCH = 32  # held-out losses use one batch size in every stage, so they compare


def main(argv=None):
    args = parse_args(argv)
    preset, plan = presets.from_arguments(args, args.stage)
    if args.plan:
        print(memory_plan.plan(args.stage, preset, plan, args.gpus, args.gpu_memory).report())
        return
    check_preconditions(args, preset, plan)
    layout = setup_distributed(preset.loss_batches, plan.batch_size)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":  # a plan that does not fit stops here, before any weights load
        memory_plan.check_fits(args.stage, preset, plan, layout.world,
                               torch.cuda.get_device_properties(device).total_memory / 2 ** 30)
    if args.stage < 4:
        stage = TextStage(args, preset, plan, layout, device)
    else:
        stage = ImageStage(args, preset, layout, device)
    train(stage, args, preset, plan, layout, device)


# ----------------------------------------------------------------------------- what a stage does
# A stage is its examples (the last n_heldout never train), what the student reads of them, the teacher's vectors
# for them, the loss, and the held-out scores. Stages 1-3 distill texts, stage 4 images; train() runs either.

class TextStage:
    """Stages 1-3 (paper 2.3-2.4): every head of the student against the teachers' target for each text.

    While the encoder is frozen (stage 1) a text's pooled state never changes, so it is computed once and reused
    whenever the text comes up again (another epoch, the held-out scores after training): the same loss and gradients
    as running the encoder every time. The texts are encoded in fixed blocks of similar length (training and held-out
    texts apart), so a text's pooled state does not depend on which batch first asked for it: a resumed run computes
    the very same numbers."""

    def __init__(self, args, preset: Preset, plan: StagePlan, layout, device):
        self.preset, self.device = preset, device
        self.corpus, self.cache = prepare_data(args.out, preset, args.seed, layout, device)
        torch.manual_seed(args.seed)  # the fresh heads start alike in train_minimal.py
        self.model, self.tokenizer = load_student(args.out, args.stage, preset, self.cache.dim)
        self.short_teacher = args.short_teacher or "target"
        prompt_lengths = np.array([len(preset.prompts.get(kind, "")) for kind in data.KINDS])
        self.lengths = self.corpus.lengths + prompt_lengths[self.corpus.kinds]  # characters the student reads
        self.n_examples, self.n_heldout = len(self.corpus), preset.heldout
        self.n_train = self.n_examples - self.n_heldout
        # reused when a text comes up again; with cached gradients every step reads its chunks of tokens
        reuse = (args.stage == 1 and not plan.cached_gradients
                 and plan.steps * plan.batch_size * preset.loss_batches > self.n_train)
        self.pooled = {} if reuse else None  # text index -> (H,) pooled state
        if reuse:
            self.blocks, self.block_of = length_blocks(self.lengths, self.n_train, preset.forward_chunk)

    def inputs(self, model, rows: np.ndarray, chunk: int) -> tuple[list[dict], int]:
        """What the student reads for these texts, `chunk` at a time, and how many new real tokens that took: token
        batches, or pooled states where the encoder is frozen."""
        if self.pooled is None:
            texts = self.corpus.prompted(rows, self.preset.prompts)
            batches = list(batching.text_chunks(self.tokenizer, texts, chunk, self.preset.max_length, self.device))
            return batches, sum(int(b["attention_mask"].sum()) for b in batches)
        tokens = 0
        for block in dict.fromkeys(self.block_of[i] for i in rows.tolist() if i not in self.pooled):
            with torch.no_grad():  # the encoder is frozen: no gradient reaches it either way
                batch = batching.tokenize(self.tokenizer, self.corpus.prompted(self.blocks[block], self.preset.prompts),
                                          self.preset.max_length, self.device)
                pooled = getattr(model, "module", model).embed_text(**batch)
                self.pooled.update(zip(self.blocks[block].tolist(), pooled))
            tokens += int(batch["attention_mask"].sum())
        return [{"pooled": torch.stack([self.pooled[i] for i in rows.tolist()])}], tokens  # FC1 alone: one batch

    def teacher(self, model, rows: np.ndarray, chunk: int) -> torch.Tensor:
        """(len(rows), sum of the teachers' widths): the teachers' target for these texts."""
        return jasper.teacher_target(*map(torch.from_numpy, self.cache.rows(rows))).to(self.device)

    def loss(self, student: dict[int, torch.Tensor], target: torch.Tensor) -> dict[str, torch.Tensor]:
        return jasper.text_distill_loss(student, target, self.short_teacher, self.preset.head_average)

    def heldout_scores(self, model: jasper.Jasper, rows: np.ndarray) -> dict[str, float]:
        """Every loss part of every head against the teachers' target, and per head "{width}_spearman": how well the
        head orders all held-out text pairs by similarity as the teachers do (Spearman over the C(n,2) cosines)."""
        with batching.evaluating(model):
            student, _, _ = batching.forward_in_chunks(model, self.inputs(model, rows, self.preset.forward_chunk)[0])
        target = self.teacher(model, rows, self.preset.forward_chunk)
        scores = mean_over_batches(self.loss, student, target, len(rows))
        i, j = torch.triu_indices(len(rows), len(rows), offset=1)
        teacher_pairs = (target @ target.T)[i, j]
        for width, vectors in student.items():
            scores[f"{width}_spearman"] = metrics.spearman((vectors @ vectors.T)[i, j], teacher_pairs)
        return scores


class ImageStage:
    """Stage 4 (paper 2.5): each head's image vector against the same head's vector of the image's caption, which the
    frozen text side computes in the same step (it is the teacher)."""

    def __init__(self, args, preset: Preset, layout, device):
        self.preset, self.device = preset, device
        self.pairs = presets.image_caption_pairs(preset, args.seed)
        self.processor = jasper.load_image_processor(preset.vision_encoder)
        torch.manual_seed(args.seed)
        self.model, self.tokenizer = load_student(args.out, 4, preset)
        self.lengths = None  # images have no padding to save
        self.n_examples, self.n_heldout = len(self.pairs), preset.heldout_pairs
        self.n_train = self.n_examples - self.n_heldout

    def inputs(self, model, rows: np.ndarray, chunk: int) -> tuple[list[dict], int]:
        images = [self.pairs[int(i)][0] for i in rows]
        return list(batching.image_chunks(self.processor, images, chunk, self.device)), 0

    def teacher(self, model, rows: np.ndarray, chunk: int) -> dict[int, torch.Tensor]:
        """Each head's vectors of the captions: the frozen text side's, in eval mode (vector dropout leaves them
        alone), without gradients."""
        captions = [self.pairs[int(i)][1] for i in rows]
        chunks = batching.text_chunks(self.tokenizer, captions, chunk, self.preset.max_length, self.device)
        return batching.embed(getattr(model, "module", model), chunks)

    def loss(self, image: dict[int, torch.Tensor], caption: dict[int, torch.Tensor]) -> dict[str, torch.Tensor]:
        return jasper.image_distill_loss(image, caption)

    def heldout_scores(self, model: jasper.Jasper, rows: np.ndarray) -> dict[str, float]:
        """The loss parts of every head, and per head recall@1 of image -> caption ("{width}_i2c") and caption ->
        image ("{width}_c2i") among all held-out pairs; a hit is a retrieved item whose caption is the query's
        caption, so repeated captions count alike; "chance" is the hit rate of a random pick."""
        image = batching.embed(model, self.inputs(model, rows, EVAL_BATCH)[0])
        caption = self.teacher(model, rows, EVAL_BATCH)
        scores = mean_over_batches(self.loss, image, caption, len(rows))
        captions = [self.pairs[int(i)][1] for i in rows]
        for width in image:
            recall = metrics.recall_at_1((image[width] @ caption[width].T).cpu(), captions)
            scores[f"{width}_i2c"], scores[f"{width}_c2i"], scores["chance"] = recall
        return scores


# ----------------------------------------------------------------------------- how a stage trains

def train(stage, args, preset: Preset, plan: StagePlan, layout, device) -> None:
    """Every step of the stage, resumable; then the held-out scores, the model and eval.json."""
    trainable = freeze_for_stage(stage.model, args.stage)
    if plan.gradient_checkpointing:
        memory_plan.enable_checkpointing(stage.model, args.stage)
    stage.model.to(device)
    stage_dir = args.out / f"stage{args.stage}"
    checkpoints = stage_dir / "checkpoints"
    heldout = np.arange(stage.n_train, stage.n_examples)
    resuming = (checkpoints / "latest").is_file()
    before = None if resuming else stage.heldout_scores(stage.model, heldout)
    engine, schedule = deepspeed_engine(stage.model, plan, preset, layout, device)
    start = 0
    if resuming:
        _, client = engine.load_checkpoint(str(checkpoints))
        start, before = client["step"], client["heldout_before"]
    settings = describe(args.stage, trainable, plan, preset, layout, stage)
    if layout.rank == 0:
        stage_dir.mkdir(parents=True, exist_ok=True)
        log = StepLog(stage_dir / "log.csv", start)
        print(settings + (f", resuming at step {start}" if start else ""))

    tokens, t0 = 0, time.time()
    bar = tqdm(range(start, plan.steps), initial=start, total=plan.steps, desc=f"stage {args.stage}",
               disable=layout.rank != 0 or None)  # None: a bar on a terminal, none in a log file or a notebook
    for step in bar:
        lr = schedule.get_last_lr()[0]
        idx = batch_indices(step, plan.batch_size * preset.loss_batches, stage.n_train, args.seed)
        parts, step_tokens = train_step(engine, stage, layout, idx, preset, plan)
        tokens += step_tokens
        if step % preset.log_every == 0 or step == plan.steps - 1:
            row = {"step": step, "lr": lr, **layout.mean_over_loss_batches(parts)}
            if layout.rank == 0:
                log.write(row)
                bar.set_postfix(loss=f"{row['loss']:.4f}")
        if (step + 1) % preset.checkpoint_every == 0 and step + 1 < plan.steps:
            save_checkpoint(engine, checkpoints, step + 1, before, layout.rank)
    elapsed, global_batch = time.time() - t0, plan.batch_size * preset.loss_batches
    tokens = torch.tensor(tokens, device=device)
    dist.all_reduce(tokens)

    after = stage.heldout_scores(engine.module, heldout)
    if layout.rank == 0:
        log.close()
        save_stage(engine.module, stage, stage_dir, preset)
        steps_run = plan.steps - start
        summary = {"stage": args.stage, "preset": preset.name, "student": preset.student, "settings": settings,
                   "world_size": layout.world, "loss_batch": plan.batch_size, "loss_batches": preset.loss_batches,
                   "accumulation": layout.accumulation, "global_batch": global_batch,
                   "plan": asdict(plan), "steps_run": steps_run, "seconds": round(elapsed, 1),
                   "examples_per_second": round(global_batch * steps_run / max(elapsed, 1e-9), 1),
                   **({"tokens_per_second": round(int(tokens) / max(elapsed, 1e-9), 1)} if int(tokens) else {}),
                   "trainable_parameters": sum(trainable.values()),
                   **({"short_teacher": stage.short_teacher, "head_average": preset.head_average}
                      if args.stage == 3 else {}),
                   "heldout_before": before, "heldout_after": after}
        (stage_dir / "eval.json").write_text(json.dumps(summary, indent=2) + "\n")
        shutil.rmtree(checkpoints, ignore_errors=True)
        print(f"stage {args.stage} done in {elapsed:.0f} s ({summary['examples_per_second']:.1f} examples/s); "
              f"held-out loss {before['loss']:.4f} -> {after['loss']:.4f}; saved {stage_dir}")
    dist.barrier()


def train_step(engine, stage, layout, idx: np.ndarray, preset: Preset, plan: StagePlan) -> tuple[dict, int]:
    """One optimizer step over the global batch `idx`: this rank's share of each of its loss batches, one after another
    (DeepSpeed accumulates; its last engine.step() updates the weights). Returns this rank's loss parts summed over its
    loss batches, and the real tokens its encoder read."""
    totals, tokens = {}, 0
    # DeepSpeed averages the ranks' gradients, and each rank's gradient holds only its own share of a shared loss
    # batch: scaled by the ranks per loss batch, over the loss batches each rank computes, the step follows the
    # mean of the loss batches' losses.
    scale = layout.group_size / layout.accumulation
    for rows in layout.shares(idx, stage.lengths):
        step = cached_gradient_step if plan.cached_gradients else one_pass_step
        parts, read = step(engine, stage, rows, layout, scale, preset.forward_chunk)
        totals = {name: totals.get(name, 0.0) + value.detach().float() for name, value in parts.items()}
        tokens += read
    return totals, tokens


def one_pass_step(engine, stage, rows: np.ndarray, layout, scale: float, chunk: int):
    """Forward every chunk with its graph kept, the loss over the whole loss batch, one backward pass."""
    teacher = gather(stage.teacher(engine, rows, chunk), layout.group)
    batches, tokens = stage.inputs(engine, rows, chunk)
    vectors, _, _ = batching.forward_in_chunks(engine, batches)
    parts = stage.loss({width: gather_with_grad(v, layout.group) for width, v in vectors.items()}, teacher)
    engine.backward(parts["loss"] * scale, scale_wrt_gas=False)
    engine.step()
    return parts, tokens


def cached_gradient_step(engine, stage, rows: np.ndarray, layout, scale: float, chunk: int):
    """The same gradient as one_pass_step with the activations of one chunk at a time (GradCache, Gao et al. 2021):

    1. every chunk forward without a graph: the vectors (the random state before each chunk is kept);
    2. the loss over the whole loss batch, and its gradient g with respect to every vector;
    3. each chunk forward again from its kept random state (the same dropout), with a graph, and backward of
       sum(vectors * g): that chunk's share of the gradient. Each is one DeepSpeed micro-step.
    """
    batches, tokens = stage.inputs(engine, rows, chunk)
    states, outputs = [], []
    with torch.no_grad():
        for batch in batches:
            states.append(random_state())
            outputs.append(engine(**batch))
    vectors = {width: torch.cat([o[width] for o in outputs]) for width in outputs[0]}
    leaves = {width: gather(v, layout.group).requires_grad_(True) for width, v in vectors.items()}
    parts = stage.loss(leaves, gather(stage.teacher(engine, rows, chunk), layout.group))
    grads = dict(zip(leaves, torch.autograd.grad(parts["loss"] * scale, list(leaves.values()))))
    own = layout.position * len(rows)  # this rank's rows in the gathered loss batch
    for batch, state, output in zip(batches, states, outputs):
        restore_random_state(state)
        again = engine(**batch)
        n = len(next(iter(output.values())))
        engine.backward(sum((again[w] * grads[w][own:own + n]).sum() for w in again), scale_wrt_gas=False)
        engine.step()
        own += n
    return parts, tokens


def random_state() -> tuple:
    return torch.get_rng_state(), torch.cuda.get_rng_state() if torch.cuda.is_available() else None


def restore_random_state(state: tuple) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1])


def deepspeed_engine(model: jasper.Jasper, plan: StagePlan, preset: Preset, layout, device):
    """AdamW (fused: one kernel over all weights) in the official code's groups, warmup then cosine, gradient clipping,
    bf16 on GPU; ZeRO-2 over more than one rank, as in the paper; one process has nothing to partition, and ZeRO-2
    there only adds copies (bench.py --step). DeepSpeed's micro-steps are the backward passes of a step: one per loss
    batch of this rank, times its chunks with cached gradients."""
    optimizer = torch.optim.AdamW(parameter_groups(model, preset.weight_decay), lr=plan.lr, fused=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer,
                                                 lambda k: learning_rate_factor(k, plan, preset.warmup_share))
    share = plan.batch_size // layout.group_size  # texts of a loss batch on one rank
    backward_passes = math.ceil(share / preset.forward_chunk) if plan.cached_gradients else 1
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule, config={
        "train_micro_batch_size_per_gpu": math.ceil(share / backward_passes),
        "gradient_accumulation_steps": layout.accumulation * backward_passes,
        "zero_optimization": {"stage": 2 if layout.world > 1 else 0},
        "bf16": {"enabled": device.type == "cuda"},
        "gradient_clipping": 1.0,
        "steps_per_print": 10 ** 9,
    })
    return engine, schedule


def describe(stage_number: int, trainable: dict, plan: StagePlan, preset: Preset, layout, stage) -> str:
    """The run's first line: what trains, for how long, on how many ranks, and the batch each loss and step sees."""
    memory = [name for name, on in (("activation checkpointing", plan.gradient_checkpointing),
                                    ("cached gradients", plan.cached_gradients)) if on]
    return (f"stage {stage_number}: {sum(trainable.values()):,} trainable parameters, {plan.steps} steps "
            f"(schedule {plan.schedule_length}); {layout.world} rank(s), loss batch {plan.batch_size}, "
            f"accumulation {layout.accumulation}, global batch {plan.batch_size * preset.loss_batches}; "
            f"{' and '.join(memory) or 'no memory savers'}; {stage.n_examples} examples ({stage.n_heldout} held out)")


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


def length_blocks(lengths: np.ndarray, n_train: int, size: int) -> tuple[list[np.ndarray], np.ndarray]:
    """The texts in blocks of `size` of similar length, training texts and held-out ones apart: (the blocks' text
    indices, each text's block)."""
    blocks, block_of = [], np.empty(len(lengths), dtype=np.int64)
    for part in (np.arange(n_train), np.arange(n_train, len(lengths))):
        by_length = part[np.argsort(lengths[part], kind="stable")]
        block_of[by_length] = len(blocks) + np.arange(len(part)) // size
        blocks += [by_length[k:k + size] for k in range(0, len(part), size)]
    return blocks, block_of


# ----------------------------------------------------------------------------- ranks

@dataclass
class Layout:
    """How a step's loss batches map onto the ranks. With world <= loss_batches, each rank computes `accumulation`
    loss batches alone, one after another; with more ranks, `group_size` ranks share each loss batch (`group`, their
    process group; `position`, this rank's place in it) and gather their vectors for the loss."""
    loss_batches: int
    rank: int
    world: int
    group: object = None  # None: this rank computes its loss batches alone

    @property
    def accumulation(self) -> int:
        return max(1, self.loss_batches // self.world)

    @property
    def group_size(self) -> int:
        return max(1, self.world // self.loss_batches)

    @property
    def position(self) -> int:
        return self.rank % self.group_size

    def shares(self, idx: np.ndarray, lengths: np.ndarray | None) -> list[np.ndarray]:
        """This rank's share of each loss batch it computes. The step's texts split into consecutive loss batches,
        whatever the number of ranks; within a loss batch the texts are sorted by length (characters, a free proxy for
        tokens) and dealt round-robin to its ranks, so each rank gets the same spread of lengths and its forward
        chunks pad little. Every loss is invariant to the order of the texts in its batch."""
        batches = np.split(idx, self.loss_batches)
        mine = batches[self.rank * self.accumulation:(self.rank + 1) * self.accumulation] if self.group_size == 1 \
            else [batches[self.rank // self.group_size]]
        ordered = [b if lengths is None else b[np.argsort(lengths[b], kind="stable")] for b in mine]
        return [b[self.position::self.group_size] for b in ordered]

    def mean_over_loss_batches(self, parts: dict[str, torch.Tensor]) -> dict[str, float]:
        """The mean over the step's loss batches of each summed part: every rank's sums added up, over the ranks times
        each one's loss batches (the ranks that share a loss batch all hold its loss)."""
        values = torch.stack(list(parts.values()))
        if dist.is_initialized() and self.world > 1:
            dist.all_reduce(values)
        return dict(zip(parts, (values / (self.world * self.accumulation)).tolist()))


def probe_deepspeed_ops_quietly() -> None:
    """DeepSpeed's first distributed call probes which of its ops compile here by running a C compiler, and means to
    hide the compiler's complaints (a missing libaio: /usr/bin/ld cannot find -laio); under Jupyter its redirect misses
    the process's real stderr, so the probe runs here first, with file descriptor 2 pointed at /dev/null."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            deepspeed.ops.__compatible_ops__  # noqa: B018 (the probe runs on first access)
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def setup_distributed(loss_batches: int, batch_size: int) -> Layout:
    """Plain `python train.py` gets a one-process group; `deepspeed train.py` sets these itself. Ranks that share a
    loss batch get a process group of their own."""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    probe_deepspeed_ops_quietly()
    with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed prints a line whenever it loads its shared-memory op
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", verbose=False)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    layout = Layout(loss_batches, dist.get_rank(), dist.get_world_size())
    if layout.group_size == layout.world > 1:
        layout.group = dist.group.WORLD
    elif layout.group_size > 1:  # every rank creates every group, in the same order
        groups = [dist.new_group(list(range(g * layout.group_size, (g + 1) * layout.group_size)))
                  for g in range(loss_batches)]
        layout.group = groups[layout.rank // layout.group_size]
    return layout


def gather_with_grad(x: torch.Tensor, group) -> torch.Tensor:
    """(b, d) on each rank of the group -> (group size * b, d) in rank order; the gradient flows to this rank's
    shard. No group: x as it is."""
    if group is None:
        return x
    shards = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(shards, x.detach().contiguous(), group=group)
    shards[dist.get_rank(group)] = x
    return torch.cat(shards)


def gather(x, group):
    """gather_with_grad without the gradient, for a tensor or {width: tensor}."""
    if isinstance(x, dict):
        return {width: gather(v, group) for width, v in x.items()}
    return gather_with_grad(x.detach(), group)


# ----------------------------------------------------------------------------- data, checks, saving

def prepare_data(out: Path, preset: Preset, seed: int, layout, device) -> tuple[data.Corpus, teachers.TeacherCache]:
    """The corpus and the teachers' vectors for it (teachers.py), built by the first stage that runs."""
    try:
        return teachers.prepare(out, preset, seed, layout.rank, layout.world, str(device))
    except ImportError as error:  # e.g. NV-Embed-v2's code under this environment's transformers
        raise InputError(f"a teacher does not load in this environment ({error}); encode the teachers first with "
                         f"teachers.py in their own environment (README, \"Paper scale\")") from error


def check_preconditions(args, preset: Preset, plan: StagePlan) -> None:
    """Everything a stage needs that can be checked in an instant, before any corpus, teacher or model loads: a
    missing one raises InputError, which ends the command in one line (on rank 0), not a traceback minutes later
    on every rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    previous = args.out / f"stage{args.stage - 1}"
    meta_file = args.out / "teachers" / "meta.json"
    n_train = preset.n_pairs - preset.heldout_pairs if args.stage == 4 else preset.n_texts - preset.heldout
    global_batch = plan.batch_size * preset.loss_batches
    problem = None
    if args.short_teacher is not None and args.stage != 3:
        problem = "--short-teacher applies to stage 3, where the short MRL heads are trained"
    elif preset.loss_batches % world and world % preset.loss_batches:
        problem = (f"{preset.loss_batches} loss batches a step do not split over {world} ranks: use a number of ranks "
                   f"that divides {preset.loss_batches} or that it divides")
    elif plan.batch_size % max(1, world // preset.loss_batches):
        problem = f"a loss batch of {plan.batch_size} does not split over {world // preset.loss_batches} ranks"
    elif n_train < global_batch:
        problem = f"{n_train} training examples cannot fill a step of {global_batch}"
    elif args.stage == 4 and preset.vision_encoder is None:
        problem = f"the preset {preset.name} has no vision encoder for stage 4"
    elif args.stage > 1 and not (previous / "jasper_config.json").is_file():
        problem = (f"stage {args.stage} starts from {previous}, which has no finished model: run --stage "
                   f"{args.stage - 1} first")
    elif args.stage in (2, 3) and meta_file.is_file() and fc1_width(previous) != target_width(meta_file):
        problem = (f"{previous} has FC1 width {fc1_width(previous)}, but the teachers in {meta_file.parent} give "
                   f"{target_width(meta_file)}")
    elif args.stage < 4:
        problem = teachers.data_problem(args.out, preset, args.seed)
    if problem:
        raise InputError(problem)


def fc1_width(stage_dir: Path) -> int:
    return json.loads((stage_dir / "jasper_config.json").read_text())["head_dims"][0]


def target_width(meta_file: Path) -> int:
    return sum(t["dim"] for t in json.loads(meta_file.read_text())["teachers"])


class StepLog:
    """log.csv, one row per logged step. A resumed run keeps the rows of the steps before its checkpoint and drops
    those a killed run logged after it (they are redone)."""

    def __init__(self, path: Path, start: int):
        self.writer = None
        if not start or not path.is_file():
            self.file = path.open("w", newline="")
            return
        with path.open() as f:
            reader = csv.DictReader(f)
            fields, kept = reader.fieldnames, [r for r in reader if int(r["step"]) < start]
        tmp = path.with_suffix(".tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(kept)
        tmp.replace(path)  # atomic: a second kill never loses the rows before the checkpoint
        self.file = path.open("a", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=fields)

    def write(self, row: dict) -> None:
        if self.writer is None:
            self.writer = csv.DictWriter(self.file, fieldnames=list(row))
            self.writer.writeheader()
        self.writer.writerow(row)
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def save_checkpoint(engine, folder: Path, step: int, before: dict, rank: int) -> None:
    """A resumable checkpoint after `step` steps; only the newest one is kept."""
    tag = f"step{step}"
    # DeepSpeed writes its `latest` file in place, so a kill -9 inside that write leaves it empty and the run
    # unresumable; here it is replaced whole, after every rank has saved (save_checkpoint ends in a barrier).
    engine.save_checkpoint(str(folder), tag=tag, client_state={"step": step, "heldout_before": before},
                           save_latest=False)
    if rank == 0:
        tmp = folder / "latest.tmp"
        tmp.write_text(tag)
        tmp.replace(folder / "latest")
        for old in folder.glob("step*"):
            if old.name != tag:
                shutil.rmtree(old)


def save_stage(model: jasper.Jasper, stage, stage_dir: Path, preset: Preset) -> None:
    """The model, also as a sentence-transformers model with the prompts it trained with, its tokenizer and its
    image preprocessing."""
    model.save_pretrained(stage_dir)
    export.save_sentence_transformer(model, stage_dir, prompts={**preset.prompts, "document": ""})
    stage.tokenizer.model_max_length = preset.max_length  # sentence-transformers truncates there
    stage.tokenizer.save_pretrained(stage_dir / "text")
    if isinstance(stage, ImageStage):
        stage.processor.save_pretrained(stage_dir / "vision")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", type=int, required=True, choices=[1, 2, 3, 4])
    parser.add_argument("--out", type=Path, default=Path("runs/toy"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--short-teacher", choices=["target", "fc1", "both"],
                        help="stage 3: what teaches the short MRL heads: the teachers' target (paper 2.4, the "
                             "default), FC1's own vectors (self-distillation, paper 2.4's proposal) or both")
    parser.add_argument("--plan", action="store_true", help="print the memory plan for --gpus and --gpu-memory; no "
                                                            "training, no weights, no GPU")
    parser.add_argument("--gpus", type=int, default=8, help="with --plan: the ranks to plan for")
    parser.add_argument("--gpu-memory", type=float, default=80.0, help="with --plan: each GPU's memory in GB (GiB)")
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    presets.add_arguments(parser)
    return parser.parse_args(argv)


if __name__ == "__main__":
    commands.run("train.py", main)
