"""``BiasFreeUNet``: the bias-free U-Net of Kadkhodaie et al. (no additive constant anywhere, so f(a y) = a f(y))."""

from __future__ import annotations

import torch
from torch import nn

from lightning_ext.core.validation import PositiveInt, check_number, check_positive_int

__all__ = ["BFBatchNorm2d", "BiasFreeUNet"]


class BFBatchNorm2d(nn.Module):
    r"""Bias-free batch normalisation: divide each channel by its standard deviation and multiply by a learned gain.

    Official ``BF_batchNorm`` (``code/network.py``): in training the batch's per-channel standard deviation
    :math:`s_c = \sqrt{\operatorname{Var}_{b,h,w}(x) + \epsilon}` divides the channel (no mean subtraction) and a
    running estimate (momentum 0.1) is kept; in eval the running estimate divides. There is no shift, so in eval
    mode the layer is linear and the network stays homogeneous. Gains start as ``N(0, (2/9/64)^2)`` clamped to
    [-0.025, 0.025], as in the official code.

    Args:
        num_features: channels.
        momentum: weight of the current batch in the running standard deviation.
        eps: added to the variance.
    """

    def __init__(self, num_features: int, momentum: float = 0.1, eps: float = 1e-5) -> None:
        super().__init__()
        check_positive_int("num_features", num_features)
        self.momentum, self.eps = momentum, eps
        self.register_buffer("running_sd", torch.ones(1, num_features, 1, 1))
        self.gammas = nn.Parameter((torch.randn(1, num_features, 1, 1) * (2.0 / 9.0 / 64.0)).clamp(-0.025, 0.025))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x / sd * gamma`` with the batch's sd in training (updating the running sd), the running sd in eval."""
        if self.training:
            sd = torch.sqrt(x.var(dim=(0, 2, 3), keepdim=True, unbiased=False) + self.eps)
            with torch.no_grad():
                self.running_sd.mul_(1 - self.momentum).add_(self.momentum * sd)
        else:
            sd = self.running_sd
        return x / sd * self.gammas


def _conv(cin: int, cout: int, k: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, padding=k // 2, bias=False)


class BiasFreeUNet(nn.Module):
    r"""A U-Net with no bias anywhere (convolutions, transposed convolutions, normalisation), predicting the noise.

    Paper: Kadkhodaie, Guth, Simoncelli, Mallat, "Generalization in diffusion models arises from
    geometry-adaptive harmonic representations", ICLR 2024, arXiv 2310.02557; reference code
    https://github.com/LabForComputationalVision/memorization_generalization_in_diffusion_models (``code/network.py``,
    class ``UNet``). Encoder block ``b`` has ``convs_per_block`` 3x3 convolutions of ``base_channels * 2**b``
    channels (the first convolution of block 0 without normalisation), each followed by :class:`BFBatchNorm2d` and
    ReLU, then AvgPool2d(2); the middle has ``convs_per_block`` convolutions of ``base_channels * 2**num_blocks``;
    decoder block ``b`` upsamples with a 2x2 stride-2 transposed convolution, concatenates the skip and applies
    ``convs_per_block`` convolutions (block 0 ends in a plain convolution to ``in_channels``). ReLU, average
    pooling and bias-free linear maps are positively homogeneous, so in eval mode

    .. math:: f(a y) = a f(y) \quad (a > 0), \qquad f(y) = J_f(y)\, y.

    Official defaults: 3 blocks, 64 base channels, 2 convolutions per block, convolution weights Kaiming-normal
    (fan-in, ReLU gain; ``weights_init_kaiming``). Image sides must be divisible by ``2**num_blocks``.

    Args:
        in_channels: image channels (1: grayscale).
        base_channels: channels of the first block (doubling per block).
        num_blocks: encoder (and decoder) blocks.
        convs_per_block: convolutions per encoder, middle and decoder block (at least 2, as the official code).
        kernel_size: odd kernel size of the convolutions.
        kaiming_init: initialise every (transposed) convolution Kaiming-normal, fan-in, as the official code;
            ``False`` keeps PyTorch's default initialisation.

    Example:
        >>> net = BiasFreeUNet(base_channels=4, num_blocks=2).eval()
        >>> y = torch.rand(2, 1, 28, 28)
        >>> torch.allclose(net(3.0 * y), 3.0 * net(y), atol=1e-6)
        True
    """

    def __init__(self, in_channels: PositiveInt = 1, base_channels: PositiveInt = 64, num_blocks: PositiveInt = 3,
                 convs_per_block: PositiveInt = 2, kernel_size: PositiveInt = 3, kaiming_init: bool = True) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("base_channels", base_channels),
                            ("num_blocks", num_blocks), ("kernel_size", kernel_size)):
            check_positive_int(name, value)
        check_number("convs_per_block (at least 2)", convs_per_block, low=2, integer=True)
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (same padding), got {kernel_size}; use 3.")
        self.in_channels, self.num_blocks = in_channels, num_blocks
        k, ch = kernel_size, [base_channels * 2 ** b for b in range(num_blocks + 1)]
        self.encoder = nn.ModuleList()
        for b in range(num_blocks):
            layers: list[nn.Module] = []
            for i in range(convs_per_block):
                cin = (in_channels if b == 0 else ch[b - 1]) if i == 0 else ch[b]
                layers.append(_conv(cin, ch[b], k))
                if not (b == 0 and i == 0):
                    layers.append(BFBatchNorm2d(ch[b]))
                layers.append(nn.ReLU())
            self.encoder.append(nn.Sequential(*layers))
        mid: list[nn.Module] = []
        for i in range(convs_per_block):
            mid += [_conv(ch[num_blocks - 1] if i == 0 else ch[num_blocks], ch[num_blocks], k),
                    BFBatchNorm2d(ch[num_blocks]), nn.ReLU()]
        self.mid = nn.Sequential(*mid)
        self.upsample = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for b in range(num_blocks):  # index b: the decoder block at resolution level b
            self.upsample.append(nn.ConvTranspose2d(ch[b + 1], ch[b], kernel_size=2, stride=2, bias=False))
            layers = []
            n_norm = convs_per_block - 1 if b == 0 else convs_per_block
            for i in range(n_norm):
                layers += [_conv(ch[b + 1] if i == 0 else ch[b], ch[b], k), BFBatchNorm2d(ch[b]), nn.ReLU()]
            if b == 0:
                layers.append(_conv(ch[b], in_channels, k))
            self.decoder.append(nn.Sequential(*layers))
        self.pool = nn.AvgPool2d(2)
        if kaiming_init:
            for m in self.modules():
                if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                    nn.init.kaiming_normal_(m.weight, a=0, mode="fan_in")

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        """The predicted noise :math:`f(y)` of a batch ``(B, C, H, W)``; the denoised image is ``y - f(y)``."""
        if y.dim() != 4 or y.shape[1] != self.in_channels:
            raise ValueError(f"BiasFreeUNet expects (B, {self.in_channels}, H, W) images, got {tuple(y.shape)}.")
        m = 2 ** self.num_blocks
        if y.shape[-2] % m or y.shape[-1] % m:
            raise ValueError(f"image sides {tuple(y.shape[-2:])} must be divisible by 2**num_blocks = {m}; "
                             f"pad the images or lower num_blocks.")
        skips = []
        x = y
        for block in self.encoder:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        x = self.mid(x)
        for b in range(self.num_blocks - 1, -1, -1):
            x = self.decoder[b](torch.cat([self.upsample[b](x), skips[b]], dim=1))
        return x
