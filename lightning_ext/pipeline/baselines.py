"""Baseline tuners: a static allocation, tf.data AUTOTUNE's hill climber on measured throughput, and a
cost-model allocator that splits each budget in proportion to the stages' measured busy time.

- :class:`StaticAgent` keeps one allocation (the baselines default, even split, oracle).
- :class:`HillClimber` is tf.data AUTOTUNE's HILL_CLIMB with measured instead of modelled latency: start with
  every parameter at its minimum, try +1 on each parameter, keep the one that gains most, stop when no
  increment gains more than ``min_gain`` or the budget is used (``tensorflow/core/framework/model.cc``).
- :class:`BusyTimeAllocator` allocates from a cost model, as tf.data AUTOTUNE's model and Plumber's LP do
  (Kuchnik et al., "Plumber: Diagnosing and Removing Performance Bottlenecks in Machine Learning Data
  Pipelines", MLSys 2022, arXiv 2111.04131): with per-sample costs ``c_s`` (measured worker-seconds per
  sample of stage ``s``), the bottleneck rate ``min_s n_s / c_s`` under ``sum n_s <= B`` is highest at
  ``n_s = B * c_s / sum c``, rounded here by largest remainder within each budget.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from lightning_ext.core.validation import check_non_negative, check_positive_int
from lightning_ext.pipeline.space import Agent, Observation, SearchSpace
from lightning_ext.pipeline.staged import Allocation


class StaticAgent(Agent):
    """Keeps one allocation (the static baselines)."""

    name = "static"

    def __init__(self, space: SearchSpace, allocation: Allocation) -> None:
        super().__init__(space)
        self.best = self.last_good = allocation
        self.settled = True

    def act(self, obs: Observation) -> Allocation:
        self.decisions += 1
        return self.best


class HillClimber(Agent):
    """AUTOTUNE-style hill climbing on measured throughput (tf.data ``HILL_CLIMB``).

    Starting from :meth:`SearchSpace.minimum`, each round measures +1 worker on every stage and +1 prefetch
    (one window each), keeps the best candidate if it beats the current allocation by more than
    ``min_gain``, and stops at a local optimum or when no increment fits the budgets.

    Args:
        space: the search space.
        min_gain: relative throughput gain an increment must bring to be kept.
    """

    name = "hill_climb"

    def __init__(self, space: SearchSpace, min_gain: float = 0.05) -> None:
        super().__init__(space)
        self.min_gain = check_non_negative("min_gain", min_gain)
        self.current: Optional[Allocation] = None
        self.current_tput = 0.0
        self._candidates: list[Allocation] = []
        self._results: list[float] = []

    def _increments(self, a: Allocation, batch_bytes: float) -> list[Allocation]:
        acts = [("add", i) for i in range(self.space.num_stages)] + [("prefetch", 1)]
        return [b for b in (self.space.apply(a, act, batch_bytes) for act in acts) if b is not None]

    def act(self, obs: Observation) -> Allocation:
        self.decisions += 1
        if self.settled:
            return self.current
        if self.current is None:  # first call: go to the minimum and measure it
            self.current = self.space.minimum()
            if obs.allocation != self.current:
                return self.current
        if obs.allocation == self.current and not self._candidates:
            self.current_tput = obs.throughput  # the baseline of a round
        else:
            self._results.append(-1.0 if obs.failed else obs.throughput)
        if not self._candidates:
            self._candidates = self._increments(self.current, obs.batch_bytes)
            self._results = []
        if len(self._results) < len(self._candidates):
            return self._candidates[len(self._results)]
        k = int(np.argmax(self._results)) if self._results else -1
        if k >= 0 and self._results[k] > self.current_tput * (1 + self.min_gain):
            self.current, self.current_tput = self._candidates[k], self._results[k]
            self._candidates = self._increments(self.current, obs.batch_bytes)
            self._results = []
            if self._candidates:
                return self._candidates[0]
        self._candidates, self._results = [], []
        self.settled = True
        self.best = self.last_good = self.current
        return self.current

    def state_dict(self) -> dict:
        return {**super().state_dict(), "current": self.current.to_dict() if self.current else None,
                "current_tput": self.current_tput, "candidates": [c.to_dict() for c in self._candidates],
                "results": list(self._results)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.current = Allocation.from_dict(state["current"]) if state.get("current") else None
        self.current_tput = float(state["current_tput"])
        self._candidates = [Allocation.from_dict(c) for c in state["candidates"]]
        self._results = list(state["results"])


def proportional_allocation(space: SearchSpace, costs, prefetch: int) -> Allocation:
    """Each budget of ``space`` split over its stages in proportion to ``costs`` (largest remainder, bounds kept).

    Example:
        >>> space = SearchSpace(("read", "decode", "augment"), (1, 1, 1), (14, 14, 14), 14, (2, 2))
        >>> str(proportional_allocation(space, [2.0, 4.0, 1.0], prefetch=2))
        '4/8/2 p2'
    """
    if len(costs) != space.num_stages or not all(np.isfinite(c) and c >= 0 for c in costs):
        raise ValueError(f"`costs` must be {space.num_stages} finite non-negative numbers, got {list(costs)}.")
    w = list(space.min_workers)
    for group, budget in space.groups():
        c = np.array([max(float(costs[i]), 1e-12) for i in group])
        ideal = budget * c / c.sum()
        n = {i: int(min(max(np.floor(x), space.min_workers[i]), space.max_workers[i])) for i, x in zip(group, ideal)}
        want = dict(zip(group, ideal))
        while sum(n.values()) < budget:
            free = [i for i in group if n[i] < space.max_workers[i]]
            if not free:
                break
            i = max(free, key=lambda i: want[i] - n[i])
            n[i] += 1
        while sum(n.values()) > budget:
            i = min((i for i in group if n[i] > space.min_workers[i]), key=lambda i: want[i] - n[i])
            n[i] -= 1
        for i in group:
            w[i] = n[i]
    return space.clip(Allocation(tuple(w), prefetch))


class BusyTimeAllocator(Agent):
    """Cost-model baseline: each budget split in proportion to the stages' measured busy time per sample.

    After each window the per-sample cost of stage ``s`` is ``busy_s * workers_s / throughput`` (its workers'
    busy seconds per delivered sample; :attr:`Observation.busy` is the busy share per worker) and the next
    allocation is :func:`proportional_allocation` of those costs, prefetch unchanged. It settles when the
    allocation it computes is the one that ran, or after ``max_rounds`` windows on the best one it measured.

    Args:
        space: the search space.
        max_rounds: windows after which it settles anyway.
    """

    name = "busy_time"

    def __init__(self, space: SearchSpace, max_rounds: int = 6) -> None:
        super().__init__(space)
        self.max_rounds = check_positive_int("max_rounds", max_rounds)
        self.measured: dict[str, list] = {}  # str(allocation) -> [allocation dict, throughput]

    def act(self, obs: Observation) -> Allocation:
        self.decisions += 1
        if obs.failed:
            return self.last_good or self.space.minimum()
        if self.settled:
            return self.best
        self.last_good = obs.allocation
        self.measured[str(obs.allocation)] = [obs.allocation.to_dict(), obs.throughput]
        if len(obs.busy) != self.space.num_stages or obs.throughput <= 0:
            return obs.allocation  # nothing to allocate from (yet)
        costs = [b * max(1, w) / obs.throughput for b, w in zip(obs.busy, obs.allocation.workers)]
        target = proportional_allocation(self.space, costs, obs.allocation.prefetch)
        if target == obs.allocation or self.decisions >= self.max_rounds:
            self.settled = True
            best = target if target == obs.allocation else max(self.measured.values(), key=lambda v: v[1])[0]
            self.best = best if isinstance(best, Allocation) else Allocation.from_dict(best)
            return self.best
        return target

    def state_dict(self) -> dict:
        return {**super().state_dict(), "measured": {k: list(v) for k, v in self.measured.items()}}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.measured = {k: list(v) for k, v in state.get("measured", {}).items()}
