"""Tuners that choose a pipeline's allocation from measured windows: a value-based RL agent and a hill climber.

Both see the same thing after each measurement window (an :class:`Observation` of the allocation that ran)
and answer with the allocation to run next (:meth:`Agent.act`), within a :class:`SearchSpace` (CPU budget,
per-stage bounds, prefetch range, memory budget).

- :class:`DQNAgent` follows the MDP of InTune as specified in ``shared/specs/callbacks.md`` §1 (the paper's
  exact state, action and network are not public; this MDP is ours, aligned with its description): state =
  normalised allocation, prefetch depth, throughput over its running maximum, per-stage busy fraction,
  data-wait fraction, memory use over budget; actions = no-op, move one CPU unit between two stages, add or
  release one unit, prefetch +-1; reward = throughput / running-max throughput - kappa * memory excess, -1 on a
  worker failure. A 2x64 MLP Q-network, Adam 1e-3, gamma 0.9, replay 5k, target sync every 25 decisions,
  epsilon from 1.0 to 0.05 over ``explore_decisions``. After exploring it re-measures its most promising
  allocations, settles on the best mean, keeps measuring it, and reopens exploration on a sustained drop.
- :class:`HillClimber` is tf.data AUTOTUNE's HILL_CLIMB with measured instead of modelled latency: start with
  every parameter at its minimum, try +1 on each parameter, keep the one that gains most, stop when no
  increment gains more than ``min_gain`` or the budget is used (``tensorflow/core/framework/model.cc``).
- :class:`StaticAgent` keeps one allocation (the baselines: default, even split, oracle).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from lightning_ext.core.validation import (
    check_fraction, check_non_negative, check_number, check_positive, check_positive_int,
)
from lightning_ext.pipeline.staged import Allocation


@dataclass(frozen=True)
class SearchSpace:
    """Allocations a tuner may choose.

    Args:
        stage_names: names of the stages, in order.
        min_workers: lowest worker count per stage.
        max_workers: highest worker count per stage.
        cpu_budget: the most workers in total (``sum(workers) <= cpu_budget``).
        prefetch_range: ``(lowest, highest)`` prefetch depth.
        memory_budget: bytes the in-flight batches may hold (``None``: unlimited); estimated as
            ``batch_bytes * (2 * sum(workers) + prefetch)``.
    """

    stage_names: tuple[str, ...]
    min_workers: tuple[int, ...]
    max_workers: tuple[int, ...]
    cpu_budget: int
    prefetch_range: tuple[int, int] = (1, 8)
    memory_budget: Optional[float] = None

    def __post_init__(self) -> None:
        n = len(self.stage_names)
        check_positive_int("cpu_budget", self.cpu_budget)
        if self.memory_budget is not None:
            check_positive("memory_budget (bytes, or None)", self.memory_budget)
        if not n or len(self.min_workers) != n or len(self.max_workers) != n:
            raise ValueError("`stage_names`, `min_workers` and `max_workers` must have the same, non-zero length.")
        if sum(self.min_workers) > self.cpu_budget:
            raise ValueError(f"The CPU budget {self.cpu_budget} is below the stages' minimum "
                             f"{sum(self.min_workers)}; raise `cpu_budget`.")
        lo, hi = self.prefetch_range
        if not 1 <= lo <= hi:
            raise ValueError(f"`prefetch_range` must satisfy 1 <= low <= high, got {self.prefetch_range}.")

    @classmethod
    def for_stages(cls, stages, cpu_budget: int, prefetch_range=(1, 8), memory_budget=None) -> "SearchSpace":
        """The space of a :class:`~lightning_ext.pipeline.StagedPipeline`'s stages under a CPU budget."""
        return cls(tuple(s.name for s in stages), tuple(s.min_workers for s in stages),
                   tuple(min(cpu_budget, s.max_workers or cpu_budget) for s in stages), cpu_budget,
                   tuple(prefetch_range), memory_budget)

    @property
    def num_stages(self) -> int:
        return len(self.stage_names)

    def memory(self, a: Allocation, batch_bytes: float) -> float:
        return batch_bytes * (sum(2 * max(1, w) for w in a.workers) + a.prefetch)

    def valid(self, a: Allocation, batch_bytes: float = 0.0) -> bool:
        lo, hi = self.prefetch_range
        ok = (a.total <= self.cpu_budget and lo <= a.prefetch <= hi
              and all(m <= w <= x for m, w, x in zip(self.min_workers, a.workers, self.max_workers)))
        if ok and self.memory_budget is not None and batch_bytes > 0:
            ok = self.memory(a, batch_bytes) <= self.memory_budget
        return ok

    def clip(self, a: Allocation) -> Allocation:
        """The nearest valid allocation (bounds per stage, then units removed from the largest stages)."""
        w = [min(max(v, m), x) for v, m, x in zip(a.workers, self.min_workers, self.max_workers)]
        while sum(w) > self.cpu_budget:
            i = max((i for i in range(len(w)) if w[i] > self.min_workers[i]), key=lambda i: w[i])
            w[i] -= 1
        lo, hi = self.prefetch_range
        return Allocation(tuple(w), min(max(a.prefetch, lo), hi))

    def minimum(self) -> Allocation:
        """Every parameter at its minimum: where hill climbing starts."""
        return self.clip(Allocation(self.min_workers, self.prefetch_range[0]))

    def even_split(self, prefetch: int = 2) -> Allocation:
        """The CPU budget split as evenly as the bounds allow (earlier stages get the remainder)."""
        n = self.num_stages
        w = [self.cpu_budget // n + (1 if i < self.cpu_budget % n else 0) for i in range(n)]
        return self.clip(Allocation(tuple(w), prefetch))

    def all_allocations(self, prefetch_values: Sequence[int] = (2,), use_full_budget: bool = False) -> list[Allocation]:
        """Every valid allocation (the exhaustive-search oracle's grid)."""
        ranges = [range(m, x + 1) for m, x in zip(self.min_workers, self.max_workers)]
        out = []
        for w in itertools.product(*ranges):
            if sum(w) > self.cpu_budget or (use_full_budget and sum(w) != self.cpu_budget):
                continue
            out += [Allocation(w, p) for p in prefetch_values if self.valid(Allocation(w, p))]
        return out

    # -- discrete actions ----------------------------------------------------------------------------------
    def actions(self) -> list[tuple]:
        """``("noop",)``, ``("move", i, j)``, ``("add", i)``, ``("remove", i)``, ``("prefetch", +1 | -1)``."""
        n = self.num_stages
        acts: list[tuple] = [("noop",)]
        acts += [("move", i, j) for i in range(n) for j in range(n) if i != j]
        acts += [("add", i) for i in range(n)] + [("remove", i) for i in range(n)]
        return acts + [("prefetch", 1), ("prefetch", -1)]

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


class DQNAgent(Agent):
    """Value-based RL agent (DQN) that moves CPU units between pipeline stages, as in InTune.

    Args:
        space: the search space.
        explore_decisions: decisions over which epsilon decays from ``epsilon_start`` to ``epsilon_end``; the
            agent settles after them.
        hidden: width of the two hidden layers of the Q-network.
        lr, gamma: Adam learning rate and discount.
        replay_size, batch_size, updates_per_decision: experience replay.
        target_sync: decisions between copies of the online network into the target network.
        kappa: weight of the memory-excess penalty in the reward.
        min_visits: measurements an allocation needs before it can be chosen as the best one.
        confirm_top: when exploration ends, the best ``confirm_top`` allocations by mean throughput are
            re-measured until each has ``min_visits`` measurements, then the best mean is chosen.
        novelty: weight of the count-based bonus ``novelty / sqrt(1 + visits)`` added to the Q-value of an
            action leading to a rarely measured allocation when acting greedily (0 disables).
        drift_tolerance, drift_patience: once settled, a throughput below ``(1 - drift_tolerance)`` times the
            best allocation's mean for ``drift_patience`` windows in a row reopens exploration
            (epsilon 0.3, for a quarter of ``explore_decisions``).
        seed: seed of the network initialisation and of exploration.
    """

    name = "rl"

    def __init__(
        self,
        space: SearchSpace,
        explore_decisions: int = 100,
        epsilon_start: float = 1.0,
        epsilon_end: float = 0.05,
        hidden: int = 64,
        lr: float = 1e-3,
        gamma: float = 0.9,
        replay_size: int = 5000,
        batch_size: int = 32,
        updates_per_decision: int = 4,
        target_sync: int = 25,
        kappa: float = 1.0,
        min_visits: int = 2,
        confirm_top: int = 3,
        novelty: float = 0.1,
        drift_tolerance: float = 0.3,
        drift_patience: int = 5,
        seed: int = 0,
    ) -> None:
        import torch
        from torch import nn

        super().__init__(space)
        for name, value in (("explore_decisions", explore_decisions), ("hidden", hidden), ("replay_size", replay_size),
                            ("batch_size", batch_size), ("target_sync", target_sync), ("min_visits", min_visits),
                            ("confirm_top", confirm_top), ("drift_patience", drift_patience)):
            check_positive_int(name, value)
        for name, value in (("epsilon_start", epsilon_start), ("epsilon_end", epsilon_end), ("gamma", gamma),
                            ("drift_tolerance", drift_tolerance)):
            check_fraction(name, value)
        for name, value in (("kappa", kappa), ("novelty", novelty)):
            check_non_negative(name, value)
        check_positive("lr", lr)
        check_number("updates_per_decision", updates_per_decision, low=0, integer=True)
        check_number("seed", seed, integer=True)
        self.explore_decisions, self.epsilon_start, self.epsilon_end = explore_decisions, epsilon_start, epsilon_end
        self.gamma, self.batch_size, self.updates_per_decision = gamma, batch_size, updates_per_decision
        self.replay_size, self.target_sync, self.kappa, self.min_visits = replay_size, target_sync, kappa, min_visits
        self.confirm_top, self.novelty = confirm_top, novelty
        self.drift_tolerance, self.drift_patience = drift_tolerance, drift_patience
        self.action_list = space.actions()
        self.state_dim = 2 * space.num_stages + 4
        gen = torch.Generator().manual_seed(seed)

        def mlp():
            net = nn.Sequential(nn.Linear(self.state_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                nn.Linear(hidden, len(self.action_list)))
            with torch.no_grad():
                for p in net.parameters():
                    p.copy_(torch.empty_like(p).uniform_(-1, 1, generator=gen) / math.sqrt(max(1, p.shape[-1])))
            return net

        self.q, self.q_target = mlp(), mlp()
        self.q_target.load_state_dict(self.q.state_dict())
        self.optimizer = torch.optim.Adam(self.q.parameters(), lr=lr)
        self.rng = np.random.default_rng(seed)
        self.replay: list[tuple] = []
        self.t_ref = 0.0
        self.visits: dict[str, list[float]] = {}  # str(allocation) -> [sum of throughput, count]
        self._allocs: dict[str, Allocation] = {}
        self._prev: Optional[tuple[np.ndarray, int]] = None
        self._explore_until = explore_decisions
        self._low_windows = 0
        self.last_reward = 0.0
        self.last_action: tuple = ("noop",)

    # -- MDP -----------------------------------------------------------------------------------------------
    @property
    def epsilon(self) -> float:
        if self.settled:
            return 0.0
        start = self._explore_until - self.explore_decisions if self._explore_until > self.explore_decisions else 0
        span = max(1, self._explore_until - start)
        frac = min(1.0, max(0.0, (self.decisions - start) / span))
        eps0 = self.epsilon_start if start == 0 else 0.3
        return eps0 + frac * (self.epsilon_end - eps0)

    def features(self, obs: Observation) -> np.ndarray:
        sp = self.space
        w = [x / sp.cpu_budget for x in obs.allocation.workers]
        busy = list(obs.busy) + [0.0] * (sp.num_stages - len(obs.busy))
        tp = obs.throughput / self.t_ref if self.t_ref > 0 else 0.0
        return np.array([*w, obs.allocation.prefetch / sp.prefetch_range[1], tp, *[min(1.0, b) for b in busy],
                         obs.wait_fraction, min(obs.memory_fraction, 2.0) / 2], dtype=np.float32)

    def reward(self, obs: Observation) -> float:
        if obs.failed:
            return -1.0
        return obs.throughput / max(self.t_ref, 1e-9) - self.kappa * max(0.0, obs.memory_fraction - 1.0)

    def _record(self, obs: Observation) -> None:
        if obs.failed:
            return
        key = str(obs.allocation)
        s = self.visits.setdefault(key, [0.0, 0])
        s[0] += obs.throughput
        s[1] += 1
        self._allocs[key] = obs.allocation
        self.last_good = obs.allocation

    def best_measured(self) -> Optional[Allocation]:
        """The allocation with the highest mean throughput among those measured ``min_visits`` times."""
        def mean(k):
            return self.visits[k][0] / self.visits[k][1]
        pool = [k for k, v in self.visits.items() if v[1] >= self.min_visits] or list(self.visits)
        return self._allocs[max(pool, key=mean)] if pool else None

    def _novelty(self, obs: Observation) -> np.ndarray:
        """Count-based exploration bonus ``c / sqrt(1 + visits)`` of the allocation each action leads to."""
        bonus = np.zeros(len(self.action_list))
        if self.novelty <= 0:
            return bonus
        for k, act in enumerate(self.action_list):
            nxt = self.space.apply(obs.allocation, act, obs.batch_bytes)
            if nxt is not None:
                bonus[k] = self.novelty / math.sqrt(1 + self.visits.get(str(nxt), [0, 0])[1])
        return bonus

    def _unconfirmed(self) -> Optional[Allocation]:
        """Among the ``confirm_top`` allocations with the highest mean, one measured under ``min_visits`` times."""
        ranked = sorted(self.visits, key=lambda k: self.visits[k][0] / self.visits[k][1], reverse=True)
        for k in ranked[: self.confirm_top]:
            if self.visits[k][1] < self.min_visits:
                return self._allocs[k]
        return None

    def _train(self) -> None:
        import torch

        if len(self.replay) < self.batch_size:
            return
        for _ in range(self.updates_per_decision):
            idx = self.rng.choice(len(self.replay), size=self.batch_size, replace=False)
            s, a, r, s2, mask2 = (np.stack([self.replay[i][k] for i in idx]) for k in range(5))
            s, s2 = torch.from_numpy(s), torch.from_numpy(s2)
            with torch.no_grad():
                q2 = self.q_target(s2).masked_fill(~torch.from_numpy(mask2), -1e9).max(1).values
                target = torch.from_numpy(r).float() + self.gamma * q2
            q = self.q(s).gather(1, torch.from_numpy(a).long()[:, None])[:, 0]
            loss = torch.nn.functional.smooth_l1_loss(q, target)
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()

    def _valid_mask(self, a: Allocation, batch_bytes: float) -> np.ndarray:
        return np.array([self.space.apply(a, act, batch_bytes) is not None for act in self.action_list])

    def act(self, obs: Observation) -> Allocation:
        import torch

        self.decisions += 1
        if not obs.failed:
            self.t_ref = max(self.t_ref, obs.throughput)
        self._record(obs)
        state = self.features(obs)
        mask = self._valid_mask(obs.allocation, obs.batch_bytes)
        self.last_reward = self.reward(obs)
        if self._prev is not None:
            self.replay.append((self._prev[0], np.int64(self._prev[1]), np.float32(self.last_reward), state, mask))
            del self.replay[: max(0, len(self.replay) - self.replay_size)]
            self._train()
        if self.decisions % self.target_sync == 0:
            self.q_target.load_state_dict(self.q.state_dict())
        self.best = self.best_measured()

        if obs.failed and self.last_good is not None:  # revert at once
            self._prev = None
            return self.last_good
        if self.settled:
            return self._settled_step(obs)
        if self.decisions >= self._explore_until:
            confirm = self._unconfirmed()
            if confirm is not None:  # re-measure promising allocations seen too few times before choosing
                self._prev = None
                return confirm
            self.settled = True
            self._prev = None
            self.best = self.best_measured()
            return self.best or obs.allocation
        if self.rng.random() < self.epsilon:
            k = int(self.rng.choice(np.flatnonzero(mask)))
        else:
            with torch.no_grad():
                q = self.q(torch.from_numpy(state)[None])[0].numpy()
            k = int(np.argmax(np.where(mask, q + self._novelty(obs), -np.inf)))
        self._prev = (state, k)
        self.last_action = self.action_list[k]
        return self.space.apply(obs.allocation, self.action_list[k], obs.batch_bytes) or obs.allocation

    def _settled_step(self, obs: Observation) -> Allocation:
        best = self.best or obs.allocation
        key = str(best)
        best_mean = self.visits[key][0] / self.visits[key][1] if key in self.visits else obs.throughput
        low = obs.allocation == best and obs.throughput < (1 - self.drift_tolerance) * best_mean
        self._low_windows = self._low_windows + 1 if low else 0
        if self._low_windows >= self.drift_patience:  # the workload changed: explore again for a while
            self.settled, self._low_windows = False, 0
            self._explore_until = self.decisions + max(1, self.explore_decisions // 4)
            self.t_ref = obs.throughput
        return best

    # -- checkpointing -------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            **super().state_dict(),
            "q": self.q.state_dict(), "q_target": self.q_target.state_dict(), "optimizer": self.optimizer.state_dict(),
            "replay": [tuple(np.asarray(x).tolist() for x in t) for t in self.replay],
            "t_ref": self.t_ref, "visits": {k: list(v) for k, v in self.visits.items()},
            "allocs": {k: a.to_dict() for k, a in self._allocs.items()},
            "rng": self.rng.bit_generator.state, "explore_until": self._explore_until,
            "prev": None if self._prev is None else (self._prev[0].tolist(), self._prev[1]),
        }

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.q.load_state_dict(state["q"])
        self.q_target.load_state_dict(state["q_target"])
        self.optimizer.load_state_dict(state["optimizer"])
        dtypes = (np.float32, np.int64, np.float32, np.float32, bool)
        self.replay = [tuple(np.asarray(x, dtype=d) for x, d in zip(t, dtypes)) for t in state["replay"]]
        self.t_ref = float(state["t_ref"])
        self.visits = {k: [float(v[0]), int(v[1])] for k, v in state["visits"].items()}
        self._allocs = {k: Allocation.from_dict(a) for k, a in state["allocs"].items()}
        self.rng.bit_generator.state = state["rng"]
        self._explore_until = int(state["explore_until"])
        prev = state.get("prev")
        self._prev = None if prev is None else (np.asarray(prev[0], dtype=np.float32), int(prev[1]))
