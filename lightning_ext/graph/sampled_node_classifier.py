"""A mini-batch node classifier over sampled neighbourhoods (GraphSAGE, GCN or GAT from PyG's model zoo)."""

from __future__ import annotations

from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from typing_extensions import override

from lightning_ext.core.guards import check_loss, check_nonfinite_policy, refuse_skip_under_ddp
from lightning_ext.core.optional import require
from lightning_ext.core.validation import check_choice, check_number
from lightning_ext.graph.full_graph_steps import FullGraphNodeSteps


class SampledNodeClassifier(LightningModule):
    """Node classification on sampled mini-batches: the loss on each batch's first ``batch_size`` (seed) nodes.

    Hamilton, Ying and Leskovec, "Inductive Representation Learning on Large Graphs" (GraphSAGE, NeurIPS 2017,
    arXiv 1706.02216); the model is PyG's ``torch_geometric.nn.models.{GraphSAGE, GCN, GAT}``. A batch is a PyG
    ``Data`` as PyG's ``NeighborLoader``, :func:`~lightning_ext.graph.neighbor_sampler.neighbor_loader` or
    :class:`~lightning_ext.graph.offline_sampled.OfflineSampledDataModule` yields it (``x``, local ``edge_index``,
    ``y``, ``batch_size``: the seeds come first). Loss: ``mean_{v in seeds} CE(f(x, A)_v, y_v)``. Defaults are
    DiskGNN's accuracy study (``acc/run.sh``): SAGE, hidden 256, 3 layers, dropout 0.2, Adam lr 1e-3.

    Args:
        num_features: input feature size.
        num_classes: number of classes.
        gnn: ``"sage"``, ``"gcn"`` or ``"gat"``.
        hidden: hidden channels.
        num_layers: message-passing layers (match the sampler's hops).
        dropout: dropout between layers.
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
        nonfinite_loss: policy on a non-finite training loss (``"error"``, ``"skip"``, ``"warn"``).

    Example:
        >>> from torch_geometric.data import Data
        >>> model = SampledNodeClassifier(num_features=4, num_classes=3, hidden=8, num_layers=2)
        >>> b = Data(x=torch.randn(5, 4), edge_index=torch.tensor([[1, 2, 3, 4], [0, 0, 1, 1]]), batch_size=2)
        >>> model(b.x, b.edge_index).shape
        torch.Size([5, 3])
    """

    def __init__(self, num_features: int = 1433, num_classes: int = 7, gnn: Literal["sage", "gcn", "gat"] = "sage",
                 hidden: int = 256, num_layers: int = 3, dropout: float = 0.2, lr: float = 1e-3,
                 weight_decay: float = 0.0, nonfinite_loss: Literal["error", "skip", "warn"] = "error") -> None:
        super().__init__()
        require("torch_geometric", "SampledNodeClassifier")
        check_number("num_features", num_features, low=1, integer=True)
        check_number("num_classes", num_classes, low=2, integer=True)
        check_choice("gnn", gnn, ("sage", "gcn", "gat"))
        check_number("hidden", hidden, low=1, integer=True)
        check_number("num_layers", num_layers, low=1, integer=True)
        check_number("dropout", dropout, low=0, high=1, high_open=True)
        check_number("lr", lr, low=0, low_open=True)
        check_number("weight_decay", weight_decay, low=0)
        check_nonfinite_policy(nonfinite_loss)
        from torch_geometric.nn.models import GAT, GCN, GraphSAGE

        self.save_hyperparameters()
        model = {"sage": GraphSAGE, "gcn": GCN, "gat": GAT}[gnn]
        self.gnn = model(num_features, hidden, num_layers, out_channels=num_classes, dropout=dropout)
        self.accuracy = FullGraphNodeSteps.stage_accuracies(num_classes)
        self.skipped_steps = 0

    @override
    def setup(self, stage: str) -> None:
        """Refuse ``nonfinite_loss='skip'`` under DDP; check the data's feature size when it states one."""
        refuse_skip_under_ddp(self, self.hparams.nonfinite_loss)
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        have = getattr(dm, "feature_dim", None)
        if have is not None and int(have) != self.hparams.num_features:
            raise ValueError(f"the data has {have} features per node but num_features={self.hparams.num_features}: "
                             f"set model num_features: {have}")

    @override
    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        """Logits of every node of the sampled subgraph."""
        return self.gnn(x, edge_index)

    def _step(self, batch: Any, stage: str) -> Optional[torch.Tensor]:
        n = int(batch.batch_size)
        logits = self(batch.x, batch.edge_index)[:n]
        y = batch.y[:n]
        loss = F.cross_entropy(logits, y)
        if stage == "train" and not check_loss(self, loss, self.hparams.nonfinite_loss, batch):
            return None
        acc = self.accuracy[f"{stage}_acc"]
        acc(logits, y)
        self.log(f"{stage}_loss", loss, batch_size=n, prog_bar=stage == "train")
        self.log(f"{stage}_acc", acc, batch_size=n, prog_bar=stage != "train")
        return loss

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Optional[torch.Tensor]:
        """Cross-entropy on the seed nodes."""
        return self._step(batch, "train")

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Loss and accuracy on the seed nodes."""
        self._step(batch, "val")

    @override
    def test_step(self, batch: Any, batch_idx: int) -> None:
        """Loss and accuracy on the seed nodes."""
        self._step(batch, "test")

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Adam."""
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
