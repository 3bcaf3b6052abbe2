"""``FilteredDataModule``: any LightningDataModule with its training split curated by a data scorer."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from typing_extensions import override

from lightning_ext.core.validation import UnitIntervalLeftOpen
from lightning_ext.core.io import atomic_path, atomic_write_json
from lightning_ext.core.paths import cache_root, output_path
from lightning_ext.core.sampling import EpochSampler, ResumableDataLoader
from lightning_ext.core.validation import NonNegativeInt, PositiveInt, check_number
from lightning_ext.curation.base import Scorer, Scores, ScoringData, check_seed, count_to_keep, fingerprint
from lightning_ext.core.paths import check_path_argument

#: attributes under which datamodules commonly hold their training dataset (replaced by the filtered one)
TRAIN_ATTRIBUTES = ("train_set", "train_dataset", "dataset_train", "data_train")


class FilteredDataModuleError(ValueError):
    """The filter would leave the training split unusable (an emptied class, nothing kept)."""


def subset(dataset: Dataset, kept: np.ndarray) -> Dataset:
    """The kept samples: a TensorDataset stays a TensorDataset (sliced tensors), anything else is a Subset."""
    if isinstance(dataset, TensorDataset):
        idx = torch.as_tensor(kept, dtype=torch.long)
        return TensorDataset(*(t[idx] for t in dataset.tensors))
    return Subset(dataset, [int(i) for i in kept])


class FilteredDataModule(LightningDataModule):
    """Any LightningDataModule with its training split curated by a data scorer; validation and test untouched.

    In ``setup("fit")`` the wrapped datamodule is set up, its training split is scored by ``scorer`` (see
    :mod:`lightning_ext.curation`: random, EL2N, DFN, SemDeDup, SSP prototypicality, density-based pruning,
    DP4TL, rule filters, compute-aware selection) and ``keep`` samples survive. Then:

    - **Cache.** Scores are saved to ``cache_dir/<scorer>-<fingerprint>.npz`` (written atomically), keyed by
      a hash of the data (every sample, or the user's ``data_version``) and the scorer's configuration
      (including model weights), so a rerun or a different ``keep`` does not rescore; changing any sample or
      any scorer argument does. The cache outlives runs, so
      it does not live in the run's directory: a relative ``cache_dir`` lies under
      ``core.paths.cache_root("curation")`` (``$LIGHTNING_EXT_CACHE/curation``, default
      ``~/.cache/lightning_ext/curation``), an absolute one is used as given, ``None`` disables the cache.
      A cache file that cannot be read or does not fit the pool is ignored (with a warning) and rewritten.
    - **DDP.** Rank 0 scores and selects; the kept indices are broadcast, so every rank trains on the same
      subset (and the wrapped datamodule's sampler shards it as usual).
    - **Survivors.** Samples kept per class are logged (``rank_zero_info``, and the trainer's logger as the
      hyperparameters ``filter/kept_class_<c>``) and stored in :attr:`survivors`.
    - **Export.** ``export_path`` (relative to ``trainer.log_dir``; ``None``, the default, skips it) receives
      a JSON file with the kept indices (positions in the wrapped training split), per-class counts, the
      scorer configuration and the fingerprint.
    - **No silent emptying.** A class that ends with fewer than ``min_per_class`` samples raises
      :class:`FilteredDataModuleError` saying what to change (set ``min_per_class: 0`` where dropping classes
      is the point, as with DP4TL).

    The wrapped datamodule's own attributes (``num_classes``, ``input_shape``, ...) are readable here too.
    If it keeps its training dataset in ``train_set``/``train_dataset``/``dataset_train``/``data_train``,
    that attribute is swapped for the subset and its own ``train_dataloader`` is used (its sampler, batch
    size and workers); otherwise a loader with the same settings and a seeded
    :class:`~lightning_ext.core.sampling.EpochSampler` is built.
    Optional ``train_metadata`` on the wrapped datamodule (a dict of per-sample columns, e.g. captions) is
    passed to the scorer.

    Args:
        datamodule: the datamodule to filter.
        scorer: a :class:`~lightning_ext.curation.base.Scorer`.
        keep: fraction (float in (0, 1]) or number (int) of training samples kept; ``None`` keeps every sample
            the scorer does not reject (pure filters, DP4TL, compute-aware selection).
        class_balanced: split the budget over classes in proportion to their sizes (top scores per class).
        min_per_class: fewest samples any class present in the training split may keep.
        cache_dir: where scores are cached: relative to ``core.paths.cache_root("curation")``, or absolute;
            ``None`` disables the cache.
        export_path: JSON file for the kept indices, relative to ``trainer.log_dir`` (the working directory
            without a trainer), or absolute; ``None`` skips the export.
        shuffle_seed: seed of the training shuffle when this module builds the loader itself.
        data_version: a string that replaces the content hash in the cache key (``None``: every sample is
            hashed, which reads the whole pool once more; pass a version for pools too large for that or with
            random transforms in ``__getitem__``, and change it whenever the data changes).

    Example:
        >>> from lightning_ext.datamodules import DigitsDataModule
        >>> from lightning_ext.curation import RandomScorer
        >>> dm = FilteredDataModule(DigitsDataModule(), RandomScorer(seed=0), keep=0.5, cache_dir=None)
        >>> dm.setup("fit")
        >>> len(dm.kept_indices), dm.num_classes
        (646, 10)
    """

    def __init__(
        self,
        datamodule: LightningDataModule,
        scorer: Scorer,
        keep: Union[PositiveInt, UnitIntervalLeftOpen, None] = None,
        class_balanced: bool = False,
        min_per_class: NonNegativeInt = 1,
        cache_dir: Optional[str] = "scores",
        export_path: Optional[str] = None,
        shuffle_seed: NonNegativeInt = 0,
        data_version: Optional[str] = None,
    ) -> None:
        super().__init__()
        if not isinstance(datamodule, LightningDataModule):
            raise TypeError(f"`datamodule` must be a LightningDataModule, got {type(datamodule).__name__}.")
        if not isinstance(scorer, Scorer):
            raise TypeError(f"`scorer` must be a lightning_ext.curation Scorer, got {type(scorer).__name__}.")
        if keep is not None:  # PositiveInt comes first in the Union: `keep: 1` in YAML is one sample, not 100%
            count_to_keep(keep, 10 ** 12)  # validates the type and range early (NaN and inf included)
        if class_balanced and not scorer.supports_class_balance:
            raise ValueError(f"{type(scorer).__name__} does not support class_balanced=True (it balances "
                             "clusters or keeps whole classes); set class_balanced=False.")
        check_number("min_per_class", min_per_class, low=0, integer=True)
        check_seed(shuffle_seed, "shuffle_seed")
        if data_version is not None and (not isinstance(data_version, str) or not data_version.strip()):
            raise ValueError(f"`data_version` must be a non-empty string naming the data's version (or None to hash "
                             f"every sample), got {data_version!r}.")
        self.data_version = data_version
        self.datamodule, self.scorer, self.keep = datamodule, scorer, keep
        self.class_balanced, self.min_per_class = class_balanced, min_per_class
        self.cache_dir, self.export_path, self.shuffle_seed = cache_dir, export_path, shuffle_seed
        check_path_argument("cache_dir", cache_dir)
        check_path_argument("export_path", export_path)
        self.kept_indices: Optional[np.ndarray] = None
        self.survivors: dict[int, tuple[int, int]] = {}
        self.scores: Optional[Scores] = None
        self.fingerprint: Optional[str] = None
        self.loaded_from_cache = False
        self._train_attr: Optional[str] = None
        self._original: Optional[Dataset] = None
        self._filtered: Optional[Dataset] = None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or "datamodule" not in self.__dict__:
            raise AttributeError(name)
        try:
            return getattr(self.__dict__["datamodule"], name)
        except AttributeError:
            raise AttributeError(f"{type(self).__name__} (and its wrapped datamodule) has no attribute {name!r}") from None

    # -- the training split --------------------------------------------------------------------------------
    def _train_dataset(self) -> Dataset:
        for attr in TRAIN_ATTRIBUTES:
            ds = getattr(self.datamodule, attr, None)
            if isinstance(ds, Dataset):
                self._train_attr = attr
                return ds
        self._train_attr = None
        return self.datamodule.train_dataloader().dataset

    def cache_path(self) -> Optional[Path]:
        """The score cache file of the current fingerprint (``None`` when the cache is disabled)."""
        if self.cache_dir is None:
            return None
        root = Path(self.cache_dir).expanduser()
        root = root if root.is_absolute() else cache_root("curation") / root
        return root / f"{type(self.scorer).__name__}-{self.fingerprint}.npz"

    def _read_cache(self, path: Path, n: int) -> Optional[Scores]:
        """The cached scores, or ``None`` (with a warning) for a file that is unreadable or does not fit the pool."""
        try:
            with np.load(path, allow_pickle=False) as f:
                scores = {k: f[k] for k in f.files}
        except Exception as err:  # noqa: BLE001 - a damaged cache is rescored, never trusted
            rank_zero_warn(f"FilteredDataModule: ignoring the unreadable score cache {path} ({err}); rescoring.")
            return None
        if "score" not in scores or scores["score"].shape != (n,):
            rank_zero_warn(f"FilteredDataModule: the score cache {path} does not hold one score per sample ({n}); "
                           "rescoring.")
            return None
        return scores

    def _score(self, data: ScoringData) -> Scores:
        if self.data_version is None and not isinstance(data.dataset, TensorDataset) and self.cache_dir is not None:
            a = fingerprint(ScoringData(Subset(data.dataset, [0]), labels=data.labels[:1]), {})
            b = fingerprint(ScoringData(Subset(data.dataset, [0]), labels=data.labels[:1]), {})
            if a != b:
                rank_zero_warn("FilteredDataModule: the training dataset returns a different sample 0 on each read "
                               "(random transforms?), so its scores can never be reused from the cache; pass "
                               "`data_version` to key the cache on a version instead.")
        self.fingerprint = fingerprint(data, self.scorer.config(), {"datamodule": type(self.datamodule).__qualname__},
                                       data_version=self.data_version)
        path = self.cache_path()
        if path is not None and path.is_file():
            cached = self._read_cache(path, len(data))
            if cached is not None:
                self.loaded_from_cache = True
                rank_zero_info(f"FilteredDataModule: scores loaded from {path}")
                return cached
        scores = self.scorer.score(data)
        if "score" not in scores or len(scores["score"]) != len(data):
            raise ValueError(f"{type(self.scorer).__name__}.score must return a 'score' array with one value per "
                             f"sample ({len(data)}).")
        scores = {k: np.asarray(v) for k, v in scores.items()}
        if path is not None:
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                np.savez(f, **scores)
        return scores

    def select(self, data: ScoringData) -> np.ndarray:
        """Score (or read the cache) and select; checks the per-class minimum. Runs on rank 0."""
        self.scores = self._score(data)
        n_keep = count_to_keep(self.keep, len(data))
        kept = np.sort(np.asarray(self.scorer.select(self.scores, data, n_keep, self.class_balanced), dtype=np.int64))
        if len(kept) == 0:
            raise FilteredDataModuleError(f"{type(self.scorer).__name__} kept no training sample; raise `keep` or "
                                          "loosen the scorer's rules.")
        total = np.bincount(data.labels, minlength=data.num_classes)
        left = np.bincount(data.labels[kept], minlength=data.num_classes)
        short = [c for c in range(data.num_classes) if total[c] > 0 and left[c] < min(self.min_per_class, total[c])]
        if short:
            detail = ", ".join(f"class {c}: {left[c]} of {total[c]}" for c in short[:10])
            raise FilteredDataModuleError(
                f"Filtering with {type(self.scorer).__name__} leaves fewer than min_per_class={self.min_per_class} "
                f"samples in {len(short)} class(es) ({detail}). Raise `keep`, set `class_balanced: true`, or set "
                "`min_per_class: 0` if dropping these classes is intended (e.g. DP4TL source-class pruning).")
        return kept

    @override
    def setup(self, stage: Optional[str] = None) -> None:
        """Set up the wrapped datamodule; for ``fit``, score and filter its training split (rank 0, broadcast)."""
        self.datamodule.setup(stage)
        if stage not in (None, "fit"):
            return
        if self._filtered is None:
            self._filter()
        if self._train_attr is not None:
            setattr(self.datamodule, self._train_attr, self._filtered)

    def _filter(self) -> None:
        dataset = self._train_dataset()
        self._original = dataset
        trainer = getattr(self, "trainer", None)
        world = trainer.world_size if trainer is not None else 1
        rank = trainer.global_rank if trainer is not None else 0
        kept, survivors = None, None
        if rank == 0:
            meta = getattr(self.datamodule, "train_metadata", None) or {}
            data = ScoringData(dataset, metadata=dict(meta), num_classes=getattr(self.datamodule, "num_classes", None))
            kept = self.select(data)
            total = np.bincount(data.labels, minlength=data.num_classes)
            left = np.bincount(data.labels[kept], minlength=data.num_classes)
            survivors = {c: (int(left[c]), int(total[c])) for c in range(data.num_classes)}
        if world > 1:
            kept, survivors = trainer.strategy.broadcast((kept, survivors), src=0)
        self.kept_indices, self.survivors = np.asarray(kept, dtype=np.int64), survivors
        self._filtered = subset(dataset, self.kept_indices)
        if rank == 0:
            self._report(len(dataset), trainer)

    def _report(self, n_total: int, trainer) -> None:
        lines = [f"FilteredDataModule: {type(self.scorer).__name__} kept {len(self.kept_indices)} of {n_total} "
                 f"training samples ({100 * len(self.kept_indices) / n_total:.1f}%); per class kept/total:"]
        lines += [f"  class {c}: {k}/{t}" for c, (k, t) in self.survivors.items()]
        rank_zero_info("\n".join(lines))
        logger = getattr(trainer, "logger", None) if trainer is not None else None
        if logger is not None:
            params = {"filter/scorer": type(self.scorer).__name__, "filter/kept_total": len(self.kept_indices),
                      "filter/fingerprint": self.fingerprint}
            params.update({f"filter/kept_class_{c}": k for c, (k, _) in self.survivors.items()})
            logger.log_hyperparams(params)
        path = output_path(trainer, self.export_path)
        if path is not None:
            self.export(path, n_total)

    def export(self, path: Union[str, Path], n_total: Optional[int] = None) -> Path:
        """Write the kept indices, per-class survivors, scorer configuration and fingerprint as JSON (atomically,
        to ``path`` as given; :attr:`export_path` is resolved against ``trainer.log_dir`` before it gets here)."""
        if self.kept_indices is None:
            raise RuntimeError("Nothing to export yet: call setup('fit') first.")
        return atomic_write_json({
            "kept_indices": self.kept_indices.tolist(),
            "num_kept": len(self.kept_indices),
            "num_total": n_total if n_total is not None else len(self._original),
            "survivors_per_class": {str(c): {"kept": k, "total": t} for c, (k, t) in self.survivors.items()},
            "scorer": self.scorer.config(),
            "fingerprint": self.fingerprint,
        }, path, indent=1, default=str)

    # -- loaders -------------------------------------------------------------------------------------------
    @override
    def train_dataloader(self) -> DataLoader:
        """The kept samples: the wrapped datamodule's own loader, or one with its settings and an EpochSampler."""
        if self._filtered is None:
            raise RuntimeError("FilteredDataModule: call setup('fit') before train_dataloader().")
        if self._train_attr is not None:
            self.datamodule.trainer = getattr(self, "trainer", None)
            return self.datamodule.train_dataloader()
        original = self.datamodule.train_dataloader()
        trainer = getattr(self, "trainer", None)
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        sampler = EpochSampler(len(self._filtered), seed=self.shuffle_seed, rank=rank, world_size=world)
        return ResumableDataLoader(self._filtered, batch_size=original.batch_size, sampler=sampler,
                                   num_workers=original.num_workers, collate_fn=original.collate_fn,
                                   pin_memory=original.pin_memory, drop_last=original.drop_last)

    @override
    def val_dataloader(self) -> Any:
        """The wrapped datamodule's validation loader, untouched."""
        return self.datamodule.val_dataloader()

    @override
    def test_dataloader(self) -> Any:
        """The wrapped datamodule's test loader, untouched."""
        return self.datamodule.test_dataloader()

    @override
    def predict_dataloader(self) -> Any:
        """The wrapped datamodule's predict loader, untouched."""
        return self.datamodule.predict_dataloader()
