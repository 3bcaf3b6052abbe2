"""Strategy guards: one list of the strategies that shard parameters, one refusal message.

Components that edit, copy or gather whole parameters (pruning, merging, distillation, compression) call
:func:`refuse_sharded_strategy` in ``setup()``; each names the error type its users already catch.
"""

from __future__ import annotations

from typing import Any, Optional

#: Strategy class names whose processes hold only shards of each parameter (or run on XLA devices).
SHARDED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy", "XLAFSDPStrategy",
                      "XLAStrategy", "SingleDeviceXLAStrategy")


def strategy_names(trainer: Any) -> set[str]:
    """Class names in the MRO of ``trainer.strategy`` (so subclasses of a sharded strategy are caught too)."""
    strategy = getattr(trainer, "strategy", None)
    return {c.__name__ for c in type(strategy).__mro__} if strategy is not None else set()


def is_sharded(trainer: Any) -> bool:
    """Whether ``trainer`` runs a strategy from :data:`SHARDED_STRATEGIES`."""
    return bool(strategy_names(trainer) & set(SHARDED_STRATEGIES))


def refuse_sharded_strategy(trainer: Any, component: str, why: str, error: type[Exception] = ValueError,
                            suggestion: Optional[str] = "Use a single device or strategy='ddp'.") -> None:
    """Raise ``error`` with one line if ``trainer`` shards parameters.

    Args:
        trainer: the Lightning ``Trainer`` (anything with a ``strategy`` attribute).
        component: the refusing component's name, e.g. ``"BetaRankPruning"``.
        why: what the component needs that sharding breaks, e.g. ``"removes channels physically"``.
        error: the exception type to raise.
        suggestion: what to change, appended to the message.

    Example:
        >>> class Trainer: strategy = type("FSDPStrategy", (), {})()
        >>> refuse_sharded_strategy(Trainer(), "X", "edits whole weights")
        Traceback (most recent call last):
        ...
        ValueError: X edits whole weights, which needs every process to hold whole parameters; FSDPStrategy shards them. Use a single device or strategy='ddp'.
    """
    if is_sharded(trainer):
        name = type(trainer.strategy).__name__
        raise error(f"{component} {why}, which needs every process to hold whole parameters; {name} shards them."
                    + (f" {suggestion}" if suggestion else ""))
