"""``MultiViewAugmentation``: random views of a batch of image tensors, made on the batch's device."""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import override

from lightning_ext.core.validation import (
    ClosedUnitInterval,
    NonNegativeFloat,
    UnitIntervalRightOpen,
    check_fraction,
    check_non_negative,
    check_number,
    check_positive_int,
)


def _range(value: Sequence[float], name: str, low: float = 0.0, high: float = math.inf) -> tuple[float, float]:
    value = tuple(value)
    if len(value) != 2:
        raise ValueError(f"`{name}` must be (min, max), got {value}.")
    for v in value:
        check_number(name, v, low=low, high=None if math.isinf(high) else high)
    if value[0] > value[1]:
        raise ValueError(f"`{name}` must be (min, max) with {low} <= min <= max <= {high}, got {value}.")
    return float(value[0]), float(value[1])


def _uniform(n: int, low: float, high: float, device: torch.device) -> Tensor:
    return torch.rand(n, device=device) * (high - low) + low


class MultiViewAugmentation(nn.Module):
    """Random views of a batch of images, made on the batch's device: crop-resize, flip, jitter, blur, noise.

    Every call draws new parameters **per image** (from torch's global RNG, so ``seed_everything`` fixes
    them) and returns one view of the batch; the self-supervised modules call it once per view. It works on
    the standardised tensors our DataModules yield, so intensity jitter is expressed in standard deviations:
    brightness adds ``u ~ U(-brightness, brightness)``, contrast scales each image around its mean by
    ``c ~ U(1 - contrast, 1 + contrast)`` (both together with probability ``jitter_p``). The crop follows
    torchvision's ``RandomResizedCrop`` (area share ``crop_scale``, aspect ratio ``crop_ratio``, clipped to
    the image) and is done with one ``grid_sample`` for the whole batch, flip included.

    Args:
        crop_size: output ``(height, width)`` or int; ``None`` keeps the input size.
        crop_scale: range of the crop's share of the image area; ``(1, 1)`` disables cropping.
        crop_ratio: range of the crop's aspect ratio (width / height), sampled log-uniformly.
        flip_p: probability of a horizontal flip.
        brightness: maximum additive brightness shift (in standard deviations); 0 disables it.
        contrast: maximum relative contrast change; 0 disables it.
        jitter_p: probability that brightness and contrast are applied to an image.
        grayscale_p: probability of averaging the channels (only for multi-channel images).
        blur_p: probability of a Gaussian blur with sigma ~ U(``blur_sigma``) (in pixels of the output).
        blur_sigma: range of the blur's sigma.
        noise_std: standard deviation of added Gaussian noise; 0 disables it.

    Example:
        >>> aug = MultiViewAugmentation(crop_size=20, crop_scale=(0.3, 1.0))
        >>> aug(torch.randn(8, 1, 28, 28)).shape
        torch.Size([8, 1, 20, 20])
    """

    def __init__(
        self,
        crop_size: Optional[Union[int, Sequence[int]]] = None,
        crop_scale: Sequence[float] = (0.2, 1.0),
        crop_ratio: Sequence[float] = (3 / 4, 4 / 3),
        flip_p: ClosedUnitInterval = 0.5,
        brightness: NonNegativeFloat = 0.4,
        contrast: UnitIntervalRightOpen = 0.4,
        jitter_p: ClosedUnitInterval = 0.8,
        grayscale_p: ClosedUnitInterval = 0.0,
        blur_p: ClosedUnitInterval = 0.0,
        blur_sigma: Sequence[float] = (0.1, 2.0),
        noise_std: NonNegativeFloat = 0.0,
    ) -> None:
        super().__init__()
        if crop_size is not None:
            crop_size = (crop_size, crop_size) if isinstance(crop_size, int) else tuple(crop_size)
            if len(crop_size) != 2:
                raise ValueError(f"`crop_size` must be a positive int or (height, width), got {crop_size}.")
            for size in crop_size:
                check_positive_int("crop_size", size)
        self.crop_size = crop_size
        self.crop_scale = _range(crop_scale, "crop_scale", 0.0, 1.0)
        if self.crop_scale[0] <= 0:
            raise ValueError(f"`crop_scale` must be > 0, got {crop_scale}.")
        self.crop_ratio = _range(crop_ratio, "crop_ratio", 1e-3)
        for name, p in (("flip_p", flip_p), ("jitter_p", jitter_p), ("grayscale_p", grayscale_p), ("blur_p", blur_p)):
            check_fraction(name, p)
        check_non_negative("brightness", brightness)
        check_number("contrast", contrast, low=0, high=1, high_open=True)
        check_non_negative("noise_std", noise_std)
        self.flip_p, self.jitter_p, self.grayscale_p, self.blur_p = flip_p, jitter_p, grayscale_p, blur_p
        self.brightness, self.contrast, self.noise_std = brightness, contrast, noise_std
        self.blur_sigma = _range(blur_sigma, "blur_sigma", 1e-3)

    def extra_repr(self) -> str:
        return (f"crop_size={self.crop_size}, crop_scale={self.crop_scale}, flip_p={self.flip_p}, "
                f"brightness={self.brightness}, contrast={self.contrast}, jitter_p={self.jitter_p}, "
                f"grayscale_p={self.grayscale_p}, blur_p={self.blur_p}, noise_std={self.noise_std}")

    @override
    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        """One random view of the batch ``x`` shaped ``(B, C, H, W)``."""
        if x.dim() != 4:
            raise ValueError(f"MultiViewAugmentation expects images shaped (B, C, H, W), got {tuple(x.shape)}.")
        x = self._crop_and_flip(x.float())
        b, dev = x.shape[0], x.device
        if self.jitter_p > 0 and (self.brightness > 0 or self.contrast > 0):
            apply = (torch.rand(b, device=dev) < self.jitter_p).float()[:, None, None, None]
            shift = _uniform(b, -self.brightness, self.brightness, dev)[:, None, None, None]
            scale = _uniform(b, 1 - self.contrast, 1 + self.contrast, dev)[:, None, None, None]
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            jittered = (x - mean) * scale + mean + shift
            x = apply * jittered + (1 - apply) * x
        if self.grayscale_p > 0 and x.shape[1] > 1:
            gray = (torch.rand(b, device=dev) < self.grayscale_p)[:, None, None, None]
            x = torch.where(gray, x.mean(dim=1, keepdim=True).expand_as(x), x)
        if self.blur_p > 0:
            x = self._blur(x)
        if self.noise_std > 0:
            x = x + self.noise_std * torch.randn_like(x)
        return x

    def _crop_and_flip(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        out_h, out_w = self.crop_size or (h, w)
        dev = x.device
        # like torchvision: up to 10 draws of (area, ratio) per image, the first that fits; else the whole image
        tries = 10
        area = _uniform(b * tries, *self.crop_scale, dev).view(tries, b)
        log_low, log_high = math.log(self.crop_ratio[0]), math.log(self.crop_ratio[1])
        log_ratio = _uniform(b * tries, log_low, log_high, dev).view(tries, b)
        ratio = torch.exp(log_ratio) * (h / w)  # width / height in normalised coordinates
        cand_w, cand_h = torch.sqrt(area * ratio), torch.sqrt(area / ratio)
        fits = (cand_w <= 1) & (cand_h <= 1)
        first = torch.argmax(fits.int(), dim=0)
        any_fit = fits.any(dim=0)
        pick = torch.arange(b, device=dev)
        crop_w = torch.where(any_fit, cand_w[first, pick], torch.ones(b, device=dev))
        crop_h = torch.where(any_fit, cand_h[first, pick], torch.ones(b, device=dev))
        cx = (torch.rand(b, device=dev) * 2 - 1) * (1 - crop_w)
        cy = (torch.rand(b, device=dev) * 2 - 1) * (1 - crop_h)
        flip = torch.where(torch.rand(b, device=dev) < self.flip_p, -1.0, 1.0)
        if self.crop_scale == (1.0, 1.0) and (out_h, out_w) == (h, w) and self.flip_p == 0:
            return x
        theta = torch.zeros(b, 2, 3, device=dev)
        theta[:, 0, 0] = crop_w * flip
        theta[:, 0, 2] = cx
        theta[:, 1, 1] = crop_h
        theta[:, 1, 2] = cy
        grid = F.affine_grid(theta, [b, c, out_h, out_w], align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def _blur(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        dev = x.device
        radius = max(1, int(math.ceil(2 * self.blur_sigma[1])))
        radius = min(radius, (min(h, w) - 1) // 2) or 1
        sigma = _uniform(b, *self.blur_sigma, dev)
        offsets = torch.arange(-radius, radius + 1, device=dev, dtype=x.dtype)
        kernel = torch.exp(-offsets[None, :] ** 2 / (2 * sigma[:, None] ** 2))
        kernel = kernel / kernel.sum(dim=1, keepdim=True)  # (B, K)
        apply = torch.rand(b, device=dev) < self.blur_p
        identity = torch.zeros_like(kernel)
        identity[:, radius] = 1.0
        kernel = torch.where(apply[:, None], kernel, identity).repeat_interleave(c, dim=0)  # (B*C, K)
        y = x.reshape(1, b * c, h, w)
        y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), kernel[:, None, None, :], groups=b * c)
        y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), kernel[:, None, :, None], groups=b * c)
        return y.reshape(b, c, h, w)
