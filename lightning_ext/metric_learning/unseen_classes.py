"""``UnseenClassesDataModule``: train on some classes, evaluate retrieval on images of classes never trained on."""

from __future__ import annotations

from typing import Literal, Optional

import numpy as np
from typing_extensions import override

from lightning_ext.core.validation import (
    OpenUnitInterval,
    PositiveInt,
    check_choice,
    check_fraction,
    check_positive_int,
)
from lightning_ext.data.base import Arrays, InMemoryDataModule, stratified_split

__all__ = ["UnseenClassesDataModule"]


def _source(name: str) -> type:
    if name == "digits":
        from lightning_ext.data.digits import DigitsDataModule

        return DigitsDataModule
    if name == "mnist5k":
        from lightning_ext.data.mnist5k import MNIST5kDataModule

        return MNIST5kDataModule
    from lightning_ext.data.fashion_mnist import FashionMNISTDataModule

    return FashionMNISTDataModule


class UnseenClassesDataModule(InMemoryDataModule):
    """A class-disjoint split for deep metric learning: every image of ``train_classes`` trains; the images of the
    other classes are split (class-stratified, ``split_seed``) into validation and test retrieval sets.

    The protocol of the DML benchmarks (CUB-200: train on classes 1-100, test retrieval on 101-200; Cars196 alike),
    here on an offline image dataset (``"digits"``: scikit-learn's 8x8 digits; ``"mnist5k"``;
    ``"fashion_mnist"``; official train and test images pooled). Validation and test hold disjoint images of the
    same unseen classes, so hyperparameters are chosen without touching the test images. Pixels are standardised
    with the training images' statistics. Batches are ``(x, y)`` with the original class ids.

    Args:
        source: the image dataset.
        train_classes: class ids trained on; the rest are unseen.
        val_share: share of the unseen-class images in the validation set (the rest is the test set).
        max_images_per_class: keep at most this many images of each class (a seeded random subset; ``None``: all).
        batch_size: training batch size (metric losses need several examples per class in a batch).
        **kwargs: see :class:`~lightning_ext.data.base.InMemoryDataModule` (``split_seed``, ``shuffle_seed``, ...;
            ``val_fraction``/``test_fraction``/``train_fraction``/``long_tail_ratio`` are not used).

    Example:
        >>> dm = UnseenClassesDataModule(train_classes=[0, 1, 2, 3, 4])
        >>> dm.setup()
        >>> dm.split_sizes["train"], sorted(set(dm.test_set.tensors[1].tolist()))
        (901, [5, 6, 7, 8, 9])
    """

    def __init__(self, source: Literal["digits", "mnist5k", "fashion_mnist"] = "digits",
                 train_classes: list[int] = [0, 1, 2, 3, 4],  # noqa: B006 - read only, a YAML-visible default
                 val_share: OpenUnitInterval = 0.5, max_images_per_class: Optional[PositiveInt] = None,
                 batch_size: PositiveInt = 128, **kwargs) -> None:
        check_choice("source", source, ("digits", "mnist5k", "fashion_mnist"))
        check_fraction("val_share", val_share, allow_zero=False, allow_one=False)
        super().__init__(batch_size=batch_size, **kwargs)
        cls = _source(source)
        self.num_classes, self.input_shape = cls.num_classes, cls.input_shape
        classes = sorted({int(c) for c in train_classes})
        if len(classes) != len(train_classes) or not classes:
            raise ValueError(f"train_classes must be distinct class ids; got {train_classes}.")
        outside = [c for c in classes if not 0 <= c < self.num_classes]
        if outside:
            raise ValueError(f"train_classes {outside} are not classes of {source} (0..{self.num_classes - 1}).")
        if len(classes) < 2 or len(classes) > self.num_classes - 2:
            raise ValueError(f"Train on 2 to {self.num_classes - 2} of {source}'s {self.num_classes} classes (metric "
                             f"losses need 2 classes; retrieval needs 2 unseen ones); got {len(classes)}.")
        if max_images_per_class is not None:
            check_positive_int("max_images_per_class", max_images_per_class)
        self.source, self.train_classes, self.val_share = source, classes, val_share
        self.max_images_per_class = max_images_per_class

    @override
    def load_arrays(self) -> Arrays:
        """The source's images, its official test images pooled in (classes, not images, are held out)."""
        arrays = _source(self.source)().load_arrays()
        if arrays.x_test is None:
            return Arrays(arrays.x, arrays.y)
        return Arrays(np.concatenate([arrays.x, arrays.x_test]), np.concatenate([arrays.y, arrays.y_test]))

    @override
    def split_indices(self, arrays: Arrays) -> dict[str, np.ndarray]:
        """Seen-class images train; unseen-class images split into validation and test."""
        keep = np.arange(len(arrays.y))
        if self.max_images_per_class is not None:  # a seeded random subset of each class
            rng = np.random.default_rng(self.split_seed)
            keep = np.sort(np.concatenate([
                rng.permutation(np.flatnonzero(arrays.y == c))[:self.max_images_per_class]
                for c in np.unique(arrays.y)]))
        seen = keep[np.isin(arrays.y[keep], self.train_classes)]
        unseen = keep[~np.isin(arrays.y[keep], self.train_classes)]
        test_rel, val_rel = stratified_split(arrays.y[unseen], self.val_share, self.split_seed)
        return {"train": seen, "val": unseen[val_rel], "test": unseen[test_rel]}
