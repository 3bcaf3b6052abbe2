"""STU-Net: the scalable nnU-Net-style residual encoder-decoder, in 3D (the paper) and 2D (our extension)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Union

import torch
import torch.nn.functional as F
from torch import nn
from typing_extensions import override

from lightning_ext.core.validation import check_positive_int

__all__ = ["STUNet", "stunet_b", "stunet_h", "stunet_l", "stunet_s", "STUNET_SIZES"]

#: depth per stage and channel widths of the paper's four sizes (official ``STUNetTrainer.py``).
STUNET_SIZES = {
    "s": ([1] * 6, [16, 32, 64, 128, 256, 256]),
    "b": ([1] * 6, [32, 64, 128, 256, 512, 512]),
    "l": ([2] * 6, [64, 128, 256, 512, 1024, 1024]),
    "h": ([3] * 6, [96, 192, 384, 768, 1536, 1536]),
}


def _layers(spatial_dims: int):
    if spatial_dims == 3:
        return nn.Conv3d, nn.InstanceNorm3d
    return nn.Conv2d, nn.InstanceNorm2d


class _ResBlock(nn.Module):
    """``LeakyReLU(IN(conv(LeakyReLU(IN(conv(x, stride))))) + shortcut(x))``, 1x1 strided shortcut when asked."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: Sequence[int], spatial_dims: int, shortcut: bool):
        super().__init__()
        conv, norm = _layers(spatial_dims)
        pad = kernel // 2
        self.conv1 = conv(cin, cout, kernel, stride=tuple(stride), padding=pad)
        self.norm1 = norm(cout, affine=True)
        self.conv2 = conv(cout, cout, kernel, padding=pad)
        self.norm2 = norm(cout, affine=True)
        self.act = nn.LeakyReLU(inplace=True)
        self.shortcut = conv(cin, cout, 1, stride=tuple(stride)) if shortcut else None

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        return self.act(y + (x if self.shortcut is None else self.shortcut(x)))


def _stage(cin: int, cout: int, depth: int, kernel: int, stride: Sequence[int], spatial_dims: int) -> nn.Sequential:
    blocks = [_ResBlock(cin, cout, kernel, stride, spatial_dims, shortcut=True)]
    blocks += [_ResBlock(cout, cout, kernel, [1] * spatial_dims, spatial_dims, shortcut=False) for _ in range(depth - 1)]
    return nn.Sequential(*blocks)


class STUNet(nn.Module):
    r"""STU-Net: the scalable nnU-Net-style residual encoder-decoder, in 3D (the paper) and 2D (our extension).

    Paper: "STU-Net: Scalable and Transferable Medical Image Segmentation Models Empowered by Large-Scale
    Supervised Pre-training" (Huang et al., arXiv 2304.06716); reference code
    https://github.com/uni-medical/STU-Net (``nnUNet-1.7.1/nnunet/network_architecture/STUNet.py``), written
    here from its description.

    Six encoder stages of residual blocks :math:`y = \phi(\mathrm{IN}(W_2 * \phi(\mathrm{IN}(W_1 *_s x))) +
    S(x))` (:math:`\phi` LeakyReLU 0.01, instance norm with affine, :math:`S` identity or a strided 1x1 conv):
    downsampling is the first block's stride, no pooling. Five decoder stages: nearest-neighbour upsampling by the
    stage's stride then a 1x1 conv (no transposed conv, so weights transfer across tasks), concatenation with
    the skip, residual blocks. A 1x1 segmentation head after every decoder stage: with ``deep_supervision`` the
    forward in training mode returns the five outputs, full resolution first; in eval mode (or without deep
    supervision) only the full-resolution logits, so sliding-window inference gets a tensor. Weights start as
    Kaiming normal with :math:`a = 0.01` and zero bias (nnU-Net's ``InitWeights_He``). Input sides must divide
    by the product of the strides (the net does not pad). :func:`stunet_s` .. :func:`stunet_h` build the paper's
    sizes (14.60 / 58.26 / 440.30 / 1457.33 M parameters with 105 classes).

    Args:
        in_channels: image channels.
        num_classes: output channels (classes including background).
        depth: residual blocks per stage (6 stages).
        dims: channels per stage (6 values).
        strides: the 5 downsampling strides, one list of ``spatial_dims`` ints each.
        kernel_size: odd kernel side of every conv (3 in the paper).
        spatial_dims: 3 (the paper) or 2.
        deep_supervision: return all five heads' outputs in training mode.

    Example:
        >>> net = STUNet(1, 3, dims=[4, 8, 8, 8, 8, 8], strides=[[2, 2, 2]] * 3 + [[1, 1, 1]] * 2)
        >>> [tuple(o.shape) for o in net(torch.zeros(1, 1, 16, 16, 16))][:2]
        [(1, 3, 16, 16, 16), (1, 3, 8, 8, 8)]
        >>> net.eval()(torch.zeros(1, 1, 16, 16, 16)).shape
        torch.Size([1, 3, 16, 16, 16])
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 2, depth: list[int] = [1, 1, 1, 1, 1, 1],  # noqa: B006
                 dims: list[int] = [16, 32, 64, 128, 256, 256],  # noqa: B006 - read only, YAML-visible defaults
                 strides: list[list[int]] = [[2, 2, 2]] * 5,  # noqa: B006
                 kernel_size: int = 3, spatial_dims: Literal[2, 3] = 3, deep_supervision: bool = True) -> None:
        super().__init__()
        check_positive_int("in_channels", in_channels)
        check_positive_int("num_classes", num_classes)
        if spatial_dims not in (2, 3):
            raise ValueError(f"`spatial_dims` must be 2 or 3, got {spatial_dims!r}.")
        if len(depth) != 6 or len(dims) != 6:
            raise ValueError(f"STU-Net has 6 stages: `depth` and `dims` need 6 values each, got {len(depth)} and "
                             f"{len(dims)}.")
        for name, values in (("depth", depth), ("dims", dims)):
            for v in values:
                check_positive_int(name, v)
        if len(strides) != 5 or any(len(s) != spatial_dims or any(int(v) < 1 for v in s) for s in strides):
            raise ValueError(f"`strides` needs 5 lists of {spatial_dims} positive ints (one per downsampling), got "
                             f"{strides!r}.")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"`kernel_size` must be a positive odd int, got {kernel_size!r}.")
        self.spatial_dims, self.deep_supervision = spatial_dims, deep_supervision
        self.strides = [tuple(int(v) for v in s) for s in strides]
        conv, _ = _layers(spatial_dims)
        self.encoder = nn.ModuleList([_stage(in_channels, dims[0], depth[0], kernel_size, [1] * spatial_dims,
                                             spatial_dims)])
        for d in range(1, 6):
            self.encoder.append(_stage(dims[d - 1], dims[d], depth[d], kernel_size, self.strides[d - 1], spatial_dims))
        self.upsample_convs = nn.ModuleList([conv(dims[-1 - u], dims[-2 - u], 1) for u in range(5)])
        self.decoder = nn.ModuleList([_stage(2 * dims[-2 - u], dims[-2 - u], depth[-2 - u], kernel_size,
                                             [1] * spatial_dims, spatial_dims) for u in range(5)])
        self.seg_outputs = nn.ModuleList([conv(dims[-2 - u], num_classes, 1) for u in range(5)])
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Conv3d)):
                nn.init.kaiming_normal_(m.weight, a=1e-2)
                nn.init.zeros_(m.bias)

    @property
    def divisor(self) -> tuple[int, ...]:
        """What each input side must divide by: the product of the strides per axis."""
        out = [1] * self.spatial_dims
        for s in self.strides:
            out = [a * b for a, b in zip(out, s)]
        return tuple(out)

    @override
    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Logits at full resolution (eval), or the five heads' outputs, fine to coarse (training, deep supervision)."""
        if x.dim() != self.spatial_dims + 2:
            raise ValueError(f"STUNet(spatial_dims={self.spatial_dims}) expects (B, C{', D' * (self.spatial_dims == 3)}"
                             f", H, W) inputs, got shape {tuple(x.shape)}.")
        bad = [n for n, k in zip(x.shape[2:], self.divisor) if n % k]
        if bad:
            raise ValueError(f"Input sides {tuple(x.shape[2:])} must divide by {self.divisor} (the product of the "
                             "strides); crop or pad the input, or use a patch size that divides.")
        skips = []
        for stage in self.encoder[:-1]:
            x = stage(x)
            skips.append(x)
        x = self.encoder[-1](x)
        outputs = []
        for u in range(5):
            x = self.upsample_convs[u](F.interpolate(x, scale_factor=self.strides[-1 - u], mode="nearest"))
            x = self.decoder[u](torch.cat([x, skips[-1 - u]], dim=1))
            outputs.append(self.seg_outputs[u](x))
        if self.deep_supervision and self.training:
            return tuple(outputs[::-1])
        return outputs[-1]


def _sized(size: str, in_channels: int, num_classes: int, strides, spatial_dims, deep_supervision) -> STUNet:
    depth, dims = STUNET_SIZES[size]
    strides = strides if strides is not None else [[2] * spatial_dims] * 5
    return STUNet(in_channels, num_classes, depth, dims, strides, 3, spatial_dims, deep_supervision)


def stunet_s(in_channels: int = 1, num_classes: int = 105, strides=None, spatial_dims: Literal[2, 3] = 3,
             deep_supervision: bool = True) -> STUNet:
    """STU-Net-S (depth 1 per stage, dims 16..256; 14.60 M parameters with 105 classes, 3D)."""
    return _sized("s", in_channels, num_classes, strides, spatial_dims, deep_supervision)


def stunet_b(in_channels: int = 1, num_classes: int = 105, strides=None, spatial_dims: Literal[2, 3] = 3,
             deep_supervision: bool = True) -> STUNet:
    """STU-Net-B (depth 1 per stage, dims 32..512; 58.26 M parameters with 105 classes, 3D)."""
    return _sized("b", in_channels, num_classes, strides, spatial_dims, deep_supervision)


def stunet_l(in_channels: int = 1, num_classes: int = 105, strides=None, spatial_dims: Literal[2, 3] = 3,
             deep_supervision: bool = True) -> STUNet:
    """STU-Net-L (depth 2 per stage, dims 64..1024; 440.30 M parameters with 105 classes, 3D)."""
    return _sized("l", in_channels, num_classes, strides, spatial_dims, deep_supervision)


def stunet_h(in_channels: int = 1, num_classes: int = 105, strides=None, spatial_dims: Literal[2, 3] = 3,
             deep_supervision: bool = True) -> STUNet:
    """STU-Net-H (depth 3 per stage, dims 96..1536; 1457.33 M parameters with 105 classes, 3D)."""
    return _sized("h", in_channels, num_classes, strides, spatial_dims, deep_supervision)
