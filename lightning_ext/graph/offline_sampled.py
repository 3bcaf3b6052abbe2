"""DiskGNN: neighbourhoods sampled once, offline, with each batch's features packed contiguously on disk.

Liu et al., "DiskGNN: Bridging I/O Efficiency and Model Accuracy for Out-of-Core GNN Training" (arXiv 2405.05231);
reference code https://github.com/Liu-rj/DiskGNN (``examples/sampling.py``, ``feat_packing.py``,
``train_multi_thread.py``; DGL/GraphBolt with a CUDA + liburing extension, no CPU path).

Out-of-core training reads, for each mini-batch ``b`` with input nodes ``V_b``, the rows ``X[V_b]`` of a feature
table on disk. Sampled online, the rows are scattered: the bytes read are ``pages(V_b) * 4096``, many times the
``|V_b| * row_bytes`` needed (read amplification). DiskGNN samples the batches once, before training, and writes
each batch's *cold* rows (those not in a memory cache of the most frequently used rows) contiguously, so one
sequential read of ``|V_b \\ C| * row_bytes`` bytes serves the batch. Training reuses the pre-sampled batches in a
new order every epoch (``train_multi_thread.py``: ``batch_id = torch.randperm(pool_size)``) -- the paper's
accuracy claim rests on that reuse, so :class:`OfflineSampledDataModule` makes it a parameter (``pool_epochs``;
``0`` samples online, the baseline, from the same seed stream: epoch ``e``'s batches with ``pool_epochs=0`` are
exactly the pool's ``e``-th epoch).

Not ported: the four-thread pipeline and the GPU cache tier (a DataLoader's workers prefetch instead), ``O_DIRECT``
reads, and the segment "disk cache" (``--blowup``); ``packing="per_batch"`` is the README's ``--blowup -1``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from lightning_ext.core.io import atomic_path, atomic_torch_save, atomic_write_json
from lightning_ext.core.optional import require
from lightning_ext.core.paths import cache_root, check_path_argument
from lightning_ext.core.sampling import EpochSampler, ResumableDataLoader
from lightning_ext.core.validation import check_choice, check_number
from lightning_ext.graph.feature_store import IOStats, pages_touched

_FORMAT = 2
_GRAPH_FILES = ("x.npy", "edge_index.npy", "y.npy", "train_idx.npy", "val_idx.npy", "test_idx.npy")


class _PoolSampler(EpochSampler):
    """Shuffles the ``B`` batches of one epoch and yields pool keys ``e' * B + i`` (``e' = e mod pool_epochs``,
    or ``e`` itself when sampling online); resumable mid-epoch like :class:`EpochSampler`."""

    def __init__(self, num_batches: int, pool_epochs: int, seed: int) -> None:
        super().__init__(num_batches, shuffle=True, seed=seed)
        self.pool_epochs = pool_epochs

    @override
    def indices(self) -> np.ndarray:
        source = self.epoch % self.pool_epochs if self.pool_epochs else self.epoch
        return super().indices() + source * self.num_samples_total


class _Batches(Dataset):
    """Pool key -> a PyG ``Data`` mini-batch (``x``, ``y``, local ``edge_index``, ``n_id``, ``batch_size``)."""

    def __init__(self, dm: "OfflineSampledDataModule", stage: str) -> None:
        self.dm, self.stage = dm, stage

    def __getitem__(self, key: int) -> Any:
        return self.dm.batch(int(key), self.stage)


def _single(batch: list) -> Any:
    return batch[0]


class OfflineSampledDataModule(LightningDataModule):
    """Mini-batches of a node-classification graph sampled once (DiskGNN), their features packed per batch on disk.

    ``setup`` loads the graph (a Planetoid graph by name, or a folder of ``.npy`` files whose feature table is
    memory-mapped, so it may exceed memory), writes the feature table to ``store_dir`` as float32 rows, samples
    ``pool_epochs`` epochs of training batches (:class:`PortableNeighborSampler`, seeded per epoch and batch),
    picks a memory cache of the most used rows (``feature_cache_bytes``) and packs every batch's remaining rows
    into one contiguous block of ``packed.bin``. Everything is written atomically and keyed by the arguments
    and the source's size; a later run validates the key and the file sizes and reuses it, else rebuilds.
    Training batches come in a seeded new order each epoch (mid-epoch resumable); validation and test batches
    are sampled online with fixed seeds, as in DiskGNN. ``io_stats`` counts what training read from disk.

    Args:
        name: a Planetoid graph (``"Cora"``, ``"CiteSeer"``) read from ``root``; ignored when ``graph_dir`` is set.
        root: folder holding ``<name>/raw`` (default ``$PLANETOID_ROOT``).
        split: Planetoid split; ``"full"`` makes every node outside val/test a training node.
        graph_dir: a folder with ``x.npy`` (rows, features), ``edge_index.npy`` (2, E), ``y.npy`` and
            ``{train,val,test}_idx.npy``: your own graph; ``x.npy`` is memory-mapped, never loaded whole.
        num_neighbors: fan-out per hop.
        batch_size: seed nodes per batch.
        pool_epochs: epochs of batches sampled offline and reused (DiskGNN: 1); ``0`` samples online every epoch.
        packing: ``"per_batch"`` packs each batch's cold rows contiguously; ``"none"`` reads them from the
            feature table at their own offsets (the random-read baseline, still counted).
        feature_cache_bytes: bytes of the most frequently used rows kept in memory (0 = none).
        project_features: project features to this many dims with a fixed Gaussian matrix (seed 0), scaled to a
            unit root-mean-square, e.g. 128 to mimic ogbn-papers100M's 512-byte rows; ``None`` keeps them.
        store_dir: where the pool and packed features go (default ``offline_sampled/<key>`` under the cache root).
        seed: seed of the sampling and the batch order.
        num_workers: DataLoader workers (each opens the packed file itself).

    Example:
        >>> dm = OfflineSampledDataModule(name="Cora", root="../shared/data/planetoid", split="full",
        ...                               num_neighbors=[5, 5], batch_size=256)  # doctest: +SKIP
        >>> dm.setup("fit"); b = next(iter(dm.train_dataloader())); b.batch_size  # doctest: +SKIP
        256
    """

    def __init__(self, name: Literal["Cora", "CiteSeer"] = "Cora", root: Optional[str] = None,
                 split: Literal["public", "full"] = "full", graph_dir: Optional[str] = None,
                 num_neighbors: list[int] = [10, 10, 10], batch_size: int = 256, pool_epochs: int = 1,  # noqa: B006
                 packing: Literal["per_batch", "none"] = "per_batch", feature_cache_bytes: int = 0,
                 project_features: Optional[int] = None, store_dir: Optional[str] = None, seed: int = 0,
                 num_workers: int = 0) -> None:
        super().__init__()
        require("torch_geometric", "OfflineSampledDataModule")
        check_choice("name", name, ("Cora", "CiteSeer"))
        check_choice("split", split, ("public", "full"))
        check_choice("packing", packing, ("per_batch", "none"))
        for arg in ("graph_dir", "root", "store_dir"):
            check_path_argument(arg, locals()[arg])
        if not isinstance(num_neighbors, (list, tuple)) or not num_neighbors:
            raise ValueError(f"num_neighbors must be a non-empty list of fan-outs per hop, got {num_neighbors!r}")
        for k in num_neighbors:
            check_number("num_neighbors[i]", k, low=1, integer=True)
        check_number("batch_size", batch_size, low=1, integer=True)
        check_number("pool_epochs", pool_epochs, low=0, integer=True)
        check_number("feature_cache_bytes", feature_cache_bytes, low=0, integer=True)
        check_number("seed", seed, integer=True)
        check_number("num_workers", num_workers, low=0, integer=True)
        if project_features is not None:
            check_number("project_features", project_features, low=1, integer=True)
        if graph_dir is not None:
            missing = [f for f in _GRAPH_FILES if not (Path(graph_dir) / f).is_file()]
            if missing:
                raise FileNotFoundError(f"graph_dir {graph_dir} lacks {', '.join(missing)}: it needs "
                                        f"{', '.join(_GRAPH_FILES)} (see the class docstring)")
        self.name, self.root, self.split, self.graph_dir = name, root, split, graph_dir
        self.num_neighbors, self.batch_size = [int(k) for k in num_neighbors], int(batch_size)
        self.pool_epochs, self.packing, self.feature_cache_bytes = int(pool_epochs), packing, int(feature_cache_bytes)
        self.project_features, self.store_dir, self.seed = project_features, store_dir, int(seed)
        self.num_workers = int(num_workers)
        self.io_stats = IOStats()
        self.graph: Any = None
        self._ready = False

    # ------------------------------------------------------------------ the graph and the store
    def _load_graph(self) -> tuple[Any, Any, dict]:
        from torch_geometric.data import Data

        if self.graph_dir is not None:
            d = Path(self.graph_dir)
            x = np.load(d / "x.npy", mmap_mode="r")
            graph = Data(edge_index=torch.from_numpy(np.load(d / "edge_index.npy")).long(),
                         y=torch.from_numpy(np.load(d / "y.npy")).long(), num_nodes=int(x.shape[0]))
            idx = {s: torch.from_numpy(np.load(d / f"{s}_idx.npy")).long() for s in ("train", "val", "test")}
            return graph, x, idx
        from lightning_ext.graph.planetoid import PlanetoidDataModule

        pdm = PlanetoidDataModule(root=self.root, name=self.name, split=self.split, normalize_features=True)
        pdm.setup()
        g = pdm.graph
        graph = Data(edge_index=g.edge_index, y=g.y, num_nodes=g.num_nodes)
        idx = {s: g[f"{s}_mask"].nonzero().flatten() for s in ("train", "val", "test")}
        return graph, g.x.numpy(), idx

    def _key(self, x: Any) -> str:
        source = (str(Path(self.graph_dir).resolve()), os.path.getsize(Path(self.graph_dir) / "x.npy")) \
            if self.graph_dir else (self.name, self.split)
        spec = json.dumps([_FORMAT, source, tuple(x.shape), self.num_neighbors, self.batch_size, self.pool_epochs,
                           self.packing, self.feature_cache_bytes, self.project_features, self.seed])
        return hashlib.sha256(spec.encode()).hexdigest()[:16]

    @override
    def setup(self, stage: Optional[str] = None) -> None:
        """Load the graph; build (or validate and reuse) the feature file, the batch pool and the packed blocks."""
        if self.trainer is not None and self.trainer.world_size > 1:
            raise RuntimeError("OfflineSampledDataModule does not shard its batch pool across processes: run it on "
                               "one device (devices=1, no DDP)")
        if self._ready:
            return
        from lightning_ext.graph.neighbor_sampler import PortableNeighborSampler

        self.graph, x, self.split_idx = self._load_graph()
        key = self._key(x)
        self.dir = Path(self.store_dir).expanduser() if self.store_dir else cache_root("offline_sampled") / key
        self.sampler = PortableNeighborSampler(self.graph, self.num_neighbors, seed=self.seed)
        self.num_train_batches = -(-int(self.split_idx["train"].numel()) // self.batch_size)
        if not self._valid(key):
            self._build(key, x)
        meta = json.loads((self.dir / "meta.json").read_text())
        self.feature_dim, self.num_classes = int(meta["feature_dim"]), int(meta["num_classes"])
        self.features = np.load(self.dir / "features.npy", mmap_mode="r")
        if self.pool_epochs:
            self.pool = torch.load(self.dir / "pool.pt", weights_only=True)
            packed = torch.load(self.dir / "packed_index.pt", weights_only=True)
            self.cache_ids, self.offsets = packed["cache_ids"], packed["offsets"]
            self.cache_rows = torch.from_numpy(np.ascontiguousarray(self.features[self.cache_ids.numpy()]))
            self.cache_pos = torch.full((self.graph.num_nodes,), -1, dtype=torch.long)
            self.cache_pos[self.cache_ids] = torch.arange(self.cache_ids.numel())
        self._ready = True

    def _valid(self, key: str) -> bool:
        try:
            meta = json.loads((self.dir / "meta.json").read_text())
            return meta["key"] == key and all((self.dir / f).stat().st_size == size
                                              for f, size in meta["sizes"].items())
        except (OSError, ValueError, KeyError):
            return False

    def _build(self, key: str, x: Any) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "meta.json").unlink(missing_ok=True)  # the meta file marks a complete store: write it last
        rows = x.shape[0]
        proj = None
        if self.project_features is not None:
            proj = torch.randn(x.shape[1], self.project_features, generator=torch.Generator().manual_seed(0))
            proj /= x.shape[1] ** 0.5
        dim = self.project_features or x.shape[1]
        with atomic_path(self.dir / "features.npy") as tmp:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(rows, dim))
            sq = 0.0
            for lo in range(0, rows, 65536):  # in chunks: the source may not fit in memory
                chunk = torch.from_numpy(np.array(x[lo: lo + 65536], dtype=np.float32))  # a writable copy
                chunk = chunk @ proj if proj is not None else chunk
                sq += float(chunk.double().pow(2).sum())
                out[lo: lo + 65536] = chunk.numpy()
            if proj is not None:  # one scalar: projected features get unit root-mean-square, geometry unchanged
                rms = (sq / max(rows * dim, 1)) ** 0.5 or 1.0
                for lo in range(0, rows, 65536):
                    out[lo: lo + 65536] /= rms
            out.flush()
            del out
        files = ["features.npy"]
        if self.pool_epochs:
            pool = [self._sample_train(k) for k in range(self.pool_epochs * self.num_train_batches)]
            atomic_torch_save(pool, self.dir / "pool.pt")
            self._pack(pool, rows, dim)
            files += ["pool.pt", "packed_index.pt", "packed.bin"]
        sizes = {f: (self.dir / f).stat().st_size for f in files}
        atomic_write_json({"key": key, "sizes": sizes, "feature_dim": int(dim),
                           "num_classes": int(self.graph.y.max()) + 1}, self.dir / "meta.json")

    def _pack(self, pool: list, rows: int, dim: int) -> None:
        counts = torch.zeros(rows, dtype=torch.long)
        for b in pool:
            counts[b["node"].long()] += 1
        n_cache = min(self.feature_cache_bytes // (dim * 4), int((counts > 0).sum()))
        cache_ids = torch.sort(torch.argsort(counts, descending=True, stable=True)[:n_cache]).values
        cached = torch.zeros(rows, dtype=torch.bool)
        cached[cache_ids] = True
        features = np.load(self.dir / "features.npy", mmap_mode="r")
        offsets = [0]
        with atomic_path(self.dir / "packed.bin") as tmp, open(tmp, "wb") as f:
            for b in pool:
                node = b["node"].long()
                cold = node[~cached[node]] if self.packing == "per_batch" else node[:0]
                f.write(np.ascontiguousarray(features[cold.numpy()], dtype=np.float32).tobytes())
                offsets.append(offsets[-1] + int(cold.numel()))
        atomic_torch_save({"cache_ids": cache_ids, "offsets": torch.tensor(offsets)}, self.dir / "packed_index.pt")

    # ------------------------------------------------------------------ sampling and batches
    def _seeds(self, epoch: int, i: int) -> torch.Tensor:
        train = self.split_idx["train"]
        perm = torch.randperm(train.numel(), generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
        return train[perm[i * self.batch_size: (i + 1) * self.batch_size]]

    def _sample(self, seeds: torch.Tensor, epoch: int) -> dict:
        from torch_geometric.sampler import NodeSamplerInput

        self.sampler.set_epoch(epoch)
        out = self.sampler.sample_from_nodes(NodeSamplerInput(input_id=seeds, node=seeds))
        return {"node": out.node.int(), "row": out.row.int(), "col": out.col.int(), "batch_size": int(seeds.numel())}

    def _sample_train(self, key: int) -> dict:
        epoch, i = divmod(key, self.num_train_batches)
        return self._sample(self._seeds(epoch, i), epoch)

    def _features(self, key: int, node: torch.Tensor) -> torch.Tensor:
        row_bytes = self.feature_dim * 4
        if not self.pool_epochs or self.packing == "none":  # random reads from the feature table, counted
            uniq, inv = torch.unique(node, return_inverse=True)
            self.io_stats.rows += int(uniq.numel())
            self.io_stats.bytes += int(uniq.numel()) * row_bytes
            self.io_stats.pages += pages_touched(uniq, row_bytes)
            return torch.from_numpy(np.ascontiguousarray(self.features[uniq.numpy()])).index_select(0, inv)
        pos = self.cache_pos[node]
        x = torch.empty(node.numel(), self.feature_dim)
        hit = pos >= 0
        x[hit] = self.cache_rows[pos[hit]]
        lo, hi = int(self.offsets[key]), int(self.offsets[key + 1])
        if hi > lo:
            with open(self.dir / "packed.bin", "rb") as f:
                f.seek(lo * row_bytes)
                block = np.fromfile(f, dtype=np.float32, count=(hi - lo) * self.feature_dim)
            x[~hit] = torch.from_numpy(block).view(hi - lo, self.feature_dim)
        self.io_stats.rows += hi - lo
        self.io_stats.bytes += (hi - lo) * row_bytes
        self.io_stats.pages += (-(-hi * row_bytes // 4096) - lo * row_bytes // 4096) if hi > lo else 0
        self.io_stats.cache_hits += int(hit.sum())
        return x

    def batch(self, key: int, stage: str = "train") -> Any:
        """The mini-batch for a pool key (training) or a batch index (``"val"``/``"test"``)."""
        from torch_geometric.data import Data

        if stage == "train":
            s = self.pool[key] if self.pool_epochs else self._sample_train(key)
        else:
            seeds = self.split_idx[stage][key * self.batch_size: (key + 1) * self.batch_size]
            s = self._sample(seeds, epoch=-1 if stage == "val" else -2)
        node = s["node"].long()
        x = self._features(key, node) if stage == "train" else \
            torch.from_numpy(np.ascontiguousarray(self.features[node.numpy()]))
        self.io_stats.calls += stage == "train"
        return Data(x=x, y=self.graph.y[node], edge_index=torch.stack([s["row"], s["col"]]).long(), n_id=node,
                    batch_size=s["batch_size"], num_nodes=node.numel())

    @override
    def train_dataloader(self) -> DataLoader:
        """Seeded new order of the pooled (or freshly sampled) training batches each epoch; resumable mid-epoch."""
        sampler = _PoolSampler(self.num_train_batches, self.pool_epochs, self.seed)
        return ResumableDataLoader(_Batches(self, "train"), batch_size=1, sampler=sampler, collate_fn=_single,
                                   num_workers=self.num_workers)

    def _eval_loader(self, stage: str) -> DataLoader:
        n = -(-int(self.split_idx[stage].numel()) // self.batch_size)
        return DataLoader(_Batches(self, stage), batch_size=1, sampler=range(n), collate_fn=_single,
                          num_workers=self.num_workers)

    @override
    def val_dataloader(self) -> DataLoader:
        """Validation nodes, sampled online with a fixed seed."""
        return self._eval_loader("val")

    @override
    def test_dataloader(self) -> DataLoader:
        """Test nodes, sampled online with a fixed seed."""
        return self._eval_loader("test")
