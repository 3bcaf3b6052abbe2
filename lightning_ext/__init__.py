"""lightning-ext: published research methods as drop-in PyTorch Lightning components.

Components are imported lazily, so ``import lightning_ext`` stays fast (it imports neither torch nor
Lightning). ``lightning_ext.ImageClassifier`` or ``from lightning_ext.modules import ImageClassifier`` loads
the component on first use. ``lightning-ext list`` prints every component with a one-line summary.
"""

from __future__ import annotations

from lightning_ext import timm_hook
from lightning_ext.core.lazy import lazy_exports

timm_hook.install()  # the first `import timm` also registers ffnet_* (no torch/timm import here)

__version__ = "0.1.0"

_SUBPACKAGES = ("callbacks", "datamodules", "modules")


def _all_exports() -> dict[str, str]:
    from lightning_ext.catalogue import exports

    return {name: module for sub in _SUBPACKAGES for name, module in exports(sub).items()}


def __getattr__(name: str):  # noqa: D103 - module-level lazy attribute access
    if name in _SUBPACKAGES:
        import importlib

        return importlib.import_module(f"lightning_ext.{name}")
    if name.startswith("_"):
        raise AttributeError(f"module 'lightning_ext' has no attribute {name!r}")
    getter, _ = lazy_exports(__name__, _all_exports())
    return getter(name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_all_exports()])
