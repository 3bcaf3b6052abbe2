"""Monolith's collisionless embedding table (Liu et al., 2022): exact id-to-row map, frequency admission, expiry.

Also :class:`HashedEmbedding`, the collision baseline (a fixed number of buckets shared by hashing), and
:func:`reset_optimizer_rows`, which zeroes an optimiser's per-row state when rows are evicted.
"""

from __future__ import annotations

from typing import Literal, Optional, get_args

import torch
import torch.nn.functional as F
from torch import nn

from lightning_ext.core.validation import (
    NonNegativeInt, PositiveFloat, PositiveInt, check_choice, check_number, check_positive, check_positive_int,
)

#: how a never-seen id enters the table: always, after a counted number of occurrences, or with a probability
Admission = Literal["none", "counting", "probabilistic"]
#: what a missing (absent or not yet admitted) id reads as
Missing = Literal["zeros", "shared"]

_HASH_PRIME = 2_147_483_647  # 2^31 - 1


def _sorted_index(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sorted occupied keys, their slots)`` of a fixed-size key array where ``-1`` marks a free slot."""
    slots = torch.nonzero(keys >= 0).squeeze(1)
    occupied = keys[slots]
    order = torch.argsort(occupied)
    return occupied[order], slots[order]


def _find(sorted_keys: torch.Tensor, slots: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Slot of each id, ``-1`` where absent."""
    if not len(sorted_keys):
        return torch.full_like(ids, -1)
    pos = torch.searchsorted(sorted_keys, ids.contiguous()).clamp(max=len(sorted_keys) - 1)
    return torch.where(sorted_keys[pos] == ids, slots[pos], torch.full_like(ids, -1))


class CollisionlessEmbedding(nn.Module):
    """Monolith's collisionless embedding table: every admitted id owns a row; frequency admission and expiry save memory.

    Liu, Zou, Zou, Wang, Zhang, Tang, Zhu, Zhu, Wu, Wang and Cheng, *Monolith: Real Time Recommendation System
    With Collisionless Embedding Table*, ORSUM@RecSys 2022, arXiv 2209.07663. Reference code:
    github.com/bytedance/monolith (``hash_table/cuckoohash``, ``hash_filter/hash_filter.h``,
    ``probabilistic_filter.cc``; TensorFlow + C++, read for the semantics).

    An exact map from int64 ids (any range: hashes, raw ids) to rows of a preallocated ``(capacity, dim)``
    parameter, so no two ids share a row and the optimiser's parameter never changes shape. Ids enter the table
    only in training-mode forwards with gradients on (Monolith inserts on the first update) and only once
    admitted:

    - ``admission="counting"``: an exact counting filter; an id is admitted at its ``occurrence_threshold``-th
      occurrence (``monolith_compat=True``: at the ``T+1``-th, Monolith's ``add(fid) < T`` test on the count
      *before* adding). A full filter fails open (admits; counted in ``admission_failures``), as Monolith's.
    - ``admission="probabilistic"``: memory-free; each occurrence admits with ``p = 1 - 0.05^{1/T}`` (Monolith's
      "equal" filter: after ``T`` occurrences an id is in with probability 0.95).

    Absent and not-yet-admitted ids read as zeros (Monolith) or one learned shared vector (``missing="shared"``).
    Every training lookup stamps its rows with the current time; :meth:`evict` frees rows whose last update is
    at least ``expire_after`` old (re-initialised for the next id; the optimiser's state is reset by
    :class:`~lightning_ext.recsys.embedding_expiry.EmbeddingExpiry`). Time is what ``forward(ids, time=...)``
    is given (event time, e.g. Unix seconds; deterministic on replay) or, without it, the number of training
    lookups. Keys, rows, counts and times are buffers: a checkpoint restores the table exactly.

    Args:
        dim: embedding size.
        capacity: rows preallocated (the table refuses inserts beyond it with one line).
        init_std: rows start as N(0, init_std²).
        admission: ``"none"``, ``"counting"`` or ``"probabilistic"``.
        occurrence_threshold: T (0 admits every id at once).
        expire_after: age (in time units) at which :meth:`evict` frees a row; ``None`` never (Monolith's default
            100 years).
        missing: ``"zeros"`` or ``"shared"``.
        filter_capacity: ids the counting filter can track (default ``4 * capacity``).
        monolith_compat: Monolith's off-by-one admission (see above).
        seed: seed of row initialisation and probabilistic admission (a function of seed and lookup count, so a
            resumed run draws the same).

    Example:
        >>> emb = CollisionlessEmbedding(dim=4, capacity=8, admission="counting", occurrence_threshold=2)
        >>> _ = emb(torch.tensor([10**12, 7]))          # first occurrences: counted, not admitted
        >>> emb.num_rows, emb.read(torch.tensor([7])).abs().sum().item()  # absent ids read as zeros
        (0, 0.0)
        >>> _ = emb(torch.tensor([7])); emb.num_rows      # second occurrence of 7: admitted
        1
    """

    def __init__(self, dim: PositiveInt, capacity: PositiveInt, init_std: PositiveFloat = 0.01,
                 admission: Admission = "none", occurrence_threshold: NonNegativeInt = 0,
                 expire_after: Optional[PositiveFloat] = None, missing: Missing = "zeros",
                 filter_capacity: Optional[PositiveInt] = None, monolith_compat: bool = False, seed: int = 0) -> None:
        super().__init__()
        check_positive_int("dim", dim)
        check_positive_int("capacity", capacity)
        check_positive("init_std", init_std)
        check_choice("admission", admission, get_args(Admission))
        check_number("occurrence_threshold", occurrence_threshold, low=0, integer=True)
        if expire_after is not None:
            check_positive("expire_after (an age in the time units given to forward; None disables expiry)",
                           expire_after)
        check_choice("missing", missing, get_args(Missing))
        if filter_capacity is not None:
            check_positive_int("filter_capacity", filter_capacity)
        check_number("seed", seed, integer=True)
        if admission == "probabilistic" and occurrence_threshold == 0:
            raise ValueError("admission='probabilistic' needs occurrence_threshold >= 1 (the occurrences after which "
                             "an id is in with probability 0.95).")
        self.dim, self.capacity, self.init_std = dim, capacity, init_std
        self.admission, self.occurrence_threshold = admission, occurrence_threshold
        self.expire_after, self.missing, self.monolith_compat, self.seed = expire_after, missing, monolith_compat, seed
        self.weight = nn.Parameter(torch.empty(capacity, dim))
        with torch.no_grad():
            self.weight.normal_(0.0, init_std, generator=torch.Generator().manual_seed(seed))
        self.shared = nn.Parameter(torch.zeros(dim)) if missing == "shared" else None
        self.register_buffer("keys", torch.full((capacity,), -1, dtype=torch.long))
        self.register_buffer("last_update", torch.zeros(capacity, dtype=torch.float64))
        self.register_buffer("clock", torch.zeros((), dtype=torch.float64))
        self.register_buffer("lookups", torch.zeros((), dtype=torch.long))
        self.register_buffer("admission_failures", torch.zeros((), dtype=torch.long))
        n_filter = (filter_capacity or 4 * capacity) if admission == "counting" else 0
        self.register_buffer("filter_keys", torch.full((n_filter,), -1, dtype=torch.long))
        self.register_buffer("filter_counts", torch.zeros(n_filter, dtype=torch.long))
        self._index: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    # -- lookups ---------------------------------------------------------------------------------------------
    @property
    def num_rows(self) -> int:
        """Rows in use."""
        return int((self.keys >= 0).sum())

    def memory_bytes(self, used_only: bool = True) -> int:
        """Bytes of the embedding rows (and the key, time and filter arrays): used rows only, or all preallocated."""
        rows = self.num_rows if used_only else self.capacity
        per_row = self.dim * self.weight.element_size() + 8 + 8  # row, int64 key, float64 time
        return rows * per_row + self.filter_keys.numel() * 16

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The row of each id, ``-1`` where the id has none."""
        if self._index is None:
            self._index = _sorted_index(self.keys)
        return _find(*self._index, ids)

    def _check_ids(self, ids: torch.Tensor) -> torch.Tensor:
        if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError(f"CollisionlessEmbedding takes an integer id tensor, got "
                             f"{getattr(ids, 'dtype', type(ids).__name__)}.")
        ids = ids.long()
        if ids.numel() and int(ids.min()) < 0:
            raise ValueError(f"CollisionlessEmbedding ids must be >= 0 (hash negative ids first), got {int(ids.min())}.")
        return ids

    def forward(self, ids: torch.Tensor, time: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Embeddings ``(*ids.shape, dim)``; in training with gradients on, admits new ids and stamps their time."""
        ids = self._check_ids(ids)
        if self.training and torch.is_grad_enabled():
            self._update(ids, time)
        return self.read(ids)

    def read(self, ids: torch.Tensor) -> torch.Tensor:
        """Embeddings of these ids as the table stands: never admits, inserts or stamps (differentiable)."""
        ids = self._check_ids(ids)
        rows = self.rows(ids)
        found = rows >= 0
        out = F.embedding(rows.clamp(min=0), self.weight) * found.unsqueeze(-1).to(self.weight.dtype)
        if self.shared is not None:
            out = out + (~found).unsqueeze(-1).to(self.weight.dtype) * self.shared
        return out

    # -- training-time updates -------------------------------------------------------------------------------
    def _generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + int(self.lookups))

    @torch.no_grad()
    def _update(self, ids: torch.Tensor, time: Optional[torch.Tensor]) -> None:
        self.lookups += 1
        if time is not None:
            time = torch.as_tensor(time, dtype=torch.float64)
            if not torch.isfinite(time).all():
                raise ValueError("CollisionlessEmbedding: time holds NaN or infinite values.")
            now = float(time.max()) if time.numel() else float(self.clock)
        else:
            now = float(self.lookups)
        self.clock.fill_(max(float(self.clock), now))
        if not ids.numel():
            return
        uniq, counts = torch.unique(ids.reshape(-1).cpu(), return_counts=True)
        new = self.rows(uniq.to(self.keys.device)).cpu() < 0
        if new.any():
            self._insert(self._admit(uniq[new], counts[new]))
        present = self.rows(uniq.to(self.keys.device))
        self.last_update[present[present >= 0]] = float(self.clock)

    def _admit(self, ids: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        t = self.occurrence_threshold
        if self.admission == "none" or t == 0:
            return ids
        if self.admission == "probabilistic":
            p = 1.0 - 0.05 ** (1.0 / t)
            prob = 1.0 - (1.0 - p) ** counts.double()
            return ids[torch.rand(len(ids), generator=self._generator(), dtype=torch.float64) < prob]
        fkeys, fcounts = self.filter_keys.cpu(), self.filter_counts.cpu()
        slot = _find(*_sorted_index(fkeys), ids)
        missing = torch.nonzero(slot < 0).squeeze(1)
        free = torch.nonzero(fkeys < 0).squeeze(1)
        n = min(len(missing), len(free))
        slot[missing[:n]] = free[:n]
        fkeys[free[:n]] = ids[missing[:n]]
        fcounts[free[:n]] = 0
        tracked = slot >= 0
        before = torch.where(tracked, fcounts[slot.clamp(min=0)], torch.zeros_like(counts))
        fcounts[slot[tracked]] = before[tracked] + counts[tracked]
        admitted = (before >= t) if self.monolith_compat else (before + counts >= t)
        admitted |= ~tracked  # a full filter fails open, like Monolith's
        self.admission_failures += int((~tracked).sum())
        fkeys[slot[admitted & tracked]] = -1  # admitted ids leave the filter
        self.filter_keys.copy_(fkeys)
        self.filter_counts.copy_(fcounts)
        return ids[admitted]

    def _insert(self, ids: torch.Tensor) -> None:
        if not len(ids):
            return
        free = torch.nonzero(self.keys < 0).squeeze(1)
        if len(ids) > len(free):
            raise RuntimeError(f"CollisionlessEmbedding is full: {len(ids)} new ids, {len(free)} free of {self.capacity} "
                               "rows; raise `capacity`, set `expire_after` (with EmbeddingExpiry) or an admission filter.")
        rows = free[: len(ids)]
        self.keys[rows] = ids.to(self.keys.device)
        self._index = None

    @torch.no_grad()
    def evict(self, now: Optional[float] = None) -> torch.Tensor:
        """Free the rows last updated at least ``expire_after`` before ``now`` (default: the latest time seen);
        returns their indices. Freed rows are re-initialised for the next id."""
        if self.expire_after is None:
            return torch.zeros(0, dtype=torch.long, device=self.keys.device)
        now = float(self.clock) if now is None else float(now)
        old = torch.nonzero((self.keys >= 0) & (now - self.last_update >= self.expire_after)).squeeze(1)
        if len(old):
            self.keys[old] = -1
            self.last_update[old] = 0.0
            fresh = torch.empty(len(old), self.dim, dtype=self.weight.dtype).normal_(
                0.0, self.init_std, generator=self._generator())
            self.weight[old] = fresh.to(self.weight.device)
            self._index = None
        return old

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._index = None

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, capacity={self.capacity}, admission={self.admission!r}, "
                f"occurrence_threshold={self.occurrence_threshold}, expire_after={self.expire_after}")


def reset_optimizer_rows(optimizer: torch.optim.Optimizer, param: torch.Tensor, rows: torch.Tensor) -> int:
    """Zero ``optimizer``'s per-element state (Adam's moments, Adagrad's sums, momentum) of these rows of
    ``param``; returns how many state tensors were touched. Scalars (Adam's step) are left alone."""
    state = optimizer.state.get(param, {})
    touched = 0
    for value in state.values():
        if isinstance(value, torch.Tensor) and value.shape == param.shape:
            value[rows] = 0
            touched += 1
    return touched


class HashedEmbedding(nn.Module):
    """The collision baseline: ``num_buckets`` rows shared by ids through a universal hash ``((a·id + b) mod p) mod n``.

    Args:
        dim: embedding size.
        num_buckets: rows (memory).
        init_std: rows start as N(0, init_std²).
        seed: seed of the hash constants and the initialisation.

    Example:
        >>> emb = HashedEmbedding(dim=4, num_buckets=3)
        >>> emb(torch.tensor([[1, 2, 10**12]])).shape
        torch.Size([1, 3, 4])
    """

    def __init__(self, dim: PositiveInt, num_buckets: PositiveInt, init_std: PositiveFloat = 0.01, seed: int = 0) -> None:
        super().__init__()
        check_positive_int("dim", dim)
        check_positive_int("num_buckets", num_buckets)
        check_positive("init_std", init_std)
        check_number("seed", seed, integer=True)
        gen = torch.Generator().manual_seed(seed)
        self.num_buckets, self.dim = num_buckets, dim
        self.a = int(torch.randint(1, _HASH_PRIME, (), generator=gen))
        self.b = int(torch.randint(0, _HASH_PRIME, (), generator=gen))
        self.weight = nn.Parameter(torch.empty(num_buckets, dim).normal_(0.0, init_std, generator=gen))

    def bucket(self, ids: torch.Tensor) -> torch.Tensor:
        """The row of each id."""
        ids = torch.remainder(ids.long(), _HASH_PRIME)  # keeps a * id below 2^62: no int64 overflow
        return torch.remainder(self.a * ids + self.b, _HASH_PRIME) % self.num_buckets

    def forward(self, ids: torch.Tensor, time: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Embeddings ``(*ids.shape, dim)`` (``time`` is accepted for interface parity and ignored)."""
        if not isinstance(ids, torch.Tensor) or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(f"HashedEmbedding takes an integer id tensor, got {getattr(ids, 'dtype', type(ids))}.")
        return F.embedding(self.bucket(ids), self.weight)

    def memory_bytes(self) -> int:
        return self.num_buckets * self.dim * self.weight.element_size()
