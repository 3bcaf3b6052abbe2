"""Import optional heavy dependencies lazily, with an error that says how to install them."""

from __future__ import annotations

import importlib
from types import ModuleType

_PIP_NAMES = {
    "torch_geometric": "torch-geometric",
    "timm": "timm",
    "torch_pruning": "torch-pruning",
    "torchdata": "torchdata",
    "mlxtend": "mlxtend",
    "matplotlib": "matplotlib",
}


def require(module: str, purpose: str = "") -> ModuleType:
    """Import ``module`` or raise :class:`ModuleNotFoundError` naming the package to install.

    Args:
        module: importable module name, e.g. ``"torch_geometric"``.
        purpose: what needs it, added to the message (``"PlanetoidDataModule"``).
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        top = module.split(".")[0]
        if err.name is not None and err.name.split(".")[0] != top:
            raise  # the module exists but one of *its* imports is missing: show the real error
        pip_name = _PIP_NAMES.get(top, top)
        who = f" for {purpose}" if purpose else ""
        raise ModuleNotFoundError(
            f"`{module}` is needed{who} but is not installed. Install it with `pip install {pip_name}`."
        ) from err
