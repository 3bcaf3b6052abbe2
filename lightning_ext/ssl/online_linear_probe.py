"""``OnlineLinearProbe``: a linear classifier trained on detached features during self-supervised training."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import override

from lightning_ext.core.validation import PositiveInt, check_number, check_positive_int


class OnlineLinearProbe(nn.Module):
    """A linear classifier on **detached** features, trained alongside any self-supervised objective.

    The solo-learn convention (its CIFAR tables are online-probe accuracies): the probe's cross-entropy is
    added to the training loss, but the features are detached first, so no probe gradient reaches the
    backbone and the representation is exactly what the self-supervised loss alone makes it. Put it in any
    LightningModule as an attribute (``self.probe = OnlineLinearProbe(512, 10)``) so it is checkpointed and,
    under DDP, its gradients are averaged with the rest of the model; give its parameters their own
    optimiser group when the learning rate should differ (solo-learn uses 0.1 with SGD).

    Args:
        in_features: feature size of the backbone.
        num_classes: number of classes.

    Example:
        >>> probe = OnlineLinearProbe(16, 3)
        >>> feats = torch.randn(8, 16, requires_grad=True)
        >>> loss, logits = probe.training_loss(feats, torch.randint(0, 3, (8,)))
        >>> loss.backward(); feats.grad is None      # the backbone features get no gradient
        True
    """

    def __init__(self, in_features: PositiveInt, num_classes: PositiveInt) -> None:
        super().__init__()
        check_positive_int("in_features", in_features)
        check_number("num_classes", num_classes, low=2, integer=True)
        self.linear = nn.Linear(in_features, num_classes)

    @override
    def forward(self, features: Tensor) -> Tensor:
        """Logits of detached ``(N, in_features)`` features."""
        return self.linear(features.detach().float())

    def training_loss(self, features: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """``(cross_entropy, logits)`` for a labelled batch; only the probe receives gradients."""
        logits = self(features)
        return F.cross_entropy(logits, labels), logits
