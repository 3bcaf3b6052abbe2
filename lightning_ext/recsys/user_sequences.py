"""Per-user chronological item sequences with a leave-one-out next-item split (MovieLens-100K), for HCN."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, TensorDataset
from typing_extensions import override

from lightning_ext.core.sampling import epoch_loader
from lightning_ext.core.validation import NonNegativeInt, PositiveInt, check_number, check_positive_int
from lightning_ext.recsys.interactions import _ShardSampler
from lightning_ext.data.movielens100k import find_ml100k_inter, read_inter_file
from lightning_ext.recsys.movielens100k import MovieLens100KDataModule


def left_padded(items: list[int], max_len: int) -> list[int]:
    """The last ``max_len`` of ``items`` (ids >= 1), left-padded with 0."""
    tail = items[-max_len:]
    return [0] * (max_len - len(tail)) + tail


class _UserBatches(Dataset):
    def __init__(self, batches: list[dict]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict:
        return self.batches[i]


def sequence_eval_batches(histories: list[list[int]], targets: list[int], max_len: int,
                          batch_size: int) -> list[dict]:
    """Full-ranking batches ``{"history": (B, max_len), "target": (2, B), "exclude": (2, n)}``.

    ``target`` holds ``(row, item)`` of each user's held-out item and ``exclude`` every earlier item of the user
    (masked before ranking), both 0-indexed items; ``history`` uses ids ``item + 1`` with 0 as padding.
    """
    out = []
    for start in range(0, len(targets), batch_size):
        hist = histories[start:start + batch_size]
        rows = [r for r, h in enumerate(hist) for _ in h]
        seen = [i - 1 for h in hist for i in h]
        out.append({
            "history": torch.tensor([left_padded(h, max_len) for h in hist], dtype=torch.long),
            "target": torch.tensor([list(range(len(hist))), [t - 1 for t in targets[start:start + batch_size]]],
                                   dtype=torch.long),
            "exclude": torch.tensor([rows, seen], dtype=torch.long).reshape(2, -1),
        })
    return out


class UserSequenceDataModule(LightningDataModule):
    """MovieLens-100K as per-user chronological sequences: leave-one-out next-item prediction (last item test).

    Each user's ratings (every rating is an interaction) are sorted by timestamp (ties by file order). The last
    item is the test target, the second-to-last the validation target; every earlier position ``t >= 1`` is a
    training sample ``(the items before t, item t)``. Sequences are truncated to their last ``max_len`` items and
    left-padded with 0; item ids are shifted by one (``1..num_items``). Training batches are
    ``(history (B, max_len), target (B,))`` with the target 0-indexed; validation/test batches are full-ranking
    dicts (see :func:`sequence_eval_batches`) for :class:`~lightning_ext.recsys.metrics.RankingMetrics` (Recall@K
    with one held-out item is HR@K).

    Args:
        max_len: history length kept.
        min_items: users with fewer interactions are dropped (at least 3: one train, one val, one test).
        batch_size: training samples per batch.
        eval_batch_size: users per evaluation batch.
        shuffle_seed: seed of the per-epoch order.
        path: the ``.inter`` file (default: inside the recbole package).

    Example:
        >>> dm = UserSequenceDataModule()  # doctest: +SKIP
        >>> dm.setup(); dm.num_items, len(dm.train_set)  # doctest: +SKIP
        (1682, 97171)
    """

    def __init__(self, max_len: PositiveInt = 50, min_items: PositiveInt = 3, batch_size: PositiveInt = 256,
                 eval_batch_size: PositiveInt = 256, shuffle_seed: int = 0, path: Optional[str] = None,
                 num_workers: NonNegativeInt = 0) -> None:
        super().__init__()
        check_positive_int("max_len", max_len)
        check_number("min_items (at least 3: train, validation and test items)", min_items, low=3, integer=True)
        check_positive_int("batch_size", batch_size)
        check_positive_int("eval_batch_size", eval_batch_size)
        check_number("shuffle_seed", shuffle_seed, integer=True)
        check_number("num_workers", num_workers, low=0, integer=True)
        self.max_len, self.min_items, self.batch_size, self.eval_batch_size = max_len, min_items, batch_size, eval_batch_size
        self.shuffle_seed, self.num_workers = shuffle_seed, num_workers
        self.path = path or str(find_ml100k_inter())
        self.num_items: Optional[int] = None
        self.train_set = None
        self.val_batches: list[dict] = []
        self.test_batches: list[dict] = []

    def load_sequences(self) -> tuple[list[list[int]], int]:
        """Each user's items (0-indexed) in time order, and the number of items."""
        nu, ni = MovieLens100KDataModule.NUM_USERS, MovieLens100KDataModule.NUM_ITEMS
        raw = read_inter_file(Path(self.path), nu, ni)
        order = np.lexsort((np.arange(len(raw)), raw[:, 3], raw[:, 0]))  # by user, time, file order
        raw = raw[order]
        users, starts = np.unique(raw[:, 0], return_index=True)
        items = (raw[:, 1] - 1).astype(np.int64)
        return [items[a:b].tolist() for a, b in zip(starts, list(starts[1:]) + [len(raw)])], ni

    @override
    def setup(self, stage: Optional[str] = None) -> None:
        """Build the training samples and the evaluation batches once."""
        if self.train_set is not None:
            return
        sequences, self.num_items = self.load_sequences()
        for seq in sequences:
            if seq and (min(seq) < 0 or max(seq) >= self.num_items):
                raise ValueError(f"item ids must lie in [0, {self.num_items}), got [{min(seq)}, {max(seq)}].")
        sequences = [[i + 1 for i in s] for s in sequences if len(s) >= self.min_items]
        if not sequences:
            raise ValueError(f"no user has at least min_items={self.min_items} interactions.")
        hist, target = [], []
        for seq in sequences:
            for t in range(1, len(seq) - 2):
                hist.append(left_padded(seq[:t], self.max_len))
                target.append(seq[t] - 1)
        self.train_set = TensorDataset(torch.tensor(hist, dtype=torch.long), torch.tensor(target, dtype=torch.long))
        self.num_users = len(sequences)
        self.val_batches = sequence_eval_batches([s[:-2] for s in sequences], [s[-2] for s in sequences],
                                                 self.max_len, self.eval_batch_size)
        self.test_batches = sequence_eval_batches([s[:-1] for s in sequences], [s[-1] for s in sequences],
                                                  self.max_len, self.eval_batch_size)
        self.item_frequency = torch.bincount(self.train_set.tensors[1], minlength=self.num_items)

    @override
    def train_dataloader(self):
        """``(history, target)`` batches, shuffled per epoch (resumable mid-epoch)."""
        return epoch_loader(self.train_set, self.batch_size, train=True, trainer=getattr(self, "trainer", None),
                            seed=self.shuffle_seed, num_workers=self.num_workers)

    def _eval_loader(self, batches: list[dict]) -> DataLoader:
        trainer = getattr(self, "trainer", None)
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        # whole user batches per rank, no padding: RankingMetrics sums every rank's users once
        return DataLoader(_UserBatches(batches), sampler=_ShardSampler(len(batches), world, rank), batch_size=None)

    @override
    def val_dataloader(self):
        """Every user's second-to-last item, full ranking."""
        return self._eval_loader(self.val_batches)

    @override
    def test_dataloader(self):
        """Every user's last item, full ranking."""
        return self._eval_loader(self.test_batches)
