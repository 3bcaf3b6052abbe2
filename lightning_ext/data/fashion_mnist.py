"""Fashion-MNIST (60k/10k, 28x28 grayscale) read from local IDX files."""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path
from typing import Optional

import numpy as np
from typing_extensions import override

from lightning_ext.core.validation import PositiveInt, UnitIntervalRightOpen
from lightning_ext.data.base import Arrays, InMemoryDataModule
from lightning_ext.core.paths import check_path_argument

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
    """Read an IDX file (optionally gzipped) into a numpy array of its declared shape.

    A damaged file raises a one-line ``ValueError`` naming the file and what is wrong (bad magic number, a
    header or data shorter than declared, a cut gzip stream).
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise ValueError(f"{path} is truncated or not a valid gzip file ({err}); download it again.") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (bad magic number).")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise ValueError(f"{path} is truncated: its header declares {ndim} dimensions but holds "
                         f"{(len(data) - 4) // 4}.")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    expected = int(np.prod(shape))
    if arr.size < expected:
        raise ValueError(f"{path} is truncated: its header declares shape {shape} ({expected} values), "
                         f"found {arr.size}.")
    if arr.size > expected:
        raise ValueError(f"{path} is corrupt: its header declares shape {shape} ({expected} values), "
                         f"found {arr.size}.")
    return arr.reshape(shape)


def _candidate_dirs(data_dir: Optional[str]) -> list[Path]:
    if data_dir:  # an explicit folder is the only place looked at: never silently another copy
        roots = [Path(data_dir).expanduser()]
    else:
        roots = [Path(p) for p in os.environ.get("FASHION_MNIST_DIR", "").split(os.pathsep) if p]
        roots += [Path(p) for p in DEFAULT_SEARCH_PATHS]
    dirs = []
    for root in roots:
        dirs += [root, root / "FashionMNIST" / "raw"]
    return dirs


def _files_in(folder: Path) -> dict[str, Path]:
    found = {}
    for key, stem in _FILES.items():
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                found[key] = folder / name
                break
    return found


_HOW_TO_GET = ("Get them with one of: `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu, installs to "
               "/usr/share/datasets/fashion-mnist); `FashionMNISTDataModule(download=True)` where a network exists; "
               "or copy the files into `data_dir` (or `data_dir/FashionMNIST/raw`).")


def find_fashion_mnist(data_dir: Optional[str] = None) -> dict[str, Path]:
    """Locate the four IDX files (plain or ``.gz``); raise a FileNotFoundError that says how to get them.

    With ``data_dir`` given, only ``data_dir`` and ``data_dir/FashionMNIST/raw`` are looked at (a missing or
    incomplete folder is an error naming it, never a reason to use another copy); without it,
    ``$FASHION_MNIST_DIR`` and :data:`DEFAULT_SEARCH_PATHS`.
    """
    searched = _candidate_dirs(data_dir)
    best: dict[str, Path] = {}
    for d in searched:
        found = _files_in(d)
        if len(found) == len(_FILES):
            return found
        best = found if len(found) > len(best) else best
    if data_dir:
        root = Path(data_dir).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"Fashion-MNIST data_dir {str(root)!r} does not exist; fix the path, or set "
                                    "data_dir to null to search the default places. " + _HOW_TO_GET)
        missing = [_FILES[k] for k in _FILES if k not in best]
        raise FileNotFoundError(
            f"Fashion-MNIST data_dir {str(root)!r} (and its FashionMNIST/raw) lacks "
            + ", ".join(f"{m}[.gz]" for m in missing) + "; only this folder is used when data_dir is given. "
            + _HOW_TO_GET)
    raise FileNotFoundError(
        "Fashion-MNIST IDX files (train-images-idx3-ubyte[.gz] and the three others) were not found in: "
        + ", ".join(str(d) for d in searched) + ". " + _HOW_TO_GET
    )


class FashionMNISTDataModule(InMemoryDataModule):
    """Fashion-MNIST: 70,000 grayscale 28x28 images of 10 clothing classes (Xiao et al., 2017).

    Protocol: the official 10,000-image test split is the test split; ``val_fraction`` (default 5,000 of
    60,000 = 1/12) of the official training split, class-stratified with ``split_seed``, is the validation
    split. Pixels are scaled to [0, 1] and standardised with the training split's mean and std. Batches are
    ``(x, y)`` with ``x`` of shape ``(B, 1, 28, 28)``.

    Files are looked up in ``data_dir`` and ``data_dir/FashionMNIST/raw`` (torchvision's layout) only, when
    ``data_dir`` is given (a missing or incomplete folder is an error naming it); otherwise in the
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
        check_path_argument("data_dir", data_dir)
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
        arrays = {key: read_idx(path) for key, path in files.items()}
        for split in ("train", "test"):
            n_x, n_y = len(arrays[f"{split}_x"]), len(arrays[f"{split}_y"])
            if n_x != n_y:
                raise ValueError(f"Fashion-MNIST {split} files disagree: {files[f'{split}_x']} holds {n_x} images, "
                                 f"{files[f'{split}_y']} {n_y} labels; replace the damaged file.")
        return Arrays(
            x=arrays["train_x"] / 255.0,
            y=arrays["train_y"].astype(np.int64),
            x_test=arrays["test_x"] / 255.0,
            y_test=arrays["test_y"].astype(np.int64),
        )
