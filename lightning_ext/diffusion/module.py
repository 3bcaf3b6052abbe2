"""``DiffusionModule``: DDPM training and DDIM/DDPM sampling of any denoiser (DiT-MoE, diffusers' UNet or DiT)."""

from __future__ import annotations

from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from typing_extensions import override

from lightning_ext.core.guards import NonFiniteLoss, check_loss, check_nonfinite_policy, refuse_skip_under_ddp
from lightning_ext.core.optimization import check_optimization, configure_optimization
from lightning_ext.core.optional import require
from lightning_ext.core.paths import check_path_argument
from lightning_ext.core.samples import log_sample_image, sample_epoch_due, tile_rows
from lightning_ext.core.validation import (
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    UnitIntervalRightOpen,
    check_choice,
    check_number,
    check_positive,
    check_positive_int,
)

__all__ = ["DiffusionModule"]

_PREDICTION = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


class DiffusionModule(LightningModule):
    r"""DDPM training of a class-conditional denoiser with classifier-free guidance, and DDIM/DDPM sampling.

    Papers: "Denoising Diffusion Probabilistic Models" (Ho et al., arXiv 2006.11239), "Classifier-Free Diffusion
    Guidance" (Ho and Salimans, arXiv 2207.12598); DiT-MoE ("Scaling Diffusion Transformers to 16 Billion
    Parameters", arXiv 2407.11633, https://github.com/feizc/DiT-MoE ``train.py``) for the balance loss. Schedulers
    are diffusers' ``DDPMScheduler``/``DDIMScheduler`` (``clip_sample=False``: the library's image DataModules
    standardise pixels). One step draws :math:`t \sim U\{0..T-1\}`, :math:`\epsilon \sim N(0, I)`,
    :math:`x_t = \sqrt{\bar\alpha_t} x_0 + \sqrt{1 - \bar\alpha_t}\epsilon` and minimises

    .. math:: L = \lVert f_\theta(x_t, t, \tilde y) - \text{target} \rVert^2 + L_{balance}

    with target :math:`\epsilon` (``prediction="eps"``), :math:`v` or :math:`x_0`; :math:`\tilde y` is the label,
    replaced by the "no class" label ``num_classes`` with probability ``cfg_dropout``; :math:`L_{balance}` is the
    balance loss a DiT-MoE denoiser returns (logged as ``train_balance_loss``; ``train_loss`` is the denoising
    loss alone). Noise, timesteps and label drops come from a generator seeded by ``(seed, global_step)`` and are
    drawn for the whole global batch, each rank keeping its own samples' share (rank ``r`` of ``W`` holds the
    global batch's samples ``r, r + W, ...``, as the library's samplers and ``DistributedSampler`` shard), so two
    ranks train exactly as one process on the same global batches and a run resumed mid-epoch continues
    bit-identically; validation uses fixed noise per batch (``val_loss``/``test_loss``: held-out denoising loss,
    comparable across epochs and models).

    The denoiser is called ``denoiser(x_t, t, y)`` and may return a tensor, ``(tensor, balance_loss)``
    (:class:`~lightning_ext.diffusion.dit_moe.DiTMoE`) or an object with ``.sample`` (diffusers' ``UNet2DModel``
    with ``num_class_embeds=num_classes + 1``, ``DiTTransformer2DModel`` with ``num_embeds_ada_norm=num_classes +
    1``). EMA of the weights: add Lightning's ``EMAWeightAveraging`` callback (official decay 0.9999). Every
    ``sample_images_every_n_epochs`` validation epochs, a grid of ``num_sample_images`` DDIM samples per class
    (rows) is saved under ``sample_images_dir`` and logged to TensorBoard.

    Args:
        denoiser: the network (default: a :class:`~lightning_ext.diffusion.dit_moe.DiTMoE` for 1x28x28 images).
        num_classes: classes of the labels (0: unconditional; labels are then ignored).
        prediction: what the denoiser predicts: ``"eps"``, ``"v"`` or ``"x0"``.
        num_train_timesteps: :math:`T` (official 1000).
        beta_schedule: ``"linear"`` (DDPM, DiT's) or ``"squaredcos_cap_v2"`` (cosine).
        cfg_dropout: probability of training a sample without its label (0: no guidance possible).
        sample_steps: DDIM steps of the sample grids.
        guidance_scale: classifier-free guidance scale of the sample grids (1: conditional only).
        seed: seed of the training noise (with the global step) and of the sample grids.
        lr, weight_decay, optimizer, scheduler, scheduler_interval: the optimiser (default AdamW; official lr 1e-4).
        nonfinite_loss: ``"error"``, ``"skip"`` or ``"warn"`` on a non-finite training loss.
        sample_images_every_n_epochs: how often to save sample grids (0: never).
        sample_images_dir: where (relative to ``trainer.log_dir``; ``None`` disables the files).
        num_sample_images: samples per class in each grid.

    Example:
        >>> from lightning_ext.diffusion.dit_moe import DiTMoE
        >>> net = DiTMoE(input_size=8, patch_size=4, hidden_size=16, depth=1, num_heads=2, num_experts=4)
        >>> model = DiffusionModule(net, num_classes=10, num_train_timesteps=100)
        >>> model.sample(torch.tensor([1, 2]), steps=3, generator=torch.Generator().manual_seed(0)).shape
        torch.Size([2, 1, 8, 8])
    """

    def __init__(
        self,
        denoiser: Optional[nn.Module] = None,
        num_classes: NonNegativeInt = 10,
        prediction: Literal["eps", "v", "x0"] = "eps",
        num_train_timesteps: PositiveInt = 1000,
        beta_schedule: Literal["linear", "squaredcos_cap_v2"] = "linear",
        cfg_dropout: UnitIntervalRightOpen = 0.1,
        sample_steps: PositiveInt = 50,
        guidance_scale: PositiveFloat = 1.0,
        seed: int = 0,
        lr: PositiveFloat = 1e-4,
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
        schedulers = require("diffusers.schedulers", "DiffusionModule")
        check_number("num_classes (0: unconditional)", num_classes, low=0, integer=True)
        check_choice("prediction", prediction, tuple(_PREDICTION))
        check_positive_int("num_train_timesteps", num_train_timesteps)
        check_choice("beta_schedule", beta_schedule, ("linear", "squaredcos_cap_v2"))
        check_number("cfg_dropout", cfg_dropout, low=0, high=1, high_open=True)
        check_positive_int("sample_steps", sample_steps)
        check_positive("guidance_scale", guidance_scale)
        check_number("seed", seed, integer=True)
        check_optimization(lr, weight_decay)
        check_choice("scheduler_interval", scheduler_interval, ("epoch", "step"))
        check_nonfinite_policy(nonfinite_loss)
        check_number("sample_images_every_n_epochs", sample_images_every_n_epochs, low=0, integer=True)
        check_path_argument("sample_images_dir", sample_images_dir)
        check_positive_int("num_sample_images", num_sample_images)
        if denoiser is not None and not isinstance(denoiser, nn.Module):
            raise ValueError(f"denoiser must be a torch.nn.Module, got {type(denoiser).__name__}; give a network "
                             "(e.g. DiTMoE or diffusers' UNet2DModel).")
        self.save_hyperparameters(ignore=["denoiser", "optimizer", "scheduler"])
        if denoiser is None:
            from lightning_ext.diffusion.dit_moe import DiTMoE

            denoiser = DiTMoE(num_classes=num_classes)
        self.denoiser = denoiser
        self.num_classes, self.prediction = num_classes, prediction
        self.noise_scheduler = schedulers.DDPMScheduler(
            num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule,
            prediction_type=_PREDICTION[prediction], clip_sample=False)
        self._ddim_class = schedulers.DDIMScheduler
        self.cfg_dropout, self.sample_steps, self.guidance_scale, self.seed = cfg_dropout, sample_steps, \
            guidance_scale, seed
        self.lr, self.weight_decay = lr, weight_decay
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.scheduler_interval, self.nonfinite_loss, self.skipped_steps = scheduler_interval, nonfinite_loss, 0
        self.sample_every, self.sample_dir, self.num_samples = sample_images_every_n_epochs, sample_images_dir, \
            num_sample_images
        #: the timesteps and labels of the last denoising batch (read by ExpertRoutingStats)
        self.last_timesteps: Optional[torch.Tensor] = None
        self.last_labels: Optional[torch.Tensor] = None

    @property
    def num_train_timesteps(self) -> int:
        """:math:`T`, the training timesteps."""
        return int(self.noise_scheduler.config.num_train_timesteps)

    @override
    def forward(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The denoiser's prediction (its balance loss dropped)."""
        return self.denoise(x, t, y)[0]

    def denoise(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(prediction, balance_loss)`` of the denoiser, whatever it returns."""
        out = self.denoiser(x, t, y if self.num_classes else None)
        if isinstance(out, tuple):
            return out[0], out[1] if len(out) > 1 and torch.is_tensor(out[1]) else x.new_zeros(())
        return (out.sample if hasattr(out, "sample") else out), x.new_zeros(())

    @override
    def setup(self, stage: str) -> None:
        """Refuse ``nonfinite_loss='skip'`` under DDP."""
        refuse_skip_under_ddp(self, self.nonfinite_loss)

    def _labels(self, y: Any, batch_size: int) -> Optional[torch.Tensor]:
        if not self.num_classes:
            return None
        if not torch.is_tensor(y) or y.dim() != 1 or y.shape[0] != batch_size:
            raise ValueError(f"num_classes={self.num_classes} needs (images, labels) batches with one integer label "
                             "per image; set num_classes: 0 for unconditional training.")
        if int(y.min()) < 0 or int(y.max()) >= self.num_classes:
            raise ValueError(f"labels must lie in 0..{self.num_classes - 1}, got {int(y.min())}..{int(y.max())}; "
                             f"set num_classes: {int(y.max()) + 1}.")
        return y.long()

    def diffusion_loss(self, x0: torch.Tensor, y: Optional[torch.Tensor], generator: torch.Generator,
                       drop_labels: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``(denoising MSE, balance loss)`` of one batch, with noise, timesteps and label drops from ``generator``,
        drawn for the global batch (this rank's batch size x world size) and sliced to this rank's samples."""
        b = x0.shape[0]
        world, rank = (self.trainer.world_size, self.global_rank) if self._trainer is not None else (1, 0)
        n, mine = b * world, slice(rank, None, world)
        t = torch.randint(0, self.num_train_timesteps, (n,), generator=generator)[mine].to(x0.device)
        noise = torch.randn((n, *x0.shape[1:]), generator=generator, dtype=x0.dtype)[mine].to(x0.device)
        if y is not None and drop_labels and self.cfg_dropout > 0:
            drop = (torch.rand(n, generator=generator)[mine] < self.cfg_dropout).to(y.device)
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        x_t = self.noise_scheduler.add_noise(x0, noise, t)
        if self.prediction == "eps":
            target = noise
        elif self.prediction == "v":
            target = self.noise_scheduler.get_velocity(x0, noise, t)
        else:
            target = x0
        self.last_timesteps, self.last_labels = t, y
        pred, aux = self.denoise(x_t, t, y)
        return F.mse_loss(pred, target), aux

    def _generator(self, *key: int) -> torch.Generator:
        g = torch.Generator()
        g.manual_seed(hash((self.seed,) + key) & 0x7FFF_FFFF_FFFF)
        return g

    def _batch(self, batch: Any) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        x, y = (batch[0], batch[1]) if isinstance(batch, (tuple, list)) and len(batch) > 1 else (batch, None)
        if isinstance(batch, (tuple, list)) and len(batch) == 1:
            x = batch[0]
        if not torch.is_tensor(x) or x.dim() != 4:
            raise ValueError(f"DiffusionModule expects image batches (B, C, H, W), got "
                             f"{tuple(x.shape) if torch.is_tensor(x) else type(x).__name__}.")
        return x, self._labels(y, x.shape[0])

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Optional[torch.Tensor]:
        """Denoising loss plus the balance loss of one batch."""
        x, y = self._batch(batch)
        mse, aux = self.diffusion_loss(x, y, self._generator(0, self.global_step, 0), True)
        loss = mse + aux
        if not check_loss(self, loss, self.nonfinite_loss, batch):
            return None
        self.log("train_loss", mse, prog_bar=True)
        self.log("train_balance_loss", aux)
        return loss

    def _eval_step(self, batch: Any, batch_idx: int, stage: str) -> None:
        x, y = self._batch(batch)
        mse, _ = self.diffusion_loss(x, y, self._generator(1, batch_idx, 0), False)
        self.log(f"{stage}_loss", mse, sync_dist=True, prog_bar=stage == "val")

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Held-out denoising loss with fixed noise and timesteps per batch."""
        self._eval_step(batch, batch_idx, "val")

    @override
    def test_step(self, batch: Any, batch_idx: int) -> None:
        """Held-out denoising loss with fixed noise and timesteps per batch."""
        self._eval_step(batch, batch_idx, "test")

    @torch.no_grad()
    def sample(self, labels: torch.Tensor | int, steps: Optional[int] = None,
               sampler: Literal["ddim", "ddpm"] = "ddim", guidance_scale: Optional[float] = None,
               generator: Optional[torch.Generator] = None, shape: Optional[tuple[int, ...]] = None) -> torch.Tensor:
        """Draw images: one per label (a tensor of class ids), or ``labels`` unconditional ones (an int).

        ``shape`` is one image's ``(C, H, W)`` (default: the denoiser's ``in_channels`` and ``input_size``, or
        ``sample_size`` for diffusers models). DDIM uses ``eta = 0``; ``guidance_scale`` > 1 mixes the conditional
        and the "no class" prediction, :math:`\\hat\\epsilon = \\epsilon_\\varnothing + w(\\epsilon_y -
        \\epsilon_\\varnothing)`.
        """
        check_choice("sampler", sampler, ("ddim", "ddpm"))
        steps = self.sample_steps if steps is None else check_positive_int("steps", steps)
        w = self.guidance_scale if guidance_scale is None else check_positive("guidance_scale", guidance_scale)
        if isinstance(labels, int):
            n, y = labels, None
        else:
            y = self._labels(torch.as_tensor(labels, device=self.device), len(labels))
            n = len(labels)
        shape = shape or self._image_shape()
        sched = (self._ddim_class.from_config(self.noise_scheduler.config) if sampler == "ddim"
                 else type(self.noise_scheduler).from_config(self.noise_scheduler.config))
        sched.set_timesteps(steps)
        x = torch.randn((n, *shape), generator=generator).to(self.device)
        null = None if y is None else torch.full_like(y, self.num_classes)
        for t in sched.timesteps:
            tt = torch.full((n,), int(t), device=self.device, dtype=torch.long)
            if y is not None and w != 1.0:
                both = self.denoise(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([y, null]))[0]
                cond, uncond = both.chunk(2)
                pred = uncond + w * (cond - uncond)
            else:
                pred = self.denoise(x, tt, y)[0]
            x = sched.step(pred, t, x, generator=generator).prev_sample
        return x

    def _image_shape(self) -> tuple[int, int, int]:
        net = self.denoiser
        if hasattr(net, "input_size") and hasattr(net, "in_channels"):
            return (net.in_channels, net.input_size, net.input_size)
        config = getattr(net, "config", None)
        if config is not None and hasattr(config, "sample_size") and hasattr(config, "in_channels"):
            size = config.sample_size
            size = (size, size) if isinstance(size, int) else tuple(size)
            return (config.in_channels, *size)
        raise ValueError("cannot tell the denoiser's image shape; pass shape=(C, H, W) to sample().")

    @override
    def on_validation_epoch_end(self) -> None:
        """Every ``sample_images_every_n_epochs`` epochs of a fit, save (and log) a grid of samples per class."""
        if not sample_epoch_due(self, self.sample_every):
            return
        classes = max(self.num_classes, 1)
        labels = torch.arange(classes).repeat_interleave(self.num_samples) if self.num_classes else \
            self.num_samples
        images = self.sample(labels, generator=self._generator(2, self.current_epoch)).cpu()
        rows = [list(images[i * self.num_samples:(i + 1) * self.num_samples]) for i in range(classes)]
        log_sample_image(self, tile_rows(rows), "val_samples", self.sample_dir,
                         f"epoch {self.current_epoch + 1}: DDIM-{self.sample_steps} samples, one row per class")

    @override
    def configure_optimizers(self):
        """The injected optimiser (default AdamW) and scheduler."""
        return configure_optimization(self, [p for p in self.parameters() if p.requires_grad])
