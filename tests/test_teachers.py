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
from conftest import ROOT
from safetensors.torch import load_file
from sentence_transformers import SentenceTransformer
from transformers import AutoModel, AutoTokenizer

import data
import jasper
import presets
import rehearsal
import teachers
import toy_data
from presets import Teacher

TEXTS = [f"Text number {k} talks about {w}." for k, w in enumerate(["cats", "stocks", "rain", "python", "tea"] * 3)]
KINDS = ["query" if k % 4 == 1 else "symmetric" if k % 4 == 2 else "passage" for k in range(len(TEXTS))]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.arrow"
    data.save_corpus(zip(TEXTS, KINDS), path)
    return data.Corpus(path)


@pytest.fixture(scope="module")
def minilm():
    return teachers.TeacherEncoder(Teacher("minilm", toy_data.all_minilm_l6_v2(), 384), max_length=32)


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
    np.testing.assert_allclose(encoder(TEXTS[:3], ["passage"] * 3), expected.numpy(), atol=1e-5)
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


def st_reference(model, texts, kinds, prompts):
    """sentence-transformers' own encode, one text at a time, with the prompt for its kind given as `prompt=`."""
    return np.stack([model.encode([text], prompt=prompts.get(kind) or None)[0] for text, kind in zip(texts, kinds)])


def test_each_kind_gets_its_prompt_as_sentence_transformers_applies_it(stand_ins):
    _, nv_embed = stand_ins
    prompts = {"query": "Query: ", "symmetric": "Same: "}
    minilm = teachers.TeacherEncoder(Teacher("minilm", toy_data.all_minilm_l6_v2(), 384, prompts), 32)
    st = SentenceTransformer(toy_data.all_minilm_l6_v2())
    st.max_seq_length = 32
    np.testing.assert_allclose(minilm(TEXTS[:6], KINDS[:6]), st_reference(st, TEXTS[:6], KINDS[:6], prompts), atol=1e-5)
    # NV-Embed-like: its pooling leaves the prompt out, so the prompt goes to sentence-transformers apart
    nv = teachers.TeacherEncoder(Teacher("nv", str(nv_embed), 32, prompts, append_eos=True), 64)
    assert not nv.prompt_in_pooling
    st = SentenceTransformer(str(nv_embed))
    st.max_seq_length = 64
    eos = st.tokenizer.eos_token
    np.testing.assert_allclose(nv(TEXTS[:6], KINDS[:6]), st_reference(st, [t + eos for t in TEXTS[:6]], KINDS[:6],
                                                                        prompts), atol=1e-5)


def test_the_eos_token_survives_truncation(stand_ins):
    """NV-Embed-v2's card appends the EOS token to every text: a text longer than the max length is cut first, so
    the last token the model reads is still the EOS, with the prompt and the cut text before it."""
    _, nv_embed = stand_ins
    prompt = "Instruct: Retrieve semantically similar text.\nQuery: "
    nv = teachers.TeacherEncoder(Teacher("nv", str(nv_embed), 32, {"symmetric": prompt}, append_eos=True), 64)
    long_text = " ".join(f"word{k}" for k in range(300))
    tokenizer = SentenceTransformer(str(nv_embed)).tokenizer
    eos = tokenizer.eos_token_id
    for text, text_prompt in ((long_text, ""), (long_text, prompt), ("short text", prompt)):
        cut = nv.cut_then_eos(text, text_prompt)
        ids = tokenizer(text_prompt + cut, truncation=True, max_length=64)["input_ids"]
        assert ids[-1] == eos and cut.endswith(tokenizer.eos_token)
        assert text.startswith(cut.removesuffix(tokenizer.eos_token))
        assert len(ids) == (64 if text == long_text else len(tokenizer(text_prompt + text)["input_ids"]) + 1)
    # and the vector is the model's for exactly that input: the stand-in pools the text tokens after the prompt
    st = SentenceTransformer(str(nv_embed))
    st.max_seq_length = 64
    expected = st.encode([nv.cut_then_eos(long_text, prompt)], prompt=prompt)
    np.testing.assert_allclose(nv([long_text], ["symmetric"]), expected, atol=1e-5)
    plain = teachers.TeacherEncoder(Teacher("nv", str(nv_embed), 32, {"symmetric": prompt}), 64)
    assert not np.allclose(plain([long_text], ["symmetric"]), expected, atol=1e-3)  # without the EOS rule: other input


# ----------------------------------------------------------------------------- the cache

def build(folder, corpus, encoders, chunk_rows=4, **fill):
    cache = teachers.TeacherCache.create(folder, corpus.hashes, [teachers.teacher_record(e.teacher, e.dim)
                                                                 for e in encoders.values()], chunk_rows=chunk_rows)
    cache.fill(corpus, encoders, **fill)
    return cache


def test_cache_rows_are_each_teachers_unit_vectors(tmp_path, corpus, minilm):
    cache = build(tmp_path, corpus, {"minilm": minilm})
    assert cache.dim == 384 and cache.missing_chunks() == {}
    direct = F.normalize(torch.from_numpy(minilm(TEXTS, KINDS)), dim=-1)
    (rows,) = cache.rows(range(len(TEXTS)))
    np.testing.assert_allclose(rows, direct.numpy(), atol=2e-3)  # float16 storage
    np.testing.assert_allclose(cache.rows([3, 0])[0], direct[[3, 0]].numpy(), atol=2e-3)


def test_two_teachers_each_put_their_own_prompts_into_the_cache(tmp_path, corpus):
    """Through the cache, each teacher's rows are what sentence-transformers' own encode gives with that teacher's
    prompt for the row's kind: teacher a prompts queries only, teacher b queries and symmetric texts, each its own."""
    a = Teacher("a", toy_data.all_minilm_l6_v2(), 384, {"query": "Search query: "})
    b = Teacher("b", toy_data.all_minilm_l6_v2(), 384, {"query": "Question: ", "symmetric": "Same meaning: "})
    cache = build(tmp_path, corpus, {t.name: teachers.TeacherEncoder(t, max_length=32) for t in (a, b)})
    st = SentenceTransformer(toy_data.all_minilm_l6_v2())
    st.max_seq_length = 32
    for teacher, rows in zip((a, b), cache.rows(range(len(TEXTS)))):
        expected = F.normalize(torch.from_numpy(st_reference(st, TEXTS, KINDS, teacher.prompts)), dim=-1).numpy()
        np.testing.assert_allclose(rows, expected, atol=2e-3)
    (rows_a, rows_b), passages = cache.rows(range(len(TEXTS))), [k for k, kind in enumerate(KINDS) if kind == "passage"]
    np.testing.assert_array_equal(rows_a[passages], rows_b[passages])  # no prompt on a passage from either
    assert [t["prompts"] for t in cache.meta["teachers"]] == [a.prompts, b.prompts]


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
    meta = teachers.TeacherCache(tmp_path, corpus.hashes).meta | {"max_length": 32}
    assert teachers.cache_problem(meta, [minilm.teacher], 32) is None
    copy = shutil.copytree(toy_data.all_minilm_l6_v2(), tmp_path / "elsewhere" / "all-MiniLM-L6-v2")
    assert teachers.cache_problem(meta, [replace(minilm.teacher, model=str(copy))], 32) is None  # another copy
    mpnet = toy_data.all_mpnet_base_v2()
    for other, problem in ((minilm.teacher, "its texts were cut at max_length 32, this run cuts at 64"),
                           (replace(minilm.teacher, prompts={"query": "Q: "}), "teacher minilm's prompts was {}, "
                                                                                "this run's is {'query': 'Q: '}"),
                           (replace(minilm.teacher, dim=256), "teacher minilm's dim was 384, this run's is 256"),
                           (replace(minilm.teacher, model=mpnet), f"teacher minilm's model was '{minilm.teacher.model}'"
                                                                   f", this run's is '{mpnet}'"),
                           (replace(minilm.teacher, append_eos=True), "teacher minilm's append_eos was False"),
                           (replace(minilm.teacher, name="other"), "made by the teachers ['minilm'], not ['other']")):
        assert problem in teachers.cache_problem(meta, [other], 64 if other is minilm.teacher else 32)


def test_interrupted_build_resumes_and_ranks_share_the_work(tmp_path, corpus, minilm):
    calls = []

    def failing_after_two_chunks(texts, kinds):
        if len(calls) == 2:
            raise KeyboardInterrupt  # the build is killed here
        calls.append(len(texts))
        return minilm(texts, kinds)

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
    def nan_teacher(texts, kinds):
        out = minilm(texts, kinds)
        out[1, 0] = np.nan
        return out
    cache = teachers.TeacherCache.create(tmp_path, corpus.hashes, [teachers.teacher_record(minilm.teacher, 384)],
                                         chunk_rows=4)
    with pytest.raises(ValueError, match="NaN"):
        cache.fill(corpus, {"minilm": nan_teacher})
    with pytest.raises(ValueError, match="shape"):
        cache.fill(corpus, {"minilm": lambda texts, kinds: minilm(texts, kinds)[:, :10]})


# ----------------------------------------------------------------------------- the command

def test_teachers_command_on_two_ranks_writes_the_cache_of_one(tmp_path, stand_ins):
    """Your own teachers from the command line (the Stella-like one at its widest), a corpus of your own, a
    preset file with chunks of 4 texts, torchrun with 2 ranks: the same cache as one process, bit for bit. (Which rank
    takes which chunk: test_interrupted_build_resumes_and_ranks_share_the_work.)"""
    stella, nv_embed = stand_ins
    corpus_file, preset_file = tmp_path / "mine.jsonl", tmp_path / "small.json"
    corpus_file.write_text("".join(json.dumps({"text": t, "kind": k}) + "\n" for t, k in zip(TEXTS, KINDS)))
    preset_file.write_text(json.dumps({"base": "toy", "chunk_rows": 4}))
    args = ["--preset", str(preset_file), "--corpus", str(corpus_file), "--n-texts", "15",
            "--teacher", f"stella={stella}@64", "--teacher", f"nv={nv_embed}"]
    one = subprocess.run([sys.executable, "teachers.py", *args, "--out", str(tmp_path / "one")], cwd=ROOT,
                         capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-3000:]
    expected = f"15 texts, teachers stella 64 + nv 32 = a 96-d target, in {tmp_path}/one/teachers"
    assert one.stdout.strip().endswith(expected)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "teachers.py", *args,
                          "--out", str(tmp_path / "two")], cwd=ROOT, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    for name in ("stella", "nv"):
        np.testing.assert_array_equal(np.load(tmp_path / "one/teachers" / f"{name}.npy"),
                                      np.load(tmp_path / "two/teachers" / f"{name}.npy"))
    meta = json.loads((tmp_path / "two/teachers/meta.json").read_text())
    assert meta["chunk_rows"] == 4
    assert [(t["name"], t["dim"], t["prompts"]) for t in meta["teachers"]] == [("stella", 64, {}), ("nv", 32, {})]


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
    corpus_file.write_text("".join(json.dumps({"text": t, "kind": k}) + "\n" for t, k in zip(TEXTS, KINDS)))
    args = ["teachers.py", "--corpus", str(corpus_file), "--n-texts", "15", "--teacher", f"stella={stella}@64",
            "--teacher", f"nv={nv_embed}", "--teacher", f"minilm={toy_data.all_minilm_l6_v2()}"]
    for python, out in ((venv / "bin/python", "theirs"), (sys.executable, "ours")):
        done = subprocess.run([str(python), *args, "--out", str(tmp_path / out)], cwd=ROOT, capture_output=True,
                              text=True)
        assert done.returncode == 0, done.stderr[-3000:]
    for name in ("stella", "nv", "minilm"):
        np.testing.assert_array_equal(np.load(tmp_path / "theirs/teachers" / f"{name}.npy"),
                                      np.load(tmp_path / "ours/teachers" / f"{name}.npy"))
