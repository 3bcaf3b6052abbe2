"""A supervised classifier around any ``nn.Module``: the model the library's callbacks compose onto."""

from __future__ import annotations

from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score
from typing_extensions import override

from lightning_ext.core.guards import (
    NonFiniteLoss,
    buffer_snapshot,
    check_loss,
    check_nonfinite_policy,
    refuse_skip_under_ddp,
    restore_buffers,
    SkippedStepsCheckpoint,
)
from lightning_ext.core.optimization import (  # noqa: F401 - re-exported: other modules import them from here
    NumClasses,
    check_num_classes,
    check_optimization,
    configure_optimization,
)
from lightning_ext.core.validation import NonNegativeFloat, PositiveFloat, check_choice, check_positive_int

__all__ = ["Classifier", "NumClasses", "check_optimization", "configure_optimization"]


class Classifier(SkippedStepsCheckpoint, LightningModule):
    """Cross-entropy classification of ``(x, y)`` batches with accuracy and macro-F1 from torchmetrics.

    Logs ``{train,val,test}_loss`` (plus ``train_loss_epoch``, the epoch mean over all ranks), ``{train,val,test}_acc`` and ``{val,test}_f1``. The optimiser and LR
    scheduler are injected LightningCLI-style (``optimizer: {class_path: torch.optim.SGD, init_args: ...}``);
    without one, AdamW with ``lr`` and ``weight_decay`` is used. In ``setup`` the data's ``num_classes`` and
    ``input_shape`` (when the datamodule has them) are checked against the model.

    A non-finite training loss (NaN inputs, divergence) stops the fit with one line naming the step, the epoch
    and the likely cause (``nonfinite_loss="error"``), or skips that optimizer step with a warning, counting it
    in ``skipped_steps`` and restoring BatchNorm statistics (``"skip"``; refused under DDP), or only warns
    (``"warn"``); see :mod:`lightning_ext.core.guards`.

    Args:
        net: maps a batch of inputs to ``num_classes`` logits.
        num_classes: number of classes.
        input_shape: shape of one input (without batch), checked against the datamodule; ``None`` skips it.
        lr: learning rate of the default AdamW.
        weight_decay: weight decay of the default AdamW.
        optimizer: optimiser factory ``params -> Optimizer``; overrides ``lr``/``weight_decay``.
        scheduler: LR-scheduler factory ``optimizer -> LRScheduler``.
        scheduler_interval: step the scheduler every ``"epoch"`` or every ``"step"``.
        nonfinite_loss: ``"error"``, ``"skip"`` or ``"warn"`` on a non-finite training loss.

    Example:
        >>> from torch import nn
        >>> model = Classifier(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), num_classes=10)
        >>> model(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        net: nn.Module,
        num_classes: NumClasses,
        input_shape: Optional[tuple[int, ...]] = None,
        lr: PositiveFloat = 1e-3,
        weight_decay: NonNegativeFloat = 0.0,
        optimizer: Optional[OptimizerCallable] = None,
        scheduler: Optional[LRSchedulerCallable] = None,
        scheduler_interval: Literal["epoch", "step"] = "epoch",
        nonfinite_loss: NonFiniteLoss = "error",
    ) -> None:
        super().__init__()
        check_num_classes(num_classes)
        check_nonfinite_policy(nonfinite_loss)
        check_optimization(lr, weight_decay)
        check_choice("scheduler_interval", scheduler_interval, ("epoch", "step"))
        if input_shape is not None:
            for size in input_shape:
                check_positive_int("input_shape", size)
        self.net = net
        self.num_classes = num_classes
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        self.lr, self.weight_decay = lr, weight_decay
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.scheduler_interval = scheduler_interval
        self.nonfinite_loss, self.skipped_steps = nonfinite_loss, 0
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_f1 = MulticlassF1Score(num_classes, average="macro")
        self.test_f1 = MulticlassF1Score(num_classes, average="macro")

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of a batch of inputs."""
        return self.net(x)

    # -- checks against the data ---------------------------------------------------------------------------
    @override
    def setup(self, stage: str) -> None:
        """Refuse ``nonfinite_loss='skip'`` under DDP; check the datamodule's ``num_classes`` and ``input_shape``."""
        refuse_skip_under_ddp(self, self.nonfinite_loss)
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is None:
            return
        data_classes = getattr(dm, "num_classes", None)
        if data_classes is not None and data_classes != self.num_classes:
            raise ValueError(
                f"The model has num_classes={self.num_classes} but {type(dm).__name__} has {data_classes} "
                f"classes. Set `model.init_args.num_classes: {data_classes}`."
            )
        data_shape = getattr(dm, "input_shape", None)
        if data_shape is not None and self.input_shape is not None and tuple(data_shape) != self.input_shape:
            raise ValueError(
                f"The model expects inputs of shape {self.input_shape} but {type(dm).__name__} yields "
                f"{tuple(data_shape)}. {self._shape_hint(tuple(data_shape))}"
            )

    def _shape_hint(self, data_shape: tuple[int, ...]) -> str:
        return f"Build the model for input shape {data_shape}."

    # -- steps ---------------------------------------------------------------------------------------------
    def _shared_step(self, batch: Any, stage: str) -> Optional[torch.Tensor]:
        x, y = batch
        buffers = buffer_snapshot(self) if stage == "train" and self.nonfinite_loss == "skip" else None
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        if stage == "train" and not check_loss(self, loss, self.nonfinite_loss, batch):
            restore_buffers(self, buffers)  # the bad forward also fed BatchNorm's running statistics
            return None
        acc = getattr(self, f"{stage}_acc")
        acc(logits, y)
        if stage == "train":
            self.log("train_loss", loss, prog_bar=True)
            # the epoch mean over all ranks, comparable between single-process and DDP runs
            self.log("train_loss_epoch", loss, on_step=False, on_epoch=True, sync_dist=True)
        else:
            self.log(f"{stage}_loss", loss, prog_bar=stage == "val", sync_dist=True)
        self.log(f"{stage}_acc", acc, prog_bar=stage != "train")
        if stage != "train":
            f1 = getattr(self, f"{stage}_f1")
            f1(logits, y)
            self.log(f"{stage}_f1", f1)
            self._log_extra_metrics(stage, logits, y)
        return loss

    def _log_extra_metrics(self, stage: str, logits: torch.Tensor, y: torch.Tensor) -> None:
        """Subclasses add validation/test metrics here (called with each batch's logits and labels)."""

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Optional[torch.Tensor]:
        """Cross-entropy of one training batch; logs loss and accuracy (``None`` skips a non-finite step)."""
        return self._shared_step(batch, "train")

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Log validation loss, accuracy and macro-F1."""
        self._shared_step(batch, "val")

    @override
    def test_step(self, batch: Any, batch_idx: int) -> None:
        """Log test loss, accuracy and macro-F1."""
        self._shared_step(batch, "test")

    @override
    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Predicted class of each input."""
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x).argmax(dim=-1)

    @override
    def configure_optimizers(self):
        """The injected optimiser (default AdamW) and scheduler over the trainable parameters."""
        return configure_optimization(self, [p for p in self.parameters() if p.requires_grad])

