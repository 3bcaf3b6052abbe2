"""CPU inference speed of physically pruned networks vs the dense network vs Lightning's masked ModelPruning.

Per seed, on balanced Fashion-MNIST (a stratified training subset, the full official test split):

1. dense: a timm ResNet-10t (stem downsampling 2x, 28x28 inputs) trained from scratch;
2. ours: ``L1FilterPruning(macs_reduction=0.5, round_to=8)`` removes filters physically at the start of
   fine-tuning (one-shot), then fine-tunes; Beta-Rank and random pruning give the same shapes, so the same speed;
3. masked: Lightning's ``ModelPruning("ln_structured", pruning_dim=0)`` zeroes the same share of filters in every
   conv (L1 norm, masks made permanent at the end of fit) at the end of the first of the same fine-tuning epochs;
4. the accuracy reference: the dense network trained for the same fine-tuning epochs without pruning.

Latency is the median over interleaved rounds (dense, ours, masked, dense, ...) of forward passes on a batch of
64 images in eval mode under ``inference_mode``, single-threaded; speedups are ratios measured in the same run.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/pruning_speed.py     # ~25 min of CPU on one thread
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/pruning_speed.py --report-only   # rewrite the page

Writes docs/results/pruning_speed.md and docs/results/pruning_speed.png (raw numbers:
runs/benchmarks/pruning_speed.json).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from lightning.pytorch import seed_everything
from lightning.pytorch.callbacks import ModelPruning
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lightning_ext.compression import count_macs_params, measure_latency  # noqa: E402
from lightning_ext.compression.l1_filter_pruning import L1FilterPruning  # noqa: E402
from lightning_ext.datamodules import FashionMNISTDataModule  # noqa: E402
from benchmarks._common import fit, mean_std, resnet10t_fmnist, test_predictions  # noqa: E402

RAW = REPO / "runs" / "benchmarks" / "pruning_speed.json"  # raw numbers (git-ignored)


class PruneOnceAtFirstEpoch:
    """`apply_pruning` schedule for ModelPruning: prune at the end of epoch 0 only (its default re-prunes every
    epoch and compounds). A small class rather than a lambda, as the library's rules ask for configs."""

    def __call__(self, epoch: int) -> bool:
        return epoch == 0


def make_model(args, lr: float, epochs: int):
    return resnet10t_fmnist(args.stem_downsample, lr, epochs)


def test_accuracy(model, dm) -> float:
    preds, labels = test_predictions(model, dm)
    return float((preds == labels).float().mean())


def zero_filter_share(model: nn.Module) -> float:
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    zero = sum(int((m.weight.detach().flatten(1).abs().sum(1) == 0).sum()) for m in convs)
    return zero / sum(m.out_channels for m in convs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--round-to", type=int, default=8)
    parser.add_argument("--dense-epochs", type=int, default=3)
    parser.add_argument("--finetune-epochs", type=int, default=2)
    parser.add_argument("--train-fraction", type=float, default=0.06)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--latency-batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--stem-downsample", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results")
    parser.add_argument("--report-only", action="store_true", help="rewrite the page from the saved raw numbers")
    args = parser.parse_args()
    if args.report_only:
        raw = json.loads(RAW.read_text())
        for key, value in raw["args"].items():
            if key not in ("out", "report_only"):
                setattr(args, key, type(getattr(args, key))(value) if not isinstance(getattr(args, key), list)
                        else json.loads(value))
        write_report(args, raw["rows"], raw["runtime_s"])
        return
    torch.set_num_threads(1)
    start_all = time.time()
    x1 = torch.zeros(1, 1, 28, 28)
    rows = []
    for seed in args.seeds:
        seed_everything(seed, workers=True)
        dm = FashionMNISTDataModule(batch_size=args.batch_size, train_fraction=args.train_fraction, shuffle_seed=seed)
        dense = make_model(args, 0.05, args.dense_epochs)
        fit(dense, dm, args.dense_epochs, [], f"seed {seed} dense")
        state = copy.deepcopy(dense.state_dict())

        seed_everything(seed, workers=True)  # the accuracy reference: the dense network trained as long as ours
        dense_ft = make_model(args, 0.01, args.finetune_epochs)
        dense_ft.load_state_dict(state)
        fit(dense_ft, dm, args.finetune_epochs, [], f"seed {seed} dense, fine-tuned")

        seed_everything(seed, workers=True)
        ours = make_model(args, 0.01, args.finetune_epochs)
        ours.load_state_dict(state)
        pruner = L1FilterPruning(macs_reduction=args.target, round_to=args.round_to, latency_repeats=0,
                                 plot_path=None, verbose=True)
        ours_s = fit(ours, dm, args.finetune_epochs, [pruner], f"seed {seed} ours")
        convs = lambda m: [c for c in m.modules() if isinstance(c, nn.Conv2d)]  # noqa: E731
        share = 1 - sum(c.out_channels for c in convs(ours)) / sum(c.out_channels for c in convs(dense))

        seed_everything(seed, workers=True)
        masked = make_model(args, 0.01, args.finetune_epochs)
        masked.load_state_dict(state)
        model_pruning = ModelPruning(
            "ln_structured", parameters_to_prune=[(c, "weight") for c in convs(masked.net)], amount=share,
            pruning_dim=0, pruning_norm=1, use_global_unstructured=False, use_lottery_ticket_hypothesis=False,
            apply_pruning=PruneOnceAtFirstEpoch(), make_pruning_permanent=True,
        )
        masked_s = fit(masked, dm, args.finetune_epochs, [model_pruning], f"seed {seed} ModelPruning")

        models = {"dense": dense, "ours": ours, "masked": masked}
        lat = {k: [] for k in models}
        x = torch.randn(args.latency_batch, 1, 28, 28)
        print(f"seed {seed}: timing {args.rounds} interleaved rounds at batch {args.latency_batch}", flush=True)
        for _ in range(args.rounds):
            for name, model in models.items():
                lat[name].append(measure_latency(model, x, warmup=1, repeats=3))
        row = {"seed": seed, "filter_share": share, "masked_zero_filter_share": zero_filter_share(masked),
               "ours_finetune_s": ours_s, "masked_finetune_s": masked_s}
        for name, model in models.items():
            macs, params = count_macs_params(model, x1)
            row[name] = {"macs": macs, "params": params, "latency_ms": 1000 * statistics.median(lat[name]),
                         "test_acc": test_accuracy(model, dm)}
        row["dense_ft"] = dict(row["dense"], test_acc=test_accuracy(dense_ft, dm))  # same shapes, same latency
        for name in ("ours", "masked"):
            row[name]["speedup"] = row["dense"]["latency_ms"] / row[name]["latency_ms"]
        rows.append(row)
        print(f"seed {seed}: " + ", ".join(f"{n} {row[n]['latency_ms']:.1f} ms acc {row[n]['test_acc']:.4f}"
                                          for n in ("dense", "dense_ft", "ours", "masked")), flush=True)
    write_report(args, rows, time.time() - start_all)


def write_report(args, rows: list[dict], runtime: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    args.out.mkdir(parents=True, exist_ok=True)
    names = {"dense": f"dense ({args.dense_epochs} epochs)",
             "dense_ft": f"dense + {args.finetune_epochs} epochs (accuracy reference)",
             "ours": f"ours: physical (L1, round_to={args.round_to})",
             "masked": "ModelPruning (masked ln_structured)"}
    argv = [] if args.report_only else sys.argv[1:]
    command = "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/pruning_speed.py " + " ".join(argv)
    dense_acc = [r["dense"]["test_acc"] for r in rows]
    lines = [
        "# Pruning speed: physical filter removal vs masks (CPU inference)",
        "",
        "Goal (issue 3): at 50% MACs reduction, a CPU inference speedup (batch 64) of at least 1.6x with at most "
        "1 point of accuracy lost; Lightning's `ModelPruning` masked model is expected to stay near 1.0x.",
        "",
        "## Setup",
        "",
        f"- Command: `{command.strip()}`",
        f"- Data: balanced Fashion-MNIST, `train_fraction={args.train_fraction:g}` "
        f"({round(55000 * args.train_fraction)} training images, stratified), accuracy on the full official test "
        "split (10,000). No validation-based selection: the last epoch is evaluated.",
        f"- Model: `ImageClassifier(\"resnet10t\", image_size=28, stem_downsample={args.stem_downsample})`; dense "
        f"training {args.dense_epochs} epochs (SGD lr 0.05, momentum 0.9, wd 5e-4, cosine, batch {args.batch_size}).",
        f"- Ours: `L1FilterPruning(macs_reduction={args.target}, round_to={args.round_to})`, one-shot at the "
        f"start of fine-tuning, then {args.finetune_epochs} epochs (SGD lr 0.01, cosine).",
        "- Masked: `ModelPruning(\"ln_structured\", amount=<the share of filters ours removed>, pruning_dim=0, "
        "pruning_norm=1, use_global_unstructured=False, use_lottery_ticket_hypothesis=False)` on every conv weight, "
        f"pruning once at the end of the first of its {args.finetune_epochs} fine-tuning epochs (same recipe as ours), "
        "masks made permanent at the end (`make_pruning_permanent=True`), so the measured model is a plain network "
        "whose pruned filters are zeros.",
        f"- Accuracy reference: the dense network trained for the same {args.finetune_epochs} extra epochs (same "
        "recipe, no pruning), so that the accuracy change measures pruning, not the extra training.",
        f"- Latency: median over {args.rounds} interleaved rounds (each round times dense, ours, masked: 1 warm-up "
        f"and the median of 3 forward passes) of a batch of {args.latency_batch} in eval mode under "
        "`torch.inference_mode()`, `torch.set_num_threads(1)`. The machine is a shared 2-core VM "
        f"({platform.processor() or platform.machine()}) with other jobs running, so absolute times are noisy; "
        "the ratios come from the same rounds.",
        f"- Seeds: {[r['seed'] for r in rows]}. Total runtime {runtime / 60:.1f} min wall clock (the machine was "
        "shared with other jobs).",
        "",
        "## Results (mean ± std over seeds)",
        "",
        "| model | MACs / image | params | latency, batch 64 (ms) | speedup vs dense | test accuracy (%) | "
        "accuracy vs reference (points) |",
        "|---|---|---|---|---|---|---|",
    ]
    for key in ("dense", "dense_ft", "ours", "masked"):
        macs = statistics.mean(r[key]["macs"] for r in rows) / 1e6
        params = statistics.mean(r[key]["params"] for r in rows) / 1e6
        lat = [r[key]["latency_ms"] for r in rows]
        speed = "1.00" if key.startswith("dense") else mean_std([r[key]["speedup"] for r in rows])
        acc = [100 * r[key]["test_acc"] for r in rows]
        delta = mean_std([100 * (r[key]["test_acc"] - r["dense_ft"]["test_acc"]) for r in rows]) if key in (
            "ours", "masked") else ""
        lines.append(f"| {names[key]} | {macs:.1f}M | {params:.2f}M | {mean_std(lat, 1)} | {speed} | {mean_std(acc)} | {delta} |")
    lines += [
        "",
        f"Ours removed {100 * statistics.mean(r['filter_share'] for r in rows):.1f}% of the conv filters; "
        f"ModelPruning zeroed {100 * statistics.mean(r['masked_zero_filter_share'] for r in rows):.1f}% of them "
        "(same L1 criterion, per layer rather than per coupled group), keeping every tensor's shape, so its MACs "
        "and parameter count are the dense ones.",
        "",
        "![latency and accuracy](pruning_speed.png)",
        "",
        "Per seed:",
        "",
        "| seed | dense ms | ours ms | masked ms | ours speedup | masked speedup | dense acc | reference acc | "
        "ours acc | masked acc |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['seed']} | {r['dense']['latency_ms']:.1f} | {r['ours']['latency_ms']:.1f} | "
            f"{r['masked']['latency_ms']:.1f} | {r['ours']['speedup']:.2f} | {r['masked']['speedup']:.2f} | "
            f"{100 * r['dense']['test_acc']:.2f} | {100 * r['dense_ft']['test_acc']:.2f} | "
            f"{100 * r['ours']['test_acc']:.2f} | {100 * r['masked']['test_acc']:.2f} |"
        )
    speed = statistics.mean(r["ours"]["speedup"] for r in rows)
    drop = statistics.mean(100 * (r["dense_ft"]["test_acc"] - r["ours"]["test_acc"]) for r in rows)
    masked_speed = statistics.mean(r["masked"]["speedup"] for r in rows)
    speed_ok, acc_ok, masked_ok = speed >= 1.6, drop <= 1.0, abs(masked_speed - 1.0) <= 0.1
    ref_gain = statistics.mean(100 * (r["dense_ft"]["test_acc"] - r["dense"]["test_acc"]) for r in rows)
    macs_ratio = statistics.mean(r["dense"]["macs"] / r["ours"]["macs"] for r in rows)
    verdict = "met" if speed_ok and acc_ok else "partly met" if speed_ok or acc_ok else "not met"
    lines += [
        "", "## Verdict", "",
        f"**Goal {verdict}.** Physically pruned to {100 * statistics.mean(1 - r['ours']['macs'] / r['dense']['macs'] for r in rows):.1f}% "
        f"fewer MACs, the network ran {speed:.2f}x faster than the dense one (goal: >= 1.6x, "
        f"{'met' if speed_ok else 'not met'}); its test accuracy differed from the dense network trained as long by "
        f"{-drop:+.2f} points (goal: at most 1 point lost, {'met' if acc_ok else 'not met'}), mean over seeds. ModelPruning's masked model ran at {masked_speed:.2f}x, "
        f"{'near 1.0x as expected: ' if masked_ok else 'more than 0.1 away from 1.0x, most likely timing noise of the shared machine: '}"
        "its tensors keep the dense shapes, so the zeroed filters are still computed.",
        "",
        f"Why the accuracy goal is missed: the reference gained {ref_gain:.1f} points from its {args.finetune_epochs} "
        "extra epochs, so at this budget (chosen to fit a 2-core CPU) the dense network is far from converged and the "
        "comparison measures how fast a network with half the MACs catches up in a short fine-tune, not what it can "
        "reach. The 1-point goal needs a converged dense model and a longer fine-tune; that run was not made.",
        "",
        f"Why the speedup ({speed:.2f}x) is below the MACs ratio ({macs_ratio:.2f}x): the batch-64 forward pass also spends time "
        "in operations that shrink less or not at all (the stem works on full-resolution 28x28 maps, BatchNorm, "
        "ReLU, residual adds and pooling are memory-bound, and smaller convolutions use the CPU's vector units "
        "less efficiently, which `round_to=8` partly offsets). Larger inputs or wider layers would move the ratio "
        "closer to the MACs ratio; this page reports this model at this size only.",
    ]
    (args.out / "pruning_speed.md").write_text("\n".join(lines) + "\n")
    if not args.report_only:
        RAW.parent.mkdir(parents=True, exist_ok=True)
        RAW.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
                                   "runtime_s": runtime}, indent=1))

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    keys = ["dense", "ours", "masked"]
    labels = ["dense", "ours\n(physical)", "ModelPruning\n(masked)"]
    colors = ["tab:grey", "tab:red", "tab:blue"]
    lat = [[r[k]["latency_ms"] for r in rows] for k in keys]
    acc = [[100 * r[k]["test_acc"] for r in rows] for k in ["dense_ft", "ours", "masked"]]  # dense: the reference
    for ax, values, title in ((axes[0], lat, f"CPU latency, batch {args.latency_batch} (ms)"),
                              (axes[1], acc, "test accuracy (%); dense: trained as long")):
        means = [statistics.mean(v) for v in values]
        errs = [statistics.stdev(v) if len(v) > 1 else 0 for v in values]
        ax.bar(labels, means, yerr=errs, color=colors, capsize=4)
        ax.set_title(title, fontsize=9)
    axes[1].set_ylim(min(min(a) for a in acc) - 3, max(max(a) for a in acc) + 1)
    for i, k in enumerate(keys[1:], start=1):
        axes[0].annotate(f"{statistics.mean(r[k]['speedup'] for r in rows):.2f}x", (i, statistics.mean(lat[i])),
                         ha="center", va="bottom", fontsize=8)
    fig.suptitle(f"ResNet-10t on Fashion-MNIST, {int(100 * args.target)}% MACs target, {len(rows)} seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out / "pruning_speed.png", dpi=120)
    print(f"wrote {args.out / 'pruning_speed.md'} ({runtime / 60:.1f} min)")


if __name__ == "__main__":
    main()
