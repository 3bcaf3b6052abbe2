r"""D-FINE's pure core: fine-grained distribution refinement (FDR) of box edges, its losses (FGL, DDF / GO-LSD),
the Hungarian matcher and the DETR set losses (VFL, L1, GIoU), as functions of tensors.

Paper: "D-FINE: Redefine Regression Task in DETRs as Fine-grained Distribution Refinement" (Peng et al., ICLR
2025, arXiv 2410.13842); reference code https://github.com/Peterande/D-FINE (``src/zoo/dfine/dfine_utils.py``,
``dfine_criterion.py``, ``matcher.py``). Written here from the paper's equations and that code's conventions.

**FDR.** Each box edge is a distribution over ``reg_max + 1`` bins whose values follow the non-uniform weighting
function :math:`W(n)` (:func:`weighting_function`): with :math:`a = up \cdot c` (``up = 0.5``, ``c = reg_scale =
4``) and :math:`s = (a + 1)^{2 / (reg\_max - 2)}`, :math:`W = [-2a, -(s^{k} - 1)_{k=reg\_max/2-1..1}, 0,
(s^{k} - 1)_{k=1..reg\_max/2-1}, 2a]`, dense near 0 and coarse at the ends. The edge offset is
:math:`d = \sum_n \mathrm{softmax}(\ell)_n W(n)` (:func:`integral`) and the box is the reference box moved edge
by edge (:func:`distance2bbox`): :math:`x_1 = c_x - (c/2 + d_l) w / c`, :math:`x_2 = c_x + (c/2 + d_r) w / c`
(likewise for y). Each decoder layer adds its logits to the previous layer's (residual refinement).

**FGL** (:func:`fgl_loss`): the ground-truth edge, in bin coordinates (:func:`bbox2distance`), falls between bins
:math:`n` and :math:`n + 1` with weights :math:`\omega_l, \omega_r` (linear in :math:`W`), and
:math:`L_{FGL} = \sum_{edges} IoU \cdot (\omega_l\,CE(\ell, n) + \omega_r\,CE(\ell, n + 1)) / N_{boxes}`.

**DDF** (:func:`ddf_loss`, GO-LSD): every earlier layer's edge distributions are distilled from the last layer's,
:math:`T^2\,KL(\mathrm{softmax}(\ell^{t}/T)\,\|\,\mathrm{softmax}(\ell^{s}/T))` per edge, weighted by the IoU of
matched queries and the teacher's max class confidence of the others; matched and unmatched edges are averaged
separately and mixed with weights :math:`\sqrt{8 N_{pos} / B}` and :math:`\sqrt{8 N_{neg} / B}`.

Example:
    >>> W = weighting_function(32, 0.5, 4.0)
    >>> W.shape, float(W[0]), float(W[16]), float(W[-1])
    (torch.Size([33]), -4.0, 0.0, 4.0)
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import box_convert, box_iou, generalized_box_iou

__all__ = ["Indices", "bbox2distance", "ddf_loss", "distance2bbox", "fgl_loss", "go_indices", "hungarian_match",
           "integral", "l1_giou_losses", "translate_gt", "varifocal_loss", "weighting_function"]

#: Per image: (query indices, target indices) of the matched pairs.
Indices = list[tuple[Tensor, Tensor]]


def weighting_function(reg_max: int, up: float, reg_scale: float) -> Tensor:
    """The ``reg_max + 1`` bin values :math:`W(n)` (see the module docstring)."""
    if reg_max < 4 or reg_max % 2:
        raise ValueError(f"reg_max must be an even integer >= 4; got {reg_max}.")
    a = abs(up) * abs(reg_scale)
    step = (a + 1) ** (2 / (reg_max - 2))
    left = [-(step ** k) + 1 for k in range(reg_max // 2 - 1, 0, -1)]
    right = [step ** k - 1 for k in range(1, reg_max // 2)]
    return torch.tensor([-2 * a, *left, 0.0, *right, 2 * a], dtype=torch.float32)


def integral(corners: Tensor, project: Tensor) -> Tensor:
    """Edge offsets :math:`\\sum_n \\mathrm{softmax}(\\ell)_n W(n)`: ``(..., 4 * (R + 1))`` logits -> ``(..., 4)``."""
    bins = project.numel()
    prob = corners.reshape(*corners.shape[:-1], 4, bins).softmax(-1)
    return prob @ project.to(prob)


def distance2bbox(ref: Tensor, distance: Tensor, reg_scale: float) -> Tensor:
    """Reference boxes ``(..., 4)`` cxcywh moved by edge offsets ``(l, t, r, b)``; returns cxcywh."""
    c = abs(reg_scale)
    cx, cy, w, h = ref.unbind(-1)
    x1 = cx - (0.5 * c + distance[..., 0]) * w / c
    y1 = cy - (0.5 * c + distance[..., 1]) * h / c
    x2 = cx + (0.5 * c + distance[..., 2]) * w / c
    y2 = cy + (0.5 * c + distance[..., 3]) * h / c
    return box_convert(torch.stack([x1, y1, x2, y2], -1), "xyxy", "cxcywh")


def translate_gt(gt: Tensor, project: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Continuous edge offsets ``(n,)`` -> (left bin as float, weight of the right bin, weight of the left bin).

    Offsets below :math:`W(0)` go to bin 0 with weight 1; offsets at or above :math:`W(R)` to ``R - 0.1`` with the
    right bin's weight 1 (the reference code's clipping).
    """
    gt = gt.reshape(-1)
    reg_max = project.numel() - 1
    left = (project[None, :] <= gt[:, None]).sum(1) - 1
    idx = left.float()
    w_right, w_left = torch.zeros_like(gt), torch.zeros_like(gt)
    ok = (left >= 0) & (left < reg_max)
    lv, rv = project[left[ok]], project[left[ok] + 1]
    dl, dr = (gt[ok] - lv).abs(), (rv - gt[ok]).abs()
    w_right[ok] = dl / (dl + dr)
    w_left[ok] = 1 - w_right[ok]
    below, above = left < 0, left >= reg_max
    idx[below], w_left[below], w_right[below] = 0.0, 1.0, 0.0
    idx[above], w_left[above], w_right[above] = reg_max - 0.1, 0.0, 1.0
    return idx, w_right, w_left


def bbox2distance(ref: Tensor, target_xyxy: Tensor, project: Tensor, reg_scale: float,
                  eps: float = 0.1) -> tuple[Tensor, Tensor, Tensor]:
    """FGL targets of matched pairs: reference boxes ``(n, 4)`` cxcywh and ground truth ``(n, 4)`` xyxy ->
    (bin positions ``(4n,)`` clamped to ``[0, R - eps]``, right weights, left weights)."""
    c = abs(reg_scale)
    cx, cy, w, h = ref.unbind(-1)
    sx, sy = w / c + 1e-16, h / c + 1e-16
    d = torch.stack([(cx - target_xyxy[:, 0]) / sx, (cy - target_xyxy[:, 1]) / sy,
                     (target_xyxy[:, 2] - cx) / sx, (target_xyxy[:, 3] - cy) / sy], -1) - 0.5 * c
    idx, w_right, w_left = translate_gt(d, project)
    return idx.clamp(0, project.numel() - 1 - eps).detach(), w_right.detach(), w_left.detach()


def fgl_loss(pred_corners: Tensor, target_bins: Tensor, w_right: Tensor, w_left: Tensor,
             weight: Optional[Tensor], num_boxes: float) -> Tensor:
    """D-FINE's fine-grained localisation loss (FGL): IoU-weighted two-bin cross-entropy of each matched box edge.

    ``pred_corners``: ``(4n, R + 1)`` logits of the matched edges; ``target_bins``, ``w_right``, ``w_left`` from
    :func:`bbox2distance`; ``weight``: the IoU of each edge's box; the sum is divided by ``num_boxes``.
    """
    left = target_bins.long()
    loss = (F.cross_entropy(pred_corners, left, reduction="none") * w_left
            + F.cross_entropy(pred_corners, left + 1, reduction="none") * w_right)
    if weight is not None:
        loss = loss * weight
    return loss.sum() / num_boxes


def ddf_loss(student: Tensor, teacher: Tensor, teacher_logits: Tensor, matched: tuple[Tensor, Tensor],
             matched_iou: Tensor, temperature: float = 5.0, batch_ref: float = 8.0) -> Tensor:
    """D-FINE's decoupled distillation focal loss (DDF, GO-LSD): the last decoder layer's edge distributions
    distilled into an earlier layer's.

    Args:
        student: this layer's corner logits ``(B, Q, 4 * (R + 1))``.
        teacher: the last layer's corner logits (detached here).
        teacher_logits: the last layer's class logits ``(B, Q, C)``.
        matched: (batch index, query index) of the matched queries.
        matched_iou: IoU of those queries' boxes with their targets (weights of the matched part).
        temperature: :math:`T`.
        batch_ref: the reference code's batch normaliser (``8 / B``).
    """
    bins = student.shape[-1] // 4
    s, t = student.reshape(-1, bins), teacher.detach().reshape(-1, bins)
    weight = teacher_logits.detach().sigmoid().max(-1).values.clone()
    mask = torch.zeros_like(weight, dtype=torch.bool)
    mask[matched] = True
    weight[matched] = matched_iou.to(weight.dtype)
    weight, mask = weight.unsqueeze(-1).expand(-1, -1, 4).reshape(-1), mask.unsqueeze(-1).expand(-1, -1, 4).reshape(-1)
    kl = F.kl_div(F.log_softmax(s / temperature, 1), F.softmax(t / temperature, 1), reduction="none").sum(-1)
    loss = weight.detach() * temperature ** 2 * kl
    scale = batch_ref / student.shape[0]
    n_pos, n_neg = (mask.sum() * scale) ** 0.5, ((~mask).sum() * scale) ** 0.5
    pos = loss[mask].mean() if mask.any() else loss.sum() * 0
    neg = loss[~mask].mean() if (~mask).any() else loss.sum() * 0
    return (pos * n_pos + neg * n_neg) / (n_pos + n_neg)


def varifocal_loss(logits: Tensor, indices: Indices, labels: Sequence[Tensor], ious: Tensor, num_boxes: float,
                   alpha: float = 0.75, gamma: float = 2.0) -> Tensor:
    """Varifocal loss (VFL): BCE towards the IoU for the matched query's class, focal-weighted negatives."""
    b_idx, q_idx = _src_idx(indices)
    target, onehot = torch.zeros_like(logits), torch.zeros_like(logits)
    if len(b_idx):
        cls = torch.cat([lab[j] for lab, (_, j) in zip(labels, indices)])
        target[b_idx, q_idx, cls] = ious.detach().to(logits.dtype)
        onehot[b_idx, q_idx, cls] = 1.0
    weight = alpha * logits.detach().sigmoid().pow(gamma) * (1 - onehot) + target
    loss = F.binary_cross_entropy_with_logits(logits, target, weight=weight, reduction="none")
    return loss.mean(1).sum() * logits.shape[1] / num_boxes


def l1_giou_losses(pred_boxes: Tensor, target_boxes: Tensor, num_boxes: float) -> tuple[Tensor, Tensor]:
    """L1 (on cxcywh) and GIoU losses of matched pairs ``(n, 4)`` cxcywh, summed over pairs / ``num_boxes``."""
    l1 = F.l1_loss(pred_boxes, target_boxes, reduction="sum") / num_boxes
    giou = generalized_box_iou(box_convert(pred_boxes, "cxcywh", "xyxy"), box_convert(target_boxes, "cxcywh", "xyxy"))
    return l1, (1 - torch.diag(giou)).sum() / num_boxes


def matched_iou(pred_boxes: Tensor, target_boxes: Tensor) -> Tensor:
    """IoU of matched pairs ``(n, 4)`` cxcywh."""
    if len(pred_boxes) == 0:
        return pred_boxes.new_zeros(0)
    return torch.diag(box_iou(box_convert(pred_boxes, "cxcywh", "xyxy"), box_convert(target_boxes, "cxcywh", "xyxy")))


@torch.no_grad()
def hungarian_match(logits: Tensor, boxes: Tensor, targets: Sequence[dict], cost_class: float = 2.0,
                    cost_bbox: float = 5.0, cost_giou: float = 2.0, alpha: float = 0.25, gamma: float = 2.0) -> Indices:
    """One-to-one assignment of queries to targets minimising the DETR matching cost (``scipy``'s
    ``linear_sum_assignment``).

    The cost of query :math:`q` for target :math:`j` of class :math:`c_j` is
    :math:`\\lambda_{cls}(FL^+ - FL^-) + \\lambda_{L1}\\|b_q - b_j\\|_1 - \\lambda_{GIoU}GIoU(b_q, b_j)` with the
    focal terms :math:`FL^+ = \\alpha(1 - p)^\\gamma(-\\log p)`, :math:`FL^- = (1 - \\alpha)p^\\gamma(-\\log(1 - p))`,
    :math:`p = \\sigma(\\ell_{q, c_j})`.

    Args:
        logits: ``(B, Q, C)`` class logits.
        boxes: ``(B, Q, 4)`` cxcywh, normalised.
        targets: per image ``{"labels": (n,), "boxes": (n, 4) cxcywh normalised}``.
    """
    from scipy.optimize import linear_sum_assignment

    sizes = [len(t["labels"]) for t in targets]
    b, q, _ = logits.shape
    empty = torch.zeros(0, dtype=torch.int64)
    if sum(sizes) == 0:
        return [(empty, empty.clone()) for _ in sizes]
    labels = torch.cat([t["labels"] for t in targets])
    tboxes = torch.cat([t["boxes"] for t in targets])
    p = logits.flatten(0, 1).sigmoid()[:, labels]
    pos = alpha * (1 - p) ** gamma * (-(p + 1e-8).log())
    neg = (1 - alpha) * p ** gamma * (-(1 - p + 1e-8).log())
    flat = boxes.flatten(0, 1)
    giou = generalized_box_iou(box_convert(flat, "cxcywh", "xyxy"), box_convert(tboxes, "cxcywh", "xyxy"))
    cost = cost_class * (pos - neg) + cost_bbox * torch.cdist(flat, tboxes, p=1) - cost_giou * giou
    cost = torch.nan_to_num(cost, nan=1.0).view(b, q, -1).cpu()
    out: Indices = []
    for i, c in enumerate(cost.split(sizes, -1)):
        if sizes[i] == 0:
            out.append((empty, empty.clone()))
            continue
        rows, cols = linear_sum_assignment(c[i].numpy())
        out.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
    return out


def go_indices(per_layer: Sequence[Indices]) -> Indices:
    """GO matching: per image, the union of every layer's matched (query, target) pairs; a query matched to
    several targets keeps the pair that most layers chose (ties: the first seen)."""
    out: Indices = []
    for b in range(len(per_layer[0])):
        counts: dict[tuple[int, int], int] = {}
        for layer in per_layer:
            for q, t in zip(layer[b][0].tolist(), layer[b][1].tolist()):
                counts[(q, t)] = counts.get((q, t), 0) + 1
        chosen: dict[int, int] = {}
        for (q, t), _ in sorted(counts.items(), key=lambda kv: -kv[1]):
            chosen.setdefault(q, t)
        out.append((torch.tensor(list(chosen.keys()), dtype=torch.int64),
                    torch.tensor(list(chosen.values()), dtype=torch.int64)))
    return out


def _src_idx(indices: Indices) -> tuple[Tensor, Tensor]:
    b = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)]) if indices else torch.zeros(0)
    q = torch.cat([src for src, _ in indices]) if indices else torch.zeros(0)
    return b.long(), q.long()
