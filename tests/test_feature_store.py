"""Feature stores: every read equals plain indexing (random, duplicated, unsorted, empty ids; dtypes; padding),
reads are counted, PyG's loaders take them with a graph store, and bad input gets one clear line."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("torch_geometric")
from torch_geometric.data import Data, FeatureStore  # noqa: E402
from torch_geometric.distributed import LocalGraphStore  # noqa: E402
from torch_geometric.loader import NodeLoader  # noqa: E402

from lightning_ext.graph.feature_store import (  # noqa: E402
    ArrayFeatureStore, ZeroCopyFeatureStore, feature_store_from_data, pages_touched)
from lightning_ext.graph.neighbor_sampler import PortableNeighborSampler  # noqa: E402

IDS = {"random": torch.randint(0, 40, (25,), generator=torch.Generator().manual_seed(0)),
       "duplicated": torch.tensor([3, 3, 7, 3, 0]), "unsorted": torch.tensor([39, 1, 20, 5]),
       "empty": torch.tensor([], dtype=torch.long)}


def _stores(tmp_path):
    x = np.random.default_rng(0).standard_normal((40, 6)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    return x, [ArrayFeatureStore(), ArrayFeatureStore(), ZeroCopyFeatureStore(mode="cpu"),
               ZeroCopyFeatureStore(mode="auto", pad_to_bytes=0)], [torch.from_numpy(x), np.load(
                   tmp_path / "x.npy", mmap_mode="r"), torch.from_numpy(x), torch.from_numpy(x)]


@pytest.mark.parametrize("kind", sorted(IDS))
def test_every_store_equals_plain_indexing(tmp_path, kind):
    x, stores, tables = _stores(tmp_path)
    for store, table in zip(stores, tables):
        assert isinstance(store, FeatureStore)
        store.put_tensor(table, group_name="paper", attr_name="x", index=None)
        got = store.get_tensor(group_name="paper", attr_name="x", index=IDS[kind])
        assert got.dtype == torch.float32 and got.shape == (IDS[kind].numel(), 6)
        assert torch.equal(got, torch.from_numpy(x)[IDS[kind]]), type(store).__name__


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.uint8])
def test_zero_copy_store_keeps_dtype_and_strips_padding(dtype):
    x = (torch.randn(9, 5) * 10).to(dtype)
    store = ZeroCopyFeatureStore(mode="cpu", pad_to_bytes=128)
    store.put_tensor(x, group_name=None, attr_name="x", index=None)
    assert store.row_stride_bytes(None, "x") % 128 == 0 and store.row_stride_bytes(None, "x") >= 5 * x.element_size()
    idx = torch.tensor([8, 0, 8, 4])
    got = store.get_tensor(group_name=None, attr_name="x", index=idx)
    assert got.dtype == dtype and torch.equal(got, x[idx])
    assert store.get_tensor_size(group_name=None, attr_name="x") == (9, 5)
    y = torch.arange(9)  # 1-D tables (labels) too
    store.put_tensor(y, group_name=None, attr_name="y", index=None)
    assert torch.equal(store.get_tensor(group_name=None, attr_name="y", index=idx), y[idx])


def test_array_store_counts_rows_bytes_and_pages_once_per_distinct_row():
    store = ArrayFeatureStore()
    store.put_tensor(torch.zeros(64, 128), group_name=None, attr_name="x", index=None)  # 512-byte rows
    store.get_tensor(group_name=None, attr_name="x", index=torch.tensor([0, 1, 1, 7, 8, 63]))
    assert store.stats.rows == 5 and store.stats.bytes == 5 * 512
    assert store.stats.pages == 3  # rows 0-7 share page 0, row 8 is on page 1, row 63 on page 7
    assert pages_touched(torch.tensor([0, 1]), 5000) == 3 and pages_touched(torch.tensor([], dtype=torch.long), 8) == 0


def test_stores_feed_pyg_loaders_like_plain_data():
    torch.manual_seed(0)
    n = 60
    data = Data(x=torch.randn(n, 7), edge_index=torch.randint(0, n, (2, 300)), y=torch.randint(0, 3, (n,)))
    ref = list(NodeLoader(data, node_sampler=PortableNeighborSampler(data, [3, 3]), input_nodes=torch.arange(20),
                          batch_size=8))
    for store in (ArrayFeatureStore(), ZeroCopyFeatureStore(mode="cpu")):
        fs = feature_store_from_data(data, store, attrs=("x", "y"))
        gs = LocalGraphStore.from_data(None, data.edge_index, num_nodes=n)
        got = list(NodeLoader((fs, gs), node_sampler=PortableNeighborSampler(data, [3, 3]),
                              input_nodes=torch.arange(20), batch_size=8, filter_per_worker=False))
        assert len(got) == len(ref) == 3
        for a, b in zip(ref, got):
            assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and torch.equal(a.n_id, b.n_id)
        assert store.stats.calls == 2 * 3  # x and y, once per batch


def test_bad_input_gets_one_clear_line():
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a CUDA device.*mode='cpu'"):
            ZeroCopyFeatureStore(mode="zero_copy")
    with pytest.raises(ValueError, match="mode must be one of"):
        ZeroCopyFeatureStore(mode="gpu")
    with pytest.raises(ValueError, match="pad_to_bytes=6 is not a multiple"):
        ZeroCopyFeatureStore(mode="cpu", pad_to_bytes=6).put_tensor(torch.zeros(2, 2), group_name=None,
                                                                     attr_name="x", index=None)
    store = ArrayFeatureStore()
    store.put_tensor(torch.zeros(4, 2), group_name=None, attr_name="x", index=None)
    with pytest.raises(IndexError, match=r"row ids must lie in \[0, 4\)"):
        store.get_tensor(group_name=None, attr_name="x", index=torch.tensor([4]))
    with pytest.raises(ValueError, match="integer row ids"):
        store.get_tensor(group_name=None, attr_name="x", index=torch.tensor([0.5]))
    with pytest.raises(ValueError, match="1-D .* or 2-D"):
        store.put_tensor(torch.zeros(2, 2, 2), group_name=None, attr_name="z", index=None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the zero-copy and staged paths need a CUDA device")
@pytest.mark.parametrize("mode", ["auto", "zero_copy", "staged"])
def test_cuda_paths_equal_plain_indexing(mode):
    x = torch.randn(1000, 100)
    store = ZeroCopyFeatureStore(mode=mode)
    store.put_tensor(x, group_name=None, attr_name="x", index=None)
    idx = torch.randint(0, 1000, (300,))
    got = store.get_tensor(group_name=None, attr_name="x", index=idx)
    assert got.is_cuda and torch.equal(got.cpu(), x[idx])
