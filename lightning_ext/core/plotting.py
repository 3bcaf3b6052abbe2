"""Figures through matplotlib's object API: no ``matplotlib.use``, no pyplot state, so a notebook user's backend
is left alone. Files are written atomically."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Union

from lightning_ext.core.io import atomic_path
from lightning_ext.core.optional import require


def new_figure(nrows: int = 1, ncols: int = 1, figsize: tuple[float, float] = (5.0, 3.5), **kwargs: Any):
    """A ``(Figure, axes)`` pair not registered with pyplot (garbage-collected, never shown).

    Example:
        >>> fig, ax = new_figure()
        >>> type(fig).__name__
        'Figure'
    """
    require("matplotlib", "plotting")
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    axes = fig.subplots(nrows, ncols, **kwargs)
    return fig, axes


def save_figure(fig: Any, path: Union[str, os.PathLike], dpi: int = 110) -> Path:
    """Lay out ``fig`` and write it as a PNG (temporary file, then rename); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".") or "png")
    return path
