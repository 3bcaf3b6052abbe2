"""The full-graph node-classification step shared by the graph family's node classifiers (``GCNNodeClassifier``,
``SearchedGNN``): one PyG graph per batch, each stage's cross-entropy and accuracy on that stage's mask."""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from typing_extensions import override

from lightning_ext.core.guards import check_loss


class FullGraphNodeSteps:
    """Mixin for a full-batch node classifier (put it before ``LightningModule``): the training, validation, test
    and predict steps of a module whose batch is one graph with ``x``, ``edge_index``, ``y`` and
    ``train_mask``/``val_mask``/``test_mask`` (as :class:`~lightning_ext.graph.planetoid.FullGraphLoaders` yields).

    The module provides ``forward(x, edge_index)`` (logits of every node), ``self.accuracy`` (a ``ModuleDict`` with
    ``train_acc``/``val_acc``/``test_acc`` metrics, see :meth:`stage_accuracies`) and ``hparams.nonfinite_loss``
    (the :mod:`~lightning_ext.core.guards` policy). Each stage logs ``{stage}_loss`` and ``{stage}_acc`` weighted by
    the number of nodes in its mask; a non-finite training loss follows the policy (``None`` skips the step).
    Override :meth:`_check_batch` to refuse a graph the module cannot use with one clear line.
    """

    @staticmethod
    def stage_accuracies(num_classes: int) -> torch.nn.ModuleDict:
        """Micro accuracy per stage (``train_acc``, ``val_acc``, ``test_acc``), to assign to ``self.accuracy``."""
        from torchmetrics.classification import MulticlassAccuracy

        return torch.nn.ModuleDict(
            {f"{s}_acc": MulticlassAccuracy(num_classes, average="micro") for s in ("train", "val", "test")})

    def _check_batch(self, graph: Any, stage: str) -> None:
        """Raise a one-line ``ValueError`` for a graph this module cannot use (default: accept every graph)."""

    def _step(self, graph: Any, stage: str) -> Optional[torch.Tensor]:
        self._check_batch(graph, stage)
        mask = graph[f"{stage}_mask"]
        logits = self(graph.x, graph.edge_index)[mask]
        loss = F.cross_entropy(logits, graph.y[mask])
        if stage == "train" and not check_loss(self, loss, self.hparams.nonfinite_loss, graph):
            return None
        acc = self.accuracy[f"{stage}_acc"]
        acc(logits, graph.y[mask])
        self.log(f"{stage}_loss", loss, batch_size=int(mask.sum()), prog_bar=stage == "train")
        self.log(f"{stage}_acc", acc, batch_size=int(mask.sum()), prog_bar=stage != "train")
        return loss

    @override
    def training_step(self, graph: Any, batch_idx: int) -> Optional[torch.Tensor]:
        """Cross-entropy on the training nodes (``None`` skips a non-finite step)."""
        return self._step(graph, "train")

    @override
    def validation_step(self, graph: Any, batch_idx: int) -> None:
        """Loss and accuracy on the validation nodes."""
        self._step(graph, "val")

    @override
    def test_step(self, graph: Any, batch_idx: int) -> None:
        """Loss and accuracy on the test nodes."""
        self._step(graph, "test")

    @override
    def predict_step(self, graph: Any, batch_idx: int) -> torch.Tensor:
        """Predicted class of every node."""
        return self(graph.x, graph.edge_index).argmax(dim=-1)
