"""evaluate.py: the STS Benchmark as published, its scores against a plain reference (scipy on
sentence-transformers' vectors), the tables of a trained run, and MTEB's own scoring of an in-memory
task agreeing with ours."""

import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, spearmanr
from sentence_transformers import SentenceTransformer

import data
import evaluate
import jasper

LIMIT = 40  # STS pairs the run-level tests score


def reference_spearman(model, first, second, gold):
    """scipy's Spearman of the cosines of sentence-transformers' vectors, one pair at a time."""
    a, b = model.encode(first), model.encode(second)
    cosines = [float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y))) for x, y in zip(a, b)]
    return spearmanr(cosines, gold).statistic


def test_sts_benchmark_is_the_published_one():
    sizes = {split: len(data.sts_benchmark(split)[2]) for split in ("train", "dev", "test")}
    assert sizes == {"train": 5749, "dev": 1500, "test": 1379}
    first, second, gold = data.sts_benchmark("test")
    assert (first[0], second[0], gold[0]) == ("A girl is styling her hair.", "A girl is brushing her hair.", 2.5)
    assert gold.min() == 0 and gold.max() == 5 and all(first) and all(second)
    assert len(set(first) | set(second)) == 2552
    with pytest.raises(ValueError, match="validation"):
        data.sts_benchmark("validation")


def test_sts_spearman_equals_scipy_on_unnormalized_vectors():
    g = torch.Generator().manual_seed(0)
    first, second = torch.randn(60, 16, generator=g), torch.randn(60, 16, generator=g)
    gold = np.round(np.random.default_rng(0).uniform(0, 5, 60))  # ties, as in STS
    cosines = [float(x @ y / (x.norm() * y.norm())) for x, y in zip(first, second)]
    assert evaluate.sts_spearman(3 * first, second, gold) == pytest.approx(spearmanr(cosines, gold).statistic, abs=1e-12)


@pytest.fixture(scope="module")
def tables(pipeline):
    evaluate.main([str(pipeline), "--limit", str(LIMIT)])
    return json.loads((pipeline / "sts.json").read_text())


def test_every_model_of_the_run_is_scored_at_every_head(tables):
    models = tables["models"]
    assert list(models) == ["minilm (teacher)", "mpnet (teacher)", "target", "start",
                            "stage 1", "stage 2", "stage 3", "stage 4"]
    heads = {"minilm (teacher)": ["384"], "mpnet (teacher)": ["768"], "target": ["1152"], "start": ["384"],
             "stage 1": ["1152"], "stage 2": ["1152"], "stage 3": ["1152", "256", "128", "64"],
             "stage 4": ["1152", "256", "128", "64"]}
    assert {name: list(m["spearman"]) for name, m in models.items()} == heads
    assert {name: list(m["lee_pearson"]) for name, m in models.items()} == heads
    assert models["stage 4"]["spearman"] == models["stage 3"]["spearman"]  # stage 4 leaves the text side alone
    # the student's start is the published all-MiniLM-L6-v2, the first teacher here
    assert models["start"]["spearman"]["384"] == pytest.approx(models["minilm (teacher)"]["spearman"]["384"], abs=1e-6)
    assert all(-1 <= s <= 1 for m in models.values() for part in ("spearman", "lee_pearson")
               for s in m[part].values())
    assert all(m["texts_per_second"] > 0 for m in models.values())
    assert tables["pairs"] == LIMIT


def test_scores_equal_scipy_on_sentence_transformers_vectors(tables, pipeline):
    first, second, gold = (part[:LIMIT] for part in data.sts_benchmark("test"))
    models = tables["models"]
    minilm = SentenceTransformer(data.all_minilm_l6_v2())
    assert models["minilm (teacher)"]["spearman"]["384"] == pytest.approx(
        reference_spearman(minilm, first, second, gold), abs=1e-6)
    for width in (1152, 64):  # the saved folder as sentence-transformers loads it, FC1 and a swapped-in head
        student = evaluate.sentence_transformer(pipeline / "stage3", None if width == 1152 else width)
        assert models["stage 3"]["spearman"][str(width)] == pytest.approx(
            reference_spearman(student, first, second, gold), abs=1e-6)
    mpnet = SentenceTransformer(data.all_mpnet_base_v2())
    target = jasper.teacher_target(*(torch.from_numpy(m.encode(first + second)) for m in (minilm, mpnet)))
    cosines = (target[:LIMIT] * target[LIMIT:]).sum(-1).tolist()
    assert models["target"]["spearman"]["1152"] == pytest.approx(spearmanr(cosines, gold).statistic, abs=1e-6)


def test_instructions_are_scored_for_the_teachers_target_and_last_stage(tables):
    by_instruction = tables["instructions"]
    assert list(by_instruction) == list(evaluate.INSTRUCTIONS)
    assert tables["instruction_pairs"] == LIMIT // 8  # every 8th pair
    assert all(list(scores) == ["minilm (teacher)", "mpnet (teacher)", "target", "stage 3"]
               for scores in by_instruction.values())
    minilm = SentenceTransformer(data.all_minilm_l6_v2())
    first, second, gold = (part[:LIMIT][::8] for part in data.sts_benchmark("test"))
    prompt = evaluate.INSTRUCTIONS["paper's STS instruction"]
    assert by_instruction["paper's STS instruction"]["minilm (teacher)"]["384"] == pytest.approx(reference_spearman(
        minilm, [prompt + s for s in first], [prompt + s for s in second], gold), abs=1e-6)
    trained = by_instruction["trained: web search query"]
    assert trained["stage 3"]["1152"] != pytest.approx(by_instruction["none"]["stage 3"]["1152"], abs=1e-4)
    text = evaluate.markdown(tables)
    score = tables["models"]["stage 3"]["spearman"]["64"]
    assert f"{score * 100:.2f}" in text and "| paper's paraphrase of it |" in text


def test_lee_pearson_and_gap_closed_equal_plain_loops(tables):
    documents, ratings = evaluate.lee_documents()
    assert len(documents) == 50 and ratings.shape == (50, 50)
    minilm = SentenceTransformer(data.all_minilm_l6_v2())
    minilm.max_seq_length = 128  # the toy preset's length, where the run's teachers truncate
    vectors = minilm.encode(documents)
    cosines, rated = [], []
    for i in range(50):
        for j in range(i + 1, 50):
            cosines.append(float(vectors[i] @ vectors[j] / (np.linalg.norm(vectors[i]) * np.linalg.norm(vectors[j]))))
            rated.append(ratings[i, j])
    assert evaluate.lee_pearson(torch.from_numpy(vectors), ratings) == pytest.approx(
        pearsonr(cosines, rated).statistic, abs=1e-7)  # float32 cosines in the loop, float64 in lee_pearson
    assert tables["models"]["minilm (teacher)"]["lee_pearson"]["384"] == pytest.approx(
        pearsonr(cosines, rated).statistic, abs=1e-5)
    start, target = (tables["models"][name]["spearman"][w] for name, w in (("start", "384"), ("target", "1152")))
    score = tables["models"]["stage 3"]["spearman"]["256"]
    assert evaluate.gap_closed(score, start, target) == pytest.approx((score - start) / (target - start))
    assert f"{evaluate.gap_closed(score, start, target):+.0%}" in evaluate.markdown(tables)


def test_missing_head_and_unfinished_run_fail_clearly(pipeline, tmp_path):
    with pytest.raises(ValueError, match=r"no 512-d head; its heads are \[64, 128, 256, 1152\]"):
        evaluate.sentence_transformer(pipeline / "stage3", 512)
    with pytest.raises(FileNotFoundError, match="no finished stage"):
        evaluate.evaluate_run(tmp_path, "cpu")
    with pytest.raises(FileNotFoundError, match="is not a saved stage"):
        evaluate.sentence_transformer(pipeline)  # the run, not one of its stages


def test_mteb_scores_an_in_memory_task_as_we_do(pipeline, tmp_path):
    """mteb's documented custom task (an AbsTaskSTS whose load_data fills self.dataset) through run_mteb:
    its cosine Spearman for the 256-d head equals ours, and the result is saved in mteb's layout."""
    from datasets import Dataset, DatasetDict
    from mteb import TaskMetadata
    from mteb.abstasks.sts import AbsTaskSTS

    first, second, gold = (part[:LIMIT] for part in data.sts_benchmark("test"))

    class STSBenchmarkHead(AbsTaskSTS):
        metadata = TaskMetadata(
            name="STSBenchmarkHead", description="The first pairs of the STS Benchmark test split.",
            reference="https://aclanthology.org/S17-2001", dataset={"path": "local", "revision": "1"},
            type="STS", category="t2t", modalities=["text"], eval_splits=["test"], eval_langs=["eng-Latn"],
            main_score="cosine_spearman", date=("2017-01-01", "2017-12-31"), domains=["News"],
            task_subtypes=[], license="cc-by-sa-4.0", annotations_creators="human-annotated", dialect=[],
            sample_creation="found", bibtex_citation="")
        min_score, max_score = 0, 5

        def load_data(self, **kwargs):
            self.dataset = DatasetDict({"test": Dataset.from_dict(
                {"sentence1": first, "sentence2": second, "score": gold.tolist()})})
            self.data_loaded = True

    scores = evaluate.run_mteb(pipeline / "stage3", [STSBenchmarkHead()], tmp_path, width=256)
    ours = evaluate.sts_spearman(*(torch.from_numpy(evaluate.sentence_transformer(pipeline / "stage3", 256).encode(s))
                                   for s in (first, second)), gold)
    assert scores["STSBenchmarkHead"] == pytest.approx(ours, abs=1e-6)
    saved = list(tmp_path.rglob("STSBenchmarkHead.json"))
    assert len(saved) == 1 and f"{pipeline.name}__stage3-256d" in str(saved[0]) and math.isclose(
        json.loads(saved[0].read_text())["scores"]["test"][0]["cosine_spearman"], ours, abs_tol=1e-6)
