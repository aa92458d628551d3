"""train.py end to end on a tiny corpus with the toy preset's real models (MiniLM student, MiniLM +
MPNet teachers): stages 1-3, what each stage changes, K ranks == one rank, kill -9 and resume."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import train

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--preset", "toy", "--n-texts", "96", "--heldout", "32", "--batch-size", "8"]
STAGE1 = ["--stage", "1", *TINY, "--steps", "40", "--checkpoint-every", "10"]


def train_command(out, *args, ranks=None):
    launcher = [sys.executable] if ranks is None else [shutil.which("deepspeed"), "--num_gpus", str(ranks)]
    return [*launcher, str(ROOT / "train.py"), *args, "--out", str(out)]


def run_train(out, *args, ranks=None):
    done = subprocess.run(train_command(out, *args, ranks=ranks), cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]


def copy_data(source, out):
    for part in ("data", "teachers"):
        shutil.copytree(source / part, out / part)


def read_log(path):
    with open(path) as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def weights(stage_dir):
    return {**{f"text.{k}": v for k, v in load_file(stage_dir / "text" / "model.safetensors").items()},
            **load_file(stage_dir / "jasper.safetensors")}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """Stages 1, 2 and 3 run one after another into one folder."""
    out = tmp_path_factory.mktemp("pipeline")
    run_train(out, *STAGE1)
    run_train(out, "--stage", "2", *TINY, "--steps", "4")
    run_train(out, "--stage", "3", *TINY, "--steps", "4")
    return out


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


# ----------------------------------------------------------------------------- the pipeline

def test_each_stage_writes_a_model_a_log_and_its_heldout_loss(pipeline):
    for stage, steps in ((1, 40), (2, 4), (3, 4)):
        folder = pipeline / f"stage{stage}"
        log = read_log(folder / "log.csv")
        assert [row["step"] for row in log] == list(range(steps))
        result = json.loads((folder / "eval.json").read_text())
        assert result["steps_run"] == steps and result["tokens_per_second"] > 0
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
    stage1, stage2, stage3 = (weights(pipeline / f"stage{k}") for k in (1, 2, 3))
    changed_in_2 = {k for k in stage1 if not torch.equal(stage1[k], stage2[k])}
    last_three = ("text.encoder.layer.3.", "text.encoder.layer.4.", "text.encoder.layer.5.")  # MiniLM: 6 layers
    assert changed_in_2 == {k for k in stage1 if k.startswith(("heads.1152.", *last_three))}
    changed_in_3 = {k for k in stage2 if not torch.equal(stage2[k], stage3[k])}
    assert changed_in_3 == set(stage2)  # everything on the text side
    assert set(stage3) - set(stage2) == {f"heads.{d}.{w}" for d in (256, 128, 64) for w in ("weight", "bias")}


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
    # Adam divides by the gradient's size, so where a gradient is ~0 the rounding of the rank sum
    # moves a weight by a few % of one step (lr 1e-4): compare at 1e-5, a tenth of one step
    start, w1, w2 = (weights(tmp_path / name) for name in ("one/stage1", "one/stage2", "two/stage2"))
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], atol=1e-5, rtol=0)
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
    assert json.loads((tmp_path / "stage1" / "eval.json").read_text())["steps_run"] == 20
    assert read_log(log_file) == read_log(pipeline / "stage1" / "log.csv")
    resumed, uninterrupted = weights(tmp_path / "stage1"), weights(pipeline / "stage1")
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)
    before = json.loads((pipeline / "stage1" / "eval.json").read_text())["heldout_before"]
    assert json.loads((tmp_path / "stage1" / "eval.json").read_text())["heldout_before"] == before
