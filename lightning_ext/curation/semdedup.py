"""SemDeDup (Abbas, Tirumala, Simig, Ganguli and Morcos, arXiv 2303.09540): semantic near-duplicate removal."""

from __future__ import annotations

from typing import Optional

import numpy as np

from lightning_ext.core.validation import NonNegativeInt, OpenUnitInterval, PositiveInt, check_fraction, check_positive_int
from lightning_ext.curation.base import Scorer, Scores, ScoringData, Which, check_seed, check_which
from lightning_ext.curation.clustering import cosine_distance_to_centroid, spherical_kmeans
from lightning_ext.curation.embeddings import Embedder, l2_normalize

__all__ = ["SemDeDup", "semdedup_max_similarity"]


def semdedup_max_similarity(emb: np.ndarray, assign: np.ndarray, centroids: np.ndarray, which: Which = "hard",
                            seed: int = 0) -> np.ndarray:
    """For each sample, the largest cosine similarity to a sample *earlier* in its cluster's order.

    Within a cluster, samples are ordered by distance to the centroid: farthest first (``"hard"``, the
    official default), nearest first (``"easy"``) or at random (``"random"``). A sample is a duplicate at
    threshold ``eps`` when this value exceeds ``1 - eps``; the first of a group of near-duplicates (in that
    order) has a lower value and survives. The first sample of each cluster gets ``-1``.

    Example:
        >>> emb = np.array([[1.0, 0.0], [1.0, 0.001], [0.0, 1.0]])
        >>> assign, centroids = np.zeros(3, dtype=int), np.array([[0.7071, 0.7071]])
        >>> m = semdedup_max_similarity(emb, assign, centroids)
        >>> int((m > 0.99).sum())  # one of the two near-identical rows is a duplicate
        1
    """
    check_which(which)
    x = l2_normalize(np.asarray(emb, dtype=np.float32))
    dist = cosine_distance_to_centroid(x, assign, centroids)
    rng = np.random.default_rng(seed)
    out = np.full(len(x), -1.0, dtype=np.float32)
    for c in np.unique(assign):
        members = np.flatnonzero(assign == c)
        if which == "hard":
            members = members[np.argsort(-dist[members], kind="stable")]
        elif which == "easy":
            members = members[np.argsort(dist[members], kind="stable")]
        else:
            members = rng.permutation(members)
        e = x[members]
        for start in range(1, len(members), 2048):  # rows j in [start, stop), compared with every earlier row
            stop = min(start + 2048, len(members))
            mask = np.arange(stop)[None, :] >= np.arange(start, stop)[:, None]  # not earlier: j' >= j
            sims = np.where(mask, -np.inf, e[start:stop] @ e[:stop].T)
            out[members[start:stop]] = sims.max(1)
    return out


class SemDeDup(Scorer):
    """SemDeDup (Abbas et al., 2023, arXiv 2303.09540; github.com/facebookresearch/SemDeDup): spherical
    k-means on embeddings, then within each cluster remove every sample whose cosine similarity to an
    earlier-kept sample in the cluster's order exceeds ``1 - eps``.

    The score is ``1 - M_j`` (``M_j``: the max similarity to an earlier sample in the cluster, see
    :func:`semdedup_max_similarity`), so keeping the top-k is the same as choosing the ``eps`` that leaves k
    samples; with ``eps`` set, duplicates get ``-inf`` and ``keep=None`` removes exactly them.

    Args:
        embedder: where embeddings come from (default: the L2-normalised pixels).
        num_clusters: k of the k-means (the paper: 50,000 on LAION-440M; about N / 100 to N / 1000 works).
        eps: duplicate threshold; ``None`` leaves the cut to the kept budget.
        which: which member of a duplicate group is kept: ``"hard"`` (farthest from the centroid, default of
            the official code), ``"easy"`` (nearest) or ``"random"``.
        seed: k-means and ``"random"`` order seed.

    Example:
        >>> import torch
        >>> x = torch.randn(20, 1, 4, 4)
        >>> x = torch.cat([x, x + 1e-4])  # every image twice
        >>> data = ScoringData.from_tensors(x, torch.zeros(40, dtype=torch.long))
        >>> s = SemDeDup(Embedder(progress=False), num_clusters=2, eps=0.01)
        >>> len(s.select(s.score(data), data, None))
        20
    """

    def __init__(self, embedder: Optional[Embedder] = None, num_clusters: PositiveInt = 50,
                 eps: Optional[OpenUnitInterval] = None, which: Which = "hard", seed: NonNegativeInt = 0) -> None:
        check_positive_int("num_clusters", num_clusters)
        if eps is not None:
            check_fraction("eps", eps, allow_zero=False, allow_one=False)
        check_which(which)
        check_seed(seed)
        self.embedder = embedder if embedder is not None else Embedder()
        self.num_clusters, self.eps, self.which, self.seed = num_clusters, eps, which, seed

    def score_embeddings(self, emb: np.ndarray) -> Scores:
        """The scores from precomputed embeddings."""
        assign, centroids = spherical_kmeans(emb, min(self.num_clusters, len(emb)), seed=self.seed)
        m = semdedup_max_similarity(emb, assign, centroids, self.which, self.seed)
        score = (1.0 - m).astype(np.float64)
        if self.eps is not None:
            score[m > 1 - self.eps] = -np.inf
        return {"score": score, "max_similarity": m, "cluster": assign}

    def score(self, data: ScoringData) -> Scores:
        return self.score_embeddings(self.embedder.embed(data))
