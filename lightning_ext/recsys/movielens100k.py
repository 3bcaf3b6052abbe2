"""MovieLens-100K as implicit feedback, from the copy the ``recbole`` package ships (no download)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, get_args

import numpy as np

from lightning_ext.core.validation import OpenUnitInterval, check_choice, check_number
from lightning_ext.data.movielens100k import find_ml100k_inter, read_inter_file  # noqa: F401 - re-exported
from lightning_ext.recsys.interactions import InteractionDataModule, per_user_split

#: how each user's positives are split into train and test
Split = Literal["random", "temporal"]


class MovieLens100KDataModule(InteractionDataModule):
    """MovieLens-100K, implicit: rating >= ``min_rating`` is a positive; per-user 80/20 split (random or temporal).

    Protocol (also in :attr:`name`): the 100,000 ratings of 943 users on 1,682 movies (from recbole's
    ``ml-100k.inter``). A (user, movie) pair is a positive when its rating is at least ``min_rating`` (default 4,
    the common "liked" rule; ``min_rating=1`` keeps every rating); lower ratings are dropped, not negatives.
    Then each user's positives are split ``test_fraction`` to test per user: a seeded random draw
    (``split="random"``, NGCF/LightGCN style) or the latest by timestamp (``split="temporal"``). Users and
    items keep their original ids minus one, so every user and movie has a row even without positives.
    Validation is carved per user out of the training part.

    Args:
        min_rating: smallest rating counted as a positive (1..5).
        test_fraction: share of each user's positives held out for test.
        split: ``"random"`` or ``"temporal"``.
        path: the ``.inter`` file (default: found inside the recbole package).
        **kwargs: :class:`~lightning_ext.recsys.interactions.InteractionDataModule` arguments.

    Example:
        >>> dm = MovieLens100KDataModule(val_fraction=0.1)  # doctest: +SKIP
        >>> dm.setup(); dm.interactions.stats()  # doctest: +SKIP
    """

    NUM_USERS, NUM_ITEMS = 943, 1682

    def __init__(self, min_rating: Literal[1, 2, 3, 4, 5] = 4, test_fraction: OpenUnitInterval = 0.2,
                 split: Split = "random", path: Optional[str] = None, **kwargs) -> None:
        super().__init__(**kwargs)
        check_number("min_rating (a star rating)", min_rating, low=1, high=5, integer=True)
        check_number("test_fraction", test_fraction, low=0, high=1, low_open=True, high_open=True)
        check_choice("split", split, get_args(Split))
        self.min_rating, self.test_fraction, self.split = min_rating, test_fraction, split
        self.path = Path(path) if path else find_ml100k_inter()
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path} does not exist; pass the path of recbole's `ml-100k.inter` file.")
        self.protocol = (f"ml-100k (implicit: rating >= {min_rating}; per-user {split} "
                         f"{1 - test_fraction:.0%}/{test_fraction:.0%} train/test, split_seed={self.split_seed})")

    def load_splits(self):
        raw = read_inter_file(self.path, self.NUM_USERS, self.NUM_ITEMS)  # user_id, item_id, rating, timestamp
        raw = raw[raw[:, 2] >= self.min_rating]
        pairs = raw[:, :2].astype(np.int64) - 1
        if self.split == "random":
            train, test = per_user_split(pairs, self.test_fraction, self.split_seed)
        else:
            train, test = _temporal_split(pairs, raw[:, 3], self.test_fraction)
        return train, test, self.NUM_USERS, self.NUM_ITEMS






def _temporal_split(pairs: np.ndarray, time: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    order = np.lexsort((-time, pairs[:, 0]))  # by user, newest first
    pairs = pairs[order]
    _, starts, counts = np.unique(pairs[:, 0], return_index=True, return_counts=True)
    n_held = np.minimum(np.round(fraction * counts).astype(np.int64), counts - 1)
    rank = np.arange(len(pairs)) - np.repeat(starts, counts)
    held = rank < np.repeat(n_held, counts)
    return pairs[~held], pairs[held]
