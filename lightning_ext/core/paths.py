"""Where components write: relative paths under the run's directory (``trainer.log_dir``), ``None`` disables.

Caches that outlive a run go under :func:`cache_root` (``$LIGHTNING_EXT_CACHE``, default
``~/.cache/lightning_ext``), one sub-folder per component, validated before use by the component itself.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Union

PathLike = Union[str, os.PathLike]


def run_dir(trainer: Any) -> Path:
    """The run's directory: ``trainer.log_dir``, else ``trainer.default_root_dir``, else the working directory."""
    for attr in ("log_dir", "default_root_dir"):
        value = getattr(trainer, attr, None) if trainer is not None else None
        if value:
            return Path(value)
    return Path.cwd()


def output_path(trainer: Any, path: Optional[PathLike]) -> Optional[Path]:
    """Resolve a component's output ``path``: ``None`` disables the output, a relative path lies under
    :func:`run_dir`, an absolute path is used as given.

    Example:
        >>> class T: log_dir = "/runs/version_0"
        >>> str(output_path(T(), "pruning.png")), output_path(T(), None)
        ('/runs/version_0/pruning.png', None)
    """
    if path is None:
        return None
    if not str(path).strip():
        raise ValueError("An output path must name a file or folder; use None (null in YAML) to disable the output.")
    path = Path(path).expanduser()
    return path if path.is_absolute() else run_dir(trainer) / path


def cache_root(component: str = "") -> Path:
    """The documented cache root (``$LIGHTNING_EXT_CACHE`` or ``~/.cache/lightning_ext``), plus ``component``."""
    root = Path(os.environ.get("LIGHTNING_EXT_CACHE", "~/.cache/lightning_ext")).expanduser()
    return root / component if component else root


def check_path_argument(name: str, value: Optional[PathLike], error: type[Exception] = ValueError) -> None:
    """Refuse a path argument that is not ``None``, a non-empty string or an ``os.PathLike`` (one line naming it).

    Example:
        >>> check_path_argument("plot_path", "")
        Traceback (most recent call last):
        ...
        ValueError: plot_path must name a file or folder, got ''; use None (null in YAML) to disable it.
    """
    if value is None:
        return
    if not isinstance(value, (str, os.PathLike)):
        raise error(f"{name} must be a path (a string), got {type(value).__name__} {value!r}.")
    if not str(value).strip():
        raise error(f"{name} must name a file or folder, got {str(value)!r}; use None (null in YAML) to disable it.")
