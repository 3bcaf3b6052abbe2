"""``VICReg``: self-supervised pretraining with variance, invariance and covariance regularisation."""

from __future__ import annotations

from typing import Union

from torch import Tensor, nn
from typing_extensions import override

from lightning_ext.core.validation import NonNegativeFloat, PositiveInt, check_non_negative
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
        invariance_weight: lambda (invariance), finite and >= 0.
        variance_weight: mu (variance), finite and >= 0.
        covariance_weight: nu (covariance), finite and >= 0.
        Others: see :class:`~lightning_ext.ssl.self_supervised.SelfSupervisedModule`.

    Example:
        >>> import torch
        >>> from lightning_ext.ssl.self_supervised import ConvEncoder
        >>> model = VICReg(ConvEncoder(1, (8, 16)), image_size=8, proj_hidden_dim=32, proj_output_dim=16)
        >>> feats, z = model._embed(model.make_views(torch.randn(16, 1, 8, 8)))
        >>> tuple(feats.shape), tuple(z.shape)  # (views, batch, features), (views, batch, projection dim)
        ((2, 16, 16), (2, 16, 16))
    """

    method_name = "VICReg"

    def __init__(self, backbone: Union[str, nn.Module] = "resnet18", invariance_weight: NonNegativeFloat = 25.0,
                 variance_weight: NonNegativeFloat = 25.0, covariance_weight: NonNegativeFloat = 1.0,
                 proj_hidden_dim: PositiveInt = 2048, proj_output_dim: PositiveInt = 2048, **kwargs) -> None:
        weights = dict(invariance_weight=invariance_weight, variance_weight=variance_weight,
                       covariance_weight=covariance_weight)
        for name, value in weights.items():
            check_non_negative(name, value)
        super().__init__(backbone, proj_hidden_dim=proj_hidden_dim, proj_output_dim=proj_output_dim, **kwargs)
        self.weights = weights

    @override
    def ssl_loss(self, z: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The VICReg loss of the ``(V, N, D)`` projections, averaged over pairs of views."""
        return vicreg_loss(z, gather_distributed=self.gather_distributed, **self.weights), {}
