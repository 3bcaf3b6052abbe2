"""R2U-Net (recurrent residual U-Net) and the plain U-Net it is compared with, for 2D segmentation."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from lightning_ext.core.validation import check_number, check_positive_int

__all__ = ["R2UNet", "RecurrentConv", "RRCU", "UNet", "count_parameters", "matched_widths"]


def _cbr(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=True), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class RecurrentConv(nn.Module):
    r"""A recurrent convolutional layer (RCL) unrolled ``t`` steps.

    ``shared_recurrent_weights=True`` (the reference code, LeeJunHyun/Image_Segmentation ``Recurrent_block``): one
    Conv3x3-BN-ReLU :math:`f`, :math:`o_0 = f(x)`, :math:`o_k = f(x + o_{k-1})` for :math:`k = 1..t` (``t + 1``
    convolutions with one weight set). ``False`` (the paper's equation): separate feed-forward and recurrent
    kernels, :math:`o_0 = \mathrm{ReLU}(\mathrm{BN}(W_f * x))`, :math:`o_k = \mathrm{ReLU}(\mathrm{BN}(W_f * x + W_r *
    o_{k-1}))`. ``t = 0`` is a plain Conv-BN-ReLU.
    """

    def __init__(self, channels: int, t: int = 2, shared_recurrent_weights: bool = True) -> None:
        super().__init__()
        check_number("t", t, low=0, integer=True)
        self.t, self.shared = int(t), bool(shared_recurrent_weights)
        self.f = _cbr(channels, channels)
        if not self.shared and self.t > 0:
            self.w_r = nn.Conv2d(channels, channels, 3, padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        o = self.f(x)
        if self.shared:
            for _ in range(self.t):
                o = self.f(x + o)
            return o
        conv, bn, act = self.f
        feed = conv(x)
        for _ in range(self.t):
            o = act(bn(feed + self.w_r(o)))
        return o


class RRCU(nn.Module):
    r"""Recurrent residual convolutional unit: :math:`x_0 = W_{1\times1} * x`, output
    :math:`x_0 + \mathrm{RCL}(\mathrm{RCL}(x_0))`. With ``t = 0`` it is a residual block (ResU-Net's unit)."""

    def __init__(self, cin: int, cout: int, t: int = 2, shared_recurrent_weights: bool = True) -> None:
        super().__init__()
        self.proj = nn.Conv2d(cin, cout, 1)
        self.body = nn.Sequential(RecurrentConv(cout, t, shared_recurrent_weights),
                                  RecurrentConv(cout, t, shared_recurrent_weights))

    def forward(self, x: Tensor) -> Tensor:
        x0 = self.proj(x)
        return x0 + self.body(x0)


class _UNetBase(nn.Module):
    def __init__(self, in_chans: int, num_classes: int, widths: Sequence[int], block) -> None:
        super().__init__()
        check_positive_int("in_chans", in_chans)
        check_positive_int("num_classes", num_classes)
        widths = [int(w) for w in widths]
        if len(widths) < 2:
            raise ValueError(f"widths needs at least 2 levels (e.g. [8, 16, 32, 64, 128]); got {widths}.")
        for w in widths:
            check_positive_int("widths", w)
        self.widths = widths
        self.down = nn.ModuleList([block(in_chans, widths[0])] +
                                  [block(widths[i - 1], widths[i]) for i in range(1, len(widths))])
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ModuleList(nn.Sequential(nn.Upsample(scale_factor=2), _cbr(widths[i + 1], widths[i]))
                                for i in range(len(widths) - 1))
        self.merge = nn.ModuleList(block(2 * widths[i], widths[i]) for i in range(len(widths) - 1))
        self.head = nn.Conv2d(widths[0], num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        """Per-pixel logits ``(B, num_classes, H, W)``; ``H`` and ``W`` must be divisible by
        ``2 ** (len(widths) - 1)``."""
        factor = 2 ** (len(self.widths) - 1)
        if x.shape[-1] % factor or x.shape[-2] % factor:
            raise ValueError(f"Input size {tuple(x.shape[-2:])} must be divisible by {factor} (the network pools "
                             f"{len(self.widths) - 1} times); pad or crop the images, or use fewer widths.")
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else self.pool(x))
            skips.append(x)
        for i in reversed(range(len(self.widths) - 1)):
            x = self.merge[i](torch.cat([skips[i], self.up[i](x)], dim=1))
        return self.head(x)


class R2UNet(_UNetBase):
    r"""R2U-Net: a U-Net whose stages are recurrent residual units (:class:`RRCU`), Alom et al. 2018.

    Paper: "Recurrent Residual Convolutional Neural Network based on U-Net (R2U-Net) for Medical Image
    Segmentation", arXiv 1802.06955 (no official code; the de-facto reference is
    https://github.com/LeeJunHyun/Image_Segmentation, ``R2U_Net``).

    Encoder: an :class:`RRCU` per level, max-pooling between levels; decoder: upsample x2 + Conv3x3-BN-ReLU,
    concatenation with the skip, an :class:`RRCU`; a 1x1 convolution to ``num_classes`` logits. ``t = 0`` gives
    ResU-Net (residual units, no recurrence), the ablation that isolates recurrence. The reference code's widths
    are 64-128-256-512-1024; the paper's nets are far smaller.

    Example:
        >>> net = R2UNet(in_chans=1, num_classes=1, widths=[4, 8, 16], t=2)
        >>> net(torch.randn(2, 1, 16, 16)).shape
        torch.Size([2, 1, 16, 16])
    """

    def __init__(self, in_chans: int = 1, num_classes: int = 1, widths: Sequence[int] = (64, 128, 256, 512, 1024),
                 t: int = 2, shared_recurrent_weights: bool = True) -> None:
        super().__init__(in_chans, num_classes, widths,
                         lambda cin, cout: RRCU(cin, cout, t, shared_recurrent_weights))
        self.t = t


class UNet(_UNetBase):
    """The plain U-Net (Ronneberger et al., MICCAI 2015, arXiv 1505.04597) with the same topology as
    :class:`R2UNet`: two Conv3x3-BN-ReLU per stage instead of a recurrent residual unit.

    Example:
        >>> UNet(1, 1, widths=[4, 8, 16])(torch.randn(1, 1, 8, 8)).shape
        torch.Size([1, 1, 8, 8])
    """

    def __init__(self, in_chans: int = 1, num_classes: int = 1,
                 widths: Sequence[int] = (64, 128, 256, 512, 1024)) -> None:
        super().__init__(in_chans, num_classes, widths, lambda cin, cout: nn.Sequential(_cbr(cin, cout),
                                                                                         _cbr(cout, cout)))


def count_parameters(net: nn.Module) -> int:
    """Trainable parameters of ``net``."""
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


def matched_widths(reference: int, build, widths: Sequence[int]) -> list[int]:
    """``widths`` scaled by the one factor (each rounded to an integer >= 1) that brings ``build(widths)``'s
    parameter count closest to ``reference``: "the same number of parameters" for an architecture comparison.

    Example:
        >>> target = count_parameters(R2UNet(1, 1, [8, 16, 32], t=2))
        >>> w = matched_widths(target, lambda w: UNet(1, 1, w), [8, 16, 32])
        >>> abs(count_parameters(UNet(1, 1, w)) / target - 1) < 0.05
        True
    """
    best, best_gap = list(widths), None
    for step in range(25, 401):
        scale = step / 100
        cand = [max(1, round(w * scale)) for w in widths]
        gap = abs(count_parameters(build(cand)) - reference)
        if best_gap is None or gap < best_gap:
            best, best_gap = cand, gap
    return best
