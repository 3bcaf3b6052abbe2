"""``NCNC``: Neural Common Neighbor with Completion (Wang, Yang and Zhang, ICLR 2024), pure core and module.

:class:`NCNCPredictor` extends :class:`~lightning_ext.graph.ncn.NCNPredictor`: nodes adjacent to only one end
of the target are "potential common neighbours", weighted by the (calibrated, gradient-free) NCN probability of
the missing edge; :class:`NCNC` is the LightningModule.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch

from lightning_ext.core.guards import NonFiniteLoss
from lightning_ext.core.validation import (
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    UnitIntervalRightOpen,
    check_number,
    check_positive,
)
from lightning_ext.graph.gae import adjacency
from lightning_ext.graph.gae import neighbor_pairs
from lightning_ext.graph.ncn import NCN, NCNPredictor, aggregate


def calibrate(logits: torch.Tensor, scale: float, offset: float, pt: float, alpha: float) -> torch.Tensor:
    """NCNC's completion weight: α · pt · σ(scale (s − offset)) / (pt · σ(scale (s − offset)) + 1 − σ(...)).

    Example:
        >>> round(float(calibrate(torch.tensor([2.8]), 4.3, 2.8, 0.75, 1.0)), 4)  # σ(0) = 0.5: 0.375 / 0.875
        0.4286
    """
    p0 = torch.sigmoid(scale * (logits - offset))
    return alpha * pt * p0 / (pt * p0 + 1 - p0)


class NCNCPredictor(NCNPredictor):
    """NCN whose common-neighbour sum also counts potential common neighbours, weighted by completion.

    For a target (i, j), each u ∈ N(i) \\ N(j) adds p̂_ju · x̃_u and each u ∈ N(j) \\ N(i) adds p̂_iu · x̃_u to
    Σ_{u ∈ N(i)∩N(j)} x̃_u, where p̂ = :func:`calibrate` of the depth − 1 predictor's logit of the missing edge,
    computed without gradient (official ``IncompleteCN1Predictor``). Depth 0 is plain NCN.

    Args:
        hidden: embedding size.
        depth: completion depth (1 = NCNC, 2 = NCNC-2).
        scale: ``probscale``.
        offset: ``proboffset``.
        pt: ``pt``, the prior weight of a completed edge.
        alpha: ``alpha``, the overall weight of completed neighbours.
        **kwargs: :class:`~lightning_ext.graph.ncn.NCNPredictor`'s options.
    """

    def __init__(self, hidden: int, depth: int = 1, scale: float = 4.3, offset: float = 2.8, pt: float = 0.75,
                 alpha: float = 1.0, **kwargs) -> None:
        super().__init__(hidden, **kwargs)
        self.depth, self.scale, self.offset, self.pt, self.alpha = int(depth), scale, offset, pt, alpha

    def forward(self, h: torch.Tensor, adj: torch.Tensor, targets: torch.Tensor,
                depth: Optional[int] = None) -> torch.Tensor:
        """Logits ``(T,)`` of ``targets`` with ``depth`` levels of completion."""
        depth = self.depth if depth is None else depth
        hx, n, num = self.cn_inputs(h), adj.size(1), targets.size(1)
        ti, ui = neighbor_pairs(adj, targets[0])
        tj, uj = neighbor_pairs(adj, targets[1])
        ki, kj = ti * n + ui, tj * n + uj
        in_j, in_i = torch.isin(ki, kj), torch.isin(kj, ki)
        cn_sum = aggregate(ti[in_j], ui[in_j], hx, num)
        if depth > 0:
            # u ∈ N(i) \\ N(j): the edge (j, u) is missing; u ∈ N(j) \\ N(i): the edge (i, u) is missing
            for t, u, other in ((ti[~in_j], ui[~in_j], targets[1]), (tj[~in_i], uj[~in_i], targets[0])):
                if t.numel() == 0:
                    continue
                with torch.no_grad():
                    logits = self.forward(h, adj, torch.stack([other[t], u]), depth - 1)
                weight = calibrate(logits, self.scale, self.offset, self.pt, self.alpha)
                cn_sum = cn_sum + aggregate(t, u, hx, num, weight)
        return self.combine(h, targets, cn_sum)


class NCNC(NCN):
    """Neural Common Neighbor with Completion (Wang, Yang and Zhang, ICLR 2024): NCN plus predicted neighbours.

    Paper: https://arxiv.org/abs/2302.00890 ; reference code: https://github.com/GraphPKU/NeuralCommonNeighbor .
    Missing edges make common neighbours vanish (common-neighbour distribution shift). NCNC adds to NCN's
    Σ_{u ∈ N(i)∩N(j)} h_u the sums Σ_{u ∈ N(i)\\N(j)} p̂_ju h_u + Σ_{u ∈ N(j)\\N(i)} p̂_iu h_u, where p̂ is NCN's
    own gradient-free probability of the missing edge, calibrated as
    p̂ = α·pt·σ(scale(s − offset)) / (pt·σ(scale(s − offset)) + 1 − σ(scale(s − offset))) (:class:`NCNCPredictor`).
    Defaults are NCN's plus the official Cora values (``probscale`` 4.3, ``proboffset`` 2.8, ``pt`` 0.75,
    ``alpha`` 1). Every potential common neighbour is used (no per-target sampling; fine for Planetoid graphs).

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
        depth: completion depth (1 = NCNC, 2 = NCNC-2).
        probability_scale: ``probscale`` of the calibration.
        probability_offset: ``proboffset`` of the calibration.
        pt: prior weight of a completed edge, in (0, 1].
        alpha: overall weight of completed neighbours.
        mask_targets: remove the batch's positive edges from the message-passing graph while training.
        hits_k: K of the logged Hits@K.
        nonfinite_loss: on a non-finite training loss, ``"error"``, ``"skip"`` the step or ``"warn"``.

    Example:
        >>> model = NCNC(num_features=8, hidden=4)
        >>> x, ei = torch.randn(5, 8), torch.tensor([[0, 1, 1, 2, 0, 2, 3, 4], [1, 0, 2, 1, 2, 0, 4, 3]])
        >>> model(x, ei, torch.tensor([[0, 3], [1, 2]])).shape
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
        depth: PositiveInt = 1,
        probability_scale: PositiveFloat = 4.3,
        probability_offset: float = 2.8,
        pt: PositiveFloat = 0.75,
        alpha: NonNegativeFloat = 1.0,
        mask_targets: bool = True,
        hits_k: PositiveInt = 100,
        nonfinite_loss: NonFiniteLoss = "error",
    ) -> None:
        from lightning_ext.core.validation import check_non_negative, check_positive_int

        check_positive_int("depth", depth)
        check_positive("probability_scale", probability_scale)
        check_number("probability_offset", probability_offset)
        check_number("pt", pt, low=0, high=1, low_open=True)
        check_non_negative("alpha", alpha)
        self._completion_args = {"depth": int(depth), "scale": float(probability_scale),
                                 "offset": float(probability_offset), "pt": float(pt), "alpha": float(alpha)}
        super().__init__(num_features=num_features, hidden=hidden, num_layers=num_layers, encoder=encoder,
                         input_dropout=input_dropout, dropout=dropout, lr=lr, predictor_lr=predictor_lr,
                         weight_decay=weight_decay, beta=beta, layer_norm=layer_norm, use_xlin=use_xlin,
                         tail_activation=tail_activation, mask_targets=mask_targets, hits_k=hits_k,
                         nonfinite_loss=nonfinite_loss)

    def build_predictor(self) -> NCNCPredictor:
        """An :class:`NCNCPredictor`."""
        return NCNCPredictor(self.hparams.hidden, **self._completion_args, **self._predictor_args)

    def score(self, h: torch.Tensor, edge_index: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """NCNC logits of ``targets`` with (completed) common neighbours in ``edge_index``."""
        return self.predictor(h, adjacency(edge_index, h.size(0)), targets)
