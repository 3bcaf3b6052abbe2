"""TemporalEventDataModule: MovieLens-100K ratings as a continuous-time dynamic graph (a PyG ``TemporalData``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from typing_extensions import override

from lightning_ext.core.optional import require
from lightning_ext.core.sampling import EpochSampler, ResumableDataLoader
from lightning_ext.core.validation import OpenUnitInterval, PositiveInt, check_choice, check_number, check_positive_int

NUM_USERS, NUM_ITEMS = 943, 1682


def load_ml100k_events(path: Optional[Path] = None) -> dict[str, Any]:
    """ML-100K ratings as events sorted by time (ties keep file order): ``src`` user, ``dst`` ``943 + movie``,
    ``t`` seconds since the first rating, ``msg`` the rating one-hot (5), ``order`` the row in the file."""
    from lightning_ext.data.movielens100k import find_ml100k_inter, read_inter_file

    raw = read_inter_file(Path(path) if path else find_ml100k_inter(), NUM_USERS, NUM_ITEMS)
    order = np.argsort(raw[:, 3], kind="stable")
    raw = raw[order]
    t = raw[:, 3].astype(np.int64)
    rating = raw[:, 2].astype(np.int64)
    return {"src": torch.from_numpy(raw[:, 0].astype(np.int64) - 1),
            "dst": torch.from_numpy(raw[:, 1].astype(np.int64) - 1 + NUM_USERS),
            "t": torch.from_numpy(t - t[0]), "t0": int(t[0]),
            "msg": torch.nn.functional.one_hot(torch.from_numpy(rating - 1), 5).float(),
            "order": torch.from_numpy(order.astype(np.int64))}


class _EventChunks:
    """Events ``[start, end)`` of a ``TemporalData`` read one contiguous chunk per index (``__getitems__``)."""

    def __init__(self, data: Any, neg_dst: torch.Tensor, start: int, end: int) -> None:
        self.data, self.neg_dst, self.start, self.end = data, neg_dst, start, end

    def __len__(self) -> int:
        return self.end - self.start

    def __getitems__(self, idx: list[int]) -> dict[str, torch.Tensor]:
        i = torch.as_tensor(idx, dtype=torch.long) + self.start
        return {"src": self.data.src[i], "dst": self.data.dst[i], "t": self.data.t[i], "msg": self.data.msg[i],
                "neg_dst": self.neg_dst[i], "e_id": i}

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.__getitems__([i])


def _identity(batch: Any) -> Any:
    return batch


class TemporalEventDataModule(LightningDataModule):
    """MovieLens-100K as a continuous-time dynamic graph: chronological events in contiguous temporal batches.

    Each of the 100,000 ratings (recbole's ``ml-100k.inter``) is an event ``(src=user, dst=943+movie, t, msg)``
    with ``msg`` the rating's one-hot (5 dims) and ``t`` in seconds since the first rating; events are sorted by
    time, ties keep file order (``data.order`` holds each event's row in the file: 75.9% of ratings share a
    second with another). The split is chronological by event index, 70/15/15 (the JODIE/TGN convention).
    Batches are contiguous chunks of ``batch_size`` events in time order, never shuffled: ``batch_size`` is the
    temporal batch size of memory-based dynamic GNNs (TGN, PRES). Every event carries one negative destination
    (a random movie), drawn once from ``split_seed`` and identical for every model (TGN's
    ``RandEdgeSampler(seed=...)``); models may draw their own training negatives. Single process only: the
    memory needs the whole stream, so ``setup`` refuses more than one rank.

    Args:
        source: ``"ml-100k"`` (the only source; named for YAML clarity).
        batch_size: temporal batch size (events per batch).
        val_fraction: share of the events (after training) for validation.
        test_fraction: share of the last events for test.
        split_seed: seed of the fixed negative destinations.
        max_events: keep only the first ``max_events`` events in time (a shorter stream; ``None`` keeps all).
        path: the ``ml-100k.inter`` file (default: found inside the installed recbole package).

    Example:
        >>> dm = TemporalEventDataModule(batch_size=200)  # doctest: +SKIP
        >>> dm.setup("fit"); dm.data.num_events, dm.num_nodes  # doctest: +SKIP
        (100000, 2625)
    """

    def __init__(self, source: Literal["ml-100k"] = "ml-100k", batch_size: PositiveInt = 200,
                 val_fraction: OpenUnitInterval = 0.15, test_fraction: OpenUnitInterval = 0.15, split_seed: int = 0,
                 max_events: Optional[PositiveInt] = None, path: Optional[str] = None) -> None:
        super().__init__()
        require("torch_geometric", "TemporalEventDataModule")
        check_choice("source", source, ("ml-100k",))
        check_positive_int("batch_size", batch_size)
        check_number("val_fraction", val_fraction, low=0, high=1, low_open=True, high_open=True)
        check_number("test_fraction", test_fraction, low=0, high=1, low_open=True, high_open=True)
        check_number("split_seed", split_seed, integer=True)
        if max_events is not None:
            check_number("max_events", max_events, low=10, integer=True)
        if val_fraction + test_fraction >= 1:
            raise ValueError(f"val_fraction + test_fraction must be below 1 (got {val_fraction + test_fraction}); "
                             "leave events for training.")
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"path={path!r} does not exist; pass recbole's `ml-100k.inter` or leave it None.")
        self.source, self.batch_size, self.split_seed, self.path = source, batch_size, split_seed, path
        self.val_fraction, self.test_fraction, self.max_events = val_fraction, test_fraction, max_events
        self.data: Any = None
        self.num_nodes = NUM_USERS + NUM_ITEMS
        self.dst_range = (NUM_USERS, NUM_USERS + NUM_ITEMS)
        self.msg_dim = 5

    @override
    def setup(self, stage: Optional[str] = None) -> None:
        """Refuse several ranks; load the events, the split boundaries and the fixed negatives once."""
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.world_size > 1:
            raise ValueError("TemporalEventDataModule is single-process: a memory-based dynamic GNN must see the "
                             "whole event stream in order; train with devices=1.")
        if self.data is not None:
            return
        require("torch_geometric", "TemporalEventDataModule")
        from torch_geometric.data import TemporalData

        ev = load_ml100k_events(Path(self.path) if self.path else None)
        if self.max_events is not None:
            ev = {k: v[: self.max_events] if isinstance(v, torch.Tensor) else v for k, v in ev.items()}
        self.data = TemporalData(src=ev["src"], dst=ev["dst"], t=ev["t"], msg=ev["msg"])
        self.data.order, self.t0 = ev["order"], ev["t0"]
        n = int(self.data.src.numel())
        self.train_end = int(round(n * (1 - self.val_fraction - self.test_fraction)))
        self.val_end = int(round(n * (1 - self.test_fraction)))
        g = torch.Generator().manual_seed(self.split_seed)
        self.neg_dst = torch.randint(self.dst_range[0], self.dst_range[1], (n,), generator=g)

    def split_bounds(self, split: str) -> tuple[int, int]:
        """``(start, end)`` event indices of ``"train"``, ``"val"`` or ``"test"``."""
        if self.data is None:
            raise RuntimeError("call setup() first")
        n = int(self.data.src.numel())
        return {"train": (0, self.train_end), "val": (self.train_end, self.val_end), "test": (self.val_end, n)}[split]

    def _loader(self, split: str) -> ResumableDataLoader:
        start, end = self.split_bounds(split)
        sampler = EpochSampler(end - start, shuffle=False)
        return ResumableDataLoader(_EventChunks(self.data, self.neg_dst, start, end), batch_size=self.batch_size,
                                   sampler=sampler, collate_fn=_identity)

    @override
    def train_dataloader(self) -> ResumableDataLoader:
        """Training events in time order, contiguous batches (resumable mid-epoch)."""
        return self._loader("train")

    @override
    def val_dataloader(self) -> ResumableDataLoader:
        """Validation events in time order, after the training events."""
        return self._loader("val")

    @override
    def test_dataloader(self) -> ResumableDataLoader:
        """Test events in time order, after the validation events."""
        return self._loader("test")
