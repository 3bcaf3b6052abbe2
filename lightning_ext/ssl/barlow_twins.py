"""``BarlowTwins``: self-supervised pretraining by driving the views' cross-correlation to the identity."""

from __future__ import annotations

from typing import Union

from torch import Tensor, nn
from typing_extensions import override

from lightning_ext.core.validation import (
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    check_non_negative,
    check_positive,
)
from lightning_ext.ssl.losses.barlow_twins import barlow_twins_loss
from lightning_ext.ssl.self_supervised import SelfSupervisedModule


class BarlowTwins(SelfSupervisedModule):
    """Barlow Twins (Zbontar et al., ICML 2021): cross-correlation of two views' projections pushed to identity.

    Paper: arXiv:2103.03230. Reference code: https://github.com/facebookresearch/barlowtwins (``main.py``);
    loss: :func:`lightning_ext.ssl.losses.barlow_twins.barlow_twins_loss`. Defaults: off-diagonal weight
    lambda = 5.1e-3 (paper), projector 2048-2048-2048 (solo-learn CIFAR). The reference code all-reduces the
    cross-correlation over ranks; ``gather_distributed=True`` (default) computes it on the global batch, with
    exact gradients.

    Args:
        off_diagonal_weight: lambda, weight of the off-diagonal (redundancy-reduction) term; finite, >= 0.
        scale_loss: factor on the whole loss (solo-learn uses 0.1 on CIFAR); finite, > 0.
        Others: see :class:`~lightning_ext.ssl.self_supervised.SelfSupervisedModule`.

    Example:
        >>> import torch
        >>> from lightning_ext.ssl.self_supervised import ConvEncoder
        >>> model = BarlowTwins(ConvEncoder(1, (8, 16)), image_size=8, proj_hidden_dim=32, proj_output_dim=16)
        >>> round(float(model.ssl_loss(torch.zeros(2, 8, 16))[0]), 3)  # collapsed: every diagonal term costs 1
        16.0
    """

    method_name = "Barlow Twins"

    def __init__(self, backbone: Union[str, nn.Module] = "resnet18", off_diagonal_weight: NonNegativeFloat = 5.1e-3,
                 scale_loss: PositiveFloat = 1.0, proj_hidden_dim: PositiveInt = 2048,
                 proj_output_dim: PositiveInt = 2048, **kwargs) -> None:
        check_non_negative("off_diagonal_weight", off_diagonal_weight)
        check_positive("scale_loss", scale_loss)
        super().__init__(backbone, proj_hidden_dim=proj_hidden_dim, proj_output_dim=proj_output_dim, **kwargs)
        self.off_diagonal_weight, self.scale_loss = off_diagonal_weight, scale_loss

    @override
    def ssl_loss(self, z: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The Barlow Twins loss of the ``(V, N, D)`` projections."""
        loss = barlow_twins_loss(z, self.off_diagonal_weight, self.scale_loss,
                                 gather_distributed=self.gather_distributed)
        return loss, {}
