"""FFNet (MetaMixer): timm registration, the official variants' parameter counts, shapes for any in_chans, feature
extraction, the token mixer against the paper's equation written here with F.conv2d, the ablations, gradients,
drop path under ScheduledDropPath, ImageClassifier and bad inputs."""

import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer
from timm.layers import DropPath

from lightning_ext.data.digits import DigitsDataModule
from lightning_ext.vision.ffnet import VARIANTS, DepthwiseConv2d, FFNet, TokenMixer
from lightning_ext.vision.image_classifier import ImageClassifier
from lightning_ext.vision.scheduled_drop_path import ScheduledDropPath, collect_drop_path_modules

ROOT = Path(__file__).resolve().parents[1]

#: Parameter counts of the official models/ffnet.py (unfused, 1000 classes), executed with a shim for the timm
#: helper it lacks (spec vision-and-tabular.md, Appendix A4); the README rounds them after RepVGG fusion.
OFFICIAL_MILLIONS = {"ffnet_1": 13.78, "ffnet_2": 27.21, "ffnet_3": 48.82, "ffnet_4": 79.87}


def _nano(**kw):
    torch.manual_seed(0)
    return timm.create_model("ffnet_nano", **{"in_chans": 1, "num_classes": 10, "stem_stride": 2, **kw})


def test_registered_with_timm():
    assert set(timm.list_models("ffnet*")) == set(VARIANTS)


@pytest.mark.parametrize("name", sorted(OFFICIAL_MILLIONS))
def test_official_variant_parameter_counts_and_drop_paths(name):
    with torch.device("meta"):
        net = timm.create_model(name)
    assert round(sum(p.numel() for p in net.parameters()) / 1e6, 2) == OFFICIAL_MILLIONS[name]
    spec = VARIANTS[name]
    # every residual (token and channel mixer of each block) has a DropPath at the variant's default rate
    rates = [m.drop_prob for m in net.modules() if isinstance(m, DropPath)]
    assert len(rates) == 2 * sum(spec["depths"])
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(spec["drop_path_rate"])
    assert (net.stages[0][0].token.gamma is not None) == (spec["layer_scale"] is not None)
    assert net.pretrained_cfg["first_conv"] == "stem.0.c" and net.pretrained_cfg["classifier"] == "head"


@pytest.mark.parametrize("in_chans,size,stem,out", [(1, 28, 2, 2), (3, 32, 4, 1), (2, 16, 1, 2)])
def test_forward_shapes_for_any_in_chans(in_chans, size, stem, out):
    net = _nano(in_chans=in_chans, stem_stride=stem)
    assert net.stem[0].c.in_channels == in_chans
    feats = net.forward_features(torch.randn(2, in_chans, size, size))
    assert feats.shape == (2, 256, out, out)
    assert net(torch.randn(2, in_chans, size, size)).shape == (2, 10)
    assert net.forward_head(feats, pre_logits=True).shape == (2, 256)
    net.reset_classifier(0)
    assert net(torch.randn(2, in_chans, size, size)).shape == (2, 256)


def test_features_only_through_timm():
    net = timm.create_model("ffnet_nano", in_chans=1, features_only=True, stem_stride=2, out_indices=(1, 3))
    outs = net(torch.randn(2, 1, 28, 28))
    assert [tuple(o.shape) for o in outs] == [(2, 64, 7, 7), (2, 256, 2, 2)]
    assert net.feature_info.channels() == [64, 256] and net.feature_info.reduction() == [4, 16]


def test_token_mixer_matches_the_equation_written_with_conv2d():
    """Eval mode: value(GELU(key(BN(W_q x)))) with a 7x7 RepVGG pair (7x7 + 3x3 depthwise, each with BN) as key and
    value, computed here from the raw weights."""
    torch.manual_seed(0)
    dim = 6
    mixer = TokenMixer(dim, 7, 7)
    for bn in [m for m in mixer.modules() if isinstance(m, torch.nn.BatchNorm2d)]:
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 1.5), bn.bias.data.uniform_(-0.5, 0.5)
    mixer.eval()
    x = torch.randn(2, dim, 9, 9)

    def bn(y, m):
        return (y - m.running_mean[:, None, None]) / torch.sqrt(m.running_var[:, None, None] + m.eps) * \
            m.weight[:, None, None] + m.bias[:, None, None]

    def rep(y, r):
        big = bn(F.conv2d(y, r.large.c.weight, padding=3, groups=dim), r.large.bn)
        small = bn(F.conv2d(y, r.small.c.weight, padding=1, groups=dim), r.small.bn)
        return big + small

    q = bn(F.conv2d(x, mixer.query.c.weight), mixer.query.bn)
    expected = rep(F.gelu(rep(q, mixer.key)), mixer.value)
    assert torch.allclose(mixer(x), expected, atol=1e-5)
    # the small-kernel case: plain depthwise convs with bias, no BN (official ks 3 in stages 1-2)
    small = TokenMixer(dim, 3, 3).eval()
    q = bn(F.conv2d(x, small.query.c.weight), small.query.bn)
    k = F.gelu(F.conv2d(q, small.key.weight, small.key.bias, padding=1, groups=dim))
    assert torch.allclose(small(x), F.conv2d(k, small.value.weight, small.value.bias, padding=1, groups=dim),
                          atol=1e-5)


@pytest.mark.parametrize("channels,mult,size,k,stride,bias", [
    (5, 1, 4, 7, 1, True), (5, 1, 2, 7, 1, False), (3, 2, 7, 7, 2, False), (4, 2, 4, 7, 2, False),
    (6, 1, 5, 3, 1, True), (2, 1, 3, 5, 2, True), (3, 1, 14, 3, 1, True)])
def test_depthwise_conv_small_map_path_matches_conv2d(channels, mult, size, k, stride, bias):
    """The dense small-map path: outputs and gradients (input, weight, bias) equal F.conv2d's, for stride 1 and 2,
    a channel multiplier, with and without bias; a 14x14 map with a 3x3 kernel takes F.conv2d itself."""
    torch.manual_seed(0)
    conv = DepthwiseConv2d(channels, channels * mult, k, stride, k // 2, groups=channels, bias=bias)
    x = torch.randn(3, channels, size, size, requires_grad=True)
    params = [x, *conv.parameters()]
    calls = []
    conv._conv_forward = lambda *a: calls.append(1) or torch.nn.Conv2d._conv_forward(conv, *a)  # the F.conv2d path
    out = conv(x)
    ref = F.conv2d(x, conv.weight, conv.bias, stride, k // 2, groups=channels)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(ref, params, g)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert bool(calls) == (size * size > 4 * k * k)  # the dense path on small maps only


def test_ffnet_forward_is_the_same_with_and_without_the_small_map_path(monkeypatch):
    net = _nano().eval()
    x = torch.randn(2, 1, 28, 28)
    fast = net(x)
    monkeypatch.setattr(DepthwiseConv2d, "dense_small_maps", False)
    torch.testing.assert_close(fast, net(x), atol=1e-5, rtol=1e-4)
    assert sum(isinstance(m, DepthwiseConv2d) for m in net.modules()) > 0


def test_ablations_linear_is_affine_and_none_has_no_token_mixer():
    torch.manual_seed(0)
    lin, gelu = TokenMixer(4, 7, 7, linear=True).eval(), TokenMixer(4, 7, 7).eval()
    gelu.load_state_dict(lin.state_dict())
    x, y = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    zero = torch.zeros_like(x)

    def affine_gap(m):
        return float((m(2 * x - y) - (2 * m(x) - m(y)) + (2 - 1 - 1) * m(zero)).abs().max())

    assert affine_gap(lin) < 1e-4 and affine_gap(gelu) > 1e-3
    full, linear, none = _nano(), _nano(token_mixer="linear"), _nano(token_mixer="none")
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(full) == count(linear) and count(none) < count(full)
    assert all(b.token is None for s in none.stages for b in s if hasattr(b, "token"))
    assert none(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_every_parameter_gets_a_finite_gradient():
    net = _nano(layer_scale=1e-2, drop_path_rate=0.1)
    net.train()
    F.cross_entropy(net(torch.randn(4, 1, 28, 28)), torch.tensor([0, 1, 2, 3])).backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    zero = [n for n, p in net.named_parameters() if p.grad.abs().sum() == 0]
    assert not zero, zero


def test_image_classifier_fast_dev_run_and_scheduled_drop_path():
    torch.manual_seed(0)
    model = ImageClassifier("ffnet_nano", num_classes=10, in_chans=1, image_size=8, lr=1e-3,
                            backbone_kwargs={"drop_path_rate": 0.2})
    assert model.net.stem[0].c.stride == (1, 1)  # stem_downsample 1 for 8x8: the first stem conv keeps resolution
    modules = collect_drop_path_modules(model)
    assert len(modules) == 2 * sum(VARIANTS["ffnet_nano"]["depths"])
    seen = []
    first = next(iter(modules.values()))[0]
    first.register_forward_pre_hook(lambda mod, args: seen.append(mod.drop_prob))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sdp = ScheduledDropPath(drop_prob=0.2, by_depth="linear")  # NASNet's (i+1)/N: the rate-0 first block too
    Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=3, limit_val_batches=1, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            callbacks=[sdp]).fit(model, datamodule=DigitsDataModule(batch_size=16, train_fraction=0.1))
    assert seen[0] == 0.0 and seen[-1] == pytest.approx(0.2 / len(modules))  # switched on, ramped to its target
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_image_classifier_registers_the_names_without_an_explicit_import():
    code = ("import lightning_ext, sys; assert 'lightning_ext.vision.ffnet' not in sys.modules; "
            "from lightning_ext.modules import ImageClassifier; "
            "m = ImageClassifier('ffnet_1', num_classes=3, in_chans=1, image_size=32); "
            "import timm; print(type(m.net).__name__, timm.create_model('ffnet_nano', num_classes=2).num_classes)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["FFNet", "2"]


@pytest.mark.parametrize("kwargs,match", [
    ({"pretrained": True}, "no pretrained weights"),
    ({"in_chans": 0}, "in_chans"),
    ({"stem_stride": 3}, "stem_stride"),
    ({"token_mixer": "softmax"}, "token_mixer"),
    ({"drop_path_rate": float("nan")}, "drop_path_rate"),
    ({"drop_path_rate": 1.0}, "drop_path_rate"),
    ({"dims": (32, 48, 96, 192)}, "multiple of the previous"),
    ({"depths": (1, 1, 1)}, "one entry per stage"),
    ({"key_kernels": (3, 4, 7, 7)}, "odd positive"),
    ({"expansion": (3, 3)}, "one value per stage"),
    ({"expansion": 0}, "expansion"),
    ({"layer_scale": -1.0}, "layer_scale"),
    ({"num_classes": -1}, "num_classes"),
])
def test_bad_inputs_are_one_clear_line(kwargs, match):
    with pytest.raises(ValueError, match=match) as err:
        timm.create_model("ffnet_nano", **kwargs)
    assert "\n" not in str(err.value)


def test_direct_construction_and_small_image_through_image_classifier_error():
    assert FFNet(depths=(1,), dims=(8,), num_classes=2, stem_stride=1)(torch.zeros(1, 3, 5, 5)).shape == (1, 2)
    with pytest.raises(ValueError, match="Unknown timm backbone 'ffnet_9'.*ffnet_"):
        ImageClassifier("ffnet_9", num_classes=10, in_chans=1, image_size=28)


def test_import_lightning_ext_then_timm_registers_ffnet_without_importing_torch_first():
    import subprocess
    import sys

    code = ("import sys, lightning_ext; assert 'torch' not in sys.modules and 'timm' not in sys.modules; "
            "import timm; m = timm.create_model('ffnet_nano', num_classes=3); print(type(m).__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "FFNet"
