"""Random selection: the control every data-filtering method must beat."""

from __future__ import annotations

import numpy as np

from lightning_ext.core.validation import NonNegativeInt
from lightning_ext.curation.base import Scorer, Scores, ScoringData, check_seed

__all__ = ["RandomScorer"]


class RandomScorer(Scorer):
    """A seeded uniformly random score per sample, so top-k is a uniformly random subset.

    Args:
        seed: seed of the scores (the same seed gives the same subset for any pool of the same size).

    Example:
        >>> import torch
        >>> data = ScoringData.from_tensors(torch.zeros(10, 2), torch.arange(10) % 2)
        >>> s = RandomScorer(seed=0)
        >>> len(s.select(s.score(data), data, 4, class_balanced=True))
        4
    """

    def __init__(self, seed: NonNegativeInt = 0) -> None:
        self.seed = check_seed(seed)

    def score(self, data: ScoringData) -> Scores:
        return {"score": np.random.default_rng(self.seed).random(len(data))}
