"""UltraGCN (Mao et al., CIKM 2021): MF trained with constraint losses that stand in for infinite-layer LightGCN."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable

from lightning_ext.core.guards import NonFiniteLoss
from lightning_ext.core.validation import (
    NonNegativeFloat, PositiveFloat, PositiveInt, check_non_negative, check_positive_int,
)
from lightning_ext.recsys.recommender import Init, Recommender


def ultragcn_betas(train: np.ndarray, num_users: int, num_items: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of β_ui = (1/d_u)·√((d_u+1)/(d_i+1)) = beta_u[u] · beta_i[i] (training-graph degrees)."""
    d_u = np.bincount(train[:, 0], minlength=num_users).astype(np.float64)
    d_i = np.bincount(train[:, 1], minlength=num_items).astype(np.float64)
    beta_u = np.sqrt(d_u + 1) / np.maximum(d_u, 1)
    beta_i = 1 / np.sqrt(d_i + 1)
    return torch.as_tensor(beta_u, dtype=torch.float32), torch.as_tensor(beta_i, dtype=torch.float32)


def item_item_constraints(train: np.ndarray, num_users: int, num_items: int, num_neighbors: int = 10,
                          zero_diagonal: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-K item neighbours S(i) and their weights ω_ij, as the official code computes them.

    G = RᵀR (item co-occurrence), g = row sums of G, ω_ij = G_ij · √(g_i+1)/g_i · 1/√(g_j+1) (the paper writes
    G_ij/(g_i − G_ii)·√(g_i/g_j)). The diagonal is kept unless ``zero_diagonal`` (the code's default keeps it, so
    an item is usually among its own neighbours). Rows with fewer than K co-occurring items are padded with
    weight 0. Returns ``neighbors (I, K)`` long and ``weights (I, K)`` float.
    """
    import scipy.sparse as sp

    r = sp.csr_matrix((np.ones(len(train)), (train[:, 0], train[:, 1])), shape=(num_users, num_items))
    g = (r.T @ r).tocsr()
    if zero_diagonal:
        g.setdiag(0)
        g.eliminate_zeros()
    g_sum = np.asarray(g.sum(axis=1)).ravel()
    row_f = np.sqrt(g_sum + 1) / np.maximum(g_sum, 1e-12)
    col_f = 1 / np.sqrt(g_sum + 1)
    g = g.tocoo()
    omega = sp.csr_matrix((g.data * row_f[g.row] * col_f[g.col], (g.row, g.col)), shape=g.shape)
    k = num_neighbors
    neighbors = np.zeros((num_items, k), dtype=np.int64)
    weights = np.zeros((num_items, k), dtype=np.float32)
    for i in range(num_items):
        start, end = omega.indptr[i], omega.indptr[i + 1]
        if start == end:
            continue
        vals, cols = omega.data[start:end], omega.indices[start:end]
        top = np.argsort(-vals, kind="stable")[:k]
        neighbors[i, : len(top)], weights[i, : len(top)] = cols[top], vals[top]
    return torch.as_tensor(neighbors), torch.as_tensor(weights)


class UltraGCN(Recommender):
    """UltraGCN (Mao et al., CIKM 2021): plain MF embeddings, weighted BCE with a degree constraint, and an item-item constraint loss.

    Mao, Zhu, Xiao, Liu, Dong and He, *UltraGCN: Ultra Simplification of Graph Convolutional Networks for
    Recommendation*, **CIKM 2021** (the official README says SIGIR 2020; it was CIKM). Reference code:
    github.com/xue-pai/UltraGCN (``main.py``, ``*_config.ini``). The loss is the code's, summed over the batch::

        L = Σ_b [ (w1 + w2·β_u,i+)·BCE(e_u·e_i+, 1) + negative_weight · mean_j (w3 + w4·β_u,j)·BCE(e_u·e_j, 0) ]
            + l2_weight · ½ Σ||θ||²  +  item_item_weight · L_I,
        L_I = −Σ_(u,i+) Σ_{j∈S(i+)} ω_i+j · log σ(e_u·e_j),

    with β_ui = (1/d_u)·√((d_u+1)/(d_i+1)), ``negative_num`` negatives per positive drawn uniformly from all
    items (**not** filtered against the user's positives, as ``sampling_sift_pos=no`` in the code), and S, ω
    from :func:`item_item_constraints`. Only the ``(user, positive)`` columns of the DataModule's triples are
    used.

    **Naming trap.** The paper's λ weights the constraint loss L_C (here folded into ``w2``/``w4``, as in the
    code) and its γ weights L_I. The code's ``lambda`` weights L_I and its ``gamma`` the L2 norm. To avoid
    both, the arguments are named for what they weight: ``item_item_weight`` (code ``lambda``, paper γ) and
    ``l2_weight`` (code ``gamma``).

    Defaults follow the Gowalla config (dim 64, init std 1e-4, lr 1e-4 there; batch 512, w = (1e-6, 1, 1e-6, 1),
    negative_weight 300, gamma 1e-4, lambda 5e-4, 10 neighbours) except ``negative_num`` (1500 there): 200 here,
    sized for small data; tune it on validation.

    Args:
        w1, w2, w3, w4: the code's positive/negative weight terms (finite, >= 0).
        negative_num: uniform negatives per positive.
        negative_weight: weight of the negative BCE term.
        l2_weight: L2 weight on all parameters (code ``gamma``).
        item_item_weight: weight of L_I (code ``lambda``, paper γ).
        num_neighbors: K of the item-item top-K (code ``ii_neighbor_num``).
        zero_diagonal: drop G_ii before the top-K (code ``ii_diagonal_zero``, default off).
        num_users, num_items, embedding_dim, lr, init, init_std, eval_ks, optimizer, nonfinite_loss: see
            :class:`~lightning_ext.recsys.recommender.Recommender`.

    Example:
        >>> from lightning_ext.recsys.interactions import Interactions
        >>> data = Interactions.from_pairs([[0, 0], [0, 1], [1, 1], [2, 3]])
        >>> model = UltraGCN(negative_num=5, num_neighbors=2).bind(data)
        >>> sorted(model.training_loss(torch.tensor([0, 1]), torch.tensor([1, 1]), torch.tensor([2, 2])))
        ['constraint', 'item_item', 'l2', 'loss']
    """

    def __init__(self, w1: NonNegativeFloat = 1e-6, w2: NonNegativeFloat = 1.0, w3: NonNegativeFloat = 1e-6,
                 w4: NonNegativeFloat = 1.0, negative_num: PositiveInt = 200, negative_weight: NonNegativeFloat = 300.0,
                 l2_weight: NonNegativeFloat = 1e-4, item_item_weight: NonNegativeFloat = 5e-4,
                 num_neighbors: PositiveInt = 10, zero_diagonal: bool = False, num_users: Optional[PositiveInt] = None,
                 num_items: Optional[PositiveInt] = None, embedding_dim: PositiveInt = 64, lr: PositiveFloat = 1e-3,
                 init: Init = "normal", init_std: PositiveFloat = 1e-4, eval_ks: Sequence[PositiveInt] = (10, 20, 40),
                 optimizer: Optional[OptimizerCallable] = None,
                 nonfinite_loss: NonFiniteLoss = "error") -> None:
        check_positive_int("negative_num", negative_num)
        check_positive_int("num_neighbors", num_neighbors)
        for name, v in (("w1", w1), ("w2", w2), ("w3", w3), ("w4", w4), ("negative_weight", negative_weight),
                        ("l2_weight", l2_weight), ("item_item_weight", item_item_weight)):
            check_non_negative(name, v)
        self.w = (w1, w2, w3, w4)
        self.negative_num, self.negative_weight = negative_num, negative_weight
        self.l2_weight, self.item_item_weight = l2_weight, item_item_weight
        self.num_neighbors, self.zero_diagonal = num_neighbors, zero_diagonal
        super().__init__(num_users, num_items, embedding_dim, lr, init, init_std, eval_ks, optimizer,
                         nonfinite_loss)

    def prepare(self, data) -> None:
        beta_u, beta_i = ultragcn_betas(data.train, data.num_users, data.num_items)
        neighbors, weights = item_item_constraints(data.train, data.num_users, data.num_items,
                                                   self.num_neighbors, self.zero_diagonal)
        self.register_buffer("beta_u", beta_u, persistent=False)
        self.register_buffer("beta_i", beta_i, persistent=False)
        self.register_buffer("ii_neighbors", neighbors, persistent=False)
        self.register_buffer("ii_weights", weights, persistent=False)

    def training_loss(self, users, pos, neg=None):
        w1, w2, w3, w4 = self.w
        user = self.user_embedding(users)
        negatives = torch.randint(self.num_items, (len(users), self.negative_num), device=users.device)
        pos_scores = (user * self.item_embedding(pos)).sum(-1)
        neg_scores = torch.einsum("bd,bnd->bn", user, self.item_embedding(negatives))
        pos_w = w1 + w2 * self.beta_u[users] * self.beta_i[pos]
        neg_w = w3 + w4 * self.beta_u[users, None] * self.beta_i[negatives]
        pos_loss = F.binary_cross_entropy_with_logits(pos_scores, torch.ones_like(pos_scores), weight=pos_w,
                                                      reduction="none")
        neg_loss = F.binary_cross_entropy_with_logits(neg_scores, torch.zeros_like(neg_scores), weight=neg_w,
                                                      reduction="none").mean(-1)
        constraint = (pos_loss + self.negative_weight * neg_loss).sum()
        l2 = self.l2_weight * 0.5 * self.squared_norm()
        nbr = self.item_embedding(self.ii_neighbors[pos])  # (B, K, d)
        item_item = -(self.ii_weights[pos] * F.logsigmoid(torch.einsum("bd,bkd->bk", user, nbr))).sum()
        item_item = self.item_item_weight * item_item
        return {"loss": constraint + l2 + item_item, "constraint": constraint, "l2": l2, "item_item": item_item}
