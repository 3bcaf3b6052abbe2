"""``BlindDenoiserModule``: blind denoising (one noise level per image) of a bias-free network that predicts the noise."""

from __future__ import annotations

from typing import Any, Literal, Optional

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
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
    check_number,
    check_positive,
    check_positive_int,
)
from lightning_ext.diffusion.bias_free_unet import BiasFreeUNet
from lightning_ext.diffusion.geometry_adaptive import add_blind_noise, blind_denoising_loss, blind_noise_sigmas, \
    sample_blind

__all__ = ["BlindDenoiserModule"]


class BlindDenoiserModule(LightningModule):
    r"""Blind denoising with a bias-free network that predicts the noise; samples drawn from its implicit prior.

    Paper: Kadkhodaie, Guth, Simoncelli, Mallat, "Generalization in diffusion models arises from geometry-adaptive
    harmonic representations", ICLR 2024, arXiv 2310.02557; reference code
    https://github.com/LabForComputationalVision/memorization_generalization_in_diffusion_models (``code/trainer.py``,
    ``dataloader_func.py``). Each training image :math:`x_b` gets its own noise level, uniform on the square-root
    scale (``quadratic=True``): :math:`\sigma_b = (u_b(\sqrt{hi} - \sqrt{lo}) + \sqrt{lo})^2 / 255`,
    :math:`u_b \sim U(0, 1)`, ``(lo, hi) = sigma_range`` (official (0, 255) for images in [0, 1]); the network sees
    :math:`y_b = x_b + \sigma_b z_b` and predicts the noise :math:`\sigma_b z_b`; the loss is the squared error
    summed over pixels and averaged over images (the official ``MSELoss(reduction="sum") / batch``,
    :func:`~lightning_ext.diffusion.geometry_adaptive.blind_denoising_loss`). The denoised image is :math:`y - f(y)`.

    Noise levels and noise come from a generator seeded by ``(seed, global_step, rank)``: a resumed run draws what an
    uninterrupted one does and the module holds no state beyond its parameters and buffers. Validation uses fixed
    noise per batch and logs ``val_loss`` and ``val_psnr_gain`` (dB of PSNR gained over the noisy input,
    :math:`10 \log_{10}(\lVert y - x \rVert^2 / \lVert D(y) - x \rVert^2)`, independent of the pixel range). Every
    ``sample_images_every_n_epochs`` epochs a row of ``num_sample_images`` samples of
    :func:`~lightning_ext.diffusion.geometry_adaptive.sample_blind` is saved under ``sample_images_dir`` and logged
    to TensorBoard (``core.samples``). Adam with the official lr 1e-3 is the default optimiser (AdamW with
    ``weight_decay=0``).

    Args:
        net: the denoiser (default: :class:`~lightning_ext.diffusion.bias_free_unet.BiasFreeUNet` with 2 blocks and 16
            base channels for 1-channel images).
        sigma_range: ``[lo, hi]`` of the noise levels in pixel units of ``pixel_scale`` (official ``[0, 255]``).
        quadratic: draw noise levels uniformly on the square-root scale (official) instead of uniformly.
        pixel_scale: what the noise levels are divided by (255: images in [0, 1]).
        seed: seed of the training noise (with the step and rank) and of the sample images.
        lr, weight_decay, optimizer, scheduler, scheduler_interval: the optimiser.
        nonfinite_loss: ``"error"``, ``"skip"`` or ``"warn"`` on a non-finite training loss.
        sample_images_every_n_epochs: how often to save samples (0: never).
        sample_images_dir: where (relative to ``trainer.log_dir``; ``None`` disables the files).
        num_sample_images: samples per grid.
        sample_h0, sample_beta, sample_max_steps: the sampler's step size, noise share and iteration cap.

    Example:
        >>> model = BlindDenoiserModule(BiasFreeUNet(base_channels=4, num_blocks=2))
        >>> x = torch.rand(3, 1, 8, 8)
        >>> model.training_loss(x, torch.Generator().manual_seed(0)).item() > 0
        True
    """

    def __init__(
        self,
        net: Optional[nn.Module] = None,
        sigma_range: tuple[NonNegativeFloat, NonNegativeFloat] = (0.0, 255.0),
        quadratic: bool = True,
        pixel_scale: PositiveFloat = 255.0,
        seed: int = 0,
        lr: PositiveFloat = 1e-3,
        weight_decay: NonNegativeFloat = 0.0,
        optimizer: Optional[OptimizerCallable] = None,
        scheduler: Optional[LRSchedulerCallable] = None,
        scheduler_interval: Literal["epoch", "step"] = "epoch",
        nonfinite_loss: NonFiniteLoss = "error",
        sample_images_every_n_epochs: NonNegativeInt = 5,
        sample_images_dir: Optional[str] = "samples",
        num_sample_images: PositiveInt = 8,
        sample_h0: OpenUnitInterval = 0.05,
        sample_beta: OpenUnitInterval = 0.05,
        sample_max_steps: PositiveInt = 1000,
    ) -> None:
        super().__init__()
        if net is not None and not isinstance(net, nn.Module):
            raise ValueError(f"net must be a torch.nn.Module that predicts the noise, got {type(net).__name__}.")
        if not isinstance(sigma_range, (tuple, list)) or len(sigma_range) != 2:
            raise ValueError(f"sigma_range must be [lo, hi], got {sigma_range!r}.")
        lo, hi = (check_number(f"sigma_range[{i}]", v, low=0) for i, v in enumerate(sigma_range))
        if not hi > lo:
            raise ValueError(f"sigma_range must have lo < hi, got [{lo}, {hi}]; e.g. [0, 255].")
        check_positive("pixel_scale", pixel_scale)
        check_number("seed", seed, integer=True)
        check_optimization(lr, weight_decay)
        if scheduler_interval not in ("epoch", "step"):
            raise ValueError(f"scheduler_interval must be 'epoch' or 'step', got {scheduler_interval!r}.")
        check_nonfinite_policy(nonfinite_loss)
        check_number("sample_images_every_n_epochs", sample_images_every_n_epochs, low=0, integer=True)
        check_path_argument("sample_images_dir", sample_images_dir)
        check_positive_int("num_sample_images", num_sample_images)
        check_number("sample_h0", sample_h0, low=0, high=1, low_open=True, high_open=True)
        check_number("sample_beta", sample_beta, low=0, high=1, low_open=True)
        check_positive_int("sample_max_steps", sample_max_steps)
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler"])
        self.net = net if net is not None else BiasFreeUNet(in_channels=1, base_channels=16, num_blocks=2)
        self.sigma_range, self.quadratic, self.pixel_scale, self.seed = (float(lo), float(hi)), quadratic, \
            pixel_scale, seed
        self.lr, self.weight_decay = lr, weight_decay
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.scheduler_interval, self.nonfinite_loss = scheduler_interval, nonfinite_loss
        self.sample_every, self.sample_dir, self.num_samples = sample_images_every_n_epochs, sample_images_dir, \
            num_sample_images
        self.sample_h0, self.sample_beta, self.sample_max_steps = sample_h0, sample_beta, sample_max_steps
        self._image_shape: Optional[tuple[int, ...]] = None

    @override
    def forward(self, y: torch.Tensor) -> torch.Tensor:
        """The predicted noise :math:`f(y)`."""
        return self.net(y)

    def denoise(self, y: torch.Tensor) -> torch.Tensor:
        """The denoised images :math:`y - f(y)`."""
        return y - self.net(y)

    @override
    def setup(self, stage: str) -> None:
        """Refuse ``nonfinite_loss='skip'`` under DDP."""
        refuse_skip_under_ddp(self, self.nonfinite_loss)

    def _generator(self, *key: int) -> torch.Generator:
        return torch.Generator().manual_seed(hash((self.seed,) + key) & 0x7FFF_FFFF_FFFF)

    def _images(self, batch: Any) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if not torch.is_tensor(x) or x.dim() != 4 or not x.is_floating_point():
            raise ValueError("BlindDenoiserModule expects float image batches (B, C, H, W) or (images, labels), got "
                             f"{tuple(x.shape) if torch.is_tensor(x) else type(x).__name__}.")
        self._image_shape = tuple(x.shape[1:])
        return x

    def noisy_batch(self, x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``(noisy, noise)``: one noise level per image (see the class docstring), noise from ``generator``."""
        sigma = blind_noise_sigmas(x.shape[0], self.sigma_range, self.quadratic, self.pixel_scale, generator)
        return add_blind_noise(x, sigma, generator)

    def training_loss(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The blind denoising loss of clean images ``x`` with noise from ``generator``."""
        noisy, noise = self.noisy_batch(x, generator)
        return blind_denoising_loss(self.net(noisy), noise)

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Optional[torch.Tensor]:
        """Blind denoising loss of one batch."""
        x = self._images(batch)
        loss = self.training_loss(x, self._generator(0, self.global_step, self.global_rank))
        if not check_loss(self, loss, self.nonfinite_loss, batch):
            return None
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def _eval_step(self, batch: Any, batch_idx: int, stage: str) -> None:
        x = self._images(batch)
        noisy, noise = self.noisy_batch(x, self._generator(1, batch_idx))
        pred = self.net(noisy)
        residual = (noise - pred).pow(2).flatten(1).sum(1).clamp_min(1e-20)
        gain = 10 * torch.log10(noise.pow(2).flatten(1).sum(1).clamp_min(1e-20) / residual)
        self.log(f"{stage}_loss", blind_denoising_loss(pred, noise), sync_dist=True, prog_bar=stage == "val")
        self.log(f"{stage}_psnr_gain", gain.mean(), sync_dist=True)

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Held-out loss and PSNR gain with fixed noise per batch."""
        self._eval_step(batch, batch_idx, "val")

    @override
    def test_step(self, batch: Any, batch_idx: int) -> None:
        """Held-out loss and PSNR gain with fixed noise per batch."""
        self._eval_step(batch, batch_idx, "test")

    @torch.no_grad()
    def sample(self, n: int, shape: Optional[tuple[int, int, int]] = None, seed: Optional[int] = None,
               **sampler: Any) -> torch.Tensor:
        """``n`` images from the denoiser's implicit prior (:func:`sample_blind`; ``shape`` defaults to the last
        batch's image shape; ``sampler`` overrides ``h0``, ``beta``, ``max_steps`` ...)."""
        check_positive_int("n", n)
        shape = shape or self._image_shape
        if shape is None:
            raise ValueError("sample() needs shape=(C, H, W) before the module has seen a batch.")
        args = dict(h0=self.sample_h0, beta=self.sample_beta, max_steps=self.sample_max_steps)
        args.update(sampler)
        return sample_blind(self.net, (n, *shape), seed=self.seed if seed is None else seed, **args).images

    @override
    def on_validation_epoch_end(self) -> None:
        """Every ``sample_images_every_n_epochs`` epochs of a fit, save (and log) a row of samples."""
        if not sample_epoch_due(self, self.sample_every) or self._image_shape is None:
            return
        images = self.sample(self.num_samples, seed=self.seed + self.current_epoch).cpu()
        log_sample_image(self, tile_rows([list(images)]), "val_samples", self.sample_dir,
                         f"epoch {self.current_epoch + 1}: samples (h0={self.sample_h0}, beta={self.sample_beta})")

    @override
    def configure_optimizers(self):
        """The injected optimiser (default Adam, i.e. AdamW without weight decay) and scheduler."""
        return configure_optimization(self, [p for p in self.parameters() if p.requires_grad])

