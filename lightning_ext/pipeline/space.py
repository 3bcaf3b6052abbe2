"""What every pipeline tuner shares: the :class:`SearchSpace` of allocations, the :class:`Observation` of one
measurement window, and the :class:`Agent` interface.

Two budgets: workers of ``"cpu"`` stages (processes or threads that compute) count against ``cpu_budget``;
threads of ``"io"`` stages (which mostly wait, e.g. on remote reads) count against a separate ``io_budget``,
so sleeping readers never use up the CPU budget. The exhaustive-search oracle's grid
(:meth:`SearchSpace.all_allocations`) and the agents' actions (:meth:`SearchSpace.actions`) span the same
allocations: every prefetch depth of ``prefetch_range`` and every worker count within the bounds and budgets.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Optional, Sequence

from lightning_ext.core.validation import check_positive, check_positive_int
from lightning_ext.pipeline.staged import Allocation


@dataclass(frozen=True)
class SearchSpace:
    """Allocations a tuner may choose.

    Args:
        stage_names: names of the stages, in order.
        min_workers: lowest worker count per stage.
        max_workers: highest worker count per stage.
        cpu_budget: the most workers in total over the CPU stages.
        prefetch_range: ``(lowest, highest)`` prefetch depth (equal bounds: prefetch is not tuned).
        memory_budget: bytes the in-flight batches may hold (``None``: unlimited); estimated as
            ``batch_bytes * (2 * sum(workers) + prefetch)``.
        io_stages: per stage, whether it is an I/O stage (``()``: none is; every stage counts against
            ``cpu_budget``).
        io_budget: the most threads in total over the I/O stages (required when any stage is one).
    """

    stage_names: tuple[str, ...]
    min_workers: tuple[int, ...]
    max_workers: tuple[int, ...]
    cpu_budget: int
    prefetch_range: tuple[int, int] = (1, 8)
    memory_budget: Optional[float] = None
    io_stages: tuple[bool, ...] = ()
    io_budget: Optional[int] = None

    def __post_init__(self) -> None:
        n = len(self.stage_names)
        check_positive_int("cpu_budget", self.cpu_budget)
        if self.memory_budget is not None:
            check_positive("memory_budget (bytes, or None)", self.memory_budget)
        if not n or len(self.min_workers) != n or len(self.max_workers) != n:
            raise ValueError("`stage_names`, `min_workers` and `max_workers` must have the same, non-zero length.")
        if self.io_stages and len(self.io_stages) != n:
            raise ValueError(f"`io_stages` needs one flag per stage ({n}), got {len(self.io_stages)}.")
        object.__setattr__(self, "io_stages", tuple(bool(x) for x in self.io_stages) or (False,) * n)
        if any(self.io_stages):
            if self.io_budget is None:
                raise ValueError("Some stages are I/O stages: give `io_budget` (the most I/O threads in total).")
            check_positive_int("io_budget", self.io_budget)
        cpu_min = sum(m for m, io in zip(self.min_workers, self.io_stages) if not io)
        if cpu_min > self.cpu_budget:
            raise ValueError(f"The CPU budget {self.cpu_budget} is below the stages' minimum {cpu_min}; "
                             f"raise `cpu_budget`.")
        io_min = sum(m for m, io in zip(self.min_workers, self.io_stages) if io)
        if any(self.io_stages) and io_min > self.io_budget:
            raise ValueError(f"The I/O budget {self.io_budget} is below the I/O stages' minimum {io_min}; "
                             f"raise `io_budget`.")
        lo, hi = self.prefetch_range
        if not 1 <= lo <= hi:
            raise ValueError(f"`prefetch_range` must satisfy 1 <= low <= high, got {self.prefetch_range}.")

    @classmethod
    def for_stages(cls, stages, cpu_budget: int, prefetch_range=(1, 8), memory_budget=None,
                   io_budget: Optional[int] = None) -> "SearchSpace":
        """The space of a :class:`~lightning_ext.pipeline.StagedPipeline`'s stages under the budgets.

        With ``io_budget=None`` every stage counts against ``cpu_budget``.
        """
        io = tuple(io_budget is not None and getattr(s, "budget", "cpu") == "io" for s in stages)
        caps = [io_budget if f else cpu_budget for f in io]
        return cls(tuple(s.name for s in stages), tuple(s.min_workers for s in stages),
                   tuple(min(c, s.max_workers or c) for s, c in zip(stages, caps)), cpu_budget,
                   tuple(prefetch_range), memory_budget, io, io_budget)

    @property
    def num_stages(self) -> int:
        return len(self.stage_names)

    def groups(self) -> list[tuple[list[int], int]]:
        """``(stage indices, budget)`` for the CPU stages and, if any, the I/O stages."""
        cpu = [i for i, io in enumerate(self.io_stages) if not io]
        io = [i for i, f in enumerate(self.io_stages) if f]
        return [(g, b) for g, b in ((cpu, self.cpu_budget), (io, self.io_budget)) if g]

    def cpu_workers(self, a: Allocation) -> int:
        """Workers of ``a`` charged to the CPU budget."""
        return sum(w for w, io in zip(a.workers, self.io_stages) if not io)

    def io_threads(self, a: Allocation) -> int:
        """Threads of ``a`` charged to the I/O budget."""
        return sum(w for w, io in zip(a.workers, self.io_stages) if io)

    def memory(self, a: Allocation, batch_bytes: float) -> float:
        return batch_bytes * (sum(2 * max(1, w) for w in a.workers) + a.prefetch)

    def valid(self, a: Allocation, batch_bytes: float = 0.0) -> bool:
        lo, hi = self.prefetch_range
        ok = (len(a.workers) == self.num_stages and lo <= a.prefetch <= hi
              and all(sum(a.workers[i] for i in g) <= b for g, b in self.groups())
              and all(m <= w <= x for m, w, x in zip(self.min_workers, a.workers, self.max_workers)))
        if ok and self.memory_budget is not None and batch_bytes > 0:
            ok = self.memory(a, batch_bytes) <= self.memory_budget
        return ok

    def clip(self, a: Allocation) -> Allocation:
        """The nearest valid allocation (bounds per stage, then units removed from the largest stages)."""
        w = [min(max(v, m), x) for v, m, x in zip(a.workers, self.min_workers, self.max_workers)]
        for g, budget in self.groups():
            while sum(w[i] for i in g) > budget:
                i = max((i for i in g if w[i] > self.min_workers[i]), key=lambda i: w[i])
                w[i] -= 1
        lo, hi = self.prefetch_range
        return Allocation(tuple(w), min(max(a.prefetch, lo), hi))

    def minimum(self) -> Allocation:
        """Every parameter at its minimum: where hill climbing starts."""
        return self.clip(Allocation(self.min_workers, self.prefetch_range[0]))

    def even_split(self, prefetch: int = 2) -> Allocation:
        """Each budget split as evenly as the bounds allow over its stages (earlier stages get the remainder)."""
        w = list(self.min_workers)
        for g, budget in self.groups():
            for k, i in enumerate(g):
                w[i] = budget // len(g) + (1 if k < budget % len(g) else 0)
        return self.clip(Allocation(tuple(w), prefetch))

    def prefetch_values(self) -> list[int]:
        lo, hi = self.prefetch_range
        return list(range(lo, hi + 1))

    def all_allocations(self, prefetch_values: Optional[Sequence[int]] = None,
                        use_full_budget: bool = False) -> list[Allocation]:
        """Every valid allocation: the exhaustive-search oracle's grid (``None``: every prefetch depth in range).

        ``use_full_budget`` keeps only allocations that use each budget fully (bounds permitting).
        """
        ranges = [range(m, x + 1) for m, x in zip(self.min_workers, self.max_workers)]
        full = [min(b, sum(self.max_workers[i] for i in g)) for g, b in self.groups()]
        out = []
        for w in itertools.product(*ranges):
            if use_full_budget and any(sum(w[i] for i in g) != f for (g, _), f in zip(self.groups(), full)):
                continue
            out += [Allocation(w, p) for p in (prefetch_values or self.prefetch_values())
                    if self.valid(Allocation(w, p))]
        return out

    # -- discrete actions ----------------------------------------------------------------------------------
    def actions(self) -> list[tuple]:
        """``("noop",)``, ``("move", i, j)`` (within one budget), ``("add", i)``, ``("remove", i)`` and, when
        prefetch is tuned, ``("prefetch", +1 | -1)``: together they reach every allocation of :meth:`all_allocations`."""
        n = self.num_stages
        acts: list[tuple] = [("noop",)]
        acts += [("move", i, j) for i in range(n) for j in range(n) if i != j and self.io_stages[i] == self.io_stages[j]]
        acts += [("add", i) for i in range(n)] + [("remove", i) for i in range(n)]
        if self.prefetch_range[0] < self.prefetch_range[1]:
            acts += [("prefetch", 1), ("prefetch", -1)]
        return acts

    def apply(self, a: Allocation, action: tuple, batch_bytes: float = 0.0) -> Optional[Allocation]:
        """The allocation after ``action``, or ``None`` when it would leave the space."""
        w, p = list(a.workers), a.prefetch
        kind = action[0]
        if kind == "move":
            w[action[1]] -= 1
            w[action[2]] += 1
        elif kind == "add":
            w[action[1]] += 1
        elif kind == "remove":
            w[action[1]] -= 1
        elif kind == "prefetch":
            p += action[1]
        if min(w) < 0 or p < 1:
            return None
        new = Allocation(tuple(w), p)
        return new if self.valid(new, batch_bytes) else None


@dataclass
class Observation:
    """What one measurement window under ``allocation`` showed.

    Attributes:
        allocation: the allocation that ran during the window.
        throughput: samples per second delivered to (and consumed by) the trainer.
        wait_fraction: share of the window the trainer spent waiting for data.
        busy: per stage, the share of its workers' time spent in the stage function.
        batch_bytes: size of one batch (for the memory estimate).
        memory_fraction: estimated in-flight memory over the memory budget (0 without a budget).
        failed: a worker died during the window.
        seconds: length of the window.
    """

    allocation: Allocation
    throughput: float
    wait_fraction: float = 0.0
    busy: tuple[float, ...] = ()
    batch_bytes: float = 0.0
    memory_fraction: float = 0.0
    failed: bool = False
    seconds: float = 0.0


class Agent:
    """Base class: :meth:`act` maps the last window's :class:`Observation` to the next allocation."""

    name = "agent"

    def __init__(self, space: SearchSpace) -> None:
        self.space = space
        self.settled = False
        self.decisions = 0
        self.best: Optional[Allocation] = None
        self.last_good: Optional[Allocation] = None

    def act(self, obs: Observation) -> Allocation:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {"settled": self.settled, "decisions": self.decisions,
                "best": self.best.to_dict() if self.best else None,
                "last_good": self.last_good.to_dict() if self.last_good else None}

    def load_state_dict(self, state: dict) -> None:
        self.settled, self.decisions = bool(state["settled"]), int(state["decisions"])
        self.best = Allocation.from_dict(state["best"]) if state.get("best") else None
        self.last_good = Allocation.from_dict(state["last_good"]) if state.get("last_good") else None
