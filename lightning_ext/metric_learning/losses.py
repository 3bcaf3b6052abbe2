"""Pair losses for deep metric learning over the examples of a batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["contrastive_loss"]


def contrastive_loss(embeddings: Tensor, labels: Tensor, margin: float = 0.5) -> Tensor:
    r"""Contrastive loss (Hadsell, Chopra and LeCun, CVPR 2006) over every pair of a batch, ABE's metric loss.

    .. math:: L = \frac{1}{|P|}\sum_{(i,j) \in P} d_{ij}^2 + \frac{1}{|N|}\sum_{(i,j) \in N} \max(0, m - d_{ij})^2

    with :math:`d_{ij}` the Euclidean distance, :math:`P` the pairs of one class and :math:`N` the others (each
    unordered pair once; the paper sums, the means here balance the two sets). A batch without a positive or
    without a negative pair contributes only the other term.

    Example:
        >>> e = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 0.0]])
        >>> float(contrastive_loss(e, torch.tensor([0, 0, 1]), margin=0.5))
        0.0
    """
    d = torch.cdist(embeddings, embeddings)
    same = labels.unsqueeze(0) == labels.unsqueeze(1)
    upper = torch.triu(torch.ones_like(same), diagonal=1)
    pos, neg = same & upper, ~same & upper
    loss = embeddings.new_zeros(())
    if pos.any():
        loss = loss + d[pos].pow(2).mean()
    if neg.any():
        loss = loss + F.relu(margin - d[neg]).pow(2).mean()
    return loss
