"""ScheduledDropPath: the NASNet ramp (0 at step 0, the targets at the last step), per step and per epoch, the
controls, per-block targets, the rates the forward actually sees, refusal of models without drop path, and a
mid-epoch crash-and-resume that ends with the uninterrupted run's parameters."""

import math

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from torch import nn

from lightning_ext.data.digits import DigitsDataModule
from lightning_ext.testing import assert_same_parameters, crash_and_resume
from lightning_ext.vision.image_classifier import ImageClassifier
from lightning_ext.vision.scheduled_drop_path import (
    ScheduledDropPath,
    collect_drop_path_modules,
    drop_path_targets,
    ramp_progress,
    scheduled_rates,
)

RATE = 0.3  # resnet10t builds DropPath rates 0.1, 0.2, 0.3 in layer2..layer4 (layer1's rate 0 is Identity)


class _Block(nn.Module):
    def __init__(self, width, rate):
        super().__init__()
        from timm.layers import DropPath

        self.fc, self.drop_path = nn.Linear(width, width), DropPath(rate)

    def forward(self, x):
        return x + self.drop_path(torch.relu(self.fc(x)))


def _tiny(seed=0):
    """A small residual MLP with timm DropPath rates 0.1, 0.2, 0.3 (as resnet10t builds with drop_path_rate=0.3)."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), *[_Block(32, r) for r in (0.1, 0.2, 0.3)], nn.Linear(32, 10))
    return ImageClassifier(net, num_classes=10, in_chans=1, image_size=8, lr=0.01)


def _model(rate=RATE, seed=0):
    torch.manual_seed(seed)
    return ImageClassifier("resnet10t", num_classes=10, in_chans=1, image_size=8, lr=0.01, stem_downsample=4,
                           backbone_kwargs={"drop_path_rate": rate})


def _dm():
    return DigitsDataModule(batch_size=16, train_fraction=0.05)


class SeenRates(Callback):
    """Records, per training step, the drop_prob every DropPath module had when its forward ran."""

    def __init__(self):
        self.steps, self._now, self.handles = [], None, []

    def on_fit_start(self, trainer, pl_module):
        from timm.layers import DropPath

        for m in pl_module.modules():
            if isinstance(m, DropPath):
                self.handles.append(m.register_forward_pre_hook(lambda mod, args: self._now.append(mod.drop_prob)))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._now = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append((trainer.global_step - 1, trainer.current_epoch, list(self._now)))

    def on_fit_end(self, trainer, pl_module):
        for h in self.handles:
            h.remove()


def _fit(callback, model=None, **kw):
    seen = SeenRates()
    model = model or _tiny()
    args = dict(max_epochs=2, limit_train_batches=4, limit_val_batches=0, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    args.update(kw)
    trainer = Trainer(callbacks=[seen, callback], **args)  # the ramp sets rates before SeenRates' own batch hook
    trainer.fit(model, datamodule=_dm())
    return model, seen.steps, trainer


def test_pure_functions():
    assert drop_path_targets([0.1, 0.2, 0.3]) == [0.1, 0.2, 0.3]
    assert drop_path_targets([0.1, 0.2, 0.3], 0.15) == pytest.approx([0.05, 0.1, 0.15])
    assert drop_path_targets([0.05, 0.1, 0.3], 0.4, "linear") == pytest.approx([0.4 / 3, 0.8 / 3, 0.4])
    assert drop_path_targets([0.05, 0.1, 0.3], 0.4, "uniform") == [0.4, 0.4, 0.4]
    assert [ramp_progress(t, 10, 0.5) for t in (0, 2, 4, 9)] == [0.0, 0.5, 1.0, 1.0]
    assert scheduled_rates([0.1, 0.3], 0.5, start=0.1) == pytest.approx([0.2 / 3, 0.2])
    assert scheduled_rates([0.1, 0.3], 0.3, schedule="constant") == [0.1, 0.3]
    assert scheduled_rates([0.1, 0.3], 0.3, schedule="none") == [0.0, 0.0]


def test_linear_per_step_ramp_seen_by_the_forward():
    sdp = ScheduledDropPath()
    model, steps, trainer = _fit(sdp, model=_model())  # a real timm model
    total = trainer.estimated_stepping_batches
    assert total == 8 and len(steps) == 8
    targets = [0.1, 0.2, 0.3]
    for step, _, seen in steps:
        expected = [t * step / (total - 1) for t in targets]
        assert seen == pytest.approx(expected, abs=1e-12), step
    assert steps[0][2] == [0.0, 0.0, 0.0]
    assert steps[-1][2] == pytest.approx(targets)
    # the built rates are back after fit
    assert [m.drop_prob for m, _ in collect_drop_path_modules(model).values()] == pytest.approx(targets)


def test_per_epoch_ramp_is_constant_within_an_epoch_and_reaches_the_target():
    _, steps, _ = _fit(ScheduledDropPath(drop_prob=0.2, interval="epoch"), max_epochs=3)
    by_epoch = {}
    for _, epoch, seen in steps:
        by_epoch.setdefault(epoch, set()).add(tuple(round(s, 12) for s in seen))
    assert all(len(v) == 1 for v in by_epoch.values())
    maxima = [max(next(iter(by_epoch[e]))) for e in range(3)]
    assert maxima == pytest.approx([0.0, 0.1, 0.2])


def test_warmup_fraction_and_start():
    _, steps, _ = _fit(ScheduledDropPath(start=0.1, warmup_fraction=0.5))  # 8 steps: ramp over steps 0..3
    maxima = [max(s) for _, _, s in steps]
    assert maxima[:4] == pytest.approx([0.1, 0.1 + 0.2 / 3, 0.1 + 0.4 / 3, 0.3])
    assert maxima[4:] == pytest.approx([0.3] * 4)


@pytest.mark.parametrize("schedule,expected", [("constant", [0.1, 0.2, 0.3]), ("none", [0.0, 0.0, 0.0])])
def test_controls(schedule, expected):
    _, steps, _ = _fit(ScheduledDropPath(schedule=schedule), max_epochs=1)
    assert all(seen == pytest.approx(expected) for _, _, seen in steps)


def test_by_depth_linear_and_layers_selection():
    _, steps, _ = _fit(ScheduledDropPath(drop_prob=0.6, by_depth="linear", schedule="constant"), max_epochs=1)
    assert steps[0][2] == pytest.approx([0.2, 0.4, 0.6])
    _, steps, _ = _fit(ScheduledDropPath(schedule="none", layers=["net.4.*"]), max_epochs=1)
    assert steps[0][2] == pytest.approx([0.1, 0.2, 0.0])  # only the last block's module is scheduled


def test_torchvision_stochastic_depth_is_supported():
    from torchvision.ops import StochasticDepth

    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), StochasticDepth(0.4, "row"), nn.Linear(16, 10))
    found = collect_drop_path_modules(net)
    assert list(found) == ["2"] and found["2"][1] == "p"


def test_model_without_drop_path_is_refused_with_the_timm_argument():
    model = ImageClassifier(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), num_classes=10, image_size=8)
    with pytest.raises(ValueError, match="no drop-path modules.*drop_path_rate.*NASNet"):
        _fit(ScheduledDropPath(), model=model, max_epochs=1)
    with pytest.raises(ValueError, match="no drop-path modules"):
        _fit(ScheduledDropPath(), model=_model(rate=0.0), max_epochs=1)  # timm builds no DropPath at rate 0
    from timm.layers import DropPath

    zero = ImageClassifier(nn.Sequential(nn.Flatten(), DropPath(0.0), nn.Linear(64, 10)), num_classes=10, image_size=8)
    with pytest.raises(ValueError, match="built with rate 0"):
        _fit(ScheduledDropPath(), model=zero, max_epochs=1)
    import timm

    with pytest.raises(TypeError, match="drop_path_rate"):  # the fact the docstring states about timm's NASNet
        timm.create_model("pnasnet5large", pretrained=False, drop_path_rate=0.1)


@pytest.mark.parametrize("kwargs,match", [
    ({"drop_prob": 1.0}, "drop_prob"), ({"drop_prob": math.nan}, "drop_prob"), ({"start": -0.1}, "start"),
    ({"drop_prob": 0.1, "start": 0.2}, "start"), ({"schedule": "cosine"}, "schedule"),
    ({"interval": "batch"}, "interval"), ({"warmup_fraction": 0.0}, "warmup_fraction"),
    ({"by_depth": "deep"}, "by_depth"), ({"layers": "net.*"}, "layers"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ScheduledDropPath(**kwargs)


def test_start_above_the_built_rates_is_refused():
    with pytest.raises(ValueError, match="start"):
        _fit(ScheduledDropPath(start=0.5), max_epochs=1)


@pytest.mark.parametrize("interval", ["step", "epoch"])
def test_mid_epoch_crash_and_resume_ends_with_the_same_parameters(tmp_path, interval):
    # 4 batches per epoch, 3 epochs = 12 steps; the crash at step 6 is mid-epoch 1 (checkpoint at step 5)
    full, resumed, info = crash_and_resume(
        _tiny, _dm, lambda: [ScheduledDropPath(drop_prob=0.25, interval=interval)], max_epochs=3, crash_step=6,
        checkpoint_every_n_steps=5, weights_only=True, tmp_path=tmp_path,
        limit_val_batches=0, num_sanity_val_steps=0,
    )
    assert info["resumed_from_step"] == 5
    assert info["resumed_callbacks"][0].last_rates == pytest.approx(info["full_callbacks"][0].last_rates)
    assert max(info["full_callbacks"][0].last_rates) == pytest.approx(0.25)
    assert_same_parameters(full, resumed, atol=1e-6, rtol=1e-5)
