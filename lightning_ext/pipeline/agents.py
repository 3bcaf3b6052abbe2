"""The value-based RL agent (DQN) of InTune; the search space and the baselines are re-exported here.

Every tuner sees the same thing after each measurement window (an :class:`Observation` of the allocation that
ran) and answers with the allocation to run next (:meth:`Agent.act`), within a :class:`SearchSpace` (CPU and
I/O budgets, per-stage bounds, prefetch range, memory budget; :mod:`.space`).

:class:`DQNAgent` follows the MDP of InTune as specified in ``shared/specs/callbacks.md`` §1 (the paper's exact
state, action and network are not public; this MDP is ours, aligned with its description): state = normalised
allocation, prefetch depth, throughput over its running maximum, per-stage busy fraction, data-wait fraction,
memory use over budget; actions = no-op, move one unit between two stages of the same budget, add or release
one unit, prefetch +-1 (when prefetch is tuned); reward = throughput / running-max throughput - kappa * memory
excess, -1 on a worker failure. A 2x64 MLP Q-network, Adam 1e-3, gamma 0.9, replay 5k, target sync every 25
decisions. Learning starts once ``learn_start`` transitions are stored (8 by default, i.e. from the 9th
decision on), with minibatches of up to ``batch_size``; epsilon decays from 1.0 to 0.05 over
``epsilon_decisions`` decisions, a schedule that does not depend on how long exploration lasts
(``explore_decisions``), so a run stopped earlier behaves like the start of a longer one. After exploring it
re-measures its most promising allocations, settles on the best mean, keeps measuring it, and reopens
exploration on a sustained drop. The baselines (:mod:`.baselines`): :class:`HillClimber` (tf.data AUTOTUNE's
HILL_CLIMB on measured throughput), :class:`BusyTimeAllocator` (allocation in proportion to measured per-stage
busy time, like AUTOTUNE's and Plumber's cost models) and :class:`StaticAgent`.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from lightning_ext.core.validation import (
    check_fraction, check_non_negative, check_number, check_positive, check_positive_int,
)
from lightning_ext.pipeline.baselines import BusyTimeAllocator, HillClimber, StaticAgent, proportional_allocation
from lightning_ext.pipeline.space import Agent, Observation, SearchSpace
from lightning_ext.pipeline.staged import Allocation

__all__ = ["Agent", "BusyTimeAllocator", "DQNAgent", "HillClimber", "Observation", "SearchSpace", "StaticAgent",
           "proportional_allocation"]


class DQNAgent(Agent):
    """Value-based RL agent (DQN) that moves CPU units between pipeline stages, as in InTune.

    Args:
        space: the search space.
        explore_decisions: decisions the agent explores before it settles.
        epsilon_decisions: decisions over which epsilon decays from ``epsilon_start`` to ``epsilon_end``
            (``None``: ``explore_decisions``); fix it to make the schedule independent of the exploration budget.
        learn_start: transitions stored before the Q-network's first update (must leave updates within
            ``explore_decisions``; ``updates_per_decision=0`` disables learning: the untrained-network ablation).
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
        epsilon_decisions: Optional[int] = None,
        learn_start: int = 8,
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
                            ("confirm_top", confirm_top), ("drift_patience", drift_patience),
                            ("learn_start", learn_start)):
            check_positive_int(name, value)
        if epsilon_decisions is not None:
            check_positive_int("epsilon_decisions (or None for explore_decisions)", epsilon_decisions)
        if updates_per_decision > 0 and learn_start + 1 > explore_decisions:
            raise ValueError(f"learn_start={learn_start} leaves the Q-network untrained within explore_decisions="
                             f"{explore_decisions} (the first update comes at decision learn_start + 1); "
                             f"lower learn_start or raise explore_decisions.")
        for name, value in (("epsilon_start", epsilon_start), ("epsilon_end", epsilon_end), ("gamma", gamma),
                            ("drift_tolerance", drift_tolerance)):
            check_fraction(name, value)
        for name, value in (("kappa", kappa), ("novelty", novelty)):
            check_non_negative(name, value)
        check_positive("lr", lr)
        check_number("updates_per_decision", updates_per_decision, low=0, integer=True)
        check_number("seed", seed, integer=True)
        self.explore_decisions, self.epsilon_start, self.epsilon_end = explore_decisions, epsilon_start, epsilon_end
        self.epsilon_decisions = epsilon_decisions or explore_decisions
        self.learn_start = learn_start
        self.updates = 0  # gradient steps taken on the Q-network
        self.first_update_decision: Optional[int] = None
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
        self._initial = torch.cat([p.detach().flatten().clone() for p in self.q.parameters()])
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
        span = self.epsilon_decisions if start == 0 else max(1, self._explore_until - start)
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

        if len(self.replay) < self.learn_start or self.updates_per_decision == 0:
            return
        if self.first_update_decision is None:
            self.first_update_decision = self.decisions
        for _ in range(self.updates_per_decision):
            idx = self.rng.choice(len(self.replay), size=min(self.batch_size, len(self.replay)), replace=False)
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
            self.updates += 1

    def parameter_change(self) -> float:
        """L2 distance of the Q-network's weights from their initialisation (0: it never learned)."""
        import torch

        now = torch.cat([p.detach().flatten() for p in self.q.parameters()])
        return float(torch.linalg.vector_norm(now - self._initial))

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
            "updates": self.updates, "first_update_decision": self.first_update_decision,
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
        self.updates = int(state.get("updates", 0))
        self.first_update_decision = state.get("first_update_decision")
