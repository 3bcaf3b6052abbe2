"""RelationalDataModule: a SQLite database as a temporal heterogeneous graph, with a forecast task's seed rows."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_ext.core.optional import require
from lightning_ext.core.paths import cache_root
from lightning_ext.core.sampling import EpochSampler, ResumableDataLoader
from lightning_ext.core.validation import check_choice, check_number
from lightning_ext.graph.relational_db import (
    ML100K_TABLES,
    ForecastTask,
    SQLiteSource,
    build_hetero_data,
    write_movielens100k_sqlite,
)


class _AttachTarget:
    """NodeLoader transform: ``batch[entity].y`` = the labels of the batch's seed rows (by ``input_id``)."""

    def __init__(self, entity: str, y: torch.Tensor) -> None:
        self.entity, self.y = entity, y

    def __call__(self, batch: Any) -> Any:
        batch[self.entity].y = self.y[batch[self.entity].input_id]
        return batch


class _SeedOrder(EpochSampler):
    """The seeded, resumable shuffle of training rows; its epoch also varies the neighbour draws."""

    def __init__(self, num_samples: int, seed: int, neighbor_sampler: Any) -> None:
        super().__init__(num_samples, shuffle=True, seed=seed)
        self.neighbor_sampler = neighbor_sampler

    @override
    def set_epoch(self, epoch: int) -> None:
        """Set the shuffle's and the neighbour sampler's epoch."""
        super().set_epoch(epoch)
        self.neighbor_sampler.set_epoch(int(epoch))


class RelationalDataModule(LightningDataModule):
    """Relational Deep Learning's data: a SQLite database as a temporal HeteroData, a forecast task's seed rows.

    Fey et al., "Position: Relational Deep Learning" (ICML 2024, arXiv 2312.04615); RelBench (arXiv 2407.20060),
    https://github.com/snap-stanford/relbench. ``setup`` reads every table with Python's ``sqlite3``, builds the
    graph (:func:`~lightning_ext.graph.relational_db.build_hetero_data`: one node type per table, ``f2p``/``rev_f2p``
    edges per foreign key, ``time`` in Unix seconds, per-table features), runs the task's label SQL for the seed times
    of each split (split by time, RelBench's rule) and serves batches of seed rows with their temporal
    neighbourhoods: PyG's ``NodeLoader`` over :class:`~lightning_ext.graph.neighbor_sampler.PortableNeighborSampler`
    with ``time_attr="time"``, so no sampled row is later than its seed's time (disjoint subgraphs, no pyg-lib).
    A batch is a ``HeteroData`` whose entity type holds ``y``, ``seed_time`` and ``batch_size`` (seeds first).

    Defaults: MovieLens-100K (recbole's copy written to SQLite under the cache, ``users``/``movies``/``ratings``)
    and the task "movie-active-14d" (is a movie rated in the next 14 days; val 1998-02-25, test 1998-03-25).

    Args:
        database: a :class:`~lightning_ext.graph.relational_db.SQLiteSource` (path and schema); ``None`` = ML-100K.
        task: a :class:`~lightning_ext.graph.relational_db.ForecastTask`; ``None`` = movie-active-14d.
        num_neighbors: fan-out per hop (``-1`` = all), the same for every edge type.
        temporal_strategy: ``"uniform"`` among rows no later than the seed time, or ``"last"`` (most recent).
        batch_size: seed rows per batch.
        num_workers: DataLoader workers.
        seed: seed of the training order and of the neighbour draws.

    Example:
        >>> dm = RelationalDataModule(num_neighbors=[4], batch_size=64)  # doctest: +SKIP
        >>> dm.setup("fit"); next(iter(dm.train_dataloader()))["movies"].y.shape  # doctest: +SKIP
        torch.Size([64])
    """

    def __init__(self, database: Optional[SQLiteSource] = None, task: Optional[ForecastTask] = None,
                 num_neighbors: list[int] = [32, 16, 8], temporal_strategy: Literal["uniform", "last"] = "uniform",
                 batch_size: int = 512, num_workers: int = 0, seed: int = 0) -> None:  # noqa: B006
        super().__init__()
        require("torch_geometric", "RelationalDataModule")
        if database is not None and not isinstance(database, SQLiteSource):
            raise ValueError(f"database must be a SQLiteSource (path and tables) or None, got {database!r}")
        if task is not None and not isinstance(task, ForecastTask):
            raise ValueError(f"task must be a ForecastTask or None, got {task!r}")
        if not isinstance(num_neighbors, (list, tuple)) or not num_neighbors:
            raise ValueError(f"num_neighbors must be a non-empty list of ints (fan-out per hop), got {num_neighbors!r}")
        for k in num_neighbors:
            if isinstance(k, bool) or not isinstance(k, int) or k < -1:
                raise ValueError(f"num_neighbors must hold ints >= 0 or -1 (all), got {k!r} in {num_neighbors!r}")
        check_choice("temporal_strategy", temporal_strategy, ("uniform", "last"))
        check_number("batch_size", batch_size, low=1, integer=True)
        check_number("num_workers", num_workers, low=0, integer=True)
        check_number("seed", seed, integer=True)
        self.database, self.task = database, task if task is not None else ForecastTask()
        if database is not None and self.task.entity_table not in database.tables:
            raise ValueError(f"task.entity_table {self.task.entity_table!r} is not among database.tables "
                             f"{sorted(database.tables)}")
        self.num_neighbors, self.temporal_strategy = [int(k) for k in num_neighbors], temporal_strategy
        self.batch_size, self.num_workers, self.seed = int(batch_size), int(num_workers), int(seed)
        self.data: Any = None
        self.stats: dict[str, Any] = {}

    def _source(self) -> SQLiteSource:
        if self.database is not None:
            return self.database
        path = default_database_path()
        if not path.is_file():
            write_movielens100k_sqlite(path)
        return SQLiteSource(str(path), ML100K_TABLES)

    @override
    def prepare_data(self) -> None:
        """Write the default ML-100K SQLite file once (nothing for a user database)."""
        self._source()

    @override
    def setup(self, stage: str) -> None:
        """Read the tables, build the graph, compute the task's labels per split (once); refuse DDP."""
        if self.trainer is not None and self.trainer.world_size > 1:
            raise RuntimeError("RelationalDataModule does not shard its seed order or neighbour draws across "
                               "processes: run it on one device (devices=1, no DDP)")
        if self.data is not None:
            return
        start = time.perf_counter()
        source = self._source()
        frames = source.read()
        data, ids = build_hetero_data(source, frames, fit_until=self.task.val_ts)  # statistics: train period
        built = time.perf_counter()
        task = self.task
        timed = [data[t].time for t in data.node_types if "time" in data[t]]
        if not timed:
            raise ValueError("the database has no table with a time_col: a forecast task needs one (set "
                             "tables[<name>].time_col)")
        first, last = int(min(t.min() for t in timed)), int(max(t.max() for t in timed))
        labels = task.labels(source, task.seed_times(first, last))
        lookup = {v: i for i, v in enumerate(ids[task.entity_table].tolist())}
        self.splits: dict[str, dict[str, torch.Tensor]] = {}
        for split, df in labels.items():
            rows = df[task.entity_col].map(lookup)
            if rows.isna().any():
                raise ValueError(f"label_sql returned {task.entity_col} values that are not primary keys of "
                                 f"{task.entity_table} (e.g. {df[task.entity_col][rows.isna()].iloc[0]!r})")
            if len(df) == 0:
                raise ValueError(f"label_sql returned no rows for the {split} split's seed times")
            self.splits[split] = {"node": torch.tensor(rows.to_numpy(np.int64)),
                                  "time": torch.tensor(df["timestamp"].to_numpy(np.int64)),
                                  "y": torch.tensor(df["label"].to_numpy(np.float32))}
        self.data, self.ids, self.entity_table = data, ids, task.entity_table
        self.stats = {"build_s": built - start, "labels_s": time.perf_counter() - built,
                      "nodes": {t: int(data[t].num_nodes) for t in data.node_types},
                      "edges": {"__".join(et): int(data[et].edge_index.shape[1]) for et in data.edge_types},
                      "rows": {s: int(v["y"].numel()) for s, v in self.splits.items()},
                      "positive_rate": {s: float(v["y"].mean()) for s, v in self.splits.items()},
                      "seed_times": {s: sorted(set(v["time"].tolist())) for s, v in self.splits.items()}}

    # ------------------------------------------------------------------ what the model is built from
    def metadata(self) -> tuple[list[str], list[tuple[str, str, str]]]:
        """Node types and edge types of the graph (after ``setup``)."""
        self._need_setup()
        return self.data.metadata()

    @property
    def feature_dims(self) -> dict[str, int]:
        """Feature size of every node type (after ``setup``)."""
        self._need_setup()
        return {t: int(self.data[t].x.shape[1]) for t in self.data.node_types}

    @property
    def timed_types(self) -> list[str]:
        """Node types with a time attribute."""
        self._need_setup()
        return [t for t in self.data.node_types if "time" in self.data[t]]

    @property
    def train_set(self) -> torch.Tensor:
        """The training seed rows (their count is the samples per epoch)."""
        self._need_setup()
        return self.splits["train"]["y"]

    def _need_setup(self) -> None:
        if self.data is None:
            raise RuntimeError("call setup() first: the graph is built from the database there")

    # ------------------------------------------------------------------ loaders
    def node_loader(self, split: str, sampler: Any = None) -> Any:
        """PyG's ``NodeLoader`` over one split's seed rows (``collate_fn`` turns row positions into a batch)."""
        from torch_geometric.loader import NodeLoader

        from lightning_ext.graph.neighbor_sampler import PortableNeighborSampler

        self._need_setup()
        s = self.splits[split]
        if sampler is None:
            sampler = PortableNeighborSampler(self.data, self.num_neighbors, time_attr="time",
                                              temporal_strategy=self.temporal_strategy, seed=self.seed)
        return NodeLoader(self.data, node_sampler=sampler, input_nodes=(self.entity_table, s["node"]),
                          input_time=s["time"], transform=_AttachTarget(self.entity_table, s["y"]),
                          filter_per_worker=True, batch_size=self.batch_size)

    @override
    def train_dataloader(self) -> DataLoader:
        """Training seed rows in a seeded new order each epoch, resumable mid-epoch."""
        loader = self.node_loader("train")
        n = int(self.splits["train"]["y"].numel())
        return ResumableDataLoader(range(n), batch_size=self.batch_size,
                                   sampler=_SeedOrder(n, self.seed, loader.node_sampler),
                                   collate_fn=loader.collate_fn, num_workers=self.num_workers)

    def _eval_loader(self, split: str) -> DataLoader:
        loader = self.node_loader(split)
        loader.node_sampler.set_epoch(-1 if split == "val" else -2)  # fixed draws, distinct from training's
        n = int(self.splits[split]["y"].numel())
        return DataLoader(range(n), batch_size=self.batch_size, shuffle=False, collate_fn=loader.collate_fn,
                          num_workers=self.num_workers)

    @override
    def val_dataloader(self) -> DataLoader:
        """Validation seed rows in order, fixed neighbour draws."""
        return self._eval_loader("val")

    @override
    def test_dataloader(self) -> DataLoader:
        """Test seed rows in order, fixed neighbour draws."""
        return self._eval_loader("test")

    @override
    def predict_dataloader(self) -> DataLoader:
        """The test seed rows (predictions map back through ``ids[entity_table]``)."""
        return self._eval_loader("test")


def default_database_path() -> Path:
    """Where :class:`RelationalDataModule` writes ML-100K's SQLite file when ``database`` is ``None``."""
    return cache_root("relational") / "ml100k.sqlite"
