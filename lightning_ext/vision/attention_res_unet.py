"""The spatiotemporal clutter filter's network: a residual attention U-Net that never pools time (2D or 3D)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from typing_extensions import override

from lightning_ext.core.validation import check_choice, check_fraction, check_positive_int

__all__ = ["AttentionResUNet"]

Activation = Literal["identity", "relu", "leaky_relu"]


def _act(name: str) -> nn.Module:
    return {"identity": nn.Identity, "relu": nn.ReLU, "leaky_relu": nn.LeakyReLU}[name]()


class _Ops:
    def __init__(self, spatial_dims: int) -> None:
        self.conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
        self.norm = nn.BatchNorm3d if spatial_dims == 3 else nn.BatchNorm2d
        self.pool = (1, 2, 2) if spatial_dims == 3 else (2, 2)
        self.stride = self.pool


def _conv_block(ops: _Ops, cin: int, widths: list[int], kernel: int, act: str, dropout: float,
                momentum: float) -> nn.Sequential:
    """{conv (same) -> BN (Keras defaults: momentum 0.99 = PyTorch 0.01, eps 1e-3) -> act -> dropout} per width."""
    layers: list[nn.Module] = []
    for w in widths:
        layers += [ops.conv(cin, w, kernel, padding="same"), ops.norm(w, eps=1e-3, momentum=momentum), _act(act),
                   nn.Dropout(dropout)]
        cin = w
    return nn.Sequential(*layers)


class _AttentionGate(nn.Module):
    """x * up(sigmoid(psi(ReLU(theta(x, strided) + phi(g))))), one coefficient per position, repeated over channels."""

    def __init__(self, ops: _Ops, cx: int, cg: int) -> None:
        super().__init__()
        self.theta = ops.conv(cx, cx // 2, 3, stride=ops.stride, padding=1)
        self.phi = ops.conv(cg, cx // 2, 1)
        self.psi = ops.conv(cx // 2, 1, 1)
        self.up = nn.Upsample(scale_factor=ops.pool, mode="nearest")

    @override
    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        a = torch.sigmoid(self.psi(torch.relu(self.theta(x) + self.phi(g))))
        return x * self.up(a)


class AttentionResUNet(nn.Module):
    r"""The spatiotemporal clutter filter's network: a residual attention U-Net that never pools time (2D or 3D).

    Paper: Tabassian et al., "Deep Spatiotemporal Clutter Filtering of Transthoracic Echocardiographic Images:
    Leveraging Contextual Attention and Residual Learning" (arXiv 2401.13147); reference code (Keras)
    https://github.com/MahdiTabassian/Deep-Clutter-Filtering (``Filter3D_Lrec/Model_ClutterFilter3D.py``), written
    here from its description in PyTorch layout ``(B, C, T, H, W)``.

    Encoder level :math:`i` (:math:`n = b\,2^i`): max-pool :math:`(1, 2, 2)` before levels :math:`\ge 1` (time
    is never pooled), then two {conv 3, BN, activation, dropout} with :math:`n` and :math:`2n` filters. Decoder
    step: nearest upsampling :math:`(1, 2, 2)`, a kernel-2 conv, an attention gate on the skip
    :math:`x \odot \uparrow\sigma(\psi(\mathrm{ReLU}(\theta_{s}(x) + \phi(g))))` (:math:`g` the coarser level),
    concatenation and two convs of half the channels. Output: a 1x1 conv block, then **plus the input**
    (``input_skip``: the net predicts the negative clutter). The official activation is linear (``"identity"``):
    apart from the gates, pooling, BN and dropout the network is linear; kept as the default. ``spatial_dims=2``
    is the paper's frame-by-frame baseline (its input ``(B, C, H, W)``).

    Args:
        spatial_dims: 3 (clips ``(B, C, T, H, W)``) or 2 (frames ``(B, C, H, W)``).
        in_channels: image channels.
        base_filters: :math:`b` (16 in the paper).
        levels: encoder levels (4 in the paper; H and W must divide by ``2 ** (levels - 1)``).
        activation: ``"identity"`` (the paper), ``"relu"`` or ``"leaky_relu"``.
        attention: gate the skips (``False``: plain skips, an ablation).
        input_skip: add the input to the output (residual learning).
        dropout: dropout after every conv (0.05 in the paper).
        bn_momentum: BatchNorm momentum in PyTorch's convention (0.01 = Keras' default 0.99, the paper's).
        zero_init_output: start the output block's BN scale at 0, so with ``input_skip`` the untrained filter is the
            identity (not in the paper, whose output BN starts at scale 1 and adds unit-variance noise to the input;
            short runs converge much faster with it).

    Example:
        >>> net = AttentionResUNet(base_filters=4, levels=3)
        >>> net(torch.rand(2, 1, 5, 16, 16)).shape
        torch.Size([2, 1, 5, 16, 16])
    """

    def __init__(self, spatial_dims: Literal[2, 3] = 3, in_channels: int = 1, base_filters: int = 16, levels: int = 4,
                 activation: Activation = "identity", attention: bool = True, input_skip: bool = True,
                 dropout: float = 0.05, bn_momentum: float = 0.01, zero_init_output: bool = False) -> None:
        super().__init__()
        check_choice("spatial_dims", spatial_dims, (2, 3))
        check_positive_int("in_channels", in_channels)
        check_positive_int("base_filters", base_filters)
        check_positive_int("levels", levels)
        if levels < 2:
            raise ValueError(f"`levels` must be >= 2 (one pooling at least), got {levels}.")
        check_choice("activation", activation, ("identity", "relu", "leaky_relu"))
        check_fraction("dropout", dropout, allow_one=False)
        check_fraction("bn_momentum", bn_momentum, allow_zero=False, allow_one=False)
        ops = _Ops(spatial_dims)
        self.spatial_dims, self.levels, self.input_skip, self.attention = spatial_dims, levels, input_skip, attention
        self.pool = nn.MaxPool3d(ops.pool) if spatial_dims == 3 else nn.MaxPool2d(ops.pool)
        self.encoder = nn.ModuleList()
        cin = in_channels
        for i in range(levels):
            n = base_filters * 2 ** i
            self.encoder.append(_conv_block(ops, cin, [n, 2 * n], 3, activation, dropout, bn_momentum))
            cin = 2 * n
        self.up_convs, self.gates, self.decoder = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        c = cin
        for i in reversed(range(levels - 1)):
            cx = 2 * base_filters * 2 ** i
            self.up_convs.append(nn.Sequential(nn.Upsample(scale_factor=ops.pool, mode="nearest"),
                                               ops.conv(c, c, 2, padding="same"), _act(activation)))
            self.gates.append(_AttentionGate(ops, cx, c) if attention else nn.Identity())
            self.decoder.append(_conv_block(ops, cx + c, [c // 2, c // 2], 3, activation, dropout, bn_momentum))
            c = c // 2
        self.head = _conv_block(ops, c, [in_channels], 1, activation, 1e-4, bn_momentum)
        if zero_init_output:  # the output BN's scale at 0: the untrained filter is the identity (with input_skip)
            nn.init.zeros_(self.head[1].weight)

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The filtered input (same shape)."""
        if x.dim() != self.spatial_dims + 2:
            raise ValueError(f"AttentionResUNet(spatial_dims={self.spatial_dims}) expects "
                             f"{'(B, C, T, H, W)' if self.spatial_dims == 3 else '(B, C, H, W)'}, got {tuple(x.shape)}.")
        k = 2 ** (self.levels - 1)
        if x.shape[-1] % k or x.shape[-2] % k:
            raise ValueError(f"H and W ({x.shape[-2]}, {x.shape[-1]}) must divide by {k} (2 ** (levels - 1)).")
        skips, h = [], x
        for i, block in enumerate(self.encoder):
            if i:
                h = self.pool(h)
            h = block(h)
            skips.append(h)
        for up, gate, block, skip in zip(self.up_convs, self.gates, self.decoder, reversed(skips[:-1])):
            gated = gate(skip, h) if self.attention else skip
            h = block(torch.cat([gated, up(h)], dim=1))
        out = self.head(h)
        return x + out if self.input_skip else out
