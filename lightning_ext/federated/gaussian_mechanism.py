"""The Gaussian mechanism on clipped client updates, and its RDP accountant (the baseline RQM is compared with).

Paper: Mironov, "Renyi Differential Privacy", CSF 2017 (arXiv 1702.07476): the Gaussian mechanism with L2
sensitivity ``s`` and noise ``N(0, sigma^2)`` is ``(alpha, alpha s^2 / (2 sigma^2))``-RDP; RDP adds under
(adaptive) composition; ``eps(delta) = min_alpha [RDP(alpha) + log(1/delta) / (alpha - 1)]`` (Prop. 3). Reference
code: Opacus's ``opacus/accountants/analysis/rdp.py`` (same conversion, same default orders), which is not a
dependency here.

Convention shared with :mod:`lightning_ext.federated.rqm` (so that the two mechanisms are compared at equal epsilon):
each coordinate of a client's update is clipped to ``[-clip, clip]`` and any two clipped updates are neighbours
(client-level local DP: the server sees each client's message). One coordinate then has sensitivity ``2 clip``;
``events`` independent coordinate releases (``d`` coordinates x ``T`` rounds) compose to
``events * alpha (2 clip)^2 / (2 sigma^2)``, which equals the Gaussian mechanism on the whole box-clipped vector
(L2 sensitivity ``2 clip sqrt(d)``) composed over ``T`` rounds.

Example:
    >>> sigma = gaussian_sigma_for_epsilon(10.0, 1e-5, clip=1.0, events=1)
    >>> round(gaussian_epsilon(sigma, 1e-5, clip=1.0, events=1), 3)
    10.0
    >>> import torch
    >>> out = gaussian_update(torch.tensor([3.0, -0.5]), clip=1.0, sigma=0.0)
    >>> out.tolist()
    [1.0, -0.5]
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from lightning_ext.core.validation import check_number, check_positive_int
from lightning_ext.federated.rqm import DEFAULT_ORDERS, gaussian_rdp, rdp_to_epsilon


def gaussian_epsilon(sigma: float, target_delta: float, clip: float, events: int,
                     orders: Sequence[float] = DEFAULT_ORDERS) -> float:
    """Epsilon at ``target_delta`` of ``events`` composed coordinate releases with sensitivity ``2 clip``, noise ``sigma``."""
    check_number("sigma", sigma, low=0, low_open=True)
    check_number("clip", clip, low=0, low_open=True)
    check_positive_int("events", events)
    rdp = [events * gaussian_rdp(a, 2 * clip, sigma) for a in orders]
    return rdp_to_epsilon(rdp, orders, target_delta)


def gaussian_sigma_for_epsilon(target_epsilon: float, target_delta: float, clip: float, events: int,
                               orders: Sequence[float] = DEFAULT_ORDERS, tol: float = 1e-6) -> float:
    """The smallest noise ``sigma`` (bisection to a relative ``tol``) with :func:`gaussian_epsilon` ``<= target_epsilon``."""
    check_number("target_epsilon", target_epsilon, low=0, low_open=True)
    lo, hi = 1e-6 * clip, 1e6 * clip
    if gaussian_epsilon(hi, target_delta, clip, events, orders) > target_epsilon:
        raise ValueError(f"target_epsilon={target_epsilon} needs sigma > 1e6 * clip for events={events}; "
                         "raise target_epsilon.")
    while (hi - lo) > tol * hi:
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if gaussian_epsilon(mid, target_delta, clip, events, orders) > target_epsilon else (lo, mid)
    return hi


def gaussian_update(update: torch.Tensor, clip: float, sigma: float,
                    generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Clip every coordinate of ``update`` to ``[-clip, clip]`` and add ``N(0, sigma^2)`` noise (same dtype)."""
    check_number("clip", clip, low=0, low_open=True)
    check_number("sigma", sigma, low=0)
    clipped = update.detach().clamp(-clip, clip)
    if sigma == 0:
        return clipped
    noise = torch.randn(clipped.shape, generator=generator, dtype=torch.float64)
    return (clipped.double() + sigma * noise).to(update.dtype)
