"""NTKActivation and DeepKernelClassifier: duals by Monte Carlo, the kernel recursion against a wide random network
and the arc-cosine closed form, the classifier's behaviour, bad inputs, and the layer inside a trained model."""

import math

import pytest
import torch
from torch import nn

from lightning_ext.vision.ntk_activation import DeepKernelClassifier, NTKActivation, deep_kernel

ALL = [("relu", {}), ("erf", {}), ("sine", {"a": 2.676}), ("hermite", {"degree": 2}), ("2d_opt", {}),
       ("3d_opt", {}), ("5d_opt", {}), ("9d_opt", {})]


def _sphere(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    return x / x.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("name, kw", ALL, ids=[a for a, _ in ALL])
def test_dual_matches_monte_carlo_of_the_activation(name, kw):
    # E[φ(u)φ(v)] for corr(u, v) = ρ estimated from 60k normal pairs, against the closed-form dual.
    act = NTKActivation(name, **kw).double()
    g = torch.Generator().manual_seed(0)
    u, w = torch.randn(2, 60_000, generator=g, dtype=torch.float64)
    for rho in (-0.5, 0.3, 0.8, 1.0):
        v = rho * u + math.sqrt(1 - rho**2) * w
        mc = (act(u) * act(v)).mean()
        sem = (act(u) * act(v)).std() / math.sqrt(len(u))
        exact = act.dual(torch.tensor(rho, dtype=torch.float64))
        assert abs(float(mc - exact)) < 5 * float(sem) + 1e-3, (name, rho, float(mc), float(exact))
    assert float(act.dual(torch.tensor(1.0, dtype=torch.float64))) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("name, kw", ALL, ids=[a for a, _ in ALL])
def test_dual_grad_is_the_derivative_of_the_dual(name, kw):
    act = NTKActivation(name, **kw)
    rho = torch.linspace(-0.95, 0.95, 21, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(act.dual(rho).sum(), rho)
    torch.testing.assert_close(act.dual_grad(rho.detach()), grad, rtol=1e-9, atol=1e-9)


def test_relu_nngp_is_the_iterated_arc_cosine_kernel():
    # Cho & Saul's degree-1 arc-cosine kernel on the sphere, k(θ) = (sin θ + (π - θ) cos θ) / π, iterated.
    x = _sphere(12, 5, seed=1)
    cos = torch.clamp(x @ x.T, -1, 1)
    for _ in range(4):
        theta = torch.arccos(cos)
        cos = torch.clamp((torch.sin(theta) + (math.pi - theta) * torch.cos(theta)) / math.pi, -1, 1)
    torch.testing.assert_close(deep_kernel(x, x, NTKActivation("relu"), depth=4), cos, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["relu", "erf"])
def test_nngp_matches_a_wide_random_network(name):
    # Wide network in standard parameterisation, h_1 = W_1 x, h_{l+1} = W_{l+1} φ(h_l) / √N, W ~ N(0, 1):
    # (1/N) φ(h_L(x)) · φ(h_L(x')) -> Σ_L(x, x').
    torch.manual_seed(0)
    act, depth, width = NTKActivation(name), 3, 4000
    x = _sphere(6, 4, seed=2)
    h = x @ torch.randn(width, 4, dtype=torch.float64).T
    for _ in range(depth - 1):
        h = act(h) @ torch.randn(width, width, dtype=torch.float64).T / math.sqrt(width)
    f = act(h)
    mc = f @ f.T / width
    exact = deep_kernel(x, x, act, depth=depth)
    assert (mc - exact).abs().max() < 0.12, (mc - exact).abs().max()
    off = ~torch.eye(6, dtype=torch.bool)
    assert torch.corrcoef(torch.stack([mc[off], exact[off]]))[0, 1] > 0.95


def test_ntk_matches_the_empirical_tangent_kernel_of_a_wide_network():
    # f(x) = v · φ(W_2 φ(W_1 x) / √N) / √N with N(0, 1) weights (NTK parameterisation): the sum over all
    # parameters of ∂f(x)·∂f(x') -> Θ_2 of the recursion. (Bounded erf: polynomial activations need far more
    # width at depth 2, their per-input variance drifts off 1.)
    torch.manual_seed(0)
    act, width, d = NTKActivation("erf"), 3000, 4
    x = _sphere(4, d, seed=3)
    w1 = torch.randn(width, d, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(width, width, dtype=torch.float64, requires_grad=True)
    v = torch.randn(width, dtype=torch.float64, requires_grad=True)
    grads = []
    for xi in x:
        h1 = w1 @ xi
        h2 = w2 @ act(h1) / math.sqrt(width)
        f = v @ act(h2) / math.sqrt(width)
        grads.append(torch.cat([g.flatten() for g in torch.autograd.grad(f, (w1, w2, v))]))
    g = torch.stack(grads)
    empirical = g @ g.T
    exact = deep_kernel(x, x, act, depth=2, kernel="ntk")
    slope = (2 / 3) / math.sqrt(1 - 4 / 9) / math.asin(2 / 3)  # φ̌'(1) for erf
    assert float(exact[0, 0]) == pytest.approx(1 + slope * (1 + slope), rel=1e-12)
    assert (empirical - exact).abs().max() / exact.abs().max() < 0.1, (empirical, exact)


def test_classifier_shapes_dtypes_labels_and_interpolation():
    x = _sphere(40, 3, seed=4).abs()
    y = torch.tensor([5, 9] * 20)
    clf = DeepKernelClassifier("3d_opt", depth=5).fit(x.float(), y)
    assert clf.predict(x).tolist() == y.tolist()  # interpolation: training labels reproduced
    out = clf.decision_function(x[:7])
    assert out.shape == (7, 2) and out.dtype == torch.float64
    proba = clf.predict_proba(x[:7])
    torch.testing.assert_close(proba.sum(1), torch.ones(7, dtype=torch.float64))
    assert clf.predict(x[:7]).dtype == y.dtype and math.isfinite(clf.condition_number_)


def test_binary_one_hot_argmax_equals_the_authors_sign_rule_and_ntk_works():
    x, xt = _sphere(30, 3, seed=5), _sphere(20, 3, seed=6)
    y = (x[:, 0] > 0).long()
    for kernel in ("nngp", "ntk"):
        clf = DeepKernelClassifier("erf", depth=10, kernel=kernel).fit(x, y)
        k = deep_kernel(x, x, clf.act, 10, kernel)
        if kernel == "nngp":
            k.fill_diagonal_(1.0)
        sign = torch.sign(deep_kernel(xt, x, clf.act, 10, kernel) @ torch.linalg.solve(k, 2.0 * y.double() - 1))
        assert clf.predict(xt).tolist() == ((sign + 1) / 2).long().tolist()


def test_deep_relu_ntk_moves_toward_majority_and_consistent_activation_does_not():
    # Taxonomy check at small n: the 3d_opt NNGP keeps local structure with depth; its predictions stay
    # different from a constant.
    g = torch.Generator().manual_seed(0)
    x = torch.distributions.Dirichlet(torch.tensor([0.5, 0.5, 2.5])).sample((60,))
    x2 = torch.distributions.Dirichlet(torch.tensor([2.5, 0.1, 0.5])).sample((60,))
    xs, ys = torch.cat([x, x2]), torch.cat([torch.zeros(60), torch.ones(60)]).long()
    perm = torch.randperm(120, generator=g)
    xs, ys = xs[perm], ys[perm]
    clf = DeepKernelClassifier("3d_opt", depth=50).fit(xs[:80], ys[:80])
    acc = (clf.predict(xs[80:]) == ys[80:]).double().mean()
    assert acc > 0.75


def test_activation_trains_inside_a_sequential():
    torch.manual_seed(0)
    x = torch.randn(64, 3)
    y = (x[:, 0] * x[:, 1] > 0).long()
    model = nn.Sequential(nn.Linear(3, 32), NTKActivation("5d_opt"), nn.Linear(32, 32), NTKActivation("sine", a=2.0),
                          nn.Linear(32, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(30):
        loss = nn.functional.cross_entropy(model(x), y)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss) < 0.7 * first
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert "5d_opt" in repr(model)


def test_optimal_and_sine_pick_the_dimension_specific_activation():
    assert NTKActivation("optimal", input_dim=5).name == "5d_opt"
    assert NTKActivation("sine", input_dim=9).a == pytest.approx(13.8258)
    x = torch.linspace(-2, 2, 9)
    torch.testing.assert_close(NTKActivation("3d_opt")(x), x / math.sqrt(2) + (x**3 - 3 * x) / math.sqrt(12))


@pytest.mark.parametrize("kwargs, match", [
    ({"name": "gelu"}, "name must be one of"),
    ({"name": "optimal", "input_dim": 4}, "input_dim in \\[2, 3, 5, 9\\]"),
    ({"name": "optimal"}, "input_dim=None"),
    ({"name": "sine", "input_dim": 2}, "needs `a`"),
    ({"name": "sine", "a": float("nan")}, "a must"),
    ({"name": "sine", "a": 0.0}, "a must"),
    ({"name": "hermite"}, "needs `degree`"),
    ({"name": "hermite", "degree": 0}, "degree"),
])
def test_activation_bad_inputs_one_line(kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        NTKActivation(**kwargs)
    assert "\n" not in str(info.value)


def test_classifier_bad_inputs_one_line():
    x, y = _sphere(10, 3, seed=7), torch.tensor([0, 1] * 5)
    cases = [
        (lambda: DeepKernelClassifier(depth=0), "depth"),
        (lambda: DeepKernelClassifier(kernel="rbf"), "kernel must be one of"),
        (lambda: DeepKernelClassifier(ridge=float("nan")), "ridge"),
        (lambda: DeepKernelClassifier(ridge=-1.0), "ridge"),
        (lambda: DeepKernelClassifier().predict(x), "not fitted"),
        (lambda: DeepKernelClassifier().fit(x[:, 0], y), "2-d array"),
        (lambda: DeepKernelClassifier().fit(x, y[:5]), "one label per row"),
        (lambda: DeepKernelClassifier().fit(x, torch.zeros(10)), "single class"),
        (lambda: DeepKernelClassifier().fit(torch.where(x > 0.5, float("nan"), x), y), "NaN"),
        (lambda: DeepKernelClassifier().fit(torch.cat([x[:9], torch.zeros(1, 3)]), y), "all-zero row"),
        (lambda: DeepKernelClassifier().fit(x, y).predict(torch.ones(2, 4)), "4 features"),
        (lambda: deep_kernel(x, torch.ones(2, 4), NTKActivation(), 2), "same number of columns"),
    ]
    for call, match in cases:
        with pytest.raises((ValueError, RuntimeError), match=match) as info:
            call()
        assert "\n" not in str(info.value), str(info.value)
