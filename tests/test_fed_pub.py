"""FED-PUB (issue 27): masked GCN, penalties, functional embeddings, personalised aggregation, Flower federation."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("torch_geometric")
pytest.importorskip("flwr")
pytest.importorskip("networkx")

from lightning_ext.federated.fedpub import (  # noqa: E402
    MaskedGCN,
    MaskedGCNConv,
    MaskedLinear,
    fedpub_penalty,
    functional_embedding,
    induced_subgraph,
    louvain_partition,
    mask_sparsity,
    personalized_states,
    proxy_graph,
    similarity_weights,
)
from lightning_ext.testing import crash_in_aggregation


def _graph(n=12, f=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(0, n, (30,), generator=g)
    dst = torch.randint(0, n, (30,), generator=g)
    keep = src != dst
    ei = torch.stack([src[keep], dst[keep]])
    return torch.randn(n, f, generator=g), torch.cat([ei, ei.flip(0)], 1)


# ------------------------------------------------------------------------------------------ layers (vs PyG, by hand)


def test_masked_gcn_conv_with_unit_mask_equals_pyg_gcnconv():
    from torch_geometric.nn import GCNConv

    x, ei = _graph()
    ours = MaskedGCNConv(6, 4)
    with torch.no_grad():
        ours.bias.normal_()
    ref = GCNConv(6, 4)
    with torch.no_grad():
        ref.lin.weight.copy_(ours.lin.weight)
        ref.bias.copy_(ours.bias)
    assert torch.allclose(ours(x, ei), ref(x, ei), atol=1e-5)


def test_masked_linear_multiplies_the_mask_and_prunes_small_entries_at_evaluation():
    layer = MaskedLinear(3, 2, l1=0.1)
    with torch.no_grad():
        layer.mask.copy_(torch.tensor([[1.0, 0.05, 2.0], [0.5, -0.01, 1.0]]))
    x = torch.randn(4, 3)
    assert torch.allclose(layer(x), x @ (layer.weight * layer.mask).T + layer.bias)
    layer.eval()
    pruned = layer.mask.detach().clone()
    pruned[pruned.abs() < 0.1] = 0
    assert torch.allclose(layer(x), x @ (layer.weight * pruned).T + layer.bias)
    assert torch.allclose(layer(x.to_sparse()), layer(x), atol=1e-6)  # the sparse path (bag-of-words features)


def test_masked_gcn_shapes_and_no_mask_ablation_freezes_masks():
    x, ei = _graph()
    net = MaskedGCN(6, 3, hidden=8, masked=False)
    assert net(x, ei).shape == (12, 3)
    assert all(not p.requires_grad for n, p in net.named_parameters() if n.endswith("mask"))


# ------------------------------------------------------------------------------------------ penalties (one batch)


def _reference_penalty(model, received, l1, loc_l2):
    """From the paper/reference: l1 * sum |M| + loc_l2 * sum_params sqrt(sum (theta - theta_r)^2)."""
    total = 0.0
    for name, p in model.named_parameters():
        if name.endswith("mask"):
            total += l1 * p.detach().abs().sum().item()
        else:
            total += loc_l2 * math.sqrt(((p.detach() - received[name]) ** 2).sum().item())
    return total


def test_penalty_equals_the_reference_formula_and_is_effective_unlike_the_official_detached_one():
    torch.manual_seed(0)
    x, ei = _graph()
    net = MaskedGCN(6, 3, hidden=8)
    received = {n: p.detach() + 0.1 * torch.randn_like(p) for n, p in net.named_parameters() if not n.endswith("mask")}
    value = fedpub_penalty(net, received, 1e-2, 1e-2)
    assert value.item() == pytest.approx(_reference_penalty(net, received, 1e-2, 1e-2), rel=1e-5)
    inert = fedpub_penalty(net, received, 1e-2, 1e-2, official_inert=True)
    assert inert.item() == pytest.approx(value.item(), rel=1e-6) and not inert.requires_grad

    def grads(extra):
        net.zero_grad()
        loss = F.cross_entropy(net(x, ei), torch.zeros(12, dtype=torch.long))
        (loss + extra()).backward()
        return {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}

    net.eval()  # no dropout: the same forward every time
    plain = grads(lambda: 0.0)
    official = grads(lambda: fedpub_penalty(net, received, 1e-2, 1e-2, official_inert=True))
    effective = grads(lambda: fedpub_penalty(net, received, 1e-2, 1e-2))
    for n in plain:  # the reference's penalties change no gradient, bit for bit
        assert torch.equal(plain[n], official[n]), n
    w = net.clsif.weight
    d = (w.detach() - received["clsif.weight"])
    expected = plain["clsif.weight"] + 1e-2 * d / d.norm()
    assert torch.allclose(effective["clsif.weight"], expected, atol=1e-6)
    assert torch.allclose(effective["clsif.mask"], plain["clsif.mask"] + 1e-2 * torch.sign(net.clsif.mask.detach()),
                          atol=1e-6)


def test_proximal_term_at_zero_distance_has_zero_gradient_not_nan():
    net = MaskedGCN(6, 3, hidden=8)
    received = {n: p.detach().clone() for n, p in net.named_parameters() if not n.endswith("mask")}
    fedpub_penalty(net, received, 0.0, 1.0).backward()
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for n, p in net.named_parameters()
               if not n.endswith("mask") and p.grad is not None)


def test_mask_sparsity_counts_entries_below_the_threshold():
    net = MaskedGCN(6, 3, hidden=8)
    with torch.no_grad():
        net.clsif.mask.zero_()
    total = sum(p.numel() for n, p in net.named_parameters() if n.endswith("mask"))
    assert mask_sparsity(net) == pytest.approx(net.clsif.mask.numel() / total)


# ------------------------------------------------------------------------------------------ server rule (one batch)


def test_similarity_weights_and_personalised_states_match_the_paper_by_hand():
    emb = torch.randn(4, 5, generator=torch.Generator().manual_seed(1))
    tau = 3.0
    e = emb.numpy().astype(np.float64)
    cos = (e @ e.T) / np.outer(np.linalg.norm(e, axis=1), np.linalg.norm(e, axis=1))
    expected = np.exp(tau * cos) / np.exp(tau * cos).sum(axis=1, keepdims=True)
    S = similarity_weights(emb, tau)
    assert np.allclose(S.numpy(), expected, atol=1e-10)
    states = [{"w": torch.randn(2, 3), "b": torch.randn(3)} for _ in range(4)]
    mixed = personalized_states(states, S)
    for i in range(4):
        for k in ("w", "b"):
            ref = sum(expected[i, j] * states[j][k].double().numpy() for j in range(4))
            assert np.allclose(mixed[i][k].numpy(), ref, atol=1e-6)


def test_server_rule_bad_inputs_fail_with_one_line():
    with pytest.raises(ValueError, match="NaN or infinity"):
        similarity_weights(torch.tensor([[1.0, float("nan")], [1.0, 0.0]]))
    with pytest.raises(ValueError, match="clients x dim"):
        similarity_weights(torch.ones(3))
    with pytest.raises(ValueError, match="different keys"):
        personalized_states([{"a": torch.ones(1)}, {"b": torch.ones(1)}], torch.eye(2))
    with pytest.raises(ValueError, match="must be"):
        personalized_states([{"a": torch.ones(1)}], torch.eye(2))
    with pytest.raises(ValueError, match="tau"):
        similarity_weights(torch.eye(2), tau=float("inf"))


def test_proxy_graph_is_shared_and_functional_embedding_is_deterministic():
    x1, e1 = proxy_graph(6, 2, 10, seed=3)
    x2, e2 = proxy_graph(6, 2, 10, seed=3)
    assert torch.equal(x1, x2) and torch.equal(e1, e2) and x1.shape == (20, 6)
    assert int(e1.max()) < 20 and not bool(((e1[0] < 10) & (e1[1] >= 10)).any())  # no edges between blocks
    net = MaskedGCN(6, 3, hidden=8)
    net.train()
    a, b = functional_embedding(net, x1, e1), functional_embedding(net, x1, e1)
    assert torch.equal(a, b) and a.shape == (8,) and net.training


def test_louvain_partition_is_disjoint_and_covers_every_node():
    nx = pytest.importorskip("networkx")
    g = nx.connected_caveman_graph(6, 5)
    ei = torch.tensor(list(g.edges())).T
    ei = torch.cat([ei, ei.flip(0)], 1)
    parts = louvain_partition(ei, 30, 3, seed=0)
    assert sorted(np.concatenate(parts).tolist()) == list(range(30))
    assert [len(p) for p in parts] == [10, 10, 10]
    sub = induced_subgraph(parts[0], ei, 30)
    assert int(sub.max()) < 10 and sub.shape[1] > 0
    with pytest.raises(ValueError, match="fewer than num_clients"):
        louvain_partition(ei, 30, 40)


# ------------------------------------------------------------------------------------------ Flower federation


class _ToyGraphs:
    """Two small graphs with different label distributions: enough for the federation's mechanics."""

    @staticmethod
    def make(i: int):
        from lightning.pytorch import LightningDataModule
        from torch_geometric.data import Data

        from lightning_ext.graph.planetoid import FullGraphLoaders

        class DM(FullGraphLoaders, LightningDataModule):
            def setup(self, stage=None):
                x, ei = _graph(20, 6, seed=i)
                y = (torch.arange(20) % (2 + i)).clamp(max=2)
                m = torch.zeros(20, dtype=torch.bool)
                self.graph = Data(x=x, edge_index=ei, y=y, train_mask=~m, val_mask=~m, test_mask=~m)

        return DM()


def _federation(rounds=3, path=None, crash_at=None, similarity="functional"):
    from lightning_ext.federated.fedpub_module import FedPubClient, FedPubModule, fedpub_fedavg
    from lightning_ext.federated.simulation import FederatedSimulation

    strategy = fedpub_fedavg(num_features=6, tau=3.0, proxy_blocks=2, proxy_block_size=10, similarity=similarity,
                             fraction_evaluate=0.0, min_train_nodes=2, min_available_nodes=2)
    if crash_at is not None:
        crash_in_aggregation(strategy, crash_at)
    client = FedPubClient(model=lambda: FedPubModule(6, 3, hidden=8, dropout=0.0, l1_weight=0.01),
                          datamodule=lambda i, n: _ToyGraphs.make(i), local_steps=2)
    return FederatedSimulation(client, 2, rounds, strategy, progress=False, checkpoint_path=path, seed=1)


def test_federation_sends_personalised_models_and_keeps_masks_local():
    sim = _federation(rounds=2)
    final = sim.fit()
    assert not any(k.endswith("mask") for k in final)
    replies = sim.grid.last_replies
    states = [r.content["arrays"].to_torch_state_dict() for r in replies]
    emb = torch.stack([torch.tensor(list(next(iter(r.content.metric_records.values()))["fedpub-embedding"]))
                       for r in replies])
    assert emb.shape == (2, 8)
    S = similarity_weights(emb, 3.0)
    expected = personalized_states(states, S)
    for r, exp in zip(replies, expected):
        got = sim.strategy.personal[int(r.metadata.src_node_id)]
        for k in exp:
            assert torch.allclose(got[k], exp[k], atol=1e-6), k
    a, b = (sim.strategy.personal[n] for n in sim.grid.ids)
    assert not torch.allclose(a["net.clsif.weight"], b["net.clsif.weight"])  # S is not uniform: models differ
    blobs = [torch.load(io.BytesIO(v), weights_only=False)["state_dict"] for v in sim.state_dict()["nodes"].values()]
    assert not torch.equal(blobs[0]["net.clsif.mask"], blobs[1]["net.clsif.mask"])  # masks trained locally


def test_federation_resumes_after_a_crash_with_the_personalised_models(tmp_path):
    reference = _federation(rounds=4)
    ref_final = reference.fit()
    path = tmp_path / "fedpub.pt"
    crashed = _federation(rounds=4, path=path, crash_at=3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashed.fit()
    resumed = _federation(rounds=4, path=path)
    resumed.load(path)
    assert resumed.round == 2 and set(resumed.strategy.personal) == set(resumed.grid.ids)
    final = resumed.fit()
    for k in ref_final:
        assert torch.equal(final[k], ref_final[k]), k
    for nid in reference.grid.ids:
        for k, v in reference.strategy.personal[nid].items():
            assert torch.equal(resumed.strategy.personal[nid][k], v), (nid, k)


def test_client_without_the_fedpub_strategy_fails_with_one_line():
    from lightning_ext.federated.fedpub_module import FedPubClient, FedPubModule

    client = FedPubClient(model=lambda: FedPubModule(6, 3, hidden=8), datamodule=lambda i, n: _ToyGraphs.make(i),
                          local_steps=1)
    with pytest.raises(ValueError, match="fedpub_fedavg"):
        client.train(client.initial_arrays(), {"server-round": 1}, None, 0, 2)
    from lightning_ext.vision.classifier import Classifier

    bad = FedPubClient(model=lambda: Classifier(torch.nn.Linear(6, 3), 3), datamodule=lambda i, n: None)
    with pytest.raises(TypeError, match="MaskedGCN"):
        bad.build_model()


def test_module_and_datamodule_bad_inputs(planetoid_root):
    from lightning_ext.federated.fedpub_module import FedPubModule, SubgraphClientDataModule

    with pytest.raises(ValueError, match="l1_weight"):
        FedPubModule(l1_weight=-1.0)
    with pytest.raises(ValueError, match="partition_id"):
        SubgraphClientDataModule(str(planetoid_root), num_clients=3, partition_id=3)
    with pytest.raises(ValueError, match="root"):
        SubgraphClientDataModule(None)
    with pytest.raises(ValueError, match="similarity"):
        from lightning_ext.federated.fedpub_module import fedpub_fedavg

        fedpub_fedavg(num_features=4, similarity="cosine")


@pytest.mark.slow  # reads and partitions Cora, one round of 2 clients through the runner
def test_fedpub_config_runs_one_round_on_cora(tmp_path, monkeypatch):
    from pathlib import Path

    import yaml

    from lightning_ext.federated.run import build

    monkeypatch.setenv("LIGHTNING_EXT_CACHE", str(tmp_path))
    root = Path(__file__).resolve().parents[1]
    cfg = yaml.safe_load((root / "configs" / "federated" / "fedpub_cora.yaml").read_text())
    cfg["data"]["init_args"]["root"] = str(root.parent / "shared" / "data" / "planetoid")
    cfg["federation"].update(num_clients=2)
    sim, test = build(cfg, num_rounds=1)
    arrays = sim.fit()
    assert sim.round == 1 and "clients/test_acc" in sim.history[-1]
    assert 0.0 <= test(arrays)["test_acc"] <= 1.0
