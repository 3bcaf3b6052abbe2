"""Beta-Rank: scores against a hand computation, the ratio direction, statistics over batches, fit and resume."""

import numpy as np
import pytest
import torch
from torch import nn

from lightning_ext.compression.beta_rank_pruning import BetaRankPruning, beta_rank_scores
from lightning_ext.compression.filter_pruning import PruningError, count_macs_params
from lightning_ext.datamodules import DigitsDataModule
from lightning_ext.modules import ImageClassifier
from lightning_ext.testing import assert_same_parameters, crash_and_resume


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


def hand_beta_rank(conv, x, stride, padding, groups=1, ratio="out/in", normalize=True):
    """Beta-Rank written out with loops: numpy population stds over the batch (output) and over batch x
    receptive-field patch of the filter's input channels (input), zero padding excluded."""
    with torch.no_grad():
        y = conv(x).numpy().astype(np.float64)
    x, w = x.numpy().astype(np.float64), conv.weight.detach().numpy().astype(np.float64)
    n, c_in, h, wd = x.shape
    c_out, c_per_group, kh, kw = w.shape
    ranks = []
    for k in range(c_out):
        g = k // (c_out // groups)
        channels = range(g * c_per_group, (g + 1) * c_per_group)
        total = 0.0
        for u in range(y.shape[2]):
            for v in range(y.shape[3]):
                a = np.std(y[:, k, u, v])
                patch = [x[s, c, i, j] for s in range(n) for c in channels
                         for i in range(u * stride - padding, u * stride - padding + kh)
                         for j in range(v * stride - padding, v * stride - padding + kw)
                         if 0 <= i < h and 0 <= j < wd]
                b = np.std(patch)
                total += a / b if ratio == "out/in" else b / a
        ranks.append(np.mean(np.abs(w[k])) * total)
    ranks = np.array(ranks)
    if normalize:
        ranks = (ranks - ranks.min()) / (ranks.max() - ranks.min())
    return ranks


@pytest.mark.parametrize("ratio", ["out/in", "in/out"])
@pytest.mark.parametrize("stride, padding, groups", [(1, 0, 1), (2, 1, 1), (1, 1, 3)],
                         ids=["plain", "padded-strided", "depthwise"])
def test_scores_match_a_hand_computed_example(ratio, stride, padding, groups):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 6 if groups == 1 else 3, 2 if groups == 1 else 3, stride=stride, padding=padding,
                     groups=groups)
    x = torch.randn(5, 3, 5, 5)
    for normalize in (True, False):
        ours = beta_rank_scores(nn.Sequential(conv), x, ratio_direction=ratio, normalize=normalize)["0"]
        expected = hand_beta_rank(conv, x, stride, padding, groups, ratio, normalize)
        np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-8, atol=1e-12)


def test_the_ratio_direction_changes_the_ranking_and_is_validated():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 6, 3), nn.ReLU(), nn.Conv2d(6, 8, 3))
    x = torch.randn(32, 1, 8, 8)
    out_in = beta_rank_scores(net, x, ratio_direction="out/in")["2"]
    in_out = beta_rank_scores(net, x, ratio_direction="in/out")["2"]
    assert not torch.equal(torch.argsort(out_in), torch.argsort(in_out))
    with pytest.raises(ValueError, match="'out/in' \\(the official code\\) or 'in/out'"):
        BetaRankPruning(pruning_ratio=0.5, ratio_direction="out_in")
    with pytest.raises(ValueError, match="one of"):
        beta_rank_scores(net, x, ratio_direction="in")
    pruner = BetaRankPruning(pruning_ratio=0.5, ratio_direction="in/out")
    trainer = type("T", (), {"strategy": type("S", (), {"reduce": staticmethod(lambda t, reduce_op: t)})()})()
    torch.testing.assert_close(pruner.filter_scores(net, [x], trainer)["2"], in_out)


def test_statistics_are_sums_so_batches_and_ranks_combine_exactly():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2))
    net.train()
    x = torch.randn(40, 1, 9, 9)
    whole = beta_rank_scores(net, x)
    halves = beta_rank_scores(net, [x[:20], x[20:]])
    for name in whole:
        torch.testing.assert_close(halves[name], whole[name], rtol=1e-9, atol=1e-12)
    assert net.training and net[1].training  # modes restored; BN ran with running statistics
    # a reduce_fn sees one float64 vector: how two ranks' sums are added under DDP
    other = {}

    def capture(t):
        other["flat"] = t.clone()
        return t

    beta_rank_scores(net, x[20:], reduce_fn=capture)
    combined = beta_rank_scores(net, x[:20], reduce_fn=lambda t: t + other["flat"])
    for name in whole:
        torch.testing.assert_close(combined[name], whole[name], rtol=1e-9, atol=1e-12)
    assert other["flat"].dtype == torch.float64


def test_constant_inputs_give_finite_scores():
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3))
    x = torch.zeros(8, 1, 8, 8)
    x[:, :, 2:6, 2:6] = torch.randn(8, 1, 4, 4)  # constant border: zero input std at some positions
    scores = beta_rank_scores(net, x)
    assert all(torch.isfinite(s).all() for s in scores.values())
    with pytest.raises(ValueError, match="at least one"):
        beta_rank_scores(net, [])


def test_beta_rank_callback_prunes_to_a_macs_target_inside_fit(tmp_path):
    from lightning.pytorch import Trainer

    model = make_model()
    dense_macs = count_macs_params(model, torch.zeros(1, 1, 8, 8))[0]
    pruner = BetaRankPruning(macs_reduction=0.45, calibration_batches=2, latency_repeats=0)
    Trainer(max_epochs=1, callbacks=[pruner], accelerator="cpu", logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, limit_train_batches=2, limit_val_batches=1,
            default_root_dir=str(tmp_path)).fit(model, datamodule=make_dm())
    macs = count_macs_params(model, torch.zeros(1, 1, 8, 8))[0]
    assert abs(1 - macs / dense_macs - 0.45) < 0.06  # 8 and 16 channels: coarse steps
    assert pruner.steps[0]["macs"] == macs and pruner.dense["macs"] == dense_macs
    with pytest.raises(PruningError, match="cannot be reached"):
        Trainer(max_epochs=1, callbacks=[BetaRankPruning(macs_reduction=0.9, ignored_layers=["net.0"],
                                                         latency_repeats=0)],
                accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, limit_train_batches=1, limit_val_batches=0,
                default_root_dir=str(tmp_path)).fit(make_model(), datamodule=make_dm())


def test_beta_rank_crash_and_resume_with_an_iterative_schedule(tmp_path):
    def pruners():
        return [BetaRankPruning(pruning_ratio=0.5, start_epoch=1, num_steps=2, latency_repeats=0)]

    full, resumed, info = crash_and_resume(make_model, make_dm, pruners, max_epochs=3, crash_epoch=2,
                                           tmp_path=tmp_path)
    assert [s["epoch"] for s in info["resumed_callbacks"][0].steps] == [1, 2]
    assert full.net[0].out_channels == 4 and full.net[3].out_channels == 8
    assert_same_parameters(full, resumed)


def test_the_yaml_config_prunes_through_the_cli_and_tests_the_pruned_checkpoint(tmp_path, monkeypatch):
    from pathlib import Path

    from lightning_ext.cli import run_cli

    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(repo)
    cli = run_cli([
        "fit", "--config", "configs/beta_rank_pruning.yaml", "--trainer.max_epochs=2",
        "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=2", "--trainer.limit_test_batches=2",
        "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}",
        "--trainer.callbacks.init_args.latency_repeats=1", "--trainer.callbacks.init_args.latency_batch_size=8",
        "--model.init_args.stem_downsample=2",  # a cheaper network than the config's, same code path
    ])
    pruner = next(cb for cb in cli.trainer.callbacks if isinstance(cb, BetaRankPruning))
    assert [s["epoch"] for s in pruner.steps] == [1]  # step 1 of 2 (25% of the MACs); step 2 is past max_epochs
    assert 0.2 < 1 - pruner.steps[0]["macs"] / pruner.dense["macs"] < 0.3
    # test_after_fit loaded the saved (pruned) checkpoint into the model: the history was replayed first
    assert cli.trainer.state.fn == "test" and "test_acc" in cli.trainer.callback_metrics
    assert list(tmp_path.rglob("BetaRankPruning_accuracy_vs_macs.png"))  # in the logger's log_dir


def official_std_filters(inp: np.ndarray, out: np.ndarray, filters: np.ndarray) -> np.ndarray:
    """The official ``std_filters`` (mohofar/Beta-Rank, ``rank_generation.py``) re-written from its conventions:
    per output position, ``a`` = population std over the batch of the filter's output, ``b`` = population std of
    ``inp[:, i*s:i*s+kh, j*s:j*s+kw, :]`` (axes 1 and 2 of the array it is given, all of axis 3; no padding;
    ``s = inp.shape[3] // out.shape[3]``), NaN ``b`` skipped; rank = mean over the filter's elements of
    ``sum_p |W_k * a / b|``; min-max normalised."""
    kh, kw = filters.shape[2:]
    s = int(inp.shape[3] / out.shape[3])
    ranks = []
    for k in range(out.shape[1]):
        acc = np.zeros(filters.shape[1:])
        for i in range(out.shape[2]):
            for j in range(out.shape[3]):
                a = np.std(out[:, k, i, j])
                b = np.std(inp[:, i * s:i * s + kh, j * s:j * s + kw, :])
                if not np.isnan(b):
                    acc = acc + np.abs(filters[k] * a / b)
        ranks.append(acc.mean())
    ranks = np.array(ranks)
    return (ranks - ranks.min()) / (ranks.max() - ranks.min())


@pytest.mark.parametrize("size, kernel, stride", [(5, 2, 1), (7, 3, 2)])
def test_scores_match_the_official_std_filters_on_one_batch(size, kernel, stride):
    """The official code slices axes 1 and 2 of the NCHW input (channels and height); fed a channels-last input
    those axes are height and width, the receptive field the paper means, so with no padding and
    ``C_in = stride * W_out`` (its stride rule) it computes what ``beta_rank_scores`` computes."""
    torch.manual_seed(0)
    out_size = (size - kernel) // stride + 1
    conv = nn.Conv2d(stride * out_size, 6, kernel, stride=stride)
    x = torch.randn(16, conv.in_channels, size, size)
    with torch.no_grad():
        y = conv(x)
    official = official_std_filters(x.permute(0, 2, 3, 1).double().numpy(), y.double().numpy(),
                                    conv.weight.detach().double().numpy())
    ours = beta_rank_scores(nn.Sequential(conv), x)["0"].numpy()
    np.testing.assert_allclose(ours, official, rtol=1e-6, atol=1e-9)
    assert list(np.argsort(ours)) == list(np.argsort(official))


def test_l1_scores_rank_filters_as_the_official_l1_filters():
    """The official ``l1_filters`` gives mean|W_k| times the number of output positions: a constant multiple of our
    sum |W_k| within a layer, so the same ranking."""
    from lightning_ext.compression.l1_filter_pruning import l1_filter_scores

    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3)
    w = conv.weight.detach().double().numpy()
    official = np.array([np.abs(w[k]).mean() * 6 * 6 for k in range(8)])  # 8x8 input, 6x6 output positions
    ours = l1_filter_scores(nn.Sequential(conv))["0"].numpy()
    np.testing.assert_allclose(ours / official, np.full(8, ours[0] / official[0]), rtol=1e-10)
    assert list(np.argsort(ours)) == list(np.argsort(official))
