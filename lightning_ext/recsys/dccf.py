"""DCCF (Ren et al., SIGIR 2023): disentangled intents and adaptive graph augmentation, contrasted per layer."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import nn

from lightning_ext.core.guards import NonFiniteLoss
from lightning_ext.core.validation import (
    NonNegativeFloat, PositiveFloat, PositiveInt, check_non_negative, check_positive, check_positive_int,
)
from lightning_ext.recsys.graph import SparseGraph, spmm
from lightning_ext.recsys.recommender import Init, Recommender, bpr_loss


def adaptive_edge_values(graph: SparseGraph, x: torch.Tensor) -> torch.Tensor:
    """DCCF's learned augmentation: α_ht = (cos(x_h, x_t) + 1)/2 on every edge, then row-normalised (Σ_t = 1)."""
    x = F.normalize(x, dim=1)
    alpha = ((x.index_select(0, graph.row) * x.index_select(0, graph.col)).sum(-1) + 1) / 2
    row_sum = torch.zeros(graph.shape[0], dtype=alpha.dtype, device=alpha.device).index_add_(0, graph.row, alpha)
    return alpha / row_sum.clamp(min=1e-12).index_select(0, graph.row)


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """In-batch InfoNCE on L2-normalised rows: ``mean_r −log softmax(a_r·B/τ)[r]``."""
    a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
    logits = a @ b.T / temperature
    return F.cross_entropy(logits, torch.arange(len(a), device=a.device))


class DCCF(Recommender):
    """DCCF (Ren et al., SIGIR 2023): per layer E^{l+1} = Z + R + H^β + H^γ + E^l, BPR plus InfoNCE between the views; E = Σ_l E^l.

    Ren, Xia, Zhao, Yin and Huang, *Disentangled Contrastive Collaborative Filtering*, SIGIR 2023. Reference
    code: github.com/HKUDS/DCCF (``model.py``; its ``torch_sparse`` products are CSR products here). Per layer:
    Z = D^-1/2 A D^-1/2 E (graph view); R = softmax(E C) Cᵀ with K learnable intent prototypes per side (intent
    view); H^β and H^γ propagate E over the training graph re-weighted by :func:`adaptive_edge_values` of Z and
    of R (adaptive augmentation, differentiable in the weights). Loss: mean BPR on the final embeddings,
    ``emb_weight · Σ||e⁰||²`` over the batch (a sum, as in the code), ``cen_weight · (||C_u||² + ||C_i||²)``,
    and ``cl_weight · Σ_layers`` InfoNCE(Z, R) + InfoNCE(Z, H^β) + InfoNCE(Z, H^γ) on the batch's unique users
    and unique positive items (normalised, in-batch negatives, temperature τ). The weights are the code's
    ``ssl_reg``, ``emb_reg`` and ``cen_reg``, named here as every loss weight is (``<term>_weight``).

    Defaults from ``utility/parser.py``: d 32, 2 layers, K 128, τ 1.0, ssl_reg 0.1, emb_reg 2.5e-5, cen_reg
    5e-3, lr 1e-3, xavier-normal init (batch 10,240 is the DataModule's). The paper reports the final epoch (no
    early stopping) on HKUDS splits.

    Ablations: ``num_intents=1`` (one intent) and ``adaptive_augmentation=False`` (H^β = H^γ = 0, and their
    InfoNCE terms dropped). With one intent, softmax over one column is 1, so every row of R is the same
    prototype c: each InfoNCE(Z, R) has equal logits in every row and equals log N exactly (N = unique ids),
    with zero total gradient; H^γ's edge weights become 1/deg (a fixed, not learned, graph). The one-intent
    ablation therefore removes 2 of the 6 contrastive terms per layer (users and items of InfoNCE(Z, R)) and
    the adaptivity of H^γ, not only the intents.

    Args:
        num_layers: layers.
        num_intents: K prototypes per side.
        temperature: τ of InfoNCE.
        cl_weight: weight of the contrastive terms (code ``ssl_reg``).
        emb_weight: weight of the layer-0 embedding norm (code ``emb_reg``).
        cen_weight: weight of the prototype norm (code ``cen_reg``).
        adaptive_augmentation: use H^β and H^γ.
        num_users, num_items, embedding_dim, lr, init, init_std, eval_ks, optimizer, nonfinite_loss: see
            :class:`~lightning_ext.recsys.recommender.Recommender`.

    Example:
        >>> from lightning_ext.recsys.interactions import Interactions
        >>> data = Interactions.from_pairs([[0, 0], [0, 1], [1, 1], [2, 3]])
        >>> model = DCCF(num_intents=4, embedding_dim=8).bind(data)
        >>> sorted(model.training_loss(torch.tensor([0, 1]), torch.tensor([1, 1]), torch.tensor([2, 3])))
        ['bpr', 'cen', 'cl', 'emb', 'loss']
    """

    def __init__(self, num_layers: PositiveInt = 2, num_intents: PositiveInt = 128, temperature: PositiveFloat = 1.0,
                 cl_weight: NonNegativeFloat = 0.1, emb_weight: NonNegativeFloat = 2.5e-5,
                 cen_weight: NonNegativeFloat = 5e-3, adaptive_augmentation: bool = True,
                 num_users: Optional[PositiveInt] = None, num_items: Optional[PositiveInt] = None,
                 embedding_dim: PositiveInt = 32, lr: PositiveFloat = 1e-3, init: Init = "xavier_normal",
                 init_std: PositiveFloat = 0.1, eval_ks: Sequence[PositiveInt] = (10, 20, 40),
                 optimizer: Optional[OptimizerCallable] = None,
                 nonfinite_loss: NonFiniteLoss = "error") -> None:
        check_positive_int("num_layers", num_layers)
        check_positive_int("num_intents", num_intents)
        check_positive("temperature", temperature)
        for name, v in (("cl_weight", cl_weight), ("emb_weight", emb_weight), ("cen_weight", cen_weight)):
            check_non_negative(name, v)
        self.num_layers, self.num_intents, self.temperature = num_layers, num_intents, temperature
        self.cl_weight, self.emb_weight, self.cen_weight = cl_weight, emb_weight, cen_weight
        self.adaptive_augmentation = adaptive_augmentation
        super().__init__(num_users, num_items, embedding_dim, lr, init, init_std, eval_ks, optimizer,
                         nonfinite_loss)

    def build_extra(self) -> None:
        self.user_intent = nn.Parameter(nn.init.xavier_normal_(torch.empty(self.embedding_dim, self.num_intents)))
        self.item_intent = nn.Parameter(nn.init.xavier_normal_(torch.empty(self.embedding_dim, self.num_intents)))

    def prepare(self, data) -> None:
        self.build_graph(data)

    def _layers(self):
        n_u = self.num_users
        e = torch.cat([self.user_embedding.weight, self.item_embedding.weight])
        total, views = e, []
        for _ in range(self.num_layers):
            z = spmm(self.graph, self.norm_values, e)
            r = torch.cat([torch.softmax(e[:n_u] @ self.user_intent, 1) @ self.user_intent.T,
                           torch.softmax(e[n_u:] @ self.item_intent, 1) @ self.item_intent.T])
            layer = {"z": z, "r": r}
            new = z + r + e
            if self.adaptive_augmentation:
                layer["h_beta"] = spmm(self.graph, adaptive_edge_values(self.graph, z), e)
                layer["h_gamma"] = spmm(self.graph, adaptive_edge_values(self.graph, r), e)
                new = new + layer["h_beta"] + layer["h_gamma"]
            views.append(layer)
            e = new
            total = total + e
        return total, views

    def propagate(self):
        total, _ = self._layers()
        return total.split([self.num_users, self.num_items])

    def training_loss(self, users, pos, neg):
        total, views = self._layers()
        user_emb, item_emb = total.split([self.num_users, self.num_items])
        bpr = bpr_loss(user_emb[users], item_emb[pos], item_emb[neg])
        e0 = (self.user_embedding(users), self.item_embedding(pos), self.item_embedding(neg))
        emb = self.emb_weight * sum(x.pow(2).sum() for x in e0)
        cen = self.cen_weight * (self.user_intent.pow(2).sum() + self.item_intent.pow(2).sum())
        uids, iids = torch.unique(users), torch.unique(pos) + self.num_users
        cl = bpr.new_zeros(())
        for layer in views:
            for key in ("r", "h_beta", "h_gamma"):
                if key in layer:
                    for ids in (uids, iids):
                        cl = cl + info_nce(layer["z"][ids], layer[key][ids], self.temperature)
        cl = self.cl_weight * cl
        return {"loss": bpr + emb + cen + cl, "bpr": bpr, "emb": emb, "cen": cen, "cl": cl}
