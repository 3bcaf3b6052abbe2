"""LightGCN (He et al., SIGIR 2020): linear propagation on the normalised user-item graph, mean over layers."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from lightning.pytorch.cli import OptimizerCallable

from lightning_ext.core.guards import NonFiniteLoss
from lightning_ext.core.validation import (
    NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, check_non_negative, check_number,
)
from lightning_ext.recsys.graph import SparseGraph, spmm
from lightning_ext.recsys.recommender import Init, Recommender, bpr_loss


def lightgcn_propagate(graph: SparseGraph, values: torch.Tensor, x: torch.Tensor, num_layers: int) -> torch.Tensor:
    """``mean_k Â^k x`` for ``k = 0..num_layers``: LightGCN's layer combination with ``α_k = 1/(K+1)``."""
    out, layer = x, x
    for _ in range(num_layers):
        layer = spmm(graph, values, layer)
        out = out + layer
    return out / (num_layers + 1)


class LightGCN(Recommender):
    """LightGCN (He et al., SIGIR 2020): E = mean_k Â^k E⁰ on the symmetric-normalised bipartite graph, trained with BPR.

    He, Deng, Wang, Li, Zhang and Wang, *LightGCN: Simplifying and Powering Graph Convolution Network for
    Recommendation*, SIGIR 2020. Reference code: github.com/gusye1234/LightGCN-PyTorch (defaults from its
    ``parse.py``: dim 64, 3 layers, Adam 1e-3, decay 1e-4, batch 2048, init N(0, 0.1)).

    Â = D^-1/2 A D^-1/2 on the (U+I)² graph of training interactions, no self-loops. Loss: mean BPR over the
    batch plus ``reg_weight · ½(||e_u⁰||² + ||e_i+⁰||² + ||e_i-⁰||²) / B`` on the batch's **layer-0**
    embeddings only (as in the PyTorch port). The propagation is a CSR sparse product whose backward reuses
    the precomputed transpose (:func:`lightning_ext.recsys.spmm`): the same code on CPU and CUDA. PyG's
    ``EdgeIndex`` sparse matmul (cached CSR/CSC) computes the same layer at about the same CPU cost, and PyG's
    ``examples/lightgcn.py`` loop (``LGConv`` re-normalising and scattering a raw ``edge_index`` every step)
    is several times slower; our kernel is kept because it is on par there and faster where the edge values
    need a gradient (DCCF). ``benchmarks/graph_propagation_speed.py`` measures all three.

    Args:
        num_layers: propagation layers K (0 is MF-BPR, see :class:`~lightning_ext.recsys.mf_bpr.MFBPR`).
        reg_weight: L2 weight on the batch's layer-0 embeddings (LightGCN's ``decay``).
        num_users, num_items, embedding_dim, lr, init, init_std, eval_ks, optimizer, nonfinite_loss: see
            :class:`~lightning_ext.recsys.recommender.Recommender`.

    Example:
        >>> from lightning_ext.recsys.interactions import Interactions
        >>> data = Interactions.from_pairs([[0, 0], [0, 1], [1, 1], [2, 3]])
        >>> model = LightGCN(num_layers=2, embedding_dim=8).bind(data)
        >>> users, items = model.propagate(); tuple(users.shape), tuple(items.shape)
        ((3, 8), (4, 8))
        >>> sorted(model.training_loss(torch.tensor([0]), torch.tensor([1]), torch.tensor([2])))
        ['bpr', 'loss', 'reg']
    """

    def __init__(self, num_layers: NonNegativeInt = 3, reg_weight: NonNegativeFloat = 1e-4,
                 num_users: Optional[PositiveInt] = None, num_items: Optional[PositiveInt] = None,
                 embedding_dim: PositiveInt = 64, lr: PositiveFloat = 1e-3, init: Init = "normal",
                 init_std: PositiveFloat = 0.1, eval_ks: Sequence[PositiveInt] = (10, 20, 40),
                 optimizer: Optional[OptimizerCallable] = None,
                 nonfinite_loss: NonFiniteLoss = "error") -> None:
        self.num_layers = check_number("num_layers", num_layers, low=0, integer=True)
        self.reg_weight = check_non_negative("reg_weight", reg_weight)
        super().__init__(num_users, num_items, embedding_dim, lr, init, init_std, eval_ks, optimizer,
                         nonfinite_loss)

    def prepare(self, data) -> None:
        if self.num_layers:
            self.build_graph(data)

    def propagate(self) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([self.user_embedding.weight, self.item_embedding.weight])
        if self.num_layers:
            x = lightgcn_propagate(self.graph, self.norm_values, x, self.num_layers)
        return x.split([self.num_users, self.num_items])

    def training_loss(self, users, pos, neg):
        user_emb, item_emb = self.propagate()
        bpr = bpr_loss(user_emb[users], item_emb[pos], item_emb[neg])
        e0 = (self.user_embedding(users), self.item_embedding(pos), self.item_embedding(neg))
        reg = self.reg_weight * 0.5 * sum(e.pow(2).sum() for e in e0) / len(users)
        return {"loss": bpr + reg, "bpr": bpr, "reg": reg}
