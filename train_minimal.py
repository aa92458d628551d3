"""Jasper's training as one plain PyTorch script: the method, with nothing around it. Start reading here.

    python train_minimal.py --stage 1        # then --stage 2, 3 and 4: the toy preset into runs/minimal, on a CPU

A stage loads the student the previous stage saved, sets what trains (jasper.set_trainable), and takes AdamW steps on
the stage's loss (jasper.text_distill_loss against the teachers' target, or jasper.image_distill_loss against the
captions' vectors), with warmup then cosine decay and gradient clipping. The first stage also has teachers.py encode
the corpus once: the target of every text.

train.py is this plus DeepSpeed (many GPUs, bf16, ZeRO-2), gradient accumulation, resuming after a kill,
length-sorted forward chunks, cached gradients, held-out scores and the checks; it imports the pieces below, and
tests/test_train.py holds the two equal step by step.
"""

import argparse
import math
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer

import batching
import jasper
import presets
import teachers
from presets import Preset, StagePlan


def batch_indices(step: int, batch_size: int, n_train: int, seed: int) -> np.ndarray:
    """The texts of a step: positions step*B ... step*B + B-1 of an endless stream of epochs, each a fresh permutation
    of the training texts. A pure function of the step, so a resumed run sees exactly the batches it would have seen."""
    positions = np.arange(step * batch_size, (step + 1) * batch_size)
    epochs = positions // n_train
    out = np.empty(batch_size, dtype=np.int64)
    for epoch in np.unique(epochs):
        order = np.random.default_rng([seed, int(epoch)]).permutation(n_train)
        out[epochs == epoch] = order[positions[epochs == epoch] % n_train]
    return out


def learning_rate_factor(step: int, plan: StagePlan, warmup_share: float) -> float:
    """Linear warmup over the first share of the schedule, then cosine decay to 0 at its end (plan.schedule_length,
    the stage's steps unless set apart from them)."""
    steps = plan.schedule_length
    warmup = max(1, round(warmup_share * steps))
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW's groups as the official training code has them: weight decay on the trainable weights, none on biases
    and normalization weights (LayerNorm, RMSNorm)."""
    norms = {id(w) for m in model.modules() if "Norm" in type(m).__name__ for w in m.parameters(recurse=False)}
    groups = {weight_decay: [], 0.0: []}
    for name, w in model.named_parameters():
        if w.requires_grad:
            groups[0.0 if name.endswith("bias") or id(w) in norms else weight_decay].append(w)
    return [{"params": ws, "weight_decay": decay} for decay, ws in groups.items() if ws]


def load_student(out: Path, stage: int, preset: Preset, target_width: int | None = None) -> tuple:
    """Stage 1 starts from the base student with a fresh FC1 as wide as the target; stage N from OUT/stage{N-1}.
    Stage 3 adds the short MRL heads, stage 4 a vision encoder and a fresh pooler. Returns (model, tokenizer)."""
    if stage == 1:
        model = jasper.Jasper(jasper.JasperConfig(text_encoder=preset.student, head_dims=[target_width]))
        tokenizer = AutoTokenizer.from_pretrained(preset.student)
    else:
        model = jasper.Jasper.from_pretrained(out / f"stage{stage - 1}")
        tokenizer = AutoTokenizer.from_pretrained(out / f"stage{stage - 1}" / "text")
    if stage == 3:
        model.add_heads(list(preset.mrl_dims))
    if stage == 4:
        model.add_vision(preset.vision_encoder, preset.pooler, preset.image_tokens)
    model.config.vector_dropout = preset.vector_dropout
    tokenizer.padding_side = "right"
    return model, tokenizer


def freeze_for_stage(model: jasper.Jasper, stage: int) -> dict[str, int]:
    """Only what the stage trains has requires_grad; no dropout inside the encoders, as in the paper's Qwen2 student
    (its rates are 0), which also makes K ranks train exactly like one. Returns {trainable parameter: size}."""
    trainable = jasper.set_trainable(model, stage)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return trainable


def train_stage(out: Path, stage: int, preset: Preset, seed: int = 0) -> list[dict[str, float]]:
    """Train one stage and save it to OUT/stageN; returns every step's loss parts (the mean over its loss batches)."""
    plan = preset.stages[stage]
    if stage < 4:
        corpus, cache = teachers.prepare(out, preset, seed)  # built by the first stage that needs them
        n_train = len(corpus) - preset.heldout
    else:
        pairs = presets.image_caption_pairs(preset, seed)
        n_train = len(pairs) - preset.heldout_pairs
    torch.manual_seed(seed)
    model, tokenizer = load_student(out, stage, preset, cache.dim if stage < 4 else None)
    freeze_for_stage(model, stage)

    def text_loss(rows: np.ndarray) -> dict[str, torch.Tensor]:
        student = model(**batching.tokenize(tokenizer, corpus.prompted(rows, preset.prompts), preset.max_length, "cpu"))
        target = jasper.teacher_target(*map(torch.from_numpy, cache.rows(rows)))
        return jasper.text_distill_loss(student, target, head_average=preset.head_average)

    processor = jasper.load_image_processor(preset.vision_encoder) if stage == 4 else None

    def image_loss(rows: np.ndarray) -> dict[str, torch.Tensor]:
        images, captions = zip(*(pairs[int(i)] for i in rows))
        with batching.evaluating(model):  # the frozen text side's caption vectors are the teachers
            caption = model(**batching.tokenize(tokenizer, list(captions), preset.max_length, "cpu"))
        image = model(pixel_values=processor(list(images), return_tensors="pt")["pixel_values"])
        return jasper.image_distill_loss(image, caption)

    trained = [w for w in model.parameters() if w.requires_grad]
    optimizer = torch.optim.AdamW(parameter_groups(model, preset.weight_decay), lr=plan.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: learning_rate_factor(k, plan,
                                                                                         preset.warmup_share))
    log = []
    for step in range(plan.steps):
        idx = batch_indices(step, plan.batch_size * preset.loss_batches, n_train, seed)
        parts = {}
        for rows in np.split(idx, preset.loss_batches):  # each loss compares plan.batch_size texts
            loss_parts = text_loss(rows) if stage < 4 else image_loss(rows)
            (loss_parts["loss"] / preset.loss_batches).backward()
            for name, value in loss_parts.items():
                parts[name] = parts.get(name, 0.0) + value.item() / preset.loss_batches
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        log.append(parts)
        if step % 50 == 0 or step == plan.steps - 1:
            print(f"stage {stage} step {step}: loss {parts['loss']:.4f}")
    model.save_pretrained(out / f"stage{stage}")
    tokenizer.save_pretrained(out / f"stage{stage}" / "text")
    if processor is not None:
        processor.save_pretrained(out / f"stage{stage}" / "vision")
    return log


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", type=int, required=True, choices=[1, 2, 3, 4])
    parser.add_argument("--out", type=Path, default=Path("runs/minimal"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    train_stage(args.out, args.stage, presets.load("toy"), args.seed)
