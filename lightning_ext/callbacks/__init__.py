"""Callbacks: pruning, merging, distillation and pipeline tuning dropped onto any Trainer."""

from lightning_ext._lazy import lazy_exports

_EXPORTS: dict[str, str] = {}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
