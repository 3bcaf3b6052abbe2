"""Benchmark: does FroSSL reach a given accuracy in fewer epochs than VICReg, Barlow Twins and SimCLR?

The convergence claim of Skean et al., "FroSSL: Frobenius Norm Minimization for Efficient Multiview
Self-Supervised Learning" (ECCV 2024, arXiv:2310.02903), tested at CPU scale on Fashion-MNIST, one run,
single-threaded (``torch.set_num_threads(1)``):

- Data: a fixed, class-stratified 5,000-image subset of the Fashion-MNIST training split (the same subset
  for every run); a 1,000-image validation split carved from the official training split; the official
  10,000-image test split, used once per run after training. Curves, targets and every choice below use
  validation only.
- Identical for every method: backbone (``ConvEncoder`` widths 16/32/64, 23k parameters), projector
  (512-512-256, BatchNorm), batch 256 (19 steps per epoch, last incomplete batch dropped), augmentations
  (``MultiViewAugmentation``: 20x20 random resized crops of area 0.2-1, flip, brightness/contrast jitter;
  the views are seeded per batch, so for a given seed all methods see the same augmented images;
  evaluation resizes the 28x28 images to 20x20), AdamW lr 1e-3 with weight decay 1e-4 and a cosine schedule
  per step, online linear probe (lr 1e-2 in its own group, detached features), the same seeds (init, batch
  order, views) and epochs.
- Methods (loss hyperparameters from the papers/reference configs, not tuned here): FroSSL with 2 and 4
  views (invariance weight 1.0), VICReg (25/25/1), Barlow Twins (lambda 5.1e-3), SimCLR (temperature 0.2,
  solo-learn's CIFAR value).
- Measured per epoch on the validation split: weighted kNN accuracy (k = 20, tau = 0.07, bank = 2,500
  fixed training images), an offline linear probe (logistic regression, C = 1, on standardised frozen
  features of the same 2,500 clean images), the online probe's accuracy, and the effective rank of the
  backbone features.
  Before training, the kNN accuracy of the random-init encoder (the same for all methods of a seed).
- Per run: median training-step time (forward, backward, optimizer), reported relative to SimCLR.

Writes ``docs/results/frossl.json`` (all curves; updated after each run, and runs already in it are skipped,
so an interrupted benchmark resumes) and ``docs/results/frossl.png``, and prints the markdown tables used in
``docs/results/frossl.md``.

    python benchmarks/self_supervised.py            # 15 runs: ~30 min on one idle CPU thread, ~1 h under load
    python benchmarks/self_supervised.py --quick    # smoke test of the script (~2 min, numbers meaningless)
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Optional

import torch
from lightning.pytorch import Callback, Trainer, seed_everything

from lightning_ext.ssl.knn_evaluation import KNNEvaluation, knn_predict
from lightning_ext.data.base import Arrays
from lightning_ext.data.fashion_mnist import FashionMNISTDataModule
from lightning_ext.modules import BarlowTwins, FroSSL, SimCLR, VICReg
from lightning_ext.ssl.multi_view_augmentation import MultiViewAugmentation
from lightning_ext.ssl.self_supervised import ConvEncoder, WarmupCosineLR

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "results"

CONFIGS = {  # name -> (class, method arguments)
    "FroSSL (V=2)": (FroSSL, {"num_views": 2, "invariance_weight": 1.0}),
    "FroSSL (V=4)": (FroSSL, {"num_views": 4, "invariance_weight": 1.0}),
    "VICReg": (VICReg, {"invariance_weight": 25.0, "variance_weight": 25.0, "covariance_weight": 1.0}),
    "Barlow Twins": (BarlowTwins, {"off_diagonal_weight": 5.1e-3}),
    "SimCLR": (SimCLR, {"temperature": 0.2, "proj_layers": 3}),
}
DEFAULT_METHODS = list(CONFIGS)
# an invariance-weight sweep for FroSSL (Appendix A's open question), judged on validation only:
#   python benchmarks/self_supervised.py --methods "FroSSL (V=2, w=0.25)" ... --seeds 0
for _w in (0.25, 4.0, 16.0):  # 4 = the official D/N balance at D = N (see docs/results/frossl.md)
    CONFIGS[f"FroSSL (V=2, w={_w:g})"] = (FroSSL, {"num_views": 2, "invariance_weight": _w})


class CachedFashionMNIST(FashionMNISTDataModule):
    """FashionMNISTDataModule that reads the IDX files once per process."""

    _arrays: Optional[Arrays] = None

    def load_arrays(self) -> Arrays:
        if CachedFashionMNIST._arrays is None:
            CachedFashionMNIST._arrays = super().load_arrays()
        return CachedFashionMNIST._arrays


class LinearProbe(Callback):
    """Offline linear probe per epoch: logistic regression on frozen, standardised features of clean images.

    Fitted on the kNN bank (the same fixed training images), scored on the validation split each epoch and on
    the test split after training. Unlike the online probe (trained by SGD on augmented views while the
    encoder moves), it measures the linear separability of the current representation directly.
    """

    def __init__(self, bank_size: int) -> None:
        self.bank_size, self.val_acc, self.test_acc, self._fitted = bank_size, {}, None, None

    def _xy(self, pl_module, dataset):
        knn = KNNEvaluation(max_bank_size=None)
        feats, labels = knn._features(pl_module, dataset)
        return feats.numpy(), labels.numpy()

    def fit_and_score(self, trainer, pl_module, split: str, dm=None) -> float:
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        dm = dm if dm is not None else trainer.datamodule
        bank = KNNEvaluation(max_bank_size=self.bank_size)._limit(dm.train_set, self.bank_size)
        x, y = self._xy(pl_module, bank)
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500, C=1.0)).fit(x, y)
        xq, yq = self._xy(pl_module, dm.val_set if split == "val" else dm.test_set)
        return float((clf.predict(xq) == yq).mean())

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.val_acc[trainer.current_epoch + 1] = self.fit_and_score(trainer, pl_module, "val")


class Recorder(Callback):
    """Per-epoch validation metrics and per-step training time (optimizer step included)."""

    KEYS = ("val_probe_acc", "val_knn_acc", "train_loss_epoch", "train_feature_rank", "train_projection_rank")

    def __init__(self, label: str, linear: LinearProbe) -> None:
        self.label, self.epochs, self.step_times, self._t0, self._epoch_start = label, [], [], 0.0, 0.0
        self.linear = linear

    def on_train_epoch_start(self, trainer, pl_module):
        self._epoch_start = time.time()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.step_times.append(time.perf_counter() - self._t0)

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        row = {"epoch": trainer.current_epoch + 1}
        row.update({k: float(trainer.callback_metrics[k]) for k in self.KEYS if k in trainer.callback_metrics})
        row["val_linear_acc"] = self.linear.val_acc.get(row["epoch"], float("nan"))
        if len(self.epochs) and self.epochs[-1]["epoch"] == row["epoch"]:
            self.epochs[-1].update(row)
        else:
            self.epochs.append(row)

    def on_train_epoch_end(self, trainer, pl_module):
        m = trainer.callback_metrics
        epoch = trainer.current_epoch + 1  # training metrics are aggregated after the epoch's validation
        if not self.epochs or self.epochs[-1]["epoch"] != epoch:
            self.epochs.append({"epoch": epoch})
        self.epochs[-1].update({k: float(m[k]) for k in self.KEYS if k.startswith("train_") and k in m})
        print(f"  [{self.label}] epoch {trainer.current_epoch + 1}/{trainer.max_epochs} "
              f"loss {float(m.get('train_loss_epoch', float('nan'))):.3f} "
              f"probe {float(m.get('val_probe_acc', float('nan'))):.3f} "
              f"linear {self.linear.val_acc.get(epoch, float('nan')):.3f} "
              f"knn {float(m.get('val_knn_acc', float('nan'))):.3f} "
              f"({time.time() - self._epoch_start:.0f} s)", flush=True)


def make_datamodule(args, seed: int) -> CachedFashionMNIST:
    val_fraction = args.val_size / 60000
    train_pool = 60000 - args.val_size
    return CachedFashionMNIST(
        batch_size=args.batch_size, drop_last=True, val_fraction=val_fraction,
        train_fraction=min(1.0, args.train_size / train_pool), train_subset_seed=0, shuffle_seed=seed,
    )


def make_model(cls, method_kwargs: dict, args, steps: int):
    return cls(
        ConvEncoder(1, (16, 32, 64)), in_chans=1, image_size=28, proj_hidden_dim=512, proj_output_dim=256,
        augmentation=MultiViewAugmentation(crop_size=20, crop_scale=(0.2, 1.0), flip_p=0.5, brightness=0.4,
                                           contrast=0.4, jitter_p=0.8),
        eval_resize=20, num_classes=10, probe_lr=1e-2,
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=1e-4),
        scheduler=functools.partial(WarmupCosineLR, warmup_steps=0, total_steps=steps), scheduler_interval="step",
        **method_kwargs,
    )


@torch.no_grad()
def init_knn(model, dm, bank_size: int) -> float:
    """Validation kNN accuracy of the untrained encoder (same bank rule as KNNEvaluation)."""
    knn = KNNEvaluation(k=20, temperature=0.07, max_bank_size=bank_size)
    bank_set = knn._limit(dm.train_set, bank_size)
    model.eval()
    xb = torch.stack([bank_set[i][0] for i in range(len(bank_set))])
    yb = torch.tensor([int(bank_set[i][1]) for i in range(len(bank_set))])
    xq, yq = dm.val_set.tensors
    preds = knn_predict(model(xq), model(xb), yb, 10, k=20, temperature=0.07)
    model.train()
    return float((preds == yq).float().mean())


def run_one(name: str, seed: int, args) -> dict:
    cls, method_kwargs = CONFIGS[name]
    dm = make_datamodule(args, seed)
    dm.setup("fit")
    steps = args.epochs * (len(dm.train_set) // args.batch_size)
    seed_everything(seed, verbose=False)
    model = make_model(cls, method_kwargs, args, steps)
    knn0 = init_knn(model, dm, args.bank_size)
    linear = LinearProbe(args.bank_size)
    linear0 = linear.fit_and_score(None, model, "val", dm)
    rec = Recorder(f"{name} seed {seed}", linear)
    knn = KNNEvaluation(k=20, temperature=0.07, max_bank_size=args.bank_size, batch_size=1000)
    trainer = Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      callbacks=[knn, linear, rec])
    start = time.time()
    load_before = os.getloadavg()[0]
    trainer.fit(model, datamodule=dm)
    fit_s = time.time() - start
    test = trainer.test(model, datamodule=dm, verbose=False)[0]
    test_linear = linear.fit_and_score(trainer, model, "test")
    args.weights_dir.mkdir(parents=True, exist_ok=True)
    torch.save(model.backbone.state_dict(), args.weights_dir / f"{name.replace(' ', '_')}_seed{seed}.pt")
    return {
        "method": name, "seed": seed, "epochs": rec.epochs, "init_val_knn_acc": knn0, "init_val_linear_acc": linear0,
        "test_probe_acc": float(test["test_probe_acc"]), "test_knn_acc": float(test["test_knn_acc"]),
        "test_linear_acc": test_linear,
        "median_step_s": statistics.median(rec.step_times), "fit_s": fit_s, "train_size": len(dm.train_set),
        "val_size": len(dm.val_set), "loadavg_1min_start": load_before, "loadavg_1min_end": os.getloadavg()[0],
        "skipped_steps": model.skipped_steps,
    }


# -- summaries --------------------------------------------------------------------------------------------------


def mean_std(values, scale: float = 1.0, digits: int = 2) -> str:
    values = [v * scale for v in values]
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {std:.{digits}f}"


def curve(run: dict, key: str) -> list[float]:
    return [row[key] for row in run["epochs"]]


def first_epoch(values: list[float], target: float) -> Optional[int]:
    for i, v in enumerate(values):
        if v >= target:
            return i + 1
    return None


def summarise(runs: list[dict], methods: list[str], target_share: float) -> str:
    lines = []
    by = {m: [r for r in runs if r["method"] == m] for m in methods}
    by = {m: rs for m, rs in by.items() if rs}
    for key, label in (("val_knn_acc", "kNN"), ("val_linear_acc", "linear probe (offline)"),
                       ("val_probe_acc", "online probe")):
        # the target comes from the five main configurations only (a sweep entry must not move it)
        finals = {m: statistics.mean(curve(r, key)[-1] for r in rs) for m, rs in by.items()
                  if m in DEFAULT_METHODS or not set(by) & set(DEFAULT_METHODS)}
        # the common target: init + share x (lowest final mean - init), i.e. a share of the gain over the random
        # encoder that every method makes on average (for the online probe, which has no init value: share x
        # the lowest final mean)
        inits = [r.get(f"init_{key}") for m in finals for r in by[m]]
        base = statistics.mean(inits) if None not in inits else 0.0
        target = base + target_share * (min(finals.values()) - base)
        lines.append(f"\n### {label}: validation accuracy (%) per epoch, mean ± std over seeds\n")
        num_epochs = max(len(r["epochs"]) for rs in by.values() for r in rs)
        header = "| method | " + " | ".join(f"ep {e}" for e in range(1, num_epochs + 1)) + " |"
        if key in ("val_knn_acc", "val_linear_acc"):
            header = header.replace("| method | ", "| method | init | ")
        lines += [header, "|" + "---|" * (header.count("|") - 1)]
        for m, rs in by.items():
            cells = [mean_std([curve(r, key)[e] for r in rs], 100, 1) for e in range(num_epochs)]
            if key in ("val_knn_acc", "val_linear_acc"):
                cells = [mean_std([r[f"init_{key}"] for r in rs], 100, 1)] + cells
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        how = (f"random init + {target_share:.0%} of the way to the lowest final mean" if base
               else f"{target_share:.0%} of the lowest final mean")
        lines.append(f"\nCommon target ({label}): {how} = **{100 * target:.2f}%**. "
                     "Epoch at which each seed first reaches it:\n")
        lines += ["| method | epochs to target (per seed) | mean | early: mean of epochs 1-2 (%) | final val (%) |",
                  "|---|---|---|---|---|"]
        for m, rs in by.items():
            eps = [first_epoch(curve(r, key), target) for r in rs]
            shown = ", ".join("-" if e is None else str(e) for e in eps)
            reached = [e for e in eps if e is not None]
            mean = f"{statistics.mean(reached):.2f}" if len(reached) == len(eps) else "not all reach it"
            early = mean_std([statistics.mean(curve(r, key)[:2]) for r in rs], 100)
            lines.append(f"| {m} | {shown} | {mean} | {early} | {mean_std([curve(r, key)[-1] for r in rs], 100)} |")
    simclr = [r["median_step_s"] for r in by.get("SimCLR", [])]
    lines += ["\n### Test accuracy after the last epoch (%), step time\n",
              "| method | test kNN | test linear (offline) | test online probe | median step (ms) | step time / SimCLR "
              "| effective rank (features, last epoch) | fit time per run (s) |",
              "|---|---|---|---|---|---|---|---|"]
    for m, rs in by.items():
        step = statistics.mean(r["median_step_s"] for r in rs)
        ratio = f"{step / statistics.mean(simclr):.2f}x" if simclr else "-"
        rank = mean_std([curve(r, "train_feature_rank")[-1] for r in rs], 1, 1)
        lines.append(f"| {m} | {mean_std([r['test_knn_acc'] for r in rs], 100)} | "
                     f"{mean_std([r['test_linear_acc'] for r in rs], 100)} | "
                     f"{mean_std([r['test_probe_acc'] for r in rs], 100)} | {1000 * step:.0f} | {ratio} | {rank} | "
                     f"{statistics.mean(r['fit_s'] for r in rs):.0f} |")
    return "\n".join(lines)


def plot(runs: list[dict], methods: list[str], path: Path) -> None:
    from lightning_ext.core.plotting import new_figure, save_figure

    fig, axes = new_figure(1, 4, figsize=(19, 4.2))
    for ax, key, title in zip(axes, ("val_knn_acc", "val_linear_acc", "val_probe_acc", "train_feature_rank"),
                              ("validation kNN accuracy", "validation linear-probe accuracy (offline)",
                               "validation online-probe accuracy", "effective rank of backbone features (train)")):
        for m in methods:
            rs = [r for r in runs if r["method"] == m]
            if not rs:
                continue
            n = min(len(r["epochs"]) for r in rs)
            ys = torch.tensor([curve(r, key)[:n] for r in rs])
            xs = list(range(1, n + 1))
            mean, std = ys.mean(0), ys.std(0) if len(rs) > 1 else torch.zeros(n)
            if key in ("val_knn_acc", "val_linear_acc"):
                xs = [0] + xs
                init = torch.tensor([r[f"init_{key}"] for r in rs])
                mean = torch.cat([init.mean()[None], mean])
                std = torch.cat([(init.std() if len(rs) > 1 else torch.zeros(()))[None], std])
            ax.plot(xs, mean, marker="o", ms=3, label=m)
            ax.fill_between(xs, mean - std, mean + std, alpha=0.2)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend()
    save_figure(fig, path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (numbers meaningless)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--train-size", type=int, default=5000)
    parser.add_argument("--val-size", type=int, default=1000)
    parser.add_argument("--bank-size", type=int, default=2500)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, help=f"from {list(CONFIGS)}")
    parser.add_argument("--target-share", type=float, default=0.9,
                        help="the common target's share of the gain over the random encoder (see summarise)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default docs/results/frossl.json)")
    parser.add_argument("--report-only", action="store_true",
                        help="print the tables and draw the plot from the JSON without training")
    parser.add_argument("--weights-dir", type=Path, default=REPO / "runs" / "bench_ssl",
                        help="where the trained backbones are saved")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.epochs, args.train_size, args.val_size, args.bank_size = [0], 2, 1024, 500, 500
        args.out = args.out or REPO / "runs" / "bench_ssl_quick" / "frossl.json"
        args.weights_dir = REPO / "runs" / "bench_ssl_quick"
    out = args.out or OUT / "frossl.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    unknown = set(args.methods) - set(CONFIGS)
    if unknown:
        raise SystemExit(f"Unknown methods {sorted(unknown)}; choose from {list(CONFIGS)}.")

    state = json.loads(out.read_text()) if out.exists() else {}
    keys = ("quick", "epochs", "train_size", "val_size", "bank_size", "batch_size")  # what the runs depend on
    settings = {k: getattr(args, k) for k in keys}
    if {k: state.get("settings", settings).get(k) for k in keys} != settings:
        raise SystemExit(f"{out} holds runs with other settings {state['settings']}; pass another --out.")
    state["settings"] = settings
    state.setdefault("runs", [])
    state.setdefault("machine", {"python": platform.python_version(), "torch": torch.__version__,
                                 "cpu": platform.processor() or platform.machine(), "threads": 1})
    state.setdefault("loadavg_at_start", os.getloadavg())
    started = time.time()
    for seed in [] if args.report_only else args.seeds:
        for name in args.methods:
            if any(r["method"] == name and r["seed"] == seed for r in state["runs"]):
                continue
            print(f"{name}, seed {seed} (load average {os.getloadavg()[0]:.2f})", flush=True)
            state["runs"].append(run_one(name, seed, args))
            state["loadavg_at_end"] = os.getloadavg()
            state["wall_s_this_invocation"] = time.time() - started
            out.write_text(json.dumps(state, indent=1))
    print(f"total {time.time() - started:.0f} s; load average now {os.getloadavg()}")
    seeds_done = sorted({r["seed"] for r in state["runs"]})
    print(f"runs: {len(state['runs'])}, seeds: {seeds_done}")
    print(summarise(state["runs"], args.methods, args.target_share))
    plot(state["runs"], args.methods, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
