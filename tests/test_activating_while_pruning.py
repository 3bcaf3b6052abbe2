"""ActivatingWhilePruning (AP): DNR, the AP step, masks through optimisation, ModelPruning, structured pruning,
resume and DDP."""

from __future__ import annotations

import types
import warnings

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelPruning
from torch import nn

from lightning_ext.compression import apply_pruning_history, recorded_channel_changes
from lightning_ext.compression.activating_while_pruning import ActivatingWhilePruning
from lightning_ext.compression.ap import ap_prune_step, dead_neuron_rate, kept_slices, model_cost
from lightning_ext.datamodules import DigitsDataModule
from lightning_ext.modules import ImageClassifier
from lightning_ext.testing import assert_same_parameters, crash_and_resume, fit_ddp_vs_single

# -- helpers ------------------------------------------------------------------------------------------------------


def _mlp_model(seed: int = 0, optimizer=None, hidden: int = 32) -> ImageClassifier:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))
    return ImageClassifier(net, num_classes=10, image_size=8, lr=0.01, optimizer=optimizer)


def _sgd_momentum(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-3)


def _dm(batch_size: int = 64, train_fraction: float = 0.5) -> DigitsDataModule:
    return DigitsDataModule(batch_size=batch_size, train_fraction=train_fraction)


def _trainer(callbacks, max_epochs: int, **kwargs) -> Trainer:
    base = dict(accelerator="cpu", devices=1, max_epochs=max_epochs, logger=False, enable_progress_bar=False,
                enable_model_summary=False, enable_checkpointing=False, deterministic=True)
    base.update(kwargs)
    return Trainer(callbacks=callbacks, **base)


def _linears(module: nn.Module) -> list[nn.Linear]:
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


class ZeroSmallest(Callback):
    """Test base pruner: at the end of the listed epochs, zero the `amount` smallest surviving Linear weights.

    It keeps no masks of its own (so without AP, training revives the zeros) and no state (so it resumes exactly).
    """

    def __init__(self, amount: float, epochs: tuple[int, ...]):
        self.amount, self.epochs = amount, set(epochs)

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch not in self.epochs:
            return
        weights = [m.weight for m in _linears(pl_module)]
        alive = torch.cat([w.detach().abs().flatten()[w.detach().flatten() != 0] for w in weights])
        threshold = alive.kthvalue(int(round(self.amount * alive.numel()))).values
        with torch.no_grad():
            for w in weights:
                w[w.abs() <= threshold] = 0.0


class ShrinkHidden(Callback):
    """Test structured pruner: at the end of `epoch`, physically remove the `n` hidden units of `net.1` with the
    smallest L1 norm (the rows of net.1 and the columns of net.3), then rebuild the optimizer. With `record`, it
    goes through the library's engine (`apply_pruning_history`, which records the step); without, it calls
    Torch-Pruning directly (no recorded step)."""

    def __init__(self, n: int, epoch: int, record: bool = True):
        self.n, self.epoch, self.record = n, epoch, record

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch != self.epoch:
            return
        fc = pl_module.net[1]
        idxs = fc.weight.detach().abs().sum(dim=1).argsort()[: self.n].tolist()
        if self.record:
            apply_pruning_history(pl_module.net, [["1", True, idxs]], torch.zeros(1, 1, 8, 8))
        else:
            import torch_pruning as tp

            with torch.enable_grad():
                graph = tp.DependencyGraph().build_dependency(pl_module.net, example_inputs=torch.zeros(1, 1, 8, 8))
            graph.get_pruning_group(fc, tp.prune_linear_out_channels, idxs=idxs).prune()
        trainer.strategy.setup_optimizers(trainer)


# -- dead-neuron rate ---------------------------------------------------------------------------------------------


def test_dead_neuron_rate_on_a_hand_made_network():
    net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2), nn.ReLU())
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]))
        net[0].bias.zero_()
        net[2].weight.copy_(torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]]))
        net[2].bias.copy_(torch.tensor([0.0, 0.5]))
    x = torch.tensor([[1.0, 2.0], [-1.0, -1.0]])
    # layer 1 pre-activations: [1, 2, -3] and [-1, -1, 2] -> dead 1 + 2 = 3 of 6
    # layer 2 inputs [1, 2, 0] and [0, 0, 2]: pre-activations [3, -2.5] and [2, -1.5] -> dead 2 of 4
    net.train()
    assert dead_neuron_rate(net, x) == pytest.approx(5 / 10)
    assert dead_neuron_rate(net, x, per_layer=True) == pytest.approx({"1": 3 / 6, "3": 2 / 4})
    assert net.training, "the training mode must be restored"
    assert dead_neuron_rate(net, x, modules=[net[3]]) == pytest.approx(0.5)


def test_dead_neuron_rate_counts_conv_feature_maps_and_refuses_models_without_relu_modules():
    conv = nn.Sequential(nn.Conv2d(1, 2, 1, bias=False), nn.ReLU())
    with torch.no_grad():
        conv[0].weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
    x = torch.tensor([[[[1.0, -1.0], [2.0, 0.0]]]])  # channel 0 dead at 2 of 4 positions, channel 1 at 3 of 4
    assert dead_neuron_rate(conv, x) == pytest.approx(5 / 8)
    with pytest.raises(ValueError, match="no nn.ReLU"):
        dead_neuron_rate(nn.Sequential(nn.Linear(2, 2)), torch.zeros(1, 2))


# -- the AP step --------------------------------------------------------------------------------------------------


def _brute_force_ap(start, end, masks, k):
    candidates = []
    for order, name in enumerate(masks):
        for i in range(masks[name].numel()):
            if masks[name].flatten()[i] and end[name].flatten()[i] < 0:
                score = abs(float(end[name].flatten()[i]) - float(start[name].flatten()[i]))
                candidates.append((score, order, i, name))
    return {(name, i) for _, _, i, name in sorted(candidates)[:k]}


def test_ap_step_removes_exactly_q_of_the_survivors_among_negatives_with_the_smallest_movement():
    g = torch.Generator().manual_seed(0)
    start = {"a": torch.randn(20, 10, generator=g), "b": torch.randn(4, 3, 3, 3, generator=g)}
    end = {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in start.items()}
    masks = {k: torch.rand(v.shape, generator=g) > 0.3 for k, v in start.items()}
    alive = sum(int(m.sum()) for m in masks.values())
    q = 0.1
    new = ap_prune_step(start, end, masks, q)
    removed = {(n, i) for n in masks for i in torch.nonzero(masks[n].flatten() & ~new[n].flatten()).flatten().tolist()}
    assert len(removed) == round(q * alive)
    assert removed == _brute_force_ap(start, end, masks, round(q * alive))
    for n in masks:
        assert not bool((new[n] & ~masks[n]).any()), "AP must never revive a pruned weight"
        assert bool((end[n][masks[n] & ~new[n]] < 0).all()), "AP removes negative weights only"
    # the inputs are not modified
    assert sum(int(m.sum()) for m in masks.values()) == alive


def _official_prune_by_percentile_ap(current: dict, prev: dict, num_ap: int) -> dict:
    """Independent numpy re-implementation of the reference code's ``prune_by_percentile_ap``
    (Martin1937/Activate-While-Pruning, resnet_20.py) on the tensors it receives: ``current`` = the weights after
    the base pruner (zeros = pruned), ``prev`` = the weights at the start of the cycle. It gathers the non-zero
    current weights and their start values over all tensors, takes the negative ones, sets the threshold to the
    sorted movement at position ``num_ap`` and zeroes every negative weight whose movement is <= it."""
    import numpy as np

    cur = np.concatenate([current[n].numpy()[current[n].numpy() != 0] for n in current])
    old = np.concatenate([prev[n].numpy()[current[n].numpy() != 0] for n in current])
    neg = cur < 0
    threshold = np.sort(np.abs(cur[neg] - old[neg]))[num_ap]
    out = {}
    for n in current:
        c, p = current[n].numpy(), prev[n].numpy()
        out[n] = torch.from_numpy(np.where((np.abs(c - p) <= threshold) & (c < 0), 0, c != 0).astype(bool))
    return out


def test_ap_step_matches_the_official_prune_by_percentile_ap_on_one_batch_of_weights():
    """One pruning event on continuous weights (no ties): the reference code's threshold at sorted index num_ap
    removes num_ap + 1 weights, so our exact top-k with k = num_ap + 1 must give the same masks. The reference
    budget is num_ap = int(q * alive before the base pruner); the callback's k = round(q * alive) (documented)."""
    g = torch.Generator().manual_seed(1)
    start = {"fc1": torch.randn(30, 16, generator=g), "conv": torch.randn(6, 3, 3, 3, generator=g),
             "fc2": torch.randn(10, 30, generator=g)}
    trained = {n: w + 0.2 * torch.randn(w.shape, generator=g) for n, w in start.items()}
    alive_before = sum(w.numel() for w in trained.values())
    # the base pruner: global magnitude, p - q = 18% of the surviving weights
    flat = torch.cat([w.abs().flatten() for w in trained.values()])
    cut = torch.sort(flat).values[int(0.18 * flat.numel())]
    current = {n: torch.where(w.abs() < cut, torch.zeros_like(w), w) for n, w in trained.items()}
    num_ap = int(alive_before * 0.02)  # the reference code's budget
    official = _official_prune_by_percentile_ap(current, start, num_ap)
    ours = ap_prune_step(start, current, {n: w != 0 for n, w in current.items()}, num_ap + 1)
    for n in current:
        assert torch.equal(ours[n], official[n]), n
    removed = sum(int(((current[n] != 0) & ~ours[n]).sum()) for n in current)
    assert removed == num_ap + 1


def test_ap_step_breaks_ties_deterministically_by_layer_then_index_never_by_threshold():
    # 6 negative weights with exactly zero movement (e.g. weights on constant-zero inputs): a `<=` threshold at the
    # k-th score would remove all 6; top-k removes exactly k, the first ones in (layer, flat index) order.
    start = {"a": torch.tensor([-1.0, -1.0, 2.0, -1.0]), "b": torch.tensor([-1.0, -1.0, -1.0, -5.0])}
    end = {"a": torch.tensor([-1.0, -1.0, 2.0, -1.0]), "b": torch.tensor([-1.0, -1.0, -1.0, -4.0])}
    masks = {"a": torch.ones(4, dtype=torch.bool), "b": torch.ones(4, dtype=torch.bool)}
    for _ in range(3):
        new = ap_prune_step(start, end, masks, 4)
        assert new["a"].tolist() == [False, False, True, False]
        assert new["b"].tolist() == [False, True, True, True]
    assert ap_prune_step(start, end, masks, 0.25)["a"].tolist() == [False, False, True, True]  # round(0.25 * 8) = 2


def test_ap_step_warns_when_there_are_too_few_negative_survivors_and_checks_its_inputs():
    start = {"w": torch.tensor([1.0, -1.0, 1.0])}
    end = {"w": torch.tensor([1.0, -2.0, 1.0])}
    masks = {"w": torch.ones(3, dtype=torch.bool)}
    with pytest.warns(UserWarning, match="only 1 surviving weights are negative"):
        assert ap_prune_step(start, end, masks, 2)["w"].tolist() == [True, False, True]
    with pytest.raises(ValueError, match="same keys"):
        ap_prune_step(start, end, {"v": masks["w"]}, 1)
    with pytest.raises(ValueError, match="shapes differ"):
        ap_prune_step({"w": torch.zeros(4)}, end, masks, 1)
    for bad in (0.0, 1.0, 1.5, -0.2, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="amount"):
            ap_prune_step(start, end, masks, bad)
    with pytest.raises(ValueError, match="amount"):
        ap_prune_step(start, end, masks, -1)


def test_kept_slices_are_read_from_the_recorded_pruning_steps():
    """Which rows/columns of each layer survived comes from the recorded steps, not from the weight values: two
    steps on a network whose weights are all equal (matching values could not tell the slices apart)."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(0.5)
    old = {"1": net[1].weight.detach().clone(), "3": net[3].weight.detach().clone()}
    shapes = {k: v.shape for k, v in old.items()}
    apply_pruning_history(net, [["1", True, [0, 5]]], torch.zeros(1, 6))
    apply_pruning_history(net, [["1", True, [1, 4]]], torch.zeros(1, 6))  # numbering after the first step
    changes = recorded_channel_changes(net)
    assert changes == [{"1": {0: [0, 5]}, "3": {1: [0, 5]}}, {"1": {0: [1, 4]}, "3": {1: [1, 4]}}]
    rows = kept_slices(shapes["1"], changes, "1")
    cols = kept_slices(shapes["3"], changes, "3")
    assert rows[0].tolist() == [1, 3, 4, 7] and rows[1].tolist() == list(range(6))
    assert cols[0].tolist() == [0, 1, 2] and cols[1].tolist() == [1, 3, 4, 7]
    assert net[1].weight.shape == (4, 6) and net[3].weight.shape == (3, 4)
    # names are relative to the model asked: a wrapper sees its submodule's records with the prefix
    wrapper = nn.Module()
    wrapper.net = net
    assert list(recorded_channel_changes(wrapper)[0]) == ["net.1", "net.3"]
    assert kept_slices((4, 6), [{"1": {0: [7]}}], "1") is None  # a record that does not fit the shape


def test_model_cost_counts_params_macs_and_nonzero_weights():
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))
    with torch.no_grad():
        net[0].weight[:2] = 0.0
    cost = model_cost(net, torch.zeros(5, 1, 8, 8), latency_repeats=2)
    assert cost["params"] == 4 * 9 + 4 + 256 * 10 + 10
    # one sample, Torch-Pruning's convention: conv (+ bias per output element), ReLU per element, linear (+ bias)
    conv, relu, linear = 4 * 64 * 9 + 4 * 64, 4 * 64, 256 * 10 + 10
    assert cost["macs"] == conv + relu + linear
    assert cost["macs_nonzero"] == pytest.approx(conv / 2 + relu + linear)  # half of the conv's weights are zero
    assert cost["params_nonzero"] == cost["params"] - 18
    assert cost["latency_ms"] > 0


# -- arguments ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, match", [
    (dict(pruning_ratio=0.0), "pruning_ratio must be a finite number > 0 and < 1"),
    (dict(pruning_ratio=1.0), "pruning_ratio must be a finite number > 0 and < 1"),
    (dict(pruning_ratio=-0.1), "pruning_ratio must be a finite number > 0 and < 1"),
    (dict(pruning_ratio=2), "pruning_ratio must be a finite number > 0 and < 1"),
    (dict(pruning_ratio=float("nan")), "pruning_ratio must be a finite number"),
    (dict(pruning_ratio=float("inf")), "pruning_ratio must be a finite number"),
    (dict(pruning_ratio=0.2, cycle_pruning_ratio=0.2), "must be smaller than `cycle_pruning_ratio`"),
    (dict(pruning_ratio=0.3, cycle_pruning_ratio=0.2), "must be smaller than `cycle_pruning_ratio`"),
    (dict(pruning_ratio=0.02, cycle_pruning_ratio=1.2), "cycle_pruning_ratio must be a finite number"),
    (dict(pruning_ratio=0.02, cycle_pruning_ratio=float("nan")), "cycle_pruning_ratio must be a finite number"),
    (dict(probe_size=float("inf")), "probe_size"),
    (dict(probe_size=2.5), "probe_size"),
    (dict(latency_repeats=float("nan")), "latency_repeats"),
    (dict(layers=[]), "`layers` is empty"),
    (dict(probe_size=-1), "probe_size"),
    (dict(latency_repeats=-2), "latency_repeats"),
])
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        ActivatingWhilePruning(**kwargs)
    assert "\n" not in str(info.value)


def test_a_missing_torch_pruning_fails_at_construction_with_the_install_line(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torch_pruning", None)
    with pytest.raises(ModuleNotFoundError, match="ActivatingWhilePruning.*pip install"):
        ActivatingWhilePruning()


def test_unknown_layer_names_and_sharded_strategies_are_refused_in_setup():
    model = _mlp_model()
    with pytest.raises(ValueError, match=r"net\.7.*Prunable modules: \['net.1', 'net.3'\]"):
        _trainer([ActivatingWhilePruning(layers=["net.7"])], 1, fast_dev_run=1).fit(model, datamodule=_dm())
    with pytest.raises(ValueError, match="no layer to prune"):
        _trainer([ActivatingWhilePruning(ignored_layers=["net.*"])], 1, fast_dev_run=1).fit(model, datamodule=_dm())

    class FSDPStrategy:  # stands in for Lightning's: only the class name is inspected
        pass

    with pytest.raises(RuntimeError, match="does not support FSDPStrategy"):
        ActivatingWhilePruning().setup(types.SimpleNamespace(strategy=FSDPStrategy()), model, "fit")


# -- masks through optimisation -----------------------------------------------------------------------------------


def test_pruned_weights_stay_zero_through_momentum_and_weight_decay_and_only_with_ap():
    def run(with_ap: bool):
        model = _mlp_model(optimizer=_sgd_momentum)
        ap = ActivatingWhilePruning(pruning_ratio=0.05, probe_size=64, latency_repeats=0)
        trainer = _trainer([ZeroSmallest(0.5, epochs=(0,)), *([ap] if with_ap else [])], max_epochs=3)
        trainer.fit(model, datamodule=_dm())
        return model, ap, trainer

    model, ap, trainer = run(with_ap=True)
    assert len(ap.history) == 1
    event = ap.history[0]
    total = sum(m.weight.numel() for m in _linears(model))
    assert event["ap_pruned"] == event["ap_requested"] == round(0.05 * total)
    for name, module in (("net.1", model.net[1]), ("net.3", model.net[3])):
        mask = ap._alive_ref[name]
        assert torch.count_nonzero(module.weight[~mask]) == 0, "a pruned weight came back"
        state = trainer.optimizers[0].state[module.weight]
        assert torch.count_nonzero(state["momentum_buffer"][~mask]) == 0, "momentum of pruned weights not masked"
    zeros = sum(int((m.weight == 0).sum()) for m in _linears(model))
    assert zeros == total - int(event["alive"])

    # the control: the same base pruner without AP (nobody keeps the masks) sees its zeros revived
    control, _, _ = run(with_ap=False)
    assert sum(int((m.weight == 0).sum()) for m in _linears(control)) < total * 0.05


def test_works_with_lightnings_model_pruning(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    model = _mlp_model()
    pruner = ModelPruning("l1_unstructured", amount=0.18, parameter_names=["weight"],
                          use_lottery_ticket_hypothesis=False, make_pruning_permanent=False)
    # listed first: AP does not depend on the order
    ap = ActivatingWhilePruning(pruning_ratio=0.02, cycle_pruning_ratio=0.2, probe_size=128)
    trainer = _trainer([ap, pruner], max_epochs=3, logger=CSVLogger(str(tmp_path), name="", version=""))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, datamodule=_dm())
    # the measured base share matches p - q, and nothing was skipped: AP has nothing to warn about
    assert not [w for w in caught if "ActivatingWhilePruning" in str(w.message)]
    assert len(ap.history) == 3  # pruned after epochs 0 and 1 (seen at the next epoch) and 2 (seen at train end)
    total = sum(m.weight_mask.numel() for m in _linears(model))
    alive = total
    for event in ap.history:
        assert event["base_fraction"] == pytest.approx(0.18, abs=0.002)
        assert event["ap_pruned"] == event["ap_requested"] == round(0.02 * alive)
        alive = event["alive"]
        assert {"params", "params_nonzero", "macs", "macs_nonzero", "latency_ms", "dnr"} <= event.keys()
    assert alive == pytest.approx(total * 0.8 ** 3, abs=3)
    # AP wrote into ModelPruning's masks, so the masks are the single source of truth
    assert sum(int(m.weight_mask.sum()) for m in _linears(model)) == alive
    assert 0.0 < float(trainer.callback_metrics["ap/dnr"]) < 1.0
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"ap/dnr", "ap/params", "ap/macs", "ap/latency_ms", "ap/sparsity"} <= set(header)


def test_works_with_a_structured_pruner_that_shrinks_layers():
    model = _mlp_model(hidden=32)
    ap = ActivatingWhilePruning(pruning_ratio=0.05, probe_size=64, latency_repeats=1)
    callbacks = [ZeroSmallest(0.2, epochs=(0,)), ShrinkHidden(8, epoch=1), ap]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trainer(callbacks, max_epochs=3).fit(model, datamodule=_dm())
    assert not [w for w in caught if "ActivatingWhilePruning" in str(w.message)]
    assert model.net[1].weight.shape == (24, 64) and model.net[3].weight.shape == (10, 24)
    first, second = ap.history
    assert second["params"] == first["params"] - 8 * 64 - 8 - 8 * 10
    assert second["macs"] < first["macs"]
    # AP's share after the shrink is q of the survivors at the cycle's start, taken from the shrunk layers
    assert second["ap_pruned"] == second["ap_requested"] == round(0.05 * first["alive"])
    for name, module in (("net.1", model.net[1]), ("net.3", model.net[3])):
        mask = ap._alive_ref[name]
        assert mask.shape == module.weight.shape
        assert torch.count_nonzero(module.weight[~mask]) == 0
    assert int(sum((~m).sum() for m in ap._alive_ref.values())) == 24 * 64 + 10 * 24 - second["alive"]


def test_a_layer_shrunk_without_a_recorded_step_is_skipped_with_a_warning():
    """Raw Torch-Pruning calls leave no recorded step: AP cannot tell which slices survived, so it skips the
    shrunk layers for that cycle (it never guesses from weight values)."""
    model = _mlp_model(hidden=32)
    ap = ActivatingWhilePruning(pruning_ratio=0.05, probe_size=0, latency_repeats=0)
    callbacks = [ZeroSmallest(0.2, epochs=(0,)), ShrinkHidden(8, epoch=1, record=False), ap]
    with pytest.warns(UserWarning, match=r"no consistent start/end weights for \['net.1', 'net.3'\].*recorded"):
        _trainer(callbacks, max_epochs=3).fit(model, datamodule=_dm())
    assert model.net[1].weight.shape == (24, 64)
    assert ap.history[1]["ap_pruned"] == 0 < ap.history[0]["ap_pruned"]


# -- resume and DDP -----------------------------------------------------------------------------------------------


def test_crash_and_resume_matches_the_uninterrupted_run(tmp_path):
    def callbacks():
        return [ZeroSmallest(0.3, epochs=(0, 1, 2)),
                ActivatingWhilePruning(pruning_ratio=0.03, probe_size=64, latency_repeats=0)]

    full, resumed, info = crash_and_resume(lambda: _mlp_model(optimizer=_sgd_momentum), _dm, callbacks,
                                           max_epochs=4, crash_epoch=2, tmp_path=tmp_path)
    assert_same_parameters(full, resumed)
    ap_full, ap_resumed = info["full_callbacks"][1], info["resumed_callbacks"][1]
    assert len(ap_full.history) == 3
    assert [h["alive"] for h in ap_full.history] == [h["alive"] for h in ap_resumed.history]
    for name in ap_full._alive_ref:
        assert torch.equal(ap_full._alive_ref[name], ap_resumed._alive_ref[name])
    # the checkpoint loads with weights_only=True
    state = torch.load(info["checkpoint"], weights_only=True, map_location="cpu")
    assert any(k.startswith("ActivatingWhilePruning") for k in state["callbacks"])


@pytest.mark.ddp
def test_ddp_matches_a_single_process(tmp_path):
    def make_model():
        return _mlp_model(optimizer=_sgd_momentum)

    # prunes after epoch 0 (AP acts at the next epoch's first batch) and after epoch 1 (AP acts at train end)
    callbacks = [ZeroSmallest(0.3, epochs=(0, 1)),
                 ActivatingWhilePruning(pruning_ratio=0.03, probe_size=64, latency_repeats=0)]
    single, ddp = fit_ddp_vs_single(make_model, lambda bs: DigitsDataModule(batch_size=bs, drop_last=True), 64,
                                    tmp_path, test=False, max_epochs=2, callbacks=callbacks)
    for key in single.state_dict:
        torch.testing.assert_close(single.state_dict[key], ddp.state_dict[key], atol=1e-4, rtol=1e-3)
    for key in ("net.1.weight", "net.3.weight"):
        assert torch.equal(single.state_dict[key] == 0, ddp.state_dict[key] == 0), "masks differ between runs"
    zeros = sum(int((single.state_dict[k] == 0).sum()) for k in ("net.1.weight", "net.3.weight"))
    # 1 - 0.7 * 0.97 after the first cycle, then again: about 54% of the weights are zero
    assert zeros > 0.5 * (64 * 32 + 32 * 10)


# -- with the library's physical filter pruner --------------------------------------------------------------------


def _cnn_model() -> ImageClassifier:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    return ImageClassifier(net, num_classes=10, image_size=8, lr=0.01)


def test_crash_and_resume_on_top_of_l1_filter_pruning(tmp_path):
    l1 = pytest.importorskip("lightning_ext.compression.l1_filter_pruning")

    def callbacks():
        return [l1.L1FilterPruning(pruning_ratio=0.5, start_epoch=1, every_n_epochs=1, num_steps=2,
                                   ignored_layers=["net.8"], latency_repeats=0, plot_path=None, verbose=False),
                ActivatingWhilePruning(pruning_ratio=0.02, probe_size=32, latency_repeats=0, verbose=False)]

    # steps at the start of epochs 1 and 2; the crash comes before the second, which then runs after the resume
    full, resumed, info = crash_and_resume(_cnn_model, lambda: _dm(train_fraction=0.25), callbacks, max_epochs=3,
                                           crash_epoch=2, tmp_path=tmp_path, limit_val_batches=1)
    assert full.net[0].weight.shape[0] == 4 and full.net[3].weight.shape[0] == 8  # 50% of the filters removed
    assert_same_parameters(full, resumed)
    ap_full, ap_resumed = info["full_callbacks"][1], info["resumed_callbacks"][1]
    assert len(ap_full.history) == 2
    assert [h["ap_pruned"] for h in ap_full.history] == [h["ap_pruned"] for h in ap_resumed.history]
    assert all(h["ap_pruned"] == h["ap_requested"] > 0 for h in ap_full.history)  # never skipped after a shrink
    for name, module in (("net.0", full.net[0]), ("net.3", full.net[3]), ("net.8", full.net[8])):
        mask = ap_full._alive_ref[name]
        assert mask.shape == module.weight.shape and torch.count_nonzero(module.weight[~mask]) == 0
