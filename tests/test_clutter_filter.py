"""Clutter filter: the attention gate and the metrics against the equations, time never pooled, frame-wise 2D
baseline, the simulated clutter's stationarity, the time split, training, samples, resume, DDP and bad input."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch

from lightning_ext.vision.attention_res_unet import AttentionResUNet
from lightning_ext.vision.clutter_filter import ClutterFilter3D, clutter_metrics
from lightning_ext.vision.simulated_clutter import VISP_ROOT, SimulatedClutterDataModule, simulate_clutter
from lightning_ext.testing import assert_same_parameters, crash_and_resume, fit_ddp_vs_single

pytestmark = pytest.mark.usefixtures("one_thread")
needs_visp = pytest.mark.skipif(not (VISP_ROOT / "mbt" / "cube").is_dir(), reason="Debian visp-images-data missing")


def _dm(**kw):
    return SimulatedClutterDataModule(**{"clip_len": 8, "size": 32, "train_stride": 8, "batch_size": 4, **kw})


def test_metrics_match_their_definitions():
    g = torch.Generator().manual_seed(0)
    pred, clean = torch.rand(2, 1, 4, 5, 5, generator=g), torch.rand(2, 1, 4, 5, 5, generator=g)
    mask = torch.rand(2, 1, 4, 5, 5, generator=g) > 0.6
    out = clutter_metrics(pred, clean, mask)
    p, c, m = pred.numpy(), clean.numpy(), mask.numpy()
    for i in range(2):
        e = (p[i] - c[i]) ** 2
        assert out["mse"][i] == pytest.approx(e.mean(), rel=1e-5)
        assert out["psnr"][i] == pytest.approx(10 * np.log10(1 / e.mean()), rel=1e-5)
        assert out["mse_clutter"][i] == pytest.approx(e[m[i]].mean(), rel=1e-5)
        assert out["mse_outside"][i] == pytest.approx(e[~m[i]].mean(), rel=1e-5)
        dp, dc = np.diff(p[i], axis=1), np.diff(c[i], axis=1)
        assert out["temporal_error"][i] == pytest.approx(np.abs(dp - dc).mean(), rel=1e-5)


def test_attention_gate_is_the_described_equation():
    net = AttentionResUNet(base_filters=2, levels=2, dropout=0.0)
    gate = net.gates[0]
    x, g = torch.randn(1, 4, 3, 8, 8), torch.randn(1, 8, 3, 4, 4)
    theta = torch.nn.functional.conv3d(x, gate.theta.weight, gate.theta.bias, stride=(1, 2, 2), padding=1)
    a = torch.sigmoid(gate.psi(torch.relu(theta + gate.phi(g))))
    ref = x * a.repeat_interleave(2, dim=3).repeat_interleave(2, dim=4)
    torch.testing.assert_close(gate(x, g), ref)


def test_time_is_never_pooled_and_the_2d_baseline_filters_frames_independently():
    torch.manual_seed(0)
    net = AttentionResUNet(base_filters=2, levels=3).eval()
    assert net(torch.rand(1, 1, 3, 16, 16)).shape == (1, 1, 3, 16, 16)  # 3 frames survive 2 poolings
    model = ClutterFilter3D(spatial_dims=2, base_filters=2, levels=3).eval()
    x = torch.rand(1, 1, 4, 16, 16)
    y = x.clone()
    y[:, :, 2] = torch.rand(16, 16)
    changed = (model(x) - model(y)).abs().amax(dim=(0, 1, 3, 4))
    assert changed[2] > 0 and torch.all(changed[[0, 1, 3]] == 0)


def test_input_skip_makes_the_zero_initialised_filter_the_identity():
    x = torch.rand(2, 1, 2, 8, 8)
    torch.testing.assert_close(AttentionResUNet(base_filters=2, levels=2, zero_init_output=True)(x), x)
    assert not torch.allclose(AttentionResUNet(base_filters=2, levels=2)(x), x)  # the paper's init adds noise


def test_simulated_clutter_is_stationary_seeded_and_non_negative():
    a = simulate_clutter(6, 32, torch.Generator().manual_seed(1))
    b = simulate_clutter(6, 32, torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b)
    assert a.min() >= 0 and a.max() > 0.1
    only_rl = simulate_clutter(6, 32, torch.Generator().manual_seed(1), near_field=False)
    torch.testing.assert_close(only_rl[0], only_rl[5])  # reverberation lines are static
    assert (a[0] - a[3]).abs().max() < 0.25 * a.max()  # the near field only breathes slowly


@needs_visp
def test_clips_split_the_sequence_in_time():
    dm = _dm()
    dm.setup()
    frames = 218
    a, b = round(frames * 0.7), round(frames * 0.8)
    assert len(dm.split_dataset("train")) == (a - 8) // 8 + 1 and len(dm.split_dataset("test")) == (frames - b) // 8
    x, y, m = dm.split_dataset("val")[0]
    torch.testing.assert_close(x, (y + (x - y)).clamp(0, 1))
    assert x.shape == (1, 8, 32, 32) and m.dtype == torch.bool and 0.05 < m.float().mean() < 0.8


@needs_visp
def test_training_removes_clutter_and_saves_samples(tmp_path):
    import lightning.pytorch as pl

    torch.manual_seed(0)
    dm = _dm(train_stride=2)
    model = ClutterFilter3D(base_filters=4, levels=3, optimizer=partial(torch.optim.Adam, lr=3e-3),
                            sample_images_every_n_epochs=2, bn_momentum=0.3, zero_init_output=True)
    trainer = pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, default_root_dir=tmp_path,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model, dm)
    result = trainer.test(model, dm, verbose=False)[0]
    dm.setup()
    identity = torch.stack([clutter_metrics(x[None], y[None], m[None])["mse_clutter"][0]
                            for x, y, m in dm.split_dataset("test")]).mean()
    assert result["test_mse_clutter"] < 0.5 * float(identity), (result, float(identity))
    assert [p.name for p in (tmp_path / "samples").glob("*.png")] == ["epoch_002.png"]


@needs_visp
def test_resume_mid_epoch_ends_with_the_same_parameters(tmp_path):
    def make():
        torch.manual_seed(0)
        return ClutterFilter3D(base_filters=2, levels=2, sample_images_every_n_epochs=0, lr=1e-3)

    full, resumed, info = crash_and_resume(make, lambda: _dm(batch_size=4), lambda: [], max_epochs=2, crash_step=7,
                                           tmp_path=tmp_path, checkpoint_every_n_steps=2, weights_only=True,
                                           limit_val_batches=0, num_sanity_val_steps=0)
    assert info["resumed_from_step"] == 6
    assert_same_parameters(full, resumed)


@needs_visp
@pytest.mark.ddp
def test_two_processes_evaluate_like_one_process(tmp_path):
    """BatchNorm normalises each rank's half batch, so weights differ slightly; the test MSE must agree."""
    def make():
        torch.manual_seed(0)
        return ClutterFilter3D(base_filters=2, levels=2, sample_images_every_n_epochs=0, lr=1e-3)

    single, ddp = fit_ddp_vs_single(make, lambda b: _dm(batch_size=b), 4, tmp_path, max_epochs=1,
                                    limit_val_batches=0, num_sanity_val_steps=0)
    assert ddp.test_metrics["test_mse"] == pytest.approx(single.test_metrics["test_mse"], rel=0.1, abs=2e-3)


def test_bad_input_gets_one_line(tmp_path):
    with pytest.raises(ValueError, match="clips .B, 1, T, H, W."):
        ClutterFilter3D(base_filters=2, levels=2)(torch.rand(1, 1, 8, 8))
    with pytest.raises(ValueError, match="must divide by 4"):
        ClutterFilter3D(base_filters=2, levels=3)(torch.rand(1, 1, 2, 12, 10))
    with pytest.raises(ValueError, match="levels"):
        AttentionResUNet(levels=1)
    with pytest.raises(ValueError, match="no clutter"):
        SimulatedClutterDataModule(near_field=False, reverberation=False)
    with pytest.raises(ValueError, match="leaves no test"):
        SimulatedClutterDataModule(train_fraction=0.8, val_fraction=0.2)
    with pytest.raises(FileNotFoundError, match="pass a folder of frames"):
        SimulatedClutterDataModule(source=str(tmp_path / "none")).setup()
    (tmp_path / "short").mkdir()
    from PIL import Image

    for i in range(10):
        Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "short" / f"f{i:02d}.png")
    with pytest.raises(ValueError, match="shorter than clip_len"):
        SimulatedClutterDataModule(source=str(tmp_path / "short"), clip_len=8, size=16).setup()
