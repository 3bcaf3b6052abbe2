"""The base of the self-supervised LightningModules (FroSSL, VICReg, Barlow Twins, SimCLR).

:class:`SelfSupervisedModule` holds what the four methods share: a backbone (a timm model by name or any
``nn.Module``), a projector, views made from each batch by a :class:`MultiViewAugmentation` (or given by the
DataModule), an :class:`OnlineLinearProbe` on detached features, effective-rank logging, a guard against
non-finite losses, and optimiser/scheduler injection in LightningCLI style. A method only implements
:meth:`SelfSupervisedModule.ssl_loss`. The split follows solo-learn: pure loss functions in
``lightning_ext/losses/<method>.py``, the Lightning wrappers in ``lightning_ext/modules/<method>.py``.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Union

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_ext.vision.image_classifier import _pair, adapt_stem, create_timm_backbone
from lightning_ext.ssl.multi_view_augmentation import MultiViewAugmentation
from lightning_ext.ssl.online_linear_probe import OnlineLinearProbe

__all__ = ["SelfSupervisedModule", "ConvEncoder", "WarmupCosineLR", "build_projector", "effective_rank"]

NONFINITE_MODES = ("raise", "skip")


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
    if num_layers < 1 or min(in_dim, hidden_dim, out_dim) < 1:
        raise ValueError(
            f"The projector needs num_layers >= 1 and positive sizes, got num_layers={num_layers}, "
            f"in_dim={in_dim}, hidden_dim={hidden_dim}, out_dim={out_dim}."
        )
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

    def __init__(self, in_chans: int = 1, widths: Sequence[int] = (32, 64, 128)) -> None:
        super().__init__()
        widths = list(widths)
        if in_chans < 1 or not widths or min(widths) < 1:
            raise ValueError(f"Need in_chans >= 1 and positive widths, got in_chans={in_chans}, widths={widths}.")
        layers: list[nn.Module] = []
        prev = in_chans
        for i, width in enumerate(widths):
            layers += [nn.Conv2d(prev, width, 3, stride=1 if i == 0 else 2, padding=1, bias=False),
                       nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            prev = width
        self.features = nn.Sequential(*layers)
        self.num_features = prev

    def forward(self, x: Tensor) -> Tensor:
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

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int = 10, total_steps: int = 100,
                 min_ratio: float = 0.0, last_epoch: int = -1) -> None:
        if warmup_steps < 0 or total_steps < 1 or warmup_steps >= total_steps:
            raise ValueError(f"Need 0 <= warmup_steps < total_steps, got {warmup_steps} and {total_steps}.")
        if not 0 <= min_ratio <= 1:
            raise ValueError(f"`min_ratio` must be in [0, 1], got {min_ratio}.")
        self.warmup_steps, self.total_steps, self.min_ratio = warmup_steps, total_steps, min_ratio
        super().__init__(optimizer, self._factor, last_epoch)

    def _factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return step / self.warmup_steps
        progress = min((step - self.warmup_steps) / (self.total_steps - self.warmup_steps), 1.0)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# -- the shared LightningModule -------------------------------------------------------------------------------


class SelfSupervisedModule(LightningModule):
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

    **Non-finite loss.** ``nonfinite_loss="raise"`` (default) stops with a ``FloatingPointError`` naming the
    usual causes (all ranks stop together under DDP); ``"skip"`` skips that optimizer step and warns,
    counting the skips in ``skipped_steps`` (saved in checkpoints); BatchNorm running statistics fed by the
    bad batch are restored. Lightning cannot skip steps under DDP, so ``"skip"`` is refused there in ``setup``.

    **Reproducible views.** Views come from an RNG seeded by ``augmentation_seed`` and the batch's position
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
        nonfinite_loss: ``"raise"`` or ``"skip"``.
        log_effective_rank: log the effective ranks (an SVD of an ``N x F`` and an ``N x D`` matrix per step).
        validate_ssl_loss: compute the self-supervised loss on augmented validation views (``val_loss``).
        augmentation_seed: seed of the views (see :meth:`make_views`); ``None`` draws one from the global RNG.
        eval_resize: resize images to this size in :meth:`forward` (evaluation, probe, kNN), e.g. the
            augmentation's ``crop_size``, so that evaluated images match the scale of the training views.
    """

    method_name = "self-supervised"

    def __init__(
        self,
        backbone: Union[str, nn.Module] = "resnet18",
        in_chans: int = 1,
        image_size: Union[int, tuple[int, int]] = 28,
        stem_downsample: Optional[int] = None,
        backbone_kwargs: Optional[dict] = None,
        proj_hidden_dim: int = 2048,
        proj_output_dim: int = 1024,
        proj_layers: int = 3,
        proj_batch_norm: bool = True,
        num_views: int = 2,
        augmentation: Optional[nn.Module] = None,
        num_classes: Optional[int] = 10,
        probe_lr: Optional[float] = None,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        optimizer: Optional[OptimizerCallable] = None,
        scheduler: Optional[LRSchedulerCallable] = None,
        scheduler_interval: str = "epoch",
        gather_distributed: bool = True,
        nonfinite_loss: str = "raise",
        log_effective_rank: bool = True,
        validate_ssl_loss: bool = True,
        augmentation_seed: Optional[int] = None,
        eval_resize: Optional[Union[int, tuple[int, int]]] = None,
    ) -> None:
        super().__init__()
        if num_views < 2:
            raise ValueError(
                f"{type(self).__name__} compares views of each image: `num_views` must be >= 2, got {num_views}."
            )
        if in_chans < 1:
            raise ValueError(f"`in_chans` must be >= 1, got {in_chans}.")
        if lr <= 0 or weight_decay < 0 or (probe_lr is not None and probe_lr <= 0):
            raise ValueError(f"Need lr > 0, weight_decay >= 0, probe_lr > 0; got {lr}, {weight_decay}, {probe_lr}.")
        if scheduler_interval not in ("epoch", "step"):
            raise ValueError(f"`scheduler_interval` must be 'epoch' or 'step', got {scheduler_interval!r}.")
        if nonfinite_loss not in NONFINITE_MODES:
            raise ValueError(f"`nonfinite_loss` must be one of {NONFINITE_MODES}, got {nonfinite_loss!r}.")
        if num_classes is not None and num_classes < 2:
            raise ValueError(f"`num_classes` must be >= 2 (or None to disable the probe), got {num_classes}.")
        height, width = _pair(image_size)
        self.input_shape = (in_chans, height, width)
        self.backbone = self._build_backbone(backbone, in_chans, stem_downsample, backbone_kwargs)
        self.feature_dim = self._check_backbone(backbone if isinstance(backbone, str) else type(backbone).__name__)
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
        self.eval_resize = _pair(eval_resize) if eval_resize is not None else None
        self.skipped_steps = 0
        self._batch_idx = 0
        if augmentation_seed is None:  # drawn from the global RNG, so seed_everything fixes it
            augmentation_seed = int(torch.randint(0, 2**31 - 1, (1,)))
        # a buffer, so checkpoints restore it and DDP starts every rank from rank 0's value
        self.register_buffer("augmentation_seed", torch.tensor(int(augmentation_seed), dtype=torch.long))

    # -- construction helpers ----------------------------------------------------------------------------------
    def _build_backbone(self, backbone, in_chans, stem_downsample, backbone_kwargs) -> nn.Module:
        if isinstance(backbone, str):
            net = create_timm_backbone(backbone, 0, in_chans, **(backbone_kwargs or {}))
            if stem_downsample is None:
                stem_downsample = 1 if min(self.input_shape[1:]) < 64 else 4
            changed = adapt_stem(net, stem_downsample)
            if changed:
                rank_zero_info(f"{type(self).__name__}: adapted the stem of {backbone} ({', '.join(changed)}).")
            return net
        if isinstance(backbone, nn.Module):
            if backbone_kwargs or stem_downsample is not None:
                raise ValueError("`backbone_kwargs` and `stem_downsample` only apply to timm backbones given by name.")
            return backbone
        raise TypeError(f"`backbone` must be a timm model name or an nn.Module, got {type(backbone).__name__}.")

    def _check_backbone(self, name: str) -> int:
        was_training = self.backbone.training
        self.backbone.eval()
        try:
            with torch.no_grad():
                out = self.backbone(torch.zeros(2, *self.input_shape))
        except Exception as err:  # noqa: BLE001 - re-raised with advice
            raise ValueError(
                f"Backbone {name} cannot process images of shape {self.input_shape} (channels, height, width): "
                f"{err}. Set `image_size`/`in_chans` to your data's, or pick a backbone that accepts this size."
            ) from err
        finally:
            self.backbone.train(was_training)
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

    def _buffer_snapshot(self) -> dict[str, Tensor]:
        return {name: b.detach().clone() for name, b in self.named_buffers()}

    def _guard(self, loss: Tensor) -> bool:
        """True when the step may proceed; raises or returns False (skip) for a non-finite loss on any rank."""
        finite = bool(torch.isfinite(loss).all())
        if self._trainer is not None:
            finite = bool(self.trainer.strategy.reduce_boolean_decision(finite, all=True))
        if finite:
            return True
        if self.nonfinite_loss == "raise":
            raise FloatingPointError(
                f"{type(self).__name__}: the {self.method_name} loss is not finite ({float(loss)}) at step "
                f"{self.global_step}. Usual causes: a learning rate that is too high, collapsed embeddings (all "
                "projector outputs zero), or non-finite inputs. Lower `lr`, add gradient clipping "
                "(`trainer.gradient_clip_val`), or set `nonfinite_loss: skip` to skip such steps."
            )
        self.skipped_steps += 1
        rank_zero_warn(f"{type(self).__name__}: non-finite loss at step {self.global_step}; optimizer step skipped "
                       f"({self.skipped_steps} so far).")
        return False

    # -- steps -------------------------------------------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> Optional[Tensor]:
        self._batch_idx = batch_idx
        views, y = self._views_and_labels(batch)
        if views[0].shape[0] < 2:
            raise ValueError(
                f"{type(self).__name__} needs a batch of at least 2 samples per process (the loss and BatchNorm "
                f"take statistics over the batch), got {views[0].shape[0]}. Raise the batch size or drop the last "
                "incomplete batch (`drop_last: true` on our DataModules)."
            )
        buffers = self._buffer_snapshot() if self.nonfinite_loss == "skip" else None
        feats, z = self._embed(views)
        loss, terms = self.ssl_loss(z)
        if not self._guard(loss):
            if buffers is not None:  # the bad forward also fed BatchNorm's running statistics: undo it
                for name, buffer in self.named_buffers():
                    if name in buffers:
                        buffer.copy_(buffers[name])
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

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "val", batch_idx)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "test", batch_idx)

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x)

    # -- checks against the data, optimisation, state --------------------------------------------------------
    def setup(self, stage: str) -> None:
        if self._trainer is not None and self.nonfinite_loss == "skip" and self.trainer.world_size > 1:
            raise RuntimeError(
                f"{type(self).__name__}(nonfinite_loss='skip') cannot skip steps in distributed training "
                "(Lightning does not support a training_step that returns None there). Use "
                "`nonfinite_loss: raise` with gradient clipping (`trainer.gradient_clip_val`) under DDP."
            )
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

    def configure_optimizers(self):
        probe_params = set(map(id, self.probe.parameters())) if self.probe is not None else set()
        main = [p for p in self.parameters() if p.requires_grad and id(p) not in probe_params]
        main_group: dict[str, Any] = {"params": main}
        groups = [main_group]
        if self.probe is not None:
            probe_group: dict[str, Any] = {"params": list(self.probe.parameters()), "weight_decay": 0.0}
            if self.probe_lr is not None:
                probe_group["lr"] = self.probe_lr
            groups.append(probe_group)
        from lightning_ext.vision.classifier import configure_optimization

        return configure_optimization(self, groups)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["skipped_steps"] = self.skipped_steps

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.skipped_steps = int(checkpoint.get("skipped_steps", 0))

    @staticmethod
    def _hparams_ignore(backbone: Union[str, nn.Module]) -> list[str]:
        """Arguments kept out of ``save_hyperparameters`` (modules and factories; the CLI saves its config)."""
        return ["optimizer", "scheduler", "augmentation"] + (["backbone"] if isinstance(backbone, nn.Module) else [])
