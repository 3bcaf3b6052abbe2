"""HCN (Yuan et al., 2022): multi-interest user vectors for coarse-grained ranking, hierarchical interest centres
and a co-interest network of long- and short-term behaviour; with a single-vector and a MIND-routing baseline.

Yuan, Xu, Chen, Zhuang, Chen, Li and Ge, *Hierarchical Multi-Interest Co-Network For Coarse-Grained Ranking*,
arXiv 2210.10547 (v1, 2022). **No official code exists, and only the abstract could be read here**: the equations
below implement the abstract's two mechanisms (a hierarchical multi-interest extraction layer that "updates users'
diverse interest centers iteratively", and a Co-Interest Network integrating long- and short-term interests) as
designed in the project's spec (``graph-and-recsys.md`` §12); they are ours, not the paper's.

- Interest centres by soft clustering (:func:`interest_routing`), ``R`` iterations of
  ``a_jk = softmax_k(⟨x_j, c_k⟩ / τ)``, ``c_k ← normalize(Σ_j a_jk x_j)`` from learned prototypes; level 1 clusters
  the projected behaviours ``W e_j`` into ``k1`` centres, level 2 clusters those into ``k2``.
- Long-term part = all but the last ``short_len`` behaviours, short-term part = the last ``short_len``; each has its
  own hierarchical extractor; the two interest sets attend to each other (one residual cross-attention block each)
  and are concatenated: ``2 k2`` interests ``u_k``.
- Coarse-ranking score ``s(u, i) = max_k ⟨u_k, v_i⟩`` (:func:`multi_interest_scores`); next-item loss: softmax
  cross-entropy over all items (``"softmax"``) or over the batch's targets (``"in_batch"``); plus
  ``redundancy_weight`` times the mean over users of ``mean_{k≠l} cos(u_k, u_l)²`` (:func:`redundancy_penalty`).

Baselines in the same module (``extractor``): ``"mean"``, a single-vector two-tower (mean of ``W e_j``), and
``"routing"``, MIND's behaviour-to-interest dynamic routing (Li et al., CIKM 2019; :func:`mind_routing`) with
``k2`` capsules, scored by the same ``max_k`` (MIND's label-aware attention with ``p → ∞``).

Example:
    >>> import torch
    >>> x, mask = torch.randn(2, 5, 8), torch.ones(2, 5, dtype=torch.bool)
    >>> interest_routing(x, mask, torch.randn(3, 8), iterations=2, tau=0.5).shape
    torch.Size([2, 3, 8])
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Sequence, get_args

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn
from torchmetrics import MeanMetric
from typing_extensions import override

from lightning_ext.core.guards import NonFiniteLoss, check_loss, check_nonfinite_policy, refuse_skip_under_ddp
from lightning_ext.core.validation import (
    NonNegativeFloat, PositiveFloat, PositiveInt, check_choice, check_non_negative, check_positive, check_positive_int,
)
from lightning_ext.recsys.metrics import RankingMetrics

#: how a user's behaviour sequence becomes interest vectors
Extractor = Literal["hcn", "routing", "mean"]
#: the next-item loss
SequenceLoss = Literal["softmax", "in_batch"]


# ------------------------------------------------------------------------------------------------ pure core
def interest_routing(x: torch.Tensor, mask: torch.Tensor, init: torch.Tensor, iterations: int,
                     tau: float) -> torch.Tensor:
    """Soft clustering of ``x (B, L, d)`` (``mask (B, L)`` marks real rows) into ``K`` unit centres ``(B, K, d)``.

    ``c`` starts at ``normalize(init)`` (``(K, d)`` or ``(B, K, d)``); each iteration
    ``a_jk = softmax_k(⟨x_j, c_k⟩ / τ)`` (masked rows get 0) and ``c_k = normalize(Σ_j a_jk x_j)``. A user with no
    real row gets zero centres.
    """
    c = F.normalize(init, dim=-1)
    if c.dim() == 2:
        c = c.expand(x.shape[0], *c.shape)
    m = mask.to(x.dtype).unsqueeze(-1)
    for _ in range(iterations):
        a = torch.softmax(torch.einsum("bld,bkd->blk", x, c) / tau, dim=-1) * m
        c = F.normalize(torch.einsum("blk,bld->bkd", a, x), dim=-1)
    return c


def squash(z: torch.Tensor) -> torch.Tensor:
    """Capsule squash ``|z|² / (1 + |z|²) · z / |z|`` along the last dimension."""
    n2 = z.pow(2).sum(-1, keepdim=True)
    return n2 / (1 + n2) * z / (n2 + 1e-9).sqrt()


def mind_routing(x: torch.Tensor, mask: torch.Tensor, bilinear: torch.Tensor, logits: torch.Tensor,
                 iterations: int) -> torch.Tensor:
    """MIND's behaviour-to-interest routing: ``(B, L, d)`` behaviours to ``(B, K, d)`` squashed capsules.

    ``û_j = S x_j`` (one shared ``bilinear`` map ``S``), routing logits ``b (L, K)`` (fixed random, asymmetric);
    each iteration ``w_jk = softmax_k(b_jk)`` (masked rows 0), ``c_k = squash(Σ_j w_jk û_j)``, then
    ``b_jk += ⟨c_k, û_j⟩``.
    """
    u = x @ bilinear.T
    b = logits[-x.shape[1]:].expand(x.shape[0], -1, -1)
    m = mask.to(x.dtype).unsqueeze(-1)
    for it in range(iterations):
        w = torch.softmax(b, dim=-1) * m
        c = squash(torch.einsum("blk,bld->bkd", w, u))
        if it < iterations - 1:
            b = b + torch.einsum("bkd,bld->blk", c, u)
    return c


def multi_interest_scores(interests: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """``s(u, i) = max_k ⟨u_k, v_i⟩``: ``(B, K, d)`` interests and ``(I, d)`` items give ``(B, I)``."""
    return torch.einsum("bkd,id->bki", interests, items).amax(1)


def next_item_loss(interests: torch.Tensor, items: torch.Tensor, target: torch.Tensor,
                   loss: SequenceLoss = "softmax") -> torch.Tensor:
    """Cross-entropy of the target item: over all items (``"softmax"``) or over the batch's targets (``"in_batch"``,
    the other rows' targets as negatives; a repeated target counts as a positive only in its own row)."""
    if loss == "softmax":
        return F.cross_entropy(multi_interest_scores(interests, items), target)
    logits = multi_interest_scores(interests, items[target])  # (B, B): row b scored against every row's target
    same = target[:, None] == target[None, :]
    logits = logits.masked_fill(same & ~torch.eye(len(target), dtype=torch.bool, device=target.device), float("-inf"))
    return F.cross_entropy(logits, torch.arange(len(target), device=target.device))


def redundancy_penalty(interests: torch.Tensor) -> torch.Tensor:
    """Mean over users of ``mean_{k≠l} cos(u_k, u_l)²`` (0 with one interest)."""
    k = interests.shape[1]
    if k < 2:
        return interests.new_zeros(())
    u = F.normalize(interests, dim=-1)
    cos2 = torch.einsum("bkd,bld->bkl", u, u).pow(2)
    off = ~torch.eye(k, dtype=torch.bool, device=u.device)
    return cos2[:, off].mean()


def mean_pairwise_cosine(interests: torch.Tensor) -> torch.Tensor:
    """Per user, the mean cosine between two different interest vectors ``(B,)`` (zero vectors count as 0)."""
    k = interests.shape[1]
    if k < 2:
        return interests.new_zeros(interests.shape[0])
    u = F.normalize(interests, dim=-1)
    cos = torch.einsum("bkd,bld->bkl", u, u)
    return cos[:, ~torch.eye(k, dtype=torch.bool, device=u.device)].mean(1)


class HierarchicalInterests(nn.Module):
    """Two levels of :func:`interest_routing`: ``W e_j`` into ``k1`` centres, those into ``k2`` centres."""

    def __init__(self, dim: int, k1: int, k2: int, iterations: int, tau: float) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim, bias=False)
        self.proto1 = nn.Parameter(torch.randn(k1, dim))
        self.proto2 = nn.Parameter(torch.randn(k2, dim))
        self.iterations, self.tau = iterations, tau

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Level-2 centres ``(B, k2, d)``."""
        c1 = interest_routing(self.proj(x), mask, self.proto1, self.iterations, self.tau)
        ones = torch.ones(c1.shape[:2], dtype=torch.bool, device=c1.device)
        return interest_routing(c1, ones & mask.any(1, keepdim=True), self.proto2, self.iterations, self.tau)


# ------------------------------------------------------------------------------------------------ Lightning
class HCN(LightningModule):
    """HCN (Yuan et al., 2022): multi-interest pre-ranking, hierarchical interest centres and long/short co-interest.

    See :mod:`lightning_ext.recsys.hcn` for the equations (ours: the paper has no code and only its abstract was
    readable). ``extractor="mean"`` is the single-vector two-tower baseline and ``"routing"`` MIND's dynamic routing
    with ``k2`` interests, trained and evaluated identically. Batches: ``(history (B, L), target (B,))`` for training
    (item ids ``1..I`` in the history, 0 = padding; 0-indexed target) and full-ranking dicts for validation and
    test, from :class:`~lightning_ext.recsys.user_sequences.UserSequenceDataModule`. Logs ``train_loss``,
    ``{val,test}_hr@K`` and ``{val,test}_ndcg@K`` (:class:`~lightning_ext.recsys.metrics.RankingMetrics`, a
    user's earlier items masked) and ``{val,test}_interest_cosine`` (mean pairwise cosine of a user's interests).

    Args:
        num_items: number of items (``None``: the DataModule's).
        max_len: history length (position embeddings).
        dim: embedding size.
        extractor: ``"hcn"``, ``"routing"`` or ``"mean"``.
        k1: level-1 centres.
        k2: level-2 centres per part (HCN; ``2 k2`` interests in all) or capsules (routing).
        iterations: clustering / routing iterations.
        short_len: the last ``short_len`` behaviours form the short-term part.
        tau: clustering temperature.
        redundancy_weight: weight of :func:`redundancy_penalty` (HCN; 0 elsewhere is the usual choice).
        loss: ``"softmax"`` (all items) or ``"in_batch"`` (the batch's targets as negatives).
        lr: Adam learning rate.
        eval_ks: ranking cut-offs.
        nonfinite_loss: ``"error"``, ``"skip"`` or ``"warn"`` (see :mod:`lightning_ext.core.guards`).

    Example:
        >>> model = HCN(num_items=30, max_len=12, dim=8, k1=4, k2=2, short_len=4)
        >>> model.interests(torch.randint(1, 31, (3, 12))).shape
        torch.Size([3, 4, 8])
    """

    def __init__(self, num_items: Optional[PositiveInt] = None, max_len: PositiveInt = 50, dim: PositiveInt = 64,
                 extractor: Extractor = "hcn", k1: PositiveInt = 8, k2: PositiveInt = 4, iterations: PositiveInt = 3,
                 short_len: PositiveInt = 10, tau: PositiveFloat = 0.1, redundancy_weight: NonNegativeFloat = 0.1,
                 loss: SequenceLoss = "softmax", lr: PositiveFloat = 1e-3, eval_ks: Sequence[PositiveInt] = (10, 50),
                 nonfinite_loss: NonFiniteLoss = "error") -> None:
        super().__init__()
        for name, value in (("max_len", max_len), ("dim", dim), ("k1", k1), ("k2", k2), ("iterations", iterations),
                            ("short_len", short_len)):
            check_positive_int(name, value)
        if num_items is not None:
            check_positive_int("num_items (or None: from the data)", num_items)
        check_choice("extractor", extractor, get_args(Extractor))
        check_choice("loss", loss, get_args(SequenceLoss))
        check_positive("tau", tau)
        check_non_negative("redundancy_weight", redundancy_weight)
        check_positive("lr", lr)
        check_nonfinite_policy(nonfinite_loss)
        if extractor == "hcn" and short_len >= max_len:
            raise ValueError(f"short_len ({short_len}) must be below max_len ({max_len}): the rest is the long-term part.")
        if extractor == "hcn" and k2 > k1:
            raise ValueError(f"k2 ({k2}) must not exceed k1 ({k1}): level 2 clusters the level-1 centres.")
        if not len(eval_ks):
            raise ValueError("eval_ks must list at least one ranking cut-off, e.g. [10, 50].")
        for k in eval_ks:
            check_positive_int("every eval_ks entry", k)
        self.save_hyperparameters()
        self.max_len, self.dim, self.extractor, self.k1, self.k2 = max_len, dim, extractor, k1, k2
        self.iterations, self.short_len, self.tau = iterations, short_len, tau
        self.redundancy_weight, self.loss_kind, self.lr, self.nonfinite_loss = redundancy_weight, loss, lr, nonfinite_loss
        self.eval_ks = tuple(eval_ks)
        self.val_metrics, self.test_metrics = RankingMetrics(self.eval_ks), RankingMetrics(self.eval_ks)
        self.val_cosine, self.test_cosine = MeanMetric(), MeanMetric()  # summed over ranks, empty ranks included
        self.item_embedding: Optional[nn.Embedding] = None
        if num_items is not None:
            self._build(num_items)

    def _build(self, num_items: int) -> None:
        self.hparams["num_items"] = self.num_items = num_items
        self.item_embedding = nn.Embedding(num_items + 1, self.dim, padding_idx=0)
        nn.init.normal_(self.item_embedding.weight, std=0.1)
        with torch.no_grad():
            self.item_embedding.weight[0].zero_()
        self.position = nn.Embedding(self.max_len, self.dim)
        nn.init.normal_(self.position.weight, std=0.01)
        if self.extractor == "hcn":
            self.long_term = HierarchicalInterests(self.dim, self.k1, self.k2, self.iterations, self.tau)
            self.short_term = HierarchicalInterests(self.dim, self.k1, self.k2, self.iterations, self.tau)
            self.long_from_short = nn.MultiheadAttention(self.dim, 1, batch_first=True)
            self.short_from_long = nn.MultiheadAttention(self.dim, 1, batch_first=True)
        elif self.extractor == "routing":
            self.bilinear = nn.Parameter(torch.randn(self.dim, self.dim) / self.dim ** 0.5)
            self.register_buffer("routing_logits", torch.randn(self.max_len, self.k2,
                                                               generator=torch.Generator().manual_seed(0)))
        else:
            self.proj = nn.Linear(self.dim, self.dim, bias=False)

    @override
    def setup(self, stage: str) -> None:
        """Build from the DataModule's ``num_items`` (unless built); refuse ``nonfinite_loss='skip'`` under DDP."""
        refuse_skip_under_ddp(self, self.nonfinite_loss)
        if self.item_embedding is not None:
            return
        dm = self.trainer.datamodule if self._trainer is not None else None
        if dm is None or not hasattr(dm, "num_items"):
            raise RuntimeError("HCN needs a UserSequenceDataModule (with `num_items`) as `datamodule=`, or `num_items`.")
        dm.setup(stage)
        self._build(dm.num_items)

    # -- model ---------------------------------------------------------------------------------------------
    def item_vectors(self) -> torch.Tensor:
        """The item tower ``(I, d)`` (row ``i`` is item ``i``, 0-indexed)."""
        return self.item_embedding.weight[1:]

    def interests(self, history: torch.Tensor) -> torch.Tensor:
        """A user's interest vectors ``(B, K, d)`` from ``(B, max_len)`` left-padded histories (ids ``1..I``)."""
        if history.dim() != 2 or history.shape[1] != self.max_len:
            raise ValueError(f"histories must be (B, max_len={self.max_len}) item ids, got {tuple(history.shape)}.")
        if history.is_floating_point() or (len(history) and (history.min() < 0 or history.max() > self.num_items)):
            raise ValueError(f"history ids must be integers in [0, {self.num_items}] (0 = padding, items 1..num_items).")
        mask = history > 0
        e = self.item_embedding(history) + self.position.weight
        if self.extractor == "mean":
            h = self.proj(e) * mask.unsqueeze(-1)
            return (h.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)).unsqueeze(1)
        if self.extractor == "routing":
            return mind_routing(e, mask, self.bilinear, self.routing_logits, self.iterations)
        recent = torch.arange(self.max_len, device=history.device) >= self.max_len - self.short_len
        long_mask, short_mask = mask & ~recent, mask & recent
        long, short = self.long_term(e, long_mask), self.short_term(e, short_mask)
        has_long = long_mask.any(1).to(e.dtype)[:, None, None]
        long = long + self.long_from_short(long, short, short, need_weights=False)[0]
        short = short + has_long * self.short_from_long(short, long, long, need_weights=False)[0]
        return torch.cat([long, short], 1)

    @override
    def forward(self, history: torch.Tensor) -> torch.Tensor:
        """Scores ``(B, I)`` of every item (``max_k ⟨u_k, v_i⟩``)."""
        return multi_interest_scores(self.interests(history), self.item_vectors())

    def training_loss(self, history: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"loss", "next_item", "redundancy"}`` of one batch."""
        u = self.interests(history)
        main = next_item_loss(u, self.item_vectors(), target, self.loss_kind)
        red = redundancy_penalty(u) if self.redundancy_weight else u.new_zeros(())
        return {"loss": main + self.redundancy_weight * red, "next_item": main, "redundancy": red}

    # -- steps -----------------------------------------------------------------------------------------------
    @override
    def training_step(self, batch: Any, batch_idx: int) -> Optional[torch.Tensor]:
        """Next-item loss (+ redundancy) of ``(history, target)``; ``None`` when a non-finite step is skipped."""
        if not isinstance(batch, (list, tuple)) or len(batch) != 2:
            raise ValueError("HCN trains on (history (B, max_len), target (B,)) batches (UserSequenceDataModule).")
        history, target = batch
        if len(target) and (target.min() < 0 or target.max() >= self.num_items):
            raise ValueError(f"targets must be 0-indexed items in [0, {self.num_items}).")
        parts = self.training_loss(history, target)
        if not check_loss(self, parts["loss"], self.nonfinite_loss, batch):
            return None
        self.log("train_loss", parts["loss"], prog_bar=True, batch_size=len(target))
        self.log("train_redundancy", parts["redundancy"], on_step=False, on_epoch=True, batch_size=len(target))
        return parts["loss"]

    def _eval_step(self, batch: dict, metrics: RankingMetrics, cosine: MeanMetric) -> None:
        u = self.interests(batch["history"])
        metrics.update(multi_interest_scores(u, self.item_vectors()), batch["target"], batch["exclude"], copy=False)
        cosine.update(mean_pairwise_cosine(u).detach())

    def _log_eval(self, metrics: RankingMetrics, cosine: MeanMetric, stage: str) -> None:
        for name, value in metrics.compute().items():
            self.log(f"{stage}_{name.replace('recall', 'hr')}", value, prog_bar=name == f"recall@{self.eval_ks[-1]}")
        metrics.reset()
        if self.extractor != "mean":
            self.log(f"{stage}_interest_cosine", cosine.compute())
        cosine.reset()

    @override
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Accumulate HR@K / NDCG@K of one user batch."""
        self._eval_step(batch, self.val_metrics, self.val_cosine)

    @override
    def on_validation_epoch_end(self) -> None:
        """Log ``val_hr@K``, ``val_ndcg@K`` and ``val_interest_cosine``."""
        self._log_eval(self.val_metrics, self.val_cosine, "val")

    @override
    def test_step(self, batch: dict, batch_idx: int) -> None:
        """Accumulate HR@K / NDCG@K of one user batch."""
        self._eval_step(batch, self.test_metrics, self.test_cosine)

    @override
    def on_test_epoch_end(self) -> None:
        """Log ``test_hr@K``, ``test_ndcg@K`` and ``test_interest_cosine``."""
        self._log_eval(self.test_metrics, self.test_cosine, "test")

    @override
    def configure_optimizers(self) -> Any:
        """Adam with ``lr``."""
        return torch.optim.Adam(self.parameters(), lr=self.lr)
