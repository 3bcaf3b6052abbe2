"""``KNNEvaluation``: weighted k-nearest-neighbour accuracy of a model's features, during fit and test."""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from typing_extensions import override

from lightning_ext.core.validation import PositiveFloat, PositiveInt, check_number, check_positive, check_positive_int

__all__ = ["KNNEvaluation", "knn_predict"]


def knn_predict(
    query: Tensor, bank: Tensor, bank_labels: Tensor, num_classes: int, k: int = 20, temperature: float = 0.07,
    chunk_size: int = 1024,
) -> Tensor:
    r"""Weighted kNN class prediction on cosine similarity (Wu et al., CVPR 2018, "InstDisc", eq. 8).

    Each query takes its ``k`` most similar bank features :math:`f_i` (cosine similarity :math:`s_i`); class
    :math:`c` scores :math:`\sum_{i \in \mathrm{top}k} \exp(s_i / \tau)\,[y_i = c]` and the best class wins.
    This is the kNN monitor of solo-learn and lightly (k = 20 or 200, :math:`\tau = 0.07` or 0.1).

    Args:
        query: ``(M, F)`` features to classify.
        bank: ``(N, F)`` features with known labels.
        bank_labels: ``(N,)`` integer labels of ``bank``.
        num_classes: number of classes.
        k: neighbours (clipped to ``N``).
        temperature: :math:`\tau`.
        chunk_size: queries per similarity block (bounds memory to ``chunk_size x N``).

    Returns:
        ``(M,)`` predicted labels.

    Example:
        >>> bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
        >>> knn_predict(torch.tensor([[1.0, 0.05], [0.1, 1.0]]), bank, torch.tensor([0, 0, 1]), 2, k=1)
        tensor([0, 1])
    """
    check_positive_int("k", k)
    check_positive("temperature", temperature)
    if len(bank) == 0:
        raise ValueError("The kNN feature bank is empty.")
    if bank.shape[0] != bank_labels.shape[0]:
        raise ValueError(f"bank has {bank.shape[0]} rows but bank_labels has {bank_labels.shape[0]}.")
    k = min(k, len(bank))
    bank = F.normalize(bank.float(), dim=1)
    preds = []
    for start in range(0, len(query), chunk_size):
        q = F.normalize(query[start:start + chunk_size].float(), dim=1)
        sim, idx = (q @ bank.T).topk(k, dim=1)
        weights = torch.exp(sim / temperature)
        scores = torch.zeros(len(q), num_classes, device=q.device, dtype=weights.dtype)
        scores.scatter_add_(1, bank_labels[idx], weights)
        preds.append(scores.argmax(dim=1))
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long, device=query.device)


class KNNEvaluation(Callback):
    """Weighted kNN accuracy of the model's features: ``val_knn_acc`` each validation, ``test_knn_acc`` on test.

    The feature bank is the training split without augmentation (the datamodule's training dataset, read in
    order, not its shuffled or sharded loader); queries are the validation (or test) split. Features come
    from ``pl_module(x)`` (the self-supervised modules return backbone features), or from the method named
    ``feature_method``. Prediction is :func:`knn_predict`. Under DDP every rank computes the same number on
    the full data (no collective needed; the cost is duplicated rather than split).

    Works with any LightningModule whose ``forward`` (or ``feature_method``) maps an image batch to
    ``(B, F)`` features, and any datamodule whose training and evaluation datasets yield ``(x, y)``.

    Args:
        k: neighbours (solo-learn 20, lightly 200).
        temperature: similarity temperature.
        max_bank_size: use a fixed random subset of this many training samples as the bank (``None``: all).
        batch_size: batch size of the feature passes.
        every_n_epochs: evaluate on every n-th validation epoch.
        feature_method: name of the module's method returning features (``None``: ``forward``).
        seed: seed of the bank subset.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[KNNEvaluation(k=20)])  # doctest: +SKIP
    """

    def __init__(self, k: PositiveInt = 20, temperature: PositiveFloat = 0.07,
                 max_bank_size: Optional[PositiveInt] = None, batch_size: PositiveInt = 512,
                 every_n_epochs: PositiveInt = 1, feature_method: Optional[str] = None, seed: int = 0) -> None:
        for name, value in (("k", k), ("batch_size", batch_size), ("every_n_epochs", every_n_epochs)):
            check_positive_int(name, value)
        check_positive("temperature", temperature)
        if max_bank_size is not None:
            check_positive_int("max_bank_size (or None for the whole training split)", max_bank_size)
        check_number("seed", seed, integer=True)
        self.k, self.temperature, self.max_bank_size = k, temperature, max_bank_size
        self.batch_size, self.every_n_epochs = batch_size, every_n_epochs
        self.feature_method, self.seed = feature_method, seed
        self.history: list[dict[str, float]] = []

    @property
    @override
    def state_key(self) -> str:
        """Identifies this callback's state in checkpoints by ``k``, ``temperature`` and ``max_bank_size``."""
        return self._generate_state_key(k=self.k, temperature=self.temperature, max_bank_size=self.max_bank_size)

    # -- data and features ------------------------------------------------------------------------------------
    @staticmethod
    def _dataset(trainer: Trainer, split: str) -> Dataset:
        dm = trainer.datamodule
        loader: Any = None
        if dm is not None:
            dataset = getattr(dm, f"{split}_set", None)
            if dataset is not None:
                return dataset
            loader = getattr(dm, f"{split}_dataloader")()
        else:
            loader = {"train": trainer.train_dataloader, "val": trainer.val_dataloaders,
                      "test": trainer.test_dataloaders}[split]
        if isinstance(loader, (list, tuple)):
            loader = loader[0] if loader else None
        if not isinstance(loader, DataLoader):
            raise RuntimeError(
                f"KNNEvaluation needs a {split} DataLoader (or a datamodule with a `{split}_set`), found "
                f"{type(loader).__name__}."
            )
        return loader.dataset

    def _features(self, pl_module: LightningModule, dataset: Dataset) -> tuple[Tensor, Tensor]:
        extract = getattr(pl_module, self.feature_method) if self.feature_method else pl_module
        feats, labels = [], []
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.no_grad():
                for batch in DataLoader(dataset, batch_size=self.batch_size, shuffle=False):
                    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                        raise ValueError("KNNEvaluation needs labelled (x, y) batches.")
                    x, y = batch[0], batch[1]
                    out = extract(x.to(pl_module.device))
                    if out.dim() != 2:
                        raise ValueError(f"KNNEvaluation expects (B, F) features, got {tuple(out.shape)}.")
                    feats.append(out.float())
                    labels.append(y.to(pl_module.device))
        finally:
            pl_module.train(was_training)
        return torch.cat(feats), torch.cat(labels)

    def _limit(self, dataset: Dataset, size: Optional[int]) -> Dataset:
        if size is not None and size < len(dataset):
            g = torch.Generator().manual_seed(self.seed)
            dataset = Subset(dataset, torch.randperm(len(dataset), generator=g)[:size].tolist())
        return dataset

    def evaluate(self, trainer: Trainer, pl_module: LightningModule, split: str) -> float:
        """kNN accuracy on ``split`` ("val" or "test") with the training split as the bank."""
        # fast_dev_run is a smoke test: one batch of bank and queries instead of whole splits
        quick = self.batch_size if trainer.fast_dev_run else None
        bank_size = quick if self.max_bank_size is None else min(self.max_bank_size, quick or self.max_bank_size)
        bank, bank_labels = self._features(pl_module, self._limit(self._dataset(trainer, "train"), bank_size))
        query, labels = self._features(pl_module, self._limit(self._dataset(trainer, split), quick))
        num_classes = int(max(bank_labels.max(), labels.max())) + 1
        num_classes = max(num_classes, int(getattr(trainer.datamodule, "num_classes", 0) or 0))
        preds = knn_predict(query, bank, bank_labels, num_classes, self.k, self.temperature)
        return float((preds == labels).float().mean())

    # -- hooks ------------------------------------------------------------------------------------------------
    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Log ``val_knn_acc`` every ``every_n_epochs`` (not during the sanity check)."""
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        acc = self.evaluate(trainer, pl_module, "val")
        self.history.append({"epoch": trainer.current_epoch, "val_knn_acc": acc})
        pl_module.log("val_knn_acc", acc, prog_bar=True)

    @override
    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Log ``test_knn_acc``."""
        pl_module.log("test_knn_acc", self.evaluate(trainer, pl_module, "test"))

    @override
    def state_dict(self) -> dict[str, Any]:
        """The history of validation kNN accuracies."""
        return {"history": list(self.history)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the history."""
        self.history = list(state_dict.get("history", []))
