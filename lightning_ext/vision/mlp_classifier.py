"""``MLPClassifier``: a multilayer perceptron for feature vectors (tabular data)."""

from __future__ import annotations

from torch import nn

from lightning_ext.vision.classifier import Classifier


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
        num_features: int,
        num_classes: int,
        hidden: list[int] = [64, 64],  # noqa: B006 - jsonargparse needs a literal default to show
        dropout: float = 0.0,
        **kwargs,
    ) -> None:
        if num_features < 1:
            raise ValueError(f"`num_features` must be >= 1, got {num_features}.")
        if any(h < 1 for h in hidden):
            raise ValueError(f"Every hidden width must be >= 1, got {hidden}.")
        if not 0 <= dropout < 1:
            raise ValueError(f"`dropout` must be in [0, 1), got {dropout}.")
        super().__init__(mlp(num_features, list(hidden), num_classes, dropout), num_classes,
                         input_shape=(num_features,), **kwargs)
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
