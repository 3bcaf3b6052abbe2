"""R2U-Net's units against the reference code's recurrence and the paper's, the U-Net at matched parameters, the
Dice loss against its formula, the digit-mask task against an independent construction, sample images, resume,
DDP and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lightning_ext.segmentation.digit_masks import DigitMasksDataModule
from lightning_ext.segmentation.module import SegmentationModule, soft_dice_loss
from lightning_ext.segmentation.r2unet import R2UNet, RecurrentConv, RRCU, UNet, count_parameters, matched_widths
from lightning_ext.testing import assert_same_parameters, crash_and_resume, fit_ddp_vs_single


def test_recurrent_conv_follows_the_reference_code_with_shared_weights():
    torch.manual_seed(0)
    rcl = RecurrentConv(3, t=2).eval()
    x = torch.randn(2, 3, 6, 6)
    f = rcl.f
    o = f(x)  # Recurrent_block: for i in range(t): if i == 0: x1 = conv(x); x1 = conv(x + x1)
    o = f(x + o)
    o = f(x + o)
    torch.testing.assert_close(rcl(x), o)


def test_recurrent_conv_follows_the_paper_with_separate_kernels():
    torch.manual_seed(1)
    rcl = RecurrentConv(3, t=2, shared_recurrent_weights=False).eval()
    x = torch.randn(1, 3, 5, 5)
    conv, bn, _ = rcl.f
    o = torch.relu(bn(conv(x)))
    for _ in range(2):
        o = torch.relu(bn(conv(x) + F.conv2d(o, rcl.w_r.weight, padding=1)))
    torch.testing.assert_close(rcl(x), o)


def test_t_zero_gives_the_residual_unit_of_resunet():
    torch.manual_seed(2)
    unit = RRCU(2, 4, t=0).eval()
    x = torch.randn(1, 2, 4, 4)
    x0 = unit.proj(x)
    torch.testing.assert_close(unit(x), x0 + unit.body[1].f(unit.body[0].f(x0)))


def test_recurrence_adds_no_parameters_and_unet_widths_match_the_count():
    w = [8, 16, 32, 64]
    r2 = count_parameters(R2UNet(1, 1, w, t=2))
    assert r2 == count_parameters(R2UNet(1, 1, w, t=0))
    assert count_parameters(R2UNet(1, 1, w, t=2, shared_recurrent_weights=False)) > r2
    uw = matched_widths(r2, lambda v: UNet(1, 1, v), w)
    assert abs(count_parameters(UNet(1, 1, uw)) / r2 - 1) < 0.02


def test_soft_dice_loss_matches_its_formula():
    torch.manual_seed(3)
    z, g = torch.randn(2, 1, 4, 4), (torch.rand(2, 1, 4, 4) > 0.5).float()
    p = torch.sigmoid(z)
    per = [(2 * (p[i] * g[i]).sum() + 1) / (p[i].sum() + g[i].sum() + 1) for i in range(2)]
    assert float(soft_dice_loss(z, g)) == pytest.approx(1 - float(sum(per) / 2), rel=1e-5)
    z3, ids = torch.randn(2, 3, 4, 4), torch.randint(0, 3, (2, 1, 4, 4))
    p3, oh = torch.softmax(z3, 1), F.one_hot(ids[:, 0], 3).permute(0, 3, 1, 2).float()
    d = (2 * (p3 * oh).sum((2, 3)) + 1) / (p3.sum((2, 3)) + oh.sum((2, 3)) + 1)
    assert float(soft_dice_loss(z3, ids)) == pytest.approx(1 - float(d.mean()), rel=1e-5)
    model = SegmentationModule("unet", widths=[2, 4], dice_weight=0.5)
    expect = F.binary_cross_entropy_with_logits(z, g) + 0.5 * soft_dice_loss(z, g)
    torch.testing.assert_close(model.loss(z, g), expect)


def test_digit_masks_are_the_thresholded_clean_digits():
    from sklearn.datasets import load_digits

    dm = DigitMasksDataModule(size=16, threshold=0.3, noise=0.0, blur_sigma=0.0, illumination=0.0)
    image, mask, classes = dm.make_images()
    clean = F.interpolate(torch.tensor(load_digits().images / 16.0, dtype=torch.float32)[:, None], size=(16, 16),
                          mode="bilinear", align_corners=False)
    torch.testing.assert_close(mask, (clean.clamp(0, 1) > 0.3).float())
    assert 0.2 < float(mask.mean()) < 0.6
    noisy = DigitMasksDataModule(size=16)
    a, _, _ = noisy.make_images()
    b, _, _ = DigitMasksDataModule(size=16).make_images()
    torch.testing.assert_close(a, b)  # seeded
    noisy.setup()
    assert noisy.split_sizes == {"train": 1293, "val": 144, "test": 360}
    assert abs(float(noisy.train_set.tensors[0].mean())) < 1e-4


def test_training_segments_and_saves_sample_images(tmp_path):
    from lightning.pytorch import Trainer, seed_everything

    seed_everything(0)
    dm = DigitMasksDataModule(size=16, batch_size=64)
    model = SegmentationModule("r2unet", widths=[4, 8, 16], t=1, lr=1e-2, sample_images_every_n_epochs=1)
    trainer = Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, dm)
    metrics = trainer.validate(model, dm, verbose=False)[0]
    assert metrics["val_dice"] > 0.7 and metrics["val_auroc"] > 0.9, metrics
    assert sorted(p.name for p in (tmp_path / "samples").glob("*.png")) == ["epoch_001.png", "epoch_002.png"]


def test_resume_mid_epoch_ends_with_the_same_parameters(tmp_path):
    def make():
        torch.manual_seed(0)
        return SegmentationModule("r2unet", widths=[2, 4], t=1, sample_images_every_n_epochs=0)

    full, resumed, info = crash_and_resume(make, lambda: DigitMasksDataModule(size=8, batch_size=128), lambda: [],
                                           max_epochs=2, crash_step=14, tmp_path=tmp_path,
                                           checkpoint_every_n_steps=4, weights_only=True, limit_val_batches=0,
                                           num_sanity_val_steps=0)
    assert info["resumed_from_step"] == 12
    assert_same_parameters(full, resumed)


@pytest.mark.ddp
def test_two_processes_train_like_one_process(tmp_path):
    """BatchNorm normalises each rank's half batch (SyncBatchNorm needs GPUs), so the weights drift apart over the
    steps; what must agree is the result: the test Dice, computed in one process on each run's weights."""
    def make():
        torch.manual_seed(0)
        return SegmentationModule("r2unet", widths=[4, 8], t=1, sample_images_every_n_epochs=0, lr=1e-2)

    single, ddp = fit_ddp_vs_single(make, lambda b: DigitMasksDataModule(size=8, batch_size=b), 64, tmp_path,
                                    max_epochs=2, limit_val_batches=0, num_sanity_val_steps=0)
    assert ddp.test_metrics["test_dice"] == pytest.approx(single.test_metrics["test_dice"], abs=0.03)
    assert single.test_metrics["test_dice"] > 0.6


def test_bad_masks_and_sizes_get_one_line():
    model = SegmentationModule("unet", widths=[2, 4])
    x = torch.randn(1, 1, 8, 8)
    with pytest.raises(ValueError, match="binary masks of 0/1.*set num_classes"):
        model.training_step((x, torch.full((1, 1, 8, 8), 2.0)), 0)
    multi = SegmentationModule("unet", widths=[2, 4], num_classes=3)
    with pytest.raises(ValueError, match="num_classes: 5"):
        multi.training_step((x, torch.full((1, 8, 8), 4)), 0)
    assert multi.training_step((x, torch.randint(0, 3, (1, 8, 8))), 0) is not None  # class-id masks without channel
    with pytest.raises(ValueError, match="divisible by 2"):
        model(torch.randn(1, 1, 7, 7))
    with pytest.raises(ValueError, match="architecture"):
        SegmentationModule("deeplab")
    with pytest.raises(ValueError, match="at least 8"):
        DigitMasksDataModule(size=4)


def test_binned_pixel_auroc_is_the_auroc_of_the_binned_scores_and_needs_no_large_memory():
    from sklearn.metrics import roc_auc_score

    from lightning_ext.segmentation.module import BinnedPixelAUROC

    torch.manual_seed(4)
    y = (torch.rand(3, 1, 16, 16) > 0.6).long()
    p = torch.sigmoid(torch.randn(3, 1, 16, 16) + 1.5 * y)
    metric = BinnedPixelAUROC(bins=50)
    metric.update(p[:2], y[:2])
    metric.update(p[2:], y[2:])
    binned = (p.flatten().double() * 49).round()
    assert float(metric.compute()) == pytest.approx(roc_auc_score(y.flatten().numpy(), binned.numpy()), abs=1e-6)
    torch.use_deterministic_algorithms(True)  # torchmetrics' binned AUROC then needed ~40 GB for 32 images
    try:
        big = BinnedPixelAUROC()
        big.update(torch.rand(32, 1, 32, 32), (torch.rand(32, 1, 32, 32) > 0.5).long())
        assert 0.4 < float(big.compute()) < 0.6
    finally:
        torch.use_deterministic_algorithms(False)


def test_training_steps_run_unchanged_under_mixed_precision(tmp_path):
    """AMP: R2U-Net's module trains under ``precision="bf16-mixed"`` (CPU autocast here; the GPU path is
    Lightning's autocast around the same step): convolutions run in bfloat16, the loss is finite, the float32
    weights move and validation reports Dice."""
    from lightning.pytorch import Trainer, seed_everything

    seed_everything(0)
    dm = DigitMasksDataModule(size=16, batch_size=64)
    model = SegmentationModule("r2unet", widths=[4, 8, 16], t=1, lr=1e-2, sample_images_every_n_epochs=0)
    dtypes = []
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    conv.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = Trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=1, precision="bf16-mixed", logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=tmp_path)
    trainer.fit(model, dm)
    assert torch.bfloat16 in dtypes and all(p.dtype == torch.float32 for p in model.parameters())
    assert torch.isfinite(trainer.callback_metrics["train_loss"]) and "val_dice" in trainer.callback_metrics
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items() if v.is_floating_point())
