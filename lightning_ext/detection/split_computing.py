r"""Split computing for edge-assisted detection, pure core: a bottleneck codec that replaces a detector's head
network, 8-bit quantisation of the transmitted tensor (and its size in bytes next to JPEG), the neural filter
that drops frames without objects, and the head-network distillation losses (HND, GHND).

Paper: Yoshitomo Matsubara and Marco Levorato, "Neural Compression and Filtering for Edge-assisted Real-time
Object Detection in Challenged Networks", ICPR 2020 (arXiv 2007.15818); reference code
https://github.com/yoshitomo-matsubara/hnd-ghnd-object-detectors (``src/models/mimic/resnet_layer.py``,
``src/models/ext/classifier.py``, ``src/structure/transformer.py``, ``config/{hnd,ghnd}/``). Written here from the
paper and that code's conventions.

- **Bottleneck** (:class:`BottleneckCodec`): the encoder (2x2 convs with padding 1, BN, a ReLU in the middle)
  squeezes the head's input to ``bottleneck_channels`` (the tensor sent to the edge server); the decoder (2x2
  convs without padding) restores the replaced layer's output shape.
- **Quantisation** (:func:`quantize`): per-tensor asymmetric uniform quantisation to ``num_bits``,
  :math:`s = (\max z - \min z) / (2^b - 1)`, integer zero point :math:`z_0 = \mathrm{clip}(\lfloor -\min z / s
  \rfloor, 0, 2^b - 1)`, :math:`q = \mathrm{round}(\mathrm{clip}(z_0 + z / s, 0, 2^b - 1))`, :math:`\hat z =
  s (q - z_0)`; the payload is ``numel`` bytes at 8 bits plus the scale and zero point (:func:`payload_bytes`).
- **HND / GHND** (:func:`~lightning_ext.detection.head_distillation.head_distillation_loss`, re-exported here):
  :math:`\sum_{l} \|f^S_l(x) - f^T_l(x)\|_2^2` (sum-reduced MSE) over the replaced layer's output only (HND) or
  over that and every later stage's output with those stages frozen (GHND); its core (the loss and the layer
  hooks) lives in :mod:`lightning_ext.detection.head_distillation`.
- **Neural filter** (:class:`NeuralFilter`): a small classifier on the head's early features, "contains an object
  of interest"; a frame whose probability is below a threshold is not transmitted.

Example:
    >>> codec = BottleneckCodec(32, 3, out_channels=32)
    >>> z = codec.encode(torch.randn(1, 32, 12, 12))
    >>> tuple(z.shape), payload_bytes(quantize(z)), tuple(codec(torch.randn(1, 32, 12, 12), num_bits=8).shape)
    ((1, 3, 16, 16), 776, (1, 32, 12, 12))
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_ext.detection.head_distillation import head_distillation_loss

__all__ = ["BottleneckCodec", "NeuralFilter", "QuantizedTensor", "dequantize", "head_distillation_loss",
           "jpeg_bytes", "jpeg_roundtrip", "payload_bytes", "quantize"]


@dataclass
class QuantizedTensor:
    """Integer codes (``uint8`` for <= 8 bits) with their per-tensor scale and zero point."""

    codes: Tensor
    scale: float
    zero_point: int
    num_bits: int = 8


def quantize(z: Tensor, num_bits: int = 8) -> QuantizedTensor:
    """Per-tensor asymmetric uniform quantisation (see the module docstring)."""
    if not 2 <= num_bits <= 8:
        raise ValueError(f"num_bits must be in 2..8 (codes are stored as uint8); got {num_bits}.")
    qmax = 2 ** num_bits - 1
    lo, hi = float(z.min()), float(z.max())
    scale = (hi - lo) / qmax if hi > lo else 1.0
    zero_point = int(min(max(-lo / scale, 0), qmax))
    codes = (zero_point + z.detach() / scale).clamp(0, qmax).round().to(torch.uint8)
    return QuantizedTensor(codes, scale, zero_point, num_bits)


def dequantize(q: QuantizedTensor) -> Tensor:
    """:math:`\\hat z = s (q - z_0)` as float32."""
    return q.scale * (q.codes.float() - q.zero_point)


def payload_bytes(q: QuantizedTensor) -> int:
    """Bytes on the wire: the codes packed at ``num_bits`` each, plus 4 bytes of scale and 4 of zero point."""
    return -(-q.codes.numel() * q.num_bits // 8) + 8


def jpeg_bytes(image: Tensor, quality: int = 95) -> int:
    """Size of one image ``(C, H, W)`` in [0, 1] (1 or 3 channels) saved as JPEG at ``quality`` (PIL)."""
    return jpeg_roundtrip(image, quality)[1]


def jpeg_roundtrip(image: Tensor, quality: int = 95) -> tuple[Tensor, int]:
    """One image ``(C, H, W)`` in [0, 1] (1 or 3 channels) through JPEG at ``quality`` (PIL): the decoded image
    (same shape, float32 in [0, 1]) and the JPEG's size in bytes, the cost of sending the frame itself."""
    import numpy as np
    from PIL import Image

    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be in 1..100; got {quality}.")
    arr = (image.detach().clamp(0, 1) * 255).round().to(torch.uint8)
    mode = "L" if arr.shape[0] == 1 else "RGB"
    pil = Image.fromarray(arr[0].numpy() if mode == "L" else arr.permute(1, 2, 0).numpy(), mode=mode)
    buf = io.BytesIO()
    pil.save(buf, format="JPEG", quality=int(quality))
    size = buf.tell()
    buf.seek(0)
    decoded = torch.from_numpy(np.asarray(Image.open(buf).convert(mode), dtype=np.float32) / 255.0)
    decoded = decoded.unsqueeze(0) if mode == "L" else decoded.permute(2, 0, 1)
    return decoded.to(image.device), size


class BottleneckCodec(nn.Module):
    """A split-computing bottleneck (Matsubara and Levorato, 2020): an encoder squeezing a head network's input to
    ``bottleneck_channels`` for transmission, and a decoder restoring the replaced layer's output.

    The reference code's ``Bottleneck4LargeResNet`` pattern at any width: encoder conv2x2(pad 1) ``in -> in``, BN, conv2x2 ``in -> 4 in``, BN-ReLU, conv2x2 ``4 in -> in``,
    BN, conv2x2 ``in -> C``; decoder BN-ReLU, conv2x2 ``C -> in``, BN, conv2x2 ``in -> 2 in``, BN-ReLU,
    conv2x2 ``2 in -> out``, BN, conv2x2 ``out -> out``, BN-ReLU (unpadded: the four padded convs grow each side
    by 4, the four unpadded ones shrink it back). ``bottleneck_channels`` must be narrower than ``in_channels``
    (a bottleneck at least as wide as the layer it replaces compresses nothing)."""

    def __init__(self, in_channels: int, bottleneck_channels: int, out_channels: int) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("bottleneck_channels", bottleneck_channels),
                            ("out_channels", out_channels)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}.")
        if bottleneck_channels >= in_channels:
            raise ValueError(f"bottleneck_channels ({bottleneck_channels}) must be narrower than the layer it "
                             f"replaces ({in_channels} channels); the reference uses 3-15 against 64.")
        c, k = in_channels, bottleneck_channels

        def conv(a, b, pad):
            return nn.Conv2d(a, b, kernel_size=2, padding=pad, bias=False)

        self.encoder = nn.Sequential(conv(c, c, 1), nn.BatchNorm2d(c), conv(c, 4 * c, 1), nn.BatchNorm2d(4 * c),
                                     nn.ReLU(inplace=True), conv(4 * c, c, 1), nn.BatchNorm2d(c), conv(c, k, 1))
        self.decoder = nn.Sequential(nn.BatchNorm2d(k), nn.ReLU(inplace=True), conv(k, c, 0), nn.BatchNorm2d(c),
                                     conv(c, 2 * c, 0), nn.BatchNorm2d(2 * c), nn.ReLU(inplace=True),
                                     conv(2 * c, out_channels, 0), nn.BatchNorm2d(out_channels),
                                     conv(out_channels, out_channels, 0), nn.BatchNorm2d(out_channels),
                                     nn.ReLU(inplace=True))

    def encode(self, x: Tensor) -> Tensor:
        """The transmitted tensor ``(B, C, H + 4, W + 4)``."""
        return self.encoder(x)

    def decode(self, z: Tensor) -> Tensor:
        """Back to ``(B, out_channels, H, W)``."""
        return self.decoder(z)

    def forward(self, x: Tensor, num_bits: int | None = None) -> Tensor:
        """Encode, optionally quantise and dequantise (straight-through gradient), decode."""
        z = self.encode(x)
        if num_bits is not None:
            z = z + (dequantize(quantize(z, num_bits)) - z).detach()
        return self.decode(z)


class NeuralFilter(nn.Module):
    """The neural filter of split computing (Matsubara and Levorato, 2020): does a frame hold an object of interest?

    The reference code's ``Ext4ResNet`` at any input width and pool size: AdaptiveAvgPool(``pool``) ->
    conv4x4/2 (64) -> conv3x3/2 (32) -> conv2x2 (16), each BN-ReLU -> AdaptiveAvgPool(8) -> Linear(1024 -> 2).
    Returns logits (class 1: the frame holds an object of interest)."""

    def __init__(self, in_channels: int, pool: int = 64) -> None:
        super().__init__()
        if pool < 16:
            raise ValueError(f"pool must be at least 16 (three strided convolutions follow); got {pool}.")
        self.features = nn.Sequential(
            nn.AdaptiveAvgPool2d(pool), nn.Conv2d(in_channels, 64, 4, stride=2), nn.BatchNorm2d(64),
            nn.ReLU(inplace=True), nn.Conv2d(64, 32, 3, stride=2), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
            nn.Conv2d(32, 16, 2), nn.BatchNorm2d(16), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(8))
        self.linear = nn.Linear(16 * 8 * 8, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.features(x).flatten(1))

    @torch.no_grad()
    def keep(self, x: Tensor, threshold: float) -> Tensor:
        """Boolean ``(B,)``: frames whose object probability is at least ``threshold`` (sent to the server)."""
        return self(x).softmax(-1)[:, 1] >= threshold
