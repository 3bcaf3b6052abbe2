"""Benchmark: KD for pruned training data (Ben-Baruch et al., arXiv:2403.07854) on Fashion-MNIST, and the
step-time overhead of the KnowledgeDistillation callback.

One run, single-threaded (``torch.set_num_threads(1)``):

1. Teachers trained on the full training split (55,000 images): a timm ResNet-10t (ImageClassifier, stem
   downsampling 4, ~4.9M parameters) and a small CNN smaller than the student (~9k parameters).
2. EL2N scores (Paul et al., arXiv:2107.07075: the L2 norm of softmax(p) - onehot(y)), averaged over
   proxy CNNs trained for one epoch on the full split; the EL2N subset keeps the highest-scoring (hardest)
   samples of each class, like the stratified random subsets keep the same count per class.
3. Students (a ~20k-parameter CNN) on kept fractions 10/30/50/100 %: random subset without and with KD
   (ResNet-10t teacher); EL2N subset without and with KD at 10/30 %; random subset with the small teacher
   at 10/30 %. Every student gets the same number of optimizer steps (equal compute). KD weight:
   ``KeptFractionWeight`` (alpha = clip(1 - f, 0.5, 0.9)), T = 4, ``combine="convex"``.
4. Step time of the same student with and without the callback, alternated in one process, against the
   teacher's forward pass alone on the same batch size.

Writes ``docs/results/knowledge_distillation.{md,json,png}`` and saves the ResNet-10t teacher's state dict to
``runs/bench_kd/teacher_resnet10t.pt`` (usable as ``teacher_checkpoint`` in ``configs/kd_pruned_data.yaml``).
Validation accuracy is reported next to test accuracy; nothing is tuned on either.

    python benchmarks/knowledge_distillation.py            # ~30-40 min on one CPU thread
    python benchmarks/knowledge_distillation.py --quick    # smoke test of the script (minutes, numbers meaningless)
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from torch import nn

from lightning_ext.distillation.callback import KnowledgeDistillation
from lightning_ext.data.base import Arrays
from lightning_ext.data.fashion_mnist import FashionMNISTDataModule
from lightning_ext.curation.el2n import el2n_scores
from lightning_ext.distillation.losses import KeptFractionWeight
from lightning_ext.modules import ImageClassifier

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "results"
RUNS = REPO / "runs" / "bench_kd"
FRACTIONS = (0.1, 0.3, 0.5, 1.0)

# -- data -----------------------------------------------------------------------------------------------------

_ARRAYS: Optional[Arrays] = None
_STATS: Optional[tuple[float, float]] = None


class BenchFashionMNIST(FashionMNISTDataModule):
    """Fashion-MNIST read once per process, normalised with the FULL training split's statistics (so the
    teacher sees the inputs it was trained on whatever subset the student gets), with an optional explicit
    subset (``keep``: positions within the full training split) for score-based pruning."""

    def __init__(self, keep: Optional[np.ndarray] = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.keep = keep

    def load_arrays(self) -> Arrays:
        global _ARRAYS
        if _ARRAYS is None:
            a = super().load_arrays()
            _ARRAYS = Arrays(a.x.astype(np.float32), a.y, a.x_test.astype(np.float32), a.y_test)
        return _ARRAYS

    def split_indices(self, arrays: Arrays) -> dict[str, np.ndarray]:
        global _STATS
        split = super().split_indices(arrays)
        if _STATS is None:
            full = FashionMNISTDataModule.split_indices(self._full_view(), arrays)["train"]
            x = arrays.x[full]
            _STATS = (float(x.mean()), float(x.std()))
        if self.keep is not None:
            if self.train_fraction != 1.0:
                raise ValueError("Use either `keep` or `train_fraction`.")
            split["train"] = split["train"][self.keep]
        return split

    def _full_view(self) -> "BenchFashionMNIST":
        view = copy.copy(self)
        view.train_fraction, view.long_tail_ratio = 1.0, 1.0
        return view

    def normalize(self, train_x: torch.Tensor, *others: torch.Tensor) -> tuple[torch.Tensor, ...]:
        mean, std = _STATS
        return tuple((t - mean) / std for t in (train_x, *others))


def full_train_labels() -> np.ndarray:
    dm = BenchFashionMNIST(batch_size=512)
    dm.setup()
    return dm.train_set.tensors[1].numpy()


# -- models ---------------------------------------------------------------------------------------------------


def cnn(width: int = 16) -> nn.Module:
    """conv(w)-BN-ReLU-pool, conv(2w)-BN-ReLU-pool, linear: w=16 is the student (~20k), w=8 the small teacher."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(2 * width * 49, 10),
    )


def classifier(backbone, steps: int, lr: float = 2e-3, **kwargs) -> ImageClassifier:
    sched = lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))  # noqa: E731
    return ImageClassifier(backbone, num_classes=10, image_size=28, lr=lr, weight_decay=1e-4, scheduler=sched,
                           scheduler_interval="step", **kwargs)


def resnet_teacher(steps: int = 1) -> ImageClassifier:
    return classifier("resnet10t", steps, stem_downsample=4)


class Progress(Callback):
    def __init__(self, label: str, every: int) -> None:
        self.label, self.every = label, every

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every == 0 or step == trainer.max_steps:
            loss = float(trainer.callback_metrics.get("train_loss", float("nan")))
            print(f"    [{self.label}] step {step}/{trainer.max_steps} train_loss={loss:.3f}", flush=True)


def fit_eval(model, dm, steps: int, label: str, callbacks=(), progress_every: int = 100) -> dict:
    trainer = Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                      num_sanity_val_steps=0, callbacks=[*callbacks, Progress(label, progress_every)])
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    seconds = time.perf_counter() - start
    ev = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False)
    val = ev.validate(model, datamodule=dm, verbose=False)[0]
    test = ev.test(model, datamodule=dm, verbose=False)[0]
    return {"val_acc": val["val_acc"], "test_acc": test["test_acc"], "fit_seconds": seconds,
            "train_size": len(dm.train_set)}


# -- EL2N -----------------------------------------------------------------------------------------------------


def el2n_keep(scores: np.ndarray, labels: np.ndarray, fraction: float) -> np.ndarray:
    """Per class, keep the same number of samples as the stratified random subset, highest EL2N first."""
    keep = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        n = max(1, int(round(fraction * len(members))))
        keep.append(members[np.argsort(-scores[members], kind="stable")[:n]])
    return np.sort(np.concatenate(keep))


# -- step time ------------------------------------------------------------------------------------------------


class StepTimer(Callback):
    def __init__(self, skip: int = 5) -> None:
        self.skip, self.times = skip, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx >= self.skip:
            self.times.append(time.perf_counter() - self._t)


def measure_step_time(teacher_path: Path, steps: int, repeats: int, batch_size: int = 128) -> dict:
    """Median seconds per training step without/with the callback (alternated), and of the teacher's forward."""
    dm = BenchFashionMNIST(batch_size=batch_size, drop_last=True)
    plain, with_kd = [], []
    for r in range(repeats):
        for use_kd in (False, True):
            seed_everything(r, verbose=False)
            timer = StepTimer()
            callbacks = [timer]
            if use_kd:
                callbacks.append(KnowledgeDistillation(resnet_teacher(), teacher_checkpoint=str(teacher_path),
                                                       weight=0.9, temperature=4.0))
            trainer = Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                              enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                              num_sanity_val_steps=0, callbacks=callbacks)
            trainer.fit(classifier(cnn(16), steps), datamodule=dm)
            (with_kd if use_kd else plain).extend(timer.times)
            print(f"  step time repeat {r} kd={use_kd}: median {statistics.median(timer.times) * 1e3:.1f} ms", flush=True)
    teacher = resnet_teacher()
    teacher.load_state_dict(torch.load(teacher_path, weights_only=True))
    teacher.eval()
    x = dm.train_set.tensors[0][:batch_size]
    fwd = []
    with torch.no_grad():
        for i in range(steps * repeats):
            t = time.perf_counter()
            teacher(x)
            if i >= 5:
                fwd.append(time.perf_counter() - t)
    return {"plain_s": statistics.median(plain), "kd_s": statistics.median(with_kd),
            "teacher_forward_s": statistics.median(fwd), "steps_each": len(plain), "batch_size": batch_size}


# -- report ---------------------------------------------------------------------------------------------------


def ms(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values: list[float]) -> str:
    if not values:
        return "-"
    m, s = ms(values)
    return f"{100 * m:.2f} ± {100 * s:.2f}"


def long_section(res: dict) -> str:
    if "long_runs" not in res:
        return ""
    la, runs = res["long_args"], res["long_runs"]
    rows = []
    for f in la["fractions"]:
        base = [r["test_acc"] for r in runs if r["method"] == "random" and r["fraction"] == f]
        kd = [r["test_acc"] for r in runs if r["method"] == "random+kd" and r["fraction"] == f]
        base_v = [r["val_acc"] for r in runs if r["method"] == "random" and r["fraction"] == f]
        kd_v = [r["val_acc"] for r in runs if r["method"] == "random+kd" and r["fraction"] == f]
        rows.append(f"| {int(100 * f)}% | {la['steps']} ({la['steps'] * 128 / (55000 * f):.0f} epochs) | {fmt(base)} | "
                    f"{fmt(kd)} | {100 * (ms(kd)[0] - ms(base)[0]):+.2f} | {fmt(base_v)} | {fmt(kd_v)} |")
    return f"""## Longer training on the small subset (second command, same teacher)

The equal-compute runs above are short (200 steps). The paper trains every subset for the full schedule, so a
small subset is seen for many epochs. Second command, run after the first with the teacher it saved:

```bash
python benchmarks/knowledge_distillation.py {' '.join(la['argv'])}
```

| kept | steps | random, test % | random + KD, test % | KD gain | random, val % | random + KD, val % |
|---|---|---|---|---|---|---|
{chr(10).join(rows)}

({len(la['seeds'])} seeds, {la['seconds'] / 60:.1f} min wall clock.)

"""


def write_report(res: dict, args, total_seconds: float) -> None:
    from lightning_ext.core.plotting import new_figure, save_figure

    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "knowledge_distillation.json").write_text(json.dumps(res, indent=2))
    runs = res["runs"]

    def acc(method: str, f: float, key: str = "test_acc") -> list[float]:
        return [r[key] for r in runs if r["method"] == method and r["fraction"] == f]

    methods = [("random", "random subset"), ("random+kd", "random + KD (ResNet-10t)"),
               ("el2n", "EL2N subset"), ("el2n+kd", "EL2N + KD (ResNet-10t)"),
               ("random+kd_small", "random + KD (small CNN teacher)")]
    fig, ax = new_figure(figsize=(6.4, 4.2))
    for (method, label), marker in zip(methods, "osv^D"):
        fs = [f for f in FRACTIONS if acc(method, f)]
        if not fs:
            continue
        m = [100 * ms(acc(method, f))[0] for f in fs]
        s = [100 * ms(acc(method, f))[1] for f in fs]
        ax.errorbar([100 * f for f in fs], m, yerr=s, marker=marker, capsize=3, label=label)
    for method, marker, label in (("random", "x", "random"), ("random+kd", "P", "random + KD (ResNet-10t)")):
        long = [r for r in res.get("long_runs", []) if r["method"] == method]
        fs = sorted({r["fraction"] for r in long})
        if fs:
            vals = [ms([r["test_acc"] for r in long if r["fraction"] == f]) for f in fs]
            ax.errorbar([100 * f for f in fs], [100 * m for m, _ in vals], yerr=[100 * v for _, v in vals], ls="none",
                        marker=marker, markersize=9, capsize=3, label=f"{label}, {res['long_args']['steps']} steps")
    for name, t in res["teachers"].items():
        ax.axhline(100 * t["test_acc"], ls=":", lw=1, color="gray")
        ax.text(10.3, 100 * t["test_acc"] + 0.3, f"{name} teacher (full data)", fontsize=7, va="bottom", color="gray")
    ax.set_xscale("log")
    ax.set_xticks([100 * f for f in FRACTIONS], [f"{int(100 * f)}%" for f in FRACTIONS])
    ax.set_xlabel("kept fraction of the training split"), ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"Student CNN on Fashion-MNIST, {args.steps} steps, mean ± std over {len(args.seeds)} seeds", fontsize=9)
    ax.grid(alpha=0.3), ax.legend(fontsize=8)
    save_figure(fig, OUT / "knowledge_distillation.png", dpi=120)

    rows = []
    for f in FRACTIONS:
        cells = [fmt(acc(m, f)) for m, _ in methods]
        gain = ms(acc("random+kd", f))[0] - ms(acc("random", f))[0] if acc("random+kd", f) and acc("random", f) else None
        rows.append(f"| {int(100 * f)}% | " + " | ".join(cells) + f" | {'-' if gain is None else f'{100 * gain:+.2f}'} |")
    val_rows = []
    for f in FRACTIONS:
        val_rows.append(f"| {int(100 * f)}% | " + " | ".join(fmt(acc(m, f, "val_acc")) for m, _ in methods) + " |")
    header = " | ".join(label for _, label in methods)
    t = res["teachers"]
    st = res["step_time"]
    overhead = st["kd_s"] - st["plain_s"]

    # verdict helpers, computed from the numbers above
    gains = {f: ms(acc("random+kd", f))[0] - ms(acc("random", f))[0] for f in FRACTIONS}
    kd_helps_all = all(g > 0 for g in gains.values())
    gain_small_largest = gains[0.1] == max(gains.values())
    rand_vs_el2n = {f: ms(acc("random+kd", f))[0] - ms(acc("el2n+kd", f))[0] for f in (0.1, 0.3) if acc("el2n+kd", f)}
    small_vs_large = {f: ms(acc("random+kd_small", f))[0] - ms(acc("random+kd", f))[0]
                      for f in (0.1, 0.3) if acc("random+kd_small", f)}
    cmd = "python benchmarks/knowledge_distillation.py " + " ".join(args.argv)
    text = f"""# Knowledge distillation for pruned training data (Fashion-MNIST)

What this measures: the `KnowledgeDistillation` callback on an unmodified `ImageClassifier` student, in the
setting of Ben-Baruch et al., *Distilling the Knowledge in Data Pruning* (arXiv:2403.07854, ICML 2025; no
official code released): the student trains on a pruned subset of the training split with soft targets from
a teacher trained on all of it. Claims checked: (1) KD improves accuracy at every kept fraction, most at small
ones; (2) with KD, simple random pruning is comparable or superior to a score-based method (here EL2N); (3) at
small fractions a smaller teacher can beat a larger one. Plus the callback's step-time overhead.

Command (CPU, `torch.set_num_threads(1)`, {platform.processor() or platform.machine()}, torch {torch.__version__};
the machine's 2 cores were shared with other jobs, so absolute times are noisy):

```bash
{cmd}
```

Setup (all fixed before the run; nothing tuned on validation or test):

- Data: Fashion-MNIST, 55,000 train / 5,000 validation (from the official train split, `split_seed=0`) /
  official 10,000 test. Inputs standardised with the full training split's statistics in every run. Random
  subsets are `train_fraction=f` (seeded, **class-stratified**; seed = run seed); EL2N subsets keep the same
  count per class, highest scores first. Validation and test are never pruned.
- Teachers, trained once on the full training split for {args.teacher_epochs} epochs (AdamW 2e-3, cosine):
  ResNet-10t (timm, `stem_downsample=4`, {t['resnet10t']['params']:,} parameters) test accuracy
  {100 * t['resnet10t']['test_acc']:.2f}% (val {100 * t['resnet10t']['val_acc']:.2f}%); small CNN (widths 8/16,
  {t['small_cnn']['params']:,} parameters) test {100 * t['small_cnn']['test_acc']:.2f}% (val {100 * t['small_cnn']['val_acc']:.2f}%).
- Student: CNN with widths 16/32 ({res['student_params']:,} parameters), AdamW 2e-3, weight decay 1e-4,
  cosine schedule, batch 128, **{args.steps} optimizer steps for every fraction** (equal compute: about
  {args.steps * 128 / 5500:.1f} epochs at 10%, {args.steps * 128 / 55000:.2f} at 100%), final weights evaluated.
- KD: `KnowledgeDistillation(weight=KeptFractionWeight(), temperature=4, combine="convex")`, i.e.
  (1-α)·CE + α·T²·KL with α = clip(1 − f, 0.5, 0.9) = 0.9 / 0.7 / 0.5 / 0.5 at 10 / 30 / 50 / 100%. This α
  rule is ours (the paper's exact rule was not available to us); it follows the paper's reported trend.
- EL2N: scores from {args.el2n_proxies} proxy students (same CNN) trained 1 epoch on the full split, averaged.
- Seeds {args.seeds}: subset, student initialisation and batch order.

## Accuracy (test, %, mean ± std over {len(args.seeds)} seeds)

| kept | {header} | KD gain (random) |
|---|---|---|---|---|---|---|
{chr(10).join(rows)}

![test accuracy vs kept fraction](knowledge_distillation.png)

Validation accuracy (%, same runs):

| kept | {header} |
|---|---|---|---|---|---|
{chr(10).join(val_rows)}

## Step time of the callback (one run, alternated {st['repeats']}x, median over {st['steps_each']} steps each, batch {st['batch_size']})

| | seconds per training step |
|---|---|
| student alone | {st['plain_s'] * 1e3:.1f} ms |
| student + `KnowledgeDistillation` (ResNet-10t teacher) | {st['kd_s'] * 1e3:.1f} ms |
| ratio with / without | **{st['kd_s'] / st['plain_s']:.2f}x** |
| extra time per step | {overhead * 1e3:.1f} ms |
| the teacher's forward pass alone (same batch, no grad) | {st['teacher_forward_s'] * 1e3:.1f} ms |
| extra time not explained by the teacher's forward | {(overhead - st['teacher_forward_s']) * 1e3:+.1f} ms ({100 * (overhead - st['teacher_forward_s']) / st['plain_s']:+.1f}% of a plain step) |

{long_section(res)}Whole benchmark: {total_seconds / 60:.1f} min wall clock. Raw numbers: [`knowledge_distillation.json`](knowledge_distillation.json).

## Verdict

{res.get('verdict_text', '')}

Automatic checks from the first (200-step) table: KD > no KD at every fraction: **{kd_helps_all}**; KD gain largest at 10%:
**{gain_small_largest}**; random+KD minus EL2N+KD (points): {', '.join(f'{int(100 * f)}%: {100 * d:+.2f}' for f, d in rand_vs_el2n.items())};
small-teacher KD minus ResNet-10t KD (points): {', '.join(f'{int(100 * f)}%: {100 * d:+.2f}' for f, d in small_vs_large.items())}.
"""
    (OUT / "knowledge_distillation.md").write_text(text)


# -- main -----------------------------------------------------------------------------------------------------


def train_teacher(name: str, steps: int) -> dict:
    """Train a teacher on the full training split (fixed seed), save its state dict, return its metrics."""
    print(f"teacher {name}: {steps} steps", flush=True)
    seed_everything(100, verbose=False)
    model = resnet_teacher(steps) if name == "resnet10t" else classifier(cnn(8), steps)
    out = fit_eval(model, BenchFashionMNIST(batch_size=128), steps, name, progress_every=100)
    out["params"] = sum(p.numel() for p in model.parameters())
    RUNS.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), RUNS / f"teacher_{name}.pt")
    print(f"  {name}: test_acc={out['test_acc']:.4f} val_acc={out['val_acc']:.4f} ({out['fit_seconds']:.0f}s)", flush=True)
    return out


def run_long(args) -> None:
    """Random subsets with and without KD, trained ``--long-steps`` steps, with the teacher of the main run."""
    torch.set_num_threads(1)
    start = time.perf_counter()
    res = json.loads((OUT / "knowledge_distillation.json").read_text())
    teacher_path = RUNS / "teacher_resnet10t.pt"
    retrained = None
    if not teacher_path.is_file():  # retrain it exactly as the main run did (same seed, steps, data)
        retrained = train_teacher("resnet10t", 430 * res["args"]["teacher_epochs"])
        for key in ("test_acc", "val_acc"):
            if abs(retrained[key] - res["teachers"]["resnet10t"][key]) > 1e-9:
                raise RuntimeError(f"The retrained teacher differs from the main run's ({key}: "
                                   f"{retrained[key]} vs {res['teachers']['resnet10t'][key]}).")
    teacher_bytes = teacher_path.read_bytes()  # kept in memory: the file may be removed by other jobs
    runs = []
    plan = [(m, f, seed) for seed in args.seeds for f in args.long_fractions for m in ("random", "random+kd")]
    for i, (method, f, seed) in enumerate(plan):
        seed_everything(seed, verbose=False)
        dm = BenchFashionMNIST(batch_size=128, train_fraction=f, train_subset_seed=seed, shuffle_seed=seed)
        callbacks = []
        if method == "random+kd":
            if not teacher_path.is_file():
                RUNS.mkdir(parents=True, exist_ok=True)
                teacher_path.write_bytes(teacher_bytes)
            callbacks = [KnowledgeDistillation(resnet_teacher(), teacher_checkpoint=str(teacher_path),
                                               weight=KeptFractionWeight(), temperature=4.0, combine="convex")]
        label = f"long {i + 1}/{len(plan)} {method} f={f} seed={seed}"
        print(label, flush=True)
        out = fit_eval(classifier(cnn(16), args.long_steps), dm, args.long_steps, label, callbacks, progress_every=200)
        out.update(method=method, fraction=f, seed=seed)
        runs.append(out)
        print(f"  test_acc={out['test_acc']:.4f} val_acc={out['val_acc']:.4f} ({out['fit_seconds']:.0f}s)", flush=True)
        (RUNS / "long_partial.json").write_text(json.dumps(runs, indent=2)) if RUNS.is_dir() else None
    res["long_runs"] = runs
    res["long_args"] = {"steps": args.long_steps, "fractions": args.long_fractions, "seeds": args.seeds,
                        "argv": args.argv, "seconds": time.perf_counter() - start,
                        "teacher_retrained": retrained is not None}
    verdict = RUNS / "verdict.md"
    res["verdict_text"] = verdict.read_text() if verdict.is_file() else res.get("verdict_text", "")
    write_report(res, argparse.Namespace(**res["args"]), res["total_seconds"])
    print((OUT / "knowledge_distillation.md").read_text())



def main() -> None:
    import sys

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps per student run")
    parser.add_argument("--teacher-epochs", type=int, default=2)
    parser.add_argument("--el2n-proxies", type=int, default=2)
    parser.add_argument("--timing-steps", type=int, default=40)
    parser.add_argument("--timing-repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the script runs")
    parser.add_argument("--long-only", action="store_true",
                        help="after a full run: train random/random+KD students longer (--long-steps) at "
                             "--long-fractions with the saved teacher, add them to the .json and rewrite the report")
    parser.add_argument("--long-steps", type=int, default=800)
    parser.add_argument("--long-fractions", type=float, nargs="+", default=[0.1])
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite the .md/.png from the saved .json (e.g. after adding runs/bench_kd/verdict.md)")
    args = parser.parse_args()
    args.argv = sys.argv[1:]
    verdict = RUNS / "verdict.md"
    if args.report_only:
        res = json.loads((OUT / "knowledge_distillation.json").read_text())
        saved = argparse.Namespace(**res["args"])
        res["verdict_text"] = verdict.read_text() if verdict.is_file() else res.get("verdict_text", "")
        write_report(res, saved, res["total_seconds"])
        print((OUT / "knowledge_distillation.md").read_text())
        return
    if args.long_only:
        run_long(args)
        return
    if args.quick:
        args.steps, args.teacher_epochs, args.el2n_proxies, args.timing_steps, args.timing_repeats = 10, 1, 1, 8, 1
        args.seeds = args.seeds[:2]
    torch.set_num_threads(1)
    start = time.perf_counter()
    RUNS.mkdir(parents=True, exist_ok=True)
    res: dict = {"runs": [], "teachers": {}, "args": {k: v for k, v in vars(args).items()}}

    # 1. teachers on the full training split
    full_dm = BenchFashionMNIST(batch_size=128)
    full_dm.setup()
    steps_per_epoch = len(full_dm.train_set) // 128 + 1
    teacher_steps = steps_per_epoch * args.teacher_epochs if not args.quick else 20
    for name in ("resnet10t", "small_cnn"):
        res["teachers"][name] = train_teacher(name, teacher_steps)

    # 2. EL2N scores on the full training split
    x_train, y_train = full_dm.train_set.tensors
    scores = torch.zeros(len(y_train))
    proxy_steps = steps_per_epoch if not args.quick else 10
    for p in range(args.el2n_proxies):
        seed_everything(200 + p, verbose=False)
        proxy = classifier(cnn(16), proxy_steps)
        fit_eval(proxy, BenchFashionMNIST(batch_size=128, shuffle_seed=200 + p), proxy_steps, f"el2n proxy {p}")
        scores += el2n_scores(proxy, x_train, y_train) / args.el2n_proxies
    labels = y_train.numpy()
    scores_np = scores.numpy()
    res["el2n"] = {"mean": float(scores.mean()), "proxy_steps": proxy_steps}

    # 3. students
    res["student_params"] = sum(p.numel() for p in cnn(16).parameters())
    teacher_path = {"resnet10t": RUNS / "teacher_resnet10t.pt", "small_cnn": RUNS / "teacher_small_cnn.pt"}

    def kd_callback(which: str) -> KnowledgeDistillation:
        arch = resnet_teacher() if which == "resnet10t" else classifier(cnn(8), 1)
        return KnowledgeDistillation(arch, teacher_checkpoint=str(teacher_path[which]), weight=KeptFractionWeight(),
                                     temperature=4.0, combine="convex")

    plan = []
    for seed in args.seeds:
        for f in FRACTIONS:
            plan += [("random", f, seed), ("random+kd", f, seed)]
            if f in (0.1, 0.3):
                plan += [("el2n", f, seed), ("el2n+kd", f, seed), ("random+kd_small", f, seed)]
    for i, (method, f, seed) in enumerate(plan):
        seed_everything(seed, verbose=False)
        if method.startswith("el2n"):
            dm = BenchFashionMNIST(batch_size=128, keep=el2n_keep(scores_np, labels, f), shuffle_seed=seed)
        else:
            dm = BenchFashionMNIST(batch_size=128, train_fraction=f, train_subset_seed=seed, shuffle_seed=seed)
        callbacks = []
        if method.endswith("+kd"):
            callbacks = [kd_callback("resnet10t")]
        elif method.endswith("+kd_small"):
            callbacks = [kd_callback("small_cnn")]
        label = f"{i + 1}/{len(plan)} {method} f={f} seed={seed}"
        print(label, flush=True)
        out = fit_eval(classifier(cnn(16), args.steps), dm, args.steps, label, callbacks, progress_every=125)
        out.update(method=method, fraction=f, seed=seed)
        if callbacks:
            out["kd_weight"] = callbacks[0].weight(0)
        res["runs"].append(out)
        print(f"  test_acc={out['test_acc']:.4f} val_acc={out['val_acc']:.4f} train_size={out['train_size']} "
              f"({out['fit_seconds']:.0f}s, total {(time.perf_counter() - start) / 60:.1f} min)", flush=True)
        (OUT / "knowledge_distillation.json").write_text(json.dumps(res, indent=2))  # partial results

    # 4. step time
    print("step time", flush=True)
    res["step_time"] = measure_step_time(teacher_path["resnet10t"], args.timing_steps, args.timing_repeats)
    res["step_time"]["repeats"] = args.timing_repeats
    res["verdict_text"] = verdict.read_text() if verdict.is_file() else "(to be written from the numbers above)"
    res["total_seconds"] = time.perf_counter() - start
    write_report(res, args, res["total_seconds"])
    print((OUT / "knowledge_distillation.md").read_text())


if __name__ == "__main__":
    main()
