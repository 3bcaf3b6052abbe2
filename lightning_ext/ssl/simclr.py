"""``SimCLR``: contrastive self-supervised pretraining with the NT-Xent loss and global-batch negatives."""

from __future__ import annotations

from typing import Union

from torch import Tensor, nn
from typing_extensions import override

from lightning_ext.core.validation import PositiveFloat, PositiveInt, check_positive
from lightning_ext.ssl.losses.simclr import simclr_loss
from lightning_ext.ssl.self_supervised import SelfSupervisedModule


class SimCLR(SelfSupervisedModule):
    """SimCLR (Chen et al., ICML 2020): NT-Xent between views, negatives from the whole (global) batch.

    Paper: arXiv:2002.05709. Reference code: https://github.com/google-research/simclr; loss:
    :func:`lightning_ext.ssl.losses.simclr.simclr_loss` (multi-view form: every other view of the same image is
    a positive). Defaults: temperature 0.1 and a 2-layer projector 2048-256 (solo-learn's CIFAR setting
    uses temperature 0.2). Under DDP, ``gather_distributed=True`` (default) contrasts each rank's anchors
    with the projections of all ranks, with exact gradients (bolts#179 never gathered; lightly#1176 used
    wrong labels after gathering).

    Args:
        temperature: softmax temperature tau (finite, > 0).
        proj_layers: linear layers in the projector (2 in the paper).
        Others: see :class:`~lightning_ext.ssl.self_supervised.SelfSupervisedModule` (``backbone``,
            ``image_size``, the projector's widths, ``augmentation``, ``num_classes``, ``optimizer``, ``seed``...).

    Example:
        >>> import torch
        >>> from lightning_ext.ssl.self_supervised import ConvEncoder
        >>> model = SimCLR(ConvEncoder(1, (8, 16)), image_size=28, proj_hidden_dim=32, proj_output_dim=16)
        >>> z = torch.randn(2, 32, 16)  # (views, batch, projection dim)
        >>> bool(model.ssl_loss(z[[0, 0]])[0] < model.ssl_loss(z)[0])  # identical views score lower
        True
    """

    method_name = "SimCLR"

    def __init__(self, backbone: Union[str, nn.Module] = "resnet18", temperature: PositiveFloat = 0.1,
                 proj_hidden_dim: PositiveInt = 2048, proj_output_dim: PositiveInt = 256,
                 proj_layers: PositiveInt = 2, **kwargs) -> None:
        check_positive("temperature", temperature)
        super().__init__(backbone, proj_hidden_dim=proj_hidden_dim, proj_output_dim=proj_output_dim,
                         proj_layers=proj_layers, **kwargs)
        self.temperature = temperature

    @override
    def ssl_loss(self, z: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """NT-Xent of the ``(V, N, D)`` projections."""
        return simclr_loss(z, self.temperature, gather_distributed=self.gather_distributed), {}
