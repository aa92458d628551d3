"""teachers.py: each teacher gives the width it must (Stella-like module choice), prompts reach queries only, the
cache refuses other texts and other teachers, resumes, and splits its work over ranks; the command itself."""

import json
import shutil
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from sentence_transformers import SentenceTransformer
from transformers import AutoModel, AutoTokenizer

import data
import jasper
import presets
import rehearsal
import teachers
from conftest import ROOT
from presets import Teacher

TEXTS = [f"Text number {k} talks about {w}." for k, w in enumerate(["cats", "stocks", "rain", "python", "tea"] * 3)]
IS_QUERY = [k % 4 == 1 for k in range(len(TEXTS))]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.arrow"
    data.save_corpus(zip(TEXTS, IS_QUERY), path)
    return data.Corpus(path)


@pytest.fixture(scope="module")
def minilm():
    return teachers.TeacherEncoder(Teacher("minilm", data.all_minilm_l6_v2(), 384), max_length=32)


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    return rehearsal.stella_like(folder / "stella"), rehearsal.nv_embed_like(folder / "nv_embed")


# ----------------------------------------------------------------------------- a teacher's width and prompt

def mean_pooled(folder, texts):
    """A plain reference: the encoder's mean over the non-padding tokens."""
    tokenizer, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder)
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return (hidden * mask).sum(1) / mask.sum(1)


def test_a_stella_like_teacher_gives_the_width_it_must_from_its_wider_module(stand_ins):
    stella, _ = stand_ins
    assert SentenceTransformer(str(stella)).encode(["x"]).shape == (1, 16)  # its modules.json: 2_Dense_16
    encoder = teachers.TeacherEncoder(Teacher("stella", str(stella), 64), max_length=64)
    assert encoder.dim == 64
    dense = load_file(stella / "2_Dense_64" / "model.safetensors")
    expected = mean_pooled(stella, TEXTS[:3]) @ dense["linear.weight"].T + dense["linear.bias"]
    np.testing.assert_allclose(encoder(TEXTS[:3], [False] * 3), expected.numpy(), atol=1e-5)
    assert teachers.TeacherEncoder(Teacher("stella", str(stella)), max_length=64).dim == 16  # no width: its default
    with pytest.raises(ValueError, match=r"gives 16-d vectors, not 48.*\['2_Dense_16', '2_Dense_32', '2_Dense_64'\]"):
        teachers.TeacherEncoder(Teacher("stella", str(stella), 48), max_length=64)


def test_the_paper_preset_target_is_12288_wide_by_construction(tmp_path):
    """The paper's two teachers as they ship (Stella: default 2_Dense_1024 and a 2_Dense_8192 beside it; NV-Embed-v2:
    4096-d), as local stand-ins: the preset's teachers give 4096 + 8192, and stage 1's FC1 follows."""
    stella = rehearsal.stella_like(tmp_path / "stella", widths=(1024, 8192), default=1024)
    nv_embed = rehearsal.nv_embed_like(tmp_path / "nv_embed", width=4096)
    nv, st = presets.load("paper").teachers
    assert (nv.dim, st.dim) == (4096, 8192) and st.model == presets.STELLA
    encoders = [teachers.TeacherEncoder(replace(nv, model=str(nv_embed)), 64),
                teachers.TeacherEncoder(replace(st, model=str(stella)), 64)]
    cache = teachers.TeacherCache.create(tmp_path / "cache", data.text_hashes(TEXTS),
                                         [teachers.teacher_record(e.teacher, e.dim) for e in encoders])
    assert [t["dim"] for t in cache.meta["teachers"]] == [4096, 8192] and cache.dim == 12288
    model = jasper.Jasper(jasper.JasperConfig(text_encoder=str(stella), head_dims=[cache.dim]))
    assert model.fc1.out_features == 12288


def test_prompts_reach_queries_only_and_eos_is_appended(stand_ins, minilm):
    _, nv_embed = stand_ins
    texts, is_query = TEXTS[:4], [False, True, False, True]
    prompted = teachers.TeacherEncoder(Teacher("minilm", data.all_minilm_l6_v2(), 384, "Query: "), 32)
    np.testing.assert_allclose(prompted(texts, is_query), minilm(["Query: " + t if q else t for t, q in zip(texts, is_query)],
                                                                  [False] * 4), atol=1e-6)
    # NV-Embed-like: its pooling leaves the prompt out, so the prompt goes to sentence-transformers separately
    nv = teachers.TeacherEncoder(Teacher("nv", str(nv_embed), 32, "Instruct: x\nQuery: ", append_eos=True), 64)
    assert not nv.prompt_in_pooling
    st = SentenceTransformer(str(nv_embed))
    eos = st.tokenizer.eos_token
    expected = [st.encode([t + eos], prompt="Instruct: x\nQuery: " if q else None)[0] for t, q in zip(texts, is_query)]
    np.testing.assert_allclose(nv(texts, is_query), np.stack(expected), atol=1e-5)


# ----------------------------------------------------------------------------- the cache

def build(folder, corpus, encoders, chunk_rows=4, **fill):
    cache = teachers.TeacherCache.create(folder, corpus.hashes, [teachers.teacher_record(e.teacher, e.dim)
                                                                 for e in encoders.values()], chunk_rows=chunk_rows)
    cache.fill(corpus, encoders, **fill)
    return cache


def test_cache_rows_are_each_teachers_unit_vectors(tmp_path, corpus, minilm):
    cache = build(tmp_path, corpus, {"minilm": minilm})
    assert cache.dim == 384 and cache.missing_chunks() == {}
    direct = F.normalize(torch.from_numpy(minilm(TEXTS, IS_QUERY)), dim=-1)
    (rows,) = cache.rows(range(len(TEXTS)))
    np.testing.assert_allclose(rows, direct.numpy(), atol=2e-3)  # float16 storage
    np.testing.assert_allclose(cache.rows([3, 0])[0], direct[[3, 0]].numpy(), atol=2e-3)


def test_cache_for_other_texts_or_teachers_fails_loudly(tmp_path, corpus, minilm):
    build(tmp_path, corpus, {"minilm": minilm})
    changed = corpus.hashes.copy()
    changed[7] += 1
    with pytest.raises(ValueError, match="first at row 7"):
        teachers.TeacherCache(tmp_path, changed)
    with pytest.raises(ValueError, match="holds 15 texts, the corpus has 14"):
        teachers.TeacherCache(tmp_path, corpus.hashes[:-1])
    with pytest.raises(FileNotFoundError, match="no teacher cache"):
        teachers.TeacherCache(tmp_path / "nothing", corpus.hashes)
    cache = teachers.TeacherCache(tmp_path, corpus.hashes)
    cache.check_teachers([minilm.teacher])
    copy = shutil.copytree(data.all_minilm_l6_v2(), tmp_path / "elsewhere" / "all-MiniLM-L6-v2")
    cache.check_teachers([replace(minilm.teacher, model=str(copy))])  # another environment's copy of the model
    for other in (replace(minilm.teacher, query_prompt="Query: "), replace(minilm.teacher, dim=256),
                  replace(minilm.teacher, model=data.all_mpnet_base_v2()), replace(minilm.teacher, append_eos=True)):
        with pytest.raises(ValueError, match="was made by"):
            cache.check_teachers([other])


def test_interrupted_build_resumes_and_ranks_share_the_work(tmp_path, corpus, minilm):
    calls = []

    def failing_after_two_chunks(texts, is_query):
        if len(calls) == 2:
            raise KeyboardInterrupt  # the build is killed here
        calls.append(len(texts))
        return minilm(texts, is_query)

    cache = teachers.TeacherCache.create(tmp_path / "c", corpus.hashes, [teachers.teacher_record(minilm.teacher, 384)],
                                         chunk_rows=4)
    with pytest.raises(KeyboardInterrupt):
        cache.fill(corpus, {"minilm": failing_after_two_chunks})
    reopened = teachers.TeacherCache(tmp_path / "c", corpus.hashes)
    assert reopened.missing_chunks() == {"minilm": [2, 3]}
    with pytest.raises(ValueError, match="incomplete"):
        reopened.rows([0])
    reopened.fill(corpus, {"minilm": minilm}, rank=1, world_size=2)  # rank 1 of 2 takes chunk 3
    assert reopened.missing_chunks() == {"minilm": [2]}
    reopened.fill(corpus, {"minilm": minilm}, rank=0, world_size=2)
    full = build(tmp_path / "full", corpus, {"minilm": minilm})
    np.testing.assert_array_equal(np.asarray(reopened.vectors["minilm"]), np.asarray(full.vectors["minilm"]))


def test_bad_teacher_output_is_rejected(tmp_path, corpus, minilm):
    def nan_teacher(texts, is_query):
        out = minilm(texts, is_query)
        out[1, 0] = np.nan
        return out
    cache = teachers.TeacherCache.create(tmp_path, corpus.hashes, [teachers.teacher_record(minilm.teacher, 384)],
                                         chunk_rows=4)
    with pytest.raises(ValueError, match="NaN"):
        cache.fill(corpus, {"minilm": nan_teacher})
    with pytest.raises(ValueError, match="shape"):
        cache.fill(corpus, {"minilm": lambda texts, is_query: minilm(texts, is_query)[:, :10]})


# ----------------------------------------------------------------------------- the command

def test_teachers_command_on_two_ranks_writes_the_cache_of_one(tmp_path, stand_ins):
    """Your own teachers from the command line (the Stella-like one at its widest), a corpus of your own, a
    preset file with chunks of 4 texts, torchrun with 2 ranks: the same cache as one process, bit for bit."""
    stella, nv_embed = stand_ins
    corpus_file, preset_file = tmp_path / "mine.jsonl", tmp_path / "small.json"
    corpus_file.write_text("".join(json.dumps({"text": t, "query": q}) + "\n" for t, q in zip(TEXTS, IS_QUERY)))
    preset_file.write_text(json.dumps({"base": "toy", "chunk_rows": 4}))
    args = ["--preset", str(preset_file), "--corpus", str(corpus_file), "--n-texts", "15", "--teacher", f"stella={stella}@64",
            "--teacher", f"nv={nv_embed}"]
    one = subprocess.run([sys.executable, "teachers.py", *args, "--out", str(tmp_path / "one")], cwd=ROOT,
                         capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-3000:]
    assert one.stdout.strip().endswith(f"15 texts, teachers stella 64 + nv 32 = a 96-d target, in {tmp_path}/one/teachers")
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "teachers.py", *args,
                          "--out", str(tmp_path / "two")], cwd=ROOT, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    for name in ("stella", "nv"):
        np.testing.assert_array_equal(np.load(tmp_path / "one/teachers" / f"{name}.npy"),
                                      np.load(tmp_path / "two/teachers" / f"{name}.npy"))
    meta = json.loads((tmp_path / "two/teachers/meta.json").read_text())
    assert meta["chunk_rows"] == 4
    assert "15/15" in one.stderr and "8/8" in two.stderr and "15/15" not in two.stderr  # rank 0: chunks 0 and 2
    assert [(t["name"], t["dim"], t["query_prompt"]) for t in meta["teachers"]] == [("stella", 64, ""), ("nv", 32, "")]


def test_teachers_command_runs_in_an_environment_of_its_own_requirements(tmp_path, stand_ins):
    """A fresh venv with requirements-teachers.txt only (transformers 4.42.4, as NV-Embed-v2 needs; no DeepSpeed,
    no training code's versions) writes the very cache the training environment writes."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    install = subprocess.run([str(venv / "bin/pip"), "install", "-q", "-r", "requirements-teachers.txt"], cwd=ROOT,
                             capture_output=True, text=True)
    assert install.returncode == 0, install.stderr[-3000:]
    probe = subprocess.run([str(venv / "bin/python"), "-c", "import transformers, importlib.util as u; "
                            "print(transformers.__version__, u.find_spec('deepspeed') is None)"],
                           capture_output=True, text=True, check=True)
    assert probe.stdout.split() == ["4.42.4", "True"]
    stella, nv_embed = stand_ins
    corpus_file = tmp_path / "mine.jsonl"
    corpus_file.write_text("".join(json.dumps({"text": t, "query": q}) + "\n" for t, q in zip(TEXTS, IS_QUERY)))
    args = ["teachers.py", "--corpus", str(corpus_file), "--n-texts", "15", "--teacher", f"stella={stella}@64",
            "--teacher", f"nv={nv_embed}", "--teacher", f"minilm={data.all_minilm_l6_v2()}"]
    for python, out in ((venv / "bin/python", "theirs"), (sys.executable, "ours")):
        done = subprocess.run([str(python), *args, "--out", str(tmp_path / out)], cwd=ROOT, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
    for name in ("stella", "nv", "minilm"):
        np.testing.assert_array_equal(np.load(tmp_path / "theirs/teachers" / f"{name}.npy"),
                                      np.load(tmp_path / "ours/teachers" / f"{name}.npy"))
