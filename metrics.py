"""The scores that training's held-out checks and evaluate.py share: rank correlation with ties, nDCG@10 with one
relevant passage per query, and recall@1 between images and captions. Pure functions of tensors."""

import numpy as np
import torch
import torch.nn.functional as F


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks of a 1-d tensor; equal values share the mean of the ranks they span."""
    values, order = x.sort()
    _, group, counts = torch.unique_consecutive(values, return_inverse=True, return_counts=True)
    last = counts.cumsum(0).double()  # the rank of each group's last member
    ranks = torch.empty(len(x), dtype=torch.float64, device=x.device)
    ranks[order] = (last - (counts - 1) / 2)[group]
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation of two 1-d score vectors: Pearson's r of their average ranks (STS gold scores tie
    often, so ties must share their ranks)."""
    return float(torch.corrcoef(torch.stack([average_ranks(a), average_ranks(b)]))[0, 1])


def ndcg_at_10(queries: torch.Tensor, passages: torch.Tensor, relevant: np.ndarray) -> float:
    """MTEB's main retrieval score where each query has one relevant passage: the mean over the queries of
    1 / log2(1 + r), r the rank of the query's relevant passage by cosine, when r <= 10, else 0 (the ideal DCG is 1).
    queries: (q, d), passages: (p, d), relevant: (q,) passage indices. A tie counts in the relevant passage's favour."""
    sims = F.normalize(queries.double(), dim=-1) @ F.normalize(passages.double(), dim=-1).T  # (q, p)
    own = sims[torch.arange(len(relevant)), torch.from_numpy(relevant)]
    rank = (sims > own[:, None]).sum(dim=1) + 1  # (q,) 1-based
    return float(torch.where(rank <= 10, 1 / torch.log2(rank.double() + 1), 0.0).mean())


def recall_at_1(sim: torch.Tensor, captions: list[str]) -> tuple[float, float, float]:
    """sim: (n images, n captions), pair i = (image i, caption i). Returns the share of images whose most
    similar caption is their own caption text, the share of captions whose most similar image carries
    that caption text, and the expected share for a uniformly random pick (equal texts count alike)."""
    names = np.array(captions)
    same = torch.from_numpy(names[:, None] == names[None, :])  # (n, n): caption j's text is caption i's
    rows = torch.arange(len(names))
    return (float(same[rows, sim.argmax(1)].float().mean()), float(same[sim.argmax(0), rows].float().mean()),
            float(same.float().mean()))
