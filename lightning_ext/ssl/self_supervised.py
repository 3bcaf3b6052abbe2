"""The base of the self-supervised LightningModules (FroSSL, VICReg, Barlow Twins, SimCLR).

:class:`SelfSupervisedModule` holds what the four methods share: a backbone (a timm model by name or any
``nn.Module``), a projector, views made from each batch by a :class:`MultiViewAugmentation` (or given by the
DataModule), an :class:`OnlineLinearProbe` on detached features, effective-rank logging, a guard against
non-finite losses, and optimiser/scheduler injection in LightningCLI style. A method only implements
:meth:`SelfSupervisedModule.ssl_loss`. The split follows solo-learn: pure loss functions in
``lightning_ext/ssl/losses/<method>.py``, the Lightning wrappers in ``lightning_ext/ssl/<method>.py``; each wrapper
holds only its loss's arguments, its defaults and :meth:`~SelfSupervisedModule.ssl_loss`.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Optional, Sequence, Union

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy
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
from lightning_ext.core.optimization import configure_optimization
from lightning_ext.core.validation import (
    ClosedUnitInterval,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    check_choice,
    check_fraction,
    check_number,
    check_positive,
    check_positive_int,
)
from lightning_ext.core.validation import AtLeastTwoInt
from lightning_ext.ssl.multi_view_augmentation import MultiViewAugmentation
from lightning_ext.ssl.online_linear_probe import OnlineLinearProbe
from lightning_ext.vision.backbones import StemDownsample, build_backbone, image_pair, probe_backbone
from lightning_ext.core.optimization import NumClasses, check_num_classes, check_optimization

__all__ = ["SelfSupervisedModule", "ConvEncoder", "WarmupCosineLR", "build_projector", "effective_rank"]

_SSL_DIVERGENCE = ("a learning rate that is too high or collapsed embeddings (all projector outputs zero): lower "
                   "`lr` or add gradient clipping (`trainer.gradient_clip_val`)")
ImageSize = Union[PositiveInt, tuple[PositiveInt, PositiveInt]]
#: Views per image: an integer >= 2.
NumViews = AtLeastTwoInt


# -- building blocks ------------------------------------------------------------------------------------------


def effective_rank(z: Tensor, eps: float = 1e-7) -> float:
    r"""Effective rank of an ``(N, D)`` embedding matrix (Roy and Vetterli, 2007; RankMe, Garrido et al. 2023).

    .. math:: \mathrm{erank}(Z) = \exp\Big(-\sum_i p_i \log p_i\Big), \qquad
              p_i = \frac{\sigma_i}{\sum_j \sigma_j} + \epsilon

    with :math:`\sigma_i` the singular values of :math:`Z`. It lies in :math:`[1, \min(N, D)]`: 1 for a
    collapsed embedding, :math:`\min(N, D)` for an isotropic one.

    Example:
        >>> round(effective_rank(torch.eye(8)), 3)
        8.0
        >>> round(effective_rank(torch.ones(8, 8)), 3)
        1.0
    """
    with torch.no_grad():
        s = torch.linalg.svdvals(z.detach().float())
        total = s.sum()
        if not torch.isfinite(total) or total <= 0:
            return float("nan")
        p = s / total + eps
        return float(torch.exp(-(p * torch.log(p)).sum()))


def build_projector(
    in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 3, batch_norm: bool = True
) -> nn.Sequential:
    """An MLP projector: ``num_layers`` linear layers, the hidden ones followed by BatchNorm (optional) and ReLU.

    With the defaults this is the FroSSL/VICReg/Barlow Twins projector of the reference code
    (Linear-BN-ReLU-Linear-BN-ReLU-Linear); ``num_layers=2`` gives SimCLR's.

    Example:
        >>> build_projector(512, 2048, 1024)[0]
        Linear(in_features=512, out_features=2048, bias=True)
    """
    for name, value in (("proj_layers", num_layers), ("feature_dim", in_dim), ("proj_hidden_dim", hidden_dim),
                        ("proj_output_dim", out_dim)):
        check_positive_int(name, value)
    layers: list[nn.Module] = []
    dim = in_dim
    for _ in range(num_layers - 1):
        layers += [nn.Linear(dim, hidden_dim)]
        if batch_norm:
            layers += [nn.BatchNorm1d(hidden_dim)]
        layers += [nn.ReLU(inplace=True)]
        dim = hidden_dim
    layers += [nn.Linear(dim, out_dim)]
    return nn.Sequential(*layers)


class ConvEncoder(nn.Module):
    """A small CNN backbone for small images: 3x3 conv-BN-ReLU blocks, stride 2 after the first, global pool.

    ``widths=(32, 64, 128)`` on 28x28 inputs is 0.1M parameters; it returns ``(B, widths[-1])`` features.
    Use it from YAML as ``backbone: {class_path: lightning_ext.ssl.self_supervised.ConvEncoder}``.

    Example:
        >>> ConvEncoder(in_chans=1, widths=(8, 16))(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 16])
    """

    def __init__(self, in_chans: PositiveInt = 1, widths: Sequence[PositiveInt] = (32, 64, 128)) -> None:
        super().__init__()
        widths = list(widths)
        check_positive_int("in_chans", in_chans)
        if not widths:
            raise ValueError("widths must list at least one block width, got [].")
        for width in widths:
            check_positive_int("widths", width)
        layers: list[nn.Module] = []
        prev = in_chans
        for i, width in enumerate(widths):
            layers += [nn.Conv2d(prev, width, 3, stride=1 if i == 0 else 2, padding=1, bias=False),
                       nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            prev = width
        self.features = nn.Sequential(*layers)
        self.num_features = prev

    @override
    def forward(self, x: Tensor) -> Tensor:
        """Globally pooled features ``(B, widths[-1])``."""
        return self.features(x).mean(dim=(2, 3))


class WarmupCosineLR(torch.optim.lr_scheduler.LambdaLR):
    """Linear warm-up for ``warmup_steps`` scheduler steps, then a half cosine down to ``min_ratio`` x the base LR.

    solo-learn's ``warmup_cosine`` schedule as a small class, so it can be written in YAML
    (``scheduler: {class_path: lightning_ext.ssl.self_supervised.WarmupCosineLR, init_args: {...}}``);
    step it per optimizer step (``scheduler_interval: step``) or per epoch, with ``total_steps`` counted
    in the same unit.

    Example:
        >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        >>> sched = WarmupCosineLR(opt, warmup_steps=2, total_steps=6)
        >>> lrs = []
        >>> for _ in range(6):
        ...     lrs.append(round(opt.param_groups[0]["lr"], 3)); opt.step(); sched.step()
        >>> lrs
        [0.0, 0.5, 1.0, 0.854, 0.5, 0.146]
    """

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: NonNegativeInt = 10,
                 total_steps: PositiveInt = 100, min_ratio: ClosedUnitInterval = 0.0, last_epoch: int = -1) -> None:
        check_positive_int("total_steps", total_steps)
        check_number("warmup_steps", warmup_steps, low=0, high=total_steps, high_open=True, integer=True)
        check_fraction("min_ratio", min_ratio)
        self.warmup_steps, self.total_steps, self.min_ratio = warmup_steps, total_steps, min_ratio
        super().__init__(optimizer, self._factor, last_epoch)

    def _factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return step / self.warmup_steps
        progress = min((step - self.warmup_steps) / (self.total_steps - self.warmup_steps), 1.0)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# -- the shared LightningModule -------------------------------------------------------------------------------


class SelfSupervisedModule(SkippedStepsCheckpoint, LightningModule):
    """Base class: self-supervised pretraining of a backbone + projector on views of each batch.

    **Batches.** ``(x, y)`` or ``x`` image batches (any of our image DataModules): ``num_views`` views are
    made by ``augmentation`` on the batch's device. A DataModule that makes its own views may instead yield
    ``([view_1, ..., view_V], y)``. Labels are used only by the online probe.

    **Logged.** ``train_loss`` (the self-supervised loss; plus its terms, method-specific), ``train_loss_epoch``
    (its epoch mean over ranks), ``train_probe_acc``, ``train_feature_rank`` and ``train_projection_rank`` (the
    :func:`effective_rank` of the first view's backbone features and projections, epoch means),
    ``val_probe_acc``/``test_probe_acc`` (the probe on un-augmented images) and ``val_loss`` (the
    self-supervised loss on augmented validation views, when ``validate_ssl_loss``). Add
    :class:`~lightning_ext.callbacks.KNNEvaluation` for ``val_knn_acc``/``test_knn_acc``.

    **DDP.** With ``gather_distributed=True`` the loss is computed on the global batch of all ranks through a
    gather with exact gradients, so two processes train like one process with the same global batch (up to
    per-rank BatchNorm statistics; use ``SyncBatchNorm`` for those). ``False`` computes it per rank.

    **Non-finite loss.** ``nonfinite_loss="error"`` (default) stops with a one-line ``FloatingPointError`` naming
    the step, the epoch and the likely cause (all ranks stop together under DDP); ``"skip"`` skips that optimizer
    step and warns, counting the skips in ``skipped_steps`` (saved in checkpoints); BatchNorm running statistics
    fed by the bad batch are restored. Lightning cannot skip steps under DDP, so ``"skip"`` is refused there in
    ``setup``. ``"warn"`` only warns. The mechanism is shared by every module: :mod:`lightning_ext.core.guards`.

    **Reproducible views.** Views come from an RNG seeded by ``seed`` and the batch's position
    (:meth:`make_views`): a resumed run matches an uninterrupted one, and two methods trained with the same
    seed see the same augmented images.

    Args:
        backbone: timm model name (built without a classifier, ``num_classes=0``, and without download) or a
            module mapping ``(B, in_chans, H, W)`` images to ``(B, F)`` features.
        in_chans: image channels.
        image_size: image height and width (int for square), used to check the backbone and size the projector.
        stem_downsample: for timm CNNs, how much the stem shrinks the image (see ``ImageClassifier``);
            ``None`` picks 1 under 64 pixels, else 4.
        backbone_kwargs: extra ``timm.create_model`` arguments.
        proj_hidden_dim: hidden width of the projector.
        proj_output_dim: output width ``D`` of the projector (the embedding the loss sees).
        proj_layers: linear layers in the projector.
        proj_batch_norm: BatchNorm after the projector's hidden layers.
        num_views: views per image made by ``augmentation`` (ignored when the batch brings its views).
        augmentation: module making one random view of a batch; ``None`` builds a default
            :class:`MultiViewAugmentation`; ``torch.nn.Identity`` gives identical views (for tests).
        num_classes: classes of the online linear probe; ``None`` disables the probe.
        probe_lr: learning rate of the probe's parameter group (``None``: the optimiser's).
        lr: learning rate of the default AdamW.
        weight_decay: weight decay of the default AdamW (the probe's group has none).
        optimizer: optimiser factory (LightningCLI ``OptimizerCallable``); it receives parameter groups.
        scheduler: LR-scheduler factory (``LRSchedulerCallable``), e.g. :class:`WarmupCosineLR`.
        scheduler_interval: step the scheduler every ``"epoch"`` or every ``"step"``.
        gather_distributed: compute the loss on the global batch under DDP.
        nonfinite_loss: ``"error"``, ``"skip"`` or ``"warn"``.
        log_effective_rank: log the effective ranks (an SVD of an ``N x F`` and an ``N x D`` matrix per step).
        validate_ssl_loss: compute the self-supervised loss on augmented validation views (``val_loss``).
        seed: seed of the views (see :meth:`make_views`); ``None`` draws one from the global RNG (which
            ``seed_everything`` fixes); kept in the ``augmentation_seed`` buffer, so checkpoints restore it.
        eval_resize: resize images to this size in :meth:`forward` (evaluation, probe, kNN), e.g. the
            augmentation's ``crop_size``, so that evaluated images match the scale of the training views.
    """

    method_name = "self-supervised"

    def __init__(
        self,
        backbone: Union[str, nn.Module] = "resnet18",
        in_chans: PositiveInt = 1,
        image_size: ImageSize = 28,
        stem_downsample: Optional[StemDownsample] = None,
        backbone_kwargs: Optional[dict] = None,
        proj_hidden_dim: PositiveInt = 2048,
        proj_output_dim: PositiveInt = 1024,
        proj_layers: PositiveInt = 3,
        proj_batch_norm: bool = True,
        num_views: NumViews = 2,
        augmentation: Optional[nn.Module] = None,
        num_classes: Optional[NumClasses] = 10,
        probe_lr: Optional[PositiveFloat] = None,
        lr: PositiveFloat = 1e-3,
        weight_decay: NonNegativeFloat = 1e-4,
        optimizer: Optional[OptimizerCallable] = None,
        scheduler: Optional[LRSchedulerCallable] = None,
        scheduler_interval: Literal["epoch", "step"] = "epoch",
        gather_distributed: bool = True,
        nonfinite_loss: NonFiniteLoss = "error",
        log_effective_rank: bool = True,
        validate_ssl_loss: bool = True,
        seed: Optional[int] = None,
        eval_resize: Optional[ImageSize] = None,
    ) -> None:
        super().__init__()
        if isinstance(num_views, bool) or not isinstance(num_views, int) or num_views < 2:
            raise ValueError(
                f"{type(self).__name__} compares views of each image: `num_views` must be >= 2, got {num_views}."
            )
        check_positive_int("in_chans", in_chans)
        check_optimization(lr, weight_decay)
        if probe_lr is not None:
            check_positive("probe_lr", probe_lr)
        check_choice("scheduler_interval", scheduler_interval, ("epoch", "step"))
        check_nonfinite_policy(nonfinite_loss)
        if num_classes is not None:
            check_num_classes(num_classes, "num_classes (or None to disable the probe)")
        if seed is not None:
            check_number("seed", seed, integer=True)
        height, width = image_pair(image_size)
        self.input_shape = (in_chans, height, width)
        name = backbone if isinstance(backbone, str) else type(backbone).__name__
        self.backbone, stem_downsample = build_backbone(backbone, 0, in_chans, (height, width), stem_downsample,
                                                        backbone_kwargs, type(self).__name__)
        self.feature_dim = self._feature_dim(name)
        self.projector = build_projector(self.feature_dim, proj_hidden_dim, proj_output_dim, proj_layers,
                                         proj_batch_norm)
        self.num_views = num_views
        self.augmentation = augmentation if augmentation is not None else MultiViewAugmentation()
        self.num_classes = num_classes
        self.probe = OnlineLinearProbe(self.feature_dim, num_classes) if num_classes is not None else None
        if num_classes is not None:
            self.train_probe_acc = MulticlassAccuracy(num_classes, average="micro")
            self.val_probe_acc = MulticlassAccuracy(num_classes, average="micro")
            self.test_probe_acc = MulticlassAccuracy(num_classes, average="micro")
        self.probe_lr, self.lr, self.weight_decay = probe_lr, lr, weight_decay
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.scheduler_interval = scheduler_interval
        self.gather_distributed = gather_distributed
        self.nonfinite_loss = nonfinite_loss
        self.log_effective_rank = log_effective_rank
        self.validate_ssl_loss = validate_ssl_loss
        self.eval_resize = image_pair(eval_resize, "eval_resize") if eval_resize is not None else None
        self.skipped_steps = 0
        self._batch_idx = 0
        if seed is None:  # drawn from the global RNG (not reseeding it), so seed_everything fixes it
            seed = int(torch.randint(0, 2**31 - 1, (1,)))
        # a buffer, so checkpoints restore it and DDP starts every rank from rank 0's value
        self.register_buffer("augmentation_seed", torch.tensor(int(seed), dtype=torch.long))
        # every argument of this class and of the method subclass calling it (Lightning walks the __init__ frames)
        self.save_hyperparameters(ignore=["optimizer", "scheduler", "augmentation"]
                                  + (["backbone"] if isinstance(backbone, nn.Module) else []))

    # -- construction helpers ----------------------------------------------------------------------------------
    def _feature_dim(self, name: str) -> int:
        out = probe_backbone(self.backbone, self.input_shape, name)
        if out.dim() != 2 or out.shape[0] != 2:
            raise ValueError(
                f"Backbone {name} must return (batch, features), got {tuple(out.shape)}; add global pooling and "
                "flatten (timm models by name already do)."
            )
        return int(out.shape[1])

    # -- what a method implements ------------------------------------------------------------------------------
    def ssl_loss(self, z: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The method's loss of projections ``z`` shaped ``(V, N, D)``: ``(loss, {term_name: value})``."""
        raise NotImplementedError

    # -- forward -----------------------------------------------------------------------------------------------
    @override
    def forward(self, x: Tensor) -> Tensor:
        """Backbone features ``(B, F)`` of a batch of images: the representation that is evaluated.

        With ``eval_resize`` the images are first resized (bilinear, antialiased) to that size.
        """
        if self.eval_resize is not None and tuple(x.shape[-2:]) != self.eval_resize:
            x = torch.nn.functional.interpolate(x, size=self.eval_resize, mode="bilinear", antialias=True,
                                                align_corners=False)
        return self.backbone(x)

    def _views_and_labels(self, batch: Any) -> tuple[list[Tensor], Optional[Tensor]]:
        x, y = batch, None
        if isinstance(batch, (tuple, list)):
            if len(batch) == 0:
                raise ValueError("Received an empty batch.")
            x = batch[0]
            y = batch[1] if len(batch) > 1 and isinstance(batch[1], Tensor) else None
        if isinstance(x, (tuple, list)):
            views = list(x)
            if len(views) < 2:
                raise ValueError(
                    f"{type(self).__name__} needs at least two views of each image; the batch brought {len(views)}."
                )
            return views, y
        if not isinstance(x, Tensor) or x.dim() != 4:
            raise ValueError(
                f"{type(self).__name__} expects image batches shaped (B, C, H, W), or a list of such views; "
                f"got {type(x).__name__} {tuple(x.shape) if isinstance(x, Tensor) else ''}."
            )
        return self.make_views(x), y

    def make_views(self, x: Tensor, stage: str = "train") -> list[Tensor]:
        """``num_views`` augmented views of ``x``, drawn from an RNG seeded by (seed, stage, epoch, batch, rank).

        Views are therefore a function of the batch's position, not of the global RNG's history: a resumed
        run sees the views an uninterrupted run would have seen, and methods compared with the same seed see
        the same augmentations. The global RNG is left as it was.
        """
        epoch = self.current_epoch if self._trainer is not None else 0
        rank = self.global_rank if self._trainer is not None else 0
        key = (int(self.augmentation_seed), {"train": 0, "val": 1, "test": 2}.get(stage, 3), epoch,
               self._batch_idx, rank)
        seed = 0
        for part in key:
            seed = (seed * 1_000_003 + part) % (2**63 - 1)
        devices = [x.device.index or 0] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            return [self.augmentation(x) for _ in range(self.num_views)]

    def _embed(self, views: list[Tensor]) -> tuple[Tensor, Tensor]:
        # one forward per view, as in the reference code (BatchNorm statistics per view)
        feats = [self.backbone(v) for v in views]
        z = torch.stack([self.projector(f) for f in feats])
        return torch.stack(feats), z

    # -- steps -------------------------------------------------------------------------------------------------
    @override
    def training_step(self, batch: Any, batch_idx: int) -> Optional[Tensor]:
        """The self-supervised loss of the batch's views plus the probe's loss (``None`` skips the step)."""
        self._batch_idx = batch_idx
        views, y = self._views_and_labels(batch)
        if views[0].shape[0] < 2:
            raise ValueError(
                f"{type(self).__name__} needs a batch of at least 2 samples per process (the loss and BatchNorm "
                f"take statistics over the batch), got {views[0].shape[0]}. Raise the batch size or drop the last "
                "incomplete batch (`drop_last: true` on our DataModules)."
            )
        buffers = buffer_snapshot(self) if self.nonfinite_loss == "skip" else None
        feats, z = self._embed(views)
        loss, terms = self.ssl_loss(z)
        if not check_loss(self, loss, self.nonfinite_loss, batch, what=f"{self.method_name} loss",
                          otherwise=_SSL_DIVERGENCE):
            restore_buffers(self, buffers)  # the bad forward also fed BatchNorm's running statistics: undo it
            return None
        self.log("train_loss", loss, prog_bar=True)
        self.log("train_loss_epoch", loss, on_step=False, on_epoch=True, sync_dist=True)
        for name, value in terms.items():
            self.log(f"train_{name}", value, on_step=False, on_epoch=True, sync_dist=True)
        total = loss
        if self.probe is not None and y is not None:
            probe_loss, logits = self.probe.training_loss(feats.flatten(0, 1), y.repeat(len(views)))
            self.train_probe_acc(logits, y.repeat(len(views)))
            self.log("train_probe_loss", probe_loss, on_step=False, on_epoch=True, sync_dist=True)
            self.log("train_probe_acc", self.train_probe_acc, on_step=False, on_epoch=True)
            total = total + probe_loss
        if self.log_effective_rank:
            self.log("train_feature_rank", effective_rank(feats[0]), on_step=False, on_epoch=True, sync_dist=True)
            self.log("train_projection_rank", effective_rank(z[0]), on_step=False, on_epoch=True, sync_dist=True)
        return total

    def _eval_step(self, batch: Any, stage: str, batch_idx: int = 0) -> None:
        self._batch_idx = batch_idx
        x, y = (batch[0], batch[1] if len(batch) > 1 else None) if isinstance(batch, (tuple, list)) else (batch, None)
        if isinstance(x, (tuple, list)):  # a DataModule with views: evaluate the first one
            x = x[0]
        if self.probe is not None and y is not None:
            metric = getattr(self, f"{stage}_probe_acc")
            metric(self.probe(self(x)), y)
            self.log(f"{stage}_probe_acc", metric, prog_bar=True)
        if stage == "val" and self.validate_ssl_loss and x.shape[0] >= 2:
            _, z = self._embed(self.make_views(x, stage))
            loss, _ = self.ssl_loss(z)
            self.log("val_loss", loss, sync_dist=True)

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Probe accuracy on un-augmented images and the self-supervised loss on views."""
        self._eval_step(batch, "val", batch_idx)

    @override
    def test_step(self, batch: Any, batch_idx: int) -> None:
        """Probe accuracy on un-augmented test images."""
        self._eval_step(batch, "test", batch_idx)

    @override
    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Backbone features of a batch."""
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x)

    # -- checks against the data, optimisation, state --------------------------------------------------------
    @override
    def setup(self, stage: str) -> None:
        """Refuse ``nonfinite_loss='skip'`` under DDP; check the data's classes and image shape."""
        refuse_skip_under_ddp(self, self.nonfinite_loss)
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is None:
            return
        data_classes = getattr(dm, "num_classes", None)
        if self.num_classes is not None and data_classes is not None and data_classes != self.num_classes:
            raise ValueError(
                f"The online probe has num_classes={self.num_classes} but {type(dm).__name__} has {data_classes} "
                f"classes. Set `model.init_args.num_classes: {data_classes}` (or null to disable the probe)."
            )
        data_shape = getattr(dm, "input_shape", None)
        if data_shape is not None and tuple(data_shape) != self.input_shape:
            raise ValueError(
                f"{type(self).__name__} was built for images of shape {self.input_shape} but {type(dm).__name__} "
                f"yields {tuple(data_shape)}. Set `in_chans: {data_shape[0]}` and "
                f"`image_size: [{data_shape[-2]}, {data_shape[-1]}]`."
            )

    @override
    def configure_optimizers(self):
        """The injected optimiser (default AdamW) with the probe in its own group (no weight decay)."""
        probe_params = set(map(id, self.probe.parameters())) if self.probe is not None else set()
        main = [p for p in self.parameters() if p.requires_grad and id(p) not in probe_params]
        main_group: dict[str, Any] = {"params": main}
        groups = [main_group]
        if self.probe is not None:
            probe_group: dict[str, Any] = {"params": list(self.probe.parameters()), "weight_decay": 0.0}
            if self.probe_lr is not None:
                probe_group["lr"] = self.probe_lr
            groups.append(probe_group)
        return configure_optimization(self, groups)

