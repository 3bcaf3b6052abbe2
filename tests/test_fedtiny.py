"""FedTiny: one-batch equivalence of the allocation, BN recalibration, candidate scoring/selection and prune-and-grow
rules against independent implementations written from the paper's equations and the reference code's conventions;
the Flower strategy and client in a federation (selection queries, masks, adjustments); resume; bad inputs."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_ext.federated.fedtiny import (
    adjust_masks,
    adjustment_ratio,
    average_statistics,
    bn_statistics,
    candidate_loss,
    candidate_masks,
    is_adjustment_round,
    layer_densities,
    magnitude_masks,
    recalibrate_bn,
    select_candidate,
    sparse_gradient_sum,
    sparse_weights,
    top_inactive_gradients,
)
from lightning_ext.testing import crash_in_aggregation


def tiny_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 3))


# ------------------------------------------------------------------- independent implementations (the equations)


def ref_erk(shapes, d):
    """ERK by the reference loop: raw = sum(shape)/prod(shape); eps = rhs/divisor; densest layer dense while > 1."""
    dense = set()
    n = {k: math.prod(s) for k, s in shapes.items()}
    raw = {k: sum(s) / n[k] for k, s in shapes.items()}
    while True:
        rhs = d * sum(n.values()) - sum(n[k] for k in dense)
        eps = rhs / sum(raw[k] * n[k] for k in shapes if k not in dense)
        top = max((k for k in shapes if k not in dense), key=lambda k: raw[k])
        if eps * raw[top] > 1:
            dense.add(top)
            continue
        return {k: 1.0 if k in dense else eps * raw[k] for k in shapes}


def ref_prune_grow(w, m, uploads, weights, ratio):
    """Drop k = ceil(ratio nnz) smallest |w| among active, then grow k largest |sum_k (n_k/n) g_k| among inactive;
    plain Python sorting, ties to the lower index."""
    w, m = w.reshape(-1).tolist(), [bool(v) for v in m.reshape(-1).tolist()]
    g = [0.0] * len(w)
    total = sum(weights)
    for (idx, val), nk in zip(uploads, weights):
        for i, v in zip(idx.tolist(), val.tolist()):
            g[i] += v * nk / total
    k = math.ceil(ratio * sum(m))
    active = sorted((i for i in range(len(w)) if m[i]), key=lambda i: (abs(w[i]), i))
    for i in active[:k]:
        m[i] = False
    inactive = sorted((i for i in range(len(w)) if not m[i]), key=lambda i: (-abs(g[i]), i))
    for i in inactive[:k]:
        m[i] = True
    return torch.tensor(m)


# ------------------------------------------------------------------------------------------------ the pure core


def test_erk_and_uniform_allocations_match_the_reference_loop_and_the_budget():
    shapes = {"a": (8, 1, 3, 3), "b": (16, 8, 3, 3), "c": (10, 400)}
    for d in (0.02, 0.05, 0.3, 0.9):
        mine, ref = layer_densities(shapes, d, "erk"), ref_erk(shapes, d)
        assert all(abs(mine[k] - ref[k]) < 1e-12 for k in shapes)
        kept = sum(mine[k] * math.prod(s) for k, s in shapes.items())
        assert abs(kept - d * sum(math.prod(s) for s in shapes.values())) < 1e-6
    assert list(layer_densities(shapes, 0.1, "uniform").values()) == pytest.approx([0.1] * 3)
    r1, r2 = layer_densities(shapes, 0.1, "random", 1), layer_densities(shapes, 0.1, "random", 2)
    assert r1 != r2 and all(0 < v <= 1 for v in r1.values())


def test_candidates_are_magnitude_masks_of_the_same_weights():
    weights = sparse_weights(dict(tiny_net().named_parameters()))
    cands = candidate_masks(weights, 0.2, 4, seed=3)
    assert [n for n, _ in cands] == ["erk", "uniform", "random1", "random2"]
    for _, masks in cands:
        for k, m in masks.items():  # every kept weight is at least as large as every pruned one
            w = weights[k].detach().abs()
            assert m.sum() >= 1 and (m.all() or w[m].min() >= w[~m].max())
    uniform = cands[1][1]
    assert int(uniform["0.weight"].sum()) == round(0.2 * 36) and int(uniform["4.weight"].sum()) == round(0.2 * 432)


def test_bn_recalibration_is_the_average_of_the_batch_statistics():
    net = tiny_net()
    xs = [torch.randn(8, 1, 8, 8) * (i + 1) for i in range(3)]
    seen = recalibrate_bn(net, [(x, torch.zeros(8)) for x in xs], max_batches=3)
    with torch.no_grad():
        feats = [net[0](x).double() for x in xs]
    ref_mean = sum(f.mean((0, 2, 3)) for f in feats) / 3
    ref_var = sum(f.var((0, 2, 3), unbiased=True) for f in feats) / 3
    stats = bn_statistics(net)
    assert seen == 24 and net.training and net[1].momentum == 0.1
    assert torch.allclose(stats["1.running_mean"].double(), ref_mean, atol=1e-5)
    assert torch.allclose(stats["1.running_var"].double(), ref_var, atol=1e-4)


def test_scoring_and_selection_follow_the_equations():
    net = tiny_net().eval()
    batches = [(torch.randn(5, 1, 8, 8), torch.randint(0, 3, (5,))) for _ in range(2)]
    loss, acc, n = candidate_loss(net, batches, max_batches=2)
    with torch.no_grad():  # mean over examples of -log softmax(z)_y, by hand
        rows = [(z, int(y)) for x, ys in batches for z, y in zip(net(x).double(), ys)]
    ref = sum(float(torch.logsumexp(z, 0) - z[y]) for z, y in rows) / len(rows)
    assert n == 10 and abs(loss - ref) < 1e-5
    assert acc == sum(int(z.argmax()) == y for z, y in rows) / 10
    losses, counts = [[0.2, 0.5], [1.0, 0.6]], [3, 1]
    idx, means = select_candidate(losses, counts)
    ref_means = [(3 * losses[0][c] + 1 * losses[1][c]) / 4 for c in range(2)]
    assert means == pytest.approx(ref_means) and idx == 0  # the reference's uniform mean would pick candidate 1
    assert select_candidate([[0.3, 0.3]], [1])[0] == 0  # ties go to the lower index (ERK)
    stats = average_statistics([{"m": torch.tensor([1.0])}, {"m": torch.tensor([3.0])}], [1, 3])
    assert float(stats["m"]) == pytest.approx(2.5)


def test_prune_and_grow_matches_the_independent_rule_on_one_batch():
    torch.manual_seed(0)
    w = torch.randn(6, 5)
    m = torch.rand(6, 5) < 0.3
    w = w * m
    ratio = adjustment_ratio(3, alpha=0.4, adjust_until=10)
    assert ratio == pytest.approx(0.2 * (1 + math.cos(math.pi * 3 / 10)))
    k = math.ceil(ratio * int(m.sum()))
    grads = [torch.randn(6, 5) for _ in range(3)]
    uploads = [top_inactive_gradients(g, m, k) for g in grads]
    for (idx, val), g in zip(uploads, grads):  # the k largest |g| at pruned positions
        ref = sorted((i for i in range(30) if not m.reshape(-1)[i]), key=lambda i: (-abs(float(g.reshape(-1)[i])), i))[:k]
        assert idx.tolist() == ref and torch.equal(val, g.reshape(-1)[idx])
    counts = [5, 1, 4]
    agg = sparse_gradient_sum(uploads, counts, (6, 5))
    new, changed = adjust_masks({"w": w}, {"w": m}, {"w": agg}, ratio)
    assert torch.equal(new["w"].reshape(-1), ref_prune_grow(w, m, uploads, counts, ratio))
    assert int(new["w"].sum()) == int(m.sum()) and changed["w"] <= k


def test_adjustment_schedule():
    assert [r for r in range(1, 31) if is_adjustment_round(r, 5, 25)] == [5, 10, 15, 20]
    assert not any(is_adjustment_round(r, 0, 25) for r in range(1, 30))
    assert adjustment_ratio(0, 0.2, 10) == pytest.approx(0.2) and adjustment_ratio(10, 0.2, 10) == pytest.approx(0.0)


def test_core_bad_inputs_fail_with_one_line():
    with pytest.raises(ValueError, match="density"):
        layer_densities({"a": (2, 2)}, 0.0)
    with pytest.raises(ValueError, match="density"):
        layer_densities({"a": (2, 2)}, float("nan"))
    with pytest.raises(ValueError, match="allocation"):
        layer_densities({"a": (2, 2)}, 0.5, "erdos")
    with pytest.raises(ValueError, match="no BatchNorm"):
        recalibrate_bn(nn.Linear(2, 2), [torch.zeros(1, 2)])
    with pytest.raises(ValueError, match="one loss list per client"):
        select_candidate([[1.0]], [1, 2])
    with pytest.raises(ValueError, match="every candidate"):
        select_candidate([[1.0], [1.0, 2.0]], [1, 2])
    with pytest.raises(ValueError, match="no weight of dimension"):
        sparse_weights({"b": torch.zeros(3)})
    with pytest.raises(ValueError, match="ignored_layers"):
        sparse_weights(dict(tiny_net().named_parameters()), ["nope.weight"])
    with pytest.raises(ValueError, match=r"\(x, y\)"):
        candidate_loss(tiny_net(), [torch.zeros(2, 1, 8, 8)])
    for err in (ValueError,):
        with pytest.raises(err, match="num_candidates"):
            candidate_masks({"a": torch.ones(2, 2)}, 0.5, 0)
    assert magnitude_masks({"a": torch.tensor([[3.0, -4.0], [1.0, 0.5]])}, {"a": 0.5})["a"].tolist() == \
        [[True, True], [False, False]]


# ------------------------------------------------------------------------------------------------ Flower


flwr = pytest.importorskip("flwr")


def model():
    from lightning_ext.vision.classifier import Classifier

    net = nn.Sequential(nn.Conv2d(1, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                        nn.Linear(8 * 6 * 6, 10))
    return Classifier(net, 10, optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9))


def data(i, n):
    from lightning_ext.data.digits import DigitsDataModule
    from lightning_ext.federated.datamodule import FederatedDataModule

    return FederatedDataModule(DigitsDataModule(batch_size=16), n, i, partitioner="dirichlet", alpha=0.5)


def strategy(**kwargs):
    from lightning_ext.federated.fedtiny_flower import fedtiny_fedavg

    kwargs = {"density": 0.2, "num_candidates": 3, "bn_batches": 2, "adjust_every": 1, "adjust_until": 3, **kwargs}
    return fedtiny_fedavg(fraction_evaluate=0.0, min_train_nodes=2, min_available_nodes=2, **kwargs)


def simulation(path=None, seed=0, strat=None):
    from lightning_ext.federated.fedtiny_flower import FedTinyClient
    from lightning_ext.federated.simulation import FederatedSimulation

    client = FedTinyClient(model=model, datamodule=data, local_steps=2, seed=seed)
    return FederatedSimulation(client, 2, 3, strat or strategy(), progress=False, checkpoint_path=path, seed=seed)


def test_federation_selects_trains_masked_and_prunes_and_grows():
    sim = simulation()
    strat = sim.strategy
    arrays = sim.fit()
    assert strat.candidate_names == ["erk", "uniform", "random1"] and len(strat.scores) == 3
    assert strat.selected == min(range(3), key=lambda c: (strat.scores[c], c))
    assert set(strat.masks) == {"net.0.weight", "net.4.weight"}
    assert strat.density() == pytest.approx(0.2, abs=0.01)
    for k, m in strat.masks.items():  # masked aggregation: pruned weights are exactly 0, kept ones trained
        assert torch.all(arrays[k][~m] == 0) and torch.count_nonzero(arrays[k][m]) > 0
    assert not any(k.startswith("fedtiny.") for k in arrays)
    assert [a["round"] for a in strat.adjustments] == [1, 2]  # adjust_until=3: rounds 1 and 2
    assert all(a["replaced"] > 0 for a in strat.adjustments)


def test_client_masks_weights_and_uploads_topk_pruned_gradients():
    from lightning_ext.federated.fedtiny_flower import CONFIG_RATIO, GRAD_IDX, GRAD_VAL, MASK, FedTinyClient

    client = FedTinyClient(model=model, datamodule=data, local_steps=3, seed=0)
    arrays = client.initial_arrays()
    w = arrays["net.0.weight"]
    mask = torch.zeros_like(w, dtype=torch.bool)
    mask.view(-1)[::4] = True
    sent = {**arrays, MASK + "net.0.weight": mask}
    reply, metrics, _ = client.train(sent, {"server-round": 1, CONFIG_RATIO: 0.5}, None, 0, 2)
    assert torch.all(reply["net.0.weight"][~mask] == 0)
    assert not torch.equal(reply["net.0.weight"][mask], w[mask])
    idx, val = reply[GRAD_IDX + "net.0.weight"], reply[GRAD_VAL + "net.0.weight"]
    assert len(idx) == math.ceil(0.5 * int(mask.sum())) and not mask.view(-1)[idx].any()
    assert torch.all(val != 0)
    reply, _, _ = client.train(sent, {"server-round": 2, CONFIG_RATIO: 0.0}, None, 0, 2)
    assert not any(k.startswith("fedtiny.") for k in reply)
    with pytest.raises(ValueError, match="fedtiny.mask"):
        client.train(arrays, {"server-round": 1}, None, 0, 2)


def test_one_candidate_is_server_side_magnitude_pruning_without_queries():
    strat = strategy(num_candidates=1, adjust_every=0)
    sim = simulation(strat=strat)
    sim.fit()
    assert strat.selected == 0 and strat.scores == [] and strat.adjustments == []


def test_strategy_state_round_trip():
    strat = strategy()
    sim = simulation(strat=strat)
    sim.num_rounds = 1
    sim.fit()
    other = strategy()
    other.load_state_dict(strat.state_dict())
    assert other.selected == strat.selected and other.scores == strat.scores
    assert all(torch.equal(other.masks[k], strat.masks[k]) for k in strat.masks)


@pytest.mark.slow  # a few in-process federation rounds (Lightning Trainers)
def test_crash_and_resume_ends_identically(tmp_path):
    def make(path=None, crash=False):
        strat = strategy()
        if crash:
            crash_in_aggregation(strat, 3)
        return simulation(path, seed=3, strat=strat)

    reference = make()
    final_ref = reference.fit()
    path = tmp_path / "fed.pt"
    with pytest.raises(RuntimeError, match="simulated crash"):
        make(path, crash=True).fit()
    resumed = make(path)
    resumed.load(path)
    assert resumed.round == 2 and resumed.strategy.masks is not None
    final = resumed.fit()
    for k in final_ref:
        assert torch.equal(final[k], final_ref[k]), k
    assert all(torch.equal(resumed.strategy.masks[k], reference.strategy.masks[k]) for k in reference.strategy.masks)


def test_strategy_bad_inputs_fail_with_one_line():
    from lightning_ext.federated.fedtiny_flower import fedtiny_fedavg

    for kwargs, match in [({"density": 0.0}, "density"), ({"density": 1.5}, "density"),
                          ({"num_candidates": 0}, "num_candidates"), ({"alpha": 2.0}, "alpha"),
                          ({"adjust_every": -1}, "adjust_every"), ({"layers_per_adjustment": 0}, "layers_per_adjustment"),
                          ({"bn_batches": 0}, "bn_batches"), ({"seed": 0.5}, "seed")]:
        with pytest.raises(ValueError, match=match):
            fedtiny_fedavg(**kwargs)
    with pytest.raises(TypeError, match="ignored_layers"):
        fedtiny_fedavg(ignored_layers="net.0.weight")


def test_config_builds_a_fedtiny_federation():
    from pathlib import Path

    import yaml

    from lightning_ext.federated.fedtiny_flower import FedTinyClient
    from lightning_ext.federated.run import build

    root = Path(__file__).resolve().parents[1]
    cfg = yaml.safe_load((root / "configs" / "federated" / "fedtiny_mnist.yaml").read_text())
    sim, _ = build(cfg, num_rounds=1)
    assert isinstance(sim.client, FedTinyClient) and hasattr(sim.strategy, "masks")
