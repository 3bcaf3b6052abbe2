r"""Head-network distillation (HND) and generalised head-network distillation (GHND), pure core: the loss, and
forward hooks that take it from named layers of a student and a frozen teacher.

Papers: Matsubara, Baidya, Callegaro, Levorato and Singh, "Distilled Split Deep Neural Networks for Edge-Assisted
Real-Time Systems" (HotEdgeVideo 2019: HND); Matsubara and Levorato, "Neural Compression and Filtering for
Edge-assisted Real-time Object Detection in Challenged Networks" (ICPR 2020, arXiv 2007.15818: GHND). Reference
code: https://github.com/yoshitomo-matsubara/sc2-benchmark (``configs/coco2017/supervised_compression/ghnd-bq/``:
a ``WeightedSumLoss`` of ``MSELoss(reduction="sum")`` terms, weight 1.0 each, between forward-hooked outputs of
the student's ``bottleneck_layer``/``layer2``/``layer3``/``layer4`` and the teacher's ``layer1``..``layer4``) and
https://github.com/yoshitomo-matsubara/hnd-ghnd-object-detectors. Written here from the papers and those
conventions.

The student is the teacher with its head network (the first layers, run on the mobile device) replaced by a
narrower one with a bottleneck; only the student's head trains, against the frozen teacher:

.. math::

    \mathcal{L}_\mathrm{HND} = \| f^S_h(x) - f^T_h(x) \|_2^2, \qquad
    \mathcal{L}_\mathrm{GHND} = \sum_{l} w_l \, \| f^S_l(x) - f^T_l(x) \|_2^2 ,

where :math:`f_h` is the head's output (for the student: the bottleneck's decoder output, for the teacher: the
replaced layer's output) and GHND's sum also runs over later stages' outputs (with :math:`w_l = 1` in the
reference configurations). Squared errors are summed over the batch and every element, as the reference's
``reduction="sum"``. Under DDP the sum runs over the global batch: each rank's sum is multiplied by the world
size, so gradients (averaged over ranks by DDP) equal one process's on the whole batch.

Used by :class:`~lightning_ext.detection.head_distillation_callback.HeadNetworkDistillation` (a callback on any
LightningModule) and by :class:`~lightning_ext.detection.split_detector.SplitComputingDetector` (``distill=``).

Example:
    >>> import torch
    >>> from torch import nn
    >>> teacher = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
    >>> student = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(2, 8, 1), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
    >>> distiller = HeadDistiller(student, teacher, ["1", "3"], ["1", "3"], method="ghnd")
    >>> x = torch.rand(2, 1, 6, 6)
    >>> loss = distiller.loss(x, student_forward=student)
    >>> loss.shape, loss.requires_grad, distiller.teacher.training
    (torch.Size([]), True, False)
    >>> distiller.detach()
"""

from __future__ import annotations

from typing import Any, Callable, Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_ext.core.distributed import world_size

__all__ = ["HeadDistiller", "LayerTaps", "head_distillation_loss"]


def head_distillation_loss(student: Sequence[Tensor], teacher: Sequence[Tensor],
                           weights: Optional[Sequence[float]] = None) -> Tensor:
    """Head-network distillation (HND / GHND): summed squared error between student and teacher layer outputs.

    :math:`\\sum_l w_l \\|f^S_l - f^T_l\\|_2^2` (sum-reduced; the teacher detached). HND passes only the head's
    output; GHND that and later stages' outputs. ``weights`` default to 1.0 each.
    """
    if len(student) != len(teacher) or not student:
        raise ValueError(f"give one teacher output per student output (got {len(student)} and {len(teacher)}), "
                         "at least one.")
    weights = [1.0] * len(student) if weights is None else list(weights)
    if len(weights) != len(student):
        raise ValueError(f"give one weight per layer pair (got {len(weights)} weights for {len(student)} pairs).")
    total = student[0].new_zeros(())
    for s, t, w in zip(student, teacher, weights):
        if s.shape != t.shape:
            raise ValueError(f"student output {tuple(s.shape)} does not match the teacher's {tuple(t.shape)}.")
        total = total + w * F.mse_loss(s, t.detach(), reduction="sum")
    return total


class _Stop(Exception):
    """Raised by a hook to end a forward pass once every tapped layer has run."""


class LayerTaps:
    """Forward hooks on named submodules of ``root`` that keep their latest outputs while :attr:`active`.

    Hooks are registered only for the duration of :meth:`run` (or of :meth:`HeadDistiller.capturing`), so the
    models stay picklable (spawned DDP processes). With ``stop`` set, :meth:`run` ends the forward pass as soon as
    every tapped layer has run (the teacher's later layers, e.g. a detector's decoder, are not computed)."""

    def __init__(self, root: nn.Module, names: Sequence[str], role: str = "student", stop: bool = False) -> None:
        if not names or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"give the {role}'s layers as a non-empty list of module names; got {names!r}.")
        modules = dict(root.named_modules())
        for name in names:
            if name not in modules:
                close = [n for n in modules if n and (n.endswith(name.split(".")[-1]) or name in n)][:5]
                raise ValueError(f"the {role} ({type(root).__name__}) has no module {name!r}"
                                 + (f"; close names: {', '.join(close)}." if close else "."))
        self.root, self.names, self.role, self.stop = root, list(names), role, stop
        self.outputs: dict[str, Tensor] = {}
        self.active = False
        self._handles: list[Any] = []
        self._modules = [modules[n] for n in self.names]

    def attach(self) -> None:
        """Register the hooks (once)."""
        if not self._handles:
            self._handles = [m.register_forward_hook(self._hook(n)) for n, m in zip(self.names, self._modules)]

    def detach(self) -> None:
        """Remove the hooks (what they kept stays in :attr:`outputs` until :meth:`clear`)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def clear(self) -> None:
        """Drop the kept outputs."""
        self.outputs = {}

    def _hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if not self.active:
                return
            if not isinstance(output, Tensor):
                raise TypeError(f"the {self.role}'s layer {name!r} returned {type(output).__name__}; head-network "
                                "distillation matches tensor outputs: name a layer that returns a tensor.")
            self.outputs[name] = output
            if self.stop and len(self.outputs) == len(self.names):
                raise _Stop

        return hook

    def run(self, forward: Callable[[], Any]) -> list[Tensor]:
        """Call ``forward()`` with the hooks active; the tapped outputs in :attr:`names` order."""
        self.attach()
        self.outputs, self.active = {}, True
        try:
            forward()
        except _Stop:
            pass
        finally:
            self.active = False
            self.detach()
        return self.collected()

    def collected(self) -> list[Tensor]:
        """The kept outputs in :attr:`names` order; a layer that did not run is an error."""
        missing = [n for n in self.names if n not in self.outputs]
        if missing:
            raise RuntimeError(f"the {self.role}'s layers {missing} did not run in its forward pass; name layers "
                               "that the forward pass calls.")
        return [self.outputs[n] for n in self.names]


class HeadDistiller:
    """HND / GHND between named layers of a student and a frozen teacher (see the module docstring).

    Args:
        student: the model whose head trains (any ``nn.Module``; layer names are relative to it).
        teacher: the frozen teacher (set to eval mode with gradients off here).
        student_layers: the student's layers, the head's output first (e.g. the bottleneck's decoder).
        teacher_layers: the matching teacher layers (default: the same names).
        method: ``"hnd"`` matches the first pair only, ``"ghnd"`` every pair.
        weights: one weight per pair (default 1.0 each, as the reference).
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, student_layers: Sequence[str],
                 teacher_layers: Optional[Sequence[str]] = None, method: Literal["hnd", "ghnd"] = "ghnd",
                 weights: Optional[Sequence[float]] = None) -> None:
        if method not in ("hnd", "ghnd"):
            raise ValueError(f"method must be 'hnd' or 'ghnd'; got {method!r}.")
        teacher_layers = list(student_layers if teacher_layers is None else teacher_layers)
        if len(teacher_layers) != len(student_layers):
            raise ValueError(f"give one teacher layer per student layer (got {len(teacher_layers)} and "
                             f"{len(student_layers)}).")
        if weights is not None and len(weights) != len(student_layers):
            raise ValueError(f"give one weight per layer pair (got {len(weights)} for {len(student_layers)} pairs).")
        self.student, self.teacher, self.method = student, teacher.eval().requires_grad_(False), method
        self.weights = None if weights is None else [float(w) for w in weights]
        self.student_taps = LayerTaps(student, student_layers, "student")
        self.teacher_taps = LayerTaps(teacher, teacher_layers, "teacher", stop=True)

    @property
    def pairs(self) -> int:
        """How many layer pairs the loss matches: 1 for HND, all for GHND."""
        return 1 if self.method == "hnd" else len(self.student_taps.names)

    def teacher_outputs(self, x: Any) -> list[Tensor]:
        """The teacher's tapped outputs on ``x`` (no gradient; the forward stops after the last tapped layer)."""
        self.teacher.eval()
        with torch.no_grad():
            return self.teacher_taps.run(lambda: self.teacher(x))

    def loss(self, x: Any, student_forward: Optional[Callable[[Any], Any]] = None) -> Tensor:
        """The HND / GHND loss on input ``x``.

        With ``student_forward`` the student runs here (stopping after its last tapped layer); without it, the
        outputs its hooks kept during a forward pass under :meth:`capturing` are used (a user's own training
        step)."""
        if student_forward is not None:
            self.student_taps.stop = True
            student = self.student_taps.run(lambda: student_forward(x))
        else:
            student = self.student_taps.collected()
        k = self.pairs
        teacher = self.teacher_outputs(x)
        weights = None if self.weights is None else self.weights[:k]
        return head_distillation_loss(student[:k], teacher[:k], weights) * world_size()

    def capturing(self) -> "_Capturing":
        """Context in which the student's hooks keep its tapped outputs (forward passes run to the end)."""
        return _Capturing(self.student_taps)

    def detach(self) -> None:
        """Remove every hook and drop the kept outputs."""
        for taps in (self.student_taps, self.teacher_taps):
            taps.detach()
            taps.clear()


class _Capturing:
    def __init__(self, taps: LayerTaps) -> None:
        self.taps = taps

    def __enter__(self) -> LayerTaps:
        self.taps.attach()
        self.taps.stop, self.taps.outputs, self.taps.active = False, {}, True
        return self.taps

    def __exit__(self, *exc: Any) -> None:
        self.taps.active = False
        self.taps.detach()
