"""Shared by the test files: the hub stays offline; `pipeline`, a tiny toy run of stages 1-4 made once per session by
train.py itself (test_train checks it, test_evaluate measures it); `two_ranks`, stages 2-4 of it again on 2 ranks."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# Tests never touch a model hub: everything they load is a local folder or a config.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


ROOT = Path(__file__).resolve().parents[1]
TINY = ["--preset", "toy", "--n-texts", "96", "--heldout", "32", "--batch-size", "8"]
STAGE_ARGS = {1: [*TINY, "--steps", "120", "--checkpoint-every", "10"],
              2: [*TINY, "--steps", "12", "--checkpoint-every", "3"],
              3: [*TINY, "--steps", "12", "--checkpoint-every", "3"],
              4: [*TINY, "--steps", "40", "--checkpoint-every", "10"]}
# deepspeed is pinned in requirements.txt: its launcher sits beside this Python, on PATH or not
DEEPSPEED = Path(sys.executable).parent / "deepspeed"


def train_command(out, *args, ranks=None):
    if ranks is not None and not DEEPSPEED.is_file():
        pytest.fail(f"no deepspeed launcher at {DEEPSPEED}: install requirements.txt")
    launcher = [sys.executable] if ranks is None else [str(DEEPSPEED), "--num_gpus", str(ranks)]
    return [*launcher, str(ROOT / "train.py"), *args, "--out", str(out)]


def run_train(out, *args, ranks=None):
    done = subprocess.run(train_command(out, *args, ranks=ranks), cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]


def stage(n: int) -> list[str]:
    return ["--stage", str(n), *STAGE_ARGS[n]]


def copy_run(source: Path, out: Path, *parts: str) -> Path:
    """A new run folder holding `parts` (data, teachers, stageN) of another."""
    for part in parts:
        shutil.copytree(source / part, out / part)
    return out


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory):
    """Stages 1 to 4 run one after another into one folder."""
    out = tmp_path_factory.mktemp("pipeline")
    for n in (1, 2, 3, 4):
        run_train(out, *stage(n))
    return out


@pytest.fixture(scope="session")
def two_ranks(pipeline, tmp_path_factory):
    """{stage: a run folder}: stages 2, 3 and 4 again, each from the pipeline's previous stage, on 2 ranks with the
    same global batch, steps and seed."""
    runs = {}
    for n in (2, 3, 4):
        runs[n] = copy_run(pipeline, tmp_path_factory.mktemp(f"two_ranks_{n}"), "data", "teachers", f"stage{n - 1}")
        run_train(runs[n], *stage(n), ranks=2)
    return runs
