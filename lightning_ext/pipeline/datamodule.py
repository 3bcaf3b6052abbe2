"""``StagedPipelineDataModule``: a real multi-stage input pipeline whose CPU allocation can change mid-run."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional, get_args

import numpy as np
from lightning.pytorch import LightningDataModule
from typing_extensions import override

from lightning_ext.core.optional import require
from lightning_ext.core.validation import (
    NonNegativeFloat, NonNegativeInt, PositiveInt, UnitIntervalRightOpen, check_choice, check_fraction,
    check_non_negative, check_number, check_positive_int,
)
from lightning_ext.pipeline.staged import Allocation, MPContext, ReconfigureMode, Stage, StagedPipeline
from lightning_ext.pipeline.workloads import (
    WORKLOADS, Workload, default_cache_dir, fashion_mnist_png_stages, movielens_rows_stages, synthetic_stages,
    write_fashion_mnist_pngs, write_movielens_rows,
)
from lightning_ext.core.paths import check_path_argument


class _IndexMap:
    """First-stage wrapper: pipeline position -> dataset index of this split."""

    def __init__(self, indices: np.ndarray, fn) -> None:
        self.indices, self.fn = indices, fn

    def __call__(self, k: int):
        return self.fn(int(self.indices[k]))


class StagedPipelineDataModule(LightningDataModule):
    """A staged input pipeline (read, decode/parse, augment/featurize) on torchdata nodes, tunable mid-run.

    Each stage has its own worker pool whose size, like the prefetch depth, can change while training runs
    (:class:`~lightning_ext.callbacks.PipelineTuner` does this); every training sample of an epoch is
    delivered exactly once whatever the allocation does, and a mid-epoch checkpoint resumes at the next
    unused batch (Lightning saves the pipeline's ``state_dict``). Two real workloads
    (:mod:`lightning_ext.pipeline.workloads`):

    - ``"fashion_mnist_png"``: Fashion-MNIST written once as PNG files (stages read / decode / augment);
      batches ``(x, y)``, ``x`` of shape ``(B, 1, 28, 28)``; the official test images are the test split.
    - ``"movielens_rows"``: MovieLens-100K ratings joined with user and movie attributes as text rows
      (stages read / parse / featurize with feature hashing); batches ``(x, y)``, ``x`` of shape
      ``(B, 3 + hash_buckets)``, ``y = rating >= 4``; a seeded 10 % of rows is the test split.
    - ``"synthetic"``: seeded random vectors with ``synthetic_cpu_ms`` of CPU work per sample (stages read /
      transform); ``x`` of shape ``(B, 8)`` with ``x[:, 0]`` the sample index (to count deliveries).

    Validation is a seeded ``val_fraction`` of the training pool. Under DDP each rank reads its shard of one
    seeded permutation per epoch. Users with their own stages subclass and override :meth:`build_stages`.

    Args:
        workload: ``"fashion_mnist_png"``, ``"movielens_rows"`` or ``"synthetic"``.
        batch_size: samples per batch (per process under DDP).
        workers: initial workers per stage by name (missing stages get 1), e.g. ``{"read": 2, "decode": 1}``.
        prefetch: initial prefetch depth (batches).
        train_samples: use the first ``train_samples`` samples of the training pool (``None``: all).
        test_samples: use the first ``test_samples`` samples of the test pool (``None``: all).
        val_fraction: share of the training pool held out for validation.
        augment: random crop and flip for training images.
        read_latency_ms: sleep added to every read, emulating remote storage.
        hash_buckets: hashed categorical columns of the tabular workload.
        synthetic_cpu_ms: CPU milliseconds per sample in the synthetic workload's transform stage.
        seed: seed of the splits, the per-epoch shuffle and the augmentations.
        shuffle: shuffle the training samples every epoch.
        drop_last: drop the last incomplete training batch.
        cache_dir: where the PNG files / text rows are cached (default: ``core.paths.cache_root("pipeline")``, i.e.
            ``$LIGHTNING_EXT_CACHE/pipeline`` or ``~/.cache/lightning_ext/pipeline``); a cached folder is reused only
            when it is complete.
        data_dir: where the Fashion-MNIST IDX files are (default: the usual search paths); when given, only this
            folder is used (a missing or incomplete one is refused, naming it) and cached PNG files written from
            another copy are rewritten.
        pin_memory: add a PinMemory node (CUDA only).
        multiprocessing_context: start method of process stages (``None``: the OS default).
        reconfigure_mode: how the training pipeline applies a new allocation: ``"resize"`` (default: the
            stages' thread / process pools and the prefetch depth change in place, nothing dropped), ``"drain"``
            (a new graph starts while the old one hands out up to its prefetch depth) or ``"restart"`` (the work
            in flight is lost).

    Example:
        >>> dm = StagedPipelineDataModule("movielens_rows", batch_size=32, train_samples=256)  # doctest: +SKIP
        >>> dm.prepare_data(); dm.setup("fit")  # doctest: +SKIP
        >>> next(iter(dm.train_dataloader()))[0].shape  # doctest: +SKIP
        torch.Size([32, 67])
    """

    def __init__(
        self,
        workload: Workload = "fashion_mnist_png",
        batch_size: PositiveInt = 64,
        workers: Optional[dict[str, NonNegativeInt]] = None,
        prefetch: PositiveInt = 2,
        train_samples: Optional[PositiveInt] = 10000,
        test_samples: Optional[PositiveInt] = 2000,
        val_fraction: UnitIntervalRightOpen = 0.1,
        augment: bool = True,
        read_latency_ms: NonNegativeFloat = 0.0,
        hash_buckets: PositiveInt = 64,
        synthetic_cpu_ms: NonNegativeFloat = 0.0,
        seed: NonNegativeInt = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        cache_dir: Optional[str] = None,
        data_dir: Optional[str] = None,
        pin_memory: bool = False,
        multiprocessing_context: Optional[MPContext] = None,
        reconfigure_mode: ReconfigureMode = "resize",
    ) -> None:
        super().__init__()
        require("torchdata", "StagedPipelineDataModule")
        check_choice("workload", workload, WORKLOADS)
        for name, value in (("batch_size", batch_size), ("prefetch", prefetch), ("hash_buckets", hash_buckets)):
            check_positive_int(name, value)
        check_fraction("val_fraction", val_fraction, allow_one=False)
        for name, n in (("train_samples", train_samples), ("test_samples", test_samples)):
            if n is not None:
                check_positive_int(f"{name} (or None for all)", n)
        check_non_negative("read_latency_ms", read_latency_ms)
        check_non_negative("synthetic_cpu_ms", synthetic_cpu_ms)
        for stage, n in (workers or {}).items():
            check_number(f"workers[{stage!r}]", n, low=0, integer=True)
        check_number("seed", seed, low=0, integer=True)
        check_path_argument("cache_dir", cache_dir)
        check_path_argument("data_dir", data_dir)
        if multiprocessing_context is not None:
            check_choice("multiprocessing_context", multiprocessing_context, get_args(MPContext))
        check_choice("reconfigure_mode", reconfigure_mode, get_args(ReconfigureMode))
        self.reconfigure_mode = reconfigure_mode
        if workload == "fashion_mnist_png" and data_dir:
            from lightning_ext.data.fashion_mnist import find_fashion_mnist

            find_fashion_mnist(data_dir)  # an explicit folder is used or refused now, naming it
        if cache_dir is not None and Path(cache_dir).expanduser().is_file():
            raise ValueError(f"cache_dir must be a folder, got the file {cache_dir!r}; pass a folder or None.")
        self.workload, self.batch_size, self.workers, self.prefetch = workload, batch_size, dict(workers or {}), prefetch
        self.train_samples, self.test_samples, self.val_fraction = train_samples, test_samples, val_fraction
        self.augment, self.read_latency_ms, self.hash_buckets = augment, read_latency_ms, hash_buckets
        self.synthetic_cpu_ms = synthetic_cpu_ms
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.data_dir, self.pin_memory, self.multiprocessing_context = data_dir, pin_memory, multiprocessing_context
        if workload == "fashion_mnist_png":
            self.num_classes, self.input_shape = 10, (1, 28, 28)
        elif workload == "synthetic":
            self.num_classes, self.input_shape = 2, (8,)
        else:
            self.num_classes, self.input_shape = 2, (3 + hash_buckets,)
        self.num_features = int(np.prod(self.input_shape))
        self._folders: dict[str, Path] = {}
        self._splits: dict[str, np.ndarray] = {}
        self.train_pipeline: Optional[StagedPipeline] = None

    # -- data ----------------------------------------------------------------------------------------------
    @override
    def prepare_data(self) -> None:
        """Write the workload's files into the cache once (PNG files, text rows)."""
        self._write_files()

    def _write_files(self) -> None:
        if self._folders:
            return
        if self.workload == "synthetic":
            self._folders = {"train": self.cache_dir, "test": self.cache_dir}
        elif self.workload == "fashion_mnist_png":
            self._folders = {
                "train": write_fashion_mnist_pngs(self.cache_dir, "train", self.train_samples, self.data_dir),
                "test": write_fashion_mnist_pngs(self.cache_dir, "test", self.test_samples, self.data_dir),
            }
        else:
            folder = write_movielens_rows(self.cache_dir)
            self._folders = {"train": folder, "test": folder}

    @override
    def setup(self, stage: Optional[str] = None) -> None:
        """Seeded train / val / test splits of the workload (every rank)."""
        if self._splits:
            return
        self._write_files()  # every rank: prepare_data may have run elsewhere, writing is idempotent
        rng = np.random.default_rng(self.seed)
        if self.workload == "synthetic":
            n_train = self.train_samples or 10000
            pool = rng.permutation(n_train)
            test = np.arange(n_train, n_train + (self.test_samples or 2000))
        elif self.workload == "fashion_mnist_png":
            n_train = len(np.load(self._folders["train"] / "labels.npy"))
            test = np.arange(len(np.load(self._folders["test"] / "labels.npy")))
            pool = rng.permutation(n_train)
        else:
            n_rows = len(np.load(self._folders["train"] / "offsets.npy")) - 1
            order = rng.permutation(n_rows)
            n_test = n_rows // 10
            test, pool = np.sort(order[:n_test]), order[n_test:]
            if self.train_samples is not None:
                pool = pool[: self.train_samples]
            if self.test_samples is not None:
                test = test[: self.test_samples]
        n_val = int(round(self.val_fraction * len(pool)))
        self._splits = {"train": np.sort(pool[n_val:]), "val": np.sort(pool[:n_val]), "test": test}
        if len(self._splits["train"]) == 0:
            raise ValueError("The training split is empty; raise `train_samples` or lower `val_fraction`.")

    def build_stages(self, split: str) -> list[Stage]:
        """The stages reading one split (dataset indices in, ``(x, y)`` samples out)."""
        folder = self._folders["test" if split == "test" else "train"]
        if self.workload == "synthetic":
            return synthetic_stages(self.read_latency_ms, self.synthetic_cpu_ms, self.seed)
        if self.workload == "fashion_mnist_png":
            return fashion_mnist_png_stages(folder, self.augment and split == "train", self.read_latency_ms, self.seed)
        return movielens_rows_stages(folder, self.read_latency_ms, self.hash_buckets)

    def initial_allocation(self, stages: list[Stage]) -> Allocation:
        unknown = set(self.workers) - {s.name for s in stages}
        if unknown:
            raise ValueError(f"`workers` names unknown stages {sorted(unknown)}; the stages are "
                             f"{[s.name for s in stages]}.")
        return Allocation(tuple(int(self.workers.get(s.name, max(1, s.min_workers))) for s in stages), self.prefetch)

    def _pipeline(self, split: str) -> StagedPipeline:
        if not self._splits:
            raise RuntimeError(f"{type(self).__name__}: call setup() before asking for a dataloader.")
        indices = self._splits[split]
        if len(indices) == 0:
            raise RuntimeError(f"{type(self).__name__}: the {split} split is empty; raise its size.")
        stages = self.build_stages(split)
        stages[0] = dataclasses.replace(stages[0], fn=_IndexMap(indices, stages[0].fn))
        train = split == "train"
        rank, world = 0, 1
        trainer = getattr(self, "trainer", None)
        if train and trainer is not None:
            rank, world = trainer.global_rank, trainer.world_size
        return StagedPipeline(
            len(indices), stages, self.batch_size, allocation=self.initial_allocation(stages),
            shuffle=self.shuffle and train, seed=self.seed, drop_last=self.drop_last and train, rank=rank,
            world_size=world, pin_memory=self.pin_memory, multiprocessing_context=self.multiprocessing_context,
            reconfigure_mode=self.reconfigure_mode,
        )

    @override
    def train_dataloader(self) -> StagedPipeline:
        """A fresh training pipeline (the previous one is closed), sharded over ranks."""
        if self.train_pipeline is not None:
            self.train_pipeline.close()
        self.train_pipeline = self._pipeline("train")
        return self.train_pipeline

    @override
    def val_dataloader(self) -> StagedPipeline:
        """The validation pipeline (no shuffling)."""
        return self._pipeline("val")

    @override
    def test_dataloader(self) -> StagedPipeline:
        """The test pipeline (no shuffling)."""
        return self._pipeline("test")

    @override
    def predict_dataloader(self) -> StagedPipeline:
        """The test split, for prediction."""
        return self._pipeline("test")

    @override
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Count a training batch as consumed, so a checkpoint resumes after it."""
        # trainers fetch a batch ahead; a checkpoint must resume after the last batch *trained on*
        trainer = getattr(self, "trainer", None)
        if self.train_pipeline is not None and trainer is not None and trainer.training:
            self.train_pipeline.mark_consumed()
        return batch

    @override
    def teardown(self, stage: Optional[str] = None) -> None:
        """Stop the training pipeline's workers."""
        if self.train_pipeline is not None:
            self.train_pipeline.close()
