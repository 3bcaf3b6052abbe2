r"""SimCLR's NT-Xent loss (normalised temperature-scaled cross-entropy), for two or more views.

Paper: Chen, Kornblith, Norouzi and Hinton, "A Simple Framework for Contrastive Learning of Visual
Representations", ICML 2020 (arXiv:2002.05709). Reference code: https://github.com/google-research/simclr
(``objective.py``, ``add_contrastive_loss``). For more than two views: the multi-positive form of Khosla et al.,
"Supervised Contrastive Learning" (NeurIPS 2020), eq. 2 (the mean of the log-probabilities of the positives);
solo-learn's ``solo/losses/simclr.py`` puts the sum of the positives inside the log instead, which is the same
loss for two views and a different one for three or more.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_ext.core.distributed import rank
from lightning_ext.core.validation import check_positive
from lightning_ext.ssl.losses._views import Views, stack_views

__all__ = ["simclr_loss"]


def simclr_loss(views: Views, temperature: float = 0.1, gather_distributed: bool = False) -> Tensor:
    r"""NT-Xent over :math:`V` views of :math:`N` images (paper eq. 1, averaged over all anchors):

    .. math::
        \ell_{i} = -\frac{1}{|P(i)|} \sum_{p \in P(i)}
            \log \frac{\exp(\mathrm{sim}(z_i, z_p)/\tau)}{\sum_{k \ne i} \exp(\mathrm{sim}(z_i, z_k)/\tau)},
        \qquad L = \frac{1}{VN} \sum_i \ell_i

    where :math:`\mathrm{sim}` is the cosine similarity, :math:`P(i)` are the other :math:`V - 1` views of
    anchor :math:`i`'s image and :math:`k` runs over all :math:`VN` projections but the anchor itself. For
    :math:`V = 2` this is the paper's loss. With ``gather_distributed=True`` each rank's anchors are
    contrasted with the projections of **all** ranks (the negatives of the global batch, as in the paper's
    TPU implementation); the gather keeps gradients exact, so DDP matches one process.

    Args:
        views: ``(V, N, D)`` or ``V >= 2`` tensors ``(N, D)``.
        temperature: :math:`\tau` (paper: 0.1 for large batches, 0.5 for CIFAR-10 ablations).
        gather_distributed: use the negatives of all ranks.

    Raises:
        ValueError: fewer than two views, a (global) batch of fewer than two images (no negatives), or
            ``temperature <= 0``.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> z = torch.randn(2, 256, 32)
        >>> aligned = simclr_loss(torch.stack([z[0], z[0]]))      # positives identical
        >>> bool(aligned < simclr_loss(z))                         # lower than for unrelated "views"
        True
    """
    check_positive("temperature", temperature)
    local = stack_views(views, "SimCLR", min_batch=1)
    keys = stack_views(local, "SimCLR", min_batch=2, gather_distributed=gather_distributed)
    num_views, n, _ = local.shape
    total = keys.shape[1]
    offset = rank() * n if total != n else 0
    anchors = F.normalize(local, dim=-1).reshape(num_views * n, -1)
    keys = F.normalize(keys, dim=-1).reshape(num_views * total, -1)
    logits = anchors @ keys.T / temperature  # (V*n, V*total)
    # anchor (v, i) is key (v, offset + i); its positives are keys (v', offset + i), v' != v
    sample = torch.arange(n, device=logits.device) + offset
    key_view = torch.arange(num_views, device=logits.device).repeat_interleave(total)
    key_sample = torch.arange(total, device=logits.device).repeat(num_views)
    anchor_view = torch.arange(num_views, device=logits.device).repeat_interleave(n)
    anchor_sample = sample.repeat(num_views)
    same_sample = anchor_sample[:, None] == key_sample[None, :]
    self_mask = same_sample & (anchor_view[:, None] == key_view[None, :])
    positives = same_sample & ~self_mask
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    per_anchor = -(log_prob.masked_fill(~positives, 0.0)).sum(dim=1) / (num_views - 1)
    return per_anchor.mean()
