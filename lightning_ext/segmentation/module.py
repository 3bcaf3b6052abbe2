"""``SegmentationModule``: 2D semantic segmentation with R2U-Net or U-Net, Dice + BCE/CE, sample predictions saved."""

from __future__ import annotations

from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torchmetrics import Metric
from torchmetrics.classification import BinaryF1Score, MulticlassF1Score
from typing_extensions import override

from lightning_ext.core.guards import NonFiniteLoss, check_loss, check_nonfinite_policy, refuse_skip_under_ddp
from lightning_ext.core.optimization import check_optimization, configure_optimization
from lightning_ext.core.paths import check_path_argument
from lightning_ext.core.samples import log_sample_image, sample_epoch_due
from lightning_ext.core.validation import (
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    check_choice,
    check_non_negative,
    check_number,
    check_positive_int,
)
from lightning_ext.segmentation.r2unet import R2UNet, UNet

__all__ = ["BinnedPixelAUROC", "SegmentationModule", "soft_dice_loss"]


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    r"""Soft Dice loss averaged over the batch (and over classes for multi-class logits).

    Binary (one logit channel): :math:`p = \sigma(z)`, :math:`1 - \frac{2\sum p g + \epsilon}{\sum p + \sum g +
    \epsilon}` per image; multi-class: :math:`p = \mathrm{softmax}(z)` against the one-hot target, per image and class.

    Example:
        >>> z = torch.full((1, 1, 2, 2), 20.0)
        >>> round(float(soft_dice_loss(z, torch.ones(1, 1, 2, 2))), 4)
        0.0
    """
    if logits.shape[1] == 1:
        p, g = torch.sigmoid(logits), target.float()
    else:
        p = torch.softmax(logits, dim=1)
        g = F.one_hot(target.long().squeeze(1), logits.shape[1]).permute(0, 3, 1, 2).float()
    dims = tuple(range(2, p.dim()))
    dice = (2 * (p * g).sum(dims) + eps) / (p.sum(dims) + g.sum(dims) + eps)
    return 1 - dice.mean()


class BinnedPixelAUROC(Metric):
    r"""Pixel AUROC from per-class histograms of the predicted probability (``bins`` equal-width bins in [0, 1]).

    The Mann-Whitney statistic of the binned scores, :math:`\frac{1}{PN}\sum_b n_b (p_{>b} + \tfrac12 p_b)`
    (:math:`n_b`, :math:`p_b` negatives and positives in bin :math:`b`, :math:`p_{>b}` positives above it): memory
    ``2 x bins`` whatever the image sizes, summed across ranks. torchmetrics' binned ``BinaryAUROC`` needs
    ``pixels x bins x 4 bins`` of memory when deterministic algorithms are on (its ``_bincount`` fallback), 40 GB
    for one batch of 32 images of 32x32.
    """

    full_state_update = False

    def __init__(self, bins: int = 1000) -> None:
        super().__init__()
        self.bins = bins
        self.add_state("hist", default=torch.zeros(2, bins, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, probs: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch of probabilities and 0/1 targets (any shapes, flattened)."""
        idx = (probs.detach().flatten().double().clamp(0, 1) * (self.bins - 1)).round().long()
        flat = target.flatten().long() * self.bins + idx
        counts = torch.zeros(2 * self.bins, dtype=torch.float64, device=flat.device)
        counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.float64))
        self.hist += counts.view(2, self.bins)

    def compute(self) -> torch.Tensor:
        """The AUROC (0.5 when one class is absent)."""
        neg, pos = self.hist[0], self.hist[1]
        n_pos, n_neg = pos.sum(), neg.sum()
        if n_pos == 0 or n_neg == 0:
            return torch.tensor(0.5)
        above = pos.flip(0).cumsum(0).flip(0) - pos  # positives in strictly higher bins
        return ((neg * (above + 0.5 * pos)).sum() / (n_pos * n_neg)).float()


class SegmentationModule(LightningModule):
    r"""2D segmentation of ``(image, mask)`` batches with R2U-Net or U-Net, trained by cross-entropy plus Dice.

    Papers: "Recurrent Residual Convolutional Neural Network based on U-Net (R2U-Net) for Medical Image
    Segmentation" (Alom et al., arXiv 1802.06955; de-facto reference code
    https://github.com/LeeJunHyun/Image_Segmentation) and U-Net (Ronneberger et al., arXiv 1505.04597).

    Loss: :math:`L = L_{CE} + \lambda_{Dice} L_{Dice}` (binary: BCE on one logit channel, ``num_classes=1``, masks
    of 0/1; multi-class: CE on ``num_classes`` channels, masks of class ids), :func:`soft_dice_loss`. Logs
    ``{train,val,test}_loss``, ``{val,test}_dice`` (pixel F1 over the split: Dice; macro over classes when
    multi-class) and, binary, ``{val,test}_auroc`` (pixel AUROC over 1,000 probability bins,
    :class:`BinnedPixelAUROC`). Every
    ``sample_images_every_n_epochs`` validation epochs a PNG grid of input / target / prediction of the first
    validation images is written to ``sample_images_dir`` (under ``trainer.log_dir``) and, with a TensorBoard
    logger, logged as an image, so a user can look at the predictions.

    Args:
        architecture: ``"r2unet"`` or ``"unet"``.
        in_chans: image channels.
        num_classes: 1 for binary masks, else the number of classes.
        widths: channels per level (``len(widths) - 1`` poolings: image sides must divide by ``2 ** that``).
        t: R2U-Net's recurrent steps (0: ResU-Net).
        shared_recurrent_weights: R2U-Net's recurrence as in the reference code (``True``) or the paper.
        dice_weight: :math:`\lambda_{Dice}`.
        lr, weight_decay, optimizer, scheduler, scheduler_interval: the optimiser (default AdamW).
        nonfinite_loss: ``"error"``, ``"skip"`` or ``"warn"`` on a non-finite training loss.
        sample_images_every_n_epochs: how often to save sample predictions (0: never).
        sample_images_dir: where (relative to ``trainer.log_dir``; ``None`` disables the files).
        num_sample_images: images in each grid.

    Example:
        >>> model = SegmentationModule("unet", widths=[4, 8, 16])
        >>> model(torch.randn(2, 1, 16, 16)).shape
        torch.Size([2, 1, 16, 16])
    """

    def __init__(
        self,
        architecture: Literal["r2unet", "unet"] = "r2unet",
        in_chans: PositiveInt = 1,
        num_classes: PositiveInt = 1,
        widths: list[PositiveInt] = [16, 32, 64, 128],  # noqa: B006 - read only, a YAML-visible default
        t: NonNegativeInt = 2,
        shared_recurrent_weights: bool = True,
        dice_weight: NonNegativeFloat = 1.0,
        lr: PositiveFloat = 1e-3,
        weight_decay: NonNegativeFloat = 0.0,
        optimizer: Optional[OptimizerCallable] = None,
        scheduler: Optional[LRSchedulerCallable] = None,
        scheduler_interval: Literal["epoch", "step"] = "epoch",
        nonfinite_loss: NonFiniteLoss = "error",
        sample_images_every_n_epochs: NonNegativeInt = 5,
        sample_images_dir: Optional[str] = "samples",
        num_sample_images: PositiveInt = 4,
    ) -> None:
        super().__init__()
        check_choice("architecture", architecture, ("r2unet", "unet"))
        check_optimization(lr, weight_decay)
        check_nonfinite_policy(nonfinite_loss)
        check_choice("scheduler_interval", scheduler_interval, ("epoch", "step"))
        check_non_negative("dice_weight", dice_weight)
        check_number("sample_images_every_n_epochs", sample_images_every_n_epochs, low=0, integer=True)
        check_path_argument("sample_images_dir", sample_images_dir)
        check_positive_int("num_sample_images", num_sample_images)
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.net = (R2UNet(in_chans, num_classes, widths, t, shared_recurrent_weights) if architecture == "r2unet"
                    else UNet(in_chans, num_classes, widths))
        self.num_classes, self.dice_weight = num_classes, dice_weight
        self.lr, self.weight_decay = lr, weight_decay
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.scheduler_interval, self.nonfinite_loss, self.skipped_steps = scheduler_interval, nonfinite_loss, 0
        self.sample_every, self.sample_dir, self.num_samples = sample_images_every_n_epochs, sample_images_dir, num_sample_images
        binary = num_classes == 1
        for stage in ("val", "test"):
            setattr(self, f"{stage}_dice", BinaryF1Score() if binary else MulticlassF1Score(num_classes, average="macro"))
            if binary:
                setattr(self, f"{stage}_auroc", BinnedPixelAUROC())
        self._sample: Optional[tuple[torch.Tensor, ...]] = None

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Per-pixel logits ``(B, max(num_classes, 1), H, W)``."""
        return self.net(x)

    @override
    def setup(self, stage: str) -> None:
        """Refuse ``nonfinite_loss='skip'`` under DDP."""
        refuse_skip_under_ddp(self, self.nonfinite_loss)

    def _check_mask(self, y: torch.Tensor) -> None:
        if self.num_classes == 1:
            bad = (y != 0) & (y != 1)
            if bool(bad.any()):
                raise ValueError(f"num_classes=1 expects binary masks of 0/1, but a mask holds "
                                 f"{sorted(torch.unique(y[bad]).tolist())[:5]}; set num_classes to the number of "
                                 "classes for class-id masks.")
        elif int(y.max()) >= self.num_classes or int(y.min()) < 0:
            raise ValueError(f"The masks hold class ids {int(y.min())}..{int(y.max())} but num_classes="
                             f"{self.num_classes}; set `model.init_args.num_classes: {int(y.max()) + 1}`.")

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Cross-entropy (BCE for one channel) plus ``dice_weight`` times the soft Dice loss."""
        if self.num_classes == 1:
            ce = F.binary_cross_entropy_with_logits(logits, y.float())
        else:
            ce = F.cross_entropy(logits, y.long().squeeze(1))
        return ce + self.dice_weight * soft_dice_loss(logits, y)

    def _step(self, batch: Any, stage: str, batch_idx: int) -> Optional[torch.Tensor]:
        x, y = batch
        if y.dim() == x.dim() - 1:
            y = y.unsqueeze(1)
        self._check_mask(y)
        logits = self(x)
        loss = self.loss(logits, y)
        if stage == "train":
            if not check_loss(self, loss, self.nonfinite_loss, batch):
                return None
            self.log("train_loss", loss, prog_bar=True)
            return loss
        self.log(f"{stage}_loss", loss, sync_dist=True)
        if self.num_classes == 1:
            p = torch.sigmoid(logits).flatten()
            getattr(self, f"{stage}_dice")(p, y.flatten().long())
            getattr(self, f"{stage}_auroc")(p, y.flatten().long())
            self.log(f"{stage}_auroc", getattr(self, f"{stage}_auroc"))
        else:
            getattr(self, f"{stage}_dice")(logits.argmax(1).flatten(), y.long().flatten())
        self.log(f"{stage}_dice", getattr(self, f"{stage}_dice"), prog_bar=stage == "val")
        if stage == "val" and batch_idx == 0:
            pred = torch.sigmoid(logits) if self.num_classes == 1 else logits.argmax(1, keepdim=True).float()
            k = self.num_samples
            self._sample = (x[:k].detach().cpu(), y[:k].detach().cpu().float(), pred[:k].detach().cpu())
        return loss

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Optional[torch.Tensor]:
        """Cross-entropy plus Dice of one batch."""
        return self._step(batch, "train", batch_idx)

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Validation loss, Dice and (binary) pixel AUROC."""
        self._step(batch, "val", batch_idx)

    @override
    def test_step(self, batch: Any, batch_idx: int) -> None:
        """Test loss, Dice and (binary) pixel AUROC."""
        self._step(batch, "test", batch_idx)

    @override
    def on_validation_epoch_end(self) -> None:
        """Every ``sample_images_every_n_epochs`` epochs of a fit, save (and log) input / target / prediction images."""
        sample, self._sample = self._sample, None
        if sample is not None and sample_epoch_due(self, self.sample_every):
            log_sample_image(self, _sample_grid(*sample), "val_samples", self.sample_dir,
                             f"epoch {self.current_epoch + 1}: input / target / prediction")

    @override
    def configure_optimizers(self):
        """The injected optimiser (default AdamW) and scheduler."""
        return configure_optimization(self, [p for p in self.parameters() if p.requires_grad])


def _sample_grid(x: torch.Tensor, y: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """``(1, 3H, kW)`` in [0, 1]: rows input (min-max scaled, first channel), target, prediction."""
    img = x[:, :1]
    lo, hi = img.amin(dim=(1, 2, 3), keepdim=True), img.amax(dim=(1, 2, 3), keepdim=True)
    img = (img - lo) / (hi - lo).clamp_min(1e-6)
    scale = max(float(y.max()), 1.0)
    rows = [torch.cat(list(t[:, :1]), dim=-1) for t in (img, y / scale, pred / max(float(pred.max()), 1.0))]
    return torch.cat(rows, dim=-2)
