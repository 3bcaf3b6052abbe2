"""RQM (Youn, Hu, Ziani, Abernethy, 2023): the randomized quantization mechanism for differentially private FL.

Paper: "Randomized Quantization is All You Need for Differential Privacy in Federated Learning", arXiv 2306.11913
(ICML 2023 workshop FL-AP). No official code was found. The mechanism below follows the spec's reading
(``federated.md`` 2.11, tagged Unverified there: check section 3 of the paper before claiming its epsilons).

A coordinate ``x`` is clipped to ``[-c, c]``; the levels are ``B(j) = -Delta + 2 Delta j / m``, ``j = 0..m``, with
``Delta > c``. (1) Each interior level is kept independently with probability ``q`` (the endpoints always);
(2) with ``B(a)`` the largest kept level ``<= x`` and ``B(b)`` the smallest kept level ``> x``, the output is
``B(b)`` with probability ``(x - B(a)) / (B(b) - B(a))`` and ``B(a)`` otherwise, so ``E[Q(x)] = x``.
:func:`rqm_pmf` gives the exact output distribution, :func:`rqm_renyi` the exact Renyi divergence between the
outputs of two inputs (its supremum over a grid of inputs is a per-coordinate RDP bound) and :func:`rdp_to_epsilon`
the usual conversion ``eps(delta) = min_alpha [RDP(alpha) + log(1/delta) / (alpha - 1)]``.

On Flower: :class:`RQMUpdate` is a client-side reply transform (the update ``w_local - w_global`` becomes
``uint8``/``int16`` level indices) and :func:`rqm_fedavg` a ``FedAvg`` whose aggregation averages the indices
(levels are affine in the index, so this equals averaging the levels) and adds the mapped update to the global
model.

Example:
    >>> import torch
    >>> p = rqm_pmf(0.3, delta=1.0, m=8, q=0.5)
    >>> round(float(p.sum()), 12), round(float((p * levels(1.0, 8)).sum()), 12)
    (1.0, 0.3)
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import numpy as np
import torch

from lightning_ext.core.validation import check_number, check_positive_int


def check_rqm(clip: float, delta: float, m: int, q: float) -> None:
    """Validate the mechanism's parameters (one line naming the argument)."""
    check_number("clip", clip, low=0, low_open=True)
    check_number("delta (the level range; must exceed clip)", delta, low=0, low_open=True)
    if not delta > clip:
        raise ValueError(f"delta={delta} must exceed clip={clip} (levels span [-delta, delta]).")
    check_positive_int("m", m)
    if m < 2:
        raise ValueError("m must be at least 2 (levels B(0..m)).")
    check_number("q (probability of keeping an interior level)", q, low=0, high=1, low_open=True)


def levels(delta: float, m: int) -> torch.Tensor:
    """The ``m + 1`` levels ``B(j) = -delta + 2 delta j / m`` (float64)."""
    return -delta + 2 * delta * torch.arange(m + 1, dtype=torch.float64) / m


def rqm_quantize(x: torch.Tensor, clip: float, delta: float, m: int, q: float,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Level indices (``int64``, in ``[0, m]``) of RQM applied to every coordinate of ``x`` (clipped to ``[-clip, clip]``)."""
    check_rqm(clip, delta, m, q)
    flat = x.detach().reshape(-1).to(torch.float64).clamp(-clip, clip)
    idx = torch.arange(m + 1)
    below = torch.floor((flat + delta) * m / (2 * delta)).long().clamp(0, m - 1)  # i(x): B(i) <= x < B(i+1)
    keep = torch.rand(len(flat), m + 1, generator=generator, dtype=torch.float64) < q
    keep[:, 0] = keep[:, m] = True
    le = keep & (idx[None, :] <= below[:, None])
    gt = keep & (idx[None, :] > below[:, None])
    a = torch.where(le, idx[None, :], torch.full_like(idx[None, :], -1)).max(dim=1).values
    b = torch.where(gt, idx[None, :], torch.full_like(idx[None, :], m + 1)).min(dim=1).values
    lev = levels(delta, m)
    p_up = (flat - lev[a]) / (lev[b] - lev[a])
    up = torch.rand(len(flat), generator=generator, dtype=torch.float64) < p_up
    return torch.where(up, b, a).reshape(x.shape)


def rqm_pmf(x: float, delta: float, m: int, q: float) -> torch.Tensor:
    """Exact probabilities of the ``m + 1`` outputs of RQM at input ``x`` (float64, O(m^2))."""
    lev = levels(delta, m).tolist()
    i = min(max(int(math.floor((x + delta) * m / (2 * delta))), 0), m - 1)
    low = {a: (q * (1 - q) ** (i - a) if a > 0 else (1 - q) ** i) for a in range(0, i + 1)}
    high = {h: (q * (1 - q) ** (h - i - 1) if h < m else (1 - q) ** (m - 1 - i)) for h in range(i + 1, m + 1)}
    p = [0.0] * (m + 1)
    for a, pa in low.items():
        for h, ph in high.items():
            up = (x - lev[a]) / (lev[h] - lev[a])
            p[h] += pa * ph * up
            p[a] += pa * ph * (1 - up)
    return torch.tensor(p, dtype=torch.float64)


def rqm_renyi(alpha: float, clip: float, delta: float, m: int, q: float, grid: int = 21) -> float:
    """``max over x, x' in a grid of [-clip, clip]`` of the Renyi divergence ``D_alpha(P_x || P_x')`` of one coordinate."""
    check_rqm(clip, delta, m, q)
    check_number("alpha", alpha, low=1, low_open=True)
    pmfs = [rqm_pmf(float(x), delta, m, q) for x in np.linspace(-clip, clip, grid)]
    worst = 0.0
    for p in pmfs:
        for r in pmfs:
            mask = p > 0
            if bool((r[mask] <= 0).any()):
                return math.inf
            val = float(torch.log((p[mask] ** alpha * r[mask] ** (1 - alpha)).sum()) / (alpha - 1))
            worst = max(worst, val)
    return worst


#: Renyi orders of the accountants (Opacus's default list): 1.1 .. 10.9 in steps of 0.1, then 12 .. 63.
DEFAULT_ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + [float(a) for a in range(12, 64)])


def rqm_rdp_curve(orders: Sequence[float], clip: float, delta: float, m: int, q: float,
                  grid: int = 21) -> np.ndarray:
    """Per-coordinate RDP of RQM at every order: :func:`rqm_renyi`'s supremum over the grid, the pmfs built once.

    Returns a float64 array of ``len(orders)`` (``inf`` where an output of one input is impossible under another,
    e.g. ``q = 1``). Depends on ``delta / clip``, ``m`` and ``q`` only (the mechanism is scale-equivariant).
    """
    check_rqm(clip, delta, m, q)
    with np.errstate(divide="ignore"):
        logp = np.log(np.stack([rqm_pmf(float(x), delta, m, q).numpy() for x in np.linspace(-clip, clip, grid)]))
    out = []
    for alpha in orders:
        check_number("alpha", alpha, low=1, low_open=True)
        pi, pj = logp[:, None, :], logp[None, :, :]  # D_alpha(P_i || P_j) over every pair of grid inputs
        with np.errstate(invalid="ignore"):
            terms = np.where(np.isfinite(pi), alpha * pi + (1 - alpha) * pj, -np.inf)
        top = terms.max(axis=2, keepdims=True)
        with np.errstate(invalid="ignore"):
            lse = np.where(np.isfinite(top[..., 0]), top[..., 0] + np.log(np.exp(terms - top).sum(axis=2)), top[..., 0])
        out.append(float(lse.max()) / (alpha - 1))
    return np.array(out, dtype=np.float64)


def rqm_delta_for_epsilon(target_epsilon: float, target_delta: float, clip: float, m: int, q: float, events: int,
                          orders: Sequence[float] = DEFAULT_ORDERS, grid: int = 21, tol: float = 1e-4) -> float:
    """The level range ``Delta`` at which ``events`` composed RQM coordinates are ``(target_epsilon, target_delta)``-DP.

    ``events`` counts the per-coordinate releases composed (e.g. ``d`` coordinates x ``T`` rounds of one client);
    RDP adds over them, then :func:`rdp_to_epsilon`. Epsilon falls as ``Delta / clip`` grows; bisection on
    ``log(Delta / clip - 1)`` to a relative ``tol`` of epsilon.
    """
    check_number("target_epsilon", target_epsilon, low=0, low_open=True)
    check_positive_int("events", events)

    def eps(log_gap: float) -> float:
        return rdp_to_epsilon(events * rqm_rdp_curve(orders, clip, clip * (1 + math.exp(log_gap)), m, q, grid),
                              orders, target_delta)

    lo, hi = math.log(1e-6), math.log(1e6)  # small gap: large epsilon; large gap: small epsilon
    if eps(hi) > target_epsilon or eps(lo) < target_epsilon:
        raise ValueError(f"target_epsilon={target_epsilon} is outside what Delta in (clip, 1e6 clip] reaches for "
                         f"m={m}, q={q}, events={events}; change target_epsilon or events.")
    while hi - lo > 1e-9:
        mid = (lo + hi) / 2
        e = eps(mid)
        if abs(e - target_epsilon) <= tol * target_epsilon:
            return clip * (1 + math.exp(mid))
        lo, hi = (mid, hi) if e > target_epsilon else (lo, mid)
    return clip * (1 + math.exp(hi))


def gaussian_rdp(alpha: float, sensitivity: float, sigma: float) -> float:
    """RDP of the Gaussian mechanism: ``alpha * sensitivity^2 / (2 sigma^2)`` (Mironov 2017)."""
    return alpha * sensitivity ** 2 / (2 * sigma ** 2)


def rdp_to_epsilon(rdp: Sequence[float], orders: Sequence[float], target_delta: float) -> float:
    """``min over orders of rdp(alpha) + log(1/delta) / (alpha - 1)`` (Mironov 2017, Prop. 3)."""
    check_number("target_delta", target_delta, low=0, high=1, low_open=True, high_open=True)
    return float(min(r + math.log(1 / target_delta) / (a - 1) for r, a in zip(rdp, orders)))


class RQMUpdate:
    """Client-side RQM: replaces the reply's weights by RQM level indices of the update ``w_local - w_global``.

    Pass it as ``LightningClient(reply_transform=RQMUpdate(...))``; the server runs :func:`rqm_fedavg`. Indices
    travel as ``uint8`` for ``m < 256`` (``int16`` otherwise): 4x fewer bytes than float32 weights.

    Args:
        clip: per-coordinate clipping bound ``c`` of the update.
        delta: level range ``Delta > c``.
        m: number of level intervals.
        q: probability of keeping each interior level.
        seed: base seed of the mechanism's randomness (combined with the round and the client).
    """

    def __init__(self, clip: float = 0.05, delta: float = 0.1, m: int = 16, q: float = 0.5, seed: int = 0) -> None:
        check_rqm(clip, delta, m, q)
        check_number("seed", seed, integer=True)
        self.clip, self.delta, self.m, self.q, self.seed = clip, delta, m, q, seed

    def __call__(self, reply: dict, global_arrays: dict, server_round: int, partition_id: int) -> dict:
        """Level indices of each float tensor's update (non-float tensors, e.g. BN counters, pass unchanged)."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + server_round * 1009 + partition_id)
        dtype = torch.uint8 if self.m < 256 else torch.int16
        out = {}
        for k, w in reply.items():
            if not torch.is_floating_point(w):
                out[k] = w
                continue
            update = w.double() - torch.as_tensor(global_arrays[k]).double()
            out[k] = rqm_quantize(update, self.clip, self.delta, self.m, self.q, gen).to(dtype)
        return out


def rqm_fedavg(clip: float = 0.05, delta: float = 0.1, m: int = 16, q: float = 0.5, **fedavg_kwargs: Any) -> Any:
    """A Flower ``FedAvg`` that decodes :class:`RQMUpdate` replies: ``w <- w + mean_k B(idx_k)``.

    ``B`` is affine in the index, so FedAvg's (example-weighted) mean of the indices maps to the mean of the
    levels exactly. The strategy remembers the global arrays it sent in ``configure_train``.
    """
    check_rqm(clip, delta, m, q)
    from lightning_ext.federated._flwr import require_flwr

    require_flwr("rqm_fedavg")
    from flwr.app import ArrayRecord
    from flwr.serverapp.strategy import FedAvg

    class RQMFedAvg(FedAvg):
        def configure_train(self, server_round, arrays, config, grid):
            self._sent = arrays.to_torch_state_dict()
            return super().configure_train(server_round, arrays, config, grid)

        def aggregate_train(self, server_round, replies):
            agg, metrics = super().aggregate_train(server_round, replies)
            if agg is None:
                return agg, metrics
            mean_idx = agg.to_torch_state_dict()
            new = {}
            for k, w in self._sent.items():
                if torch.is_floating_point(w):
                    update = -delta + 2 * delta * mean_idx[k].double() / m
                    new[k] = (w.double() + update).to(w.dtype)
                else:
                    new[k] = mean_idx[k]
            return ArrayRecord(new), metrics

    return RQMFedAvg(**fedavg_kwargs)
