"""Lazy attribute exports, so ``import lightning_ext`` imports neither torch nor any family's dependency.

A package lists its public names and the module that defines each (absolute, ``lightning_ext.vision.classifier``,
or relative to the package, ``classifier``); the module is imported the first time the name is used.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """Build ``__getattr__`` and ``__dir__`` for a package whose names live in other modules.

    Args:
        package: the package's ``__name__``.
        exports: public name -> defining module, absolute or relative to ``package``.
    """

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        target = exports[name]
        module = importlib.import_module(target if target.startswith("lightning_ext.") else f"{package}.{target}")
        return getattr(module, name)

    def __dir__() -> list[str]:
        return sorted(exports)

    return __getattr__, __dir__
