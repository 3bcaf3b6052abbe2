"""Input handling shared by the self-supervised losses: views as ``(V, N, D)``, checked, optionally gathered."""

from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import Tensor

from lightning_ext.core.distributed import gather_with_grad

Views = Union[Tensor, Sequence[Tensor]]


def stack_views(views: Views, method: str, min_batch: int = 2, gather_distributed: bool = False) -> Tensor:
    """Return the projections of ``V`` views as one float32 ``(V, N, D)`` tensor, after checking them.

    Args:
        views: a ``(V, N, D)`` tensor or a sequence of ``V`` tensors of shape ``(N, D)``; row ``i`` of every
            view comes from the same image.
        method: the loss's name, for error messages.
        min_batch: the smallest (global) batch the loss is defined for.
        gather_distributed: concatenate the batch dimension over all ranks (with gradients) first.

    Raises:
        ValueError: fewer than two views, views of different shapes, or a batch under ``min_batch``.
    """
    if isinstance(views, Tensor):
        if views.dim() != 3:
            raise ValueError(f"{method}: expected views shaped (V, N, D), got a tensor of shape {tuple(views.shape)}.")
        z = views
    else:
        views = list(views)
        if len(views) < 2:
            raise ValueError(f"{method} needs at least two views of each image, got {len(views)}.")
        shapes = {tuple(v.shape) for v in views}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise ValueError(f"{method}: every view must be an (N, D) tensor of the same shape, got {sorted(shapes)}.")
        z = torch.stack(views)
    if z.shape[0] < 2:
        raise ValueError(f"{method} needs at least two views of each image, got {z.shape[0]}.")
    z = z.float()
    if gather_distributed:
        z = gather_with_grad(z, dim=1)
    if z.shape[1] < min_batch:
        raise ValueError(
            f"{method} needs a batch of at least {min_batch} samples (its statistics are taken over the batch), "
            f"got {z.shape[1]}. Raise the batch size, or drop the last incomplete batch (drop_last=True)."
        )
    return z


def pairs(num_views: int) -> list[tuple[int, int]]:
    """All unordered pairs of view indices ``(a, b)`` with ``a < b``."""
    return [(a, b) for a in range(num_views) for b in range(a + 1, num_views)]


def off_diagonal(m: Tensor) -> Tensor:
    """The off-diagonal entries of a square matrix, flattened."""
    n = m.shape[-1]
    return m.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()
