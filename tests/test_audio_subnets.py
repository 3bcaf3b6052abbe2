"""audio/ supernet callbacks: SubnetSampling (seeded per step, sandwich rule, equal to the module's own sampling,
resume-exact mid-epoch) and BNRecalibration (the evaluated sub-network's own statistics during evaluation, the
training statistics back afterwards); bad inputs, one-process refusal; SpeakerDataModule's real and TTS sources."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

sf = pytest.importorskip("soundfile")

from lightning.pytorch import Callback, Trainer  # noqa: E402

from lightning_ext.audio.bn_recalibration import BNRecalibration, batchnorm_state  # noqa: E402
from lightning_ext.audio.efficient_tdnn import recalibrate_batchnorm  # noqa: E402
from lightning_ext.audio.speaker_verification import SpeakerVerificationModule  # noqa: E402
from lightning_ext.audio.speakers import HEDGEWARS, SpeakerDataModule  # noqa: E402
from lightning_ext.audio.subnet_sampling import SubnetSampling, check_subnet, sample_subnets  # noqa: E402
from lightning_ext.testing import assert_same_parameters, crash_and_resume  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
NET = dict(n_mels=16, channels=16, widths=16, num_blocks=2, catconv_channels=32, embed_dim=8, attention_dim=8)
TRAINER = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, num_sanity_val_steps=0)


@pytest.fixture()
def speakers_dir(tmp_path):
    for k in range(8):  # "speaker" k: harmonic tones around its own pitch, 4 utterances of 0.6-1.5 s
        for u in range(4):
            t = np.arange(int(8000 * (0.6 + 0.3 * u))) / 8000
            f0 = 100 + 30 * k + 5 * u
            wav = sum(np.sin(2 * np.pi * h * f0 * t) / h for h in range(1, 4)) * 0.3
            path = tmp_path / "voices" / f"spk{k}" / f"u{u}.wav"
            path.parent.mkdir(parents=True, exist_ok=True)
            sf.write(str(path), wav.astype(np.float32), 8000)
    return tmp_path / "voices"


def _dm(root: Path, **kw) -> SpeakerDataModule:
    args = dict(files=[str(root / "*" / "*.wav")], speaker_from="parent_dir", val_speakers=2, test_speakers=2,
                crop_s=0.5, eval_crop_s=1.0, num_train_crops=32, batch_size=8)
    args.update(kw)
    return SpeakerDataModule(**args)


def _model(**kw) -> SpeakerVerificationModule:
    torch.manual_seed(0)
    return SpeakerVerificationModule(num_classes=4, **NET, **kw)


class Record(Callback):
    """The supernet's active config at every forward of a training step."""

    def __init__(self) -> None:
        self.seen: list = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        net = pl_module.net
        if not hasattr(net, "_recorded"):
            original = net.forward
            net._recorded = True
            net.forward = lambda x: (self.seen.append((trainer.global_step, net.active)), original(x))[1]


# ------------------------------------------------------------------------------------------ sampling
def test_sample_subnets_is_seeded_by_step_and_follows_the_rule():
    net = _model().net
    a, b = sample_subnets(net, "sandwich", 3, 10, num_random=2), sample_subnets(net, "sandwich", 3, 10, num_random=2)
    assert a == b and len(a) == 4 and a[0] == net.largest_config() and a[1] == net.smallest_config()
    draws = [sample_subnets(net, "random", 3, s)[0] for s in range(200)]
    assert {d["depth"] for d in draws} == {1, 2} and len({d["kernels"][0] for d in draws}) == 3
    assert len({repr(d) for d in draws}) > 150  # different steps, different sub-networks
    widths_only = [sample_subnets(net, "random", 0, s, elastic=["width"])[0] for s in range(30)]
    assert all(d["depth"] == 2 and d["kernels"] == net.largest_config()["kernels"] for d in widths_only)
    assert len({d["channels"] for d in widths_only}) > 1
    for d in draws[:20]:
        check_subnet(net, d)


def test_subnet_sampling_trains_the_drawn_subnets_and_sums_their_losses(speakers_dir):
    model, record = _model(), Record()
    cb = SubnetSampling(rule="sandwich", seed=5)
    trainer = Trainer(max_steps=3, callbacks=[cb, record], limit_val_batches=0, **TRAINER)
    trainer.fit(model, datamodule=_dm(speakers_dir))
    assert cb.trained == 9 and [s for s, _ in record.seen] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for step in range(3):
        assert [c for s, c in record.seen if s == step] == cb.subnets(model.net, step)
    assert model.net.active is None and "training_step" not in vars(model)  # restored and unwrapped
    # the step's loss is the sum over its sub-networks: one manual step from the same start matches
    fresh, batch = _model(), next(iter(_dm_setup(speakers_dir).train_dataloader()))
    total = 0.0
    for config in cb.subnets(fresh.net, 0):
        fresh.net.active = config
        total = total + fresh.loss(fresh(batch[0]), batch[1])[0]
    wrapped = _model()
    cb2 = SubnetSampling(rule="sandwich", seed=5)
    cb2._net, cb2._module = wrapped.net, wrapped
    wrapped._trainer = SimpleNamespace(global_step=0)
    out = cb2._around(lambda b, i: wrapped.loss(wrapped(b[0]), b[1])[0], (batch, 0), {})
    assert float(out.detach()) == pytest.approx(float(total.detach()), rel=1e-5)


def _dm_setup(root):
    dm = _dm(root)
    dm.setup()
    return dm


def test_the_callback_equals_the_modules_own_random_sampling(speakers_dir):
    """The older in-module rule (subnet_sampling='random') stays reachable and trains the same as the callback."""
    own = _model(subnet_sampling="random", seed=2)
    Trainer(max_steps=4, limit_val_batches=0, deterministic=True, **TRAINER).fit(own, datamodule=_dm(speakers_dir))
    driven = _model(subnet_sampling="none")
    Trainer(max_steps=4, limit_val_batches=0, deterministic=True, callbacks=[SubnetSampling(rule="random", seed=2)],
            **TRAINER).fit(driven, datamodule=_dm(speakers_dir))
    assert_same_parameters(own, driven)


# ------------------------------------------------------------------------------------------ BN recalibration
class Peek(Callback):
    """BatchNorm buffers and the active sub-network seen at validation batches."""

    def __init__(self) -> None:
        self.stats, self.active = [], []

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.stats.append(batchnorm_state(pl_module.net))
        self.active.append(pl_module.net.active)


def test_bn_recalibration_evaluates_with_the_subnets_statistics_and_restores_training(speakers_dir):
    dm = _dm(speakers_dir)
    plain = _model()
    Trainer(max_steps=4, val_check_interval=2, callbacks=[SubnetSampling(seed=1)], deterministic=True,
            **TRAINER).fit(plain, datamodule=dm)
    model, peek = _model(), Peek()
    recal = BNRecalibration(num_batches=2, subnet="smallest", seed=3)
    trainer = Trainer(max_steps=4, val_check_interval=2, callbacks=[SubnetSampling(seed=1), recal, peek],
                      deterministic=True, **TRAINER)
    trainer.fit(model, datamodule=_dm(speakers_dir))
    assert recal.recalibrations == 2 and peek.active[0] == model.net.smallest_config()
    # training went on exactly as without the callback (parameters and BatchNorm buffers)
    assert_same_parameters(plain, model)
    assert model.net.active is None
    # during validation: the statistics recalibrate_batchnorm computes for the smallest sub-network
    ref = _model()
    ref.load_state_dict(model.state_dict())
    ref.net.active = ref.net.smallest_config()
    batches = recal.batches(trainer)
    recalibrate_batchnorm(ref.net, [b[0] for b in batches], forward=lambda _n, x: ref(x))
    last = peek.stats[-1]
    for k, v in batchnorm_state(ref.net).items():
        torch.testing.assert_close(last[k], v, atol=1e-5, rtol=1e-4, msg=k)
    assert not torch.allclose(last["bn1.running_mean"], model.net.bn1.running_mean)
    assert len(batches) == 2 and len(batches[0][0]) == 8


def test_resume_mid_epoch_with_both_callbacks_ends_with_the_same_parameters(speakers_dir, tmp_path):
    def callbacks():
        return [SubnetSampling(rule="sandwich", seed=7), BNRecalibration(num_batches=1, seed=1)]

    full, resumed, info = crash_and_resume(lambda: _model(), lambda: _dm(speakers_dir), callbacks, max_epochs=2,
                                           crash_step=3, tmp_path=tmp_path, checkpoint_every_n_steps=1,
                                           weights_only=True, val_check_interval=2, num_sanity_val_steps=0,
                                           limit_val_batches=1)
    assert info["resumed_from_step"] == 3
    assert_same_parameters(full, resumed)
    a, b = info["full_callbacks"][0], info["resumed_callbacks"][0]
    assert a.trained == b.trained == 3 * info["full_trainer"].global_step
    assert info["resumed_callbacks"][1].recalibrations > 0


# ------------------------------------------------------------------------------------------ bad inputs
def test_bad_inputs_get_one_line(speakers_dir):
    with pytest.raises(ValueError, match="rule"):
        SubnetSampling(rule="greedy")
    with pytest.raises(ValueError, match="num_random"):
        SubnetSampling(num_random=0)
    with pytest.raises(ValueError, match="elastic"):
        SubnetSampling(elastic=["depth", "colour"])
    with pytest.raises(ValueError, match="num_batches"):
        BNRecalibration(num_batches=0)
    with pytest.raises(ValueError, match="subnet"):
        BNRecalibration(subnet="median")
    net = _model().net
    with pytest.raises(ValueError, match="not a sub-network"):
        check_subnet(net, {**net.largest_config(), "channels": 64})
    with pytest.raises(ValueError, match="keys"):
        check_subnet(net, {"depth": 1})
    # the module samples by itself: refused
    with pytest.raises(ValueError, match="subnet_sampling='none'"):
        Trainer(max_steps=1, callbacks=[SubnetSampling()], **TRAINER).fit(_model(subnet_sampling="random"),
                                                                          datamodule=_dm(speakers_dir))
    with pytest.raises(ValueError, match="no attribute 'encoder'"):
        Trainer(max_steps=1, callbacks=[SubnetSampling(supernet="encoder")], **TRAINER).fit(
            _model(), datamodule=_dm(speakers_dir))
    with pytest.raises(ValueError, match="not a sub-network"):
        Trainer(max_steps=1, callbacks=[BNRecalibration(subnet={**net.largest_config(), "depth": 9})],
                **TRAINER).fit(_model(), datamodule=_dm(speakers_dir))
    # several ranks: refused in setup with one line
    many = SimpleNamespace(world_size=2)
    for cb in (SubnetSampling(), BNRecalibration()):
        with pytest.raises(ValueError, match="one process"):
            cb.setup(many, _model(), "fit")
    # resuming with another seed is refused
    cb = SubnetSampling(seed=1)
    with pytest.raises(ValueError, match="resume with the same settings"):
        cb.load_state_dict(SubnetSampling(seed=2).state_dict())


# ------------------------------------------------------------------------------------------ data sources
@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs apt-get install espeak-ng")
def test_tts_voices_add_training_speakers_only(speakers_dir):
    dm = _dm(speakers_dir, tts_voices=["en+m3", "en+f2"], tts_sentences=3)
    dm.setup()
    assert {"espeak:en+m3", "espeak:en+f2"} <= set(dm.speakers["train"]) and dm.num_classes == 6
    assert not any(s.startswith("espeak") for s in dm.speakers["val"] + dm.speakers["test"])
    with pytest.raises(ValueError, match="could not speak"):
        _dm(speakers_dir, tts_voices=["no-such-voice-xx"], tts_sentences=1).setup()
    with pytest.raises(ValueError, match="tts_voices"):
        _dm(speakers_dir, tts_voices="en")


@pytest.mark.skipif(not Path(HEDGEWARS).parents[1].is_dir(), reason="needs apt-get install hedgewars-data")
def test_hedgewars_voice_packs_are_speakers_disjoint_between_training_and_trials():
    dm = SpeakerDataModule(files=[HEDGEWARS], speaker_from="parent_dir", val_speakers=3, test_speakers=3,
                           sample_rate=8000, max_files=200, num_train_crops=4)
    dm.setup()
    assert len(dm.speakers["train"]) == 9 and dm.num_classes == 9
    packs = {split: {Path(f).parent.name for f in dm.files[split]} for split in ("train", "val", "test")}
    assert packs["train"] == set(dm.speakers["train"]) and not packs["train"] & (packs["val"] | packs["test"])
    assert not packs["val"] & packs["test"]


def test_wrap_padding_repeats_short_clips_instead_of_silence(speakers_dir):
    zeros, wrap = _dm(speakers_dir, eval_crop_s=2.0), _dm(speakers_dir, eval_crop_s=2.0, pad_mode="wrap")
    zeros.setup()
    wrap.setup()
    z, w = zeros.split_dataset("test")[0][0], wrap.split_dataset("test")[0][0]  # a 0.6 s clip in a 2 s crop
    assert (z == 0).float().mean() > 0.5 and (w == 0).float().mean() < 0.01
    clip = torch.from_numpy(wrap.sets["test"].clips[0])
    offset = (len(w) - len(clip)) // 2
    assert torch.equal(w[offset:offset + len(clip)], clip) and torch.equal(w[offset + len(clip):][:10], clip[:10])
    with pytest.raises(ValueError, match="pad_mode"):
        _dm(speakers_dir, pad_mode="reflect")
