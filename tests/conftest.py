"""Fixtures and markers for tests/ (the network guard lives in the repository-root conftest.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
PLANETOID_ROOT = SHARED / "data" / "planetoid"


@pytest.fixture
def one_thread():
    """One torch thread for the test (tiny sparse steps: OpenMP threads only add synchronisation, 10x slower on a
    busy 2-core machine); the previous count is restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def planetoid_root() -> Path:
    """../shared/data/planetoid (read-only; PlanetoidDataModule copies raw files to its cache_dir)."""
    if not PLANETOID_ROOT.is_dir() and not os.environ.get("CI"):
        pytest.skip(f"{PLANETOID_ROOT} is missing: the shared/ folder must sit beside the repository.")
    return PLANETOID_ROOT


def fashion_mnist_available() -> bool:
    from lightning_ext.data.fashion_mnist import find_fashion_mnist

    try:
        find_fashion_mnist()
        return True
    except FileNotFoundError:
        return False


# In CI (CI=true) the README's test command installs the data, so a missing copy fails instead of skipping.
needs_fashion_mnist = pytest.mark.skipif(
    not fashion_mnist_available() and not os.environ.get("CI"), reason="Fashion-MNIST IDX files missing: `apt-get install dataset-fashion-mnist`"
)


@pytest.fixture(autouse=True)
def _run_in_tmp_path(tmp_path, monkeypatch):
    """Each test runs in its own temporary directory, so nothing it writes by default lands in the repo."""
    monkeypatch.chdir(tmp_path)
