"""FairGNN: the objective and the fairness gaps against the paper's equations, the training phases, resume, bad inputs;
the MovieLens user graph (split, visible sensitive attributes, missing column)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytest.importorskip("torch_geometric")

from lightning.pytorch import LightningDataModule, Trainer  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from lightning_ext.graph.fair_gnn import FairGNN, covariance_penalty, fairgnn_losses, fairness_gaps  # noqa: E402
from lightning_ext.testing import assert_same_parameters, crash_and_resume  # noqa: E402


def fair_graph(n: int = 80, features: int = 6, seed: int = 0):
    """Two groups (s) that differ in label rate; features carry both s and y; a kNN-ish random graph."""
    from torch_geometric.data import Data

    g = torch.Generator().manual_seed(seed)
    s = (torch.rand(n, generator=g) < 0.6).long()
    y = (torch.rand(n, generator=g) < torch.where(s == 1, torch.tensor(0.7), torch.tensor(0.2))).long()
    x = torch.randn(n, features, generator=g)
    x[:, 0] += 1.5 * y
    x[:, 1] += 1.5 * s
    src = torch.arange(n).repeat_interleave(4)
    dst = torch.randint(0, n, (4 * n,), generator=g)
    edge_index = torch.cat([torch.stack([src, dst]), torch.stack([dst, src])], 1)
    perm = torch.randperm(n, generator=g)
    masks = {k: torch.zeros(n, dtype=torch.bool) for k in ("train_mask", "val_mask", "test_mask", "sens_mask")}
    masks["train_mask"][perm[:40]] = True
    masks["val_mask"][perm[40:60]] = True
    masks["test_mask"][perm[60:]] = True
    masks["sens_mask"][perm[:10]] = True
    return Data(x=x, edge_index=edge_index, y=y, sens=s, num_nodes=n, **masks)


class GraphDM(LightningDataModule):
    def __init__(self, graph):
        super().__init__()
        self.graph = graph

    def _loader(self):
        return DataLoader([self.graph], batch_size=1, collate_fn=lambda b: b[0])

    train_dataloader = val_dataloader = test_dataloader = predict_dataloader = _loader


def _trainer(**kw):
    return Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, num_sanity_val_steps=0, **kw)


def test_fairness_gaps_match_their_definitions():
    rng = np.random.default_rng(0)
    pred, y, s = rng.integers(0, 2, 200), rng.integers(0, 2, 200), rng.integers(0, 2, 200)
    dp = abs(pred[s == 0].sum() / (s == 0).sum() - pred[s == 1].sum() / (s == 1).sum())
    pos = y == 1
    eo = abs(pred[pos & (s == 0)].sum() / (pos & (s == 0)).sum() - pred[pos & (s == 1)].sum() / (pos & (s == 1)).sum())
    got = fairness_gaps(torch.as_tensor(pred), torch.as_tensor(y), torch.as_tensor(s))
    assert got == pytest.approx((dp, eo), abs=1e-6)


def test_generator_objective_matches_the_paper_equation():
    """L_G = BCE(ŷ_train, y) + α |Cov(ŝ, σ(ŷ))| - β BCE(f_A(h), ŝ), ŝ = σ(f_E) with known s substituted."""
    torch.manual_seed(0)
    n, alpha, beta = 12, 7.0, 0.5
    y_logit, s_logit, adv_logit = torch.randn(n), torch.randn(n), torch.randn(n)
    y, s = torch.randint(0, 2, (n,)), torch.randint(0, 2, (n,))
    train, known = torch.tensor([0, 1, 2, 3, 4, 5]), torch.tensor([2, 7])

    def sig(v):
        return 1 / (1 + math.exp(-v))

    s_hat = [sig(v) for v in s_logit.tolist()]
    for i in known.tolist():
        s_hat[i] = float(s[i])
    cls = -sum(y[i].item() * math.log(sig(y_logit[i].item())) + (1 - y[i].item()) * math.log(1 - sig(y_logit[i].item()))
               for i in train.tolist()) / len(train)
    y_hat = [sig(v) for v in y_logit.tolist()]
    ms, my = sum(s_hat) / n, sum(y_hat) / n
    cov = abs(sum((a - ms) * (b - my) for a, b in zip(s_hat, y_hat)) / n)
    adv = -sum(t * math.log(sig(v)) + (1 - t) * math.log(1 - sig(v)) for t, v in zip(s_hat, adv_logit.tolist())) / n
    parts = fairgnn_losses(y_logit, y, train, s_logit, s, known, adv_logit, alpha, beta)
    assert parts["cls"].item() == pytest.approx(cls, rel=1e-5)
    assert parts["cov"].item() == pytest.approx(cov, rel=1e-5)
    assert parts["adv"].item() == pytest.approx(adv, rel=1e-5)
    assert parts["loss"].item() == pytest.approx(cls + alpha * cov - beta * adv, rel=1e-5)
    assert covariance_penalty(torch.tensor(s_hat), torch.tensor(y_hat)).item() == pytest.approx(cov, rel=1e-5)


def test_estimator_trains_first_then_stays_frozen_while_the_classifier_and_adversary_learn():
    from lightning.pytorch import Callback

    g = fair_graph()
    torch.manual_seed(0)
    model = FairGNN(num_features=6, hidden=8, estimator_epochs=2, dropout=0.0, lr=0.01)
    parts = ("estimator_conv", "encoder", "adversary")
    snaps = []

    class Snap(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            snaps.append({p: [t.detach().clone() for t in getattr(pl_module, p).parameters()] for p in parts})

    first = {p: [t.detach().clone() for t in getattr(model, p).parameters()] for p in parts}
    trainer = _trainer(max_epochs=5, callbacks=[Snap()])
    trainer.fit(model, datamodule=GraphDM(g))

    def same(a, b, part):
        return all(torch.equal(x, y) for x, y in zip(a[part], b[part]))

    assert not same(first, snaps[1], "estimator_conv")  # epochs 0-1 train the estimator ...
    assert same(first, snaps[1], "encoder") and same(first, snaps[1], "adversary")  # ... and nothing else
    assert same(snaps[1], snaps[4], "estimator_conv")  # then it is frozen
    assert not same(snaps[1], snaps[4], "encoder") and not same(snaps[1], snaps[4], "adversary")
    assert {"val_acc", "val_auc", "val_dp", "val_eo", "fair/estimator_acc"} <= set(trainer.callback_metrics)


def test_adversary_term_pushes_the_encoder_against_the_adversary():
    """With β > 0 the encoder's gradient from -β·BCE(f_A(h), ŝ) is the negative of the adversary's own gradient."""
    g = fair_graph()
    torch.manual_seed(0)
    model = FairGNN(num_features=6, hidden=8, alpha=0.0, beta=1.0, dropout=0.0)
    h = model.embed(g.x, g.edge_index)
    s_score = torch.sigmoid(model.estimate_sensitive(g.x, g.edge_index)).detach()
    adv = torch.nn.functional.binary_cross_entropy_with_logits(model.adversary(h).squeeze(-1), s_score)
    (grad_adv,) = torch.autograd.grad(adv, model.encoder.lin.weight, retain_graph=True)
    y_logit = model.classifier(h).squeeze(-1)
    parts = fairgnn_losses(y_logit, g.y, g.train_mask.nonzero().flatten(), model.estimate_sensitive(g.x, g.edge_index),
                           g.sens, torch.tensor([], dtype=torch.long), model.adversary(h).squeeze(-1), 0.0, 1.0)
    (grad_g,) = torch.autograd.grad(parts["loss"] - parts["cls"], model.encoder.lin.weight)
    torch.testing.assert_close(grad_g, -grad_adv)


def test_crash_and_resume_across_the_phase_change_matches_an_uninterrupted_run(tmp_path):
    g = fair_graph()

    def make_model():
        torch.manual_seed(0)
        return FairGNN(num_features=6, hidden=8, estimator_epochs=3, dropout=0.0, lr=0.01)

    full, resumed, _ = crash_and_resume(make_model, lambda: GraphDM(g), lambda: [], max_epochs=7, crash_epoch=4,
                                        tmp_path=tmp_path, num_sanity_val_steps=0)
    assert_same_parameters(full, resumed)


def test_a_graph_without_sensitive_attributes_is_refused():
    g = fair_graph()
    del g.sens
    with pytest.raises(ValueError, match="no `sens`"):
        _trainer(max_epochs=1).fit(FairGNN(num_features=6, hidden=4), datamodule=GraphDM(g))
    g = fair_graph()
    g.sens_mask[:] = False
    with pytest.raises(ValueError, match="sens_mask"):
        _trainer(max_epochs=1).fit(FairGNN(num_features=6, hidden=4), datamodule=GraphDM(g))


def test_fairgnn_arguments_are_checked():
    with pytest.raises(ValueError, match="alpha"):
        FairGNN(alpha=-1.0)
    with pytest.raises(ValueError, match="beta"):
        FairGNN(beta=float("nan"))
    with pytest.raises(ValueError, match="estimator_epochs"):
        FairGNN(estimator_epochs=-2)


def test_movielens_user_graph_split_and_visible_sensitive_attributes():
    pytest.importorskip("recbole", reason="ML-100K is read from the recbole package")
    from lightning_ext.graph.movielens_users import MovieLensUserGraphDataModule

    dm = MovieLensUserGraphDataModule(num_features=16, k=5, sens_fraction=0.1, split_seed=3)
    dm.setup()
    g = dm.graph
    assert g.num_nodes == 943 and g.x.shape == (943, 16)
    assert int(g.sens_mask.sum()) == 94
    assert not bool((g.sens_mask & (g.val_mask | g.test_mask)).any())
    assert bool((g.train_mask ^ g.val_mask ^ g.test_mask).all())
    assert int(g.sens.sum()) == 670  # 670 men of 943 users
    assert abs(float(g.y.float().mean()) - 0.2365) < 1e-3  # technical occupations
    a = torch.sparse_coo_tensor(g.edge_index, torch.ones(g.edge_index.shape[1]), (943, 943)).to_dense()
    assert torch.equal(a, a.T) and float(a.diagonal().sum()) == 0 and bool((a.sum(1) >= 5).all())
    again = MovieLensUserGraphDataModule(num_features=16, k=5, sens_fraction=0.1, split_seed=3)
    again.setup()
    assert torch.equal(again.graph.sens_mask, g.sens_mask) and torch.equal(again.graph.edge_index, g.edge_index)


def test_movielens_user_graph_bad_inputs():
    pytest.importorskip("recbole", reason="ML-100K is read from the recbole package")
    from lightning_ext.graph.movielens_users import MovieLensUserGraphDataModule

    with pytest.raises(ValueError, match="no column `ethnicity`.*columns: user_id, age, gender"):
        MovieLensUserGraphDataModule(sensitive="ethnicity")
    with pytest.raises(ValueError, match="sens_fraction"):
        MovieLensUserGraphDataModule(train_fraction=0.2, sens_fraction=0.3)
    with pytest.raises(ValueError, match="leaves no test users"):
        MovieLensUserGraphDataModule(train_fraction=0.6, val_fraction=0.4)
    with pytest.raises(ValueError, match="two values"):
        dm = MovieLensUserGraphDataModule(sensitive="occupation")
        dm.setup()
