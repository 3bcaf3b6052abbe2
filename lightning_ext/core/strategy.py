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


def require_find_unused_parameters(trainer: Any, component: str, why: str) -> None:
    """Raise ``ValueError`` with one line if ``trainer`` runs DDP on several processes without
    ``find_unused_parameters=True`` (which a step that leaves some parameters without a gradient needs: DDP would
    otherwise fail mid-fit with a long message).

    Example:
        >>> class DDPStrategy: _ddp_kwargs = {}
        >>> class Trainer: strategy, world_size = DDPStrategy(), 2
        >>> require_find_unused_parameters(Trainer(), "X", "updates its weights and α in separate steps")
        Traceback (most recent call last):
        ...
        ValueError: X updates its weights and α in separate steps, so under DDP it needs strategy='ddp_find_unused_parameters_true' (or DDPStrategy(find_unused_parameters=True)).
    """
    strategy = getattr(trainer, "strategy", None)
    kwargs = getattr(strategy, "_ddp_kwargs", None)  # Lightning's DDP strategies keep their DDP arguments here
    if getattr(trainer, "world_size", 1) > 1 and kwargs is not None and not kwargs.get("find_unused_parameters"):
        raise ValueError(f"{component} {why}, so under DDP it needs strategy='ddp_find_unused_parameters_true' "
                         "(or DDPStrategy(find_unused_parameters=True)).")
