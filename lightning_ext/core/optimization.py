"""``configure_optimizers`` for modules that take LightningCLI-style optimiser and scheduler factories."""

from __future__ import annotations

from typing import Any

from lightning_ext.core.validation import AtLeastTwoInt, check_non_negative, check_number, check_positive

#: A class count: an integer >= 2.
NumClasses = AtLeastTwoInt


def check_num_classes(value: Any, name: str = "num_classes") -> int:
    """``value`` if it is an integer >= 2, else one line naming ``name``."""
    return int(check_number(name, value, low=2, integer=True))


def check_optimization(lr: Any, weight_decay: Any) -> None:
    """Refuse a non-finite or non-positive ``lr`` and a non-finite or negative ``weight_decay``."""
    check_positive("lr", lr)
    check_non_negative("weight_decay", weight_decay)


def configure_optimization(module: Any, params: Any) -> Any:
    """What ``configure_optimizers`` returns for a module with LightningCLI-style injection: its
    ``optimizer_factory`` (or AdamW with its ``lr``/``weight_decay``) over ``params`` (parameters or groups), plus
    its ``scheduler_factory`` stepped every ``scheduler_interval`` when one is set.

    Example:
        >>> import torch
        >>> from types import SimpleNamespace
        >>> m = SimpleNamespace(optimizer_factory=None, scheduler_factory=None, lr=0.1, weight_decay=0.0)
        >>> type(configure_optimization(m, [torch.zeros(1, requires_grad=True)])).__name__
        'AdamW'
    """
    import torch

    if module.optimizer_factory is not None:
        optimizer = module.optimizer_factory(params)
    else:
        optimizer = torch.optim.AdamW(params, lr=module.lr, weight_decay=module.weight_decay)
    if module.scheduler_factory is None:
        return optimizer
    scheduler = module.scheduler_factory(optimizer)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": module.scheduler_interval}}
