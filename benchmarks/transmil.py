"""TransMIL vs ABMIL, mean and max pooling (and TransMIL without PPEG) on bags of real digits: three MIL tasks.

Claim under test (TransMIL, Shao et al., NeurIPS 2021; the smallest CPU experiment of the library's spec): a
transformer over a bag's instances handles *correlated* MIL that attention/mean/max pooling (which treat
instances independently) cannot, and the PPEG position encoding helps where the layout matters. Rules, fixed
before the runs:

- premise: an instance-level logistic regression recognises the target digit(s) on the test instances
  (balanced accuracy >= 0.9), so the bag labels are learnable from the instances;
- (A) ``contains`` (positive iff the bag holds a 9): every method reaches mean test AUROC >= 0.95;
- (B) ``both`` (positive iff it holds a 3 and a 7; negatives hold one of them): TransMIL beats ABMIL, mean and
  max pooling by >= 0.05 mean test AUROC;
- (C) ``adjacent`` (2-4 sevens; positive iff two are grid neighbours): TransMIL with PPEG beats TransMIL without
  it by more than the noise band max(2 x the larger seed std, 0.01);
- a claim whose runs include one still improving at its budget's end (best validation epoch = the last) is
  inconclusive; all testable claims hold = reproduced, some = partly reproduced, none = not reproduced.

Protocol: every arm gets the same lr grid (2e-4, the official TransMIL lr, 1e-3, 3e-3), chosen on seed 0 by the
best validation AUROC; the chosen lr then runs seeds 1 and 2 (new bag draws and model inits; the instance split
is fixed). Budget 60 epochs of 1,000 bags (batch 16, 63 steps per epoch), early stop after 6 epochs without a
new best validation AUROC, best weights restored and tested once (the first pass had 30 epochs; the runs that
reached it were rerun with 60, the others stopped early and are unchanged by the larger budget). Dim 64 for every aggregator; TransMIL 4 heads,
exact attention (bags of 16-64 instances; the spec allows it), dropout 0.1. One thread.

Run: ``python benchmarks/transmil.py`` (``--render-only`` re-renders the page from the JSON).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import combine_claims, fit_early_stopping, test_metrics  # noqa: E402

from lightning.pytorch import seed_everything  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "results"
JSON = OUT / "transmil.json"
P = {"train_bags": 1000, "val_bags": 200, "test_bags": 500, "min_instances": 16, "max_instances": 64,
     "batch_size": 16, "dim": 64, "heads": 4, "attention": "exact", "dropout": 0.1, "max_epochs": 60,
     "patience": 6, "lrs": [2e-4, 1e-3, 3e-3]}
TASKS = {"contains": "contains a 9", "both": "holds a 3 and a 7", "adjacent": "two 7s are grid neighbours"}
ARMS = {"TransMIL": {"aggregator": "transmil"}, "TransMIL w/o PPEG": {"aggregator": "transmil", "ppeg": False},
        "ABMIL": {"aggregator": "abmil"}, "mean pooling": {"aggregator": "mean"},
        "max pooling": {"aggregator": "max"}}
NOISE_FLOOR = 0.01


def make_dm(task, seed):
    from lightning_ext.mil.bag_datamodule import BagDataModule

    keys = ("train_bags", "val_bags", "test_bags", "min_instances", "max_instances", "batch_size")
    return BagDataModule(task=task, bag_seed=seed, shuffle_seed=seed, **{k: P[k] for k in keys})


def premise(task):
    """Instance-level balanced accuracy of target-vs-rest logistic regression on the digits test instances."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score

    from lightning_ext.data.digits import DigitsDataModule

    src = DigitsDataModule()
    src.setup()
    targets = make_dm(task, 0).targets
    xtr, ytr = src.train_set.tensors[0].flatten(1).numpy(), src.train_set.tensors[1].numpy()
    xte, yte = src.test_set.tensors[0].flatten(1).numpy(), src.test_set.tensors[1].numpy()
    out = {}
    for t in targets:
        clf = LogisticRegression(max_iter=2000, class_weight="balanced").fit(xtr, ytr == t)
        out[str(t)] = float(balanced_accuracy_score(yte == t, clf.predict(xte)))
    return out


def run(task, arm, lr, seed):
    from lightning_ext.mil.module import MILClassifier

    seed_everything(seed, verbose=False)
    dm = make_dm(task, seed)
    model = MILClassifier(in_features=64, dim=P["dim"], heads=P["heads"], attention=P["attention"],
                          dropout=P["dropout"], lr=lr, **ARMS[arm])
    fit = fit_early_stopping(model, dm, P["max_epochs"], [], f"{task} {arm} lr {lr:g} seed {seed}", patience=P["patience"],
                             monitor="val_auroc")
    test = test_metrics(model, dm)
    return {"task": task, "arm": arm, "lr": lr, "seed": seed, "test_auroc": test["test_auroc"],
            "test_acc": test["test_acc"], "best_val_auroc": fit["best_val"], "best_epoch": fit["best_epoch"],
            "epochs": fit["epochs"], "still_improving": not fit["converged"], "steps": fit["steps"],
            "samples": fit["samples"], "wall_s": fit["wall_s"], "cpu_s": fit["cpu_s"], "history": fit["history"]}


def main_runs(data, tasks):
    from lightning_ext.core.io import atomic_write_json

    done = {(r["task"], r["arm"], r["lr"], r["seed"]): r for r in data.setdefault("runs", [])}

    def once(task, arm, lr, seed):
        key = (task, arm, lr, seed)
        if key not in done:
            r = run(task, arm, lr, seed)
            print(f"{task:9s} {arm:18s} lr {lr:g} seed {seed}: test AUROC {r['test_auroc']:.4f} "
                  f"(best epoch {r['best_epoch'] + 1}/{r['epochs']}, {r['cpu_s']:.0f} CPU-s)", flush=True)
            done[key] = r
            data["runs"] = list(done.values())
            atomic_write_json(data, JSON, indent=1)
        return done[key]

    for task in tasks:
        data.setdefault("premise", {})[task] = premise(task)
        for arm in ARMS:
            tuned = [once(task, arm, lr, 0) for lr in P["lrs"]]
            best = max(tuned, key=lambda r: r["best_val_auroc"])
            for seed in (1, 2):
                once(task, arm, best["lr"], seed)


# ---- verdicts and page --------------------------------------------------------------------------------------
def chosen(data, task, arm):
    runs = [r for r in data["runs"] if r["task"] == task and r["arm"] == arm]
    tuned = [r for r in runs if r["seed"] == 0]
    if not tuned:
        return None, []
    lr = max(tuned, key=lambda r: r["best_val_auroc"])["lr"]
    return lr, sorted((r for r in runs if r["lr"] == lr), key=lambda r: r["seed"])


def stats(values):
    values = list(values)
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def verdicts(data):
    res = {}
    for task in TASKS:
        res[task] = {arm: chosen(data, task, arm)[1] for arm in ARMS}
    prem = data.get("premise", {})
    ok_premise = prem and all(v >= 0.9 for t in prem.values() for v in t.values())
    claims = []

    def gate(task, arms):
        runs = [r for a in arms for r in res[task][a]]
        if not ok_premise:
            return "premise failed: a target digit is not recognisable from its pixels"
        if any(len(res[task][a]) < 3 for a in arms):
            return "inconclusive: fewer than 3 seeds"
        if any(r["still_improving"] for r in runs):
            return "inconclusive: a run was still improving at its budget's end"
        return None

    why = gate("contains", ARMS)
    if why:
        claims.append(("(A) every method reaches AUROC >= 0.95 on `contains`", None, why))
    else:
        low = {a: stats(r["test_auroc"] for r in res["contains"][a])[0] for a in ARMS}
        claims.append(("(A) every method reaches AUROC >= 0.95 on `contains`", min(low.values()) >= 0.95,
                       "; ".join(f"{a} {v:.3f}" for a, v in low.items())))
    why = gate("both", ARMS)
    if why:
        claims.append(("(B) TransMIL beats ABMIL, mean and max by >= 0.05 AUROC on `both`", None, why))
    else:
        m = {a: stats(r["test_auroc"] for r in res["both"][a])[0] for a in ARMS}
        rival = max(("ABMIL", "mean pooling", "max pooling"), key=lambda a: m[a])
        gap = m["TransMIL"] - m[rival]
        claims.append(("(B) TransMIL beats ABMIL, mean and max by >= 0.05 AUROC on `both`", gap >= 0.05,
                       f"TransMIL {m['TransMIL']:.3f} vs the best baseline ({rival}) {m[rival]:.3f}: gap {gap:+.3f}"))
    why = gate("adjacent", ("TransMIL", "TransMIL w/o PPEG"))
    if why:
        claims.append(("(C) PPEG beats no PPEG on `adjacent`", None, why))
    else:
        (ma, sa), (mb, sb) = (stats(r["test_auroc"] for r in res["adjacent"][a]) for a in ("TransMIL", "TransMIL w/o PPEG"))
        band = max(2 * max(sa, sb), NOISE_FLOOR)
        claims.append(("(C) PPEG beats no PPEG on `adjacent`", (ma - mb) > band if abs(ma - mb) > band else None,
                       f"with PPEG {ma:.3f} ± {sa:.3f}, without {mb:.3f} ± {sb:.3f}: gap {ma - mb:+.3f} (band {band:.3f})"
                       + ("" if abs(ma - mb) > band else ": within the band, inconclusive")))
    return res, claims


def plot(data, res, path):
    from lightning_ext.core.plotting import new_figure, save_figure

    fig, axes = new_figure(1, 4, figsize=(17, 3.8))
    for ax, task in zip(axes[:3], TASKS):
        names = [a for a in ARMS if res[task][a]]
        means = [stats(r["test_auroc"] for r in res[task][a])[0] for a in names]
        stds = [stats(r["test_auroc"] for r in res[task][a])[1] for a in names]
        ax.bar(range(len(names)), means, yerr=stds, color=["C0", "C9", "C1", "C2", "C3"][:len(names)], capsize=3)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([n.replace(" ", "\n", 1) for n in names], fontsize=7)
        ax.set_ylim(0.4, 1.01)
        ax.set_title(f"{task}: {TASKS[task]}", fontsize=9)
        ax.set_ylabel("test AUROC (3 seeds)")
    # one test bag of the correlated task, so a reader sees what the model sees
    from lightning_ext.data.digits import DigitsDataModule

    dm = make_dm("both", 0)
    dm.setup()
    src = DigitsDataModule()
    src.setup()
    pos = int(np.flatnonzero(dm.datasets["test"].labels.numpy() == 1)[0])
    n, side = int(dm.datasets["test"].lengths[pos]), None
    side = int(np.ceil(np.sqrt(n)))
    idx = dm.datasets["test"].index[pos, :n]
    images = src.test_set.tensors[0][idx, 0].numpy()
    canvas = np.full((side * 9, side * 9), np.nan)
    for j, img in enumerate(images):
        r, c = divmod(j, side)
        canvas[r * 9:r * 9 + 8, c * 9:c * 9 + 8] = img
    axes[3].imshow(canvas, cmap="gray")
    axes[3].set_title(f"a positive `both` test bag ({n} digits)", fontsize=9)
    axes[3].axis("off")
    save_figure(fig, path)


def render(data):
    res, claims = verdicts(data)
    verdict = combine_claims([c for _, c, _ in claims])
    L = ["# TransMIL: correlated multiple-instance learning on bags of real digits", ""]
    L.append("`MILClassifier` (`lightning_ext.mil`) with the TransMIL aggregator (Shao et al., \"TransMIL: Transformer "
             "based Correlated Multiple Instance Learning for Whole Slide Image Classification\", NeurIPS 2021, arXiv "
             "2106.00908; code https://github.com/szc19990412/TransMIL) against ABMIL (gated attention, Ilse et al. "
             "2018), mean and max pooling, and TransMIL without its PPEG, on `BagDataModule` bags of scikit-learn's "
             "8x8 digits. The paper's claim: modelling the correlation between instances (self-attention) and their "
             "layout (PPEG) beats MIL poolings that treat instances independently. TransMIL's parts are tested "
             "against the official formulas in `tests/test_mil.py`.")
    L += ["", "Command (CPU, `torch.set_num_threads(1)`, a 2-core machine shared with 5 other jobs: wall times are "
          "inflated, CPU seconds given):", "", "```bash", *data["meta"]["commands"], "```", ""]
    L += [f"## Verdict: **{verdict}**", ""]
    for name, ok, why in claims:
        L.append(f"- {name}: **{'holds' if ok else 'fails' if ok is False else 'inconclusive'}**: {why}.")
    L += ["", "![TransMIL results](transmil.png)", "", "## Protocol", ""]
    doc = __doc__.split("\n\n")
    L += [doc[1], "", doc[2], "", doc[3]]
    L += ["", f"Data: {P['train_bags']} / {P['val_bags']} / {P['test_bags']} bags of {P['min_instances']}-"
          f"{P['max_instances']} digits (``adjacent``: square sizes 16, 25, 36, 49, 64) drawn from the train / "
          "validation / test digits (1,293 / 144 / 360 images, standardised pixels as 64-d instance features).", ""]
    prem = data.get("premise", {})
    L.append("Premise (instance-level balanced accuracy of target-vs-rest logistic regression on test digits): "
             + "; ".join(f"{t}: " + ", ".join(f"digit {d} {v:.3f}" for d, v in prem[t].items()) for t in prem) + ".")
    for task in TASKS:
        L += ["", f"## `{task}`: positive iff the bag {TASKS[task]}", "",
              "| arm | lr (val-chosen) | test AUROC | test accuracy | best epoch / epochs (seeds 0, 1, 2) | CPU-s per run |",
              "|---|---|---|---|---|---|"]
        for arm in ARMS:
            lr, runs = chosen(data, task, arm)
            if not runs:
                continue
            au, ac = stats(r["test_auroc"] for r in runs), stats(r["test_acc"] for r in runs)
            L.append(f"| {arm} | {lr:g} | {au[0]:.4f} ± {au[1]:.4f} | {ac[0]:.4f} ± {ac[1]:.4f} | "
                     + ", ".join(f"{r['best_epoch'] + 1}/{r['epochs']}" for r in runs)
                     + f" | {statistics.mean(r['cpu_s'] for r in runs):.0f} |")
        tuning = []
        for arm in ARMS:
            tuned = sorted((r for r in data["runs"] if r["task"] == task and r["arm"] == arm and r["seed"] == 0),
                           key=lambda r: r["lr"])
            if tuned:
                tuning.append(f"{arm}: " + ", ".join(f"{r['lr']:g} → {r['best_val_auroc']:.4f}" for r in tuned))
        L += ["", "Tuning (seed 0, best validation AUROC): " + "; ".join(tuning) + "."]
    adj = {a: [r for r in data["runs"] if r["task"] == "adjacent" and r["arm"] == a]
           for a in ("TransMIL", "TransMIL w/o PPEG")}
    if all(adj.values()):
        L += ["", "## Post-hoc observation (after the runs; not in the verdict)", "",
              "On `adjacent`, every run of each TransMIL arm (tuning and seeds, sorted): best validation AUROC with "
              "PPEG " + ", ".join(f"{r['best_val_auroc']:.3f}" for r in sorted(adj["TransMIL"], key=lambda r: r["best_val_auroc"]))
              + "; without PPEG " + ", ".join(f"{r['best_val_auroc']:.3f}" for r in sorted(
                  adj["TransMIL w/o PPEG"], key=lambda r: r["best_val_auroc"]))
              + ". The PPEG arm's failed seed stopped early (patience 6) before it left chance; no run without "
                "PPEG got far above chance. Layout is learnable with the PPEG and not without it in these runs, but "
                "the rule's noise band, set by the failed seed, leaves claim (C) inconclusive."]
    steps = max((r["steps"] for r in data["runs"]), default=0)
    L += ["", f"Budget per run: at most {P['max_epochs']} epochs = {P['max_epochs'] * 63} optimizer steps = "
          f"{P['max_epochs'] * P['train_bags']:,} bags seen (largest run here: {steps} steps).", "",
          "## Scaled down from the paper", "",
          "- Whole-slide images with 1024-d ResNet-50 patch features and thousands of instances per bag (CAMELYON16, "
          "TCGA) become bags of 16-64 real 8x8 digits with pixel features; dim 64 instead of 512; exact attention "
          "instead of Nyström (equal for short bags; `tests/test_mil.py` checks Nyström against the reference "
          "conventions separately); AdamW instead of Lookahead(RAdam); batches of 16 bags instead of 1 (each bag's "
          "logits equal its batch-of-one forward).",
          f"- Machine: {data['meta']['machine']}."]
    return "\n".join(L) + "\n", res, verdict


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    ap.add_argument("--render-only", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from lightning_ext.core.io import atomic_write_json, atomic_write_text

    data = json.loads(JSON.read_text()) if JSON.exists() else {}
    data.setdefault("meta", {"commands": []})
    data["meta"].update(protocol=P, machine=f"{platform.machine()}, torch {torch.__version__}")
    cmd = "nice -n 10 .venv/bin/python benchmarks/transmil.py" + ("" if args.tasks == list(TASKS) else
                                                                   " --tasks " + " ".join(args.tasks))
    if not args.render_only:
        if cmd not in data["meta"]["commands"]:
            data["meta"]["commands"].append(cmd)
        main_runs(data, args.tasks)
        atomic_write_json(data, JSON, indent=1)
    page, res, verdict = render(data)
    plot(data, res, OUT / "transmil.png")
    atomic_write_text(page, OUT / "transmil.md")
    print("verdict:", verdict)


if __name__ == "__main__":
    main()
