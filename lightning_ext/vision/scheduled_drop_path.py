"""ScheduledDropPath (NASNet): drop-path probabilities ramped linearly over training, for any model with
``timm.layers.DropPath`` (or ``torchvision.ops.StochasticDepth``) modules."""

from __future__ import annotations

import math
from typing import Any, Literal, Optional, Sequence

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn
from typing_extensions import override

from lightning_ext.core.layers import match_names
from lightning_ext.core.validation import (
    ClosedUnitInterval,
    UnitIntervalLeftOpen,
    check_choice,
    check_fraction,
    check_number,
)

Schedule = Literal["linear", "constant", "none"]
Interval = Literal["step", "epoch"]
ByDepth = Literal["keep", "linear", "uniform"]

__all__ = ["ScheduledDropPath", "collect_drop_path_modules", "drop_path_targets", "ramp_progress",
           "scheduled_rates"]


def _known_types() -> list[tuple[type, str]]:
    """(module type, attribute holding its drop probability) for the drop-path layers we know."""
    found = []
    try:
        from timm.layers import DropPath

        found.append((DropPath, "drop_prob"))
    except ImportError:  # pragma: no cover - timm is a base dependency
        pass
    try:
        from torchvision.ops import StochasticDepth

        found.append((StochasticDepth, "p"))
    except ImportError:  # pragma: no cover
        pass
    return found


def collect_drop_path_modules(model: nn.Module, layers: Optional[Sequence[str]] = None,
                              owner: str = "ScheduledDropPath") -> dict[str, tuple[nn.Module, str]]:
    """Every drop-path module of ``model`` in registration order (shallow to deep): ``name -> (module, attr)``.

    ``timm.layers.DropPath`` keeps its probability in ``drop_prob``, ``torchvision.ops.StochasticDepth`` in ``p``;
    both read it at forward time, so changing it during training takes effect at the next step. ``layers``
    (names or globs) restricts the selection. A model without any raises a ``ValueError`` that says how to
    build one with drop path (timm's ``drop_path_rate``).

    Example:
        >>> import timm
        >>> net = timm.create_model("resnet10t", drop_path_rate=0.3)
        >>> list(collect_drop_path_modules(net))
        ['layer2.0.drop_path', 'layer3.0.drop_path', 'layer4.0.drop_path']
    """
    types = _known_types()
    found = {}
    for name, module in model.named_modules():
        for cls, attr in types:
            if isinstance(module, cls):
                found[name] = (module, attr)
                break
    if not found:
        raise ValueError(
            f"{owner}: {type(model).__name__} has no drop-path modules (timm.layers.DropPath or "
            "torchvision.ops.StochasticDepth); build the model with drop path, e.g. timm.create_model(..., "
            "drop_path_rate=0.2) or ImageClassifier(backbone_kwargs={drop_path_rate: 0.2}). timm's NASNet/PNASNet, "
            "DenseNet and VGG models have none."
        )
    if layers is not None:
        keep = match_names(list(found), layers, "layers", f"the drop-path modules of {type(model).__name__}")
        found = {n: found[n] for n in keep}
    return found


def drop_path_targets(base_rates: Sequence[float], drop_prob: Optional[float] = None,
                      by_depth: ByDepth = "keep") -> list[float]:
    """Each module's final drop probability.

    - ``by_depth="keep"``: the rates the model was built with (timm already grows them linearly with depth, the
      "layer scaling" of NASNet's ``_apply_drop_path``), rescaled so the deepest/largest equals ``drop_prob`` when
      given.
    - ``"linear"``: NASNet's layer scaling over the modules in order, ``drop_prob * (i + 1) / N``.
    - ``"uniform"``: ``drop_prob`` everywhere.

    ``drop_prob=None`` uses the largest built rate.

    Example:
        >>> [round(r, 6) for r in drop_path_targets([0.1, 0.2, 0.3], 0.6)]
        [0.2, 0.4, 0.6]
        >>> [round(r, 6) for r in drop_path_targets([0.1, 0.2, 0.3], 0.6, "linear")]
        [0.2, 0.4, 0.6]
        >>> drop_path_targets([0.1, 0.2, 0.3], by_depth="uniform")
        [0.3, 0.3, 0.3]
    """
    check_choice("by_depth", by_depth, ("keep", "linear", "uniform"))
    base = [float(r) for r in base_rates]
    top = max(base) if base else 0.0
    target = top if drop_prob is None else float(drop_prob)
    if by_depth == "uniform":
        return [target] * len(base)
    if by_depth == "linear":
        return [target * (i + 1) / len(base) for i in range(len(base))]
    if top <= 0:
        return [0.0] * len(base)
    return [r * target / top for r in base]


def ramp_progress(t: int, total: float, warmup_fraction: float = 1.0) -> float:
    """Where the linear ramp is at step/epoch ``t`` of ``total``: 0 at ``t = 0``, 1 at the last step of the ramp
    (``ceil(warmup_fraction * total) - 1``) and after.

    Example:
        >>> [ramp_progress(t, 5) for t in range(6)]
        [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    """
    span = max(1, math.ceil(warmup_fraction * total) - 1)
    return min(1.0, max(0, t) / span)


def scheduled_rates(targets: Sequence[float], progress: float, start: float = 0.0,
                    schedule: Schedule = "linear") -> list[float]:
    """The rates at ``progress`` in [0, 1]: NASNet's time scaling moves the largest rate linearly from ``start`` to
    its target; every module keeps its share of the largest (so with ``start=0``: ``target_i * progress``).
    ``"constant"`` returns the targets, ``"none"`` zeros.

    Example:
        >>> [round(r, 6) for r in scheduled_rates([0.1, 0.2], 0.5)]
        [0.05, 0.1]
        >>> [round(r, 6) for r in scheduled_rates([0.1, 0.2], 0.0, start=0.1)]
        [0.05, 0.1]
    """
    if schedule == "none":
        return [0.0] * len(targets)
    if schedule == "constant":
        return [float(t) for t in targets]
    top = max(targets) if targets else 0.0
    if top <= 0:
        return [0.0] * len(targets)
    current = start + (top - start) * progress
    return [float(t) * current / top for t in targets]


class ScheduledDropPath(Callback):
    r"""ScheduledDropPath (Zoph et al., 2018): drop-path probabilities ramped linearly from 0 to their targets over
    training, for any model with timm ``DropPath`` modules.

    Paper: "Learning Transferable Architectures for Scalable Image Recognition" (Zoph, Vasudevan, Shlens, Le),
    CVPR 2018, arXiv 1707.07012. Reference code: https://github.com/tensorflow/models
    (``research/slim/nets/nasnet/nasnet_utils.py``, ``_apply_drop_path``, ``drop_connect_version="v3"``).

    The drop probability of block :math:`i` of :math:`N` at step :math:`t` of :math:`T` is

    .. math::

        p_i(t) = p_{\max} \cdot \frac{i + 1}{N} \cdot \min\!\left(1, \frac{t}{T}\right)

    (depth scaling times time scaling). timm already builds its ``DropPath`` rates linearly in depth from
    ``drop_path_rate`` (stochastic depth's rule), so by default (``by_depth="keep"``) the callback keeps those
    per-block rates as targets and applies the time ramp; ``by_depth="linear"`` uses NASNet's ``(i+1)/N`` over the
    modules in order, ``"uniform"`` the same rate everywhere. The rate of the largest block moves linearly from
    ``start`` to ``drop_prob`` over the first ``warmup_fraction`` of training (``interval="step"``: optimizer steps,
    ``trainer.estimated_stepping_batches``; ``"epoch"``: epochs, ``max_epochs``), reaching it at the last step of
    the ramp. ``schedule="constant"`` (plain drop path at the targets) and ``"none"`` (drop path off) are the
    controls. Rates are set before each training batch; timm reads ``DropPath.drop_prob`` at forward time (the only
    caller of ``timm.layers.drop_path`` in timm 1.0.31 is ``DropPath.forward``; block attributes such as rdnet's
    ``drop_path_rate`` are construction records and are not read at forward). At the end of fit the built rates
    are put back. Evaluation is unaffected (drop path is off in eval mode).

    timm's NASNet models (``nasnetalarge``, ``pnasnet5large``) have **no drop path** (they refuse
    ``drop_path_rate``), so this callback cannot schedule them; use it with the many timm models that do build
    ``DropPath`` (ResNets, ConvNeXt, EfficientNet, ViT, RegNet, MobileNetV3, ...). Build the model with the final
    ``drop_path_rate``: blocks whose built rate is 0 are ``nn.Identity`` in timm and cannot be switched on later.

    Resume: the checkpoint holds the module names, their built rates and the torch CPU RNG state at the save (the
    drop masks are drawn from it); the ramp is recomputed from ``global_step``, so a run resumed mid-epoch on one
    process draws the same masks and ends with the same parameters as an uninterrupted one. Under DDP each rank
    keeps drawing from its own RNG after a resume (the schedule is still exact).

    Args:
        drop_prob: the final rate of the largest block; ``None`` keeps the built maximum.
        start: the rate of the largest block at step 0 (NASNet: 0).
        schedule: ``"linear"`` (ScheduledDropPath), ``"constant"`` or ``"none"``.
        interval: ramp per optimizer ``"step"`` or per ``"epoch"``.
        warmup_fraction: share of training over which the ramp runs; the targets hold afterwards.
        by_depth: per-block targets, see above.
        layers: names or globs of the drop-path modules to schedule (default all); the others are left alone.

    Example:
        >>> import torch
        >>> from lightning.pytorch import Trainer
        >>> from lightning_ext.data.digits import DigitsDataModule
        >>> from lightning_ext.vision.image_classifier import ImageClassifier
        >>> model = ImageClassifier("resnet10t", image_size=8, backbone_kwargs={"drop_path_rate": 0.3})
        >>> sdp = ScheduledDropPath(drop_prob=0.2)
        >>> trainer = Trainer(max_steps=3, callbacks=[sdp], logger=False, enable_checkpointing=False,
        ...                   enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
        >>> trainer.fit(model, datamodule=DigitsDataModule())
        >>> [round(r, 3) for r in sdp.last_rates]  # the rates of the last step: targets reached
        [0.067, 0.133, 0.2]
    """

    def __init__(
        self,
        drop_prob: Optional[ClosedUnitInterval] = None,
        start: ClosedUnitInterval = 0.0,
        schedule: Schedule = "linear",
        interval: Interval = "step",
        warmup_fraction: UnitIntervalLeftOpen = 1.0,
        by_depth: ByDepth = "keep",
        layers: Optional[list[str]] = None,
    ) -> None:
        if drop_prob is not None:
            check_fraction("drop_prob", drop_prob, allow_one=False)
        check_fraction("start", start, allow_one=False)
        check_choice("schedule", schedule, ("linear", "constant", "none"))
        check_choice("interval", interval, ("step", "epoch"))
        check_number("warmup_fraction", warmup_fraction, low=0, high=1, low_open=True)
        check_choice("by_depth", by_depth, ("keep", "linear", "uniform"))
        if drop_prob is not None and start > drop_prob:
            raise ValueError(f"`start` ({start}) must not exceed `drop_prob` ({drop_prob}): the ramp goes up.")
        if layers is not None and (isinstance(layers, str) or not all(isinstance(x, str) for x in layers)):
            raise ValueError(f"`layers` must be a list of module names or globs, got {layers!r}.")
        self.drop_prob, self.start, self.schedule, self.interval = drop_prob, float(start), schedule, interval
        self.warmup_fraction, self.by_depth, self.layers = float(warmup_fraction), by_depth, layers
        self.names: list[str] = []
        self.base_rates: list[float] = []
        self.targets: list[float] = []
        self.last_rates: list[float] = []
        self._modules: list[tuple[nn.Module, str]] = []
        self._loaded: Optional[dict] = None
        self._rng_to_restore: Optional[torch.Tensor] = None
        self._total_steps = math.inf

    # -- state --------------------------------------------------------------------------------------------------

    @override
    def state_dict(self) -> dict[str, Any]:
        """Module names, built rates and the CPU RNG state (the drop masks' source) at this checkpoint."""
        return {"names": list(self.names), "base_rates": list(self.base_rates), "rng_state": torch.get_rng_state()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the saved modules and rates for ``on_fit_start`` and the RNG state for ``on_train_start``."""
        self._loaded = dict(state_dict)

    # -- hooks --------------------------------------------------------------------------------------------------

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Find the drop-path modules, record their built rates and compute each module's target."""
        found = collect_drop_path_modules(pl_module, self.layers)
        self.names = list(found)
        self._modules = list(found.values())
        built = [float(getattr(m, attr)) for m, attr in self._modules]
        if self._loaded is not None:
            saved = list(self._loaded.get("names", []))
            if saved != self.names:
                raise ValueError(
                    f"ScheduledDropPath: the checkpoint scheduled drop-path modules {saved[:4]}... but this model has "
                    f"{self.names[:4]}...; resume with the same architecture and `layers`."
                )
            built = [float(r) for r in self._loaded["base_rates"]]
            self._rng_to_restore = self._loaded.get("rng_state")
            self._loaded = None
        self.base_rates = built
        if max(built) <= 0 and self.schedule != "none":
            raise ValueError(
                "ScheduledDropPath: every drop-path module of the model was built with rate 0; build it with the "
                "final rate (timm `drop_path_rate`, e.g. 0.2)."
            )
        self.targets = drop_path_targets(built, self.drop_prob, self.by_depth)
        if self.start > max(self.targets):
            raise ValueError(f"ScheduledDropPath: `start` ({self.start}) exceeds the largest target rate "
                             f"({max(self.targets):.3g}); lower `start` or raise `drop_prob`.")
        if self.interval == "epoch" and (trainer.max_epochs is None or trainer.max_epochs < 1):
            raise ValueError("ScheduledDropPath(interval='epoch') needs `max_epochs`; or use interval='step'.")

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Read the run's length; on a resume (one process), continue the saved RNG stream so the drop masks match
        an uninterrupted run."""
        # read here, not in on_fit_start: estimated_stepping_batches sets up the train loader, and before the loops'
        # state is restored that loses a mid-epoch resume's position in the epoch
        self._total_steps = trainer.estimated_stepping_batches
        if self.interval == "step" and not math.isfinite(self._total_steps):
            raise ValueError("ScheduledDropPath(interval='step') needs a finite run: set `max_steps` or `max_epochs`.")
        if self._rng_to_restore is not None and trainer.world_size == 1:
            torch.set_rng_state(self._rng_to_restore.to(torch.uint8).cpu())
        self._rng_to_restore = None

    def progress(self, trainer: Trainer) -> float:
        """Where the ramp is now, in [0, 1]."""
        if self.interval == "step":
            return ramp_progress(trainer.global_step, self._total_steps, self.warmup_fraction)
        return ramp_progress(trainer.current_epoch, trainer.max_epochs, self.warmup_fraction)

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        """Set every module's rate for this step and log the largest."""
        rates = scheduled_rates(self.targets, self.progress(trainer), self.start, self.schedule)
        for (module, attr), rate in zip(self._modules, rates):
            setattr(module, attr, rate)
        self.last_rates = rates
        pl_module.log("drop_path/max_rate", max(rates), on_step=True, on_epoch=False)

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Put the built rates back."""
        for (module, attr), rate in zip(self._modules, self.base_rates):
            setattr(module, attr, rate)
