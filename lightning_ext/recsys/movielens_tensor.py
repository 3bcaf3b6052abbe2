"""MovieLens-100K as a sparse (user, movie, week) rating tensor, and DAIN's influence-augmented version of it."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, Sequence, get_args

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import TensorDataset
from typing_extensions import override

from lightning_ext.core.sampling import epoch_loader
from lightning_ext.core.validation import (
    NonNegativeInt, PositiveFloat, PositiveInt, check_choice, check_number, check_positive, check_positive_int,
)
from lightning_ext.data.movielens100k import find_ml100k_inter, read_inter_file
from lightning_ext.recsys.movielens100k import MovieLens100KDataModule

#: the tensor modes MovieLens-100K offers
Mode = Literal["user", "item", "week", "day"]
#: how augmented cells are drawn: DAIN's entity importance, or uniform entities (the "random" baseline)
AugmentStrategy = Literal["influence", "random"]


class TensorCompletionDataModule(LightningDataModule):
    """MovieLens-100K ratings as cells of a sparse tensor: ``(cells (B, order), rating (B,))`` batches, random split.

    Each of the 100,000 ratings (recbole's ``ml-100k.inter``) is a cell indexed by ``modes``: ``"user"`` (943),
    ``"item"`` (1,682), ``"week"`` (31: weeks since the first rating) or ``"day"`` (215). The cells are split at
    random by ``split`` (DAIN's ``src/main.py``: 90/10 train/test, then 20% of train to validation = 72/18/10), with
    ``split_seed`` (the official split is unseeded). :attr:`dims` gives each mode's size.

    Args:
        modes: the tensor modes, in order (at least two, no repeats).
        split: train / validation / test shares, summing to 1.
        split_seed: seed of the split.
        batch_size: cells per batch.
        shuffle_seed: seed of the per-epoch order.
        path: the ``.inter`` file (default: inside the recbole package).

    Example:
        >>> dm = TensorCompletionDataModule()  # doctest: +SKIP
        >>> dm.setup(); dm.dims, len(dm.train_set)  # doctest: +SKIP
        ([943, 1682, 31], 72000)
    """

    def __init__(self, modes: Sequence[Mode] = ("user", "item", "week"), split: Sequence[float] = (0.72, 0.18, 0.10),
                 split_seed: int = 0, batch_size: PositiveInt = 1024, shuffle_seed: int = 0,
                 path: Optional[str] = None, num_workers: NonNegativeInt = 0) -> None:
        super().__init__()
        modes = list(modes)
        for m in modes:
            check_choice("every modes entry", m, get_args(Mode))
        if len(modes) < 2 or len(set(modes)) != len(modes):
            raise ValueError(f"modes must name at least two different tensor modes, e.g. [user, item, week], got {modes}.")
        split = [float(s) for s in split]
        if len(split) != 3 or min(split) <= 0 or abs(sum(split) - 1) > 1e-6:
            raise ValueError(f"split must be three positive shares (train, val, test) summing to 1, got {split}.")
        check_number("split_seed", split_seed, integer=True)
        check_positive_int("batch_size", batch_size)
        check_number("shuffle_seed", shuffle_seed, integer=True)
        check_number("num_workers", num_workers, low=0, integer=True)
        self.modes, self.split, self.split_seed = modes, split, split_seed
        self.batch_size, self.shuffle_seed, self.num_workers = batch_size, shuffle_seed, num_workers
        self.path = path or str(find_ml100k_inter())
        self.dims: Optional[list[int]] = None
        self.train_set = self.val_set = self.test_set = None
        self.augmented_cells = 0

    def load_cells(self) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """``(cells (N, order) int64, values (N,) float32, dims)`` of the whole tensor."""
        nu, ni = MovieLens100KDataModule.NUM_USERS, MovieLens100KDataModule.NUM_ITEMS
        raw = read_inter_file(Path(self.path), nu, ni)
        t = raw[:, 3] - raw[:, 3].min()
        columns = {"user": (raw[:, 0] - 1, nu), "item": (raw[:, 1] - 1, ni),
                   "week": (t // (7 * 86400), None), "day": (t // 86400, None)}
        cells, dims = [], []
        for m in self.modes:
            col, size = columns[m]
            cells.append(col.astype(np.int64))
            dims.append(int(size if size is not None else col.max() + 1))
        return np.stack(cells, 1), raw[:, 2].astype(np.float32), dims

    @override
    def setup(self, stage: Optional[str] = None) -> None:
        """Read and split the cells once."""
        if self.train_set is not None:
            return
        cells, values, dims = self.load_cells()
        from lightning_ext.recsys.dain import check_dims

        self.dims = list(check_dims(dims))
        order = np.random.default_rng(self.split_seed).permutation(len(cells))
        cut = np.cumsum([round(s * len(cells)) for s in self.split[:2]])
        make = lambda idx: TensorDataset(torch.as_tensor(cells[idx]), torch.as_tensor(values[idx]))  # noqa: E731
        self.train_set, self.val_set, self.test_set = (make(p) for p in np.split(order, cut))
        self.train_mean = float(values[order[:cut[0]]].mean())

    def _loader(self, dataset, train: bool):
        return epoch_loader(dataset, self.batch_size, train=train, trainer=getattr(self, "trainer", None),
                            seed=self.shuffle_seed, num_workers=self.num_workers)

    @override
    def train_dataloader(self):
        """Training cells, shuffled per epoch (resumable mid-epoch)."""
        return self._loader(self.train_set, True)

    @override
    def val_dataloader(self):
        """Validation cells, in order."""
        return self._loader(self.val_set, False)

    @override
    def test_dataloader(self):
        """Test cells, in order."""
        return self._loader(self.test_set, False)


class InfluenceAugmentedDataModule(TensorCompletionDataModule):
    """DAIN's augmentation (Oh et al., CIKM 2021): training cells plus cells drawn by entity importance, labelled by the teacher.

    Reads the file :class:`~lightning_ext.recsys.dain.InfluenceCollector` wrote after the first fit (cell
    importance, training cells, the best weights), checks that its training cells are this DataModule's, then
    draws ``ratio · |train|`` cells: each mode's index independently from
    :func:`~lightning_ext.recsys.dain.entity_importance` (``strategy="influence"``) or uniformly
    (``"random"``, the baseline), with ``augment_seed``; the teacher (:class:`~lightning_ext.recsys.dain.TensorMLP`
    with the saved weights) predicts their values. Training serves train ∪ augmented; validation and test are
    unchanged. ``use_abs=False`` (only helpful cells count) and ``dedupe=True`` (no observed or repeated cell) give
    the "clean" variant; the official code is ``use_abs=True, dedupe=False``.

    Args:
        influence_path: the collector's file.
        strategy: ``"influence"`` or ``"random"``.
        ratio: augmented cells per training cell (official 0.5).
        use_abs: entity importance from ``|I(c)|`` (official) instead of ``max(I(c), 0)``.
        dedupe: drop augmented cells that are observed training cells or repeats.
        augment_seed: seed of the draw.
        **kwargs: :class:`TensorCompletionDataModule` arguments (the same split as the first fit).
    """

    def __init__(self, influence_path: str, strategy: AugmentStrategy = "influence", ratio: PositiveFloat = 0.5,
                 use_abs: bool = True, dedupe: bool = False, augment_seed: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        from lightning_ext.core.paths import check_path_argument

        check_path_argument("influence_path", influence_path)
        check_choice("strategy", strategy, get_args(AugmentStrategy))
        check_positive("ratio", ratio)
        check_number("augment_seed", augment_seed, integer=True)
        self.influence_path, self.strategy, self.ratio = influence_path, strategy, ratio
        self.use_abs, self.dedupe, self.augment_seed = bool(use_abs), bool(dedupe), augment_seed

    @override
    def setup(self, stage: Optional[str] = None) -> None:
        """Split as the base, then draw, label and append the augmented cells (once)."""
        if self.train_set is not None:
            return
        super().setup(stage)
        from lightning_ext.core.checkpoints import load_checkpoint
        from lightning_ext.core.validation import check_finite_tensors
        from lightning_ext.recsys.dain import TensorMLP, entity_importance, sample_cells

        saved = load_checkpoint(self.influence_path, "DAIN influence file", "influence_path")
        missing = {"importance", "cells", "dims", "layers", "state_dict"} - saved.keys()
        if missing:
            raise ValueError(f"{self.influence_path} is not an InfluenceCollector file (missing {sorted(missing)}).")
        cells, values = self.train_set.tensors
        if list(saved["dims"]) != self.dims or not torch.equal(saved["cells"], cells):
            raise ValueError(f"{self.influence_path} was computed on other training cells (another split, split_seed "
                             "or modes); use the first fit's DataModule arguments.")
        teacher = TensorMLP(self.dims, saved["layers"])
        teacher.load_state_dict(check_finite_tensors(dict(saved["state_dict"]), str(self.influence_path)))
        teacher.eval()
        if self.strategy == "influence":
            dists = entity_importance(cells, saved["importance"], self.dims, self.use_abs)
        else:
            dists = [torch.full((d,), 1.0 / d, dtype=torch.float64) for d in self.dims]
        gen = torch.Generator().manual_seed(self.augment_seed)
        n = int(self.ratio * len(cells))
        new = sample_cells(dists, n, gen, exclude=cells if self.dedupe else None)
        labels = teacher.predict(new).float()
        self.augmented_cells = len(new)
        self.train_set = TensorDataset(torch.cat([cells, new]), torch.cat([values, labels]))
