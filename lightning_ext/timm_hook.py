"""Register the library's timm models when timm is imported, without importing torch or timm before that."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from typing import Any, Optional, Sequence

#: Modules whose import registers models with timm (``register_model``).
TIMM_MODEL_MODULES = ("lightning_ext.vision.ffnet",)


def _register() -> None:
    for name in TIMM_MODEL_MODULES:
        try:
            importlib.import_module(name)
        except Exception as err:  # noqa: BLE001 - never break the user's `import timm`
            import warnings

            warnings.warn(f"lightning_ext could not register its timm models from {name}: {err}", stacklevel=2)


class _AfterTimmLoader(importlib.abc.Loader):
    """Wraps timm's own loader: execute timm, then import the modules that register the library's models."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def create_module(self, spec: Any) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self.loader.exec_module(module)
        _register()

    def __getattr__(self, name: str) -> Any:  # e.g. get_resource_reader, is_package
        return getattr(self.loader, name)


class TimmImportHook(importlib.abc.MetaPathFinder):
    """A one-shot import hook: the first ``import timm`` also registers ``ffnet_*`` (and any module in
    :data:`TIMM_MODEL_MODULES`), so ``import lightning_ext; import timm; timm.create_model("ffnet_1")`` works.

    It removes itself on first use and leaves every other import alone.
    """

    def find_spec(self, fullname: str, path: Optional[Sequence[str]], target: Any = None) -> Any:
        if fullname != "timm":
            return None
        uninstall()
        spec = importlib.util.find_spec("timm")
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _AfterTimmLoader(spec.loader)
        return spec


def install() -> None:
    """Register now if timm is already imported, else when it is (idempotent)."""
    if "timm" in sys.modules:
        _register()
    elif not any(isinstance(f, TimmImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, TimmImportHook())


def uninstall() -> None:
    """Remove the hook (if present)."""
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, TimmImportHook)]
