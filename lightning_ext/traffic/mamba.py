r"""``MambaBlock``: the Mamba (S6) mixer with a pure-PyTorch selective scan, and mamba-ssm's CUDA kernel when present.

Paper: "Mamba: Linear-Time Sequence Modeling with Selective State Spaces" (Gu and Dao, 2023, arXiv 2312.00752);
reference code https://github.com/state-spaces/mamba (``mamba_ssm/modules/mamba_simple.py``,
``mamba_ssm/ops/selective_scan_interface.py::selective_scan_ref``). NetMamba (arXiv 2405.11449) stacks these blocks
unidirectionally. mamba-ssm has no CPU path (it imports its CUDA extension at import time), so the scan here is
written in PyTorch: with :math:`\bar A_t = \exp(\Delta_t A)` and :math:`\bar B_t x_t = \Delta_t B_t x_t`,

.. math:: h_t = \bar A_t \odot h_{t-1} + \bar B_t x_t, \qquad y_t = C_t h_t + D \odot x_t,

computed as a Hillis-Steele parallel prefix scan over chunks of ``chunk`` steps (the pairs :math:`(\bar A, \bar B x)`
compose associatively), with the state carried between chunks; ``backend="mamba_ssm"`` (or ``"auto"`` on a CUDA
tensor when ``mamba_ssm`` imports) calls ``selective_scan_fn`` instead.

Example:
    >>> block = MambaBlock(16, d_state=4)
    >>> block(torch.randn(2, 10, 16)).shape
    torch.Size([2, 10, 16])
"""

from __future__ import annotations

import importlib.util
import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MambaBlock", "RMSNorm", "selective_scan"]


def _scan_chunk(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inclusive prefix scan of ``h_t = a_t h_{t-1} + b_t`` (h_{-1} = 0) along dim 1: returns (prod a, h)."""
    step, n = 1, a.shape[1]
    while step < n:
        b = torch.cat([b[:, :step], b[:, step:] + a[:, step:] * b[:, :-step]], dim=1)
        a = torch.cat([a[:, :step], a[:, step:] * a[:, :-step]], dim=1)
        step *= 2
    return a, b


def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   D: torch.Tensor, chunk: int = 32) -> torch.Tensor:
    """The selective scan in PyTorch: ``u, delta (B, L, Di)``, ``A (Di, N)``, ``B, C (B, L, N)``, ``D (Di,)``.

    Returns ``y (B, L, Di)``; see the module docstring for the recurrence.
    """
    batch, length, di = u.shape
    dA = torch.exp(delta.unsqueeze(-1) * A)                               # (B, L, Di, N)
    dBu = (delta * u).unsqueeze(-1) * B.unsqueeze(2)                      # (B, L, Di, N)
    h = u.new_zeros(batch, di, A.shape[1])
    ys = []
    for start in range(0, length, chunk):
        a, b = _scan_chunk(dA[:, start:start + chunk], dBu[:, start:start + chunk])
        hs = b + a * h.unsqueeze(1)                                       # carry the state into the chunk
        ys.append(torch.einsum("bldn,bln->bld", hs, C[:, start:start + chunk]))
        h = hs[:, -1]
    return torch.cat(ys, dim=1) + u * D


def _mamba_ssm_available() -> bool:
    return importlib.util.find_spec("mamba_ssm") is not None


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (Mamba's default norm): ``x / rms(x) * weight``."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class MambaBlock(nn.Module):
    """The Mamba mixer (in projection, causal depthwise conv, selective SSM, SiLU gate, out projection).

    Args:
        d_model: width of the input and output.
        d_state: SSM state size ``N`` (16 in Mamba).
        expand: inner width ``Di = expand * d_model``.
        d_conv: causal depthwise convolution width.
        dt_rank: rank of the step-size projection (``0``: ``ceil(d_model / 16)``, Mamba's "auto").
        backend: ``"torch"`` (the PyTorch scan), ``"mamba_ssm"`` (CUDA kernel; must be importable) or ``"auto"``
            (the kernel on CUDA tensors when mamba_ssm imports, the PyTorch scan otherwise).
        chunk: steps per parallel-scan chunk of the PyTorch scan.
    """

    def __init__(self, d_model: int, d_state: int = 16, expand: int = 2, d_conv: int = 4, dt_rank: int = 0,
                 backend: Literal["auto", "torch", "mamba_ssm"] = "auto", chunk: int = 32) -> None:
        super().__init__()
        if backend not in ("auto", "torch", "mamba_ssm"):
            raise ValueError(f"backend must be 'auto', 'torch' or 'mamba_ssm', got {backend!r}.")
        if backend == "mamba_ssm" and not _mamba_ssm_available():
            raise ModuleNotFoundError("backend='mamba_ssm' needs the CUDA package mamba-ssm (`pip install "
                                      "mamba-ssm` on a CUDA machine); use backend='torch' on CPU.")
        di, self.dt_rank = expand * d_model, dt_rank or math.ceil(d_model / 16)
        self.d_inner, self.d_state, self.backend, self.chunk = di, d_state, backend, chunk
        self.in_proj = nn.Linear(d_model, 2 * di, bias=False)
        self.conv1d = nn.Conv1d(di, di, d_conv, groups=di, padding=d_conv - 1)
        self.x_proj = nn.Linear(di, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, di)
        dt = torch.exp(torch.rand(di) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
        with torch.no_grad():  # Mamba's init: dt log-uniform in [1e-3, 0.1], bias = softplus^-1(dt)
            nn.init.uniform_(self.dt_proj.weight, -self.dt_rank ** -0.5, self.dt_rank ** -0.5)
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(di, 1))
        self.D = nn.Parameter(torch.ones(di))
        self.out_proj = nn.Linear(di, d_model, bias=False)

    def ssm_inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(u, delta, A, B, C, D, z)`` of the scan for ``x (B, L, d_model)`` (exposed for tests)."""
        length = x.shape[1]
        u, z = self.in_proj(x).chunk(2, dim=-1)
        u = F.silu(self.conv1d(u.transpose(1, 2))[..., :length].transpose(1, 2))
        dt, B, C = self.x_proj(u).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.softplus(self.dt_proj(dt))
        return u, delta, -torch.exp(self.A_log.float()), B, C, self.D, z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, L, d_model) -> (B, L, d_model)``; position ``t`` sees positions ``<= t`` only."""
        u, delta, A, B, C, D, z = self.ssm_inputs(x)
        use_kernel = self.backend == "mamba_ssm" or (self.backend == "auto" and x.is_cuda
                                                     and _mamba_ssm_available())
        if use_kernel:
            from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

            y = selective_scan_fn(u.transpose(1, 2).contiguous(), delta.transpose(1, 2).contiguous(), A,
                                  B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous(), D.float(),
                                  delta_softplus=False).transpose(1, 2)
        else:
            y = selective_scan(u, delta, A, B, C, D, self.chunk)
        return self.out_proj(y * F.silu(z))
