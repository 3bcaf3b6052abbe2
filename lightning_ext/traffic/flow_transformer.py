"""FlowTransformer's network: an input encoding, a transformer over a window of flow records, a classification head.

Paper: "FlowTransformer: A Transformer Framework for Flow-based Network Intrusion Detection Systems" (Manocchio et
al., arXiv 2304.14746); reference code (Keras) https://github.com/liamdm/FlowTransformer
(``implementations/input_encodings.py``, ``classification_heads.py``, ``transformers/basic_transformers.py``).
Swappable parts, as in the framework:

- encoding ``"record_embed"`` (``RecordLevelEmbed``: numeric fields and one-hot categorical fields of a record,
  concatenated, one dense projection to ``d_model``) or ``"categorical_embed"`` (``CategoricalFeatureEmbed``
  with lookup: a ``categorical_dim`` embedding per categorical field, concatenated with the numeric fields, then
  projected);
- encoder ``"encoder"`` (bidirectional) or ``"decoder"`` (causal mask: a record sees only earlier ones), ``layers``
  pre-norm transformer layers of ``d_model`` with ``heads`` heads and an ``ff_dim`` MLP;
- head ``"last_token"`` (the window's last record: the one labelled), ``"cls"`` (a learned token appended after the
  records; last, so a causal encoder can use it too), ``"gap"`` (global average pooling over the records; the
  paper found it "performs very poorly") or ``"flatten"``; then the MLP ``[mlp_dim]`` with dropout 0.1.

Example:
    >>> net = FlowTransformer(num_numeric=3, categorical_cardinalities=[4, 5], num_classes=2, window=8, d_model=16)
    >>> net(torch.rand(2, 8, 3), torch.randint(0, 4, (2, 8, 2))).shape
    torch.Size([2, 2])
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FlowTransformer", "HEADS", "ENCODINGS"]

HEADS = ("last_token", "cls", "gap", "flatten")
ENCODINGS = ("record_embed", "categorical_embed")


class FlowTransformer(nn.Module):
    """Encoding -> transformer -> head -> MLP over ``(numeric (B, W, F), categorical (B, W, C))`` windows."""

    def __init__(self, num_numeric: int, categorical_cardinalities: Sequence[int], num_classes: int, window: int = 8,
                 encoding: str = "record_embed", encoder: str = "encoder", head: str = "last_token",
                 d_model: int = 64, layers: int = 2, heads: int = 2, ff_dim: int = 128, categorical_dim: int = 16,
                 mlp_dim: int = 128, dropout: float = 0.1) -> None:
        super().__init__()
        if encoding not in ENCODINGS or head not in HEADS or encoder not in ("encoder", "decoder"):
            raise ValueError(f"unknown encoding/encoder/head {encoding!r}/{encoder!r}/{head!r}; choose from "
                             f"{ENCODINGS}, ('encoder', 'decoder'), {HEADS}.")
        self.cards, self.encoding, self.head, self.causal, self.window = (list(categorical_cardinalities), encoding,
                                                                          head, encoder == "decoder", window)
        if encoding == "record_embed":
            self.embed = nn.Linear(num_numeric + sum(self.cards), d_model)
        else:
            self.lookups = nn.ModuleList(nn.Embedding(c, categorical_dim) for c in self.cards)
            self.embed = nn.Linear(num_numeric + categorical_dim * len(self.cards), d_model)
        extra = 1 if head == "cls" else 0
        self.pos = nn.Parameter(torch.randn(1, window + extra, d_model) * 0.02)
        self.cls = nn.Parameter(torch.randn(1, 1, d_model) * 0.02) if head == "cls" else None
        layer = nn.TransformerEncoderLayer(d_model, heads, ff_dim, dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        width = d_model * window if head == "flatten" else d_model
        self.mlp = nn.Sequential(nn.Linear(width, mlp_dim), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(mlp_dim, num_classes))

    def encode_inputs(self, numeric: torch.Tensor, categorical: torch.Tensor) -> torch.Tensor:
        """The input encoding ``(B, W, d_model)``."""
        if self.encoding == "record_embed":
            onehots = [F.one_hot(categorical[..., i].clamp(0, c - 1), c).to(numeric.dtype)
                       for i, c in enumerate(self.cards)]
            return self.embed(torch.cat([numeric, *onehots], dim=-1))
        embs = [lookup(categorical[..., i].clamp(0, c - 1)) for i, (lookup, c) in enumerate(zip(self.lookups, self.cards))]
        return self.embed(torch.cat([numeric, *embs], dim=-1))

    def forward(self, numeric: torch.Tensor, categorical: torch.Tensor) -> torch.Tensor:
        """Class logits ``(B, num_classes)`` of windows of ``W <= window`` records."""
        h = self.encode_inputs(numeric, categorical)
        if h.shape[1] != self.window:
            raise ValueError(f"FlowTransformer was built for windows of {self.window} records, got {h.shape[1]}; "
                             "set the model's window to the datamodule's.")
        if self.cls is not None:
            h = torch.cat([h, self.cls.expand(h.shape[0], -1, -1)], dim=1)
        h = h + self.pos
        mask = nn.Transformer.generate_square_subsequent_mask(h.shape[1], device=h.device) if self.causal else None
        h = self.norm(self.encoder(h, mask=mask, is_causal=self.causal))
        if self.head in ("last_token", "cls"):
            z = h[:, -1]
        elif self.head == "gap":
            z = h.mean(dim=1)
        else:
            z = h.flatten(1)
        return self.mlp(z)
