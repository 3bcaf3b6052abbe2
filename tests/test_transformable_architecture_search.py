"""TAS: channel-wise interpolation, the Gumbel-mixed forward, E[MACs] and the cost loss against the paper's equations
(written out here), the search reaching its target, the physical pruning, bad inputs, strategies and resume."""

import math

import pytest
import torch
from lightning.pytorch import Trainer
from torch import nn
from torch.nn import functional as F

from lightning_ext.compression.graph import PruningError
from lightning_ext.compression.tas import (
    WidthSearch,
    arch_optimizer_for,
    arch_step,
    channel_wise_interpolation,
    gumbel_select2,
    tas_flops_loss,
    tau_at,
)
from lightning_ext.compression.transformable_architecture_search import TransformableArchitectureSearch
from lightning_ext.core.measure import count_macs_params
from lightning_ext.datamodules import DigitsDataModule
from lightning_ext.modules import ImageClassifier
from lightning_ext.testing import assert_same_parameters, crash_and_resume


def reference_interpolation(x, out_channels):
    """The paper's channel-wise interpolation written out: output channel k averages the input channels
    floor(k C / c) .. ceil((k + 1) C / c) - 1."""
    n, c, h, w = x.shape
    if c == out_channels:
        return x
    out = torch.zeros(n, out_channels, h, w, dtype=x.dtype)
    for k in range(out_channels):
        lo, hi = math.floor(k * c / out_channels), math.ceil((k + 1) * c / out_channels)
        out[:, k] = x[:, lo:hi].mean(1)
    return out


@pytest.mark.parametrize("c, out", [(3, 5), (5, 3), (7, 7), (4, 9), (9, 4), (1, 3)])
def test_channel_wise_interpolation_matches_the_window_average(c, out):
    x = torch.randn(2, c, 3, 4, generator=torch.Generator().manual_seed(c * 10 + out))
    torch.testing.assert_close(channel_wise_interpolation(x, out), reference_interpolation(x, out))


def make_net(bias=False, bn=True):
    torch.manual_seed(0)
    layers = [nn.Conv2d(2, 10, 3, padding=1, bias=bias)]
    layers += [nn.BatchNorm2d(10)] if bn else []
    layers += [nn.ReLU(), nn.Conv2d(10, 16, 3, padding=1, bias=bias)]
    layers += [nn.BatchNorm2d(16)] if bn else []
    layers += [nn.ReLU(), nn.Flatten(), nn.Linear(16 * 6 * 6, 5, bias=bias)]
    return nn.Sequential(*layers)


def test_the_mixed_forward_matches_the_reference_search_forward():
    """One batch through the hooked network vs the reference code's ConvBNReLU search forward written out: the conv
    on zero-filled inputs, both sampled widths sliced and normalised, interpolated to the larger width, mixed with
    the two weights, ReLU, the next conv on the zero-filled mixture."""
    net = make_net(bias=True)
    net.eval()  # fixed BN statistics, so the reference may normalise each slice on its own
    x = torch.randn(4, 2, 6, 6)
    search = WidthSearch(net, torch.zeros(1, 2, 6, 6), seed=3)
    search.attach()
    sel = {"0": (torch.tensor([5, 1]), torch.tensor([0.3, 0.7])), "3": (torch.tensor([0, 6]), torch.tensor([0.6, 0.4]))}
    search._selection = sel
    got = net(x)
    search.detach()  # the reference below runs the plain layers

    def block(inp, conv, bn, index, weight, choices):
        filled = torch.cat([inp, inp.new_zeros(inp.shape[0], conv.in_channels - inp.shape[1], *inp.shape[2:])], 1)
        y = conv(filled)
        outs = [bn(y)[:, :choices[int(i)]] for i in index]  # BN is per channel: normalising a slice is slicing
        top = max(o.shape[1] for o in outs)
        return F.relu(weight[0] * reference_interpolation(outs[0], top) + weight[1] * reference_interpolation(outs[1], top))

    h = block(x, net[0], net[1], *sel["0"], search.choices["0"])
    h = block(h, net[3], net[4], *sel["3"], search.choices["3"])
    h = torch.cat([h, h.new_zeros(h.shape[0], 16 - h.shape[1], 6, 6)], 1)
    torch.testing.assert_close(got, net[7](net[6](h)))


def test_expected_macs_and_the_cost_loss_match_the_papers_equations():
    """E[FLOPs] = sum over layers of k^2 HW E[C_in] E[C_out] (+ the classifier's E[C] x classes), E[C] = sum_j p_j c_j
    with p = softmax(alpha); the loss is log E if the argmax architecture is above the target, -log E below it by
    more than the tolerance, else 0 (reference code's get_flop_loss, target and tolerance as shares of the dense)."""
    net = make_net(bias=False, bn=False)
    net = nn.Sequential(net[0], net[2], net[4], net[5])  # convs and the classifier only: the reference counts those
    search = WidthSearch(net, torch.zeros(1, 2, 6, 6), seed=1)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for a in search.logits:
            a.copy_(torch.randn(a.shape, generator=g))
    alphas = [a.detach().clone().requires_grad_(True) for a in search.logits]
    c0, c1 = (torch.tensor(search.choices[k], dtype=torch.float64) for k in ("0", "1"))
    e0, e1 = ((F.softmax(a.double(), 0) * c).sum() for a, c in zip(alphas, (c0, c1)))
    ref = 36 * 9 * 2 * e0 + 36 * 9 * e0 * e1 + 36 * e1 * 5
    dense = 36 * 9 * 2 * 10 + 36 * 9 * 10 * 16 + 36 * 16 * 5
    assert search.dense_macs == dense
    got = search.expected_macs()
    torch.testing.assert_close(got, ref.detach())
    w0, w1 = (search.choices[k][int(torch.argmax(a))] for k, a in zip(("0", "1"), alphas))
    current = 36 * 9 * 2 * w0 + 36 * 9 * w0 * w1 + 36 * w1 * 5
    assert search.current_macs() == pytest.approx(current)
    for share, tol in ((0.9, 0.05), (0.2, 0.05), (current / dense + 0.01, 0.05)):
        target, tolerance = share * dense, tol * dense
        if current < target - tolerance:
            ref_loss = -torch.log(ref)
        elif current > target:
            ref_loss = torch.log(ref)
        else:
            ref_loss = ref * 0
        loss = tas_flops_loss(search.expected_macs(), search.current_macs(), target, tolerance)
        torch.testing.assert_close(loss, ref_loss.detach())
        if bool(ref_loss != 0):  # the gradients the architecture step follows
            ours = torch.autograd.grad(loss, list(search.logits))
            theirs = torch.autograd.grad(ref_loss, alphas, retain_graph=True)
            for a, b in zip(ours, theirs):
                torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-9)
    checked = [(share, current < (share - 0.05) * dense, current > share * dense) for share in (0.9, 0.2)]
    assert checked[0][1] and checked[1][2]  # both signs of the loss were exercised


def test_cost_model_is_exact_for_the_pruned_network():
    net = make_net(bias=True)
    x = torch.zeros(1, 2, 6, 6)
    search = WidthSearch(net, x)
    widths = {"0": 4, "3": 9}
    predicted = search.macs_of(widths)
    with torch.no_grad():
        search.logits[0].zero_()[search.choices["0"].index(4)] = 5
        search.logits[1].zero_()[search.choices["3"].index(9)] = 5
    assert search.widths() == widths
    search.prune(net, x)
    assert (net[0].out_channels, net[1].num_features, net[3].in_channels, net[3].out_channels,
            net[4].num_features, net[7].in_features) == (4, 4, 4, 9, 9, 9 * 36)
    assert count_macs_params(net, x)[0] == pytest.approx(predicted, abs=0.5)


def test_gumbel_select2_draws_two_distinct_candidates_with_differentiable_weights():
    logits = torch.tensor([0.0, 0.0, 8.0, 0.0, 7.5], requires_grad=True)
    index, weight = gumbel_select2(logits, 0.1, torch.Generator().manual_seed(0))
    assert index.shape == (2,) and index[0] != index[1] and weight.sum().item() == pytest.approx(1.0)
    weight[0].backward()
    assert logits.grad.abs().sum() > 0
    draws = [tuple(sorted(gumbel_select2(logits.detach(), 1.0, torch.Generator().manual_seed(s))[0].tolist()))
             for s in range(40)]
    assert max(set(draws), key=draws.count) == (2, 4)  # the two likely candidates come out most often
    assert [round(tau_at(p), 2) for p in (0, 1)] == [5.0, 0.1]


def test_architecture_steps_bring_the_argmax_to_the_target():
    net = make_net(bias=True)
    search = WidthSearch(net, torch.zeros(1, 2, 6, 6), seed=0)
    search.attach()
    opt = arch_optimizer_for(search, lr=0.05, weight_decay=0.0)
    x, y = torch.randn(8, 2, 6, 6), torch.randint(0, 5, (8,))
    for _ in range(150):
        stats = arch_step(net, search, opt, (x, y), macs_reduction=0.6, flops_weight=2.0, flops_tolerance=0.05)
    assert 0.35 - 0.02 <= stats["macs_share"] <= 0.4 + 1e-9


def make_model() -> ImageClassifier:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )
    return ImageClassifier(net, num_classes=10, image_size=8,
                           optimizer=lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9))


def make_dm() -> DigitsDataModule:
    return DigitsDataModule(batch_size=64, train_fraction=0.5)


def fit(callbacks, max_epochs=2, **kwargs):
    model = make_model()
    trainer = Trainer(max_epochs=max_epochs, callbacks=callbacks, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_train_batches=4,
                      limit_val_batches=1, **kwargs)
    trainer.fit(model, datamodule=make_dm())
    return model, trainer


def test_fit_searches_then_removes_filters_physically_and_keeps_training():
    tas = TransformableArchitectureSearch(macs_reduction=0.5, search_epochs=1, arch_lr=0.05, verbose=False)
    model, trainer = fit([tas], max_epochs=2)
    step = tas.steps[-1]
    widths = step["widths"]
    assert model.net[0].out_channels == widths["net.0"] and model.net[3].in_channels == widths["net.0"]
    assert model.net[3].out_channels == widths["net.3"] and model.net[8].in_features == widths["net.3"]
    assert step["macs"] == count_macs_params(model, torch.zeros(1, 1, 8, 8))[0] < tas.dense["macs"]
    assert tas.search is None and not model.net[1]._forward_hooks
    opt_params = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert opt_params == {id(p) for p in model.parameters()}  # the optimiser trains the pruned tensors


def test_an_unreachable_target_names_the_limiting_layer():
    tas = TransformableArchitectureSearch(macs_reduction=0.95, search_epochs=1)
    with pytest.raises(PruningError, match=r"macs_reduction=0.95 cannot be reached.*layer 'net\.\d'") as err:
        fit([tas], max_epochs=2)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("kwargs, match", [
    ({"macs_reduction": float("nan")}, "macs_reduction"),
    ({"macs_reduction": 1.0}, "macs_reduction"),
    ({"search_epochs": 0}, "search_epochs"),
    ({"width_ratios": [0.0, 1.0]}, r"width_ratios\[0\]"),
    ({"width_ratios": []}, "width_ratios"),
    ({"tau_max": 0.1, "tau_min": 1.0}, "tau_min"),
    ({"flops_weight": float("inf")}, "flops_weight"),
    ({"ignored_layers": "net.0"}, "ignored_layers"),
    ({"seed": 1.5}, "seed"),
])
def test_bad_arguments_are_refused_with_one_line(kwargs, match):
    with pytest.raises(ValueError, match=match) as err:
        TransformableArchitectureSearch(**kwargs)
    assert "\n" not in str(err.value)


def test_a_model_without_searchable_convs_is_refused():
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with pytest.raises(PruningError, match="no conv whose width TAS can search"):
        WidthSearch(net, torch.zeros(1, 1, 8, 8))


def test_several_processes_are_refused_in_setup():
    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False)
    with pytest.raises(PruningError, match="one process only"):
        TransformableArchitectureSearch().setup(trainer, make_model(), "fit")


def test_non_classification_batches_are_refused():
    class DictBatches(ImageClassifier):
        def training_step(self, batch, batch_idx):
            return super().training_step((batch["x"], batch["y"]), batch_idx)

    from torch.utils.data import DataLoader

    data = [{"x": torch.randn(1, 8, 8), "y": torch.tensor(1)} for _ in range(8)]
    torch.manual_seed(0)
    model = DictBatches(make_model().net, num_classes=10, image_size=8)
    trainer = Trainer(max_epochs=1, callbacks=[TransformableArchitectureSearch()], logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(PruningError, match=r"needs \(inputs, targets\) batches"):
        trainer.fit(model, train_dataloaders=DataLoader(data, batch_size=4))


def callbacks():
    return [TransformableArchitectureSearch(macs_reduction=0.5, search_epochs=2, arch_lr=0.05, verbose=False)]


@pytest.mark.slow
def test_crash_mid_search_and_resume_gives_the_same_network(tmp_path):
    full, resumed, info = crash_and_resume(make_model, make_dm, callbacks, max_epochs=3, crash_step=6,
                                           tmp_path=tmp_path, checkpoint_every_n_steps=1, limit_train_batches=4,
                                           limit_val_batches=1)
    assert info["resumed_from_step"] == 6  # mid-epoch: batch 2 of epoch 1, inside the search
    assert info["full_callbacks"][0].steps[0]["widths"] == info["resumed_callbacks"][0].steps[0]["widths"]
    assert_same_parameters(full, resumed)


@pytest.mark.slow
def test_crash_after_pruning_and_resume_replays_the_widths(tmp_path):
    full, resumed, info = crash_and_resume(make_model, make_dm, callbacks, max_epochs=4, crash_step=10,
                                           tmp_path=tmp_path, checkpoint_every_n_steps=1, limit_train_batches=4,
                                           limit_val_batches=1, weights_only=True)
    assert full.net[0].out_channels < 8 or full.net[3].out_channels < 16
    assert_same_parameters(full, resumed)


def test_the_kept_widths_are_the_best_validated_ones_within_the_band():
    tas = TransformableArchitectureSearch(macs_reduction=0.5, search_epochs=2, arch_lr=0.05, verbose=False)
    model, _ = fit([tas], max_epochs=3)
    assert [c["epoch"] for c in tas.candidates] == [0, 1]  # one record per search validation, none after pruning
    tas.candidates = [
        {"epoch": 0, "widths": {"a": 4}, "value": 0.9, "macs_share": 0.6},   # best, but outside the band
        {"epoch": 1, "widths": {"a": 6}, "value": 0.7, "macs_share": 0.47},
        {"epoch": 2, "widths": {"a": 5}, "value": 0.8, "macs_share": 0.52},
    ]
    assert tas.chosen_widths() == {"a": 5}
    kept = tas.steps[0]["widths"]
    assert model.net[0].out_channels == kept["net.0"] and model.net[3].out_channels == kept["net.3"]


def test_projection_moves_widths_into_the_band_along_the_learned_preferences():
    net = make_net(bias=True)
    search = WidthSearch(net, torch.zeros(1, 2, 6, 6), seed=0)
    first, second = search.choices
    with torch.no_grad():  # the first conv strongly prefers its full width, the second is indifferent
        search.logits[0].copy_(torch.linspace(-4.0, 4.0, len(search.choices[first])))
        search.logits[1].fill_(0.0)
        search.logits[1][-1] = 0.01  # argmax: both at full width (share 1.0, far above the band)
    assert search.current_macs() == pytest.approx(search.dense_macs)
    widths = search.project_widths(0.5, 0.05)
    share = search.macs_of(widths) / search.dense_macs
    assert 0.45 - 1e-9 <= share <= 0.5 + 1e-9
    # every width combination in the band: the projection kept the preferred first conv wider than the cheapest way
    in_band = [(a, b) for a in search.choices[first] for b in search.choices[second]
               if 0.45 <= search.macs_of({first: a, second: b}) / search.dense_macs <= 0.5]
    assert in_band and widths[first] == max(a for a, _ in in_band)
    assert search.project_widths(0.5, 0.05, widths) == widths  # already in the band: unchanged
    low = {first: search.choices[first][0], second: search.choices[second][0]}  # below the band: grown into it
    grown = search.project_widths(0.5, 0.05, low)
    assert 0.45 - 1e-9 <= search.macs_of(grown) / search.dense_macs <= 0.5 + 1e-9


@pytest.mark.parametrize("project", [True, False])
def test_the_pruned_network_lands_in_the_band_when_projected(project):
    tas = TransformableArchitectureSearch(macs_reduction=0.5, search_epochs=1, arch_lr=1e-6, select="last",
                                          project=project, seed=3, verbose=False)
    fit([tas], max_epochs=2)
    share = tas.steps[0]["macs"] / tas.dense["macs"]
    if project:
        assert 0.45 - 1e-6 <= share <= 0.55 + 1e-6
    else:  # near-initial distributions: the argmax lands wherever it lands (here outside the band)
        assert abs(share - 0.5) > 0.05


def test_a_non_boolean_project_is_refused():
    with pytest.raises(ValueError, match="project"):
        TransformableArchitectureSearch(project="yes")
