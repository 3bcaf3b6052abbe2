"""The filter-pruning engine and its callbacks: physical removal, targets, errors, fit, resume, DDP."""

import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from torch import nn

from lightning_ext.compression.filter_pruning import (
    FilterPruning,
    PruningError,
    apply_pruning_history,
    count_macs_params,
    load_pruned_checkpoint,
    measure_latency,
    plan_filter_pruning,
    prunable_filter_groups,
    prune_filters,
)
from lightning_ext.compression.beta_rank_pruning import BetaRankPruning
from lightning_ext.compression.l1_filter_pruning import L1FilterPruning, l1_filter_scores
from lightning_ext.compression.random_filter_pruning import RandomFilterPruning, random_filter_scores
from lightning_ext.datamodules import DigitsDataModule
from lightning_ext.modules import ImageClassifier
from lightning_ext.testing import assert_same_parameters, crash_and_resume

REPO = Path(__file__).resolve().parents[1]


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )


def make_model(lr: float = 0.05) -> ImageClassifier:
    torch.manual_seed(0)
    return ImageClassifier(
        small_cnn(), num_classes=10, image_size=8,
        optimizer=lambda params: torch.optim.SGD(params, lr=lr, momentum=0.9),
        scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5),
    )


def make_dm() -> DigitsDataModule:
    return DigitsDataModule(batch_size=64, train_fraction=0.5)


def timm_resnet() -> nn.Module:
    import timm

    torch.manual_seed(0)
    return timm.create_model("resnet10t", num_classes=10, in_chans=1)


def conv_shapes(model: nn.Module) -> dict:
    return {n: (m.in_channels, m.out_channels) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


# -- the functional core ----------------------------------------------------------------------------------------


def test_timm_resnet_shrinks_physically_across_residual_adds():
    model, x = timm_resnet(), torch.randn(2, 1, 16, 16)
    macs0, params0 = count_macs_params(model, x[:1])
    stem = model.conv1[0].weight.detach().clone()
    l1 = l1_filter_scores(model)
    plan = prune_filters(model, x[:1], l1, pruning_ratio=0.5)
    after = conv_shapes(model)
    # every conv lost half its filters; residual partners and the classifier's inputs follow
    assert after["layer1.0.conv2"][1] == after["conv1.6"][1] == 32
    assert after["layer2.0.conv2"][1] == after["layer2.0.downsample.1"][1] == 64
    assert model.fc.in_features == 256 and model.fc.out_features == 10
    assert model.layer2[0].bn2.num_features == 64 and model.layer2[0].bn2.running_mean.shape == (64,)
    # the stem's first conv is its own group: the filters kept are those with the largest L1 norm, unchanged
    kept = sorted(torch.topk(l1["conv1.0"], 12).indices.tolist())
    torch.testing.assert_close(model.conv1[0].weight, stem[kept])
    macs1, params1 = count_macs_params(model, x[:1])
    assert params1 < 0.3 * params0 and macs1 < 0.3 * macs0  # parameters fall by about 1 - (1 - 0.5)^2
    assert plan.macs_after == macs1 and plan.params_after == params1
    assert sum(p.numel() for p in model.parameters()) == params1  # the tensors really shrank
    assert model(x).shape == (2, 10)


def test_torchvision_mobilenet_v2_depthwise_convs_shrink():
    from torchvision.models import mobilenet_v2

    torch.manual_seed(0)
    model, x = mobilenet_v2(weights=None, num_classes=10, width_mult=0.5), torch.randn(2, 3, 32, 32)
    macs0, _ = count_macs_params(model, x[:1])
    hidden = model.features[2].conv[0][0].out_channels
    plan = prune_filters(model, x[:1], random_filter_scores(model, seed=0), pruning_ratio=0.3)
    depthwise = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert depthwise and all(m.groups == m.in_channels == m.out_channels for m in depthwise)
    expanded = model.features[2].conv  # expand 1x1 -> depthwise 3x3 -> project 1x1
    kept = hidden - int(0.3 * hidden + 0.5)
    assert expanded[0][0].out_channels == expanded[1][0].out_channels == expanded[2].in_channels == kept
    assert 0.3 < plan.macs_reduction < 0.6
    assert count_macs_params(model, x[:1])[0] < macs0
    assert model(x).shape == (2, 10)


class TwoBranchConcat(nn.Module):
    """A user model with an Inception-style concatenation: two conv branches, concatenated, then a 1x1 conv."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(1, 12, 1), nn.BatchNorm2d(12), nn.ReLU())
        self.mix = nn.Conv2d(20, 16, 1)
        self.head = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3))

    def forward(self, x):
        return self.head(self.mix(torch.cat([self.a(x), self.b(x)], dim=1)))


def test_concatenated_branches_shrink_and_the_consumer_keeps_the_right_input_channels():
    torch.manual_seed(0)
    model, x = TwoBranchConcat(), torch.randn(2, 1, 8, 8)
    before, mix = model(x), model.mix.weight.detach().clone()
    scores = {"a.0": torch.arange(8.0), "b.0": torch.arange(12.0), "mix": torch.arange(16.0)}
    prune_filters(model, x[:1], scores, pruning_ratio=0.5, ignored_layers=["mix"])
    assert (model.a[0].out_channels, model.b[0].out_channels) == (4, 6)
    assert model.mix.in_channels == 10
    # the lowest-scoring half of each branch went; mix keeps exactly the input columns of the survivors
    torch.testing.assert_close(model.mix.weight, mix[:, [4, 5, 6, 7, 14, 15, 16, 17, 18, 19]])
    assert model(x).shape == before.shape


def test_macs_target_is_reached_within_tolerance():
    model, x = timm_resnet(), torch.zeros(1, 1, 8, 8)
    for target in (0.45, 0.58):
        trial = timm_resnet()
        plan = prune_filters(trial, x, l1_filter_scores(trial), macs_reduction=target)
        measured = 1 - count_macs_params(trial, x)[0] / count_macs_params(model, x)[0]
        assert abs(measured - target) < 0.02, (target, measured)
        assert plan.macs_reduction == pytest.approx(measured)


def test_ratio_against_reference_channels_reaches_a_cumulative_ratio():
    model, x = timm_resnet(), torch.zeros(1, 1, 16, 16)
    reference = {g.root: g.channels for g in prunable_filter_groups(model, x)}
    first = plan_filter_pruning(model, x, l1_filter_scores(model), pruning_ratio=0.25, reference_channels=reference)
    apply_pruning_history(model, first.ops, x)
    second = plan_filter_pruning(model, x, l1_filter_scores(model), pruning_ratio=0.5, reference_channels=reference)
    apply_pruning_history(model, second.ops, x)
    assert model.conv1[0].out_channels == 12 and model.layer4[0].conv1.out_channels == 256  # half of 24 / 512


def test_ignored_layers_keep_their_filters():
    model, x = timm_resnet(), torch.zeros(1, 1, 16, 16)
    before = conv_shapes(model)
    prune_filters(model, x, l1_filter_scores(model), pruning_ratio=0.5, ignored_layers=["layer3.*", "conv1.0"])
    after = conv_shapes(model)
    for name in ("layer3.0.conv1", "layer3.0.conv2", "layer3.0.downsample.1", "conv1.0"):
        assert after[name][1] == before[name][1], name
    # the residual stream of layer3 is coupled with layer4's input convs: their inputs stay, their filters go
    assert after["layer4.0.conv1"][0] == before["layer4.0.conv1"][0]
    assert after["layer4.0.conv1"][1] == before["layer4.0.conv1"][1] // 2
    assert after["layer2.0.conv1"][1] == before["layer2.0.conv1"][1] // 2


def test_a_conv_head_that_reaches_the_output_is_never_pruned():
    class ConvHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 5, 1)

        def forward(self, x):
            return self.head(torch.relu(self.body(x))).mean(dim=(2, 3))

    model = ConvHead()
    assert [g.root for g in prunable_filter_groups(model, torch.zeros(1, 1, 6, 6))] == ["body"]
    prune_filters(model, torch.zeros(1, 1, 6, 6), l1_filter_scores(model), pruning_ratio=0.5)
    assert model.head.out_channels == 5 and model.body.out_channels == 4


def test_random_scores_are_reproducible_and_l1_removes_the_smallest_filters():
    net = nn.Sequential(nn.Conv2d(1, 4, 1, bias=False), nn.ReLU(), nn.Conv2d(4, 3, 1))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([3.0, -0.5, 2.0, 0.1]).view(4, 1, 1, 1))
    assert torch.equal(random_filter_scores(net, 1)["2"], random_filter_scores(net, 1)["2"])
    assert not torch.equal(random_filter_scores(net, 1)["2"], random_filter_scores(net, 2)["2"])
    plan = prune_filters(net, torch.zeros(1, 1, 2, 2), l1_filter_scores(net), pruning_ratio=0.5, ignored_layers=["2"])
    assert plan.ops == [["0", True, [1, 3]]]
    assert net[0].weight.flatten().tolist() == [3.0, 2.0]


def test_round_to_keeps_multiples_of_eight_channels():
    net = nn.Sequential(nn.Conv2d(1, 40, 3), nn.ReLU(), nn.Conv2d(40, 20, 3), nn.ReLU(), nn.Conv2d(20, 4, 1))
    x = torch.zeros(1, 1, 8, 8)
    prune_filters(net, x, l1_filter_scores(net), pruning_ratio=0.3, round_to=8)
    assert (net[0].out_channels, net[2].out_channels) == (32, 16)  # 28 -> 32 and 14 -> 16
    with pytest.raises(ValueError, match="round_to"):
        L1FilterPruning(pruning_ratio=0.5, round_to=0)


def test_latency_and_macs_of_a_pruned_model():
    model, x = timm_resnet(), torch.zeros(8, 1, 16, 16)
    assert measure_latency(model, x, warmup=1, repeats=2) > 0
    assert model.training  # modes are restored
    macs, params = count_macs_params(model, x[:1])
    assert macs > 0 and params == sum(p.numel() for p in model.parameters())


# -- bad input --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, match", [
    ({"pruning_ratio": 0.0}, "pruning_ratio must be a finite number > 0 and < 1"),
    ({"pruning_ratio": 1.2}, "pruning_ratio must be a finite number > 0 and < 1"),
    ({"pruning_ratio": 1.0}, "pruning_ratio must be a finite number > 0 and < 1"),
    ({"macs_reduction": 1.0}, "macs_reduction must be a finite number > 0 and < 1"),
    ({"macs_reduction": -0.1}, "macs_reduction must be a finite number > 0 and < 1"),
    ({}, "exactly one"),
    ({"pruning_ratio": 0.5, "macs_reduction": 0.5}, "exactly one"),
    ({"macs_reduction": 0.5, "layer_pruning_ratios": {"net.0": 0.5}}, "layer_pruning_ratios"),
    ({"pruning_ratio": 0.5, "layer_pruning_ratios": {"net.0": 1.0}}, r"layer_pruning_ratios\['net.0'\].*>= 0 and < 1"),
    ({"pruning_ratio": 0.5, "num_steps": 0}, "num_steps"),
    ({"pruning_ratio": 0.5, "every_n_epochs": 0}, "every_n_epochs"),
    ({"pruning_ratio": 0.5, "ignored_layers": "net.0"}, "list of module names"),
])
def test_bad_arguments_are_refused_with_the_fix(kwargs, match):
    with pytest.raises(ValueError, match=match):
        L1FilterPruning(**kwargs)


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("cls", [L1FilterPruning, RandomFilterPruning, BetaRankPruning], ids=lambda c: c.__name__)
@pytest.mark.parametrize("kwargs, argument", [
    ({"pruning_ratio": NAN}, "pruning_ratio"),
    ({"pruning_ratio": INF}, "pruning_ratio"),
    ({"pruning_ratio": -0.2}, "pruning_ratio"),
    ({"macs_reduction": NAN}, "macs_reduction"),
    ({"macs_reduction": -INF}, "macs_reduction"),
    ({"pruning_ratio": 0.5, "layer_pruning_ratios": {"net.0": NAN}}, "layer_pruning_ratios"),
    ({"pruning_ratio": 0.5, "start_epoch": -1}, "start_epoch"),
    ({"pruning_ratio": 0.5, "every_n_epochs": INF}, "every_n_epochs"),
    ({"pruning_ratio": 0.5, "num_steps": 1.5}, "num_steps"),
    ({"pruning_ratio": 0.5, "calibration_batches": -3}, "calibration_batches"),
    ({"pruning_ratio": 0.5, "round_to": NAN}, "round_to"),
    ({"pruning_ratio": 0.5, "latency_batch_size": 0}, "latency_batch_size"),
    ({"pruning_ratio": 0.5, "latency_repeats": -1}, "latency_repeats"),
    ({"pruning_ratio": 0.5, "input_shape": [1, -8, 8]}, "input_shape"),
])
def test_nonfinite_negative_and_out_of_range_values_are_refused_naming_the_argument(cls, kwargs, argument):
    with pytest.raises(ValueError, match=argument) as info:
        cls(**kwargs)
    assert "\n" not in str(info.value)  # one line


def test_wrong_choices_and_values_of_the_subclasses_are_refused():
    with pytest.raises(ValueError, match="ratio_direction"):
        BetaRankPruning(pruning_ratio=0.5, ratio_direction="sideways")
    for eps in (NAN, INF, 0.0, -1e-6):
        with pytest.raises(ValueError, match="eps"):
            BetaRankPruning(pruning_ratio=0.5, eps=eps)
    with pytest.raises(ValueError, match="seed"):
        RandomFilterPruning(pruning_ratio=0.5, seed=NAN)


def test_a_missing_torch_pruning_fails_at_construction_with_the_install_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_pruning", None)  # what an install without the extra looks like
    for cls in (L1FilterPruning, RandomFilterPruning, BetaRankPruning):
        with pytest.raises(ModuleNotFoundError, match=f"{cls.__name__}.*pip install"):
            cls(pruning_ratio=0.5)


def test_the_base_callback_asks_subclasses_for_an_importance():
    with pytest.raises(NotImplementedError, match="must implement `filter_scores`"):
        FilterPruning(pruning_ratio=0.5).filter_scores(make_model(), None, None)


def test_a_target_that_would_leave_zero_channels_is_refused_and_changes_nothing():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))
    x = torch.zeros(1, 1, 8, 8)
    with pytest.raises(PruningError, match=r"'0' \(2 channels\) with zero channels.*ignored_layers"):
        prune_filters(net, x, l1_filter_scores(net), pruning_ratio=0.75)
    assert net[0].out_channels == 2 and net[2].out_channels == 8
    with pytest.raises(PruningError, match="cannot be reached.*zero channels"):
        prune_filters(net, x, l1_filter_scores(net), macs_reduction=0.99, ignored_layers=["2"])
    assert conv_shapes(net) == {"0": (1, 2), "2": (2, 8), "4": (8, 4)}
    with pytest.raises(PruningError, match="no prunable conv filters"):
        prune_filters(net, x, l1_filter_scores(net), pruning_ratio=0.5, ignored_layers=["0", "2"])


class HardCodedView(nn.Module):
    """Flattens with a hard-coded channel count: the dependency graph cannot see that ``c2``'s filters feed it."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 16, 3, padding=1), nn.Linear(1024, 10)

    def forward(self, x):
        x = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.fc(x.view(x.shape[0], 16 * 8 * 8))


def test_an_untraceable_model_names_the_layer_and_suggests_ignored_layers():
    model, x = HardCodedView(), torch.zeros(1, 1, 8, 8)
    with pytest.raises(PruningError, match=r"\['c2'\].*ignored_layers.*not changed"):
        prune_filters(model, x, l1_filter_scores(model), pruning_ratio=0.5)
    assert model.c1.out_channels == 8 and model.c2.out_channels == 16 and model.c2.in_channels == 8
    prune_filters(model, x, l1_filter_scores(model), pruning_ratio=0.5, ignored_layers=["c2"])  # the suggested fix
    assert model.c1.out_channels == 4 and model.c2.in_channels == 4 and model(x).shape == (1, 10)


def test_a_model_that_cannot_be_traced_at_all_names_the_failing_layer():
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(1, 4, 3), nn.Linear(5, 2)

        def forward(self, x):
            return self.fc(self.conv(x).flatten(1))

    with pytest.raises(PruningError, match=r"cannot trace Broken.*layer 'fc' \(Linear\).*ignored_layers"):
        prunable_filter_groups(Broken(), torch.zeros(1, 1, 5, 5))


def test_a_misspelt_layer_name_gets_close_names():
    model = make_model()
    with pytest.raises(PruningError, match="no such entry.*Close names: net.3"):
        prune_filters(model, torch.zeros(1, 1, 8, 8), l1_filter_scores(model), pruning_ratio=0.5,
                      ignored_layers=["net.33"])
    with pytest.raises(PruningError, match="not a Conv2d"):
        plan_filter_pruning(model, torch.zeros(1, 1, 8, 8), {}, pruning_ratio=0.5, layer_pruning_ratios={"net.1": 0.5})


def test_sharding_strategies_and_spawning_launchers_are_refused():
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    pruner = L1FilterPruning(pruning_ratio=0.5)
    for strategy in (FSDPStrategy(), DeepSpeedStrategy.__new__(DeepSpeedStrategy)):
        trainer = types.SimpleNamespace(strategy=strategy, max_epochs=3)
        with pytest.raises(PruningError, match=f"{type(strategy).__name__} shards them.*strategy='ddp'"):
            pruner.setup(trainer, make_model(), "fit")
    spawning = Trainer(strategy="ddp_spawn", devices=2, accelerator="cpu", logger=False)  # nothing spawned yet
    with pytest.raises(PruningError, match="ddp_spawn.*strategy='ddp'"):
        pruner.setup(spawning, make_model(), "fit")


# -- inside fit -------------------------------------------------------------------------------------------------


class Recorder(Callback):
    """Records, per epoch, the LR at the start, the mean training loss, and whether the optimizer holds exactly
    the model's parameters."""

    def __init__(self):
        self.lr, self.loss, self.optimizer_ok, self.start_params = [], [], [], []

    def on_train_epoch_start(self, trainer, pl_module):
        params = {id(p) for p in pl_module.parameters()}
        in_opt = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
        self.optimizer_ok.append(params == in_opt)
        self.lr.append(trainer.optimizers[0].param_groups[0]["lr"])
        self.start_params.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})

    def on_train_epoch_end(self, trainer, pl_module):
        self.loss.append(float(trainer.callback_metrics["train_loss_epoch"]))


def test_pruning_inside_fit_rebuilds_the_optimizer_and_the_schedule_continues(tmp_path):
    model, recorder = make_model(), Recorder()
    pruner = L1FilterPruning(pruning_ratio=0.5, start_epoch=1, latency_repeats=2, latency_batch_size=8)
    trainer = Trainer(max_epochs=4, callbacks=[pruner, recorder], accelerator="cpu", logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=str(tmp_path))
    trainer.fit(model, datamodule=make_dm())
    assert model.net[0].out_channels == 4 and model.net[3].out_channels == 8
    assert recorder.optimizer_ok == [True] * 4  # after the prune the optimizer holds the new tensors
    assert recorder.lr == pytest.approx([0.05, 0.025, 0.0125, 0.00625])  # StepLR went on where it was
    assert recorder.loss[3] < recorder.loss[1]  # the pruned network trains
    changed = [k for k, v in model.state_dict().items() if v.is_floating_point()
               and not torch.equal(v, recorder.start_params[2][k])]
    assert "net.0.weight" in changed and "net.8.weight" in changed
    for key in ("pruning/macs", "pruning/params", "pruning/macs_reduction", "pruning/latency_ms", "pruning/speedup"):
        assert key in trainer.callback_metrics, key
    assert float(trainer.callback_metrics["pruning/macs_reduction"]) > 0.6
    assert [p["step"] for p in pruner.curve] == [0, 1, 1, 1] and pruner.curve[1]["macs"] < pruner.curve[0]["macs"]
    assert (tmp_path / "L1FilterPruning_accuracy_vs_macs.png").stat().st_size > 1000


@pytest.mark.parametrize("make_pruner", [
    lambda: L1FilterPruning(pruning_ratio=0.5, start_epoch=1, num_steps=2, latency_repeats=0),
    lambda: RandomFilterPruning(macs_reduction=0.5, start_epoch=1, num_steps=2, seed=3, latency_repeats=0),
], ids=["l1", "random"])
def test_crash_and_resume_with_an_iterative_schedule_matches_the_uninterrupted_run(tmp_path, make_pruner):
    full, resumed, info = crash_and_resume(make_model, make_dm, lambda: [make_pruner()], max_epochs=3,
                                           crash_epoch=2, tmp_path=tmp_path)
    # steps at epochs 1 and 2: last.ckpt (end of epoch 1) holds one step, the resumed run replays it and takes step 2
    assert [s["epoch"] for s in info["resumed_callbacks"][0].steps] == [1, 2]
    assert_same_parameters(full, resumed)
    assert full.net[0].out_channels < 8
    # the checkpoint loads with weights_only=True into fresh models, for inference, with identical outputs
    ckpt = info["checkpoint"]
    torch.load(ckpt, weights_only=True)
    x = torch.randn(5, 1, 8, 8)
    fresh = load_pruned_checkpoint(make_model(), ckpt).eval()
    bare = load_pruned_checkpoint(small_cnn(), ckpt).eval()
    resumed.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), resumed(x))
        torch.testing.assert_close(bare(x), resumed(x))
    # testing a fresh model from the checkpoint through a Trainer replays the history before the weights load
    def test_acc(model, **kwargs):
        tester = Trainer(accelerator="cpu", callbacks=[make_pruner()], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(tmp_path))
        return tester.test(model, datamodule=make_dm(), verbose=False, **kwargs)[0]["test_acc"]

    assert test_acc(make_model(), ckpt_path=str(ckpt), weights_only=True) == pytest.approx(test_acc(resumed))
    # the same checkpoint cannot be replayed onto a model pruned further: removed channels cannot come back
    with pytest.raises(PruningError, match="already been pruned"):
        early = dict(torch.load(ckpt, weights_only=True))
        early["callbacks"] = {k: dict(v, steps=v["steps"][:1]) for k, v in early["callbacks"].items()
                              if isinstance(v, dict) and "steps" in v}
        torch.save(early, tmp_path / "early.ckpt")
        load_pruned_checkpoint(resumed, tmp_path / "early.ckpt")


# -- DDP --------------------------------------------------------------------------------------------------------

DDP_SCRIPT = """
import sys, torch
from lightning.pytorch import Trainer
from lightning_ext.compression.beta_rank_pruning import BetaRankPruning
from lightning_ext.compression.random_filter_pruning import RandomFilterPruning, random_filter_scores
from tests.test_filter_pruning import make_ddp_model, make_ddp_dm


class RankDependentScores(RandomFilterPruning):
    # each rank draws different scores: only the broadcast of rank 0's plan keeps the ranks identical
    def filter_scores(self, pl_module, inputs, trainer):
        return random_filter_scores(pl_module, seed=100 + trainer.global_rank)


model = make_ddp_model()
pruners = [BetaRankPruning(pruning_ratio=0.25, start_epoch=0, latency_repeats=0),
           RankDependentScores(pruning_ratio=0.25, start_epoch=1, latency_repeats=0)]
trainer = Trainer(callbacks=pruners, strategy="ddp", devices=2, accelerator="cpu", max_epochs=3, logger=False,
                  enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                  deterministic=True, default_root_dir=sys.argv[1])  # the plots land there, not in the cwd
trainer.fit(model, datamodule=make_ddp_dm(32))
torch.save({"state": model.state_dict(), "steps": [p.steps for p in pruners]},
           sys.argv[1] + f"/rank{trainer.global_rank}.pt")
"""


def make_ddp_model():
    torch.manual_seed(0)  # no BatchNorm: one process and two processes train identically
    net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    return ImageClassifier(net, num_classes=10, image_size=8, lr=0.01)


def make_ddp_dm(batch_size):
    return DigitsDataModule(batch_size=batch_size, drop_last=True)


@pytest.mark.ddp
def test_two_process_ddp_prunes_identically_on_both_ranks(tmp_path):
    from lightning_ext.compression.beta_rank_pruning import BetaRankPruning

    script = tmp_path / "ddp_prune.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0["steps"] == rank1["steps"]  # the same plan on both ranks, even from rank-dependent scores
    assert [len(s) for s in rank0["steps"]] == [1, 1]
    for key, value in rank0["state"].items():  # gradients still synchronised after the re-wrap
        torch.testing.assert_close(rank1["state"][key], value, atol=0, rtol=0)
    assert rank0["state"]["net.0.weight"].shape[0] == 9  # 16 -> 12 -> 9
    # Beta-Rank statistics are reduced over the ranks: the plan is that of one process seeing the global batch
    single = BetaRankPruning(pruning_ratio=0.25, start_epoch=0, latency_repeats=0)
    Trainer(callbacks=[single], accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=1, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            limit_val_batches=0).fit(make_ddp_model(), datamodule=make_ddp_dm(64))
    assert single.steps[0]["ops"] == rank0["steps"][0][0]["ops"]
