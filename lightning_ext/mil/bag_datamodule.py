"""``BagDataModule``: bags of real image instances (digits, MNIST, Fashion-MNIST) for multiple-instance learning."""

from __future__ import annotations

import math
from typing import Literal, Optional

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor, nn
from torch.utils.data import Dataset
from typing_extensions import override

from lightning_ext.core.sampling import SplitLoaders
from lightning_ext.core.validation import (
    NonNegativeInt,
    OpenUnitInterval,
    PositiveInt,
    check_choice,
    check_fraction,
    check_number,
    check_positive_int,
)
from lightning_ext.mil.bags import Bags

__all__ = ["BagDataModule", "grid_adjacent"]

Task = Literal["contains", "both", "adjacent"]
DEFAULT_TARGETS = {"contains": [9], "both": [3, 7], "adjacent": [7]}
SOURCES = ("digits", "mnist5k", "fashion_mnist")


def grid_adjacent(positions: np.ndarray, side: int) -> bool:
    """Whether any two of ``positions`` (row-major cells of a ``side x side`` grid) share an edge.

    Example:
        >>> grid_adjacent(np.array([0, 1]), 4), grid_adjacent(np.array([0, 5]), 4), grid_adjacent(np.array([3, 4]), 4)
        (True, False, False)
    """
    cells = {(int(p) // side, int(p) % side) for p in positions}
    return any((r + 1, c) in cells or (r, c + 1) in cells for r, c in cells)


class _BagDataset(Dataset):
    def __init__(self, table: Tensor, index: Tensor, lengths: Tensor, labels: Tensor) -> None:
        self.table, self.index, self.lengths, self.labels = table, index, lengths, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Bags, Tensor]:
        features = self.table[self.index[i]]
        features[int(self.lengths[i]):] = 0.0  # padding: zeros (the aggregators mask it)
        return Bags(features, self.lengths[i]), self.labels[i]


class BagDataModule(SplitLoaders, LightningDataModule):
    r"""Binary multiple-instance bags built from a real image dataset, split at the instance level.

    Instances come from the train / validation / test split of ``source`` (``"digits"``: scikit-learn's 8x8
    digits; ``"mnist5k"``; ``"fashion_mnist"``), so a test bag never holds an image seen in training. Each
    instance is described by its standardised pixels or, with ``feature_extractor``, by a frozen network's
    output (run once, without gradients, in eval mode), which is how whole-slide pipelines pre-extract patch
    features. Bag labels (``task``; class ids of ``source``):

    - ``"contains"``: positive iff the bag holds an instance of ``targets`` (default ``[9]``; the classic MIL
      assumption of Ilse et al.'s MNIST-bags). Positives hold 1 to ``max(1, n // 10)`` such instances.
    - ``"both"``: positive iff it holds both ``targets[0]`` and ``targets[1]`` (default 3 and 7); every negative
      holds one of the two (hard negatives), so a model must relate instances (TransMIL's correlated MIL).
    - ``"adjacent"``: every bag holds 2 to 4 instances of ``targets[0]`` (default 7) and is positive iff two of
      them are edge neighbours on the bag's ``H x H`` row-major grid; sizes are perfect squares, so the grid is
      the one TransMIL's PPEG sees and counting instances cannot solve the task.

    Bag sizes :math:`n` are uniform in ``[min_instances, max_instances]``; a share ``positive_fraction`` of bags
    is positive; instance order is random. Bags are drawn once per split from ``bag_seed`` (the same on every
    rank); training order comes from :class:`~lightning_ext.core.sampling.EpochSampler` (sharded under DDP,
    resumable mid-epoch). Batches are ``(Bags(features (B, max_instances, D), lengths (B,)), y)``.
    ``instance_labels(split)`` gives each bag's instance classes (padding ``-1``) for instance-level analysis.

    Args:
        source: the image dataset the instances come from.
        task: the bag-labelling rule above.
        targets: the class ids the rule uses (``None``: the defaults above).
        min_instances: smallest bag.
        max_instances: largest bag.
        train_bags: bags drawn from the training instances.
        val_bags: bags drawn from the validation instances.
        test_bags: bags drawn from the test instances.
        positive_fraction: share of positive bags, in (0, 1).
        feature_extractor: a frozen ``nn.Module`` mapping image batches to features (``None``: pixels).
        bag_seed: seed of the bag draws.
        split_seed: seed of the source's train/val/test split.
        batch_size: bags per batch (the official TransMIL trains with 1).
        num_workers: DataLoader workers.
        shuffle: shuffle training bags every epoch.
        shuffle_seed: seed of that shuffle.

    Example:
        >>> dm = BagDataModule(task="contains", train_bags=20, val_bags=4, test_bags=4, batch_size=4)
        >>> dm.setup()
        >>> bags, y = next(iter(dm.train_dataloader()))
        >>> tuple(bags.features.shape), dm.in_features, y.shape
        ((4, 64, 64), 64, torch.Size([4]))
    """

    num_classes = 2

    def __init__(
        self,
        source: Literal["digits", "mnist5k", "fashion_mnist"] = "digits",
        task: Task = "contains",
        targets: Optional[list[int]] = None,
        min_instances: PositiveInt = 16,
        max_instances: PositiveInt = 64,
        train_bags: PositiveInt = 1000,
        val_bags: PositiveInt = 200,
        test_bags: PositiveInt = 500,
        positive_fraction: OpenUnitInterval = 0.5,
        feature_extractor: Optional[nn.Module] = None,
        bag_seed: int = 0,
        split_seed: int = 0,
        batch_size: PositiveInt = 1,
        num_workers: NonNegativeInt = 0,
        shuffle: bool = True,
        shuffle_seed: int = 0,
    ) -> None:
        super().__init__()
        check_choice("source", source, SOURCES)
        check_choice("task", task, ("contains", "both", "adjacent"))
        for name, value in (("min_instances", min_instances), ("max_instances", max_instances),
                            ("train_bags", train_bags), ("val_bags", val_bags), ("test_bags", test_bags),
                            ("batch_size", batch_size)):
            check_positive_int(name, value)
        check_number("num_workers", num_workers, low=0, integer=True)
        for name, seed in (("bag_seed", bag_seed), ("split_seed", split_seed), ("shuffle_seed", shuffle_seed)):
            check_number(name, seed, integer=True)
        check_fraction("positive_fraction", positive_fraction, allow_zero=False, allow_one=False)
        if min_instances > max_instances:
            raise ValueError(f"min_instances ({min_instances}) exceeds max_instances ({max_instances}); swap them.")
        targets = list(DEFAULT_TARGETS[task] if targets is None else targets)
        need = 2 if task == "both" else 1
        if task != "contains" and len(targets) != need:
            raise ValueError(f"task={task!r} uses exactly {need} target class(es); got targets={targets}.")
        if not targets or len(set(targets)) != len(targets):
            raise ValueError(f"targets must be distinct class ids; got {targets}.")
        if task == "adjacent":
            squares = [s * s for s in range(1, math.isqrt(max_instances) + 1) if s * s >= min_instances]
            if not squares or max(squares) < 4:
                raise ValueError(f"task='adjacent' uses square bags of at least 4 instances; no square lies in "
                                 f"[{min_instances}, {max_instances}]: raise max_instances to at least "
                                 f"{max(4, math.ceil(math.sqrt(min_instances)) ** 2)}.")
        if task == "contains" and min_instances < 1:
            raise ValueError("min_instances must be at least 1.")
        self.source, self.task, self.targets = source, task, targets
        self.min_instances, self.max_instances = min_instances, max_instances
        self.sizes = {"train": train_bags, "val": val_bags, "test": test_bags}
        self.positive_fraction, self.feature_extractor = positive_fraction, feature_extractor
        self.bag_seed, self.split_seed = bag_seed, split_seed
        self.batch_size, self.num_workers, self.shuffle, self.shuffle_seed = batch_size, num_workers, shuffle, shuffle_seed
        self.in_features: Optional[int] = None
        self.datasets: dict[str, _BagDataset] = {}
        self._instance_classes: dict[str, np.ndarray] = {}
        self._images: dict[str, Tensor] = {}

    # -- instances -------------------------------------------------------------------------------------------
    def _source_module(self) -> LightningDataModule:
        if self.source == "digits":
            from lightning_ext.data.digits import DigitsDataModule as cls
        elif self.source == "mnist5k":
            from lightning_ext.data.mnist5k import MNIST5kDataModule as cls
        else:
            from lightning_ext.data.fashion_mnist import FashionMNISTDataModule as cls
        return cls(split_seed=self.split_seed)

    @torch.no_grad()
    def _features(self, images: Tensor) -> Tensor:
        if self.feature_extractor is None:
            return images.flatten(1)
        net = self.feature_extractor.eval()
        for p in net.parameters():
            p.requires_grad_(False)
        out = torch.cat([net(images[i:i + 512]) for i in range(0, len(images), 512)]).flatten(1)
        if not torch.isfinite(out).all():
            raise ValueError("The feature_extractor produced non-finite features; check its weights and inputs.")
        return out

    # -- bags ------------------------------------------------------------------------------------------------
    def _bag_sizes(self, rng: np.random.Generator, count: int) -> np.ndarray:
        if self.task == "adjacent":
            squares = np.array([s * s for s in range(2, math.isqrt(self.max_instances) + 1)
                                if s * s >= self.min_instances])
            return rng.choice(squares, size=count)
        return rng.integers(self.min_instances, self.max_instances + 1, size=count)

    def _draw(self, classes: np.ndarray, count: int, rng: np.random.Generator) -> tuple[list[np.ndarray], np.ndarray]:
        by_class = {c: np.flatnonzero(classes == c) for c in self.targets}
        missing = [c for c, idx in by_class.items() if len(idx) == 0]
        if missing:
            raise ValueError(f"The {self.source} split has no instance of class(es) {missing}; targets must be "
                             f"class ids present in {self.source}.")
        background = np.flatnonzero(~np.isin(classes, self.targets))
        bags, labels = [], (rng.random(count) < self.positive_fraction).astype(np.int64)
        for n, positive in zip(self._bag_sizes(rng, count), labels):
            n = int(n)
            cap = max(1, n // 10)
            if self.task == "contains":
                k = int(rng.integers(1, cap + 1)) if positive else 0
                special = rng.choice(np.concatenate([by_class[c] for c in self.targets]), size=k)
            elif self.task == "both":
                a, b = (by_class[c] for c in self.targets)
                if positive:
                    special = np.concatenate([rng.choice(a, int(rng.integers(1, cap + 1))),
                                              rng.choice(b, int(rng.integers(1, cap + 1)))])
                else:
                    special = rng.choice(a if rng.random() < 0.5 else b, int(rng.integers(1, cap + 1)))
            else:
                k, side = int(rng.integers(2, 5)), math.isqrt(n)
                while True:  # rejection: positions whose adjacency matches the label
                    cells = rng.choice(n, size=k, replace=False)
                    if grid_adjacent(cells, side) == bool(positive):
                        break
                bag = rng.choice(background, size=n)
                bag[cells] = rng.choice(by_class[self.targets[0]], size=k)
                bags.append(bag)
                continue
            bag = np.concatenate([rng.choice(background, size=n - len(special)), special])
            bags.append(bag[rng.permutation(n)])
        return bags, labels

    @override
    def setup(self, stage: Optional[str] = None) -> None:
        """Load the source once, extract instance features per split and draw the bags (identical on every rank)."""
        if self.datasets:
            return
        source = self._source_module()
        source.setup()
        sets = {"train": source.train_set, "val": source.val_set, "test": source.test_set}
        for i, (split, data) in enumerate(sets.items()):
            images, classes = data.tensors
            table = self._features(images)
            self.in_features = table.shape[1]
            rng = np.random.default_rng([self.bag_seed, i])
            bags, labels = self._draw(classes.numpy(), self.sizes[split], rng)
            index = torch.zeros(len(bags), self.max_instances, dtype=torch.long)
            inst = np.full((len(bags), self.max_instances), -1, dtype=np.int64)
            for b, bag in enumerate(bags):
                index[b, :len(bag)] = torch.as_tensor(bag)
                inst[b, :len(bag)] = classes.numpy()[bag]
            lengths = torch.as_tensor([len(b) for b in bags], dtype=torch.long)
            self.datasets[split] = _BagDataset(table, index, lengths, torch.as_tensor(labels))
            self._instance_classes[split] = inst
            self._images[split] = images  # the source's tensor, not a copy: for sample images

    @property
    def train_set(self) -> _BagDataset:
        """The training bags (after ``setup``)."""
        return self.datasets["train"]

    def instance_labels(self, split: Literal["train", "val", "test"] = "test") -> np.ndarray:
        """Each bag's instance classes ``(bags, max_instances)``, ``-1`` for padding (after ``setup``)."""
        return self._instance_classes[split]

    def bag_images(self, split: Literal["train", "val", "test"], bag: int) -> Tensor:
        """The images ``(n, C, H, W)`` of bag ``bag``'s ``n`` instances of ``split``, in bag order (after ``setup``)."""
        if split not in self._images:
            raise RuntimeError("BagDataModule: call setup() before asking for bag images.")
        dataset = self.datasets[split]
        return self._images[split][dataset.index[bag, :int(dataset.lengths[bag])]]

    # -- loaders ---------------------------------------------------------------------------------------------
    def split_dataset(self, split: str) -> Dataset:
        """The bags of ``split`` (after ``setup``)."""
        if split not in self.datasets:
            raise RuntimeError("BagDataModule: call setup() before asking for a dataloader.")
        return self.datasets[split]
