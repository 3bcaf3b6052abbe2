"""ABMIL: gated attention pooling of a bag's instances (Ilse, Tomczak and Welling, ICML 2018)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_ext.core.validation import check_fraction, check_positive_int
from lightning_ext.mil.bags import BagsLike, as_bags, instance_mask

__all__ = ["ABMIL", "gated_attention_weights"]


def gated_attention_weights(h: Tensor, mask: Tensor, v: nn.Linear, u: nn.Linear, w: nn.Linear) -> Tensor:
    r"""Gated attention weights of each bag's instances, :math:`a_k \propto \exp\{w^\top(\tanh(V h_k) \odot
    \mathrm{sigm}(U h_k))\}`, normalised over the real instances (``mask``) of each bag; ``(B, N)``."""
    scores = w(torch.tanh(v(h)) * torch.sigmoid(u(h))).squeeze(-1)
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=1)


class ABMIL(nn.Module):
    r"""Attention-based deep MIL with the gated attention mechanism: bag of instance features in, logits out.

    Paper: "Attention-based Deep Multiple Instance Learning", Ilse, Tomczak and Welling, ICML 2018,
    arXiv 1802.04712. Reference code: https://github.com/AMLab-Amsterdam/AttentionDeepMIL (``model.py``,
    ``GatedAttention``).

    .. math:: h_k = \mathrm{ReLU}(W x_k + b), \quad z = \sum_k a_k h_k, \quad \mathrm{logits} = W_c z

    with the gated weights :math:`a_k` of :func:`gated_attention_weights` (hidden size ``attention_dim``, 128 in
    the paper). The instance projection is the one :class:`~lightning_ext.mil.transmil.TransMIL` uses, so the two
    compare at the same instance embedding. Padding instances (:class:`~lightning_ext.mil.bags.Bags`) get zero
    weight. The score layer :math:`w` has no bias (the reference code's has one, which the softmax ignores: its
    gradient is zero up to rounding, which Adam then amplifies into steps). ``last_attention`` keeps the weights of the latest forward (for inspection and plots).

    Args:
        in_features: instance feature dimension.
        num_classes: bag classes.
        dim: instance embedding dimension.
        attention_dim: hidden size of the attention network (paper: 128).
        dropout: dropout on the pooled bag embedding.

    Example:
        >>> net = ABMIL(in_features=64, num_classes=2, dim=32)
        >>> net(torch.randn(3, 20, 64)).shape, round(float(net.last_attention[0].sum()), 4)
        (torch.Size([3, 2]), 1.0)
    """

    def __init__(self, in_features: int, num_classes: int, dim: int = 512, attention_dim: int = 128,
                 dropout: float = 0.0) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("num_classes", num_classes), ("dim", dim),
                            ("attention_dim", attention_dim)):
            check_positive_int(name, value)
        check_fraction("dropout", dropout)
        self.in_features = in_features
        self.fc1 = nn.Sequential(nn.Linear(in_features, dim), nn.ReLU())
        self.attention_v = nn.Linear(dim, attention_dim)
        self.attention_u = nn.Linear(dim, attention_dim)
        self.attention_w = nn.Linear(attention_dim, 1, bias=False)  # a shared shift: softmax ignores it
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(dim, num_classes)
        self.last_attention: Tensor | None = None

    def forward(self, x: BagsLike) -> Tensor:
        """Logits ``(B, num_classes)`` of a batch of bags."""
        bags = as_bags(x)
        if bags.features.shape[-1] != self.in_features:
            raise ValueError(f"ABMIL was built for in_features={self.in_features} but the instances have "
                             f"{bags.features.shape[-1]} features; set in_features: {bags.features.shape[-1]}.")
        h = self.fc1(bags.features)
        a = gated_attention_weights(h, instance_mask(bags), self.attention_v, self.attention_u, self.attention_w)
        self.last_attention = a.detach()
        return self.classifier(self.dropout(torch.einsum("bn,bnd->bd", a, h)))
