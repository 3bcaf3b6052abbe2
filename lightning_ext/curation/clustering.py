"""Spherical k-means and distances to centroids, shared by SemDeDup, SSP prototypicality, DBP and DP4TL-FM."""

from __future__ import annotations

import numpy as np

from lightning_ext.curation.embeddings import l2_normalize

__all__ = ["spherical_kmeans", "cosine_distance_to_centroid"]


def spherical_kmeans(emb: np.ndarray, k: int, seed: int = 0, iters: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """Cosine k-means (the faiss ``spherical=True`` variant the SemDeDup/DBP code uses), k-means++ seeded.

    Args:
        emb: ``(N, D)`` embeddings (normalised here).
        k: number of clusters (at most N).
        seed: seed of the k-means++ initialisation.
        iters: maximum Lloyd iterations.

    Returns:
        ``(assign, centroids)``: cluster id per row and ``(k, D)`` unit-norm centroids. Empty clusters are
        re-seeded with the points farthest from their centroids, so every cluster has members.

    Example:
        >>> emb = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]], dtype=np.float32)
        >>> assign, _ = spherical_kmeans(emb, 2)
        >>> bool(assign[0] == assign[1] != assign[2] == assign[3])
        True
    """
    from sklearn.cluster import kmeans_plusplus

    n = len(emb)
    if not 1 <= k <= n:
        raise ValueError(f"Cannot make {k} clusters of {n} samples: `num_clusters` must be in [1, {n}].")
    x = l2_normalize(np.asarray(emb, dtype=np.float32))
    centroids, _ = kmeans_plusplus(x, k, random_state=seed)
    centroids = l2_normalize(centroids)
    assign = np.full(n, -1)
    for _ in range(iters):
        sims = x @ centroids.T
        new = sims.argmax(1)
        counts = np.bincount(new, minlength=k)
        empty = np.flatnonzero(counts == 0)
        if len(empty):
            far = np.argsort(sims[np.arange(n), new])[: len(empty)]
            new[far] = empty
        if np.array_equal(new, assign):
            break
        assign = new
        sums = np.zeros_like(centroids)
        np.add.at(sums, assign, x)
        centroids = l2_normalize(sums)
    return assign, centroids


def cosine_distance_to_centroid(emb: np.ndarray, assign: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """``1 - cos(e_i, c_{assign_i})`` per row."""
    return 1.0 - np.einsum("nd,nd->n", l2_normalize(emb), centroids[assign])
