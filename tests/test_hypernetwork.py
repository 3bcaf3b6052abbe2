"""Hypernetwork layers and TaskConditionedHyperNet: the hyperfan-in scale of generated weights (statistical, against
PyTorch's own layer inits), per-sample weights against a loop, gradients reaching only the hypernetwork, the
output regulariser against an independent computation, training, resume, bad inputs."""

import math
import statistics

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule, Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ext.core.sampling import EpochSampler, ResumableDataLoader
from lightning_ext.testing import assert_same_parameters, crash_and_resume
from lightning_ext.vision.hypernetwork import (
    HyperConv2d,
    HyperLinear,
    TargetHyperNetwork,
    hypernet_output_penalty,
)
from lightning_ext.vision.task_conditioned_hypernet import TaskConditionedHyperNet


def _unit_rms(n, seed):
    z = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    return z / z.pow(2).mean().sqrt()  # mean(z²) = 1 exactly: the cond_scale=1 assumption


def _ratios(make, fan_in, gain, seeds=24):
    """Per-seed ratio of the generated weights' variance to gain² / fan_in."""
    out = []
    for seed in range(seeds):
        torch.manual_seed(seed)
        layer = make()
        with torch.no_grad():
            w, _ = layer.generate(_unit_rms(layer.cond_dim, 1000 + seed))
        out.append(float(w.var()) / (gain**2 / fan_in))
    return out


def _within_noise(ratios, expected=1.0):
    mean, sem = statistics.mean(ratios), statistics.stdev(ratios) / math.sqrt(len(ratios))
    return abs(mean - expected) < 4 * sem + 0.03, (mean, sem)


@pytest.mark.parametrize("hidden", [0, 64])
@pytest.mark.parametrize("gain", [1.0, math.sqrt(2.0)])
def test_hyperfan_in_gives_hyperlinear_weights_the_fan_in_variance(hidden, gain):
    ratios = _ratios(lambda: HyperLinear(100, 40, cond_dim=16, hidden=hidden, gain=gain), fan_in=100, gain=gain)
    ok, stats = _within_noise(ratios)
    assert ok, stats


def test_hyperlinear_matches_the_scale_of_pytorch_layer_inits():
    # gain 1/√3: PyTorch's default nn.Linear init (U(±1/√fan_in), variance 1/(3 fan_in)); gain √2: kaiming_normal_.
    torch.manual_seed(0)
    default_var = statistics.mean(float(nn.Linear(100, 40).weight.detach().var()) for _ in range(24))
    kaiming_var = statistics.mean(
        float(nn.init.kaiming_normal_(torch.empty(40, 100), nonlinearity="relu").var()) for _ in range(24))
    for gain, reference in ((1 / math.sqrt(3), default_var), (math.sqrt(2), kaiming_var)):
        ratios = _ratios(lambda g=gain: HyperLinear(100, 40, cond_dim=16, gain=g), fan_in=100, gain=gain)
        generated = statistics.mean(ratios) * gain**2 / 100
        assert 0.85 < generated / reference < 1.15, (gain, generated, reference)


def test_default_generator_init_misses_the_layer_scale_which_the_statistic_detects():
    # The same statistic on a default-initialised generator fails: the test above is one that could fail.
    ratios = _ratios(lambda: HyperLinear(100, 40, cond_dim=16, init="default"), fan_in=100, gain=1.0, seeds=8)
    assert not _within_noise(ratios)[0]
    assert not 0.5 < statistics.mean(ratios) < 2.0, statistics.mean(ratios)


def test_hyperfan_in_keeps_the_forward_signal_like_a_normal_layer():
    # Output second moment of the generated layer vs nn.Linear with kaiming_normal_ (same gain √2) on the same x.
    x = torch.randn(512, 100, generator=torch.Generator().manual_seed(0))
    gen, ref = [], []
    for seed in range(16):
        torch.manual_seed(seed)
        layer = HyperLinear(100, 40, cond_dim=16, gain=math.sqrt(2), bias=True)
        with torch.no_grad():
            gen.append(float(layer(x, _unit_rms(16, seed)).pow(2).mean()))
        w = nn.init.kaiming_normal_(torch.empty(40, 100), nonlinearity="relu")
        ref.append(float((x @ w.T).pow(2).mean()))
    assert 0.8 < statistics.mean(gen) / statistics.mean(ref) < 1.25


def test_hyperconv2d_kernels_have_the_fan_in_variance():
    ratios = _ratios(lambda: HyperConv2d(8, 16, 3, cond_dim=12, hidden=32), fan_in=8 * 9, gain=1.0)
    ok, stats = _within_noise(ratios)
    assert ok, stats


@pytest.mark.parametrize("chunk_size", [None, 300])
def test_target_hypernetwork_generates_each_parameter_at_its_layer_scale(chunk_size):
    target = nn.Sequential(nn.Linear(50, 30), nn.ReLU(), nn.Linear(30, 20), nn.ReLU(), nn.Linear(20, 5))
    per_param = {n: [] for n, _ in target.named_parameters()}
    for seed in range(40):
        torch.manual_seed(seed)
        net = TargetHyperNetwork(target, num_tasks=3, chunk_size=chunk_size)
        with torch.no_grad():
            params = net.unflatten(net.generate(seed % 3))
        for name, value in params.items():
            per_param[name].append(float(value.pow(2).mean()))  # zero-mean: the second moment is the variance
    for name, p in target.named_parameters():
        fan_in = p.shape[1] if p.dim() == 2 else dict(target.named_parameters())[name[:-4] + "weight"].shape[1]
        expected = 1 / fan_in if p.dim() == 2 else 1 / (3 * fan_in)
        ratio = statistics.mean(per_param[name]) / expected
        assert 0.7 < ratio < 1.4, (name, ratio)


def test_target_hypernetwork_default_init_is_off_scale():
    # A default-initialised generator's output scale does not depend on the target layer's fan-in, so a wide layer
    # (fan-in 784, as Fashion-MNIST's first layer) gets weights far above 1/fan_in; hyperfan-in gets it right.
    target = nn.Sequential(nn.Linear(784, 30), nn.ReLU(), nn.Linear(30, 5))
    for init, inside in (("default", False), ("hyperfan_in", True)):
        torch.manual_seed(0)
        net = TargetHyperNetwork(target, num_tasks=2, chunk_size=1000, init=init)
        with torch.no_grad():
            w = net.unflatten(net.generate(0))["0.weight"]
        assert (0.5 < float(w.var()) * 784 < 2.0) == inside, (init, float(w.var()) * 784)


def test_per_sample_weights_equal_a_loop_over_samples():
    torch.manual_seed(0)
    lin, conv = HyperLinear(6, 3, cond_dim=4), HyperConv2d(2, 5, 3, cond_dim=4, stride=2, padding=1)
    nn.init.normal_(lin.bias_head.weight)  # nonzero biases, so the bias path is compared too
    nn.init.normal_(conv.bias_head.weight)
    x, img, z = torch.randn(4, 6), torch.randn(4, 2, 9, 9), torch.randn(4, 4)
    for i in range(4):
        torch.testing.assert_close(lin(x, z)[i], lin(x[i:i + 1], z[i])[0])
        w, b = conv.generate(z[i])
        torch.testing.assert_close(conv(img, z)[i], F.conv2d(img[i:i + 1], w, b, 2, 1)[0], rtol=1e-5, atol=1e-5)
    assert conv(img, z[0]).shape == (4, 5, 5, 5)


def test_mixed_task_batch_equals_per_task_calls_and_export():
    torch.manual_seed(0)
    net = TargetHyperNetwork(nn.Sequential(nn.Linear(7, 9), nn.Tanh(), nn.Linear(9, 3)), num_tasks=4, chunk_size=20)
    x, tasks = torch.randn(10, 7), torch.tensor([3, 0, 1, 3, 3, 0, 2, 1, 0, 2])
    out = net(x, tasks)
    for i in range(10):
        t = int(tasks[i])
        torch.testing.assert_close(out[i], net(x[i:i + 1], t)[0])
        torch.testing.assert_close(out[i], net.export_target(t)(x[i:i + 1])[0])


def test_gradients_reach_only_the_hypernetwork_and_the_used_embeddings():
    torch.manual_seed(0)
    model = TaskConditionedHyperNet(num_classes=3, num_tasks=4, mlp_sizes=[6, 8, 3], chunk_size=16)
    x, y, t = torch.randn(8, 6), torch.randint(0, 3, (8,)), torch.tensor([0, 2] * 4)
    F.cross_entropy(model(x, t), y).backward()
    net = model.net
    for name, p in net.named_parameters():
        if name == "task_embeddings":
            assert p.grad[[0, 2]].abs().sum() > 0 and p.grad[[1, 3]].abs().sum() == 0
        elif not name.startswith("target."):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    for p in net.target.parameters():
        assert not p.requires_grad and p.grad is None
    trained = {id(p) for group in model.configure_optimizers().param_groups for p in group["params"]}
    assert trained == {id(p) for n, p in net.named_parameters() if not n.startswith("target.")}
    assert net.num_trainable_parameters() == sum(p.numel() for n, p in net.named_parameters()
                                                  if not n.startswith("target."))


def test_output_penalty_equals_an_independent_computation():
    # von Oswald et al.: β/T Σ_{t<T} ||h(e_t, Θ) − h(e_t, Θ*)||², targets from the hypernet before this task.
    torch.manual_seed(0)
    model = TaskConditionedHyperNet(num_classes=2, num_tasks=4, mlp_sizes=[5, 6, 2], chunk_size=7,
                                    task_id=3, output_penalty=0.25)
    frozen = [model.net.generate(t).detach().clone() for t in range(3)]
    model.on_train_start()
    with torch.no_grad():
        for p in model.net.body.parameters():
            p.add_(0.05 * torch.randn_like(p))
    expected = sum(((model.net.generate(t) - frozen[t]) ** 2).sum() for t in range(3)) / 3
    current = model.net.generate(torch.arange(3))
    torch.testing.assert_close(hypernet_output_penalty(current, model.snapshot), expected)
    x, y = torch.randn(6, 5), torch.randint(0, 2, (6,))
    loss = model.training_step((x, y), 0)
    ce = F.cross_entropy(model(x, 3), y)
    torch.testing.assert_close(loss, ce + 0.25 * expected)


def test_output_penalty_limits_forgetting_of_an_earlier_task():
    def train(model, x, y, steps=40):
        model.on_train_start()
        model.log = lambda *args, **kwargs: None  # no Trainer attached: skip Lightning's logging warnings
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(steps):
            opt.zero_grad()
            model.training_step((x, y), 0).backward()
            opt.step()

    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(64, 5, generator=g), torch.randn(64, 5, generator=g)
    y0, y1 = (x0[:, 0] > 0).long(), (x1[:, 1] > 0).long()
    drift = {}
    for beta in (0.0, 1.0):
        torch.manual_seed(0)
        model = TaskConditionedHyperNet(num_classes=2, num_tasks=2, mlp_sizes=[5, 8, 2], output_penalty=beta)
        train(model, x0, y0)
        before = model.net.generate(0).detach().clone()
        model.set_task(1)
        train(model, x1, y1)
        drift[beta] = float((model.net.generate(0).detach() - before).norm())
    assert drift[1.0] < 0.5 * drift[0.0], drift


class _TaskData(LightningDataModule):
    """Digits as 5 binary tasks (0 vs 1, 2 vs 3, ...): (x, y, task) batches."""

    def __init__(self, batch_size=32):
        super().__init__()
        from sklearn.datasets import load_digits

        d = load_digits()
        x = torch.tensor(d.data / 16.0, dtype=torch.float32)
        y = torch.tensor(d.target)
        self.train_set = TensorDataset(x[:1200], y[:1200] % 2, y[:1200] // 2)
        self.val_set = TensorDataset(x[1200:], y[1200:] % 2, y[1200:] // 2)
        self.batch_size = batch_size

    def train_dataloader(self):  # resumable mid-epoch, as the library's datamodules
        return ResumableDataLoader(self.train_set, batch_size=self.batch_size,
                                   sampler=EpochSampler(len(self.train_set), seed=0))

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=256)


@pytest.mark.slow  # ~10-15 s on the loaded 2-core machine
def test_multi_task_training_learns_every_task():
    torch.manual_seed(0)
    model = TaskConditionedHyperNet(num_classes=2, num_tasks=5, mlp_sizes=[64, 32, 2], chunk_size=256, lr=1e-2)
    trainer = Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=_TaskData(batch_size=64))
    assert float(trainer.callback_metrics["val_acc"]) > 0.9
    x, y, t = _TaskData().val_set.tensors
    with torch.no_grad():
        pred = model(x, t).argmax(1)
    for task in range(5):
        assert float((pred[t == task] == y[t == task]).float().mean()) > 0.8, task


def test_crash_and_resume_mid_epoch_keeps_the_penalty_snapshot(tmp_path):
    calls = {"n": 0}

    def make_model():
        calls["n"] += 1
        torch.manual_seed(0 if calls["n"] <= 2 else 99)  # the resumed model starts elsewhere: state must come back
        return TaskConditionedHyperNet(num_classes=2, num_tasks=5, mlp_sizes=[64, 16, 2], chunk_size=128,
                                       task_id=2, output_penalty=0.5, lr=3e-3)

    full, resumed, info = crash_and_resume(make_model, lambda: _TaskData(batch_size=128), lambda: [], max_epochs=2,
                                           tmp_path=tmp_path, crash_step=12, limit_val_batches=0)
    assert info["resumed_from_step"] == 12
    torch.testing.assert_close(resumed.snapshot, full.snapshot)
    assert_same_parameters(full, resumed)


@pytest.mark.parametrize("make, match", [
    (lambda: HyperLinear(4, 3, cond_dim=2)(torch.randn(5, 4), torch.randn(3)), r"\(2,\) or \(batch, 2\)"),
    (lambda: HyperLinear(4, 3, cond_dim=2)(torch.randn(5, 6), torch.randn(2)), r"\(batch, 4\)"),
    (lambda: HyperLinear(4, 3, cond_dim=2)(torch.randn(5, 4), torch.randn(4, 2)), "one row per sample"),
    (lambda: HyperConv2d(3, 4, 3, cond_dim=2)(torch.randn(2, 1, 8, 8), torch.randn(2)), "3, height, width"),
    (lambda: HyperLinear(4, 3, cond_dim=2, gain=float("nan")), "gain"),
    (lambda: HyperLinear(4, 3, cond_dim=2, init="xavier"), "init"),
    (lambda: HyperLinear(0, 3, cond_dim=2), "in_features"),
    (lambda: TargetHyperNetwork(nn.ReLU(), num_tasks=2), "no parameters"),
    (lambda: TargetHyperNetwork(nn.Linear(3, 2), num_tasks=2, chunk_size=0), "chunk_size"),
    (lambda: TargetHyperNetwork(nn.Linear(3, 2), num_tasks=2).generate(2), r"\[0, 1\]"),
    (lambda: TargetHyperNetwork(nn.Linear(3, 2), num_tasks=2)(torch.randn(4, 3), torch.tensor([0, 1])),
     "one id per sample"),
    (lambda: TaskConditionedHyperNet(num_classes=2, num_tasks=2, target=nn.Linear(3, 2), mlp_sizes=[3, 2]),
     "not both"),
    (lambda: TaskConditionedHyperNet(num_classes=2, num_tasks=2, mlp_sizes=[4, 3]), "set its last entry to 2"),
    (lambda: TaskConditionedHyperNet(num_classes=2, num_tasks=2, mlp_sizes=[4, 2], task_id=2), r"\[0, 1\]"),
    (lambda: TaskConditionedHyperNet(num_classes=2, num_tasks=2, mlp_sizes=[4, 2], output_penalty=-1.0),
     "output_penalty"),
    (lambda: hypernet_output_penalty(torch.zeros(2, 3), torch.zeros(3, 3)), "one shape"),
])
def test_bad_inputs_say_what_to_change(make, match):
    with pytest.raises(ValueError, match=match):
        make()
