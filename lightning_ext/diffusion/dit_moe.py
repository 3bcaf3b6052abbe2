"""DiT-MoE: a class-conditional diffusion transformer whose MLPs are sparse mixtures of experts (or dense SwiGLU)."""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from lightning_ext.core.optional import require
from lightning_ext.core.validation import (
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    check_choice,
    check_number,
    check_positive,
    check_positive_int,
)
from lightning_ext.diffusion.sparse_moe import SparseMoE, SwiGLU

__all__ = ["DiTMoE"]


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class _Block(nn.Module):
    """A DiT block with adaLN-Zero conditioning; its MLP is a :class:`SparseMoE` or a dense :class:`SwiGLU`."""

    def __init__(self, dim: int, heads: int, mlp: nn.Module) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = mlp
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        nn.init.zeros_(self.ada[1].weight)
        nn.init.zeros_(self.ada[1].bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).chunk(6, dim=-1)
        b, n, d = x.shape
        q, k, v = self.qkv(_modulate(self.norm1(x), shift1, scale1)).view(b, n, 3, self.heads, d // self.heads) \
            .permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + gate1.unsqueeze(1) * self.proj(attn)
        h = self.mlp(_modulate(self.norm2(x), shift2, scale2))
        h, aux = h if isinstance(h, tuple) else (h, x.new_zeros(()))
        return x + gate2.unsqueeze(1) * h, aux


class DiTMoE(nn.Module):
    r"""A class-conditional diffusion transformer whose MLPs are sparse mixtures of experts (or dense SwiGLU).

    Paper: "Scaling Diffusion Transformers to 16 Billion Parameters" (Fei et al., arXiv 2407.11633); reference code
    https://github.com/feizc/DiT-MoE (``models.py``: ``DiTBlock``, ``DiT``). Patches of the image become tokens
    (diffusers' ``PatchEmbed`` with fixed 2D sin-cos positions); the timestep (diffusers' sinusoidal ``Timesteps``
    and ``TimestepEmbedding``) plus the class embedding condition every block through adaLN-Zero
    (:math:`x \leftarrow x + g \odot f(\mathrm{LN}(x)(1 + s) + b)`, the modulation zero-initialised). Each block's MLP
    is a :class:`~lightning_ext.diffusion.sparse_moe.SparseMoE` (``mlp="moe"``) or a dense SwiGLU of hidden
    ``dense_hidden_mult * D`` (``mlp="dense"``, the baseline at equal active parameters: the default MoE has two
    routed experts of ``1.5 D`` plus a shared ``1 D`` active per token, ``4 D`` in all).

    Class ``num_classes`` is the "no class" label of classifier-free guidance (its own embedding row).
    ``forward(x, t, y)`` returns ``(prediction, balance_loss)``, the balance loss summed over the MoE layers.

    Args:
        input_size: image side (square images; divisible by ``patch_size``).
        patch_size: patch side.
        in_channels: image channels (the prediction has as many).
        hidden_size: token width ``D``.
        depth: blocks.
        num_heads: attention heads (dividing ``D``).
        num_classes: classes (0: unconditional; then ``y`` is ignored).
        mlp: ``"moe"`` or ``"dense"``.
        num_experts, top_k, expert_hidden_mult, shared_hidden_mult, balance_alpha, renormalize, capacity_factor:
            the :class:`~lightning_ext.diffusion.sparse_moe.SparseMoE` of every block (``mlp="moe"``).
        dense_hidden_mult: the dense SwiGLU's hidden width over ``D`` (``mlp="dense"``).

    Example:
        >>> net = DiTMoE(input_size=8, patch_size=4, hidden_size=16, depth=1, num_heads=2, num_experts=4)
        >>> out, aux = net(torch.randn(2, 1, 8, 8), torch.tensor([3, 900]), torch.tensor([0, 10]))
        >>> out.shape, aux.shape
        (torch.Size([2, 1, 8, 8]), torch.Size([]))
    """

    def __init__(
        self,
        input_size: PositiveInt = 28,
        patch_size: PositiveInt = 4,
        in_channels: PositiveInt = 1,
        hidden_size: PositiveInt = 128,
        depth: PositiveInt = 4,
        num_heads: PositiveInt = 4,
        num_classes: int = 10,
        mlp: Literal["moe", "dense"] = "moe",
        num_experts: PositiveInt = 8,
        top_k: PositiveInt = 2,
        expert_hidden_mult: PositiveFloat = 1.5,
        shared_hidden_mult: NonNegativeFloat = 1.0,
        balance_alpha: NonNegativeFloat = 0.01,
        renormalize: bool = False,
        capacity_factor: Optional[PositiveFloat] = None,
        dense_hidden_mult: PositiveFloat = 4.0,
    ) -> None:
        super().__init__()
        embeddings = require("diffusers.models.embeddings", "DiTMoE")
        for name, value in (("input_size", input_size), ("patch_size", patch_size), ("in_channels", in_channels),
                            ("hidden_size", hidden_size), ("depth", depth), ("num_heads", num_heads)):
            check_positive_int(name, value)
        check_number("num_classes (0: unconditional)", num_classes, low=0, integer=True)
        check_choice("mlp", mlp, ("moe", "dense"))
        check_positive("dense_hidden_mult", dense_hidden_mult)
        if input_size % patch_size:
            raise ValueError(f"input_size={input_size} is not divisible by patch_size={patch_size}; choose a "
                             "patch_size that divides the image side.")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size={hidden_size} is not divisible by num_heads={num_heads}; choose "
                             "num_heads dividing hidden_size.")
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.num_classes = num_classes
        self.patch_embed = embeddings.PatchEmbed(height=input_size, width=input_size, patch_size=patch_size,
                                                 in_channels=in_channels, embed_dim=hidden_size)
        self.time_proj = embeddings.Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embed = embeddings.TimestepEmbedding(256, hidden_size)
        self.class_embed = nn.Embedding(num_classes + 1, hidden_size) if num_classes else None

        def make_mlp() -> nn.Module:
            if mlp == "dense":
                return SwiGLU(hidden_size, max(1, int(round(dense_hidden_mult * hidden_size))))
            return SparseMoE(hidden_size, num_experts, top_k, expert_hidden_mult, shared_hidden_mult,
                             balance_alpha, renormalize, capacity_factor)

        self.blocks = nn.ModuleList(_Block(hidden_size, num_heads, make_mlp()) for _ in range(depth))
        self.final_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        self.final = nn.Linear(hidden_size, patch_size * patch_size * in_channels)
        for layer in (self.final_ada[1], self.final):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def moe_layers(self) -> list[SparseMoE]:
        """The :class:`SparseMoE` layers, first block first (empty for ``mlp="dense"``)."""
        return [b.mlp for b in self.blocks if isinstance(b.mlp, SparseMoE)]

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(prediction (B, C, H, W), balance_loss)`` for noisy images ``x``, timesteps ``t`` and labels ``y``."""
        if x.dim() != 4 or tuple(x.shape[1:]) != (self.in_channels, self.input_size, self.input_size):
            raise ValueError(f"DiTMoE expects images (B, {self.in_channels}, {self.input_size}, {self.input_size}), "
                             f"got {tuple(x.shape)}; set in_channels and input_size to the data's.")
        b = x.shape[0]
        t = torch.as_tensor(t, device=x.device).reshape(-1)
        t = t.expand(b) if t.numel() == 1 else t
        c = self.time_embed(self.time_proj(t).to(x.dtype))
        if self.class_embed is not None:
            if y is None:
                y = torch.full((b,), self.num_classes, dtype=torch.long, device=x.device)
            if int(y.min()) < 0 or int(y.max()) > self.num_classes:
                raise ValueError(f"class labels must lie in 0..{self.num_classes} ({self.num_classes}: no class), "
                                 f"got {int(y.min())}..{int(y.max())}; set num_classes to the data's.")
            c = c + self.class_embed(y)
        h = self.patch_embed(x)
        aux = x.new_zeros(())
        for block in self.blocks:
            h, a = block(h, c)
            aux = aux + a
        shift, scale = self.final_ada(c).chunk(2, dim=-1)
        h = self.final(_modulate(self.final_norm(h), shift, scale))
        p, g = self.patch_size, self.input_size // self.patch_size
        out = h.view(b, g, g, p, p, self.in_channels).permute(0, 5, 1, 3, 2, 4).reshape(b, self.in_channels,
                                                                                         g * p, g * p)
        return out, aux
