"""FTWT (FireTogetherWireTogether): the heat-map mass target, the predictors' loss and a whole gated forward against
independent implementations of the paper's equations and the official code's conventions
(``selkerdawy/FTWT`` ``utils/layers.py::get_gt_mask_ratio``, ``utils/utils.py::compute_mask_loss_per_input``), the
MACs accounting against the library's counter, the decoupling, the callback's optimizer group, cooldown, bad
inputs, crash-and-resume (epoch boundary and mid-epoch) and two gloo processes vs one."""

from __future__ import annotations

import functools
import math
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn

from lightning_ext.compression.fire_together_wire_together import FireTogetherWireTogether
from lightning_ext.compression.ftwt import (
    FTWTGating,
    MaskPredictor,
    conv_bn_pairs,
    mask_loss,
    mass_targets,
    uniform_targets,
)
from lightning_ext.core.measure import layer_macs
from lightning_ext.datamodules import DigitsDataModule
from lightning_ext.modules import ImageClassifier
from lightning_ext.testing import assert_same_parameters, crash_and_resume, fit_ddp_vs_single

QUIET = dict(logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
             accelerator="cpu", devices=1)


# -- independent references (written from the paper's equations and the official code's conventions) ----------


def reference_mass_target(act: np.ndarray, r: float, delta: float = 1e-5) -> np.ndarray:
    """Per sample: score_c = max over positions of |a_c|; p = score / sum(score); with r = 1 label 0 where
    p <= delta (the official special case), else sort p descending, label 0 every channel at a sorted position
    whose cumulative mass exceeds r by more than delta. Plain loops."""
    b, c = act.shape[:2]
    out = np.ones((b, c))
    for i in range(b):
        score = [float(np.abs(act[i, j]).max()) for j in range(c)]
        total = sum(score)
        p = [s / total for s in score]
        if r == 1:
            for j in range(c):
                if p[j] <= delta:
                    out[i, j] = 0
            continue
        order = sorted(range(c), key=lambda j: (-p[j], j))
        cum = 0.0
        for j in order:
            cum += p[j]
            if cum - r > delta:
                out[i, j] = 0
    return out


def reference_bce(z: float, t: float) -> float:
    """BCE with logits, the numerically stable closed form."""
    return max(z, 0.0) - z * t + math.log1p(math.exp(-abs(z)))


def reference_mask_loss(logits: list[np.ndarray], targets: list[np.ndarray]) -> float:
    """Official: per layer BCE (reduction none), mean over the batch, sum over channels; mean over layers."""
    layers = []
    for z, t in zip(logits, targets):
        b, c = z.shape
        layers.append(sum(sum(reference_bce(z[i, j], t[i, j]) for i in range(b)) / b for j in range(c)))
    return sum(layers) / len(layers)


def _net(seed: int = 0, bn: type = nn.BatchNorm2d) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False), bn(8), nn.ReLU(),
        nn.Conv2d(8, 12, 3, padding=1), bn(12), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(12, 16, 3, padding=1, bias=False), bn(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )


# -- the target, the loss and a gated forward ----------------------------------------------------------------


@pytest.mark.parametrize("r", [1.0, 0.95, 0.9, 0.6])
def test_mass_target_matches_the_reference(r):
    torch.manual_seed(0)
    act = F.relu(torch.randn(6, 10, 4, 4) * torch.rand(1, 10, 1, 1) * 3)
    act[0, 3] = 0  # a silent channel
    act[1, :] = act[1, :1]  # ties
    expected = reference_mass_target(act.numpy(), r)
    np.testing.assert_array_equal(mass_targets(act, r).numpy(), expected)
    assert 0 < expected.sum() < expected.size  # the test is not vacuous


def test_mass_target_edge_cases():
    dominant = torch.tensor([0.95, 0.03, 0.02]).view(1, 3, 1, 1)
    assert mass_targets(dominant, 0.9).tolist() == [[0.0, 0.0, 0.0]]  # as in the official code
    assert mass_targets(torch.zeros(2, 3, 2, 2), 0.9).sum() == 0  # all-zero sample: nothing fires
    assert mass_targets(torch.zeros(2, 3, 2, 2), 1.0).sum() == 0
    smaller = mass_targets(torch.rand(8, 16, 3, 3), 0.5).sum()
    assert smaller < mass_targets(torch.rand(8, 16, 3, 3), 1.0).sum()


def test_uniform_target_prunes_the_lowest_share_per_sample():
    torch.manual_seed(1)
    act = torch.rand(5, 10, 3, 3)
    t = uniform_targets(act, 0.3)
    assert t.sum(1).tolist() == [7.0] * 5
    scores = act.amax(dim=(2, 3))
    for i in range(5):
        assert set(torch.argsort(scores[i])[:3].tolist()) == set((t[i] == 0).nonzero().flatten().tolist())


def test_mask_loss_matches_the_reference():
    torch.manual_seed(2)
    logits = [torch.randn(4, 6) * 3, torch.randn(4, 9)]
    targets = [(torch.rand(4, 6) > 0.5).float(), (torch.rand(4, 9) > 0.3).float()]
    expected = reference_mask_loss([z.numpy() for z in logits], [t.numpy() for t in targets])
    assert float(mask_loss(logits, targets)) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("r", [1.0, 0.9])
def test_gated_forward_and_loss_match_a_hand_written_ftwt_forward(r):
    """One batch through the hooked network vs the official layer (conv -> BN -> ReLU -> x gate, predictor on the
    detached layer input: avg-pool, softmax, linear) written out layer by layer."""
    net = _net()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):  # non-trivial running statistics, eval mode: deterministic
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    net.eval()
    gating = FTWTGating(net, torch.zeros(1, 1, 8, 8), mass_ratio=r, seed=3).attach()
    for p in gating.predictors.parameters():  # spread the logits so some gates close
        p.data.mul_(4)
    torch.manual_seed(4)
    x = torch.randn(5, 1, 8, 8)
    out = net(x)
    loss = float(gating.loss())

    logits, targets, h, saved_gates = [], [], x, []
    for conv_i, bn_i, pool in ((0, 1, False), (3, 4, True), (7, 8, False)):
        conv, bn = net[conv_i], net[bn_i]
        pred = gating.predictors[str(conv_i)]
        z = F.linear(torch.softmax(h.mean(dim=(2, 3)), 1), pred.linear.weight, pred.linear.bias)
        y = F.relu(F.batch_norm(F.conv2d(h, conv.weight, conv.bias, padding=1), bn.running_mean, bn.running_var,
                                bn.weight, bn.bias, False, 0.0, bn.eps))  # functional: no hooks
        logits.append(z.detach().numpy())
        targets.append(reference_mass_target(y.detach().numpy(), r))
        gate = (torch.sigmoid(z) > 0.5).float()
        saved_gates.append(gate)
        h = y * gate[:, :, None, None]
        if pool:
            h = F.max_pool2d(h, 2)
    expected_out = net[12](net[11](net[10](h)))
    torch.testing.assert_close(out, expected_out)
    assert loss == pytest.approx(reference_mask_loss(logits, targets), rel=1e-5)
    closed = sum(float((1 - g).sum()) for g in saved_gates)
    assert closed > 0  # some gates are closed: the comparison covers the gating


def test_dense_accounting_equals_the_library_counter_and_gates_cut_it():
    net = _net()
    net.eval()
    x = torch.rand(3, 1, 8, 8) + 0.1
    gating = FTWTGating(net, x).attach()
    gating.override = lambda key, logits, act: torch.ones_like(logits)
    with torch.no_grad():
        net(x)
    per_layer = layer_macs(net, x)
    assert gating.summary()["dense_macs"] == pytest.approx(per_layer["0"] + per_layer["3"] + per_layer["7"])
    # keep only the first half of every layer's channels; count by hand what each conv then sees
    half = lambda key, logits, act: (torch.arange(logits.shape[1]) < logits.shape[1] // 2).float().expand_as(logits)
    gating.reset_stats()
    gating.override = half
    with torch.no_grad():
        net(x)
        h, expected = x, 0.0
        for conv_i, bn_i, pool in ((0, 1, False), (3, 4, True), (7, 8, False)):
            conv = net[conv_i]
            active_in = (h.abs().amax(dim=(2, 3)) > 0).sum(1).double()  # per sample
            hw = h.shape[2] * h.shape[3]  # padding 1, stride 1: output size = input size
            expected += float((conv.out_channels // 2 * hw * (active_in * 9 + (conv.bias is not None))).mean())
            gate = (torch.arange(conv.out_channels) < conv.out_channels // 2).float()
            y = F.batch_norm(F.conv2d(h, conv.weight, conv.bias, padding=1), net[bn_i].running_mean,
                             net[bn_i].running_var, net[bn_i].weight, net[bn_i].bias, False, 0.0, net[bn_i].eps)
            h = F.relu(y) * gate[None, :, None, None]  # functional: no hooks
            if pool:
                h = F.max_pool2d(h, 2)
    summary = gating.summary()
    assert summary["keep"] == {"0": 0.5, "3": 0.5, "7": 0.5}
    assert summary["macs"] == pytest.approx(expected)
    assert summary["macs_reduction"] > 0.7  # half the outputs and at most half the inputs: at least 75% less
    gating.detach()


def test_task_loss_never_reaches_the_predictors_and_the_mask_loss_never_reaches_the_backbone():
    net = _net()
    gating = FTWTGating(net, torch.zeros(1, 1, 8, 8), mass_ratio=0.9).attach()
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))
    F.cross_entropy(net(x), y).backward()
    assert all(p.grad is None for p in gating.predictors.parameters())
    backbone = {n: p.grad.clone() for n, p in net.named_parameters()}
    gating.loss().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gating.predictors.parameters())
    for n, p in net.named_parameters():
        assert torch.equal(p.grad, backbone[n]), n


def test_pairs_are_found_by_tracing_and_shared_convs_are_refused():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn1, self.bn2 = nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2), nn.BatchNorm2d(2)

        def forward(self, x):
            return self.bn2(self.conv(self.bn1(self.conv(x))))

    with pytest.raises(ValueError, match="run more than once"):
        conv_bn_pairs(Shared(), torch.zeros(1, 2, 3, 3))
    net = nn.Sequential(nn.BatchNorm2d(1), nn.Conv2d(1, 2, 1), nn.ReLU(), nn.BatchNorm2d(2))  # ReLU in between
    assert conv_bn_pairs(net, torch.zeros(1, 1, 3, 3)) == []
    assert MaskPredictor(3, 5, softmax=False)(torch.zeros(2, 3, 4, 4)).shape == (2, 5)


# -- the callback --------------------------------------------------------------------------------------------


def _model(seed: int = 0, bn: type = nn.BatchNorm2d, **kwargs) -> ImageClassifier:
    kwargs.setdefault("optimizer", functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9))  # picklable (spawn)
    return ImageClassifier(_net(seed, bn), num_classes=10, image_size=8, **kwargs)


def _digits(batch_size: int = 64, **kwargs) -> DigitsDataModule:
    return DigitsDataModule(batch_size=batch_size, drop_last=True, **kwargs)


class Recorder(Callback):
    """Per epoch: the predictor group's lr before each step and the predictors' weights at the epoch end."""

    def __init__(self, ftwt):
        self.ftwt, self.lrs, self.weights, self.backbone_lrs = ftwt, [], [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.lrs.append(optimizer.param_groups[-1]["lr"])
        self.backbone_lrs.append(optimizer.param_groups[0]["lr"])

    def on_train_epoch_end(self, trainer, pl_module):
        self.weights.append({k: v.clone() for k, v in self.ftwt.gating.predictors.state_dict().items()})


def test_callback_trains_predictors_in_their_own_group_until_the_cooldown(one_thread):
    ftwt = FireTogetherWireTogether(mass_ratio=0.9, cooldown=0.5, predictor_lr=0.2, seed=1)
    rec = Recorder(ftwt)
    model = _model(scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5))
    initial = FTWTGating(_model(), torch.zeros(1, 1, 8, 8), seed=1).predictors.state_dict()
    trainer = Trainer(max_epochs=4, limit_train_batches=4, limit_val_batches=2, callbacks=[ftwt, rec], **QUIET)
    trainer.fit(model, datamodule=_digits())
    groups = trainer.optimizers[0].param_groups
    assert len(groups) == 2 and groups[1]["weight_decay"] == 0.0
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in ftwt.gating.predictors.parameters()}
    assert rec.lrs == [0.2] * 8 + [0.0] * 8  # pinned: the user's StepLR halves only the backbone
    assert rec.backbone_lrs[::4] == pytest.approx([0.05, 0.025, 0.0125, 0.00625])
    w = rec.weights
    assert any(not torch.equal(initial[k], w[0][k]) for k in initial)  # learning before the cooldown
    assert any(not torch.equal(w[0][k], w[1][k]) for k in initial)
    assert all(torch.equal(w[1][k], w[3][k]) for k in initial)  # frozen after it (epoch 2 onwards)
    assert "ftwt/val_macs_reduction" in trainer.callback_metrics
    assert 0 < ftwt.summaries["val"]["macs"] < ftwt.summaries["val"]["dense_macs"]
    assert "training_step" not in vars(model) and not ftwt.gating.attached  # the module is left as it was
    out = trainer.test(model, datamodule=_digits(), verbose=False)[0]  # gated again while testing
    assert out["ftwt/test_macs"] == pytest.approx(ftwt.summaries["test"]["macs"])
    assert ftwt.summaries["test"]["macs_reduction"] > 0 and not ftwt.gating.attached


def test_mask_loss_is_added_to_the_training_loss(one_thread):
    seen = {}

    class Peek(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.setdefault("loss", float(outputs["loss"]))
            seen.setdefault("task", float(trainer.callback_metrics["train_loss"]))
            seen.setdefault("mask", float(trainer.callback_metrics["ftwt/mask_loss"]))

    ftwt = FireTogetherWireTogether(mass_ratio=0.95, cooldown=1.0)
    Trainer(max_steps=1, limit_val_batches=0, callbacks=[ftwt, Peek()], **QUIET).fit(_model(), datamodule=_digits())
    assert seen["mask"] > 0 and seen["loss"] == pytest.approx(seen["task"] + seen["mask"], rel=1e-5)


def _resume_model():
    return _model(scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7))


def _half_digits():
    return _digits(batch_size=32, train_fraction=0.5)  # 19 steps per epoch


@pytest.mark.parametrize("where", ["epoch", "mid_epoch"])
def test_crash_and_resume_matches_the_uninterrupted_run(tmp_path, one_thread, where):
    crash = dict(crash_epoch=1) if where == "epoch" else dict(crash_step=26)  # mid-epoch 1, before the cooldown
    full, resumed, info = crash_and_resume(_resume_model, _half_digits,
                                           lambda: [FireTogetherWireTogether(mass_ratio=0.9, cooldown=0.7, seed=2)],
                                           max_epochs=3, tmp_path=tmp_path, weights_only=True, limit_val_batches=1,
                                           num_sanity_val_steps=0, **crash)
    assert_same_parameters(full, resumed, atol=1e-6)
    a, b = info["full_callbacks"][0].gating.predictors, info["resumed_callbacks"][0].gating.predictors
    assert_same_parameters(a, b, atol=1e-6)
    initial = FTWTGating(_model(), torch.zeros(1, 1, 8, 8), seed=2).predictors
    assert not torch.allclose(a["net_0"].linear.weight, initial["net_0"].linear.weight)


def test_resume_without_the_predictor_state_differs(tmp_path, one_thread):
    """Control: the resume test can fail. A callback that drops its state resumes with fresh predictors."""

    class Forgetful(FireTogetherWireTogether):
        def load_state_dict(self, state_dict):
            pass

    full, resumed, _ = crash_and_resume(_resume_model, _half_digits,
                                        lambda: [Forgetful(mass_ratio=0.9, cooldown=0.7, seed=2)], max_epochs=3,
                                        crash_epoch=1, tmp_path=tmp_path, limit_val_batches=1, num_sanity_val_steps=0)
    with pytest.raises(AssertionError):
        assert_same_parameters(full, resumed, atol=1e-6)


class FrozenStatsBN(nn.BatchNorm2d):
    """BatchNorm on its running statistics in training too: one process and two give the same forward."""

    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


class SavePredictors(Callback):
    def on_fit_end(self, trainer, pl_module):
        if trainer.global_rank == 0:
            ftwt = next(c for c in trainer.callbacks if isinstance(c, FireTogetherWireTogether))
            torch.save(ftwt.gating.predictors.state_dict(), f"{trainer.logger.log_dir}/predictors.pt")


@pytest.mark.ddp
def test_ddp_two_processes_match_one_process(tmp_path):
    ftwt = FireTogetherWireTogether(mass_ratio=0.9, cooldown=0.5, seed=1)
    single, ddp = fit_ddp_vs_single(lambda: _model(bn=FrozenStatsBN), _digits, global_batch_size=64,
                                    tmp_path=tmp_path, test=False, max_epochs=2, limit_train_batches=6,
                                    callbacks=[ftwt, SavePredictors()])
    for name, value in single.state_dict.items():
        torch.testing.assert_close(ddp.state_dict[name], value, atol=1e-5, rtol=1e-5, msg=name)
    for key in ("ftwt/val_macs", "val_loss"):
        torch.testing.assert_close(torch.tensor(ddp.curve(key)), torch.tensor(single.curve(key)), atol=1e-4, rtol=1e-6)
    p_single = torch.load(tmp_path / "single" / "predictors.pt", weights_only=True)
    p_ddp = torch.load(tmp_path / "ddp" / "predictors.pt", weights_only=True)
    initial = FTWTGating(_model(bn=FrozenStatsBN), torch.zeros(1, 1, 8, 8), seed=1).predictors.state_dict()
    for k, v in p_single.items():
        torch.testing.assert_close(p_ddp[k], v, atol=1e-5, rtol=1e-5)
    assert any(not torch.allclose(v, initial[k], atol=1e-4) for k, v in p_single.items())


# -- bad inputs ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,match", [
    (dict(mass_ratio=0.0), "mass_ratio"),
    (dict(mass_ratio=1.5), "mass_ratio"),
    (dict(mass_ratio=float("nan")), "mass_ratio"),
    (dict(cooldown=1.5), "cooldown"),
    (dict(predictor_lr=0.0), "predictor_lr"),
    (dict(pruning_ratio=0.3), "target='uniform'"),
    (dict(target="topk"), "target"),
    (dict(activation="tanh"), "activation"),
    (dict(layers=[]), "layers"),
    (dict(log_prefix=""), "log_prefix"),
])
def test_bad_arguments_get_one_clear_line(kwargs, match):
    with pytest.raises(ValueError, match=match) as err:
        FireTogetherWireTogether(**kwargs)
    assert "\n" not in str(err.value)


def test_a_model_without_conv_bn_is_refused_in_setup():
    no_bn = ImageClassifier(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                          nn.Linear(4, 10)), num_classes=10, image_size=8)
    with pytest.raises(ValueError, match="no Conv2d followed by a BatchNorm2d") as err:
        Trainer(max_steps=1, callbacks=[FireTogetherWireTogether()], **QUIET).fit(no_bn, datamodule=_digits())
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="`layers` names 'net.99'"):
        FTWTGating(_net(), torch.zeros(1, 1, 8, 8), layers=["net.99"])


def test_unsupported_strategies_and_manual_optimization_are_refused():
    class FSDPStrategy:  # stands in for Lightning's: only the class name is inspected
        pass

    with pytest.raises(ValueError, match="FireTogetherWireTogether .*FSDPStrategy shards them"):
        FireTogetherWireTogether().setup(types.SimpleNamespace(strategy=FSDPStrategy()), _model(), "fit")

    class Manual(LightningModule):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False
            self.net = _net()

    with pytest.raises(ValueError, match="manual optimization"):
        FireTogetherWireTogether().setup(types.SimpleNamespace(strategy=object()), Manual(), "fit")


def test_hooks_are_marked_override_with_a_docstring():
    for hook in ("setup", "on_fit_start", "on_train_batch_start", "on_before_optimizer_step", "on_train_epoch_end",
                 "on_validation_epoch_start", "on_validation_epoch_end", "on_test_epoch_start", "on_test_epoch_end",
                 "teardown", "on_exception", "state_dict", "load_state_dict"):
        fn = vars(FireTogetherWireTogether)[hook]
        assert getattr(fn, "__override__", False) and fn.__doc__, hook
