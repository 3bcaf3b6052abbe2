"""``ClutterFilter3D``: learn to remove temporally stationary clutter from image sequences (3D or frame-wise 2D)."""

from __future__ import annotations

from typing import Any, Literal, Optional

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torchmetrics import MeanMetric
from typing_extensions import override

from lightning_ext.core.guards import NonFiniteLoss, check_loss, check_nonfinite_policy, refuse_skip_under_ddp
from lightning_ext.core.optimization import check_optimization, configure_optimization
from lightning_ext.core.paths import check_path_argument
from lightning_ext.core.samples import log_sample_image, sample_epoch_due, tile_rows
from lightning_ext.core.validation import (
    NonNegativeFloat,
    NonNegativeInt,
    OpenUnitInterval,
    PositiveFloat,
    PositiveInt,
    UnitIntervalRightOpen,
    check_number,
)
from lightning_ext.vision.attention_res_unet import Activation, AttentionResUNet

__all__ = ["ClutterFilter3D", "clutter_metrics"]

METRICS = ("mse", "mae", "psnr", "mse_clutter", "mse_outside", "temporal_error")


def clutter_metrics(pred: torch.Tensor, clean: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    r"""Per-clip restoration metrics of ``(B, 1, T, H, W)`` clips, each ``(B,)``.

    ``mse``, ``mae``; ``psnr`` :math:`= 10\log_{10}(1/\mathrm{MSE})` (data range 1); ``mse_clutter`` and
    ``mse_outside``: MSE inside / outside the clutter mask (does the filter remove clutter, and leave the rest
    alone); ``temporal_error`` :math:`= \mathrm{mean}|(\hat y_t - \hat y_{t-1}) - (y_t - y_{t-1})|`: how far the
    filtered sequence's frame-to-frame changes are from the clean one's (temporal coherence).

    Example:
        >>> y = torch.rand(2, 1, 3, 4, 4)
        >>> {k: round(float(v[0]), 3) for k, v in clutter_metrics(y, y, y > 0.5).items() if k != "psnr"}
        {'mse': 0.0, 'mae': 0.0, 'mse_clutter': 0.0, 'mse_outside': 0.0, 'temporal_error': 0.0}
    """
    err = (pred - clean).flatten(1)
    m = mask.flatten(1).float()
    sq = err ** 2
    mse = sq.mean(1)
    dp, dc = pred.diff(dim=2), clean.diff(dim=2)
    return {"mse": mse, "mae": err.abs().mean(1), "psnr": 10 * torch.log10(1 / mse.clamp_min(1e-10)),
            "mse_clutter": (sq * m).sum(1) / m.sum(1).clamp_min(1), "mse_outside": (sq * (1 - m)).sum(1) /
            (1 - m).sum(1).clamp_min(1), "temporal_error": (dp - dc).abs().flatten(1).mean(1)}


class ClutterFilter3D(LightningModule):
    r"""Learn to remove temporally stationary clutter from image sequences (3D or frame-wise 2D).

    Paper: Tabassian et al., "Deep Spatiotemporal Clutter Filtering of Transthoracic Echocardiographic Images:
    Leveraging Contextual Attention and Residual Learning" (arXiv 2401.13147); reference code (Keras)
    https://github.com/MahdiTabassian/Deep-Clutter-Filtering (``Filter3D_Lrec``, ``Filter2D_Lrec``).

    The network is :class:`~lightning_ext.vision.attention_res_unet.AttentionResUNet` (3D convolutions over
    ``(T, H, W)`` with time never pooled, attention-gated skips, the input added to the output). Loss: MSE between
    the filtered and the clean clip, :math:`\frac{1}{N}\sum(f(x) - y)^2`; Adam with lr 1e-4 in the paper.
    ``spatial_dims=2`` is the paper's baseline: the same design in 2D applied to every frame independently (the
    clip's frames folded into the batch). Batches are ``(cluttered, clean, mask)`` of shape ``(B, 1, T, H, W)``
    (:class:`~lightning_ext.vision.simulated_clutter.SimulatedClutterDataModule`). Validation and test log the
    means over clips of :func:`clutter_metrics` (``{val,test}_mse``, ``_mae``, ``_psnr``, ``_mse_clutter``,
    ``_mse_outside``, ``_temporal_error``); every ``sample_images_every_n_epochs`` epochs the middle frames of the
    first validation clips are saved as cluttered / clean / filtered rows.

    Args:
        spatial_dims: 3 (the paper's filter) or 2 (its frame-wise baseline).
        base_filters, levels, activation, attention, input_skip, dropout: the network
            (paper: 16, 4, ``"identity"``, attention, input skip, 0.05).
        bn_momentum: BatchNorm's running-statistics momentum (PyTorch convention; Keras' default 0.99 is 0.01 here,
            the paper's; raise it for short runs, whose evaluation otherwise uses barely updated statistics).
        zero_init_output: start as the identity filter (output BN scale 0; not in the paper).
        lr, weight_decay, optimizer, scheduler, scheduler_interval: the optimiser (default Adam-W with
            ``weight_decay=0``, i.e. Adam).
        nonfinite_loss: ``"error"``, ``"skip"`` or ``"warn"`` on a non-finite training loss.
        sample_images_every_n_epochs, sample_images_dir, num_sample_clips: sample predictions (0 / ``None``: off).

    Example:
        >>> m = ClutterFilter3D(base_filters=4, levels=3)
        >>> m(torch.rand(1, 1, 4, 16, 16)).shape
        torch.Size([1, 1, 4, 16, 16])
    """

    def __init__(self, spatial_dims: Literal[2, 3] = 3, base_filters: PositiveInt = 16, levels: PositiveInt = 4,
                 activation: Activation = "identity", attention: bool = True, input_skip: bool = True,
                 dropout: UnitIntervalRightOpen = 0.05, bn_momentum: OpenUnitInterval = 0.01,
                 zero_init_output: bool = False, lr: PositiveFloat = 1e-4, weight_decay: NonNegativeFloat = 0.0,
                 optimizer: Optional[OptimizerCallable] = None, scheduler: Optional[LRSchedulerCallable] = None,
                 scheduler_interval: Literal["epoch", "step"] = "epoch", nonfinite_loss: NonFiniteLoss = "error",
                 sample_images_every_n_epochs: NonNegativeInt = 5, sample_images_dir: Optional[str] = "samples",
                 num_sample_clips: PositiveInt = 2) -> None:
        super().__init__()
        check_optimization(lr, weight_decay)
        check_nonfinite_policy(nonfinite_loss)
        check_number("sample_images_every_n_epochs", sample_images_every_n_epochs, low=0, integer=True)
        check_path_argument("sample_images_dir", sample_images_dir)
        check_number("num_sample_clips", num_sample_clips, low=1, integer=True)
        if scheduler_interval not in ("epoch", "step"):
            raise ValueError(f"`scheduler_interval` must be 'epoch' or 'step', got {scheduler_interval!r}.")
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.net = AttentionResUNet(spatial_dims, 1, base_filters, levels, activation, attention, input_skip, dropout,
                                    bn_momentum, zero_init_output)
        self.spatial_dims = spatial_dims
        self.lr, self.weight_decay = lr, weight_decay
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.scheduler_interval, self.nonfinite_loss, self.skipped_steps = scheduler_interval, nonfinite_loss, 0
        self.sample_every, self.sample_dir, self.num_sample_clips = (sample_images_every_n_epochs, sample_images_dir,
                                                                     num_sample_clips)
        for stage in ("val", "test"):
            for name in METRICS:
                setattr(self, f"{stage}_{name}_mean", MeanMetric())
        self._sample: Optional[tuple[torch.Tensor, ...]] = None
        self._rng_to_restore: Optional[torch.Tensor] = None

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Save the CPU RNG state (dropout's masks' source) so a resumed fit draws the same masks."""
        checkpoint["lightning_ext_rng_state"] = torch.get_rng_state()

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the saved RNG state for ``on_train_start`` (Lightning seeds and builds loaders after loading)."""
        self._rng_to_restore = checkpoint.get("lightning_ext_rng_state")

    @override
    def on_train_start(self) -> None:
        """On a one-process resume, continue the saved RNG stream."""
        if self._rng_to_restore is not None and self.trainer.world_size == 1:
            torch.set_rng_state(self._rng_to_restore.to(torch.uint8).cpu())
        self._rng_to_restore = None

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The filtered clips ``(B, 1, T, H, W)`` (2D: every frame on its own)."""
        if x.dim() != 5:
            raise ValueError(f"ClutterFilter3D expects clips (B, 1, T, H, W), got shape {tuple(x.shape)}.")
        if self.spatial_dims == 3:
            return self.net(x)
        b, c, t, h, w = x.shape
        frames = x.transpose(1, 2).reshape(b * t, c, h, w)
        return self.net(frames).reshape(b, t, c, h, w).transpose(1, 2)

    @override
    def setup(self, stage: str) -> None:
        """Refuse ``nonfinite_loss='skip'`` under DDP."""
        refuse_skip_under_ddp(self, self.nonfinite_loss)

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Optional[torch.Tensor]:
        """MSE between the filtered and the clean clips."""
        cluttered, clean = batch[0], batch[1]
        loss = torch.mean((self(cluttered) - clean) ** 2)
        if not check_loss(self, loss, self.nonfinite_loss, batch):
            return None
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def _evaluate(self, batch: Any, stage: str, batch_idx: int) -> None:
        cluttered, clean, mask = batch
        pred = self(cluttered)
        for name, values in clutter_metrics(pred, clean, mask).items():
            metric = getattr(self, f"{stage}_{name}_mean")
            metric.update(values)
            self.log(f"{stage}_{name}", metric, prog_bar=stage == "val" and name == "mse")
        if stage == "val" and batch_idx == 0:
            k, mid = self.num_sample_clips, cluttered.shape[2] // 2
            self._sample = tuple(t[:k, 0, mid].detach().cpu() for t in (cluttered, clean, pred.clamp(0, 1)))

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Restoration metrics of validation clips."""
        self._evaluate(batch, "val", batch_idx)

    @override
    def test_step(self, batch: Any, batch_idx: int) -> None:
        """Restoration metrics of test clips."""
        self._evaluate(batch, "test", batch_idx)

    @override
    def on_validation_epoch_end(self) -> None:
        """Every ``sample_images_every_n_epochs`` epochs of a fit, save cluttered / clean / filtered middle frames."""
        sample, self._sample = self._sample, None
        if sample is not None and sample_epoch_due(self, self.sample_every):
            rows = [list(t) for t in sample]
            log_sample_image(self, tile_rows(rows), "val_samples", self.sample_dir,
                             f"epoch {self.current_epoch + 1}: cluttered / clean / filtered (middle frame)")

    @override
    def configure_optimizers(self):
        """The injected optimiser (default AdamW, weight decay 0) and scheduler."""
        return configure_optimization(self, [p for p in self.parameters() if p.requires_grad])
