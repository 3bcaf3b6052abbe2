"""Import optional heavy dependencies lazily, with an error that gives the exact install line.

A family's heavy dependency belongs to a pip extra of ``lightning-ext`` (``pyproject.toml``; the catalogue's
``extra`` field says which components need it). :func:`require` imports it, or raises
:class:`ModuleNotFoundError` with the line that installs it, e.g.
``pip install "lightning-ext[graph]"``. A module that belongs to no extra is named by its own pip package.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Optional

#: The pip distribution of this library, as written in install lines.
DISTRIBUTION = "lightning-ext"

#: Top-level module -> the ``lightning-ext`` extra that installs it (``[project.optional-dependencies]``).
EXTRAS = {
    "torch_pruning": "compression",
    "torch_geometric": "graph",
    "torchdata": "pipeline",
    "mlxtend": "data",
    "pycocotools": "detection",
    "flwr": "federated",
    "diffusers": "diffusion",
    "monai": "medical",
    "nibabel": "medical",
    "tifffile": "medical",
    "soundfile": "audio",
    "pesq": "audio",
    "pystoi": "audio",
    "dpkt": "traffic",
    "transformers": "text",
}

#: Top-level module -> its pip package, for modules outside any extra whose pip name differs.
_PIP_NAMES = {
    "torch_geometric": "torch-geometric",
    "torch_pruning": "torch-pruning",
    "PIL": "Pillow",
    "sklearn": "scikit-learn",
    "yaml": "PyYAML",
}


def extra_of(module: str) -> Optional[str]:
    """The ``lightning-ext`` extra that installs ``module`` (by its top-level name), or ``None``."""
    return EXTRAS.get(module.split(".")[0])


def install_line(module: str) -> str:
    """The command that installs ``module``: ``pip install "lightning-ext[<extra>]"`` or ``pip install <name>``.

    Example:
        >>> install_line("torch_geometric.nn")
        'pip install "lightning-ext[graph]"'
        >>> install_line("sklearn")
        'pip install scikit-learn'
    """
    top = module.split(".")[0]
    extra = EXTRAS.get(top)
    if extra is not None:
        return f'pip install "{DISTRIBUTION}[{extra}]"'
    return f"pip install {_PIP_NAMES.get(top, top)}"


def require(module: str, purpose: str = "") -> ModuleType:
    """Import ``module`` or raise :class:`ModuleNotFoundError` with the exact install line.

    Call it in a component's constructor (and again where the module is used), so a missing extra fails at
    construction, not mid-training. When ``module`` is installed but one of *its* own imports is missing, the
    original error is re-raised unchanged (installing ``module`` again would not fix it).

    Args:
        module: importable module name, e.g. ``"torch_geometric"``.
        purpose: what needs it, added to the message (``"PlanetoidDataModule"``).

    Example:
        >>> require("math").sqrt(4.0)
        2.0
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        top = module.split(".")[0]
        if err.name is not None and err.name.split(".")[0] != top:
            raise  # the module exists but one of *its* imports is missing: show the real error
        who = f" for {purpose}" if purpose else ""
        raise ModuleNotFoundError(
            f"`{module}` is needed{who} but is not installed. Install it with `{install_line(module)}`.",
            name=module,
        ) from err
