"""Suite-wide set-up: no network, a headless matplotlib, small thread counts, shared data paths."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
PLANETOID_ROOT = SHARED / "data" / "planetoid"

# Child processes (CLI subprocesses, ddp_spawn workers) run tests/netguard/sitecustomize.py at start-up.
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(REPO / "tests" / "netguard"), str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
)
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PL_DISABLE_FORK", "1")


def pytest_configure(config):
    from lightning_ext.testing import block_network

    block_network()
    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def planetoid_root() -> Path:
    """../shared/data/planetoid (read-only; PlanetoidDataModule copies raw files to its cache_dir)."""
    if not PLANETOID_ROOT.is_dir():
        pytest.skip(f"{PLANETOID_ROOT} is missing: the shared/ folder must sit beside the repository.")
    return PLANETOID_ROOT


def fashion_mnist_available() -> bool:
    from lightning_ext.datamodules.fashion_mnist import find_fashion_mnist

    try:
        find_fashion_mnist()
        return True
    except FileNotFoundError:
        return False


# In CI (CI=true) the README's test command installs the data, so a missing copy fails instead of skipping.
needs_fashion_mnist = pytest.mark.skipif(
    not fashion_mnist_available() and not os.environ.get("CI"), reason="Fashion-MNIST IDX files missing: `apt-get install dataset-fashion-mnist`"
)
