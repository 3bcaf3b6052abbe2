"""``VolumetricSegmenter``: patch training with deep supervision and sliding-window inference for 2D/3D volumes."""

from __future__ import annotations

from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from typing_extensions import override

from lightning_ext.core.checkpoints import read_state_dict
from lightning_ext.core.guards import NonFiniteLoss, check_loss, check_nonfinite_policy, refuse_skip_under_ddp
from lightning_ext.core.optimization import check_optimization
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
    check_number,
    check_positive_int,
)
from lightning_ext.segmentation.module import _sample_grid
from lightning_ext.segmentation.stunet import STUNet

__all__ = ["VolumetricSegmenter", "deep_supervision_weights"]


def deep_supervision_weights(n: int) -> list[float]:
    """nnU-Net's weights of ``n`` deep-supervision outputs: :math:`2^{-i}`, the coarsest set to 0, sum 1.

    Example:
        >>> [round(w * 15) for w in deep_supervision_weights(5)]
        [8, 4, 2, 1, 0]
    """
    w = [0.5 ** i for i in range(n)]
    if n > 1:
        w[-1] = 0.0
    total = sum(w)
    return [v / total for v in w]


def _default_net(in_channels: int, num_classes: int, spatial_dims: int) -> STUNet:
    return STUNet(in_channels, num_classes, [1] * 6, [8, 16, 32, 64, 64, 64],
                  [[2] * spatial_dims] * 4 + [[1] * spatial_dims], spatial_dims=spatial_dims)


class VolumetricSegmenter(LightningModule):
    r"""Patch training with deep supervision and sliding-window inference for 2D/3D volumes (STU-Net's recipe).

    Paper: "STU-Net: Scalable and Transferable Medical Image Segmentation Models Empowered by Large-Scale
    Supervised Pre-training" (Huang et al., arXiv 2304.06716); reference code https://github.com/uni-medical/STU-Net
    (``STUNetTrainer.py`` on nnU-Net v1's ``nnUNetTrainerV2``).

    Training: the net returns deep-supervision outputs (full resolution first); the loss is
    :math:`\sum_i w_i\,(\mathrm{Dice}_{batch} + \mathrm{CE})(o_i, \downarrow_i y)` with nnU-Net's weights
    (:func:`deep_supervision_weights`) and the label map downsampled by nearest neighbour to each output's size
    (MONAI ``DiceCELoss(batch=True)``, nnU-Net's batch Dice). Default optimiser: SGD, momentum 0.99, Nesterov,
    weight decay 3e-5, with nnU-Net's poly schedule :math:`lr = lr_0 (1 - t/T)^{0.9}` per optimiser step over the
    fit's stepping batches (from scratch ``lr=1e-2``; the official fine-tuning lr is ``1e-3``). Validation and test
    run MONAI's ``sliding_window_inference`` (Gaussian blending) over whole volumes and log Dice per foreground
    class (``{val,test}_dice_<c>``) and their mean (``{val,test}_dice``) through torchmetrics ``DiceScore``.
    Every ``sample_images_every_n_epochs`` validation epochs the middle slice of the first validation volume
    is saved as input / target / prediction (PNG under ``trainer.log_dir``; TensorBoard when used).

    Args:
        net: the network (default: a 1.48 M-parameter :class:`STUNet` of depth 1, dims 8..64, four 2x pools).
        in_channels: image channels (for the default net).
        num_classes: classes including background.
        spatial_dims: 3 for volumes, 2 for images (for the default net and the metrics).
        roi_size: sliding-window size (each side divisible by the net's stride product).
        sw_batch_size: windows per forward in inference.
        overlap: sliding-window overlap in (0, 1).
        lr, weight_decay, momentum: the default SGD.
        optimizer, scheduler: injected instead of SGD and the poly schedule (``scheduler`` then steps per epoch).
        pretrained: a local state-dict file to start from (``weights_only=True``, finite values checked);
            ``skip_heads`` leaves the segmentation heads (``seg_outputs.*``) at their initialisation, for transfer to
            another label set.
        nonfinite_loss: ``"error"``, ``"skip"`` or ``"warn"`` on a non-finite training loss.
        sample_images_every_n_epochs, sample_images_dir: sample predictions (0 / ``None``: off).

    Example:
        >>> m = VolumetricSegmenter(num_classes=3, roi_size=[32, 32, 32])
        >>> m.predict_volume(torch.randn(1, 1, 40, 36, 32)).shape
        torch.Size([1, 3, 40, 36, 32])
    """

    def __init__(self, net: Optional[nn.Module] = None, in_channels: PositiveInt = 1, num_classes: AtLeastTwoInt = 2,
                 spatial_dims: Literal[2, 3] = 3,
                 roi_size: list[PositiveInt] = [32, 32, 32],  # noqa: B006 - read only, YAML-visible default
                 sw_batch_size: PositiveInt = 2, overlap: OpenUnitInterval = 0.5, lr: PositiveFloat = 1e-2,
                 weight_decay: NonNegativeFloat = 3e-5, momentum: NonNegativeFloat = 0.99,
                 optimizer: Optional[OptimizerCallable] = None, scheduler: Optional[LRSchedulerCallable] = None,
                 pretrained: Optional[str] = None, skip_heads: bool = True, nonfinite_loss: NonFiniteLoss = "error",
                 sample_images_every_n_epochs: NonNegativeInt = 5, sample_images_dir: Optional[str] = "samples") -> None:
        super().__init__()
        require("monai", type(self).__name__)
        check_positive_int("in_channels", in_channels)
        check_number("num_classes", num_classes, low=2, integer=True)
        check_choice("spatial_dims", spatial_dims, (2, 3))
        if len(roi_size) != spatial_dims:
            raise ValueError(f"`roi_size` needs {spatial_dims} sides for spatial_dims={spatial_dims}, got {roi_size!r}.")
        for r in roi_size:
            check_positive_int("roi_size", r)
        check_positive_int("sw_batch_size", sw_batch_size)
        check_fraction("overlap", overlap, allow_zero=False, allow_one=False)
        check_optimization(lr, weight_decay)
        check_number("momentum", momentum, low=0, high=1, high_open=True)
        check_nonfinite_policy(nonfinite_loss)
        check_number("sample_images_every_n_epochs", sample_images_every_n_epochs, low=0, integer=True)
        check_path_argument("sample_images_dir", sample_images_dir)
        if net is not None and not isinstance(net, nn.Module):
            raise TypeError(f"`net` must be a torch.nn.Module, got {type(net).__name__}.")
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler"])
        self.net = net if net is not None else _default_net(in_channels, num_classes, spatial_dims)
        divisor = getattr(self.net, "divisor", None)
        if divisor is not None and any(r % d for r, d in zip(roi_size, divisor)):
            raise ValueError(f"`roi_size` {list(roi_size)} must divide by the net's stride product {list(divisor)}.")
        if pretrained is not None:
            self.load_pretrained(pretrained, skip_heads)
        self.num_classes, self.spatial_dims, self.roi_size = num_classes, spatial_dims, tuple(roi_size)
        self.sw_batch_size, self.overlap = sw_batch_size, overlap
        self.lr, self.weight_decay, self.momentum = lr, weight_decay, momentum
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.nonfinite_loss, self.skipped_steps = nonfinite_loss, 0
        self.sample_every, self.sample_dir = sample_images_every_n_epochs, sample_images_dir
        monai_losses = require("monai.losses", type(self).__name__)
        self.loss_fn = monai_losses.DiceCELoss(to_onehot_y=True, softmax=True, batch=True)
        from torchmetrics.segmentation import DiceScore

        for stage in ("val", "test"):
            setattr(self, f"{stage}_dice_metric", DiceScore(num_classes, include_background=False, average="none",
                                                            input_format="index", aggregation_level="global"))
        self._sample: Optional[tuple[torch.Tensor, ...]] = None
        self._poly_total: Optional[int] = None

    def load_pretrained(self, path: str, skip_heads: bool = True) -> None:
        """Load a local state dict into the net (``weights_only=True``, non-finite values refused)."""
        state = read_state_dict(path, name="pretrained")
        state = {k.removeprefix("net."): v for k, v in state.items()}
        if skip_heads:
            state = {k: v for k, v in state.items() if not k.startswith("seg_outputs.")}
        own = self.net.state_dict()
        bad = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
        unknown = [k for k in state if k not in own]
        if bad or unknown:
            raise ValueError(f"`pretrained` {path} does not fit the net: shape mismatch in {bad[:3]}, unknown keys "
                             f"{unknown[:3]}; build the same architecture (or keep skip_heads=True when only the "
                             "class count differs).")
        self.net.load_state_dict(state, strict=False)

    @override
    def forward(self, x: torch.Tensor) -> Any:
        """The net's output: deep-supervision tuple in training, full-resolution logits in eval."""
        return self.net(x)

    @override
    def setup(self, stage: str) -> None:
        """Refuse ``nonfinite_loss='skip'`` under DDP."""
        refuse_skip_under_ddp(self, self.nonfinite_loss)

    def _check_labels(self, y: torch.Tensor) -> None:
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= self.num_classes:
            raise ValueError(f"The labels hold class ids {lo}..{hi} but num_classes={self.num_classes}; set "
                             f"`model.init_args.num_classes: {hi + 1}`.")

    def loss(self, outputs: Any, y: torch.Tensor) -> torch.Tensor:
        """Deep-supervision-weighted Dice + CE against the nearest-downsampled labels."""
        outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
        total = outputs[0].new_zeros(())
        for w, out in zip(deep_supervision_weights(len(outputs)), outputs):
            if w == 0:  # nnU-Net drops the coarsest output; kept at weight 0 so DDP sees its head used
                total = total + 0.0 * out.sum()
                continue
            target = y if out.shape[2:] == y.shape[2:] else F.interpolate(y.float(), size=out.shape[2:],
                                                                          mode="nearest").long()
            total = total + w * self.loss_fn(out, target)
        return total

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Optional[torch.Tensor]:
        """Deep-supervised Dice + CE on a batch of patches."""
        x, y = batch
        self._check_labels(y)
        loss = self.loss(self(x), y)
        if not check_loss(self, loss, self.nonfinite_loss, batch):
            return None
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def predict_volume(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of whole volumes by Gaussian-blended sliding windows (the net in its current mode's eval output)."""
        inferers = require("monai.inferers", type(self).__name__)
        was = self.net.training
        self.net.eval()
        try:
            return inferers.sliding_window_inference(x, self.roi_size, self.sw_batch_size, self.net,
                                                     overlap=self.overlap, mode="gaussian")
        finally:
            self.net.train(was)

    def _evaluate(self, batch: Any, stage: str, batch_idx: int) -> None:
        x, y = batch
        self._check_labels(y)
        pred = self.predict_volume(x).argmax(1)
        metric = getattr(self, f"{stage}_dice_metric")
        metric.update(pred, y[:, 0].long())
        if stage == "val" and batch_idx == 0:
            mid = x.shape[-1] // 2
            take = (lambda t: t[..., mid]) if self.spatial_dims == 3 else (lambda t: t)
            self._sample = (take(x[:1]).cpu(), take(y[:1]).float().cpu(), take(pred[:1, None]).float().cpu())

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Sliding-window inference of a validation volume."""
        self._evaluate(batch, "val", batch_idx)

    @override
    def test_step(self, batch: Any, batch_idx: int) -> None:
        """Sliding-window inference of a test volume."""
        self._evaluate(batch, "test", batch_idx)

    def _log_dice(self, stage: str) -> None:
        metric = getattr(self, f"{stage}_dice_metric")
        per_class = metric.compute().flatten()
        metric.reset()
        for c, v in enumerate(per_class.tolist(), start=1):
            self.log(f"{stage}_dice_{c}", v)
        self.log(f"{stage}_dice", float(per_class.mean()), prog_bar=stage == "val")

    @override
    def on_validation_epoch_end(self) -> None:
        """Log Dice; every ``sample_images_every_n_epochs`` epochs of a fit save the sample slice."""
        self._log_dice("val")
        sample, self._sample = self._sample, None
        if sample is not None and sample_epoch_due(self, self.sample_every):
            log_sample_image(self, _sample_grid(*sample), "val_samples", self.sample_dir,
                             f"epoch {self.current_epoch + 1}: input / target / prediction (middle slice)")

    @override
    def on_test_epoch_end(self) -> None:
        """Log test Dice per class and mean."""
        self._log_dice("test")

    @override
    def configure_optimizers(self):
        """The injected optimiser/scheduler, or SGD (Nesterov) with nnU-Net's poly schedule per step."""
        params = [p for p in self.parameters() if p.requires_grad]
        if self.optimizer_factory is not None:
            opt = self.optimizer_factory(params)
            if self.scheduler_factory is None:
                return opt
            return {"optimizer": opt, "lr_scheduler": self.scheduler_factory(opt)}
        opt = torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, nesterov=self.momentum > 0,
                              weight_decay=self.weight_decay)
        # the horizon is read in on_train_start: estimated_stepping_batches here would build the train loader before
        # Lightning restores its mid-epoch state, so a resumed fit would replay the epoch from its first batch
        poly = torch.optim.lr_scheduler.LambdaLR(opt, self._poly)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": poly, "interval": "step"}}

    def _poly(self, step: int) -> float:
        total = self._poly_total
        return 1.0 if total is None else max(1 - step / total, 0.0) ** 0.9

    @override
    def on_train_start(self) -> None:
        """Fix the poly schedule's horizon: the fit's stepping batches."""
        self._poly_total = max(int(self.trainer.estimated_stepping_batches), 1)
