"""run_rehearsal.sh: the paper preset's code path (the authors' released-format texts, teachers by width and with
their prompts, a Qwen2 student, SigLIP through the parameter-free pooler, 512 tokens, per-rank losses, vector
dropout) offline on 2 ranks under the deepspeed launcher, stages 1-4 and the evaluation."""

import json
import os
import subprocess

from conftest import DEEPSPEED, ROOT
from safetensors.torch import load_file

import data


def test_the_rehearsal_runs_all_four_stages_of_the_paper_code_path(tmp_path):
    out = tmp_path / "rehearsal"
    path = f"{DEEPSPEED.parent}{os.pathsep}{os.environ['PATH']}"  # the launcher of this environment, on PATH or not
    done = subprocess.run(["bash", "run_rehearsal.sh", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=1500, env=os.environ | {"PATH": path})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    preset = json.loads((out / "preset.json").read_text())
    assert preset["base"] == "paper" and preset["corpus"] == f"jasper:{out / 'sources' / 'jasper'}"
    assert data.Corpus(out / "data" / "corpus.arrow").texts([0])[0] in data.corpus_rows(preset["corpus"], 240, 0)[0]
    meta = json.loads((out / "teachers" / "meta.json").read_text())
    assert [(t["name"], t["dim"], t["prompts"]) for t in meta["teachers"]] == [
        ("nv_embed_v2", 32, data.STELLA_PROMPTS), ("stella", 64, data.STELLA_PROMPTS)]
    assert meta["max_length"] == 512 and meta["n"] == 240  # the paper's length
    for stage in (1, 2, 3, 4):
        result = json.loads((out / f"stage{stage}" / "eval.json").read_text())
        assert result["world_size"] == 2 and result["steps_run"] == 4 and result["preset"] == str(out / "preset.json")
    config = json.loads((out / "stage4" / "jasper_config.json").read_text())
    assert config["head_dims"] == [96, 48, 24, 12]  # FC1 = 32 + 64
    assert (config["pooler"], config["image_tokens"], config["vector_dropout"]) == ("average", 20, 0.2)
    assert {k.split(".")[0] for k in load_file(out / "stage4" / "jasper.safetensors")} == {"heads"}  # no pooler weights
    assert json.loads((out / "stage4" / "text" / "config.json").read_text())["model_type"] == "qwen2"
    assert json.loads((out / "stage4" / "text" / "tokenizer_config.json").read_text())["model_max_length"] == 512
    evaluation = json.loads((out / "scores.json").read_text())
    assert list(evaluation["models"]) == ["nv_embed_v2 (teacher)", "stella (teacher)", "target", "start",
                                          "stage 1", "stage 2", "stage 3"]
