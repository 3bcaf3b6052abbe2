"""FederatedDataModule: one client's share of any in-memory DataModule's training split."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Subset
from typing_extensions import override

from lightning_ext.core.sampling import epoch_loader
from lightning_ext.core.validation import NonNegativeInt, PositiveFloat, PositiveInt, check_number, check_positive_int
from lightning_ext.federated.partition import Partitioner, partition


def _labels(dataset: Any) -> np.ndarray:
    tensors = getattr(dataset, "tensors", None)
    if tensors is not None and len(tensors) >= 2:
        return tensors[1].cpu().numpy()
    return np.asarray([int(dataset[i][1]) for i in range(len(dataset))])


class FederatedDataModule(LightningDataModule):
    """One federated client's view of a DataModule: its partition of the training split (IID or Dirichlet label skew).

    The wrapped DataModule is set up once; its training split is partitioned across ``num_clients`` with
    :func:`~lightning_ext.federated.partition.partition` (seeded by ``partition_seed``, so every client process
    computes the same partition) and this module serves partition ``partition_id`` only. Validation and test stay
    the wrapped module's (the global held-out splits), unless ``partition_eval=True`` partitions them IID too,
    giving each client its own local evaluation set. ``num_classes`` and ``input_shape`` are passed through.

    Args:
        datamodule: the DataModule to partition (it must hold its training split as a dataset after ``setup``).
        num_clients: number of partitions.
        partition_id: which partition this client holds, in ``[0, num_clients)``.
        partitioner: ``"iid"`` or ``"dirichlet"``.
        alpha: Dirichlet concentration (smaller = more label skew); used by ``"dirichlet"``.
        min_partition_size: the Dirichlet draw is repeated until every client has at least this many samples.
        partition_seed: seed of the partition (the same on every client).
        partition_eval: also split validation and test IID across clients.
        batch_size: batch size; ``None`` takes the wrapped module's ``batch_size``.
        shuffle_seed: seed of the per-epoch training order.

    Example:
        >>> from lightning_ext.data.digits import DigitsDataModule
        >>> dm = FederatedDataModule(DigitsDataModule(), num_clients=4, partition_id=1)
        >>> dm.setup()
        >>> len(dm.train_set), dm.num_classes
        (323, 10)
    """

    def __init__(
        self,
        datamodule: LightningDataModule,
        num_clients: PositiveInt = 2,
        partition_id: NonNegativeInt = 0,
        partitioner: Partitioner = "iid",
        alpha: PositiveFloat = 0.5,
        min_partition_size: PositiveInt = 1,
        partition_seed: int = 0,
        partition_eval: bool = False,
        batch_size: Optional[PositiveInt] = None,
        shuffle_seed: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(datamodule, LightningDataModule):
            raise TypeError(f"datamodule must be a LightningDataModule, got {type(datamodule).__name__}.")
        check_positive_int("num_clients", num_clients)
        check_number("partition_id", partition_id, low=0, integer=True)
        if partition_id >= num_clients:
            raise ValueError(f"partition_id={partition_id} must be below num_clients={num_clients}.")
        if partitioner not in ("iid", "dirichlet"):
            raise ValueError(f"partitioner={partitioner!r} is unknown; choose 'iid' or 'dirichlet'.")
        check_number("alpha (the Dirichlet concentration; e.g. 0.5)", alpha, low=0, low_open=True)
        check_positive_int("min_partition_size", min_partition_size)
        check_number("partition_seed", partition_seed, integer=True)
        check_number("shuffle_seed", shuffle_seed, integer=True)
        if batch_size is not None:
            check_positive_int("batch_size", batch_size)
        self.datamodule, self.num_clients, self.partition_id = datamodule, num_clients, partition_id
        self.partitioner, self.alpha, self.min_partition_size = partitioner, alpha, min_partition_size
        self.partition_seed, self.partition_eval, self.shuffle_seed = partition_seed, partition_eval, shuffle_seed
        self.batch_size = batch_size if batch_size is not None else getattr(datamodule, "batch_size", 32)
        self.num_classes = getattr(datamodule, "num_classes", None)
        self.input_shape = getattr(datamodule, "input_shape", None)
        self.train_set = self.val_set = self.test_set = None

    def _split(self, dataset: Any, how: str) -> Subset:
        labels = _labels(dataset)
        parts = partition(labels, self.num_clients, how, self.alpha, self.partition_seed,
                          self.min_partition_size if how == "dirichlet" else 1)
        idx = parts[self.partition_id]
        if len(idx) == 0:
            raise ValueError(f"client {self.partition_id}'s partition is empty; raise alpha or lower num_clients.")
        return Subset(dataset, idx.tolist())

    @override
    def setup(self, stage: Optional[str] = None) -> None:
        """Set up the wrapped DataModule once and keep this client's partition of its splits."""
        if self.train_set is not None:
            return
        self.datamodule.setup(stage)
        split = {name: getattr(self.datamodule, f"{name}_set", None) for name in ("train", "val", "test")}
        if split["train"] is None:
            split["train"] = self.datamodule.train_dataloader().dataset
        self.train_set = self._split(split["train"], self.partitioner)
        for name in ("val", "test"):
            data = split[name]
            if data is not None and self.partition_eval and len(data) >= self.num_clients:
                data = self._split(data, "iid")
            setattr(self, f"{name}_set", data)

    def label_counts(self) -> list[int]:
        """Training samples per class in this client's partition (after ``setup``)."""
        labels = _labels(self.train_set.dataset)[self.train_set.indices]
        return np.bincount(labels, minlength=self.num_classes or int(labels.max()) + 1).tolist()

    @override
    def train_dataloader(self) -> DataLoader:
        """Seeded per-epoch shuffled batches of this client's partition (resumable mid-epoch)."""
        return epoch_loader(self.train_set, self.batch_size, train=True, trainer=getattr(self, "trainer", None),
                            seed=self.shuffle_seed)

    @override
    def val_dataloader(self) -> DataLoader:
        """The validation split (this client's share with ``partition_eval``)."""
        return self._eval(self.val_set if self.val_set is not None else self.datamodule.val_dataloader().dataset)

    @override
    def test_dataloader(self) -> DataLoader:
        """The test split (this client's share with ``partition_eval``)."""
        return self._eval(self.test_set if self.test_set is not None else self.datamodule.test_dataloader().dataset)

    def _eval(self, dataset: Any) -> DataLoader:
        return epoch_loader(dataset, self.batch_size, train=False)


