"""The one place that imports Flower: telemetry and update checks off first, then ``flwr`` through
``core.optional.require`` (the error names the ``[federated]`` extra)."""

from __future__ import annotations

import os
from types import ModuleType


def require_flwr(purpose: str) -> ModuleType:
    """Import ``flwr`` (telemetry and the update check disabled before the first import) or raise the install line.

    Example:
        >>> require_flwr("a doctest").__name__
        'flwr'
    """
    from lightning_ext.core.optional import require

    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # read at import time; nothing leaves the machine
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    return require("flwr", purpose)
