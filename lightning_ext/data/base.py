"""Shared machinery for the in-memory DataModules: fixed seeded splits, seeded shuffling, DDP sharding."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, TensorDataset
from typing_extensions import override

from lightning_ext.core.sampling import EpochSampler, ResumableDataLoader
from lightning_ext.core.validation import (
    NonNegativeInt,
    NotBelowOneFloat,
    PositiveInt,
    UnitIntervalLeftOpen,
    UnitIntervalRightOpen,
    check_number,
    check_positive_int,
)


@dataclass
class Arrays:
    """What a subclass loads: features, integer labels, and the official test split when there is one."""

    x: np.ndarray
    y: np.ndarray
    x_test: Optional[np.ndarray] = None
    y_test: Optional[np.ndarray] = None


def stratified_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices ``0..len(y)-1`` into (rest, held_out) with ``fraction`` held out, class-stratified.

    Deterministic for a given ``seed``; classes too small to stratify fall back to a plain seeded split.
    """
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    if fraction <= 0:
        return idx, idx[:0]
    try:
        rest, held = train_test_split(idx, test_size=fraction, random_state=seed, stratify=y)
    except ValueError:
        rest, held = train_test_split(idx, test_size=fraction, random_state=seed)
    return np.sort(rest), np.sort(held)


class InMemoryDataModule(LightningDataModule):
    """Base class: data that fits in memory, split once with a fixed seed into train/val/test.

    Subclasses set ``num_classes`` and ``input_shape`` in ``__init__`` and implement :meth:`load_arrays`.

    The split is a function of ``split_seed`` only (not of the training seed), so every run, rank and resume
    sees the same samples in each split. Where the dataset has an official test split, it is the test split
    and validation is carved out of the official training split; otherwise ``test_fraction`` of all samples
    is held out first, then ``val_fraction`` of the remainder. Both are class-stratified.

    Training batches are shuffled by a :class:`~lightning_ext.core.sampling.EpochSampler` seeded with
    ``(shuffle_seed, epoch)``: with one process it is an ordinary seeded shuffle, and under DDP each rank gets
    its shard of the same permutation, so a two-process run with half the batch size sees exactly the global
    batches of a one-process run. The order depends only on the epoch, and the training loader is a
    :class:`~lightning_ext.core.sampling.ResumableDataLoader`, so a run resumed from a step checkpoint
    (mid-epoch) continues with exactly the batches the interrupted run had not trained on.

    Args:
        batch_size: samples per batch (per process under DDP).
        num_workers: DataLoader worker processes.
        val_fraction: share of the training pool used for validation.
        test_fraction: share of all samples held out for testing (ignored where an official test split exists).
        split_seed: seed of the train/val/test split.
        shuffle: shuffle training batches.
        shuffle_seed: seed of the per-epoch training shuffle.
        train_fraction: keep only this random, class-stratified share of the training split (1.0 keeps all).
        train_subset_seed: seed of that subset (and of the long-tailed subsampling).
        long_tail_ratio: make the training split long-tailed (Cui et al., 2019): class ``c`` keeps a share
            ``long_tail_ratio ** (-c / (num_classes - 1))`` of its samples, so class 0 keeps all and the
            last class ``1 / long_tail_ratio``. 1.0 (default) leaves the split balanced; validation and
            test stay balanced either way.
        pin_memory: DataLoader ``pin_memory``.
        drop_last: drop the last incomplete training batch (then a DDP run and a one-process run with the
            same global batch see identical batches, padding included).
    """

    num_classes: int
    input_shape: tuple[int, ...]
    has_official_test_split: bool = False

    def __init__(
        self,
        batch_size: PositiveInt = 64,
        num_workers: NonNegativeInt = 0,
        val_fraction: UnitIntervalRightOpen = 0.1,
        test_fraction: UnitIntervalRightOpen = 0.2,
        split_seed: int = 0,
        shuffle: bool = True,
        shuffle_seed: int = 0,
        train_fraction: UnitIntervalLeftOpen = 1.0,
        train_subset_seed: int = 0,
        pin_memory: bool = False,
        drop_last: bool = False,
        long_tail_ratio: NotBelowOneFloat = 1.0,
    ) -> None:
        super().__init__()
        check_positive_int("batch_size", batch_size)
        check_number("num_workers", num_workers, low=0, integer=True)
        check_number("val_fraction", val_fraction, low=0, high=1, high_open=True)
        check_number("test_fraction", test_fraction, low=0, high=1, high_open=True)
        check_number("train_fraction (1.0 keeps all data)", train_fraction, low=0, high=1, low_open=True)
        check_number("long_tail_ratio (1.0 = balanced)", long_tail_ratio, low=1)
        for name, seed in (("split_seed", split_seed), ("shuffle_seed", shuffle_seed),
                           ("train_subset_seed", train_subset_seed)):
            check_number(name, seed, integer=True)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.split_seed = split_seed
        self.shuffle = shuffle
        self.shuffle_seed = shuffle_seed
        self.train_fraction = train_fraction
        self.train_subset_seed = train_subset_seed
        self.pin_memory = pin_memory
        self.drop_last = drop_last
        self.long_tail_ratio = long_tail_ratio
        self.train_set: Optional[TensorDataset] = None
        self.val_set: Optional[TensorDataset] = None
        self.test_set: Optional[TensorDataset] = None

    # -- subclass API --------------------------------------------------------------------------------------
    def load_arrays(self) -> Arrays:
        """Return all samples as numpy arrays (features already scaled to a fixed range)."""
        raise NotImplementedError

    def to_tensor(self, x: np.ndarray) -> torch.Tensor:
        """Convert features to a float tensor shaped ``(N, *input_shape)``."""
        return torch.as_tensor(x, dtype=torch.float32).reshape(len(x), *self.input_shape)

    def normalize(self, train_x: torch.Tensor, *others: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Standardise with statistics of the training split (per feature for vectors, global for images)."""
        dims = 0 if train_x.dim() == 2 else tuple(range(train_x.dim()))
        mean, std = train_x.mean(dim=dims), train_x.std(dim=dims)
        std = torch.where(std > 1e-6, std, torch.ones_like(std))  # constant features stay unscaled
        return tuple((t - mean) / std for t in (train_x, *others))

    # -- splits --------------------------------------------------------------------------------------------
    def split_indices(self, arrays: Arrays) -> dict[str, np.ndarray]:
        """Indices into ``arrays`` for each split (test indices refer to the official test set if present)."""
        y = arrays.y
        if arrays.x_test is not None:
            pool, test = np.arange(len(y)), np.arange(len(arrays.y_test))
        else:
            pool, test = stratified_split(y, self.test_fraction, self.split_seed)
        train_rel, val_rel = stratified_split(y[pool], self.val_fraction, self.split_seed + 1)
        train, val = pool[train_rel], pool[val_rel]
        if self.train_fraction < 1:
            keep_rel, _ = stratified_split(y[train], 1 - self.train_fraction, self.train_subset_seed)
            present = np.unique(y[train])
            emptied = sorted(set(present.tolist()) - set(np.unique(y[train[keep_rel]]).tolist()))
            if emptied:
                shown = ", ".join(str(c) for c in emptied[:10]) + (", ..." if len(emptied) > 10 else "")
                raise ValueError(
                    f"train_fraction={self.train_fraction} keeps {len(keep_rel)} of {len(train)} training samples "
                    f"and leaves {len(emptied)} class(es) empty ({shown}); raise train_fraction to at least "
                    f"{min(1.0, 2 * len(present) / len(train)):.3g}."
                )
            train = train[keep_rel]
        if self.long_tail_ratio > 1:
            train = self._long_tail(train, y)
        if len(train) == 0:
            raise ValueError(
                "The training split is empty; raise `train_fraction` or lower `val_fraction`/`test_fraction`."
            )
        return {"train": train, "val": val, "test": test}

    def _long_tail(self, train: np.ndarray, y: np.ndarray) -> np.ndarray:
        rng = np.random.default_rng(self.train_subset_seed)
        keep = []
        for c in range(self.num_classes):
            members = train[y[train] == c]
            share = self.long_tail_ratio ** (-c / max(1, self.num_classes - 1))
            n = max(1, int(round(share * len(members)))) if len(members) else 0
            keep.append(np.sort(rng.choice(members, size=n, replace=False)))
        return np.sort(np.concatenate(keep))

    def class_counts(self, split: str = "train") -> list[int]:
        """Samples per class in a split (after ``setup``)."""
        dataset = {"train": self.train_set, "val": self.val_set, "test": self.test_set}[split]
        return np.bincount(dataset.tensors[1].numpy(), minlength=self.num_classes).tolist()

    @override
    def setup(self, stage: Optional[str] = None) -> None:
        """Load the arrays once and split, normalise and wrap them as tensors (every rank the same)."""
        if self.train_set is not None:
            return
        arrays = self.load_arrays()
        labels = np.unique(arrays.y)
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise ValueError(
                f"{type(self).__name__}: labels must lie in [0, {self.num_classes}), found {labels.min()}..{labels.max()}."
            )
        split = self.split_indices(arrays)
        x_all, y_all = self.to_tensor(arrays.x), torch.as_tensor(arrays.y, dtype=torch.long)
        if arrays.x_test is not None:
            x_test, y_test = self.to_tensor(arrays.x_test), torch.as_tensor(arrays.y_test, dtype=torch.long)
        else:
            x_test, y_test = x_all, y_all
        x_tr, x_va, x_te = self.normalize(x_all[split["train"]], x_all[split["val"]], x_test[split["test"]])
        self.train_set = TensorDataset(x_tr, y_all[split["train"]])
        self.val_set = TensorDataset(x_va, y_all[split["val"]])
        self.test_set = TensorDataset(x_te, y_test[split["test"]])
        self.split_sizes = {k: len(v) for k, v in split.items()}

    # -- loaders -------------------------------------------------------------------------------------------
    def _loader(self, dataset: TensorDataset, train: bool) -> DataLoader:
        if dataset is None or len(dataset) == 0:
            raise RuntimeError(
                f"{type(self).__name__}: this split is empty; call setup() first or raise its fraction."
            )
        sampler = None
        if train:
            world, rank = 1, 0
            trainer = getattr(self, "trainer", None)
            if trainer is not None:
                world, rank = trainer.world_size, trainer.global_rank
            sampler = EpochSampler(len(dataset), shuffle=self.shuffle, seed=self.shuffle_seed, rank=rank,
                                   world_size=world)
        loader = ResumableDataLoader if train else DataLoader  # a stateful train loader resumes mid-epoch
        return loader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            drop_last=self.drop_last and train,
        )

    @override
    def train_dataloader(self) -> DataLoader:
        """Seeded, sharded, per-epoch shuffled training batches."""
        return self._loader(self.train_set, train=True)

    @override
    def val_dataloader(self) -> DataLoader:
        """Validation batches in order."""
        return self._loader(self.val_set, train=False)

    @override
    def test_dataloader(self) -> DataLoader:
        """Test batches in order."""
        return self._loader(self.test_set, train=False)

    @override
    def predict_dataloader(self) -> DataLoader:
        """The test split in order."""
        return self._loader(self.test_set, train=False)
