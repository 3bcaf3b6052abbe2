"""Density-Based Pruning (Abbas, Rusak, Tirumala, Brendel, Chaudhuri and Morcos, "Effective pruning of
web-scale datasets based on complexity of concept clusters", ICLR 2024, arXiv 2401.04578)."""

from __future__ import annotations

from typing import Optional

import numpy as np

from lightning_ext.core.validation import (
    ClosedUnitInterval, NonNegativeInt, OpenUnitInterval, PositiveFloat, PositiveInt, check_fraction, check_positive,
    check_positive_int,
)
from lightning_ext.curation.base import Scorer, Scores, ScoringData, Which, check_seed, check_which, prefer
from lightning_ext.curation.clustering import cosine_distance_to_centroid, spherical_kmeans
from lightning_ext.curation.embeddings import Embedder, l2_normalize
from lightning_ext.curation.semdedup import semdedup_max_similarity

__all__ = ["DensityBasedPruning", "cluster_complexity", "cluster_quotas"]


def cluster_complexity(emb: np.ndarray, assign: np.ndarray, centroids: np.ndarray, num_neighbors: int = 20
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """DBP's concept-cluster complexity ``C_j = d_inter(j) * d_intra(j)``.

    ``d_intra(j)``: mean cosine distance of cluster j's members to its centroid; ``d_inter(j)``: mean cosine
    distance from centroid j to its ``num_neighbors`` nearest other centroids. Clusters of 1-2 members
    (undefined spread) get the mean complexity, as in the official ``prune.py``.

    Returns:
        ``(complexity, d_intra, d_inter)``, each of length k.
    """
    k = len(centroids)
    dist = cosine_distance_to_centroid(emb, assign, centroids)
    sizes = np.bincount(assign, minlength=k)
    d_intra = np.bincount(assign, weights=dist, minlength=k) / np.maximum(sizes, 1)
    if k > 1:
        cdist = 1.0 - centroids @ centroids.T
        np.fill_diagonal(cdist, np.inf)
        nn_ = min(num_neighbors, k - 1)
        d_inter = np.sort(cdist, axis=1)[:, :nn_].mean(1)
    else:
        d_inter = np.ones(1)
    complexity = d_inter * d_intra
    small = sizes <= 2
    if small.any() and (~small).any():
        complexity[small] = complexity[~small].mean()
    return complexity, d_intra, d_inter


def cluster_quotas(n_keep: int, p: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """Integer per-cluster quotas: ``argmin ||x - n_keep * p||^2`` s.t. ``sum(x) = n_keep``,
    ``lower <= x <= upper``, then integer rounding (largest remainders).

    The continuous solution of this box-constrained projection is ``x_j = clip(n_keep * p_j - lam, lower_j,
    upper_j)`` for the shift ``lam`` that makes the sum right (water-filling); ``lam`` is found by bisection,
    so no QP solver is needed (the official code calls OSQP through ``qpsolvers``).

    Example:
        >>> cluster_quotas(10, np.array([0.5, 0.3, 0.2]), np.zeros(3), np.array([3, 100, 100])).tolist()
        [3, 4, 3]
    """
    p, lower, upper = (np.asarray(a, dtype=np.float64) for a in (p, lower, upper))
    if np.any(lower > upper):
        raise ValueError("Every lower bound must be <= its upper bound.")
    if not lower.sum() <= n_keep <= upper.sum():
        raise ValueError(f"Cannot keep {n_keep} samples: the bounds allow between {int(lower.sum())} and "
                         f"{int(upper.sum())}.")
    target = n_keep * p
    lo, hi = target.min() - upper.max() - 1, target.max() + 1

    def total(lam: float) -> float:
        return np.clip(target - lam, lower, upper).sum()

    for _ in range(200):
        mid = (lo + hi) / 2
        if total(mid) > n_keep:
            lo = mid
        else:
            hi = mid
    x = np.clip(target - (lo + hi) / 2, lower, upper)
    base = np.floor(x + 1e-9).astype(np.int64)
    room = base < upper
    short = int(n_keep - base.sum())
    order = np.argsort(-(x - base) - 2.0 * room, kind="stable")  # largest remainders among clusters with room
    for j in order:
        if short <= 0:
            break
        if base[j] < upper[j]:
            base[j] += 1
            short -= 1
    while short < 0:  # numerical overshoot: take back from the largest non-bound entries
        j = int(np.argmax(np.where(base > lower, base - x, -np.inf)))
        base[j] -= 1
        short += 1
    return base


class DensityBasedPruning(Scorer):
    """Density-Based Pruning (Abbas et al., ICLR 2024, arXiv 2401.04578; code in facebookresearch/SemDeDup's
    DBP branch: ``prune.py``): deduplicate, cluster the embeddings into concepts, give each cluster a share
    of the budget that grows with its complexity, and keep the hardest samples of each cluster.

    Steps: (1) SemDeDup with ``dedup_eps`` (the paper calls deduplication first "crucial"); (2) spherical
    k-means with ``num_clusters``; (3) complexity ``C_j = d_inter * d_intra`` (:func:`cluster_complexity`);
    (4) target shares ``p = softmax(C / temperature)``; (5) quotas from the bounded least-squares problem
    (:func:`cluster_quotas`) with lower bound ``min(min_samples, |c_j| - 1)``, ``min_samples =
    max(1, cls_bal_ratio * n_keep / k)``, upper bound ``|c_j|``; (6) within each cluster keep the ``x_j``
    farthest from the centroid (``which="hard"``, the code's default), nearest (``"easy"``) or random.

    Args:
        embedder: where embeddings come from (the paper: distilled DINOv2-L/14; default: the pixels).
        num_clusters: k (the paper: 500 on LAION-DeDup-280M, 100 on DataComp-medium).
        temperature: softmax temperature tau (``prune.py`` default 0.5).
        num_neighbors: centroids averaged in ``d_inter`` (``num_NNs=20``).
        dedup_eps: SemDeDup threshold applied first (``None`` skips deduplication).
        dedup_clusters: k of the deduplication clustering (default ``num_clusters``).
        which: ``"hard"``, ``"easy"`` or ``"random"`` samples kept within each cluster.
        cls_bal_ratio: share of the budget spread evenly over clusters as lower bounds.
        seed: k-means (and ``"random"``) seed.

    Example:
        >>> import torch
        >>> data = ScoringData.from_tensors(torch.randn(60, 1, 4, 4), torch.arange(60) % 3)
        >>> s = DensityBasedPruning(Embedder(progress=False), num_clusters=4, dedup_eps=None)
        >>> len(s.select(s.score(data), data, 20))
        20
    """

    supports_class_balance = False

    def __init__(self, embedder: Optional[Embedder] = None, num_clusters: PositiveInt = 100,
                 temperature: PositiveFloat = 0.5, num_neighbors: PositiveInt = 20,
                 dedup_eps: Optional[OpenUnitInterval] = 0.05, dedup_clusters: Optional[PositiveInt] = None,
                 which: Which = "hard", cls_bal_ratio: ClosedUnitInterval = 0.0, seed: NonNegativeInt = 0) -> None:
        check_positive_int("num_clusters", num_clusters)
        check_positive("temperature", temperature)
        check_positive_int("num_neighbors", num_neighbors)
        if dedup_eps is not None:
            check_fraction("dedup_eps", dedup_eps, allow_zero=False, allow_one=False)
        if dedup_clusters is not None:
            check_positive_int("dedup_clusters", dedup_clusters)
        check_which(which)
        check_fraction("cls_bal_ratio", cls_bal_ratio)
        check_seed(seed)
        self.embedder = embedder if embedder is not None else Embedder()
        self.num_clusters, self.temperature, self.num_neighbors = num_clusters, temperature, num_neighbors
        self.dedup_eps, self.dedup_clusters, self.which = dedup_eps, dedup_clusters, which
        self.cls_bal_ratio, self.seed = cls_bal_ratio, seed

    def score_embeddings(self, emb: np.ndarray) -> Scores:
        """Deduplication, clusters and complexities from precomputed embeddings."""
        emb = l2_normalize(np.asarray(emb, dtype=np.float32))
        n = len(emb)
        valid = np.ones(n, dtype=bool)
        if self.dedup_eps is not None:
            k0 = min(self.dedup_clusters or self.num_clusters, n)
            a0, c0 = spherical_kmeans(emb, k0, seed=self.seed)
            valid = semdedup_max_similarity(emb, a0, c0, "hard", self.seed) <= 1 - self.dedup_eps
        idx = np.flatnonzero(valid)
        k = min(self.num_clusters, len(idx))
        assign_v, centroids = spherical_kmeans(emb[idx], k, seed=self.seed)
        complexity, d_intra, d_inter = cluster_complexity(emb[idx], assign_v, centroids, self.num_neighbors)
        assign = np.full(n, -1)
        assign[idx] = assign_v
        dist = np.full(n, np.nan)
        dist[idx] = cosine_distance_to_centroid(emb[idx], assign_v, centroids)
        score = prefer(dist, self.which, self.seed)
        score[~valid] = -np.inf
        return {"score": score, "cluster": assign, "distance": dist, "complexity": complexity,
                "d_intra": d_intra, "d_inter": d_inter}

    def score(self, data: ScoringData) -> Scores:
        return self.score_embeddings(self.embedder.embed(data))

    def quotas(self, scores: Scores, n_keep: int) -> np.ndarray:
        """Samples kept per cluster for a budget of ``n_keep``."""
        assign, c = scores["cluster"], np.asarray(scores["complexity"], dtype=np.float64)
        k = len(c)
        sizes = np.bincount(assign[assign >= 0], minlength=k)
        z = c / self.temperature
        p = np.exp(z - z.max())
        p /= p.sum()
        min_samples = max(1.0, self.cls_bal_ratio * n_keep / k)
        lower = np.minimum(np.floor(min_samples), np.maximum(sizes - 1, 0))
        if lower.sum() > n_keep:
            lower = np.zeros(k)
        return cluster_quotas(n_keep, p, lower, sizes)

    def select(self, scores: Scores, data: ScoringData, n_keep: Optional[int], class_balanced: bool = False) -> np.ndarray:
        if class_balanced:
            raise ValueError("DensityBasedPruning balances concept clusters, not classes: use class_balanced=False.")
        assign, score = scores["cluster"], scores["score"]
        valid = assign >= 0
        if n_keep is None:
            return np.flatnonzero(valid)
        if n_keep > valid.sum():
            raise ValueError(f"Cannot keep {n_keep} samples: only {int(valid.sum())} survive deduplication "
                             f"(dedup_eps={self.dedup_eps}); lower `keep` or raise/disable `dedup_eps`.")
        x = self.quotas(scores, n_keep)
        kept = []
        for j, q in enumerate(x):
            members = np.flatnonzero(assign == j)
            kept.append(members[np.argsort(-score[members], kind="stable")[: int(q)]])
        return np.sort(np.concatenate(kept))
