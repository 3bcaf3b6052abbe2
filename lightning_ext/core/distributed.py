"""Cross-rank gathering for self-supervised losses, with gradients that match one process.

The most common serious bug in SSL libraries is a gather whose backward pass is wrong (lightly#1528,
lightly#1977, bolts#179). :func:`gather_with_grad` uses :func:`torch.distributed.nn.functional.all_gather`,
whose backward sums every rank's gradient for a slice and returns it to the rank that owns the slice. With
DDP's gradient averaging on top, a loss computed on the gathered global batch then has exactly the gradient
of the same loss computed on that batch in one process (``tests/test_self_supervised.py`` checks it with two
gloo processes).
"""

from __future__ import annotations

import socket

import torch
from torch import Tensor

__all__ = ["world_size", "rank", "gather_with_grad", "mean_over_ranks", "free_port"]


def _initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world_size() -> int:
    """Number of processes in the default group (1 without torch.distributed)."""
    return torch.distributed.get_world_size() if _initialized() else 1


def rank() -> int:
    """This process's rank in the default group (0 without torch.distributed)."""
    return torch.distributed.get_rank() if _initialized() else 0


def gather_with_grad(x: Tensor, dim: int = 0) -> Tensor:
    """Concatenate ``x`` from all ranks along ``dim`` (rank order); gradients flow back to each owner.

    Without an initialised process group, or with one process, ``x`` is returned unchanged. Every rank must
    pass a tensor of the same shape (our DataModules' samplers guarantee equal per-rank batches); otherwise
    a ``ValueError`` says so instead of a hang or a cryptic collective error.

    Example:
        >>> gather_with_grad(torch.ones(2, 3)).shape  # one process: unchanged
        torch.Size([2, 3])
    """
    if world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    sizes = torch.tensor(list(x.shape), dtype=torch.long, device=x.device)
    all_sizes = [torch.empty_like(sizes) for _ in range(world_size())]
    torch.distributed.all_gather(all_sizes, sizes)
    if any(not torch.equal(s, sizes) for s in all_sizes):
        raise ValueError(
            f"gather_with_grad needs the same tensor shape on every rank, got {[s.tolist() for s in all_sizes]}; "
            "use equal per-rank batches (drop_last=True or a DistributedSampler that pads)."
        )
    return torch.cat(all_gather(x.contiguous()), dim=dim)


def mean_over_ranks(value: float, device: torch.device | str = "cpu") -> float:
    """The mean of a number over all ranks (``value`` itself in one process).

    A loss normalised by a per-process count (DETR's ``num_boxes``) gives DDP a gradient that is not the one of
    the global batch; normalising every rank by the mean count does (the DETR reference code's ``all_reduce`` /
    world size), since DDP then averages sums that share one denominator. Every rank must call it the same
    number of times.

    Example:
        >>> mean_over_ranks(3.0)
        3.0
    """
    if world_size() == 1:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return float(t) / world_size()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (a rendezvous port for spawned ranks, a loopback server's port).

    Example:
        >>> 1024 <= free_port() <= 65535
        True
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
