"""audio/ speaker recognition: AAM-softmax, EER and minDCF against independent implementations, the EfficientTDNN
supernet (weight sharing, kernel transforms, MACs, BatchNorm recalibration, search), SpeakerDataModule on synthetic
speakers and (where installed) the Debian prompts, SpeakerVerificationModule's fit, resume and bad inputs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

sf = pytest.importorskip("soundfile")

from lightning_ext.audio.efficient_tdnn import (  # noqa: E402
    EfficientTDNN,
    LogMel,
    evolutionary_search,
    recalibrate_batchnorm,
)
from lightning_ext.audio.speaker_verification import (  # noqa: E402
    SpeakerVerificationModule,
    aam_softmax_logits,
    cosine_trials,
    equal_error_rate,
    min_dcf,
)
from lightning_ext.audio.speakers import SpeakerDataModule, warp_voice  # noqa: E402
from lightning_ext.testing import assert_same_parameters, crash_and_resume  # noqa: E402

ALLISON = Path("/usr/share/asterisk/sounds/en_US_f_Allison")
pytestmark = pytest.mark.usefixtures("one_thread")
NET = dict(n_mels=16, channels=16, widths=16, num_blocks=2, catconv_channels=32, embed_dim=8, attention_dim=8)


# ------------------------------------------------------------------------------------------ independent references
def _aam_reference(x: np.ndarray, w: np.ndarray, y: np.ndarray, m: float, s: float) -> tuple[np.ndarray, float]:
    """AAM-softmax from the ArcFace equation in float64 with explicit angles: target cos(theta + m) while
    theta + m < pi, else cos(theta) - m sin(m) (the reference's monotonic extension); mean cross-entropy."""
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    wn = w / np.linalg.norm(w, axis=0, keepdims=True)
    cos = np.clip(xn @ wn, -1.0, 1.0)
    logits = s * cos.copy()
    for i, c in enumerate(y):
        theta = math.acos(cos[i, c])
        logits[i, c] = s * (math.cos(theta + m) if theta + m < math.pi else cos[i, c] - m * math.sin(m))
    z = logits - logits.max(1, keepdims=True)
    ce = -(z[np.arange(len(y)), y] - np.log(np.exp(z).sum(1)))
    return logits, float(ce.mean())


def _eer_reference(scores: np.ndarray, targets: np.ndarray) -> float:
    """The reference's ``calculate_eer``: sklearn's ROC, then brentq on 1 - x - interp1d(fpr, tpr)(x)."""
    from scipy.interpolate import interp1d
    from scipy.optimize import brentq
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(targets, scores, pos_label=1)
    return float(brentq(lambda x: 1.0 - x - interp1d(fpr, tpr)(x), 0.0, 1.0))


def _mindcf_reference(scores: np.ndarray, targets: np.ndarray, p: float) -> float:
    """NIST minDCF with a loop over every threshold (accept score >= t), normalised by min(p, 1 - p)."""
    best = float("inf")
    for t in np.r_[np.inf, np.unique(scores)]:
        miss = np.mean(scores[targets == 1] < t)
        fa = np.mean(scores[targets == 0] >= t)
        best = min(best, miss * p + fa * (1 - p))
    return best / min(p, 1 - p)


def test_aam_softmax_equals_an_independent_implementation_on_one_batch():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(16, 8, generator=g, dtype=torch.float64), torch.randn(8, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (16,), generator=g)
    w[:, 0] = -x[0]  # one target near theta = pi: the monotonic branch
    y[0] = 0
    for m, s in ((0.2, 30.0), (0.5, 10.0)):
        logits = aam_softmax_logits(x, w, y, m, s)
        ref, ce = _aam_reference(x.numpy(), w.numpy(), y.numpy(), m, s)
        np.testing.assert_allclose(logits.numpy(), ref, atol=1e-9)
        assert F.cross_entropy(logits, y).item() == pytest.approx(ce, abs=1e-9)


def test_eer_and_mindcf_equal_independent_implementations_on_one_batch():
    from torchmetrics.functional.classification import binary_eer

    g = np.random.default_rng(0)
    targets = (g.random(400) < 0.3).astype(int)
    scores = g.normal(0, 1, 400) + 1.2 * targets
    scores[:50] = np.round(scores[:50], 1)  # ties
    s, t = torch.tensor(scores), torch.tensor(targets)
    assert equal_error_rate(s, t) == pytest.approx(_eer_reference(scores, targets), abs=1e-9)
    assert equal_error_rate(s, t) == pytest.approx(float(binary_eer(s.float(), t)), abs=0.01)
    for p in (0.01, 0.05, 0.5):
        assert min_dcf(s, t, p) == pytest.approx(_mindcf_reference(scores, targets, p), abs=1e-9)
    assert equal_error_rate(torch.tensor([3.0, 2.0, 1.0, 0.0]), torch.tensor([1, 1, 0, 0])) == 0.0


def test_cosine_trials_are_every_pair_and_bad_trials_are_refused():
    emb = torch.randn(5, 4)
    scores, targets = cosine_trials(emb, torch.tensor([0, 0, 1, 1, 2]))
    assert len(scores) == 10 and int(targets.sum()) == 2
    assert scores[0].item() == pytest.approx(F.cosine_similarity(emb[0:1], emb[1:2]).item(), abs=1e-6)
    with pytest.raises(ValueError, match="target and non-target trials"):
        equal_error_rate(*cosine_trials(emb, torch.arange(5)))


# ------------------------------------------------------------------------------------------ the supernet
def test_a_subnetwork_uses_only_its_slice_of_the_shared_weights():
    torch.manual_seed(0)
    net = EfficientTDNN(**NET).eval()
    x = torch.randn(3, 16, 40)
    sub = {"depth": 1, "channels": 8, "widths": [8, 8], "kernels": [3, 3, 1], "catconv": 16}
    net.active = sub
    before = net(x)
    with torch.no_grad():  # weights outside the sub-network: later channels, the second block, outer kernel taps
        net.layer1.conv.weight[8:].add_(1.0)
        net.layer1.conv.weight[:, :, 0].add_(1.0)
        for p in net.blocks[1].parameters():
            p.add_(1.0)
        net.catconv.conv.weight[16:].add_(1.0)
    assert torch.allclose(net(x), before, atol=1e-6)
    net.active = None
    assert not torch.allclose(net(x)[:, :4], before[:, :4], atol=1e-3)
    loss = net(x).sum()  # the largest network reaches every block
    loss.backward()
    assert net.blocks[1].first.conv.weight.grad.abs().sum() > 0


def test_a_smaller_kernel_is_the_transformed_centre_and_largest_equals_default():
    torch.manual_seed(0)
    net = EfficientTDNN(**NET).eval()
    x = torch.randn(2, 16, 30)
    conv = net.layer1
    w = conv.conv.weight
    expected = F.conv1d(x, w[:, :, 1:-1] @ conv.transforms["3"], padding=1)
    assert torch.allclose(conv(x, None, None, 3), expected, atol=1e-6)
    assert torch.allclose(conv(x, None, None, 3), F.conv1d(x, w[:, :, 1:-1], padding=1), atol=1e-6)  # identity
    a = net(x)
    net.active = net.largest_config()
    assert torch.allclose(net(x), a)


def test_macs_follow_the_configuration_and_the_static_network_matches_the_subnetwork():
    from lightning_ext.core.measure import count_macs_params

    net = EfficientTDNN(**NET)
    largest, uniform, smallest = net.macs(None, 50), net.macs(net.uniform_config(0.5), 50), \
        net.macs(net.smallest_config(), 50)
    assert largest > uniform > smallest > 0
    assert largest == count_macs_params(net.static().eval(), torch.zeros(1, 16, 50))[0]
    g = np.random.default_rng(0)
    config = net.sample_config(g)
    static = net.static(config)
    assert len(static.blocks) == config["depth"] and static.catconv_channels == config["catconv"]
    assert static(torch.randn(2, 16, 50)).shape == (2, 8)


def test_batchnorm_recalibration_gives_the_subnetworks_own_statistics():
    torch.manual_seed(0)
    net = EfficientTDNN(**NET).eval()
    net.active = {"depth": 1, "channels": 8, "widths": [8, 8], "kernels": [3, 1, 1], "catconv": 16}
    batches = [torch.randn(4, 16, 20) for _ in range(3)]
    recalibrate_batchnorm(net, batches)
    feats = torch.cat([F.relu(net.layer1(b, None, 8, 3)) for b in batches])
    mean = feats.transpose(0, 1).reshape(8, -1).mean(1)
    assert torch.allclose(net.bn1.running_mean[:8], mean, atol=1e-5)
    assert torch.all(net.bn1.running_mean[8:] == 0)  # reset, untouched by the narrower sub-network
    assert not net.training  # the mode is restored


def test_evolutionary_search_respects_the_budget_and_returns_the_best_evaluated():
    net = EfficientTDNN(**NET)
    budget = net.macs(net.uniform_config(0.5), 30)
    cost = lambda c: net.macs(c, 30)  # noqa: E731
    best, history = evolutionary_search(net.sample_config, lambda c: -cost(c), cost, budget, population=4,
                                        generations=2, seed=1)
    assert all(h["macs"] <= budget for h in history)
    assert cost(best) == max(h["macs"] for h in history)
    with pytest.raises(ValueError, match="raise the budget"):
        evolutionary_search(net.sample_config, lambda c: 0.0, cost, 1, max_tries=3)


def test_logmel_and_warp_shapes():
    assert LogMel(8000, 24)(torch.randn(3, 4000)).shape == (3, 24, 51)
    tone = np.sin(2 * np.pi * 300 * np.arange(8000) / 8000)
    low = warp_voice(tone, 0.8, 8000)
    assert len(low) == 10000 and int(np.argmax(np.abs(np.fft.rfft(low))) * 8000 / len(low)) == 240


# ------------------------------------------------------------------------------------------ data
@pytest.fixture()
def speakers_dir(tmp_path):
    for k in range(8):  # "speaker" k: harmonic tones around its own pitch, 4 utterances of 0.6-1.5 s
        for u in range(4):
            n = int(8000 * (0.6 + 0.3 * u))
            t = np.arange(n) / 8000
            f0 = 100 + 30 * k + 5 * u
            wav = sum(np.sin(2 * np.pi * h * f0 * t) / h for h in range(1, 4)) * 0.3
            path = tmp_path / f"spk{k}" / f"u{u}.wav"
            path.parent.mkdir(parents=True, exist_ok=True)
            sf.write(str(path), wav.astype(np.float32), 8000)
    return tmp_path


def _dm(root: Path, **kw) -> SpeakerDataModule:
    args = dict(files=[str(root / "*" / "*.wav")], speaker_from="parent_dir", val_speakers=2, test_speakers=2,
                crop_s=0.5, eval_crop_s=1.0, num_train_crops=32, batch_size=8)
    args.update(kw)
    return SpeakerDataModule(**args)


def test_speakers_are_disjoint_crops_are_seeded_and_labels_are_per_split(speakers_dir):
    dm = _dm(speakers_dir)
    dm.setup()
    split = dm.speakers
    assert len(split["train"]) == 4 and not set(split["train"]) & set(split["val"] + split["test"])
    assert not set(split["val"]) & set(split["test"]) and dm.num_classes == 4
    assert not {Path(f).parent.name for f in dm.files["train"]} & set(split["test"])
    x, y = dm.split_dataset("train")[3]
    assert x.shape == (4000,) and 0 <= y < 4
    again = _dm(speakers_dir)
    again.setup()
    assert torch.equal(again.split_dataset("train")[3][0], x)
    assert {y for _, y in dm.split_dataset("test")} == {0, 1} and len(dm.split_dataset("test")) == 8


def test_pseudo_speakers_share_no_utterance(speakers_dir):
    dm = _dm(speakers_dir, speaker_from="pseudo_warp", num_speakers=8, val_speakers=2, test_speakers=2)
    dm.setup()
    files = dm.files["train"] + dm.files["val"] + dm.files["test"]
    assert len(files) == len(set(files)) == 32
    assert all(s.startswith("pseudo") for s in dm.speakers["train"])


def test_bad_inputs_get_one_line(speakers_dir):
    (speakers_dir / "spk0" / "u1.wav").unlink()
    for u in (0, 2, 3):
        (speakers_dir / "spk0" / f"u{u}.wav").unlink(missing_ok=True)
    lonely = speakers_dir / "spk9" / "u0.wav"
    lonely.parent.mkdir()
    sf.write(str(lonely), np.zeros(8000, np.float32), 8000)
    with pytest.raises(ValueError, match="has 1 utterance"):
        for seed in range(20):  # some split puts the one-utterance speaker among the trial speakers
            _dm(speakers_dir, split_seed=seed).setup()
    sf.write(str(speakers_dir / "spk1" / "u9.wav"), np.zeros(16000, np.float32), 16000)
    with pytest.raises(ValueError, match="sampled at 16000 Hz but sample_rate=8000"):
        _dm(speakers_dir, resample=False).setup()
    with pytest.raises(ValueError, match="shorter than the 1.2 s crop"):
        _dm(speakers_dir, crop_s=1.2, on_short_clip="error").setup()
    with pytest.raises(ValueError, match="too few"):
        _dm(speakers_dir, val_speakers=5, test_speakers=5).setup()
    with pytest.raises(ValueError, match="warp_range"):
        SpeakerDataModule(warp_range=(1.2, 0.8))
    with pytest.raises(ValueError, match="p_target"):
        SpeakerVerificationModule(p_target=1.0)


# ------------------------------------------------------------------------------------------ Lightning
def test_fit_learns_the_speakers_and_logs_eer_and_mindcf(speakers_dir):
    from lightning.pytorch import Trainer

    torch.manual_seed(0)
    dm = _dm(speakers_dir, num_train_crops=64)
    model = SpeakerVerificationModule(**NET, subnet_sampling="sandwich", margin=0.1, logit_scale=10.0, lr=3e-3)
    trainer = Trainer(max_epochs=6, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      num_sanity_val_steps=0)
    trainer.fit(model, datamodule=dm)
    assert model.num_classes == 4 and model.hparams["num_classes"] == 4
    assert float(trainer.callback_metrics["train_acc"]) > 0.5
    metrics = trainer.test(model, datamodule=dm, verbose=False)[0]
    assert 0 <= metrics["test_eer"] <= 100 and metrics["test_trials"] == 28 and metrics["test_mindcf"] >= 0


def test_sandwich_sampling_is_seeded_by_the_step():
    model = SpeakerVerificationModule(num_classes=3, **NET, subnet_sampling="sandwich", seed=4)
    a, b = model.step_configs(7), model.step_configs(7)
    assert a == b and a[0] is None and a[1] != model.step_configs(8)[1]


def test_a_datamodule_at_another_rate_is_refused(speakers_dir):
    from lightning.pytorch import Trainer

    model = SpeakerVerificationModule(**NET, sample_rate=16000)
    trainer = Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match="at 8000 Hz but SpeakerVerificationModule has sample_rate=16000"):
        trainer.fit(model, datamodule=_dm(speakers_dir))


def test_resume_mid_epoch_ends_with_the_same_parameters(speakers_dir, tmp_path):
    def make():
        torch.manual_seed(0)
        return SpeakerVerificationModule(num_classes=4, **NET, subnet_sampling="random")

    full, resumed, info = crash_and_resume(make, lambda: _dm(speakers_dir), lambda: [], max_epochs=2, crash_step=3,
                                           tmp_path=tmp_path, checkpoint_every_n_steps=1, weights_only=True,
                                           limit_val_batches=0, num_sanity_val_steps=0)
    assert info["resumed_from_step"] == 3
    assert_same_parameters(full, resumed)


@pytest.mark.skipif(not ALLISON.is_dir(), reason="needs apt-get install asterisk-core-sounds-en-wav")
def test_default_pseudo_speakers_come_from_the_debian_prompts():
    dm = SpeakerDataModule(num_speakers=10, val_speakers=2, test_speakers=2, max_files=60, num_train_crops=4)
    dm.setup()
    assert sum(len(v) for v in dm.files.values()) == 60 and dm.num_classes == 6
    assert all(f.startswith(str(ALLISON)) for f in dm.files["test"])
