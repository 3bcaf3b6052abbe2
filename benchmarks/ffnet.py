"""Benchmark: FFNet (MetaMixer) vs its token-mixer ablations at equal parameters on a Fashion-MNIST subset.

Claim (Yun et al., "MetaMixer Is All You Need", arXiv 2406.02021): the FFNified-attention token mixer (1x1 query
projection, large-kernel depthwise "key" conv, GELU in place of softmax, depthwise "value" conv) is what makes FFNet
work; its query-key-value structure with the non-linearity matters. Arms, all ``ffnet_nano`` (depths 1, 1, 2, 1,
widths 32-256, stem stride 2 for 28x28 images):

- ``ffnified``: the method;
- ``linear``: the same with the token mixer's GELU removed (key and value convs collapse into one linear filter;
  identical parameters);
- ``none``: no token mixer at all, the channel mixers' FFN widened per stage to the same parameter count.

Each arm gets the same tuning: AdamW (weight decay 0.05, the official value), lr in a grid that includes the official
1e-3, picked on a validation split with seed 0; cosine schedule; early stopping on validation accuracy, the best
epoch's weights tested once. Then 3 seeds per arm at its chosen lr. Premise check: logistic regression on the pixels
of the same training subset (the networks must beat it clearly, or the set-up cannot tell architectures apart).
Writes ``docs/results/ffnet.{md,json,png}``; partial results are saved after every run.

    nice -n 10 python benchmarks/ffnet.py --seeds 0 1 2 --threads 1

Not part of the test suite (about 30 min on one shared core).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import combine_claims, fit_early_stopping, mean_std  # noqa: E402

from lightning_ext.core.io import atomic_write_json, atomic_write_text  # noqa: E402
from lightning_ext.data.fashion_mnist import FashionMNISTDataModule  # noqa: E402
from lightning_ext.vision.ffnet import VARIANTS, TokenMixer  # noqa: E402
from lightning_ext.vision.image_classifier import ImageClassifier  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "results"
ARMS = ("ffnified", "linear", "none")
COLORS = {"ffnified": "tab:blue", "linear": "tab:orange", "none": "tab:gray"}


def matched_expansion() -> list[float]:
    """Per-stage FFN ratio for the ``none`` arm: the token mixer's parameters moved into the channel FFN's hidden
    units (each adds 2·C + 1 parameters: fc1 weight and bias, fc2 weight)."""
    spec = VARIANTS["ffnet_nano"]
    ratios = []
    for dim, k in zip(spec["dims"], (3, 3, 7, 7)):
        token = sum(p.numel() for p in TokenMixer(dim, k, k).parameters())
        extra = round(token / (2 * dim + 1))
        ratios.append((3 * dim + extra + 0.5) / dim)  # int(dim * ratio) = 3·dim + extra
    return ratios


def make_model(arm: str, lr: float, epochs: int, seed: int) -> ImageClassifier:
    torch.manual_seed(seed)
    kwargs = {"stem_stride": 2, "token_mixer": arm}
    if arm == "none":
        kwargs["expansion"] = matched_expansion()
    return ImageClassifier(
        "ffnet_nano", num_classes=10, in_chans=1, image_size=28, stem_downsample=4, backbone_kwargs=kwargs,
        optimizer=functools.partial(torch.optim.AdamW, lr=lr, weight_decay=0.05),
        scheduler=functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=epochs),
    )


@torch.no_grad()
def test_accuracy(model, dm, limit: int) -> float:
    """Accuracy on the first ``limit`` images of the official test split (a fixed subset), eval mode."""
    dm.setup("test")
    model.eval()
    correct = seen = 0
    for x, y in dm.test_dataloader():
        x, y = x[: limit - seen], y[: limit - seen]
        correct += int((model(x).argmax(1) == y).sum())
        seen += len(y)
        if seen >= limit:
            break
    return correct / seen


def data(args, seed: int) -> FashionMNISTDataModule:
    return FashionMNISTDataModule(batch_size=args.batch_size, train_fraction=args.train_fraction, train_subset_seed=0,
                                  shuffle_seed=seed, val_fraction=args.val_size / 60000)


def run(arm: str, lr: float, seed: int, args) -> dict:
    torch.set_num_threads(args.threads)  # also in a worker process
    dm = data(args, seed)
    model = make_model(arm, lr, args.epochs, seed)
    info = fit_early_stopping(model, dm, args.epochs, [], f"{arm} lr={lr} seed {seed}", patience=args.patience)
    return {"arm": arm, "lr": lr, "seed": seed, "test_acc": test_accuracy(model, dm, args.test_size),
            "params": sum(p.numel() for p in model.parameters()), "best_val": info["best_val"],
            "best_epoch": info["best_epoch"], "epochs": info["epochs"], "converged": info["converged"],
            "val_history": info["history"], "steps": info["steps"], "samples": info["samples"],
            "wall_s": info["wall_s"], "load_avg": os.getloadavg()[0]}


def premise(args) -> dict:
    """Logistic regression on the raw pixels of the same training subset, tested on the same test images."""
    from sklearn.linear_model import LogisticRegression

    dm = data(args, 0)
    dm.setup("fit")
    dm.setup("test")

    def arrays(loader, limit=None):
        xs, ys = zip(*[(x.flatten(1), y) for x, y in loader])
        x, y = torch.cat(xs), torch.cat(ys)
        return (x[:limit], y[:limit]) if limit else (x, y)

    xtr, ytr = arrays(dm.train_dataloader())
    xte, yte = arrays(dm.test_dataloader(), args.test_size)
    clf = LogisticRegression(max_iter=300).fit(xtr.numpy(), ytr.numpy())
    return {"logreg_test_acc": float(clf.score(xte.numpy(), yte.numpy())), "train_size": len(xtr)}


def final_runs(results: dict) -> dict[str, list[dict]]:
    chosen = results.get("chosen_lr", {})
    return {a: sorted((r for r in results["runs"] if r["arm"] == a and r["lr"] == chosen.get(a)),
                      key=lambda r: r["seed"]) for a in ARMS}


def decided(claims: list) -> str:
    """The verdict of per-comparison results (True holds, False fails, None inconclusive): a comparison left
    inconclusive decides nothing, so the verdict is *inconclusive* unless every outcome of the undecided ones gives
    the same word."""
    outcomes = {combine_claims([v if c is None else c for c in claims]) for v in (True, False)}
    return outcomes.pop() if len(outcomes) == 1 else "inconclusive"


def verdict(results: dict) -> tuple[str, list[str]]:
    """Premise, budget per arm, then the two comparisons. Budget rule (DEVELOPERS.md): a comparison with an arm
    whose final run had its best validation epoch at its last epoch is inconclusive."""
    runs = final_runs(results)
    lines = []
    if min(len(rs) for rs in runs.values()) < 2:
        return "inconclusive", ["fewer than 2 seeds per arm finished"]
    acc = {a: [r["test_acc"] for r in rs] for a, rs in runs.items()}
    m = {a: statistics.mean(v) for a, v in acc.items()}
    noise = max(statistics.stdev(v) for v in acc.values())
    logreg = results["premise"]["logreg_test_acc"]
    ok = m["ffnified"] - logreg > 0.03
    lines.append(f"premise (FFNet-nano beats logistic regression on pixels by > 3 points): {m['ffnified']:.4f} vs "
                 f"{logreg:.4f} -> {'holds' if ok else 'fails'}")
    if not ok:
        return "not testable here", lines
    at_last = {a: [r["seed"] for r in rs if not r["converged"]] for a, rs in runs.items()}
    n = sum(len(rs) for rs in runs.values())
    n_last = sum(len(v) for v in at_last.values())
    lines.append(f"budget: {n - n_last} of {n} final runs had their best validation epoch before their last epoch"
                 + ("" if not n_last else " (best at the last epoch: " + ", ".join(
                     f"{a} seed {s}" for a, ss in at_last.items() for s in ss) + ")"))
    tune_last = [r for r in results["runs"] if r["seed"] == results["args"]["seeds"][0] and not r["converged"]]
    if tune_last:
        lines.append("tuning runs best at their last epoch: " + ", ".join(f"{r['arm']} lr {r['lr']:g}"
                                                                         for r in tune_last))
    gelu, mixer = m["ffnified"] - m["linear"], m["ffnified"] - m["none"]
    claims = []
    for label, other, diff in (("(a) the GELU matters: ffnified - linear", "linear", gelu),
                               ("(b) the token mixer earns its parameters: ffnified - none (FFN widened to equal "
                                "parameters)", "none", mixer)):
        short = [a for a in ("ffnified", other) if at_last[a]]
        holds = diff > noise
        if short:
            claims.append(None)
            lines.append(f"{label} = {diff * 100:+.2f} points vs largest seed std {noise * 100:.2f} -> inconclusive "
                         f"({' and '.join(short)} had a run best at its last epoch; it would "
                         f"{'hold' if holds else 'fail'} otherwise)")
        else:
            claims.append(holds)
            lines.append(f"{label} = {diff * 100:+.2f} points vs largest seed std {noise * 100:.2f} -> "
                         f"{'holds' if holds else 'fails'}")
    return decided(claims), lines


def write_report(results: dict, args) -> None:
    from lightning_ext.core.plotting import new_figure, save_figure

    word, lines = verdict(results) if results.get("chosen_lr") else ("inconclusive", ["tuning not finished"])
    results["verdict"], results["verdict_lines"] = word, lines
    OUT.mkdir(parents=True, exist_ok=True)
    atomic_write_json(results, OUT / "ffnet.json", indent=2)
    runs = final_runs(results) if results.get("chosen_lr") else {a: [] for a in ARMS}
    fig, axes = new_figure(1, 2, figsize=(10, 3.6))
    for a in ARMS:
        for r in runs[a]:
            axes[0].plot(range(1, len(r["val_history"]) + 1), r["val_history"], color=COLORS[a], alpha=0.7,
                         label=a if r["seed"] == args.seeds[0] else None)
    axes[0].set_xlabel("epoch"), axes[0].set_ylabel("validation accuracy"), axes[0].grid(alpha=0.3)
    axes[0].legend() if any(runs.values()) else None
    axes[0].set_title("validation accuracy (final runs)")
    for i, a in enumerate(ARMS):
        vals = [r["test_acc"] for r in runs[a]]
        axes[1].scatter([i] * len(vals), vals, color=COLORS[a])
        if vals:
            axes[1].errorbar([i + 0.15], [statistics.mean(vals)], yerr=[statistics.stdev(vals) if len(vals) > 1 else 0],
                             color=COLORS[a], marker="s", capsize=4)
    if "premise" in results:
        axes[1].axhline(results["premise"]["logreg_test_acc"], color="k", ls=":", label="logistic regression")
        axes[1].legend()
    axes[1].set_xticks(range(3), ARMS), axes[1].set_ylabel("test accuracy"), axes[1].grid(alpha=0.3)
    axes[1].set_title("test accuracy per seed (mean ± std)")
    save_figure(fig, OUT / "ffnet.png", dpi=110)

    tune = "\n".join(f"| {r['arm']} | {r['lr']:g} | {r['best_val']:.4f} | {r['best_epoch'] + 1}/{r['epochs']} |"
                     for r in sorted(results["runs"], key=lambda r: (r["lr"], ARMS.index(r["arm"])))
                     if r["seed"] == args.seeds[0])
    rows = "\n".join(f"| {r['arm']} | {r['lr']:g} | {r['seed']} | {r['params']:,} | {r['best_val']:.4f} | "
                     f"{r['best_epoch'] + 1}/{r['epochs']} | {r['steps']} | {r['samples']:,} | {r['test_acc']:.4f} | "
                     f"{r['wall_s']:.0f} |" for a in ARMS for r in runs[a])
    summ = "\n".join(f"| {a} | {runs[a][0]['params']:,} | {results['chosen_lr'][a]:g} | "
                     f"{mean_std([r['test_acc'] for r in runs[a]], 4)} | {mean_std([r['best_val'] for r in runs[a]], 4)}"
                     f" | {len(runs[a])} |" for a in ARMS if runs[a])
    paired = ""
    seeds = sorted({r["seed"] for a in ARMS for r in runs[a]})
    by = {(r["arm"], r["seed"]): r["test_acc"] for a in ARMS for r in runs[a]}
    diffs = [(s, by.get(("ffnified", s)), by.get(("linear", s)), by.get(("none", s))) for s in seeds]
    if diffs:
        paired = "Paired differences per seed (test accuracy points): " + "; ".join(
            f"seed {s}: ffnified-linear {(f - l) * 100:+.2f}, ffnified-none {(f - n) * 100:+.2f}"
            for s, f, l, n in diffs if None not in (f, l, n)) + "."
    cmd = (f"nice -n 10 python benchmarks/ffnet.py --seeds {' '.join(map(str, args.seeds))} --threads {args.threads} "
           f"--epochs {args.epochs} --patience {args.patience} --lrs {' '.join(f'{x:g}' for x in args.lrs)} "
           f"--train_fraction {args.train_fraction} --val_size {args.val_size} --test_size {args.test_size} "
           f"--batch_size {args.batch_size}" + (f" --jobs {args.jobs}" if getattr(args, "jobs", 1) > 1 else ""))
    load = [r["load_avg"] for r in results["runs"]]
    prem = results.get("premise", {})
    chance = [r for r in results["runs"] if r["val_history"] and r["val_history"][0] <= 0.15]
    lag = (f"In {len(chance)} of {len(results['runs'])} runs the first epoch's validation accuracy (eval mode) was at "
           "chance (at most 0.15) while the first epoch's mean training loss was already about 1.0 (2.3 = chance): the "
           "BatchNorm running statistics lag behind the weights, whose scale grows fast from the official truncated-"
           "normal (std 0.02) initialisation under AdamW; the eval-mode curves catch up within a few epochs (see the "
           "plot).") if chance else ""
    resumed = ""
    if results.get("resumed_after_s"):
        resumed = (f" The run was interrupted after {results['resumed_after_s'] / 60:.1f} min and resumed with "
                   "`--resume <its JSON>` (same arguments; its finished runs kept, the rest run then).")
    if len(args.lrs) > 1:
        tuning = (f"Tuning, alike for every arm: lr in {{{', '.join(f'{x:g}' for x in args.lrs)}}} (the official AdamW lr "
                  f"is 1e-3) on validation accuracy with seed {args.seeds[0]}; chosen: "
                  f"{', '.join(f'{a} {v:g}' for a, v in results.get('chosen_lr', {}).items())}. Then seeds "
                  f"{', '.join(map(str, args.seeds))} at each arm's chosen lr (seed {args.seeds[0]}'s tuning run is "
                  "reused).")
    else:
        tuning = (f"No tuning, alike for every arm: every arm trains at lr {args.lrs[0]:g} (the official AdamW lr is "
                  f"1e-3), seeds {', '.join(map(str, args.seeds))}; a grid did not fit the shared machine's time.")
    fast = ""
    if "jobs" in vars(args):  # runs made after DepthwiseConv2d (commit 6d25f84)
        fast = (" Depthwise convolutions on the small maps (2x2-7x7) run as dense matrix products (`DepthwiseConv2d`, "
                "same outputs and gradients as `F.conv2d`, about 1.6x faster per training step here); runs went "
                f"{args.jobs} at a time, one process each.")
    earlier = "" if results["args"].get("epochs") == 6 and results["args"].get("batch_size") == 64 else (
        "\nEarlier run (commit a66e8de, at most 6 epochs, patience 2, batch 64, 114 steps per run): ffnified 0.8100 ± "
        "0.0131, linear 0.7987 ± 0.0136, none 0.8030 ± 0.0030 test accuracy, but 6 of 9 final runs were best at their "
        "last epoch, so it decided nothing (inconclusive); this page replaces it with a larger budget.\n")
    notes = "".join(f"\n**Note.** {n}\n" for n in results.get("notes", []))
    text = f"""# FFNet (MetaMixer) vs its token-mixer ablations on a Fashion-MNIST subset

Claim (Yun, Lee and Ro, "MetaMixer Is All You Need", arXiv 2406.02021; code github.com/ysj9909/FFNet): the
FFNified-attention token mixer, a query projection followed by a large-kernel depthwise "key" conv, GELU in place of
softmax and a depthwise "value" conv, is the part that makes the FFN-only FFNet work; its query-key-value structure
with the non-linearity matters. Tested here at equal parameters: **ffnified** (the method, `ffnet_nano`) vs
**linear** (the same net with the token mixer's GELU removed, so key and value convs collapse into one linear
filter; identical parameters) vs **none** (no token mixer; the channel mixers' FFN ratio raised per stage to
{', '.join(f'{x:.2f}' for x in matched_expansion())} so that the parameter count matches).

Set-up: `ffnet_nano` (depths 1, 1, 2, 1; widths 32, 64, 128, 256; token-mixer kernels 3, 3, 7, 7; stem stride 2, so
28x28 -> 14, 7, 4, 2 per stage), built through `ImageClassifier(backbone="ffnet_nano", in_chans=1)`; no drop path,
no augmentation. Fashion-MNIST: {prem.get('train_size', 0):,} training images ({args.train_fraction:.1%} of the
training split, a fixed subset), {args.val_size:,} validation images held out of the training split, the first
{args.test_size:,} of the official 10,000 test images (a fixed subset, to fit the time). AdamW, weight decay 0.05
(official), batch {args.batch_size}, cosine schedule over at most {args.epochs} epochs, early stopping after
{args.patience} epochs without a better validation accuracy, the best epoch's weights (kept in memory) tested once.
Budgets per run (optimizer steps and training samples seen) are in the table.{fast}

{tuning}

What was scaled down (2 shared CPU cores, one thread): a 0.9 M-parameter nano variant instead of FFNet-1..4
(13.8-79.9 M), 28x28 grayscale instead of 256 px ImageNet-1k, {args.train_fraction:.1%} of Fashion-MNIST, at most
{args.epochs} epochs instead of 300, no RandAugment/mixup/EMA/label smoothing, a {len(args.lrs)}-point lr grid.
{earlier}{notes}

Command (CPU, `torch.set_num_threads({args.threads})`, {platform.machine()}, torch {torch.__version__}; the machine
was shared: 1-minute load average {statistics.mean(load) if load else float('nan'):.1f} on 2 cores during the runs):

```bash
{cmd}
```

Runtime: {results.get('total_s', float('nan')) / 60:.1f} min wall clock.{resumed}

## Premise check

Logistic regression (scikit-learn, default C) on the raw pixels of the same training subset: test accuracy
{prem.get('logreg_test_acc', float('nan')):.4f} on the same test images. The networks must beat it clearly for the
set-up to be able to show an architectural effect.

## Tuning (seed {args.seeds[0]}, validation accuracy)

| arm | lr | best val acc | best epoch / epochs run |
|---|---|---|---|
{tune}

## Results at each arm's chosen lr

| arm | parameters | lr | test accuracy (mean ± std) | best val accuracy | seeds |
|---|---|---|---|---|---|
{summ}

| arm | lr | seed | parameters | best val acc | best epoch / run | steps | samples seen | test acc | wall s |
|---|---|---|---|---|---|---|---|---|---|
{rows}

{paired}

{lag}

![validation curves and test accuracy](ffnet.png)

Raw numbers: [`ffnet.json`](ffnet.json).

## Verdict: {word}

""" + "\n".join(f"- {line}" for line in lines) + """

Reproduced needs both (a) and (b) to hold by more than the largest seed standard deviation; partly reproduced,
one of them; not reproduced, neither. A comparison whose arms include a final run best at its last epoch is
inconclusive, and then so is the verdict unless no outcome of it could change the word.
The paper's evidence is ImageNet-1k at 256 px, 300 epochs, 13.7-79.2 M parameters; a null result at this scale
says the token mixer's design does not matter for a 0.9 M network on 28x28 Fashion-MNIST with """ + \
        f"{prem.get('train_size', 0):,}" + """ training images, not that it never does.
"""
    atomic_write_text(text, OUT / "ffnet.md")


def main() -> None:
    global OUT
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument("--patience", type=int, default=3)
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3])
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--train_fraction", type=float, default=0.02)
    parser.add_argument("--val_size", type=int, default=500)
    parser.add_argument("--test_size", type=int, default=1000)
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (one process and --threads each)")
    parser.add_argument("--out_dir", type=str, default=str(OUT), help="where the page, JSON and plot go")
    parser.add_argument("--render", action="store_true", help="re-render the page from the saved JSON")
    parser.add_argument("--note", type=str, default=None, help="with --render: add this note to the JSON and page")
    parser.add_argument("--resume", type=str, default=None,
                        help="a JSON of an interrupted run with the same arguments: its finished runs are kept")
    args = parser.parse_args()
    OUT = Path(args.out_dir)
    if args.render:
        saved = json.loads((OUT / "ffnet.json").read_text())
        if args.note:
            saved.setdefault("notes", []).append(args.note)
        write_report(saved, argparse.Namespace(**saved["args"]))
        return
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    results = {"args": {k: v for k, v in vars(args).items() if k != "resume"}, "runs": []}
    if args.resume:
        saved = json.loads(Path(args.resume).read_text())
        same = {k: v for k, v in saved["args"].items() if k not in ("render", "jobs")} == \
            {k: v for k, v in results["args"].items() if k not in ("render", "jobs")}
        if not same:
            raise SystemExit(f"--resume: {args.resume} was run with other arguments: {saved['args']}")
        results.update(runs=saved["runs"], premise=saved["premise"], resumed_after_s=saved.get("total_s", 0.0))
        start -= results["resumed_after_s"]  # total_s counts the interrupted run's time too
    else:
        results["premise"] = premise(args)
    print("premise:", results["premise"], flush=True)
    done = {(r["arm"], r["lr"], r["seed"]) for r in results["runs"]}

    def record(r):
        results["runs"].append(r)
        results["total_s"] = time.perf_counter() - start
        print(f"{r['arm']} lr={r['lr']:g} seed {r['seed']}: val {r['best_val']:.4f} (epoch {r['best_epoch'] + 1}/"
              f"{r['epochs']}) test {r['test_acc']:.4f} params {r['params']:,} {r['wall_s']:.0f} s", flush=True)
        write_report(results, args)

    def do_all(tasks):
        tasks = [t for t in tasks if t not in done]
        if args.jobs <= 1:
            for t in tasks:
                record(run(*t, args))
            return
        import concurrent.futures as cf
        import multiprocessing

        with cf.ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            for future in cf.as_completed([pool.submit(run, *t, args) for t in tasks]):
                record(future.result())

    do_all([(arm, lr, args.seeds[0]) for arm in ARMS for lr in args.lrs])
    results["chosen_lr"] = {a: max((r for r in results["runs"] if r["arm"] == a), key=lambda r: r["best_val"])["lr"]
                            for a in ARMS}
    print("chosen lr:", results["chosen_lr"], flush=True)
    do_all([(arm, results["chosen_lr"][arm], seed) for seed in args.seeds[1:] for arm in ARMS])
    results["total_s"] = time.perf_counter() - start
    write_report(results, args)


if __name__ == "__main__":
    main()
