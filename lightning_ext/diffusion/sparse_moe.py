"""DiT-MoE's sparse mixture-of-experts layer: a top-k softmax router, SwiGLU experts, a shared expert, and the
expert-level load-balancing loss (plain PyTorch)."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lightning_ext.core.distributed import world_size
from lightning_ext.core.validation import check_number, check_positive, check_positive_int

__all__ = ["SparseMoE", "SwiGLU", "moe_balance_loss"]

PAPER = "Scaling Diffusion Transformers to 16 Billion Parameters"


def moe_balance_loss(scores: torch.Tensor, topk_idx: torch.Tensor, alpha: float = 0.01,
                     sync_counts: bool = True) -> torch.Tensor:
    r"""DiT-MoE's expert-level balance loss: :math:`\alpha \sum_i (E f_i) P_i` over ``E`` routed experts.

    :math:`f_i` is the share of all (token, slot) top-k assignments that go to expert :math:`i` and :math:`P_i` the
    mean router probability of expert :math:`i` over tokens (the official ``MoEGate`` with ``seq_aux=False``,
    https://github.com/feizc/DiT-MoE ``models.py``). Uniform routing gives :math:`\alpha k / k = \alpha`; only
    :math:`P` carries a gradient (the counts are not differentiable).

    Under ``torch.distributed`` (more than one process, gradients enabled) the counts behind :math:`f_i` are summed
    over ranks (``sync_counts``; one all-reduce of ``E`` numbers), so :math:`f` is the global batch's: with DDP's
    gradient averaging over equal per-rank batches, the gradient is then exactly that of one process on the global
    batch. The official code uses each device's own counts; ``sync_counts=False`` does that.

    Args:
        scores: router probabilities ``(T, E)`` (softmax over experts) of ``T`` tokens.
        topk_idx: the experts each token was sent to, ``(T, k)``.
        alpha: the loss weight :math:`\alpha` (official 0.01).
        sync_counts: sum the assignment counts over ranks (see above).

    Example:
        >>> scores = torch.full((4, 2), 0.5)
        >>> round(float(moe_balance_loss(scores, torch.tensor([[0], [1], [0], [1]]), alpha=0.01)), 6)
        0.01
    """
    if scores.dim() != 2 or topk_idx.dim() != 2 or topk_idx.shape[0] != scores.shape[0]:
        raise ValueError(f"moe_balance_loss expects scores (T, E) and topk_idx (T, k) with the same T, got "
                         f"{tuple(scores.shape)} and {tuple(topk_idx.shape)}.")
    num_experts = scores.shape[1]
    counts = torch.bincount(topk_idx.reshape(-1), minlength=num_experts).to(scores.dtype)
    total = counts.new_tensor([topk_idx.numel()])
    if sync_counts and torch.is_grad_enabled() and world_size() > 1:
        both = torch.cat([counts, total]).detach()
        torch.distributed.all_reduce(both)  # every rank's counts and assignments (ranks may hold unequal batches)
        counts, total = both[:-1], both[-1:]
    f = counts / total
    return alpha * (num_experts * f * scores.mean(0)).sum()


class SwiGLU(nn.Module):
    r"""A SwiGLU MLP without biases, DiT-MoE's expert: :math:`W_{down}(\mathrm{SiLU}(W_{gate} x) \odot W_{up} x)`.

    Example:
        >>> SwiGLU(8, 16)(torch.randn(3, 8)).shape
        torch.Size([3, 8])
    """

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        check_positive_int("dim", dim)
        check_positive_int("hidden", hidden)
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., dim)`` in and out."""
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class SparseMoE(nn.Module):
    r"""DiT-MoE's sparse mixture-of-experts MLP: top-k softmax routing to SwiGLU experts plus a shared expert.

    Paper: "Scaling Diffusion Transformers to 16 Billion Parameters" (Fei et al., arXiv 2407.11633); reference code
    https://github.com/feizc/DiT-MoE (``models.py``: ``MoEGate``, ``SparseMoeBlock``). For a token :math:`x`:

    .. math::
        s = \mathrm{softmax}(W_g x),\quad \mathcal{K} = \mathrm{topk}(s, k),\quad
        y = \sum_{i \in \mathcal{K}} s_i\, E_i(x) + S(x)

    with routed SwiGLU experts :math:`E_i` (hidden ``expert_hidden_mult * dim``), one shared SwiGLU expert :math:`S`
    (hidden ``shared_hidden_mult * dim``; the official ``n_shared_experts = 2`` is this width multiplier, not two
    experts; 0 drops it) and a router :math:`W_g` without bias. As in the official code the top-k weights are
    **not** renormalised (``renormalize=False``: with ``k = 2`` they sum to less than 1). While training, the layer
    also returns the balance loss :func:`moe_balance_loss` (``balance_alpha``; 0 in eval mode or with
    ``balance_alpha=0``; under DDP its expert shares are the global batch's); the official code hides it in the
    gradient (``AddAuxiliaryLoss``), here the caller adds it to its loss so it can be logged.

    ``capacity_factor`` (not in the official code) caps each expert at
    :math:`\lceil c \cdot T k / E \rceil` of a batch's ``T`` tokens, earliest tokens first; an assignment beyond
    the cap contributes zero (the shared expert still applies). ``None`` (default): no cap.

    The experts each token chose in the last forward are kept in ``last_routing`` (``(..., k)``, detached) for
    :class:`~lightning_ext.diffusion.routing_stats.ExpertRoutingStats`.

    Args:
        dim: token width ``D``.
        num_experts: routed experts ``E`` (official example 8).
        top_k: experts per token ``k`` (official 2).
        expert_hidden_mult: each routed expert's hidden width over ``D`` (official ``mlp_ratio`` 4).
        shared_hidden_mult: the shared expert's hidden width over ``D`` (official 2; 0: no shared expert).
        balance_alpha: weight of the balance loss (official 0.01; 0 disables it).
        renormalize: renormalise the top-k weights to sum to 1 (official ``norm_topk_prob=False``).
        capacity_factor: optional per-expert token cap (see above).

    Example:
        >>> moe = SparseMoE(16, num_experts=4, top_k=2, expert_hidden_mult=1.5, shared_hidden_mult=1.0)
        >>> y, aux = moe(torch.randn(2, 5, 16))
        >>> y.shape, moe.last_routing.shape, bool(aux > 0)
        (torch.Size([2, 5, 16]), torch.Size([2, 5, 2]), True)
    """

    def __init__(self, dim: int, num_experts: int = 8, top_k: int = 2, expert_hidden_mult: float = 4.0,
                 shared_hidden_mult: float = 2.0, balance_alpha: float = 0.01, renormalize: bool = False,
                 capacity_factor: Optional[float] = None) -> None:
        super().__init__()
        check_positive_int("dim", dim)
        check_positive_int("num_experts", num_experts)
        check_positive_int("top_k", top_k)
        if top_k > num_experts:
            raise ValueError(f"top_k={top_k} exceeds num_experts={num_experts}; choose top_k <= num_experts.")
        check_positive("expert_hidden_mult", expert_hidden_mult)
        check_number("shared_hidden_mult (0: no shared expert)", shared_hidden_mult, low=0)
        check_number("balance_alpha", balance_alpha, low=0)
        if capacity_factor is not None:
            check_positive("capacity_factor", capacity_factor)
        self.dim, self.num_experts, self.top_k = dim, num_experts, top_k
        self.balance_alpha, self.renormalize, self.capacity_factor = balance_alpha, renormalize, capacity_factor
        hidden = max(1, int(round(expert_hidden_mult * dim)))
        self.router = nn.Parameter(torch.empty(num_experts, dim))
        nn.init.kaiming_uniform_(self.router, a=math.sqrt(5))  # as the official MoEGate
        self.experts = nn.ModuleList(SwiGLU(dim, hidden) for _ in range(num_experts))
        shared = int(round(shared_hidden_mult * dim))
        self.shared_expert = SwiGLU(dim, shared) if shared > 0 else None
        self.last_routing: Optional[torch.Tensor] = None

    def route(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router probabilities ``(T, E)``, chosen experts ``(T, k)`` and their weights ``(T, k)`` of ``(T, D)``."""
        scores = F.linear(tokens, self.router).softmax(dim=-1)
        weight, idx = torch.topk(scores, self.top_k, dim=-1)
        if self.renormalize and self.top_k > 1:
            weight = weight / (weight.sum(-1, keepdim=True) + 1e-20)
        return scores, idx, weight

    def _keep_within_capacity(self, idx: torch.Tensor) -> torch.Tensor:
        """A ``(T, k)`` mask of the assignments within each expert's capacity (earliest tokens first)."""
        if self.capacity_factor is None:
            return torch.ones_like(idx, dtype=torch.bool)
        cap = math.ceil(self.capacity_factor * idx.numel() / self.num_experts)
        onehot = F.one_hot(idx.reshape(-1), self.num_experts)  # (T*k, E) in token-major order
        position = (onehot.cumsum(0) * onehot).sum(-1)  # 1-based rank of each assignment within its expert
        return (position <= cap).view_as(idx)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(y, balance_loss)`` for ``x`` of shape ``(..., D)``."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"SparseMoE(dim={self.dim}) got tokens of width {x.shape[-1]}; set dim to the "
                             "token width.")
        tokens = x.reshape(-1, self.dim)
        scores, idx, weight = self.route(tokens)
        self.last_routing = idx.detach().view(*x.shape[:-1], self.top_k)
        weight = weight * self._keep_within_capacity(idx).to(weight.dtype)
        out = torch.zeros_like(tokens)
        flat_idx = idx.reshape(-1)
        for e, expert in enumerate(self.experts):
            rows = (flat_idx == e).nonzero(as_tuple=True)[0]
            if rows.numel() == 0:
                continue
            token_rows = rows // self.top_k
            contrib = expert(tokens[token_rows]) * weight.reshape(-1, 1)[rows]
            out = out.index_add(0, token_rows, contrib.to(out.dtype))
        if self.shared_expert is not None:
            out = out + self.shared_expert(tokens)
        if self.training and self.balance_alpha > 0:
            aux = moe_balance_loss(scores, idx, self.balance_alpha)
        else:
            aux = tokens.new_zeros(())
        return out.view_as(x), aux
