"""DataFreeCompression (UDFC): the closed form, the quantizer, physical channel removal, no data, resume, DDP."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lightning_ext.compression import load_pruned_checkpoint
from lightning_ext.compression.data_free_compression import DataFreeCompression
from lightning_ext.compression.udfc import (
    CompressionError,
    data_free_compress,
    find_compensable_chains,
    quantize_per_channel,
    reconstruction_from_bn_statistics,
)
from lightning_ext.datamodules import DigitsDataModule
from lightning_ext.modules import ImageClassifier
from lightning_ext.testing import assert_same_parameters, crash_and_resume

FAST = dict(num_samples=1024, measure=False)


def _cnn(widths=(8, 12, 16), seed=0, pool=False):
    torch.manual_seed(seed)
    layers, c = [], 1
    for w in widths:
        layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
        if pool:
            layers.append(nn.MaxPool2d(2))
        c = w
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10))


def _set_bn_statistics(net, x):
    """Give every BatchNorm exact running statistics of ``x`` (cumulative average) and random affine params."""
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    net.train()
    with torch.no_grad():
        net(x)
    net.eval()


# -- quantizer ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_quantizer_uses_at_most_2_to_the_b_levels_per_channel(bits):
    torch.manual_seed(bits)
    w = torch.randn(16, 8, 3, 3) * torch.linspace(0.01, 3, 16).reshape(16, 1, 1, 1)
    q = quantize_per_channel(w, bits)
    assert q.shape == w.shape and q.dtype == w.dtype
    for row_w, row_q in zip(w.reshape(16, -1), q.reshape(16, -1)):
        assert row_q.unique().numel() <= 2 ** bits
        step = row_w.abs().max() / (2 ** (bits - 1) - 1)
        assert (row_q - row_w).abs().max() <= step / 2 + 1e-6  # rounding error of a uniform grid
        assert row_q.abs().max() == pytest.approx(row_w.abs().max().item(), rel=1e-6)  # the extreme is on the grid
    torch.testing.assert_close(quantize_per_channel(q, bits), q)  # idempotent


def test_quantizer_refuses_bits_outside_2_to_16():
    for bits in (1, 17, 0, 6.0, True):
        with pytest.raises(ValueError, match="bits"):
            quantize_per_channel(torch.ones(2, 2), bits)


# -- the closed form ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("input_model", ["shared", "fitted"])
@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_compensation_is_exact_for_a_linear_two_layer_chain(kind, input_model):
    """No activation between the layers and the pruned filter lies in the span of the kept ones: the compressed
    network computes exactly what the original did, on any input (the input here is not white); naive pruning
    does not."""
    torch.manual_seed(0)
    if kind == "conv":
        net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.Conv2d(6, 4, 1))
        make_x = lambda n: torch.rand(n, 3, 7, 7) + 0.5  # noqa: E731 - non-zero input mean on purpose
    else:
        net = nn.Sequential(nn.Linear(10, 6, bias=True), nn.BatchNorm1d(6), nn.Linear(6, 4))
        make_x = lambda n: torch.rand(n, 10) + 0.5  # noqa: E731
    producer = net[0]
    with torch.no_grad():  # filter 5 = a small combination of filters 0, 2 and 4 (smallest L1: it is pruned)
        producer.weight[5] = 0.05 * producer.weight[0] - 0.08 * producer.weight[2] + 0.03 * producer.weight[4]
        if producer.bias is not None:
            producer.bias[5] = 0.05 * producer.bias[0] - 0.08 * producer.bias[2] + 0.03 * producer.bias[4]
    _set_bn_statistics(net, make_x(512))
    x = make_x(64)
    with torch.no_grad():
        expected = net(x)
    naive, udfc = copy.deepcopy(net), copy.deepcopy(net)
    kwargs = dict(pruning_ratio=1 / 6, weight_bits=None, importance="l1", ridge=0.0, input_model=input_model, **FAST)
    report = data_free_compress(udfc, make_x(2), compensate=True, **kwargs)
    data_free_compress(naive, make_x(2), compensate=False, **kwargs)
    assert report.history == [["0", True, [5]]]  # the library's one history format (Torch-Pruning's)
    assert report.layers[0]["bias_correction"] == "consumer bias"
    with torch.no_grad():
        torch.testing.assert_close(udfc(x), expected, atol=1e-4, rtol=1e-4)
        assert (naive(x) - expected).abs().max() > 1e-2


@pytest.mark.parametrize("input_model", ["per_channel", "shared", "fitted"])
def test_closed_form_recovers_the_combination_and_ridge_shrinks_it_to_the_mean(input_model):
    w = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [2.0, -1.0, 0.0]], dtype=torch.float64)
    var = (w ** 2).sum(1)  # BN statistics of white unit-variance inputs
    gamma, beta = var.sqrt(), torch.tensor([0.1, -0.2, 0.3, 0.4], dtype=torch.float64)
    args = dict(pruned=[3], input_model=input_model, eps=0.0)
    exact = reconstruction_from_bn_statistics(w, var, gamma, beta, activations=[], ridge=0.0, num_samples=512, **args)
    torch.testing.assert_close(exact["R"][:, 3], torch.tensor([2.0, -1.0, 0.0], dtype=torch.float64))
    assert exact["delta"][3].item() == pytest.approx(0.4 - (2 * 0.1 + 0.2), abs=1e-9)
    assert exact["error_after"].item() < 1e-8 < exact["error_before"].item()
    # through a ReLU the fit is approximate but still reduces the model's expected error
    relu = reconstruction_from_bn_statistics(w, var, gamma, beta, ridge=1e-3, num_samples=4096, **args)
    assert relu["error_after"] < 0.5 * relu["error_before"]
    # an overwhelming ridge leaves only the expected value of the lost activation: E[relu(N(0.4, 5))]
    mean_only = reconstruction_from_bn_statistics(w, var, gamma, beta, ridge=1e12, num_samples=8192, **args)
    assert mean_only["R"].abs().max() < 1e-6
    sd = 5 ** 0.5
    z = torch.tensor(0.4 / sd, dtype=torch.float64)
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    expected = 0.4 * normal.cdf(z) + sd * normal.log_prob(z).exp()
    assert mean_only["delta"][3].item() == pytest.approx(expected.item(), rel=0.05)


def test_per_channel_model_keeps_the_exact_batchnorm_marginals_when_the_input_is_not_white():
    """The running variances disagree with a white input; the per-channel model still has mean beta and
    variance gamma^2 per channel (checked through the mean of a ReLU), the shared one does not."""
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    var = torch.tensor([1.0, 9.0, 32.0, 4.0], dtype=torch.float64)  # input gains 1, 9, 16, 2: not white
    gamma = torch.tensor([1.0, 2.0, 3.0, 1.0], dtype=torch.float64)
    beta = torch.tensor([0.5, -1.0, 0.0, 0.2], dtype=torch.float64)
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    expected = beta[2] * normal.cdf(beta[2] / gamma[2]) + gamma[2] * normal.log_prob(beta[2] / gamma[2]).exp()
    per = reconstruction_from_bn_statistics(w, var, gamma, beta, pruned=[2], ridge=1e12, eps=0.0,
                                            input_model="per_channel", num_samples=16384)
    shared = reconstruction_from_bn_statistics(w, var, gamma, beta, pruned=[2], ridge=1e12, eps=0.0,
                                               input_model="shared", num_samples=16384)
    assert per["delta"][2].item() == pytest.approx(expected.item(), rel=0.03)
    assert abs(shared["delta"][2].item() - expected.item()) > 0.1 * expected.item()


# -- physical removal ------------------------------------------------------------------------------------------


def test_output_channels_are_removed_with_batchnorm_and_next_layer_consistent():
    net = _cnn((8, 12, 16))
    _set_bn_statistics(net, torch.randn(64, 1, 8, 8))
    params = sum(p.numel() for p in net.parameters())
    report = data_free_compress(net, torch.zeros(2, 1, 8, 8), pruning_ratio=0.25, weight_bits=6, **FAST)
    convs = [m for m in net if isinstance(m, nn.Conv2d)]
    bns = [m for m in net if isinstance(m, nn.BatchNorm2d)]
    assert [c.out_channels for c in convs] == [6, 9, 12]
    assert [c.weight.shape[0] for c in convs] == [6, 9, 12]
    assert [c.in_channels for c in convs] == [1, 6, 9] and [c.weight.shape[1] for c in convs] == [1, 6, 9]
    for bn, c in zip(bns, convs):
        assert bn.num_features == c.out_channels
        assert bn.weight.shape == bn.bias.shape == bn.running_mean.shape == bn.running_var.shape == (c.out_channels,)
    assert net[-1].in_features == 12 and net[-1].weight.shape == (10, 12)
    assert net(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    assert report.params_after == sum(p.numel() for p in net.parameters()) < params == report.params_before
    assert report.macs_after < report.macs_before
    assert [op[0] for op in report.history] == ["0", "3", "6"]
    for layer in (*convs, net[-1]):  # every weight is on a 6-bit grid after compensation
        assert max(row.unique().numel() for row in layer.weight.detach().reshape(layer.weight.shape[0], -1)) <= 64


def test_residual_coupled_layers_are_only_quantized_in_a_timm_resnet():
    model = ImageClassifier("resnet10t", num_classes=10, in_chans=1, image_size=8)
    chains, skipped = find_compensable_chains(model, torch.zeros(2, 1, 8, 8))
    assert "net.layer1.0.conv1" in chains and chains["net.layer1.0.conv1"].consumer == "net.layer1.0.conv2"
    assert "net.layer1.0.conv2" in skipped and "coupled" in skipped["net.layer1.0.conv2"]
    before = {n: m.weight.shape[0] for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    report = data_free_compress(model, torch.zeros(2, 1, 8, 8), pruning_ratio=0.3, weight_bits=6,
                                layers=["net.conv1.*", "net.layer1.*", "net.layer2.*"], **FAST)
    after = {n: m.weight.shape[0] for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert {r["name"] for r in report.layers} == {n for n in before if n.startswith(("net.conv1", "net.layer1",
                                                                                         "net.layer2"))}
    for name in before:
        if name in chains and name.startswith(("net.conv1", "net.layer1", "net.layer2")):
            assert after[name] == before[name] - round(0.3 * before[name]), name
        else:
            assert after[name] == before[name], name
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    assert report.params_after < report.params_before


# -- behaviour on a trained model -------------------------------------------------------------------------------


def test_compensation_recovers_most_of_the_accuracy_naive_pruning_loses():
    dm = DigitsDataModule()
    dm.setup()
    (xtr, ytr), (xva, yva) = dm.train_set.tensors, dm.val_set.tensors
    net = _cnn((24, 48, 48), seed=0)
    opt = torch.optim.AdamW(net.parameters(), 5e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(6):
        net.train()
        for idx in torch.randperm(len(xtr), generator=gen).split(64):
            loss = F.cross_entropy(net(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()

    def acc(m):
        with torch.no_grad():
            return (m.eval()(xva).argmax(1) == yva).float().mean().item()

    base = acc(net)
    naive, udfc = copy.deepcopy(net), copy.deepcopy(net)
    data_free_compress(naive, xva[:2] * 0, pruning_ratio=0.3, weight_bits=6, compensate=False, measure=False)
    data_free_compress(udfc, xva[:2] * 0, pruning_ratio=0.3, weight_bits=6, compensate=True, measure=False)
    acc_naive, acc_udfc = acc(naive), acc(udfc)
    assert base > 0.9
    assert acc_udfc - acc_naive >= 0.5 * (base - acc_naive), (base, acc_naive, acc_udfc)


# -- arguments and refusals -------------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0, 1, -0.1, 1.5, True, "0.3"])
def test_pruning_ratios_outside_0_1_are_refused(ratio):
    with pytest.raises(ValueError, match="pruning_ratio"):
        DataFreeCompression(pruning_ratio=ratio)
    with pytest.raises(ValueError, match="pruning_ratio"):
        data_free_compress(_cnn(), torch.zeros(2, 1, 8, 8), pruning_ratio=ratio)


@pytest.mark.parametrize("bits", [1, 17, 0, 6.0, True])
def test_bits_outside_2_16_are_refused(bits):
    with pytest.raises(ValueError, match="weight_bits"):
        DataFreeCompression(weight_bits=bits)


def test_other_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="Nothing to do"):
        DataFreeCompression(pruning_ratio=None, weight_bits=None)
    with pytest.raises(ValueError, match="apply_at"):
        DataFreeCompression(apply_at="fit_end")
    with pytest.raises(ValueError, match="importance"):
        DataFreeCompression(importance="taylor")
    with pytest.raises(ValueError, match="save_path"):
        DataFreeCompression(save_path="x.ckpt")  # only meaningful with apply_at='train_end'
    with pytest.raises(ValueError, match="input_shape"):
        DataFreeCompression(input_shape=[0, 8])


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("kwargs, argument", [
    (dict(pruning_ratio=NAN), "pruning_ratio"),
    (dict(pruning_ratio=INF), "pruning_ratio"),
    (dict(pruning_ratio=-0.3), "pruning_ratio"),
    (dict(weight_bits=NAN), "weight_bits"),
    (dict(weight_bits=-6), "weight_bits"),
    (dict(ridge=NAN), "ridge"),
    (dict(ridge=INF), "ridge"),
    (dict(ridge=-1e-3), "ridge"),
    (dict(num_samples=INF), "num_samples"),
    (dict(num_samples=-1024), "num_samples"),
    (dict(min_channels=0), "min_channels"),
    (dict(min_channels=NAN), "min_channels"),
    (dict(seed=NAN), "seed"),
    (dict(latency_batch_size=-2), "latency_batch_size"),
    (dict(latency_repeats=INF), "latency_repeats"),
    (dict(input_shape=[1, -8, 8]), "input_shape"),
    (dict(importance="taylor"), "importance"),
    (dict(input_model="gaussian"), "input_model"),
    (dict(apply_at="epoch_end"), "apply_at"),
])
def test_bad_values_are_refused_with_one_line_naming_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=argument) as info:
        DataFreeCompression(**kwargs)
    assert "\n" not in str(info.value)


def test_a_missing_torch_pruning_fails_at_construction_with_the_install_line(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torch_pruning", None)
    with pytest.raises(ModuleNotFoundError, match="DataFreeCompression.*pip install"):
        DataFreeCompression()


def test_a_ratio_that_empties_a_layer_is_refused_and_changes_nothing():
    net = _cnn((2, 8))
    state = copy.deepcopy(net.state_dict())
    with pytest.raises(CompressionError, match=r"leave layer '0' with 0 of 2 channels"):
        data_free_compress(net, torch.zeros(2, 1, 8, 8), pruning_ratio=0.8, weight_bits=6, **FAST)
    assert_same_parameters(net, _cnn((2, 8)))
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())


def test_a_model_without_batchnorm_cannot_be_pruned_but_can_be_quantized():
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    with pytest.raises(CompressionError, match="BatchNorm"):  # pruning only: nothing left to do
        data_free_compress(net, torch.zeros(2, 1, 8, 8), pruning_ratio=0.3, **dict(FAST, weight_bits=None))
    with pytest.warns(UserWarning, match="BatchNorm.*only quantized"):  # issue 15: quantize-only fallback
        data_free_compress(copy.deepcopy(net), torch.zeros(2, 1, 8, 8), pruning_ratio=0.3, **FAST)
    report = data_free_compress(net, torch.zeros(2, 1, 8, 8), pruning_ratio=None, weight_bits=4, **FAST)
    assert [r["action"] for r in report.layers] == ["quantized", "quantized"]
    assert net[1].weight.detach()[0].unique().numel() <= 16


def test_fsdp_and_deepspeed_are_refused():
    for name in ("FSDPStrategy", "DeepSpeedStrategy"):
        strategy = type(name, (), {})()
        with pytest.raises(RuntimeError, match="does not support"):
            DataFreeCompression().setup(SimpleNamespace(strategy=strategy), None, "fit")


def test_ddp_spawn_fit_is_refused_with_advice():
    trainer = Trainer(strategy="ddp_spawn", devices=2, accelerator="cpu", logger=False)
    model = ImageClassifier(_cnn(), num_classes=10, image_size=8)
    with pytest.raises(RuntimeError, match="strategy='ddp'"):
        DataFreeCompression().setup(trainer, model, "fit")


# -- the callback: no data, logging, checkpoints ----------------------------------------------------------------


class _NoTrainingData(DigitsDataModule):
    """Digits whose training/validation loaders raise and whose test samples count their accesses."""

    def setup(self, stage=None):
        super().setup(stage)
        self.touched = 0
        base = self.test_set

        class Counting(torch.utils.data.Dataset):
            def __len__(inner):
                return len(base)

            def __getitem__(inner, i):
                self.touched += 1
                return base[i]

        self.counting_test_set = Counting()

    def train_dataloader(self):
        raise AssertionError("DataFreeCompression must not read training data")

    def val_dataloader(self):
        raise AssertionError("DataFreeCompression must not read validation data")

    def test_dataloader(self):
        return torch.utils.data.DataLoader(self.counting_test_set, batch_size=128)


class _CheckBeforeTest(Callback):
    def on_test_start(self, trainer, pl_module):
        self.touched_before_test = trainer.datamodule.touched
        self.channels = pl_module.net[0].out_channels


def _model(seed=0, widths=(8, 12, 16)):
    torch.manual_seed(seed)
    return ImageClassifier(_cnn(widths, seed), num_classes=10, image_size=8, lr=0.01)


def test_callback_compresses_without_touching_any_data_and_logs_sizes(tmp_path):
    dm, spy = _NoTrainingData(), _CheckBeforeTest()
    cb = DataFreeCompression(pruning_ratio=0.25, weight_bits=6, num_samples=1024, latency_batch_size=4,
                             latency_repeats=3)
    trainer = Trainer(accelerator="cpu", logger=CSVLogger(str(tmp_path), name="", version=""), callbacks=[cb, spy],
                      enable_progress_bar=False, enable_model_summary=False)
    out = trainer.test(_model(), datamodule=dm, verbose=False)
    assert spy.touched_before_test == 0 and spy.channels == 6
    assert dm.touched == len(dm.test_set)  # then the test loop (and only it) read the test split
    assert 0 <= out[0]["test_acc"] <= 1
    m = cb.summary
    assert m["params_after"] < m["params_before"] and m["macs_after"] < m["macs_before"]
    assert m["latency_ms_before"] > 0 and m["latency_ms_after"] > 0
    logged = (tmp_path / "metrics.csv").read_text()
    for key in ("params_before", "params_after", "macs_before", "macs_after", "latency_ms_before", "latency_ms_after"):
        assert f"data_free_compression/{key}" in logged
    state = cb.state_dict()
    assert state["applied"] and [op[0] for op in state["steps"][0]["ops"]] == ["net.0", "net.3", "net.6"]


def test_resume_from_a_checkpoint_of_the_compressed_model_reproduces_the_parameters(tmp_path):
    make_cb = lambda: [DataFreeCompression(pruning_ratio=0.3, weight_bits=6, num_samples=1024,  # noqa: E731
                                           latency_repeats=0)]
    full, resumed, info = crash_and_resume(_model, lambda: DigitsDataModule(batch_size=64), make_cb, max_epochs=3,
                                           crash_epoch=2, tmp_path=tmp_path, limit_train_batches=3,
                                           limit_val_batches=2)
    assert full.net[0].out_channels == resumed.net[0].out_channels == 6
    assert_same_parameters(full, resumed)
    assert info["resumed_callbacks"][0].history == info["full_callbacks"][0].history
    # and the compressed checkpoint loads into a fresh, uncompressed model for evaluation
    fresh = _model(seed=1)
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=make_cb(), default_root_dir=str(tmp_path), enable_checkpointing=False)
    trainer.validate(fresh, datamodule=DigitsDataModule(), ckpt_path=str(info["checkpoint"]), verbose=False)
    assert fresh.net[0].out_channels == 6


def test_train_end_compression_saves_a_checkpoint_that_a_fresh_model_loads(tmp_path):
    cb = DataFreeCompression(pruning_ratio=0.3, weight_bits=4, apply_at="train_end", save_path="compressed.ckpt",
                             num_samples=1024, latency_repeats=0)
    model = _model()
    trainer = Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=4, limit_val_batches=2, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                      callbacks=[cb])
    trainer.fit(model, datamodule=DigitsDataModule())
    assert model.net[0].out_channels == 6 and cb.saved_checkpoint == str(tmp_path / "compressed.ckpt")
    before = trainer.test(model, datamodule=DigitsDataModule(), verbose=False)[0]
    fresh = _model(seed=3)
    tester = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                     default_root_dir=str(tmp_path), enable_checkpointing=False,
                     callbacks=[DataFreeCompression(pruning_ratio=0.3, weight_bits=4, apply_at="train_end")])
    after = tester.test(fresh, datamodule=DigitsDataModule(), ckpt_path=cb.saved_checkpoint, verbose=False)[0]
    assert_same_parameters(model, fresh)
    assert after["test_acc"] == pytest.approx(before["test_acc"])
    # one replay path: the filter pruners' loader rebuilds a UDFC-compressed checkpoint too, without a Trainer
    assert_same_parameters(model, load_pruned_checkpoint(_model(seed=4), cb.saved_checkpoint))
    assert_same_parameters(model.net, load_pruned_checkpoint(_cnn(seed=4), cb.saved_checkpoint))
    # a checkpoint written BEFORE compression cannot go into the compressed model: a clear error
    ckpt = tmp_path / "uncompressed.ckpt"
    torch.save({"state_dict": _model().state_dict()}, ckpt)
    with pytest.raises(CompressionError, match="saved before DataFreeCompression compressed"):
        model.load_state_dict(torch.load(ckpt, weights_only=True)["state_dict"])


# -- DDP --------------------------------------------------------------------------------------------------------


class _SameWeightsOnAllRanks(Callback):
    def on_validation_start(self, trainer, pl_module):
        if trainer.world_size == 1:
            return
        sums = torch.stack([p.detach().double().sum() for p in pl_module.parameters()])
        gathered = trainer.strategy.all_gather(sums)
        if not torch.equal(gathered[0], gathered[-1]):
            raise AssertionError("the ranks hold different compressed models")


@pytest.mark.ddp
def test_ddp_ranks_get_rank_zeros_compressed_model_and_match_one_process(tmp_path):
    def run(**kwargs):
        cb = DataFreeCompression(pruning_ratio=0.3, weight_bits=6, num_samples=1024, latency_repeats=0)
        trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                          callbacks=[cb, _SameWeightsOnAllRanks()], default_root_dir=str(tmp_path), **kwargs)
        return trainer.validate(_model(), datamodule=DigitsDataModule(batch_size=32), verbose=False)[0]

    single = run(devices=1)
    ddp = run(devices=2, strategy="ddp_spawn")
    assert ddp["val_acc"] == pytest.approx(single["val_acc"], abs=1e-6)
    assert ddp["val_loss"] == pytest.approx(single["val_loss"], abs=1e-5)


# -- max-pool between the BN and the next layer ----------------------------------------------------------------


def _pool_net(seed=0):
    """1x1 conv -> BN -> ReLU -> max-pool 2x2 -> 1x1 conv (bias): on white noise the pooled positions are
    independent, the setting in which ``max_pool="independent"`` is the exact model."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 6, 1, bias=False), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(6, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    _set_bn_statistics(net, torch.randn(256, 3, 8, 8))
    return net


def _expected_max_of_relu(beta: float, gamma: float, m: int) -> float:
    """E[max of m iid relu(N(beta, gamma^2))] = int_0^inf 1 - F(x)^m dx, by the trapezoid rule (independent of
    the Monte Carlo in the code)."""
    x = torch.linspace(0, abs(beta) + 12 * abs(gamma), 20001, dtype=torch.float64)
    cdf = 0.5 * (1 + torch.erf((x - beta) / (abs(gamma) * 2 ** 0.5)))
    return float(torch.trapezoid(1 - cdf ** m, x))


def test_bias_correction_is_taken_after_the_max_pool_not_before():
    net = _pool_net()
    bn, consumer = net[1], net[4]
    chains, _ = find_compensable_chains(net, torch.zeros(2, 3, 8, 8))
    assert chains["0"].activations == [("relu",), ("max_pool", 4)]
    shifts = {}
    for model in ("independent", "identity"):
        m = copy.deepcopy(net)
        report = data_free_compress(m, torch.zeros(2, 3, 8, 8), pruning_ratio=1 / 6, weight_bits=None, ridge=1e12,
                                    max_pool=model, num_samples=16384, measure=False)
        (c,) = report.layers[0]["pruned"]
        shifts[model] = (m[4].bias - consumer.bias).detach().double()
    gamma, beta = bn.weight[c].item(), bn.bias[c].item()
    v = consumer.weight[:, c, 0, 0].detach().double()
    pooled = _expected_max_of_relu(beta, gamma, 4)
    unpooled = _expected_max_of_relu(beta, gamma, 1)
    torch.testing.assert_close(shifts["independent"], v * pooled, rtol=0.03, atol=1e-3)
    torch.testing.assert_close(shifts["identity"], v * unpooled, rtol=0.03, atol=1e-3)
    assert pooled > 1.3 * unpooled


def test_pooled_compensation_beats_ignoring_the_pool_on_data_and_stop_does_not_compensate():
    net = _pool_net(1)
    x = torch.randn(128, 3, 8, 8)
    with torch.no_grad():
        expected = net(x)
    errors = {}
    for model in ("independent", "identity", "stop"):
        m = copy.deepcopy(net)
        report = data_free_compress(m, torch.zeros(2, 3, 8, 8), pruning_ratio=2 / 6, weight_bits=4, max_pool=model,
                                    num_samples=8192, measure=False)
        with torch.no_grad():
            errors[model] = float(((m(x) - expected) ** 2).mean())
        assert ("bias_correction" in report.layers[0]) == (model != "stop")
        assert report.config["max_pool"] == model
    assert errors["independent"] < errors["identity"] and errors["independent"] < errors["stop"]


def test_an_adaptive_max_pool_stops_the_chain_and_a_bad_max_pool_model_is_refused():
    net = nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveMaxPool2d(2),
                        nn.Conv2d(4, 2, 1))
    chains, skipped = find_compensable_chains(net.eval(), torch.zeros(2, 1, 8, 8))
    assert not chains and "AdaptiveMaxPool" in skipped["0"]
    with pytest.raises(ValueError, match="max_pool"):
        data_free_compress(_cnn(), torch.zeros(2, 1, 8, 8), max_pool="gaussian", measure=False)


# -- Neuron Merging (the data-free baseline UDFC builds on) --------------------------------------------------------


def _official_scaling_matrix(weight, ind, threshold, bn_weight, bn_bias, bn_mean, bn_var, lam):
    """Independent re-implementation of the reference code's ``create_scaling_mat_conv_thres_bn``
    (friendshipkim/neuron-merging, decompose.py, model_type="merge") from its conventions, in numpy: cosine
    distance of raw filters, s = |current| / |chosen|, the scale s (gamma_chosen / gamma_cur) (var_cur /
    var_chosen) with running variances, the bias term divided by the scale, min-max normalised, score =
    lam * cos + (1 - lam) * bias, a merge kept when its cosine similarity reaches the threshold."""
    import numpy as np

    weight = weight.reshape(weight.shape[0], -1)
    normed = weight / np.linalg.norm(weight, axis=1, keepdims=True)
    cos_dist = 1 - normed @ normed.T
    out = np.zeros((weight.shape[0], len(ind)))
    for i in range(weight.shape[0]):
        if i in ind:
            out[i, list(ind).index(i)] = 1
            continue
        cos, scales, biases = [], [], []
        for ch in ind:
            s = np.linalg.norm(weight[i]) / np.linalg.norm(weight[ch])
            scale = s * (bn_weight[ch] / bn_weight[i]) * (bn_var[i] / bn_var[ch])
            b = abs((bn_weight[ch] / bn_var[ch]) * (s * (-(bn_var[i] * bn_bias[i] / bn_weight[i]) + bn_mean[i])
                                                   - bn_mean[ch]) + bn_bias[ch]) / scale
            cos.append(cos_dist[i, ch])
            scales.append(scale)
            biases.append(b)
        biases = (np.array(biases) - min(biases)) / (max(biases) - min(biases))
        j = int(np.argmin(lam * np.array(cos) + (1 - lam) * biases))
        if threshold and 1 - cos[j] < threshold:
            continue
        out[i, j] = scales[j]
    return out


@pytest.mark.parametrize("threshold, lamda", [(0.1, 0.85), (0.45, 0.8), (0.0, 1.0)])
def test_neuron_merging_matrix_matches_the_official_code_on_one_layer(threshold, lamda):
    from lightning_ext.compression.neuron_merging import merge_matrix

    torch.manual_seed(3)
    w = torch.randn(12, 4, 3, 3, dtype=torch.float64)
    w[7] = 0.4 * w[2] + 0.05 * torch.randn(4, 3, 3, dtype=torch.float64)  # a near-copy, surely merged
    gamma = torch.rand(12, dtype=torch.float64) + 0.5
    beta, mean = torch.randn(12, dtype=torch.float64), torch.randn(12, dtype=torch.float64)
    var = torch.rand(12, dtype=torch.float64) + 0.5
    kept = [0, 1, 2, 3, 5, 8, 9, 11]
    ours = merge_matrix(w, kept, gamma, beta, mean, var, threshold=threshold, lamda=lamda, convention="official",
                        positive_only=False)
    official = _official_scaling_matrix(w.numpy(), kept, threshold, gamma.numpy(), beta.numpy(), mean.numpy(),
                                        var.numpy(), lamda)
    torch.testing.assert_close(ours["S"], torch.from_numpy(official))
    assert ours["partner"][7] == 2


def test_neuron_merging_exact_convention_is_exact_through_relu_and_max_pool_and_skips_negative_scales():
    """Filter 3 = 0.3 x filter 0 with BN parameters that make c = 0: merging it into channel 0 reproduces the
    network exactly through the ReLU and the max-pool with convention="exact"; the official convention's
    inverted BN factor does not; with a negative BN scale the merge is skipped (it would not commute with ReLU)."""
    from lightning_ext.compression.neuron_merging import merge_matrix, neuron_merging_compress

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(6, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with torch.no_grad():
        net[0].weight[3] = 0.3 * net[0].weight[0]
    x = torch.randn(64, 3, 8, 8)
    _set_bn_statistics(net, torch.randn(512, 3, 8, 8))
    bn = net[1]
    with torch.no_grad():
        bn.weight[3] = 0.6  # the smallest BN-folded L1 norm: channel 3 is the one pruned
        sigma = torch.sqrt(bn.running_var + bn.eps)
        s = net[0].weight[3].norm() / net[0].weight[0].norm()
        scale = s * (bn.weight[3] / sigma[3]) / (bn.weight[0] / sigma[0])
        bn.bias[3] = scale * bn.bias[0] - bn.weight[3] / sigma[3] * (s * bn.running_mean[0] - bn.running_mean[3])
        expected = net(x)
    errors = {}
    for convention in ("exact", "official"):
        m = copy.deepcopy(net)
        report = neuron_merging_compress(m, x[:2], pruning_ratio=1 / 6, convention=convention, measure=False)
        assert report.layers[0]["pruned"] == [3] and report.layers[0]["merged"] == 1
        with torch.no_grad():
            errors[convention] = float((m(x) - expected).abs().max())
    assert errors["exact"] < 1e-4 < errors["official"]
    with torch.no_grad():
        bn.weight[3] = -0.6
    out = merge_matrix(net[0].weight, [0, 1, 2, 4, 5], bn.weight, bn.bias, bn.running_mean, bn.running_var)
    assert out["merged"] == 0 and out["skipped_sign"] == 1 and out["S"][3].abs().sum() == 0


def test_neuron_merging_refuses_bad_arguments_with_one_line():
    from lightning_ext.compression.neuron_merging import neuron_merging_compress

    for kwargs, name in ((dict(threshold=1.5), "threshold"), (dict(lamda=float("nan")), "lamda"),
                         (dict(convention="paper"), "convention"), (dict(pruning_ratio=None), "pruning_ratio")):
        with pytest.raises(ValueError, match=name) as info:
            neuron_merging_compress(_cnn(), torch.zeros(2, 1, 8, 8), measure=False, **kwargs)
        assert "\n" not in str(info.value)
