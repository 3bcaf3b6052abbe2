"""FedD2S: the mutual-distillation loss (one-batch equivalence with the equations, written by hand), the deep-to-shallow
schedule, the client's shrinking shared keys in a federation, crash-and-resume, and bad inputs."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

pytest.importorskip("flwr")

from lightning_ext.data.digits import DigitsDataModule  # noqa: E402
from lightning_ext.federated.client import STATE_KEY  # noqa: E402
from lightning_ext.federated.datamodule import FederatedDataModule  # noqa: E402
from lightning_ext.federated.fedd2s import (  # noqa: E402
    CONFIG_DEPTH,
    FedD2SClient,
    FedD2SNet,
    exit_depth,
    fedd2s_fedavg,
    fedd2s_loss,
)
from lightning_ext.federated.fedd2s_module import FedD2SModule  # noqa: E402
from lightning_ext.federated.simulation import FederatedSimulation  # noqa: E402
from lightning_ext.vision.classifier import Classifier  # noqa: E402
from lightning_ext.testing import crash_in_aggregation


def model():
    return FedD2SModule(FedD2SNet(1, 10, (4, 8, 8)), 10, optimizer=lambda p: torch.optim.SGD(p, lr=0.05))


def data(i, n):
    return FederatedDataModule(DigitsDataModule(batch_size=16), n, i, partitioner="dirichlet", alpha=0.5)


def strategy(n=2, **kwargs):
    kwargs.setdefault("drop_rate", 0.5)
    return fedd2s_fedavg(3, fraction_evaluate=0.0, min_train_nodes=n, min_available_nodes=n, **kwargs)


# ------------------------------------------------------------------------- independent implementation (the equations)


def ref_log_softmax(z):
    return [[float(v) - float(torch.logsumexp(row, 0)) for v in row] for row in z]


def ref_loss(zp, zg, y, lam, t):
    """CE(z_p, y) + CE(z_g, y) + lam T^2 [KL(p_g || p_p) + KL(p_p || p_g)], every term by hand, float64."""
    zp, zg = zp.double(), zg.double()
    n = len(y)
    lp, lg = ref_log_softmax(zp), ref_log_softmax(zg)
    ce_p = -sum(lp[i][int(y[i])] for i in range(n)) / n
    ce_g = -sum(lg[i][int(y[i])] for i in range(n)) / n
    lpt, lgt = ref_log_softmax(zp / t), ref_log_softmax(zg / t)
    import math

    kl_gp = sum(math.exp(lgt[i][c]) * (lgt[i][c] - lpt[i][c]) for i in range(n) for c in range(len(lpt[i]))) / n
    kl_pg = sum(math.exp(lpt[i][c]) * (lpt[i][c] - lgt[i][c]) for i in range(n) for c in range(len(lpt[i]))) / n
    return ce_p + ce_g + lam * t * t * (kl_gp + kl_pg), (ce_p, ce_g, t * t * kl_gp, t * t * kl_pg)


@pytest.mark.parametrize("lam, t", [(1.0, 1.0), (0.5, 3.0), (0.0, 2.0)])
def test_loss_equals_the_equations_on_one_batch(lam, t):
    g = torch.Generator().manual_seed(0)
    zp, zg = torch.randn(6, 5, generator=g) * 2, torch.randn(6, 5, generator=g) * 2
    y = torch.randint(0, 5, (6,), generator=g)
    total, parts = fedd2s_loss(zp, zg, y, lam, t)
    want, (ce_p, ce_g, kl_to_p, kl_to_g) = ref_loss(zp, zg, y, lam, t)
    assert float(total) == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert float(parts["ce_personal"]) == pytest.approx(ce_p, rel=1e-5)
    assert float(parts["ce_global"]) == pytest.approx(ce_g, rel=1e-5)
    assert float(parts["kl_to_personal"]) == pytest.approx(kl_to_p, rel=1e-5, abs=1e-7)
    assert float(parts["kl_to_global"]) == pytest.approx(kl_to_g, rel=1e-5, abs=1e-7)


def test_each_kl_teaches_only_its_student():
    """The stop-gradients: d/dz_p of the loss is d/dz_p [CE_p + lam KL(sg p_g || p_p)] only (and alike for z_g)."""
    g = torch.Generator().manual_seed(1)
    zp = (torch.randn(4, 3, generator=g)).requires_grad_()
    zg = (torch.randn(4, 3, generator=g)).requires_grad_()
    y = torch.tensor([0, 1, 2, 1])
    total, _ = fedd2s_loss(zp, zg, y, kd_weight=2.0, temperature=2.0)
    total.backward()
    # by hand: d/dz_s [T^2 KL(q || softmax(z_s/T))] = T (softmax(z_s/T) - q) / n; d CE/dz = (softmax(z) - onehot) / n
    n, t = 4, 2.0
    onehot = torch.nn.functional.one_hot(y, 3).float()
    pp, pg = torch.softmax(zp.detach() / t, 1), torch.softmax(zg.detach() / t, 1)
    want_p = (torch.softmax(zp.detach(), 1) - onehot) / n + 2.0 * t * (pp - pg) / n
    want_g = (torch.softmax(zg.detach(), 1) - onehot) / n + 2.0 * t * (pg - pp) / n
    assert torch.allclose(zp.grad, want_p, atol=1e-6)
    assert torch.allclose(zg.grad, want_g, atol=1e-6)


def test_schedule_drops_deep_blocks_first_and_keeps_one():
    assert [exit_depth(r, 4, 0.25) for r in range(0, 17, 4)] == [4, 3, 2, 1, 1]
    assert [exit_depth(r, 4, 0.5, max_dropped=1) for r in (1, 2, 10)] == [4, 3, 3]
    assert exit_depth(100, 3, 0.0) == 3
    with pytest.raises(ValueError, match="max_dropped"):
        exit_depth(1, 3, 0.1, max_dropped=3)
    with pytest.raises(ValueError, match="drop_rate"):
        exit_depth(1, 3, -0.1)


def test_net_personal_path_and_exits():
    torch.manual_seed(0)
    net = FedD2SNet(1, 10, (4, 8, 8)).eval()
    x = torch.randn(3, 1, 8, 8)
    for depth in (1, 2, 3):
        personal, exit_logits = net.forward_exit(x, depth)
        assert torch.allclose(personal, net(x))
        h = x
        for block in net.blocks[:depth]:
            h = block(h)
        assert torch.allclose(exit_logits, net.exits[depth - 1](h))
    with pytest.raises(ValueError, match="depth=4"):
        net.forward_exit(x, 4)


# ------------------------------------------------------------------------------------------------ the client


def _ckpt(state: bytes) -> dict:
    return torch.load(io.BytesIO(state), map_location="cpu", weights_only=False)


def test_client_shares_blocks_up_to_the_depth_and_keeps_dropped_blocks_local():
    client = FedD2SClient(model=model, datamodule=data, local_steps=2, seed=0)
    init = client.initial_arrays()
    assert not any(k.startswith("net.head.") for k in init)
    assert any(k.startswith("net.blocks.2.") for k in init) and any(k.startswith("net.exits.2.") for k in init)
    reply, metrics, state = client.train(init, {"server-round": 1, CONFIG_DEPTH: 3}, None, 0, 2)
    assert set(reply) == set(init) and metrics[CONFIG_DEPTH] == 3
    # depth 2: block 2, exit 2 and the head stay local; a (stale) global block 2 in the arrays is ignored
    stale = {k: torch.full_like(v, 7.0) if v.is_floating_point() else v for k, v in reply.items()}
    reply2, _, state2 = client.train(stale, {"server-round": 2, CONFIG_DEPTH: 2}, state, 0, 2)
    assert not any(k.startswith(("net.blocks.2.", "net.exits.2.", "net.head.")) for k in reply2)
    assert any(k.startswith("net.blocks.1.") for k in reply2)
    trained = _ckpt(state2)
    assert trained["fedd2s_exit_depth"] == 2
    w = trained["state_dict"]["net.blocks.2.0.weight"]
    assert not torch.all(w == 7.0)  # its own block, not the server's
    # the exit trained this round is exit 2 (index 1), exit 3 (index 2) no longer moves
    before = _ckpt(state)["state_dict"]
    assert torch.equal(trained["state_dict"]["net.exits.2.2.weight"], before["net.exits.2.2.weight"])
    assert not torch.equal(trained["state_dict"]["net.exits.1.2.weight"], before["net.exits.1.2.weight"])


def test_federation_shrinks_the_global_model_and_evaluates_personal_heads():
    client = FedD2SClient(model=model, datamodule=data, local_steps=2, seed=0)
    strat = fedd2s_fedavg(3, drop_rate=0.5, fraction_evaluate=1.0, min_train_nodes=2, min_available_nodes=2,
                          min_evaluate_nodes=2)
    sim = FederatedSimulation(client, 2, 3, strat, progress=False)
    arrays = sim.fit()
    assert [h["train/fedd2s-depth"] for h in sim.history] == [3.0, 2.0, 2.0]
    assert {k.split(".")[1] + k.split(".")[2] for k in arrays} == {"blocks0", "blocks1", "exits0", "exits1"}
    assert all(0.0 <= h["clients/test_acc"] <= 1.0 for h in sim.history)
    for nid in sim.grid.ids:  # personal layers differ between the clients, shared ones were averaged
        assert STATE_KEY in sim.grid.contexts[nid].state
    heads = [_ckpt(bytes(sim.grid.contexts[n].state[STATE_KEY]["ckpt"]))["state_dict"]["net.head.2.weight"]
             for n in sim.grid.ids]
    assert not torch.equal(heads[0], heads[1])


@pytest.mark.slow  # a few in-process federation rounds (Lightning Trainers)
def test_crash_and_resume_ends_identically(tmp_path):
    def make(path=None, crash=False):
        client = FedD2SClient(model=model, datamodule=data, local_steps=2, seed=3)
        strat = strategy()
        if crash:
            crash_in_aggregation(strat, 3)
        return FederatedSimulation(client, 2, 3, strat, progress=False, checkpoint_path=path, seed=3)

    final_ref = make().fit()
    path = tmp_path / "fed.pt"
    with pytest.raises(RuntimeError, match="simulated crash"):
        make(path, crash=True).fit()
    resumed = make(path)
    resumed.load(path)
    assert resumed.round == 2
    final = resumed.fit()
    assert set(final) == set(final_ref)
    for k in final_ref:
        assert torch.equal(final[k], final_ref[k]), k


# ------------------------------------------------------------------------------------------------ bad inputs


def test_bad_inputs_fail_with_one_line():
    client = FedD2SClient(model=model, datamodule=data, local_steps=1)
    with pytest.raises(ValueError, match="fedd2s-depth"):
        client.train(client.initial_arrays(), {"server-round": 1}, None, 0, 2)
    plain = FedD2SClient(model=lambda: Classifier(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), 10),
                         datamodule=data, local_steps=1)
    with pytest.raises(ValueError, match="blocks='net.blocks' matches no state_dict key"):
        plain.initial_arrays()
    with pytest.raises(TypeError, match="forward_exit"):
        FedD2SModule(nn.Linear(4, 10), 10)
    with pytest.raises(ValueError, match="exit_depth must be an integer >= 1 and <= 2, got 5"):
        FedD2SModule(FedD2SNet(widths=(4, 4)), 10, exit_depth=5)
    with pytest.raises(ValueError, match="kd_weight"):
        fedd2s_fedavg(3, kd_weight=-1.0)
    with pytest.raises(ValueError, match="temperature"):
        fedd2s_fedavg(3, temperature=0.0)
    with pytest.raises(ValueError, match="max_dropped"):
        fedd2s_fedavg(3, max_dropped=5)
    with pytest.raises(ValueError, match="widths"):
        FedD2SNet(widths=[])
