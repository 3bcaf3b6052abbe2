"""Issue 15, compression family: grouped convs, dead-neuron coverage, EMA/WeightAveraging, checkpoints that
predate a pruning step, DataFreeCompression's quantize-only fallback. Each test failed before its fix."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from lightning_ext.compression import plan as plan_module
from lightning_ext.compression.filter_pruning import PruningError, apply_pruning_history, prune_filters
from lightning_ext.compression.l1_filter_pruning import L1FilterPruning, l1_filter_scores

# -- 1. grouped, non-depthwise convs ------------------------------------------------------------------------------

DEAD = [0, 1, 4, 8, 12, 13, 14, 15]  # conv "0"'s dead filters: 2/1/1/4 across the 4 groups of conv "2"


def grouped_toy(dead=DEAD) -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.ReLU(),
        nn.Conv2d(16, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    ).eval()
    with torch.no_grad():
        net[0].weight[dead] = 0
        net[0].bias[dead] = 0
    return net


def masked_reference(net: nn.Sequential, removed_in: list[int], removed_grouped_out: list[int]) -> nn.Sequential:
    """The dense toy with the removed channels zeroed where they are consumed (what pruning must compute)."""
    import copy

    ref = copy.deepcopy(net)
    with torch.no_grad():
        for i in removed_in:  # input channel i of the grouped conv: group i // 4, local weight column i % 4
            ref[2].weight[(i // 4) * 4:(i // 4 + 1) * 4, i % 4] = 0
        ref[4].weight[:, removed_grouped_out] = 0
    return ref


def _grouped_ok(net: nn.Sequential) -> None:
    conv = net[2]
    assert conv.groups == 4 and conv.in_channels % 4 == 0 and conv.out_channels % 4 == 0
    assert conv.weight.shape[1] == conv.in_channels // 4


def test_grouped_conv_prunes_the_same_local_channels_in_every_group_and_computes_the_masked_model():
    net, x = grouped_toy(), torch.randn(2, 3, 8, 8)
    dense = net
    import copy

    net = copy.deepcopy(dense)
    plan = prune_filters(net, x[:1], l1_filter_scores(net), pruning_ratio=0.5, ignored_layers=["4"])
    _grouped_ok(net)
    ops = {op[0]: op[2] for op in plan.ops}
    for name, idxs in ops.items():  # whole local positions: the same local channels in every conv group
        locals_ = {i % 4 for i in idxs}
        assert sorted(idxs) == sorted(g * 4 + j for g in range(4) for j in locals_), (name, idxs)
    ref = masked_reference(dense, ops.get("0", []), ops.get("2", []))
    with torch.no_grad():
        assert torch.allclose(net(x), ref(x), atol=1e-5)


def test_dead_channels_2_1_1_4_across_groups_are_pruned_exactly_with_outputs_unchanged_or_refused():
    net, x = grouped_toy(), torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        before = net(x)
    try:
        plan = prune_filters(net, x[:1], l1_filter_scores(net), layer_pruning_ratios={"0": 0.25, "2": 0.0},
                             pruning_ratio=0.01, ignored_layers=["4"])
    except PruningError as err:
        assert "'2'" in str(err)
        return
    _grouped_ok(net)
    removed = [op[2] for op in plan.ops if op[0] == "0"][0]
    assert set(removed) <= set(DEAD) and len(removed) == 4  # local channel 0 is dead in every group
    with torch.no_grad():
        assert torch.allclose(net(x), before, atol=1e-5)


def test_a_history_that_splits_conv_groups_unevenly_is_refused_naming_the_grouped_conv():
    net, x = grouped_toy(), torch.randn(1, 3, 8, 8)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(PruningError, match=r"split the 4 groups of grouped conv '2'") as info:
        apply_pruning_history(net, [["0", True, DEAD]], x)
    assert "\n" not in str(info.value)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in state.items())  # unchanged


def test_the_trial_prune_compares_outputs_when_the_removed_channels_were_dead(monkeypatch):
    """With the grouped-conv rule switched off, the output check alone still refuses the wrong result."""
    monkeypatch.setattr(plan_module, "_check_grouped_alignment", lambda *a, **k: None)
    net, x = grouped_toy(), torch.randn(1, 3, 8, 8)
    with pytest.raises(PruningError, match=r"output"):
        apply_pruning_history(net, [["0", True, DEAD]], x)


class _ChannelShuffle(nn.Module):
    """A conv, ShuffleNet's channel shuffle, a conv: Torch-Pruning's graph maps the second conv's input channels to
    the first one's outputs one to one, which the shuffle breaks."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(1, 16, 3, padding=1), nn.Conv2d(16, 8, 3, padding=1)

    def forward(self, x):
        h = torch.relu(self.a(x))
        n, c, hh, ww = h.shape
        return self.b(h.view(n, 4, c // 4, hh, ww).transpose(1, 2).reshape(n, c, hh, ww)).mean((2, 3))


def test_live_channels_a_shuffle_reorders_are_refused_not_pruned_silently_wrong():
    """The output check runs for live (non-zero) filters too: after a channel shuffle Torch-Pruning removes the
    wrong input channels of the consumer, and the pruned model would silently compute something else."""
    torch.manual_seed(0)
    net, x = _ChannelShuffle(), torch.randn(2, 1, 8, 8)
    with pytest.raises(PruningError, match=r"'a'.*differs.*ignored_layers"):
        apply_pruning_history(net, [["a", True, [1, 6, 9, 14]]], x)
    assert net.a.out_channels == 16  # refused before the model itself was touched
    plain = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1))
    apply_pruning_history(plain, [["0", True, [1, 6, 9, 14]]], x)  # live filters without a shuffle: fine
    assert plain[0].out_channels == 12 and plain[2].in_channels == 12


def test_any_exception_of_the_trial_prune_becomes_a_pruning_error_naming_the_layer(monkeypatch):
    monkeypatch.setattr(plan_module, "_check_grouped_alignment", lambda *a, **k: None)
    net, x = grouped_toy(dead=[]), torch.randn(1, 3, 8, 8)
    with pytest.raises(PruningError, match=r"Torch-Pruning failed to remove 4 channels of '0'.*'2'.*RuntimeError"):
        apply_pruning_history(net, [["0", True, [0, 1, 2, 3]]], x)  # its index_select runs out of bounds


@pytest.mark.parametrize("name", ["regnetx_002"])  # resnext26ts passes too (about as slow)
def test_timm_grouped_conv_models_prune_at_small_inputs_with_valid_groups(name):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    net = timm.create_model(name, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    start = time.perf_counter()
    prune_filters(net, x[:1], l1_filter_scores(net), pruning_ratio=0.25)
    for mod_name, m in net.named_modules():
        if isinstance(m, nn.Conv2d) and m.groups > 1:
            assert m.in_channels % m.groups == 0 and m.out_channels % m.groups == 0, mod_name
            assert m.weight.shape[1] == m.in_channels // m.groups, mod_name
    with torch.no_grad():
        assert net(x).shape == (2, 10)
    assert time.perf_counter() - start < 60


# -- 2. ActivatingWhilePruning measures F.relu -------------------------------------------------------------------


class FunctionalResNet(nn.Module):
    """A residual CNN whose blocks apply F.relu (as most user code does); only the stem has an nn.ReLU module
    unless ``modules=True``, in which case every ReLU is a module (the same computation)."""

    def __init__(self, modules: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.conv1, self.bn1 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 10)
        self.relus = nn.ModuleList([nn.ReLU(), nn.ReLU()]) if modules else None
        with torch.no_grad():
            self.conv1.bias.fill_(-0.5)  # a different dead rate in the blocks than in the stem

    def relu(self, x, i):
        return self.relus[i](x) if self.relus is not None else torch.nn.functional.relu(x)

    def forward(self, x):
        x = self.stem(x)
        y = self.relu(self.bn1(self.conv1(x)), 0)
        x = self.relu(x + self.bn2(self.conv2(y)), 1)
        return self.head(x.mean((2, 3)))


def test_dead_neuron_rate_covers_functional_relus_like_relu_modules():
    from lightning_ext.compression.ap import dead_neuron_rate

    x = torch.randn(4, 1, 8, 8)
    net = FunctionalResNet(modules=True)
    with_modules = dead_neuron_rate(net, x)
    stem_only = dead_neuron_rate(net, x, modules=[net.stem[2]])
    functional = dead_neuron_rate(FunctionalResNet(), x)
    assert with_modules != pytest.approx(stem_only)  # the test can tell the stem alone from the whole net
    assert functional == pytest.approx(with_modules)
    per_layer = dead_neuron_rate(FunctionalResNet(), x, per_layer=True)
    assert len(per_layer) == 3 and "stem.2" in per_layer


def test_activating_while_pruning_warns_when_activations_it_cannot_measure_exist():
    from lightning_ext.compression.ap import activation_coverage

    net = FunctionalResNet()
    coverage = activation_coverage(net, torch.randn(2, 1, 8, 8))
    assert coverage["relu"] == 3 and coverage["other"] == {} and coverage["prunable"] == 4

    class Mixed(FunctionalResNet):
        def forward(self, x):
            return super().forward(torch.nn.functional.silu(x))

    coverage = activation_coverage(Mixed(), torch.randn(2, 1, 8, 8))
    assert coverage["other"] == {"silu": 1}


def test_the_callback_logs_the_rate_over_functional_relus_and_warns_on_partial_coverage(tmp_path):
    from lightning.pytorch import LightningModule, Trainer

    from lightning_ext.compression.activating_while_pruning import ActivatingWhilePruning

    class Module(LightningModule):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, _):
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    class Mixed(FunctionalResNet):
        def forward(self, x):
            return super().forward(torch.nn.functional.gelu(x))

    data = torch.utils.data.TensorDataset(torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,)))
    for net, partial in ((FunctionalResNet(), False), (Mixed(), True)):
        ap = ActivatingWhilePruning(pruning_ratio=0.02, probe_size=16, latency_repeats=0, verbose=False)
        trainer = Trainer(max_epochs=1, callbacks=[ap], logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
        with pytest.warns(UserWarning) if partial else _no_warning_about("dead-neuron") as record:
            trainer.fit(Module(net), torch.utils.data.DataLoader(data, batch_size=16))
        if partial:
            assert any("1 gelu" in str(w.message) and "3 ReLU" in str(w.message) and "4 prunable" in str(w.message)
                       for w in record)
        expected = __import__("lightning_ext.compression.ap", fromlist=["x"]).dead_neuron_rate(net, ap._probe)
        assert float(trainer.callback_metrics["ap/dnr"]) == pytest.approx(expected)


class _no_warning_about:
    def __init__(self, text):
        self.text = text

    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings(record=True)
        self.record = self._ctx.__enter__()
        warnings.simplefilter("always")
        return self.record

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)
        assert not [w for w in self.record if self.text in str(w.message)], [str(w.message) for w in self.record]


# -- 3. WeightAveraging/EMA and checkpoints that predate a pruning step -------------------------------------------


def _pruning_model():
    from lightning_ext.modules import ImageClassifier

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    return ImageClassifier(net, num_classes=10, image_size=8, lr=0.05)


def _pruning_trainer(tmp_path, callbacks, max_epochs=2, **kwargs):
    from lightning.pytorch import Trainer

    return Trainer(accelerator="cpu", max_epochs=max_epochs, callbacks=callbacks, default_root_dir=tmp_path,
                   logger=False, enable_progress_bar=False, enable_model_summary=False, limit_train_batches=3,
                   limit_val_batches=2, limit_test_batches=2, **kwargs)


def test_weight_averaging_next_to_a_pruner_is_refused_in_setup_with_one_line(tmp_path):
    from lightning.pytorch.callbacks import WeightAveraging

    from lightning_ext.datamodules import DigitsDataModule

    pruner = L1FilterPruning(pruning_ratio=0.5, latency_repeats=0, plot_path=None, verbose=False)
    trainer = _pruning_trainer(tmp_path, [pruner, WeightAveraging()], enable_checkpointing=False)
    with pytest.raises(PruningError, match="WeightAveraging") as info:
        trainer.fit(_pruning_model(), datamodule=DigitsDataModule(batch_size=32, train_fraction=0.3))
    assert "\n" not in str(info.value)


def test_testing_a_checkpoint_saved_before_the_last_pruning_step_rebuilds_its_shapes(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_ext.compression.filter_pruning import load_pruned_checkpoint
    from lightning_ext.datamodules import DigitsDataModule

    dm = DigitsDataModule(batch_size=32, train_fraction=0.3)
    pruner = L1FilterPruning(pruning_ratio=0.5, num_steps=2, latency_repeats=0, plot_path=None, verbose=False)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, filename="{epoch}")
    trainer = _pruning_trainer(tmp_path, [pruner, checkpoints])
    model = _pruning_model()
    trainer.fit(model, datamodule=dm)
    assert model.net[0].out_channels == 4  # pruned twice: 8 -> 6 -> 4
    first = str(tmp_path / "ckpt" / "epoch=0.ckpt")  # saved after the first step only
    result = trainer.test(model, datamodule=dm, ckpt_path=first, verbose=False)[0]
    assert model.net[0].out_channels == 6
    fresh = load_pruned_checkpoint(_pruning_model(), first)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a.cpu(), b), name
    assert result["test_acc"] == pytest.approx(trainer.test(fresh, datamodule=dm, verbose=False)[0]["test_acc"])


# -- 4. DataFreeCompression on a model where no layer chain qualifies ----------------------------------------------


class ResidualDepthwise(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.dw = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8))
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        x = torch.nn.functional.relu(self.stem(x))
        x = torch.nn.functional.relu(x + self.dw(x))  # residual around a depthwise conv
        return self.head(x.mean((2, 3)))


def test_data_free_compression_with_defaults_falls_back_to_quantize_only_naming_the_layers():
    from lightning_ext.compression.udfc import data_free_compress

    net = ResidualDepthwise().eval()
    with pytest.warns(UserWarning, match=r"stem\.0.*only quantized to 6 bits"):
        report = data_free_compress(net, torch.zeros(2, 1, 8, 8), pruning_ratio=0.3, weight_bits=6)
    assert report.history == [] and {row["action"] for row in report.layers} == {"quantized"}
    assert report.compensated == 0 and report.metrics()["compensated_layers"] == 0.0
    assert "0 of 3 layers compensated" in report.summary()


def test_the_report_says_how_many_layers_were_compensated():
    from lightning_ext.compression.udfc import data_free_compress

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()
    report = data_free_compress(net, torch.zeros(2, 1, 8, 8), pruning_ratio=0.25, weight_bits=4)
    compensated = [row["name"] for row in report.layers if "compensated" in row["action"]]
    assert report.compensated == len(compensated) >= 1
    assert f"{len(compensated)} of {len(report.layers)} layers compensated" in report.summary()
