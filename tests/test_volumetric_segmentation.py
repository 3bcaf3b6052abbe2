"""STU-Net against the paper's sizes and block description, the deep-supervised Dice + CE against an independent
implementation, sliding-window inference, the slab split of the volume DataModules, sample images, resume, DDP and
bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("monai")
nibabel = pytest.importorskip("nibabel")

from lightning_ext.segmentation.stunet import STUNet, stunet_b, stunet_h, stunet_l, stunet_s  # noqa: E402
from lightning_ext.segmentation.volumes import NiftiVolumeDataModule  # noqa: E402
from lightning_ext.segmentation.volumetric_segmenter import VolumetricSegmenter, deep_supervision_weights  # noqa: E402
from lightning_ext.testing import assert_same_parameters, crash_and_resume, fit_ddp_vs_single  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(depth=[1] * 6, dims=[2, 4, 4, 4, 4, 4], strides=[[2, 2, 2]] * 2 + [[1, 1, 1]] * 3)


def test_the_four_sizes_have_the_papers_parameter_counts():
    """README of uni-medical/STU-Net: 14.60 / 58.26 / 440.30 / 1457.33 M with 105 classes (built on meta)."""
    for build, millions in ((stunet_s, 14.60), (stunet_b, 58.26), (stunet_l, 440.30), (stunet_h, 1457.33)):
        with torch.device("meta"):
            n = sum(p.numel() for p in build().parameters())
        assert n / 1e6 == pytest.approx(millions, abs=0.005), build.__name__
    spec = STUNet(1, 3, [1] * 6, [8, 16, 32, 64, 64, 64], [[2, 2, 2]] * 4 + [[1, 1, 1]])
    assert sum(p.numel() for p in spec.parameters()) == 1_479_071  # the spec's measured tiny model


def test_block_is_the_described_residual_unit_and_outputs_are_fine_to_coarse():
    net = STUNet(1, 3, **TINY)
    block = net.encoder[1][0]
    x = torch.randn(1, 2, 8, 8, 8)
    y = F.leaky_relu(block.norm1(F.conv3d(x, block.conv1.weight, block.conv1.bias, stride=2, padding=1)), 0.01)
    y = block.norm2(F.conv3d(y, block.conv2.weight, block.conv2.bias, padding=1))
    ref = F.leaky_relu(y + F.conv3d(x, block.shortcut.weight, block.shortcut.bias, stride=2), 0.01)
    torch.testing.assert_close(block(x), ref)
    outs = net(torch.randn(2, 1, 8, 8, 8))
    assert [tuple(o.shape[2:]) for o in outs] == [(8, 8, 8), (4, 4, 4), (2, 2, 2), (2, 2, 2), (2, 2, 2)]
    assert net.eval()(torch.randn(2, 1, 8, 8, 8)).shape == (2, 3, 8, 8, 8)
    two_d = STUNet(1, 2, TINY["depth"], TINY["dims"], [[2, 2]] * 2 + [[1, 1]] * 3, spatial_dims=2)
    assert two_d.eval()(torch.randn(1, 1, 8, 12)).shape == (1, 2, 8, 12)


def _dice_ce_reference(logits, target, eps=1e-5):
    """nnU-Net's batch Dice + CE written from the equations: CE mean over voxels, plus 1 - mean over classes of
    (2 sum p g + eps) / (sum p + sum g + eps), sums over the batch and all voxels (MONAI's smoothing)."""
    c = logits.shape[1]
    ce = F.cross_entropy(logits, target[:, 0])
    p = logits.softmax(1)
    g = F.one_hot(target[:, 0], c).movedim(-1, 1).float()
    dims = [0] + list(range(2, logits.dim()))
    dice = (2 * (p * g).sum(dims) + eps) / (p.sum(dims) + g.sum(dims) + eps)
    return ce + (1 - dice).mean()


def test_deep_supervised_loss_matches_an_independent_implementation():
    assert deep_supervision_weights(5) == pytest.approx([8 / 15, 4 / 15, 2 / 15, 1 / 15, 0])
    torch.manual_seed(0)
    model = VolumetricSegmenter(num_classes=3, roi_size=[8, 8, 8], net=STUNet(1, 3, **TINY))
    outs = tuple(torch.randn(2, 3, s, s, s) for s in (8, 4, 2, 2, 2))
    y = torch.randint(0, 3, (2, 1, 8, 8, 8))
    w = deep_supervision_weights(5)
    ref = sum(wi * _dice_ce_reference(o, y[:, :, ::8 // o.shape[-1], ::8 // o.shape[-1], ::8 // o.shape[-1]])
              for wi, o in zip(w, outs))
    torch.testing.assert_close(model.loss(outs, y), ref)


def _volume_files(tmp_path, shape=(16, 16, 40), seed=0):
    """Noise with scattered balls: dim ones (class 1) and bright ones (class 2), a few voxels across, so every
    patch holds background to contrast them with (instance norm removes a patch's absolute level)."""
    g = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    label = np.zeros(shape, np.uint8)
    for k in range(40):
        centre, radius = g.uniform(0, shape), g.uniform(1.5, 2.5)
        label[((grid - centre) ** 2).sum(-1) < radius ** 2] = 1 + k % 2
    image = (label * 1.5 + 0.4 * g.standard_normal(shape)).astype(np.float32)
    nibabel.save(nibabel.Nifti1Image(image, np.eye(4)), str(tmp_path / "img.nii.gz"))
    nibabel.save(nibabel.Nifti1Image(label, np.eye(4)), str(tmp_path / "lab.nii.gz"))
    return str(tmp_path / "img.nii.gz"), str(tmp_path / "lab.nii.gz")


def test_slabs_are_disjoint_and_normalised_with_training_statistics(tmp_path):
    img, lab = _volume_files(tmp_path)
    dm = NiftiVolumeDataModule(img, lab, patch_size=[8, 8, 8], num_train_patches=6, train_fraction=0.5,
                               val_fraction=0.2, foreground_prob=1.0, batch_size=3)
    dm.setup()
    raw = np.asarray(nibabel.load(img).dataobj)
    mean, std = raw[:, :, :20].mean(), raw[:, :, :20].std(ddof=1)
    val_x, _ = dm.split_dataset("val")[0]
    test_x, test_y = dm.split_dataset("test")[0]
    np.testing.assert_allclose(val_x[0].numpy(), (raw[:, :, 20:28] - mean) / std, rtol=1e-4, atol=1e-4)
    assert test_x.shape == (1, 16, 16, 12) and dm.num_classes == 3
    assert all(int(y.sum()) > 0 for _, y in dm.split_dataset("train"))  # foreground_prob=1: centred on foreground
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (3, 1, 8, 8, 8) and y.dtype == torch.int64


def test_sliding_window_inference_covers_volumes_of_any_size():
    model = VolumetricSegmenter(num_classes=2, roi_size=[8, 8, 8], net=STUNet(1, 2, **TINY))
    assert model.predict_volume(torch.randn(1, 1, 11, 13, 9)).shape == (1, 2, 11, 13, 9)
    assert model.net.training  # the net's mode is restored


def _fit_kwargs():
    return dict(limit_val_batches=1, num_sanity_val_steps=0)


def test_training_segments_the_blob_and_saves_the_middle_slice(tmp_path):
    import lightning.pytorch as pl
    from functools import partial

    img, lab = _volume_files(tmp_path)
    torch.manual_seed(0)
    dm = NiftiVolumeDataModule(img, lab, patch_size=[8, 8, 8], num_train_patches=64, batch_size=4)
    model = VolumetricSegmenter(num_classes=3, roi_size=[8, 8, 8], net=STUNet(1, 3, **{**TINY, "dims": [8] + [16] * 5}),
                                optimizer=partial(torch.optim.Adam, lr=3e-3), sample_images_every_n_epochs=2)
    trainer = pl.Trainer(max_epochs=4, logger=False, enable_checkpointing=False, default_root_dir=tmp_path,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, dm)
    result = trainer.test(model, dm, verbose=False)[0]
    assert result["test_dice_1"] > 0.4 and result["test_dice_2"] > 0.5, result  # untrained: about 0.1
    assert sorted(p.name for p in (tmp_path / "samples").glob("*.png")) == ["epoch_002.png", "epoch_004.png"]


def test_resume_mid_epoch_ends_with_the_same_parameters(tmp_path):
    img, lab = _volume_files(tmp_path)

    def make():
        torch.manual_seed(0)
        return VolumetricSegmenter(num_classes=3, roi_size=[8, 8, 8], net=STUNet(1, 3, **TINY),
                                   sample_images_every_n_epochs=0)

    full, resumed, info = crash_and_resume(
        make, lambda: NiftiVolumeDataModule(img, lab, patch_size=[8, 8, 8], num_train_patches=8, batch_size=2),
        lambda: [], max_epochs=2, crash_step=6, tmp_path=tmp_path / "run", checkpoint_every_n_steps=2,
        weights_only=True, limit_val_batches=0, num_sanity_val_steps=0)
    assert info["resumed_from_step"] == 6
    assert_same_parameters(full, resumed)


@pytest.mark.ddp
def test_two_processes_evaluate_like_one_process(tmp_path):
    """Batch Dice pools over each rank's half batch (not decomposable across ranks), so weights differ slightly;
    the test Dice of both runs must agree."""
    img, lab = _volume_files(tmp_path)

    def make():
        torch.manual_seed(0)
        return VolumetricSegmenter(num_classes=3, roi_size=[8, 8, 8], net=STUNet(1, 3, **TINY),
                                   sample_images_every_n_epochs=0)

    single, ddp = fit_ddp_vs_single(
        make, lambda b: NiftiVolumeDataModule(img, lab, patch_size=[8, 8, 8], num_train_patches=16, batch_size=b),
        4, tmp_path, max_epochs=2, limit_val_batches=0, num_sanity_val_steps=0)
    assert ddp.test_metrics["test_dice"] == pytest.approx(single.test_metrics["test_dice"], abs=0.1)


def test_pretrained_weights_transfer_without_heads(tmp_path):
    src = VolumetricSegmenter(num_classes=3, roi_size=[8, 8, 8], net=STUNet(1, 3, **TINY))
    torch.save(src.net.state_dict(), tmp_path / "w.pt")
    dst = VolumetricSegmenter(num_classes=2, roi_size=[8, 8, 8], net=STUNet(1, 2, **TINY), pretrained=str(tmp_path / "w.pt"))
    torch.testing.assert_close(dst.net.encoder[0][0].conv1.weight, src.net.encoder[0][0].conv1.weight)
    state = src.net.state_dict()
    state["encoder.0.0.conv1.weight"][0] = float("nan")
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="non-finite|NaN"):
        VolumetricSegmenter(num_classes=3, roi_size=[8, 8, 8], net=STUNet(1, 3, **TINY), pretrained=str(tmp_path / "bad.pt"))
    with pytest.raises(ValueError, match="does not fit the net"):
        VolumetricSegmenter(num_classes=3, roi_size=[8, 8, 8], net=STUNet(1, 3, **{**TINY, "dims": [3] * 6}),
                            pretrained=str(tmp_path / "w.pt"))


def test_bad_input_gets_one_line(tmp_path):
    img, lab = _volume_files(tmp_path)
    model = VolumetricSegmenter(num_classes=2, roi_size=[8, 8, 8], net=STUNet(1, 2, **TINY))
    with pytest.raises(ValueError, match="num_classes: 3"):
        model.training_step((torch.randn(1, 1, 8, 8, 8), torch.full((1, 1, 8, 8, 8), 2)), 0)
    with pytest.raises(ValueError, match="must divide by"):
        model.net(torch.randn(1, 1, 6, 8, 8))
    with pytest.raises(ValueError, match="roi_size.*divide"):
        VolumetricSegmenter(num_classes=2, roi_size=[6, 8, 8], net=STUNet(1, 2, **TINY))
    with pytest.raises(ValueError, match="larger than the training slab"):
        NiftiVolumeDataModule(img, lab, patch_size=[32, 32, 32]).setup()
    with pytest.raises(ValueError, match="leaves no test"):
        NiftiVolumeDataModule(img, lab, train_fraction=0.7, val_fraction=0.3)
    with pytest.raises(ValueError, match="different grids"):
        other = tmp_path / "small.nii.gz"
        nibabel.save(nibabel.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4)), str(other))
        NiftiVolumeDataModule(img, str(other)).setup()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        NiftiVolumeDataModule(str(tmp_path / "missing.nii.gz"), lab).setup()
    with pytest.raises(ValueError, match="6 stages"):
        STUNet(1, 2, depth=[1] * 5)


def test_training_steps_run_unchanged_under_mixed_precision(tmp_path):
    """AMP: the same module and data train under ``precision="bf16-mixed"`` (CPU autocast here; the GPU path is
    Lightning's fp16/bf16 autocast around the same step): convolutions run in bfloat16, the loss is finite, the
    float32 master weights move, and validation/test report Dice."""
    import lightning.pytorch as pl

    img, lab = _volume_files(tmp_path)
    torch.manual_seed(0)
    dm = NiftiVolumeDataModule(img, lab, patch_size=[8, 8, 8], num_train_patches=8, batch_size=4)
    model = VolumetricSegmenter(num_classes=3, roi_size=[8, 8, 8], net=STUNet(1, 3, **TINY),
                                sample_images_every_n_epochs=0)
    dtypes = []
    conv = next(m for m in model.net.modules() if isinstance(m, torch.nn.Conv3d))
    conv.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    before = {k: v.clone() for k, v in model.net.state_dict().items()}
    trainer = pl.Trainer(max_epochs=1, precision="bf16-mixed", logger=False, enable_checkpointing=False,
                         default_root_dir=tmp_path, enable_progress_bar=False, enable_model_summary=False,
                         **_fit_kwargs())
    trainer.fit(model, dm)
    assert torch.bfloat16 in dtypes
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert torch.isfinite(trainer.callback_metrics["train_loss"])
    assert any(not torch.equal(before[k], v) for k, v in model.net.state_dict().items() if v.is_floating_point())
    result = trainer.test(model, dm, verbose=False)[0]
    assert 0.0 <= result["test_dice_1"] <= 1.0
