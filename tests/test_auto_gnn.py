"""Auto-GNN: the layer's attention and aggregation against the equations, the controller's REINFORCE step, the
sharing rule, the conservative proposal, the search end to end, crash-and-resume, bad inputs."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("torch_geometric")

from lightning.pytorch import LightningDataModule, Trainer  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from lightning_ext.graph.auto_gnn import (  # noqa: E402
    ACTION_CLASSES,
    AutoGNNSearcher,
    ClassController,
    GraphNASConv,
    build_gnn,
    check_architecture,
    check_search_space,
    homogeneous_layers,
    inherit_homogeneous,
    sparse_features,
    train_child,
)
from lightning_ext.graph.auto_gnn_search import AutoGNNSearch, SearchedGNN  # noqa: E402
from lightning_ext.testing import assert_same_parameters, crash_and_resume  # noqa: E402

SMALL = {"heads": [1, 2], "hidden": [4, 8], "attention": ["gcn", "gat", "const"], "aggregation": ["sum", "mean"],
         "activation": ["relu", "elu", "identity"]}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny graphs: one thread (two threads spin against each other on a loaded machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def layer(attention="gcn", aggregation="sum", activation="relu", heads=1, hidden=8):
    return {"attention": attention, "aggregation": aggregation, "activation": activation, "heads": heads,
            "hidden": hidden}


def out_layer(attention="gcn", aggregation="sum", activation="identity", heads=1):
    return {"attention": attention, "aggregation": aggregation, "activation": activation, "heads": heads}


def community_graph(n_per_class: int = 20, classes: int = 3, features: int = 8, seed: int = 0):
    from torch_geometric.data import Data

    g = torch.Generator().manual_seed(seed)
    y = torch.arange(classes).repeat_interleave(n_per_class)
    n = len(y)
    prob = torch.where(y[:, None] == y[None, :], torch.tensor(0.25), torch.tensor(0.02))
    adj = torch.triu(torch.rand(n, n, generator=g) < prob, 1)
    edge_index = (adj | adj.T).nonzero().T
    x = torch.randn(classes, features, generator=g)[y] + 1.5 * torch.randn(n, features, generator=g)
    masks = {k: torch.zeros(n, dtype=torch.bool) for k in ("train_mask", "val_mask", "test_mask")}
    for c in range(classes):
        idx = (y == c).nonzero().flatten()
        masks["train_mask"][idx[:5]] = True
        masks["val_mask"][idx[5:12]] = True
        masks["test_mask"][idx[12:]] = True
    return Data(x=x, edge_index=edge_index, y=y, num_nodes=n, **masks)


class GraphDM(LightningDataModule):
    def __init__(self, graph):
        super().__init__()
        self.graph = graph

    def _loader(self):
        return DataLoader([self.graph], batch_size=1, collate_fn=lambda b: b[0])

    train_dataloader = val_dataloader = test_dataloader = predict_dataloader = _loader


def _trainer(**kw):
    base = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0)
    base.update(kw)
    return Trainer(**base)


def reference_layer(conv: GraphNASConv, x, edge_index, attention, aggregation):
    """GraphNAS's layer written out edge by edge from the equations (self loops added, softmax per target)."""
    n = x.size(0)
    edges = sorted({(int(s), int(d)) for s, d in edge_index.T if s != d} | {(i, i) for i in range(n)})
    H, C = conv.heads, conv.out_channels
    h = (x @ conv.lin.weight.T).view(n, H, C)
    al, ar = conv.att_l[0], conv.att_r[0]
    deg = [sum(1 for s, d in edges if d == i) for i in range(n)]
    out = torch.zeros(n, H, C)
    for i in range(n):
        nbrs = [s for s, d in edges if d == i]
        for k in range(H):
            scores = []
            for j in nbrs:
                hi, hj = h[i, k], h[j, k]
                gat = lambda a, b: torch.nn.functional.leaky_relu((a * al[k]).sum() + (b * ar[k]).sum(), 0.2)
                if attention == "gat":
                    e = gat(hi, hj)
                elif attention == "sym-gat":
                    e = gat(hi, hj) + gat(hj, hi)
                elif attention == "cos":
                    e = ((hi * al[k]) * (hj * ar[k])).sum()
                elif attention == "linear":
                    e = torch.tanh((hj * ar[k]).sum())
                elif attention == "generalized-linear":
                    e = (conv.gen.weight[0] * torch.tanh(hi * al[k] + hj * ar[k])).sum()
                else:
                    e = torch.tensor(0.0)
                scores.append(e)
            scores = torch.stack(scores)
            if attention == "const":
                alpha = torch.ones(len(nbrs))
            elif attention == "gcn":
                alpha = torch.tensor([1 / math.sqrt(deg[i] * deg[j]) for j in nbrs])
            else:
                alpha = torch.softmax(scores, 0)
            msgs = torch.stack([alpha[m] * h[j, k] for m, j in enumerate(nbrs)])
            out[i, k] = {"sum": msgs.sum(0), "mean": msgs.mean(0), "max": msgs.max(0).values}[aggregation]
    return out.reshape(n, -1) + conv.bias


@pytest.mark.parametrize("attention", ["const", "gcn", "gat", "sym-gat", "cos", "linear", "generalized-linear"])
@pytest.mark.parametrize("aggregation", ["sum", "mean", "max"])
def test_layer_matches_the_equations_edge_by_edge(attention, aggregation):
    torch.manual_seed(0)
    x = torch.randn(5, 3)
    edge_index = torch.tensor([[0, 1, 1, 2, 3, 4, 0], [1, 0, 2, 1, 4, 3, 3]])
    conv = GraphNASConv(3, 4, heads=2, attention=attention, aggregation=aggregation).eval()
    torch.nn.init.normal_(conv.bias)
    torch.testing.assert_close(conv(x, edge_index), reference_layer(conv, x, edge_index, attention, aggregation),
                               atol=1e-5, rtol=1e-4)


def test_sparse_features_give_the_same_logits():
    torch.manual_seed(0)
    g = community_graph()
    x = torch.where(torch.rand_like(g.x) < 0.05, g.x, torch.zeros_like(g.x))
    net = build_gnn([layer("gat", heads=2), out_layer("cos")], 8, 3).eval()
    assert sparse_features(x).is_sparse and not sparse_features(g.x).is_sparse
    torch.testing.assert_close(net(sparse_features(x), g.edge_index), net(x, g.edge_index), atol=1e-5, rtol=1e-4)


def test_controller_log_probability_and_reinforce_step_follow_the_equations():
    torch.manual_seed(0)
    ctrl = ClassController(4, hidden=6)
    actions, logp, ent = ctrl(3, torch.Generator().manual_seed(1))
    # independent: run the LSTM by hand, logits 2.5·tanh(z / 5), log-softmax, entropy
    h = c = torch.zeros(1, 6)
    token, exp_logp, exp_ent = 4, 0.0, 0.0
    for a in actions:
        h, c = ctrl.cell(ctrl.embed.weight[token][None], (h, c))
        z = 2.5 * torch.tanh((h @ ctrl.decoder.weight.T + ctrl.decoder.bias)[0] / 5.0)
        p = torch.exp(z) / torch.exp(z).sum()
        exp_logp += math.log(float(p[a]))
        exp_ent += float(-(p * p.log()).sum())
        token = a
    assert logp.item() == pytest.approx(exp_logp, rel=1e-5)
    assert ent.item() == pytest.approx(exp_ent, rel=1e-5)
    # a reward above the baseline makes the sampled actions more likely; below, less
    s = AutoGNNSearcher(8, 3, SMALL, controller_lr=0.05, entropy_weight=0.0)
    for reward, sign in ((0.9, 1), (0.1, -1)):
        s.baselines["attention"] = 0.5
        before = float(s.controllers["attention"](2, actions=[1, 2])[1])
        s._reinforce("attention", [1, 2], reward)
        after = float(s.controllers["attention"](2, actions=[1, 2])[1])
        assert sign * (after - before) > 0
        assert s.baselines["attention"] == pytest.approx(0.95 * 0.5 + 0.05 * reward)


def test_homogeneity_rule():
    parent = [layer("gat", heads=2, hidden=8), layer("gcn", hidden=8), out_layer("gat")]
    assert homogeneous_layers(parent, parent) == [0, 1]  # never the output layer
    child = [layer("gat", "max", heads=2, hidden=8), layer("gcn", hidden=8), out_layer("cos")]
    assert homogeneous_layers(child, parent) == [0, 1]  # aggregation does not change the weights
    child = [layer("gat", activation="elu", heads=2, hidden=8), layer("gcn", hidden=8), out_layer()]
    assert homogeneous_layers(child, parent) == [1]  # other activation in layer 0; layer 1's input is unchanged
    child = [layer("gat", heads=4, hidden=4), layer("gcn", hidden=8), out_layer()]
    assert homogeneous_layers(child, parent) == [1]  # layer 0 other heads, but layer 1's input width is 16 in both
    child = [layer("gat", heads=4, hidden=8), layer("gcn", hidden=8), out_layer()]
    assert homogeneous_layers(child, parent) == []  # layer 1's input width differs (32 vs 16)
    child = [layer("cos", heads=2, hidden=8), layer("gcn", hidden=8), out_layer()]
    assert homogeneous_layers(child, parent) == [1]


def test_inheritance_copies_exactly_the_homogeneous_layers():
    torch.manual_seed(0)
    parent_arch = [layer("gat", heads=2), out_layer("gat")]
    parent = build_gnn(parent_arch, 8, 3)
    child_arch = [layer("gat", "max", heads=2), out_layer("gat")]
    torch.manual_seed(1)
    child = build_gnn(child_arch, 8, 3)
    assert inherit_homogeneous(child, parent.state_dict(), parent_arch) == [0]
    for k, v in parent.convs[0].state_dict().items():
        torch.testing.assert_close(child.convs[0].state_dict()[k], v)
    assert not torch.equal(child.convs[1].lin.weight, parent.convs[1].lin.weight)


def test_conservative_children_change_one_class_of_the_best_and_random_ones_never_share():
    g = community_graph()
    s = AutoGNNSearcher(8, 3, SMALL, child_epochs=15, child_patience=5, seed=3)
    s.step(g)
    for _ in range(6):
        best = [dict(x) for x in s.best_architecture]
        r = s.step(g)
        changed = {k for a, b in zip(r["architecture"], best) for k in a if a[k] != b[k]}
        assert changed <= {r["changed"]}
    assert [r["changed"] for r in s.history[1:6]] == list(ACTION_CLASSES)
    assert s.best_val_acc == max(r["val_acc"] for r in s.history)
    assert s.best_so_far() == sorted(s.best_so_far())
    assert any(r["shared_layers"] for r in s.history)
    rnd = AutoGNNSearcher(8, 3, SMALL, strategy="random", child_epochs=15, child_patience=5)
    for _ in range(4):
        assert rnd.step(g)["shared_layers"] == []
    assert all(r["changed"] is None for r in rnd.history)


def test_child_fit_learns_and_keeps_its_best_weights():
    torch.manual_seed(0)
    g = community_graph()
    net = build_gnn([layer("gcn", hidden=16), out_layer()], 8, 3, dropout=0.2)
    fit = train_child(net, g, epochs=60, patience=60, lr=0.02)
    assert fit["val_acc"] > 0.7  # chance is 1/3
    acc = float((net(g.x, g.edge_index).argmax(-1)[g.val_mask] == g.y[g.val_mask]).float().mean())
    assert acc == pytest.approx(fit["val_acc"])


def test_search_leaves_the_global_rng_alone_and_resumes_from_its_state_dict():
    g = community_graph()
    kw = dict(search_space=SMALL, child_epochs=10, child_patience=4, seed=5)
    full = AutoGNNSearcher(8, 3, **kw)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    for _ in range(5):
        full.step(g)
    torch.testing.assert_close(torch.rand(3), expected)
    part = AutoGNNSearcher(8, 3, **kw)
    for _ in range(3):
        part.step(g)
    state = part.state_dict()
    resumed = AutoGNNSearcher(8, 3, **kw)
    resumed.load_state_dict(state)
    for _ in range(2):
        resumed.step(g)
    assert [r["val_acc"] for r in resumed.history] == [r["val_acc"] for r in full.history]
    assert resumed.best_architecture == full.best_architecture
    assert_same_parameters(resumed.controllers, full.controllers)


def _search_model():
    return AutoGNNSearch(num_features=8, num_classes=3, search_space=SMALL, max_children=5, child_epochs=8,
                         child_patience=3, controller_lr=0.01, seed=1, best_architecture_path=None)


@pytest.mark.parametrize("crash", [dict(crash_epoch=3), dict(crash_step=2)])
def test_crash_and_resume_mid_search_matches_an_uninterrupted_search(tmp_path, crash):
    g = community_graph()
    full, resumed, _ = crash_and_resume(_search_model, lambda: GraphDM(g), lambda: [], max_epochs=5,
                                        tmp_path=tmp_path, num_sanity_val_steps=0, **crash)
    assert_same_parameters(full, resumed)
    assert full.searcher.children == resumed.searcher.children == 5
    assert [r["val_acc"] for r in full.searcher.history] == [r["val_acc"] for r in resumed.searcher.history]
    assert full.searcher.best_architecture == resumed.searcher.best_architecture
    for k, v in full.searcher.best_state.items():
        torch.testing.assert_close(resumed.searcher.best_state[k], v)


def test_search_module_stops_at_the_budget_and_writes_a_loadable_best_architecture(tmp_path):
    import yaml

    g = community_graph()
    model = AutoGNNSearch(num_features=8, num_classes=3, search_space=SMALL, max_children=3, child_epochs=8,
                          child_patience=3)
    trainer = _trainer(max_epochs=10, default_root_dir=str(tmp_path))
    trainer.fit(model, datamodule=GraphDM(g))
    assert model.searcher.children == 3 and trainer.current_epoch <= 4
    assert float(trainer.callback_metrics["search/best_val_acc"]) == pytest.approx(model.searcher.best_val_acc)
    cfg = yaml.safe_load((tmp_path / "best_architecture.yaml").read_text())["model"]
    assert cfg["class_path"] == "SearchedGNN"
    searched = SearchedGNN(**cfg["init_args"])
    _trainer(max_epochs=3).fit(searched, datamodule=GraphDM(g))
    assert searched.net.architecture == model.searcher.best_architecture


def test_searched_gnn_classifies_a_community_graph():
    torch.manual_seed(0)
    g = community_graph()
    model = SearchedGNN([layer("gat", heads=2, hidden=8), out_layer("gat")], num_features=8, num_classes=3,
                        dropout=0.2, lr=0.02)
    trainer = _trainer(max_epochs=40)
    trainer.fit(model, datamodule=GraphDM(g))
    assert trainer.test(model, datamodule=GraphDM(g), verbose=False)[0]["test_acc"] > 0.7


@pytest.mark.parametrize("space, match", [
    ({}, "empty"), ({"heads": []}, "empty"), ({"depth": [1]}, "unknown action class"),
    ({"attention": ["transformer"]}, "choose among"), ({"hidden": [0]}, "positive integers"),
    ({"heads": [2, 2]}, "repeats"),
])
def test_bad_search_spaces_are_refused(space, match):
    with pytest.raises(ValueError, match=match):
        check_search_space(space)
    with pytest.raises(ValueError, match="search_space"):
        AutoGNNSearch(search_space=space)


def test_bad_architectures_and_graphs_are_refused():
    with pytest.raises(ValueError, match="non-empty list"):
        check_architecture([])
    with pytest.raises(ValueError, match="keys"):
        check_architecture([{"attention": "gcn"}, out_layer()])
    with pytest.raises(ValueError, match="unknown keys"):
        SearchedGNN([dict(layer(), depth=2), out_layer()])
    g = community_graph()
    del g.val_mask
    with pytest.raises(ValueError, match="val_mask"):
        _trainer(max_epochs=1).fit(_search_model(), datamodule=GraphDM(g))
    g = community_graph()
    g.val_mask[:] = False
    with pytest.raises(ValueError, match="selects no node"):
        _trainer(max_epochs=1).fit(_search_model(), datamodule=GraphDM(g))
    with pytest.raises(ValueError, match="num_features: 8"):
        bad = AutoGNNSearch(num_features=5, num_classes=3, search_space=SMALL, best_architecture_path=None)
        _trainer(max_epochs=1).fit(bad, datamodule=GraphDM(community_graph()))
    for kw, name in ((dict(strategy="greedy"), "strategy"), (dict(max_children=0), "max_children"),
                     (dict(controller_lr=float("nan")), "controller_lr"), (dict(num_layers=1), "num_layers"),
                     (dict(best_architecture_path=""), "best_architecture_path")):
        with pytest.raises(ValueError, match=name):
            AutoGNNSearch(**kw)


def _reference_step(module, graph, stage):
    """The full-graph step as GCNNodeClassifier and SearchedGNN each wrote it before FullGraphNodeSteps (the
    SearchedGNN copy also refused a graph without the stage's mask)."""
    from lightning_ext.core.guards import check_loss

    mask = graph[f"{stage}_mask"]
    logits = module(graph.x, graph.edge_index)[mask]
    loss = torch.nn.functional.cross_entropy(logits, graph.y[mask])
    if stage == "train" and not check_loss(module, loss, module.hparams.nonfinite_loss, graph):
        return None
    acc = module.accuracy[f"{stage}_acc"]
    acc(logits, graph.y[mask])
    module.log(f"{stage}_loss", loss, batch_size=int(mask.sum()), prog_bar=stage == "train")
    module.log(f"{stage}_acc", acc, batch_size=int(mask.sum()), prog_bar=stage != "train")
    return loss


@pytest.mark.parametrize("name", ["GCNNodeClassifier", "SearchedGNN"])
def test_shared_full_graph_step_behaves_like_the_two_copies_it_replaced(name):
    """Same seed, same graph: the shared step and the old per-class step give the same weights, the same logged
    metrics (train/val/test) and the same predictions; SearchedGNN still refuses an empty mask."""
    from lightning_ext.graph.full_graph_steps import FullGraphNodeSteps
    from lightning_ext.graph.gcn_node_classifier import GCNNodeClassifier

    cls = {"GCNNodeClassifier": GCNNodeClassifier, "SearchedGNN": SearchedGNN}[name]
    assert issubclass(cls, FullGraphNodeSteps) and "_step" not in vars(cls) and "training_step" not in vars(cls)
    kwargs = dict(num_features=8, num_classes=3, lr=0.02)

    class Reference(cls):
        def _step(self, graph, stage):
            return _reference_step(self, graph, stage)

    g = community_graph()
    results = []
    for make in (cls, Reference):
        torch.manual_seed(3)
        model = make(**kwargs)
        trainer = _trainer(max_epochs=6)
        trainer.fit(model, datamodule=GraphDM(g))
        logged = {k: float(v) for k, v in trainer.callback_metrics.items()}
        logged.update(trainer.test(model, datamodule=GraphDM(g), verbose=False)[0])
        preds = torch.cat(trainer.predict(model, datamodule=GraphDM(g)))
        results.append((model, logged, preds))
    (shared, got, p1), (reference, want, p2) = results
    assert_same_parameters(shared, reference, atol=0.0)
    assert set(got) == set(want) >= {"train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc"}
    assert got == want
    assert torch.equal(p1, p2)
    if cls is SearchedGNN:
        bad = community_graph()
        bad.test_mask[:] = False
        with pytest.raises(ValueError, match="test_mask.*selects no node"):
            _trainer().test(shared, datamodule=GraphDM(bad), verbose=False)
