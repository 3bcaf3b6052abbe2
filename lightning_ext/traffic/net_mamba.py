r"""NetMamba's network: stride embedding of packet bytes, unidirectional Mamba blocks, CLS last; MAE pretraining.

Paper: "NetMamba: Efficient Network Traffic Classification via Pre-training Unidirectional Mamba" (Wang et al.,
ICNP 2024, arXiv 2405.11449); reference code https://github.com/wangtz19/NetMamba (``src/models_net_mamba.py``,
``src/models_mamba.py``). Bytes ``(B, L)`` (scaled to [-1, 1]) are cut into ``L / stride`` tokens by a stride
convolution, a learned position embedding is added, a CLS token is **appended at the end** (a unidirectional model's
last position sees every byte), and pre-norm residual :class:`~lightning_ext.traffic.mamba.MambaBlock` s with
RMSNorm follow. Classification reads the last (CLS) position. Masked-autoencoder pretraining keeps a random
``1 - mask_ratio`` of the tokens (kept in their original order: the model is causal, official MAE shuffles), encodes
them with the CLS, and a smaller Mamba decoder predicts the ``stride`` bytes of every masked token:

.. math:: \mathcal L = \frac{\sum_i m_i \,\lVert \hat x_i - x_i \rVert^2 / s}{\sum_i m_i}

(:func:`masked_patch_mse`; ``norm_pix_loss=False`` as in NetMamba's scripts).

Example:
    >>> net = NetMamba(byte_length=64, stride=4, dim=16, depth=1, num_classes=3, decoder_dim=8, decoder_depth=1)
    >>> net(torch.randn(2, 64)).shape
    torch.Size([2, 3])
    >>> loss, pred, mask = net.mae(torch.randn(2, 64), mask_ratio=0.75, generator=torch.Generator().manual_seed(0))
    >>> pred.shape, int(mask.sum())
    (torch.Size([2, 16, 4]), 24)
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from lightning_ext.traffic.mamba import MambaBlock, RMSNorm

__all__ = ["NetMamba", "masked_patch_mse", "random_keep"]


def masked_patch_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MAE's loss: per-token mean squared error, averaged over masked tokens (``mask`` 1 = masked)."""
    per_token = (pred - target).pow(2).mean(dim=-1)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def random_keep(batch: int, n: int, keep: int, generator: Optional[torch.Generator],
                device: torch.device) -> torch.Tensor:
    """Indices ``(batch, keep)`` of kept tokens, a random subset per row, in increasing order."""
    noise = torch.rand(batch, n, generator=generator).to(device)
    return noise.argsort(dim=1)[:, :keep].sort(dim=1).values


class _Residual(nn.Module):
    def __init__(self, dim: int, d_state: int, expand: int, drop_path: float, backend: str) -> None:
        super().__init__()
        self.norm, self.mixer, self.drop_path = RMSNorm(dim), MambaBlock(dim, d_state, expand, backend=backend), drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.mixer(self.norm(x))
        if self.training and self.drop_path > 0:
            keep = torch.rand(x.shape[0], 1, 1, device=x.device) >= self.drop_path
            out = out * keep / (1 - self.drop_path)
        return x + out


class NetMamba(nn.Module):
    """NetMamba's encoder, classification head and MAE decoder (see the module docstring).

    Args:
        byte_length: bytes per flow (a multiple of ``stride``; NetMamba: 1,600 = 5 x (80 + 240)).
        stride: bytes per token (4).
        dim, depth: encoder width and Mamba blocks (256, 4 in NetMamba).
        num_classes: classes of the head.
        d_state, expand: Mamba's state size and expansion.
        decoder_dim, decoder_depth: MAE decoder (128, 2 in NetMamba).
        drop_path: stochastic depth per block.
        backend: the scan backend of :class:`~lightning_ext.traffic.mamba.MambaBlock`.
    """

    def __init__(self, byte_length: int = 1600, stride: int = 4, dim: int = 256, depth: int = 4,
                 num_classes: int = 2, d_state: int = 16, expand: int = 2, decoder_dim: int = 128,
                 decoder_depth: int = 2, drop_path: float = 0.0, backend: str = "auto") -> None:
        super().__init__()
        if byte_length % stride:
            raise ValueError(f"byte_length ({byte_length}) must be a multiple of stride ({stride}).")
        self.stride, self.n_tokens = stride, byte_length // stride
        self.patch = nn.Conv1d(1, dim, stride, stride)
        self.pos = nn.Parameter(torch.zeros(1, self.n_tokens + 1, dim))
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList(_Residual(dim, d_state, expand, drop_path, backend) for _ in range(depth))
        self.norm = RMSNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self.decoder_embed = nn.Linear(dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos = nn.Parameter(torch.zeros(1, self.n_tokens + 1, decoder_dim))
        self.decoder_blocks = nn.ModuleList(_Residual(decoder_dim, d_state, expand, 0.0, backend)
                                            for _ in range(decoder_depth))
        self.decoder_norm = RMSNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, stride)
        for p in (self.pos, self.cls, self.mask_token, self.decoder_pos):
            nn.init.normal_(p, std=0.02)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Bytes ``(B, L)`` to token embeddings ``(B, L / stride, dim)`` with positions."""
        return self.patch(x.unsqueeze(1)).transpose(1, 2) + self.pos[:, :self.n_tokens]

    def _encode(self, tokens: torch.Tensor) -> torch.Tensor:
        cls = (self.cls + self.pos[:, self.n_tokens:]).expand(tokens.shape[0], -1, -1)
        h = torch.cat([tokens, cls], dim=1)
        for block in self.blocks:
            h = block(h)
        return self.norm(h)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The CLS (last position) feature ``(B, dim)`` of bytes ``(B, L)``."""
        return self._encode(self.tokens(x))[:, -1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``(B, num_classes)``."""
        return self.head(self.features(x))

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction target ``(B, L / stride, stride)``."""
        return x.reshape(x.shape[0], self.n_tokens, self.stride)

    def mae(self, x: torch.Tensor, mask_ratio: float = 0.9,
            generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(loss, prediction (B, n, stride), mask (B, n))`` of masked-autoencoder pretraining."""
        b, n = x.shape[0], self.n_tokens
        keep = max(1, int(round(n * (1 - mask_ratio))))
        ids = random_keep(b, n, keep, generator, x.device)
        tokens = self.tokens(x)
        visible = torch.gather(tokens, 1, ids.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        latent = self.decoder_embed(self._encode(visible))
        full = self.mask_token.expand(b, n, -1).clone()
        full = full.scatter(1, ids.unsqueeze(-1).expand(-1, -1, full.shape[-1]), latent[:, :-1])
        h = torch.cat([full, latent[:, -1:]], dim=1) + self.decoder_pos
        for block in self.decoder_blocks:
            h = block(h)
        pred = self.decoder_pred(self.decoder_norm(h))[:, :-1]
        mask = torch.ones(b, n, device=x.device)
        mask.scatter_(1, ids, 0.0)
        return masked_patch_mse(pred, self.patches(x), mask), pred, mask
