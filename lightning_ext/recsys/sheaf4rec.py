"""Sheaf4Rec (Purificato et al., 2023): sheaf diffusion with learned per-edge restriction maps on the user-item graph."""

from __future__ import annotations

from typing import Literal, Optional, Sequence, get_args

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import nn

from lightning_ext.core.guards import NonFiniteLoss
from lightning_ext.core.validation import (
    NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, check_choice, check_non_negative, check_number,
    check_positive,
)
from lightning_ext.recsys.graph import SparseGraph, spmm
from lightning_ext.recsys.recommender import Init, Recommender, bpr_loss

#: how the layer embeddings are combined: ``"mean"`` (arXiv v1 code) or ``"concat"`` (final official code)
Readout = Literal["mean", "concat"]


def reverse_edge_index(graph: SparseGraph) -> torch.Tensor:
    """For every edge ``e = (u, v)`` of a symmetric graph, the index of ``(v, u)`` (vectorised, no Python loop)."""
    n = graph.shape[1]
    keys = graph.row * n + graph.col  # sorted: CSR order
    rev = graph.col * n + graph.row
    idx = torch.searchsorted(keys, rev).clamp(max=max(len(keys) - 1, 0))
    if len(keys) and not torch.equal(keys[idx], rev):
        raise ValueError("sheaf diffusion needs a symmetric graph: some edge (u, v) has no reverse edge (v, u).")
    return idx


class SheafConv(nn.Module):
    """One sheaf diffusion layer with 1-D stalks: ``x ← x − step · L_F (W x + b)``.

    The restriction map of the directed edge ``e = (u → v)`` is ``F_e = tanh(w · [x_u ‖ x_v])`` (``w`` without
    bias), recomputed from the layer input. With ``d_v = Σ_{e: row=v} F_e²`` the normalised sheaf Laplacian has
    off-diagonal entries ``−F_{u→v} F_{v→u} / √((d_u+1)(d_v+1))`` and diagonal ``d_v / (d_v+1)``.

    Args:
        dim: embedding size.
        step_size: diffusion step (official 1.0).

    Example:
        >>> g = SparseGraph([0, 1, 1, 2], [1, 0, 2, 1], (3, 3))
        >>> conv = SheafConv(4)
        >>> conv(torch.randn(3, 4), g, reverse_edge_index(g)).shape
        torch.Size([3, 4])
    """

    def __init__(self, dim: int, step_size: float = 1.0) -> None:
        super().__init__()
        self.step_size = step_size
        self.linear = nn.Linear(dim, dim)
        self.sheaf_learner = nn.Linear(2 * dim, 1, bias=False)

    def laplacian(self, x: torch.Tensor, graph: SparseGraph, reverse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(off_diagonal_edge_values (E,), diagonal (N,))`` of the normalised sheaf Laplacian at ``x``."""
        # w · [x_u ‖ x_v] = (x w_left)_u + (x w_right)_v: project the nodes once, then gather scalars per edge
        dim = x.shape[1]
        weight = self.sheaf_learner.weight
        left, right = x @ weight[0, :dim], x @ weight[0, dim:]
        maps = torch.tanh(left.index_select(0, graph.row) + right.index_select(0, graph.col))
        d = torch.zeros(graph.shape[0], dtype=x.dtype, device=x.device).index_add(0, graph.row, maps.pow(2))
        d_sqrt_inv = (d + 1).pow(-0.5)
        off = -maps * maps.index_select(0, reverse) * d_sqrt_inv.index_select(0, graph.row) \
            * d_sqrt_inv.index_select(0, graph.col)
        return off, d / (d + 1)

    def forward(self, x: torch.Tensor, graph: SparseGraph, reverse: torch.Tensor) -> torch.Tensor:
        off, diag = self.laplacian(x, graph, reverse)
        y = self.linear(x)
        return x - self.step_size * (spmm(graph, off, y) + diag[:, None] * y)


class Sheaf4Rec(Recommender):
    """Sheaf4Rec (Purificato et al., 2023): sheaf diffusion layers with learned per-edge restriction maps on the user-item graph, BPR.

    Purificato, Cassarà, Liò and Silvestri, *Sheaf Neural Networks for Graph-based Recommender Systems*,
    arXiv 2304.09097 (v1 2023; later ACM TORS). Reference code: github.com/antoniopurificato/Sheaf4Rec
    (``models.py::SheafConvLayer``, ``train.py``).

    Each of the ``num_layers`` :class:`SheafConv` layers computes ``x ← x − step · L_F (W x + b)`` on the
    (U+I)² graph of training interactions, where ``L_F`` is the normalised sheaf Laplacian of scalar restriction
    maps ``F_{u→v} = tanh(w · [x_u ‖ x_v])``. Readout: ``"concat"`` of the ``L + 1`` layer embeddings (the final
    official code, commit 2cd476f: a score is ``Σ_l <e_u^l, e_i^l>``) or their ``"mean"`` (the arXiv-v1 code).
    Loss: mean BPR on the readout plus ``reg_weight · ½(||e_u⁰||² + ||e_i+⁰||² + ||e_i-⁰||²) / B`` on the
    batch's layer-0 rows; the official code uses weight 1 (its ``DECAY = 1e-4`` is never used), the default here.
    The official code's fixed ``num_nodes`` is read from the data, and the reverse-edge index is vectorised.

    Args:
        num_layers: sheaf diffusion layers (official ``run_exps.sh``: 5).
        readout: ``"concat"`` (final code) or ``"mean"`` (v1).
        step_size: diffusion step (official 1.0).
        reg_weight: L2 weight on the batch's layer-0 embeddings.
        num_users, num_items, embedding_dim, lr, init, init_std, eval_ks, optimizer, nonfinite_loss: see
            :class:`~lightning_ext.recsys.recommender.Recommender`.

    Example:
        >>> from lightning_ext.recsys.interactions import Interactions
        >>> data = Interactions.from_pairs([[0, 0], [0, 1], [1, 1], [2, 3]])
        >>> model = Sheaf4Rec(num_layers=2, embedding_dim=8).bind(data)
        >>> users, items = model.propagate(); tuple(users.shape), tuple(items.shape)
        ((3, 24), (4, 24))
        >>> sorted(model.training_loss(torch.tensor([0]), torch.tensor([1]), torch.tensor([2])))
        ['bpr', 'loss', 'reg']
    """

    def __init__(self, num_layers: NonNegativeInt = 5, readout: Readout = "concat", step_size: PositiveFloat = 1.0,
                 reg_weight: NonNegativeFloat = 1.0, num_users: Optional[PositiveInt] = None,
                 num_items: Optional[PositiveInt] = None, embedding_dim: PositiveInt = 64, lr: PositiveFloat = 1e-3,
                 init: Init = "normal", init_std: PositiveFloat = 0.1, eval_ks: Sequence[PositiveInt] = (10, 20, 40),
                 optimizer: Optional[OptimizerCallable] = None, nonfinite_loss: NonFiniteLoss = "error") -> None:
        self.num_layers = check_number("num_layers", num_layers, low=0, integer=True)
        check_choice("readout", readout, get_args(Readout))
        self.readout = readout
        self.step_size = check_positive("step_size", step_size)
        self.reg_weight = check_non_negative("reg_weight", reg_weight)
        super().__init__(num_users, num_items, embedding_dim, lr, init, init_std, eval_ks, optimizer, nonfinite_loss)

    def build_extra(self) -> None:
        self.convs = nn.ModuleList(SheafConv(self.embedding_dim, self.step_size) for _ in range(self.num_layers))

    def prepare(self, data) -> None:
        self.graph = data.graph()
        self.register_buffer("reverse", reverse_edge_index(self.graph), persistent=False)

    def propagate(self) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([self.user_embedding.weight, self.item_embedding.weight])
        layers = [x]
        for conv in self.convs:
            x = conv(x, self.graph, self.reverse)
            layers.append(x)
        out = torch.cat(layers, dim=-1) if self.readout == "concat" else torch.stack(layers).mean(0)
        return out.split([self.num_users, self.num_items])

    def training_loss(self, users, pos, neg):
        user_emb, item_emb = self.propagate()
        bpr = bpr_loss(user_emb[users], item_emb[pos], item_emb[neg])
        e0 = (self.user_embedding(users), self.item_embedding(pos), self.item_embedding(neg))
        reg = self.reg_weight * 0.5 * sum(e.pow(2).sum() for e in e0) / len(users)
        return {"loss": bpr + reg, "bpr": bpr, "reg": reg}
