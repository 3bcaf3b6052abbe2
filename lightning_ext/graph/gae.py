"""``GAELinkPredictor``: a GCN encoder with a dot-product (or MLP) edge decoder, the link-prediction baseline.

It is also the training loop NCN and NCNC reuse (they override :meth:`GAELinkPredictor.score`): BCE on the
batch's positive target edges and its uniform random negatives, the positives removed from the message-passing
graph while training (NCN's ``--maskinput``, "target link removal"), Hits@K and MRR on validation/test.
"""

from __future__ import annotations

import warnings
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn
from typing_extensions import override

from lightning_ext.core.guards import NonFiniteLoss, check_loss, check_nonfinite_policy, refuse_skip_under_ddp
from lightning_ext.core.optional import require
from lightning_ext.core.validation import (
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    UnitIntervalRightOpen,
    check_choice,
    check_fraction,
    check_non_negative,
    check_positive,
    check_positive_int,
)
from lightning_ext.graph.link_prediction import HitsAtK, LinkMRR, check_link_batch


def remove_edges(edge_index: torch.Tensor, targets: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """``edge_index`` without the target edges, in both directions (target link removal)."""
    key = edge_index[0] * num_nodes + edge_index[1]
    drop = torch.cat([targets[0] * num_nodes + targets[1], targets[1] * num_nodes + targets[0]])
    return edge_index[:, ~torch.isin(key, drop)]


def adjacency(edge_index: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """The binary adjacency of ``edge_index`` (duplicates merged) as a sparse CSR ``(n, n)`` float tensor."""
    key = torch.unique(edge_index[0] * num_nodes + edge_index[1])  # sorted: row-major order
    row, col = key // num_nodes, key % num_nodes
    crow = torch.zeros(num_nodes + 1, dtype=torch.long, device=edge_index.device)
    crow[1:] = torch.cumsum(torch.bincount(row, minlength=num_nodes), 0)
    with warnings.catch_warnings():  # "sparse CSR support is in beta": only the row pointers are used here
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, torch.ones(col.numel(), device=edge_index.device),
                                       (num_nodes, num_nodes), check_invariants=False)


def neighbor_pairs(adj: torch.Tensor, nodes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(t, u)`` with u ∈ N(nodes[t]), for every t, read from the CSR adjacency's row pointers (vectorised)."""
    crow, col = adj.crow_indices(), adj.col_indices()
    deg = crow[nodes + 1] - crow[nodes]
    t = torch.repeat_interleave(torch.arange(nodes.numel(), device=nodes.device), deg)
    first = torch.cumsum(deg, 0) - deg
    offset = torch.arange(t.numel(), device=nodes.device) - first[t]
    return t, col[crow[nodes][t] + offset]


def gcn_propagation(edge_index: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """D̃^{-1/2}(A + I)D̃^{-1/2} as a sparse COO tensor (the weight-free "puregcn" layer of NCN)."""
    from torch_geometric.nn.conv.gcn_conv import gcn_norm

    ei, w = gcn_norm(edge_index, None, num_nodes, add_self_loops=True)
    return torch.sparse_coo_tensor(ei, w, (num_nodes, num_nodes)).coalesce()


class LinkEncoder(nn.Module):
    """Input dropout, a linear input layer, then ``num_layers`` GCN layers (``"gcn"``: PyG ``GCNConv`` + ReLU
    between layers; ``"puregcn"``: weight-free normalised propagation, NCN's Planetoid encoder)."""

    def __init__(self, num_features: int, hidden: int, num_layers: int, conv: str, input_dropout: float,
                 dropout: float) -> None:
        super().__init__()
        from torch_geometric.nn import GCNConv

        self.conv, self.input_dropout, self.dropout = conv, input_dropout, dropout
        self.lin_in = nn.Linear(num_features, hidden)
        self.convs = nn.ModuleList([GCNConv(hidden, hidden) for _ in range(num_layers)]) if conv == "gcn" else None
        self.num_layers = num_layers

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        """Node embeddings ``(n, hidden)``."""
        x = self.lin_in(F.dropout(x, self.input_dropout, self.training))
        prop = gcn_propagation(edge_index, x.size(0)) if self.convs is None else None
        for layer in range(self.num_layers):
            x = F.dropout(x, self.dropout, self.training)
            if self.convs is None:
                x = torch.sparse.mm(prop, x)
            else:
                x = self.convs[layer](x, edge_index)
                if layer < self.num_layers - 1:
                    x = F.relu(x)
        return x


def link_bce(pos_logits: torch.Tensor, neg_logits: torch.Tensor) -> torch.Tensor:
    """−mean log σ(s⁺) − mean log σ(−s⁻): the BCE of GAE/NCN on positive and negative target edges."""
    return -F.logsigmoid(pos_logits).mean() - F.logsigmoid(-neg_logits).mean()


class GAELinkPredictor(LightningModule):
    """Graph auto-encoder link predictor (Kipf & Welling, 2016): GCN embeddings and a dot-product edge decoder.

    Paper: https://arxiv.org/abs/1611.07308 ; reference code: https://github.com/tkipf/gae . The logit of edge
    (i, j) is s_ij = h_iᵀh_j (``decoder="dot"``) or an MLP of h_i ⊙ h_j (``decoder="mlp"``, the GAE row of
    NCN's tables), h = GCN(X, A). Trained with −log σ(s⁺) − log σ(−s⁻) on the batch's positive edges and its
    uniform random negatives; the batch's positives are removed from the message-passing graph while training
    (``mask_targets``, NCN's target link removal) so training matches testing, where test edges are absent.
    Batches come from :class:`~lightning_ext.datamodules.LinkPredictionDataModule`; logs ``{stage}_loss``,
    ``{stage}_hits@{hits_k}`` and ``{stage}_mrr``.

    Args:
        num_features: node feature size (Cora 1433, CiteSeer 3703).
        hidden: embedding size.
        num_layers: GCN layers after the linear input layer.
        encoder: ``"gcn"`` (PyG ``GCNConv`` with ReLU between layers) or ``"puregcn"`` (weight-free propagation).
        decoder: ``"dot"`` or ``"mlp"`` (two layers on h_i ⊙ h_j).
        input_dropout: dropout on the input features.
        dropout: dropout before every GCN layer and inside the predictor.
        lr: Adam learning rate of the encoder.
        predictor_lr: Adam learning rate of the predictor (``None``: ``lr``).
        weight_decay: Adam weight decay.
        mask_targets: remove the batch's positive edges from the message-passing graph while training.
        hits_k: K of the logged Hits@K.
        nonfinite_loss: on a non-finite training loss, ``"error"``, ``"skip"`` the step or ``"warn"``.

    Example:
        >>> model = GAELinkPredictor(num_features=8, hidden=4)
        >>> x, ei = torch.randn(5, 8), torch.tensor([[0, 1, 1, 2], [1, 0, 2, 1]])
        >>> model.score(model.encode(x, ei), ei, torch.tensor([[0], [2]])).shape
        torch.Size([1])
    """

    def __init__(
        self,
        num_features: PositiveInt = 1433,
        hidden: PositiveInt = 256,
        num_layers: PositiveInt = 2,
        encoder: Literal["gcn", "puregcn"] = "gcn",
        decoder: Literal["dot", "mlp"] = "dot",
        input_dropout: UnitIntervalRightOpen = 0.0,
        dropout: UnitIntervalRightOpen = 0.0,
        lr: PositiveFloat = 0.01,
        predictor_lr: Optional[PositiveFloat] = None,
        weight_decay: NonNegativeFloat = 0.0,
        mask_targets: bool = True,
        hits_k: PositiveInt = 100,
        nonfinite_loss: NonFiniteLoss = "error",
    ) -> None:
        super().__init__()
        require("torch_geometric", type(self).__name__)
        for arg, value in (("num_features", num_features), ("hidden", hidden), ("num_layers", num_layers),
                           ("hits_k", hits_k)):
            check_positive_int(arg, value)
        check_choice("encoder", encoder, ("gcn", "puregcn"))
        check_choice("decoder", decoder, ("dot", "mlp"))
        check_fraction("input_dropout", input_dropout, allow_one=False)
        check_fraction("dropout", dropout, allow_one=False)
        check_positive("lr", lr)
        if predictor_lr is not None:
            check_positive("predictor_lr", predictor_lr)
        check_non_negative("weight_decay", weight_decay)
        check_nonfinite_policy(nonfinite_loss)
        self.save_hyperparameters()
        self.encoder = LinkEncoder(num_features, hidden, num_layers, encoder, input_dropout, dropout)
        self.predictor = self.build_predictor()
        self.skipped_steps = 0
        self.metrics = nn.ModuleDict({f"{s}_{m}": (HitsAtK(hits_k) if m == "hits" else LinkMRR())
                                      for s in ("val", "test") for m in ("hits", "mrr")})

    def build_predictor(self) -> nn.Module:
        """The edge decoder's parameters (an MLP for ``decoder="mlp"``, none for ``"dot"``)."""
        h = self.hparams.hidden
        if self.hparams.decoder == "dot":
            return nn.Identity()
        return nn.Sequential(nn.Linear(h, h), nn.Dropout(self.hparams.dropout), nn.ReLU(), nn.Linear(h, 1))

    def encode(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        """Node embeddings from the message-passing graph."""
        return self.encoder(x, edge_index)

    def score(self, h: torch.Tensor, edge_index: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Logits ``(T,)`` of the target edges ``(2, T)`` given embeddings and the message-passing graph."""
        prod = h[targets[0]] * h[targets[1]]
        return prod.sum(-1) if self.hparams.decoder == "dot" else self.predictor(prod).squeeze(-1)

    @override
    def forward(self, x: torch.Tensor, edge_index: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Logits of ``targets`` on the graph ``(x, edge_index)``."""
        return self.score(self.encode(x, edge_index), edge_index, targets)

    @override
    def setup(self, stage: str) -> None:
        """Refuse ``nonfinite_loss='skip'`` under DDP and a DataModule whose feature size differs."""
        refuse_skip_under_ddp(self, self.hparams.nonfinite_loss)
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        have = getattr(dm, "num_features", None)
        if have is not None and have != self.hparams.num_features:
            raise ValueError(f"The model has num_features={self.hparams.num_features} but the data has {have}; "
                             f"set `model.init_args.num_features: {have}`.")

    @override
    def training_step(self, batch: dict, batch_idx: int) -> Optional[torch.Tensor]:
        """BCE on the batch's positives (removed from the input graph) and its negatives."""
        check_link_batch(batch, type(self).__name__)
        x, pos, neg = batch["x"], batch["pos"], batch["neg"]
        edge_index = remove_edges(batch["edge_index"], pos, x.size(0)) if self.hparams.mask_targets \
            else batch["edge_index"]
        h = self.encode(x, edge_index)
        logits = self.score(h, edge_index, torch.cat([pos, neg], 1))
        loss = link_bce(logits[: pos.size(1)], logits[pos.size(1):])
        if not check_loss(self, loss, self.hparams.nonfinite_loss, batch):
            return None
        self.log("train_loss", loss, batch_size=pos.size(1), prog_bar=True)
        return loss

    def _evaluate(self, batch: dict, stage: str) -> None:
        check_link_batch(batch, type(self).__name__)
        x, pos, neg = batch["x"], batch["pos"], batch["neg"]
        h = self.encode(x, batch["edge_index"])
        logits = self.score(h, batch["edge_index"], torch.cat([pos, neg], 1))
        pos_l, neg_l = logits[: pos.size(1)], logits[pos.size(1):]
        self.log(f"{stage}_loss", link_bce(pos_l, neg_l), batch_size=pos.size(1))
        for m in ("hits", "mrr"):
            metric = self.metrics[f"{stage}_{m}"]
            metric.update(pos_l, neg_l)
            name = f"{stage}_hits@{self.hparams.hits_k}" if m == "hits" else f"{stage}_mrr"
            self.log(name, metric, batch_size=pos.size(1), prog_bar=m == "hits")

    @override
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Hits@K and MRR of the validation edges against the validation negatives."""
        self._evaluate(batch, "val")

    @override
    def test_step(self, batch: dict, batch_idx: int) -> None:
        """Hits@K and MRR of the test edges against the test negatives."""
        self._evaluate(batch, "test")

    @override
    def configure_optimizers(self):
        """Adam, with the predictor at ``predictor_lr`` when given (NCN's separate GNN and predictor rates)."""
        groups = [{"params": list(self.encoder.parameters()), "lr": self.hparams.lr}]
        head = [p for p in self.predictor.parameters()]
        if head:
            groups.append({"params": head, "lr": self.hparams.predictor_lr or self.hparams.lr})
        return torch.optim.Adam(groups, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
