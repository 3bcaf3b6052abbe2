r"""Knowledge-distillation losses (Hinton et al., 2015; FitNets hints) and YAML-friendly weight schedules.

Everything here is a pure function of tensors or a small class: no Trainer, no teacher management. The
Lightning parts that use them are :class:`~lightning_ext.distillation.callback.KnowledgeDistillation`
(adds the terms to an unmodified LightningModule's loss) and
:class:`~lightning_ext.distillation.module.DistillationModule` (explicit composition).

Papers:

- G. Hinton, O. Vinyals, J. Dean. *Distilling the Knowledge in a Neural Network*. arXiv:1503.02531 (2015).
  No official code; the common reference implementation is torchdistill's ``KDLoss``
  (https://github.com/yoshitomo-matsubara/torchdistill).
- A. Romero et al. *FitNets: Hints for Thin Deep Nets*. arXiv:1412.6550 (ICLR 2015); code
  https://github.com/adri-romsor/FitNets. The feature ("hint") loss with a learnable regressor.
- E. Ben-Baruch, A. Botach, I. Kviatkovsky, M. Aggarwal, G. Medioni. *Distilling the Knowledge in Data
  Pruning*. arXiv:2403.07854 (ICML 2025); no official code was released. Its recipe is KD from a teacher
  trained on the full data while the student trains on a pruned subset, with a KD weight that grows as the
  kept fraction shrinks; see :class:`KeptFractionWeight`.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Optional, Sequence, Union, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_ext.core.validation import (
    check_fraction,
    check_non_negative,
    check_number,
    check_positive,
    check_positive_int,
)

__all__ = [
    "kd_kl_loss",
    "hinton_loss",
    "feature_mse_loss",
    "combine_losses",
    "make_projector",
    "match_spatial",
    "WeightSchedule",
    "ConstantWeight",
    "LinearWeight",
    "CosineWeight",
    "KeptFractionWeight",
    "as_schedule",
]

#: How the distillation term joins the task loss (see :func:`combine_losses`).
CombineMode = Literal["convex", "add"]
COMBINE_MODES = get_args(CombineMode)


# -- losses ---------------------------------------------------------------------------------------------------


def kd_kl_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0) -> Tensor:
    r"""Hinton's soft-target loss: :math:`T^2` times the KL divergence of the softened distributions.

    .. math::
        p^T = \mathrm{softmax}(z / T), \qquad
        L_{KD} = T^2 \, \frac{1}{N} \sum_{n=1}^{N} \mathrm{KL}\big(p^T_{t,n} \,\|\, p^T_{s,n}\big)
               = T^2 \, \frac{1}{N} \sum_n \sum_c p^T_{t,nc} \,(\log p^T_{t,nc} - \log p^T_{s,nc})

    The :math:`T^2` factor keeps the soft-target gradients on the scale of the hard-label gradients when
    :math:`T` changes (Hinton et al., 2015, arXiv:1503.02531, section 2). Classes are the last dimension;
    leading dimensions are flattened into :math:`N` rows (``batchmean`` over rows). Computed in float32
    whatever the input dtype (so it is safe under bf16/fp16 autocast). The teacher side carries no gradient.

    Args:
        student_logits: ``(..., C)`` student logits :math:`z_s`.
        teacher_logits: ``(..., C)`` teacher logits :math:`z_t`, same shape.
        temperature: softening temperature :math:`T > 0`.

    Example:
        >>> z = torch.tensor([[2.0, 0.0, -1.0]])
        >>> float(kd_kl_loss(z, z))
        0.0
        >>> round(float(kd_kl_loss(torch.zeros(1, 3), z, temperature=1.0)), 4)
        0.5743
    """
    check_positive("temperature", temperature)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"Student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} "
            "must have the same shape."
        )
    classes = student_logits.shape[-1]
    s = student_logits.float().reshape(-1, classes) / temperature
    t = teacher_logits.detach().float().reshape(-1, classes) / temperature
    log_p_s = F.log_softmax(s, dim=-1)
    log_p_t = F.log_softmax(t, dim=-1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
    return kl * temperature**2


def hinton_loss(
    student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, alpha: float = 0.9, temperature: float = 4.0
) -> Tensor:
    r"""The classic distillation objective: hard-label cross-entropy mixed with the soft-target loss.

    .. math::
        L = (1 - \alpha)\, \mathrm{CE}\big(y, \mathrm{softmax}(z_s)\big) + \alpha\, L_{KD}(z_s, z_t; T)

    with :math:`L_{KD}` from :func:`kd_kl_loss` (Hinton et al., 2015, arXiv:1503.02531). Common defaults are
    :math:`T = 4`, :math:`\alpha = 0.9`.

    Args:
        student_logits: ``(B, C)`` student logits.
        teacher_logits: ``(B, C)`` teacher logits.
        targets: ``(B,)`` integer labels.
        alpha: weight of the soft-target term, in ``[0, 1]``.
        temperature: softening temperature.

    Example:
        >>> z, y = torch.tensor([[3.0, 0.0]]), torch.tensor([0])
        >>> bool(hinton_loss(z, z, y, alpha=0.0) == F.cross_entropy(z, y))
        True
    """
    if not 0 <= alpha <= 1:
        raise ValueError(f"`alpha` must be in [0, 1], got {alpha}.")
    ce = F.cross_entropy(student_logits.float(), targets)
    return combine_losses(ce, kd_kl_loss(student_logits, teacher_logits, temperature), alpha, "convex")


def feature_mse_loss(student_feature: Tensor, teacher_feature: Tensor) -> Tensor:
    r"""FitNets hint loss: mean squared error between (projected) student and teacher features.

    .. math:: L_{feat} = \frac{1}{|F|} \sum_{i \in F} \big(r(h_s)_i - h_{t,i}\big)^2

    where :math:`r` is the learnable regressor ("projector", :func:`make_projector`) applied to the student
    feature :math:`h_s` beforehand (Romero et al., 2015, arXiv:1412.6550, eq. 3, here averaged rather than
    summed so the weight does not depend on the feature size). Spatial maps of different sizes are pooled to
    the smaller one (:func:`match_spatial`). Computed in float32; the teacher side carries no gradient.

    Example:
        >>> float(feature_mse_loss(torch.ones(2, 3), torch.zeros(2, 3)))
        1.0
    """
    s, t = match_spatial(student_feature, teacher_feature.detach())
    if s.shape != t.shape:
        raise ValueError(
            f"Student feature {tuple(s.shape)} and teacher feature {tuple(t.shape)} differ; "
            "project the student feature to the teacher's width first (see make_projector)."
        )
    return F.mse_loss(s.float(), t.float())


def combine_losses(task_loss: Tensor, distill_loss: Tensor, weight: float, combine: str = "convex") -> Tensor:
    r"""Mix the task loss with a distillation term.

    ``"convex"``: :math:`(1 - w)\,L_{task} + w\,L_{distill}` (Hinton's form; needs :math:`0 \le w \le 1`).
    ``"add"``: :math:`L_{task} + w\,L_{distill}` (leaves the task loss's scale untouched).

    Example:
        >>> float(combine_losses(torch.tensor(2.0), torch.tensor(4.0), 0.25))
        2.5
        >>> float(combine_losses(torch.tensor(2.0), torch.tensor(4.0), 0.25, "add"))
        3.0
    """
    if combine == "convex":
        if not 0 <= weight <= 1:
            raise ValueError(f"With combine='convex' the distillation weight must be in [0, 1], got {weight}.")
        return (1.0 - weight) * task_loss + weight * distill_loss
    if combine == "add":
        if weight < 0:
            raise ValueError(f"The distillation weight must be >= 0, got {weight}.")
        return task_loss + weight * distill_loss
    raise ValueError(f"`combine` must be one of {COMBINE_MODES}, got {combine!r}.")


# -- feature alignment ----------------------------------------------------------------------------------------


def match_spatial(student_feature: Tensor, teacher_feature: Tensor) -> tuple[Tensor, Tensor]:
    """Average-pool the larger of two ``(B, C, H, W...)`` maps to the other's spatial size (no-op otherwise)."""
    if student_feature.dim() < 3 or student_feature.dim() != teacher_feature.dim():
        return student_feature, teacher_feature
    s_size, t_size = tuple(student_feature.shape[2:]), tuple(teacher_feature.shape[2:])
    if s_size == t_size:
        return student_feature, teacher_feature
    pool = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}.get(len(s_size))
    if pool is None:
        raise ValueError(f"Cannot match spatial sizes {s_size} and {t_size}.")
    target = tuple(min(a, b) for a, b in zip(s_size, t_size))
    if s_size != target:
        student_feature = pool(student_feature, target)
    if t_size != target:
        teacher_feature = pool(teacher_feature, target)
    return student_feature, teacher_feature


def make_projector(student_shape: Sequence[int], teacher_shape: Sequence[int]) -> Optional[nn.Module]:
    """The learnable regressor that maps a student feature to the teacher's width, or ``None`` if none is needed.

    Shapes exclude the batch dimension. ``(C, H, W)``-like maps (3 or more dims) get a bias-free 1x1
    convolution over channels (dim 1), FitNets-style; spatial sizes may differ (they are pooled by
    :func:`match_spatial`). Vectors ``(D,)`` and token sequences ``(N, D)`` get a bias-free linear map on
    the last dimension.

    Example:
        >>> make_projector((16, 7, 7), (64, 7, 7))
        Conv2d(16, 64, kernel_size=(1, 1), stride=(1, 1), bias=False)
        >>> make_projector((32,), (32,)) is None
        True
    """
    s, t = tuple(student_shape), tuple(teacher_shape)
    if len(s) != len(t):
        raise ValueError(
            f"Cannot distil a feature of shape {s} into one of shape {t} (different number of dimensions); "
            "pick student/teacher modules whose outputs have the same layout."
        )
    if len(s) >= 3:
        if s[0] == t[0]:
            return None
        conv = {3: nn.Conv2d, 2: nn.Conv1d, 4: nn.Conv3d}.get(len(s))
        if conv is None:
            raise ValueError(f"Unsupported feature shape {s}.")
        return conv(s[0], t[0], kernel_size=1, bias=False)
    if len(s) == 2 and s[0] != t[0]:
        raise ValueError(f"Token features {s} and {t} have different sequence lengths; cannot align them.")
    if s[-1] == t[-1]:
        return None
    return nn.Linear(s[-1], t[-1], bias=False)


# -- weight schedules -----------------------------------------------------------------------------------------


class WeightSchedule:
    """Base class: a loss weight as a function of the optimizer step (``trainer.global_step``).

    Subclasses are small classes with plain arguments, so a schedule is written in YAML as
    ``{class_path: lightning_ext.distillation.losses.LinearWeight, init_args: {...}}``.
    Schedules are stateless functions of the step: a resumed run gets the same weights.
    """

    def setup(self, trainer: Any = None) -> None:
        """Called once before training (the Trainer, or ``None`` outside Lightning)."""

    def __call__(self, step: int) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


class ConstantWeight(WeightSchedule):
    """The same weight at every step.

    Example:
        >>> ConstantWeight(0.9)(1000)
        0.9
    """

    def __init__(self, value: float = 0.9) -> None:
        check_non_negative("value", value)
        self.value = float(value)

    def __call__(self, step: int) -> float:
        return self.value


class LinearWeight(WeightSchedule):
    """Linear ramp from ``start`` to ``end`` over ``steps`` optimizer steps (after ``delay``), then ``end``.

    Example:
        >>> w = LinearWeight(start=0.0, end=1.0, steps=10)
        >>> [w(0), w(5), w(10), w(50)]
        [0.0, 0.5, 1.0, 1.0]
    """

    def __init__(self, start: float = 0.0, end: float = 0.9, steps: int = 1000, delay: int = 0) -> None:
        check_non_negative("start", start)
        check_non_negative("end", end)
        check_positive_int("steps", steps)
        check_number("delay", delay, low=0, integer=True)
        self.start, self.end, self.steps, self.delay = float(start), float(end), int(steps), int(delay)

    def __call__(self, step: int) -> float:
        progress = min(max(step - self.delay, 0) / self.steps, 1.0)
        return self.start + (self.end - self.start) * progress


class CosineWeight(WeightSchedule):
    """Half-cosine from ``start`` to ``end`` over ``steps`` optimizer steps, then ``end``.

    Example:
        >>> w = CosineWeight(start=1.0, end=0.0, steps=10)
        >>> [round(w(s), 3) for s in (0, 5, 10, 20)]
        [1.0, 0.5, 0.0, 0.0]
    """

    def __init__(self, start: float = 0.9, end: float = 0.0, steps: int = 1000) -> None:
        check_non_negative("start", start)
        check_non_negative("end", end)
        check_positive_int("steps", steps)
        self.start, self.end, self.steps = float(start), float(end), int(steps)

    def __call__(self, step: int) -> float:
        progress = min(max(step, 0) / self.steps, 1.0)
        return self.end + (self.start - self.end) * 0.5 * (1.0 + math.cos(math.pi * progress))


class KeptFractionWeight(WeightSchedule):
    r"""KD weight from the kept fraction of the training data: :math:`\alpha(f) = \mathrm{clip}(1 - f,\ a, b)`.

    Ben-Baruch et al. (arXiv:2403.07854) report that the best KD weight depends on the pruning
    fraction: a larger weight (more teacher) when little data is kept, a smaller one near the full data. The
    paper's own formula was not available to us (no official code was released); this rule is **ours**,
    chosen to follow that trend: with the defaults ``a = 0.5``, ``b = 0.9`` it gives 0.9 at f = 0.1, 0.7 at
    f = 0.3 and 0.5 from f = 0.5 up. Use it with ``combine="convex"``.

    Args:
        kept_fraction: share of the training data kept, in ``(0, 1]``. ``None`` reads ``train_fraction``
            from the Trainer's datamodule in :meth:`setup` (so one YAML states the fraction once).
        min_weight: lower clip :math:`a`.
        max_weight: upper clip :math:`b`.

    Example:
        >>> [KeptFractionWeight(f)(0) for f in (0.1, 0.3, 0.5, 1.0)]
        [0.9, 0.7, 0.5, 0.5]
    """

    def __init__(self, kept_fraction: Optional[float] = None, min_weight: float = 0.5, max_weight: float = 0.9) -> None:
        if kept_fraction is not None:
            check_fraction("kept_fraction", kept_fraction, allow_zero=False)
        check_fraction("min_weight", min_weight)
        check_fraction("max_weight", max_weight)
        if not min_weight <= max_weight:
            raise ValueError(
                f"Need 0 <= min_weight <= max_weight <= 1, got min_weight={min_weight}, max_weight={max_weight}."
            )
        self.kept_fraction = kept_fraction
        self.min_weight, self.max_weight = float(min_weight), float(max_weight)
        self._from_datamodule = kept_fraction is None

    def setup(self, trainer: Any = None) -> None:
        if not self._from_datamodule:
            return
        datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
        fraction = getattr(datamodule, "train_fraction", None)
        if fraction is None:
            raise ValueError(
                "KeptFractionWeight(kept_fraction=None) reads `train_fraction` from the datamodule, but "
                f"{type(datamodule).__name__ if datamodule is not None else 'no datamodule'} has none; "
                "set `kept_fraction` explicitly."
            )
        self.kept_fraction = float(fraction)

    def __call__(self, step: int) -> float:
        if self.kept_fraction is None:
            raise RuntimeError("KeptFractionWeight has no kept fraction yet: call setup(trainer) or pass it.")
        value = min(max(1.0 - self.kept_fraction, self.min_weight), self.max_weight)
        return round(value, 12)


def as_schedule(weight: Union[float, int, WeightSchedule], name: str = "weight",
                combine: Optional[str] = None) -> WeightSchedule:
    """A number becomes :class:`ConstantWeight`; a schedule is returned as is; anything else is refused.

    A number must be finite and >= 0, and at most 1 when ``combine="convex"`` (the error names ``name``).

    Example:
        >>> as_schedule(float("nan"), "weight")
        Traceback (most recent call last):
        ...
        ValueError: weight must be a finite number >= 0, got nan.
    """
    if isinstance(weight, WeightSchedule):
        return weight
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise TypeError(
            f"`{name}` must be a number or a WeightSchedule (e.g. LinearWeight), got {type(weight).__name__}."
        )
    if combine == "convex" and math.isfinite(weight) and weight > 1:
        raise ValueError(f"With combine='convex' {name} must be in [0, 1], got {weight}; or use combine='add'.")
    check_non_negative(name, weight)
    return ConstantWeight(float(weight))
