"""Implicit-feedback user-item interactions for graph collaborative filtering, on a fixed, named protocol.

What every :class:`InteractionDataModule` yields:

- **train**: one epoch = one ``(user, positive, negative)`` BPR triple per training interaction, shuffled, the
  negative drawn uniformly from the items the user has no training interaction with (LightGCN's sampler draws
  users uniformly instead; per-interaction epochs are the usual PyG/NGCF-style choice). Batches are
  ``LongTensor (B, 3)``; the order and the negatives depend only on ``(shuffle_seed, epoch)``, and under DDP
  each rank gets its own share of the same epoch's batches (:class:`BPRBatchSampler`, built on
  :class:`~lightning_ext.core.sampling.EpochSampler`).
- **val / test**: batches of users for full-ranking evaluation, as dicts ``{"users": (B,), "target": (2, m),
  "exclude": (2, n)}`` where ``target`` / ``exclude`` are ``(row in batch, item)`` pairs: the held-out items to
  find, and the known items to mask with ``-inf`` before ranking (training items for validation; training and
  validation items for test). See :mod:`lightning_ext.recsys.metrics`.
- :attr:`InteractionDataModule.interactions`: an :class:`Interactions` record with the counts, the training
  pairs and the graphs the models build on (symmetric-normalised bipartite adjacency, user-item matrix).

The validation split is carved **per user** out of the training interactions (``val_fraction``, seeded by
``split_seed``) for tuning and early stopping; the test split is never used for either. ``val_fraction=0``
trains on all training interactions (then there is no validation loader).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from typing_extensions import override

from lightning_ext.core.sampling import EpochSampler, ResumableDataLoader
from lightning_ext.core.validation import (
    NonNegativeInt, PositiveInt, UnitIntervalRightOpen, check_fraction, check_number, check_positive_int,
)


@dataclass
class Interactions:
    """The interactions of one protocol, 0-indexed ``(user, item)`` pairs per split (``int64`` arrays ``(N, 2)``)."""

    num_users: int
    num_items: int
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    protocol: str = ""

    @classmethod
    def from_pairs(cls, train, num_users: Optional[int] = None, num_items: Optional[int] = None,
                   protocol: str = "") -> "Interactions":
        """Training pairs only (no validation or test pairs); sizes default to ``1 + the largest id``.

        Example:
            >>> Interactions.from_pairs([[0, 0], [0, 1], [2, 3]]).stats()
            {'users': 3, 'items': 4, 'train': 3, 'val': 0, 'test': 0}
        """
        train = np.asarray(train, dtype=np.int64).reshape(-1, 2)
        empty = np.zeros((0, 2), dtype=np.int64)
        num_users = int(train[:, 0].max()) + 1 if num_users is None else num_users
        num_items = int(train[:, 1].max()) + 1 if num_items is None else num_items
        return cls(num_users, num_items, train, empty, empty.copy(), protocol)

    def graph(self):
        """The (U+I)² bipartite graph of the training pairs (:class:`~lightning_ext.recsys.SparseGraph`)."""
        from lightning_ext.recsys.graph import bipartite_graph

        return bipartite_graph(self.train[:, 0], self.train[:, 1], self.num_users, self.num_items)

    def user_item_matrix(self) -> torch.Tensor:
        """Training interactions as a dense-free ``torch.sparse_coo_tensor`` of shape ``(U, I)`` with ones."""
        idx = torch.as_tensor(self.train.T.copy(), dtype=torch.long)
        return torch.sparse_coo_tensor(idx, torch.ones(idx.shape[1]), (self.num_users, self.num_items)).coalesce()

    def stats(self) -> dict[str, int]:
        return {"users": self.num_users, "items": self.num_items, "train": len(self.train),
                "val": len(self.val), "test": len(self.test)}


def dedupe_pairs(pairs: np.ndarray) -> np.ndarray:
    """Unique ``(user, item)`` rows, sorted by user then item."""
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    return np.unique(pairs, axis=0) if len(pairs) else pairs


def per_user_split(pairs: np.ndarray, fraction: float, seed: int, min_keep: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Split pairs into (kept, held_out), holding out ``round(fraction * n_u)`` random items of each user.

    Every user keeps at least ``min_keep`` items (a user with one interaction keeps it). Deterministic in ``seed``.
    """
    pairs = dedupe_pairs(pairs)
    if fraction <= 0 or len(pairs) == 0:
        return pairs, pairs[:0]
    rng = np.random.default_rng(seed)
    order = np.lexsort((rng.random(len(pairs)), pairs[:, 0]))  # by user, random within user
    shuffled = pairs[order]
    users, starts, counts = np.unique(shuffled[:, 0], return_index=True, return_counts=True)
    n_held = np.minimum(np.round(fraction * counts).astype(np.int64), np.maximum(counts - min_keep, 0))
    rank_in_user = np.arange(len(shuffled)) - np.repeat(starts, counts)
    held = rank_in_user < np.repeat(n_held, counts)
    return dedupe_pairs(shuffled[~held]), dedupe_pairs(shuffled[held])


def _pair_keys(pairs: np.ndarray, num_items: int) -> torch.Tensor:
    return torch.as_tensor(np.sort(pairs[:, 0] * num_items + pairs[:, 1]), dtype=torch.long)


def sample_negatives(users: torch.Tensor, positive_keys: torch.Tensor, num_items: int,
                     generator: torch.Generator) -> torch.Tensor:
    """One item per user, uniform over the items with no key ``user * num_items + item`` in ``positive_keys``.

    ``positive_keys`` must be sorted. Rejection sampling, vectorised; callers guarantee no user has every item.
    """
    neg = torch.randint(num_items, users.shape, generator=generator)
    todo = torch.arange(len(users))
    while len(todo):
        keys = users[todo] * num_items + neg[todo]
        pos = torch.searchsorted(positive_keys, keys).clamp(max=len(positive_keys) - 1)
        todo = todo[positive_keys[pos] == keys]
        neg[todo] = torch.randint(num_items, (len(todo),), generator=generator)
    return neg


class _Passthrough(Dataset):
    """``dataset[x] == x``: the samplers below yield whole, ready batches."""

    def __init__(self, length: int) -> None:
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, item):
        return item


class BPRBatchSampler(EpochSampler):
    """Yields ``(B, 3)`` BPR triple batches; one epoch covers every training pair once.

    Built on :class:`~lightning_ext.core.sampling.EpochSampler` over the epoch's *batches* (unshuffled there):
    it is a ``DistributedSampler`` (Lightning leaves it in place and calls ``set_epoch``), rank ``r`` of ``W``
    takes batches ``r, r + W, ...`` (ranks get equally many; the few left over are dropped, and with fewer
    batches than ranks every rank gets one, by the shared sampler's wrap-around padding), and ``state_dict``
    counts the batches consumed, so a resumed run skips them. What stays its own, and why: the epoch shuffles
    the training *pairs*, not batches, and draws each pair's negative from the same per-epoch generator
    (``torch.Generator`` seeded with ``seed * 100003 + epoch``), so the triples of an epoch are one function of
    ``(seed, epoch)`` that every rank computes alike. The shared sampler's index shuffle cannot draw negatives,
    and sharding whole batches (not samples) keeps rank ``r``'s batch ``k`` equal to one process's batch
    ``k W + r``.

    Args:
        pairs: training ``(user, item)`` pairs, ``(N, 2)``.
        num_items: number of items (negatives are drawn from ``0..num_items-1``).
        batch_size: triples per batch.
        seed: seed of the pair shuffle and the negatives.
        num_replicas, rank: DDP world size and this process's rank.
        shuffle: shuffle the pairs every epoch (negatives are drawn either way).
    """

    def __init__(self, pairs: np.ndarray, num_items: int, batch_size: int, seed: int = 0,
                 num_replicas: int = 1, rank: int = 0, shuffle: bool = True) -> None:
        check_positive_int("num_items", num_items)
        check_positive_int("batch_size", batch_size)
        pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
        self.pairs = torch.as_tensor(pairs, dtype=torch.long)
        self.keys = _pair_keys(pairs, num_items)
        self.num_items, self.batch_size, self.shuffle_pairs = num_items, batch_size, bool(shuffle)
        self.n_batches = -(-len(pairs) // batch_size)
        super().__init__(self.n_batches, shuffle=False, seed=seed, rank=rank, world_size=num_replicas,
                         drop_last=self.n_batches >= num_replicas)

    def epoch_batches(self) -> list[torch.Tensor]:
        """Every ``(B, 3)`` batch of the current epoch, in order, before the batches are shared out to ranks."""
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        n = len(self.pairs)
        pairs = self.pairs[torch.randperm(n, generator=gen) if self.shuffle_pairs else torch.arange(n)]
        neg = sample_negatives(pairs[:, 0].contiguous(), self.keys, self.num_items, gen)
        return list(torch.split(torch.cat([pairs, neg[:, None]], dim=1), self.batch_size))

    def __iter__(self) -> Iterator[torch.Tensor]:
        batches = self.epoch_batches()
        for i in super().__iter__():  # this rank's batch indices, resumable mid-epoch
            yield batches[i]


class _ShardSampler(DistributedSampler):
    """Evaluation batches ``rank, rank + world, ...`` with no padding and nothing dropped.

    Not :class:`~lightning_ext.core.sampling.EpochSampler`: that one pads every rank to the same length
    (``drop_last=False``) or drops the tail (``drop_last=True``). Either would change full-ranking metrics:
    torchmetrics sums every rank's per-user sums, so a padded batch would count its users twice and a dropped
    one not at all. Ranks may therefore get one batch more or less than each other here.
    """

    def __init__(self, n: int, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(_Passthrough(n), num_replicas=num_replicas, rank=rank, shuffle=False)
        self.n = n

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.num_replicas))

    def __iter__(self):
        return iter(range(self.rank, self.n, self.num_replicas))


class _EvalBatches(Dataset):
    def __init__(self, batches: list[dict]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict:
        return self.batches[i]


def eval_batches(target: np.ndarray, exclude: np.ndarray, num_items: int, batch_size: int) -> list[dict]:
    """User batches for full ranking: users with at least one target pair, their targets and masked items."""
    users = np.unique(target[:, 0])
    out = []
    for start in range(0, len(users), batch_size):
        chunk = users[start:start + batch_size]
        out.append({
            "users": torch.as_tensor(chunk, dtype=torch.long),
            "target": _rows_in_batch(target, chunk),
            "exclude": _rows_in_batch(exclude, chunk),
        })
    return out


def _rows_in_batch(pairs: np.ndarray, chunk: np.ndarray) -> torch.Tensor:
    sel = pairs[np.isin(pairs[:, 0], chunk)]
    rows = np.searchsorted(chunk, sel[:, 0])
    return torch.as_tensor(np.stack([rows, sel[:, 1]]), dtype=torch.long)


class InteractionDataModule(LightningDataModule):
    """Base class: user-item interactions with a named protocol; subclasses implement :meth:`load_splits`.

    Args:
        batch_size: BPR triples per training batch (per process under DDP).
        eval_batch_size: users per full-ranking evaluation batch (bounds memory: ``eval_batch_size x items``).
        val_fraction: share of each user's training interactions held out for validation (0 disables it).
        split_seed: seed of the validation carve-out (and of a subclass's own per-user test split).
        shuffle_seed: seed of the per-epoch triple order and negatives.
        num_workers: DataLoader workers (sampling is vectorised; 0 is usually fastest).
    """

    #: set by subclasses: a short, exact description of data, implicit-feedback rule and split
    protocol: str = ""

    def __init__(self, batch_size: PositiveInt = 2048, eval_batch_size: PositiveInt = 1024,
                 val_fraction: UnitIntervalRightOpen = 0.1, split_seed: int = 0, shuffle_seed: int = 0,
                 num_workers: NonNegativeInt = 0) -> None:
        super().__init__()
        check_positive_int("batch_size", batch_size)
        check_positive_int("eval_batch_size", eval_batch_size)
        check_fraction("val_fraction", val_fraction, allow_one=False)
        check_number("split_seed", split_seed, integer=True)
        check_number("shuffle_seed", shuffle_seed, integer=True)
        check_number("num_workers", num_workers, low=0, integer=True)
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.val_fraction, self.split_seed, self.shuffle_seed = val_fraction, split_seed, shuffle_seed
        self.num_workers = num_workers
        self.interactions: Optional[Interactions] = None

    # -- subclass API ----------------------------------------------------------------------------------------
    def load_splits(self) -> tuple[np.ndarray, np.ndarray, int, int]:
        """Return ``(train_pairs, test_pairs, num_users, num_items)``, 0-indexed."""
        raise NotImplementedError

    @property
    def name(self) -> str:
        """The protocol, including the validation carve-out: what a results table should be labelled with."""
        val = f"; val = {self.val_fraction:g} of each user's train items (split_seed={self.split_seed})"
        return f"{self.protocol}{val if self.val_fraction > 0 else '; no validation split'}"

    # -- setup -----------------------------------------------------------------------------------------------
    @override
    def setup(self, stage: Optional[str] = None) -> None:
        """Load the protocol's splits once, carve validation out of training and check the ids."""
        if self.interactions is not None:
            return
        train, test, num_users, num_items = self.load_splits()
        train, test = dedupe_pairs(train), dedupe_pairs(test)
        for split, pairs in (("train", train), ("test", test)):
            if len(pairs) and (pairs.min() < 0 or pairs[:, 0].max() >= num_users or pairs[:, 1].max() >= num_items):
                raise ValueError(f"{type(self).__name__}: {split} ids fall outside {num_users} users x {num_items} items; "
                                 "raise num_users/num_items (or leave them None to read them from the files).")
        if len(train) == 0:
            raise ValueError(f"{type(self).__name__}: no training interactions were loaded.")
        if len(test) and len(np.intersect1d(_pair_keys(train, num_items).numpy(), _pair_keys(test, num_items).numpy())):
            raise ValueError(f"{type(self).__name__}: some test interactions are also training interactions.")
        train, val = per_user_split(train, self.val_fraction, self.split_seed + 1)
        full = np.bincount(train[:, 0], minlength=num_users)
        if (full >= num_items).any():
            raise ValueError("a user has interacted with every item, so no negative can be sampled for them.")
        self.interactions = Interactions(num_users, num_items, train, val, test, protocol=self.name)

    # -- loaders ---------------------------------------------------------------------------------------------
    def _world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def _require(self) -> Interactions:
        if self.interactions is None:
            raise RuntimeError(f"{type(self).__name__}: call setup() first.")
        return self.interactions

    @override
    def train_dataloader(self) -> DataLoader:
        """BPR triple batches of the current epoch, this rank's share."""
        data = self._require()
        world, rank = self._world()
        sampler = BPRBatchSampler(data.train, data.num_items, self.batch_size, seed=self.shuffle_seed,
                                  num_replicas=world, rank=rank)
        # resumable: Lightning saves how many batches of the epoch were consumed and a resumed fit skips them
        return ResumableDataLoader(_Passthrough(sampler.n_batches), sampler=sampler, batch_size=None,
                                   num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def _eval_loader(self, target: np.ndarray, exclude: np.ndarray, split: str) -> DataLoader:
        data = self._require()
        if len(target) == 0:
            raise RuntimeError(f"{type(self).__name__}: the {split} split is empty"
                               + ("; set `val_fraction` > 0." if split == "val" else "."))
        batches = eval_batches(target, exclude, data.num_items, self.eval_batch_size)
        world, rank = self._world()
        return DataLoader(_EvalBatches(batches), sampler=_ShardSampler(len(batches), world, rank), batch_size=None)

    @override
    def val_dataloader(self) -> DataLoader:
        """User batches of the validation split (training items masked)."""
        data = self._require()
        return self._eval_loader(data.val, data.train, "val")

    @override
    def test_dataloader(self) -> DataLoader:
        """User batches of the test split (training and validation items masked)."""
        data = self._require()
        return self._eval_loader(data.test, np.concatenate([data.train, data.val]), "test")


def read_user_items_file(path: str | Path) -> np.ndarray:
    """Read the NGCF/LightGCN ``user item item ...`` format (whitespace-separated, 0-indexed) into pairs.

    A missing file, a non-integer or negative id, or a file with no line at all is refused with one line naming
    the file (and the line).
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} does not exist; pass the path of a `user item item ...` file.")
    pairs, lines = [], 0
    with open(path) as handle:
        for line_no, line in enumerate(handle, 1):
            parts = line.split()
            if not parts:
                continue
            lines += 1
            try:
                ids = [int(p) for p in parts]
            except ValueError as err:
                raise ValueError(f"{path}:{line_no}: expected integers `user item item ...`, got {line.strip()!r} "
                                 "(a truncated or foreign file?)") from err
            if min(ids) < 0:
                raise ValueError(f"{path}:{line_no}: ids must be >= 0 (0-indexed), got {min(ids)}.")
            pairs.extend((ids[0], item) for item in ids[1:])
    if not lines:
        raise ValueError(f"{path}: no `user item item ...` lines (an empty or truncated file).")
    return np.asarray(pairs, dtype=np.int64).reshape(-1, 2)


class InteractionFileDataModule(InteractionDataModule):
    """Your own interactions in the NGCF/LightGCN ``user item item ...`` format (one user per line, 0-indexed).

    Protocol: the given train/test files as they are (the split you made); validation is carved per user out of
    the training file. This is the format of the LightGCN, NGCF and UltraGCN Gowalla / Yelp2018 / Amazon-Book
    splits, so those papers' ``train.txt``/``test.txt`` load unchanged.

    Args:
        train_path: training file.
        test_path: test file (``None``: no test split).
        num_users: number of users (default: 1 + the largest id in either file).
        num_items: number of items (likewise).
        split_name: a name for the split, shown in :attr:`name` (e.g. ``"gowalla (LightGCN split)"``).
        **kwargs: :class:`InteractionDataModule` arguments.

    Example:
        >>> import tempfile, os
        >>> d = tempfile.mkdtemp()
        >>> _ = open(os.path.join(d, "train.txt"), "w").write("0 0 1 2\\n1 1 2\\n")
        >>> _ = open(os.path.join(d, "test.txt"), "w").write("0 3\\n1 0\\n")
        >>> dm = InteractionFileDataModule(os.path.join(d, "train.txt"), os.path.join(d, "test.txt"), val_fraction=0)
        >>> dm.setup(); dm.interactions.stats()
        {'users': 2, 'items': 4, 'train': 5, 'val': 0, 'test': 2}
    """

    def __init__(self, train_path: str, test_path: Optional[str] = None, num_users: Optional[PositiveInt] = None,
                 num_items: Optional[PositiveInt] = None, split_name: str = "", **kwargs) -> None:
        super().__init__(**kwargs)
        for name, n in (("num_users", num_users), ("num_items", num_items)):
            if n is not None:
                check_positive_int(f"{name} (or None: 1 + the largest id in the files)", n)
        for arg, p in (("train_path", train_path), ("test_path", test_path)):
            if p is not None and (not str(p).strip() or not Path(p).is_file()):
                raise FileNotFoundError(f"{arg} {str(p)!r} does not exist; pass the path of a `user item item ...` file.")
        self.train_path, self.test_path = train_path, test_path
        self.num_users, self.num_items = num_users, num_items
        self.protocol = f"{split_name or Path(train_path).parent.name}: files {Path(train_path).name}" + (
            f" / {Path(test_path).name}" if test_path else "") + " as given"

    def load_splits(self):
        train = read_user_items_file(self.train_path)
        test = read_user_items_file(self.test_path) if self.test_path else np.zeros((0, 2), np.int64)
        both = np.concatenate([train, test])
        num_users = self.num_users or int(both[:, 0].max()) + 1
        num_items = self.num_items or int(both[:, 1].max()) + 1
        return train, test, num_users, num_items
