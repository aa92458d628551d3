"""evaluate.py: the STS Benchmark as published, its scores against plain references (scipy and pytrec_eval on
sentence-transformers' vectors), the tables of a trained run, and MTEB's own scoring of in-memory tasks agreeing
with ours, with and without the per-task instructions of the paper's benchmark."""

import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, spearmanr
from sentence_transformers import SentenceTransformer

import evaluate
import jasper
import metrics
import toy_data
from commands import InputError

LIMIT = 40  # STS pairs the run-level tests score


def reference_spearman(model, first, second, gold):
    """scipy's Spearman of the cosines of sentence-transformers' vectors, one pair at a time."""
    a, b = model.encode(first), model.encode(second)
    cosines = [float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y))) for x, y in zip(a, b)]
    return spearmanr(cosines, gold).statistic


def test_sts_benchmark_is_the_published_one():
    sizes = {split: len(toy_data.sts_benchmark(split)[2]) for split in ("train", "dev", "test")}
    assert sizes == {"train": 5749, "dev": 1500, "test": 1379}
    first, second, gold = toy_data.sts_benchmark("test")
    assert (first[0], second[0], gold[0]) == ("A girl is styling her hair.", "A girl is brushing her hair.", 2.5)
    assert gold.min() == 0 and gold.max() == 5 and all(first) and all(second)
    assert len(set(first) | set(second)) == 2552
    with pytest.raises(ValueError, match="validation"):
        toy_data.sts_benchmark("validation")


def test_sts_spearman_equals_scipy_on_unnormalized_vectors():
    g = torch.Generator().manual_seed(0)
    first, second = torch.randn(60, 16, generator=g), torch.randn(60, 16, generator=g)
    gold = np.round(np.random.default_rng(0).uniform(0, 5, 60))  # ties, as in STS
    cosines = [float(x @ y / (x.norm() * y.norm())) for x, y in zip(first, second)]
    expected = spearmanr(cosines, gold).statistic
    assert evaluate.sts_spearman(3 * first, second, gold) == pytest.approx(expected, abs=1e-12)


@pytest.fixture(scope="module")
def tables(pipeline):
    evaluate.main([str(pipeline), "--limit", str(LIMIT)])
    return json.loads((pipeline / "scores.json").read_text())


def test_every_model_of_the_run_is_scored_at_every_head(tables):
    models = tables["models"]
    heads = {"minilm (teacher)": ["384"], "mpnet (teacher)": ["768"], "target": ["1152"], "start": ["384"],
             "stage 1": ["1152"], "stage 2": ["1152"], "stage 3": ["1152", "256", "128", "64"]}
    assert list(models) == list(heads)  # stage 4 leaves the text side as stage 3 made it (test_train checks)
    for part in ("sts", "lee", "retrieval", "retrieval_prompted"):
        assert {name: list(m[part]) for name, m in models.items()} == heads
        assert all(-1 <= s <= 1 for m in models.values() for s in m[part].values())
    # the student's start is the published all-MiniLM-L6-v2, the first teacher here
    for part in ("sts", "lee", "retrieval"):
        assert models["start"][part]["384"] == pytest.approx(models["minilm (teacher)"][part]["384"], abs=1e-6)
    assert all(m["texts_per_second"] > 0 for m in models.values())
    assert tables["sts_pairs"] == LIMIT
    queries, passages, relevant = evaluate.retrieval_set("test", LIMIT)
    assert tables["retrieval"] == {"queries": LIMIT, "passages": len(passages)} and len(passages) == 3 * LIMIT
    every = toy_data.wikipedia_retrieval("test")
    assert queries == every[0][:LIMIT] and [passages[k] for k in relevant] == [every[1][k] for k in every[2][:LIMIT]]


def test_scores_equal_scipy_on_sentence_transformers_vectors(tables, pipeline):
    first, second, gold = (part[:LIMIT] for part in toy_data.sts_benchmark("test"))
    models = tables["models"]
    minilm = SentenceTransformer(toy_data.all_minilm_l6_v2())
    assert models["minilm (teacher)"]["sts"]["384"] == pytest.approx(
        reference_spearman(minilm, first, second, gold), abs=1e-6)
    for width in (1152, 64):  # the saved folder as sentence-transformers loads it, FC1 and a swapped-in head
        student = evaluate.sentence_transformer(pipeline / "stage3", None if width == 1152 else width)
        assert models["stage 3"]["sts"][str(width)] == pytest.approx(
            reference_spearman(student, first, second, gold), abs=1e-6)
    mpnet = SentenceTransformer(toy_data.all_mpnet_base_v2())
    target = jasper.teacher_target(*(torch.from_numpy(m.encode(first + second)) for m in (minilm, mpnet)))
    cosines = (target[:LIMIT] * target[LIMIT:]).sum(-1).tolist()
    assert models["target"]["sts"]["1152"] == pytest.approx(spearmanr(cosines, gold).statistic, abs=1e-6)


def trec_ndcg_at_10(query_vectors, passage_vectors, relevant):
    """pytrec_eval's ndcg_cut_10 (what mteb runs) over the full ranking of cosine scores."""
    import pytrec_eval
    scores = query_vectors @ passage_vectors.T / np.outer(np.linalg.norm(query_vectors, axis=1),
                                                          np.linalg.norm(passage_vectors, axis=1))
    qrels = {f"q{k}": {f"p{p}": 1} for k, p in enumerate(relevant)}
    run = {f"q{k}": {f"p{p}": float(v) for p, v in enumerate(row)} for k, row in enumerate(scores)}
    results = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10"}).evaluate(run)
    return float(np.mean([r["ndcg_cut_10"] for r in results.values()]))


def test_ndcg_at_10_equals_pytrec_eval():
    g = torch.Generator().manual_seed(0)
    queries, passages = torch.randn(40, 8, generator=g), torch.randn(60, 8, generator=g)
    relevant = np.random.default_rng(0).integers(0, 60, 40)
    queries[:10] = passages[relevant[:10]] + 0.1 * torch.randn(10, 8, generator=g)  # some found at rank 1
    ours = metrics.ndcg_at_10(queries, passages, relevant)
    assert ours == pytest.approx(trec_ndcg_at_10(queries.numpy(), passages.numpy(), relevant), abs=1e-12)
    assert 0.2 < ours < 0.6


def test_retrieval_scores_equal_pytrec_eval_on_sentence_transformers_vectors(tables, pipeline):
    """Queries as they are and with the model's own query prompt (sentence-transformers' prompt_name="query", the
    prompt the stage saved): the run's nDCG@10 equals pytrec_eval's on sentence-transformers' vectors."""
    queries, passages, relevant = evaluate.retrieval_set("test", LIMIT)
    minilm = SentenceTransformer(toy_data.all_minilm_l6_v2())
    minilm.max_seq_length = 128  # the toy's length, where the run's teachers truncate
    passage_vectors = minilm.encode(passages)
    assert tables["models"]["minilm (teacher)"]["retrieval"]["384"] == pytest.approx(
        trec_ndcg_at_10(minilm.encode(queries), passage_vectors, relevant), abs=1e-6)
    student = evaluate.sentence_transformer(pipeline / "stage3", 256)
    passage_vectors = student.encode(passages)
    for part, kwargs in (("retrieval", {}), ("retrieval_prompted", {"prompt_name": "query"})):
        assert tables["models"]["stage 3"][part]["256"] == pytest.approx(
            trec_ndcg_at_10(student.encode(queries, **kwargs), passage_vectors, relevant), abs=1e-6)


def test_instructions_are_scored_for_the_teachers_target_and_last_stage(tables, pipeline):
    by_instruction = tables["instructions"]
    assert list(by_instruction) == list(evaluate.INSTRUCTIONS)
    assert tables["instruction_pairs"] == LIMIT // 8  # every 8th pair
    assert all(list(scores) == ["minilm (teacher)", "mpnet (teacher)", "target", "stage 3"]
               for scores in by_instruction.values())
    first, second, gold = (part[:LIMIT][::8] for part in toy_data.sts_benchmark("test"))
    minilm = SentenceTransformer(toy_data.all_minilm_l6_v2())
    student = evaluate.sentence_transformer(pipeline / "stage3")
    for instruction in ("paper's STS instruction", "trained: web search query"):
        prompt = evaluate.INSTRUCTIONS[instruction]
        for name, model, width in (("minilm (teacher)", minilm, "384"), ("stage 3", student, "1152")):
            assert by_instruction[instruction][name][width] == pytest.approx(
                reference_spearman(model, [prompt + s for s in first], [prompt + s for s in second], gold), abs=1e-6)
    text = evaluate.markdown(tables)
    score = tables["models"]["stage 3"]["sts"]["64"]
    assert f"{score * 100:.2f}" in text and "| paper's paraphrase of it |" in text


def test_gap_closed_is_the_share_of_the_way_from_start_to_target():
    assert evaluate.gap_closed(82.83, 82.03, 83.63) == pytest.approx(0.5)  # half the way
    assert evaluate.gap_closed(83.63, 82.03, 83.63) == pytest.approx(1.0)
    assert evaluate.gap_closed(82.03, 82.03, 83.63) == 0
    assert evaluate.gap_closed(0.539, 0.571, 0.584) == pytest.approx(-32 / 13)  # below the start: negative


def test_lee_pearson_and_gap_closed_equal_plain_loops(tables):
    documents, ratings = evaluate.lee_documents()
    assert len(documents) == 50 and ratings.shape == (50, 50)
    minilm = SentenceTransformer(toy_data.all_minilm_l6_v2())
    minilm.max_seq_length = 128  # the toy preset's length, where the run's teachers truncate
    vectors = minilm.encode(documents)
    cosines, rated = [], []
    for i in range(50):
        for j in range(i + 1, 50):
            cosines.append(float(vectors[i] @ vectors[j] / (np.linalg.norm(vectors[i]) * np.linalg.norm(vectors[j]))))
            rated.append(ratings[i, j])
    assert evaluate.lee_pearson(torch.from_numpy(vectors), ratings) == pytest.approx(
        pearsonr(cosines, rated).statistic, abs=1e-7)  # float32 cosines in the loop, float64 in lee_pearson
    assert tables["models"]["minilm (teacher)"]["lee"]["384"] == pytest.approx(
        pearsonr(cosines, rated).statistic, abs=1e-5)
    models, gap = tables["models"], evaluate.gap_ends(tables)
    assert gap["retrieval"] == (models["start"]["retrieval"]["384"], models["target"]["retrieval_prompted"]["1152"])
    score = models["stage 3"]["retrieval_prompted"]["128"]
    assert f"{(score - gap['retrieval'][0]) / (gap['retrieval'][1] - gap['retrieval'][0]):+.0%}" in \
        evaluate.markdown(tables)


def test_missing_head_and_unfinished_run_fail_clearly(pipeline, tmp_path):
    with pytest.raises(ValueError, match=r"no 512-d head; its heads are \[64, 128, 256, 1152\]"):
        evaluate.sentence_transformer(pipeline / "stage3", 512)
    with pytest.raises(FileNotFoundError, match="no finished stage 1-3"):
        evaluate.evaluate_run(tmp_path, "cpu")
    with pytest.raises(FileNotFoundError, match="is not a saved stage"):
        evaluate.sentence_transformer(pipeline)  # the run, not one of its stages


@pytest.mark.parametrize("name,instructions", [("STSBenchmarkHead", False), ("STSBenchmark", True)])
def test_mteb_scores_an_in_memory_task_as_we_do(pipeline, tmp_path, name, instructions):
    """mteb's documented custom task (an AbsTaskSTS whose load_data fills self.dataset) through run_mteb: its cosine
    Spearman for the 256-d head equals ours, and the result is saved in mteb's layout. Named like the benchmark's
    STSBenchmark and with instructions, every sentence gets that task's instruction, as our score with it says."""
    from datasets import Dataset, DatasetDict
    from mteb import TaskMetadata
    from mteb.abstasks.sts import AbsTaskSTS

    first, second, gold = (part[:LIMIT] for part in toy_data.sts_benchmark("test"))

    class LocalSTS(AbsTaskSTS):
        metadata = TaskMetadata(
            name=name, description="The first pairs of the STS Benchmark test split.",
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

    scores = evaluate.run_mteb(pipeline / "stage3", [LocalSTS()], tmp_path, width=256, instructions=instructions)
    prompt = "Instruct: Retrieve semantically similar text.\nQuery: " if instructions else ""
    student = evaluate.sentence_transformer(pipeline / "stage3", 256)
    ours = evaluate.sts_spearman(*(torch.from_numpy(student.encode([prompt + t for t in s])) for s in (first, second)),
                                 gold)
    assert scores[name] == pytest.approx(ours, abs=1e-6)
    saved = list(tmp_path.rglob(f"{name}.json"))
    assert len(saved) == 1 and f"{pipeline.name}__stage3-256d" in str(saved[0]) and math.isclose(
        json.loads(saved[0].read_text())["scores"]["test"][0]["cosine_spearman"], ours, abs_tol=1e-6)


def test_the_papers_benchmark_by_name_with_an_instruction_per_task():
    """MTEB(eng, v1), the paper's 56 tasks (offline: mteb defines them in code), each with the instruction of the
    paper's Table 2 in the authors' format: before the queries of retrieval and reranking tasks, before every text
    of the others. mteb accepts every key."""
    from mteb.models.abs_encoder import AbsEncoder
    tasks = evaluate.mteb_tasks([evaluate.PAPER_BENCHMARK])
    assert len(tasks) == 56
    prompts = evaluate.task_prompts(tasks)
    assert len(prompts) == 55 + 12  # CQADupstackRetrieval runs as its 12 forums
    table2 = {"ArguAna-query": "Given a claim, find documents that refute the claim",
              "SciFact-query": "Given a scientific claim, retrieve documents that support or refute the claim",
              "STSBenchmark": "Retrieve semantically similar text.",
              "SummEval": "Given a news summary, retrieve other semantically similar summaries.",
              "Banking77Classification": "Given a online banking query, find the corresponding intents",
              "AskUbuntuDupQuestions-query": "Retrieve duplicate questions from AskUbuntu forum",
              "SprintDuplicateQuestions": "Retrieve duplicate questions from Sprint forum",
              "CQADupstackUnixRetrieval-query": evaluate.CQADUPSTACK_INSTRUCTION,
              "BiorxivClusteringS2S": "Identify the main category of Biorxiv papers based on the titles"}
    for key, instruction in table2.items():
        assert prompts[key] == f"Instruct: {instruction}\nQuery: "
    assert "ArguAna" not in prompts and "ArguAna-document" not in prompts  # documents go in as they are
    assert AbsEncoder.validate_task_to_prompt_name(prompts) == prompts
    with pytest.raises(InputError, match="neither an MTEB task nor a benchmark"):
        evaluate.mteb_tasks(["MTEB(eng, v9)"])


# ----------------------------------------------------------------------------- the metrics (metrics.py)

def test_spearman_equals_a_loop_with_and_without_ties():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(50, generator=g, dtype=torch.float64)
    b = a + torch.randn(50, generator=g, dtype=torch.float64)
    gold = torch.randint(0, 6, (50,), generator=g).double()  # STS-like scores 0-5: many ties

    def ranks(x):  # 1 + values below + half the other equal values
        x = x.tolist()
        return [1 + sum(y < v for y in x) + (sum(y == v for y in x) - 1) / 2 for v in x]

    def pearson(x, y):
        mx, my = sum(x) / len(x), sum(y) / len(y)
        cov = sum((p - mx) * (q - my) for p, q in zip(x, y))
        return cov / (sum((p - mx) ** 2 for p in x) * sum((q - my) ** 2 for q in y)) ** 0.5

    n = len(a)  # without ties: rho = 1 - 6 sum d^2 / (n (n^2 - 1))
    rho = 1 - 6 * sum((ra - rb) ** 2 for ra, rb in zip(ranks(a), ranks(b))) / (n * (n * n - 1))
    assert metrics.spearman(a, b) == pytest.approx(rho, abs=1e-12)
    assert metrics.spearman(a, -a) == pytest.approx(-1.0)
    assert metrics.average_ranks(torch.tensor([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]
    assert metrics.spearman(a, gold) == pytest.approx(pearson(ranks(a), ranks(gold)), abs=1e-12)


def test_recall_at_1_equals_a_loop_and_counts_equal_captions_alike():
    captions = ["a", "b", "a", "c", "d"]
    sim = torch.tensor([[0.1, 0.0, 0.9, 0.0, 0.0],   # image 0 -> caption 2, also "a": a hit
                        [0.0, 0.2, 0.0, 0.9, 0.0],   # image 1 -> caption 3 ("c"): a miss
                        [0.5, 0.0, 0.4, 0.0, 0.0],   # image 2 -> caption 0, also "a": a hit
                        [0.0, 0.0, 0.0, 0.7, 0.0],
                        [0.0, 0.8, 0.0, 0.0, 0.3]])  # image 4 -> caption 1 ("b"): a miss
    i2c = sum(captions[int(sim[i].argmax())] == captions[i] for i in range(5)) / 5
    c2i = sum(captions[int(sim[:, j].argmax())] == captions[j] for j in range(5)) / 5
    chance = sum(a == b for a in captions for b in captions) / 25
    assert metrics.recall_at_1(sim, captions) == pytest.approx((i2c, c2i, chance))
    assert (i2c, c2i, chance) == (0.6, 0.6, 7 / 25)
