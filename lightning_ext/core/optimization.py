"""``configure_optimizers`` for modules that take LightningCLI-style optimiser and scheduler factories."""

from __future__ import annotations

from typing import Any


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
