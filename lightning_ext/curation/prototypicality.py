"""Self-supervised prototypicality (SSP) pruning from Sorscher et al., "Beyond neural scaling laws: beating
power law scaling via data pruning" (NeurIPS 2022, arXiv 2206.14486)."""

from __future__ import annotations

from typing import Optional

import numpy as np

from lightning_ext.core.validation import NonNegativeInt, PositiveInt, check_positive_int
from lightning_ext.curation.base import Scorer, Scores, ScoringData, Which, check_seed, check_which, prefer
from lightning_ext.curation.clustering import cosine_distance_to_centroid, spherical_kmeans
from lightning_ext.curation.embeddings import Embedder

__all__ = ["SelfSupervisedPrototypes"]


class SelfSupervisedPrototypes(Scorer):
    """SSP pruning (Sorscher et al., NeurIPS 2022): k-means on (self-supervised) embeddings with k about the
    number of classes; a sample's difficulty is its cosine distance to the nearest centroid (prototype).

    The paper keeps the **hardest** (least prototypical) samples when data is abundant and the **easiest**
    when it is scarce; the label-free metric needs no trained classifier. Reference code: the SSP metric is
    also in facebookresearch/SemDeDup's DBP code (``cls_bal_ratio``).

    Args:
        embedder: where embeddings come from (ideally a self-supervised encoder; default: the pixels).
        num_clusters: k (default 10; use about the number of classes).
        which: ``"hard"`` (farthest from the prototype kept), ``"easy"`` (nearest) or ``"random"``.
        seed: k-means (and ``"random"``) seed.

    Example:
        >>> import torch
        >>> data = ScoringData.from_tensors(torch.randn(30, 1, 4, 4), torch.arange(30) % 3)
        >>> s = SelfSupervisedPrototypes(Embedder(progress=False), num_clusters=3)
        >>> len(s.select(s.score(data), data, 10))
        10
    """

    def __init__(self, embedder: Optional[Embedder] = None, num_clusters: PositiveInt = 10, which: Which = "hard",
                 seed: NonNegativeInt = 0) -> None:
        check_positive_int("num_clusters", num_clusters)
        check_which(which)
        check_seed(seed)
        self.embedder = embedder if embedder is not None else Embedder()
        self.num_clusters, self.which, self.seed = num_clusters, which, seed

    def score_embeddings(self, emb: np.ndarray) -> Scores:
        """The scores from precomputed embeddings."""
        assign, centroids = spherical_kmeans(emb, min(self.num_clusters, len(emb)), seed=self.seed)
        dist = cosine_distance_to_centroid(emb, assign, centroids).astype(np.float64)
        return {"score": prefer(dist, self.which, self.seed), "distance": dist, "cluster": assign}

    def score(self, data: ScoringData) -> Scores:
        return self.score_embeddings(self.embedder.embed(data))
