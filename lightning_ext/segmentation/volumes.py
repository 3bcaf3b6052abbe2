"""3D segmentation DataModules over NIfTI volumes, split into slabs so test voxels are never trained on."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule
from torch.utils.data import Dataset
from typing_extensions import override

from lightning_ext.core.optional import require
from lightning_ext.core.sampling import SplitLoaders
from lightning_ext.core.validation import (
    ClosedUnitInterval,
    NonNegativeInt,
    OpenUnitInterval,
    PositiveInt,
    check_fraction,
    check_number,
    check_positive_int,
)

__all__ = ["Colin27BrainMaskDataModule", "MNI152TissueDataModule", "NiftiVolumeDataModule"]


def _load_nifti(path: Path, owner: str) -> np.ndarray:
    nib = require("nibabel", owner)
    if not Path(path).is_file():
        raise FileNotFoundError(f"{owner}: the volume {path} does not exist; pass the path of a NIfTI file.")
    data = np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)
    if data.ndim == 4 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"{owner}: {path} holds a {data.ndim}-D array of shape {data.shape}; a 3-D volume is needed.")
    return data


class _Patches(Dataset):
    """Fixed random patches (position and flips drawn once from the seed) from the training slab."""

    def __init__(self, image: torch.Tensor, label: torch.Tensor, patch: tuple[int, ...], n: int,
                 foreground_prob: float, seed: int) -> None:
        self.image, self.label, self.patch = image, label, patch
        g = np.random.default_rng(seed)
        sides = image.shape[1:]
        fg = torch.nonzero(label[0] > 0).numpy()
        self.items = []
        for _ in range(n):
            if len(fg) and g.random() < foreground_prob:  # centre on a random foreground voxel (nnU-Net: 0.33)
                c = fg[g.integers(len(fg))]
                start = [int(np.clip(c[a] - patch[a] // 2, 0, sides[a] - patch[a])) for a in range(3)]
            else:
                start = [int(g.integers(0, sides[a] - patch[a] + 1)) for a in range(3)]
            self.items.append((start, [bool(b) for b in g.random(3) < 0.5]))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        start, flips = self.items[i]
        sl = (slice(None),) + tuple(slice(s, s + p) for s, p in zip(start, self.patch))
        x, y = self.image[sl], self.label[sl]
        dims = [a + 1 for a in range(3) if flips[a]]
        if dims:
            x, y = x.flip(dims), y.flip(dims)
        return x.contiguous(), y.contiguous()


class NiftiVolumeDataModule(SplitLoaders, LightningDataModule):
    r"""3D segmentation of one NIfTI volume and its label map, split into slabs along one axis.

    The volume is read with ``nibabel``, optionally averaged down by ``downsample`` (an integer factor per axis;
    labels take the majority through one-hot averaging), z-scored with the **training slab's** statistics, and
    cut along ``split_axis`` into three slabs: the first ``train_fraction`` of the slices for training, the next
    ``val_fraction`` for validation, the rest for testing, so no test voxel is ever in a training patch. Training
    batches are ``num_train_patches`` fixed random patches of ``patch_size`` (positions and mirror flips drawn
    once from ``seed``; with probability ``foreground_prob`` a patch is centred on a foreground voxel, nnU-Net's
    oversampling of 0.33); validation and test batches are whole slabs ``(1, 1, D, H, W)`` for sliding-window
    inference. Batches are ``(image (B, 1, D, H, W) float, label (B, 1, D, H, W) long)``.

    Args:
        image: path of the image volume (``.nii`` or ``.nii.gz``).
        label: path of the label volume (integer class ids on the same grid).
        downsample: integer averaging factor (1: keep the resolution).
        patch_size: training patch side lengths (each at most the training slab's side).
        num_train_patches: training patches per epoch.
        foreground_prob: share of patches centred on foreground.
        split_axis: the axis cut into slabs (2: the volume's last axis, z for RAS files).
        train_fraction: share of the slices for training (taken first along the axis).
        val_fraction: share of the slices for validation (next); the rest is the test slab.
        seed: seed of the patches.
        batch_size, num_workers, shuffle, shuffle_seed: the training loader.

    Example:
        >>> import nibabel, numpy as np, tempfile, os
        >>> d = tempfile.mkdtemp()
        >>> img = np.random.default_rng(0).random((16, 16, 40)).astype("float32")
        >>> nibabel.save(nibabel.Nifti1Image(img, np.eye(4)), os.path.join(d, "i.nii.gz"))
        >>> nibabel.save(nibabel.Nifti1Image((img > 0.5).astype("uint8"), np.eye(4)), os.path.join(d, "l.nii.gz"))
        >>> dm = NiftiVolumeDataModule(os.path.join(d, "i.nii.gz"), os.path.join(d, "l.nii.gz"),
        ...                            patch_size=[8, 8, 8], num_train_patches=4, batch_size=2)
        >>> dm.setup()
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> tuple(x.shape), tuple(next(iter(dm.test_dataloader()))[0].shape)
        ((2, 1, 8, 8, 8), (1, 1, 16, 16, 16))
    """

    #: how many classes the label volume holds (set by ``setup``).
    num_classes: Optional[int] = None

    def __init__(self, image: Optional[str] = None, label: Optional[str] = None, downsample: PositiveInt = 1,
                 patch_size: list[PositiveInt] = [32, 32, 32],  # noqa: B006 - read only, YAML-visible default
                 num_train_patches: PositiveInt = 256, foreground_prob: ClosedUnitInterval = 0.33,
                 split_axis: NonNegativeInt = 2, train_fraction: OpenUnitInterval = 0.5,
                 val_fraction: OpenUnitInterval = 0.1, seed: NonNegativeInt = 0, batch_size: PositiveInt = 2,
                 num_workers: NonNegativeInt = 0, shuffle: bool = True, shuffle_seed: NonNegativeInt = 0) -> None:
        super().__init__()
        check_positive_int("downsample", downsample)
        if len(patch_size) != 3:
            raise ValueError(f"`patch_size` needs 3 sides (D, H, W), got {patch_size!r}.")
        for p in patch_size:
            check_positive_int("patch_size", p)
        check_positive_int("num_train_patches", num_train_patches)
        check_fraction("foreground_prob", foreground_prob)
        check_number("split_axis", split_axis, low=0, high=2, integer=True)
        check_fraction("train_fraction", train_fraction, allow_zero=False, allow_one=False)
        check_fraction("val_fraction", val_fraction, allow_zero=False, allow_one=False)
        if train_fraction + val_fraction >= 1:
            raise ValueError(f"`train_fraction` + `val_fraction` = {train_fraction + val_fraction:g} leaves no test "
                             "slab; make their sum < 1.")
        check_number("seed", seed, low=0, integer=True)
        check_positive_int("batch_size", batch_size)
        check_number("num_workers", num_workers, low=0, integer=True)
        check_number("shuffle_seed", shuffle_seed, low=0, integer=True)
        require("nibabel", type(self).__name__)
        self.image_path, self.label_path = image, label
        self.downsample, self.patch_size = downsample, tuple(int(p) for p in patch_size)
        self.num_train_patches, self.foreground_prob, self.split_axis = num_train_patches, foreground_prob, split_axis
        self.train_fraction, self.val_fraction, self.seed = train_fraction, val_fraction, seed
        self.batch_size, self.num_workers, self.shuffle, self.shuffle_seed = batch_size, num_workers, shuffle, shuffle_seed
        self._splits: dict[str, Dataset] = {}

    def load_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """The image and the integer label volume, full resolution (subclasses read their own files)."""
        if self.image_path is None or self.label_path is None:
            raise ValueError(f"{type(self).__name__} needs `image` and `label`: the paths of a NIfTI volume and its "
                             "label map.")
        owner = type(self).__name__
        image, label = _load_nifti(Path(self.image_path), owner), _load_nifti(Path(self.label_path), owner)
        if image.shape != label.shape:
            raise ValueError(f"{owner}: the image {image.shape} and the label {label.shape} are on different grids; "
                             "resample the label onto the image grid.")
        if not np.allclose(label, np.round(label)) or label.min() < 0:
            raise ValueError(f"{owner}: the label volume must hold non-negative integer class ids.")
        return image, label.round().astype(np.int64)

    @override
    def setup(self, stage: Optional[str] = None) -> None:
        """Read, downsample, normalise and split the volume; draw the training patches."""
        if self._splits:
            return
        image, label = self.load_arrays()
        x = torch.from_numpy(np.ascontiguousarray(image))[None, None]
        y = torch.from_numpy(np.ascontiguousarray(label))
        classes = int(y.max()) + 1
        if self.downsample > 1:
            k = self.downsample
            x = F.avg_pool3d(x, k)
            onehot = F.one_hot(y, classes).permute(3, 0, 1, 2).float()[None]
            y = F.avg_pool3d(onehot, k).argmax(1)[0]
        x, y = x[0], y[None]  # (1, D, H, W) each
        n = x.shape[1 + self.split_axis]
        a, b = round(n * self.train_fraction), round(n * (self.train_fraction + self.val_fraction))
        if min(a, b - a, n - b) < 1:
            raise ValueError(f"{n} slices along axis {self.split_axis} leave an empty slab with train_fraction="
                             f"{self.train_fraction} and val_fraction={self.val_fraction}.")
        cut = lambda t, lo, hi: t.narrow(1 + self.split_axis, lo, hi - lo)  # noqa: E731
        train_x = cut(x, 0, a)
        too_big = [p for p, s in zip(self.patch_size, train_x.shape[1:]) if p > s]
        if too_big:
            raise ValueError(f"patch_size {list(self.patch_size)} is larger than the training slab "
                             f"{list(train_x.shape[1:])}; use a smaller patch_size or a larger train_fraction.")
        mean, std = train_x.mean(), train_x.std().clamp_min(1e-6)
        norm = lambda t: ((t - mean) / std).float()  # noqa: E731
        self.num_classes = classes
        self._splits = {
            "train": _Patches(norm(train_x), cut(y, 0, a), self.patch_size, self.num_train_patches,
                              self.foreground_prob, self.seed),
            "val": [(norm(cut(x, a, b)), cut(y, a, b))],
            "test": [(norm(cut(x, b, n)), cut(y, b, n))],
        }

    def split_dataset(self, split: str):
        """The patches (train) or the one slab (val, test) of ``split``."""
        if not self._splits:
            raise RuntimeError(f"Call {type(self).__name__}.setup() before asking for data.")
        return self._splits[split]

    @override
    def val_dataloader(self):
        """The validation slab, one volume per batch."""
        return torch.utils.data.DataLoader(self.split_dataset("val"), batch_size=1)

    @override
    def test_dataloader(self):
        """The test slab, one volume per batch."""
        return torch.utils.data.DataLoader(self.split_dataset("test"), batch_size=1)


def _package_file(package: str, relative: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)  # located, never imported
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"The template ships in the {package} package: `{install}`.")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {package}; reinstall it with `{install}`.")
    return path


class MNI152TissueDataModule(NiftiVolumeDataModule):
    r"""Brain tissue segmentation (background / grey matter / white matter) of the real MNI152 T1 template, offline.

    Files: nilearn's bundled MNI152-2009a T1 (197x233x189, 1 mm) and its grey- and white-matter probability maps
    (``nilearn/datasets/data/mni_icbm152_*_tal_nlin_sym_09a_converted.nii.gz``; the package is located, never
    imported: ``pip install --no-deps nilearn``). Labels are :math:`\arg\max(1 - p_{GM} - p_{WM}, p_{GM},
    p_{WM})` at full resolution (80% / 13% / 7% of voxels), then the volume is downsampled and cut into slabs
    as in :class:`NiftiVolumeDataModule` (defaults: 2 mm, the bottom half of the axial slices for training, the
    next 10% for validation, the top 40% for testing; the spec's smallest STU-Net experiment).

    Args: as :class:`NiftiVolumeDataModule` (without ``image``/``label``), ``downsample`` defaulting to 2.

    Example:
        >>> dm = MNI152TissueDataModule(num_train_patches=2)
        >>> dm.setup()
        >>> dm.num_classes, tuple(next(iter(dm.test_dataloader()))[0].shape)
        (3, (1, 1, 98, 116, 38))
    """

    INSTALL = "pip install --no-deps nilearn==0.14.1"

    def __init__(self, downsample: PositiveInt = 2, patch_size: list[PositiveInt] = [32, 32, 32],  # noqa: B006
                 num_train_patches: PositiveInt = 256, foreground_prob: ClosedUnitInterval = 0.33,
                 split_axis: NonNegativeInt = 2, train_fraction: OpenUnitInterval = 0.5,
                 val_fraction: OpenUnitInterval = 0.1, seed: NonNegativeInt = 0, batch_size: PositiveInt = 2,
                 num_workers: NonNegativeInt = 0, shuffle: bool = True, shuffle_seed: NonNegativeInt = 0) -> None:
        super().__init__(None, None, downsample, patch_size, num_train_patches, foreground_prob, split_axis,
                         train_fraction, val_fraction, seed, batch_size, num_workers, shuffle, shuffle_seed)

    @override
    def load_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """The T1 and argmax(background, GM, WM) from the probability maps."""
        base = "datasets/data/mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
        t1, gm, wm = (_load_nifti(_package_file("nilearn", base.format(k), self.INSTALL), type(self).__name__)
                      for k in ("t1", "gm", "wm"))
        gm, wm = gm / 255.0, wm / 255.0
        return t1, np.stack([1.0 - gm - wm, gm, wm]).argmax(0)


class Colin27BrainMaskDataModule(NiftiVolumeDataModule):
    r"""Brain extraction (brain vs not) on the real Colin27 single-subject T1, offline.

    Files: Debian ``mricron-data``'s ``/usr/share/mricron/templates/ch2.nii.gz`` (181x217x181 T1, 1 mm) and the
    label ``ch2bet.nii.gz > 0`` (its brain-extracted copy; 26% of voxels). A second real volume for transfer:
    a model trained on :class:`MNI152TissueDataModule` is fine-tuned here. Defaults follow the spec's transfer
    check: 2 mm, few training patches (``num_train_patches=8``) from the lower half, validation on the next 10%,
    test on the top 40%.

    Args:
        root: the folder holding ``ch2.nii.gz`` and ``ch2bet.nii.gz``.
        others: as :class:`NiftiVolumeDataModule`.

    Example:
        >>> dm = Colin27BrainMaskDataModule(num_train_patches=2)
        >>> dm.setup()
        >>> dm.num_classes
        2
    """

    def __init__(self, root: str = "/usr/share/mricron/templates", downsample: PositiveInt = 2,
                 patch_size: list[PositiveInt] = [32, 32, 32],  # noqa: B006
                 num_train_patches: PositiveInt = 8, foreground_prob: ClosedUnitInterval = 0.33,
                 split_axis: NonNegativeInt = 2, train_fraction: OpenUnitInterval = 0.5,
                 val_fraction: OpenUnitInterval = 0.1, seed: NonNegativeInt = 0, batch_size: PositiveInt = 2,
                 num_workers: NonNegativeInt = 0, shuffle: bool = True, shuffle_seed: NonNegativeInt = 0) -> None:
        super().__init__(None, None, downsample, patch_size, num_train_patches, foreground_prob, split_axis,
                         train_fraction, val_fraction, seed, batch_size, num_workers, shuffle, shuffle_seed)
        self.root = root

    @override
    def load_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """The T1 and ``ch2bet > 0``."""
        root = Path(self.root)
        if not (root / "ch2.nii.gz").is_file():
            raise FileNotFoundError(f"{root / 'ch2.nii.gz'} is missing: install Debian's mricron-data "
                                    "(`apt-get install mricron-data`) or pass `root` to the folder holding ch2.nii.gz.")
        owner = type(self).__name__
        t1, bet = _load_nifti(root / "ch2.nii.gz", owner), _load_nifti(root / "ch2bet.nii.gz", owner)
        return t1, (bet > 0).astype(np.int64)
