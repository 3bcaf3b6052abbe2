"""Benchmark: UDFC (`DataFreeCompression`) against naive prune-and-quantize, without data and without fine-tuning.

Per seed and setting, a BN CNN is trained with the library (ImageClassifier + a DataModule + Trainer); then
copies of the trained model are compressed by `data_free_compress` in every variant below, touching no data,
and evaluated on the validation and test splits:

- `naive`: prune 30% of the channels of every prunable conv (same L1 choice as UDFC) + 6-bit per-channel
  weights, no compensation;
- `udfc`: the same with the closed-form compensation (the method);
- ablations: `udfc_mean_only` (an overwhelming ridge: only the expected value of the lost activations is
  restored), `udfc_no_bias` (no bias correction), `udfc_linear` (moments without the ReLU), prune-only and
  quantize-only pairs, and 4-bit pairs.

Settings: `digits_cnn` (the spec's smallest experiment: conv 1-32-64, BN, ReLU, GAP, FC, 20 epochs, digits),
`digits_resnet18` (the quickstart's timm ResNet-18 on digits, 10 epochs), `fmnist_cnn` (conv 1-32-64-128 with
max-pooling, 5 epochs on a 10% stratified subset of Fashion-MNIST, full official test set). ResNet-18
uses the first 3 seeds only (its training dominates the run time).

Writes docs/results/data_free_compression.{md,json,png}. Single-threaded (torch.set_num_threads(1)). The page
also summarises the earlier run with `input_model="fitted"` as default (data_free_compression_seeds0-4.json)
and the selection run (data_free_compression_selection.json) when those files exist.

    python benchmarks/data_free_compression.py --seeds 5 6 7 8 9 --settings digits_cnn fmnist_cnn
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from torch import nn

from lightning_ext.compression.data_free_compression import data_free_compress
from lightning_ext.compression import measure_latency
from lightning_ext.datamodules import DigitsDataModule, FashionMNISTDataModule
from lightning_ext.modules import ImageClassifier

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "results"

PRUNE, BITS = 0.3, 6
VARIANTS = {
    "naive": dict(compensate=False),
    "udfc": dict(),
    "udfc_mean_only": dict(ridge=1e12),
    "udfc_no_bias": dict(bias_correction=False),
    "udfc_linear": dict(activation_aware=False),
    "udfc_fitted": dict(input_model="fitted"),
    "udfc_shared": dict(input_model="shared"),
    "prune_naive": dict(weight_bits=None, compensate=False),
    "prune_udfc": dict(weight_bits=None),
    "quant_naive": dict(pruning_ratio=None, compensate=False),
    "quant_udfc": dict(pruning_ratio=None),
    "naive_w4": dict(weight_bits=4, compensate=False),
    "udfc_w4": dict(weight_bits=4),
}
RIDGES = [0.0, 1e-4, 1e-3, 1e-2, 1e-1, 1.0]  # validation-only sensitivity of `udfc` on digits_cnn


def cnn(widths, pool: bool) -> nn.Module:
    layers, c = [], 1
    for w in widths:
        layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
        if pool:
            layers.append(nn.MaxPool2d(2))
        c = w
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10))


SETTINGS = {
    "digits_cnn": dict(
        title="CNN conv 1-32-64 + BN + ReLU, GAP, FC on digits (the spec's experiment)",
        model=lambda: ImageClassifier(cnn((32, 64), pool=False), num_classes=10, image_size=8, lr=3e-3),
        data=lambda seed: DigitsDataModule(batch_size=64, shuffle_seed=seed), epochs=20),
    "digits_resnet18": dict(
        title="timm ResNet-18 (ImageClassifier, stem adapted to 8x8) on digits",
        model=lambda: ImageClassifier("resnet18", num_classes=10, in_chans=1, image_size=8, lr=3e-3),
        data=lambda seed: DigitsDataModule(batch_size=64, shuffle_seed=seed), epochs=10, max_seeds=3),
    "fmnist_cnn": dict(
        title="CNN conv 1-32-64-128 + BN + ReLU + max-pool, GAP, FC on Fashion-MNIST (10% of train)",
        model=lambda: ImageClassifier(cnn((32, 64, 128), pool=True), num_classes=10, image_size=28, lr=3e-3),
        data=lambda seed: FashionMNISTDataModule(batch_size=128, train_fraction=0.1, shuffle_seed=seed), epochs=5),
}


class Progress(Callback):
    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            print(f"    epoch {trainer.current_epoch}: val_acc={float(trainer.callback_metrics['val_acc']):.4f}",
                  flush=True)


def accuracy(model: nn.Module, dataset) -> float:
    x, y = dataset.tensors
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), 1000):
            correct += (model(x[i:i + 1000]).argmax(1) == y[i:i + 1000]).sum().item()
    return correct / len(x)


def interleaved_latency(a: nn.Module, b: nn.Module, x: torch.Tensor, rounds: int = 7, repeats: int = 10):
    """Median latency of two models measured alternately (fair under a shared, noisy CPU)."""
    ta, tb = [], []
    for _ in range(rounds):
        ta.append(1000 * measure_latency(a, x, repeats=repeats))
        tb.append(1000 * measure_latency(b, x, repeats=repeats))
    return statistics.median(ta), statistics.median(tb)


def run_setting(name: str, seed: int) -> dict:
    spec = SETTINGS[name]
    seed_everything(seed, workers=True)
    model, dm = spec["model"](), spec["data"](seed)
    print(f"  [{name}] seed {seed}: training {spec['epochs']} epochs", flush=True)
    start = time.perf_counter()
    Trainer(max_epochs=spec["epochs"], accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, callbacks=[Progress()],
            default_root_dir=str(REPO / "runs" / "bench_udfc")).fit(model, datamodule=dm)
    train_s = time.perf_counter() - start
    dm.setup()
    example = torch.zeros(2, *dm.input_shape)  # shapes only: no data reaches the compression
    res = {"seed": seed, "train_seconds": train_s, "val": {"base": accuracy(model, dm.val_set)},
           "test": {"base": accuracy(model, dm.test_set)}, "compress_seconds": {}}
    compressed = {}
    for variant, kwargs in VARIANTS.items():
        m = copy.deepcopy(model)
        args = dict(pruning_ratio=PRUNE, weight_bits=BITS, measure=False, seed=seed)
        args.update(kwargs)
        t = time.perf_counter()
        report = data_free_compress(m, example, **args)
        res["compress_seconds"][variant] = time.perf_counter() - t
        res["val"][variant], res["test"][variant] = accuracy(m, dm.val_set), accuracy(m, dm.test_set)
        compressed[variant] = m
        if variant == "udfc":
            res["params"] = (report.params_before, report.params_after)
            res["macs"] = (report.macs_before, report.macs_after)
            res["layers"] = [{k: v for k, v in row.items() if k != "pruned"} for row in report.layers]
    if name == "digits_cnn":
        res["ridge_val"] = {}
        for ridge in RIDGES:
            m = copy.deepcopy(model)
            data_free_compress(m, example, pruning_ratio=PRUNE, weight_bits=BITS, ridge=ridge, measure=False, seed=seed)
            res["ridge_val"][str(ridge)] = accuracy(m, dm.val_set)
        sweep = " ".join(f"{k}={v:.3f}" for k, v in res["ridge_val"].items())
        print(f"  [{name}] seed {seed}: ridge sweep (val) {sweep}", flush=True)
    x = torch.zeros(256, *dm.input_shape)
    res["latency_ms"] = interleaved_latency(model, compressed["udfc"], x)
    t = res["test"]
    res["recovery"] = (t["udfc"] - t["naive"]) / (t["base"] - t["naive"]) if t["base"] > t["naive"] else float("nan")
    print(f"  [{name}] seed {seed}: val " + " ".join(f"{k}={v:.3f}" for k, v in res["val"].items()), flush=True)
    print(f"  [{name}] seed {seed}: test base {t['base']:.4f} naive {t['naive']:.4f} udfc {t['udfc']:.4f} "
          f"(recovery {res['recovery']:.2f}); params {res['params'][0]:,}->{res['params'][1]:,}; "
          f"latency {res['latency_ms'][0]:.1f}->{res['latency_ms'][1]:.1f} ms; train {train_s:.0f}s", flush=True)
    return res


def ms(values) -> str:
    values = list(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {sd:.4f}"


SELECTION = OUT / "data_free_compression_selection.json"
EARLIER = OUT / "data_free_compression_seeds0-4.json"  # the run with `fitted` as default, see the report


def verdict(results: dict) -> tuple[str, list[str]]:
    """`reproduced` / `partly` / `not` from the spec's criterion, judged on the settings where naive loses."""
    lines, judged = [], []
    for name, runs in results.items():
        lost = [r["test"]["base"] - r["test"]["naive"] for r in runs]
        if statistics.mean(lost) < 0.02:
            lines.append(f"- `{name}`: naive prune+quantize loses {statistics.mean(lost):+.4f} test accuracy on "
                         "average, so there is nothing to recover; not counted.")
            continue
        rec = [r["recovery"] for r in runs]
        every = all(x >= 0.5 for x in rec)
        sign = all(r["test"]["udfc"] > r["test"]["naive"] for r in runs)
        judged.append(every and sign)
        lines.append(f"- `{name}`: recovery {', '.join(f'{x:.2f}' for x in rec)} (mean {statistics.mean(rec):.2f}); "
                     f">= 0.5 on every seed: {'yes' if every else 'no'}; UDFC above naive on every seed: "
                     f"{'yes' if sign else 'no'}.")
    if judged and all(judged):
        word = "reproduced"
    elif any(judged):
        word = "partly reproduced"
    else:
        word = "not reproduced"
    return word, lines


def write_report(results: dict, args, total_seconds: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "data_free_compression.json").write_text(json.dumps(results, indent=2))
    names = list(results)
    shown = ["base", *VARIANTS]
    fig, axes = plt.subplots(1, len(names), figsize=(5.6 * len(names), 4.4), squeeze=False)
    for ax, name in zip(axes[0], names):
        runs = results[name]
        means = [statistics.mean(r["test"][v] for r in runs) for v in shown]
        sds = [statistics.stdev([r["test"][v] for r in runs]) if len(runs) > 1 else 0 for v in shown]
        colors = ["grey" if v == "base" else ("tab:red" if "naive" in v else "tab:blue") for v in shown]
        ax.bar(range(len(shown)), means, yerr=sds, color=colors, capsize=3)
        ax.set_xticks(range(len(shown)), shown, rotation=60, ha="right", fontsize=8)
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{name} ({len(runs)} seeds)", fontsize=10)
        ax.set_ylabel("test accuracy (no data, no fine-tuning)")
    fig.suptitle(f"UDFC vs naive: {int(PRUNE * 100)}% of prunable channels removed + {BITS}-bit weights "
                 "(grey: uncompressed, red: naive, blue: UDFC variants); mean ± std over seeds")
    fig.tight_layout()
    fig.savefig(OUT / "data_free_compression.png", dpi=110)

    word, verdict_lines = verdict(results)
    seeds_used = {name: [r["seed"] for r in runs] for name, runs in results.items()}
    lines = [
        "# DataFreeCompression (UDFC): data-free pruning + quantization, no fine-tuning",
        "",
        "Paper: Bai, Chen, Shen, Qian, Liu, *Unified Data-Free Compression: Pruning and Quantization without "
        "Fine-Tuning*, ICCV 2023 (arXiv:2308.07209). Component: `lightning_ext.callbacks.DataFreeCompression`, "
        "functional core `data_free_compress` in `lightning_ext/compression/data_free_compression.py`.",
        "",
        f"**Verdict: {word}** for the spec's criterion (compensation recovers >= 50% of the test accuracy lost by "
        "naive prune+quantize at 30% pruning and 6-bit weights, consistently across seeds), on small models and "
        "datasets. The paper's own claim (ResNet-34 on ImageNet, +20.54% top-1 over the previous data-free "
        "method) is not tested here. The paper's equations could not be read (see *What is the paper's and what "
        "is ours*), so this is a test of the idea with our closed form, not of the paper's exact formulas.",
        "",
        *verdict_lines,
        "",
        "![test accuracy per variant](data_free_compression.png)",
        "",
        "## Command",
        "",
        "```bash",
        "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/data_free_compression.py "
        f"--seeds {' '.join(map(str, args.seeds))}"
        + (f" --settings {' '.join(args.settings)}" if args.settings != list(SETTINGS) else ""),
        "```",
        "",
        f"Single-threaded (`torch.set_num_threads(1)`), CPU only, on a 2-core machine shared with other jobs (so "
        f"absolute times are noisy; latency is compared in interleaved runs). Total wall time "
        f"{total_seconds / 60:.1f} min; torch {torch.__version__}, Python {platform.python_version()}.",
        "",
        "## Protocol",
        "",
        "Per seed: train the model (seeded init and shuffle) with the library's `ImageClassifier`, DataModule and "
        "`Trainer`; then compress copies with `data_free_compress(pruning_ratio=0.3, weight_bits=6)` in each "
        "variant. The compression receives a tensor of zeros for tracing and nothing else: no data, no "
        "fine-tuning, no BN recalibration. All variants remove the same channels (smallest L1 norm of the "
        "BN-folded filter, 30% of every prunable conv, i.e. every conv -> BN -> ReLU (-> max-pool) -> conv/linear "
        "chain not coupled to a residual) and quantize every conv/linear weight symmetrically per output "
        "channel; they differ only in the compensation. Accuracy on the test split (digits: 360 images; "
        "Fashion-MNIST: the official 10,000).",
        "",
        "Variants: `naive` = prune + quantize without compensation; `udfc` = with the closed-form compensation "
        "(defaults: `input_model=\"per_channel\"`, ridge 1e-3, 8,192 Gaussian draws); `udfc_mean_only` = ridge "
        "1e12, "
        "i.e. only the expected value of the lost activations is restored (no linear combination of other "
        "channels); `udfc_no_bias` = the linear combination without the bias correction; `udfc_linear` = moments "
        "computed as if there were no ReLU; `udfc_fitted` / `udfc_shared` = the other two Gaussian input "
        "models; `prune_*` = pruning only; `quant_*` = 6-bit quantization only; `*_w4` = 30% pruning + 4-bit.",
        "",
        "How the defaults were chosen (validation splits only): ridge 1e-3 and 8,192 draws were fixed a priori. "
        "A first selection run (seeds 10, 11; table below) picked `input_model=\"fitted\"` by mean validation "
        "accuracy, and a first evaluation ran on seeds 0-4 with that default (summarised at the end). On the "
        "VALIDATION split of those seeds `per_channel` was clearly better on Fashion-MNIST, so the default became "
        "`per_channel` and the method was evaluated again on fresh seeds, never used for any choice: "
        f"{', '.join(str(x) for x in args.seeds)} (the tables below).",
        "",
    ]
    if SELECTION.exists():
        sel = json.loads(SELECTION.read_text())
        models = ["udfc_per_channel", "udfc_shared", "udfc_fitted", "udfc_mean_only", "naive", "base"]
        lines += ["Selection run (validation accuracy, seeds 10 and 11, same settings except 20% of the Fashion-MNIST "
                  "training split; `per_channel` was the default during that run). Mean over the four runs: "
                  + ", ".join(f"`{m}` {statistics.mean(r['val'][m] for r in sel):.3f}" for m in
                              ("udfc_fitted", "udfc_per_channel", "udfc_shared"))
                  + "; `fitted` had the best mean and became the first default.", "",
                  "| setting | seed | " + " | ".join(models) + " |",
                  "|---|---|" + "---|" * len(models)]
        for row in sel:
            lines.append(f"| {row['setting']} | {row['seed']} | "
                         + " | ".join(f"{row['val'][m]:.3f}" for m in models) + " |")
        lines.append("")
    for name in names:
        runs = results[name]
        spec = SETTINGS[name]
        lines += [f"## {name}: {spec['title']}", "",
                  f"Seeds {', '.join(str(x) for x in seeds_used[name])}; {spec['epochs']} training epochs.", "",
                  "| variant | test accuracy | validation accuracy |", "|---|---|---|"]
        for v in shown:
            lines.append(f"| `{v}` | {ms(r['test'][v] for r in runs)} | {ms(r['val'][v] for r in runs)} |")
        rec = [r["recovery"] for r in runs]
        p0, p1 = runs[0]["params"]
        m0, m1 = runs[0]["macs"]
        lat0 = [r["latency_ms"][0] for r in runs]
        lat1 = [r["latency_ms"][1] for r in runs]
        ratio = [b / a for a, b in zip(lat0, lat1)]
        comp = [r["compress_seconds"]["udfc"] for r in runs]
        compn = [r["compress_seconds"]["naive"] for r in runs]
        lines += [
            "",
            "- Recovery `(udfc - naive) / (base - naive)` of test accuracy per seed: "
            + ", ".join("n/a" if x != x else f"{x:.2f}" for x in rec) + ".",
            f"- Parameters {p0:,} -> {p1:,} ({p1 / p0:.1%} kept); MACs per image {m0:,} -> {m1:,} ({m1 / m0:.1%}).",
            f"- Latency of a batch of 256 (1 thread, median of 7 interleaved rounds of 10 passes): {ms(lat0)} ms -> "
            f"{ms(lat1)} ms; ratio compressed/original {ms(ratio)}. Weights are fake-quantized floats, so only the "
            "pruning changes speed; stored at 6 bits the weights would take 6/32 of their float32 bytes.",
            f"- Compression time: UDFC {ms(comp)} s vs naive {ms(compn)} s (training took "
            f"{ms(r['train_seconds'] for r in runs)} s).",
            "",
        ]
        if "ridge_val" in runs[0]:
            keys = list(runs[0]["ridge_val"])
            lines += ["Ridge sensitivity of `udfc` (validation accuracy; reported, not used to choose anything):", "",
                      "| ridge | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys),
                      "| val acc | " + " | ".join(ms(r["ridge_val"][k] for r in runs) for k in keys) + " |", ""]
        lines += [f"Per layer (seed {runs[0]['seed']}, `udfc`): the model's expected reconstruction error "
                  "`sum_i E[e_i^2]` of the next layer's input, before -> after compensation (under the Gaussian "
                  "model, not measured on data):", "",
                  "| layer | action | channels | model error before | after |", "|---|---|---|---|---|"]
        for row in runs[0]["layers"]:
            if "error_after" in row:
                lines.append(f"| `{row['name']}` | {row['action']} | {row['channels_before']} -> "
                             f"{row['channels_after']} | {row['error_before']:.3g} | {row['error_after']:.3g} |")
        lines.append("")
    if EARLIER.exists():
        earlier = json.loads(EARLIER.read_text())
        cols = ["base", "naive", "udfc_fitted", "udfc_per_channel", "udfc_mean_only"]
        lines += ["## First evaluation: seeds 0-4 with `fitted` as default", "",
                  f"Same protocol and code except the default; raw numbers in `{EARLIER.name}` (there `udfc` is "
                  "`fitted`). Test accuracy, mean ± std, then the recovery per seed:", "",
                  "| setting | seeds | " + " | ".join(f"`{c}`" for c in cols) + " |", "|---|---|" + "---|" * len(cols)]
        for name, runs in earlier.items():
            cells = [ms(r["test"]["udfc" if c == "udfc_fitted" else c] for r in runs) for c in cols]
            lines.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + " |")
        lines.append("")
        for name, runs in earlier.items():
            for c, key in (("udfc_fitted", "udfc"), ("udfc_per_channel", "udfc_per_channel")):
                rec = [(r["test"][key] - r["test"]["naive"]) / (r["test"]["base"] - r["test"]["naive"])
                       if r["test"]["base"] > r["test"]["naive"] else float("nan") for r in runs]
                lines.append(f"- {name}, `{c}`: recovery " + ", ".join("n/a" if x != x else f"{x:.2f}" for x in rec))
        lines += ["", "With `fitted`, the Fashion-MNIST CNN missed the criterion on 2 of 5 seeds. The ResNet-18 on "
                  "digits loses almost nothing to naive pruning (its prunable channels are the inner convs of "
                  "residual blocks), so there is nothing to recover and it was not re-run.", ""]
    lines += [
        "## What is the paper's and what is ours",
        "",
        "Confirmed from the paper (abstract, Fig. 1 caption, and a third-party summary of the paper; we could not "
        "read its method section or equations): pruning and quantization together with no data and no "
        "fine-tuning; the assumption that part of the information of a damaged (pruned or quantized) channel "
        "is a linear combination of other channels; compensation by changing the input channels of layer l+1 to "
        "keep the feature map Z^(l+1); a reconstruction error between the original and compressed networks "
        "minimised in closed form; two different scale factors S and S'. The summary also mentions "
        "hyper-parameters alpha1 = 0.01 and alpha2 = 0.008, which we could not map onto a formula.",
        "",
        "Ours (not confirmed): the Gaussian model of the channels from BN statistics (each channel with BN's own "
        "mean and variance, correlated as its filter would be on a white input), the multivariate least-squares regression of the damage on the kept quantized "
        "channels (its rows for pruned channels play the role of S, its diagonal for quantized channels that of "
        "S'), the seeded Monte-Carlo moments through the real activation, the ridge and the bias correction. "
        "No official code was released (an awesome-list links github.com/Dtudy/UDFC, which we could not inspect).",
        "",
    ]
    (OUT / "data_free_compression.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--no-report", action="store_true", help="do not write docs/results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    results = {}
    for name in args.settings:
        print(f"== {name}: {SETTINGS[name]['title']}", flush=True)
        seeds = args.seeds[: SETTINGS[name].get("max_seeds", len(args.seeds))]
        results[name] = [run_setting(name, seed) for seed in seeds]
    total = time.perf_counter() - start
    print(f"total {total / 60:.1f} min", flush=True)
    if not args.no_report:
        write_report(results, args, total)
        print(f"wrote {OUT / 'data_free_compression.md'}", flush=True)


if __name__ == "__main__":
    main()
