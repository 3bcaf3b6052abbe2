"""Benchmark: Activate-while-Pruning (AP) with and without, on top of IMP, L1 and Beta-Rank filter pruning.

Part A (the spec's CPU check, AP paper's main setting): an MLP 64-300-100-10 on scikit-learn digits, iterative
magnitude pruning (IMP) with rewinding to the initialisation, 20% of the surviving weights per cycle; IMP alone
(p = 20% by magnitude) against IMP + AP (18% by magnitude + q = 2% by AP). Per cycle: sparsity, dynamic
dead-neuron rate (DNR, overall and per ReLU layer) at the end of the cycle's training, validation and test
accuracy. Run twice: with the library's standardised pixels (mean 0, so most inputs are negative) and with raw
pixels in [0, 1] (non-negative, like the ReLU outputs every later layer sees).

Part B: a small CNN (conv 1-32-64, BatchNorm, ReLU, global average pooling, linear) on digits, pruned
physically by `L1FilterPruning` or `BetaRankPruning` (50% of the filters in 3 steps). At every filter-pruning step
one of three equal-budget unstructured steps removes q = 2% more weights, so these runs end with the SAME number
of non-zero weights: AP (`ActivatingWhilePruning`), the magnitude control (the q smallest |w|: the baseline at
equal non-zero weights) and the positive control (the q MOST negative weights: the strongest form of AP's
mechanism; if even it does not lower the end-of-training DNR, the set-up cannot show AP's effect). The base
pruner alone is shown for reference (more non-zero weights). At the end: DNR, val/test accuracy, non-zero
parameters, MACs; validation accuracy per epoch (is the best epoch the last?).

Every run is a Lightning `Trainer.fit` with the library's callbacks; single-threaded
(`torch.set_num_threads(1)`). Writes `docs/results/activating_while_pruning.{md,png,json}`; `--render-only`
rewrites the page and plot from the JSON; `--reuse-part-a` takes part A's runs from the existing JSON instead of
rerunning them (same code; to fit a compute budget).

    python benchmarks/activating_while_pruning.py --seeds 0 1 2

Not part of the test suite (part A about 15 CPU-minutes, part B about 5).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer
from torch import nn

from lightning_ext.compression.activating_while_pruning import ActivatingWhilePruning
from lightning_ext.compression.ap import dead_neuron_rate, model_cost
from lightning_ext.core.io import atomic_write_json, atomic_write_text
from lightning_ext.core.plotting import new_figure, save_figure
from lightning_ext.datamodules import DigitsDataModule
from lightning_ext.modules import ImageClassifier

from _common import combine_claims  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "results"
NAME = "activating_while_pruning"


# -- shared pieces ------------------------------------------------------------------------------------------------


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )


def sgd(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)


def adamw(params):
    return torch.optim.AdamW(params, lr=3e-3, weight_decay=1e-4)


@torch.no_grad()
def accuracy(model: nn.Module, dataset) -> float:
    x, y = dataset.tensors
    was = model.training
    model.eval()
    acc = float((model(x).argmax(1) == y).float().mean())
    model.train(was)
    return acc


def weight_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def nonzero_fraction(model: nn.Module) -> float:
    ws = [m.weight.detach() for m in weight_layers(model)]
    return sum(int(torch.count_nonzero(w)) for w in ws) / sum(w.numel() for w in ws)


def trainer(callbacks, max_epochs: int) -> Trainer:
    return Trainer(accelerator="cpu", devices=1, max_epochs=max_epochs, callbacks=callbacks, logger=False,
                   enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                   limit_val_batches=0, num_sanity_val_steps=0, deterministic=True)


def mean_std(values: list[float], fmt: str = "{:.4f}") -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(sd)}"


# -- part A: IMP with rewinding, with and without AP --------------------------------------------------------------


class IterativeMagnitudePruning(Callback):
    """The benchmark's base pruner: IMP with rewinding (Frankle & Carbin, 2019), as in the AP reference code.

    After every ``cycle_epochs`` epochs (``num_prunes`` times) it zeroes ``amount`` of the surviving Linear/Conv
    weights by global magnitude (survivors = non-zero weights, as in the reference code), rewinds the survivors
    and all biases to their values at the start of fit, and restarts the optimizer. It keeps its own masks
    through training (zero gradients, re-zero after each step), so it works without AP.
    (Lightning's ModelPruning is not used: in Lightning 2.6 its rewind aliases the stored initial weights to the
    live ones after the first prune, so later rewinds do nothing.)
    """

    def __init__(self, amount: float, cycle_epochs: int, num_prunes: int) -> None:
        self.amount, self.cycle_epochs, self.num_prunes = amount, cycle_epochs, num_prunes
        self.init: dict[str, torch.Tensor] = {}
        self.masks: dict[nn.Module, torch.Tensor] = {}

    def on_fit_start(self, trainer, pl_module):
        self.init = {k: v.detach().clone() for k, v in pl_module.net.state_dict().items()}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        for m, mask in self.masks.items():
            if m.weight.grad is not None:
                m.weight.grad.mul_(mask)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        with torch.no_grad():
            for m, mask in self.masks.items():
                m.weight.mul_(mask)

    def on_train_epoch_end(self, trainer, pl_module):
        epoch = trainer.current_epoch + 1
        if epoch % self.cycle_epochs or epoch // self.cycle_epochs > self.num_prunes:
            return
        layers = weight_layers(pl_module.net)
        alive = torch.cat([m.weight.detach().abs().flatten()[m.weight.detach().flatten() != 0] for m in layers])
        k = int(round(self.amount * alive.numel()))
        threshold = torch.sort(alive).values[k - 1]
        with torch.no_grad():
            for m in layers:
                m.weight[m.weight.abs() <= threshold] = 0.0
                self.masks[m] = (m.weight != 0).to(m.weight.dtype)
            names = {mod: n for n, mod in pl_module.net.named_modules()}
            for m in layers:  # rewind survivors and biases to the initialisation
                n = names[m]
                m.weight.copy_(self.init[f"{n}.weight"] * self.masks[m])
                if m.bias is not None:
                    m.bias.copy_(self.init[f"{n}.bias"])
        trainer.strategy.setup_optimizers(trainer)


class CycleRecorder(Callback):
    """At the end of each cycle's training (before the base pruner acts): sparsity, DNR, val/test accuracy."""

    def __init__(self, cycle_epochs: int, probe: torch.Tensor, dm: DigitsDataModule, label: str) -> None:
        self.cycle_epochs, self.probe, self.dm, self.label = cycle_epochs, probe, dm, label
        self.rows: list[dict] = []

    def on_train_epoch_end(self, trainer, pl_module):
        if (trainer.current_epoch + 1) % self.cycle_epochs:
            return
        row = {
            "cycle": (trainer.current_epoch + 1) // self.cycle_epochs - 1,
            "sparsity": 1.0 - nonzero_fraction(pl_module.net),
            "dnr": dead_neuron_rate(pl_module.net, self.probe),
            "dnr_layers": dead_neuron_rate(pl_module.net, self.probe, per_layer=True),
            "val_acc": accuracy(pl_module.net, self.dm.val_set),
            "test_acc": accuracy(pl_module.net, self.dm.test_set),
        }
        self.rows.append(row)
        layers = " ".join(f"{v:.3f}" for v in row["dnr_layers"].values())
        print(f"    [{self.label}] cycle {row['cycle']:2d}: sparsity {row['sparsity']:.3f}  DNR {row['dnr']:.3f} "
              f"({layers})  val {row['val_acc']:.4f}  test {row['test_acc']:.4f}", flush=True)


class RawDigitsDataModule(DigitsDataModule):
    """Digits with the pixels left in [0, 1] (no standardisation): non-negative inputs."""

    def normalize(self, train_x, *others):
        return (train_x, *others)


INPUTS = {"standardized": DigitsDataModule, "[0,1]": RawDigitsDataModule}


def run_imp(seed: int, with_ap: bool, inputs: str, args) -> list[dict]:
    dm = INPUTS[inputs](batch_size=64, shuffle_seed=seed)
    dm.setup()
    probe = dm.train_set.tensors[0][: args.probe_size]
    torch.manual_seed(seed)
    model = ImageClassifier(mlp(), num_classes=10, image_size=8, optimizer=sgd)
    p, q = args.p, args.q
    recorder = CycleRecorder(args.cycle_epochs, probe, dm, f"{inputs} seed {seed} {'IMP+AP' if with_ap else 'IMP'}")
    callbacks = [recorder, IterativeMagnitudePruning(p - q if with_ap else p, args.cycle_epochs, args.cycles)]
    if with_ap:
        callbacks.append(ActivatingWhilePruning(pruning_ratio=q, cycle_pruning_ratio=p, probe_size=args.probe_size, latency_repeats=0, verbose=False))
    trainer(callbacks, args.cycle_epochs * (args.cycles + 1)).fit(model, datamodule=dm)
    return recorder.rows


# -- part B: structured filter pruners, with and without AP -------------------------------------------------------


class EpochRecorder(Callback):
    def __init__(self, probe: torch.Tensor, dm: DigitsDataModule) -> None:
        self.probe, self.dm = probe, dm
        self.dnr: list[float] = []
        self.val_acc: list[float] = []

    def on_train_epoch_end(self, trainer, pl_module):
        self.dnr.append(dead_neuron_rate(pl_module.net, self.probe))
        self.val_acc.append(accuracy(pl_module.net, self.dm.val_set))


def _global_topk(scores: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Remove the k alive entries with the smallest score (stable: layer order, then flat index)."""
    names = list(masks)
    flat = [torch.where(masks[n].flatten().bool(), scores[n].flatten().float(), torch.tensor(float("inf")))
            for n in names]
    order = torch.sort(torch.cat(flat), stable=True).indices[: min(k, sum(int(m.sum()) for m in masks.values()))]
    sizes = torch.tensor([0] + [f.numel() for f in flat]).cumsum(0)
    new = {n: masks[n].bool().clone() for n in names}
    for i, n in enumerate(names):
        idx = order[(order >= sizes[i]) & (order < sizes[i + 1])] - sizes[i]
        new[n].view(-1)[idx] = False
    return new


class MagnitudeControl(ActivatingWhilePruning):
    """Same budget and timing as AP, removes the q smallest-magnitude surviving weights (any sign)."""

    def select(self, weights_start, weights_end, masks, k):
        return _global_topk({n: w.abs() for n, w in weights_end.items()}, masks, k)


class MostNegativeControl(ActivatingWhilePruning):
    """Positive control: same budget and timing, removes the q MOST negative surviving weights (largest rise of
    the pre-activations they feed on non-negative inputs: AP's mechanism at full strength)."""

    def select(self, weights_start, weights_end, masks, k):
        negatives = sum(int((m.bool() & (weights_end[n] < 0)).sum()) for n, m in masks.items())
        return _global_topk(dict(weights_end), masks, min(k, negatives))  # smallest w = most negative


STEPS = {"none": None, "mag": MagnitudeControl, "ap": ActivatingWhilePruning, "neg": MostNegativeControl}
STEP_LABEL = {"none": "", "mag": " + magnitude q", "ap": " + AP", "neg": " + most-negative q"}


def run_filter(seed: int, pruner_name: str, step: str, args) -> dict:
    from lightning_ext.compression.beta_rank_pruning import BetaRankPruning
    from lightning_ext.compression.l1_filter_pruning import L1FilterPruning

    dm = DigitsDataModule(batch_size=64, shuffle_seed=seed)
    dm.setup()
    probe = dm.train_set.tensors[0][: args.probe_size]
    torch.manual_seed(seed)
    model = ImageClassifier(small_cnn(), num_classes=10, image_size=8, optimizer=adamw)
    cls = {"L1": L1FilterPruning, "Beta-Rank": BetaRankPruning}[pruner_name]
    pruner = cls(pruning_ratio=args.filter_ratio, start_epoch=args.dense_epochs, every_n_epochs=args.every, num_steps=3,
                 ignored_layers=["net.8"], latency_repeats=0, plot_path=None, verbose=False)
    recorder = EpochRecorder(probe, dm)
    callbacks = [pruner, recorder]
    extra = None
    if STEPS[step] is not None:
        extra = STEPS[step](pruning_ratio=args.q, probe_size=args.probe_size, latency_repeats=0, verbose=False)
        callbacks.append(extra)
    start = time.perf_counter()
    trainer(callbacks, args.filter_epochs).fit(model, datamodule=dm)
    seconds = time.perf_counter() - start
    cost = model_cost(model.net, probe, latency_repeats=0)
    return {
        "seed": seed, "pruner": pruner_name, "step": step, "ap": step == "ap", "seconds": seconds,
        "test_acc": accuracy(model.net, dm.test_set), "val_acc": accuracy(model.net, dm.val_set),
        "dnr": recorder.dnr[-1], "dnr_curve": recorder.dnr, "val_curve": recorder.val_acc, "params": cost["params"],
        "params_nonzero": cost["params_nonzero"], "macs": cost["macs"], "macs_nonzero": cost["macs_nonzero"],
        "steps_per_epoch": len(dm.train_dataloader()), "samples_per_epoch": len(dm.train_set),
        "history": extra.history if extra else [],
    }


# -- report -------------------------------------------------------------------------------------------------------


def _cycles_of(imp: list[dict], inputs: str, with_ap: bool, key: str, c: int) -> list[float]:
    return [r["rows"][c][key] for r in imp if r["inputs"] == inputs and r["ap"] == with_ap and len(r["rows"]) > c]


def _layer_dnr(imp: list[dict], inputs: str, with_ap: bool, layer: int, c: int) -> list[float]:
    return [list(r["rows"][c]["dnr_layers"].values())[layer] for r in imp
            if r["inputs"] == inputs and r["ap"] == with_ap and len(r["rows"]) > c]


def _mean(values) -> float:
    values = list(values)
    return statistics.mean(values) if values else float("nan")


def _table_a(imp: list[dict], inputs: str, cycles: range) -> tuple[str, dict]:
    rows = []
    for c in cycles:
        sp = _mean(_cycles_of(imp, inputs, False, "sparsity", c) + _cycles_of(imp, inputs, True, "sparsity", c))
        d0, d1 = _cycles_of(imp, inputs, False, "dnr", c), _cycles_of(imp, inputs, True, "dnr", c)
        a0, a1 = _cycles_of(imp, inputs, False, "test_acc", c), _cycles_of(imp, inputs, True, "test_acc", c)
        v0, v1 = _cycles_of(imp, inputs, False, "val_acc", c), _cycles_of(imp, inputs, True, "val_acc", c)
        per_layer = " / ".join(
            f"{_mean(_layer_dnr(imp, inputs, False, i, c)):.3f} → {_mean(_layer_dnr(imp, inputs, True, i, c)):.3f}"
            for i in range(2)
        )
        rows.append(
            f"| {c} | {100 * sp:.1f} | {mean_std(d0, '{:.3f}')} | {mean_std(d1, '{:.3f}')} | {per_layer} | "
            f"{_mean(v0):.4f} / {_mean(v1):.4f} | {mean_std(a0)} | {mean_std(a1)} | "
            f"{100 * (_mean(a1) - _mean(a0)):+.2f} |"
        )
    pruned = [c for c in cycles if c > 0]
    summary = {
        "dnr_lower": sum(_mean(_cycles_of(imp, inputs, True, "dnr", c)) < _mean(_cycles_of(imp, inputs, False, "dnr", c))
                         for c in pruned),
        "layer_lower": [sum(_mean(_layer_dnr(imp, inputs, True, i, c)) < _mean(_layer_dnr(imp, inputs, False, i, c))
                            for c in pruned) for i in range(2)],
        "acc_diffs": [_mean(_cycles_of(imp, inputs, True, "test_acc", c)) - _mean(_cycles_of(imp, inputs, False, "test_acc", c))
                      for c in pruned],
        "high": [c for c in pruned if _mean(_cycles_of(imp, inputs, True, "sparsity", c)) >= 0.9],
        "cycles": len(pruned),
    }
    return "\n".join(rows), summary


def _step_of(r: dict) -> str:
    return r.get("step", "ap" if r.get("ap") else "none")


def _b_runs(filt: list[dict], pruner: str, step: str) -> list[dict]:
    return sorted((r for r in filt if r["pruner"] == pruner and _step_of(r) == step), key=lambda r: r["seed"])


def _paired(filt: list[dict], pruner: str, a: str, b: str, key: str) -> list[float]:
    ra = {r["seed"]: r[key] for r in _b_runs(filt, pruner, a)}
    rb = {r["seed"]: r[key] for r in _b_runs(filt, pruner, b)}
    return [ra[s] - rb[s] for s in sorted(set(ra) & set(rb))]


def _best_is_last(runs: list[dict]) -> int:
    """How many runs have their best validation accuracy at the last epoch (ties: the earliest best)."""
    return sum(max(range(len(r["val_curve"])), key=lambda e: r["val_curve"][e]) == len(r["val_curve"]) - 1
               for r in runs if r.get("val_curve"))


def judge_part_b(filt: list[dict], pruner: str) -> tuple[object, object, list[str]]:
    """Part B's rule for one base pruner; returns (DNR claim, accuracy claim, lines). Premise (positive control):
    the most-negative control must end with a lower DNR than the magnitude control on every seed, else both
    claims are not testable (None). DNR claim: AP below the magnitude control (equal non-zero weights) on every
    seed. Accuracy claim (the paper's gain): AP above the magnitude control on every seed; None (inconclusive)
    when the best validation epoch is the last one in more than half of the AP and control runs (training might
    not have settled, so the end-of-training accuracies are not comparable)."""
    if not _b_runs(filt, pruner, "neg") or not _b_runs(filt, pruner, "mag"):
        return None, None, [f"- Part B, {pruner}: inconclusive: the equal-budget controls did not finish before the "
                            "deadline (" + ", ".join(f"{step}: {len(_b_runs(filt, pruner, step))}" for step in STEPS)
                            + " seeds)."]
    control = _paired(filt, pruner, "neg", "mag", "dnr")
    if len(control) < 2 or len(_paired(filt, pruner, "ap", "mag", "dnr")) < 2:
        return None, None, [f"- Part B, {pruner}: inconclusive: fewer than 2 seeds finished every run of the "
                            "comparison (" + ", ".join(f"{step}: {len(_b_runs(filt, pruner, step))}" for step in STEPS)
                            + " seeds), so no seed spread; the per-seed numbers are in the table."]
    lines = [f"- Part B, {pruner}: positive control (most-negative q vs magnitude q, end-of-training DNR, per seed): "
             f"{', '.join(f'{d:+.3f}' for d in control)}: "
             + ("lower on every seed, so the set-up can show AP's mechanism." if all(d < 0 for d in control) else
                "not lower on every seed, so this set-up cannot show a DNR effect of removing negative weights: "
                "not testable here.")]
    if not all(d < 0 for d in control):
        return None, None, lines
    dnr = _paired(filt, pruner, "ap", "mag", "dnr")
    acc = _paired(filt, pruner, "ap", "mag", "test_acc")
    dnr_ok = all(d < 0 for d in dnr)
    runs = _b_runs(filt, pruner, "ap") + _b_runs(filt, pruner, "mag")
    last = _best_is_last(runs)
    if last > len(runs) / 2:
        acc_ok, acc_word = None, (f"inconclusive: the best validation epoch is the last in {last} of {len(runs)} "
                                  "runs")
    else:
        acc_ok = all(d > 0 for d in acc)
        acc_word = "higher on every seed" if acc_ok else "not higher on every seed"
    lines.append(f"- Part B, {pruner}: AP vs the magnitude control at equal non-zero weights: DNR "
                 f"{', '.join(f'{d:+.3f}' for d in dnr)} per seed ({'lower on every seed' if dnr_ok else 'not lower on every seed'}); "
                 f"test accuracy {', '.join(f'{100 * d:+.2f}' for d in acc)} points ({acc_word}; best validation "
                 f"epoch = last in {last} of {len(runs)} runs).")
    return dnr_ok, acc_ok, lines


def make_verdict(summaries: dict, filt: list[dict], part_a_source: str) -> str:
    """The verdict from the measured numbers and the rule stated on the page."""
    lines, claims = [], []
    for inputs, sm in summaries.items():
        n, lower, diffs = sm["cycles"], sm["dnr_lower"], sm["acc_diffs"]
        counted = inputs == "[0,1]"
        if counted:
            claims.append(lower == n)
        lines.append(
            f"- Part A, {inputs} inputs: DNR lower with AP in {lower} of {n} pruned cycles; first ReLU layer lower in "
            f"{sm['layer_lower'][0]}/{n}, second in {sm['layer_lower'][1]}/{n}; test accuracy difference "
            f"{100 * min(diffs):+.2f} to {100 * max(diffs):+.2f} points"
            + ("." if counted else " (reported, not counted: outside AP's premise, most first-layer inputs are "
                                   "negative).")
        )
        if sm["high"] and counted:
            gain = statistics.mean(diffs[c - 1] for c in sm["high"])
            lines.append(
                f"  Accuracy at >= 90% sparsity (paper: +3 to +4 points on CIFAR): {100 * gain:+.2f} points over cycles "
                f"{sm['high']}; not counted (inconclusive): part A records no per-epoch validation accuracy, so "
                "whether each cycle's training settled is unchecked."
            )
    for name in ("L1", "Beta-Rank"):
        dnr_ok, acc_ok, more = judge_part_b(filt, name)
        claims += [dnr_ok, acc_ok]
        lines += more
    testable = [c for c in claims if c is not None]
    word = combine_claims(claims).capitalize()
    return (f"**{word}** ({sum(bool(c) for c in testable)} of {len(testable)} testable claims hold; "
            f"{len(claims) - len(testable)} not testable or inconclusive).\n\n"
            "Rule (computed by the script): the claims are (A) under IMP with [0,1] inputs, AP lowers the DNR in "
            "every pruned cycle; and for each filter pruner (B1) AP ends with a lower DNR than the magnitude "
            "control at equal non-zero weights on every seed and (B2) with a higher test accuracy on every seed. "
            "B1/B2 are inconclusive with fewer than 2 finished seeds, not testable when the positive control fails (the most-negative control does not lower "
            "the DNR below the magnitude control on every seed); B2 is inconclusive when the best validation "
            "epoch is the last in most runs. Every claim testable and holding: reproduced; at least one holding: "
            "partly reproduced; none holding: not reproduced; none testable: not testable here.\n\n" + "\n".join(lines))


COLORS = {"none": "tab:grey", "mag": "tab:blue", "ap": "tab:red", "neg": "tab:green"}


def plot(results: dict, args) -> None:
    imp, filt = results["imp"], results["filter"]
    cycles = range(args["cycles"] + 1)
    variants = [v for v in INPUTS if any(r["inputs"] == v for r in imp)]
    fig, axes = new_figure(2, 3, figsize=(14, 7.5))
    for col, inputs in enumerate(variants[:2]):
        for with_ap, color, label in ((False, "tab:blue", "IMP"), (True, "tab:red", "IMP + AP")):
            xs = [100 * _mean(_cycles_of(imp, inputs, with_ap, "sparsity", c)) for c in cycles]
            for row, key in ((0, "dnr"), (1, "test_acc")):
                vals = [_cycles_of(imp, inputs, with_ap, key, c) for c in cycles]
                sd = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in vals]
                axes[row][col].errorbar(xs, [_mean(v) for v in vals], yerr=sd, color=color, marker="o", ms=3,
                                        capsize=2, label=label)
        axes[0][col].set_title(f"A: MLP on digits, IMP, {inputs} inputs: DNR", fontsize=9)
        axes[1][col].set_title(f"A: {inputs} inputs: test accuracy", fontsize=9)
        axes[0][col].set_ylabel("dynamic DNR (probe batch)")
        axes[1][col].set_ylabel("test accuracy")
        for row in (0, 1):
            axes[row][col].set_xlabel("sparsity of Linear weights (%)")
            axes[row][col].grid(alpha=0.3)
            axes[row][col].legend(fontsize=7)
    ax, bars = axes[0][2], []
    for name, ls in (("L1", "-"), ("Beta-Rank", "--")):
        for step in STEPS:
            runs = _b_runs(filt, name, step)
            if not runs:
                continue
            n = min(len(r["dnr_curve"]) for r in runs)
            ax.plot(range(1, n + 1), [_mean(r["dnr_curve"][e] for r in runs) for e in range(n)], color=COLORS[step],
                    ls=ls, label=f"{name}{STEP_LABEL[step]}")
            accs = [r["test_acc"] for r in runs]
            bars.append((f"{name}{STEP_LABEL[step]}", _mean(accs), statistics.stdev(accs) if len(accs) > 1 else 0,
                         COLORS[step]))
    for e in (args["dense_epochs"] + i * args["every"] for i in range(3)):
        ax.axvline(e + 0.5, color="grey", ls=":", lw=0.8)
    ax.set_xlabel("epoch (dotted: filter pruning steps)")
    ax.set_ylabel("dynamic DNR (mean over seeds)")
    ax.set_title("B: CNN on digits, filter pruning + equal-budget steps: DNR", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    ax = axes[1][2]
    if bars:
        ax.bar(range(len(bars)), [b[1] for b in bars], yerr=[b[2] for b in bars], color=[b[3] for b in bars], capsize=3)
        ax.set_xticks(range(len(bars)), [b[0] for b in bars], fontsize=6, rotation=45, ha="right")
        ax.set_ylim(max(0.0, min(b[1] - b[2] for b in bars) - 0.05), 1.0)
    ax.set_ylabel("test accuracy at the end")
    ax.set_title("B: test accuracy (mean ± std over seeds)", fontsize=9)
    save_figure(fig, OUT / f"{NAME}.png")


def render(results: dict) -> None:
    args, meta = results["args"], results["meta"]
    imp, filt = results["imp"], results["filter"]
    cycles = range(args["cycles"] + 1)
    variants = [v for v in INPUTS if any(r["inputs"] == v for r in imp)]
    plot(results, args)
    sections, summaries = [], {}
    for inputs in variants:
        table, summaries[inputs] = _table_a(imp, inputs, cycles)
        sections.append(f"### {inputs} inputs\n\n{TABLE_A_HEAD}\n{table}")
    rows_b = []
    for name in ("L1", "Beta-Rank"):
        for step in STEPS:
            runs = _b_runs(filt, name, step)
            if not runs:
                continue
            rows_b.append(
                f"| {name}{STEP_LABEL[step]} | {mean_std([r['dnr'] for r in runs], '{:.3f}')} | "
                f"{mean_std([r['val_acc'] for r in runs])} | {mean_std([r['test_acc'] for r in runs])} | "
                f"{_mean(r['params'] for r in runs):,.0f} | {_mean(r['params_nonzero'] for r in runs):,.0f} | "
                f"{_mean(r['macs_nonzero'] for r in runs):,.0f} | {_best_is_last(runs)}/{len(runs)} | "
                f"{_mean(r['seconds'] for r in runs):.0f} |"
            )
    r0 = filt[0] if filt else {"steps_per_epoch": 0, "samples_per_epoch": 0}
    seeds = sorted({r["seed"] for r in filt} | {r["seed"] for r in imp})
    text = TEMPLATE.format(
        cmd=meta["cmd"], cpu=meta["cpu"], torch=meta["torch"], seeds=", ".join(map(str, seeds)), n_seeds=len(seeds),
        p=args["p"], q=args["q"], pq=args["p"] - args["q"], cycles=args["cycles"], cycle_epochs=args["cycle_epochs"],
        steps=args["cycle_epochs"] * 21, probe=args["probe_size"], ratio=args["filter_ratio"],
        dense=args["dense_epochs"], every=args["every"], filter_epochs=args["filter_epochs"],
        b_steps=args["filter_epochs"] * r0["steps_per_epoch"], b_samples=args["filter_epochs"] * r0["samples_per_epoch"],
        sections_a="\n\n".join(sections), rows_b="\n".join(rows_b) or "| (part B not run) |",
        minutes_b=meta["seconds_b"] / 60, load=meta.get("load_average", float("nan")), part_a_source=meta["part_a_source"],
        runtime_a=_mean(r["seconds"] for r in imp), verdict=make_verdict(summaries, filt, meta["part_a_source"]),
    )
    atomic_write_text(text, OUT / f"{NAME}.md")


TABLE_A_HEAD = (
    "| cycle | sparsity % | DNR, IMP | DNR, IMP + AP | DNR per ReLU layer 1 / 2 (IMP → IMP + AP) | "
    "val acc IMP / IMP + AP | test acc, IMP | test acc, IMP + AP | test Δ (points) |\n"
    "|---|---|---|---|---|---|---|---|---|"
)

TEMPLATE = """# Activate-while-Pruning (AP)

`ActivatingWhilePruning` (AP; Liu, Ghosh, Tan, Motani, "AP: Selective Activation for De-sparsifying Pruned
Neural Networks", TMLR 2023, arXiv 2212.06145; code https://github.com/Martin1937/Activate-While-Pruning) is
not a pruner of its own: next to a base pruner it takes a share q of each pruning cycle and removes the
surviving *negative* weights that moved least during the cycle. That should lower the dynamic dead-neuron
rate (DNR: the share of (sample, ReLU unit) pairs whose ReLU output is zero) and, the paper says, improve
accuracy at high sparsity (+3-4 points on CIFAR-10/100 with ResNet/VGG, +2-3 on ImageNet). The AP step is
tested against the official `prune_by_percentile_ap` on one batch of weights
(`tests/test_activating_while_pruning.py`: identical masks once the official threshold's off-by-one, num_ap + 1
weights removed, is matched).

Command (CPU, single-threaded: `torch.set_num_threads(1)`, `nice -n 5`; {cpu}, torch {torch}, shared 2-core
machine, 5-minute load average {load:.0f} at the end of part B, so wall times are inflated accordingly); seeds
{seeds}; part B {minutes_b:.1f} min wall summed over runs; part A {runtime_a:.0f} s per run on average ({part_a_source}):

```bash
{cmd}
```

## Verdict

{verdict}

## A. The spec's CPU check: IMP with rewinding on an MLP, with and without AP

MLP 64-300-100-10 (two ReLU layers) on scikit-learn digits (1,293 train / 144 val / 360 test, fixed split).
Iterative magnitude pruning with rewinding to the initialisation over all Linear weights (global), p = {p} of
the surviving weights per cycle: IMP alone removes p by magnitude; IMP + AP removes p - q = {pq:.2f} by
magnitude and q = {q} with `ActivatingWhilePruning`, so both have the same sparsity in every cycle (the budget
is matched by construction).
{cycle_epochs} epochs (about {steps} optimizer steps, {cycle_epochs} x 1,293 samples) per cycle, SGD (lr 0.05,
momentum 0.9, weight decay 5e-4), optimizer restarted each cycle, batch 64; cycle 0 is the dense network,
{cycles} prunes. Measured at the end of each cycle's training, before pruning: DNR on a fixed probe batch (the
first {probe} training samples, eval mode), validation and test accuracy. Mean ± std over the seeds (per-layer
DNR and val accuracy: means). Nothing was tuned, for IMP or for AP: every setting above was fixed before the
runs (the reference code's p = 0.2, q = 0.02).

Two input encodings, because the AP step's rationale (dropping a negative weight raises the pre-activation)
holds only for non-negative inputs: ReLU outputs always are, but the library's `DigitsDataModule`
standardises pixels (mean 0; about 61% of the first layer's inputs are negative), so for the first layer
removing a negative weight can *lower* pre-activations.

{sections_a}

## B. AP on top of structured filter pruning (L1, Beta-Rank), at equal non-zero weights

Small CNN (conv 1-32-64 with BatchNorm and ReLU, global average pooling, linear head) on digits
(standardised), AdamW (lr 3e-3), batch 64, {filter_epochs} epochs ({b_steps:,} optimizer steps, {b_samples:,}
samples seen) for every run. Dense training for {dense} epochs, then `L1FilterPruning` or `BetaRankPruning`
removes {ratio} of the conv filters physically in 3 steps (at the start of epochs {dense}, {dense}+{every},
{dense}+2x{every}). Right after each filter-pruning step one unstructured step removes q = {q} of the weights
alive before that step (masked, on the shrunk model, kept at zero afterwards), chosen by:

- `+ AP`: `ActivatingWhilePruning` (negative weights that moved least since the previous step);
- `+ magnitude q`: the smallest |w| (the baseline at equal non-zero weights: same budget, same timing, same
  code path, only the choice differs);
- `+ most-negative q`: the most negative weights (positive control: AP's mechanism at full strength; if it does
  not lower the end-of-training DNR, this set-up cannot show AP's effect).

The base pruner alone (no extra step, more non-zero weights) is shown for reference. Nothing was tuned for any
row. At the end of training: DNR on the probe batch, val/test accuracy, stored and non-zero parameters,
non-zero MACs per sample, whether the best validation epoch is the last, seconds per run. Mean ± std over
seeds.

| run | DNR at end | val acc | test acc | params | non-zero params | non-zero MACs | best val epoch = last | s / run |
|---|---|---|---|---|---|---|---|---|
{rows_b}

Masked weights give no speed-up on dense kernels (stored parameters and dense MACs are the same for every
run). BatchNorm after each conv re-centres the pre-activations, which can absorb the shift AP relies on.

![DNR and accuracy vs sparsity (A), DNR per epoch and accuracy (B)](activating_while_pruning.png)

Raw numbers (per seed, per cycle, per layer, per epoch; the extra steps' per-event logs):
[`activating_while_pruning.json`](activating_while_pruning.json).
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--p", type=float, default=0.2)
    parser.add_argument("--q", type=float, default=0.02)
    parser.add_argument("--cycles", type=int, default=11, help="number of IMP prunes (part A)")
    parser.add_argument("--cycle-epochs", type=int, default=10, help="epochs per IMP cycle (21 steps each)")
    parser.add_argument("--probe-size", type=int, default=256)
    parser.add_argument("--filter-ratio", type=float, default=0.5)
    parser.add_argument("--dense-epochs", type=int, default=8)
    parser.add_argument("--every", type=int, default=3)
    parser.add_argument("--filter-epochs", type=int, default=20)
    parser.add_argument("--reuse-part-a", action="store_true", help="take part A's runs from the existing JSON")
    parser.add_argument("--render-only", action="store_true", help="rewrite the page and plot from the JSON")
    parser.add_argument("--cache-dir", default=None, help="keep each finished part B run here and reuse it")
    parser.add_argument("--cached-only", action="store_true", help="with --cache-dir: use finished runs only")
    args = parser.parse_args()
    path = OUT / f"{NAME}.json"
    if args.render_only:
        render(json.loads(path.read_text()))
        return
    torch.set_num_threads(1)
    cmd = ("OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/activating_while_pruning.py --seeds "
           + " ".join(map(str, args.seeds)) + (" --reuse-part-a" if args.reuse_part_a else "")
           + (f" --cache-dir {args.cache_dir}" if args.cache_dir else "") + (" --cached-only" if args.cached_only else ""))
    results: dict = {"args": {k: v for k, v in vars(args).items() if k not in ("render_only",)}, "imp": [],
                     "filter": []}
    meta = {"cmd": cmd, "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
            "part_a_source": "run in this command", "seconds_b": 0.0}
    if args.reuse_part_a:
        old = json.loads(path.read_text())
        if old["args"]["cycles"] != args.cycles or old["args"]["cycle_epochs"] != args.cycle_epochs:
            raise ValueError("--reuse-part-a: the existing JSON's part A used other --cycles/--cycle-epochs.")
        results["imp"] = [r for r in old["imp"] if r["seed"] in args.seeds]
        meta["part_a_source"] = old.get("meta", {}).get(
            "part_a_source", "part A reused from the previous run of this script (commit 9767bb4's code and "
            "protocol for part A, unchanged), not rerun, to fit the compute budget")
    results["meta"] = meta
    if not args.reuse_part_a:
        print("Part A: IMP with and without AP (MLP on digits)", flush=True)
        for inputs in INPUTS:
            for seed in args.seeds:
                for with_ap in (False, True):
                    t = time.perf_counter()
                    rows = run_imp(seed, with_ap, inputs, args)
                    results["imp"].append({"seed": seed, "ap": with_ap, "inputs": inputs, "rows": rows,
                                           "seconds": time.perf_counter() - t})
                    print(f"  {inputs} seed {seed} {'IMP+AP' if with_ap else 'IMP'}: "
                          f"{time.perf_counter() - t:.0f} s", flush=True)
    print("Part B: L1 / Beta-Rank filter pruning + equal-budget steps (CNN on digits)", flush=True)
    start = time.perf_counter()
    cache = Path(args.cache_dir) if args.cache_dir else None
    for seed in args.seeds:
        for name in ("L1", "Beta-Rank"):
            for step in STEPS:
                cached = cache / f"b_{seed}_{name}_{step}.json" if cache else None
                if cached is not None and cached.exists():  # finished by an interrupted run
                    results["filter"].append(json.loads(cached.read_text()))
                    continue
                if args.cached_only:
                    continue
                r = run_filter(seed, name, step, args)
                results["filter"].append(r)
                if cached is not None:
                    atomic_write_json(r, cached)
                print(f"  seed {seed} {name}{STEP_LABEL[step]}: DNR {r['dnr']:.3f} test {r['test_acc']:.4f} "
                      f"nonzero params {r['params_nonzero']} ({r['seconds']:.0f} s)", flush=True)
    meta["seconds_b"] = sum(r["seconds"] for r in results["filter"])  # summed over runs (cached ones too)
    meta["load_average"] = os.getloadavg()[1]
    atomic_write_json(results, path, indent=1)
    render(results)
    print((OUT / f"{NAME}.md").read_text())


if __name__ == "__main__":
    main()
