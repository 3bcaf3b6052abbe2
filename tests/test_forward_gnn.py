"""ForwardGNN: layer-local losses against the paper's equations, the layer schedule, memory accounting, resume."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("torch_geometric")

from lightning.pytorch import LightningDataModule, Trainer  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from lightning_ext.graph.forward_gnn import (  # noqa: E402
    ForwardGNN,
    add_virtual_class_nodes,
    append_labels,
    forward_forward_loss,
    l2_normalize_rows,
    saved_activation_bytes,
    single_forward_loss,
)
from lightning_ext.testing import assert_same_parameters, crash_and_resume  # noqa: E402


def community_graph(n_per_class: int = 30, classes: int = 3, features: int = 8, seed: int = 0):
    """Three dense communities with class-dependent noisy features; 5 train, 10 val, rest test per class."""
    from torch_geometric.data import Data

    g = torch.Generator().manual_seed(seed)
    y = torch.arange(classes).repeat_interleave(n_per_class)
    n = len(y)
    same = y[:, None] == y[None, :]
    prob = torch.where(same, torch.tensor(0.2), torch.tensor(0.01))
    adj = torch.rand(n, n, generator=g) < prob
    adj = torch.triu(adj, 1)
    adj = adj | adj.T
    edge_index = adj.nonzero().T
    centers = torch.randn(classes, features, generator=g)
    x = centers[y] + 1.5 * torch.randn(n, features, generator=g)
    masks = {k: torch.zeros(n, dtype=torch.bool) for k in ("train_mask", "val_mask", "test_mask")}
    for c in range(classes):
        idx = (y == c).nonzero().flatten()
        masks["train_mask"][idx[:5]] = True
        masks["val_mask"][idx[5:15]] = True
        masks["test_mask"][idx[15:]] = True
    return Data(x=x, edge_index=edge_index, y=y, num_nodes=n, **masks)


class GraphDM(LightningDataModule):
    def __init__(self, graph):
        super().__init__()
        self.graph = graph

    def _loader(self):
        return DataLoader([self.graph], batch_size=1, collate_fn=lambda b: b[0])

    train_dataloader = val_dataloader = test_dataloader = predict_dataloader = _loader


def test_single_forward_loss_matches_the_equation():
    """CE(h_train · h_virtualᵀ / T, y), written out per node with log-sum-exp."""
    torch.manual_seed(0)
    n, c, d, t = 6, 3, 4, 0.7
    h = torch.randn(n + c, d)
    y = torch.tensor([0, 1, 2, 1, 0, 2])
    train = torch.tensor([0, 2, 3, 5])
    virtual = torch.arange(n, n + c)
    expected = 0.0
    for i in train.tolist():
        scores = [sum(h[i, k].item() * h[n + j, k].item() for k in range(d)) / t for j in range(c)]
        lse = math.log(sum(math.exp(s) for s in scores))
        expected += lse - scores[y[i].item()]
    expected /= len(train)
    got = single_forward_loss(h, y, train, virtual, t)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_forward_forward_loss_matches_the_equation():
    """BCE(σ(Σh² - θ)): -log σ(g⁺ - θ) for positives, -log(1 - σ(g⁻ - θ)) for negatives, mean over all rows."""
    torch.manual_seed(1)
    pos, neg, theta = torch.randn(5, 3), torch.randn(4, 3), 2.0
    terms = []
    for row in pos.tolist():
        g = sum(v * v for v in row) - theta
        terms.append(-math.log(1 / (1 + math.exp(-g))))
    for row in neg.tolist():
        g = sum(v * v for v in row) - theta
        terms.append(-math.log(1 - 1 / (1 + math.exp(-g))))
    assert forward_forward_loss(pos, neg, theta).item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)


def test_virtual_nodes_link_only_training_nodes_to_their_class():
    g = community_graph()
    ei = add_virtual_class_nodes(g.edge_index, g.y, g.train_mask, g.num_nodes, 3)
    extra = ei[:, g.edge_index.shape[1]:]
    assert extra.shape[1] == 2 * int(g.train_mask.sum())
    to_virtual = extra[:, extra[1] >= g.num_nodes]
    assert bool(g.train_mask[to_virtual[0]].all())
    assert torch.equal(to_virtual[1] - g.num_nodes, g.y[to_virtual[0]])
    one_way = add_virtual_class_nodes(g.edge_index, g.y, g.train_mask, g.num_nodes, 3, bidirectional=False)
    assert one_way.shape[1] == g.edge_index.shape[1] + int(g.train_mask.sum())


def test_label_appending_and_row_normalisation():
    x = torch.ones(3, 2)
    out = append_labels(x, torch.tensor([1, 0, 0]), torch.tensor([True, False, False]), 2)
    assert torch.equal(out[0, 2:], torch.tensor([0.0, 1.0])) and torch.equal(out[1, 2:], torch.tensor([0.5, 0.5]))
    assert torch.allclose(l2_normalize_rows(torch.randn(4, 5)).norm(dim=1), torch.ones(4))


@pytest.mark.parametrize("learning", ["single_forward", "forward_forward"])
def test_no_gradient_reaches_the_layers_below(learning):
    g = community_graph()
    model = ForwardGNN(num_features=8, num_classes=3, learning=learning, num_layers=3, hidden=16)
    model.local_loss(g, 2, torch.Generator().manual_seed(0)).backward()
    assert all(p.grad is None for i in (0, 1) for p in model.convs[i].parameters())
    assert all(p.grad is not None for p in model.convs[2].parameters())


def test_saved_activations_of_a_layer_step_are_below_backprop():
    """One SF layer step keeps one layer's activations; a BP step keeps the whole stack's."""
    g = community_graph(features=4)
    sizes = {}
    for learning in ("single_forward", "backprop"):
        model = ForwardGNN(num_features=4, num_classes=3, learning=learning, num_layers=4, hidden=64)
        with saved_activation_bytes(model) as out:
            model.local_loss(g, 3)
        sizes[learning] = out[0]
    assert 0 < sizes["single_forward"] < 0.75 * sizes["backprop"]


def _trainer(**kw):
    return Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, num_sanity_val_steps=0, **kw)


@pytest.mark.slow
def test_layers_train_one_after_another_and_fit_stops_after_the_last():
    g = community_graph()
    torch.manual_seed(0)
    model = ForwardGNN(num_features=8, num_classes=3, num_layers=3, hidden=16, lr=0.01, epochs_per_layer=8,
                       patience=3)
    trainer = _trainer(max_epochs=100)
    trainer.fit(model, datamodule=GraphDM(g))
    assert [r["layer"] for r in model.layer_history] == [0, 1, 2]
    assert all(r["epochs"] <= 8 for r in model.layer_history)
    assert trainer.current_epoch == sum(r["epochs"] for r in model.layer_history) < 100
    acc = trainer.test(model, datamodule=GraphDM(g), verbose=False)[0]["test_acc"]
    assert acc > 0.6  # three classes: chance is 1/3


def test_forward_forward_learns_something():
    """FF's layer loss on its own (plain loop, one layer): goodness separates the true label from the others."""
    g = community_graph()
    torch.manual_seed(0)
    model = ForwardGNN(num_features=8, num_classes=3, learning="forward_forward", num_layers=1, hidden=16)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for step in range(150):
        opt.zero_grad()
        model.local_loss(g, 0, torch.Generator().manual_seed(step)).backward()
        opt.step()
    model.eval()
    pred = model.class_scores(g).argmax(1)
    assert pred.shape == (g.num_nodes,)
    assert (pred[g.test_mask] == g.y[g.test_mask]).float().mean() > 0.6  # chance is 1/3


def test_crash_and_resume_mid_schedule_matches_an_uninterrupted_run(tmp_path):
    g = community_graph()

    def make_model():
        torch.manual_seed(0)
        return ForwardGNN(num_features=8, num_classes=3, num_layers=2, hidden=8, lr=0.01, epochs_per_layer=4,
                          patience=4)

    full, resumed, _ = crash_and_resume(make_model, lambda: GraphDM(g), lambda: [], max_epochs=8, crash_epoch=6,
                                        tmp_path=tmp_path, num_sanity_val_steps=0)
    assert resumed.active_layer == full.active_layer and resumed.layer_history == full.layer_history
    assert_same_parameters(full, resumed)


def test_bad_inputs_are_refused_in_one_line():
    with pytest.raises(ValueError, match="learning"):
        ForwardGNN(learning="backward")
    with pytest.raises(ValueError, match="temperature"):
        ForwardGNN(temperature=float("nan"))
    with pytest.raises(ValueError, match="virtual_edges"):
        ForwardGNN(virtual_edges="yes")
    model = ForwardGNN(num_features=5, num_classes=3)
    dm = GraphDM(community_graph())
    dm.num_features = 8
    with pytest.raises(ValueError, match="num_features: 8"):
        _trainer(max_epochs=1).fit(model, datamodule=dm)
