"""Wrap a LightningModule's ``training_step`` from a callback, and undo it exactly.

Callbacks that add a term to the user's loss without subclassing the module (``KnowledgeDistillation``,
``FireTogetherWireTogether``) install an instance attribute ``pl_module.training_step`` that calls the original
(bound) method and post-processes its output. Wrappers stack: each remembers the instance attribute it replaced
(``None`` when the class method was in effect) and the callback that owns it, so removing one restores exactly
what was there before, and a wrapper left behind by a crashed fit can be recognised and dropped.

Example:
    >>> import torch
    >>> from lightning.pytorch import LightningModule
    >>> class M(LightningModule):
    ...     def training_step(self, batch, batch_idx):
    ...         return torch.tensor(1.0)
    >>> m, owner = M(), object()
    >>> wrap_training_step(m, owner, lambda step, args, kwargs: step(*args, **kwargs) + 1)
    >>> float(m.training_step(None, 0)), wrapped_by(m) is owner
    (2.0, True)
    >>> unwrap_training_step(m, owner)
    True
    >>> "training_step" in vars(m), float(m.training_step(None, 0))
    (False, 1.0)
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor

__all__ = ["FitStepWrapping", "loss_of", "unwrap_training_step", "with_loss", "wrap_training_step", "wrapped_by"]

_OWNER = "_lightning_ext_owner"
_PREVIOUS = "_lightning_ext_previous"

Around = Callable[[Callable[..., Any], tuple, dict], Any]


def wrapped_by(module: Any) -> Any:
    """The owner of the outermost wrapper on ``module.training_step``, or ``None`` when it is not wrapped."""
    return getattr(module.__dict__.get("training_step"), _OWNER, None)


def _pop(module: Any) -> None:
    previous = getattr(module.__dict__["training_step"], _PREVIOUS)
    if previous is None:
        del module.__dict__["training_step"]
    else:
        module.__dict__["training_step"] = previous


def wrap_training_step(module: Any, owner: Any, around: Around,
                       drop_stale: Callable[[Any], bool] | None = None) -> None:
    """Install ``around(original, args, kwargs)`` as ``module.training_step``, owned by ``owner``.

    Args:
        module: the LightningModule.
        owner: the callback installing the wrapper (identifies it for :func:`unwrap_training_step`).
        around: called with the current ``training_step`` and the call's arguments; returns the step's output.
        drop_stale: outermost wrappers whose owner satisfies it are removed first (e.g. wrappers of a callback
            of the same kind whose fit crashed, so it never unwrapped).
    """
    if drop_stale is not None:
        while (current := wrapped_by(module)) is not None and drop_stale(current):
            _pop(module)
    original = module.training_step
    previous = module.__dict__.get("training_step")

    @functools.wraps(original)
    def training_step(*args: Any, **kwargs: Any) -> Any:
        return around(original, args, kwargs)

    setattr(training_step, _OWNER, owner)
    setattr(training_step, _PREVIOUS, previous)
    module.training_step = training_step


def unwrap_training_step(module: Any, owner: Any) -> bool:
    """Remove ``owner``'s wrapper when it is the outermost one; returns whether it was removed.

    A wrapper that another wrapper was stacked on afterwards is left in place (removing it would also drop the
    later one); callbacks unwrap in the reverse order of their setup, so this does not happen in a normal fit.
    """
    if wrapped_by(module) is not owner:
        return False
    _pop(module)
    return True


class FitStepWrapping:
    """Mixin for a callback that wraps its LightningModule's ``training_step`` for the length of a fit.

    ``_wrap_step`` removes this callback's own earlier wrapper, then every outermost wrapper left by a callback of
    ``stale_kind`` that is not in this trainer (its fit crashed before ``teardown``), and installs ``around``;
    ``_unwrap`` removes it again (from ``teardown`` and ``on_exception``). Shared by ``KnowledgeDistillation`` and
    ``HeadNetworkDistillation``. The wrapped module is kept in ``self._module``.
    """

    _module: Any = None

    def _wrap_step(self, trainer: Any, module: Any, around: Around, stale_kind: type) -> None:
        """Install ``around`` on ``module.training_step`` (see the class docstring)."""
        self._unwrap()
        wrap_training_step(module, self, around, drop_stale=lambda owner: isinstance(
            owner, stale_kind) and owner not in trainer.callbacks)
        self._module = module

    def _unwrap(self) -> None:
        """Remove this callback's wrapper, if it installed one."""
        module, self._module = self._module, None
        if module is not None:
            unwrap_training_step(module, self)


def loss_of(output: Any, module: Any, who: str) -> Tensor | None:
    """The loss tensor in a ``training_step`` output (a tensor or a dict with ``"loss"``); ``None`` for ``None``.

    Raises:
        TypeError: for any other output, naming ``who`` needs the loss.
    """
    if output is None or isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping) and isinstance(output.get("loss"), Tensor):
        return output["loss"]
    raise TypeError(f"{type(module).__name__}.training_step returned {type(output).__name__}; {who} needs the loss "
                    "tensor or a dict with a 'loss' tensor.")


def with_loss(output: Any, loss: Tensor) -> Any:
    """``output`` with its loss replaced by ``loss`` (same form: a tensor, or a dict with the other keys kept)."""
    return loss if isinstance(output, Tensor) else {**output, "loss": loss}
