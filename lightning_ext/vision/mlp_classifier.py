"""``MLPClassifier``: a multilayer perceptron for feature vectors (tabular data)."""

from __future__ import annotations

from torch import nn

from lightning_ext.core.validation import PositiveInt, UnitIntervalRightOpen, check_number, check_positive_int
from lightning_ext.vision.classifier import Classifier, NumClasses, check_num_classes


def mlp(num_features: int, hidden: list[int], num_classes: int, dropout: float = 0.0) -> nn.Sequential:
    """Linear-ReLU(-Dropout) layers of widths ``hidden`` followed by a linear head."""
    layers: list[nn.Module] = []
    width = num_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


class MLPClassifier(Classifier):
    """A multilayer perceptron classifier for ``(B, num_features)`` inputs such as :class:`TabularDataModule`.

    Args:
        num_features: input features.
        num_classes: number of classes.
        hidden: widths of the hidden layers.
        dropout: dropout after each hidden layer.
        **kwargs: optimisation arguments of :class:`Classifier` (``lr``, ``weight_decay``, ``optimizer``,
            ``scheduler``, ``scheduler_interval``).

    Example:
        >>> import torch
        >>> MLPClassifier(num_features=13, num_classes=3)(torch.zeros(5, 13)).shape
        torch.Size([5, 3])
    """

    def __init__(
        self,
        num_features: PositiveInt,
        num_classes: NumClasses,
        hidden: list[PositiveInt] = [64, 64],  # noqa: B006 - jsonargparse needs a literal default to show
        dropout: UnitIntervalRightOpen = 0.0,
        **kwargs,
    ) -> None:
        check_positive_int("num_features", num_features)
        check_num_classes(num_classes)
        for width in hidden:
            check_positive_int("hidden", width)
        check_number("dropout", dropout, low=0, high=1, high_open=True)
        super().__init__(mlp(num_features, list(hidden), num_classes, dropout), num_classes,
                         input_shape=(num_features,), **kwargs)
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
