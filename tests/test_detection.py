"""D-FINE's pieces against independent implementations written here from the paper's equations (weighting function,
FGL, DDF, VFL, the Hungarian matcher by brute force), the DETR network's FDR wiring, the digit-canvas task, sample
images, resume and bad input."""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("pycocotools")

from lightning_ext.detection import d_fine as D  # noqa: E402
from lightning_ext.detection.detr import DETRDetector, check_targets  # noqa: E402
from lightning_ext.detection.detr_net import DETRCriterion, DETRNet  # noqa: E402
from lightning_ext.detection.digit_canvas import DigitCanvasDetectionDataModule  # noqa: E402
from lightning_ext.testing import assert_same_parameters, crash_and_resume  # noqa: E402


def _W(reg_max=32, up=0.5, c=4.0):
    """W(n) from the paper: a = up*c, s = (a + 1)^(2 / (reg_max - 2)); symmetric, dense near 0, ends +-2a."""
    a = up * c
    s = (a + 1) ** (2 / (reg_max - 2))
    half = reg_max // 2
    w = [0.0] * (reg_max + 1)
    w[0], w[reg_max] = -2 * a, 2 * a
    for k in range(1, half):
        w[half + k] = s ** k - 1
        w[half - k] = -(s ** k - 1)
    return torch.tensor(w)


def test_weighting_function_follows_the_paper():
    W = D.weighting_function(32, 0.5, 4.0)
    torch.testing.assert_close(W, _W())
    assert float(W[31]) == pytest.approx(2.0)  # s^(reg_max/2 - 1) - 1 = a
    assert bool((W[1:] > W[:-1]).all())
    torch.testing.assert_close(D.weighting_function(8, 1.0, 2.0), _W(8, 1.0, 2.0))


def _fgl_targets(d: float, W: torch.Tensor) -> tuple[int, float, float]:
    """Left bin n with W(n) <= d < W(n+1) and linear weights (clipped as the reference code does)."""
    R = len(W) - 1
    if d < float(W[0]):
        return 0, 1.0, 0.0
    if d >= float(W[R]):
        return R - 1, 0.0, 1.0  # bin R - 0.1 -> left R - 1, right R with weight 1
    n = max(i for i in range(R + 1) if float(W[i]) <= d)
    wr = (d - float(W[n])) / (float(W[n + 1]) - float(W[n]))
    return n, 1 - wr, wr


def test_bbox2distance_and_distance2bbox_round_trip():
    W = D.weighting_function(32, 0.5, 4.0)
    ref = torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.3, 0.6, 0.1, 0.1]])
    target = torch.tensor([[0.45, 0.38, 0.62, 0.61], [0.26, 0.57, 0.36, 0.66]])  # xyxy, within reach of W
    bins, wr, wl = D.bbox2distance(ref, target, W, 4.0)
    n = bins.long()
    offsets = (wl * W[n] + wr * W[n + 1]).reshape(-1, 4)
    box = D.distance2bbox(ref, offsets, 4.0)
    from torchvision.ops import box_convert

    torch.testing.assert_close(box_convert(box, "cxcywh", "xyxy"), target, atol=1e-5, rtol=0)
    # a distribution peaked on those two bins integrates to the same offsets
    logits = torch.full((8, 33), -1e4)
    logits[torch.arange(8), n] = torch.log(wl.clamp_min(1e-12))
    logits[torch.arange(8), n + 1] = torch.log(wr.clamp_min(1e-12))
    torch.testing.assert_close(D.integral(logits.reshape(2, 4 * 33), W), offsets, atol=1e-5, rtol=0)


def test_fgl_loss_matches_the_paper():
    torch.manual_seed(0)
    W = D.weighting_function(32, 0.5, 4.0)
    n_boxes = 3
    ref = torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.3, 0.6, 0.1, 0.1], [0.7, 0.2, 0.3, 0.2]])
    target = torch.tensor([[0.42, 0.38, 0.62, 0.61], [0.0, 0.57, 0.36, 0.66], [0.56, 0.12, 0.80, 0.27]])
    logits = torch.randn(n_boxes * 4, 33)
    iou = torch.rand(n_boxes)
    bins, wr, wl = D.bbox2distance(ref, target, W, 4.0)
    got = D.fgl_loss(logits, bins, wr, wl, iou.repeat_interleave(4), num_boxes=2.0)
    total = 0.0
    for b in range(n_boxes):
        cx, cy, w, h = ref[b].tolist()
        x1, y1, x2, y2 = target[b].tolist()
        edges = [(cx - x1) / (w / 4) - 2, (cy - y1) / (h / 4) - 2, (x2 - cx) / (w / 4) - 2, (y2 - cy) / (h / 4) - 2]
        for e, d in enumerate(edges):
            n, w_left, w_right = _fgl_targets(d, W)
            logp = torch.log_softmax(logits[4 * b + e].double(), 0)
            total += float(iou[b]) * -(w_left * logp[n] + w_right * logp[n + 1]).item()
    assert float(got) == pytest.approx(total / 2.0, rel=1e-5)


def test_ddf_loss_matches_the_paper():
    torch.manual_seed(1)
    B, Q, R1, C, T = 2, 3, 9, 4, 5.0
    student, teacher = torch.randn(B, Q, 4 * R1), torch.randn(B, Q, 4 * R1)
    t_logits = torch.randn(B, Q, C)
    matched = (torch.tensor([0, 1]), torch.tensor([2, 0]))
    iou = torch.tensor([0.7, 0.4])
    got = D.ddf_loss(student, teacher, t_logits, matched, iou, T)
    pos, neg = [], []
    for b in range(B):
        for q in range(Q):
            m = [i for i in range(2) if int(matched[0][i]) == b and int(matched[1][i]) == q]
            weight = float(iou[m[0]]) if m else float(torch.sigmoid(t_logits[b, q]).max())
            for e in range(4):
                s = student[b, q, e * R1:(e + 1) * R1].double()
                t = teacher[b, q, e * R1:(e + 1) * R1].double()
                pt, logps = torch.softmax(t / T, 0), torch.log_softmax(s / T, 0)
                kl = float((pt * (pt.log() - logps)).sum())
                (pos if m else neg).append(weight * T * T * kl)
    n_pos, n_neg = math.sqrt(len(pos) * 8 / B), math.sqrt(len(neg) * 8 / B)
    expected = (np.mean(pos) * n_pos + np.mean(neg) * n_neg) / (n_pos + n_neg)
    assert float(got) == pytest.approx(expected, rel=1e-5)


def test_varifocal_loss_matches_its_formula():
    torch.manual_seed(2)
    logits = torch.randn(2, 3, 4)
    indices = [(torch.tensor([1]), torch.tensor([0])), (torch.tensor([0, 2]), torch.tensor([1, 0]))]
    labels = [torch.tensor([3]), torch.tensor([2, 1])]
    ious = torch.tensor([0.8, 0.5, 0.3])
    got = D.varifocal_loss(logits, indices, labels, ious, num_boxes=3.0)
    total, k = 0.0, 0
    q_of = {(0, 1): (3, 0.8), (1, 0): (1, 0.5), (1, 2): (2, 0.3)}  # (image, query) -> (class, IoU)
    for b, q, c in itertools.product(range(2), range(3), range(4)):
        p = torch.sigmoid(logits[b, q, c]).double()
        cls, iou = q_of.get((b, q), (None, 0.0))
        target = iou if c == cls else 0.0
        weight = target if c == cls else 0.75 * float(p) ** 2
        total += weight * -(target * math.log(p) + (1 - target) * math.log(1 - p))
    assert float(got) == pytest.approx(total / 3.0, rel=1e-5)


def _giou(a, b):
    ax1, ay1, ax2, ay2 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
    bx1, by1, bx2, by2 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
    inter = max(0, min(ax2, bx2) - max(ax1, bx1)) * max(0, min(ay2, by2) - max(ay1, by1))
    union = a[2] * a[3] + b[2] * b[3] - inter
    hull = (max(ax2, bx2) - min(ax1, bx1)) * (max(ay2, by2) - min(ay1, by1))
    return inter / union - (hull - union) / hull


def test_hungarian_matcher_finds_the_brute_force_optimum():
    torch.manual_seed(3)
    Q, C = 5, 4
    logits = torch.randn(2, Q, C)
    boxes = torch.cat([torch.rand(2, Q, 2) * 0.6 + 0.2, torch.rand(2, Q, 2) * 0.3 + 0.05], -1)
    targets = [{"labels": torch.tensor([1, 3, 0]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.1, 0.3],
                                                                          [0.5, 0.5, 0.3, 0.1]])},
               {"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}]
    got = D.hungarian_match(logits, boxes, targets)
    assert len(got[1][0]) == 0

    def cost(q, j):
        p = float(torch.sigmoid(logits[0, q, int(targets[0]["labels"][j])]))
        focal = 0.25 * (1 - p) ** 2 * -math.log(p + 1e-8) - 0.75 * p ** 2 * -math.log(1 - p + 1e-8)
        a, b = boxes[0, q].tolist(), targets[0]["boxes"][j].tolist()
        return 2 * focal + 5 * sum(abs(x - y) for x, y in zip(a, b)) - 2 * _giou(a, b)

    best = min(itertools.permutations(range(Q), 3), key=lambda qs: sum(cost(q, j) for j, q in enumerate(qs)))
    assignment = {int(j): int(q) for q, j in zip(*got[0])}
    assert [assignment[j] for j in range(3)] == list(best)


def test_go_matching_is_the_union_of_layers_with_the_majority_pair():
    a = [(torch.tensor([0, 1]), torch.tensor([0, 1]))]
    b = [(torch.tensor([0, 2]), torch.tensor([0, 1]))]
    c = [(torch.tensor([0, 1]), torch.tensor([1, 0]))]
    (q, t), = D.go_indices([a, b, c])
    assert dict(zip(q.tolist(), t.tolist())) == {0: 0, 1: 1, 2: 1}


def test_fdr_layers_start_at_the_pre_box_and_refine_residually():
    torch.manual_seed(4)
    net = DETRNet(10, hidden_dim=32, num_queries=4, decoder_layers=3).eval()
    out = net(torch.randn(2, 1, 32, 32))
    for layer in out["layers"]:  # zero-initialised heads: uniform bins integrate to 0, every box is the pre box
        torch.testing.assert_close(layer["boxes"], out["pre"]["boxes"], atol=1e-5, rtol=0)
    # residual refinement: layer i's logits are head_i(...) + layer (i-1)'s logits
    for head in net.bbox_heads:
        torch.nn.init.normal_(head.layers[-1].bias)
    out = net(torch.randn(2, 1, 32, 32))
    diff = out["layers"][1]["corners"] - out["layers"][0]["corners"]
    torch.testing.assert_close(diff, net.bbox_heads[1].layers[-1].bias.expand_as(diff), atol=1e-5, rtol=0)


def _batch():
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 14.0, 20.0], [18.0, 2.0, 30.0, 12.0]]), "labels": torch.tensor([3, 7])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}]
    x = torch.zeros(2, 1, 32, 32)
    x[0, 0, 6:20, 4:14], x[0, 0, 2:12, 18:30] = 1.0, 0.5
    return x, targets


@pytest.mark.slow
@pytest.mark.parametrize("box_head", ["fdr", "l1_giou"])
def test_both_heads_fit_a_batch(box_head):
    torch.manual_seed(5)
    model = DETRDetector(box_head=box_head, hidden_dim=32, num_queries=6, decoder_layers=2, lr=2e-3)
    x, targets = _batch()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(40):
        loss, terms = model.criterion(model(x), model._normalised(x, targets))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]
    assert ("fgl" in terms) == (box_head == "fdr")


def test_without_go_lsd_there_is_no_distillation_term():
    crit = DETRCriterion("fdr", go_lsd=False)
    net = DETRNet(10, hidden_dim=32, num_queries=4, decoder_layers=2)
    x, targets = _batch()
    _, terms = crit(net(x), DETRDetector._normalised(None, x, targets))
    assert float(terms["ddf"]) == 0.0 and float(terms["fgl"]) > 0


def test_canvases_are_seeded_with_tight_boxes_and_disjoint_sources():
    kw = dict(size=40, digit_size=(12, 20), num_canvases=(30, 10, 10), max_iou=0.0, noise=0.0, empty_prob=0.2)
    a, b = DigitCanvasDetectionDataModule(**kw), DigitCanvasDetectionDataModule(**kw)
    a.setup(), b.setup()
    torch.testing.assert_close(a.sets["train"].images, b.sets["train"].images)
    c = DigitCanvasDetectionDataModule(**dict(kw, seed=1))
    c.setup()
    assert not torch.equal(a.sets["train"].images, c.sets["train"].images)
    n_empty = 0
    for img, t in a.sets["train"]:
        boxes = t["boxes"]
        n_empty += len(boxes) == 0
        on = img[0] > a.threshold
        covered = torch.zeros_like(on)
        for x1, y1, x2, y2 in boxes.long().tolist():
            assert 0 <= x1 < x2 <= 40 and 0 <= y1 < y2 <= 40
            covered[y1:y2, x1:x2] = True
            patch = on[y1:y2, x1:x2]
            assert patch[:, 0].any() and patch[:, -1].any() and patch[0].any() and patch[-1].any()  # tight
        assert not (on & ~covered).any()
    assert 0 < n_empty < 30
    src = a.source_digits()
    train, test = src["train"][0].reshape(len(src["train"][0]), -1), src["test"][0].reshape(len(src["test"][0]), -1)
    assert len(train) + len(src["val"][0]) + len(test) == 5000
    x, y = next(iter(a.train_dataloader()))
    assert x.shape == (32 if len(a.sets["train"]) >= 32 else 30, 1, 40, 40) and len(y) == len(x)


@pytest.mark.parametrize("kwargs, word", [
    ({"digit_size": (10, 80)}, "digit_size"), ({"digit_size": (20, 10)}, "digit_size"),
    ({"num_objects": (3, 1)}, "num_objects"), ({"num_objects": (1,)}, "num_objects"),
    ({"max_iou": 1.5}, "max_iou"), ({"num_canvases": (10, 0, 5)}, "num_canvases"),
])
def test_datamodule_bad_inputs_fail_in_one_line(kwargs, word):
    with pytest.raises(ValueError, match=word) as err:
        DigitCanvasDetectionDataModule(**kwargs)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("edit, word", [
    (lambda t: t.__setitem__(0, {"boxes": torch.tensor([[4.0, 6.0, 40.0, 20.0]]), "labels": torch.tensor([1])}),
     "outside"),
    (lambda t: t.__setitem__(0, {"boxes": torch.tensor([[14.0, 6.0, 4.0, 20.0]]), "labels": torch.tensor([1])}),
     "x2 <= x1"),
    (lambda t: t.__setitem__(0, {"boxes": torch.tensor([[4.0, 6.0, 14.0, 20.0]]), "labels": torch.tensor([12])}),
     "num_classes"),
    (lambda t: t.clear(), "empty"),
    (lambda t: t.pop(), "one per image"),
])
def test_bad_targets_fail_in_one_line(edit, word):
    x, targets = _batch()
    edit(targets)
    with pytest.raises(ValueError, match=word) as err:
        check_targets(x, targets, 10)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("kwargs, word", [
    ({"box_head": "dfl"}, "box_head"), ({"reg_max": 7}, "reg_max"), ({"hidden_dim": 30}, "hidden_dim"),
    ({"ddf_weight": float("nan")}, "ddf_weight"), ({"score_threshold": 1.0}, "score_threshold"),
])
def test_module_bad_inputs_fail_in_one_line(kwargs, word):
    with pytest.raises(ValueError, match=word):
        DETRDetector(**kwargs)


def _tiny_dm():
    return DigitCanvasDetectionDataModule(size=32, digit_size=(10, 16), num_canvases=(24, 8, 8), batch_size=8)


def test_fit_logs_map_and_writes_sample_detections(tmp_path):
    import lightning.pytorch as pl

    torch.manual_seed(6)
    model = DETRDetector(hidden_dim=32, num_queries=6, decoder_layers=2, sample_images_every_n_epochs=1)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", default_root_dir=tmp_path, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, logger=pl.loggers.CSVLogger(tmp_path))
    trainer.fit(model, _tiny_dm())
    metrics = trainer.callback_metrics
    assert {"val_map", "val_map_50", "val_map_75", "train/fgl", "train/ddf"} <= set(metrics)
    assert 0.0 <= float(metrics["val_map"]) <= 1.0
    assert list((tmp_path / "lightning_logs" / "version_0" / "samples").glob("epoch_001.png"))


@pytest.mark.slow
def test_resume_mid_epoch_gives_the_uninterrupted_parameters(tmp_path):
    def make():
        torch.manual_seed(0)
        return DETRDetector(hidden_dim=32, num_queries=6, decoder_layers=2, sample_images_every_n_epochs=0)

    full, resumed, info = crash_and_resume(make, _tiny_dm, lambda: [], max_epochs=2, crash_step=5, tmp_path=tmp_path,
                                           checkpoint_every_n_steps=2, weights_only=True, limit_val_batches=0,
                                           num_sanity_val_steps=0)
    assert info["resumed_from_step"] == 4
    assert_same_parameters(full, resumed)


def _without_batchnorm(module):
    """BatchNorm layers replaced by identities (per-process BN statistics would differ from one process's)."""
    for name, child in module.named_children():
        if isinstance(child, torch.nn.BatchNorm2d):
            setattr(module, name, torch.nn.Identity())
        else:
            _without_batchnorm(child)
    return module


@pytest.mark.ddp
def test_two_processes_match_one_process(tmp_path):
    """Two gloo processes with half the batch each train the FDR head (VFL, FGL, L1, GIoU over every layer) to the
    one-process weights: the box count is averaged over ranks, as the reference code does. Canvases hold 1-3
    digits, so the per-process counts differ and a per-process normalisation would not match."""
    from lightning_ext.testing import fit_ddp_vs_single

    def make_model():
        torch.manual_seed(0)
        # SGD: Adam would turn float noise in zero gradients (attention key biases) into full-size steps
        model = DETRDetector(hidden_dim=32, num_queries=6, decoder_layers=2, box_head="fdr", go_lsd=False,
                             optimizer=functools.partial(torch.optim.SGD, lr=0.05),
                             sample_images_every_n_epochs=0)
        _without_batchnorm(model.net)
        return model

    def make_dm(batch_size):
        return DigitCanvasDetectionDataModule(size=32, digit_size=(10, 16), num_canvases=(32, 8, 8),
                                              batch_size=batch_size, empty_prob=0.2)

    single, ddp = fit_ddp_vs_single(make_model, make_dm, 8, tmp_path, test=False, max_epochs=1,
                                    num_sanity_val_steps=0, limit_val_batches=0)
    start = make_model().state_dict()
    moved = max(float((single.state_dict[k] - start[k]).abs().max()) for k in start if start[k].is_floating_point())
    assert moved > 1e-3
    for key, value in single.state_dict.items():
        torch.testing.assert_close(ddp.state_dict[key], value, atol=1e-5, rtol=1e-4, msg=key)


# ------------------------------------------------------------------------------------------ split computing (core)

from lightning_ext.detection import split_computing as SC  # noqa: E402


def test_quantisation_follows_the_reference_convention():
    z = torch.tensor([-1.0, 0.0, 1.0, 2.0])
    q = SC.quantize(z)
    scale = 3 / 255  # (max - min) / (2^8 - 1); zero point floor(1 / scale) = 85
    assert q.zero_point == 85 and q.scale == pytest.approx(scale)
    assert q.codes.tolist() == [0, 85, 170, 255] and q.codes.dtype == torch.uint8
    torch.manual_seed(7)
    x = torch.randn(2, 3, 5, 5) * 3 + 1
    q = SC.quantize(x, num_bits=4)
    assert int(q.codes.max()) <= 15
    assert float((SC.dequantize(q) - x).abs().max()) <= q.scale * 1.5  # rounding plus the integer zero point
    assert SC.payload_bytes(SC.quantize(x)) == x.numel() + 8
    assert SC.payload_bytes(q) == -(-x.numel() // 2) + 8


def test_jpeg_roundtrip_decodes_what_it_counts():
    torch.manual_seed(0)
    image = torch.rand(1, 24, 24)
    low, low_bytes = SC.jpeg_roundtrip(image, 10)
    high, high_bytes = SC.jpeg_roundtrip(image, 95)
    assert low.shape == high.shape == image.shape and low.dtype == torch.float32
    assert low_bytes == SC.jpeg_bytes(image, 10) < high_bytes
    assert (high - image).abs().mean() < (low - image).abs().mean() < 0.5
    rgb, _ = SC.jpeg_roundtrip(torch.rand(3, 16, 16), 50)
    assert rgb.shape == (3, 16, 16) and 0 <= float(rgb.min()) and float(rgb.max()) <= 1


def test_jpeg_bytes_grow_with_quality_and_content():
    torch.manual_seed(8)
    noisy, blank = torch.rand(1, 48, 48), torch.zeros(1, 48, 48)
    assert SC.jpeg_bytes(noisy, 95) > SC.jpeg_bytes(noisy, 20) > SC.jpeg_bytes(blank, 20)


def test_bottleneck_codec_restores_the_shape_and_passes_gradients_through_quantisation():
    codec = SC.BottleneckCodec(16, 2, out_channels=24)
    x = torch.randn(2, 16, 10, 12, requires_grad=True)
    assert codec.encode(x).shape == (2, 2, 14, 16)
    y = codec(x, num_bits=8)
    assert y.shape == (2, 24, 10, 12)
    y.sum().backward()
    assert x.grad is not None and bool(x.grad.abs().sum() > 0)
    with pytest.raises(ValueError, match="narrower"):
        SC.BottleneckCodec(16, 16, out_channels=16)


def test_head_distillation_loss_is_the_summed_squared_error():
    torch.manual_seed(9)
    s = [torch.randn(2, 3, 4, 4), torch.randn(2, 5)]
    t = [torch.randn(2, 3, 4, 4), torch.randn(2, 5)]
    expected = sum(float(((a - b) ** 2).sum()) for a, b in zip(s, t))
    assert float(SC.head_distillation_loss(s, t)) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="one teacher output"):
        SC.head_distillation_loss(s, t[:1])


@pytest.mark.slow
def test_neural_filter_learns_to_drop_empty_canvases():
    dm = DigitCanvasDetectionDataModule(size=32, digit_size=(12, 20), num_canvases=(64, 8, 8), empty_prob=0.5)
    dm.setup()
    x = dm.sets["train"].images
    y = torch.tensor([int(len(t["labels"]) > 0) for t in dm.sets["train"].targets])
    torch.manual_seed(10)
    filt = SC.NeuralFilter(1, pool=32)
    opt = torch.optim.Adam(filt.parameters(), lr=3e-3)
    for _ in range(40):
        loss = F.cross_entropy(filt(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    filt.eval()
    assert float((filt.keep(x, 0.5) == y.bool()).float().mean()) > 0.9
    with pytest.raises(ValueError, match="pool"):
        SC.NeuralFilter(1, pool=8)


# ------------------------------------------------------------------------------------------ SplitComputingDetector


def _teacher(tmp_path):
    torch.manual_seed(11)
    teacher = DETRDetector(hidden_dim=32, num_queries=6, decoder_layers=2)
    path = tmp_path / "teacher.ckpt"
    torch.save({"state_dict": teacher.state_dict(), "hyper_parameters": dict(teacher.hparams)}, path)
    return teacher, str(path)


@pytest.mark.slow
@pytest.mark.parametrize("distill", ["hnd", "ghnd"])
def test_split_detector_distils_only_the_bottleneck(tmp_path, distill):
    from lightning_ext.detection.split_detector import SplitComputingDetector

    teacher, path = _teacher(tmp_path)
    model = SplitComputingDetector(path, bottleneck_channels=3, distill=distill, lr=3e-3)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in model.bottleneck.parameters()}
    x = _batch()[0]
    before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    opt = model.configure_optimizers()
    model.train()
    assert not model.teacher.training and not model.student.net.proj.training and model.bottleneck.training
    losses = []
    for _ in range(15):
        loss = model.distillation_loss(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    for k, v in model.teacher.state_dict().items():
        torch.testing.assert_close(v, before[k])
    # HND matches one tensor, GHND three: GHND's loss is larger at the same weights
    model.distill = "hnd"
    hnd = float(model.distillation_loss(x))
    model.distill = "ghnd"
    assert float(model.distillation_loss(x)) > hnd
    # evaluation quantises the transmitted tensor: 3 x (4 + 4) x (4 + 4) bytes at 8 bits, plus scale and zero point
    model.eval()
    model(x)
    assert model.bottleneck.last_bytes == [3 * 8 * 8 + 8] * 2


def test_split_detector_bad_inputs(tmp_path):
    from lightning_ext.detection.split_detector import SplitComputingDetector

    _, path = _teacher(tmp_path)
    with pytest.raises(ValueError, match="narrower"):
        SplitComputingDetector(path, bottleneck_channels=32)
    with pytest.raises(ValueError, match="stride"):
        SplitComputingDetector(path, split_block=1)
    with pytest.raises(ValueError, match="split_block"):
        SplitComputingDetector(path, split_block=7)
    with pytest.raises(FileNotFoundError):
        SplitComputingDetector(str(tmp_path / "missing.ckpt"))
    with pytest.raises(ValueError, match="teacher_checkpoint"):
        SplitComputingDetector()
    torch.save({"state_dict": {}}, tmp_path / "bare.ckpt")
    with pytest.raises(ValueError, match="hyper_parameters"):
        SplitComputingDetector(str(tmp_path / "bare.ckpt"))


def test_split_detector_fit_logs_map_and_bytes(tmp_path):
    import lightning.pytorch as pl

    from lightning_ext.detection.split_detector import SplitComputingDetector

    _, path = _teacher(tmp_path)
    model = SplitComputingDetector(path)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", default_root_dir=tmp_path, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, logger=False, enable_checkpointing=False)
    trainer.fit(model, _tiny_dm())
    metrics = trainer.callback_metrics
    assert {"val_map", "val_map_75", "val_bottleneck_bytes", "train_loss"} <= set(metrics)
    assert float(metrics["val_bottleneck_bytes"]) == 3 * 8 * 8 + 8  # 32x32 canvases: 4x4 features, +4 per side


def test_split_detector_filter_drops_frames_and_their_bytes(tmp_path):
    """The neural filter trains beside the bottleneck; in evaluation a dropped frame sends 0 bytes and yields no
    detections. Threshold 0 keeps every frame (the unfiltered result); above 1 it drops every frame."""
    import lightning.pytorch as pl

    from lightning_ext.detection.split_detector import SplitComputingDetector

    _, path = _teacher(tmp_path)
    torch.manual_seed(0)
    model = SplitComputingDetector(path, filter_threshold=0.5)
    assert {id(p) for p in model.parameters() if p.requires_grad} == {
        id(p) for p in list(model.bottleneck.parameters()) + list(model.filter.parameters())}
    dm = DigitCanvasDetectionDataModule(size=32, digit_size=(10, 16), num_canvases=(24, 8, 8), batch_size=8,
                                        empty_prob=0.5)
    before = {k: v.clone() for k, v in model.filter.state_dict().items()}
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", default_root_dir=tmp_path, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, logger=False, enable_checkpointing=False)
    trainer.fit(model, dm)
    assert any(not torch.equal(v, before[k]) for k, v in model.filter.state_dict().items())
    assert {"train_filter_loss", "val_filter_object_kept", "val_filter_empty_dropped"} <= set(trainer.callback_metrics)

    def evaluate(threshold):
        model.filter_threshold = threshold
        return trainer.test(model, dm, verbose=False)[0]

    model.filter_threshold = None
    model.filter, kept_filter = None, model.filter
    plain = trainer.test(model, dm, verbose=False)[0]
    model.filter = kept_filter
    everything = evaluate(0.0)
    assert everything["test_bottleneck_bytes"] == plain["test_bottleneck_bytes"] == 3 * 8 * 8 + 8
    assert everything["test_map"] == pytest.approx(plain["test_map"])
    assert everything["test_filter_object_kept"] == 1.0 and everything["test_filter_empty_dropped"] == 0.0
    nothing = evaluate(1.0)  # a frame is sent only if its object probability is exactly 1
    # an exact probability of 1.0 is possible in float32 only for a saturated filter; count independently
    dm.setup("test")
    x = torch.cat([b[0] for b in dm.test_dataloader()])
    targets = [t for b in dm.test_dataloader() for t in b[1]]
    model.eval()
    with torch.no_grad():
        keep = model.filter(model.stem(x)).softmax(-1)[:, 1] >= 1.0
    objects = torch.tensor([len(t["boxes"]) > 0 for t in targets])
    assert nothing["test_bottleneck_bytes"] == pytest.approx(float(keep.float().mean()) * (3 * 8 * 8 + 8))
    if not keep.any():
        assert nothing["test_map"] <= 0.0 and nothing["test_filter_object_kept"] == 0.0
    assert nothing["test_filter_empty_dropped"] == pytest.approx(float((~keep & ~objects).sum() / (~objects).sum()))


def test_split_detector_filter_settings_are_checked(tmp_path):
    from lightning_ext.detection.split_detector import SplitComputingDetector

    _, path = _teacher(tmp_path)
    with pytest.raises(ValueError, match="filter_threshold"):
        SplitComputingDetector(path, filter_threshold=1.5)
    with pytest.raises(ValueError, match="filter_pool"):
        SplitComputingDetector(path, filter_threshold=0.5, filter_pool=8)
