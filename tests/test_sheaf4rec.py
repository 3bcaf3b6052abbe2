"""Sheaf4Rec: the sheaf diffusion layer and loss against a dense reference written from the paper/official code,
readouts, bad inputs, learning and checkpoint restore.

The reference follows github.com/antoniopurificato/Sheaf4Rec ``models.py::SheafConvLayer`` (read for the
conventions, not copied): restriction map of the directed edge (u → v) ``tanh(w · [x_u ‖ x_v])`` with no bias,
``d_v = Σ_{e: row=v} F_e²``, off-diagonal ``−F_{u→v} F_{v→u} / √((d_u+1)(d_v+1))``, diagonal ``d_v/(d_v+1)``,
``x ← x − step · L (W x + b)``; ``train.py``: mean BPR (softplus) plus ``½(‖u⁰‖²+‖i+⁰‖²+‖i-⁰‖²)/B`` times 1.
Everything dense, float64.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer, seed_everything

from lightning_ext.recsys.graph import SparseGraph
from lightning_ext.recsys.interactions import Interactions
from lightning_ext.recsys.sheaf4rec import Sheaf4Rec, SheafConv, reverse_edge_index
from test_graph_recommenders import SyntheticInteractions

pytestmark = pytest.mark.usefixtures("one_thread")
NU, NI = 6, 8


def _pairs():
    rng = np.random.default_rng(0)
    pairs = {(u, int(i)) for u in range(NU) for i in rng.choice(NI, size=rng.integers(1, 5), replace=False)}
    pairs |= {(int(rng.integers(NU)), i) for i in range(NI)}
    return np.array(sorted(pairs), dtype=np.int64)


def _dense_sheaf_layer(x, adj, w, weight, bias, step):
    """Dense normalised sheaf Laplacian with scalar maps, then ``x - step * L (W x + b)``."""
    n, d = x.shape
    # F[u, v] = tanh(w · [x_u ‖ x_v]) for every ordered pair; only edges count
    pair = torch.cat([x[:, None, :].expand(n, n, d), x[None, :, :].expand(n, n, d)], dim=-1)
    maps = torch.tanh(pair @ w) * adj
    deg = (maps ** 2).sum(1)
    lap = -(maps * maps.T) / torch.sqrt((deg[:, None] + 1) * (deg[None, :] + 1))
    lap = lap + torch.diag(deg / (deg + 1))
    return x - step * lap @ (x @ weight.T + bias)


def _reference_loss(pairs, emb0, layers, readout, users, pos, neg, reg):
    n = NU + NI
    adj = torch.zeros(n, n, dtype=torch.float64)
    adj[pairs[:, 0], NU + pairs[:, 1]] = 1
    adj[NU + pairs[:, 1], pairs[:, 0]] = 1
    x, out = emb0, [emb0]
    for w, weight, bias in layers:
        x = _dense_sheaf_layer(x, adj, w, weight, bias, 1.0)
        out.append(x)
    final = torch.cat(out, 1) if readout == "concat" else sum(out) / len(out)
    u, i, j = final[users], final[NU + pos], final[NU + neg]
    bpr = F.softplus((u * j).sum(1) - (u * i).sum(1)).mean()
    l2 = 0.5 * (emb0[users].pow(2).sum() + emb0[NU + pos].pow(2).sum() + emb0[NU + neg].pow(2).sum()) / len(users)
    return bpr + reg * l2


@pytest.mark.parametrize("readout", ["concat", "mean"])
def test_loss_and_gradients_match_a_dense_reference(readout):
    pairs = _pairs()
    torch.manual_seed(1)
    model = Sheaf4Rec(num_layers=2, readout=readout, embedding_dim=5, reg_weight=1.0).bind(
        Interactions.from_pairs(pairs, NU, NI)).double()
    for conv in model.convs:  # non-trivial maps and biases
        torch.nn.init.normal_(conv.sheaf_learner.weight, std=1.0)
        torch.nn.init.normal_(conv.linear.bias, std=0.3)
    users, pos, neg = torch.tensor([0, 1, 1, 5]), torch.tensor([2, 0, 3, 7]), torch.tensor([1, 4, 4, 6])
    loss = model.training_loss(users, pos, neg)["loss"]
    loss.backward()
    emb0 = torch.cat([model.user_embedding.weight, model.item_embedding.weight]).detach().clone().requires_grad_()
    layers = [(c.sheaf_learner.weight[0].detach().clone().requires_grad_(),
               c.linear.weight.detach().clone().requires_grad_(), c.linear.bias.detach().clone().requires_grad_())
              for c in model.convs]
    ref = _reference_loss(pairs, emb0, layers, readout, users, pos, neg, 1.0)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-9, atol=1e-9)
    grad0 = torch.cat([model.user_embedding.weight.grad, model.item_embedding.weight.grad])
    torch.testing.assert_close(grad0, emb0.grad, rtol=1e-8, atol=1e-10)
    for conv, (w, weight, bias) in zip(model.convs, layers):
        torch.testing.assert_close(conv.sheaf_learner.weight.grad[0], w.grad, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(conv.linear.weight.grad, weight.grad, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(conv.linear.bias.grad, bias.grad, rtol=1e-8, atol=1e-10)


def test_readouts_shapes_and_zero_layers_is_mf():
    data = Interactions.from_pairs(_pairs(), NU, NI)
    concat = Sheaf4Rec(num_layers=3, embedding_dim=4).bind(data)
    assert concat.propagate()[0].shape == (NU, 16)
    assert Sheaf4Rec(num_layers=3, readout="mean", embedding_dim=4).bind(data).propagate()[1].shape == (NI, 4)
    mf = Sheaf4Rec(num_layers=0, embedding_dim=4).bind(data)
    torch.testing.assert_close(mf.propagate()[0], mf.user_embedding.weight)
    # parameters per layer: W (d x d + d) and the map learner w (2d), nothing else
    assert sum(p.numel() for p in concat.convs.parameters()) == 3 * (16 + 4 + 8)


def test_reverse_edge_index_pairs_each_edge_with_its_reverse_and_refuses_a_directed_graph():
    g = SparseGraph([0, 1, 1, 2, 0, 3], [1, 0, 2, 1, 3, 0], (4, 4))
    rev = reverse_edge_index(g)
    assert torch.equal(g.row[rev], g.col) and torch.equal(g.col[rev], g.row)
    with pytest.raises(ValueError, match="symmetric"):
        reverse_edge_index(SparseGraph([0, 1], [1, 2], (3, 3)))


def test_sheaf_conv_with_zero_maps_is_the_identity():
    g = SparseGraph([0, 1], [1, 0], (2, 2))
    conv = SheafConv(3)
    torch.nn.init.zeros_(conv.sheaf_learner.weight)  # F = tanh(0) = 0: L = 0
    x = torch.randn(2, 3)
    torch.testing.assert_close(conv(x, g, reverse_edge_index(g)), x)


@pytest.mark.parametrize("kwargs, name", [
    ({"readout": "sum"}, "readout"), ({"step_size": 0.0}, "step_size"), ({"num_layers": -1}, "num_layers"),
    ({"reg_weight": float("nan")}, "reg_weight"), ({"step_size": float("inf")}, "step_size"),
])
def test_bad_values_are_refused_with_one_line_naming_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name) as err:
        Sheaf4Rec(**kwargs)
    assert "\n" not in str(err.value)


def test_learns_far_better_than_chance_and_checkpoint_restores(tmp_path):
    seed_everything(0)
    dm = SyntheticInteractions(batch_size=256, val_fraction=0.1)
    model = Sheaf4Rec(num_layers=2, embedding_dim=16, lr=0.02, reg_weight=1e-3, eval_ks=(10, 20))
    trainer = Trainer(max_epochs=8, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, check_val_every_n_epoch=8)
    trainer.fit(model, datamodule=dm)
    assert float(trainer.callback_metrics["val_recall@20"]) > 2.5 * 20 / 150
    trainer.save_checkpoint(tmp_path / "sheaf.ckpt")
    restored = Sheaf4Rec.load_from_checkpoint(tmp_path / "sheaf.ckpt").bind(dm.interactions)
    torch.testing.assert_close(restored.propagate()[0], model.propagate()[0])


@pytest.mark.parametrize("point", [{"crash_epoch": 2}, {"crash_step": 7, "checkpoint_every_n_steps": 3}])
def test_crash_and_resume_ends_with_the_uninterrupted_weights(tmp_path, point):
    """Epoch boundary and mid-epoch (the BPR sampler replays the rest of its epoch) -> the same parameters."""
    from lightning_ext.testing import crash_and_resume

    def make():
        seed_everything(0)
        return Sheaf4Rec(num_layers=2, embedding_dim=8, lr=0.02, reg_weight=1e-3, eval_ks=(10,))

    full, resumed, info = crash_and_resume(make, lambda: SyntheticInteractions(batch_size=256, val_fraction=0.1),
                                           lambda: [], max_epochs=3, tmp_path=tmp_path, weights_only=True,
                                           num_sanity_val_steps=0, limit_val_batches=0, **point)
    assert info["resumed_from_step"] > 0 and full.state_dict().keys() == resumed.state_dict().keys()
    assert "user_embedding.weight" in full.state_dict()
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)
