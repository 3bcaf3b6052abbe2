"""audio/: FRCRN's loss against an independent implementation, its blocks, NoisySpeechDataModule on synthetic and
(where installed) the Debian recordings, SpeechEnhancementModule's metrics, images, resume and bad inputs."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sf = pytest.importorskip("soundfile")

from lightning_ext.audio.frcrn import FRCRN, UniDeepFSMN, complex_ideal_ratio_mask, frcrn_loss, si_snr  # noqa: E402
from lightning_ext.audio.noisy_speech import NoisySpeechDataModule, mix_at_snr, read_audio  # noqa: E402
from lightning_ext.audio.speech_enhancement import SpeechEnhancementModule  # noqa: E402
from lightning_ext.testing import assert_same_parameters, crash_and_resume  # noqa: E402

ALLISON = Path("/usr/share/asterisk/sounds/en_US_f_Allison")
NOISE = Path("/usr/share/sonic-pi/samples")
BUCKLE = Path("/usr/share/buckle/wav")
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convolutions: OpenMP threads only add waiting
TINY = dict(num_layers=2, channels=4, fsmn_hidden=4, fsmn_order=3, fft_len=64, hop_length=32)


# ------------------------------------------------------------------------------------------ an independent loss
def _si_snr_reference(est: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """SI-SNR from its definition, per row, in float64 (zero-mean signals, optimal scaling of the target)."""
    out = []
    for e, s in zip(est.astype(np.float64), ref.astype(np.float64)):
        e, s = e - e.mean(), s - s.mean()
        alpha = np.dot(e, s) / np.dot(s, s)
        target = alpha * s
        out.append(10 * np.log10(np.dot(target, target) / np.dot(e - target, e - target)))
    return np.array(out)


def _mix_loss_reference(est, clean, mask, clean_spec, noisy_spec) -> float:
    """The reference 'Mix' loss written from its equations: -SI-SNR + 2F * (MSE real + MSE imag) of the mask
    against the complex ideal ratio mask S conj(Y) / |Y|^2 with values > 2 set to 1 and < -2 set to -1."""
    S, Y = clean_spec.numpy().astype(np.complex128), noisy_spec.numpy().astype(np.complex128)
    cirm = S * np.conj(Y) / (np.abs(Y) ** 2 + 1e-8)
    target = np.stack([cirm.real, cirm.imag], -1)
    target = np.where(target > 2, 1.0, np.where(target < -2, -1.0, target))
    m = mask.numpy().astype(np.float64)
    d = 2 * m.shape[1]
    mse = ((m[..., 0] - target[..., 0]) ** 2).mean() + ((m[..., 1] - target[..., 1]) ** 2).mean()
    return float(-_si_snr_reference(est.numpy(), clean.numpy()).mean() + d * mse)


def test_si_snr_matches_the_definition_and_torchmetrics():
    from torchmetrics.functional.audio import scale_invariant_signal_noise_ratio

    g = torch.Generator().manual_seed(0)
    clean = torch.randn(4, 400, generator=g)
    est = 0.7 * clean + 0.3 * torch.randn(4, 400, generator=g) + 0.1
    ours = si_snr(est, clean)
    np.testing.assert_allclose(ours.numpy(), _si_snr_reference(est.numpy(), clean.numpy()), rtol=1e-4)
    np.testing.assert_allclose(ours.numpy(), scale_invariant_signal_noise_ratio(est, clean).numpy(), rtol=1e-4)
    assert torch.allclose(si_snr(3.0 * est, clean), ours, atol=1e-4)  # scale invariant


def test_frcrn_mix_loss_equals_an_independent_implementation_on_one_batch():
    torch.manual_seed(0)
    model = SpeechEnhancementModule(**TINY, perceptual_metrics="none")
    clean = torch.randn(3, 800)
    noisy = clean + 0.5 * torch.randn(3, 800)
    out = model.net(noisy)
    terms = model.loss(out, noisy, clean)
    expected = _mix_loss_reference(out["estimate"].detach(), clean, out["mask"].detach(), model.net.stft(clean),
                                   out["spec"].detach())
    assert float(terms["loss"].detach()) == pytest.approx(expected, rel=1e-4)
    target = complex_ideal_ratio_mask(model.net.stft(clean), out["spec"])
    sisnr_only = frcrn_loss(out["estimate"], clean, out["mask"], target, "sisnr")["loss"]
    assert float(sisnr_only.detach()) == pytest.approx(-_si_snr_reference(out["estimate"].detach().numpy(),
                                                                  clean.numpy()).mean(), rel=1e-4)


def test_target_mask_clipping_follows_the_reference_code():
    noisy = torch.complex(torch.tensor([1.0, 1.0, 1.0]), torch.zeros(3))
    clean = torch.complex(torch.tensor([3.0, -3.0, 1.5]), torch.zeros(3))
    m = complex_ideal_ratio_mask(clean, noisy)
    assert m[..., 0].tolist() == pytest.approx([1.0, -1.0, 1.5])  # > 2 -> 1, < -2 -> -1 (not +-2)


# ------------------------------------------------------------------------------------------ network blocks
def test_fsmn_memory_is_causal_along_its_sequence():
    torch.manual_seed(0)
    layer = UniDeepFSMN(6, 5, order=4)
    x = torch.randn(2, 10, 6)
    y = x.clone()
    y[:, 7:] += torch.randn(2, 3, 6)
    assert torch.allclose(layer(x)[:, :7], layer(y)[:, :7])
    assert not torch.allclose(layer(x)[:, 7:], layer(y)[:, 7:])


def test_frcrn_masks_are_bounded_and_the_ablations_drop_their_fsmns():
    torch.manual_seed(0)
    x = torch.randn(2, 1000)
    one = FRCRN(**TINY, num_unets=1)
    two = FRCRN(**TINY, num_unets=2)
    with torch.no_grad():
        assert float(one(x)["mask"].abs().max()) <= 1.0 and float(two(x)["mask"].abs().max()) <= 2.0
    full = sum(p.numel() for p in FRCRN(**TINY).parameters())
    no_freq = sum(p.numel() for p in FRCRN(**TINY, frequency_fsmn=False).parameters())
    no_time = sum(p.numel() for p in FRCRN(**TINY, temporal_fsmn=False).parameters())
    assert no_freq < full and no_time < full
    reference = FRCRN(num_layers=7, channels=2, fsmn_hidden=2, fsmn_order=20, fft_len=640, hop_length=320)
    with torch.no_grad():
        assert reference(torch.randn(1, 1600))["estimate"].shape == (1, 1600)  # the reference's 321 -> ... -> 1 bins


def test_training_on_one_batch_raises_si_snr():
    torch.manual_seed(0)
    t = torch.arange(800) / 8000
    clean = torch.stack([torch.sin(2 * np.pi * f * t) * (t < 0.06) for f in (300.0, 500.0)])
    noisy = clean + 0.3 * torch.randn(2, 800)
    model = SpeechEnhancementModule(**TINY, perceptual_metrics="none")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with torch.no_grad():
        before = float(si_snr(model(noisy), clean).mean())
    for _ in range(25):
        opt.zero_grad()
        model.loss(model.net(noisy), noisy, clean)["loss"].backward()
        opt.step()
    model.eval()
    assert float(si_snr(model(noisy), clean).mean()) > before + 3


# ------------------------------------------------------------------------------------------ data
def _write(path: Path, wav: np.ndarray, rate: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), wav.astype(np.float32), rate)
    return str(path)


@pytest.fixture()
def audio_dir(tmp_path):
    g = np.random.default_rng(0)
    for i in range(12):  # "speech": chirps of 0.5-1.5 s at 8 kHz
        n = int(8000 * (0.5 + i / 11))
        t = np.arange(n) / 8000
        _write(tmp_path / "clean" / f"c{i}.wav", 0.5 * np.sin(2 * np.pi * (200 + 40 * i) * t * (1 + t)), 8000)
    for split, rate in (("train", 16000), ("val", 44100), ("test", 22050)):
        for i in range(2):
            _write(tmp_path / split / f"n{i}.wav", g.normal(0, 0.1, (rate // 2, 2)), rate)  # stereo, other rates
    return tmp_path


def _dm(root: Path, **kw) -> NoisySpeechDataModule:
    args = dict(clean=[str(root / "clean" / "*.wav")], train_noise=[str(root / "train" / "*.wav")],
                val_noise=[str(root / "val" / "*.wav")], test_noise=[str(root / "test" / "*.wav")],
                val_split=0.2, test_split=0.2, num_train_mixtures=16, num_val_mixtures=4, num_test_mixtures=4,
                batch_size=4, segment_s=0.25)
    args.update(kw)
    return NoisySpeechDataModule(**args)


def test_mixtures_are_resampled_cropped_seeded_and_at_the_drawn_snr(audio_dir):
    assert read_audio(audio_dir / "val" / "n0.wav", 8000).shape == (4000,)  # 0.5 s at 44.1 kHz, stereo -> mono 8 kHz
    dm = _dm(audio_dir, snr_db=(0.0, 5.0))
    dm.setup()
    noisy, clean = next(iter(dm.train_dataloader()))
    assert noisy.shape == clean.shape == (4, 2000)
    snr = 10 * torch.log10(clean.pow(2).mean(1) / (noisy - clean).pow(2).mean(1))
    assert bool(((snr > -0.01) & (snr < 5.01)).all()), snr
    again = _dm(audio_dir, snr_db=(0.0, 5.0))
    again.setup()
    assert torch.equal(dm.split_dataset("test")[3][0], again.split_dataset("test")[3][0])
    other = _dm(audio_dir, snr_db=(0.0, 5.0), seed=1)
    other.setup()
    assert not torch.equal(dm.split_dataset("test")[3][0], other.split_dataset("test")[3][0])
    clean_sets = [set(dm.files[s]["clean"]) for s in ("train", "val", "test")]
    assert not (clean_sets[0] & clean_sets[1] or clean_sets[0] & clean_sets[2] or clean_sets[1] & clean_sets[2])


def test_mix_at_snr_hits_the_snr():
    g = np.random.default_rng(0)
    s, n = g.normal(size=1000), g.normal(size=1000) * 3
    mixed = mix_at_snr(s, n, -3.0)
    assert 10 * np.log10((s ** 2).mean() / ((mixed - s) ** 2).mean()) == pytest.approx(-3.0, abs=1e-3)


def test_bad_inputs_get_one_line(audio_dir):
    with pytest.raises(ValueError, match="shorter than the 2.0 s crop.*on_short_clip='pad'"):
        _dm(audio_dir, segment_s=2.0, on_short_clip="error").setup()
    with pytest.raises(ValueError, match=r"sampled at 16000 Hz but sample_rate=8000; set resample=True"):
        _dm(audio_dir, resample=False).setup()
    with pytest.raises(ValueError, match="both train_noise and test_noise.*disjoint"):
        _dm(audio_dir, test_noise=[str(audio_dir / "train" / "n0.wav")]).setup()
    with pytest.raises(FileNotFoundError, match="no clean files match.*apt-get install"):
        _dm(audio_dir, clean=[str(audio_dir / "nothing" / "*.wav")]).setup()
    with pytest.raises(ValueError, match="low <= high"):
        _dm(audio_dir, snr_db=(5.0, 0.0))
    with pytest.raises(ValueError, match="val_split"):
        _dm(audio_dir, val_split=0.6, test_split=0.5)
    with pytest.raises(ValueError, match="PESQ needs 8000 or 16000 Hz.*perceptual_metrics='none'"):
        SpeechEnhancementModule(**TINY, sample_rate=22050)
    model = SpeechEnhancementModule(**TINY, perceptual_metrics="none")
    with pytest.raises(ValueError, match=r"equal \(B, N\) shape"):
        model.training_step((torch.randn(2, 800), torch.randn(2, 700)), 0)
    skipped = _dm(audio_dir, segment_s=0.6, on_short_clip="skip")
    skipped.setup()
    assert all(len(read_audio(f, 8000)) >= 4800 for s in ("train", "val", "test") for f in skipped.files[s]["clean"])


def test_a_datamodule_at_another_rate_is_refused_in_setup(audio_dir):
    from lightning.pytorch import Trainer

    model = SpeechEnhancementModule(**TINY, sample_rate=16000, perceptual_metrics="none")
    trainer = Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match="at 8000 Hz but SpeechEnhancementModule has sample_rate=16000"):
        trainer.fit(model, datamodule=_dm(audio_dir))


def test_missing_extra_names_the_install_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "soundfile", None)
    with pytest.raises(ModuleNotFoundError, match=r'pip install "lightning-ext\[audio\]"'):
        NoisySpeechDataModule()
    monkeypatch.setitem(sys.modules, "pesq", None)
    with pytest.raises(ModuleNotFoundError, match=r'pip install "lightning-ext\[audio\]"'):
        SpeechEnhancementModule()


# ------------------------------------------------------------------------------------------ Lightning
def test_fit_logs_si_snr_pesq_stoi_and_saves_spectrograms(audio_dir, tmp_path):
    from lightning.pytorch import Trainer
    from lightning.pytorch.loggers import CSVLogger

    torch.manual_seed(0)
    model = SpeechEnhancementModule(**TINY, perceptual_utterances=2, sample_images_every_n_epochs=1)
    trainer = Trainer(max_epochs=1, logger=CSVLogger(tmp_path / "logs"), enable_checkpointing=False,
                      enable_progress_bar=False, default_root_dir=tmp_path)
    dm = _dm(audio_dir, segment_s=1.0)
    trainer.fit(model, datamodule=dm)
    assert list(Path(trainer.log_dir, "samples").glob("epoch_*.png"))
    metrics = trainer.test(model, datamodule=dm, verbose=False)[0]
    for key in ("test_sisnr", "test_sisnri", "test_stoi", "test_stoi_noisy"):
        assert np.isfinite(metrics[key]), key
    assert 0 <= metrics["test_stoi"] <= 1


def test_resume_mid_epoch_ends_with_the_same_parameters(audio_dir, tmp_path):
    def make():
        torch.manual_seed(0)
        return SpeechEnhancementModule(**TINY, perceptual_metrics="none", sample_images_every_n_epochs=0)

    full, resumed, info = crash_and_resume(make, lambda: _dm(audio_dir), lambda: [], max_epochs=2, crash_step=6,
                                           tmp_path=tmp_path, checkpoint_every_n_steps=2, weights_only=True,
                                           limit_val_batches=0, num_sanity_val_steps=0)
    assert info["resumed_from_step"] == 6
    assert_same_parameters(full, resumed)


# ------------------------------------------------------------------------------------------ the Debian recordings
@pytest.mark.skipif(not (ALLISON.is_dir() and NOISE.is_dir() and BUCKLE.is_dir()),
                    reason="needs apt-get install asterisk-core-sounds-en-wav sonic-pi-samples bucklespring-data")
def test_default_data_are_real_speech_with_unseen_test_noise():
    dm = NoisySpeechDataModule(num_train_mixtures=4, num_val_mixtures=4, num_test_mixtures=4)
    dm.setup()
    assert sum(len(dm.files[s]["clean"]) for s in ("train", "val", "test")) == 568
    train_noise, test_noise = set(dm.files["train"]["noise"]), set(dm.files["test"]["noise"])
    assert not train_noise & test_noise and any("buckle" in f for f in test_noise)
    noisy, clean = dm.split_dataset("test")[0]
    assert noisy.shape == (8000,) and float(clean.abs().max()) > 0.01
