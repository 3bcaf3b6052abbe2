"""``MultiTaskDataModule``: unlabelled inputs of several tasks, one batch of each per step, for test-time merging."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any, Literal, Optional, Union, get_args

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torch.utils.data._utils.collate import default_collate
from typing_extensions import override

from lightning_ext.core.sampling import EpochSampler
from lightning_ext.core.validation import NonNegativeInt, PositiveInt, check_choice, check_number, check_positive_int

__all__ = ["MultiTaskDataModule", "prepare_images"]

#: A split of the tasks' DataModules.
Split = Literal["train", "val", "test"]
SPLITS = get_args(Split)


def prepare_images(x: Tensor, image_size: Optional[Sequence[int]] = None, in_chans: Optional[int] = None) -> Tensor:
    """Resize a batch of images ``(B, C, H, W)`` bilinearly to ``image_size`` and repeat a single channel to
    ``in_chans`` (grayscale to RGB-shaped input); ``None`` leaves that aspect as it is.

    Example:
        >>> prepare_images(torch.zeros(2, 1, 8, 8), image_size=(32, 32), in_chans=3).shape
        torch.Size([2, 3, 32, 32])
    """
    if image_size is None and in_chans is None:
        return x
    if x.dim() != 4:
        raise ValueError(f"`image_size`/`in_chans` apply to image batches (B, C, H, W); got shape {tuple(x.shape)}.")
    if image_size is not None and tuple(x.shape[-2:]) != tuple(image_size):
        x = F.interpolate(x.float(), size=tuple(int(s) for s in image_size), mode="bilinear", align_corners=False,
                          antialias=bool(x.shape[-1] > image_size[-1]))
    if in_chans is not None and x.shape[1] != in_chans:
        if x.shape[1] != 1:
            raise ValueError(f"Cannot turn {x.shape[1]}-channel images into {in_chans} channels; only 1 -> N is supported.")
        x = x.expand(-1, in_chans, -1, -1).contiguous()
    return x


def _seed(*parts: int) -> int:
    digest = hashlib.sha256(":".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _inputs_of(dataset: Dataset, indices: Tensor) -> Tensor:
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[0][indices]
    items = [dataset[int(i)] for i in indices]
    return torch.stack([item[0] if isinstance(item, (tuple, list)) else item for item in items])


class _RoundRobinSteps(Dataset):
    """Item ``epoch * steps + step`` is ``[(inputs of task k, k) for each task]``; each task's inputs come from a
    stream of seeded permutations of that task's dataset, so an epoch is a deterministic function of its number."""

    def __init__(self, datasets: Sequence[Dataset], batch_size: int, steps: int, seed: int,
                 image_size: Optional[Sequence[int]], in_chans: Optional[int]) -> None:
        self.datasets = list(datasets)
        self.sizes = [len(d) for d in self.datasets]
        self.batch_size, self.steps, self.seed = batch_size, steps, seed
        self.image_size, self.in_chans = image_size, in_chans

    def __len__(self) -> int:
        return self.steps

    def _positions(self, task: int, global_step: int) -> Tensor:
        n = self.sizes[task]
        start = global_step * self.batch_size
        out, pos = [], start
        while pos < start + self.batch_size:
            cycle, offset = divmod(pos, n)
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(_seed(self.seed, task, cycle)))
            take = min(n - offset, start + self.batch_size - pos)
            out.append(perm[offset:offset + take])
            pos += take
        return torch.cat(out)

    def __getitem__(self, index: int) -> list[tuple[Tensor, int]]:
        batch = []
        for task, dataset in enumerate(self.datasets):
            x = _inputs_of(dataset, self._positions(task, int(index)))
            batch.append((prepare_images(x, self.image_size, self.in_chans), task))
        return batch


class _StepSampler(EpochSampler):
    """:class:`~lightning_ext.core.sampling.EpochSampler` over the steps of an epoch, unshuffled and offset by the
    epoch: it yields the global step numbers ``epoch * length + step`` (rank ``r`` of ``W`` takes steps
    ``r, r + W, ...``, padded by wrapping so every rank runs as many steps).

    The plain sampler yields ``0..length-1`` every epoch; :class:`_RoundRobinSteps` needs the global step, because
    each task's inputs come from a stream of seeded permutations indexed by it (so an epoch's batches are a
    function of its number, and every epoch sees new inputs). As a ``DistributedSampler``, Lightning neither wraps
    nor shuffles it and calls its ``set_epoch``. With ``W`` ranks and batch ``B / W``, the ranks together see
    exactly the inputs one process sees with batch ``B`` (when ``length`` is a multiple of ``W``).
    """

    def __init__(self, length: int, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(length, shuffle=False, rank=rank, world_size=num_replicas)

    @override
    def indices(self) -> np.ndarray:
        """This rank's global step numbers for the current epoch (read when iteration starts)."""
        return super().indices() + self.epoch * self.num_samples_total


class _Collate:
    def __init__(self, image_size: Optional[Sequence[int]], in_chans: Optional[int]) -> None:
        self.image_size, self.in_chans = image_size, in_chans

    def __call__(self, items: list) -> Any:
        batch = default_collate(items)
        if isinstance(batch, (tuple, list)):
            return [prepare_images(batch[0], self.image_size, self.in_chans), *batch[1:]]
        return prepare_images(batch, self.image_size, self.in_chans)


class MultiTaskDataModule(LightningDataModule):
    """Unlabelled inputs of several tasks (one batch of each task per step, with its task id) for test-time merging.

    Built from one DataModule per task (ours or any that yields ``(x, y)`` batches). Training batches are what
    AdaMerging adapts on: for each step a list ``[(x_0, 0), (x_1, 1), ...]`` with ``batch_size`` inputs of every
    task from split ``adapt_split`` and **no labels** (the paper adapts on the unlabelled test inputs, hence the
    default ``"test"``; use ``"val"`` to keep the test split unseen). Each task's inputs come from a stream of
    seeded permutations, so every epoch is deterministic and a resumed run sees the same batches. Validation
    and test loaders are one labelled ``(x, y)`` loader per task, in task order (``dataloader_idx`` = task id),
    to measure each task's accuracy.

    ``image_size``/``in_chans`` resize images bilinearly and repeat grayscale channels, so tasks of different
    resolutions feed one network (e.g. 8x8 digits and 28x28 MNIST as 3x32x32 for an ImageNet CNN).

    Args:
        tasks: one LightningDataModule per task (YAML: a list of ``class_path``/``init_args``).
        task_names: names for logs (default: the DataModule class names, numbered when repeated).
        adapt_split: split whose inputs (without labels) are served for adaptation: ``"test"``, ``"val"`` or ``"train"``.
        batch_size: inputs per task per step (32: the official code sums two batches of 16 per task).
        eval_batch_size: batch size of the labelled validation/test loaders.
        steps_per_epoch: steps per epoch (default: enough to see the largest task's split once). Under DDP the ranks
            share these steps (rank ``r`` of ``W`` runs steps ``r, r + W, ...``), so ``W`` processes with
            ``batch_size / W`` and ``steps_per_epoch`` see the inputs one process sees with ``batch_size`` and
            ``steps_per_epoch / W``.
        image_size: resize images to this (int or ``[height, width]``); ``None`` keeps them.
        in_chans: repeat single-channel images to this many channels; ``None`` keeps them.
        seed: seed of the permutations.
        num_workers: DataLoader workers of every loader. With workers, the training loader takes its indices when
            the epoch's iterator is made, so a run resumed from a checkpoint may repeat an earlier epoch's order;
            keep 0 (the batches are cheap to build) where exact resumption matters.

    Example:
        >>> from lightning_ext.datamodules import DigitsDataModule
        >>> dm = MultiTaskDataModule([DigitsDataModule(), DigitsDataModule(split_seed=1)], batch_size=8)
        >>> dm.setup("fit")
        >>> step = next(iter(dm.train_dataloader()))
        >>> [(tuple(x.shape), task) for x, task in step], dm.task_names
        ([((8, 1, 8, 8), 0), ((8, 1, 8, 8), 1)], ['DigitsDataModule0', 'DigitsDataModule1'])
    """

    def __init__(
        self,
        tasks: list[LightningDataModule],
        task_names: Optional[list[str]] = None,
        adapt_split: Split = "test",
        batch_size: PositiveInt = 32,
        eval_batch_size: PositiveInt = 256,
        steps_per_epoch: Optional[PositiveInt] = None,
        image_size: Optional[Union[PositiveInt, list[PositiveInt]]] = None,
        in_chans: Optional[PositiveInt] = None,
        seed: int = 0,
        num_workers: NonNegativeInt = 0,
    ) -> None:
        super().__init__()
        if not tasks:
            raise ValueError("`tasks` must list at least one DataModule (one per task).")
        if not all(isinstance(t, LightningDataModule) for t in tasks):
            raise TypeError("`tasks` must be LightningDataModules (YAML: class_path/init_args entries).")
        check_choice("adapt_split", adapt_split, SPLITS)
        check_positive_int("batch_size", batch_size)
        check_positive_int("eval_batch_size", eval_batch_size)
        if steps_per_epoch is not None:
            check_positive_int("steps_per_epoch", steps_per_epoch)
        if in_chans is not None:
            check_positive_int("in_chans", in_chans)
        check_number("num_workers", num_workers, low=0, integer=True)
        check_number("seed", seed, integer=True)
        if isinstance(image_size, int):
            image_size = [image_size, image_size]
        if image_size is not None:
            if len(image_size) != 2:
                raise ValueError(f"image_size must be an int or [height, width], got {image_size}.")
            for size in image_size:
                check_positive_int("image_size", size)
        self.tasks = list(tasks)
        if task_names is None:
            names = [type(t).__name__ for t in self.tasks]
            task_names = [f"{n}{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]
        if len(task_names) != len(self.tasks) or len(set(task_names)) != len(task_names):
            raise ValueError(f"`task_names` must be {len(self.tasks)} distinct names, got {task_names}.")
        self.task_names = [str(n) for n in task_names]
        self.adapt_split = adapt_split
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.steps_per_epoch = steps_per_epoch
        self.image_size = tuple(image_size) if image_size is not None else None
        self.in_chans = in_chans
        self.seed, self.num_workers = seed, num_workers
        self._datasets: Optional[dict[str, list[Dataset]]] = None

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def num_classes(self) -> list[Optional[int]]:
        """Classes per task (``None`` where a DataModule does not say)."""
        return [getattr(t, "num_classes", None) for t in self.tasks]

    @override
    def prepare_data(self) -> None:
        """Prepare every task's DataModule."""
        for task in self.tasks:
            task.prepare_data()

    @override
    def setup(self, stage: Optional[str] = None) -> None:
        """Set up every task and collect its train/val/test datasets (once)."""
        if self._datasets is not None:
            return
        datasets: dict[str, list[Dataset]] = {s: [] for s in SPLITS}
        for name, task in zip(self.task_names, self.tasks):
            task.setup("fit")
            task.setup("test")
            for split in SPLITS:
                try:
                    loader = getattr(task, f"{split}_dataloader")()
                except Exception as err:  # noqa: BLE001 - re-raised with the task's name
                    if split == self.adapt_split or split != "train":
                        raise ValueError(f"Task {name!r} ({type(task).__name__}) has no usable {split} split: {err}") from err
                    datasets[split].append(None)  # type: ignore[arg-type]
                    continue
                if isinstance(loader, (list, tuple)):
                    raise ValueError(f"Task {name!r} has several {split} dataloaders; give one DataModule per task.")
                datasets[split].append(loader.dataset)
        for name, ds in zip(self.task_names, datasets[self.adapt_split]):
            if len(ds) == 0:
                raise ValueError(f"Task {name!r} has an empty {self.adapt_split} split; nothing to adapt on.")
        self._datasets = datasets

    def _require(self) -> dict[str, list[Dataset]]:
        if self._datasets is None:
            raise RuntimeError("MultiTaskDataModule: call setup() first.")
        return self._datasets

    @override
    def train_dataloader(self) -> DataLoader:
        """One step per item: ``[(inputs of task k, k) for each task]``, sharded across ranks by step."""
        datasets = self._require()[self.adapt_split]
        steps = self.steps_per_epoch or max(-(-len(d) // self.batch_size) for d in datasets)
        dataset = _RoundRobinSteps(datasets, self.batch_size, steps, self.seed, self.image_size, self.in_chans)
        world, rank = 1, 0
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            world, rank = trainer.world_size, trainer.global_rank
        return DataLoader(dataset, batch_size=None, sampler=_StepSampler(steps, world, rank), num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def _eval_loaders(self, split: str) -> list[DataLoader]:
        collate = _Collate(self.image_size, self.in_chans)
        return [DataLoader(d, batch_size=self.eval_batch_size, shuffle=False, collate_fn=collate,
                           num_workers=self.num_workers) for d in self._require()[split]]

    @override
    def val_dataloader(self) -> list[DataLoader]:
        """One labelled loader per task, in task order."""
        return self._eval_loaders("val")

    @override
    def test_dataloader(self) -> list[DataLoader]:
        """One labelled loader per task, in task order."""
        return self._eval_loaders("test")

    def eval_dataloader(self, task: int, split: Split = "test") -> DataLoader:
        """The labelled loader of one task's ``split`` (for evaluation outside a Trainer)."""
        check_choice("split", split, SPLITS)
        return self._eval_loaders(split)[task]

    def unlabelled_dataloader(self, task: int, split: Optional[str] = None, batch_size: Optional[int] = None,
                              shuffle: bool = True) -> DataLoader:
        """Inputs only (no labels) of one task's ``split`` (default ``adapt_split``), e.g. for
        :func:`~lightning_ext.merging.ada_merging.fit_ada_merging`."""
        dataset = self._require()[split or self.adapt_split][task]
        generator = torch.Generator().manual_seed(_seed(self.seed, task, 10**6))
        return DataLoader(_InputsOnly(dataset), batch_size=batch_size or self.batch_size, shuffle=shuffle,
                          generator=generator, collate_fn=_Collate(self.image_size, self.in_chans), drop_last=False)


class _InputsOnly(Dataset):
    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Tensor:
        item = self.dataset[index]
        return item[0] if isinstance(item, (tuple, list)) else item
