r"""FroSSL loss: log-Frobenius-norm regularisation of each view's covariance plus an MSE invariance term.

Paper: Skean, Dhakal, Jacobs and Sanchez Giraldo, "FroSSL: Frobenius Norm Minimization for Efficient
Multiview Self-Supervised Learning", ECCV 2024 (arXiv:2310.02903). Reference code:
https://github.com/OFSkean/FroSSL, ``solo/losses/frossl.py::multiview_frossl_loss_func`` (followed here).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_ext.core.validation import check_non_negative
from lightning_ext.ssl.losses._views import Views, stack_views

__all__ = ["frossl_loss", "frossl_loss_terms"]


def frossl_loss_terms(
    views: Views, invariance_weight: float = 1.0, gather_distributed: bool = False
) -> tuple[Tensor, Tensor]:
    r"""The two terms of the FroSSL loss, each summed over the views: ``(regulariser, invariance)``.

    For :math:`V` views with projections :math:`Z_v \in \mathbb{R}^{N \times D}`:

    .. math::
        \tilde Z_v = Z_v \,\mathrm{diag}(\lVert Z_{v,:d} \rVert_2)^{-1}, \qquad
        \bar Z = \frac{1}{V} \sum_v \tilde Z_v, \qquad
        C_v = \frac{\tilde Z_v^\top \tilde Z_v}{\operatorname{tr}(\tilde Z_v^\top \tilde Z_v)}

    .. math::
        L = \sum_{v=1}^{V} \Big[ \underbrace{\log \lVert C_v \rVert_F^2}_{\text{regulariser}}
            + \underbrace{w \, V D \, \tfrac{1}{ND} \lVert \tilde Z_v - \bar Z \rVert_F^2}_{\text{invariance}} \Big]

    - Normalisation is over the **batch** (each of the :math:`D` columns gets unit L2 norm), as in the
      official code (``F.normalize(z, dim=0)``; its docstring says ``dim=1``, its code does ``dim=0``).
    - The log is natural. :math:`\log \lVert C \rVert_F^2 = \log \sum_i \lambda_i^2` is minus the order-2
      matrix Rényi entropy of :math:`C` (eigenvalues :math:`\lambda_i`, summing to 1): minimising it spreads
      the spectrum and prevents collapse. The sign is **plus** in the loss; the repository's
      ``docs/WHY_FROSSL.md`` writes "MSE - log||C||_F^2", which is wrong (it would reward collapse).
    - :math:`C_v` is built from the cheaper of :math:`\tilde Z^\top \tilde Z` (:math:`D \times D`, when
      :math:`N > D`) and :math:`\tilde Z \tilde Z^\top` (:math:`N \times N`); both have the same non-zero
      eigenvalues and Frobenius norm. No eigendecomposition: :math:`O(\min(N,D)^2 \max(N,D))` per view.
    - The trace is not differentiated (the official code divides by ``trace.item()``); after column
      normalisation it equals :math:`D` (minus any all-zero columns), so this changes nothing.
    - No epsilon inside the log: :math:`\lVert C \rVert_F^2 \ge 1/\mathrm{rank}(C) > 0` unless every column
      is zero, in which case the loss is not finite and the calling module reports it.

    Args:
        views: ``(V, N, D)`` tensor or a sequence of ``V >= 2`` tensors ``(N, D)``.
        invariance_weight: :math:`w` (official configs: 1.0 for CIFAR and ImageNet-100, 1.4 for STL-10).
        gather_distributed: compute the loss on the global batch of all ranks (gradients stay exact). The
            official code computes it per device without a gather; ``False`` reproduces that.

    Returns:
        ``(regulariser, invariance)``: each a scalar summed over views; the loss is their sum.

    Raises:
        ValueError: fewer than two views, or a (global) batch of fewer than two samples.
    """
    check_non_negative("invariance_weight", invariance_weight)
    z = stack_views(views, "FroSSL", min_batch=2, gather_distributed=gather_distributed)
    num_views, n, d = z.shape
    z = torch.nn.functional.normalize(z, p=2, dim=1)  # unit norm per feature column, over the batch
    mean = z.mean(dim=0, keepdim=True)
    gram = z.transpose(1, 2) @ z if n > d else z @ z.transpose(1, 2)
    trace = gram.diagonal(dim1=1, dim2=2).sum(-1).detach()
    gram = gram / trace.clamp_min(torch.finfo(gram.dtype).tiny)[:, None, None]
    regulariser = torch.log(gram.pow(2).sum(dim=(1, 2))).sum()
    invariance = invariance_weight * num_views * d * (z - mean).pow(2).mean(dim=(1, 2)).sum()
    return regulariser, invariance


def frossl_loss(views: Views, invariance_weight: float = 1.0, gather_distributed: bool = False) -> Tensor:
    r"""FroSSL loss :math:`\sum_v \big[\log \lVert C_v \rVert_F^2 + w V D\, \mathrm{MSE}(\tilde Z_v, \bar Z)\big]`.

    See :func:`frossl_loss_terms` for the definition, the normalisation and the sign trap in the official
    documentation (Skean et al., ECCV 2024, arXiv:2310.02903).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> z = torch.randn(1000, 16)                 # isotropic 16-d projections of 1000 images
        >>> round(float(frossl_loss([z, z])) / 2, 2)  # per view: log ||C||_F^2 ~ log(1/16) = -2.77
        -2.76
        >>> collapsed = torch.randn(1000, 1).expand(1000, 16)  # all features equal: rank 1, log 1 = 0
        >>> round(float(frossl_loss([collapsed, collapsed])), 4)
        0.0
    """
    regulariser, invariance = frossl_loss_terms(views, invariance_weight, gather_distributed)
    return regulariser + invariance
