"""``DETRDetector``: a LightningModule around :class:`~lightning_ext.detection.detr_net.DETRNet` (D-FINE or
L1+GIoU head), with mAP through torchmetrics and sample detections drawn on images."""

from __future__ import annotations

from typing import Any, Literal, Optional, Sequence

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor
from torchvision.ops import box_convert
from typing_extensions import override

from lightning_ext.core.guards import NonFiniteLoss, check_loss, check_nonfinite_policy, refuse_skip_under_ddp
from lightning_ext.core.optimization import check_num_classes, check_optimization, configure_optimization
from lightning_ext.core.optional import require
from lightning_ext.core.paths import check_path_argument
from lightning_ext.core.samples import log_sample_image, sample_epoch_due
from lightning_ext.core.validation import (
    AtLeastTwoInt,
    NonNegativeFloat,
    NonNegativeInt,
    OpenUnitInterval,
    PositiveFloat,
    PositiveInt,
    check_choice,
    check_fraction,
    check_non_negative,
    check_number,
    check_positive,
    check_positive_int,
)
from lightning_ext.detection.detr_net import DETRCriterion, DETRNet, postprocess

__all__ = ["DETRDetector", "check_targets", "draw_detections"]


def check_targets(images: Tensor, targets: Any, num_classes: int) -> None:
    """Refuse targets that do not fit the images: one dict per image, boxes ``(n, 4)`` xyxy inside the image
    with positive size, labels in ``[0, num_classes)``; one line naming what to change."""
    if not isinstance(targets, (list, tuple)) or len(targets) == 0:
        raise ValueError(f"DETRDetector expects batches (images, targets) with a list of one target dict per image; "
                         f"got an empty or non-list target ({type(targets).__name__}). Use DigitCanvasDetection"
                         "DataModule's detection_collate, and give an image without objects an empty `boxes` (0, 4).")
    if len(targets) != len(images):
        raise ValueError(f"got {len(targets)} target dicts for {len(images)} images; give one per image.")
    h, w = images.shape[-2:]
    for i, t in enumerate(targets):
        boxes, labels = t.get("boxes"), t.get("labels")
        if boxes is None or labels is None:
            raise ValueError(f"target {i} needs `boxes` (n, 4) xyxy pixels and `labels` (n,); got keys {sorted(t)}.")
        if boxes.dim() != 2 or boxes.shape[-1] != 4 or len(boxes) != len(labels):
            raise ValueError(f"target {i}: `boxes` must be (n, 4) with one label each; got boxes "
                             f"{tuple(boxes.shape)} and {len(labels)} labels.")
        if len(boxes) == 0:
            continue
        if not bool(torch.isfinite(boxes).all()):
            raise ValueError(f"target {i} has non-finite box coordinates.")
        if bool((boxes[:, 0] < 0).any() | (boxes[:, 1] < 0).any() | (boxes[:, 2] > w).any() | (boxes[:, 3] > h).any()):
            raise ValueError(f"target {i} has a box outside the {h}x{w} image ({boxes.tolist()[:3]}...); boxes are "
                             "xyxy in pixels: clip them to the image.")
        if bool(((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])).any()):
            raise ValueError(f"target {i} has a box with x2 <= x1 or y2 <= y1; boxes are xyxy (not xywh).")
        if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
            raise ValueError(f"target {i} has labels {int(labels.min())}..{int(labels.max())} but num_classes="
                             f"{num_classes}; set `num_classes` to at least {int(labels.max()) + 1}.")


def draw_detections(images: Tensor, preds: Sequence[dict], targets: Sequence[dict],
                    score_threshold: float = 0.3, scale: int = 1) -> Tensor:
    """A ``(3, H, k*W)`` uint8 strip: each image (its range widened to at least [0, 1], so a blank noisy canvas
    stays dark) with its ground truth boxes in green and the predictions scoring at least ``score_threshold`` in
    red, labelled ``class:score``; ``scale`` enlarges the images (nearest neighbour) so labels stay readable."""
    from torchvision.utils import draw_bounding_boxes

    tiles = []
    for img, p, t in zip(images, preds, targets):
        g = img[:1]
        lo, hi = min(float(g.min()), 0.0), max(float(g.max()), 1.0)
        g = ((g - lo) / (hi - lo) * 255).round().to(torch.uint8).expand(3, -1, -1)
        g = g.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
        if len(t["boxes"]):
            g = draw_bounding_boxes(g, t["boxes"].float() * scale, colors="lime", width=1)
        keep = p["scores"] >= score_threshold
        if bool(keep.any()):
            words = [f"{int(c)}:{float(s):.2f}" for c, s in zip(p["labels"][keep], p["scores"][keep])]
            g = draw_bounding_boxes(g, p["boxes"][keep].float() * scale, labels=words, colors="red", width=1)
        tiles.append(torch.nn.functional.pad(g, (1, 1, 1, 1), value=255))
    return torch.cat(tiles, -1)


class DETRDetector(LightningModule):
    r"""DETR object detector with a D-FINE head (FDR + GO-LSD) or an L1+GIoU regression head (`box_head`).

    Paper: "D-FINE: Redefine Regression Task in DETRs as Fine-grained Distribution Refinement" (Peng et al., ICLR
    2025, arXiv 2410.13842; reference code https://github.com/Peterande/D-FINE). With ``box_head="fdr"`` each
    decoder layer refines per-edge distributions over ``reg_max + 1`` bins of the weighting function
    :math:`W(n)`, box :math:`= \mathrm{distance2bbox}(ref, \sum_n \mathrm{softmax}(\ell)_n W(n))`, trained with
    the fine-grained localisation loss (FGL) and, with ``go_lsd``, the decoupled distillation focal loss (DDF) from
    the last layer to the earlier ones plus GO matching; with ``box_head="l1_giou"`` each layer regresses a box
    delta (RT-DETR's iterative refinement). Both: varifocal classification loss, L1 + GIoU, Hungarian matching
    (scipy), encoder top-k query selection. Loss: :math:`\lambda_{vfl}L_{VFL} + \lambda_{L1}L_{L1} +
    \lambda_{GIoU}L_{GIoU} + \lambda_{FGL}L_{FGL} + \lambda_{DDF}L_{DDF}` (defaults 1, 5, 2, 0.15, 1.5 as in the
    reference configuration). The network is scaled to a CPU (see :mod:`lightning_ext.detection.detr_net`).

    Batches are ``(images (B, C, H, W), targets)``, targets a list of dicts with ``boxes`` (xyxy pixels) and
    ``labels`` (:class:`~lightning_ext.detection.digit_canvas.DigitCanvasDetectionDataModule`). Logs
    ``train_loss`` (and ``train/<term>``), ``{val,test}_loss``, ``{val,test}_map``, ``_map_50``, ``_map_75``
    (torchmetrics ``MeanAveragePrecision``, COCO protocol, needs the ``[detection]`` extra). Every
    ``sample_images_every_n_epochs`` validation epochs the first validation images with their ground truth
    (green) and detections (red) are saved under ``sample_images_dir`` and logged to TensorBoard.

    Under DDP the losses are normalised by the box count averaged over ranks (the reference code's all-reduce),
    so the L1+GIoU head and FDR without GO-LSD train as one process on the global batch would (a two-process gloo
    test checks it); DDF (GO-LSD) weighs positives and negatives by per-process means and ``8 / B`` with the
    per-process batch, as the reference does, so it is not the one-process loss of the global batch. mAP is
    gathered across ranks by torchmetrics. BatchNorm statistics are per process unless the Trainer has
    ``sync_batchnorm=True``.

    Args:
        num_classes: object classes.
        in_chans: image channels.
        backbone: ``"cnn"`` (a 4-layer stride-8 CNN) or a timm model name (its stride-8 feature map).
        hidden_dim, num_heads, ffn_dim, encoder_layers, decoder_layers, num_queries: the transformer.
        box_head: ``"fdr"`` (D-FINE) or ``"l1_giou"`` (baseline).
        go_lsd: with ``"fdr"``, add DDF self-distillation and GO matching.
        reg_max, reg_scale, up: FDR's bins (``reg_max + 1``), curvature and range of :math:`W(n)`.
        vfl_weight, bbox_weight, giou_weight, fgl_weight, ddf_weight: loss weights.
        ddf_temperature: DDF's :math:`T`.
        top_k: detections kept per image for mAP.
        lr, weight_decay, optimizer, scheduler, scheduler_interval: the optimiser (default AdamW).
        nonfinite_loss: ``"error"``, ``"skip"`` or ``"warn"`` on a non-finite training loss.
        sample_images_every_n_epochs: how often to save sample detections (0: never).
        sample_images_dir: where (relative to ``trainer.log_dir``; ``None`` disables the files).
        num_sample_images: images in each strip.
        score_threshold: lowest score drawn in the sample images.

    Example:
        >>> model = DETRDetector(hidden_dim=32, num_queries=5, decoder_layers=2)
        >>> preds = model.predict_boxes(torch.randn(2, 1, 32, 32))
        >>> len(preds), sorted(preds[0])
        (2, ['boxes', 'labels', 'scores'])
    """

    def __init__(
        self,
        num_classes: AtLeastTwoInt = 10,
        in_chans: PositiveInt = 1,
        backbone: str = "cnn",
        hidden_dim: PositiveInt = 64,
        num_heads: PositiveInt = 4,
        ffn_dim: PositiveInt = 128,
        encoder_layers: NonNegativeInt = 1,
        decoder_layers: PositiveInt = 3,
        num_queries: PositiveInt = 20,
        box_head: Literal["fdr", "l1_giou"] = "fdr",
        go_lsd: bool = True,
        reg_max: PositiveInt = 32,
        reg_scale: PositiveFloat = 4.0,
        up: PositiveFloat = 0.5,
        vfl_weight: NonNegativeFloat = 1.0,
        bbox_weight: NonNegativeFloat = 5.0,
        giou_weight: NonNegativeFloat = 2.0,
        fgl_weight: NonNegativeFloat = 0.15,
        ddf_weight: NonNegativeFloat = 1.5,
        ddf_temperature: PositiveFloat = 5.0,
        top_k: PositiveInt = 100,
        lr: PositiveFloat = 5e-4,
        weight_decay: NonNegativeFloat = 1.25e-4,
        optimizer: Optional[OptimizerCallable] = None,
        scheduler: Optional[LRSchedulerCallable] = None,
        scheduler_interval: Literal["epoch", "step"] = "epoch",
        nonfinite_loss: NonFiniteLoss = "error",
        sample_images_every_n_epochs: NonNegativeInt = 5,
        sample_images_dir: Optional[str] = "samples",
        num_sample_images: PositiveInt = 4,
        score_threshold: OpenUnitInterval = 0.3,
    ) -> None:
        super().__init__()
        require("pycocotools", "DETRDetector (torchmetrics' MeanAveragePrecision)")
        check_num_classes(num_classes)
        for name, value in (("in_chans", in_chans), ("hidden_dim", hidden_dim), ("num_heads", num_heads),
                            ("ffn_dim", ffn_dim), ("decoder_layers", decoder_layers), ("num_queries", num_queries),
                            ("reg_max", reg_max), ("top_k", top_k), ("num_sample_images", num_sample_images)):
            check_positive_int(name, value)
        check_number("encoder_layers", encoder_layers, low=0, integer=True)
        if hidden_dim % num_heads or hidden_dim % 4:
            raise ValueError(f"hidden_dim ({hidden_dim}) must be a multiple of num_heads ({num_heads}) and of 4.")
        if reg_max < 4 or reg_max % 2:
            raise ValueError(f"reg_max must be an even integer >= 4 (the reference uses 32); got {reg_max}.")
        if not isinstance(backbone, str) or not backbone:
            raise ValueError(f"backbone must be 'cnn' or a timm model name; got {backbone!r}.")
        check_choice("box_head", box_head, ("fdr", "l1_giou"))
        for name, value in (("reg_scale", reg_scale), ("up", up), ("ddf_temperature", ddf_temperature)):
            check_positive(name, value)
        for name, value in (("vfl_weight", vfl_weight), ("bbox_weight", bbox_weight), ("giou_weight", giou_weight),
                            ("fgl_weight", fgl_weight), ("ddf_weight", ddf_weight)):
            check_non_negative(name, value)
        check_optimization(lr, weight_decay)
        check_nonfinite_policy(nonfinite_loss)
        check_choice("scheduler_interval", scheduler_interval, ("epoch", "step"))
        check_number("sample_images_every_n_epochs", sample_images_every_n_epochs, low=0, integer=True)
        check_path_argument("sample_images_dir", sample_images_dir)
        check_fraction("score_threshold", score_threshold, allow_zero=False, allow_one=False)
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.net = DETRNet(num_classes, in_chans, backbone, hidden_dim, num_heads, ffn_dim, encoder_layers,
                           decoder_layers, num_queries, box_head, reg_max, reg_scale, up)
        self.criterion = DETRCriterion(box_head, go_lsd, {"vfl": vfl_weight, "bbox": bbox_weight, "giou": giou_weight,
                                                          "fgl": fgl_weight, "ddf": ddf_weight}, ddf_temperature)
        from torchmetrics.detection import MeanAveragePrecision

        self.val_map = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="pycocotools")
        self.test_map = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="pycocotools")
        self.num_classes, self.top_k = num_classes, top_k
        self.lr, self.weight_decay = lr, weight_decay
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.scheduler_interval, self.nonfinite_loss, self.skipped_steps = scheduler_interval, nonfinite_loss, 0
        self.sample_every, self.sample_dir, self.num_samples = sample_images_every_n_epochs, sample_images_dir, num_sample_images
        self.score_threshold = score_threshold
        self._sample: Optional[tuple] = None

    @override
    def forward(self, x: Tensor) -> dict:
        """The network's raw outputs (per-layer logits and normalised cxcywh boxes)."""
        return self.net(x)

    def predict_boxes(self, x: Tensor) -> list[dict]:
        """Detections per image: ``boxes`` (xyxy pixels), ``scores``, ``labels`` (the ``top_k`` best)."""
        return postprocess(self.net(x), tuple(x.shape[-2:]), self.top_k)

    @override
    def setup(self, stage: str) -> None:
        """Refuse ``nonfinite_loss='skip'`` under DDP."""
        refuse_skip_under_ddp(self, self.nonfinite_loss)

    def _normalised(self, x: Tensor, targets: Sequence[dict]) -> list[dict]:
        h, w = x.shape[-2:]
        scale = x.new_tensor([w, h, w, h])
        return [{"labels": t["labels"].long(), "boxes": box_convert(t["boxes"].float().reshape(-1, 4), "xyxy", "cxcywh")
                 / scale} for t in targets]

    def _step(self, batch: Any, stage: str, batch_idx: int) -> Optional[Tensor]:
        x, targets = batch
        check_targets(x, targets, self.num_classes)
        out = self.net(x)
        loss, terms = self.criterion(out, self._normalised(x, targets))
        if stage == "train":
            if not check_loss(self, loss, self.nonfinite_loss, batch):
                return None
            self.log("train_loss", loss, prog_bar=True, batch_size=len(x))
            self.log_dict({f"train/{k}": v for k, v in terms.items()}, batch_size=len(x))
            return loss
        self.log(f"{stage}_loss", loss, sync_dist=True, batch_size=len(x))
        preds = postprocess(out, tuple(x.shape[-2:]), self.top_k)
        getattr(self, f"{stage}_map").update([{k: v.detach() for k, v in p.items()} for p in preds],
                                             [{"boxes": t["boxes"].float(), "labels": t["labels"].long()}
                                              for t in targets])
        if stage == "val" and batch_idx == 0:
            k = self.num_samples
            self._sample = (x[:k].detach().cpu(), [{n: v.detach().cpu() for n, v in p.items()} for p in preds[:k]],
                            [{n: v.detach().cpu() for n, v in t.items()} for t in targets[:k]])
        return loss

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Optional[Tensor]:
        """The set loss of one batch."""
        return self._step(batch, "train", batch_idx)

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Validation loss; detections into the mAP metric."""
        self._step(batch, "val", batch_idx)

    @override
    def test_step(self, batch: Any, batch_idx: int) -> None:
        """Test loss; detections into the mAP metric."""
        self._step(batch, "test", batch_idx)

    def _log_map(self, stage: str) -> None:
        metric = getattr(self, f"{stage}_map")
        result = metric.compute()
        for key in ("map", "map_50", "map_75"):
            self.log(f"{stage}_{key}", result[key].float(), prog_bar=key == "map")
        metric.reset()

    @override
    def on_validation_epoch_end(self) -> None:
        """Log ``val_map``/``_50``/``_75``; every ``sample_images_every_n_epochs`` epochs save sample detections."""
        self._log_map("val")
        sample, self._sample = self._sample, None
        if sample is None or not sample_epoch_due(self, self.sample_every):
            return
        strip = draw_detections(*sample, score_threshold=self.score_threshold,
                                scale=max(1, 160 // int(sample[0].shape[-1])))
        log_sample_image(self, strip.float() / 255.0, "val_detections", self.sample_dir,
                         f"epoch {self.current_epoch + 1}: ground truth (green), detections >= {self.score_threshold} (red)")

    @override
    def on_test_epoch_end(self) -> None:
        """Log ``test_map``/``_50``/``_75``."""
        self._log_map("test")

    @override
    def configure_optimizers(self):
        """The injected optimiser (default AdamW) and scheduler."""
        return configure_optimization(self, [p for p in self.parameters() if p.requires_grad])
