"""DNIS (Cheng, Shen and Huang, 2020): soft selection of embedding dimensions per frequency block, searched bi-level."""

from __future__ import annotations

from typing import Literal, Optional, Sequence, get_args

import torch
from torch import nn

from lightning_ext.core.validation import (
    PositiveInt, check_choice, check_fraction, check_number, check_positive, check_positive_int,
)

#: which entries of α are free: every (feature block, dimension block) pair, one per feature block, or one per dim block
SearchSpace = Literal["free", "feature_block", "embedding_block"]


class DNISEmbedding(nn.Module):
    """DNIS soft dimension selection: id ``i`` of frequency block ``f`` embeds as ``e_i ⊙ repeat(α[f])``, α learned then pruned.

    Cheng, Shen and Huang, *Differentiable Neural Input Search for Recommender Systems*, arXiv 2006.04466 (extended
    as AutoSrh, IEEE TKDE 2023). Reference code: github.com/Viperccc/AutoSrh (``AutoSrh/model/nas.py::Dnis``).

    Ids are ranked by descending ``frequency`` (given, e.g. training counts; ``None`` keeps id order) and cut into
    ``feature_blocks`` equal blocks (block 0 = the most frequent ids); the ``dim`` dimensions are cut into
    ``dim_blocks`` equal blocks. ``α ∈ [0, 1]^{F×K}`` (``search_space="free"``; ``"feature_block"``: one α per
    feature block; ``"embedding_block"``: one per dimension block) starts at 1 and scales the dimension blocks of
    each id's row (``normalize=True``: ``α / Σ_k α × K``). :meth:`prune` turns α into a 0/1 mask at a threshold or a
    parameter budget, folding the kept α values into the rows so the function is unchanged at that moment;
    :meth:`parameter_count` counts the embedding weights kept.

    Args:
        num_embeddings: ids.
        dim: embedding size (a multiple of ``dim_blocks``).
        frequency: occurrences per id (length ``num_embeddings``), for the frequency ranking.
        feature_blocks: F.
        dim_blocks: K.
        search_space: ``"free"``, ``"feature_block"`` or ``"embedding_block"``.
        normalize: normalise α per feature block.
        init_std: rows start as N(0, init_std²).

    Example:
        >>> emb = DNISEmbedding(6, dim=4, frequency=[1, 9, 3, 0, 5, 2], feature_blocks=2, dim_blocks=2)
        >>> emb.block.tolist()  # ids 1, 4, 2 are the frequent half
        [1, 0, 0, 1, 0, 1]
        >>> emb.parameter_count(), emb(torch.tensor([0, 1])).shape
        (24, torch.Size([2, 4]))
    """

    def __init__(self, num_embeddings: PositiveInt, dim: PositiveInt = 64, frequency: Optional[Sequence[float]] = None,
                 feature_blocks: PositiveInt = 10, dim_blocks: PositiveInt = 16, search_space: SearchSpace = "free",
                 normalize: bool = False, init_std: float = 0.01) -> None:
        super().__init__()
        check_positive_int("num_embeddings", num_embeddings)
        check_positive_int("dim", dim)
        check_positive_int("feature_blocks", feature_blocks)
        check_positive_int("dim_blocks", dim_blocks)
        check_positive("init_std", init_std)
        check_choice("search_space", search_space, get_args(SearchSpace))
        if dim % dim_blocks:
            raise ValueError(f"dim ({dim}) must be a multiple of dim_blocks ({dim_blocks}); e.g. dim_blocks={dim}.")
        if feature_blocks > num_embeddings:
            raise ValueError(f"feature_blocks ({feature_blocks}) must be at most num_embeddings ({num_embeddings}).")
        if frequency is None:
            rank = torch.arange(num_embeddings)
        else:
            freq = torch.as_tensor(frequency, dtype=torch.float64)
            if freq.shape != (num_embeddings,) or not torch.isfinite(freq).all() or (freq < 0).any():
                raise ValueError(f"frequency must hold {num_embeddings} finite counts >= 0 (one per id), got shape "
                                 f"{tuple(freq.shape)}.")
            order = torch.argsort(-freq, stable=True)
            rank = torch.empty(num_embeddings, dtype=torch.long)
            rank[order] = torch.arange(num_embeddings)
        self.num_embeddings, self.dim, self.feature_blocks, self.dim_blocks = num_embeddings, dim, feature_blocks, dim_blocks
        self.search_space, self.normalize = search_space, normalize
        self.register_buffer("block", (rank * feature_blocks) // num_embeddings)  # equal blocks of the ranking
        shape = {"free": (feature_blocks, dim_blocks), "feature_block": (feature_blocks, 1),
                 "embedding_block": (1, dim_blocks)}[search_space]
        self.alpha = nn.Parameter(torch.ones(shape))
        self.register_buffer("pruned", torch.zeros((), dtype=torch.bool))
        self.weight = nn.Parameter(torch.randn(num_embeddings, dim) * init_std)

    def scale(self) -> torch.Tensor:
        """The ``(F, K)`` dimension-block scales currently applied (α, normalised if asked; the mask once pruned)."""
        alpha = self.alpha.expand(self.feature_blocks, self.dim_blocks)
        if self.normalize and not bool(self.pruned):
            alpha = alpha / alpha.sum(1, keepdim=True).clamp(min=1e-12) * self.dim_blocks
        return alpha

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """``(*ids.shape, dim)`` rows scaled by their block's α."""
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(f"DNISEmbedding takes integer ids, got {ids.dtype}.")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_embeddings):
            raise ValueError(f"DNISEmbedding ids must lie in [0, {self.num_embeddings}), got "
                             f"[{int(ids.min())}, {int(ids.max())}].")
        per_dim = self.scale().repeat_interleave(self.dim // self.dim_blocks, dim=1)  # (F, dim)
        return self.weight[ids] * per_dim[self.block[ids]]

    def block_sizes(self) -> torch.Tensor:
        """Ids per feature block."""
        return torch.bincount(self.block, minlength=self.feature_blocks)

    def kept(self, threshold: float = 0.0) -> torch.Tensor:
        """``(F, K)`` bool: dimension blocks kept (``α > threshold``; the mask once pruned)."""
        return self.scale().detach() > threshold

    def parameter_count(self, threshold: Optional[float] = None) -> int:
        """Embedding weights kept: all before pruning (``threshold=None``), else those of α > threshold / the mask."""
        if threshold is None and not bool(self.pruned):
            return self.num_embeddings * self.dim
        kept = self.kept(0.0 if threshold is None else threshold).float()
        per_block = kept.sum(1) * (self.dim // self.dim_blocks)
        return int((per_block * self.block_sizes()).sum())

    @torch.no_grad()
    def prune(self, threshold: Optional[float] = None, budget: Optional[float] = None) -> torch.Tensor:
        """Freeze α into a 0/1 mask: keep the blocks with α > ``threshold``, or the largest α until ``budget`` (a
        share of the full embedding parameters) is reached. Kept α values are folded into the rows. Returns the
        ``(F, K)`` mask."""
        if (threshold is None) == (budget is None):
            raise ValueError("prune needs exactly one of threshold (keep α > threshold) or budget (a share in (0, 1]).")
        alpha = self.scale().detach().clone()
        if threshold is not None:
            check_number("threshold", threshold)
            mask = alpha > threshold
        else:
            check_fraction("budget", budget, allow_zero=False)
            cost = self.block_sizes()[:, None].expand_as(alpha).double() * (self.dim // self.dim_blocks)
            order = torch.argsort(alpha.flatten(), descending=True, stable=True)
            spent = torch.cumsum(cost.flatten()[order], 0)
            limit = budget * self.num_embeddings * self.dim
            mask = torch.zeros(alpha.numel(), dtype=torch.bool)
            mask[order[spent <= limit + 1e-9]] = True
            mask = mask.reshape(alpha.shape)
        folded = (alpha * mask).repeat_interleave(self.dim // self.dim_blocks, dim=1)
        self.weight.mul_(folded[self.block])
        self.alpha.data = mask.to(self.alpha.dtype)
        self.alpha.requires_grad_(False)
        self.pruned.fill_(True)
        return mask

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        alpha = state_dict.get(prefix + "alpha")
        if alpha is not None and alpha.shape != self.alpha.shape:  # a pruned checkpoint: α became the full mask
            self.alpha.data = torch.empty_like(alpha)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if bool(self.pruned):
            self.alpha.requires_grad_(False)
