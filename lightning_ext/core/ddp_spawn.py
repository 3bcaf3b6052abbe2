"""``OrderlyDDPSpawn``: ``ddp_spawn`` whose ranks destroy their gloo process group in teardown.

A module of its own (not in :mod:`lightning_ext.testing`, which every test subprocess imports) because it imports
Lightning at module level: spawned ranks unpickle the strategy by its module path.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.strategies import DDPStrategy as _DDPStrategy
from typing_extensions import override

__all__ = ["OrderlyDDPSpawn"]


class OrderlyDDPSpawn(_DDPStrategy):
    """``ddp_spawn`` whose ranks destroy their gloo process group in ``teardown``.

    Lightning destroys the process group at exit only for NCCL; a gloo group is left to the interpreter's exit,
    where its C++ worker threads can be destroyed while still joinable (``std::terminate``: "terminate called without
    an active exception", SIGABRT), which a spawned rank of the VICReg test hit in 2 of 4 loaded CI runs. Destroying
    the group in teardown joins those threads while the interpreter is still whole. No barrier first: a rank that
    failed must not leave the other waiting."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(start_method="spawn", **kwargs)

    @override
    def teardown(self) -> None:
        import torch.distributed as dist

        super().teardown()
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
