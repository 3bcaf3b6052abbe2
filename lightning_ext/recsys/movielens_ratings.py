"""MovieLens-100K explicit ratings as ``(user, item)`` id pairs with a rating, for rating-prediction models (DNIS)."""

from __future__ import annotations

from typing import Literal, Optional, Sequence

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import TensorDataset
from typing_extensions import override

from lightning_ext.core.sampling import epoch_loader
from lightning_ext.core.validation import NonNegativeInt, PositiveInt, check_number, check_positive_int
from lightning_ext.data.movielens100k import find_ml100k_inter, read_inter_file
from lightning_ext.recsys.movielens100k import MovieLens100KDataModule

#: how the training and search loaders are zipped each epoch (``"min_size"`` is the official truncated loop)
CombineMode = Literal["max_size_cycle", "min_size"]


class MovieLens100KRatingsDataModule(LightningDataModule):
    """MovieLens-100K explicit ratings: ``(ids (B, 2), rating (B,))`` batches, random train/search/test split.

    The 100,000 ratings (recbole's ``ml-100k.inter``) are split at random by ``split`` (DNIS's ``main_nas.py``:
    70/20/10, seed 12). Users and items share one id space (users ``0..942``, items ``943..2624``), as DNIS's
    feature ids do; :attr:`frequency` counts each id in the training split. Training batches come from a
    ``CombinedLoader`` ``{"train": batch, "search": batch}`` (the search part is DNIS's validation data for the
    architecture step; ``mode="max_size_cycle"`` covers the whole training split every epoch, ``"min_size"``
    reproduces the official loop that stops with the shorter loader). Validation is the search part, test the
    last part (never used for tuning).

    Args:
        split: train / search (validation) / test shares, summing to 1.
        split_seed: seed of the random split.
        batch_size: ratings per batch (each of the two training loaders).
        shuffle_seed: seed of the per-epoch order.
        combine_mode: ``"max_size_cycle"`` or ``"min_size"``.
        path: the ``.inter`` file (default: inside the recbole package).

    Example:
        >>> dm = MovieLens100KRatingsDataModule()  # doctest: +SKIP
        >>> dm.setup(); dm.num_ids, len(dm.train_set)  # doctest: +SKIP
        (2625, 70000)
    """

    def __init__(self, split: Sequence[float] = (0.7, 0.2, 0.1), split_seed: int = 12, batch_size: PositiveInt = 4096,
                 shuffle_seed: int = 0, combine_mode: CombineMode = "max_size_cycle", path: Optional[str] = None,
                 num_workers: NonNegativeInt = 0) -> None:
        super().__init__()
        split = [float(s) for s in split]
        if len(split) != 3 or min(split) <= 0 or abs(sum(split) - 1) > 1e-6:
            raise ValueError(f"split must be three positive shares (train, search, test) summing to 1, got {split}.")
        check_number("split_seed", split_seed, integer=True)
        check_positive_int("batch_size", batch_size)
        check_number("shuffle_seed", shuffle_seed, integer=True)
        if combine_mode not in ("max_size_cycle", "min_size"):
            raise ValueError(f"combine_mode must be 'max_size_cycle' or 'min_size', got {combine_mode!r}.")
        check_number("num_workers", num_workers, low=0, integer=True)
        self.split, self.split_seed, self.batch_size, self.shuffle_seed = split, split_seed, batch_size, shuffle_seed
        self.combine_mode, self.num_workers = combine_mode, num_workers
        self.path = path or str(find_ml100k_inter())
        self.num_users, self.num_items = MovieLens100KDataModule.NUM_USERS, MovieLens100KDataModule.NUM_ITEMS
        self.num_ids = self.num_users + self.num_items
        self.train_set = self.search_set = self.test_set = None
        self.frequency: Optional[list[float]] = None

    @override
    def setup(self, stage: Optional[str] = None) -> None:
        """Read and split the ratings once."""
        if self.train_set is not None:
            return
        from pathlib import Path

        raw = read_inter_file(Path(self.path), self.num_users, self.num_items)
        ids = np.stack([raw[:, 0] - 1, raw[:, 1] - 1 + self.num_users], 1).astype(np.int64)
        rating = raw[:, 2].astype(np.float32)
        order = np.random.default_rng(self.split_seed).permutation(len(raw))
        cut = np.cumsum([round(s * len(raw)) for s in self.split[:2]])
        parts = np.split(order, cut)
        make = lambda idx: TensorDataset(torch.as_tensor(ids[idx]), torch.as_tensor(rating[idx]))  # noqa: E731
        self.train_set, self.search_set, self.test_set = (make(p) for p in parts)
        self.frequency = np.bincount(ids[parts[0]].reshape(-1), minlength=self.num_ids).astype(float).tolist()
        self.train_mean = float(rating[parts[0]].mean())

    def _loader(self, dataset, train: bool, seed_offset: int = 0):
        return epoch_loader(dataset, self.batch_size, train=train, trainer=getattr(self, "trainer", None),
                            seed=self.shuffle_seed + seed_offset, num_workers=self.num_workers)

    @override
    def train_dataloader(self):
        """``CombinedLoader({"train": ..., "search": ...})``."""
        return CombinedLoader({"train": self._loader(self.train_set, True),
                               "search": self._loader(self.search_set, True, 1)}, mode=self.combine_mode)

    @override
    def val_dataloader(self):
        """The search split, in order."""
        return self._loader(self.search_set, False)

    @override
    def test_dataloader(self):
        """The test split, in order."""
        return self._loader(self.test_set, False)
