"""LightGCL (Cai et al., ICLR 2023): graph contrastive learning against a low-rank SVD view of the graph."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from lightning.pytorch.cli import OptimizerCallable

from lightning_ext.core.guards import NonFiniteLoss
from lightning_ext.core.validation import (
    NonNegativeFloat, PositiveFloat, PositiveInt, check_non_negative, check_positive, check_positive_int,
)
from lightning_ext.recsys.graph import spmm
from lightning_ext.recsys.recommender import Init, Recommender


def svd_view(user_item: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U_q S_q, V_q S_q, U_qᵀ, V_qᵀ)`` of ``torch.svd_lowrank(user_item, q=rank)`` (randomised; seed first)."""
    u, s, v = torch.svd_lowrank(user_item, q=rank)
    return u * s, v * s, u.T.contiguous(), v.T.contiguous()


def info_nce_unnormalized(anchor: torch.Tensor, positives: torch.Tensor, candidates: torch.Tensor,
                          temperature: float) -> torch.Tensor:
    """LightGCL's InfoNCE: ``mean(−clamp(a·p/τ, −5, 5) + log Σ_all exp(a·c/τ))``, no L2 normalisation."""
    pos = ((anchor * positives).sum(-1) / temperature).clamp(-5.0, 5.0)
    neg = torch.logsumexp(anchor @ candidates.T / temperature, dim=1)
    return (neg - pos).mean()


class LightGCL(Recommender):
    """LightGCL (Cai et al., ICLR 2023): LightGCN-style propagation plus InfoNCE between the graph view and its rank-q SVD view.

    Cai, Huang, Xia and Ren, *LightGCL: Simple Yet Effective Graph Contrastive Learning for Recommendation*,
    ICLR 2023. Reference code: github.com/HKUDS/LightGCL (``model.py``, ``parser.py``).

    As in the code: Â is the U x I matrix with entries 1/√(d_u d_i); per layer Z_u = Â E_i, Z_i = Âᵀ E_u (no
    nonlinearity), E^l = Z^l; the SVD view G_u^l = U_q S_q V_qᵀ E_i^{l−1} and G_i^l = V_q S_q U_qᵀ E_u^{l−1}
    reads the **main view's** previous layer; readouts are **sums** over l = 0..L (G⁰ = E⁰). The contrastive
    loss (:func:`info_nce_unnormalized`) has **no** L2 normalisation (the paper writes cosine), clamps the
    positive logit to [−5, 5] and takes negatives over **all** users / items. Its anchors are the batch's users
    and the concatenation of its positive and negative items **with duplicates** (the code's ``uids`` and
    ``iids = cat(pos, neg)``), so a user or item drawn twice counts twice in the mean. Total:
    BPR + λ1·L_s + λ2·Σ||θ||².

    Defaults from ``parser.py``: d 64, L 2, q 5, τ 0.2, λ1 0.2, λ2 1e-7, lr 1e-3, xavier-uniform init, edge
    dropout 0 (not implemented). LightGCL's published numbers use HKUDS splits, not LightGCN's.

    Args:
        num_layers: L.
        rank: q of the SVD.
        temperature: τ.
        cl_weight: λ1 (0 turns LightGCL into a sum-readout LightGCN: the ablation of the contrastive term).
        l2_weight: λ2.
        num_users, num_items, embedding_dim, lr, init, init_std, eval_ks, optimizer, nonfinite_loss: see
            :class:`~lightning_ext.recsys.recommender.Recommender`.

    Example:
        >>> from lightning_ext.recsys.interactions import Interactions
        >>> data = Interactions.from_pairs([[0, 0], [0, 1], [1, 1], [2, 3]])
        >>> model = LightGCL(rank=2, embedding_dim=8).bind(data)
        >>> sorted(model.training_loss(torch.tensor([0]), torch.tensor([1]), torch.tensor([2])))
        ['bpr', 'cl', 'l2', 'loss']
    """

    def __init__(self, num_layers: PositiveInt = 2, rank: PositiveInt = 5, temperature: PositiveFloat = 0.2,
                 cl_weight: NonNegativeFloat = 0.2, l2_weight: NonNegativeFloat = 1e-7,
                 num_users: Optional[PositiveInt] = None, num_items: Optional[PositiveInt] = None,
                 embedding_dim: PositiveInt = 64, lr: PositiveFloat = 1e-3, init: Init = "xavier_uniform",
                 init_std: PositiveFloat = 0.1, eval_ks: Sequence[PositiveInt] = (10, 20, 40),
                 optimizer: Optional[OptimizerCallable] = None,
                 nonfinite_loss: NonFiniteLoss = "error") -> None:
        check_positive_int("num_layers", num_layers)
        check_positive_int("rank", rank)
        check_positive("temperature", temperature)
        check_non_negative("cl_weight", cl_weight)
        check_non_negative("l2_weight", l2_weight)
        self.num_layers, self.rank, self.temperature = num_layers, rank, temperature
        self.cl_weight, self.l2_weight = cl_weight, l2_weight
        super().__init__(num_users, num_items, embedding_dim, lr, init, init_std, eval_ks, optimizer,
                         nonfinite_loss)

    def prepare(self, data) -> None:
        values = self.build_graph(data)
        # the U x I block of the bipartite Â is LightGCL's normalised user-item matrix
        n_u = data.num_users
        block = self.graph.row < n_u
        user_item = torch.sparse_coo_tensor(
            torch.stack([self.graph.row[block], self.graph.col[block] - n_u]), values[block],
            (data.num_users, data.num_items), check_invariants=False).coalesce()
        rank = min(self.rank, data.num_users, data.num_items)
        for name, tensor in zip(("u_mul_s", "v_mul_s", "ut", "vt"), svd_view(user_item, rank)):
            self.register_buffer(name, tensor, persistent=False)

    def _views(self):
        n_u = self.num_users
        e_u, e_i = self.user_embedding.weight, self.item_embedding.weight
        sum_e_u, sum_e_i, sum_g_u, sum_g_i = e_u, e_i, e_u, e_i
        for _ in range(self.num_layers):
            z = spmm(self.graph, self.norm_values, torch.cat([e_u, e_i]))  # [Â E_i ; Âᵀ E_u]
            g_u = self.u_mul_s @ (self.vt @ e_i)
            g_i = self.v_mul_s @ (self.ut @ e_u)
            e_u, e_i = z[:n_u], z[n_u:]
            sum_e_u, sum_e_i = sum_e_u + e_u, sum_e_i + e_i
            sum_g_u, sum_g_i = sum_g_u + g_u, sum_g_i + g_i
        return sum_e_u, sum_e_i, sum_g_u, sum_g_i

    def propagate(self):
        e_u, e_i, _, _ = self._views()
        return e_u, e_i

    def training_loss(self, users, pos, neg):
        e_u, e_i, g_u, g_i = self._views()
        u = e_u[users]
        bpr = -torch.nn.functional.logsigmoid((u * e_i[pos]).sum(-1) - (u * e_i[neg]).sum(-1)).mean()
        loss = bpr
        parts = {"bpr": bpr}
        if self.cl_weight > 0:
            uids, iids = users, torch.cat([pos, neg])  # with duplicates, as the official code averages
            cl = (info_nce_unnormalized(g_u[uids], e_u[uids], e_u, self.temperature)
                  + info_nce_unnormalized(g_i[iids], e_i[iids], e_i, self.temperature))
            loss = loss + self.cl_weight * cl
            parts["cl"] = cl
        else:
            parts["cl"] = bpr.new_zeros(())
        l2 = self.l2_weight * self.squared_norm()
        parts["l2"] = l2
        return {"loss": loss + l2, **parts}
