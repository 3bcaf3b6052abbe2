r"""VICReg loss: variance, invariance and covariance regularisation of two views' projections.

Paper: Bardes, Ponce and LeCun, "VICReg: Variance-Invariance-Covariance Regularization for Self-Supervised
Learning", ICLR 2022 (arXiv:2105.04906). Reference code: https://github.com/facebookresearch/vicreg
(``main_vicreg.py``, ``VICReg.forward``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_ext.core.validation import check_non_negative
from lightning_ext.ssl.losses._views import Views, off_diagonal, pairs, stack_views

__all__ = ["vicreg_loss"]


def _variance(z: Tensor, eps: float) -> Tensor:
    std = torch.sqrt(z.var(dim=0) + eps)
    return F.relu(1.0 - std).mean()


def _covariance(z: Tensor) -> Tensor:
    n, d = z.shape
    z = z - z.mean(dim=0)
    cov = (z.T @ z) / (n - 1)
    return off_diagonal(cov).pow(2).sum() / d


def vicreg_loss(
    views: Views,
    invariance_weight: float = 25.0,
    variance_weight: float = 25.0,
    covariance_weight: float = 1.0,
    eps: float = 1e-4,
    gather_distributed: bool = False,
) -> Tensor:
    r"""VICReg loss of two views :math:`Z, Z' \in \mathbb{R}^{N \times D}` (paper eq. 1-6):

    .. math::
        L = \lambda\, \tfrac{1}{ND}\lVert Z - Z' \rVert_F^2
          + \mu\, \tfrac{1}{2}\big[v(Z) + v(Z')\big] + \nu\, \big[c(Z) + c(Z')\big],

    .. math::
        v(Z) = \frac{1}{D} \sum_j \max\big(0,\, 1 - \sqrt{\operatorname{Var}(Z_{:j}) + \epsilon}\big), \qquad
        c(Z) = \frac{1}{D} \sum_{i \ne j} \operatorname{Cov}(Z)_{ij}^2

    with the unbiased (``N - 1``) variance and covariance, as in the reference code (its variance term is the
    mean of the two views', ``/2`` each). Defaults :math:`\lambda = \mu = 25`, :math:`\nu = 1` are the
    paper's. With more than two views the loss is averaged over all pairs of views.

    Args:
        views: ``(V, N, D)`` or ``V >= 2`` tensors ``(N, D)``.
        invariance_weight: :math:`\lambda`.
        variance_weight: :math:`\mu`.
        covariance_weight: :math:`\nu`.
        eps: :math:`\epsilon` inside the square root.
        gather_distributed: compute on the global batch of all ranks (the reference code gathers too).

    Raises:
        ValueError: fewer than two views or a (global) batch of fewer than two samples.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> z = torch.randn(512, 8)            # std ~ 1, uncorrelated: only sampling noise remains
        >>> round(float(vicreg_loss([z, z])), 2)
        0.39
        >>> round(float(vicreg_loss([torch.zeros(512, 8), torch.zeros(512, 8)])), 4)  # collapse: 25 * (1 - 0.01)
        24.75
    """
    for name, value in (("invariance_weight", invariance_weight), ("variance_weight", variance_weight),
                        ("covariance_weight", covariance_weight)):
        check_non_negative(name, value)
    z = stack_views(views, "VICReg", min_batch=2, gather_distributed=gather_distributed)
    total = z.new_zeros(())
    for a, b in pairs(z.shape[0]):
        invariance = F.mse_loss(z[a], z[b])
        variance = 0.5 * (_variance(z[a], eps) + _variance(z[b], eps))
        covariance = _covariance(z[a]) + _covariance(z[b])
        total = total + invariance_weight * invariance + variance_weight * variance + covariance_weight * covariance
    return total / len(pairs(z.shape[0]))
