"""Issue 15: FilteredDataModule never trusts a score cache that does not fit the data it filters."""

import time
import zipfile

import numpy as np
import pytest
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from lightning_ext.curation import RandomScorer
from lightning_ext.curation.base import ScoringData, fingerprint
from lightning_ext.curation.datamodule import FilteredDataModule
from lightning_ext.datamodules import DigitsDataModule


class ListDataset(Dataset):
    """A plain (non-TensorDataset) dataset: items computed from a tensor on access."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


class ListDataModule(LightningDataModule):
    def __init__(self, x, y, data_version=None):
        super().__init__()
        self.train_set = ListDataset(x, y)
        self.num_classes = 3

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=8)


def _pool(n=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.arange(n) % 3


def test_changing_samples_a_sparse_fingerprint_skips_rescoring(tmp_path):
    x, y = _pool()
    first = FilteredDataModule(ListDataModule(x, y), RandomScorer(seed=0), keep=0.5, cache_dir=str(tmp_path))
    first.setup("fit")
    sampled = set(np.unique(np.linspace(0, len(y) - 1, num=64).astype(int)).tolist())
    changed = [i for i in range(len(y)) if i not in sampled][:14]
    x2 = x.clone()
    x2[changed] += 1.0  # 14 samples the old 64-item fingerprint never looked at
    second = FilteredDataModule(ListDataModule(x2, y), RandomScorer(seed=0), keep=0.5, cache_dir=str(tmp_path))
    second.setup("fit")
    assert second.fingerprint != first.fingerprint and not second.loaded_from_cache


def test_a_data_version_replaces_the_content_hash(tmp_path):
    x, y = _pool()
    a = FilteredDataModule(ListDataModule(x, y), RandomScorer(seed=0), keep=0.5, cache_dir=str(tmp_path),
                           data_version="v1")
    a.setup("fit")
    b = FilteredDataModule(ListDataModule(x + 1, y), RandomScorer(seed=0), keep=0.5, cache_dir=str(tmp_path),
                           data_version="v1")
    b.setup("fit")
    assert b.loaded_from_cache and b.fingerprint == a.fingerprint  # the user vouches: same version, same data
    c = FilteredDataModule(ListDataModule(x, y), RandomScorer(seed=0), keep=0.5, cache_dir=str(tmp_path),
                           data_version="v2")
    c.setup("fit")
    assert not c.loaded_from_cache and c.fingerprint != a.fingerprint
    with pytest.raises(ValueError, match="data_version"):
        FilteredDataModule(ListDataModule(x, y), RandomScorer(seed=0), keep=0.5, data_version="")


def test_a_cache_with_fewer_scores_than_samples_is_rescored(tmp_path):
    dm = FilteredDataModule(DigitsDataModule(), RandomScorer(seed=1), keep=0.5, cache_dir=str(tmp_path))
    dm.setup("fit")
    path = dm.cache_path()
    np.savez(path, score=np.arange(100, dtype=np.float64))  # a valid file holding 100 scores for 1,293 samples
    again = FilteredDataModule(DigitsDataModule(), RandomScorer(seed=1), keep=0.5, cache_dir=str(tmp_path))
    with pytest.warns(UserWarning, match="one score per sample"):
        again.setup("fit")
    assert not again.loaded_from_cache and len(again.kept_indices) == 646
    assert np.array_equal(again.kept_indices, dm.kept_indices) and again.kept_indices.max() > 100


def test_a_truncated_cache_warns_is_replaced_and_rescored(tmp_path):
    dm = FilteredDataModule(DigitsDataModule(), RandomScorer(seed=1), keep=0.5, cache_dir=str(tmp_path))
    dm.setup("fit")
    path = dm.cache_path()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # a kill mid-copy: np.load raises BadZipFile
    with pytest.raises(zipfile.BadZipFile):
        np.load(path)
    again = FilteredDataModule(DigitsDataModule(), RandomScorer(seed=1), keep=0.5, cache_dir=str(tmp_path))
    with pytest.warns(UserWarning, match="unreadable score cache"):
        again.setup("fit")
    assert not again.loaded_from_cache and np.array_equal(again.kept_indices, dm.kept_indices)
    assert path.read_bytes() == data  # rewritten whole
    third = FilteredDataModule(DigitsDataModule(), RandomScorer(seed=1), keep=0.5, cache_dir=str(tmp_path))
    third.setup("fit")
    assert third.loaded_from_cache


def test_fingerprint_covers_every_item_and_nested_items():
    x, y = _pool(200)
    base = fingerprint(ScoringData(ListDataset(x, y)), {})
    for i in range(200):  # every single item matters (more items than the old 64-item sample)
        x2 = x.clone()
        x2[i, 0, 0, 0] += 1e-3
        assert fingerprint(ScoringData(ListDataset(x2, y)), {}) != base, i


def test_fingerprint_cost_on_a_fashion_mnist_sized_pool():
    x = torch.rand(60000, 1, 28, 28)
    y = torch.arange(60000) % 10
    start = time.perf_counter()
    fingerprint(ScoringData(ListDataset(x, y), labels=y.numpy()), {})
    elapsed = time.perf_counter() - start
    print(f"fingerprint of 60,000 28x28 items: {elapsed:.2f} s")
    assert elapsed < 60


def test_a_dataset_with_random_transforms_is_flagged(tmp_path):
    class Noisy(ListDataset):
        def __getitem__(self, i):
            return self.x[i] + torch.randn(()), int(self.y[i])

    x, y = _pool(40)
    dm = ListDataModule(x, y)
    dm.train_set = Noisy(x, y)
    with pytest.warns(UserWarning, match="data_version"):
        FilteredDataModule(dm, RandomScorer(seed=0), keep=0.5, cache_dir=str(tmp_path)).setup("fit")
