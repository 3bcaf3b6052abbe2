"""One seeded, sharded, resumable sampler for every training loader.

:class:`EpochSampler` shuffles ``range(num_samples)`` with a generator seeded by ``(seed, epoch)``, shards it
like :class:`~torch.utils.data.DistributedSampler` (rank ``r`` of ``W`` takes ``r, r + W, ...``, padded by
wrapping) and is itself a ``DistributedSampler``, so Lightning neither wraps nor re-shuffles it and calls its
``set_epoch``. Its ``state_dict`` records how many indices were consumed, so a run resumed mid-epoch continues
with exactly the indices the interrupted run had not yet seen. Two ranks with batch ``B/2`` see exactly the
batches one process sees with batch ``B``.
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import numpy as np
from torch.utils.data import DistributedSampler


class EpochSampler(DistributedSampler):
    """Seeded per-epoch shuffle of ``range(num_samples)``, sharded across ranks, resumable mid-epoch.

    Args:
        num_samples: dataset length.
        shuffle: shuffle each epoch (seeded by ``(seed, epoch)``); otherwise ``0..n-1``.
        seed: shuffle seed.
        rank: this process's rank.
        world_size: number of processes.
        drop_last: drop the tail instead of padding every rank to ``ceil(n / world_size)``.

    Example:
        >>> s = EpochSampler(6, seed=0)
        >>> a = list(s); s.set_epoch(1); b = list(s)
        >>> sorted(a) == list(range(6)) and a != b
        True
    """

    def __init__(self, num_samples: int, shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1,
                 drop_last: bool = False) -> None:  # noqa: D107 - no super().__init__: no dataset needed
        if num_samples < 1:
            raise ValueError(f"The sampler needs at least one sample, got num_samples={num_samples}.")
        if not 0 <= rank < world_size:
            raise ValueError(f"`rank` must be in [0, {world_size}), got {rank}.")
        self.num_samples_total, self.shuffle, self.seed = int(num_samples), bool(shuffle), int(seed)
        self.rank, self.world_size, self.drop_last = int(rank), int(world_size), bool(drop_last)
        self.num_replicas = self.world_size
        self.epoch = 0
        self._consumed = 0  # indices of the current epoch already yielded (for mid-epoch resume)
        self._resume_from = 0

    @property
    def num_samples(self) -> int:  # DistributedSampler's name for the per-rank length
        return len(self)

    def set_epoch(self, epoch: int) -> None:
        if int(epoch) != self.epoch:
            self._resume_from = 0
        self.epoch = int(epoch)

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples_total // self.world_size
        return math.ceil(self.num_samples_total / self.world_size)

    def indices(self) -> np.ndarray:
        """This rank's indices for the current epoch, in order."""
        n = self.num_samples_total
        order = np.random.default_rng([self.seed, self.epoch]).permutation(n) if self.shuffle else np.arange(n)
        total = len(self) * self.world_size
        if total > len(order):
            order = np.concatenate([order, np.resize(order, total - len(order))])
        return order[:total][self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        ids = self.indices().tolist()
        start, self._resume_from = self._resume_from, 0
        self._consumed = start
        for i in ids[start:]:
            self._consumed += 1
            yield i

    def state_dict(self) -> dict[str, Any]:
        """Epoch and indices consumed in it (a DataLoader with workers prefetches: the count covers that)."""
        return {"epoch": self.epoch, "consumed": self._consumed, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: the next iteration of ``state['epoch']`` skips the ``consumed`` indices."""
        self.epoch = int(state["epoch"])
        self._resume_from = int(state.get("consumed", 0))
