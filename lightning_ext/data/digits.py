"""scikit-learn's 8x8 handwritten digits as a LightningDataModule (always available offline)."""

from __future__ import annotations

from typing_extensions import override

from lightning_ext.core.validation import PositiveInt
from lightning_ext.data.base import Arrays, InMemoryDataModule


class DigitsDataModule(InMemoryDataModule):
    """scikit-learn digits: 1,797 grayscale 8x8 images of the digits 0-9, bundled with scikit-learn.

    Protocol: no official split exists, so a class-stratified split with ``split_seed`` (default 0) holds out
    20% for test (360 images), then 10% of the rest for validation (144), leaving 1,293 for training. Pixels
    (0-16) are scaled to [0, 1] and standardised with the training split's mean and std. Batches are
    ``(x, y)`` with ``x`` of shape ``(B, 1, 8, 8)``.

    Args:
        **kwargs: see :class:`~lightning_ext.data.base.InMemoryDataModule` (batch size, fractions,
            seeds, ``train_fraction``).

    Example:
        >>> dm = DigitsDataModule(batch_size=32)
        >>> dm.setup()
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> tuple(x.shape), dm.num_classes, dm.split_sizes["test"]
        ((32, 1, 8, 8), 10, 360)
    """

    num_classes = 10
    input_shape = (1, 8, 8)

    def __init__(self, batch_size: PositiveInt = 64, **kwargs) -> None:
        super().__init__(batch_size=batch_size, **kwargs)

    @override
    def load_arrays(self) -> Arrays:
        """The 1,797 images scaled to [0, 1] and their labels."""
        from sklearn.datasets import load_digits

        bunch = load_digits()
        return Arrays(x=bunch.data / 16.0, y=bunch.target)
