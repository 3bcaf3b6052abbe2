"""FedIns (issue 27): SSF pools, per-instance selection, loss, uniform aggregation, Flower federation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_ext.federated.fedins import (
    FedInsNet,
    apply_ssf,
    fedins_loss,
    gather_pool,
    mutual_information,
    select_topk,
    uniform_mean,
)
from lightning_ext.testing import crash_in_aggregation


def _net(pool=6, k=2, batch_mean=False, seed=0):
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Conv2d(1, 4, 3, 2, 1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 8), nn.ReLU())
    return FedInsNet(backbone, 8, 3, ["0", "3"], pool, k, batch_mean=batch_mean)


def _by_hand(net, x):
    """The reference computation for ONE instance (batch of 1): cosine top-k, mean of the selected SSF rows and
    heads, ``h * s + b`` after each site."""
    with torch.no_grad():
        bb = net.backbone
        q = bb(x)  # the query: backbone without SSF
        sim = (q / q.norm()) @ (net.keys / net.keys.norm(dim=1, keepdim=True)).T
        idx = torch.argsort(sim[0], descending=True)[: net.top_k]
        s = [net.ssf_scale[i][idx].mean(0) for i in range(2)]
        b = [net.ssf_shift[i][idx].mean(0) for i in range(2)]
        h = bb[1](bb[0](x) * s[0].view(1, -1, 1, 1) + b[0].view(1, -1, 1, 1))
        h = bb[4](bb[3](bb[2](h)) * s[1] + b[1])
        w, c = net.head_weight[idx].mean(0), net.head_bias[idx].mean(0)
        return h @ w.T + c, sim[0][idx].sum()


def test_batched_forward_is_instance_adaptive_and_equals_the_reference_at_batch_one():
    net = _net()
    x = torch.randn(5, 1, 8, 8)
    logits, reduced, idx = net(x)
    expected = torch.cat([_by_hand(net, x[i:i + 1])[0] for i in range(5)])
    assert torch.allclose(logits, expected, atol=1e-5)
    assert reduced.item() == pytest.approx(sum(_by_hand(net, x[i:i + 1])[1].item() for i in range(5)) / 5, rel=1e-5)
    assert len({tuple(sorted(r.tolist())) for r in idx}) > 1  # different instances pick different entries
    ref_single = _net(batch_mean=True)  # the reference's batch-mean selection at batch 1 is the same thing
    assert torch.allclose(ref_single(x[:1])[0], logits[:1], atol=1e-6)


def test_batch_mean_averages_the_selection_over_the_batch():
    pool = torch.randn(6, 4)
    idx = torch.tensor([[0, 1], [2, 3], [4, 5]])
    per = gather_pool(pool, idx)
    assert torch.allclose(per, torch.stack([pool[r].mean(0) for r in idx]))
    batch = gather_pool(pool, idx, batch_mean=True)
    assert torch.allclose(batch, pool.mean(0).expand(3, 4))


def test_select_topk_matches_cosine_ranking_and_fedins_loss_the_formula():
    q, keys = torch.randn(4, 5), torch.randn(7, 5)
    idx, red = select_topk(q, keys, 3)
    qn, kn = q.numpy() / np.linalg.norm(q.numpy(), axis=1, keepdims=True), keys.numpy() / np.linalg.norm(
        keys.numpy(), axis=1, keepdims=True)
    sim = qn @ kn.T
    ref = np.argsort(-sim, axis=1)[:, :3]
    assert (np.sort(idx.numpy(), 1) == np.sort(ref, 1)).all()
    assert red.item() == pytest.approx(np.take_along_axis(sim, ref, 1).sum() / 4, rel=1e-5)
    logits, y = torch.randn(4, 3), torch.tensor([0, 2, 1, 1])
    ce = -np.mean([np.log(np.exp(r) / np.exp(r).sum())[t] for r, t in zip(logits.numpy(), y.numpy())])
    assert fedins_loss(logits, y, red, 0.1).item() == pytest.approx(0.9 * ce + 0.1 * (1 - red.item()), rel=1e-5)


def test_only_pools_keys_and_heads_train():
    net = _net()
    logits, red, _ = net(torch.randn(3, 1, 8, 8))
    fedins_loss(logits, torch.tensor([0, 1, 2]), red).backward()
    assert all(p.grad is None for p in net.backbone.parameters())
    assert sorted(net.trainable_names()) == ["head_bias", "head_weight", "keys", "ssf_scale.0", "ssf_scale.1",
                                             "ssf_shift.0", "ssf_shift.1"]
    assert net.keys.grad is not None and net.keys.grad.abs().sum() > 0  # the key term reaches the keys


def test_apply_ssf_layouts_and_bad_inputs():
    s, b = torch.rand(2, 3), torch.rand(2, 3)
    assert torch.allclose(apply_ssf(torch.ones(2, 3), s, b), s + b)
    assert torch.allclose(apply_ssf(torch.ones(2, 3, 4, 4), s, b)[:, :, 1, 2], s + b)
    assert torch.allclose(apply_ssf(torch.ones(2, 5, 3), s, b)[:, 4], s + b)
    with pytest.raises(ValueError, match="no channel axis"):
        apply_ssf(torch.ones(2, 4, 5, 5), s, b)
    with pytest.raises(ValueError, match="top_k"):
        _net(pool=2, k=3)
    with pytest.raises(ValueError, match="not a submodule"):
        FedInsNet(nn.Linear(4, 4), 4, 2, ["nope"], 3, 1)
    with pytest.raises(ValueError, match="sites"):
        FedInsNet(nn.Linear(4, 4), 4, 2, [], 3, 1)
    with pytest.raises(ValueError, match="key_loss_weight"):
        fedins_loss(torch.randn(2, 3), torch.tensor([0, 1]), torch.tensor(1.0), 1.5)
    with pytest.raises(ValueError, match="share d"):
        select_topk(torch.randn(2, 3), torch.randn(4, 5), 1)


def test_uniform_mean_and_mutual_information_by_hand():
    states = [{"a": torch.tensor([1.0, 2.0])}, {"a": torch.tensor([3.0, 6.0])}, {"a": torch.tensor([2.0, 1.0])}]
    assert torch.allclose(uniform_mean(states)["a"], torch.tensor([2.0, 3.0]))
    with pytest.raises(ValueError, match="different keys"):
        uniform_mean([{"a": torch.ones(1)}, {"b": torch.ones(1)}])
    a = torch.tensor([0, 0, 1, 1, 0, 1, 1, 0])
    b = torch.tensor([2, 2, 0, 1, 2, 0, 0, 1])
    from sklearn.metrics import mutual_info_score

    assert mutual_information(a, b) == pytest.approx(mutual_info_score(a.numpy(), b.numpy()), rel=1e-9)
    assert mutual_information(a, a) == pytest.approx(np.log(2), rel=1e-9)


def test_module_reads_backbone_weights_and_refuses_bad_ones(tmp_path):
    from lightning_ext.federated.fedins_module import FedInsModule, TinyConvBackbone

    bb = TinyConvBackbone()
    path = tmp_path / "bb.pt"
    torch.save(bb.state_dict(), path)
    m = FedInsModule(backbone_path=str(path), pool_size=4, top_k=2)
    assert torch.equal(m.net.backbone.fc.weight, bb.fc.weight)
    assert m(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    bad = {k: v.clone() for k, v in bb.state_dict().items()}
    bad["fc.weight"][0, 0] = float("nan")
    torch.save(bad, tmp_path / "nan.pt")
    with pytest.raises(ValueError, match="NaN|non-finite|infinite"):
        FedInsModule(backbone_path=str(tmp_path / "nan.pt"))
    torch.save({"fc.weight": bb.fc.weight.detach().clone()}, tmp_path / "part.pt")
    with pytest.raises(ValueError, match="lacks"):
        FedInsModule(backbone_path=str(tmp_path / "part.pt"))
    with pytest.raises(ValueError, match="backbone_path"):
        FedInsModule(backbone_path="")


def _small_client(**kw):
    from lightning_ext.federated.datamodule import FederatedDataModule
    from lightning_ext.federated.fedins_module import FedInsClient, FedInsModule, MixedDigitsDataModule

    return FedInsClient(model=lambda: FedInsModule(pool_size=4, top_k=2, lr=0.05),
                        datamodule=lambda i, n: FederatedDataModule(MixedDigitsDataModule(), n, i, "dirichlet", 0.5),
                        local_steps=2, **kw)


def test_federation_sends_only_pools_keys_heads_and_averages_uniformly():
    from lightning_ext.federated.fedins_module import fedins_fedavg
    from lightning_ext.federated.simulation import FederatedSimulation

    sim = FederatedSimulation(_small_client(), 3, 1, fedins_fedavg(fraction_evaluate=0.0, min_train_nodes=3,
                                                                   min_available_nodes=3), progress=False)
    final = sim.fit()
    assert sorted(final) == sorted(f"net.{n}" for n in ["head_bias", "head_weight", "keys", "ssf_scale.0",
                                                        "ssf_scale.1", "ssf_scale.2", "ssf_shift.0", "ssf_shift.1",
                                                        "ssf_shift.2"])
    replies = [r.content["arrays"].to_torch_state_dict() for r in sim.grid.last_replies]
    sizes = [next(iter(r.content.metric_records.values()))["num-examples"] for r in sim.grid.last_replies]
    assert len(set(sizes)) > 1  # unequal clients, yet each weighs 1/N
    for k in final:
        assert torch.allclose(final[k], sum(r[k] for r in replies) / 3, atol=1e-6), k


def test_federation_resumes_after_a_crash(tmp_path):
    from lightning_ext.federated.fedins_module import fedins_fedavg
    from lightning_ext.federated.simulation import FederatedSimulation

    def make(path=None, crash=False):
        strategy = fedins_fedavg(fraction_evaluate=0.0, min_train_nodes=2, min_available_nodes=2)
        if crash:
            crash_in_aggregation(strategy, 2)
        return FederatedSimulation(_small_client(), 2, 3, strategy, progress=False, checkpoint_path=path, seed=2)

    ref = make().fit()
    path = tmp_path / "fedins.pt"
    with pytest.raises(RuntimeError, match="simulated crash"):
        make(path, crash=True).fit()
    resumed = make(path)
    resumed.load(path)
    assert resumed.round == 1
    final = resumed.fit()
    for k in ref:
        assert torch.equal(final[k], ref[k]), k


def test_fedins_fedavg_refuses_another_weighting():
    from lightning_ext.federated.fedins_module import fedins_fedavg

    with pytest.raises(ValueError, match="uniformly"):
        fedins_fedavg(weighted_by_key="num-examples")


@pytest.mark.slow  # one round of 2 clients through the runner
def test_fedins_config_runs_one_round():
    from pathlib import Path

    import yaml

    from lightning_ext.federated.run import build

    root = Path(__file__).resolve().parents[1]
    cfg = yaml.safe_load((root / "configs" / "federated" / "fedins_digits.yaml").read_text())
    cfg["federation"].update(num_clients=2, local_steps=2)
    sim, test = build(cfg, num_rounds=1)
    arrays = sim.fit()
    assert sim.round == 1 and not any("backbone" in k for k in arrays)
    assert 0.0 <= test(arrays)["test_acc"] <= 1.0
