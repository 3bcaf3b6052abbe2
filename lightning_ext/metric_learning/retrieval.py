"""Retrieval Recall@K, the deep-metric-learning evaluation on classes unseen in training."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["recall_at_k"]


@torch.no_grad()
def recall_at_k(embeddings: Tensor, labels: Tensor, ks: Sequence[int] = (1, 2, 4, 8),
                chunk: int = 1024) -> dict[int, float]:
    r"""Recall@K of retrieval by cosine similarity: the share of queries whose ``K`` nearest other items hold at
    least one item of the query's class (every item is a query; the gallery is the rest of the set), as in the
    DML benchmarks (Song et al., 2016; ABE's tables).

    Computed in chunks of queries, so 10,000 items need no 10,000 x 10,000 matrix at once.

    Example:
        >>> e = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
        >>> recall_at_k(e, torch.tensor([0, 0, 1, 1]), ks=(1,))
        {1: 1.0}
    """
    if len(embeddings) < 2:
        raise ValueError("Recall@K needs at least two items (a query and a gallery).")
    ks = sorted({int(k) for k in ks})
    top = min(max(ks), len(embeddings) - 1)
    e = F.normalize(embeddings.float(), dim=-1)
    hits = {k: 0 for k in ks}
    for start in range(0, len(e), chunk):
        sim = e[start:start + chunk] @ e.T
        rows = torch.arange(sim.shape[0], device=e.device)
        sim[rows, rows + start] = float("-inf")  # a query does not retrieve itself
        nn_idx = sim.topk(top, dim=1).indices
        match = labels[nn_idx] == labels[start:start + chunk].unsqueeze(1)
        for k in ks:
            hits[k] += int(match[:, :k].any(dim=1).sum())
    return {k: hits[k] / len(e) for k in ks}
