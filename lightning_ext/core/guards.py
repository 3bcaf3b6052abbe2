"""Guards against a non-finite training loss: one policy, one message, one DDP rule for every LightningModule.

A module that owns a ``nonfinite_loss`` policy calls :func:`check_loss` on its loss in ``training_step`` before
logging or returning it, and :func:`refuse_skip_under_ddp` in ``setup``:

- ``"error"`` (default): raise ``FloatingPointError`` with one line naming the module, the step, the epoch and
  the likely cause (non-finite values in the batch, non-finite parameters, or a diverging optimisation). Under
  DDP the finiteness is agreed on by all ranks, so every rank stops together.
- ``"skip"``: warn, count the skip in ``module.skipped_steps`` and return ``False``; the module then returns
  ``None`` from ``training_step`` so Lightning skips the backward pass and the optimizer step (use
  :func:`buffer_snapshot`/:func:`restore_buffers` to undo BatchNorm statistics the bad forward fed). Lightning
  cannot skip a step under DDP, so this policy is refused there in ``setup``.
- ``"warn"``: warn and train on the loss anyway (parameters may become non-finite): for debugging only.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_ext.core.validation import check_choice

__all__ = ["NonFiniteLoss", "NONFINITE_POLICIES", "check_nonfinite_policy", "check_loss", "refuse_skip_under_ddp",
           "buffer_snapshot", "restore_buffers", "nonfinite_cause"]

#: What a module does when its training loss is NaN or infinite.
NonFiniteLoss = Literal["error", "skip", "warn"]
NONFINITE_POLICIES = ("error", "skip", "warn")


def check_nonfinite_policy(policy: Any) -> str:
    """Return ``policy`` if it is one of :data:`NONFINITE_POLICIES`, else raise a one-line ``ValueError``.

    Example:
        >>> check_nonfinite_policy("skip")
        'skip'
        >>> check_nonfinite_policy("ignore")
        Traceback (most recent call last):
        ...
        ValueError: nonfinite_loss must be one of 'error', 'skip', 'warn'; got 'ignore'.
    """
    return check_choice("nonfinite_loss", policy, NONFINITE_POLICIES)


def _count_nonfinite(obj: Any) -> int:
    if isinstance(obj, Tensor):
        return int((~torch.isfinite(obj)).sum()) if obj.is_floating_point() or obj.is_complex() else 0
    if isinstance(obj, dict):
        return sum(_count_nonfinite(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_count_nonfinite(v) for v in obj)
    for name in ("x", "edge_attr"):  # graph batches (PyG Data) keep their features as attributes
        value = getattr(obj, name, None)
        if isinstance(value, Tensor):
            return _count_nonfinite(value)
    return 0


def nonfinite_cause(module: nn.Module, batch: Any = None, otherwise: Optional[str] = None) -> str:
    """The likely cause of a non-finite loss, checked in order: the batch, the parameters, else divergence.

    Example:
        >>> nonfinite_cause(nn.Linear(2, 1), (torch.tensor([[float("nan"), 0.0]]), torch.zeros(1)))
        'the batch holds 1 NaN/inf input value (clean or impute the data)'
    """
    bad_inputs = _count_nonfinite(batch) if batch is not None else 0
    if bad_inputs:
        return (f"the batch holds {bad_inputs} NaN/inf input value{'s' if bad_inputs > 1 else ''} "
                "(clean or impute the data)")
    bad_params = [name for name, p in module.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad_params:
        more = f" and {len(bad_params) - 1} more" if len(bad_params) > 1 else ""
        return (f"parameter {bad_params[0]}{more} is already non-finite (an earlier step diverged, or the "
                "initial or loaded weights hold NaN/inf)")
    return otherwise or ("the optimisation diverged or a loss term overflowed (lower `lr`, add gradient clipping "
                         "with `trainer.gradient_clip_val`, or check the loss weights)")


def check_loss(module: Any, loss: Tensor, policy: str = "error", batch: Any = None,
               what: Optional[str] = None, otherwise: Optional[str] = None) -> bool:
    """``True`` when the step may go on; for a non-finite loss on any rank raise, or warn and return ``False``.

    Args:
        module: the LightningModule (its trainer, when attached, gives step, epoch and the cross-rank decision).
        loss: the training loss of the step.
        policy: ``"error"``, ``"skip"`` or ``"warn"`` (see the module docstring).
        batch: the step's batch, searched for NaN/inf only when the loss is not finite (to name the cause).
        what: the loss's name in the message (default ``"training loss"``).
        otherwise: the cause to name when neither the batch nor the parameters hold NaN/inf (default: a
            diverging optimisation).

    Example:
        >>> net = nn.Linear(2, 1)
        >>> check_loss(net, torch.tensor(0.5))
        True
        >>> check_loss(net, torch.tensor(float("nan")))
        Traceback (most recent call last):
        ...
        FloatingPointError: Linear: the training loss is not finite (nan) at step 0, epoch 0. Likely cause: the optimisation diverged or a loss term overflowed (lower `lr`, add gradient clipping with `trainer.gradient_clip_val`, or check the loss weights). Or set `nonfinite_loss: skip` to skip such steps.
    """
    finite = bool(torch.isfinite(loss.detach()).all())
    trainer = getattr(module, "_trainer", None)
    if trainer is not None:
        finite = bool(trainer.strategy.reduce_boolean_decision(finite, all=True))
    if finite:
        return True
    step = trainer.global_step if trainer is not None else 0
    epoch = trainer.current_epoch if trainer is not None else 0
    name = type(module).__name__
    value = float(loss.detach().float().mean()) if loss.numel() else float("nan")
    where = f"at step {step}, epoch {epoch}"
    cause = nonfinite_cause(module, batch, otherwise)
    what = what or "training loss"
    if policy == "error":
        if bool(torch.isfinite(loss.detach()).all()):
            cause = "another process's loss was not finite; " + cause
        raise FloatingPointError(f"{name}: the {what} is not finite ({value}) {where}. Likely cause: {cause}. "
                                 "Or set `nonfinite_loss: skip` to skip such steps.")
    if policy == "skip":
        module.skipped_steps = getattr(module, "skipped_steps", 0) + 1
        rank_zero_warn(f"{name}: non-finite {what} ({value}) {where}; optimizer step skipped "
                       f"({module.skipped_steps} so far). Likely cause: {cause}.")
        return False
    rank_zero_warn(f"{name}: non-finite {what} ({value}) {where}; training on it (nonfinite_loss='warn'), "
                   f"parameters may become non-finite. Likely cause: {cause}.")
    return True


def refuse_skip_under_ddp(module: Any, policy: str) -> None:
    """In ``setup``: refuse ``nonfinite_loss='skip'`` when the trainer runs more than one process."""
    trainer = getattr(module, "_trainer", None)
    if trainer is not None and policy == "skip" and getattr(trainer, "world_size", 1) > 1:
        raise RuntimeError(
            f"{type(module).__name__}(nonfinite_loss='skip') cannot skip steps in distributed training "
            "(Lightning does not support a training_step that returns None there). Use "
            "`nonfinite_loss: error` with gradient clipping (`trainer.gradient_clip_val`) under DDP."
        )


def buffer_snapshot(module: nn.Module) -> dict[str, Tensor]:
    """Copies of every buffer (BatchNorm running statistics), to undo a skipped step's forward."""
    return {name: b.detach().clone() for name, b in module.named_buffers()}


def restore_buffers(module: nn.Module, snapshot: dict[str, Tensor]) -> None:
    """Copy a :func:`buffer_snapshot` back into the module's buffers."""
    with torch.no_grad():
        for name, buffer in module.named_buffers():
            if name in snapshot:
                buffer.copy_(snapshot[name])


class SkippedStepsCheckpoint:
    """Mixin for a LightningModule that uses :func:`check_loss`: keeps ``skipped_steps`` in its checkpoints.

    Put it before ``LightningModule`` in the bases (``class M(SkippedStepsCheckpoint, LightningModule)``); a
    subclass that overrides the hooks calls ``super()``.
    """

    skipped_steps: int = 0

    @override
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Save the count of skipped steps."""
        super().on_save_checkpoint(checkpoint)  # type: ignore[misc]
        checkpoint["skipped_steps"] = self.skipped_steps

    @override
    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Restore the count of skipped steps."""
        super().on_load_checkpoint(checkpoint)  # type: ignore[misc]
        self.skipped_steps = int(checkpoint.get("skipped_steps", 0))
