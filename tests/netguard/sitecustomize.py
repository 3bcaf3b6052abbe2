# Put on PYTHONPATH by tests/conftest.py so every Python process the tests start (CLI subprocesses, DDP
# workers) refuses non-loopback connections too.
try:
    from lightning_ext.testing import block_network

    block_network()
except Exception:  # noqa: BLE001 - never break interpreter start-up
    pass
