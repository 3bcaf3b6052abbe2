"""ConditionalGAN: the LightningModule of FedSyn (its pure core, networks, losses and noise, is ``fedsyn.py``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, Optional

import torch
from lightning.pytorch import LightningModule
from typing_extensions import override

from lightning_ext.core.guards import check_loss
from lightning_ext.core.samples import log_sample_image
from lightning_ext.core.validation import PositiveFloat, PositiveInt, check_number, check_positive, check_positive_int
from lightning_ext.federated.fedsyn import (
    CGANDiscriminator, CGANGenerator, discriminator_loss, generator_loss, sample_grid, to_unit_range,
)

__all__ = ["ConditionalGAN"]


class ConditionalGAN(LightningModule):
    """A conditional GAN (MLP generator and discriminator) trained with manual optimisation, for FedSyn.

    The generator sees ``[z || onehot(y)]``; the discriminator is conditioned by projection by default.

    Each training step: one discriminator step on the real batch and as many fakes conditioned on the batch's
    labels, then one generator step (non-saturating loss) on fresh noise with the same labels. Two Adam
    optimisers (lr 2e-4, betas (0.5, 0.999), the DCGAN defaults the spec proposes); under
    :class:`~lightning_ext.federated.client.LightningClient` both optimisers' state continues across rounds and
    both networks are averaged (FedSyn). Real images are mapped to [-1, 1] per image
    (``input_scaling="minmax"``) to match the generator's tanh, whatever the DataModule's normalisation.

    Metrics: ``train_d_loss``, ``train_g_loss``; on validation/test, ``<stage>_d_loss`` and ``<stage>_acc``, the
    discriminator's real-vs-generated accuracy on the split's images and as many fakes (0.5: the generator
    fools it). With ``sample_every_n_epochs > 0`` a grid of samples (a row per class) is saved under
    ``sample_dir`` (relative to the run's folder) through ``core.samples``.

    Args:
        latent_dim: noise dimension ``z``.
        num_classes: number of classes (labels must lie in ``[0, num_classes)``).
        input_shape: image shape without the batch dimension.
        generator_widths: hidden widths of the generator.
        discriminator_widths: hidden widths of the discriminator.
        discriminator_conditioning: how D sees the label: ``"projection"`` (``embed(y)^T h`` added to the logit;
            Miyato and Koyama 2018) or ``"concat"`` (the spec's one-hot beside the pixels, which learned no class
            conditioning on MNIST-5k in 3,600 steps; see :class:`~lightning_ext.federated.fedsyn.CGANDiscriminator`).
        lr: Adam learning rate of both networks.
        beta1: Adam's first beta (the second is 0.999).
        input_scaling: ``"minmax"`` (each real image to [-1, 1]) or ``"none"`` (data already in [-1, 1]).
        sample_every_n_epochs: save a sample grid every this many training epochs (0: never).
        sample_dir: folder of the grids (``None``: TensorBoard only).
        nonfinite_loss: what a NaN/inf loss does (``core.guards``).

    Example:
        >>> gan = ConditionalGAN(latent_dim=8, generator_widths=[16], discriminator_widths=[16], input_shape=[1, 4, 4])
        >>> gan.generate(torch.tensor([0, 3])).shape
        torch.Size([2, 1, 4, 4])
    """

    def __init__(self, latent_dim: PositiveInt = 64, num_classes: PositiveInt = 10,
                 input_shape: Sequence[int] = (1, 28, 28), generator_widths: Sequence[int] = (256, 512),
                 discriminator_widths: Sequence[int] = (512, 256),
                 discriminator_conditioning: Literal["projection", "concat"] = "projection",
                 lr: PositiveFloat = 2e-4, beta1: float = 0.5,
                 input_scaling: Literal["minmax", "none"] = "minmax", sample_every_n_epochs: int = 0,
                 sample_dir: Optional[str] = "samples",
                 nonfinite_loss: Literal["error", "skip", "warn"] = "error") -> None:
        super().__init__()
        check_positive_int("latent_dim", latent_dim)
        check_positive_int("num_classes", num_classes)
        for name, seq in (("input_shape", input_shape), ("generator_widths", generator_widths),
                          ("discriminator_widths", discriminator_widths)):
            if isinstance(seq, (str, int)) or not all(isinstance(v, int) and v > 0 for v in seq):
                raise ValueError(f"{name} must be a list of positive integers, got {seq!r}.")
        if len(input_shape) == 0:
            raise ValueError("input_shape must not be empty; e.g. [1, 28, 28].")
        if discriminator_conditioning not in ("projection", "concat"):
            raise ValueError(f"discriminator_conditioning={discriminator_conditioning!r} is unknown; choose "
                             "'projection' or 'concat'.")
        check_positive("lr", lr)
        check_number("beta1", beta1, low=0, high=1, high_open=True)
        if input_scaling not in ("minmax", "none"):
            raise ValueError(f"input_scaling={input_scaling!r} is unknown; choose 'minmax' or 'none'.")
        check_number("sample_every_n_epochs", sample_every_n_epochs, low=0, integer=True)
        if sample_dir == "":
            raise ValueError("sample_dir='' is refused; give a folder or None.")
        if nonfinite_loss not in ("error", "skip", "warn"):
            raise ValueError(f"nonfinite_loss={nonfinite_loss!r} is unknown; choose 'error', 'skip' or 'warn'.")
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.generator = CGANGenerator(latent_dim, num_classes, generator_widths, input_shape)
        self.discriminator = CGANDiscriminator(num_classes, discriminator_widths, input_shape,
                                               discriminator_conditioning)
        self.latent_dim, self.num_classes, self.input_shape = latent_dim, num_classes, tuple(input_shape)
        self.lr, self.beta1, self.input_scaling = lr, beta1, input_scaling
        self.sample_every_n_epochs, self.sample_dir, self.nonfinite_loss = sample_every_n_epochs, sample_dir, nonfinite_loss

    def generate(self, y: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Images in [-1, 1] for labels ``y`` (fresh noise from ``generator`` or the global RNG)."""
        z = torch.randn(len(y), self.latent_dim, generator=generator).to(self.device)
        return self.generator(z, y.to(self.device))

    def _prepare(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(batch, (list, tuple)) or len(batch) < 2:
            raise ValueError("ConditionalGAN needs (x, y) batches: images and integer labels.")
        x, y = batch[0], batch[1].long()
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"images have shape {tuple(x.shape[1:])} but input_shape={list(self.input_shape)}; "
                             "set input_shape to the data's shape.")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes}); got {int(y.min())}..{int(y.max())}. "
                             "Set num_classes.")
        return (to_unit_range(x) if self.input_scaling == "minmax" else x), y

    @override
    def training_step(self, batch: Any, batch_idx: int) -> None:
        """One discriminator step, then one generator step."""
        x, y = self._prepare(batch)
        opt_g, opt_d = self.optimizers()
        fake = self.generate(y).detach()
        d_loss = discriminator_loss(self.discriminator(x, y), self.discriminator(fake, y))
        if not check_loss(self, d_loss, self.nonfinite_loss, batch, what="discriminator loss"):
            return None
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        opt_d.step()
        g_loss = generator_loss(self.discriminator(self.generate(y), y))
        if not check_loss(self, g_loss, self.nonfinite_loss, batch, what="generator loss"):
            return None
        opt_g.zero_grad()
        self.manual_backward(g_loss)
        opt_g.step()
        self.log_dict({"train_d_loss": d_loss.detach(), "train_g_loss": g_loss.detach()}, prog_bar=True)
        return None

    def _evaluate(self, batch: Any, stage: str) -> None:
        x, y = self._prepare(batch)
        real, fake = self.discriminator(x, y), self.discriminator(self.generate(y), y)
        acc = 0.5 * ((real > 0).float().mean() + (fake <= 0).float().mean())
        self.log_dict({f"{stage}_d_loss": discriminator_loss(real, fake), f"{stage}_acc": acc}, batch_size=len(x))

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """The discriminator's loss and real-vs-generated accuracy."""
        self._evaluate(batch, "val")

    @override
    def test_step(self, batch: Any, batch_idx: int) -> None:
        """The discriminator's loss and real-vs-generated accuracy."""
        self._evaluate(batch, "test")

    @override
    def on_train_epoch_end(self) -> None:
        """Save a grid of samples (a row per class) every ``sample_every_n_epochs`` epochs."""
        every = self.sample_every_n_epochs
        if every and self.global_rank == 0 and (self.current_epoch + 1) % every == 0:
            log_sample_image(self, sample_grid(self.generator), "samples/fedsyn", self.sample_dir,
                             f"generated samples, epoch {self.current_epoch + 1} (a row per class)")

    @override
    def configure_optimizers(self) -> list:
        """Adam for the generator, then Adam for the discriminator."""
        betas = (self.beta1, 0.999)
        return [torch.optim.Adam(self.generator.parameters(), lr=self.lr, betas=betas),
                torch.optim.Adam(self.discriminator.parameters(), lr=self.lr, betas=betas)]
