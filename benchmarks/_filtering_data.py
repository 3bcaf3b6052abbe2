"""Fashion-MNIST with planted faults, shared by the data-filtering benchmarks (benchmarks/filtering_*.py).

The pool is a class-stratified subset of the official training split with known faults: a share of labels
flipped to a random other class, a share of images corrupted (replaced by noise or blanked, with a random
label) and planted near-duplicates (jittered copies of a few images). Validation (clean) and the trusted set
(clean) are drawn from the rest of the training split; the test split is the official 10,000 images.
Not part of the library.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from lightning_ext.data.base import InMemoryDataModule
from lightning_ext.data.fashion_mnist import FashionMNISTDataModule
from lightning_ext.curation.training import small_cnn
from lightning_ext.modules import ImageClassifier


@dataclass
class Pool:
    x: torch.Tensor          # (N, 1, 28, 28), standardised
    y: torch.Tensor          # observed (possibly wrong) labels
    y_true: torch.Tensor     # true labels (-1 for corrupted images)
    flipped: np.ndarray      # label flipped
    corrupted: np.ndarray    # image replaced by noise / blank
    duplicate: np.ndarray    # a planted near-copy of another pool image
    val: tuple
    test: tuple
    trusted: tuple

    @property
    def clean(self) -> np.ndarray:
        return ~self.flipped & ~self.corrupted


def planted_pool(n_pool: int = 10_000, flip: float = 0.3, corrupt: float = 0.05, dup_sources: int = 0,
                 dup_copies: int = 10, n_val: int = 2000, n_trusted: int = 500, seed: int = 0) -> Pool:
    """Build the faulty pool. ``dup_sources * dup_copies`` pool slots are near-duplicates (jitter std 0.05 on
    [0, 1] pixels) of ``dup_sources`` pool images; they inherit the source's (possibly flipped) label."""
    dm = FashionMNISTDataModule()
    arrays = dm.load_arrays()
    rng = np.random.default_rng(seed)
    x_all, y_all = arrays.x.astype(np.float32), arrays.y
    order = rng.permutation(len(y_all))
    pool_idx, val_idx = order[:n_pool], order[n_pool:n_pool + n_val]
    trusted_idx = order[n_pool + n_val:n_pool + n_val + n_trusted]
    x, y_true = x_all[pool_idx].copy(), y_all[pool_idx].copy()
    n_dup = dup_sources * dup_copies
    duplicate = np.zeros(n_pool, dtype=bool)
    if n_dup:
        sources = rng.choice(n_pool - n_dup, size=dup_sources, replace=False)
        slots = np.arange(n_pool - n_dup, n_pool)
        src = np.repeat(sources, dup_copies)
        x[slots] = np.clip(x[src] + 0.05 * rng.standard_normal(x[slots].shape), 0, 1)
        y_true[slots] = y_true[src]
        duplicate[slots] = True
    y = y_true.copy()
    flipped = np.zeros(n_pool, dtype=bool)
    base = np.flatnonzero(~duplicate)
    f = rng.choice(base, size=int(flip * len(base)), replace=False)
    flipped[f] = True
    y[f] = (y_true[f] + rng.integers(1, 10, len(f))) % 10
    if n_dup:  # copies carry their source's observed label
        y[slots], flipped[slots] = y[src], flipped[src]
    corrupted = np.zeros(n_pool, dtype=bool)
    c = rng.choice(base, size=int(corrupt * len(base)), replace=False)
    corrupted[c] = True
    half = len(c) // 2
    x[c[:half]] = rng.random((half, 28, 28))               # uniform noise
    x[c[half:]] = rng.random((len(c) - half, 1, 1)) * np.ones((1, 28, 28))  # blank (constant) images
    y[c] = rng.integers(0, 10, len(c))
    y_true[c] = -1
    flipped[c] = False
    mean, std = float(x.mean()), float(x.std())

    def t(a):
        return torch.as_tensor((a - mean) / std, dtype=torch.float32).reshape(len(a), 1, 28, 28)

    lab = lambda a: torch.as_tensor(a, dtype=torch.long)  # noqa: E731
    return Pool(t(x), lab(y), lab(y_true), flipped, corrupted, duplicate,
                (t(x_all[val_idx]), lab(y_all[val_idx])), (t(arrays.x_test.astype(np.float32)), lab(arrays.y_test)),
                (t(x_all[trusted_idx]), lab(y_all[trusted_idx])))


class PoolDataModule(InMemoryDataModule):
    """The planted pool as train split, clean validation, official test."""

    num_classes = 10
    input_shape = (1, 28, 28)

    def __init__(self, pool: Pool, batch_size: int = 128, shuffle_seed: int = 0) -> None:
        super().__init__(batch_size=batch_size, shuffle_seed=shuffle_seed)
        self.pool = pool

    def setup(self, stage=None) -> None:
        if self.train_set is None:
            self.train_set = TensorDataset(self.pool.x, self.pool.y)
            self.val_set = TensorDataset(*self.pool.val)
            self.test_set = TensorDataset(*self.pool.test)


def cnn_model(lr: float = 2e-3):
    def make(seed: int) -> ImageClassifier:
        torch.manual_seed(seed)
        return ImageClassifier(small_cnn(1, 10, width=16), num_classes=10, image_size=28, lr=lr, weight_decay=1e-4)
    return make


def environment() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "loadavg_start": os.getloadavg(), "started": time.strftime("%Y-%m-%d %H:%M")}


def summarize(values) -> tuple[float, float]:
    values = list(values)
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
