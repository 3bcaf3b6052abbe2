"""Benchmark: `configs/fashion_mnist.yaml` (ImageClassifier, timm ResNet-10t, on the full Fashion-MNIST).

Runs the config through the library's CLI once per seed, records validation accuracy per epoch, test
accuracy/F1 of the best-validation checkpoint and seconds per training epoch, then writes
`docs/results/image_classifier.{md,json,png}`.

    python benchmarks/image_classifier.py --seeds 0 1 2 --threads 2

Not part of the test suite: about 15 minutes per seed on 2 CPU cores (7-8 min per epoch), 45-60 min for 3 seeds.
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
from lightning.pytorch import Callback

from lightning_ext.cli import LightningExtCLI

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "fashion_mnist.yaml"
OUT = REPO / "docs" / "results"


class EpochTimer(Callback):
    """Wall-clock seconds of the training batches of each epoch (validation excluded) and val accuracy."""

    def __init__(self) -> None:
        self.train_seconds: list[float] = []
        self.val_acc: list[float] = []
        self.load_avg: list[float] = []  # 1-minute load average at each epoch end: was the machine shared?

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._t = time.perf_counter()

    def on_validation_start(self, trainer, pl_module) -> None:
        # Lightning validates at the end of the training epoch, before on_train_epoch_end
        if not trainer.sanity_checking:
            self.train_seconds.append(time.perf_counter() - self._t)
            self.load_avg.append(os.getloadavg()[0])

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.val_acc.append(float(trainer.callback_metrics["val_acc"]))
            print(f"  epoch {trainer.current_epoch}: val_acc={self.val_acc[-1]:.4f} "
                  f"train {self.train_seconds[-1]:.0f}s", flush=True)


def run_seed(seed: int, extra: list[str]) -> dict:
    cli = LightningExtCLI(
        args=["--config", str(CONFIG), f"--seed_everything={seed}", "--trainer.enable_progress_bar=false",
              f"--trainer.default_root_dir={REPO / 'runs' / 'bench_fashion_mnist' / f'seed{seed}'}", *extra],
        run=False,
    )
    timer = EpochTimer()
    cli.trainer.callbacks.append(timer)
    start = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    fit_seconds = time.perf_counter() - start
    best = cli.trainer.checkpoint_callback.best_model_path
    test = cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=best, weights_only=False, verbose=False)[0]
    return {"seed": seed, "val_acc": timer.val_acc, "train_epoch_seconds": timer.train_seconds,
            "fit_seconds": fit_seconds, "load_avg": timer.load_avg, "test_acc": test["test_acc"], "test_f1": test["test_f1"],
            "params": sum(p.numel() for p in cli.model.parameters())}


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f} (one seed)"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def write_report(runs: list[dict], args, total_seconds: float) -> None:
    from lightning_ext.core.plotting import new_figure, save_figure

    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "image_classifier.json").write_text(json.dumps(runs, indent=2))
    fig, ax = new_figure(figsize=(5, 3.5))
    for r in runs:
        ax.plot(range(1, len(r["val_acc"]) + 1), r["val_acc"], marker="o", label=f"seed {r['seed']}")
    ax.set_xlabel("epoch"), ax.set_ylabel("validation accuracy"), ax.grid(alpha=0.3), ax.legend()
    ax.set_title("ImageClassifier (resnet10t) on Fashion-MNIST")
    save_figure(fig, OUT / "image_classifier.png", dpi=120)
    epoch_s = [s for r in runs for s in r["train_epoch_seconds"]]
    rows = "\n".join(
        f"| {r['seed']} | {r['val_acc'][-1]:.4f} | {r['test_acc']:.4f} | {r['test_f1']:.4f} | "
        f"{statistics.mean(r['train_epoch_seconds']):.0f} |" for r in runs
    )
    cmd = f"python benchmarks/image_classifier.py --seeds {' '.join(map(str, args.seeds))} --threads {args.threads}"
    done = [r["seed"] for r in runs]
    if args.extra:
        cmd += " -- " + " ".join(args.extra)
    text = f"""# ImageClassifier on Fashion-MNIST

What this measures: the library's generic `ImageClassifier` (timm `resnet10t`, stem downsampling 2x instead of
ImageNet's 4x, {runs[0]['params']:,} parameters) trained by `configs/fashion_mnist.yaml` on the full
Fashion-MNIST (55,000 train / 5,000 validation / official 10,000 test), 2 epochs, AdamW, cosine schedule.
The test split is evaluated once, with the checkpoint of best validation accuracy. No tuning was done; the
config's hyperparameters were set once before this run.

Command (CPU, `torch.set_num_threads({args.threads})`, {platform.processor() or platform.machine()}, torch {torch.__version__}):

```bash
{cmd}
```

## Results (seeds finished: {done} of {args.seeds})

| | mean ± std |
|---|---|
| test accuracy | {mean_std([r['test_acc'] for r in runs])} |
| test macro-F1 | {mean_std([r['test_f1'] for r in runs])} |
| seconds per training epoch | {statistics.mean(epoch_s):.0f} ± {statistics.stdev(epoch_s) if len(epoch_s) > 1 else 0:.0f} |
| whole benchmark (wall clock) | {total_seconds / 60:.1f} min |
| 1-minute load average at epoch ends (2 cores) | {statistics.mean([x for r in runs for x in r['load_avg']]):.1f} |

| seed | final val acc | test acc | test F1 | s / epoch |
|---|---|---|---|---|
{rows}

![validation accuracy per epoch](image_classifier.png)

Raw numbers: [`image_classifier.json`](image_classifier.json).

A load average above 2 means other jobs shared the two cores during the run, so the seconds per epoch are
then an upper bound on what an idle machine takes.

## Verdict

This page is the foundation's baseline, not a paper claim: it shows the config trains a timm backbone on
28x28 grayscale images offline with an epoch in minutes on 2 CPU cores. Later issues compose their callbacks
onto this model and compare against these numbers.
"""
    (OUT / "image_classifier.md").write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("extra", nargs="*", help="extra CLI overrides, e.g. --trainer.max_epochs=1")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    runs = []
    for seed in args.seeds:
        print(f"seed {seed}", flush=True)
        runs.append(run_seed(seed, args.extra))
        print(f"  test_acc={runs[-1]['test_acc']:.4f}", flush=True)
        write_report(runs, args, time.perf_counter() - start)  # after every seed, so a cut-off run still reports
    print((OUT / "image_classifier.md").read_text())


if __name__ == "__main__":
    main()
