"""``GCNNodeClassifier``: Kipf & Welling's two-layer GCN for full-batch node classification."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from typing_extensions import override

from lightning_ext.core.guards import NonFiniteLoss, check_nonfinite_policy, refuse_skip_under_ddp
from lightning_ext.core.optional import require
from lightning_ext.core.validation import (
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    UnitIntervalRightOpen,
    check_non_negative,
    check_number,
    check_positive,
    check_positive_int,
)
from lightning_ext.core.validation import AtLeastTwoInt
from lightning_ext.graph.full_graph_steps import FullGraphNodeSteps

#: A class count: an integer >= 2 (shared from core.validation).
NumClasses = AtLeastTwoInt


class GCNNodeClassifier(FullGraphNodeSteps, LightningModule):
    """Graph convolutional network for semi-supervised node classification (Kipf & Welling, ICLR 2017).

    Paper: https://arxiv.org/abs/1609.02907 ; reference code: https://github.com/tkipf/gcn . Uses PyG's
    ``GCNConv``. Each batch is one ``torch_geometric.data.Data`` graph with ``train_mask``/``val_mask``/
    ``test_mask`` (as yielded by :class:`~lightning_ext.datamodules.PlanetoidDataModule`); the loss and
    accuracy of each stage use that stage's mask (the steps are :class:`~lightning_ext.graph.full_graph_steps.
    FullGraphNodeSteps`, shared with ``SearchedGNN``). Defaults are the paper's: 16 hidden units, dropout 0.5,
    Adam with lr 0.01 and weight decay 5e-4 (applied to all layers here).

    Args:
        num_features: node feature size (Cora 1433, CiteSeer 3703, PubMed 500).
        num_classes: number of classes (Cora 7, CiteSeer 6, PubMed 3).
        hidden: hidden units.
        dropout: dropout on the input and hidden layer.
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
        nonfinite_loss: on a non-finite training loss (NaN node features, divergence), ``"error"`` (one line
            naming the step, epoch and likely cause), ``"skip"`` the step (refused under DDP) or ``"warn"``.

    Example:
        >>> model = GCNNodeClassifier(num_features=1433, num_classes=7)
        >>> sum(p.numel() for p in model.parameters())
        23063
    """

    def __init__(
        self,
        num_features: PositiveInt = 1433,
        num_classes: NumClasses = 7,
        hidden: PositiveInt = 16,
        dropout: UnitIntervalRightOpen = 0.5,
        lr: PositiveFloat = 0.01,
        weight_decay: NonNegativeFloat = 5e-4,
        nonfinite_loss: NonFiniteLoss = "error",
    ) -> None:
        super().__init__()
        require("torch_geometric", "GCNNodeClassifier")
        for name, value in (("num_features", num_features), ("hidden", hidden)):
            check_positive_int(name, value)
        check_number("num_classes", num_classes, low=2, integer=True)
        check_number("dropout", dropout, low=0, high=1, high_open=True)
        check_positive("lr", lr)
        check_non_negative("weight_decay", weight_decay)
        check_nonfinite_policy(nonfinite_loss)
        from torch_geometric.nn import GCNConv

        self.save_hyperparameters()
        self.conv1 = GCNConv(num_features, hidden, cached=False)
        self.conv2 = GCNConv(hidden, num_classes, cached=False)
        self.num_classes = num_classes
        self.skipped_steps = 0
        self.accuracy = self.stage_accuracies(num_classes)

    @override
    def setup(self, stage: str) -> None:
        """Refuse ``nonfinite_loss='skip'`` under DDP; check the data's ``num_features`` and ``num_classes``."""
        refuse_skip_under_ddp(self, self.hparams.nonfinite_loss)
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        for attr in ("num_features", "num_classes"):
            have, want = getattr(dm, attr, None), self.hparams[attr]
            if have is not None and have != want:
                raise ValueError(f"The model has {attr}={want} but the data has {have}; set `model.init_args.{attr}: {have}`.")

    @override
    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        """Logits of every node of the graph."""
        x = F.dropout(x, self.hparams.dropout, self.training)
        x = F.relu(self.conv1(x, edge_index))
        x = F.dropout(x, self.hparams.dropout, self.training)
        return self.conv2(x, edge_index)

    @override
    def configure_optimizers(self):
        """Adam with the paper's learning rate and weight decay."""
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
