"""FedSTO's detector as a LightningModule: a tiny CenterNet trained on labels, or on pseudo-labels of its EMA teacher.

The method (two stages, orthogonality, the Flower strategy and client) is :mod:`lightning_ext.federated.fedsto`;
the detector's network, loss and decoding are the detection family's pure core
(:mod:`lightning_ext.detection.centernet`).
"""

from __future__ import annotations

import copy
from typing import Any, Literal, Optional

import torch
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from typing_extensions import override

from lightning_ext.core.guards import check_loss, check_nonfinite_policy
from lightning_ext.core.optional import require
from lightning_ext.core.optimization import check_optimization
from lightning_ext.core.validation import (
    NonNegativeFloat,
    OpenUnitInterval,
    PositiveFloat,
    PositiveInt,
    check_fraction,
    check_number,
    check_positive_int,
)
from lightning_ext.detection.centernet import TinyCenterNet, centernet_loss, decode_detections


class EMATeacher(nn.Module):
    """A frozen copy of a network updated as ``theta_t <- d theta_t + (1 - d) theta_s`` after every step; ``ready``
    (a buffer) says whether it has been initialised from the student yet. Lives in the module's ``state_dict`` and
    hence in every Lightning checkpoint."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = copy.deepcopy(net)
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.register_buffer("ready", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def update(self, student: nn.Module, decay: float) -> None:
        """Copy the student the first time, then move towards it by ``1 - decay``."""
        if not bool(self.ready):
            self.net.load_state_dict(student.state_dict())
            self.ready.fill_(True)
            return
        for t, s in zip(self.net.state_dict().values(), student.state_dict().values()):
            if t.dtype.is_floating_point:
                t.mul_(decay).add_(s.detach(), alpha=1 - decay)
            else:
                t.copy_(s)


class FedSTODetector(LightningModule):
    """A tiny CenterNet (:class:`~lightning_ext.detection.centernet.TinyCenterNet`) that trains on labelled batches
    and, on batches without boxes, on pseudo-labels of its local EMA teacher (FedSTO's client).

    A training batch is ``(images, targets)``; targets that hold ``boxes`` and ``labels`` are used as they are
    (the server's supervised step), targets without them (unlabelled client data) get the teacher's detections
    scoring at least ``pseudo_label_threshold`` as boxes. The teacher (``self.teacher``, an :class:`EMATeacher`) is
    initialised from the student at the first training step and follows it with ``ema_decay`` after every step; it
    is part of the ``state_dict``, so it travels in every checkpoint (and a federated client keeps it local, see
    :class:`~lightning_ext.federated.fedsto.FedSTOClient`). Logs ``train_loss``, ``train_pseudo_boxes`` (per image),
    ``{val,test}_loss`` and ``{val,test}_ap50`` (torchmetrics ``MeanAveragePrecision`` at IoU 0.5, needs the
    ``[detection]`` extra for pycocotools).

    Args:
        num_classes: object classes.
        in_chans: image channels.
        widths: the backbone's three block widths.
        neck_width: channels of the neck.
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
        ema_decay: the teacher's EMA decay per step (Proposed 0.95: the paper's value is Unverified).
        pseudo_label_threshold: lowest teacher score kept as a pseudo-box (spec: 0.5, Proposed). A weak teacher may
            never reach it (docs/results/fedsto.md: the benchmark's warm start peaks at 0.4 on the clients' domain).
        size_weight, offset_weight: CenterNet's loss weights. The reference's 0.1 weighs sizes in output pixels at
            stride 4 (tens of units); sizes here are in stride-8 cells (a few units), so 1 (measured: AP50 on
            MNIST-5k canvases after 400 steps 0.25 with 1, 0.17 with 0.1). Offsets: 1, as the reference.
        max_detections: detections kept per image.
        nonfinite_loss: ``"error"``, ``"skip"`` or ``"warn"`` on a non-finite training loss.

    Example:
        >>> import torch
        >>> m = FedSTODetector()
        >>> x = torch.rand(2, 1, 64, 64)
        >>> targets = [{"image_id": torch.tensor(0)}, {"image_id": torch.tensor(1)}]  # unlabelled
        >>> boxes = m.pseudo_labels(x)
        >>> len(boxes), sorted(boxes[0])
        (2, ['boxes', 'labels'])
    """

    def __init__(self, num_classes: PositiveInt = 10, in_chans: PositiveInt = 1, widths: tuple[int, int, int] = (16, 32, 48),
                 neck_width: PositiveInt = 64, lr: PositiveFloat = 2e-3, weight_decay: NonNegativeFloat = 0.0,
                 ema_decay: OpenUnitInterval = 0.95, pseudo_label_threshold: OpenUnitInterval = 0.5,
                 size_weight: NonNegativeFloat = 1.0, offset_weight: NonNegativeFloat = 1.0,
                 max_detections: PositiveInt = 20, nonfinite_loss: Literal["error", "skip", "warn"] = "error") -> None:
        super().__init__()
        require("pycocotools", "FedSTODetector (torchmetrics' MeanAveragePrecision)")
        check_optimization(lr, weight_decay)
        check_fraction("ema_decay", ema_decay, allow_zero=False, allow_one=False)
        check_fraction("pseudo_label_threshold", pseudo_label_threshold, allow_zero=False, allow_one=False)
        check_number("size_weight", size_weight, low=0)
        check_number("offset_weight", offset_weight, low=0)
        check_positive_int("max_detections", max_detections)
        check_nonfinite_policy(nonfinite_loss)
        self.save_hyperparameters()
        self.net = TinyCenterNet(num_classes, in_chans, tuple(widths), neck_width)
        self.teacher = EMATeacher(self.net)
        from torchmetrics.detection import MeanAveragePrecision

        self.val_map = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", iou_thresholds=[0.5],
                                            backend="pycocotools")
        self.test_map = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", iou_thresholds=[0.5],
                                             backend="pycocotools")

    @override
    def forward(self, x: Tensor) -> Tensor:
        """The student's raw outputs ``(B, num_classes + 4, H / 8, W / 8)``."""
        return self.net(x)

    def detect(self, x: Tensor, net: Optional[nn.Module] = None, score_threshold: float = 0.0) -> list[dict]:
        """Detections per image (``boxes`` xyxy pixels, ``scores``, ``labels``) of the student (or ``net``)."""
        return decode_detections((net or self.net)(x), self.hparams.num_classes, self.hparams.max_detections,
                                 score_threshold)

    @torch.no_grad()
    def pseudo_labels(self, x: Tensor) -> list[dict]:
        """The teacher's detections scoring at least ``pseudo_label_threshold`` (the student before the teacher is
        initialised), as targets."""
        net = self.teacher.net if bool(self.teacher.ready) else self.net
        was = net.training
        net.eval()
        try:
            dets = self.detect(x, net, self.hparams.pseudo_label_threshold)
        finally:
            net.train(was)
        return [{"boxes": d["boxes"].detach(), "labels": d["labels"].detach()} for d in dets]

    def _loss(self, outputs: Tensor, targets: list) -> Tensor:
        return centernet_loss(outputs, targets, self.hparams.num_classes, self.hparams.size_weight,
                              self.hparams.offset_weight)[0]

    @override
    def on_train_start(self) -> None:
        """Initialise the EMA teacher from the student (once; a resumed fit keeps its teacher)."""
        if not bool(self.teacher.ready):
            self.teacher.update(self.net, self.hparams.ema_decay)

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Optional[Tensor]:
        """CenterNet's loss on the labels, or on the teacher's pseudo-labels for unlabelled targets."""
        x, targets = batch
        if all("boxes" in t for t in targets):
            used = [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets]
        elif any("boxes" in t for t in targets):
            raise ValueError("a batch mixes labelled and unlabelled targets; keep them in separate DataModules.")
        else:
            used = self.pseudo_labels(x)
            self.log("train_pseudo_boxes", sum(len(t["labels"]) for t in used) / len(used), batch_size=len(x))
        loss = self._loss(self.net(x), used)
        if not check_loss(self, loss, self.hparams.nonfinite_loss, batch):
            return None
        self.log("train_loss", loss, batch_size=len(x))
        return loss

    @override
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Move the EMA teacher towards the student after the step."""
        self.teacher.update(self.net, self.hparams.ema_decay)

    def _evaluate(self, batch: Any, stage: str, metric: Any) -> None:
        x, targets = batch
        outputs = self.net(x)
        self.log(f"{stage}_loss", self._loss(outputs, targets), batch_size=len(x))
        preds = decode_detections(outputs, self.hparams.num_classes, self.hparams.max_detections)
        metric.update(preds, [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets])

    def _log_map(self, stage: str, metric: Any) -> None:
        self.log(f"{stage}_ap50", metric.compute()["map"].clamp(min=0))
        metric.reset()

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Validation loss; detections into the AP@0.5 metric."""
        self._evaluate(batch, "val", self.val_map)

    @override
    def on_validation_epoch_end(self) -> None:
        """Log ``val_ap50``."""
        self._log_map("val", self.val_map)

    @override
    def test_step(self, batch: Any, batch_idx: int) -> None:
        """Test loss; detections into the AP@0.5 metric."""
        self._evaluate(batch, "test", self.test_map)

    @override
    def on_test_epoch_end(self) -> None:
        """Log ``test_ap50``."""
        self._log_map("test", self.test_map)

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Adam over the student (the teacher has no gradients)."""
        return torch.optim.Adam(self.net.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
