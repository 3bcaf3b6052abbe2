"""Lazy attribute exports, so ``import lightning_ext`` does not import torch, timm or PyG.

Each subpackage lists its public names and the submodule that defines them; the submodule is imported the
first time the name is used. :func:`lightning_ext.registry.components` imports them all on demand.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """Build ``__getattr__`` and ``__dir__`` for a package whose names live in submodules.

    Args:
        package: the package's ``__name__``.
        exports: public name -> submodule name relative to ``package`` (``"image_classifier"``).
    """

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = importlib.import_module(f"{package}.{exports[name]}")
        return getattr(module, name)

    def __dir__() -> list[str]:
        return sorted(exports)

    return __getattr__, __dir__
