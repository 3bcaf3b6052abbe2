"""Nyström self-attention (Nyströmformer), the attention TransMIL uses, with an exact-attention switch."""

from __future__ import annotations

from typing import Literal, Optional

import torch
from torch import Tensor, nn

from lightning_ext.core.validation import check_choice, check_fraction, check_positive_int

__all__ = ["NystromAttention", "iterative_pinv", "segment_means"]


def iterative_pinv(a: Tensor, iterations: int = 6) -> Tensor:
    r"""Moore-Penrose pseudo-inverse of each matrix in ``a`` (``(..., m, m)``) by the Nyströmformer's iteration.

    .. math:: Z_0 = A^\top / (\lVert A \rVert_1 \lVert A \rVert_\infty), \quad
              Z_{j+1} = \tfrac14 Z_j (13 I - A Z_j (15 I - A Z_j (7 I - A Z_j)))

    Each matrix is scaled by its own norms (the reference code takes the maxima over the whole batch, so a bag's
    output depended on the other bags in its batch; both start inside the iteration's region of convergence).

    Example:
        >>> a = torch.softmax(torch.randn(2, 4, 4), dim=-1)
        >>> torch.allclose(iterative_pinv(a, 30) @ a, torch.eye(4).expand(2, 4, 4), atol=1e-3)
        True
    """
    abs_a = a.abs()
    col = abs_a.sum(dim=-2).amax(dim=-1, keepdim=True)  # ||A||_1: the largest column sum
    row = abs_a.sum(dim=-1).amax(dim=-1, keepdim=True)  # ||A||_inf: the largest row sum
    z = a.transpose(-1, -2) / (col * row).unsqueeze(-1)
    eye = torch.eye(a.shape[-1], device=a.device, dtype=a.dtype)
    for _ in range(iterations):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


def segment_means(t: Tensor, landmarks: int) -> Tensor:
    """Means of ``landmarks`` contiguous, near-equal segments of the sequence axis (-2) of ``t``.

    Equal to the reference code's segment means when ``landmarks`` divides the length; otherwise the segments
    differ in length by at most one token, where the reference code pads the sequence with zero tokens at the
    front (which then take part in the attention). With fewer tokens than landmarks every token is a landmark.
    """
    n = t.shape[-2]
    m = min(landmarks, n)
    lead = t.shape[:-2]
    flat = t.reshape(-1, n, t.shape[-1]).transpose(1, 2)  # (B*, d, n)
    pooled = torch.nn.functional.adaptive_avg_pool1d(flat, m)
    return pooled.transpose(1, 2).reshape(*lead, m, t.shape[-1])


class NystromAttention(nn.Module):
    r"""Multi-head self-attention approximated with Nyström landmarks (Xiong et al., AAAI 2021).

    Paper: "Nyströmformer: A Nyström-Based Algorithm for Approximating Self-Attention", arXiv 2102.03902.
    Reference code: https://github.com/lucidrains/nystrom-attention (the package TransMIL imports).

    With queries :math:`Q`, keys :math:`K` and landmark means :math:`\tilde Q, \tilde K` (``num_landmarks``
    segment means of the sequence):

    .. math:: \hat S V = \mathrm{softmax}(Q \tilde K^\top / \sqrt d)\,
              \mathrm{softmax}(\tilde Q \tilde K^\top / \sqrt d)^{+}\, \mathrm{softmax}(\tilde Q K^\top / \sqrt d)\, V

    plus, with ``residual=True``, a depthwise convolution of :math:`V` along the sequence (kernel
    ``residual_conv_kernel``, one per head). ``attention="exact"`` computes :math:`\mathrm{softmax}(QK^\top/\sqrt d)V`
    instead (with the same residual), the right choice for short sequences. Costs :math:`O(n m)` instead of
    :math:`O(n^2)`. See :func:`segment_means` and :func:`iterative_pinv` for where this differs from the
    reference code.

    Args:
        dim: token dimension.
        heads: attention heads.
        dim_head: dimension per head (TransMIL: ``dim // 8``).
        num_landmarks: landmarks :math:`m` (TransMIL: ``dim // 2``).
        pinv_iterations: iterations of :func:`iterative_pinv` (6, as recommended by the paper).
        residual: add the depthwise-conv residual of the values.
        residual_conv_kernel: its kernel size along the sequence (odd).
        dropout: dropout after the output projection.
        attention: ``"nystrom"`` or ``"exact"``.

    Example:
        >>> attn = NystromAttention(dim=32, heads=4, dim_head=8, num_landmarks=8)
        >>> attn(torch.randn(2, 50, 32)).shape
        torch.Size([2, 50, 32])
    """

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, num_landmarks: int = 256,
                 pinv_iterations: int = 6, residual: bool = True, residual_conv_kernel: int = 33,
                 dropout: float = 0.0, attention: Literal["nystrom", "exact"] = "nystrom") -> None:
        super().__init__()
        for name, value in (("dim", dim), ("heads", heads), ("dim_head", dim_head), ("num_landmarks", num_landmarks),
                            ("pinv_iterations", pinv_iterations), ("residual_conv_kernel", residual_conv_kernel)):
            check_positive_int(name, value)
        if residual_conv_kernel % 2 == 0:
            raise ValueError(f"residual_conv_kernel must be odd (a centred kernel), got {residual_conv_kernel}.")
        check_fraction("dropout", dropout)
        check_choice("attention", attention, ("nystrom", "exact"))
        self.heads, self.dim_head, self.num_landmarks = heads, dim_head, num_landmarks
        self.pinv_iterations, self.attention = pinv_iterations, attention
        self.scale = dim_head ** -0.5
        inner = heads * dim_head
        self.to_qkv = nn.Linear(dim, inner * 3, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))
        self.res_conv = (nn.Conv2d(heads, heads, (residual_conv_kernel, 1), padding=(residual_conv_kernel // 2, 0),
                                   groups=heads, bias=False) if residual else None)

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """Attend over the tokens of ``x`` (``(B, n, dim)``); returns ``(B, n, dim)``.

        ``mask`` (``(B, n)``, ``True`` = real token; exact attention only) hides the other tokens from every
        query and zeroes their values before the residual convolution, so each sequence is attended as if it
        ended at its last real token (outputs at hidden positions are meaningless).
        """
        b, n, _ = x.shape
        q, k, v = self.to_qkv(x).reshape(b, n, 3, self.heads, self.dim_head).permute(2, 0, 3, 1, 4)
        q = q * self.scale
        if mask is not None and self.attention != "exact":
            raise ValueError("A token mask needs attention='exact' (Nyström landmarks would mix padding in).")
        if self.attention == "exact":
            scores = q @ k.transpose(-1, -2)
            if mask is not None:
                scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
                v = v * mask[:, None, :, None].to(v.dtype)
            out = torch.softmax(scores, dim=-1) @ v
        else:
            q_l, k_l = segment_means(q, self.num_landmarks), segment_means(k, self.num_landmarks)
            attn1 = torch.softmax(q @ k_l.transpose(-1, -2), dim=-1)
            attn2 = torch.softmax(q_l @ k_l.transpose(-1, -2), dim=-1)
            attn3 = torch.softmax(q_l @ k.transpose(-1, -2), dim=-1)
            out = (attn1 @ iterative_pinv(attn2, self.pinv_iterations)) @ (attn3 @ v)
        if self.res_conv is not None:
            out = out + self.res_conv(v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, self.heads * self.dim_head))
