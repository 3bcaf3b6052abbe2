r"""netFound's network: hierarchical burst/flow transformer over burst tokens, pretraining heads and losses.

Paper: "netFound: Foundation Model for Network Security" (Guthula et al., arXiv 2310.17025); reference code
https://github.com/SNL-UCSB/netFound (``src/modules/netFoundModels.py``, ``netFoundLayers.py``,
``netFoundEmbeddings.py``, ``netFoundDataCollator.py``). Inputs are :func:`~lightning_ext.traffic.pcap.netfound_tokens`
bursts ``(B, bursts, T)`` (CLS first in each burst) and per-burst metadata ``(B, bursts, 4)``.

- Embedding: token embedding concatenated with an MLP of the burst's metadata (direction, log bytes, log packets,
  log inter-burst time), projected ``2h -> h`` and layer-normed (netFound also concatenates a protocol embedding;
  here the protocol is left to the header tokens), plus a learned position within the burst.
- Each layer: a transformer layer over the tokens of every burst, then (unless ``flat``) a transformer layer over
  the bursts' CLS tokens with a learned burst-position embedding, whose outputs replace the CLS tokens. Rotary
  embeddings are dropped for this small model.
- Pretraining (:func:`netfound_losses`): masked token modelling on ``mlm_probability`` of the real tokens; a 16-bit
  token is predicted as its high and low byte (two 257-way softmaxes; the official 65,539-way softmax does not fit a
  CPU batch), swapped-burst detection (a burst replaced by one from another flow of the batch with probability
  ``swap_rate``), and L1 regression of the masked bursts' metadata (``metadata_weight``, 0.4 officially):

.. math:: \mathcal L = \mathrm{CE}_{hi} + \mathrm{CE}_{lo} + \mathrm{CE}_{swap} + w\,\lVert \hat m - m\rVert_1

- Fine-tuning: attentive pooling over the burst CLS tokens -> Linear-GELU-Linear head.

Example:
    >>> net = NetFound(tokens_per_burst=13, bursts=4, hidden=16, layers=1, heads=2, num_classes=3)
    >>> tokens = torch.randint(1, 300, (2, 4, 13)); tokens[:, :, 0] = 65537
    >>> net(tokens, torch.randn(2, 4, 4).abs()).shape
    torch.Size([2, 3])
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lightning_ext.traffic.pcap import CLS, MASK, PAD

__all__ = ["NetFound", "mask_bursts", "netfound_losses"]

VOCAB = MASK + 2


def _meta_features(meta: torch.Tensor) -> torch.Tensor:
    return torch.cat([meta[..., :1], torch.log1p(meta[..., 1:].clamp(min=0))], dim=-1)


class NetFound(nn.Module):
    """Hierarchical burst/flow transformer with netFound's pretraining heads and classification head."""

    def __init__(self, tokens_per_burst: int = 73, bursts: int = 12, hidden: int = 128, layers: int = 2,
                 heads: int = 4, ff_dim: int = 256, num_classes: int = 2, flat: bool = False,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.flat, self.bursts = flat, bursts
        self.token = nn.Embedding(VOCAB, hidden, padding_idx=PAD)
        self.meta = nn.Sequential(nn.Linear(4, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.compress = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.LayerNorm(hidden), nn.Dropout(dropout))
        self.position = nn.Parameter(torch.randn(1, 1, tokens_per_burst, hidden) * 0.02)
        self.burst_position = nn.Parameter(torch.randn(1, bursts, hidden) * 0.02)

        def layer() -> nn.TransformerEncoderLayer:
            return nn.TransformerEncoderLayer(hidden, heads, ff_dim, dropout, batch_first=True, norm_first=True)

        self.burst_layers = nn.ModuleList(layer() for _ in range(layers))
        self.flow_layers = nn.ModuleList(layer() for _ in range(0 if flat else layers))
        self.norm = nn.LayerNorm(hidden)
        self.mlm_hi, self.mlm_lo = nn.Linear(hidden, 257), nn.Linear(hidden, 257)
        self.swap_head, self.meta_head = nn.Linear(hidden, 2), nn.Linear(hidden, 4)
        self.pool = nn.Linear(hidden, 1)
        self.head = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, num_classes))

    def encode(self, tokens: torch.Tensor, meta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states ``(B, bursts, T, h)`` and the mask of real bursts ``(B, bursts)``."""
        b, nb, t = tokens.shape
        real = tokens[..., 0] != PAD
        m = self.meta(_meta_features(meta)).unsqueeze(2).expand(-1, -1, t, -1)
        h = self.compress(torch.cat([self.token(tokens), m], dim=-1)) + self.position[:, :, :t]
        pad = tokens == PAD
        pad[..., 0] = False  # keep one key per burst so empty bursts stay finite (they are masked at flow level)
        for i, burst_layer in enumerate(self.burst_layers):
            h = burst_layer(h.reshape(b * nb, t, -1), src_key_padding_mask=pad.reshape(b * nb, t)).reshape(b, nb, t, -1)
            if not self.flat:
                cls = self.flow_layers[i](h[:, :, 0] + self.burst_position[:, :nb], src_key_padding_mask=~real)
                h = torch.cat([cls.unsqueeze(2), h[:, :, 1:]], dim=2)
        return self.norm(h), real

    def pooled(self, tokens: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
        """Attentive pooling of the real bursts' CLS states ``(B, h)``."""
        h, real = self.encode(tokens, meta)
        cls = h[:, :, 0]
        score = self.pool(cls).squeeze(-1).masked_fill(~real, float("-inf"))
        return (torch.softmax(score, dim=1).unsqueeze(-1) * cls).sum(1)

    def forward(self, tokens: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
        """Class logits ``(B, num_classes)``."""
        return self.head(self.pooled(tokens, meta))


def mask_bursts(tokens: torch.Tensor, meta: torch.Tensor, mlm_probability: float, swap_rate: float,
                generator: Optional[torch.Generator] = None) -> dict[str, torch.Tensor]:
    """netFound's pretraining corruption: swap whole bursts between flows of the batch, then mask tokens.

    Returns the corrupted ``tokens``/``meta``, the ``targets`` (original tokens of the swapped batch), ``mlm``
    (masked real header tokens), ``swapped`` (per burst, 1 = from another flow) and ``meta_mask`` (real bursts
    with a masked token, whose metadata is zeroed and regressed).
    """
    b, nb, t = tokens.shape
    real = tokens[..., 0] != PAD
    swap = (torch.rand(b, nb, generator=generator) < swap_rate).to(tokens.device) & real
    donor = torch.randint(0, b, (b, nb), generator=generator).to(tokens.device)
    donor = torch.where(donor == torch.arange(b, device=tokens.device)[:, None], (donor + 1) % b, donor)
    donor_real = real[donor, torch.arange(nb, device=tokens.device)[None].expand(b, -1)]
    swap = swap & donor_real & (b > 1)
    idx = torch.arange(nb, device=tokens.device)[None].expand(b, -1)
    tokens = torch.where(swap[..., None], tokens[donor, idx], tokens)
    meta = torch.where(swap[..., None], meta[donor, idx], meta)
    candidates = (tokens != PAD) & (tokens != CLS)
    mlm = (torch.rand(b, nb, t, generator=generator).to(tokens.device) < mlm_probability) & candidates
    meta_mask = mlm.any(-1)
    return {"tokens": tokens.masked_fill(mlm, MASK), "meta": meta.masked_fill(meta_mask[..., None], 0.0),
            "targets": tokens, "target_meta": meta, "mlm": mlm, "swapped": swap.long(), "meta_mask": meta_mask,
            "real": real}


def netfound_losses(net: NetFound, batch: dict[str, torch.Tensor], metadata_weight: float = 0.4) -> dict:
    """The pretraining loss terms of a corrupted batch (:func:`mask_bursts`) and their weighted sum ``loss``."""
    h, real = net.encode(batch["tokens"], batch["meta"])
    sel = h[batch["mlm"]]
    value = batch["targets"][batch["mlm"]] - 1  # token = 16-bit value + 1
    zero = h.sum() * 0.0
    hi = F.cross_entropy(net.mlm_hi(sel), value // 256) if len(sel) else zero
    lo = F.cross_entropy(net.mlm_lo(sel), value % 256) if len(sel) else zero
    cls = h[:, :, 0]
    swap = F.cross_entropy(net.swap_head(cls[real]), batch["swapped"][real]) if real.any() else zero
    mm = batch["meta_mask"]
    target = _meta_features(batch["target_meta"])[mm]
    meta = F.l1_loss(net.meta_head(cls[mm]), target) if mm.any() else zero
    return {"loss": hi + lo + swap + metadata_weight * meta, "mlm_hi": hi, "mlm_lo": lo, "swap": swap, "meta": meta}
