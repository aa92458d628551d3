"""Shared by the test files: the hub stays offline, and `pipeline`, a tiny toy run of stages 1-4 made
once per session by train.py itself (test_train checks it, test_evaluate measures it)."""

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
STAGE1 = ["--stage", "1", *TINY, "--steps", "120", "--checkpoint-every", "10"]


def train_command(out, *args, ranks=None):
    launcher = [sys.executable] if ranks is None else [shutil.which("deepspeed"), "--num_gpus", str(ranks)]
    return [*launcher, str(ROOT / "train.py"), *args, "--out", str(out)]


def run_train(out, *args, ranks=None):
    done = subprocess.run(train_command(out, *args, ranks=ranks), cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory):
    """Stages 1 to 4 run one after another into one folder."""
    out = tmp_path_factory.mktemp("pipeline")
    run_train(out, *STAGE1)
    run_train(out, "--stage", "2", *TINY, "--steps", "4")
    run_train(out, "--stage", "3", *TINY, "--steps", "4")
    run_train(out, "--stage", "4", *TINY, "--steps", "20")
    return out
