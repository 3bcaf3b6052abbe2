"""The bag batch every MIL aggregator takes: padded instance features and each bag's length."""

from __future__ import annotations

from typing import NamedTuple, Union

import torch
from torch import Tensor

__all__ = ["Bags", "BagsLike", "as_bags", "instance_mask"]


class Bags(NamedTuple):
    """A batch of bags: ``features`` ``(B, N_max, D)`` padded after each bag's ``lengths[b]`` instances.

    A plain tensor ``(B, N, D)`` is also accepted everywhere (every bag then has ``N`` instances). The default
    ``DataLoader`` collation keeps the type, so a dataset can return ``(Bags(features, length), label)``.

    Example:
        >>> bags = Bags(torch.zeros(2, 5, 3), torch.tensor([5, 2]))
        >>> instance_mask(bags).sum(dim=1).tolist()
        [5, 2]
    """

    features: Tensor
    lengths: Tensor


BagsLike = Union[Bags, Tensor]


def as_bags(x: BagsLike) -> Bags:
    """``x`` as :class:`Bags` with every length checked: one clear line for an empty bag or a bad shape."""
    if isinstance(x, Tensor):
        if x.dim() != 3:
            raise ValueError(f"A batch of bags must have shape (bags, instances, features); got {tuple(x.shape)}.")
        x = Bags(x, torch.full((x.shape[0],), x.shape[1], dtype=torch.long, device=x.device))
    elif isinstance(x, (tuple, list)) and len(x) == 2:
        x = Bags(*x)
    else:
        raise TypeError(f"Expected a (B, N, D) tensor or Bags(features, lengths); got {type(x).__name__}.")
    features, lengths = x
    if features.dim() != 3 or lengths.shape != (features.shape[0],):
        raise ValueError(f"Bags need features (B, N, D) and lengths (B,); got {tuple(features.shape)} and "
                         f"{tuple(lengths.shape)}.")
    if len(lengths) and int(lengths.min()) < 1:
        empty = torch.nonzero(lengths < 1).flatten().tolist()[:5]
        raise ValueError(f"Bag(s) {empty} of this batch are empty: every bag needs at least one instance; drop "
                         "empty bags from the dataset.")
    if len(lengths) and int(lengths.max()) > features.shape[1]:
        raise ValueError(f"A bag length ({int(lengths.max())}) exceeds the padded size {features.shape[1]}.")
    return Bags(features, lengths.to(torch.long))


def instance_mask(bags: Bags) -> Tensor:
    """``(B, N_max)`` boolean mask of the real (non-padding) instances."""
    positions = torch.arange(bags.features.shape[1], device=bags.features.device)
    return positions.unsqueeze(0) < bags.lengths.to(bags.features.device).unsqueeze(1)
