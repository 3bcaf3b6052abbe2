"""Full-ranking Recall@K and NDCG@K with known items masked: the protocol of LightGCN, UltraGCN, LightGCL, DCCF.

For each evaluated user every item is scored; the user's known (training) items get ``-inf``; the top K are
compared with the held-out items. Recall@K = hits / |held-out|; NDCG@K with binary gains, DCG = Σ_hits
1/log2(rank+1) and IDCG over min(K, |held-out|) ideal hits; users without held-out items are skipped; the
mean is over evaluated users. Scores come in user batches, so memory is ``batch x items``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torchmetrics import Metric
from typing_extensions import override

from lightning_ext.core.validation import check_positive_int


def topk_ranking(scores: torch.Tensor, target: torch.Tensor, exclude: torch.Tensor | None,
                 ks: Sequence[int] = (20,), copy: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-user Recall@K and NDCG@K for one batch.

    Args:
        scores: ``(B, I)`` scores of every item for each user of the batch.
        target: ``(2, m)`` ``(row, item)`` pairs of held-out items.
        exclude: ``(2, n)`` ``(row, item)`` pairs of known items, masked with ``-inf`` (``None``: none).
        ks: cut-offs.
        copy: mask a copy of ``scores``; ``False`` writes the ``-inf`` mask into ``scores`` (saves a copy of a
            ``B x I`` matrix when the caller does not need it afterwards).

    Returns:
        ``recall (len(ks), B)``, ``ndcg (len(ks), B)`` and the ``(B,)`` mask of users with held-out items.

    Example:
        >>> scores = torch.tensor([[0.9, 0.8, 0.1, 0.5]])
        >>> recall, ndcg, valid = topk_ranking(scores, torch.tensor([[0], [3]]), torch.tensor([[0], [0]]), ks=[1, 2])
        >>> recall.squeeze(1).tolist(), [round(v, 4) for v in ndcg.squeeze(1).tolist()]
        ([0.0, 1.0], [0.0, 0.6309])
    """
    batch, n_items = scores.shape
    scores = scores.detach()
    if copy or scores.dtype != torch.float32:
        scores = scores.float().clone()
    if exclude is not None and exclude.numel():
        scores[exclude[0], exclude[1]] = float("-inf")
    k_max = min(max(ks), n_items)
    top = scores.topk(k_max, dim=1).indices
    # hits without a dense B x I truth matrix: look the top-k (row, item) keys up among the sorted target keys
    target_keys = torch.unique(target[0] * n_items + target[1])  # sorted, duplicates merged
    n_true = torch.bincount(target_keys // n_items, minlength=batch)
    top_keys = (torch.arange(batch, device=scores.device)[:, None] * n_items + top).reshape(-1)
    where = torch.searchsorted(target_keys, top_keys).clamp(max=max(len(target_keys) - 1, 0))
    hits = (target_keys[where] == top_keys).reshape(batch, k_max).float() if len(target_keys) else \
        torch.zeros(batch, k_max, device=scores.device)
    discount = 1.0 / torch.log2(torch.arange(2, k_max + 2, device=scores.device, dtype=torch.float32))
    ideal = torch.cat([discount.new_zeros(1), discount.cumsum(0)])
    recall, ndcg = [], []
    for k in ks:
        k = min(k, n_items)
        recall.append(hits[:, :k].sum(1) / n_true.clamp(min=1))
        dcg = (hits[:, :k] * discount[:k]).sum(1)
        ndcg.append(dcg / ideal[n_true.clamp(max=k)].clamp(min=1e-12))
    return torch.stack(recall), torch.stack(ndcg), n_true > 0


class RankingMetrics(Metric):
    """Mean full-ranking Recall@K and NDCG@K over users, accumulated over user batches (DDP: summed over ranks).

    ``update(scores, target, exclude, copy=True)`` takes one batch as in :func:`topk_ranking`; ``compute()`` returns
    ``{"recall@K": ..., "ndcg@K": ...}`` for every K.

    Args:
        ks: cut-offs, e.g. ``(10, 20, 40)``.

    Example:
        >>> m = RankingMetrics(ks=(1, 2))
        >>> m.update(torch.tensor([[0.9, 0.8, 0.1]]), torch.tensor([[0], [1]]), None)
        >>> {k: round(float(v), 4) for k, v in m.compute().items()}
        {'recall@1': 0.0, 'ndcg@1': 0.0, 'recall@2': 1.0, 'ndcg@2': 0.6309}
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, ks: Sequence[int] = (10, 20, 40), **kwargs) -> None:
        super().__init__(**kwargs)
        if not len(ks):
            raise ValueError("ks must list at least one ranking cut-off, e.g. (10, 20).")
        for k in ks:
            check_positive_int("every ks entry (a ranking cut-off)", k)
        self.ks = tuple(int(k) for k in ks)
        self.add_state("recall_sum", torch.zeros(len(ks), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("ndcg_sum", torch.zeros(len(ks), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("users", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    @override
    def update(self, scores: torch.Tensor, target: torch.Tensor, exclude: torch.Tensor | None = None,
               copy: bool = True) -> None:
        """Add one user batch (see :func:`topk_ranking`)."""
        recall, ndcg, valid = topk_ranking(scores, target, exclude, self.ks, copy=copy)
        self.recall_sum += recall[:, valid].sum(1).double()
        self.ndcg_sum += ndcg[:, valid].sum(1).double()
        self.users += valid.sum()

    @override
    def compute(self) -> dict[str, torch.Tensor]:
        """Mean Recall@K and NDCG@K over the users seen (summed over ranks first)."""
        n = self.users.clamp(min=1)
        out = {}
        for j, k in enumerate(self.ks):
            out[f"recall@{k}"] = (self.recall_sum[j] / n).float()
            out[f"ndcg@{k}"] = (self.ndcg_sum[j] / n).float()
        return out
