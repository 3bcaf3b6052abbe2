"""DiskGNN's OfflineSampledDataModule: the pool is the online sampler's batches, reused in a new order; packed
features equal the feature table; the store is reused when valid and rebuilt when not; a crash mid-epoch resumes
to the same parameters; DDP is refused in setup; bad arguments get one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("torch_geometric")
import lightning.pytorch as pl  # noqa: E402

from lightning_ext.graph.offline_sampled import OfflineSampledDataModule  # noqa: E402
from lightning_ext.graph.sampled_node_classifier import SampledNodeClassifier  # noqa: E402
from lightning_ext.testing import assert_same_parameters, crash_and_resume  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _graph_dir(root: Path, n: int = 300, classes: int = 3, dim: int = 16) -> Path:
    """A planted-partition graph whose labels the features and the neighbours both predict."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, classes, n)
    src = rng.integers(0, n, 6 * n)
    same = rng.random(6 * n) < 0.8
    dst = np.where(same, [rng.choice(np.flatnonzero(y == y[s])) for s in src], rng.integers(0, n, 6 * n))
    x = (rng.standard_normal((n, dim)) + 1.5 * np.eye(classes, dim)[y]).astype(np.float32)
    perm = rng.permutation(n)
    root.mkdir(parents=True, exist_ok=True)
    for name, arr in (("x", x), ("edge_index", np.stack([src, dst])), ("y", y), ("train_idx", perm[:200]),
                      ("val_idx", perm[200:250]), ("test_idx", perm[250:])):
        np.save(root / f"{name}.npy", arr)
    return root


def _dm(tmp_path, **kw):
    args = dict(graph_dir=str(_graph_dir(tmp_path / "g")), num_neighbors=[4, 3], batch_size=32,
                store_dir=str(tmp_path / "store" / str(kw.get("pool_epochs", 1))), seed=0)
    args.update(kw)
    dm = OfflineSampledDataModule(**args)
    dm.setup("fit")
    return dm


def _epoch(dm, epoch):
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(epoch)
    return list(loader)


def test_pool_is_the_online_sampling_reused_in_a_new_order(tmp_path):
    offline, online = _dm(tmp_path, pool_epochs=1), _dm(tmp_path, pool_epochs=0)
    assert offline.num_train_batches == 7  # ceil(200 / 32)
    for epoch in (0, 1):
        a, b = _epoch(offline, epoch), _epoch(online, epoch)
        key = lambda d: tuple(d.n_id[: d.batch_size].tolist())  # noqa: E731
        if epoch == 0:  # the pool is epoch 0 of the online seed stream, in the same order
            assert [key(d) for d in a] == [key(d) for d in b]
            assert all(torch.equal(d.x, e.x) and torch.equal(d.edge_index, e.edge_index) for d, e in zip(a, b))
        else:  # epoch 1 reuses the same batches in a new order; online draws new ones
            assert sorted(key(d) for d in a) == sorted(key(d) for d in _epoch(offline, 0))
            assert [key(d) for d in a] != [key(d) for d in _epoch(offline, 0)]
            assert sorted(key(d) for d in b) != sorted(key(d) for d in a)
    seeds = torch.cat([d.n_id[: d.batch_size] for d in a])
    assert sorted(seeds.tolist()) == sorted(np.load(tmp_path / "g" / "train_idx.npy").tolist())


def test_packed_and_cached_features_equal_the_table_and_read_fewer_bytes(tmp_path):
    x = torch.from_numpy(np.load(_graph_dir(tmp_path / "g") / "x.npy"))
    reads = {}
    for name, kw in {"online": dict(pool_epochs=0), "packed": dict(pool_epochs=1),
                     "cached": dict(pool_epochs=1, feature_cache_bytes=100 * 16 * 4)}.items():
        dm = _dm(tmp_path, store_dir=str(tmp_path / name), **kw)
        for d in _epoch(dm, 0):
            assert torch.equal(d.x, x[d.n_id]) and torch.equal(d.y, dm.graph.y[d.n_id])
        reads[name] = dm.io_stats.as_dict()
    assert reads["cached"]["cache_hits"] > 0
    assert reads["cached"]["bytes"] < reads["packed"]["bytes"] <= reads["online"]["bytes"]
    assert reads["packed"]["rows"] + reads["packed"]["cache_hits"] >= reads["online"]["rows"]


def test_store_is_reused_when_valid_and_rebuilt_when_not(tmp_path):
    dm = _dm(tmp_path, pool_epochs=2)
    store = Path(dm.dir)
    stamp = (store / "packed.bin").stat().st_mtime_ns
    _dm(tmp_path, pool_epochs=2)
    assert (store / "packed.bin").stat().st_mtime_ns == stamp  # validated and reused
    with open(store / "packed.bin", "ab") as f:  # a truncated or grown file is caught by its recorded size
        f.write(b"\0" * 8)
    again = _dm(tmp_path, pool_epochs=2)
    meta = json.loads((store / "meta.json").read_text())
    assert (store / "packed.bin").stat().st_size == meta["sizes"]["packed.bin"]
    assert torch.equal(_epoch(again, 0)[0].x, _epoch(dm, 0)[0].x)
    other = _dm(tmp_path, pool_epochs=2, batch_size=16)  # other arguments -> another key -> rebuilt
    assert other.num_train_batches == 13 and json.loads((store / "meta.json").read_text())["key"] != meta["key"]


def test_crash_mid_epoch_resumes_to_the_same_parameters(tmp_path):
    gd = str(_graph_dir(tmp_path / "g"))

    def model():
        torch.manual_seed(0)
        return SampledNodeClassifier(num_features=16, num_classes=3, hidden=8, num_layers=2, lr=0.01,
                                     dropout=0.0)  # dropout draws from the global RNG, which no resume restores

    def data():
        return OfflineSampledDataModule(graph_dir=gd, num_neighbors=[4, 3], batch_size=32, pool_epochs=2,
                                        store_dir=str(tmp_path / "store"))

    full, resumed, info = crash_and_resume(model, data, lambda: [], max_epochs=3, crash_step=10, tmp_path=tmp_path,
                                           checkpoint_every_n_steps=3, weights_only=True, limit_val_batches=0,
                                           num_sanity_val_steps=0)
    assert info["resumed_from_step"] == 9
    assert_same_parameters(full, resumed)


def test_sampled_classifier_learns_the_planted_labels(tmp_path):
    torch.manual_seed(0)
    dm = _dm(tmp_path, pool_epochs=1)
    model = SampledNodeClassifier(num_features=16, num_classes=3, hidden=16, num_layers=2, lr=0.01)
    trainer = pl.Trainer(max_epochs=8, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(model, dm)
    assert trainer.test(model, dm, verbose=False)[0]["test_acc"] > 0.8  # chance is 1/3


def test_ddp_and_bad_arguments_are_refused(tmp_path):
    class _Trainer:
        world_size = 2

    dm = OfflineSampledDataModule(graph_dir=str(_graph_dir(tmp_path / "g")), store_dir=str(tmp_path / "s"))
    dm.trainer = _Trainer()
    with pytest.raises(RuntimeError, match="devices=1"):
        dm.setup("fit")
    with pytest.raises(FileNotFoundError, match="lacks x.npy"):
        OfflineSampledDataModule(graph_dir=str(tmp_path))
    with pytest.raises(ValueError, match="num_neighbors must be a non-empty list"):
        OfflineSampledDataModule(graph_dir=str(tmp_path / "g"), num_neighbors=[])
    with pytest.raises(ValueError, match="pool_epochs"):
        OfflineSampledDataModule(graph_dir=str(tmp_path / "g"), pool_epochs=-1)
    with pytest.raises(ValueError, match="packing must be one of"):
        OfflineSampledDataModule(graph_dir=str(tmp_path / "g"), packing="segment")
    model = SampledNodeClassifier(num_features=8, num_classes=3)
    dm = _dm(tmp_path)
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match="set model num_features: 16"):
        trainer.fit(model, dm)
