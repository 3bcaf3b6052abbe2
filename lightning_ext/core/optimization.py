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


#: Per-param-group lists that PyTorch's schedulers keep (``LambdaLR``/``MultiplicativeLR``: ``lr_lambdas``;
#: ``ReduceLROnPlateau``: ``min_lrs``; ``CyclicLR``: ``max_lrs``; every ``LRScheduler``: ``base_lrs``, ``_last_lr``).
SCHEDULER_PER_GROUP_LISTS = ("base_lrs", "_last_lr", "lr_lambdas", "min_lrs", "max_lrs")


def extend_scheduler(scheduler: Any, optimizer: Any) -> None:
    """After a param group joined ``optimizer``: give ``scheduler`` (and the schedulers a ``SequentialLR`` or
    ``ChainedScheduler`` holds) group 0's entry in each per-group list, so its ``zip(param_groups, ...)`` loops stay
    aligned and it schedules the new group like group 0."""
    for inner in getattr(scheduler, "_schedulers", None) or []:
        extend_scheduler(inner, optimizer)
    if getattr(scheduler, "optimizer", None) is not optimizer:
        return
    groups = len(optimizer.param_groups)
    for name in SCHEDULER_PER_GROUP_LISTS:
        values = getattr(scheduler, name, None)
        if isinstance(values, list) and values and len(values) == groups - 1:
            values.append(values[0])


def add_param_group(optimizer: Any, params: list, schedulers: Any = (), **overrides: Any) -> dict:
    """Add ``params`` to ``optimizer`` as a new param group with group 0's hyperparameters (``overrides``, e.g.
    ``lr=0.1, weight_decay=0.0``, replace some) and extend ``schedulers`` with :func:`extend_scheduler`.

    Example:
        >>> import torch
        >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.01, momentum=0.9)
        >>> sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt)
        >>> group = add_param_group(opt, [torch.zeros(2, requires_grad=True)], [sched], lr=0.1)
        >>> group["lr"], group["momentum"], len(sched.min_lrs)
        (0.1, 0.9, 2)
    """
    group = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
    group.update(overrides)
    group["params"] = list(params)
    optimizer.add_param_group(group)
    for scheduler in schedulers:
        extend_scheduler(scheduler, optimizer)
    return optimizer.param_groups[-1]
