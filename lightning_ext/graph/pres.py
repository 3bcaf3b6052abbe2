"""PRES core: prediction-correction of a memory-based dynamic GNN's memory, and the memory-coherence loss.

Su, Zou, Wu, "PRES: Toward Scalable Memory-Based Dynamic Graph Neural Networks", ICLR 2024, arXiv 2402.04284;
reference code https://github.com/jwsu825/MDGNN_BS (``model/mdgnn.py``, ``modules/filter.py``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


def pres_correct(s_prev: Tensor, s_updated: Tensor, delta_mean: Tensor, gamma: Tensor) -> Tensor:
    """PRES's prediction-correction of a memory update (single-Gaussian transition model).

    The memory ``s_prev`` of a node before the temporal batch is moved by the standard (discontinuous) update to
    ``s_updated``; the prediction is ``s_hat = s_prev + mu`` with ``mu`` the node's mean past transition
    ``E[s_new - s_old]``, and the corrected memory is ``s = gamma * s_hat + (1 - gamma) * s_updated``.

    Example:
        >>> s = pres_correct(torch.zeros(1, 2), torch.ones(1, 2), torch.full((1, 2), 3.0), torch.tensor(0.5))
        >>> s.tolist()
        [[2.0, 2.0]]
    """
    return gamma * (s_prev + delta_mean) + (1 - gamma) * s_updated


def coherence_loss(s: Tensor, s_prev: Tensor) -> Tensor:
    """Memory coherence loss ``1 - mean_i cos(s_i, s_prev_i)`` over the rows (nodes) given.

    Example:
        >>> float(coherence_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])))
        1.0
    """
    if s.numel() == 0:
        return s.sum() * 0
    return 1 - F.cosine_similarity(s, s_prev, dim=-1).mean()


def update_moments(mean: Tensor, sq: Tensor, count: Tensor, index: Tensor, delta: Tensor) -> None:
    """Add one observed transition ``delta[k]`` per node ``index[k]`` (unique) to running first/second moments,
    in place: ``mean <- mean + (delta - mean) / (n + 1)``, ``sq`` likewise with ``delta**2``, ``count += 1``."""
    n = count[index] + 1
    w = (1.0 / n).unsqueeze(-1)
    mean[index] = mean[index] + (delta - mean[index]) * w
    sq[index] = sq[index] + (delta * delta - sq[index]) * w
    count[index] = n


def minmax_signed(x: Tensor) -> Tensor:
    """Global min-max scaling to ``[-1, 1]`` over all entries, left as is when its maximum is 0 (the official
    code's convention in ``model/mdgnn.py``).

    Example:
        >>> minmax_signed(torch.tensor([0.0, 2.0, 4.0])).tolist(), minmax_signed(torch.zeros(2)).tolist()
        ([-1.0, 0.0, 1.0], [0.0, 0.0])
    """
    if float(x.max()) == 0:
        return x
    lo = x.min()
    return 2 * (x - lo) / (x.max() - lo).clamp_min(1e-12) - 1


def code_coherence(s: Tensor, s_prev: Tensor) -> Tensor:
    """The official code's coherence term: ``1 - mean`` of a column-wise cosine of row-normalised matrices."""
    a, b = F.normalize(s, dim=1), F.normalize(s_prev, dim=1)
    return 1 - F.cosine_similarity(a, b, dim=0).mean()


def gamma_logit(gamma: float) -> float:
    """``logit(gamma)``, so that ``sigmoid`` of it starts at ``gamma`` (clipped away from 0 and 1)."""
    g = min(max(gamma, 1e-4), 1 - 1e-4)
    return math.log(g / (1 - g))


_MEMORY_CLASS: Any = None


def pres_memory_class() -> type:
    """PyG's ``TGNMemory`` with PRES wrapped around every memory read and commit (built on first use: PyG is an
    extra). Pending messages (``msg_s_store``/``msg_d_store``) are part of its ``state_dict`` (extra state)."""
    global _MEMORY_CLASS
    if _MEMORY_CLASS is not None:
        return _MEMORY_CLASS
    from torch_geometric.nn.models.tgn import TGNMemory

    class PRESMemory(TGNMemory):
        """``TGNMemory`` + PRES (``pres=None`` gives plain TGN) + pending messages in ``state_dict``."""

        def __init__(self, *args: Any, pres: Any = None, gamma: float = 0.9, learn_gamma: bool = True,
                     **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.pres = pres
            n, d = self.num_nodes, self.memory_dim
            if pres is not None:
                theta = torch.tensor(gamma_logit(gamma) if pres == "paper" else float(gamma))
                if learn_gamma:
                    self.gamma_param = torch.nn.Parameter(theta)
                else:
                    self.register_buffer("gamma_param", theta)
                self.register_buffer("delta_mean", torch.zeros(n, d))
                self.register_buffer("delta_sq", torch.zeros(n, d))
                self.register_buffer("delta_count", torch.zeros(n))

        def gamma(self) -> Tensor:
            """``sigmoid(theta)`` (paper form) or the raw, unconstrained scalar (official code form)."""
            return torch.sigmoid(self.gamma_param) if self.pres == "paper" else self.gamma_param

        def reset_state(self) -> None:
            super().reset_state()
            if getattr(self, "pres", None) is not None:
                self.delta_mean.zero_(), self.delta_sq.zero_(), self.delta_count.zero_()

        def _get_updated_memory(self, n_id: Tensor):
            raw, last_update = super()._get_updated_memory(n_id)
            self._raw = raw
            if self.pres is None:
                return raw, last_update
            s_prev = self.memory[n_id]
            if self.pres == "paper":
                mu = self.delta_mean[n_id]
            else:  # official code: min-max of the per-node running sum, over all nodes
                mu = minmax_signed(self.delta_mean)[n_id]
            return pres_correct(s_prev, raw, mu, self.gamma()), last_update

        def _update_memory(self, n_id: Tensor) -> None:
            memory, last_update = self._get_updated_memory(n_id)
            if self.pres is not None:
                with torch.no_grad():
                    if self.pres == "paper":
                        update_moments(self.delta_mean, self.delta_sq, self.delta_count, n_id,
                                       (self._raw - self.memory[n_id]).detach())
                    else:
                        c = minmax_signed((memory - self.memory[n_id]).detach())
                        self.delta_mean[n_id] += 1 + c
                        self.delta_sq[n_id] += c * c
            self.memory[n_id] = memory
            self.last_update[n_id] = last_update

        def get_extra_state(self) -> dict:
            out = {}
            for name in ("msg_s_store", "msg_d_store"):
                store = getattr(self, name)
                parts = [store[j] for j in range(self.num_nodes)]
                out[name] = {"count": torch.tensor([p[0].numel() for p in parts], dtype=torch.long),
                             "src": torch.cat([p[0] for p in parts]), "dst": torch.cat([p[1] for p in parts]),
                             "t": torch.cat([p[2] for p in parts]),
                             "msg": torch.cat([p[3].reshape(-1, self.raw_msg_dim) for p in parts])}
            return out

        def set_extra_state(self, state: dict) -> None:
            for name in ("msg_s_store", "msg_d_store"):
                s = state[name]
                counts = s["count"].tolist()
                cols = [s[k].split(counts) for k in ("src", "dst", "t", "msg")]
                setattr(self, name, {j: tuple(c[j] for c in cols) for j in range(self.num_nodes)})

    _MEMORY_CLASS = PRESMemory
    return PRESMemory
