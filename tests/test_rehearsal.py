"""run_rehearsal.sh: the paper preset's code path (its loaders, teachers by width, Qwen2 student, SigLIP, 512
tokens) offline on 2 ranks under the deepspeed launcher, stages 1-4 and the evaluation."""

import json
import shutil
import subprocess

import pytest

from conftest import ROOT


@pytest.mark.skipif(shutil.which("deepspeed") is None, reason="the deepspeed launcher is not installed")
def test_the_rehearsal_runs_all_four_stages_of_the_paper_code_path(tmp_path):
    out = tmp_path / "rehearsal"
    done = subprocess.run(["bash", "run_rehearsal.sh", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    preset = json.loads((out / "preset.json").read_text())
    assert preset["base"] == "paper" and preset["corpus"] == f"paper:{out / 'sources'}"
    meta = json.loads((out / "teachers" / "meta.json").read_text())
    assert [(t["name"], t["dim"]) for t in meta["teachers"]] == [("nv_embed_v2", 32), ("stella", 64)]
    assert meta["max_length"] == 512 and meta["n"] == 240  # the paper's length
    for stage in (1, 2, 3, 4):
        result = json.loads((out / f"stage{stage}" / "eval.json").read_text())
        assert result["world_size"] == 2 and result["steps_run"] == 4 and result["preset"] == str(out / "preset.json")
    config = json.loads((out / "stage4" / "jasper_config.json").read_text())
    assert config["head_dims"] == [96, 48, 24, 12] and config["image_tokens"] == 9  # FC1 = 32 + 64
    assert json.loads((out / "stage4" / "text" / "config.json").read_text())["model_type"] == "qwen2"
    assert json.loads((out / "stage4" / "text" / "tokenizer_config.json").read_text())["model_max_length"] == 512
    evaluation = json.loads((out / "sts.json").read_text())
    assert list(evaluation["models"]) == ["nv_embed_v2 (teacher)", "stella (teacher)", "target", "start",
                                          "stage 1", "stage 2", "stage 3", "stage 4"]
