"""``OrderlyDDPSpawn``: ``ddp_spawn`` whose ranks destroy their gloo process group when their work is done.

A module of its own (not in :mod:`lightning_ext.testing`, which every test subprocess imports) because it imports
Lightning at module level: spawned ranks unpickle the strategy and its launcher by their module path.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.strategies import DDPStrategy as _DDPStrategy
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from typing_extensions import override

__all__ = ["OrderlyDDPSpawn"]


class _OrderlyLauncher(_MultiProcessingLauncher):
    """Lightning's spawn launcher, plus ``destroy_process_group`` once a rank's whole fit has returned.

    Not in the strategy's ``teardown``: Lightning calls ``on_fit_end`` after ``teardown``, and callbacks broadcast
    there (``ModelMerging`` merges at fit end on rank 0); with the group gone such a broadcast silently returns the
    rank's own ``None``."""

    @override
    def _wrapping_function(self, *args: Any, **kwargs: Any) -> None:
        import torch.distributed as dist

        try:
            super()._wrapping_function(*args, **kwargs)
        finally:
            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()


class OrderlyDDPSpawn(_DDPStrategy):
    """``ddp_spawn`` whose ranks destroy their gloo process group after their fit (hooks included) returns.

    Lightning destroys the process group at exit only for NCCL; a gloo group is left to the interpreter's exit,
    where its C++ worker threads can be destroyed while still joinable (``std::terminate``: "terminate called without
    an active exception", SIGABRT), which a spawned rank of the VICReg test hit in 2 of 4 loaded CI runs. Destroying
    the group while the interpreter is still whole joins those threads. No barrier first: a rank that failed must not
    leave the other waiting."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(start_method="spawn", **kwargs)

    @override
    def _configure_launcher(self) -> None:
        self._launcher = _OrderlyLauncher(self, start_method=self._start_method)
