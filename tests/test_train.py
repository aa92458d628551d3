"""train.py end to end on a tiny corpus with the toy preset's real models (MiniLM student, MiniLM + MPNet teachers):
each stage against train_minimal.py, what each stage changes, the schedule and clipping, self-distillation, the
student's prompts, cached gradients against one pass, K ranks == one rank, loss batches on any number of ranks,
kill -9 and resume for every stage and on 2 ranks, and the one-line stops on stale caches and bad input."""

import copy
import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
import types
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import DEEPSPEED, ROOT, STAGE_ARGS, TINY, copy_run, run_train, stage, train_command
from safetensors.torch import load_file

import batching
import data
import jasper
import memory_plan
import presets
import teachers
import toy_data
import train
import train_minimal
from presets import StagePlan

TINY_PRESET = replace(presets.load("toy"), n_texts=96, heldout=32)  # the pipeline's TINY
N_TRAIN = 64


def read_log(path):
    with open(path) as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def weights(stage_dir):
    parts = {f"{part}.": stage_dir / part / "model.safetensors" for part in ("text", "vision")}
    return {**{prefix + k: v for prefix, path in parts.items() if path.is_file() for k, v in load_file(path).items()},
            **load_file(stage_dir / "jasper.safetensors")}


def steps_of(n):
    return int(STAGE_ARGS[n][STAGE_ARGS[n].index("--steps") + 1])


def assert_weights_agree(a, b, moved_from=None):
    """Adam divides by the gradient's size, so where a gradient is ~0 the rounding of a sum taken in another order
    moves a weight by a share of one step; measured on 2 ranks: 562 of 23M weights by more than 1e-6, at most
    1.03e-5. A wrong gradient would move most weights apart by up to a step."""
    assert a.keys() == b.keys()
    diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert float((diff > 1e-6).double().mean()) < 1e-4 and float(diff.max()) < 5e-5
    if moved_from is not None:  # and the steps did move weights, by more than that
        assert max(float((a[k] - moved_from[k]).abs().max()) for k in moved_from if k in a) > 2e-4


def tokens(tokenizer, texts):
    """The texts tokenized whole, padded to the longest: the model's inputs."""
    batch = tokenizer(texts, padding=True, truncation=True, max_length=TINY_PRESET.max_length, return_tensors="pt")
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def run_fails(out, *args, timeout=120):
    """A train.py command that must stop at once: (its stderr's lines, seconds it took)."""
    start = time.time()
    done = subprocess.run(train_command(out, *args), cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 2, done.stderr[-3000:]
    return done.stderr.strip().splitlines(), time.time() - start


# ----------------------------------------------------------------------------- pure parts

def test_batch_indices_cover_every_text_once_per_epoch_and_depend_only_on_the_step():
    n, b = 10, 4
    stream = np.concatenate([train_minimal.batch_indices(step, b, n, seed=3) for step in range(5)])  # 2 epochs
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    assert not np.array_equal(stream[:10], stream[10:20])  # each epoch a fresh order
    np.testing.assert_array_equal(train_minimal.batch_indices(2, b, n, seed=3), stream[8:12])  # crosses an epoch
    assert not np.array_equal(train_minimal.batch_indices(0, b, n, seed=4), stream[:4])


def test_the_step_log_drops_rows_after_the_checkpoint(tmp_path):
    log_file = tmp_path / "log.csv"
    log_file.write_text("step,loss\n0,3.0\n1,2.0\n2,1.0\n")
    log = train.StepLog(log_file, start=2)
    log.write({"step": 2, "loss": 0.5})
    log.close()
    assert log_file.read_text().split() == ["step,loss", "0,3.0", "1,2.0", "2,0.5"]


def test_paper_preset_follows_section_3_1_and_the_release():
    """Section 3.1's batches per GPU are what each loss compares; a step follows its 8 GPUs' loss batches. The schedule
    spans one pass over the data and stops at the paper's selected step. The official code: L_sim and L_resim averaged
    over every head, AdamW decay 0.01 (not on biases and norms), 5% warmup; the release: a parameter-free pooler to
    300 image tokens, vector dropout 0.2."""
    p = presets.load("paper")
    plans = {stage: (plan.batch_size, plan.lr, plan.steps) for stage, plan in p.stages.items()}
    assert plans == {1: (128, 1e-4, 4000), 2: (128, 8e-5, 7000), 3: (128, 7e-5, 2200), 4: (90, 1e-4, 3500)}
    assert p.loss_batches == 8 and (p.max_length, p.mrl_dims, p.n_texts) == (512, (1024, 512, 256), 8_000_000)
    one_pass = math.ceil((p.n_texts - p.heldout) / (8 * 128))
    assert [p.stages[s].schedule_length for s in (1, 2, 3, 4)] == [one_pass] * 3 + [3500] == [7803] * 3 + [3500]
    assert p.n_pairs - p.heldout_pairs == 8 * 90 * 3500  # stage 4's one pass: every pair seen once
    assert (p.head_average, p.weight_decay, p.warmup_share, p.vector_dropout) == ("all", 0.01, 0.05, 0.2)
    assert (p.vision_encoder, p.pooler, p.image_tokens) == ("google/siglip-so400m-patch14-384", "average", 300)
    assert [t.prompts for t in p.teachers] == [data.STELLA_PROMPTS] * 2 == [p.prompts] * 2
    assert presets.load("toy").teachers[0].prompts == {} and presets.load("toy").teachers[1].prompts == {}


def test_the_schedule_can_be_longer_than_the_stage():
    """warmup then cosine over schedule_steps; a stage that stops at `steps` ends partway down the curve."""
    plan, stopped = StagePlan(32, 1.0, 100), StagePlan(32, 1.0, 40, schedule_steps=100)
    full = [train_minimal.learning_rate_factor(k, plan, 0.1) for k in range(100)]
    assert [train_minimal.learning_rate_factor(k, stopped, 0.1) for k in range(40)] == full[:40]
    assert full[:10] == [(k + 1) / 10 for k in range(10)] and full[10] == 1.0
    assert full[55] == pytest.approx(0.5) and full[-1] == pytest.approx((1 + math.cos(math.pi * 89 / 90)) / 2)
    assert full[39] > 0.7  # where the stopped stage ends: the learning rate is still high


def test_optimizer_groups_decay_weights_but_not_biases_or_norms():
    """As the official training code: weight decay on every trainable weight matrix, none on biases and norm weights
    (BERT's LayerNorm, Qwen2's RMSNorm). Frozen parameters are in no group."""
    for spec, norm_names in ((presets.load("toy").student, ("LayerNorm",)),
                             (dict(model_type="qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=5,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=101), ("norm",))):
        model = jasper.Jasper(jasper.JasperConfig(text_encoder=spec, head_dims=[48]))
        jasper.set_trainable(model, 2)
        decay, none = train_minimal.parameter_groups(model, 0.01)
        names = {id(w): n for n, w in model.named_parameters()}
        assert (decay["weight_decay"], none["weight_decay"]) == (0.01, 0.0)
        no_decay = {names[id(w)] for w in none["params"]}
        assert no_decay == {n for n, w in model.named_parameters() if w.requires_grad
                            and (n.endswith("bias") or any(part in n.split(".")[-2] for part in norm_names))}
        assert len(decay["params"]) + len(none["params"]) == sum(w.requires_grad for w in model.parameters())
        assert all(w.dim() == 2 for w in decay["params"])


@pytest.fixture
def process_group():
    """A one-process group in this test's process, gone afterwards with its environment (later tests start train.py
    in processes of their own, which must not find this one's port)."""
    environment = dict(os.environ)
    yield train.setup_distributed(1, 4)
    torch.distributed.destroy_process_group()
    os.environ.clear()
    os.environ.update(environment)


def test_gradients_are_clipped_to_norm_1_before_the_optimizer_step(process_group):
    """DeepSpeed clips the gradient to norm 1.0 (the engine's config): the optimizer sees min(norm, 1) of what
    autograd computed, in the same direction."""
    torch.manual_seed(0)
    model = jasper.Jasper(jasper.JasperConfig(text_encoder=dict(
        model_type="bert", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        vocab_size=101, max_position_embeddings=64), head_dims=[16]))
    train_minimal.freeze_for_stage(model, 3)
    reference = copy.deepcopy(model)  # plain autograd on the same weights, outside the engine
    engine, _ = train.deepspeed_engine(model, StagePlan(4, 1e-3, 10), TINY_PRESET, process_group, torch.device("cpu"))
    trained = [w for w in model.parameters() if w.requires_grad]
    seen, optimizer_step = [], engine.optimizer.step

    def recording_step(*args, **kwargs):  # the gradients as the optimizer receives them
        seen.append(torch.cat([w.grad.flatten() for w in trained]).clone())
        return optimizer_step(*args, **kwargs)
    engine.optimizer.step = recording_step
    ids = torch.randint(1, 101, (4, 6))
    target = torch.nn.functional.normalize(torch.randn(4, 16), dim=-1)

    def loss(m, scale):
        return scale * jasper.distill_loss(m(input_ids=ids, attention_mask=torch.ones_like(ids))[16], target)["loss"]
    for scale in (1e3, 1e-5):  # a gradient far above norm 1, one far below
        reference.load_state_dict(model.state_dict())
        raw = torch.cat([g.flatten() for g in torch.autograd.grad(
            loss(reference, scale), [w for w in reference.parameters() if w.requires_grad])])
        engine.backward(loss(engine, scale))
        engine.step()
        assert float(raw.norm()) > 10 if scale > 1 else float(raw.norm()) < 0.1
        torch.testing.assert_close(seen[-1], raw * min(1.0, 1 / float(raw.norm())), rtol=1e-4, atol=1e-9)


# ----------------------------------------------------------------------------- the pipeline

def test_each_stage_writes_a_model_a_log_and_its_heldout_loss(pipeline):
    for n in (1, 2, 3, 4):
        folder = pipeline / f"stage{n}"
        log = read_log(folder / "log.csv")
        assert [row["step"] for row in log] == list(range(steps_of(n)))
        result = json.loads((folder / "eval.json").read_text())
        assert result["steps_run"] == steps_of(n) and result["examples_per_second"] > 0
        assert (result.get("tokens_per_second", 0) > 0) == (n < 4)  # images have no tokens to count
        assert not (folder / "checkpoints").exists()
    stage3_columns = list(read_log(pipeline / "stage3" / "log.csv")[0])
    assert stage3_columns == ["step", "lr", "loss", "1152_cos", "1152_sim", "1152_resim", "256_sim",
                              "256_resim", "128_sim", "128_resim", "64_sim", "64_resim"]


def test_the_logged_learning_rate_is_linear_warmup_then_cosine_decay(pipeline):
    """Written out here: the step k of n uses lr (k + 1) / w during the w = round(share n) warmup steps, then
    lr (1 + cos(pi (k - w) / (n - w))) / 2."""
    for n in (1, 2, 4):
        steps, lr, share = steps_of(n), TINY_PRESET.stages[n].lr, TINY_PRESET.warmup_share
        w = round(share * steps)
        expected = [lr * ((k + 1) / w if k < w else (1 + math.cos(math.pi * (k - w) / (steps - w))) / 2)
                    for k in range(steps)]
        assert [row["lr"] for row in read_log(pipeline / f"stage{n}" / "log.csv")] == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_a_stage_trains_like_train_minimal(pipeline, tmp_path, n):
    """train.py's stage (DeepSpeed's engine, length-sorted chunks, pooled states reused in stage 1, the schedule,
    clipping, weight-decay groups) against train_minimal.py from the same previous stage: plain PyTorch, each batch
    tokenized whole. The logged losses and the final weights agree. Stage 4 trains a randomly initialized tower at lr
    3e-3, where Adam turns rounding noise into whole steps after a few (the two-rank test below measured it), so it
    is compared over its first 5 steps, on the schedule of the whole stage."""
    out = copy_run(pipeline, tmp_path, "data", "teachers", *([f"stage{n - 1}"] if n > 1 else []))
    steps = steps_of(n) if n < 4 else 5
    plan = replace(TINY_PRESET.stages[n], batch_size=8, steps=steps, schedule_steps=steps_of(n))
    logged = train_minimal.train_stage(out, n, replace(TINY_PRESET, stages={**TINY_PRESET.stages, n: plan}))
    from_train_py = read_log(pipeline / f"stage{n}" / "log.csv")
    assert len(logged) == steps
    for k, (ours, theirs) in enumerate(zip(logged, from_train_py)):
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=2e-4 if n < 4 else 1e-4), k
    if n < 4:
        assert_weights_agree(weights(out / f"stage{n}"), weights(pipeline / f"stage{n}"))


def test_between_stages_only_the_trained_parameters_change(pipeline):
    stage1, stage2, stage3, stage4 = (weights(pipeline / f"stage{k}") for k in (1, 2, 3, 4))
    changed_in_2 = {k for k in stage1 if not torch.equal(stage1[k], stage2[k])}
    last_three = ("text.encoder.layer.3.", "text.encoder.layer.4.", "text.encoder.layer.5.")  # MiniLM: 6 layers
    assert changed_in_2 == {k for k in stage1 if k.startswith(("heads.1152.", *last_three))}
    changed_in_3 = {k for k in stage2 if not torch.equal(stage2[k], stage3[k])}
    assert changed_in_3 == set(stage2)  # everything on the text side
    assert set(stage3) - set(stage2) == {f"heads.{d}.{w}" for d in (256, 128, 64) for w in ("weight", "bias")}
    assert all(torch.equal(stage3[k], stage4[k]) for k in stage3)  # stage 4 leaves the text side as it was
    assert {k.split(".")[0] for k in set(stage4) - set(stage3)} == {"vision"}  # the toy's pooler has no weights


def test_stage4_trains_the_vision_side_alone(pipeline):
    """Only the vision tower (and a pooler with weights) trains, and the images' pair similarities move toward their
    captions' on held-out pairs, every head. (Retrieval well above chance needs thousands of pairs: 03_stages.ipynb,
    which the tests run, trains stage 4 on more and checks it.)"""
    folder = pipeline / "stage4"
    result = json.loads((folder / "eval.json").read_text())
    model = jasper.Jasper.from_pretrained(folder)
    vision = sum(p.numel() for p in model.vision.parameters()) + sum(p.numel() for p in model.pooler.parameters())
    assert result["trainable_parameters"] == vision
    assert (folder / "vision" / "preprocessor_config.json").is_file()
    before, after = result["heldout_before"], result["heldout_after"]
    p = presets.load("toy")  # stage 4's pairs are the preset's, whatever --n-texts says
    scenes = toy_data.ShapeScenes(p.n_pairs, seed=0, size=p.vision_encoder["image_size"])
    captions = [scenes[i][1] for i in range(p.n_pairs - p.heldout_pairs, p.n_pairs)]
    chance = sum(a == b for a in captions for b in captions) / len(captions) ** 2
    assert after["chance"] == pytest.approx(chance) and 0.01 < chance < 0.03  # 200 pairs over 72 captions
    assert len([k for k in after if k.endswith(("_i2c", "_c2i"))]) == 8
    # the images' similarities take the captions' shape: measured 0.15-0.24 -> 0.03-0.05
    for width in (1152, 256, 128, 64):
        assert after[f"{width}_sim"] < 0.4 * before[f"{width}_sim"]
    assert after["loss"] < 0.5 * before["loss"]
    processor = jasper.load_image_processor(str(folder / "vision"))
    image, _ = toy_data.ShapeScenes(1)[0]
    with torch.no_grad():
        vectors = model(pixel_values=processor([image], return_tensors="pt")["pixel_values"])
    assert sorted(vectors) == [64, 128, 256, 1152]


def test_self_distillation_teaches_the_short_heads_with_fc1s_vectors(pipeline, tmp_path):
    """--short-teacher fc1: at step 0 (the same model, batch and fresh heads as the target run) the short heads'
    L_sim is against FC1's vectors, the target run's against the teachers' target; both recomputed here."""
    out = copy_run(pipeline, tmp_path, "data", "teachers", "stage2")
    run_train(out, *stage(3), "--short-teacher", "fc1")
    assert json.loads((out / "stage3" / "eval.json").read_text())["short_teacher"] == "fc1"
    fc1_log, target_log = read_log(out / "stage3" / "log.csv")[0], read_log(pipeline / "stage3" / "log.csv")[0]
    corpus = data.Corpus(pipeline / "data" / "corpus.arrow")
    cache = teachers.TeacherCache(pipeline / "teachers", corpus.hashes)
    torch.manual_seed(0)
    model, tokenizer = train_minimal.load_student(pipeline, 3, TINY_PRESET, cache.dim)
    idx = train_minimal.batch_indices(0, 8, N_TRAIN, seed=0)
    with torch.no_grad():
        vectors = model(**tokens(tokenizer, corpus.prompted(idx, TINY_PRESET.prompts)))
    target = jasper.teacher_target(*map(torch.from_numpy, cache.rows(idx)))
    assert fc1_log["64_sim"] == pytest.approx(float(jasper.similarity_loss(vectors[64], vectors[1152])), rel=1e-4)
    assert target_log["64_sim"] == pytest.approx(float(jasper.similarity_loss(vectors[64], target)), rel=1e-4)
    assert fc1_log["1152_cos"] == pytest.approx(target_log["1152_cos"], rel=1e-6)  # FC1 learns from the target
    lines, _ = run_fails(out, "--stage", "2", *TINY, "--short-teacher", "fc1")
    assert lines[-1] == "train.py: --short-teacher applies to stage 3, where the short MRL heads are trained"


def text_stage(pipeline, n, preset=TINY_PRESET, steps=1):
    """train.py's TextStage for stage n of the pipeline's run, in this process."""
    args = types.SimpleNamespace(out=pipeline, seed=0, stage=n, short_teacher=None)
    plan = replace(preset.stages[n], batch_size=8, steps=steps)
    return train.TextStage(args, preset, plan, train.Layout(preset.loss_batches, 0, 1), torch.device("cpu"))


def test_the_student_reads_each_kind_of_text_with_its_prompt(pipeline):
    """TextStage's batches: a query is the student's query prompt and the text, a passage the text alone, tokenized
    as the tokenizer tokenizes the whole string."""
    task = text_stage(pipeline, 2)
    kinds = task.corpus.kind_names(range(len(task.corpus)))
    rows = np.array([kinds.index("query"), kinds.index("passage")])
    (batch,), tokens = task.inputs(task.model, rows, chunk=8)
    texts = task.corpus.texts(rows)
    expected = task.tokenizer([data.QUERY_PROMPT + texts[0], texts[1]], padding=True, truncation=True,
                              max_length=128, return_tensors="pt")
    assert torch.equal(batch["input_ids"], expected["input_ids"]) and tokens == int(expected["attention_mask"].sum())
    assert task.tokenizer.decode(batch["input_ids"][0], skip_special_tokens=True).startswith("instruct : given a web")


def test_stage1_reuses_pooled_states_with_the_same_loss_and_gradients(pipeline):
    """While only FC1 trains, the pooled states computed once give the loss and gradients of running the
    encoder every step, and a text seen again costs no encoder pass. (Stage 1 reuses them when its steps see more
    texts than there are.)"""
    idx = train_minimal.batch_indices(0, 8, N_TRAIN, seed=0)
    results = []
    for steps in (1, 1000):
        torch.manual_seed(0)
        task = text_stage(pipeline, 1, steps=steps)
        train_minimal.freeze_for_stage(task.model, 1)
        assert (task.pooled is not None) == (steps == 1000)
        losses, tokens = [], []
        for _ in range(2):
            batches, read = task.inputs(task.model, idx, 8)
            vectors, _, _ = batching.forward_in_chunks(task.model, batches)
            losses.append(task.loss(vectors, task.teacher(task.model, idx, 8))["loss"])
            tokens.append(read)
        losses[0].backward()
        results.append((losses[0].item(), task.model.fc1.weight.grad.clone(), tokens, losses[1].item()))
    (loss, grad, tokens, again), (pooled_loss, pooled_grad, pooled_tokens, pooled_again) = results
    assert pooled_loss == pytest.approx(loss, rel=1e-6) and pooled_again == pytest.approx(again, rel=1e-6)
    torch.testing.assert_close(pooled_grad, grad, rtol=1e-5, atol=1e-7)
    assert pooled_tokens[0] >= tokens[0] == tokens[1] > 0 and pooled_tokens[1] == 0  # the second pass ran no encoder


class PlainEngine:
    """What the step functions ask of DeepSpeed's engine, in plain PyTorch (float64 runs nowhere else)."""

    def __init__(self, model):
        self.module = model

    def __call__(self, **batch):
        return self.module(**batch)

    def backward(self, loss, scale_wrt_gas=True):
        loss.backward()

    def step(self):
        pass


@pytest.mark.parametrize("n,checkpointing", [(1, False), (2, False), (3, False), (4, False), (3, True), (4, True)])
def test_cached_gradients_equal_one_pass_in_float64(pipeline, n, checkpointing):
    """The two-pass step (vectors without a graph, the loss's gradient for them, then each chunk again with a graph)
    gives the one-pass step's loss and every weight's gradient, in float64, in every stage: stage 4 through the
    frozen language model. Vector dropout is on, so the second pass must draw the first pass's masks; the chunks are
    uneven (3 + 3 + 2 texts). With activation checkpointing on as well, the same again: the two compose."""
    preset = replace(TINY_PRESET, vector_dropout=0.2)
    if n < 4:
        task = text_stage(pipeline, n, preset)
    else:
        args = types.SimpleNamespace(out=pipeline, seed=0, stage=4, short_teacher=None)
        task = train.ImageStage(args, preset, train.Layout(1, 0, 1), torch.device("cpu"))
    train_minimal.freeze_for_stage(task.model, n)
    if checkpointing:
        memory_plan.enable_checkpointing(task.model, n)
    task.model.double()
    teacher = task.teacher
    task.teacher = lambda *a: {w: v.double() for w, v in teacher(*a).items()} if n == 4 else teacher(*a).double()
    rows = train_minimal.batch_indices(0, 8, N_TRAIN, seed=0)
    rows = rows[np.argsort(task.lengths[rows], kind="stable")] if task.lengths is not None else rows
    results = []
    for step in (train.one_pass_step, train.cached_gradient_step):
        task.model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        parts, _ = step(PlainEngine(task.model), task, rows, train.Layout(1, 0, 1), 1.0, 3)
        grads = {name: w.grad.clone() for name, w in task.model.named_parameters() if w.grad is not None}
        results.append((parts["loss"].item(), grads, torch.rand(1)))  # and where the random stream ends
    (loss, grads, after), (cached_loss, cached_grads, cached_after) = results
    assert cached_loss == pytest.approx(loss, rel=1e-12) and torch.equal(after, cached_after)
    assert grads.keys() == cached_grads.keys() and len(grads) > 0
    for name in grads:
        torch.testing.assert_close(cached_grads[name], grads[name], rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("n", [2, 3, 4])
def test_two_ranks_train_exactly_like_one_rank_with_twice_the_batch(pipeline, two_ranks, n):
    """2 ranks x 4 examples == 1 rank x 8 (the toy's global loss batch): stage 2 (gradients through encoder
    layers), stage 3 (short heads over the gathered batch), stage 4 (gathered image and caption vectors).

    Stage 4 trains a randomly initialized tower at lr 3e-3, where Adam turns the rounding of near-zero gradients into
    whole steps: measured, the two runs differ by 1e-7 at step 0, 2e-5 at step 4 and 30% by step 16. So stage 4 is
    compared over its first 5 steps (step 0 alone would differ by half if the loss saw one rank's 4 pairs, not 8)."""
    one, two = read_log(pipeline / f"stage{n}" / "log.csv"), read_log(two_ranks[n] / f"stage{n}" / "log.csv")
    assert len(one) == len(two)
    for a, b in zip(one if n < 4 else one[:5], two, strict=False):
        assert a == pytest.approx(b, rel=1e-5 if n < 4 else 1e-4, abs=1e-7)
    assert json.loads((two_ranks[n] / f"stage{n}" / "eval.json").read_text())["world_size"] == 2
    if n < 4:
        assert_weights_agree(weights(pipeline / f"stage{n}"), weights(two_ranks[n] / f"stage{n}"),
                             moved_from=weights(pipeline / f"stage{n - 1}"))


def test_each_rank_computes_its_own_loss_batch_and_the_step_follows_their_mean(pipeline, tmp_path):
    """--loss-batches 2 on 2 ranks (the paper's way, 8 on 8): each rank's loss is a one-process loss on its own loss
    batch of 8 texts, and the step follows their mean; one loss over all 16 texts is another number."""
    out = copy_run(pipeline, tmp_path, "data", "teachers", "stage1")
    run_train(out, "--stage", "2", *TINY, "--steps", "1", "--loss-batches", "2", ranks=2)
    logged = read_log(out / "stage2" / "log.csv")[0]
    task = text_stage(pipeline, 2)
    idx = train_minimal.batch_indices(0, 16, N_TRAIN, seed=0)
    with torch.no_grad():
        own = [task.loss(task.model(**tokens(task.tokenizer, task.corpus.prompted(rows, TINY_PRESET.prompts))),
                         task.teacher(task.model, rows, 8)) for rows in np.split(idx, 2)]
        whole = task.loss(task.model(**tokens(task.tokenizer, task.corpus.prompted(idx, TINY_PRESET.prompts))),
                          task.teacher(task.model, idx, 8))
    for part in ("loss", "1152_cos", "1152_sim", "1152_resim"):
        assert logged[part] == pytest.approx(float(own[0][part] + own[1][part]) / 2, rel=1e-5)
    assert logged["1152_sim"] != pytest.approx(float(whole["1152_sim"]), rel=1e-2)  # 8 texts' pairs, not 16's
    assert json.loads((out / "stage2" / "eval.json").read_text())["accumulation"] == 1


def test_the_paper_batch_on_any_number_of_ranks(pipeline, tmp_path):
    """2 loss batches of 4 texts a step: on 1 rank (DeepSpeed accumulates the second's gradient onto the first's), on
    2 ranks (one loss batch each) and on 4 (2 ranks share each loss batch and gather their vectors in a group of their
    own): the same losses step for step and the same weights; the first line and eval.json say how."""
    runs = {}
    for ranks in (1, 2, 4):
        runs[ranks] = copy_run(pipeline, tmp_path / f"ranks{ranks}", "data", "teachers", "stage1")
        run_train(runs[ranks], *stage(2), "--batch-size", "4", "--loss-batches", "2", ranks=ranks)
    logs = {k: read_log(runs[k] / "stage2" / "log.csv") for k in runs}
    assert len(logs[1]) == steps_of(2)
    for k in (2, 4):
        for a, b in zip(logs[1], logs[k], strict=True):
            assert a == pytest.approx(b, rel=1e-5, abs=1e-7)
        assert_weights_agree(weights(runs[1] / "stage2"), weights(runs[k] / "stage2"),
                             moved_from=weights(pipeline / "stage1"))
    summaries = {k: json.loads((runs[k] / "stage2" / "eval.json").read_text()) for k in runs}
    assert [(s["world_size"], s["loss_batch"], s["accumulation"], s["global_batch"]) for s in summaries.values()] == \
        [(1, 4, 2, 8), (2, 4, 1, 8), (4, 4, 1, 8)]
    assert "2 rank(s), loss batch 4, accumulation 1, global batch 8" in summaries[2]["settings"]


# ----------------------------------------------------------------------------- kill -9 and resume

def kill_after_first_checkpoint(command, checkpoints):
    """Start a run, wait for its first checkpoint, kill -9 it (and every process it started)."""
    process = subprocess.Popen(command, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and process.poll() is None and not (checkpoints / "latest").is_file():
        time.sleep(0.02)
    assert process.poll() is None, "the run ended before it could be killed"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    return (checkpoints / "latest").read_text().strip()


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_killed_run_resumes_and_ends_like_an_uninterrupted_one(pipeline, tmp_path, n):
    out = copy_run(pipeline, tmp_path, "data", "teachers", *([f"stage{n - 1}"] if n > 1 else []))
    every = int(STAGE_ARGS[n][STAGE_ARGS[n].index("--checkpoint-every") + 1])
    checkpoint = kill_after_first_checkpoint(train_command(out, *stage(n)), out / f"stage{n}" / "checkpoints")
    assert checkpoint == f"step{every}"
    assert not (out / f"stage{n}" / "eval.json").exists()
    run_train(out, *stage(n))
    resumed, uninterrupted = (json.loads((run / f"stage{n}" / "eval.json").read_text()) for run in (out, pipeline))
    assert resumed["steps_run"] == steps_of(n) - every
    assert resumed["heldout_before"] == uninterrupted["heldout_before"]
    assert read_log(out / f"stage{n}" / "log.csv") == read_log(pipeline / f"stage{n}" / "log.csv")
    a, b = weights(out / f"stage{n}"), weights(pipeline / f"stage{n}")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b)


def test_a_killed_two_rank_run_resumes_like_an_uninterrupted_one(two_ranks, tmp_path):
    out = copy_run(two_ranks[2], tmp_path, "data", "teachers", "stage1")
    checkpoint = kill_after_first_checkpoint(train_command(out, *stage(2), ranks=2), out / "stage2" / "checkpoints")
    assert checkpoint == "step3"
    run_train(out, *stage(2), ranks=2)
    assert json.loads((out / "stage2" / "eval.json").read_text())["steps_run"] == steps_of(2) - 3
    assert read_log(out / "stage2" / "log.csv") == read_log(two_ranks[2] / "stage2" / "log.csv")
    a, b = weights(out / "stage2"), weights(two_ranks[2] / "stage2")
    assert all(torch.equal(a[k], b[k]) for k in b)


# ----------------------------------------------------------------------------- stops in one line

def test_a_missing_previous_stage_fails_at_once_in_one_line(tmp_path):
    lines, seconds = run_fails(tmp_path, "--stage", "3", *TINY)
    assert seconds < 60 and lines[-1] == (f"train.py: stage 3 starts from {tmp_path}/stage2, which has no finished "
                                          "model: run --stage 2 first")
    assert not (tmp_path / "data").exists()  # nothing was built


def test_a_cache_made_for_another_run_stops_it_in_one_line_naming_the_field(pipeline, tmp_path):
    """Another max_length (a preset file), another corpus size, an FC1 that is not the teachers' width: each stops
    the run before anything loads; teachers.py stops on the first too."""
    out = copy_run(pipeline, tmp_path, "data", "teachers", "stage1")
    preset = tmp_path / "longer.json"
    preset.write_text(json.dumps({"base": "toy", "max_length": 256}))
    lines, seconds = run_fails(out, "--stage", "2", *TINY, "--preset", str(preset))
    assert seconds < 60 and lines == [f"train.py: the teacher cache {out}/teachers cannot serve this run: its texts "
                                      "were cut at max_length 128, this run cuts at 256; use another --out"]
    done = subprocess.run([sys.executable, "teachers.py", "--n-texts", "96", "--heldout", "32", "--preset", str(preset),
                           "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [lines[0].replace("train.py", "teachers.py")]
    lines, _ = run_fails(out, "--stage", "2", *TINY, "--n-texts", "80")
    assert len(lines) == 1 and "data was made by" in lines[0] and '"n_texts": 96' in lines[0]
    config = json.loads((out / "stage1" / "jasper_config.json").read_text())
    (out / "stage1" / "jasper_config.json").write_text(json.dumps(config | {"head_dims": [768]}))
    lines, _ = run_fails(out, "--stage", "2", *TINY)
    assert lines == [f"train.py: {out}/stage1 has FC1 width 768, but the teachers in {out}/teachers give 1152"]


@pytest.mark.parametrize("case", ["malformed line", "empty corpus", "missing teacher", "wrong field type"])
def test_bad_input_stops_in_one_line_naming_it(tmp_path, case):
    corpus = tmp_path / "mine.jsonl"
    corpus.write_text('{"text": "a fine first line"}\n{"text": "broken\n' if case == "malformed line" else "")
    preset = tmp_path / "bad.json"
    preset.write_text(json.dumps({"base": "toy", "n_texts": "many"}))
    args = {"malformed line": ["--corpus", str(corpus), "--n-texts", "2", "--heldout", "1"],
            "empty corpus": ["--corpus", str(corpus), "--n-texts", "2", "--heldout", "1"],
            "missing teacher": ["--teacher", "foo=/nonexistent@32"],
            "wrong field type": ["--preset", str(preset)]}[case]
    expected = {"malformed line": f"train.py: {corpus}:2: not valid JSON (column 10: Unterminated string starting at)",
                "empty corpus": f"train.py: {corpus} holds 0 texts, 2 were asked for",
                "missing teacher": "train.py: --teacher foo: no model folder /nonexistent",
                "wrong field type": f"train.py: {preset}: field 'n_texts': Input should be a valid integer, unable to "
                                    "parse string as an integer, got \"many\""}[case]
    lines, seconds = run_fails(tmp_path / "run", "--stage", "1", "--batch-size", "1", *args)
    assert lines == [expected] and seconds < 60
    assert not (tmp_path / "run" / "teachers").exists()  # no teacher loaded


def test_your_own_teachers_student_and_corpus_from_the_command_line(tmp_path):
    """No preset change: another student (a tiny Qwen2), one teacher at a width it must pick (the Stella-like
    stand-in's 32-d module), your own jsonl texts. FC1 follows the teacher's width; the cache records it."""
    import rehearsal
    stella = rehearsal.stella_like(tmp_path / "stella")
    corpus = tmp_path / "mine.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"Sentence {k} is about topic {k % 7}.",
                                          "kind": "query" if k % 5 == 0 else "passage"}) + "\n" for k in range(60)))
    run_train(tmp_path / "run", "--stage", "1", "--student", str(stella), "--teacher", f"mine={stella}@32",
              "--corpus", str(corpus), "--n-texts", "60", "--heldout", "12", "--batch-size", "8", "--steps", "3")
    meta = json.loads((tmp_path / "run" / "teachers" / "meta.json").read_text())
    assert [(t["name"], t["dim"], t["model"]) for t in meta["teachers"]] == [("mine", 32, str(stella))]
    assert json.loads((tmp_path / "run" / "stage1" / "jasper_config.json").read_text())["head_dims"] == [32]
    assert data.Corpus(tmp_path / "run" / "data" / "corpus.arrow").texts([1]) == ["Sentence 1 is about topic 1."]
    assert DEEPSPEED.is_file()  # the multi-rank tests above ran it, never skipped


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: bf16 training under DeepSpeed with NCCL")
def test_a_stage_trains_in_bf16_on_a_gpu(pipeline, tmp_path):
    """On a GPU the engine trains in bf16 (DeepSpeed's bf16 with fp32 master weights) over NCCL: stage 2's losses
    stay within bf16's rounding of the float32 run's."""
    out = copy_run(pipeline, tmp_path, "data", "teachers", "stage1")
    run_train(out, *stage(2), ranks=1)
    gpu, cpu = read_log(out / "stage2" / "log.csv"), read_log(pipeline / "stage2" / "log.csv")
    assert [row["loss"] for row in gpu] == pytest.approx([row["loss"] for row in cpu], rel=2e-2)
