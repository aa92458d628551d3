"""train.py end to end on a tiny corpus with the toy preset's real models (MiniLM student, MiniLM +
MPNet teachers): stages 1-4, what each stage changes, self-distillation, K ranks == one rank, kill -9
and resume."""

import csv
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import data
import jasper
import presets
import teachers
import train
from conftest import ROOT, STAGE1, TINY, run_train, train_command


def copy_data(source, out):
    for part in ("data", "teachers"):
        shutil.copytree(source / part, out / part)


def read_log(path):
    with open(path) as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def weights(stage_dir):
    return {**{f"text.{k}": v for k, v in load_file(stage_dir / "text" / "model.safetensors").items()},
            **load_file(stage_dir / "jasper.safetensors")}


# ----------------------------------------------------------------------------- pure parts

def test_batch_indices_cover_every_text_once_per_epoch_and_depend_only_on_the_step():
    n, b = 10, 4
    stream = np.concatenate([train.batch_indices(step, b, n, seed=3) for step in range(5)])  # 2 epochs
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    assert not np.array_equal(stream[:10], stream[10:20])  # each epoch a fresh order
    np.testing.assert_array_equal(train.batch_indices(2, b, n, seed=3), stream[8:12])  # crosses an epoch
    assert not np.array_equal(train.batch_indices(0, b, n, seed=4), stream[:4])


def test_warmup_then_cosine():
    factors = [train.warmup_then_cosine(s, 20, 0.1) for s in range(20)]
    assert factors[:2] == [0.5, 1.0]
    assert factors[2] == 1.0 and factors[11] == pytest.approx(0.5 * (1 + np.cos(np.pi * 9 / 18)))
    assert all(a >= b for a, b in zip(factors[1:], factors[2:]))


def test_resume_log_drops_rows_after_the_checkpoint(tmp_path):
    log_file = tmp_path / "log.csv"
    log_file.write_text("step,loss\n0,3.0\n1,2.0\n2,1.0\n")
    log, writer = train.resume_log(log_file, start=2)
    writer.writerow({"step": 2, "loss": 0.5})
    log.close()
    assert log_file.read_text().split() == ["step,loss", "0,3.0", "1,2.0", "2,0.5"]


def test_paper_preset_follows_section_3_1():
    p = presets.load("paper")
    per_gpu = {stage: (plan.batch_size / 8, plan.lr, plan.steps) for stage, plan in p.stages.items()}
    assert per_gpu == {1: (128, 1e-4, 4000), 2: (128, 8e-5, 7000), 3: (128, 7e-5, 2200), 4: (90, 1e-4, 3500)}
    assert (p.max_length, p.mrl_dims, p.n_texts) == (512, (1024, 512, 256), 8_000_000)
    assert p.vision_encoder == "google/siglip-so400m-patch14-384" and p.image_tokens == 9 * 9  # 27 x 27 patches
    assert p.n_pairs - p.heldout_pairs == p.stages[4].batch_size * p.stages[4].steps  # every pair seen once


def test_spearman_equals_a_loop_with_and_without_ties():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(50, generator=g, dtype=torch.float64)
    b = a + torch.randn(50, generator=g, dtype=torch.float64)
    gold = torch.randint(0, 6, (50,), generator=g).double()  # STS-like scores 0-5: many ties

    def ranks(x):  # 1 + values below + half the other equal values
        x = x.tolist()
        return [1 + sum(y < v for y in x) + (sum(y == v for y in x) - 1) / 2 for v in x]

    def pearson(x, y):
        mx, my = sum(x) / len(x), sum(y) / len(y)
        cov = sum((p - mx) * (q - my) for p, q in zip(x, y))
        return cov / (sum((p - mx) ** 2 for p in x) * sum((q - my) ** 2 for q in y)) ** 0.5

    n = len(a)  # without ties: rho = 1 - 6 sum d^2 / (n (n^2 - 1))
    rho = 1 - 6 * sum((ra - rb) ** 2 for ra, rb in zip(ranks(a), ranks(b))) / (n * (n * n - 1))
    assert train.spearman(a, b) == pytest.approx(rho, abs=1e-12)
    assert train.spearman(a, -a) == pytest.approx(-1.0)
    assert train.average_ranks(torch.tensor([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]
    assert train.spearman(a, gold) == pytest.approx(pearson(ranks(a), ranks(gold)), abs=1e-12)


def test_recall_at_1_equals_a_loop_and_counts_equal_captions_alike():
    captions = ["a", "b", "a", "c", "d"]
    sim = torch.tensor([[0.1, 0.0, 0.9, 0.0, 0.0],   # image 0 -> caption 2, also "a": a hit
                        [0.0, 0.2, 0.0, 0.9, 0.0],   # image 1 -> caption 3 ("c"): a miss
                        [0.5, 0.0, 0.4, 0.0, 0.0],   # image 2 -> caption 0, also "a": a hit
                        [0.0, 0.0, 0.0, 0.7, 0.0],
                        [0.0, 0.8, 0.0, 0.0, 0.3]])  # image 4 -> caption 1 ("b"): a miss
    i2c = sum(captions[int(sim[i].argmax())] == captions[i] for i in range(5)) / 5
    c2i = sum(captions[int(sim[:, j].argmax())] == captions[j] for j in range(5)) / 5
    chance = sum(a == b for a in captions for b in captions) / 25
    assert train.recall_at_1(sim, captions) == pytest.approx((i2c, c2i, chance))
    assert (i2c, c2i, chance) == (0.6, 0.6, 7 / 25)


# ----------------------------------------------------------------------------- the pipeline

def test_each_stage_writes_a_model_a_log_and_its_heldout_loss(pipeline):
    for stage, steps in ((1, 120), (2, 4), (3, 4), (4, 20)):
        folder = pipeline / f"stage{stage}"
        log = read_log(folder / "log.csv")
        assert [row["step"] for row in log] == list(range(steps))
        result = json.loads((folder / "eval.json").read_text())
        assert result["steps_run"] == steps and result["examples_per_second"] > 0
        assert (result.get("tokens_per_second", 0) > 0) == (stage < 4)  # images have no tokens to count
        assert not (folder / "checkpoints").exists()
    stage3_columns = list(read_log(pipeline / "stage3" / "log.csv")[0])
    assert stage3_columns == ["step", "lr", "loss", "1152_cos", "1152_sim", "1152_resim", "256_sim",
                              "256_resim", "128_sim", "128_resim", "64_sim", "64_resim"]


def test_stage1_loss_falls(pipeline):
    result = json.loads((pipeline / "stage1" / "eval.json").read_text())
    assert result["heldout_after"]["loss"] < 0.8 * result["heldout_before"]["loss"]
    log = read_log(pipeline / "stage1" / "log.csv")
    assert np.mean([r["loss"] for r in log[-10:]]) < 0.8 * np.mean([r["loss"] for r in log[:10]])


def test_between_stages_only_the_trained_parameters_change(pipeline):
    stage1, stage2, stage3, stage4 = (weights(pipeline / f"stage{k}") for k in (1, 2, 3, 4))
    changed_in_2 = {k for k in stage1 if not torch.equal(stage1[k], stage2[k])}
    last_three = ("text.encoder.layer.3.", "text.encoder.layer.4.", "text.encoder.layer.5.")  # MiniLM: 6 layers
    assert changed_in_2 == {k for k in stage1 if k.startswith(("heads.1152.", *last_three))}
    changed_in_3 = {k for k in stage2 if not torch.equal(stage2[k], stage3[k])}
    assert changed_in_3 == set(stage2)  # everything on the text side
    assert set(stage3) - set(stage2) == {f"heads.{d}.{w}" for d in (256, 128, 64) for w in ("weight", "bias")}
    assert all(torch.equal(stage3[k], stage4[k]) for k in stage3)  # stage 4 leaves the text side as it was
    assert {k.split(".")[0] for k in set(stage4) - set(stage3)} == {"pooler"}  # the vision tower is in vision/


def test_stage4_trains_the_vision_side_and_scores_retrieval(pipeline):
    folder = pipeline / "stage4"
    result = json.loads((folder / "eval.json").read_text())
    model = jasper.Jasper.from_pretrained(folder)
    vision = sum(p.numel() for p in model.vision.parameters()) + sum(p.numel() for p in model.pooler.parameters())
    assert result["trainable_parameters"] == vision
    assert (folder / "vision" / "preprocessor_config.json").is_file()
    after = result["heldout_after"]
    assert set(after) >= {"loss", "1152_cos", "64_resim", "1152_i2c", "1152_c2i", "64_c2i", "chance"}
    assert 0.01 < after["chance"] < 0.03  # 200 held-out pairs over 72 captions
    assert after["loss"] < 0.6 * result["heldout_before"]["loss"]  # 20 steps already align the images a little
    processor = jasper.load_image_processor(str(folder / "vision"))
    image, _ = data.ShapeScenes(1)[0]
    with torch.no_grad():
        vectors = model(pixel_values=processor([image], return_tensors="pt")["pixel_values"])
    assert sorted(vectors) == [64, 128, 256, 1152]


def test_self_distillation_changes_only_what_teaches_the_short_heads(pipeline, tmp_path):
    copy_data(pipeline, tmp_path)
    shutil.copytree(pipeline / "stage2", tmp_path / "stage2")
    run_train(tmp_path, "--stage", "3", *TINY, "--steps", "4", "--short-teacher", "fc1")
    assert json.loads((tmp_path / "stage3" / "eval.json").read_text())["short_teacher"] == "fc1"
    fc1, target = read_log(tmp_path / "stage3" / "log.csv")[0], read_log(pipeline / "stage3" / "log.csv")[0]
    assert fc1["1152_cos"] == pytest.approx(target["1152_cos"], rel=1e-6)  # same model, same batch
    assert fc1["64_sim"] != pytest.approx(target["64_sim"], rel=1e-3)  # another teacher for the short heads
    bad = subprocess.run(train_command(tmp_path, "--stage", "2", *TINY, "--short-teacher", "fc1"), cwd=ROOT,
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "applies to stage 3" in bad.stderr


def test_stage1_reuses_pooled_states_with_the_same_loss_and_gradients(pipeline):
    """While only FC1 trains, the pooled states computed once give the loss and gradients of running the
    encoder every step, and a text seen again costs no encoder pass."""
    p = dataclasses.replace(presets.load("toy"), n_texts=96, heldout=32)  # the pipeline's TINY
    corpus = data.Corpus(pipeline / "data" / "corpus.arrow")
    cache = teachers.TeacherCache(pipeline / "teachers", corpus.hashes)
    idx = train.batch_indices(0, 8, len(corpus) - 32, seed=0)
    results = []
    for reuse in (False, True):
        torch.manual_seed(0)
        model, tokenizer = train.load_student(pipeline, 1, p, cache.dim)
        train.prepare_for_stage(model, 1, p, "cpu")
        task = train.TextStage(corpus, cache, tokenizer, p, "cpu", "target", reuse_pooled=reuse)
        parts, tokens = task.loss(model, idx, rank=0, world=1)
        parts["loss"].backward()
        again, tokens_again = task.loss(model, idx, rank=0, world=1)
        results.append((parts["loss"].item(), model.fc1.weight.grad.clone(), tokens, again["loss"].item(), tokens_again))
    (loss, grad, tokens, loss_again, tokens_again), (cached_loss, cached_grad, cached_tokens, cached_again, none) = results
    assert cached_loss == pytest.approx(loss, rel=1e-6) and cached_again == pytest.approx(loss_again, rel=1e-6)
    torch.testing.assert_close(cached_grad, grad, rtol=1e-5, atol=1e-7)
    assert cached_tokens >= tokens == tokens_again > 0 and none == 0  # the second pass ran no encoder


def test_a_missing_previous_stage_fails_at_once_in_one_line(tmp_path):
    start = time.time()
    done = subprocess.run(train_command(tmp_path, "--stage", "3", *TINY), cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and time.time() - start < 60
    assert done.stderr.strip().splitlines()[-1] == (f"train.py: stage 3 starts from {tmp_path}/stage2, which has no "
                                                    "finished model: run --stage 2 first")
    assert not (tmp_path / "data").exists()  # nothing was built


# ----------------------------------------------------------------------------- distributed and resume

@pytest.mark.skipif(shutil.which("deepspeed") is None, reason="the deepspeed launcher is not installed")
def test_two_ranks_train_exactly_like_one_rank_with_twice_the_batch(pipeline, tmp_path):
    """Stage 2 (gradients through encoder layers): 2 ranks x 4 texts == 1 rank x 8 texts."""
    for name in ("one", "two"):
        copy_data(pipeline, tmp_path / name)
        shutil.copytree(pipeline / "stage1", tmp_path / name / "stage1")
    args = ["--stage", "2", *TINY, "--steps", "3"]
    run_train(tmp_path / "one", *args)
    run_train(tmp_path / "two", *args, ranks=2)
    one, two = read_log(tmp_path / "one/stage2/log.csv"), read_log(tmp_path / "two/stage2/log.csv")
    for a, b in zip(one, two, strict=True):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-7)
    start, w1, w2 = (weights(tmp_path / name) for name in ("one/stage1", "one/stage2", "two/stage2"))
    diff = torch.cat([(w1[k] - w2[k]).abs().flatten() for k in w1])
    # Adam divides by the gradient's size, so where a gradient is ~0 the rounding of the rank sum moves a
    # weight by a share of one step (lr 2e-4); measured: 562 of 23M weights differ by more than 1e-6, at
    # most by 1.03e-5. A wrong gradient would move most weights apart by up to a step.
    assert float((diff > 1e-6).double().mean()) < 1e-4 and float(diff.max()) < 5e-5
    assert max(float((w1[k] - start[k]).abs().max()) for k in w1) > 2e-4  # the 3 steps did move weights


def test_killed_run_resumes_and_ends_like_an_uninterrupted_one(pipeline, tmp_path):
    copy_data(pipeline, tmp_path)
    log_file = tmp_path / "stage1" / "log.csv"
    process = subprocess.Popen(train_command(tmp_path, *STAGE1), cwd=ROOT, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and process.poll() is None:  # kill between the checkpoints at 20 and 30
        if log_file.is_file() and any(row["step"] >= 24 for row in read_log(log_file)):
            break
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be killed"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert (tmp_path / "stage1" / "checkpoints" / "latest").read_text().strip() == "step20"

    run_train(tmp_path, *STAGE1)
    assert json.loads((tmp_path / "stage1" / "eval.json").read_text())["steps_run"] == 100
    assert read_log(log_file) == read_log(pipeline / "stage1" / "log.csv")
    resumed, uninterrupted = weights(tmp_path / "stage1"), weights(pipeline / "stage1")
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)
    before = json.loads((pipeline / "stage1" / "eval.json").read_text())["heldout_before"]
    assert json.loads((tmp_path / "stage1" / "eval.json").read_text())["heldout_before"] == before


def test_your_own_teachers_student_and_corpus_from_the_command_line(tmp_path):
    """No preset change: another student (a tiny Qwen2), one teacher at a width it must pick (the Stella-like
    stand-in's 32-d module), your own jsonl texts. FC1 follows the teacher's width; the cache records it."""
    import rehearsal
    stella = rehearsal.stella_like(tmp_path / "stella")
    corpus = tmp_path / "mine.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"Sentence {k} is about topic {k % 7}.", "query": k % 5 == 0}) + "\n"
                              for k in range(60)))
    run_train(tmp_path / "run", "--stage", "1", "--student", str(stella), "--teacher", f"mine={stella}@32",
              "--corpus", str(corpus), "--n-texts", "60", "--heldout", "12", "--batch-size", "8", "--steps", "3")
    meta = json.loads((tmp_path / "run" / "teachers" / "meta.json").read_text())
    assert [(t["name"], t["dim"], t["model"]) for t in meta["teachers"]] == [("mine", 32, str(stella))]
    assert json.loads((tmp_path / "run" / "stage1" / "jasper_config.json").read_text())["head_dims"] == [32]
    assert data.Corpus(tmp_path / "run" / "data" / "corpus.arrow").texts([1]) == ["Sentence 1 is about topic 1."]
