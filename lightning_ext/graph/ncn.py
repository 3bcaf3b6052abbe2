"""``NCN``: Neural Common Neighbor link prediction (Wang, Yang and Zhang, ICLR 2024), pure core and module.

The pure core is :func:`common_neighbors` (the pairs (t, u), u ∈ N(i_t) ∩ N(j_t), read from a sparse CSR
adjacency for every target at once), :func:`aggregate` and :class:`NCNPredictor` (an ``nn.Module`` scoring targets from node embeddings
and the adjacency); :class:`NCN` is the LightningModule (the training loop of
:class:`~lightning_ext.graph.gae.GAELinkPredictor` with this predictor).
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
from torch import nn

from lightning_ext.core.guards import NonFiniteLoss
from lightning_ext.core.validation import (
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    UnitIntervalRightOpen,
    check_number,
)
from lightning_ext.graph.gae import GAELinkPredictor, adjacency, neighbor_pairs


def common_neighbors(adj: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index pairs ``(t, u)`` with u ∈ N(i_t) ∩ N(j_t), for ``targets = [[i...], [j...]]``.

    ``adj`` is the binary sparse CSR adjacency of :func:`~lightning_ext.graph.gae.adjacency`; each end's neighbour
    list is read from the CSR row pointers and the two are intersected per target (``torch.isin`` on
    ``t * n + u`` keys), all targets at once. :func:`aggregate` then sums embeddings over them.

    Example:
        >>> from lightning_ext.graph.gae import adjacency
        >>> adj = adjacency(torch.tensor([[0, 2, 1, 2, 0, 3], [2, 0, 2, 1, 3, 0]]), 4)
        >>> t, u = common_neighbors(adj, torch.tensor([[0, 0], [1, 2]]))  # N(0) ∩ N(1) = {2}, N(0) ∩ N(2) = {}
        >>> t.tolist(), u.tolist()
        ([0], [2])
    """
    n = adj.size(1)
    ti, ui = neighbor_pairs(adj, targets[0])
    tj, uj = neighbor_pairs(adj, targets[1])
    both = torch.isin(ti * n + ui, tj * n + uj)
    return ti[both], ui[both]


def aggregate(t: torch.Tensor, u: torch.Tensor, h: torch.Tensor, num_targets: int,
              weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``(num_targets, d)`` sums Σ_{(t, u)} w_tu h_u (w = 1 without ``weight``)."""
    values = h[u] if weight is None else h[u] * weight.unsqueeze(-1)
    return torch.zeros(num_targets, h.size(1), dtype=h.dtype, device=h.device).index_add(0, t, values)


def _mlp_head(in_dim: int, hidden: int, dropout: float, layer_norm: bool, tail_activation: bool) -> nn.Sequential:
    # Linear, LN, dropout, ReLU, and a closing Linear unless the tail ends on the activation (NCN's --tailact)
    layers = [nn.Linear(in_dim, hidden), nn.LayerNorm(hidden) if layer_norm else nn.Identity(), nn.Dropout(dropout),
              nn.ReLU()]
    return nn.Sequential(*layers, *([] if tail_activation else [nn.Linear(hidden, hidden)]))


class NCNPredictor(nn.Module):
    """s_ij = lin(β · MLP_cn(Σ_{u ∈ N(i)∩N(j)} x̃_u) + MLP_ij(h_i ⊙ h_j)), x̃ = h + MLP_x(h) (``use_xlin``).

    The official ``CNLinkPredictor`` (``xcnlin``, ``xijlin``, ``lin``, ``xlin``, learnable ``beta``) in its
    Planetoid configuration (``--ln --lnnn --use_xlin --tailact``).

    Args:
        hidden: embedding size.
        dropout: dropout inside the MLPs.
        layer_norm: LayerNorm inside the MLPs.
        use_xlin: add ``MLP_x(h)`` to the embeddings summed over common neighbours.
        tail_activation: end MLP_cn and MLP_ij on the ReLU (no closing Linear).
        beta: initial weight of the common-neighbour term (learnable).
    """

    def __init__(self, hidden: int, dropout: float = 0.05, layer_norm: bool = True, use_xlin: bool = True,
                 tail_activation: bool = True, beta: float = 1.0) -> None:
        super().__init__()
        ln = (lambda: nn.LayerNorm(hidden)) if layer_norm else nn.Identity
        self.xlin = nn.Sequential(nn.Linear(hidden, hidden), nn.Dropout(dropout), nn.ReLU(),
                                  nn.Linear(hidden, hidden), ln(), nn.Dropout(dropout), nn.ReLU()) if use_xlin else None
        self.xcnlin = nn.Sequential(nn.Linear(hidden, hidden), nn.Dropout(dropout), nn.ReLU(),
                                    *_mlp_head(hidden, hidden, dropout, layer_norm, tail_activation))
        self.xijlin = _mlp_head(hidden, hidden, dropout, layer_norm, tail_activation)
        self.lin = nn.Sequential(nn.Linear(hidden, hidden), ln(), nn.Dropout(dropout), nn.ReLU(),
                                 nn.Linear(hidden, 1))
        self.beta = nn.Parameter(torch.tensor([float(beta)]))

    def cn_inputs(self, h: torch.Tensor) -> torch.Tensor:
        """The embeddings summed over common neighbours: h + MLP_x(h) (or h)."""
        return h if self.xlin is None else h + self.xlin(h)

    def combine(self, h: torch.Tensor, targets: torch.Tensor, cn_sum: torch.Tensor) -> torch.Tensor:
        """Logits ``(T,)`` from the pair term h_i ⊙ h_j and the aggregated common neighbours ``cn_sum``."""
        xij = self.xijlin(h[targets[0]] * h[targets[1]])
        return self.lin(self.xcnlin(cn_sum) * self.beta + xij).squeeze(-1)

    def forward(self, h: torch.Tensor, adj: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Logits ``(T,)`` of ``targets`` ``(2, T)`` given embeddings ``h`` and the binary sparse adjacency."""
        t, u = common_neighbors(adj, targets)
        cn_sum = aggregate(t, u, self.cn_inputs(h), targets.size(1))
        return self.combine(h, targets, cn_sum)


class NCN(GAELinkPredictor):
    """Neural Common Neighbor (Wang, Yang and Zhang, ICLR 2024): GNN embeddings of the common neighbours.

    Paper: https://arxiv.org/abs/2302.00890 ; reference code: https://github.com/GraphPKU/NeuralCommonNeighbor .
    With h = GNN(X, A), the logit of edge (i, j) is
    s_ij = lin(β · MLP_cn(Σ_{u ∈ N(i)∩N(j)} h_u) + MLP_ij(h_i ⊙ h_j)) (:class:`NCNPredictor`), trained with BCE
    against uniform random negatives with the batch's positive edges removed from the input graph (target link
    removal). Common neighbours come from the sparse CSR adjacency of the message-passing graph (full batch). Defaults
    are the official Cora command line: a 1-layer weight-free GCN ("puregcn") after a linear input layer, hidden
    256, input dropout 0.7, dropout 0.05, encoder lr 0.0043, predictor lr 0.0024, LayerNorm, ``use_xlin``,
    tail activation.

    Args:
        num_features: node feature size (Cora 1433, CiteSeer 3703).
        hidden: embedding size.
        num_layers: GCN layers after the linear input layer.
        encoder: ``"puregcn"`` (weight-free propagation) or ``"gcn"`` (PyG ``GCNConv``).
        input_dropout: dropout on the input features.
        dropout: dropout in the encoder and the predictor.
        lr: Adam learning rate of the encoder.
        predictor_lr: Adam learning rate of the predictor (``None``: ``lr``).
        weight_decay: Adam weight decay.
        beta: initial weight of the common-neighbour term (learnable).
        layer_norm: LayerNorm in the predictor's MLPs.
        use_xlin: sum h + MLP(h) over common neighbours.
        tail_activation: MLP_cn and MLP_ij end on their ReLU.
        mask_targets: remove the batch's positive edges from the message-passing graph while training.
        hits_k: K of the logged Hits@K.
        nonfinite_loss: on a non-finite training loss, ``"error"``, ``"skip"`` the step or ``"warn"``.

    Example:
        >>> model = NCN(num_features=8, hidden=4)
        >>> x, ei = torch.randn(5, 8), torch.tensor([[0, 1, 1, 2, 0, 2], [1, 0, 2, 1, 2, 0]])
        >>> model(x, ei, torch.tensor([[0, 3], [1, 4]])).shape
        torch.Size([2])
    """

    def __init__(
        self,
        num_features: PositiveInt = 1433,
        hidden: PositiveInt = 256,
        num_layers: PositiveInt = 1,
        encoder: Literal["gcn", "puregcn"] = "puregcn",
        input_dropout: UnitIntervalRightOpen = 0.7,
        dropout: UnitIntervalRightOpen = 0.05,
        lr: PositiveFloat = 0.0043,
        predictor_lr: Optional[PositiveFloat] = 0.0024,
        weight_decay: NonNegativeFloat = 0.0,
        beta: float = 1.0,
        layer_norm: bool = True,
        use_xlin: bool = True,
        tail_activation: bool = True,
        mask_targets: bool = True,
        hits_k: PositiveInt = 100,
        nonfinite_loss: NonFiniteLoss = "error",
    ) -> None:
        check_number("beta", beta)
        self._predictor_args = {"dropout": dropout, "layer_norm": bool(layer_norm), "use_xlin": bool(use_xlin),
                                "tail_activation": bool(tail_activation), "beta": float(beta)}
        super().__init__(num_features=num_features, hidden=hidden, num_layers=num_layers, encoder=encoder,
                         decoder="mlp", input_dropout=input_dropout, dropout=dropout, lr=lr, predictor_lr=predictor_lr,
                         weight_decay=weight_decay, mask_targets=mask_targets, hits_k=hits_k,
                         nonfinite_loss=nonfinite_loss)
        for store in (self._hparams, self._hparams_initial):  # GAE's decoder is not an NCN argument
            store.pop("decoder", None)

    def build_predictor(self) -> nn.Module:
        """An :class:`NCNPredictor`."""
        return NCNPredictor(self.hparams.hidden, **self._predictor_args)

    def score(self, h: torch.Tensor, edge_index: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """NCN logits of ``targets`` with common neighbours in ``edge_index``."""
        return self.predictor(h, adjacency(edge_index, h.size(0)), targets)
