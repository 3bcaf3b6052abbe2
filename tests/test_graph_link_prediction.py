"""Link prediction (issue 23): LinkPredictionDataModule, Hits@K/MRR, GAE, NCN, NCNC, NetInfoF Probe and Act.

Every loss and scoring rule is checked against an independent implementation written here from the papers'
equations (loops over Python sets, explicit design matrices, scikit-learn/scipy where the official code uses them).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytest.importorskip("torch_geometric")

from lightning.pytorch import Trainer  # noqa: E402
from torch_geometric.data import Data  # noqa: E402

from lightning_ext.graph.gae import GAELinkPredictor, adjacency, link_bce, remove_edges  # noqa: E402
from lightning_ext.graph.link_prediction import HitsAtK, LinkMRR, LinkPredictionDataModule  # noqa: E402
from lightning_ext.graph.ncn import NCN, NCNPredictor, aggregate, common_neighbors  # noqa: E402
from lightning_ext.graph.ncnc import NCNC, NCNCPredictor, calibrate  # noqa: E402
from lightning_ext.graph import net_info_f as nif  # noqa: E402
from lightning_ext.graph.net_info_f_act import NetInfoFLinkPredictor, sparse_group_lasso  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny graphs: one thread is fastest on a shared machine (restored afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def geometric_graph(n: int = 120, radius: float = 0.18, features: int = 8, seed: int = 0) -> Data:
    g = torch.Generator().manual_seed(seed)
    pos = torch.rand(n, 2, generator=g)
    dist = torch.cdist(pos, pos)
    row, col = torch.nonzero((dist < radius) & (dist > 0), as_tuple=True)
    x = torch.cat([pos, 0.1 * torch.randn(n, features - 2, generator=g)], 1)
    return Data(x=x, edge_index=torch.stack([row, col]), num_nodes=n)


def small_dm(**kwargs) -> LinkPredictionDataModule:
    kwargs.setdefault("val_fraction", 0.1)
    kwargs.setdefault("test_fraction", 0.1)
    kwargs.setdefault("batch_size", 64)
    dm = LinkPredictionDataModule.from_data(geometric_graph(), **kwargs)
    dm.setup()
    return dm


def neighbours(edge_index: torch.Tensor) -> dict[int, set]:
    out: dict[int, set] = {}
    for a, b in edge_index.t().tolist():
        out.setdefault(a, set()).add(b)
    return out


def quiet_trainer(**kw) -> Trainer:
    return Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, **kw)


# ------------------------------------------------------------------------------------------------ metrics


def test_hits_and_mrr_match_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    pos, neg = torch.randn(50, generator=g), torch.randn(300, generator=g)
    neg[:5] = pos[:5]  # ties
    for k in (1, 10, 100):
        kth = sorted(neg.tolist(), reverse=True)[k - 1]
        expected = sum(p > kth for p in pos.tolist()) / len(pos)
        m = HitsAtK(k)
        m.update(pos[:20], neg[:100])
        m.update(pos[20:], neg[100:])  # accumulates over batches
        assert float(m.compute()) == pytest.approx(expected)
    ranks = [1 + 0.5 * (sum(v > p for v in neg.tolist()) + sum(v >= p for v in neg.tolist())) for p in pos.tolist()]
    m = LinkMRR()
    m.update(pos, neg)
    assert float(m.compute()) == pytest.approx(sum(1 / r for r in ranks) / len(ranks), rel=1e-6)


def test_hits_with_fewer_negatives_than_k_counts_every_positive_and_empty_input_is_refused():
    m = HitsAtK(100)
    m.update(torch.tensor([0.1]), torch.tensor([0.9, 0.8]))
    assert float(m.compute()) == 1.0
    with pytest.raises(ValueError, match="no positive or no negative"):
        HitsAtK(5).compute()
    with pytest.raises(ValueError, match="k"):
        HitsAtK(0)


# ------------------------------------------------------------------------------------------------ data


def test_split_keeps_validation_and_test_edges_out_of_the_message_passing_graph():
    dm = small_dm()
    mp = {tuple(e) for e in dm.splits["train"]["edge_index"].t().tolist()}
    for split in ("val", "test"):
        s = dm.splits[split]
        assert s["edge_index"].equal(dm.splits["train"]["edge_index"])  # training edges only, every stage
        for a, b in s["pos"].t().tolist():
            assert (a, b) not in mp and (b, a) not in mp
        full = {tuple(e) for e in dm.graph.edge_index.t().tolist()}
        assert all((a, b) not in full for a, b in s["neg"].t().tolist())  # negatives are non-edges
        assert s["neg"].size(1) == s["pos"].size(1)
    train = {tuple(sorted(e)) for e in dm.splits["train"]["pos"].t().tolist()}
    assert {tuple(sorted(e)) for e in mp} == train


def test_input_edge_drop_and_val_edges_in_the_test_graph():
    dm, dropped = small_dm(), small_dm(input_edge_drop=0.5)
    full_mp, half_mp = dm.splits["train"]["edge_index"].size(1), dropped.splits["train"]["edge_index"].size(1)
    assert 0.35 < half_mp / full_mp < 0.65
    assert dropped.splits["train"]["pos"].equal(dm.splits["train"]["pos"])  # targets unchanged
    with_val = small_dm(test_with_val_edges=True)
    assert with_val.splits["test"]["edge_index"].size(1) == full_mp + 2 * with_val.splits["val"]["pos"].size(1)


def test_training_negatives_are_seeded_by_the_batch_and_the_split_by_split_seed():
    a, b, c = small_dm(seed=3), small_dm(seed=3), small_dm(seed=4)
    for split in ("val", "test"):  # PyG draws these with Python's `random`: seeded by split_seed all the same
        assert a.splits[split]["neg"].equal(b.splits[split]["neg"])
    batches = [list(dm.train_dataloader()) for dm in (a, b, c)]
    assert all(x["neg"].equal(y["neg"]) and x["pos"].equal(y["pos"]) for x, y in zip(batches[0], batches[1]))
    assert not batches[0][0]["neg"].equal(batches[2][0]["neg"])
    loader = a.train_dataloader()
    loader.sampler.set_epoch(1)
    assert not next(iter(loader))["neg"].equal(batches[0][0]["neg"])  # a new epoch, new batches, new negatives
    assert not small_dm(split_seed=1).splits["test"]["pos"].equal(a.splits["test"]["pos"])
    # a positive's negative depends on (seed, epoch, edge id) only, not on the batch it lands in
    halves = list(small_dm(seed=3, batch_size=32).train_dataloader())
    assert torch.cat([h["neg"] for h in halves], 1).equal(torch.cat([x["neg"] for x in batches[0]], 1))
    neg = torch.cat([x["neg"] for x in batches[0]], 1)
    assert neg.min() >= 0 and neg.max() < 120 and len(set(neg[0].tolist())) > 60  # spread over the nodes


def test_hash_negatives_are_uniform_enough():
    from lightning_ext.graph.link_prediction import epoch_negatives

    neg = epoch_negatives(torch.arange(20000), torch.zeros(20000, dtype=torch.long), seed=0, num_nodes=10)
    counts = torch.bincount(neg.flatten(), minlength=10).float()
    assert counts.min() > 0.9 * 4000 and counts.max() < 1.1 * 4000


def test_datamodule_refuses_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="val_fraction"):
        LinkPredictionDataModule(val_fraction=0.6, test_fraction=0.5)
    with pytest.raises(ValueError, match="from_data needs"):
        LinkPredictionDataModule.from_data(Data(x=torch.zeros(3, 2)))
    with pytest.raises(FileNotFoundError, match="raw files not found"):
        LinkPredictionDataModule(root=str(tmp_path))
    tiny = Data(x=torch.zeros(3, 2), edge_index=torch.tensor([[0, 1], [1, 2]]), num_nodes=3)
    with pytest.raises(ValueError, match="at least 5"):
        LinkPredictionDataModule.from_data(tiny).setup()


def test_cora_split_sizes(planetoid_root, tmp_path):
    dm = LinkPredictionDataModule(root=str(planetoid_root), name="Cora", cache_dir=str(tmp_path))
    dm.setup()
    assert dm.split_sizes() == {"train": 4488, "val": 263, "test": 527, "message_passing": 8976}


# ------------------------------------------------------------------------------------------------ NCN / NCNC


def test_common_neighbours_match_set_intersections():
    g = geometric_graph()
    adj = adjacency(g.edge_index, g.num_nodes)
    nb = neighbours(g.edge_index)
    targets = torch.randint(0, g.num_nodes, (2, 40), generator=torch.Generator().manual_seed(1))
    t, u = common_neighbors(adj, targets)
    got = {(int(a), int(b)) for a, b in zip(t, u)}
    want = {(k, w) for k, (i, j) in enumerate(targets.t().tolist()) for w in nb.get(i, set()) & nb.get(j, set())}
    assert got == want and len(got) == t.numel()


def test_ncn_logits_match_the_equation_with_loops():
    torch.manual_seed(0)
    g = geometric_graph()
    pred = NCNPredictor(16, dropout=0.0).eval()
    h = torch.randn(g.num_nodes, 16)
    targets = torch.randint(0, g.num_nodes, (2, 30), generator=torch.Generator().manual_seed(2))
    got = pred(h, adjacency(g.edge_index, g.num_nodes), targets)
    nb = neighbours(g.edge_index)
    with torch.no_grad():
        xt = h + pred.xlin(h)  # x̃ = h + MLP_x(h), summed over N(i) ∩ N(j)
        want = []
        for i, j in targets.t().tolist():
            cn = sum((xt[u] for u in nb.get(i, set()) & nb.get(j, set())), torch.zeros(16))
            s = pred.lin(pred.xcnlin(cn.unsqueeze(0)) * pred.beta + pred.xijlin((h[i] * h[j]).unsqueeze(0)))
            want.append(float(s))
    assert torch.allclose(got.detach(), torch.tensor(want), atol=1e-5)


def test_ncnc_completion_matches_the_equation_with_loops():
    torch.manual_seed(0)
    g = geometric_graph(radius=0.14)
    pred = NCNCPredictor(8, dropout=0.0, scale=4.3, offset=0.1, pt=0.75, alpha=1.0).eval()
    h = torch.randn(g.num_nodes, 8)
    adj = adjacency(g.edge_index, g.num_nodes)
    targets = torch.randint(0, g.num_nodes, (2, 12), generator=torch.Generator().manual_seed(3))
    got = pred(h, adj, targets)
    nb = neighbours(g.edge_index)

    def p_hat(a, b):  # σ-calibrated NCN (depth 0) probability of the missing edge (a, b), from the equation
        s = float(pred(h, adj, torch.tensor([[a], [b]]), depth=0))
        p0 = 1 / (1 + math.exp(-4.3 * (s - 0.1)))
        return 1.0 * 0.75 * p0 / (0.75 * p0 + 1 - p0)

    with torch.no_grad():
        xt = h + pred.xlin(h)
        want = []
        for i, j in targets.t().tolist():
            ni, nj = nb.get(i, set()), nb.get(j, set())
            cn = sum((xt[u] for u in ni & nj), torch.zeros(8))
            cn = cn + sum((p_hat(j, u) * xt[u] for u in ni - nj), torch.zeros(8))
            cn = cn + sum((p_hat(i, u) * xt[u] for u in nj - ni), torch.zeros(8))
            s = pred.lin(pred.xcnlin(cn.unsqueeze(0)) * pred.beta + pred.xijlin((h[i] * h[j]).unsqueeze(0)))
            want.append(float(s))
    assert torch.allclose(got.detach(), torch.tensor(want), atol=1e-5)
    # depth 0 is plain NCN: the completion terms are what differs
    assert not torch.allclose(got.detach(), pred(h, adj, targets, depth=0).detach())


def test_calibration_and_bce_match_their_formulas():
    s = torch.tensor([-1.0, 0.0, 2.8, 5.0])
    want = [0.6 * 0.75 / (0.75 + (1 - 1 / (1 + math.exp(-4.3 * (v - 2.8)))) / (1 / (1 + math.exp(-4.3 * (v - 2.8)))))
            for v in s.tolist()]
    assert torch.allclose(calibrate(s, 4.3, 2.8, 0.75, 0.6), torch.tensor(want), atol=1e-6)
    pos, neg = torch.tensor([1.0, -0.5]), torch.tensor([0.3, -2.0, 0.0])
    bce = -np.mean([math.log(1 / (1 + math.exp(-v))) for v in pos.tolist()]) \
        - np.mean([math.log(1 - 1 / (1 + math.exp(-v))) for v in neg.tolist()])
    assert float(link_bce(pos, neg)) == pytest.approx(bce, rel=1e-6)


def test_target_link_removal_drops_both_directions_only():
    ei = torch.tensor([[0, 1, 1, 2, 2, 3], [1, 0, 2, 1, 3, 2]])
    out = remove_edges(ei, torch.tensor([[2], [1]]), 4)
    assert sorted(map(tuple, out.t().tolist())) == [(0, 1), (1, 0), (2, 3), (3, 2)]


@pytest.mark.parametrize("cls", [GAELinkPredictor, NCN, NCNC])
def test_link_predictors_learn_on_a_geometric_graph(cls):
    torch.manual_seed(0)
    dm = small_dm()
    model = cls(num_features=8, hidden=32, hits_k=20, input_dropout=0.0, lr=0.01)
    before = quiet_trainer().validate(model, datamodule=dm, verbose=False)[0]["val_hits@20"]
    trainer = quiet_trainer(max_epochs=15)
    trainer.fit(model, datamodule=dm)
    after = trainer.callback_metrics["val_hits@20"]
    assert after > before + 0.1 and torch.isfinite(trainer.callback_metrics["train_loss"])


def test_link_predictors_refuse_a_graph_without_an_edge_split(planetoid_root, tmp_path):
    from lightning_ext.graph.planetoid import PlanetoidDataModule

    node_dm = PlanetoidDataModule(root=str(planetoid_root), cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="link-prediction batches"):
        quiet_trainer(fast_dev_run=1).fit(NCN(hidden=8), datamodule=node_dm)
    with pytest.raises(ValueError, match="num_features=8 but the data has 1433"):
        quiet_trainer(fast_dev_run=1).fit(NCNC(num_features=8),
                                          datamodule=LinkPredictionDataModule(root=str(planetoid_root),
                                                                              cache_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="pt"):
        NCNC(pt=1.5)


def test_ncn_resumes_mid_epoch_to_the_same_parameters(tmp_path):
    from lightning_ext.testing import assert_same_parameters, crash_and_resume

    def make_model():
        torch.manual_seed(0)  # the same initial weights in all three runs
        return NCN(num_features=8, hidden=8, input_dropout=0.0, dropout=0.0)

    a, b, _ = crash_and_resume(make_model, lambda: small_dm(batch_size=32), lambda: [], max_epochs=2, crash_step=3,
                               tmp_path=tmp_path)
    assert_same_parameters(a, b)


@pytest.mark.slow
def test_ddp_two_processes_match_one_process(tmp_path):
    from lightning_ext.testing import fit_ddp_vs_single

    def make_model():
        torch.manual_seed(0)
        return GAELinkPredictor(num_features=8, hidden=8, hits_k=20, mask_targets=False)

    single, ddp = fit_ddp_vs_single(make_model, lambda bs: small_dm(batch_size=bs), 64, tmp_path, test=False,
                                    max_epochs=2)
    for k, v in single.state_dict.items():
        assert torch.allclose(v.float(), ddp.state_dict[k].float(), atol=1e-5), k
    assert single.final_metrics["val_hits@20"] == pytest.approx(ddp.final_metrics["val_hits@20"])
    assert single.final_metrics["val_mrr"] == pytest.approx(ddp.final_metrics["val_mrr"], rel=1e-5)


# ------------------------------------------------------------------------------------------------ NetInfoF


def test_compatibility_matrix_matches_the_explicit_least_squares():
    from scipy.sparse.linalg import lsqr
    from sklearn.linear_model import Ridge

    g = geometric_graph(n=60, radius=0.25)
    z = nif.scale_rows(torch.randn(60, 4, generator=torch.Generator().manual_seed(0)))
    h = nif.compatibility_matrix(z, g.edge_index, seed=5).double()
    # the same training pairs: degree >= 2 edges (upper triangle) and twice as many seeded random pairs
    gen = torch.Generator().manual_seed(5)
    deg = torch.bincount(g.edge_index[0], minlength=60)
    pos = [(a, b) for a, b in g.edge_index.t().tolist() if a < b and deg[a] >= 2 and deg[b] >= 2]
    neg = torch.randint(0, 60, (2, 2 * len(pos)), generator=gen).t().tolist()
    zn = z.double().numpy()
    d, upper = 4, [(r, c) for r in range(4) for c in range(r, 4)]
    x = np.array([[zn[i, r] * zn[j, c] + zn[i, c] * zn[j, r] if r != c else zn[i, r] * zn[j, r] for r, c in upper]
                  for i, j in pos + neg])
    y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    ridge = Ridge(alpha=1.0, fit_intercept=False).fit(zn[g.edge_index[0]], zn[g.edge_index[1]]).coef_
    x0 = np.array([ridge[r, c] for r, c in upper])
    v = np.sort(np.abs(x0))
    below = np.where(np.cumsum(v) / v.sum() < 0.05)[0]
    keep = np.abs(x0) >= (v[below[-1]] if len(below) else 0.0)
    sol = lsqr(x[:, keep], y, damp=1, atol=1e-2, btol=1e-2, x0=x0[keep])[0]
    ref = np.zeros((d, d))
    for (r, c), val in zip([u for u, k in zip(upper, keep) if k], sol):
        ref[r, c] = ref[c, r] = val
    assert np.allclose(h.numpy(), ref, atol=1e-6)
    # and z_i^T H z_j is the design matrix times the upper-triangular coefficients
    pairs = torch.tensor(pos[:5]).t()
    assert torch.allclose(nif.pair_features(z.double(), pairs) @ torch.tensor([ref[r, c] for r, c in upper]),
                          ((z.double()[pairs[0]] @ torch.tensor(ref)) * z.double()[pairs[1]]).sum(1), atol=1e-9)


def test_netinfo_score_matches_the_conditional_entropy_loop_and_sklearn_bins():
    from sklearn.preprocessing import KBinsDiscretizer

    g = torch.Generator().manual_seed(0)
    ref, vals = torch.randn(400, generator=g), torch.randn(120, generator=g)
    kbd = KBinsDiscretizer(n_bins=8, encode="ordinal", strategy="quantile", subsample=None).fit(ref.numpy()[:, None])
    bins = nif.quantile_bins(ref, vals, 8)
    assert bins.tolist() == kbd.transform(vals.numpy()[:, None]).astype(int).ravel().tolist()
    labels = (vals + 0.5 * torch.randn(120, generator=g) > 0).long()
    table = np.zeros((8, 2))
    for b, y in zip(bins.tolist(), labels.tolist()):
        table[b, y] += 1
    n, ce = table.sum(), 0.0
    for i in range(8):
        for j in range(2):
            if table[i, j]:
                ce -= table[i, j] / n * math.log2((table[i, j] / n) / (table[i].sum() / n))
    assert nif.conditional_entropy_score(bins, labels) == pytest.approx(2 ** (-ce))


def test_random_walks_are_non_backtracking_seeded_and_thresholded():
    path = torch.tensor([[0, 1, 1, 2], [1, 0, 2, 1]])  # 0 - 1 - 2
    m = nif.walk_cooccurrence(path, 3, walks=50, walk_length=3, threshold=1, seed=0).to_dense()
    assert m[0, 1] == 50 and m[0, 2] == 50 and m[0, 0] == 0  # 0 -> 1 -> 2 always (never back to 0)
    assert m[1].sum() == 50 and m[1, 1] == 0  # from 1 the walk stops at the leaf it reached
    k6 = torch.tensor([[a, b] for a in range(6) for b in range(6) if a != b]).t()
    a, b = (nif.walk_cooccurrence(k6, 6, walks=50, seed=s).to_dense() for s in (0, 0))
    assert a.equal(b) and not a.equal(nif.walk_cooccurrence(k6, 6, walks=50, seed=1).to_dense())
    assert torch.all(a.diagonal() == 0) and a.sum() == 6 * 50 * 2  # two visits per walk, never back to the start
    assert nif.walk_cooccurrence(path, 3, walks=1, threshold=1, seed=0)._nnz() == 0  # counts of 1 are dropped


def test_derived_embeddings_are_normalised_and_structure_reflects_the_graph():
    g = geometric_graph()
    zs = nif.derived_embeddings(g.edge_index, g.x, dim=4, walks=20)
    for z in zs.values():
        assert z.shape == (120, 4) and torch.allclose(z.norm(dim=1), torch.ones(120), atol=1e-5)


def test_probe_scores_and_their_refusals(planetoid_root, tmp_path):
    dm = small_dm()
    probe = nif.NetInfoFProbe(task="link", dim=4, walks=20)
    scores = probe.probe_datamodule(dm)
    assert sorted(scores) == sorted(nif.COMPONENTS) and all(0 < s <= 1 for s in scores.values())
    assert max(scores.values()) > 0.6  # a geometric graph with coordinate features: links are predictable
    from lightning_ext.graph.planetoid import PlanetoidDataModule

    with pytest.raises(ValueError, match="needs an edge split"):
        probe.probe_datamodule(PlanetoidDataModule(root=str(planetoid_root), cache_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="labels `y` and a `val_mask`"):
        nif.NetInfoFProbe(task="node").probe_datamodule(dm)
    with pytest.raises(ValueError, match="validation positive and negative"):
        nif.netinfof_probe(dm.graph.x, dm.graph.edge_index, "link")
    with pytest.raises(ValueError, match="task"):
        nif.NetInfoFProbe(task="graph")


def test_probe_callback_logs_before_training_and_warns_when_low():
    dm = small_dm(batch_size=10_000)
    probe = nif.NetInfoFProbe(task="link", dim=4, walks=20, warn_below=0.99)
    model = NetInfoFLinkPredictor(num_features=8, dim=4, walks=20, hits_k=20)
    with pytest.warns(UserWarning, match="little usable information"):
        quiet_trainer(max_epochs=1, callbacks=[probe]).fit(model, datamodule=dm)
    assert set(probe.scores) == set(nif.COMPONENTS)
    assert nif.NetInfoFProbe().load_state_dict(probe.state_dict()) is None


def test_act_logits_and_penalty_match_the_equations():
    g = geometric_graph()
    model = NetInfoFLinkPredictor(num_features=8, dim=4, components=["U", "S"], walks=20, lambda1=0.3, lambda2=0.2)
    model.fit_embeddings(g.x, g.edge_index)
    targets = torch.tensor([[0, 5, 7], [1, 9, 3]])
    with torch.no_grad():
        want = sum((model.get_buffer(f"xc_{c}")[targets[0]] * model.get_buffer(f"z_{c}")[targets[1]])
                   @ model.heads[c].weight.t() + model.heads[c].bias for c in ("U", "S")).squeeze(1)
        assert torch.allclose(model(targets), want, atol=1e-6)
    w = [model.heads[c].weight for c in ("U", "S")]
    manual = 0.3 * sum(float(t.abs().sum()) for t in w) + 0.2 * sum(math.sqrt(float((t ** 2).sum())) for t in w)
    assert float(sparse_group_lasso(w, 0.3, 0.2)) == pytest.approx(manual, rel=1e-6)


def test_act_learns_and_refuses_bad_inputs(planetoid_root, tmp_path):
    dm = small_dm(batch_size=10_000)
    model = NetInfoFLinkPredictor(num_features=8, dim=4, walks=20, hits_k=20)
    trainer = quiet_trainer(max_epochs=3)
    trainer.fit(model, datamodule=dm)
    assert trainer.callback_metrics["val_hits@20"] > 0.3
    with pytest.raises(ValueError, match="components"):
        NetInfoFLinkPredictor(components=[])
    with pytest.raises(ValueError, match="components"):
        NetInfoFLinkPredictor(components=["U", "U"])
    with pytest.raises(ValueError, match="set_embeddings needs"):
        NetInfoFLinkPredictor(num_features=8, dim=4).set_embeddings({"U": torch.zeros(5, 3)}, {"U": torch.zeros(5, 3)})
    with pytest.raises(RuntimeError, match="fit_embeddings"):
        NetInfoFLinkPredictor(num_features=8)(torch.tensor([[0], [1]]))
    from lightning_ext.graph.planetoid import PlanetoidDataModule

    with pytest.raises(ValueError, match="needs an edge split"):
        quiet_trainer(fast_dev_run=1).fit(NetInfoFLinkPredictor(),
                                          datamodule=PlanetoidDataModule(root=str(planetoid_root),
                                                                         cache_dir=str(tmp_path)))
