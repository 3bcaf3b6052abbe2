"""One-batch loss-and-gradient equivalence of the graph recommenders against independent implementations.

Each reference below is written from the paper's equations and the official code's conventions (dense
matrices, float64, the official reductions and epsilons), not from ``lightning_ext``: it takes only the raw
interaction pairs and copies of the model's parameters. Loss and every parameter gradient must agree to 1e-6.

Official code read for the conventions:
- LightGCN: github.com/gusye1234/LightGCN-PyTorch ``model.py::LightGCN.bpr_loss`` (softplus BPR mean,
  ``½(||u⁰||²+||i+⁰||²+||i-⁰||²)/B`` times ``decay``; mean of the K+1 layers of D^-1/2 A D^-1/2).
- UltraGCN: github.com/xue-pai/UltraGCN ``main.py`` (``get_omegas``, ``cal_loss_L``, ``cal_loss_I``,
  ``norm_loss``; BCE summed over the batch, negatives' BCE averaged over ``negative_num``).
- LightGCL: github.com/HKUDS/LightGCL ``model.py`` (sum readouts, SVD view from the previous main-view layer,
  ``log(Σ exp + 1e-8)`` negatives over all nodes, clamp(±5) positives, anchors ``uids`` and
  ``iids = cat(pos, neg)`` with duplicates; ``λ2 Σ ||θ||²``) and ``main.py``.
- DCCF: github.com/HKUDS/DCCF ``model.py`` (``inference``, ``_adaptive_mask``, ``cal_ssl_loss`` on unique
  users and unique positive items, ``-log(pos/(neg+1e-8)+1e-8)``; ``emb_reg`` on the batch's layer-0 rows).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lightning_ext.recsys.dccf import DCCF
from lightning_ext.recsys.interactions import Interactions
from lightning_ext.recsys.lightgcl import LightGCL
from lightning_ext.recsys.lightgcn import LightGCN
from lightning_ext.recsys.mf_bpr import MFBPR
from lightning_ext.recsys.ultragcn import UltraGCN

NU, NI = 7, 9
TOL = dict(rtol=1e-6, atol=1e-6)


pytestmark = pytest.mark.usefixtures("one_thread")


def _pairs() -> np.ndarray:
    rng = np.random.default_rng(3)
    pairs = {(u, int(i)) for u in range(NU) for i in rng.choice(NI, size=rng.integers(2, 6), replace=False)}
    pairs |= {(int(rng.integers(NU)), i) for i in range(NI)}  # every item has a user
    return np.array(sorted(pairs), dtype=np.int64)


def _batch(pairs: np.ndarray, size: int = 12):
    rng = np.random.default_rng(5)
    idx = rng.integers(len(pairs), size=size)  # duplicates on purpose
    users, pos = torch.as_tensor(pairs[idx, 0]), torch.as_tensor(pairs[idx, 1])
    neg = torch.as_tensor(rng.integers(NI, size=size))
    return users, pos, neg


def _dense_r(pairs: np.ndarray) -> torch.Tensor:
    r = torch.zeros(NU, NI, dtype=torch.float64)
    r[pairs[:, 0], pairs[:, 1]] = 1.0
    return r


def _a_hat(pairs: np.ndarray) -> torch.Tensor:
    """D^-1/2 A D^-1/2 of the (U+I) bipartite graph (LightGCN's ``getSparseGraph``)."""
    r = _dense_r(pairs)
    a = torch.zeros(NU + NI, NU + NI, dtype=torch.float64)
    a[:NU, NU:], a[NU:, :NU] = r, r.T
    d = a.sum(1).pow(-0.5)
    d[torch.isinf(d)] = 0
    return d[:, None] * a * d[None, :]


def _model(cls, pairs, **kw):
    torch.manual_seed(0)
    model = cls(**kw).bind(Interactions.from_pairs(pairs, NU, NI)).double()
    # give every parameter non-trivial values (the official inits are tiny for some models)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return model


def _leaves(model):
    return {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}


def _check(model, ours: torch.Tensor, ref: torch.Tensor, leaves: dict) -> None:
    torch.testing.assert_close(ours, ref, **TOL)
    ours.backward()
    ref.backward()
    for name, p in model.named_parameters():
        assert leaves[name].grad is not None, name
        torch.testing.assert_close(p.grad, leaves[name].grad, **TOL, msg=f"gradient of {name}")


def _lightgcn_reference(pairs, eu, ei, users, pos, neg, layers, decay):
    a = _a_hat(pairs)
    x = torch.cat([eu, ei])
    out, layer = x, x
    for _ in range(layers):
        layer = a @ layer
        out = out + layer
    out = out / (layers + 1)
    u, i = out[:NU], out[NU:]
    pos_s, neg_s = (u[users] * i[pos]).sum(1), (u[users] * i[neg]).sum(1)
    loss = torch.mean(F.softplus(neg_s - pos_s))
    reg = 0.5 * (eu[users].norm(2).pow(2) + ei[pos].norm(2).pow(2) + ei[neg].norm(2).pow(2)) / float(len(users))
    return loss + decay * reg


@pytest.mark.parametrize("layers", [0, 3])
def test_lightgcn_and_mf_bpr_loss_and_gradients_match_the_official_formulas(layers):
    pairs = _pairs()
    users, pos, neg = _batch(pairs)
    model = _model(LightGCN, pairs, num_layers=layers, reg_weight=1e-2) if layers else \
        _model(MFBPR, pairs, reg_weight=1e-2)
    lv = _leaves(model)
    ours = model.training_loss(users, pos, neg)["loss"]
    ref = _lightgcn_reference(pairs, lv["user_embedding.weight"], lv["item_embedding.weight"], users, pos, neg,
                              layers, 1e-2)
    _check(model, ours, ref, lv)


def test_ultragcn_loss_and_gradients_match_the_official_formulas():
    pairs = _pairs()
    users, pos, _ = _batch(pairs)
    w1, w2, w3, w4, n_neg, neg_w, gamma, lam = 1e-3, 1.0, 1e-3, 0.5, 6, 30.0, 1e-2, 0.3
    # num_neighbors = NI keeps every co-occurring item, so tie-breaking in the top-K cannot differ
    model = _model(UltraGCN, pairs, w1=w1, w2=w2, w3=w3, w4=w4, negative_num=n_neg, negative_weight=neg_w,
                   l2_weight=gamma, item_item_weight=lam, num_neighbors=NI)
    lv = _leaves(model)
    torch.manual_seed(11)
    ours = model.training_loss(users, pos)["loss"]
    torch.manual_seed(11)
    neg = torch.randint(NI, (len(users), n_neg))  # the same draw as the module's uniform negatives

    r = _dense_r(pairs)
    d_u, d_i = r.sum(1), r.sum(0)
    beta_ud, beta_id = torch.sqrt(d_u + 1) / d_u, 1 / torch.sqrt(d_i + 1)
    g = r.T @ r  # item-item co-occurrence, diagonal kept (ii_diagonal_zero = False)
    g_sum = g.sum(1)
    omega = g * (torch.sqrt(g_sum + 1) / g_sum)[:, None] * (1 / torch.sqrt(g_sum + 1))[None, :]
    sim, nbr = torch.topk(omega, NI, dim=1)

    eu, ei = lv["user_embedding.weight"], lv["item_embedding.weight"]
    pos_weight = w1 + w2 * beta_ud[users] * beta_id[pos]
    neg_weight = w3 + w4 * torch.repeat_interleave(beta_ud[users], n_neg) * beta_id[neg.flatten()]
    ue = eu[users]
    pos_scores = (ue * ei[pos]).sum(-1)
    neg_scores = (ue.unsqueeze(1) * ei[neg]).sum(-1)
    neg_loss = F.binary_cross_entropy_with_logits(neg_scores, torch.zeros_like(neg_scores),
                                                  weight=neg_weight.view(neg_scores.shape), reduction="none").mean(-1)
    pos_loss = F.binary_cross_entropy_with_logits(pos_scores, torch.ones_like(pos_scores), weight=pos_weight,
                                                  reduction="none")
    loss_l = (pos_loss + neg_loss * neg_w).sum()
    norm = sum(torch.sum(p ** 2) for p in lv.values()) / 2
    loss_i = (-sim[pos] * (ue.unsqueeze(1) * ei[nbr[pos]]).sum(-1).sigmoid().log()).sum()
    ref = loss_l + gamma * norm + lam * loss_i
    _check(model, ours, ref, lv)


def test_lightgcl_loss_and_gradients_match_the_official_formulas():
    pairs = _pairs()
    users, pos, neg = _batch(pairs)
    temp, lambda1, lambda2, layers = 0.2, 0.2, 1e-3, 2
    # rank = min(U, I): the randomised SVD is then exact, so the reference can use the dense matrix itself
    model = _model(LightGCL, pairs, rank=NU, temperature=temp, cl_weight=lambda1, l2_weight=lambda2,
                   num_layers=layers)
    lv = _leaves(model)
    ours = model.training_loss(users, pos, neg)["loss"]

    r = _dense_r(pairs)
    adj = r / torch.sqrt(r.sum(1, keepdim=True)) / torch.sqrt(r.sum(0, keepdim=True))
    u, s, vh = torch.linalg.svd(adj, full_matrices=False)
    u_mul_s, v_mul_s, ut, vt = u * s, vh.T * s, u.T, vh
    e_u_list, e_i_list = [lv["user_embedding.weight"]], [lv["item_embedding.weight"]]
    g_u_list, g_i_list = [e_u_list[0]], [e_i_list[0]]
    for layer in range(1, layers + 1):
        e_u_list.append(adj @ e_i_list[layer - 1])
        e_i_list.append(adj.T @ e_u_list[layer - 1])
        g_u_list.append(u_mul_s @ (vt @ e_i_list[layer - 1]))
        g_i_list.append(v_mul_s @ (ut @ e_u_list[layer - 1]))
    g_u, g_i, e_u, e_i = sum(g_u_list), sum(g_i_list), sum(e_u_list), sum(e_i_list)
    uids, iids = users, torch.cat([pos, neg])
    neg_score = torch.log(torch.exp(g_u[uids] @ e_u.T / temp).sum(1) + 1e-8).mean()
    neg_score = neg_score + torch.log(torch.exp(g_i[iids] @ e_i.T / temp).sum(1) + 1e-8).mean()
    pos_score = (torch.clamp((g_u[uids] * e_u[uids]).sum(1) / temp, -5.0, 5.0)).mean() \
        + (torch.clamp((g_i[iids] * e_i[iids]).sum(1) / temp, -5.0, 5.0)).mean()
    loss_s = -pos_score + neg_score
    loss_r = -((e_u[users] * e_i[pos]).sum(-1) - (e_u[users] * e_i[neg]).sum(-1)).sigmoid().log().mean()
    loss_reg = lambda2 * sum(p.norm(2).square() for p in lv.values())
    ref = loss_r + lambda1 * loss_s + loss_reg
    _check(model, ours, ref, lv)


def test_lightgcl_contrastive_term_counts_duplicate_ids_like_the_official_code():
    """A user drawn twice weighs twice: the loss differs from the unique-id average on a batch with duplicates."""
    pairs = _pairs()
    model = _model(LightGCL, pairs, rank=3)
    users, pos, neg = torch.tensor([0, 0, 0, 1]), torch.tensor([pairs[0, 1]] * 3 + [pairs[pairs[:, 0] == 1][0, 1]]), \
        torch.tensor([1, 2, 3, 4])
    with torch.no_grad():
        dup = model.training_loss(users, pos, neg)["cl"]
        uniq = model.training_loss(torch.tensor([0, 1]), pos[[0, 3]], neg[[0, 3]])["cl"]
    assert not torch.isclose(dup, uniq)


@pytest.mark.parametrize("intents,adaptive", [(4, True), (1, True), (4, False)])
def test_dccf_loss_and_gradients_match_the_official_formulas(intents, adaptive):
    pairs = _pairs()
    users, pos, neg = _batch(pairs)
    temp, ssl, emb_reg, cen_reg, layers = 0.5, 0.1, 1e-2, 5e-3, 2
    model = _model(DCCF, pairs, num_intents=intents, temperature=temp, cl_weight=ssl, emb_weight=emb_reg,
                   cen_weight=cen_reg, num_layers=layers, adaptive_augmentation=adaptive)
    lv = _leaves(model)
    ours = model.training_loss(users, pos, neg)["loss"]

    a_hat = _a_hat(pairs)
    h, t = torch.nonzero(a_hat, as_tuple=True)  # all_h_list / all_t_list: both directions

    def adaptive_mask(x):
        head, tail = F.normalize(x[h]), F.normalize(x[t])
        alpha = ((head * tail).sum(1) + 1) / 2
        d_inv = torch.zeros(NU + NI, dtype=alpha.dtype).index_add(0, h, alpha).pow(-1).nan_to_num(0, 0, 0)
        m = torch.zeros(NU + NI, NU + NI, dtype=alpha.dtype)
        return m.index_put((h, t), d_inv[h] * alpha)

    uw, iw = lv["user_intent"], lv["item_intent"]
    all_emb = [torch.cat([lv["user_embedding.weight"], lv["item_embedding.weight"]])]
    gnn, inten, gaa, iaa = [], [], [], []
    for i in range(layers):
        g_layer = a_hat @ all_emb[i]
        ue, ie = all_emb[i][:NU], all_emb[i][NU:]
        int_layer = torch.cat([torch.softmax(ue @ uw, 1) @ uw.T, torch.softmax(ie @ iw, 1) @ iw.T])
        new = g_layer + int_layer + all_emb[i]
        gnn.append(g_layer), inten.append(int_layer)
        if adaptive:
            gaa.append(adaptive_mask(g_layer) @ all_emb[i])
            iaa.append(adaptive_mask(int_layer) @ all_emb[i])
            new = new + gaa[-1] + iaa[-1]
        all_emb.append(new)
    final = torch.stack(all_emb, 1).sum(1)
    ua, ia = final[:NU], final[NU:]
    mf = torch.mean(F.softplus((ua[users] * ia[neg]).sum(1) - (ua[users] * ia[pos]).sum(1)))
    e0u, e0i = lv["user_embedding.weight"], lv["item_embedding.weight"]
    emb = emb_reg * (e0u[users].norm(2).pow(2) + e0i[pos].norm(2).pow(2) + e0i[neg].norm(2).pow(2))
    cen = cen_reg * (uw.norm(2).pow(2) + iw.norm(2).pow(2))

    def cal_loss(e1, e2):
        pos_score = torch.exp(torch.sum(e1 * e2, 1) / temp)
        neg_score = torch.sum(torch.exp(e1 @ e2.T / temp), 1)
        return torch.sum(-torch.log(pos_score / (neg_score + 1e-8) + 1e-8)) / pos_score.shape[0]

    u_ids, i_ids = torch.unique(users), torch.unique(pos)
    cl = 0.0
    for i in range(layers):
        views = [inten[i]] + ([gaa[i], iaa[i]] if adaptive else [])
        for ids, offset in ((u_ids, 0), (i_ids, NU)):
            anchor = F.normalize(gnn[i][ids + offset])
            for v in views:
                cl = cl + cal_loss(anchor, F.normalize(v[ids + offset]))
    ref = mf + emb + cen + ssl * cl
    _check(model, ours, ref, lv)


def test_dccf_one_intent_contrast_is_log_n_with_zero_gradient():
    """The docstring's claim: with K = 1 every InfoNCE(Z, R) equals log N and its total gradient vanishes."""
    from lightning_ext.recsys.dccf import info_nce

    torch.manual_seed(0)
    z = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    c = torch.randn(4, 1, dtype=torch.float64, requires_grad=True)
    e = torch.randn(6, 4, dtype=torch.float64)
    r = torch.softmax(e @ c, 1) @ c.T
    loss = info_nce(z, r, 0.7)
    loss.backward()
    assert abs(float(loss.detach()) - np.log(6)) < 1e-12
    assert float(z.grad.abs().max()) < 1e-12 and float(c.grad.abs().max()) < 1e-12
