r"""A small DETR (plain PyTorch): CNN or timm backbone, transformer encoder, encoder query selection, a decoder with
either D-FINE's FDR head or an L1+GIoU iterative-refinement head, and the set criterion of both.

The architecture follows RT-DETR / D-FINE (https://github.com/Peterande/D-FINE, ``dfine_decoder.py``) at a scale
that trains on a CPU: one feature level, plain multi-head cross-attention instead of multi-scale deformable
attention, no contrastive denoising queries, no hybrid-encoder FPN. Kept from D-FINE: top-k query selection from
the encoder with its auxiliary loss, residual refinement of the corner logits across layers from the first layer's
box (``pre`` box, detached) as reference, the LQE (top-4 bin probabilities added to the class logit), GO matching
(the union of every layer's Hungarian matches for the box losses), VFL/L1/GIoU/FGL/DDF with the official weights.
The baseline head (``box_head="l1_giou"``) is RT-DETR's: each layer predicts a box delta in logit space from the
previous layer's detached box, trained by VFL + L1 + GIoU on its own matches.

Example:
    >>> net = DETRNet(num_classes=10, hidden_dim=32, num_queries=5, decoder_layers=2)
    >>> out = net(torch.randn(2, 1, 32, 32))
    >>> len(out["layers"]), tuple(out["layers"][-1]["boxes"].shape), tuple(out["layers"][-1]["corners"].shape)
    (2, (2, 5, 4), (2, 5, 132))
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_convert

from lightning_ext.core.distributed import mean_over_ranks
from lightning_ext.detection import d_fine as D

__all__ = ["DETRCriterion", "DETRNet", "LOSS_WEIGHTS", "postprocess"]

#: The reference configuration's loss weights (``configs/dfine/include/dfine_hgnetv2.yml``).
LOSS_WEIGHTS = {"vfl": 1.0, "bbox": 5.0, "giou": 2.0, "fgl": 0.15, "ddf": 1.5}


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """:math:`\\log(x / (1 - x))` with ``x`` clamped to [eps, 1 - eps]."""
    x = x.clamp(eps, 1 - eps)
    return torch.log(x / (1 - x))


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them."""

    def __init__(self, dims: Sequence[int]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class LQE(nn.Module):
    """Localisation-quality estimator: the top-``k`` bin probabilities of each edge and their mean, through an
    MLP (zero-initialised), added to the class logits."""

    def __init__(self, reg_max: int, k: int = 4, hidden: int = 64) -> None:
        super().__init__()
        self.k, self.bins = k, reg_max + 1
        self.mlp = MLP([4 * (k + 1), hidden, 1])
        nn.init.zeros_(self.mlp.layers[-1].weight)
        nn.init.zeros_(self.mlp.layers[-1].bias)

    def forward(self, scores: Tensor, corners: Tensor) -> Tensor:
        b, q, _ = corners.shape
        prob = corners.reshape(b, q, 4, self.bins).softmax(-1)
        top = prob.topk(self.k, dim=-1).values
        stat = torch.cat([top, top.mean(-1, keepdim=True)], -1).reshape(b, q, -1)
        return scores + self.mlp(stat)


class DecoderLayer(nn.Module):
    """Self-attention between queries, cross-attention to the encoder memory, FFN (post-norm)."""

    def __init__(self, dim: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.ReLU(), nn.Linear(ffn, dim))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(3))

    def forward(self, tgt: Tensor, pos: Tensor, memory: Tensor, mem_pos: Tensor) -> Tensor:
        q = tgt + pos
        tgt = self.norms[0](tgt + self.self_attn(q, q, tgt, need_weights=False)[0])
        tgt = self.norms[1](tgt + self.cross_attn(tgt + pos, memory + mem_pos, memory, need_weights=False)[0])
        return self.norms[2](tgt + self.ffn(tgt))


def sine_position(h: int, w: int, dim: int, device: torch.device) -> Tensor:
    """DETR's 2D sine position embedding ``(h * w, dim)`` (half the channels for y, half for x)."""
    quarter = dim // 4
    freq = 10000 ** (torch.arange(quarter, device=device, dtype=torch.float32) / quarter)
    ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=torch.float32),
                            torch.arange(w, device=device, dtype=torch.float32), indexing="ij")
    parts = []
    for coord, size in ((ys, h), (xs, w)):
        a = (coord.flatten()[:, None] + 0.5) / size * 2 * math.pi / freq
        parts += [a.sin(), a.cos()]
    emb = torch.cat(parts, -1)
    return F.pad(emb, (0, dim - emb.shape[-1]))


def small_cnn(in_chans: int, dim: int) -> nn.Module:
    """Four 3x3 conv-BN-ReLU blocks, stride 8 overall."""
    widths, layers, c = [dim // 2, dim, dim, dim], [], in_chans
    for i, w in enumerate(widths):
        layers += [nn.Conv2d(c, w, 3, stride=2 if i < 3 else 1, padding=1, bias=False), nn.BatchNorm2d(w),
                   nn.ReLU(inplace=True)]
        c = w
    return nn.Sequential(*layers)


class DETRNet(nn.Module):
    """A small DETR: backbone, transformer encoder, top-k query selection, and a decoder with D-FINE's FDR head or
    an L1+GIoU head.

    See the module docstring for what is scaled down. ``forward`` returns ``{"layers": [per decoder layer: logits
    (B, Q, C), boxes (B, Q, 4) cxcywh in [0, 1] (+ corners, ref for FDR)], "enc": top-k encoder outputs,
    "pre": the first layer's pre-FDR box (FDR only)}``."""

    def __init__(self, num_classes: int, in_chans: int = 1, backbone: str = "cnn", hidden_dim: int = 64,
                 num_heads: int = 4, ffn_dim: int = 128, encoder_layers: int = 1, decoder_layers: int = 3,
                 num_queries: int = 20, box_head: Literal["fdr", "l1_giou"] = "fdr", reg_max: int = 32,
                 reg_scale: float = 4.0, up: float = 0.5, anchor_size: float = 0.25) -> None:
        super().__init__()
        self.num_classes, self.num_queries, self.box_head = num_classes, num_queries, box_head
        self.reg_max, self.reg_scale = reg_max, reg_scale
        self.timm_backbone = backbone != "cnn"
        if backbone == "cnn":
            self.backbone, channels = small_cnn(in_chans, hidden_dim), hidden_dim
        else:
            from lightning_ext.core.optional import require

            timm = require("timm", "DETRNet(backbone=<timm name>)")
            net = timm.create_model(backbone, pretrained=False, features_only=True, in_chans=in_chans)
            reductions = net.feature_info.reduction()
            level = min(range(len(reductions)), key=lambda i: abs(reductions[i] - 8))
            self.backbone = timm.create_model(backbone, pretrained=False, features_only=True, in_chans=in_chans,
                                              out_indices=(level,))
            channels = self.backbone.feature_info.channels()[0]
        self.proj = nn.Sequential(nn.Conv2d(channels, hidden_dim, 1, bias=False), nn.BatchNorm2d(hidden_dim))
        self.encoder = nn.ModuleList(
            nn.TransformerEncoderLayer(hidden_dim, num_heads, ffn_dim, dropout=0.0, batch_first=True)
            for _ in range(encoder_layers))
        self.enc_output = nn.Sequential(nn.Linear(hidden_dim, hidden_dim), nn.LayerNorm(hidden_dim))
        self.enc_score_head = nn.Linear(hidden_dim, num_classes)
        self.enc_bbox_head = MLP([hidden_dim, hidden_dim, hidden_dim, 4])
        self.anchor_size = anchor_size
        self.query_pos_head = MLP([4, 2 * hidden_dim, hidden_dim])
        self.layers = nn.ModuleList(DecoderLayer(hidden_dim, num_heads, ffn_dim) for _ in range(decoder_layers))
        self.score_heads = nn.ModuleList(nn.Linear(hidden_dim, num_classes) for _ in range(decoder_layers))
        out = 4 * (reg_max + 1) if box_head == "fdr" else 4
        self.bbox_heads = nn.ModuleList(MLP([hidden_dim, hidden_dim, hidden_dim, out]) for _ in range(decoder_layers))
        if box_head == "fdr":
            self.pre_bbox_head = MLP([hidden_dim, hidden_dim, hidden_dim, 4])
            self.lqe = nn.ModuleList(LQE(reg_max) for _ in range(decoder_layers))
            self.register_buffer("project", D.weighting_function(reg_max, up, reg_scale), persistent=False)
        prior = -math.log((1 - 0.01) / 0.01)
        for head in [self.enc_score_head, *self.score_heads]:
            nn.init.constant_(head.bias, prior)
        for mlp in [self.enc_bbox_head, *self.bbox_heads] + ([self.pre_bbox_head] if box_head == "fdr" else []):
            nn.init.zeros_(mlp.layers[-1].weight)
            nn.init.zeros_(mlp.layers[-1].bias)

    def _anchors(self, h: int, w: int, device: torch.device) -> Tensor:
        ys, xs = torch.meshgrid((torch.arange(h, device=device) + 0.5) / h, (torch.arange(w, device=device) + 0.5) / w,
                                indexing="ij")
        wh = torch.full_like(xs, self.anchor_size)
        return inverse_sigmoid(torch.stack([xs, ys, wh, wh], -1).reshape(-1, 4))

    def forward(self, x: Tensor) -> dict:
        feat = self.proj(self.backbone(x)[-1] if self.timm_backbone else self.backbone(x))
        b, d, h, w = feat.shape
        pos = sine_position(h, w, d, feat.device)[None]
        memory = feat.flatten(2).transpose(1, 2) + pos  # position added once, before the encoder
        for layer in self.encoder:
            memory = layer(memory)
        # query selection: the top-k encoder tokens by class score become the decoder's queries and anchors
        out_mem = self.enc_output(memory)
        enc_logits = self.enc_score_head(out_mem)
        enc_unact = self.enc_bbox_head(out_mem) + self._anchors(h, w, feat.device)
        k = min(self.num_queries, out_mem.shape[1])
        top = enc_logits.max(-1).values.topk(k, dim=1).indices
        gather = lambda t: t.gather(1, top[..., None].expand(-1, -1, t.shape[-1]))  # noqa: E731
        ref_unact, tgt = gather(enc_unact), gather(out_mem).detach()
        out: dict = {"enc": {"logits": gather(enc_logits), "boxes": ref_unact.sigmoid()}, "layers": []}
        if self.box_head == "fdr":
            out.update(project=self.project, reg_scale=self.reg_scale)
        ref = ref_unact.detach().sigmoid()
        prev_corners: Tensor | float = 0.0
        tgt_detach: Tensor | float = 0.0
        for i, layer in enumerate(self.layers):
            tgt = layer(tgt, self.query_pos_head(ref), memory, pos)
            logits = self.score_heads[i](tgt)
            if self.box_head == "l1_giou":
                boxes = (self.bbox_heads[i](tgt) + inverse_sigmoid(ref)).sigmoid()
                out["layers"].append({"logits": logits, "boxes": boxes})
            else:
                if i == 0:
                    pre = (self.pre_bbox_head(tgt) + inverse_sigmoid(ref)).sigmoid()
                    out["pre"] = {"logits": logits, "boxes": pre}
                    ref_initial = pre.detach()
                corners = self.bbox_heads[i](tgt + tgt_detach) + prev_corners
                boxes = D.distance2bbox(ref_initial, D.integral(corners, self.project), self.reg_scale)
                logits = self.lqe[i](logits, corners)
                out["layers"].append({"logits": logits, "boxes": boxes, "corners": corners, "ref": ref_initial})
                prev_corners, tgt_detach = corners, tgt.detach()
            ref = boxes.detach()
        return out


class DETRCriterion(nn.Module):
    """The set loss of :class:`DETRNet`'s outputs: VFL + L1 + GIoU on every decoder layer, the encoder's top-k and
    (FDR) the pre box; FDR adds FGL on every layer and, with ``go_lsd``, DDF from the last layer to the earlier ones
    and GO matching (the union of all layers' matches) for the box losses.

    ``targets``: per image ``{"labels": (n,), "boxes": (n, 4) cxcywh normalised}``. Returns the weighted total and
    the unweighted terms summed over layers.
    """

    def __init__(self, box_head: Literal["fdr", "l1_giou"] = "fdr", go_lsd: bool = True,
                 weights: dict | None = None, temperature: float = 5.0) -> None:
        super().__init__()
        self.box_head, self.go_lsd, self.temperature = box_head, go_lsd and box_head == "fdr", temperature
        self.weights = dict(LOSS_WEIGHTS, **(weights or {}))

    def forward(self, out: dict, targets: Sequence[dict]) -> tuple[Tensor, dict[str, Tensor]]:
        layers = out["layers"]
        extras = [out["enc"]] + ([out["pre"]] if "pre" in out else [])
        match = [D.hungarian_match(o["logits"], o["boxes"], targets) for o in layers + extras]
        # the box counts are averaged over ranks (the reference's all_reduce / world size): with DDP's gradient
        # averaging the losses then normalise by the global batch's count, as in one process
        device = layers[-1]["logits"].device
        num_boxes = max(mean_over_ranks(sum(len(t["labels"]) for t in targets), device), 1.0)
        labels = [t["labels"] for t in targets]
        go = D.go_indices(match) if self.go_lsd else None
        num_go = max(mean_over_ranks(sum(len(q) for q, _ in go), device), 1.0) if go is not None else num_boxes
        terms = {k: layers[-1]["logits"].sum() * 0 for k in ("vfl", "bbox", "giou")}
        if self.box_head == "fdr":
            terms.update(fgl=terms["vfl"].clone(), ddf=terms["vfl"].clone())
        last = len(layers) - 1
        for i, o in enumerate(layers + extras):
            own = match[i]
            box_idx, nb = (go, num_go) if go is not None else (own, num_boxes)
            src = D._src_idx(own)
            tgt_own = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, own)])
            iou_own = D.matched_iou(o["boxes"][src].detach(), tgt_own)
            terms["vfl"] = terms["vfl"] + D.varifocal_loss(o["logits"], own, labels, iou_own, num_boxes)
            src_b = D._src_idx(box_idx)
            pred_b = o["boxes"][src_b]
            tgt_b = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, box_idx)])
            l1, giou = D.l1_giou_losses(pred_b, tgt_b, nb)
            terms["bbox"], terms["giou"] = terms["bbox"] + l1, terms["giou"] + giou
            if "corners" not in o:
                continue
            iou_b = D.matched_iou(pred_b.detach(), tgt_b)
            bins = o["corners"].shape[-1] // 4
            target_bins, w_r, w_l = D.bbox2distance(o["ref"][src_b].detach(), box_convert(tgt_b, "cxcywh", "xyxy"),
                                                    out["project"], out["reg_scale"])
            terms["fgl"] = terms["fgl"] + D.fgl_loss(o["corners"][src_b].reshape(-1, bins), target_bins, w_r, w_l,
                                                     iou_b.repeat_interleave(4), nb)
            if self.go_lsd and i < last:
                terms["ddf"] = terms["ddf"] + D.ddf_loss(o["corners"], layers[-1]["corners"], layers[-1]["logits"],
                                                         src_b, iou_b, self.temperature)
        total = sum(self.weights[k] * v for k, v in terms.items())
        return total, {k: v.detach() for k, v in terms.items()}


def postprocess(out: dict, image_size: tuple[int, int], top_k: int = 100) -> list[dict]:
    """The last layer's detections per image: the ``top_k`` (query, class) pairs by sigmoid score, boxes in xyxy
    pixels clipped to the image (torchvision / torchmetrics' prediction format)."""
    logits, boxes = out["layers"][-1]["logits"], out["layers"][-1]["boxes"]
    b, q, c = logits.shape
    scores = logits.sigmoid().flatten(1)
    k = min(top_k, q * c)
    top_scores, idx = scores.topk(k, dim=1)
    h, w = image_size
    scale = boxes.new_tensor([w, h, w, h])
    xyxy = box_convert(boxes, "cxcywh", "xyxy") * scale
    xyxy = torch.stack([xyxy[..., 0].clamp(0, w), xyxy[..., 1].clamp(0, h), xyxy[..., 2].clamp(0, w),
                        xyxy[..., 3].clamp(0, h)], -1)
    return [{"boxes": xyxy[i][idx[i] // c], "scores": top_scores[i], "labels": idx[i] % c} for i in range(b)]
