"""TransMIL: a transformer over a bag's instances with pyramid position encoding (the TPT module)."""

from __future__ import annotations

import math
from typing import Literal, Optional

import torch
from torch import Tensor, nn

from lightning_ext.core.validation import check_choice, check_fraction, check_positive_int
from lightning_ext.mil.bags import BagsLike, as_bags
from lightning_ext.mil.nystrom import NystromAttention

__all__ = ["PPEG", "TransMIL", "square_tokens"]


def square_tokens(h: Tensor) -> tuple[Tensor, int]:
    """Pad the instance tokens ``(B, n, d)`` to ``H*H`` (``H = ceil(sqrt(n))``) by repeating the first tokens.

    As the official code does (``torch.cat([h, h[:, :add_length]])``), so the padding holds real instances, not
    zeros; returns the squared tokens and ``H``.

    Example:
        >>> tokens, side = square_tokens(torch.arange(5.0).view(1, 5, 1))
        >>> side, tokens.flatten().tolist()
        (3, [0.0, 1.0, 2.0, 3.0, 4.0, 0.0, 1.0, 2.0, 3.0])
    """
    n = h.shape[1]
    side = math.ceil(math.sqrt(n))
    # token j of the square is token j mod n (a bag shorter than its padding, n = 2, repeats again from the start)
    return h[:, torch.arange(side * side, device=h.device) % n], side


class PPEG(nn.Module):
    r"""Pyramid Position Encoding Generator: the tokens laid on their ``H x H`` grid (row-major) plus three
    depthwise convolutions, :math:`x + \mathrm{DW}_7(x) + \mathrm{DW}_5(x) + \mathrm{DW}_3(x)`; the class token
    passes through unchanged.

    Example:
        >>> PPEG(8)(torch.randn(2, 1 + 9, 8), 3).shape
        torch.Size([2, 10, 8])
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(dim, dim, k, 1, k // 2, groups=dim) for k in (7, 5, 3))

    def forward(self, x: Tensor, side: int) -> Tensor:
        """``x``: ``(B, 1 + side*side, dim)`` with the class token first."""
        cls, tokens = x[:, :1], x[:, 1:]
        b, _, d = tokens.shape
        grid = tokens.transpose(1, 2).reshape(b, d, side, side)
        grid = grid + sum(conv(grid) for conv in self.convs)
        return torch.cat([cls, grid.flatten(2).transpose(1, 2)], dim=1)

    def forward_ragged(self, x: Tensor, sides: Tensor, valid: Tensor) -> Tensor:
        """Bags of different grid sizes in one batch: bag ``b``'s first ``sides[b]**2`` tokens (``valid``) form its
        grid. Each grid sits in the corner of a zero canvas, where the zeros act as each grid's own "same"
        padding, so the result equals :meth:`forward` bag by bag (hidden positions come back zero)."""
        cls, tokens = x[:, :1], x[:, 1:]
        b, length, d = tokens.shape
        big = int(sides.max())
        j = torch.arange(length, device=x.device).unsqueeze(0)
        cell = (j // sides.unsqueeze(1)) * big + j % sides.unsqueeze(1)
        cell = torch.where(valid, cell, torch.full_like(cell, big * big))  # hidden tokens: a spare slot, dropped
        canvas = tokens.new_zeros(b, d, big * big + 1).scatter(2, cell.unsqueeze(1).expand(-1, d, -1),
                                                                 tokens.transpose(1, 2))
        grid = canvas[..., :-1].reshape(b, d, big, big)
        grid = grid + sum(conv(grid) for conv in self.convs)
        flat = torch.cat([grid.flatten(2), grid.new_zeros(b, d, 1)], dim=2)
        out = flat.gather(2, cell.unsqueeze(1).expand(-1, d, -1)).transpose(1, 2)
        return torch.cat([cls, out * valid.unsqueeze(-1).to(out.dtype)], dim=1)


class TransLayer(nn.Module):
    """Pre-norm attention with a residual and no feed-forward sublayer (as in the official TransMIL)."""

    def __init__(self, dim: int, heads: int, num_landmarks: int, pinv_iterations: int, dropout: float,
                 attention: str) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = NystromAttention(dim, heads=heads, dim_head=dim // heads, num_landmarks=num_landmarks,
                                     pinv_iterations=pinv_iterations, residual=True, dropout=dropout,
                                     attention=attention)

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        return x + self.attn(self.norm(x), mask)


class TransMIL(nn.Module):
    r"""TransMIL's TPT aggregator: bag of instance features in, bag logits out (Shao et al., NeurIPS 2021).

    Paper: "TransMIL: Transformer based Correlated Multiple Instance Learning for Whole Slide Image
    Classification", arXiv 2106.00908. Reference code: https://github.com/szc19990412/TransMIL
    (``models/TransMIL.py``).

    Forward pass of one bag of :math:`n` instances :math:`x_i \in \mathbb R^{D}`:

    1. :math:`h_i = \mathrm{ReLU}(W x_i + b)` (``in_features -> dim``);
    2. square the sequence to :math:`H^2` tokens, :math:`H = \lceil\sqrt n\rceil`, repeating the first tokens
       (:func:`square_tokens`), and prepend a class token;
    3. :math:`h \leftarrow h + \mathrm{MSA}(\mathrm{LN}(h))` (Nyström attention, no MLP sublayer);
    4. :class:`PPEG` on the :math:`H \times H` grid (``ppeg=False``: identity, the ablation);
    5. a second attention layer as in 3;
    6. :math:`\mathrm{logits} = W_c\, \mathrm{LN}(h)_{cls}`.

    Bags of different lengths in one batch give each bag the logits of its own batch-of-one forward (the
    official batch size is 1): with exact attention they run batched (each squared by its own length, padded
    with hidden tokens, its grid in the corner of a zero canvas for the PPEG), with Nyström attention one by
    one; equal lengths always run batched. Instance order matters: it is the grid layout the
    PPEG sees.

    Args:
        in_features: dimension :math:`D` of the instance features (official: 1024, ResNet-50 stage 3).
        num_classes: bag classes.
        dim: token dimension (official 512).
        heads: attention heads (official 8; ``dim // heads`` per head).
        num_landmarks: Nyström landmarks (``None``: ``dim // 2``, as official).
        pinv_iterations: pseudo-inverse iterations (official 6).
        dropout: attention output dropout (official 0.1).
        ppeg: use the PPEG between the two layers (``False``: the paper's "w/o PPEG" ablation).
        attention: ``"nystrom"`` (official) or ``"exact"`` (cheaper and exact for bags of a few hundred).

    Example:
        >>> net = TransMIL(in_features=64, num_classes=2, dim=32, heads=4)
        >>> net(torch.randn(3, 20, 64)).shape
        torch.Size([3, 2])
    """

    def __init__(self, in_features: int, num_classes: int, dim: int = 512, heads: int = 8,
                 num_landmarks: Optional[int] = None, pinv_iterations: int = 6, dropout: float = 0.1,
                 ppeg: bool = True, attention: Literal["nystrom", "exact"] = "nystrom") -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("num_classes", num_classes), ("dim", dim),
                            ("heads", heads)):
            check_positive_int(name, value)
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads}); e.g. dim={heads * max(1, dim // heads)}.")
        check_fraction("dropout", dropout)
        check_choice("attention", attention, ("nystrom", "exact"))
        self.in_features, self.num_classes, self.attention = in_features, num_classes, attention
        landmarks = dim // 2 if num_landmarks is None else num_landmarks
        self.fc1 = nn.Sequential(nn.Linear(in_features, dim), nn.ReLU())
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.layer1 = TransLayer(dim, heads, landmarks, pinv_iterations, dropout, attention)
        self.pos_layer = PPEG(dim) if ppeg else None
        self.layer2 = TransLayer(dim, heads, landmarks, pinv_iterations, dropout, attention)
        self.norm = nn.LayerNorm(dim)
        self.fc2 = nn.Linear(dim, num_classes)

    def _forward_equal(self, x: Tensor) -> Tensor:
        h, side = square_tokens(self.fc1(x))
        h = torch.cat([self.cls_token.expand(h.shape[0], -1, -1), h], dim=1)
        h = self.layer1(h)
        if self.pos_layer is not None:
            h = self.pos_layer(h, side)
        h = self.layer2(h)
        return self.fc2(self.norm(h)[:, 0])

    def forward(self, x: BagsLike) -> Tensor:
        """Logits ``(B, num_classes)`` of a batch of bags (a ``(B, N, D)`` tensor or :class:`Bags`)."""
        bags = as_bags(x)
        features, lengths = bags
        if features.shape[-1] != self.in_features:
            raise ValueError(f"TransMIL was built for in_features={self.in_features} but the instances have "
                             f"{features.shape[-1]} features; set in_features: {features.shape[-1]}.")
        if bool((lengths == features.shape[1]).all()):
            return self._forward_equal(features)
        if self.attention == "exact":
            return self._forward_ragged(features, lengths)
        return torch.cat([self._forward_equal(features[b:b + 1, :int(n)]) for b, n in enumerate(lengths.tolist())])

    def _forward_ragged(self, features: Tensor, lengths: Tensor) -> Tensor:
        """Bags of different lengths batched: each squared by its own length and padded at the end with hidden
        tokens (exact attention with a key mask), so each bag's logits equal its own batch-of-one forward."""
        h = self.fc1(features)
        sides = torch.as_tensor([math.ceil(math.sqrt(int(n))) for n in lengths.tolist()], device=h.device)
        length = int((sides * sides).max())
        j = torch.arange(length, device=h.device).unsqueeze(0)
        valid = j < (sides * sides).unsqueeze(1)
        source = (j % lengths.to(h.device).unsqueeze(1)).unsqueeze(-1).expand(-1, -1, h.shape[-1])
        tokens = h.gather(1, source) * valid.unsqueeze(-1).to(h.dtype)
        seq = torch.cat([self.cls_token.expand(h.shape[0], -1, -1), tokens], dim=1)
        mask = torch.cat([valid.new_ones(h.shape[0], 1), valid], dim=1)
        seq = self.layer1(seq, mask)
        if self.pos_layer is not None:
            seq = self.pos_layer.forward_ragged(seq, sides, valid)
        seq = self.layer2(seq, mask)
        return self.fc2(self.norm(seq)[:, 0])
