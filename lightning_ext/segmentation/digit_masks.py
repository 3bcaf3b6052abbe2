"""``DigitMasksDataModule``: segment real handwritten digits out of blurred, noisy, unevenly lit images (offline)."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule
from torch.utils.data import Dataset, TensorDataset
from typing_extensions import override

from lightning_ext.core.sampling import SplitLoaders
from lightning_ext.core.validation import (
    NonNegativeFloat,
    NonNegativeInt,
    OpenUnitInterval,
    PositiveInt,
    UnitIntervalRightOpen,
    check_fraction,
    check_non_negative,
    check_number,
    check_positive_int,
)
from lightning_ext.data.base import stratified_split

__all__ = ["DigitMasksDataModule"]


class DigitMasksDataModule(SplitLoaders, LightningDataModule):
    r"""A small offline segmentation task built from real data: scikit-learn's 1,797 handwritten 8x8 digits.

    Each digit is upsampled (bilinear) to ``size x size``; the **mask** is the clean upsampled digit above
    ``threshold`` (its strokes). The **image** is the clean digit blurred (Gaussian, ``blur_sigma`` in pixels of
    the upsampled image), scaled by a random contrast in [0.5, 1], lit by a random linear illumination gradient
    (amplitude ``illumination``) and corrupted by Gaussian noise (std ``noise``), then standardised with the
    training images' statistics; the spec's variant of the R2U-Net paper's vessel task, where thin structures
    must be recovered from blurred, unevenly lit, noisy images. Corruptions are drawn once per image from
    ``noise_seed``; the split (class-stratified, ``split_seed``) holds ``test_fraction`` of the digits out, then
    ``val_fraction`` of the rest. Batches are ``(image (B, 1, size, size), mask (B, 1, size, size))``.

    Args:
        size: image side (a multiple of 8 keeps up to three poolings exact).
        threshold: mask threshold on the clean image in [0, 1].
        blur_sigma: blur of the image, in pixels.
        noise: std of the additive Gaussian noise (the clean image spans [0, 1]).
        illumination: amplitude of the illumination gradient.
        val_fraction: share of the non-test digits for validation.
        test_fraction: share of all digits held out for testing.
        split_seed: seed of the split.
        noise_seed: seed of the corruptions.
        batch_size: images per batch.
        num_workers: DataLoader workers.
        shuffle: shuffle training batches.
        shuffle_seed: seed of the per-epoch order.

    Example:
        >>> dm = DigitMasksDataModule(size=32)
        >>> dm.setup()
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> tuple(x.shape), sorted(torch.unique(y).tolist()), dm.split_sizes["test"]
        ((32, 1, 32, 32), [0.0, 1.0], 360)
    """

    num_classes = 1

    def __init__(self, size: PositiveInt = 32, threshold: OpenUnitInterval = 0.4,
                 blur_sigma: NonNegativeFloat = 1.5, noise: NonNegativeFloat = 0.25,
                 illumination: NonNegativeFloat = 0.5, val_fraction: UnitIntervalRightOpen = 0.1,
                 test_fraction: UnitIntervalRightOpen = 0.2, split_seed: int = 0, noise_seed: int = 0,
                 batch_size: PositiveInt = 32, num_workers: NonNegativeInt = 0, shuffle: bool = True,
                 shuffle_seed: int = 0) -> None:
        super().__init__()
        check_positive_int("size", size)
        if size < 8:
            raise ValueError(f"size must be at least 8 (the digits are 8x8); got {size}.")
        check_fraction("threshold", threshold, allow_zero=False, allow_one=False)
        for name, value in (("blur_sigma", blur_sigma), ("noise", noise), ("illumination", illumination)):
            check_non_negative(name, value)
        check_fraction("val_fraction", val_fraction, allow_one=False)
        check_fraction("test_fraction", test_fraction, allow_one=False)
        check_positive_int("batch_size", batch_size)
        check_number("num_workers", num_workers, low=0, integer=True)
        for name, seed in (("split_seed", split_seed), ("noise_seed", noise_seed), ("shuffle_seed", shuffle_seed)):
            check_number(name, seed, integer=True)
        self.size, self.threshold, self.blur_sigma, self.noise = size, threshold, blur_sigma, noise
        self.illumination, self.val_fraction, self.test_fraction = illumination, val_fraction, test_fraction
        self.split_seed, self.noise_seed, self.batch_size = split_seed, noise_seed, batch_size
        self.num_workers, self.shuffle, self.shuffle_seed = num_workers, shuffle, shuffle_seed
        self.input_shape = (1, size, size)
        self.sets: dict[str, TensorDataset] = {}
        self.split_sizes: dict[str, int] = {}

    def make_images(self) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """All 1,797 (corrupted image, mask) pairs before standardisation, and the digit classes."""
        from sklearn.datasets import load_digits
        from torchvision.transforms.functional import gaussian_blur

        bunch = load_digits()
        clean = torch.as_tensor(bunch.images / 16.0, dtype=torch.float32).unsqueeze(1)
        clean = F.interpolate(clean, size=(self.size, self.size), mode="bilinear", align_corners=False).clamp(0, 1)
        mask = (clean > self.threshold).float()
        g = torch.Generator().manual_seed(self.noise_seed)
        n = len(clean)
        image = clean
        if self.blur_sigma > 0:
            k = 2 * int(3 * self.blur_sigma) + 1
            image = gaussian_blur(clean, [k, k], [self.blur_sigma, self.blur_sigma])
        contrast = 0.5 + 0.5 * torch.rand(n, 1, 1, 1, generator=g)
        angle = 2 * torch.pi * torch.rand(n, generator=g)
        coords = torch.linspace(-0.5, 0.5, self.size)
        yy, xx = torch.meshgrid(coords, coords, indexing="ij")
        light = self.illumination * (torch.cos(angle)[:, None, None] * xx + torch.sin(angle)[:, None, None] * yy)
        image = image * contrast + light.unsqueeze(1) + self.noise * torch.randn(image.shape, generator=g)
        return image, mask, bunch.target

    @override
    def setup(self, stage: Optional[str] = None) -> None:
        """Build the images once, split them and standardise with the training statistics."""
        if self.sets:
            return
        image, mask, classes = self.make_images()
        pool, test = stratified_split(classes, self.test_fraction, self.split_seed)
        train_rel, val_rel = stratified_split(classes[pool], self.val_fraction, self.split_seed + 1)
        split = {"train": pool[train_rel], "val": pool[val_rel], "test": test}
        mean, std = image[split["train"]].mean(), image[split["train"]].std()
        for name, idx in split.items():
            self.sets[name] = TensorDataset((image[idx] - mean) / std, mask[idx])
        self.split_sizes = {k: len(v) for k, v in split.items()}

    @property
    def train_set(self) -> TensorDataset:
        """The training pairs (after ``setup``)."""
        return self.sets["train"]

    def split_dataset(self, split: str) -> Dataset:
        """The (image, mask) pairs of ``split`` (after ``setup``)."""
        if split not in self.sets:
            raise RuntimeError("DigitMasksDataModule: call setup() before asking for a dataloader.")
        return self.sets[split]
