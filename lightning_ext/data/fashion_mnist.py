"""Fashion-MNIST (60k/10k, 28x28 grayscale) read from local IDX files."""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Optional

import numpy as np
from typing_extensions import override

from lightning_ext.core.validation import PositiveInt, UnitIntervalRightOpen
from lightning_ext.data.base import Arrays, InMemoryDataModule

DEFAULT_SEARCH_PATHS = ("/usr/share/datasets/fashion-mnist",)
_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into a numpy array of its declared shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (bad magic number).")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: expected {int(np.prod(shape))} values, found {arr.size}.")
    return arr.reshape(shape)


def _candidate_dirs(data_dir: Optional[str]) -> list[Path]:
    roots = [Path(data_dir).expanduser()] if data_dir else []
    roots += [Path(p) for p in os.environ.get("FASHION_MNIST_DIR", "").split(os.pathsep) if p]
    roots += [Path(p) for p in DEFAULT_SEARCH_PATHS]
    dirs = []
    for root in roots:
        dirs += [root, root / "FashionMNIST" / "raw"]
    return dirs


def find_fashion_mnist(data_dir: Optional[str] = None) -> dict[str, Path]:
    """Locate the four IDX files (plain or ``.gz``); raise a FileNotFoundError that says how to get them."""
    searched = _candidate_dirs(data_dir)
    for d in searched:
        found = {}
        for key, stem in _FILES.items():
            for name in (stem, stem + ".gz"):
                if (d / name).is_file():
                    found[key] = d / name
                    break
        if len(found) == len(_FILES):
            return found
    raise FileNotFoundError(
        "Fashion-MNIST IDX files (train-images-idx3-ubyte[.gz] and the three others) were not found in: "
        + ", ".join(str(d) for d in searched)
        + ". Get them with one of: `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu, installs to "
        "/usr/share/datasets/fashion-mnist); `FashionMNISTDataModule(download=True)` where a network exists; "
        "or copy the files into `data_dir` (or `data_dir/FashionMNIST/raw`)."
    )


class FashionMNISTDataModule(InMemoryDataModule):
    """Fashion-MNIST: 70,000 grayscale 28x28 images of 10 clothing classes (Xiao et al., 2017).

    Protocol: the official 10,000-image test split is the test split; ``val_fraction`` (default 5,000 of
    60,000 = 1/12) of the official training split, class-stratified with ``split_seed``, is the validation
    split. Pixels are scaled to [0, 1] and standardised with the training split's mean and std. Batches are
    ``(x, y)`` with ``x`` of shape ``(B, 1, 28, 28)``.

    Files are looked up in ``data_dir``, ``data_dir/FashionMNIST/raw`` (torchvision's layout), the
    directories in ``$FASHION_MNIST_DIR`` and ``/usr/share/datasets/fashion-mnist`` (Debian package
    ``dataset-fashion-mnist``). With ``download=True`` and no local copy, torchvision downloads them into
    ``data_dir``.

    Args:
        data_dir: directory with the IDX files; ``None`` searches the default places only.
        download: download with torchvision when no local copy is found (needs a network).
        val_fraction: share of the official training split used for validation.
        **kwargs: see :class:`~lightning_ext.data.base.InMemoryDataModule`.

    Example:
        >>> dm = FashionMNISTDataModule(batch_size=256)  # doctest: +SKIP
        >>> dm.setup(); dm.split_sizes  # doctest: +SKIP
        {'train': 55000, 'val': 5000, 'test': 10000}
    """

    num_classes = 10
    input_shape = (1, 28, 28)
    class_names = CLASS_NAMES

    def __init__(
        self,
        data_dir: Optional[str] = None,
        download: bool = False,
        batch_size: PositiveInt = 128,
        val_fraction: UnitIntervalRightOpen = 5000 / 60000,
        **kwargs,
    ) -> None:
        super().__init__(batch_size=batch_size, val_fraction=val_fraction, **kwargs)
        self.data_dir = data_dir
        self.download = download
        if download and not data_dir:
            raise ValueError("`download=True` needs a `data_dir` to download into.")
        if not download:
            self.files = find_fashion_mnist(data_dir)  # fail early, with instructions

    @override
    def prepare_data(self) -> None:
        """With ``download=True`` and no local copy, download the IDX files with torchvision."""
        if not self.download:
            return
        try:
            find_fashion_mnist(self.data_dir)
        except FileNotFoundError:
            from torchvision.datasets import FashionMNIST

            FashionMNIST(self.data_dir, train=True, download=True)
            FashionMNIST(self.data_dir, train=False, download=True)

    @override
    def load_arrays(self) -> Arrays:
        """The official training and test splits, scaled to [0, 1]."""
        files = find_fashion_mnist(self.data_dir)
        return Arrays(
            x=read_idx(files["train_x"]) / 255.0,
            y=read_idx(files["train_y"]).astype(np.int64),
            x_test=read_idx(files["test_x"]) / 255.0,
            y_test=read_idx(files["test_y"]).astype(np.int64),
        )
