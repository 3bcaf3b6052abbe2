"""What the traffic LightningModules share: cross-entropy classification steps, metrics, optimiser, checks."""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score
from typing_extensions import override

from lightning_ext.core.guards import check_loss, refuse_skip_under_ddp
from lightning_ext.core.optimization import configure_optimization

__all__ = ["TrafficClassifierBase"]


class TrafficClassifierBase(LightningModule):
    """Cross-entropy steps over ``(*inputs, label)`` batches; logs ``{stage}_loss``, ``{stage}_acc``,
    ``{stage}_balanced_acc`` (macro recall) and ``{stage}_f1`` (macro F1). Subclasses set ``num_classes``,
    ``label_smoothing``, ``lr``, ``weight_decay``, the optimiser factories, ``nonfinite_loss`` and implement
    :meth:`logits`; a subclass with another training objective overrides :meth:`objective`."""

    num_classes: int
    label_smoothing: float = 0.0

    def _init_metrics(self) -> None:
        for stage in ("val", "test"):
            setattr(self, f"{stage}_acc", MulticlassAccuracy(self.num_classes, average="micro"))
            setattr(self, f"{stage}_balanced_acc", MulticlassAccuracy(self.num_classes, average="macro"))
            setattr(self, f"{stage}_f1", MulticlassF1Score(self.num_classes, average="macro"))

    def logits(self, *inputs: torch.Tensor) -> torch.Tensor:
        """Class logits of a batch's inputs."""
        raise NotImplementedError

    def objective(self, batch: Any, stage: str) -> torch.Tensor:
        """The loss of a batch (cross-entropy by default); evaluation stages also update the metrics."""
        *inputs, y = batch
        logits = self.logits(*inputs)
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing if stage == "train" else 0.0)
        if stage != "train":
            for name in ("acc", "balanced_acc", "f1"):
                metric = getattr(self, f"{stage}_{name}")
                metric.update(logits, y)
                self.log(f"{stage}_{name}", metric, prog_bar=name == "f1")
        return loss

    @override
    def setup(self, stage: str) -> None:
        """Refuse ``nonfinite_loss='skip'`` under DDP and a datamodule whose class count differs."""
        refuse_skip_under_ddp(self, self.nonfinite_loss)
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None and getattr(dm, "class_names", None) == [] and hasattr(dm, "setup"):
            dm.setup(stage)
        classes = getattr(dm, "num_classes", None)
        if self.uses_labels and isinstance(classes, int) and classes and classes != self.num_classes:
            raise ValueError(f"the datamodule has {classes} classes but {type(self).__name__} has num_classes="
                             f"{self.num_classes}; set `model.init_args.num_classes: {classes}`.")

    @property
    def uses_labels(self) -> bool:
        """Whether training reads the labels (``False`` for self-supervised pretraining)."""
        return True

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Optional[torch.Tensor]:
        """The training loss of one batch."""
        loss = self.objective(batch, "train")
        if not check_loss(self, loss, self.nonfinite_loss, batch):
            return None
        self.log("train_loss", loss, prog_bar=True)
        return loss

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Validation loss and metrics."""
        self.log("val_loss", self.objective(batch, "val"), sync_dist=True)

    @override
    def test_step(self, batch: Any, batch_idx: int) -> None:
        """Test loss and metrics."""
        self.log("test_loss", self.objective(batch, "test"), sync_dist=True)

    @override
    def configure_optimizers(self) -> Any:
        """AdamW (or the injected optimiser/scheduler) over the trainable parameters."""
        return configure_optimization(self, [p for p in self.parameters() if p.requires_grad])
