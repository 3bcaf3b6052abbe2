"""Mean and max pooling of a bag's instance embeddings: the classic MIL baselines."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from lightning_ext.core.validation import check_choice, check_positive_int
from lightning_ext.mil.bags import BagsLike, as_bags, instance_mask

__all__ = ["PoolingMIL"]


class PoolingMIL(nn.Module):
    r"""Embedding-level MIL with a fixed pooling: :math:`z = \mathrm{pool}_k\, \mathrm{ReLU}(W x_k + b)`,
    logits :math:`= W_c z`, the mean- and max-pooling baselines of ABMIL's and TransMIL's tables.

    Paper: the baselines of "Attention-based Deep Multiple Instance Learning" (Ilse et al., ICML 2018,
    arXiv 1802.04712; after Wang et al. 2018, "Revisiting multiple instance neural networks"). Padding
    instances are excluded from both poolings.

    Args:
        in_features: instance feature dimension.
        num_classes: bag classes.
        dim: instance embedding dimension (the same projection as TransMIL and ABMIL).
        pooling: ``"mean"`` or ``"max"`` (per dimension, over the bag's instances).

    Example:
        >>> from lightning_ext.mil.bags import Bags
        >>> net = PoolingMIL(in_features=4, num_classes=2, dim=8, pooling="max")
        >>> net(Bags(torch.randn(2, 6, 4), torch.tensor([6, 3]))).shape
        torch.Size([2, 2])
    """

    def __init__(self, in_features: int, num_classes: int, dim: int = 512,
                 pooling: Literal["mean", "max"] = "mean") -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("num_classes", num_classes), ("dim", dim)):
            check_positive_int(name, value)
        check_choice("pooling", pooling, ("mean", "max"))
        self.in_features, self.pooling = in_features, pooling
        self.fc1 = nn.Sequential(nn.Linear(in_features, dim), nn.ReLU())
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, x: BagsLike) -> Tensor:
        """Logits ``(B, num_classes)`` of a batch of bags."""
        bags = as_bags(x)
        if bags.features.shape[-1] != self.in_features:
            raise ValueError(f"PoolingMIL was built for in_features={self.in_features} but the instances have "
                             f"{bags.features.shape[-1]} features; set in_features: {bags.features.shape[-1]}.")
        h = self.fc1(bags.features)
        mask = instance_mask(bags).unsqueeze(-1)
        if self.pooling == "mean":
            z = (h * mask).sum(dim=1) / bags.lengths.unsqueeze(-1).to(h.dtype)
        else:
            z = h.masked_fill(~mask, float("-inf")).amax(dim=1)
        return self.classifier(z)
