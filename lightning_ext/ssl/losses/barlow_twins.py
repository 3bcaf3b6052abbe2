r"""Barlow Twins loss: drive the cross-correlation matrix of two views' projections to the identity.

Paper: Zbontar, Jing, Misra, LeCun and Deny, "Barlow Twins: Self-Supervised Learning via Redundancy
Reduction", ICML 2021 (arXiv:2103.03230). Reference code: https://github.com/facebookresearch/barlowtwins
(``main.py``, ``BarlowTwins.forward``).
"""

from __future__ import annotations

from torch import Tensor

from lightning_ext.core.validation import check_non_negative, check_positive
from lightning_ext.ssl.losses._views import Views, off_diagonal, pairs, stack_views

__all__ = ["barlow_twins_loss"]


def _standardise(z: Tensor, eps: float) -> Tensor:
    # BatchNorm1d(affine=False) in training mode: biased variance over the batch
    return (z - z.mean(dim=0)) / (z.var(dim=0, unbiased=False) + eps).sqrt()


def barlow_twins_loss(
    views: Views, off_diagonal_weight: float = 5.1e-3, scale: float = 1.0, eps: float = 1e-5,
    gather_distributed: bool = False,
) -> Tensor:
    r"""Barlow Twins loss of two views (paper eq. 1-2):

    .. math::
        \mathcal{C}_{ij} = \frac{1}{N} \sum_n \hat z_{n,i}\, \hat z'_{n,j}, \qquad
        L = s \Big[ \sum_i (1 - \mathcal{C}_{ii})^2 + \lambda \sum_i \sum_{j \ne i} \mathcal{C}_{ij}^2 \Big]

    where :math:`\hat z` is each feature standardised over the batch (the reference code's
    ``BatchNorm1d(affine=False)``, biased variance, ``eps = 1e-5``; under DDP it all-reduces
    :math:`\mathcal{C}` over the global batch, which ``gather_distributed=True`` reproduces). The paper's
    :math:`\lambda = 5.1 \times 10^{-3}`; solo-learn also scales the loss (``scale_loss = 0.1`` on CIFAR).
    With more than two views the loss is averaged over all pairs.

    Args:
        views: ``(V, N, D)`` or ``V >= 2`` tensors ``(N, D)``.
        off_diagonal_weight: :math:`\lambda`, weight of the redundancy-reduction (off-diagonal) term.
        scale: :math:`s`, a factor on the whole loss.
        eps: added to the variance before standardising.
        gather_distributed: compute on the global batch of all ranks.

    Raises:
        ValueError: fewer than two views or a (global) batch of fewer than two samples.

    Example:
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> z = torch.randn(4096, 4)
        >>> round(float(barlow_twins_loss([z, z])), 3)       # C ~ identity
        0.0
        >>> round(float(barlow_twins_loss([z, torch.randn(4096, 4)])), 1)   # unrelated views: diagonal ~ 0
        4.0
    """
    check_non_negative("off_diagonal_weight", off_diagonal_weight)
    check_positive("scale", scale)
    z = stack_views(views, "BarlowTwins", min_batch=2, gather_distributed=gather_distributed)
    n = z.shape[1]
    total = z.new_zeros(())
    for a, b in pairs(z.shape[0]):
        c = _standardise(z[a], eps).T @ _standardise(z[b], eps) / n
        on_diag = (c.diagonal() - 1).pow(2).sum()
        off_diag = off_diagonal(c).pow(2).sum()
        total = total + scale * (on_diag + off_diagonal_weight * off_diag)
    return total / len(pairs(z.shape[0]))
