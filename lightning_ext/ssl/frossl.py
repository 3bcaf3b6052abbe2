"""``FroSSL``: self-supervised pretraining by Frobenius-norm minimisation of view covariances, any number of views."""

from __future__ import annotations

from typing import Union

from torch import Tensor, nn
from typing_extensions import override

from lightning_ext.core.validation import NonNegativeFloat, PositiveInt, check_non_negative
from lightning_ext.ssl.losses.frossl import frossl_loss_terms
from lightning_ext.ssl.self_supervised import NumViews, SelfSupervisedModule


class FroSSL(SelfSupervisedModule):
    """FroSSL (Skean et al., ECCV 2024): log-Frobenius covariance regularisation plus MSE to the mean view.

    Paper: "FroSSL: Frobenius Norm Minimization for Efficient Multiview Self-Supervised Learning"
    (arXiv:2310.02903). Reference code: https://github.com/OFSkean/FroSSL (``solo/losses/frossl.py``,
    ``solo/methods/frossl.py``). The loss is :func:`lightning_ext.ssl.losses.frossl.frossl_loss`:
    ``sum_v [log ||C_v||_F^2 + w V D MSE(z_v, mean_v z_v)]`` on batch-normalised columns, with a **plus** sign
    on the log term (the repository's ``docs/WHY_FROSSL.md`` has it wrong). It needs no eigendecomposition
    and its cost is linear in the number of views, which is why the paper recommends 4 or 8 views.

    Logs ``train_regulariser`` and ``train_invariance`` (the two terms) besides the base class's metrics.
    Defaults follow the reference CIFAR config (projector 2048-2048-1024, invariance weight 1.0); the paper
    trains with LARS (lr 0.3, batch 256, warm-up cosine), here AdamW unless an ``optimizer`` is given.
    Under DDP the reference code computes the loss per device; ``gather_distributed=True`` (default) uses the
    global batch instead, so DDP trains like one process.

    Args:
        num_views: views per image (2, 4 or 8 in the paper).
        invariance_weight: ``w`` (1.0 for CIFAR/ImageNet-100, 1.4 for STL-10 in the reference configs); finite, >= 0.
        Others: see :class:`~lightning_ext.ssl.self_supervised.SelfSupervisedModule` (``backbone``, ``in_chans``,
            ``image_size``, ``augmentation``, ``num_classes``, ``optimizer``, ``scheduler``, ``seed``, ...).

    Example:
        >>> import torch
        >>> from lightning_ext.ssl.self_supervised import ConvEncoder
        >>> model = FroSSL(ConvEncoder(1, (8, 16)), num_views=4, image_size=28, proj_hidden_dim=32,
        ...                proj_output_dim=16)
        >>> loss, terms = model.ssl_loss(model._embed([torch.randn(8, 1, 28, 28)] * 4)[1])
        >>> sorted(terms)
        ['invariance', 'regulariser']
    """

    method_name = "FroSSL"

    def __init__(self, backbone: Union[str, nn.Module] = "resnet18", num_views: NumViews = 2,
                 invariance_weight: NonNegativeFloat = 1.0, proj_hidden_dim: PositiveInt = 2048,
                 proj_output_dim: PositiveInt = 1024, **kwargs) -> None:
        check_non_negative("invariance_weight", invariance_weight)
        super().__init__(backbone, num_views=num_views, proj_hidden_dim=proj_hidden_dim,
                         proj_output_dim=proj_output_dim, **kwargs)
        self.invariance_weight = invariance_weight

    @override
    def ssl_loss(self, z: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The FroSSL loss of the ``(V, N, D)`` projections and its two terms."""
        regulariser, invariance = frossl_loss_terms(z, self.invariance_weight, self.gather_distributed)
        return regulariser + invariance, {"regulariser": regulariser.detach(), "invariance": invariance.detach()}
