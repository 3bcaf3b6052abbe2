"""``MILClassifier``: a LightningModule that classifies bags of instance features (TransMIL, ABMIL, pooling)."""

from __future__ import annotations

from typing import Literal, Optional

import numpy as np
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics.classification import MulticlassAUROC
from typing_extensions import override

from lightning_ext.core.guards import NonFiniteLoss
from lightning_ext.core.paths import check_path_argument
from lightning_ext.core.samples import GREEN, RED, log_sample_image, sample_epoch_due, tile_rows
from lightning_ext.core.validation import (
    ClosedUnitInterval,
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    NonNegativeInt,
    check_choice,
    check_number,
    check_positive_int,
)
from lightning_ext.mil.abmil import ABMIL
from lightning_ext.mil.bags import Bags
from lightning_ext.mil.pooling import PoolingMIL
from lightning_ext.mil.transmil import TransMIL
from lightning_ext.vision.classifier import Classifier, NumClasses

__all__ = ["MILClassifier", "build_aggregator"]

Aggregator = Literal["transmil", "abmil", "mean", "max"]
GOLD = (0.95, 0.75, 0.1)
_SAMPLE_CELLS = 12


def build_aggregator(aggregator: str, in_features: int, num_classes: int, dim: int = 512, heads: int = 8,
                     num_landmarks: Optional[int] = None, attention: str = "nystrom", ppeg: bool = True,
                     dropout: float = 0.1, attention_dim: int = 128) -> nn.Module:
    """The bag network named by ``aggregator`` (``"transmil"``, ``"abmil"``, ``"mean"``, ``"max"``).

    Example:
        >>> type(build_aggregator("abmil", in_features=64, num_classes=2, dim=32)).__name__
        'ABMIL'
    """
    check_choice("aggregator", aggregator, ("transmil", "abmil", "mean", "max"))
    if aggregator == "transmil":
        return TransMIL(in_features, num_classes, dim=dim, heads=heads, num_landmarks=num_landmarks,
                        dropout=dropout, ppeg=ppeg, attention=attention)
    if aggregator == "abmil":
        return ABMIL(in_features, num_classes, dim=dim, attention_dim=attention_dim)
    return PoolingMIL(in_features, num_classes, dim=dim, pooling=aggregator)


class MILClassifier(Classifier):
    r"""Multiple-instance classification of bags: TransMIL, ABMIL, or mean/max pooling, trained by cross-entropy.

    Papers: "TransMIL: Transformer based Correlated Multiple Instance Learning for Whole Slide Image
    Classification" (Shao et al., NeurIPS 2021, arXiv 2106.00908; https://github.com/szc19990412/TransMIL) and its
    baselines, "Attention-based Deep Multiple Instance Learning" (Ilse et al., ICML 2018, arXiv 1802.04712).

    The loss is :math:`-\log p(Y \mid \{x_1, \dots, x_n\})` of each bag's label (cross-entropy); batches are
    ``(bags, y)`` with ``bags`` a :class:`~lightning_ext.mil.bags.Bags` (padded features and lengths) or a
    ``(B, N, D)`` tensor, as :class:`~lightning_ext.mil.bag_datamodule.BagDataModule` yields them. Logs what
    :class:`~lightning_ext.vision.classifier.Classifier` logs plus ``{val,test}_auroc`` (macro one-vs-rest AUROC,
    the paper's metric). The defaults are the official ones (dim 512, 8 heads, Nyström attention with dim/2
    landmarks, dropout 0.1, lr 2e-4, weight decay 1e-5; the official optimiser is Lookahead(RAdam), here AdamW
    unless ``optimizer`` is given). The official code trains with one bag per batch; bags of different lengths
    in a batch are fine here (TransMIL runs them one by one, the others mask the padding).

    Args:
        in_features: dimension of the instance features (checked against the datamodule's ``in_features``).
        num_classes: bag classes.
        aggregator: ``"transmil"``, ``"abmil"`` (gated attention), ``"mean"`` or ``"max"`` pooling.
        dim: instance embedding / token dimension.
        heads: TransMIL attention heads.
        num_landmarks: TransMIL Nyström landmarks (``None``: ``dim // 2``).
        attention: TransMIL attention, ``"nystrom"`` or ``"exact"``.
        ppeg: TransMIL's PPEG positional encoding (``False``: the ablation).
        dropout: TransMIL attention dropout.
        attention_dim: ABMIL's attention hidden size.
        lr, weight_decay, optimizer, scheduler, scheduler_interval, nonfinite_loss: see
            :class:`~lightning_ext.vision.classifier.Classifier`.
        sample_images_every_n_epochs: every this many validation epochs of a fit, save a sample of the first
            ``num_sample_bags`` validation bags (the first of each class in turn) when the datamodule can show their images (``bag_images``, as
            :class:`~lightning_ext.mil.bag_datamodule.BagDataModule`): one row per bag, a first cell green
            (bag predicted right) or red, then up to 12 instance images with the target classes' instances first
            and framed in gold (0: never).
        sample_images_dir: where (relative to ``trainer.log_dir``; ``None`` disables the files; TensorBoard gets
            the image too).
        num_sample_bags: bags (rows) in the sample.

    Example:
        >>> model = MILClassifier(in_features=64, aggregator="transmil", dim=32, heads=4)
        >>> model(torch.randn(2, 10, 64)).shape
        torch.Size([2, 2])
    """

    def __init__(
        self,
        in_features: PositiveInt,
        num_classes: NumClasses = 2,
        aggregator: Aggregator = "transmil",
        dim: PositiveInt = 512,
        heads: PositiveInt = 8,
        num_landmarks: Optional[PositiveInt] = None,
        attention: Literal["nystrom", "exact"] = "nystrom",
        ppeg: bool = True,
        dropout: ClosedUnitInterval = 0.1,
        attention_dim: PositiveInt = 128,
        lr: PositiveFloat = 2e-4,
        weight_decay: NonNegativeFloat = 1e-5,
        optimizer: Optional[OptimizerCallable] = None,
        scheduler: Optional[LRSchedulerCallable] = None,
        scheduler_interval: Literal["epoch", "step"] = "epoch",
        nonfinite_loss: NonFiniteLoss = "error",
        sample_images_every_n_epochs: NonNegativeInt = 5,
        sample_images_dir: Optional[str] = "samples",
        num_sample_bags: PositiveInt = 4,
    ) -> None:
        check_positive_int("attention_dim", attention_dim)
        check_number("sample_images_every_n_epochs", sample_images_every_n_epochs, low=0, integer=True)
        check_path_argument("sample_images_dir", sample_images_dir)
        check_positive_int("num_sample_bags", num_sample_bags)
        net = build_aggregator(aggregator, in_features, num_classes, dim=dim, heads=heads,
                               num_landmarks=num_landmarks, attention=attention, ppeg=ppeg, dropout=dropout,
                               attention_dim=attention_dim)
        super().__init__(net, num_classes, None, lr, weight_decay, optimizer, scheduler, scheduler_interval,
                         nonfinite_loss)
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.in_features, self.aggregator = in_features, aggregator
        self.val_auroc = MulticlassAUROC(num_classes, average="macro")
        self.test_auroc = MulticlassAUROC(num_classes, average="macro")
        self.sample_every, self.sample_dir, self.num_sample_bags = (sample_images_every_n_epochs, sample_images_dir,
                                                                    num_sample_bags)

    @override
    def setup(self, stage: str) -> None:
        """The checks of :class:`Classifier` plus the datamodule's ``in_features`` against the model's."""
        super().setup(stage)
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        data_features = getattr(dm, "in_features", None)
        if data_features is not None and data_features != self.in_features:
            raise ValueError(f"The model has in_features={self.in_features} but {type(dm).__name__} yields "
                             f"{data_features}-dimensional instances. Set `model.init_args.in_features: "
                             f"{data_features}`.")

    @override
    def _log_extra_metrics(self, stage: str, logits: torch.Tensor, y: torch.Tensor) -> None:
        auroc = getattr(self, f"{stage}_auroc")
        auroc(logits.float().softmax(dim=-1), y)
        self.log(f"{stage}_auroc", auroc)

    @override
    def on_validation_epoch_end(self) -> None:
        """Save the sample of validation bags when one is due (see ``sample_images_every_n_epochs``)."""
        dm = getattr(self.trainer, "datamodule", None)
        if not sample_epoch_due(self, self.sample_every) or not hasattr(dm, "bag_images"):
            return
        dataset, targets = dm.datasets["val"], list(getattr(dm, "targets", []))
        classes = dm.instance_labels("val")
        rows, borders, captions = [], [], []
        for b in _interleave_classes(dataset.labels, self.num_sample_bags):
            bag, label = dataset[b]
            bags = Bags(bag.features.unsqueeze(0).to(self.device), bag.lengths.view(1).to(self.device))
            pred = int(self(bags).argmax(dim=-1))
            images = dm.bag_images("val", b).cpu()
            special = np.isin(classes[b, :len(images)], targets)
            order = np.concatenate([np.flatnonzero(special), np.flatnonzero(~special)])[:_SAMPLE_CELLS]
            rows.append([torch.zeros_like(images[0])] + [images[i] for i in order])
            borders.append([GREEN if pred == int(label) else RED] + [GOLD if special[i] else None for i in order])
            captions.append(f"{int(label)}/{pred}")
        if rows:
            log_sample_image(self, tile_rows(rows, borders), "val_bags", self.sample_dir,
                             f"epoch {self.current_epoch + 1}: one validation bag per row (first cell green: "
                             f"predicted right); gold: target-class instances; label/predicted {', '.join(captions)}")


def _interleave_classes(labels: torch.Tensor, count: int) -> list[int]:
    """The first ``count`` indices taking the first bag of each label in turn (so both classes show).

    Example:
        >>> _interleave_classes(torch.tensor([0, 0, 0, 1, 1]), 3)
        [0, 3, 1]
    """
    queues = [torch.nonzero(labels == c).flatten().tolist() for c in torch.unique(labels).tolist()]
    out: list[int] = []
    while len(out) < count and any(queues):
        for queue in queues:
            if queue and len(out) < count:
                out.append(queue.pop(0))
    return out
