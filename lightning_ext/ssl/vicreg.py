"""``VICReg``: self-supervised pretraining with variance, invariance and covariance regularisation."""

from __future__ import annotations

from typing import Union

import torch  # noqa: F401  (used by the doctest)
from torch import Tensor, nn

from lightning_ext.ssl.losses.vicreg import vicreg_loss
from lightning_ext.ssl.self_supervised import SelfSupervisedModule


class VICReg(SelfSupervisedModule):
    """VICReg (Bardes, Ponce and LeCun, ICLR 2022): invariance MSE, variance hinge, covariance decorrelation.

    Paper: arXiv:2105.04906. Reference code: https://github.com/facebookresearch/vicreg (``main_vicreg.py``);
    loss: :func:`lightning_ext.ssl.losses.vicreg.vicreg_loss`. Defaults: the paper's weights 25/25/1 and a
    2048-2048-2048 projector (solo-learn's CIFAR setting; the paper uses 8192 on ImageNet). With more than
    two views the loss is averaged over all pairs of views. The reference code gathers the embeddings of all
    ranks; so does ``gather_distributed=True`` (default), with exact gradients.

    Args:
        backbone: timm model name or an ``nn.Module`` returning ``(B, F)`` features.
        invariance_weight: lambda (invariance).
        variance_weight: mu (variance).
        covariance_weight: nu (covariance).
        proj_hidden_dim: projector hidden width.
        proj_output_dim: projector output width.
        **kwargs: the shared arguments of
            :class:`~lightning_ext.ssl.self_supervised.SelfSupervisedModule`.

    Example:
        >>> from lightning_ext.ssl.self_supervised import ConvEncoder
        >>> model = VICReg(ConvEncoder(1, (8, 16)), image_size=28, proj_hidden_dim=32, proj_output_dim=16)
        >>> model(torch.zeros(2, 1, 28, 28)).shape  # backbone features, what the probe and kNN evaluate
        torch.Size([2, 16])
        >>> loss, _ = model.ssl_loss(torch.randn(2, 32, 16))  # (views, batch, projection dim)
        >>> bool(loss.isfinite())
        True
    """

    method_name = "VICReg"

    def __init__(
        self,
        backbone: Union[str, nn.Module] = "resnet18",
        invariance_weight: float = 25.0,
        variance_weight: float = 25.0,
        covariance_weight: float = 1.0,
        proj_hidden_dim: int = 2048,
        proj_output_dim: int = 2048,
        **kwargs,
    ) -> None:
        if min(invariance_weight, variance_weight, covariance_weight) < 0:
            raise ValueError("VICReg's loss weights must be >= 0, got "
                             f"{invariance_weight}, {variance_weight}, {covariance_weight}.")
        super().__init__(backbone, proj_hidden_dim=proj_hidden_dim, proj_output_dim=proj_output_dim, **kwargs)
        self.weights = dict(invariance_weight=invariance_weight, variance_weight=variance_weight,
                            covariance_weight=covariance_weight)
        self.save_hyperparameters(ignore=self._hparams_ignore(backbone))

    def ssl_loss(self, z: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        return vicreg_loss(z, gather_distributed=self.gather_distributed, **self.weights), {}
