"""``OrderlyDDPSpawn``: ``ddp_spawn`` whose ranks destroy their gloo process group when their work is done.

A module of its own (not in :mod:`lightning_ext.testing`, which every test subprocess imports) because it imports
Lightning at module level: spawned ranks unpickle the strategy and its launcher by their module path.

``start_method="forkserver"`` (what :func:`lightning_ext.testing.fit_ddp_vs_single` uses) starts each rank from a
fork server that imported torch and Lightning once, instead of a fresh interpreter that imports them again for every
rank of every fit (about 5 CPU-seconds per rank on the CI machine). The ranks still get what ``spawn`` gives them:
the parent's environment variables, torch's deterministic flags and RNG states (Lightning restores these only for
``spawn``), and module weights that do not share memory with the parent.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, Literal

from lightning.fabric.strategies.launchers.multiprocessing import _disable_module_memory_sharing
from lightning.pytorch.strategies import DDPStrategy as _DDPStrategy
from lightning.pytorch.strategies.launchers.multiprocessing import _GlobalStateSnapshot, _MultiProcessingLauncher
from typing_extensions import override

__all__ = ["OrderlyDDPSpawn"]

#: Modules the fork server imports once, before it forks any rank.
FORKSERVER_PRELOAD = ["torch", "lightning.pytorch"]


def _call_with_parent_state(snapshot: _GlobalStateSnapshot, environ: dict, function: Callable, *args: Any,
                            **kwargs: Any) -> Any:
    """Runs in a forkserver rank: the parent's environment and global torch state, then ``function``. The rank's
    ``LOCAL_RANK``, which the launcher set in this process just before, is kept."""
    local_rank = os.environ["LOCAL_RANK"]
    os.environ.clear()
    os.environ.update(environ)
    os.environ["LOCAL_RANK"] = local_rank
    snapshot.restore()
    args, kwargs = _disable_module_memory_sharing((args, kwargs))
    return function(*args, **kwargs)


class _OrderlyLauncher(_MultiProcessingLauncher):
    """Lightning's spawn launcher, plus ``destroy_process_group`` once a rank's whole fit has returned.

    Not in the strategy's ``teardown``: Lightning calls ``on_fit_end`` after ``teardown``, and callbacks broadcast
    there (``ModelMerging`` merges at fit end on rank 0); with the group gone such a broadcast silently returns the
    rank's own ``None``."""

    @override
    def launch(self, function: Callable, *args: Any, trainer: Any = None, **kwargs: Any) -> Any:
        if self._start_method == "forkserver":
            import multiprocessing

            multiprocessing.set_forkserver_preload(FORKSERVER_PRELOAD)  # takes effect when the server first starts
            assert self._strategy.cluster_environment is not None
            os.environ["MASTER_PORT"] = str(self._strategy.cluster_environment.main_port)  # as the parent launch does
            function = functools.partial(_call_with_parent_state, _GlobalStateSnapshot.capture(), dict(os.environ),
                                         function)
        return super().launch(function, *args, trainer=trainer, **kwargs)

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
    leave the other waiting.

    Args:
        start_method: ``"spawn"`` (a fresh interpreter per rank) or ``"forkserver"`` (ranks forked from a server that
            imported torch and Lightning once; the parent's environment, RNG and deterministic flags are carried over).
    """

    def __init__(self, start_method: Literal["spawn", "forkserver"] = "spawn", **kwargs: Any) -> None:
        if start_method not in ("spawn", "forkserver"):
            raise ValueError(f"start_method must be 'spawn' or 'forkserver', got {start_method!r}.")
        super().__init__(start_method=start_method, **kwargs)

    @override
    def _configure_launcher(self) -> None:
        self._launcher = _OrderlyLauncher(self, start_method=self._start_method)
