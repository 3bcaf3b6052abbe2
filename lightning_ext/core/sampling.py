"""One seeded, sharded, resumable sampler for every training loader.

:class:`EpochSampler` shuffles ``range(num_samples)`` with a generator seeded by ``(seed, epoch)``, shards it
like :class:`~torch.utils.data.DistributedSampler` (rank ``r`` of ``W`` takes ``r, r + W, ...``, padded by
wrapping) and is itself a ``DistributedSampler``, so Lightning neither wraps nor re-shuffles it and calls its
``set_epoch``. Its ``state_dict`` records how many indices were consumed, so a run resumed mid-epoch continues
with exactly the indices the interrupted run had not yet seen. Two ranks with batch ``B/2`` see exactly the
batches one process sees with batch ``B``.

:class:`ResumableDataLoader` is the DataLoader to put it in: Lightning saves a train loader's state only when the
*loader* has ``state_dict``/``load_state_dict``, and a loader reads ahead of the loop (worker prefetching), so
the sampler's own count runs ahead of the batches trained on. The loader counts the batches it has handed to
the loop and, on resume, makes the sampler skip exactly those.
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Optional

import numpy as np
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler


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


class ResumableDataLoader(DataLoader):
    """A :class:`~torch.utils.data.DataLoader` whose ``state_dict`` is the epoch and the batches yielded in it.

    Lightning (2.6) saves ``state_dict()`` of a stateful train loader in every checkpoint and, when it resumes
    a fit mid-epoch, calls ``load_state_dict`` before creating the epoch's iterator. Batches are counted as
    they leave the loader's iterator (Lightning's fetcher does not read ahead of a loader that has a length),
    so batches a worker prefetched but the loop never received are not counted. On resume, an
    :class:`EpochSampler` inside a plain batch sampler skips ``batches * batch_size`` indices without
    loading them; any other sampler is replayed and the first ``batches`` batches are dropped.

    Example:
        >>> dl = ResumableDataLoader(list(range(10)), batch_size=2, sampler=EpochSampler(10, seed=0))
        >>> it = iter(dl); first = [next(it), next(it)]; state = dl.state_dict()
        >>> state["batches"], [b.tolist() for b in first] == [b.tolist() for b in list(dl)[:2]]
        (2, True)
        >>> fresh = ResumableDataLoader(list(range(10)), batch_size=2, sampler=EpochSampler(10, seed=0))
        >>> fresh.load_state_dict(state)
        >>> [b.tolist() for b in fresh] == [b.tolist() for b in list(dl)[2:]]
        True
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # noqa: D107 - DataLoader's arguments
        super().__init__(*args, **kwargs)
        self._epoch_yielded = 0
        self._skip: Optional[tuple[int, int]] = None  # (epoch, batches) to skip on the next iteration

    def _sampler_epoch(self) -> int:
        return int(getattr(self.sampler, "epoch", 0))

    def __iter__(self) -> Iterator[Any]:
        epoch, skip = self._sampler_epoch(), 0
        if self._skip is not None and self._skip[0] == epoch:
            skip = self._skip[1]
        self._skip = None
        replay = 0
        if skip:
            if isinstance(self.sampler, EpochSampler) and type(self.batch_sampler) is BatchSampler:
                self.sampler.load_state_dict({"epoch": epoch, "consumed": skip * self.batch_sampler.batch_size})
            else:
                replay = skip
        return self._counted(super().__iter__(), skip, replay)

    def _counted(self, iterator: Iterator[Any], start: int, replay: int) -> Iterator[Any]:
        self._epoch_yielded = start
        for i, batch in enumerate(iterator):
            if i < replay:
                continue
            self._epoch_yielded += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """The sampler's epoch and the batches of it already handed to the training loop."""
        return {"epoch": self._sampler_epoch(), "batches": self._epoch_yielded}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: the next iteration of ``state['epoch']`` starts after its first ``state['batches']`` batches."""
        epoch, batches = int(state["epoch"]), int(state["batches"])
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)
        self._skip = (epoch, batches)


def epoch_loader(dataset: Any, batch_size: int, *, train: bool, trainer: Any = None, shuffle: bool = True,
                 seed: int = 0, num_workers: int = 0, pin_memory: bool = False, drop_last: bool = False) -> DataLoader:
    """The library's loader for an in-memory dataset: for training a :class:`ResumableDataLoader` over an
    :class:`EpochSampler` (seeded per-epoch order, sharded over ``trainer``'s ranks, resumable mid-epoch), for
    evaluation a plain in-order :class:`~torch.utils.data.DataLoader`.

    Example:
        >>> [b.tolist() for b in epoch_loader(list(range(4)), 2, train=False)]
        [[0, 1], [2, 3]]
    """
    if not train:
        return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory,
                          persistent_workers=num_workers > 0)
    world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
    sampler = EpochSampler(len(dataset), shuffle=shuffle, seed=seed, rank=rank, world_size=world)
    return ResumableDataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                               pin_memory=pin_memory, persistent_workers=num_workers > 0, drop_last=drop_last)


class SplitLoaders:
    """Mixin for a LightningDataModule holding its splits in memory: ``train/val/test_dataloader`` from
    :meth:`split_dataset` through :func:`epoch_loader`, with the module's ``batch_size``, ``shuffle``,
    ``shuffle_seed`` and ``num_workers`` (put it before ``LightningDataModule`` in the bases)."""

    batch_size: int
    shuffle: bool
    shuffle_seed: int
    num_workers: int

    def split_dataset(self, split: str) -> Any:
        """The dataset of ``split`` (``"train"``, ``"val"`` or ``"test"``); raise when ``setup`` has not run."""
        raise NotImplementedError

    def _split_loader(self, split: str) -> DataLoader:
        return epoch_loader(self.split_dataset(split), self.batch_size, train=split == "train",
                            trainer=getattr(self, "trainer", None), shuffle=self.shuffle, seed=self.shuffle_seed,
                            num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        """Seeded, sharded, resumable training batches."""
        return self._split_loader("train")

    def val_dataloader(self) -> DataLoader:
        """Validation batches in order."""
        return self._split_loader("val")

    def test_dataloader(self) -> DataLoader:
        """Test batches in order."""
        return self._split_loader("test")
