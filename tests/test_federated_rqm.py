"""RQM's numeric accountant and the Gaussian-mechanism baseline (pure functions; no Flower needed)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_ext.federated.gaussian_mechanism import gaussian_epsilon, gaussian_sigma_for_epsilon, gaussian_update
from lightning_ext.federated.rqm import (DEFAULT_ORDERS, gaussian_rdp, rdp_to_epsilon, rqm_delta_for_epsilon,
                                         rqm_rdp_curve, rqm_renyi)


@pytest.mark.parametrize("clip,delta,m,q", [(0.05, 0.1, 16, 0.5), (0.5, 1.0, 8, 0.2), (1.0, 7.0, 4, 0.8)])
def test_rdp_curve_equals_the_per_order_divergence(clip, delta, m, q):
    orders = [1.5, 2.0, 4.0, 17.0]
    got = rqm_rdp_curve(orders, clip, delta, m, q, grid=11)
    want = [rqm_renyi(a, clip, delta, m, q, grid=11) for a in orders]
    assert np.allclose(got, want, rtol=1e-10, atol=1e-12)
    assert np.all(np.diff(got) >= -1e-12)  # RDP is non-decreasing in the order
    assert np.isinf(rqm_rdp_curve([4.0], 0.5, 1.0, 8, 1.0, grid=9)).all()


def test_calibrated_delta_meets_the_target_and_falls_as_epsilon_grows():
    events = 650 * 30
    deltas = []
    for eps in (30.0, 300.0, 3000.0):
        d = rqm_delta_for_epsilon(eps, 1e-5, 0.05, 8, 0.5, events, grid=11)
        got = rdp_to_epsilon(events * rqm_rdp_curve(DEFAULT_ORDERS, 0.05, d, 8, 0.5, grid=11), DEFAULT_ORDERS, 1e-5)
        assert got == pytest.approx(eps, rel=1e-3)
        deltas.append(d)
    assert deltas[0] > deltas[1] > deltas[2] > 0.05
    # scale equivariance: epsilon depends on delta / clip only
    assert rqm_delta_for_epsilon(300.0, 1e-5, 0.5, 8, 0.5, events, grid=11) == pytest.approx(10 * deltas[1], rel=1e-3)
    with pytest.raises(ValueError, match="target_epsilon"):
        rqm_delta_for_epsilon(1e-9, 1e-5, 0.05, 8, 0.5, events, grid=11)


def _renyi_of_two_gaussians_by_quadrature(alpha, shift, sigma):
    """D_alpha(N(shift, sigma^2) || N(0, sigma^2)) from its definition, integrated numerically (independent of
    the closed form)."""
    from scipy import integrate
    from scipy.stats import norm

    f = lambda x: math.exp(alpha * norm.logpdf(x, shift, sigma) + (1 - alpha) * norm.logpdf(x, 0, sigma))  # noqa: E731
    centre = alpha * shift  # the integrand is a scaled Gaussian density centred here
    val, _ = integrate.quad(f, centre - 30 * sigma, centre + 30 * sigma, limit=400)
    return math.log(val) / (alpha - 1)


def _analytic_gaussian_delta(eps, sensitivity, sigma):
    """Exact privacy profile of the Gaussian mechanism (Balle & Wang, ICML 2018, Thm. 8)."""
    from scipy.stats import norm

    a, b = sensitivity / (2 * sigma), eps * sigma / sensitivity
    return norm.cdf(a - b) - math.exp(eps) * norm.cdf(-a - b)


def test_gaussian_accountant_matches_independent_implementations():
    clip, sigma = 0.05, 0.3
    for alpha in (1.5, 2.0, 8.0):
        assert gaussian_rdp(alpha, 2 * clip, sigma) == pytest.approx(
            _renyi_of_two_gaussians_by_quadrature(alpha, 2 * clip, sigma), rel=1e-6)
    events, target = 650 * 30, 300.0
    s = gaussian_sigma_for_epsilon(target, 1e-5, clip, events)
    eps = gaussian_epsilon(s, 1e-5, clip, events)
    assert eps == pytest.approx(target, rel=1e-4) and eps <= target
    # composition of `events` Gaussians = one Gaussian with sensitivity 2 clip sqrt(events): its exact delta at the
    # RDP epsilon is at most the target (the RDP conversion is an upper bound) and not far below it
    exact = _analytic_gaussian_delta(eps, 2 * clip * math.sqrt(events), s)
    assert 1e-7 < exact <= 1e-5
    # the conversion over the discrete orders is at least the continuous optimum rho + 2 sqrt(rho log(1/delta))
    rho = events * (2 * clip) ** 2 / (2 * s ** 2)
    assert rho + 2 * math.sqrt(rho * math.log(1e5)) <= eps <= 1.01 * (rho + 2 * math.sqrt(rho * math.log(1e5)))


def test_gaussian_update_clips_then_adds_noise_of_the_given_scale():
    gen = torch.Generator().manual_seed(0)
    update = torch.tensor([0.3, -0.01, -2.0]).repeat(40_000)
    out = gaussian_update(update, clip=0.05, sigma=0.2, generator=gen).view(-1, 3)
    assert torch.allclose(out.mean(0), torch.tensor([0.05, -0.01, -0.05]), atol=4 * 0.2 / 200)
    assert torch.allclose(out.std(0), torch.full((3,), 0.2), rtol=0.02)
    with pytest.raises(ValueError, match="sigma"):
        gaussian_update(update, clip=0.05, sigma=float("nan"))
    with pytest.raises(ValueError, match="raise target_epsilon"):
        gaussian_sigma_for_epsilon(1e-12, 1e-5, 0.05, 650 * 30)
