r"""A tiny CenterNet-style detector: the network, its training targets and loss, and decoding, the pure core.

Paper: "Objects as Points", Xingyi Zhou, Dequan Wang, Philipp Krähenbühl, arXiv 1904.07850 (2019). Reference
code: https://github.com/xingyizhou/CenterNet (``src/lib/models/losses.py``: ``_neg_loss``; ``src/lib/models/
decode.py``: ``_nms``, ``_topk``). Scaled to a CPU: three stride-2 convolution blocks (the ``backbone``) give a
stride-8 map, one 3x3 convolution is the ``neck`` and a 1x1 convolution the ``head`` with ``C`` heatmap channels,
2 size channels and 2 offset channels (about 80 k parameters at the defaults).

Each object ``k`` with box centre ``c_k`` (pixels) and size ``(w_k, h_k)`` puts a Gaussian peak on its class's
heatmap at the stride-8 cell ``p_k = floor(c_k / R)``:

.. math::

    Y_{xyc} = \max_{k: c_k = c} \exp\Big(-\frac{(x - p_{k,x})^2}{2\sigma_{k,x}^2}
              - \frac{(y - p_{k,y})^2}{2\sigma_{k,y}^2}\Big), \quad
    \sigma_{k} = \max\big(\tfrac{(w_k, h_k)}{6R}, \tfrac{1}{3}\big)

(an elliptical kernel as in TTFNet; CenterNet's own radius rule from the box-overlap bound differs). The loss is
CenterNet's penalty-reduced focal loss plus L1 on size (in cells) and sub-cell offset at the object cells:

.. math::

    L_k = \frac{-1}{N} \sum_{xyc} \begin{cases} (1 - \hat Y)^{\alpha} \log \hat Y & Y = 1 \\
          (1 - Y)^{\beta} \hat Y^{\alpha} \log(1 - \hat Y) & \text{otherwise} \end{cases}, \quad
    L = L_k + \lambda_{size} \frac{1}{N}\sum_k |\hat S_{p_k} - s_k| + \lambda_{off} \frac{1}{N}\sum_k
        |\hat O_{p_k} - (c_k / R - p_k)|

with ``alpha = 2``, ``beta = 4``, ``lambda_size = 0.1``, ``lambda_off = 1`` (the reference defaults). Decoding keeps
the heatmap's 3x3 local maxima (max-pool NMS), the ``max_detections`` best, and removes duplicates with
torchvision's ``batched_nms``.

Example:
    >>> import torch
    >>> net = TinyCenterNet(num_classes=10)
    >>> out = net(torch.zeros(2, 1, 64, 64))
    >>> tuple(out.shape)
    (2, 14, 8, 8)
    >>> targets = [{"boxes": torch.tensor([[10., 12., 30., 34.]]), "labels": torch.tensor([3])},
    ...            {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}]
    >>> loss, parts = centernet_loss(out, targets, num_classes=10)
    >>> sorted(parts), bool(loss > 0)
    (['heatmap', 'offset', 'size'], True)
    >>> len(decode_detections(out, num_classes=10, max_detections=5)[0]["boxes"])
    5
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_ext.core.validation import check_number, check_positive_int

__all__ = ["TinyCenterNet", "centernet_targets", "centernet_loss", "decode_detections", "focal_heatmap_loss"]


def _block(cin: int, cout: int, groups: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1), nn.GroupNorm(groups, cout), nn.ReLU(),
                         nn.Conv2d(cout, cout, 3, 1, 1), nn.GroupNorm(groups, cout), nn.ReLU())


class TinyCenterNet(nn.Module):
    """A tiny CenterNet-style network: a stride-8 ``backbone``, a 3x3 ``neck`` and a 1x1 ``head`` (heatmap, size, offset).

    ``backbone``: three stride-2 blocks of two 3x3 convolutions with GroupNorm; ``head``: ``num_classes + 4``
    channels (heatmap logits, size, offset) on the stride-8 map.

    The heatmap bias starts at ``-log((1 - 0.1) / 0.1)`` (a 0.1 prior, as the reference).

    Args:
        num_classes: object classes.
        in_chans: image channels.
        widths: channels of the three backbone blocks.
        neck_width: channels of the neck.
    """

    stride = 8

    def __init__(self, num_classes: int = 10, in_chans: int = 1, widths: Sequence[int] = (16, 32, 48),
                 neck_width: int = 64) -> None:
        super().__init__()
        for name, value in (("num_classes", num_classes), ("in_chans", in_chans), ("neck_width", neck_width)):
            check_positive_int(name, value)
        widths = [int(w) for w in widths]
        if len(widths) != 3 or any(w < 4 or w % 4 for w in widths):
            raise ValueError(f"widths must be three channel counts divisible by 4 (GroupNorm of 4 groups), got {widths}.")
        chans = [in_chans, *widths]
        self.backbone = nn.Sequential(*(_block(chans[i], chans[i + 1], 4) for i in range(3)))
        self.neck = nn.Sequential(nn.Conv2d(widths[-1], neck_width, 3, 1, 1), nn.ReLU())
        self.head = nn.Conv2d(neck_width, num_classes + 4, 1)
        with torch.no_grad():
            self.head.bias[:num_classes].fill_(-2.19)
        self.num_classes = num_classes

    def forward(self, x: Tensor) -> Tensor:
        """Raw outputs ``(B, num_classes + 4, H / 8, W / 8)``."""
        return self.head(self.neck(self.backbone(x)))


def centernet_targets(targets: Sequence[dict], num_classes: int, shape: tuple[int, int],
                      stride: int = 8) -> tuple[Tensor, list[tuple[int, int, int, Tensor, Tensor]]]:
    """``(heatmap (B, C, h, w), objects)``: the Gaussian heatmap and, per object, ``(image, row, col, size (2,),
    offset (2,))`` with size in cells and the centre's sub-cell offset (``x`` first)."""
    h, w = shape
    heat = torch.zeros(len(targets), num_classes, h, w)
    objects = []
    ys, xs = torch.arange(h, dtype=torch.float32)[:, None], torch.arange(w, dtype=torch.float32)[None, :]
    for b, t in enumerate(targets):
        boxes = torch.as_tensor(t["boxes"], dtype=torch.float32).reshape(-1, 4)
        for box, label in zip(boxes, torch.as_tensor(t["labels"]).reshape(-1).tolist()):
            if not 0 <= label < num_classes:
                raise ValueError(f"a target label {label} lies outside [0, num_classes={num_classes}).")
            centre = (box[:2] + box[2:]) / 2 / stride
            size = (box[2:] - box[:2]) / stride
            col, row = int(centre[0].clamp(0, w - 1 + 0.999)), int(centre[1].clamp(0, h - 1 + 0.999))
            sigma = (size / 6).clamp(min=1 / 3)
            g = torch.exp(-(xs - col) ** 2 / (2 * sigma[0] ** 2) - (ys - row) ** 2 / (2 * sigma[1] ** 2))
            heat[b, label] = torch.maximum(heat[b, label], g)
            objects.append((b, row, col, size, centre - torch.tensor([col, row], dtype=torch.float32)))
    return heat, objects


def focal_heatmap_loss(logits: Tensor, heat: Tensor, alpha: float = 2.0, beta: float = 4.0) -> Tensor:
    """CenterNet's penalty-reduced focal loss (``_neg_loss``) summed and divided by the number of peaks (>= 1)."""
    p = torch.sigmoid(logits).clamp(1e-4, 1 - 1e-4)
    pos = heat.eq(1).float()
    pos_loss = torch.log(p) * (1 - p) ** alpha * pos
    neg_loss = torch.log(1 - p) * p ** alpha * (1 - heat) ** beta * (1 - pos)
    return -(pos_loss.sum() + neg_loss.sum()) / pos.sum().clamp(min=1)


def centernet_loss(outputs: Tensor, targets: Sequence[dict], num_classes: int, size_weight: float = 0.1,
                   offset_weight: float = 1.0, stride: int = 8) -> tuple[Tensor, dict[str, Tensor]]:
    """CenterNet's loss (focal heatmap loss + L1 size and offset) of raw outputs against xyxy pixel boxes.

    Returns ``(loss, {"heatmap", "size", "offset"})``; ``outputs`` is ``(B, C + 4, h, w)``.
    """
    if outputs.ndim != 4 or outputs.shape[1] != num_classes + 4:
        raise ValueError(f"outputs must be (B, num_classes + 4 = {num_classes + 4}, h, w); got {tuple(outputs.shape)}.")
    if len(targets) != len(outputs):
        raise ValueError(f"{len(targets)} targets for a batch of {len(outputs)} images.")
    heat, objects = centernet_targets(targets, num_classes, tuple(outputs.shape[-2:]), stride)
    heat = heat.to(outputs.device)
    hm = focal_heatmap_loss(outputs[:, :num_classes], heat)
    zero = outputs.sum() * 0
    if not objects:
        return hm, {"heatmap": hm.detach(), "size": zero.detach(), "offset": zero.detach()}
    b, r, c = (torch.tensor([o[i] for o in objects], device=outputs.device) for i in range(3))
    pred = outputs[b, num_classes:, r, c]  # (N, 4)
    size_t = torch.stack([o[3] for o in objects]).to(outputs.device)
    off_t = torch.stack([o[4] for o in objects]).to(outputs.device)
    size = F.l1_loss(pred[:, :2], size_t, reduction="sum") / len(objects)
    offset = F.l1_loss(pred[:, 2:], off_t, reduction="sum") / len(objects)
    loss = hm + size_weight * size + offset_weight * offset
    return loss, {"heatmap": hm.detach(), "size": size.detach(), "offset": offset.detach()}


@torch.no_grad()
def decode_detections(outputs: Tensor, num_classes: int, max_detections: int = 20, score_threshold: float = 0.0,
                      nms_iou: float = 0.5, stride: int = 8) -> list[dict[str, Tensor]]:
    """Per image ``{"boxes" (n, 4) xyxy pixels, "scores", "labels"}``: 3x3 peak NMS, the ``max_detections`` best
    peaks above ``score_threshold``, then class-wise box NMS at ``nms_iou`` (torchvision ``batched_nms``)."""
    from torchvision.ops import batched_nms

    check_positive_int("max_detections", max_detections)
    check_number("score_threshold", score_threshold, low=0, high=1)
    heat = torch.sigmoid(outputs[:, :num_classes].float())
    peaks = heat * (F.max_pool2d(heat, 3, 1, 1) == heat)
    b, _, h, w = heat.shape
    scores, idx = peaks.reshape(b, -1).topk(min(max_detections, num_classes * h * w), dim=1)
    out = []
    for i in range(b):
        keep = scores[i] >= score_threshold
        s, k = scores[i][keep], idx[i][keep]
        label, cell = k // (h * w), k % (h * w)
        row, col = cell // w, cell % w
        reg = outputs[i, num_classes:, row, col].float()  # (4, n)
        cx, cy = (col + reg[2]) * stride, (row + reg[3]) * stride
        bw, bh = reg[0].clamp(min=0) * stride, reg[1].clamp(min=0) * stride
        boxes = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], dim=1)
        kept = batched_nms(boxes, s, label, nms_iou)
        out.append({"boxes": boxes[kept], "scores": s[kept], "labels": label[kept]})
    return out
