"""``BarlowTwins``: self-supervised pretraining by driving the views' cross-correlation to the identity."""

from __future__ import annotations

from typing import Union

import torch  # noqa: F401  (used by the doctest)
from torch import Tensor, nn

from lightning_ext.ssl.losses.barlow_twins import barlow_twins_loss
from lightning_ext.ssl.self_supervised import SelfSupervisedModule


class BarlowTwins(SelfSupervisedModule):
    """Barlow Twins (Zbontar et al., ICML 2021): cross-correlation of two views' projections pushed to identity.

    Paper: arXiv:2103.03230. Reference code: https://github.com/facebookresearch/barlowtwins (``main.py``);
    loss: :func:`lightning_ext.ssl.losses.barlow_twins.barlow_twins_loss`. Defaults: lambda = 5.1e-3 (paper),
    projector 2048-2048-2048 (solo-learn CIFAR). The reference code all-reduces the cross-correlation over
    ranks; ``gather_distributed=True`` (default) computes it on the global batch, with exact gradients.

    Args:
        backbone: timm model name or an ``nn.Module`` returning ``(B, F)`` features.
        lambd: weight of the off-diagonal (redundancy-reduction) term.
        scale_loss: factor on the whole loss (solo-learn uses 0.1 on CIFAR).
        proj_hidden_dim: projector hidden width.
        proj_output_dim: projector output width.
        **kwargs: the shared arguments of
            :class:`~lightning_ext.ssl.self_supervised.SelfSupervisedModule`.

    Example:
        >>> from lightning_ext.ssl.self_supervised import ConvEncoder
        >>> model = BarlowTwins(ConvEncoder(1, (8, 16)), image_size=28, proj_hidden_dim=32, proj_output_dim=16)
        >>> model(torch.zeros(2, 1, 28, 28)).shape  # backbone features, what the probe and kNN evaluate
        torch.Size([2, 16])
        >>> loss, _ = model.ssl_loss(torch.randn(2, 32, 16))  # (views, batch, projection dim)
        >>> bool(loss.isfinite())
        True
    """

    method_name = "Barlow Twins"

    def __init__(
        self,
        backbone: Union[str, nn.Module] = "resnet18",
        lambd: float = 5.1e-3,
        scale_loss: float = 1.0,
        proj_hidden_dim: int = 2048,
        proj_output_dim: int = 2048,
        **kwargs,
    ) -> None:
        if lambd < 0 or scale_loss <= 0:
            raise ValueError(f"Need `lambd` >= 0 and `scale_loss` > 0, got {lambd} and {scale_loss}.")
        super().__init__(backbone, proj_hidden_dim=proj_hidden_dim, proj_output_dim=proj_output_dim, **kwargs)
        self.lambd, self.scale_loss = lambd, scale_loss
        self.save_hyperparameters(ignore=self._hparams_ignore(backbone))

    def ssl_loss(self, z: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        loss = barlow_twins_loss(z, self.lambd, self.scale_loss, gather_distributed=self.gather_distributed)
        return loss, {}
