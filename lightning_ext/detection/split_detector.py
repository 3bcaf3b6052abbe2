"""``SplitComputingDetector``: a trained DETRDetector whose head network is replaced by a quantised bottleneck,
trained by head-network distillation (HND or GHND)."""

from __future__ import annotations

import copy
import inspect
from typing import Any, Literal, Optional

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from typing_extensions import override

from lightning_ext.core.checkpoints import load_checkpoint, read_state_dict
from lightning_ext.core.guards import NonFiniteLoss, check_loss, check_nonfinite_policy, refuse_skip_under_ddp
from lightning_ext.core.optimization import check_optimization, configure_optimization
from lightning_ext.core.optional import require
from lightning_ext.core.validation import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, check_choice
from lightning_ext.core.validation import ClosedUnitInterval, check_fraction, check_number, check_positive_int
from lightning_ext.detection.detr import DETRDetector, check_targets
from lightning_ext.detection.detr_net import postprocess
from lightning_ext.detection.head_distillation import HeadDistiller
from lightning_ext.detection.split_computing import BottleneckCodec, NeuralFilter, dequantize
from lightning_ext.detection.split_computing import quantize
from lightning_ext.detection.split_computing import payload_bytes

__all__ = ["SplitComputingDetector"]


class QuantizedBottleneck(nn.Module):
    """A :class:`BottleneckCodec` whose transmitted tensor is quantised to ``num_bits`` (``None``: not quantised)
    in eval mode; records the payload bytes of each image of the last batch."""

    def __init__(self, codec: BottleneckCodec, num_bits: Optional[int]) -> None:
        super().__init__()
        self.codec, self.num_bits, self.last_bytes = codec, num_bits, []

    def forward(self, x: Tensor) -> Tensor:
        z = self.codec.encode(x)
        if self.num_bits is not None and not self.training:
            codes = [quantize(zi, self.num_bits) for zi in z]
            self.last_bytes = [payload_bytes(q) for q in codes]
            z = torch.stack([dequantize(q) for q in codes]).to(z)
        return self.codec.decode(z)


def trunk_layers(net: nn.Module, tap: int) -> list[str]:
    """Names (relative to a :class:`DETRDetector`) of backbone module ``tap``, the projection and the last encoder
    layer: the stage outputs HND (the first) and GHND (all) match."""
    names = [f"net.backbone.{tap}", "net.proj"]
    return names + ([f"net.encoder.{len(net.encoder) - 1}"] if len(net.encoder) else [])


class SplitComputingDetector(LightningModule):
    r"""Split computing for edge-assisted detection (Matsubara and Levorato, ICPR 2020): a trained `DETRDetector`'s
    head network replaced by a quantised bottleneck, trained by head-network distillation (HND or GHND).

    Paper: "Neural Compression and Filtering for Edge-assisted Real-time Object Detection in Challenged Networks"
    (arXiv 2007.15818; reference code https://github.com/yoshitomo-matsubara/hnd-ghnd-object-detectors). The
    teacher is a trained :class:`~lightning_ext.detection.detr.DETRDetector` (``backbone="cnn"``); the student is
    its copy with backbone block ``split_block`` (a stride-1 conv-BN-ReLU block, the analogue of ResNet's
    ``layer1``) replaced by a :class:`~lightning_ext.detection.split_computing.BottleneckCodec` whose
    ``bottleneck_channels``-wide tensor is what the mobile device sends (quantised to ``quantize_bits`` in
    evaluation). Only the codec trains, by head-network distillation: ``distill="hnd"`` matches the replaced
    block's output, :math:`\|f^S - f^T\|^2`; ``"ghnd"`` also the later stages' outputs (projected features and
    encoder memory; frozen), :math:`\sum_l \|f^S_l - f^T_l\|^2` (sum-reduced, as the reference code). Logs
    ``train_loss``, ``{val,test}_map``/``_map_50``/``_map_75`` of the student's detections and
    ``{val,test}_bottleneck_bytes`` (mean payload per image).

    With ``filter_threshold`` set, a :class:`~lightning_ext.detection.split_computing.NeuralFilter` on the frozen
    first backbone block's output (the stem, computed on the device anyway) learns "holds an object" by
    cross-entropy beside the distillation (its own parameters, the stem detached), and in evaluation a frame
    whose object probability is below the threshold is not transmitted: no detections, 0 bytes. Then
    ``{val,test}_filter_object_kept`` (share of frames with objects that were sent) and
    ``{val,test}_filter_empty_dropped`` (share of empty frames dropped) are logged too.

    Args:
        teacher_checkpoint: a DETRDetector checkpoint (Lightning ``.ckpt``, read with ``weights_only=True``).
        bottleneck_channels: channels of the transmitted tensor (narrower than the replaced block's input).
        split_block: index of the backbone block to replace (must keep the spatial size: stride 1).
        distill: ``"hnd"`` or ``"ghnd"``.
        quantize_bits: bits per value of the transmitted tensor in evaluation (2..8); ``0`` keeps float32.
        lr, weight_decay, optimizer, scheduler, scheduler_interval: the optimiser (default AdamW).
        nonfinite_loss: ``"error"``, ``"skip"`` or ``"warn"`` on a non-finite training loss.
        filter_threshold: object probability below which the neural filter drops a frame in evaluation
            (``None``: no filter).
        filter_pool: the filter's first adaptive pooling size (the reference uses 64 on 224-px inputs' stems).

    Example:
        >>> import tempfile, torch
        >>> from lightning_ext.detection.detr import DETRDetector
        >>> teacher = DETRDetector(hidden_dim=32, num_queries=6, decoder_layers=2)
        >>> path = tempfile.mkdtemp() + "/teacher.ckpt"
        >>> torch.save({"state_dict": teacher.state_dict(), "hyper_parameters": dict(teacher.hparams)}, path)
        >>> model = SplitComputingDetector(path, bottleneck_channels=4, filter_threshold=0.5).eval()
        >>> out = model(torch.rand(2, 1, 48, 48))
        >>> model.bottleneck.last_bytes  # 4 channels x (6 + 4) x (6 + 4) at 8 bits, plus scale and zero point
        [408, 408]
    """

    def __init__(self, teacher_checkpoint: Optional[str] = None, bottleneck_channels: PositiveInt = 3, split_block: NonNegativeInt = 3,
                 distill: Literal["hnd", "ghnd"] = "ghnd", quantize_bits: NonNegativeInt = 8, lr: PositiveFloat = 1e-3,
                 weight_decay: NonNegativeFloat = 0.0, optimizer: Optional[OptimizerCallable] = None,
                 scheduler: Optional[LRSchedulerCallable] = None,
                 scheduler_interval: Literal["epoch", "step"] = "epoch", nonfinite_loss: NonFiniteLoss = "error",
                 filter_threshold: Optional[ClosedUnitInterval] = None, filter_pool: PositiveInt = 16) -> None:
        super().__init__()
        require("pycocotools", "SplitComputingDetector (torchmetrics' MeanAveragePrecision)")
        check_positive_int("bottleneck_channels", bottleneck_channels)
        check_number("split_block", split_block, low=0, integer=True)
        check_choice("distill", distill, ("hnd", "ghnd"))
        check_number("quantize_bits", quantize_bits, low=0, high=8, integer=True)
        if quantize_bits == 1:
            raise ValueError("quantize_bits must be 0 (no quantisation) or 2..8; got 1.")
        check_optimization(lr, weight_decay)
        check_nonfinite_policy(nonfinite_loss)
        check_choice("scheduler_interval", scheduler_interval, ("epoch", "step"))
        if filter_threshold is not None:
            check_fraction("filter_threshold", filter_threshold)
        check_number("filter_pool", filter_pool, low=16, integer=True)
        if not isinstance(teacher_checkpoint, str) or not teacher_checkpoint:
            raise ValueError("teacher_checkpoint must be the path of a trained DETRDetector checkpoint; got "
                             f"{teacher_checkpoint!r}.")
        ckpt = load_checkpoint(teacher_checkpoint, "Teacher checkpoint", "teacher_checkpoint")
        hp = dict(ckpt.get("hyper_parameters") or {})
        if not hp:
            raise ValueError(f"teacher_checkpoint {teacher_checkpoint} has no hyper_parameters; give a DETRDetector "
                             "checkpoint saved by Lightning.")
        if hp.get("backbone", "cnn") != "cnn":
            raise ValueError(f"teacher_checkpoint: the teacher's backbone is {hp['backbone']!r}; split computing "
                             "here supports DETRDetector(backbone='cnn').")
        known = set(inspect.signature(DETRDetector.__init__).parameters) - {"self"}
        kwargs = {k: (float(v) if isinstance(v, float) else int(v) if isinstance(v, int) and not isinstance(v, bool)
                      else v) for k, v in hp.items() if k in known}
        kwargs["sample_images_every_n_epochs"] = 0
        teacher = DETRDetector(**kwargs)
        teacher.load_state_dict(read_state_dict(ckpt, teacher.state_dict().keys(), "teacher_checkpoint"))
        blocks = len(teacher.net.backbone) // 3
        if split_block >= blocks:
            raise ValueError(f"split_block must be < {blocks} (the teacher's backbone blocks); got {split_block}.")
        conv = teacher.net.backbone[3 * split_block]
        if conv.stride != (1, 1):
            raise ValueError(f"split_block {split_block} has stride {conv.stride[0]}; the bottleneck keeps the spatial "
                             "size: pick a stride-1 block (3 in the default CNN).")
        codec = BottleneckCodec(conv.in_channels, bottleneck_channels, conv.out_channels)
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.teacher = teacher.eval().requires_grad_(False)
        self.student = copy.deepcopy(teacher).requires_grad_(False)
        old = list(self.student.net.backbone)
        self.bottleneck = QuantizedBottleneck(codec, quantize_bits or None)
        self.student.net.backbone = nn.Sequential(*old[:3 * split_block], self.bottleneck, *old[3 * split_block + 3:])
        self.tap_teacher, self.tap_student = 3 * split_block + 2, 3 * split_block
        self.distill, self.num_classes = distill, teacher.num_classes
        # the shared HND/GHND core (also behind the HeadNetworkDistillation callback): hooks on the student's
        # bottleneck, projection and encoder output against the teacher's replaced block, projection and encoder
        self._distiller = HeadDistiller(self.student, self.teacher, trunk_layers(self.student.net, self.tap_student),
                                        trunk_layers(self.teacher.net, self.tap_teacher), method=distill)
        self.filter_threshold = filter_threshold
        self.filter = NeuralFilter(old[0].out_channels, pool=filter_pool) if filter_threshold is not None else None
        self._filter_counts = torch.zeros(4)  # object frames kept, object frames, empty frames dropped, empty frames
        self.lr, self.weight_decay = lr, weight_decay
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.scheduler_interval, self.nonfinite_loss, self.skipped_steps = scheduler_interval, nonfinite_loss, 0
        from torchmetrics.detection import MeanAveragePrecision

        self.val_map = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="pycocotools")
        self.test_map = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="pycocotools")
        self._bytes: list[int] = []

    @override
    def train(self, mode: bool = True) -> "SplitComputingDetector":
        """Only the bottleneck trains: the teacher and the student's frozen parts stay in eval mode (BN statistics)."""
        super().train(False)
        self.bottleneck.train(mode)
        if self.filter is not None:
            self.filter.train(mode)
        return self

    @override
    def forward(self, x: Tensor) -> dict:
        """The student's raw outputs."""
        return self.student.net(x)

    @override
    def setup(self, stage: str) -> None:
        """Refuse ``nonfinite_loss='skip'`` under DDP."""
        refuse_skip_under_ddp(self, self.nonfinite_loss)

    def distillation_loss(self, x: Tensor) -> Tensor:
        """HND: the replaced block's output; GHND: that plus projected features and encoder memory (both forward
        passes stop after the encoder)."""
        self._distiller.method = self.distill
        return self._distiller.loss(x, student_forward=self.student.net)

    def stem(self, x: Tensor) -> Tensor:
        """The frozen first backbone block's output (the neural filter's input)."""
        with torch.no_grad():
            return self.student.net.backbone[:3](x)

    @staticmethod
    def has_objects(targets: Any) -> Tensor:
        """``(B,)`` long: 1 where the target holds at least one box."""
        return torch.as_tensor([int(len(t["boxes"]) > 0) for t in targets], dtype=torch.long)

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Optional[Tensor]:
        """Head-network distillation loss of one batch, plus the filter's cross-entropy when there is a filter."""
        x = batch[0]
        loss = self.distillation_loss(x)
        if self.filter is not None:
            ce = torch.nn.functional.cross_entropy(self.filter(self.stem(x)), self.has_objects(batch[1]).to(x.device))
            self.log("train_filter_loss", ce, batch_size=len(x))
            loss = loss + ce
        if not check_loss(self, loss, self.nonfinite_loss, batch):
            return None
        self.log("train_loss", loss, prog_bar=True, batch_size=len(x))
        return loss

    def _eval(self, batch: Any, stage: str) -> None:
        x, targets = batch
        check_targets(x, targets, self.num_classes)
        preds = postprocess(self.student.net(x), tuple(x.shape[-2:]), self.student.top_k)
        sent = self.bottleneck.last_bytes or [4 * int(self.bottleneck.codec.encode(x[:1]).numel())] * len(x)
        if self.filter is not None:
            keep = self.filter.keep(self.stem(x), self.filter_threshold).cpu()
            objects = self.has_objects(targets).bool()
            self._filter_counts += torch.tensor([float((keep & objects).sum()), float(objects.sum()),
                                                 float((~keep & ~objects).sum()), float((~objects).sum())])
            for i in torch.nonzero(~keep).flatten().tolist():  # not transmitted: nothing detected, nothing sent
                preds[i] = {key: value[:0] for key, value in preds[i].items()}
                sent[i] = 0
        getattr(self, f"{stage}_map").update(preds, [{"boxes": t["boxes"].float(), "labels": t["labels"].long()}
                                                     for t in targets])
        self._bytes += list(sent)

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """The student's detections (quantised bottleneck) into mAP."""
        self._eval(batch, "val")

    @override
    def test_step(self, batch: Any, batch_idx: int) -> None:
        """The student's detections (quantised bottleneck) into mAP."""
        self._eval(batch, "test")

    def _log(self, stage: str) -> None:
        result = getattr(self, f"{stage}_map").compute()
        for key in ("map", "map_50", "map_75"):
            self.log(f"{stage}_{key}", result[key].float(), prog_bar=key == "map")
        getattr(self, f"{stage}_map").reset()
        if self._bytes:
            self.log(f"{stage}_bottleneck_bytes", float(sum(self._bytes) / len(self._bytes)))
        self._bytes = []
        kept, objects, dropped, empty = self._filter_counts.tolist()
        if self.filter is not None and objects:
            self.log(f"{stage}_filter_object_kept", kept / objects)
        if self.filter is not None and empty:
            self.log(f"{stage}_filter_empty_dropped", dropped / empty)
        self._filter_counts = torch.zeros(4)

    @override
    def on_validation_epoch_end(self) -> None:
        """Log validation mAP and payload bytes."""
        self._log("val")

    @override
    def on_test_epoch_end(self) -> None:
        """Log test mAP and payload bytes."""
        self._log("test")

    @override
    def configure_optimizers(self):
        """The injected optimiser (default AdamW) over the bottleneck's (and the filter's) parameters."""
        extra = list(self.filter.parameters()) if self.filter is not None else []
        return configure_optimization(self, list(self.bottleneck.parameters()) + extra)
