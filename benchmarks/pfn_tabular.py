"""A small TabPFN-style PFN trained here on the SCM prior vs tuned scikit-learn baselines on iris, wine and breast
cancer at 20/50/100 training rows (Hollmann et al., ICLR 2023, at CPU scale).

One PriorFittedNetwork per seed is trained with Lightning on `SCMPriorDataModule` (the prior only: it never sees
the real tables), saved as a checkpoint and loaded by `PFNClassifier` (weights_only), which then classifies each
table in one forward pass with no training. Baselines (logistic regression, kNN, random forest) are tuned by
3-fold cross-validation on the same training rows (never on test) over grids that include the defaults.

    nice -n 10 python benchmarks/pfn_tabular.py             # writes docs/results/pfn_tabular.{json,md,png}
    python benchmarks/pfn_tabular.py --render-only
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lightning_ext.core.io import atomic_write_json, atomic_write_text  # noqa: E402
from lightning_ext.core.plotting import new_figure, save_figure  # noqa: E402
from lightning_ext.tabular.pfn_classifier import PFNClassifier  # noqa: E402
from lightning_ext.tabular.prior_fitted_network import PriorFittedNetwork  # noqa: E402
from lightning_ext.tabular.scm_prior import SCMPriorDataModule  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "results" / "pfn_tabular.json"
CKPT_DIR = ROOT / "runs" / "pfn_tabular"
PRIOR = dict(min_features=1, max_features=32, max_classes=4, scm_fraction=0.5, categorical_fraction=0.1,
             missing_fraction=0.0, batch_size=16, seq_len=128, min_train=8, min_test=16)
MODEL = dict(task="classification", max_features=32, max_classes=4, d_model=64, nhead=4, num_layers=4,
             dim_feedforward=128, lr=5e-4, warmup_steps=200)
DATASETS = ("iris", "wine", "breast_cancer")
N_TRAIN = (20, 50, 100)
SPLITS = 5
N_ENSEMBLE = 8


def load(name: str) -> tuple[np.ndarray, np.ndarray]:
    from sklearn import datasets

    d = getattr(datasets, f"load_{name}")()
    return d.data.astype(np.float64), d.target


def split(y: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    tr, te = train_test_split(idx, train_size=n, stratify=y, random_state=seed)
    return tr, te


def baselines(seed: int) -> dict:
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    cv = StratifiedKFold(3, shuffle=True, random_state=seed)
    return {
        "logistic regression": GridSearchCV(make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)),
                                            {"logisticregression__C": [0.01, 0.1, 1.0, 10.0, 100.0]}, cv=cv),
        "kNN": GridSearchCV(make_pipeline(StandardScaler(), KNeighborsClassifier()),
                            {"kneighborsclassifier__n_neighbors": [1, 3, 5, 7, 9]}, cv=cv),
        "random forest": GridSearchCV(RandomForestClassifier(n_estimators=100, random_state=seed),
                                      {"max_features": ["sqrt", 0.5], "min_samples_leaf": [1, 3]}, cv=cv),
    }


def train_pfn(seed: int, steps: int) -> tuple[Path, dict]:
    torch.manual_seed(seed)
    dm = SCMPriorDataModule(**PRIOR, steps_per_epoch=steps, seed=seed)
    model = PriorFittedNetwork(**MODEL)
    untrained = CKPT_DIR / f"seed{seed}_step0.pt"
    CKPT_DIR.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(max_steps=steps, max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1.0,
                      log_every_n_steps=50)
    losses = []

    from lightning.pytorch import Callback

    class LossLog(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))
            if trainer.global_step % 250 == 0:
                print(f"    step {trainer.global_step}: loss (mean of last 250) {np.mean(losses[-250:]):.3f}",
                      flush=True)

    trainer.callbacks.append(LossLog())
    torch.save(model.state_dict(), untrained)
    start, cpu = time.time(), time.process_time()
    trainer.fit(model, datamodule=dm)
    info = {"train_wall_s": time.time() - start, "train_cpu_s": time.process_time() - cpu,
            "steps": trainer.global_step, "datasets_seen": trainer.global_step * PRIOR["batch_size"],
            "loss_first_250": float(np.mean(losses[:250])), "loss_last_250": float(np.mean(losses[-250:])),
            "loss_curve": [float(np.mean(losses[i:i + 100])) for i in range(0, len(losses), 100)],
            "params": sum(p.numel() for p in model.parameters())}
    path = CKPT_DIR / f"seed{seed}.ckpt"
    trainer.save_checkpoint(path)
    return path, info


def evaluate(seed: int, ckpt: Path) -> list[dict]:
    from sklearn.dummy import DummyClassifier
    from sklearn.metrics import accuracy_score, f1_score

    untrained = PriorFittedNetwork(**MODEL)
    untrained.load_state_dict(torch.load(CKPT_DIR / f"seed{seed}_step0.pt", weights_only=True))
    rows = []
    for name in DATASETS:
        X, y = load(name)
        for n in N_TRAIN:
            for r in range(SPLITS):
                split_seed = 1000 * seed + r
                tr, te = split(y, n, split_seed)
                models = {"PFN (ours)": PFNClassifier(str(ckpt), n_ensemble=N_ENSEMBLE, random_state=split_seed),
                          "PFN untrained (control)": PFNClassifier(untrained, n_ensemble=N_ENSEMBLE,
                                                                   random_state=split_seed),
                          "majority class": DummyClassifier(), **baselines(split_seed)}
                for label, est in models.items():
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        t = time.perf_counter()
                        est.fit(X[tr], y[tr])
                        fit_s = time.perf_counter() - t
                        t = time.perf_counter()
                        pred = est.predict(X[te])
                        pred_s = time.perf_counter() - t
                    rows.append({"seed": seed, "split": r, "dataset": name, "n_train": n, "model": label,
                                 "acc": float(accuracy_score(y[te], pred)),
                                 "f1": float(f1_score(y[te], pred, average="macro")),
                                 "fit_s": fit_s, "predict_s": pred_s, "n_test": len(te)})
            print(f"  seed {seed} {name} n={n}: " + ", ".join(
                f"{m} {np.mean([q['acc'] for q in rows if q['dataset'] == name and q['n_train'] == n and q['model'] == m and q['seed'] == seed]):.3f}"
                for m in ("PFN (ours)", "logistic regression", "kNN", "random forest")), flush=True)
    return rows


def speed(ckpt: Path) -> dict:
    """Seconds for fit + predict_proba of a 1,000-row context and 1,000 query rows (30 features, 2 classes)."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(2000, 30))
    y = (X[:, 0] + X[:, 1] > 0).astype(int)
    out = {}
    for members in (1, N_ENSEMBLE):
        clf = PFNClassifier(str(ckpt), n_ensemble=members)
        clf.fit(X[:100], y[:100]).predict_proba(X[100:200])  # warm-up
        times = []
        for _ in range(3):
            t = time.perf_counter()
            clf.fit(X[:1000], y[:1000]).predict_proba(X[1000:])
            times.append(time.perf_counter() - t)
        out[f"ensemble_{members}_s"] = min(times)
    return out


def cell(rows, model, name, n, key="acc"):
    """Per-seed means (over splits) for one cell."""
    seeds = sorted({r["seed"] for r in rows})
    return [statistics.mean(r[key] for r in rows if r["model"] == model and r["dataset"] == name
                            and r["n_train"] == n and r["seed"] == s) for s in seeds]


def render(data: dict) -> None:
    rows, train = data["rows"], data["train"]
    models = ["PFN (ours)", "logistic regression", "kNN", "random forest", "majority class", "PFN untrained (control)"]
    base = ["logistic regression", "kNN", "random forest"]

    def ms(v, d=3):
        return f"{statistics.mean(v):.{d}f} ± {statistics.pstdev(v):.{d}f}"

    # claims
    within_best, vs_lr_knn, premise = 0, True, True
    table = []
    for name in DATASETS:
        for n in N_TRAIN:
            pfn = statistics.mean(cell(rows, "PFN (ours)", name, n))
            best = max(statistics.mean(cell(rows, b, name, n)) for b in base)
            lr = statistics.mean(cell(rows, "logistic regression", name, n))
            knn = statistics.mean(cell(rows, "kNN", name, n))
            maj = statistics.mean(cell(rows, "majority class", name, n))
            ctrl = statistics.mean(cell(rows, "PFN untrained (control)", name, n))
            within_best += pfn >= best - 0.02
            if n <= 50 and not (pfn >= lr - 0.02 and pfn > knn):
                vs_lr_knn = False
            premise &= pfn > maj + 0.1 and pfn > ctrl + 0.1
            table.append((name, n, pfn, best))
    cells = len(DATASETS) * len(N_TRAIN)
    if not premise:
        verdict = "not testable here"
    elif within_best >= 6 and vs_lr_knn:
        verdict = "reproduced"
    elif within_best >= 6 or vs_lr_knn:
        verdict = "partly reproduced"
    else:
        verdict = "not reproduced"

    fig, axes = new_figure(1, 3, figsize=(13, 3.8))
    for i, name in enumerate(DATASETS):
        ax = axes[i]
        for m in models[:4]:
            vals = [cell(rows, m, name, n) for n in N_TRAIN]
            ax.errorbar(N_TRAIN, [statistics.mean(v) for v in vals], [statistics.pstdev(v) for v in vals],
                        marker="o", capsize=3, label=m)
        ax.set_xscale("log")
        ax.set_xticks(N_TRAIN)
        ax.set_xticklabels([str(n) for n in N_TRAIN])
        ax.minorticks_off()
        ax.set_xlabel("training rows")
        ax.set_ylabel("test accuracy")
        ax.set_title(name)
        if i == 0:
            ax.legend(fontsize=8)
    save_figure(fig, OUT.with_suffix(".png"))

    seeds = sorted({r["seed"] for r in rows})
    lines = [
        "# A TabPFN-style PFN trained on 1 CPU thread vs tuned baselines on small tables (Hollmann et al., ICLR 2023)",
        "",
        "*Rendered by `benchmarks/pfn_tabular.py` from [pfn_tabular.json](pfn_tabular.json); do not edit by hand.*",
        "",
        "Claim tested: Hollmann, Müller, Eggensperger and Hutter, *TabPFN: A Transformer That Solves Small Tabular "
        "Classification Problems in a Second* (ICLR 2023, arXiv:2207.01848): a transformer trained only on "
        "synthetic datasets from a prior classifies a new small table in one forward pass, with no training, as "
        "well as tuned standard classifiers. The published model (26M parameters, about 20 h on 8 GPUs, a richer "
        "prior) is out of reach here; this page tests the mechanism at CPU scale.",
        "",
        "Acceptance (fixed before the runs): premise: the trained PFN beats the majority class and the same network "
        "untrained by more than 0.1 accuracy in every cell. **Reproduced** if the PFN's mean accuracy is within "
        f"0.02 of the best tuned baseline in at least 6 of the {cells} (dataset, rows) cells; **partly reproduced** if "
        "not, but it is >= logistic regression - 0.02 and > kNN at 20 and 50 rows on every dataset (the spec's "
        "CPU-scale criterion); otherwise **not reproduced**.",
        "",
        "Amended after the runs, before this verdict was written (stated, not hidden): as first written, the rule "
        "gave \"reproduced\" on the 6-of-9 count alone even when the weaker CPU-scale criterion failed, which is "
        "incoherent (a reproduction must also pass the weaker test). Now **reproduced** needs both conditions, "
        "**partly reproduced** either one. Under the first wording this page would read \"reproduced\".",
        "",
        f"## Verdict: **{verdict}**",
        "",
        f"The PFN is within 0.02 of the best tuned baseline in {within_best} of {cells} cells; >= LogReg - 0.02 and "
        f"> kNN at 20-50 rows everywhere: {vs_lr_knn}; premise met: {premise}. "
        f"The PFN beats the best tuned baseline in {sum(p > b for _, _, p, b in table)} of {cells} cells; its "
        "shortfalls in the cells within 0.02 are "
        + ", ".join(f"{b - p:.3f} ({nm}, {n})" for nm, n, p, b in table if b - 0.02 <= p < b)
        + "; on iris it trails by "
        + ", ".join(f"{b - p:.3f}" for nm, n, p, b in table if nm == "iris")
        + f" (20/50/100 rows), where it also loses to kNN. {len(seeds)} of 3 planned seeds finished (below), so "
        f"the within-0.02 count rests on {len(seeds)} seed(s).",
        "",
        "## Command and runtime",
        "",
        "```bash",
        data["command"],
        "python benchmarks/pfn_tabular.py --render-only   # this page, from the JSON",
        "```",
        "",
        f"One PyTorch thread (`torch.set_num_threads(1)`), `nice -n 10`, CPU ({data['machine']}), 2 cores shared with "
        f"other jobs. PFN training per seed: {ms([t['train_wall_s'] / 60 for t in train], 1)} min wall, "
        f"{ms([t['train_cpu_s'] / 60 for t in train], 1)} CPU-min; training throughput "
        f"{ms([t['datasets_seen'] / t['train_wall_s'] for t in train], 1)} datasets/s wall "
        f"({ms([t['datasets_seen'] / t['train_cpu_s'] for t in train], 1)} per CPU-second).",
        "",
        f"Seeds planned: 3 (PFN init, prior stream, splits); finished: {len(seeds)} ({', '.join(map(str, seeds))}). "
        "Each seed's PFN training plus the evaluation took about half an hour of wall time on the loaded machine; "
        "seeds that did not finish before the session's deadline are not on this page.",
        "",
        "Prediction speed (the issue's target: a 1,000-row context and 1,000 query rows in under 1 s on 2 cores): "
        f"`PFNClassifier.fit` + `predict_proba` with 30 features took {ms([t['speed']['ensemble_1_s'] for t in train])} s "
        f"with 1 ensemble member and {ms([t['speed'][f'ensemble_{N_ENSEMBLE}_s'] for t in train])} s with "
        f"{N_ENSEMBLE}, on one shared thread (best of 3).",
        "",
        "## Set-up",
        "",
        f"- **Prior**: `SCMPriorDataModule({', '.join(f'{k}={v}' for k, v in PRIOR.items())})`.",
        f"- **Model**: `PriorFittedNetwork({', '.join(f'{k}={v}' for k, v in MODEL.items())})`, "
        f"{train[0]['params']:,} parameters; AdamW, warm-up then cosine, gradient clipping 1.0, fp32.",
        f"- **Budget**: {train[0]['steps']} steps x {PRIOR['batch_size']} datasets = {train[0]['datasets_seen']:,} "
        f"synthetic datasets per seed; training loss (cross-entropy per query) "
        f"{ms([t['loss_first_250'] for t in train])} over the first 250 steps, "
        f"{ms([t['loss_last_250'] for t in train])} over the last 250; 100-step means at 40/60/80/100% of training "
        + ", ".join(ms([t["loss_curve"][int(f * (len(t["loss_curve"]) - 1))] for t in train])
                    for f in (0.4, 0.6, 0.8, 1.0))
        + " (flattening as the cosine schedule decays to zero; with an endless prior there is no overfitting and so "
        "no best-validation step to pick: the budget, model size and prior limit this PFN).",
        f"- **Inference**: `PFNClassifier(<checkpoint>, n_ensemble={N_ENSEMBLE})` (feature permutations, class "
        "rotations, Yeo-Johnson on every second member), the checkpoint read with `weights_only=True`.",
        "- **Baselines**, tuned by 3-fold stratified CV on the training rows only (grids include the defaults): "
        "logistic regression on standardised features (C in 0.01-100), kNN on standardised features (k in 1-9), "
        "random forest (100 trees; max_features sqrt/0.5, min_samples_leaf 1/3). Controls: majority class, the "
        "PFN's network before training.",
        f"- **Splits**: for each seed ({', '.join(map(str, seeds))}: PFN init, prior stream, splits) {SPLITS} stratified "
        "random splits per (dataset, training rows); the rest of the table is the test set. Mean ± std below are "
        "over seeds of the per-seed mean over splits.",
        "",
        "## Test accuracy",
        "",
        "| dataset | rows | " + " | ".join(models) + " |",
        "|---|---|" + "---|" * len(models),
    ]
    for name in DATASETS:
        for n in N_TRAIN:
            vals = {m: cell(rows, m, name, n) for m in models}
            best = max(statistics.mean(vals[m]) for m in models[:4])
            lines.append(f"| {name} | {n} | " + " | ".join(
                (f"**{ms(vals[m])}**" if statistics.mean(vals[m]) == best else ms(vals[m])) for m in models) + " |")
    lines += ["", "## Macro-F1", "", "| dataset | rows | " + " | ".join(models[:4]) + " |",
              "|---|---|" + "---|" * 4]
    for name in DATASETS:
        for n in N_TRAIN:
            lines.append(f"| {name} | {n} | " + " | ".join(ms(cell(rows, m, name, n, "f1")) for m in models[:4]) + " |")
    lines += ["", f"![accuracy vs training rows]({OUT.with_suffix('.png').name})", "",
              "## Time (fit + predict of one split, seconds, mean over all splits; tuning included for baselines)", "",
              "| dataset | rows | " + " | ".join(models[:4]) + " |", "|---|---|" + "---|" * 4]
    for name in DATASETS:
        for n in N_TRAIN:
            lines.append(f"| {name} | {n} | " + " | ".join(
                f"{statistics.mean(r['fit_s'] + r['predict_s'] for r in rows if r['model'] == m and r['dataset'] == name and r['n_train'] == n):.3f}"
                for m in models[:4]) + " |")
    lines += [
        "",
        "## Where this falls short of the published TabPFN",
        "",
        f"- A {train[0]['params'] / 1e6:.2f}M-parameter model trained for {train[0]['steps']} steps on one shared "
        "CPU thread, against TabPFN's 26M parameters trained for about 20 h on 8 GPUs (the spec's 0.57M-parameter "
        "CPU PFN, trained 2,300 steps on an idle core with a different prior, reached 0.875/0.903/0.928 on iris at "
        "20/50/100 rows; the machine's load made that size unaffordable here).",
        "- A simplified prior (no GP component, no differentiable hyperprior, no feature warping beyond categorical "
        "codes), at most 4 classes, 32 features and 128 points per dataset.",
        "- Three small, easy tables; TabPFN's claim is about 18 OpenML-CC18 tables and against boosted trees and "
        "AutoML, which this page does not run.",
    ]
    lines += [
        "- Diagnostic, after the runs and not used for any number above: on iris the seed-0 PFN also classifies its "
        "own 100-row context at only 0.87 and confuses versicolor with virginica (classes 1 and 2), with or without "
        "the power transform and with 1 or 8 ensemble members (0.86 either way): the small model does not resolve "
        "that boundary, which the baselines find easily.",
        "- Times were measured on a machine whose load average was 7-13 on 2 cores, so they compare methods within "
        "a run only; the baselines' times include their cross-validated tuning.",
    ]
    atomic_write_text("\n".join(lines) + "\n", OUT.with_suffix(".md"))


def main() -> None:
    global OUT, SPLITS
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--splits", type=int, default=SPLITS)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--render-only", action="store_true")
    args = parser.parse_args()
    OUT, SPLITS = args.out, args.splits
    if not args.render_only:
        torch.set_num_threads(1)
        # resumable: seeds already on the page are kept; a seed whose checkpoint and training record exist (a run
        # stopped after training) is evaluated without training again
        old = json.loads(OUT.read_text()) if OUT.is_file() else {}
        train = [t for t in old.get("train", []) if t["steps"] == args.steps]
        rows = [r for r in old.get("rows", []) if any(t["seed"] == r["seed"] for t in train)]
        for seed in args.seeds:
            if any(t["seed"] == seed for t in train):
                continue
            ckpt, side = CKPT_DIR / f"seed{seed}.ckpt", CKPT_DIR / f"seed{seed}_train_info.json"
            info = json.loads(side.read_text()) if side.is_file() and ckpt.is_file() else None
            if info is None or info.get("steps") != args.steps:
                print(f"seed {seed}: training", flush=True)
                ckpt, info = train_pfn(seed, args.steps)
                atomic_write_json({"seed": seed, **info}, side, indent=1)
            info.pop("seed", None)
            train.append({"seed": seed, **info, "speed": speed(ckpt)})
            rows += evaluate(seed, ckpt)
            data = {"command": "nice -n 10 python benchmarks/pfn_tabular.py " + " ".join(sys.argv[1:]),
                    "machine": f"{platform.machine()}, Python {platform.python_version()}, torch {torch.__version__}",
                    "train": train, "rows": rows}
            atomic_write_json(data, OUT, indent=1)
    render(json.loads(OUT.read_text()))
    print(OUT.with_suffix(".md").read_text()[:2500])


if __name__ == "__main__":
    main()
