"""Callbacks: pruning, merging, distillation, kNN evaluation and pipeline tuning dropped onto any Trainer.

A lazy facade over the family folders: the names come from :mod:`lightning_ext.catalogue`, and a component's
module is imported the first time its name is used. The code lives in ``lightning_ext/<family>/``.
"""

from lightning_ext.catalogue import exports
from lightning_ext.core.lazy import lazy_exports

_EXPORTS: dict[str, str] = exports("callbacks")
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
