"""The data recipe (paper 3.2), the real-format loaders on local files, and the teacher-vector cache."""

import gzip
import json
import random

import numpy as np
import pytest
import torch

import data
import jasper

# ----------------------------------------------------------------------------- the recipe

DOC = ("The cat sat. It was warm! Was it late? Yes. The end came at 5 p.m. on Monday. "
       "Nothing else happened. Then 3 dogs arrived. \"Hello,\" said one. They left. Quiet again.")


def test_split_sentences():
    assert data.split_sentences(DOC)[:4] == ["The cat sat.", "It was warm!", "Was it late?", "Yes."]
    assert len(data.split_sentences(DOC)) == 10


def test_chunks_hold_1_to_10_consecutive_sentences():
    rng = random.Random(0)
    sentences = [f"Sentence number {k} is here." for k in range(500)]
    chunks = data.chunk_document(" ".join(sentences), rng)
    sizes = [len(data.split_sentences(c)) for c in chunks]
    assert min(sizes) == 1 and max(sizes) == 10
    assert abs(np.mean(sizes) - 5.5) < 1.0  # uniform on 1..10; ~90 chunks, sd of the mean ~0.3
    assert [s for c in chunks for s in data.split_sentences(c)] == sentences  # nothing lost or reordered


def synthetic_sources(n_docs=20000, n_queries=20000):
    documents = [" ".join(f"Doc {d} sentence {k} ends here." for k in range(12)) for d in range(n_docs)]
    queries = [f"what is query number {q} about" for q in range(n_queries)]
    return documents, queries


def test_mix_ratio_prompts_and_determinism():
    documents, queries = synthetic_sources()
    texts = data.make_corpus(documents, queries, 5000, seed=1)
    assert len(texts) == 5000
    prompted = [t for t in texts if t.startswith(data.QUERY_PROMPT)]
    assert len(prompted) == 1000  # 20% queries, exactly
    assert texts == data.make_corpus(documents, queries, 5000, seed=1)
    assert texts != data.make_corpus(documents, queries, 5000, seed=2)


def test_chunk_share_is_30_percent_of_documents():
    documents, queries = synthetic_sources()
    texts = data.make_corpus(documents, queries, 20000, seed=0)
    passages = [t for t in texts if t.startswith("Doc ")]  # (leaves out the few word-shuffled texts)
    used = {t.split()[1] for t in passages}
    whole = {t.split()[1] for t in passages if t in set(documents)}  # a chunk has at most 10 of the 12 sentences
    assert abs(1 - len(whole) / len(used) - 0.3) < 0.03  # binomial: sd ~0.005 over the ~9k documents used


def test_word_shuffle_rate_is_0_08_percent():
    documents = [f"alpha beta gamma delta number{d} end." for d in range(200000)]  # one sentence: never chunked
    queries = [f"question{q} about alpha beta gamma" for q in range(50000)]
    texts = data.make_corpus(documents, queries, 200000, seed=0)
    originals = set(documents) | {data.QUERY_PROMPT + q for q in queries}
    shuffled = [t for t in texts if t not in originals]
    assert 100 <= len(shuffled) <= 220  # expected 160, sd ~13
    bags = {tuple(sorted(o.removeprefix(data.QUERY_PROMPT).split())) for o in originals}
    assert all(tuple(sorted(t.removeprefix(data.QUERY_PROMPT).split())) in bags for t in shuffled)
    assert sum(t.startswith(data.QUERY_PROMPT) for t in texts) == 40000  # the prompt stays intact


def test_shuffle_words_keeps_the_words():
    text = "one two three four five six"
    shuffled = data.shuffle_words(text, random.Random(0))
    assert shuffled != text and sorted(shuffled.split()) == sorted(text.split())


def test_too_few_sources_is_a_clear_error():
    with pytest.raises(ValueError, match="passages"):
        data.make_corpus(["One. Two."], ["q"] * 10, 100)
    with pytest.raises(ValueError, match="queries"):
        data.make_corpus(["One sentence here."] * 1000, ["q"], 100)


def test_toy_sources_are_real_offline_text():
    documents, queries = data.toy_sources()
    assert len(documents) > 1500 and len(queries) > 500
    assert sum(map(len, documents)) > 500_000
    assert any("Return" in q for q in queries)
    texts = data.make_corpus(documents, queries, 2000, seed=0)
    assert len(set(texts)) > 1900


# ----------------------------------------------------------------------------- full-scale loaders, on local files

def test_fineweb_loader_reads_local_files_of_the_same_format(tmp_path):
    rows = [{"text": f"Document {k}. It has sentences.", "id": str(k), "score": 3.1} for k in range(5)]
    path = tmp_path / "fineweb.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert list(data.fineweb_documents("json", name=None, data_files=str(path))) == [r["text"] for r in rows]


def test_embedding_data_loader_reads_every_row_format_interleaved(tmp_path):
    files = {"pairs.jsonl.gz": [["q1", "a1"], ["q2", "a2"], ["q3", "a3"]],
             "sets.jsonl.gz": [{"set": ["s1", "s1 again"]}, {"set": ["s2"]}],
             "triplets.jsonl.gz": [{"query": "t1", "pos": ["p"], "neg": ["n"]}]}
    for name, rows in files.items():
        with gzip.open(tmp_path / name, "wt") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    texts = list(data.embedding_data_queries([str(tmp_path / n) for n in files]))
    assert texts == ["q1", "s1", "t1", "q2", "s2", "q3"]
    with pytest.raises(ValueError, match="unknown"):
        data.first_text({"other": 1})


# ----------------------------------------------------------------------------- the teacher cache

TEXTS = [f"Text number {k} talks about {w}." for k, w in enumerate(["cats", "stocks", "rain", "python", "tea"] * 3)]


@pytest.fixture(scope="module")
def minilm():
    return data.sentence_transformer_encoder(data.all_minilm_l6_v2(), max_length=32)


def build(folder, encoders, chunk_rows=4, **fill):
    cache = data.TeacherCache.create(folder, TEXTS, {n: e.dim for n, e in encoders.items()}, chunk_rows=chunk_rows)
    cache.fill(TEXTS, encoders, **fill)
    return cache


def test_cache_targets_are_the_normalized_concatenation(tmp_path, minilm):
    encoders = {"a": minilm, "b": minilm}
    cache = build(tmp_path, encoders)
    assert cache.dim == 768 and cache.missing_chunks() == {}
    direct = torch.from_numpy(minilm(TEXTS))
    expected = jasper.teacher_target(direct, direct)
    torch.testing.assert_close(cache.targets(range(len(TEXTS))), expected, atol=2e-3, rtol=0)  # float16 storage
    torch.testing.assert_close(cache.targets([3, 0]), expected[[3, 0]], atol=2e-3, rtol=0)


def test_cache_for_other_texts_fails_loudly(tmp_path, minilm):
    build(tmp_path, {"a": minilm})
    changed = list(TEXTS)
    changed[7] = "A different text."
    with pytest.raises(ValueError, match="first at row 7"):
        data.TeacherCache(tmp_path, changed)
    with pytest.raises(ValueError, match="holds 15 texts, the corpus has 14"):
        data.TeacherCache(tmp_path, TEXTS[:-1])
    with pytest.raises(FileNotFoundError, match="no teacher cache"):
        data.TeacherCache(tmp_path / "nothing", TEXTS)


def test_interrupted_build_resumes_and_ranks_share_the_work(tmp_path, minilm):
    calls = []

    def failing_after_two_chunks(texts):
        if len(calls) == 2:
            raise KeyboardInterrupt  # the build is killed here
        calls.append(len(texts))
        return minilm(texts)
    failing_after_two_chunks.dim = minilm.dim

    cache = data.TeacherCache.create(tmp_path / "c", TEXTS, {"a": minilm.dim}, chunk_rows=4)
    with pytest.raises(KeyboardInterrupt):
        cache.fill(TEXTS, {"a": failing_after_two_chunks})
    reopened = data.TeacherCache(tmp_path / "c", TEXTS)
    assert reopened.missing_chunks() == {"a": [2, 3]}
    with pytest.raises(ValueError, match="incomplete"):
        reopened.targets([0])
    reopened.fill(TEXTS, {"a": minilm}, rank=1, world_size=2)  # rank 1 of 2 takes chunk 3
    assert reopened.missing_chunks() == {"a": [2]}
    reopened.fill(TEXTS, {"a": minilm}, rank=0, world_size=2)
    full = build(tmp_path / "full", {"a": minilm})
    np.testing.assert_array_equal(np.asarray(reopened.vectors["a"]), np.asarray(full.vectors["a"]))


def test_bad_teacher_output_is_rejected(tmp_path, minilm):
    def nan_teacher(texts):
        out = minilm(texts)
        out[1, 0] = np.nan
        return out
    nan_teacher.dim = minilm.dim
    cache = data.TeacherCache.create(tmp_path, TEXTS, {"a": minilm.dim}, chunk_rows=4)
    with pytest.raises(ValueError, match="NaN"):
        cache.fill(TEXTS, {"a": nan_teacher})
    with pytest.raises(ValueError, match="shape"):
        cache.fill(TEXTS, {"a": lambda texts: minilm(texts)[:, :10]})


# ----------------------------------------------------------------------------- image-caption pairs (stage 4)

def blobs(mask: np.ndarray) -> list[np.ndarray]:
    """The 4-connected components of a boolean image, each as a boolean mask (a plain flood fill)."""
    seen, found = np.zeros_like(mask), []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        blob, stack = np.zeros_like(mask), [start]
        while stack:
            y, x = stack.pop()
            if 0 <= y < mask.shape[0] and 0 <= x < mask.shape[1] and mask[y, x] and not seen[y, x]:
                seen[y, x] = blob[y, x] = True
                stack += [(y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)]
        found.append(blob)
    return found


def shape_of(blob: np.ndarray) -> str:
    """Tell the four shapes apart by how they fill their bounding box."""
    rows, cols = np.nonzero(blob)
    box = blob[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    fill = box.mean()
    if fill > 0.95:
        return "square"
    if fill > 0.7:
        return "circle"
    return "triangle" if box[-1].mean() > 0.9 and box[0].mean() < 0.5 else "cross"


def test_shape_scenes_draw_exactly_what_the_caption_says():
    scenes = data.ShapeScenes(60, seed=1)
    captions = set()
    for i in range(len(scenes)):
        image, caption = scenes[i]
        count, colour, noun = caption.split()
        pixels = np.asarray(image).astype(int)
        painted = (pixels != 255).any(-1)
        assert (pixels[painted] == data.COLOURS[colour]).all()  # one colour, the caption's, nothing else
        found = blobs(painted)
        assert len(found) == data.COUNT_WORDS.index(count) + 1
        singular = noun if noun in data.SHAPES else "cross" if noun == "crosses" else noun[:-1]
        assert {shape_of(b) for b in found} == {singular}
        captions.add(caption)
    assert len(captions) > 30  # of the 72
    again = data.ShapeScenes(60, seed=1)[7]
    assert again[1] == scenes[7][1] and np.array_equal(np.asarray(again[0]), np.asarray(scenes[7][0]))
    assert not np.array_equal(np.asarray(data.ShapeScenes(60, seed=2)[7][0]), np.asarray(scenes[7][0]))
    with pytest.raises(IndexError):
        scenes[60]


def webdataset_tar(path, captions):
    """A tar in Infinity-MM's layout: NNNNN.jpg + NNNNN.json with a human/gpt conversation."""
    import io
    import tarfile
    from PIL import Image
    with tarfile.open(path, "w") as tar:
        for k, caption in enumerate(captions):
            image = io.BytesIO()
            Image.new("RGB", (24, 16), (10 * k, 200, 0)).save(image, "PNG")
            record = {"id": str(k), "source": "test", "image": f"/images/{k}.png",
                      "conversations": [{"from": "human", "value": "<image>\nDescribe the image."},
                                        {"from": "gpt", "value": caption}]}
            for name, payload in ((f"{k:05d}.png", image.getvalue()), (f"{k:05d}.json", json.dumps(record).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return str(path)


def test_infinity_mm_loader_reads_local_webdataset_tars(tmp_path):
    tar = webdataset_tar(tmp_path / "part-0.tar", ["A dog on a beach.", " Two cups. ", "A red car."])
    pairs = data.infinity_mm_captions(2, "webdataset", name=None, data_files=[tar])
    assert len(pairs) == 2
    image, caption = pairs[1]
    assert caption == "Two cups." and image.size == (24, 16) and image.getpixel((3, 3)) == (10, 200, 0)
    with pytest.raises(ValueError, match="4 were asked"):
        data.infinity_mm_captions(4, "webdataset", name=None, data_files=[tar])
    empty = webdataset_tar(tmp_path / "part-1.tar", ["  "])
    with pytest.raises(ValueError, match="no caption"):
        data.infinity_mm_captions(1, "webdataset", name=None, data_files=[empty])[0]
