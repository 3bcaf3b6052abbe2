"""``StarDistNucleiDataModule``: the real fluorescence nuclei image and mask that ship with the stardist package."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import Dataset, TensorDataset
from typing_extensions import override

from lightning_ext.core.optional import require
from lightning_ext.core.sampling import SplitLoaders
from lightning_ext.core.validation import NonNegativeInt, PositiveInt, check_number, check_positive_int

__all__ = ["StarDistNucleiDataModule"]

INSTALL = "pip install --no-deps stardist==0.9.2"


def _stardist_file(name: str) -> Path:
    spec = importlib.util.find_spec("stardist")  # located, never imported (its own imports need TensorFlow)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"The nuclei image ships in the stardist package: `{INSTALL}`.")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "images" / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed stardist; reinstall it with `{INSTALL}`.")
    return path


class StarDistNucleiDataModule(SplitLoaders, LightningDataModule):
    r"""The real fluorescence nuclei image and mask that ship with the stardist package, split into column strips.

    Files: ``stardist/data/images/img2d.tif`` (512x512 uint16 fluorescence microscopy of nuclei) and
    ``mask2d.tif`` (its 125 labelled nuclei; 19.9% foreground), read with ``tifffile`` from the installed package
    (``pip install --no-deps stardist==0.9.2``; located, never imported). The task is binary nuclei-vs-background
    segmentation. The image is cut into column strips so test pixels are never trained on: columns
    ``[0, train_columns)`` for training, the next ``val_columns`` for validation, the rest (128 by default) for
    testing; intensities are standardised with the training strip's statistics. Training batches are
    ``num_train_crops`` random ``crop x crop`` crops of the training strip (positions and flips/rotations drawn once
    from ``seed``); validation and test batches are their whole strips (sides divisible by 8). Batches are
    ``(image (B, 1, H, W), mask (B, 1, H, W) of 0/1)``.

    Args:
        crop: training crop side (a multiple of 8).
        num_train_crops: training crops per epoch.
        train_columns, val_columns: widths of the training and validation strips (multiples of 8).
        seed: seed of the crops.
        batch_size, num_workers, shuffle, shuffle_seed: the training loader.

    Example:
        >>> dm = StarDistNucleiDataModule(num_train_crops=4, batch_size=2)
        >>> dm.setup()
        >>> [tuple(t.shape) for t in next(iter(dm.train_dataloader()))], tuple(dm.split_dataset("test")[0][0].shape)
        ([(2, 1, 64, 64), (2, 1, 64, 64)], (1, 512, 128))
    """

    def __init__(self, crop: PositiveInt = 64, num_train_crops: PositiveInt = 256, train_columns: PositiveInt = 320,
                 val_columns: PositiveInt = 64, seed: NonNegativeInt = 0, batch_size: PositiveInt = 16,
                 num_workers: NonNegativeInt = 0, shuffle: bool = True, shuffle_seed: NonNegativeInt = 0) -> None:
        super().__init__()
        for name, value in (("crop", crop), ("train_columns", train_columns), ("val_columns", val_columns)):
            check_positive_int(name, value)
            if value % 8:
                raise ValueError(f"`{name}` must be a multiple of 8 (three poolings), got {value}.")
        check_positive_int("num_train_crops", num_train_crops)
        check_positive_int("batch_size", batch_size)
        for name, value in (("seed", seed), ("num_workers", num_workers), ("shuffle_seed", shuffle_seed)):
            check_number(name, value, low=0, integer=True)
        if train_columns + val_columns >= 512:
            raise ValueError(f"train_columns + val_columns = {train_columns + val_columns} leaves no test strip of the "
                             "512-column image; make their sum < 512.")
        if crop > train_columns:
            raise ValueError(f"`crop` {crop} is wider than the training strip ({train_columns} columns).")
        require("tifffile", type(self).__name__)
        self.crop, self.num_train_crops, self.seed = crop, num_train_crops, seed
        self.train_columns, self.val_columns = train_columns, val_columns
        self.batch_size, self.num_workers, self.shuffle, self.shuffle_seed = batch_size, num_workers, shuffle, shuffle_seed
        self.sets: dict[str, Dataset] = {}

    @override
    def setup(self, stage: Optional[str] = None) -> None:
        """Read the image and mask, split them into strips and draw the training crops."""
        if self.sets:
            return
        tifffile = require("tifffile", type(self).__name__)
        image = torch.from_numpy(tifffile.imread(_stardist_file("img2d.tif")).astype(np.float32))
        mask = torch.from_numpy((tifffile.imread(_stardist_file("mask2d.tif")) > 0).astype(np.float32))
        a, b = self.train_columns, self.train_columns + self.val_columns
        mean, std = image[:, :a].mean(), image[:, :a].std()
        image = (image - mean) / std
        g = np.random.default_rng(self.seed)
        xs, ys = [], []
        for _ in range(self.num_train_crops):
            r, c = int(g.integers(0, 512 - self.crop + 1)), int(g.integers(0, a - self.crop + 1))
            x, y = image[r:r + self.crop, c:c + self.crop], mask[r:r + self.crop, c:c + self.crop]
            k, flip = int(g.integers(4)), bool(g.random() < 0.5)
            x, y = torch.rot90(x, k), torch.rot90(y, k)
            if flip:
                x, y = x.flip(1), y.flip(1)
            xs.append(x)
            ys.append(y)
        self.sets = {"train": TensorDataset(torch.stack(xs)[:, None], torch.stack(ys)[:, None]),
                     "val": TensorDataset(image[None, None, :, a:b], mask[None, None, :, a:b]),
                     "test": TensorDataset(image[None, None, :, b:], mask[None, None, :, b:])}

    @property
    def train_set(self) -> TensorDataset:
        """The training crops (after ``setup``)."""
        return self.sets["train"]

    def split_dataset(self, split: str) -> Dataset:
        """The crops (train) or the strip (val, test) of ``split``."""
        if split not in self.sets:
            raise RuntimeError("StarDistNucleiDataModule: call setup() before asking for a dataloader.")
        return self.sets[split]
