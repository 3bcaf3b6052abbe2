"""Deep-kernel (NNGP/NTK) classifier vs 1-NN, majority vote and the Bayes rate on the authors' 3-d Dirichlet data.

Claim (Radhakrishnan, Belkin & Uhler 2022, arXiv 2204.14126): with a dimension-specific activation (``3d_opt``,
``sine`` with a = 2.676 for 3-d inputs) the infinitely wide network's kernel classifier approaches the Bayes error
as depth grows and beats 1-NN and majority vote; ReLU's deep kernel does not.

    nice -n 10 .venv/bin/python benchmarks/ntk_activation.py          # runs, writes JSON, renders the page
    .venv/bin/python benchmarks/ntk_activation.py --render            # re-render from the JSON only

1 PyTorch thread (torch.set_num_threads(1)); float64 throughout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import dirichlet
from sklearn.neighbors import KNeighborsClassifier

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import combine_claims, mean_std  # noqa: E402

from lightning_ext.core.io import atomic_write_json, atomic_write_text  # noqa: E402
from lightning_ext.core.plotting import new_figure, save_figure  # noqa: E402
from lightning_ext.vision.ntk_activation import DeepKernelClassifier, sphere_normalize  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "docs" / "results"
ALPHA0, ALPHA1, PRIOR1 = np.array([0.5, 0.5, 2.5]), np.array([2.5, 0.1, 0.5]), 0.4  # authors' main.py, 3-d
N_TRAIN = N_TEST = 1000  # authors: 10,000 each; the spec measured 2,000 (scaled down for 2 shared cores)
DEPTHS = [1, 3, 10, 30, 100]
ARMS = [  # (label, activation, kwargs, kernel)
    ("3d_opt NNGP", "3d_opt", {}, "nngp"),
    ("sine_2.676 NNGP", "sine", {"a": 2.676}, "nngp"),
    ("relu NNGP", "relu", {}, "nngp"),
    ("relu NTK", "relu", {}, "ntk"),
]
SEEDS = [0, 1, 2]


def make_data(n: int, rng: np.random.Generator):
    y = (rng.random(n) < PRIOR1).astype(int)
    x = np.where(y[:, None] == 1, rng.dirichlet(ALPHA1, n), rng.dirichlet(ALPHA0, n))
    x = np.clip(x, 1e-300, None)
    x = x / x.sum(1, keepdims=True)
    return x, y


def bayes_predict(x_simplex: np.ndarray) -> np.ndarray:
    # The map simplex -> sphere (x / |x|) is the same bijection for both classes, so the Bayes rule on the sphere
    # compares the prior-weighted Dirichlet densities at the simplex point.
    x = np.clip(x_simplex, 1e-300, None)
    x = x / x.sum(1, keepdims=True)
    l0 = np.log(1 - PRIOR1) + np.array([dirichlet.logpdf(r, ALPHA0) for r in x])
    l1 = np.log(PRIOR1) + np.array([dirichlet.logpdf(r, ALPHA1) for r in x])
    return (l1 > l0).astype(int)


def hilbert_predict(xs_tr: torch.Tensor, y_tr: np.ndarray, xs_te: torch.Tensor) -> np.ndarray:
    # Devroye's Hilbert kernel estimate sum_i y_i / |x - x_i|^d, d = input dim - 1 = 2, labels +-1 (authors' code).
    d = xs_tr.shape[1] - 1
    dist2 = torch.clamp(2 - 2 * xs_te @ xs_tr.T, min=1e-300)
    score = (dist2 ** (-d / 2)) @ torch.as_tensor(2.0 * y_tr - 1, dtype=torch.float64)
    return (score > 0).numpy().astype(int)


def run_seed(seed: int) -> dict:
    rng = np.random.default_rng(1717 + seed)
    x_tr, y_tr = make_data(N_TRAIN, rng)
    x_te, y_te = make_data(N_TEST, rng)
    xs_tr, xs_te = sphere_normalize(torch.as_tensor(x_tr)), sphere_normalize(torch.as_tensor(x_te))
    acc = lambda p: float((np.asarray(p) == y_te).mean())  # noqa: E731
    res = {"seed": seed, "bayes": acc(bayes_predict(x_te)), "bayes_train": float((bayes_predict(x_tr) == y_tr).mean())}
    res["majority"] = acc(np.full(N_TEST, np.bincount(y_tr).argmax()))
    res["1nn"] = acc(KNeighborsClassifier(1).fit(xs_tr.numpy(), y_tr).predict(xs_te.numpy()))
    # k-NN with k chosen on a validation split of the training set (a tuned reference, not the paper's baseline)
    cut = int(0.8 * N_TRAIN)
    val = {k: float((KNeighborsClassifier(k).fit(xs_tr[:cut].numpy(), y_tr[:cut]).predict(xs_tr[cut:].numpy())
                     == y_tr[cut:]).mean()) for k in (1, 3, 5, 9, 15, 25, 41, 65, 101)}
    k_best = max(val, key=val.get)
    res["knn_tuned"], res["knn_k"] = acc(KNeighborsClassifier(k_best).fit(xs_tr.numpy(), y_tr).predict(xs_te.numpy())), k_best
    hil = hilbert_predict(xs_tr, y_tr, xs_te)
    res["hilbert"] = acc(hil)
    res["arms"] = {}
    for label, act, kw, kernel in ARMS:
        rows = []
        for depth in DEPTHS:
            t = time.perf_counter()
            clf = DeepKernelClassifier(act, depth=depth, kernel=kernel, **kw).fit(xs_tr, y_tr)
            pred = clf.predict(xs_te).numpy()
            rows.append({"depth": depth, "acc": acc(pred), "agree_hilbert": float((pred == hil).mean()),
                         "share_majority_label": float((pred == np.bincount(y_tr).argmax()).mean()),
                         "cond": clf.condition_number_, "seconds": time.perf_counter() - t})
            print(f"seed {seed} {label} L={depth}: acc {rows[-1]['acc']:.4f} agree-Hilbert "
                  f"{rows[-1]['agree_hilbert']:.3f} cond {clf.condition_number_:.3g}", flush=True)
        res["arms"][label] = rows
    print({k: v for k, v in res.items() if k != "arms"}, flush=True)
    return res


def verdict(data: dict) -> tuple[str, list[str]]:
    seeds = data["seeds"]
    m = lambda f: statistics.mean(f(s) for s in seeds)  # noqa: E731
    sd = lambda f: statistics.stdev(f(s) for s in seeds)  # noqa: E731
    lines = []
    gap_1nn = [s["bayes"] - s["1nn"] for s in seeds]
    premise = min(gap_1nn) > 0.005 and m(lambda s: s["bayes"] - s["majority"]) > 0.2
    lines.append(f"Premise: Bayes − 1-NN accuracy per seed {', '.join(f'{g:+.4f}' for g in gap_1nn)} "
                 f"(> 0.005 on every seed: {'yes' if min(gap_1nn) > 0.005 else 'no'}); Bayes − majority "
                 f"{m(lambda s: s['bayes'] - s['majority']):+.3f}. The set-up {'can' if premise else 'cannot'} "
                 "separate a consistent classifier from 1-NN and majority vote.")
    if not premise:
        return "not testable here", lines
    claims = []
    for label in ("3d_opt NNGP", "sine_2.676 NNGP"):
        last = lambda s: s["arms"][label][-1]  # noqa: E731
        first = lambda s: s["arms"][label][0]  # noqa: E731
        d_1nn = [last(s)["acc"] - s["1nn"] for s in seeds]
        d_hil = [last(s)["acc"] - s["hilbert"] for s in seeds]
        gap_last, gap_first = m(lambda s: s["bayes"] - last(s)["acc"]), m(lambda s: s["bayes"] - first(s)["acc"])
        beats_1nn = min(d_1nn) > 0
        near_hilbert = abs(statistics.mean(d_hil)) <= 0.005
        above_maj = m(lambda s: last(s)["acc"] - s["majority"]) > 0.3
        closer = gap_last < gap_first
        ok = beats_1nn and near_hilbert and above_maj and closer
        claims.append(ok)
        lines.append(
            f"{label}, L = {DEPTHS[-1]}: accuracy − 1-NN per seed {', '.join(f'{d:+.4f}' for d in d_1nn)} "
            f"(> 0 on every seed: {'yes' if beats_1nn else 'no'}); − Hilbert mean {statistics.mean(d_hil):+.4f} "
            f"(within 0.005: {'yes' if near_hilbert else 'no'}); − majority > 0.3: {'yes' if above_maj else 'no'}; "
            f"gap to Bayes {gap_first:.4f} at L = {DEPTHS[0]} → {gap_last:.4f} at L = {DEPTHS[-1]} "
            f"(shrinks: {'yes' if closer else 'no'}); agreement with Hilbert "
            f"{m(lambda s: last(s)['agree_hilbert']):.3f} (≥ 0.95 expected). Claim {'holds' if ok else 'fails'}.")
    return combine_claims(claims), lines


def render(data: dict) -> None:
    seeds = data["seeds"]
    v, lines = verdict(data)
    col = lambda f: mean_std([f(s) for s in seeds], 4)  # noqa: E731
    d1 = [s["arms"]["3d_opt NNGP"][-1]["acc"] - s["1nn"] for s in seeds]
    md = [
        "# Wide and deep networks achieve optimality: the deep NNGP/NTK classifier at the Bayes rate",
        "",
        "Paper: Radhakrishnan, Belkin and Uhler, *Wide and Deep Neural Networks Achieve Optimality for "
        "Classification* (arXiv:2204.14126, 2022); reference code: the authors' repository \"Code for Consistency "
        "with Infinitely Wide and Deep Networks\" (`main.py`, `models.py`, `dataset.py`). Components: "
        "`lightning_ext.vision.ntk_activation.NTKActivation`, `DeepKernelClassifier`, `deep_kernel`.",
        "",
        "Claim tested: with the dimension-specific activations (`3d_opt`, φ̌(ρ) = ρ³/2 + ρ/2, and `sine` with "
        "a = 2.676, for 3-d inputs) the infinitely wide network's NNGP kernel classifier approaches the Bayes "
        "error as depth grows, beating 1-NN and majority vote (ReLU is shown as the contrast).",
        "",
        f"## Verdict: {v}",
        "",
        "Rule (computed by the script from the JSON; the spec's pass criteria): premise first (Bayes beats 1-NN by "
        "> 0.005 on every seed and majority by > 0.2). Then for each consistent activation at the largest depth: "
        "above 1-NN on every seed, within 0.005 of the Hilbert estimate on average, > 0.3 above majority vote, and "
        "a smaller gap to Bayes than at depth 1. Both hold: reproduced; one: partly; none: not reproduced.",
        "",
        *[f"- {line}" for line in lines],
        "",
        "## Set-up",
        "",
        f"- Data: the authors' 3-d Dirichlet setting, class 0 ~ Dir{tuple(ALPHA0.tolist())}, class 1 ~ Dir{tuple(ALPHA1.tolist())}, "
        f"P(class 1) = {PRIOR1}, points mapped to the unit sphere; n_train = n_test = {N_TRAIN} "
        "(scaled down from the authors' 10,000 each), seeds "
        f"{', '.join(str(1717 + s) for s in SEEDS)} (numpy). The Bayes classifier compares the prior-weighted "
        "Dirichlet densities (exact, the map to the sphere is the same bijection for both classes).",
        "- Kernel classifier: closed-form NNGP (and NTK for ReLU) by the layer recursion, interpolation of one-hot "
        "labels without ridge in float64, diagonal of the NNGP train kernel set to 1 (as the authors' code); "
        f"depths {DEPTHS}. Nothing is trained or tuned: the only variable is depth.",
        "- Baselines: 1-NN and majority vote (the paper's), the Hilbert kernel estimate Σ y_i / |x − x_i|^2 "
        "(Devroye et al.; the authors' consistent reference), and a k-NN with k chosen on a 20 % validation split "
        "of the training set from {1, 3, ..., 101} (a tuned reference that is *also* consistent; not in the paper).",
        f"- 1 PyTorch thread, `nice -n 10`, 2 shared cores; total runtime {data['seconds']:.0f} s. Command: "
        "`nice -n 10 .venv/bin/python benchmarks/ntk_activation.py`.",
        "",
        "## Results (test accuracy, mean ± std over 3 seeds)",
        "",
        "| classifier | accuracy |",
        "|---|---|",
        f"| Bayes | {col(lambda s: s['bayes'])} |",
        f"| majority vote | {col(lambda s: s['majority'])} |",
        f"| 1-NN | {col(lambda s: s['1nn'])} |",
        f"| k-NN, k tuned on validation (k = {', '.join(str(s['knn_k']) for s in seeds)}) | "
        f"{col(lambda s: s['knn_tuned'])} |",
        f"| Hilbert estimate | {col(lambda s: s['hilbert'])} |",
        "",
        "| kernel | " + " | ".join(f"L = {d}" for d in DEPTHS) + " | agree w/ Hilbert at L = " + str(DEPTHS[-1])
        + " | share predicting the majority label at L = " + str(DEPTHS[-1]) + " | cond(K) at L = "
        + str(DEPTHS[-1]) + " |",
        "|---|" + "---|" * (len(DEPTHS) + 3),
    ]
    for label, *_ in ARMS:
        cells = [col(lambda s, i=i: s["arms"][label][i]["acc"]) for i in range(len(DEPTHS))]
        md.append(f"| {label} | " + " | ".join(cells)
                  + f" | {col(lambda s: s['arms'][label][-1]['agree_hilbert'])}"
                  + f" | {col(lambda s: s['arms'][label][-1]['share_majority_label'])}"
                  + f" | {statistics.mean(s['arms'][label][-1]['cond'] for s in seeds):.3g} |")
    md += [
        "",
        "![accuracy vs depth](ntk_activation.png)",
        "",
        "## What this does and does not show",
        "",
        "- It checks the *kernel* object of the theorem (the infinite-width limit, in closed form). A finite network "
        "with `NTKActivation` is an approximation; the tests show polynomial activations (`*d_opt`) are far from "
        "the limit at depth > 1 even at width 4,000 (per-input variance drifts off 1), so nothing here is a claim "
        "about trained finite networks.",
        "- n is 10x smaller than the authors'; the consistency statement is asymptotic in n, so the gap to Bayes at "
        "finite n is expected; the comparison that matters is with the other classifiers at the same n.",
        "- How the consistent kernels get there: at L = 1 and 3 the `3d_opt` kernel is a low-degree polynomial "
        "of <x, x'> on the 2-sphere, so K_train is rank-deficient (cond ~1e19-1e20) and the ridge-free solve is "
        "meaningless (the spec's trap 3): the 'gap shrinks from L = 1' check is the weakest of the four. At "
        "L = 100 the off-diagonal NNGP entries have decayed to ~2^-L (φ̌'(0) = 1/2), K_train is the identity "
        "(cond 1) and the prediction is sign(Σ_i y_i k_L(x, x_i)), a singular kernel vote: it agrees with the "
        "Hilbert estimate on 100 % of test points, which is the theorem's mechanism. In float64 this holds to "
        "L ≈ 1,000; deeper, the entries underflow to 0.",
        f"- The paper's baselines are beaten (1-NN by {min(d1):+.3f} to {max(d1):+.3f} per seed), but a k-NN with k tuned "
        f"on validation ({mean_std([s['knn_tuned'] for s in seeds], 4)}) is within noise of the deep kernel "
        "(also a consistent rule); nothing here shows an advantage over a tuned classical consistent classifier.",
        "- ReLU is not a clean contrast at this depth: ReLU NNGP stays near 1-NN (as the taxonomy says) but ReLU "
        "NTK at L ≤ 100 is 0.940, between 1-NN and the consistent kernels.",
        f"- Runtime: {data['seconds']:.0f} s on 1 thread while other jobs loaded the 2 shared cores (load ~7-8), "
        "above the ~5 min aim.",
        "- ReLU NTK: the README notes it needs depth > 50,000 at n > 1,000 to reach majority vote; at L ≤ 100 it "
        "has not (see the share column).",
        "",
    ]
    atomic_write_text("\n".join(md), OUT / "ntk_activation.md")
    fig, ax = new_figure(figsize=(7, 4.5))
    for label, *_ in ARMS:
        means = [statistics.mean(s["arms"][label][i]["acc"] for s in seeds) for i in range(len(DEPTHS))]
        ax.plot(DEPTHS, means, marker="o", label=label)
    for key, name, style in (("bayes", "Bayes", "k-"), ("hilbert", "Hilbert", "g--"), ("1nn", "1-NN", "r:"),
                             ("majority", "majority", "b-.")):
        ax.axhline(statistics.mean(s[key] for s in seeds), color=style[0], linestyle=style[1:], label=name, lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("depth L")
    ax.set_ylabel("test accuracy (mean of 3 seeds)")
    ax.set_title("Deep NNGP/NTK classifiers, 3-d Dirichlet data, n = 1,000")
    ax.legend(fontsize=7)
    save_figure(fig, OUT / "ntk_activation.png")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--render", action="store_true")
    args = ap.parse_args()
    path = OUT / "ntk_activation.json"
    if not args.render:
        torch.set_num_threads(1)
        t = time.perf_counter()
        data = {"seeds": [], "config": {"n_train": N_TRAIN, "n_test": N_TEST, "depths": DEPTHS,
                                        "arms": [a[0] for a in ARMS], "alpha0": ALPHA0.tolist(),
                                        "alpha1": ALPHA1.tolist(), "prior1": PRIOR1, "threads": 1}}
        for seed in SEEDS:
            data["seeds"].append(run_seed(seed))
            data["seconds"] = time.perf_counter() - t
            atomic_write_json(data, path, indent=1)
    render(json.loads(path.read_text()))


if __name__ == "__main__":
    main()
