"""Benchmark: FilterDiagnostics on a timm ResNet-18 trained briefly on scikit-learn's digits, against its random init.

The spec's measured finding (vision-and-tabular.md §4, Appendix A5): on digits, ResNet-18's last stage barely leaves
its random initialisation (drift D from init 0.001 in layer4.1 vs 0.035-0.045 in layer1 after 5 epochs) while the
variance entropy stays at the random-filter level (0.95). Checked here per seed: (1) at init every 3x3 layer has
normalised variance entropy >= 0.95 and sparsity 0; (2) after training D(layer1.0.conv1) > 10 x D(layer4.1.conv2)
and the callback lists the layer4 convs as near-random; plus the noise floor (D between two independent random
initialisations) and the cost of one call on all 16 layers (1 and 2 threads). Writes
``docs/results/filter_diagnostics.{md,json,png}``.

    python benchmarks/filter_diagnostics.py --seeds 0 1 2 --epochs 2

Not part of the test suite (about 15 min on one shared core).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from lightning.pytorch import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import EpochPrinter, combine_claims, mean_std  # noqa: E402

from lightning_ext.core.io import atomic_write_json, atomic_write_text  # noqa: E402
from lightning_ext.data.digits import DigitsDataModule  # noqa: E402
from lightning_ext.vision.filter_diagnostics import FilterDiagnostics, distribution_shift, layer_filters  # noqa: E402
from lightning_ext.vision.image_classifier import ImageClassifier  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "results"
FIRST, LAST = "net.layer1.0.conv1", "net.layer4.1.conv2"


def make_model(seed: int) -> ImageClassifier:
    torch.manual_seed(seed)
    return ImageClassifier("resnet18", num_classes=10, in_chans=1, image_size=8)  # stem stride 1, no max-pool


def time_calls(diag: FilterDiagnostics, model, threads: int, repeats: int) -> list[float]:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = []
        for _ in range(repeats):
            t = time.perf_counter()
            diag.compute(model, 99)
            out.append(time.perf_counter() - t)
        for _ in range(repeats):  # drop the timing rows from the record
            diag.history = diag.history[: -len(diag.names)]
            diag.summaries.pop()
        return out
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
def accuracy(model, loader) -> float:
    model.eval()
    hits = total = 0
    for x, y in loader:
        hits += int((model(x).argmax(1) == y).sum())
        total += len(y)
    return hits / total


def run_seed(seed: int, args) -> dict:
    model = make_model(seed)
    diag = FilterDiagnostics(plot_path=None, every_n_epochs=1)
    dm = DigitsDataModule(batch_size=64)
    start = time.perf_counter()
    Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
            callbacks=[diag, EpochPrinter(f"seed {seed}")]).fit(model, datamodule=dm)
    fit_s = time.perf_counter() - start
    dm.setup("fit")
    train_acc = accuracy(model, dm.train_dataloader())
    # noise floor: D between this seed's init and an independent random init, per layer, on the same PCA basis
    other = make_model(1000 + seed)
    w = diag.pca.explained_variance_ratio
    floor = {}
    init_idx = {n: i for i, n in enumerate(diag.names)}
    with torch.no_grad():
        for n in diag.names:
            h = diag.pca.histograms(layer_filters(other.get_submodule(n).weight))
            floor[n] = distribution_shift(h, diag.init_hist[init_idx[n]], w)
    timing = {"1": time_calls(diag, model, 1, args.repeats), "2": time_calls(diag, model, 2, args.repeats)}
    return {"seed": seed, "fit_s": fit_s, "train_acc": train_acc, "history": diag.history,
            "summaries": diag.summaries, "noise_floor": floor, "timing_s": timing, "names": diag.names,
            "n_filters": sum(r["n"] for r in diag.history if r["epoch"] == -1), "load_avg": os.getloadavg()[0]}


def timing_source(rerun: dict | None) -> str:
    if rerun is None:
        return "Measured inside the training runs, on the shared machine (load average above); an idle machine is faster."
    return (f"Measured alone with `--timing-only` ({rerun['repeats']} calls per thread count, after one training step "
            f"of seed 0's model), 1-minute load average {rerun['load_before']:.1f} before and "
            f"{rerun['load_after']:.1f} after on 2 cores.")


#: the positive control's threshold: some layer's drift from init must exceed this multiple of its noise floor
CONTROL_FACTOR = 2.0


def claims_of(run: dict) -> dict:
    init = [r for r in run["history"] if r["epoch"] == -1]
    last_epoch = max(r["epoch"] for r in run["history"])
    last = {r["layer"]: r for r in run["history"] if r["epoch"] == last_epoch}
    near = run["summaries"][-1]["near_random"]
    layer4 = [n for n in run["names"] if n.startswith("net.layer4")]
    floor = run["noise_floor"]
    moved = {n: last[n]["drift_from_init"] / max(floor[n], 1e-12) for n in run["names"]}
    return {
        "init_random": all(r["variance_entropy_norm"] >= 0.95 and r["sparsity"] == 0 for r in init),
        "ratio_first_last": last[FIRST]["drift_from_init"] / max(last[LAST]["drift_from_init"], 1e-12),
        "floor_ratio_first_last": floor[FIRST] / max(floor[LAST], 1e-12),
        "normalised_ratio_first_last": moved[FIRST] / max(moved[LAST], 1e-12),
        "moved": moved,
        "layer4_flagged": all(n in near for n in layer4),
        "near_random": near,
    }


def time_rerun(repeats: int) -> dict:
    """The cost of one call on all 16 layers at 1 and 2 threads, alone (after one training step, so the statistics
    are those of a training run), with the load average before and after."""
    model = make_model(0)
    diag = FilterDiagnostics(plot_path=None, every_n_epochs=1)
    Trainer(max_epochs=1, limit_train_batches=1, accelerator="cpu", devices=1, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
            num_sanity_val_steps=0, callbacks=[diag]).fit(model, datamodule=DigitsDataModule(batch_size=64))
    load_before = os.getloadavg()[0]
    timing = {"1": time_calls(diag, model, 1, repeats), "2": time_calls(diag, model, 2, repeats)}
    return {"timing_s": timing, "load_before": load_before, "load_after": os.getloadavg()[0], "repeats": repeats}


def write_report(runs: list[dict], args, total_s: float, rerun: dict | None = None) -> None:
    from lightning_ext.core.plotting import new_figure, save_figure

    for r in runs:
        r["claims"] = claims_of(r)
    c1 = all(r["claims"]["init_random"] for r in runs)
    c2_raw = all(r["claims"]["ratio_first_last"] > 10 for r in runs)
    c2 = all(r["claims"]["normalised_ratio_first_last"] > 10 and r["claims"]["layer4_flagged"]
             and FIRST not in r["claims"]["near_random"] for r in runs)
    t2 = [t for r in runs for t in r["timing_s"]["2"]]
    t1 = [t for r in runs for t in r["timing_s"]["1"]]
    if rerun is not None:  # a dedicated timing run (the in-run timings shared the machine with training)
        t1, t2 = rerun["timing_s"]["1"], rerun["timing_s"]["2"]
    perf = statistics.median(t2) < 1.0
    # positive control (DEVELOPERS.md): the statistic must see training somewhere, or it cannot say which stage moved
    moved_max = [max(r["claims"]["moved"].values()) for r in runs]
    control = all(m > CONTROL_FACTOR for m in moved_max)
    word = combine_claims([c2 if control else None]) if len(runs) >= 2 else "inconclusive"
    moved_mean = {n: statistics.mean(r["claims"]["moved"][n] for r in runs) for n in runs[0]["names"]}
    stage_moved = {st: statistics.mean(v for n, v in moved_mean.items() if f".{st}." in n) for st in ("layer1", "layer4")}
    moved_layers = [n.replace("net.", "") for n, v in moved_mean.items() if v > CONTROL_FACTOR]
    if not control:
        stage_text = "No layer's filter distribution has left the random one at this budget."
    elif stage_moved["layer4"] > stage_moved["layer1"]:
        stage_text = ("The order is the reverse of the claim: the last stage moved furthest from its random "
                      "initialisation and the first stage stayed at its floor, so \"the last stage barely leaves its "
                      "random initialisation while the first does\" is **not supported**.")
    else:
        stage_text = "The first stage moved further from its random initialisation than the last, as claimed."
    ent = [(h["epoch"], h["layer"], h["variance_entropy"]) for r in runs for h in r["history"]]
    final_epoch = max(e for e, _, _ in ent)
    min_entropy = min(statistics.mean(v for e, n2, v in ent if e == final_epoch and n2 == n) for n in runs[0]["names"])
    init_entropy = statistics.mean(v for e, _, v in ent if e == -1)
    budget_note = ("the spec ran 5; fewer here to fit the shared CPU" if args.epochs < 5 else
                   "the spec ran 5; at 2 epochs no layer's D left its noise floor, so the positive control failed")
    OUT.mkdir(parents=True, exist_ok=True)
    record = {"args": vars(args), "runs": runs, "verdict": word, "total_s": total_s}
    if rerun is not None:
        record["timing_rerun"] = rerun
    atomic_write_json(record, OUT / "filter_diagnostics.json", indent=2)
    names = runs[0]["names"]
    last_epoch = max(r["epoch"] for r in runs[0]["history"])
    fig, axes = new_figure(1, 2, figsize=(12, 4.2))
    xs = range(len(names))
    for r in runs:
        drift = {h["layer"]: h["drift_from_init"] for h in r["history"] if h["epoch"] == last_epoch}
        axes[0].plot(xs, [max(drift[n], 1e-6) for n in names], marker="o", label=f"trained, seed {r['seed']}")
        axes[0].plot(xs, [max(r["noise_floor"][n], 1e-6) for n in names], ls="--", color="gray",
                     label="two random inits" if r is runs[0] else None)
    axes[0].set_yscale("log"), axes[0].set_ylabel(f"D from init after {last_epoch + 1} epochs")
    axes[0].set_xticks(list(xs), [n.replace("net.", "") for n in names], rotation=90, fontsize=7)
    axes[0].legend(fontsize=7), axes[0].grid(alpha=0.3)
    for r in runs:
        ent = {(h["epoch"], h["layer"]): h["variance_entropy"] for h in r["history"]}
        axes[1].plot(xs, [ent[(-1, n)] for n in names], color="gray", ls="--",
                     label="random init" if r is runs[0] else None)
        axes[1].plot(xs, [ent[(last_epoch, n)] for n in names], marker="o", label=f"trained, seed {r['seed']}")
    axes[1].set_ylabel("variance entropy (log10; max 0.954)")
    axes[1].set_xticks(list(xs), [n.replace("net.", "") for n in names], rotation=90, fontsize=7)
    axes[1].legend(fontsize=7), axes[1].grid(alpha=0.3)
    save_figure(fig, OUT / "filter_diagnostics.png", dpi=110)

    def cell(layer, key, epoch):
        return mean_std([next(h[key] for h in r["history"] if h["layer"] == layer and h["epoch"] == epoch)
                         for r in runs], 4)

    table = "\n".join(
        f"| `{n.replace('net.', '')}` | {runs[0]['history'][i]['n']:,} | {cell(n, 'variance_entropy', -1)} | "
        f"{cell(n, 'variance_entropy', last_epoch)} | {cell(n, 'sparsity', last_epoch)} | "
        f"{cell(n, 'drift_from_init', last_epoch)} | {mean_std([r['noise_floor'][n] for r in runs], 4)} | "
        f"{mean_std([r['claims']['moved'][n] for r in runs], 2)} |"
        for i, n in enumerate(names))
    per_seed = "\n".join(
        f"| {r['seed']} | {r['train_acc']:.3f} | {r['claims']['ratio_first_last']:.1f} | "
        f"{r['claims']['floor_ratio_first_last']:.1f} | {r['claims']['normalised_ratio_first_last']:.2f} | "
        f"{', '.join(x.replace('net.', '') for x in r['claims']['near_random']) or 'none'} | "
        f"{'yes' if r['claims']['init_random'] else 'no'} | {r['fit_s']:.0f} |" for r in runs)
    text = f"""# FilterDiagnostics: trained ResNet-18 filters vs their random initialisation (digits)

Claims checked: the CNN Filter DB's statistics (Gavrikov & Keuper, CVPR 2022, arXiv 2203.15331) as computed by
`FilterDiagnostics`, and the spec's measured finding (vision-and-tabular.md §4, Appendix A5) that on digits the
last stage of an over-parameterised ResNet-18 barely leaves its random initialisation ("near-random filters", one
kind of degeneration the paper reports in public models): drift D from init in `layer4.1` about 0.001 vs 0.035-0.045
in `layer1`, variance entropy staying at the random level (0.95).

Set-up: timm `resnet18`, `in_chans=1`, first conv stride 1 and no max-pool (ImageClassifier's small-image stem;
{runs[0]['n_filters']:,} 3x3 filters in 16 layers), scikit-learn digits (1,797 8x8 images; the library's split:
{args.train_size:,} training images), AdamW lr 1e-3 (ImageClassifier's default), batch 64, **{args.epochs} epochs**
({budget_note}), FilterDiagnostics at fit start and after every epoch
(PCA basis and histogram ranges fitted on the initial filters, 70 bins, sparsity threshold 1%). Noise floor: D
between the initial filters and an independent random initialisation of the same layer (same basis). Pass
criteria (the spec's): (1) at init every layer has normalised variance entropy >= 0.95 and sparsity 0; (2) after
training D(`layer1.0.conv1`) > 10 x D(`layer4.1.conv2`) and the callback's near-random list holds the layer4 convs.

Command (CPU, `torch.set_num_threads({args.threads})` for training, x86_64 {platform.machine()}, torch {torch.__version__};
the machine was shared: 1-minute load average {statistics.mean(r['load_avg'] for r in runs):.1f} on 2 cores):

```bash
python benchmarks/filter_diagnostics.py --seeds {' '.join(str(r['seed']) for r in runs)} --epochs {args.epochs}
```

Runtime: {total_s / 60:.1f} min wall clock; seeds finished: {[r['seed'] for r in runs]}.

## Per layer (mean ± std over seeds; D and entropy after epoch {last_epoch + 1})

| layer | filters | variance entropy at init | variance entropy trained | sparsity trained | D from init (trained) | D between two random inits (floor) | D / floor |
|---|---|---|---|---|---|---|---|
{table}

## Per seed

| seed | train accuracy | D(layer1.0.conv1) / D(layer4.1.conv2) | same ratio of the floors | ratio of D / floor | layers flagged near-random | init criterion | fit (s) |
|---|---|---|---|---|---|---|---|
{per_seed}

![drift from init and variance entropy per layer](filter_diagnostics.png)

## Cost of one call (all 16 layers, {runs[0]['n_filters']:,} filters)

| threads | median (s) | max (s) |
|---|---|---|
| 1 | {statistics.median(t1):.3f} | {max(t1):.3f} |
| 2 | {statistics.median(t2):.3f} | {max(t2):.3f} |

{timing_source(rerun)}

Target: under 1 s per call on 2 cores: **{'met' if perf else 'not met'}**. The variance ratios come from the eigenvalues of the 9x9 covariance, not an SVD of
the n x 9 matrix.

Raw numbers: [`filter_diagnostics.json`](filter_diagnostics.json).

## Verdict: {word}

- Positive control first: training must move at least one layer's filter distribution beyond
  {CONTROL_FACTOR:g} x its own noise floor (D / floor), in every seed, or D cannot tell a trained stage from a random
  one: largest D / floor per seed {', '.join(f'{m:.2f}' for m in moved_max)} -> {'holds' if control else
  'fails, so claim (2) is not testable here (at this budget the statistic does not see training in any layer, '
  'although the network reaches ' + f"{min(r['train_acc'] for r in runs):.2f}" + ' training accuracy)'}.
- (1) random init reads as random (entropy >= 0.95 of the normalised maximum, no sparse filters): {'holds' if c1 else 'fails'} in every seed.
- (2) the spec's raw criterion, D(`layer1.0.conv1`) > 10 x D(`layer4.1.conv2`): {'holds' if c2_raw else 'fails'} in
  {'every seed' if c2_raw else 'at least one seed'}. **But the control explains the raw ratio**: D between two
  independent random initialisations (no training at all) shows the same depth pattern (ratio of the floors
  {mean_std([r['claims']['floor_ratio_first_last'] for r in runs], 1)}), because D is a histogram KL whose sampling
  noise falls with the number of filters (4,096 in `layer1` vs 262,144 in `layer4`). Measured against each layer's
  own floor: mean D / floor is {stage_moved['layer1']:.2f} in `layer1` and {stage_moved['layer4']:.2f} in `layer4`;
  layers beyond {CONTROL_FACTOR:g} x their floor (mean over seeds): {', '.join(moved_layers) or 'none'}. {stage_text}
  Normalised criterion (ratio of D / floor > 10, layer4 flagged near-random, layer1 not): {'holds' if c2 else 'fails'}.
- The callback judges "near-random" against each layer's own noise floor (`drift_floor`, from the two halves
  of its initial filters) instead of against the largest layer's D; its flags above use that rule.
- Variance entropy after training: lowest layer mean {min_entropy:.4f} against {init_entropy:.4f} at random init, so
  no sparse or low-entropy (degenerate) layers appear at this budget.
- Scale: {args.epochs} epochs on digits only (the spec ran 5 epochs).
"""
    atomic_write_text(text, OUT / "filter_diagnostics.md")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--render", action="store_true", help="re-render the page from the saved JSON")
    parser.add_argument("--timing-only", action="store_true",
                        help="re-measure only the cost of one call (on a one-step model, e.g. on an idle machine), "
                             "save it beside the runs and re-render")
    args = parser.parse_args()
    if args.render or args.timing_only:
        saved = json.loads((OUT / "filter_diagnostics.json").read_text())
        if args.timing_only:
            saved["timing_rerun"] = time_rerun(args.repeats)
        write_report(saved["runs"], argparse.Namespace(**saved["args"]), saved["total_s"],
                     saved.get("timing_rerun"))
        return
    torch.set_num_threads(args.threads)
    dm = DigitsDataModule(batch_size=64)
    dm.setup("fit")
    args.train_size = len(dm.train_set)
    start, runs = time.perf_counter(), []
    for seed in args.seeds:
        runs.append(run_seed(seed, args))
        print(f"seed {seed}: ratio {claims_of(runs[-1])['ratio_first_last']:.1f} near-random "
              f"{claims_of(runs[-1])['near_random']}", flush=True)
        write_report(runs, args, time.perf_counter() - start)
    print((OUT / "filter_diagnostics.md").read_text())


if __name__ == "__main__":
    main()
