"""Benchmark: the data-filtering scaling law (Goyal et al., CVPR 2024): does the best kept pool grow with compute?

Pool: 4 quality buckets of Fashion-MNIST training images (1,000 each) with 0 / 20 / 40 / 60% of labels flipped
(the truth a perfect quality score would recover). The same small CNN trains on the top 1, 2, 3 or 4 buckets
for budgets of 1k, 4k, 16k and 64k samples seen (repeating epochs as needed); error = 1 - test accuracy.
The law (a, b, tau per bucket, d fixed) is fitted on single-bucket curves, then asked which union is best at
each budget; reproduced if the measured best pool shifts from the top bucket at small budgets to larger unions
at large budgets, and the law's choice matches.

    nice -n 5 .venv/bin/python benchmarks/filtering_scaling_law.py    # ~10 min on one thread
    .venv/bin/python benchmarks/filtering_scaling_law.py --quick      # smoke test (numbers meaningless)
    .venv/bin/python benchmarks/filtering_scaling_law.py --report-only  # rewrite the page and plot from the JSON
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _filtering_data import environment, planted_pool  # noqa: E402

from lightning_ext.curation import FilteringScalingLaw  # noqa: E402
from lightning_ext.curation.training import predict_logits, small_cnn, train_classifier  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "docs" / "results"


def run(x, y, test, samples_seen: int, seed: int, batch: int = 64) -> float:
    torch.manual_seed(seed)
    net = small_cnn(1, 10, width=8)
    # exactly `samples_seen` samples: whole epochs over the pool, the last one truncated
    full, rest = divmod(samples_seen, len(y))
    if full:
        train_classifier(net, TensorDataset(x, y), full, lr=2e-3, batch_size=batch, seed=seed, progress=False)
    if rest:
        idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:rest]
        train_classifier(net, TensorDataset(x[idx], y[idx]), 1, lr=2e-3, batch_size=batch, seed=seed, progress=False)
    return 1.0 - float((predict_logits(net, test[0]).argmax(1) == test[1]).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--report-only", action="store_true", help="rewrite the page and plot from the saved JSON")
    args = ap.parse_args()
    name = "filtering_scaling_quick" if args.quick else "data_filtering_scaling_law"
    if args.report_only:
        write_report(json.loads((Path(args.out) / f"{name}.json").read_text()), Path(args.out), name)
        return
    torch.set_num_threads(1)
    size = 200 if args.quick else 1000
    budgets = (400, 1600) if args.quick else (1000, 4000, 16000, 64000)
    noise = (0.0, 0.2, 0.4, 0.6)
    env, t0 = environment(), time.time()
    pool = planted_pool(n_pool=4 * size, flip=0.0, corrupt=0.0, n_val=0, n_trusted=0, seed=0)
    rng = np.random.default_rng(0)
    y = pool.y.clone()
    for b, p in enumerate(noise):
        idx = np.arange(b * size, (b + 1) * size)
        f = rng.choice(idx, int(p * size), replace=False)
        y[f] = (y[f] + torch.as_tensor(rng.integers(1, 10, len(f)))) % 10
    test = (pool.test[0][:2000], pool.test[1][:2000])
    single, unions = {}, {}
    for b in range(4):
        sl = slice(b * size, (b + 1) * size)
        single[b] = [run(pool.x[sl], y[sl], test, n, seed=0) for n in budgets]
        print(f"bucket {b} (noise {noise[b]}): errors {np.round(single[b], 3).tolist()}", flush=True)
    for m in (1, 2, 3, 4):
        sl = slice(0, m * size)
        unions[m] = [run(pool.x[sl], y[sl], test, n, seed=0) for n in budgets]
        print(f"top-{m} union: errors {np.round(unions[m], 3).tolist()}", flush=True)
    d = 0.5 * min(min(v) for v in single.values())
    law = FilteringScalingLaw([FilteringScalingLaw.fit_bucket(budgets, single[b], size, d=d) for b in range(4)],
                              bucket_size=size, d=d)
    measured = [int(np.argmin([unions[m][i] for m in (1, 2, 3, 4)])) + 1 for i in range(len(budgets))]
    predicted = [law.best_pool(n) for n in budgets]
    report = {"env": env, "loadavg_end": os.getloadavg(), "total_seconds": time.time() - t0, "budgets": budgets,
              "noise": noise, "bucket_size": size, "single_bucket_errors": single, "union_errors": unions,
              "law": law.config(), "measured_best_union": measured, "predicted_best_union": predicted,
              "predicted_union_errors": {m: [law.error(n, m) for n in budgets] for m in (1, 2, 3, 4)}}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=1, default=float)
    (Path(args.out) / f"{name}.json").write_text(text)
    print("budgets", budgets, "measured best union", measured, "law's choice", predicted)
    write_report(json.loads(text), Path(args.out), name)
    print(f"done in {time.time() - t0:.0f} s")


def write_report(report: dict, out: Path, name: str = "data_filtering_scaling_law") -> None:
    """Write ``out/<name>.md`` and ``out/<name>.png`` from the saved JSON (``report`` as loaded from it)."""
    from matplotlib import colormaps

    from lightning_ext.core.plotting import new_figure, save_figure

    budgets, noise, size = [int(n) for n in report["budgets"]], report["noise"], report["bucket_size"]
    nb = len(noise)
    single = {int(b): np.asarray(v) for b, v in report["single_bucket_errors"].items()}
    union = {int(m): np.asarray(v) for m, v in report["union_errors"].items()}
    pred = {int(m): np.asarray(v) for m, v in report["predicted_union_errors"].items()}
    measured, predicted = report["measured_best_union"], report["predicted_best_union"]
    law = FilteringScalingLaw(**report["law"])
    ms = sorted(union)
    fmt = lambda n: f"{n // 1000}k" if n % 1000 == 0 else str(n)  # noqa: E731
    tau_str = lambda t: "1e6" if t == 1e6 else f"{t:.4g}"  # noqa: E731
    load0, load1 = report["env"]["loadavg_start"][0], report["loadavg_end"][0]

    # plot: single buckets with their fitted laws, unions measured vs law, best pool per budget
    fig, ax = new_figure(1, 3, figsize=(16, 4.2))
    grid = np.geomspace(min(budgets) / 2, max(budgets) * 2, 80)
    colors = colormaps["viridis"](np.linspace(0, 0.85, max(nb, len(ms))))
    for b in range(nb):
        ax[0].plot(budgets, single[b], "o", color=colors[b], label=f"bucket {b} ({noise[b]:.0%} flipped)")
        ax[0].plot(grid, [law.error(n, buckets=[b]) for n in grid], "-", color=colors[b], alpha=0.6)
    ax[0].set_title("single buckets: measured (dots), fitted law (lines)")
    for i, m in enumerate(ms):
        ax[1].plot(budgets, union[m], "o-", color=colors[i], label=f"top-{m} (measured)")
        ax[1].plot(grid, [law.error(n, m) for n in grid], "--", color=colors[i], alpha=0.6)
    ax[1].set_title("top-m unions: measured (solid), law (dashed)")
    for a in ax[:2]:
        a.set_xscale("log")
        a.set_yscale("log")
        a.set_xlabel("samples seen (compute budget)")
        a.set_ylabel("test error (log scale)")
        a.legend(fontsize=8)
    ax[2].plot(budgets, measured, "o-", color="tab:blue", label="measured best", markersize=9)
    ax[2].plot(budgets, predicted, "s--", color="tab:red", label="law's choice")
    ax[2].set_xscale("log")
    ax[2].set_yticks(ms)
    ax[2].set_xlabel("samples seen (compute budget)")
    ax[2].set_ylabel("best number of top buckets")
    ax[2].set_title("claim: rises with compute (1 seed per point)")
    ax[2].legend(fontsize=8)
    save_figure(fig, out / f"{name}.png", dpi=120)

    # what can be read about the noise (one training seed per point, no repeats)
    violations = []  # single buckets out of quality order: a noisier bucket beating a cleaner one
    for i, n in enumerate(budgets):
        worst = max((single[c][i] - single[d][i], c, d) for c in range(nb) for d in range(c + 1, nb))
        violations.append(worst if worst[0] > 0 else None)
    resid = np.abs(pred[1] - union[1])  # the law vs the very points it was fitted on (top-1 = bucket 0)
    margin = [sorted(union[m][i] for m in ms)[1] - min(union[m][i] for m in ms) for i in range(len(budgets))]
    pmargin = [sorted(pred[m][i] for m in ms)[1] - min(pred[m][i] for m in ms) for i in range(len(budgets))]
    se = [float(np.sqrt(min(union[m][i] for m in ms) * (1 - min(union[m][i] for m in ms)) / 2000))
          for i in range(len(budgets))]
    rank = lambda v: np.argsort(np.argsort(v))  # noqa: E731
    rho = [float(np.corrcoef(rank([union[m][i] for m in ms]), rank([pred[m][i] for m in ms]))[0, 1])
           for i in range(len(budgets))]
    shift_up = all(b >= a for a, b in zip(measured, measured[1:])) and measured[-1] > measured[0]
    match = sum(a == b for a, b in zip(measured, predicted))
    verdict = ("reproduced" if shift_up and match == len(budgets)
               else "partly reproduced" if shift_up or match >= len(budgets) - 1 else "not reproduced")

    lines = [
        "# Scaling laws for data filtering: the best kept pool vs compute, on noisy-label Fashion-MNIST buckets",
        "",
        '**Claim (Goyal, Maini, Lipton, Raghunathan and Kolter, CVPR 2024, "Scaling Laws for Data Filtering -- Data '
        'Curation cannot be Compute Agnostic"):** data curation must depend on compute: aggressive filtering (only '
        "the best bucket) wins at small compute, but repeated data loses utility, so as compute grows the best "
        "keep fraction shifts to larger, less filtered pools; a repetition-aware scaling law fitted per quality "
        "bucket predicts which pool is best.",
        "",
        "**Command:** `nice -n 5 .venv/bin/python benchmarks/filtering_scaling_law.py` (default arguments; one CPU "
        f"thread; {report['total_seconds']:.0f} s in total; load average {load0:.1f} at the start, {load1:.1f} at "
        "the end: the 2 cores were shared with other runs, load average 5-10; errors do not depend on it). "
        f"Raw numbers: [{name}.json]({name}.json); this page and the plot are rebuilt from it by `--report-only`. "
        f"Plot: ![scaling law]({name}.png)",
        "",
        f"**Setup.** Pool: {nb} quality buckets of {size:,} Fashion-MNIST training images each, with "
        + " / ".join(f"{p:.0%}" for p in noise) + " of the labels flipped to a random other class (bucket 0 is "
        "the best; a perfect quality score would rank them in this order). Top-m union = buckets 0..m-1. The same "
        "small CNN (`small_cnn`, width 8; Adam 2e-3, batch 64) trains on each single bucket and each top-m union "
        "for exactly N samples seen (whole epochs over the pool, the last one truncated), N = "
        + ", ".join(fmt(n) for n in budgets) + f" (top-1 at {fmt(budgets[-1])} = {budgets[-1] // size} epochs, "
        f"top-{ms[-1]} = {budgets[-1] // (size * ms[-1])}). Error = 1 - accuracy on the first 2,000 official test "
        "images. **One training seed (0) per point**: there are no repeats, so no std. Law: "
        "`FilteringScalingLaw`; per bucket (a, b, tau) grid-fitted on its 4 single-bucket points "
        f"(`fit_bucket`), d fixed at half the smallest single-bucket error ({report['law']['d']:.4f}); a union's "
        "exponent is the mean of its buckets' repetition-decayed exponents; the law's choice is the argmin over m.",
        "",
        "**Measured error of the top-m unions** (best per budget in bold; in brackets: the law's prediction)",
        "",
        "| pool | " + " | ".join(f"{fmt(n)} samples" for n in budgets) + " |",
        "|---|" + "---|" * len(budgets),
    ]
    for m in ms:
        cells = []
        for i in range(len(budgets)):
            c = f"{union[m][i]:.4f}"
            cells.append((f"**{c}**" if measured[i] == m else c) + f" ({pred[m][i]:.4f})")
        lines.append(f"| top-{m} ({', '.join(f'{p:.0%}' for p in noise[:m])} flipped) | " + " | ".join(cells) + " |")
    lines += [
        "| **measured best / law's choice** | " + " | ".join(f"top-{a} / top-{b}" for a, b in zip(measured, predicted))
        + " |",
        "| gap best to 2nd, measured / law | " + " | ".join(f"{a:.4f} / {b:.4f}" for a, b in zip(margin, pmargin))
        + " |",
        "| rank agreement law vs measured (Spearman, 4 pools) | " + " | ".join(f"{r:+.2f}" for r in rho) + " |",
        "",
        "**Single buckets and the fitted law** (tau = 1e6 is the grid's \"no decay with repetition\" value)",
        "",
        "| bucket | " + " | ".join(f"{fmt(n)}" for n in budgets) + " | a | b | tau |",
        "|---|" + "---|" * (len(budgets) + 3),
    ]
    for b in range(nb):
        pl = report["law"]["pools"][b]
        lines.append(f"| {b} ({noise[b]:.0%} flipped) | " + " | ".join(f"{e:.4f}" for e in single[b])
                     + f" | {pl['a']:.3f} | {pl['b']:.3f} | {tau_str(pl['tau'])} |")
    first_ok = next((i for i, v in enumerate(violations) if v is None), None)
    noise_note = "; ".join(
        f"at {fmt(n)} bucket {v[2]} ({noise[v[2]]:.0%} flipped) beats bucket {v[1]} ({noise[v[1]]:.0%}) by {v[0]:.4f}"
        for n, v in zip(budgets, violations) if v is not None)
    lines += [
        "",
        f"**Verdict: {verdict}.**",
        f"- The measured best pool per budget is " + ", ".join(f"top-{m}" for m in measured) + " (at "
        + ", ".join(fmt(n) for n in budgets) + " samples seen); the claim needs it to grow with compute. "
        + ("It does." if shift_up else
           f"It does not: at the two largest budgets the most filtered pool (top-{min(ms)}, 0% flipped) is the "
           "best (a tie at the largest, see noise), while larger pools win at the small budgets, where the noise "
           "is largest: the opposite direction, if any." if measured[-1] == min(ms) and measured[-2] == min(ms) else
           "It does not."),
        f"- The law's choice is " + ", ".join(f"top-{m}" for m in predicted) + f": it matches the measurement at "
        f"{match} of {len(budgets)} budgets, "
        + ("and it, too, moves towards *more* filtering as compute grows. " if predicted[-1] < predicted[0] else ". ")
        + f"The law's margin between its best and second-best pool ({', '.join(f'{v:.4f}' for v in pmargin)}) "
        + (f"is smaller than its own misfit of the bucket-0 points it was fitted on "
           f"({', '.join(f'{v:.4f}' for v in resid)}; top-1 is the bucket-0 run itself) at "
           f"{', '.join(fmt(n) for n, a, b in zip(budgets, pmargin, resid) if a < b)}, where its choice is therefore "
           "not well determined." if any(a < b for a, b in zip(pmargin, resid)) else
           f"exceeds its misfit of the bucket-0 points ({', '.join(f'{v:.4f}' for v in resid)}) at every budget."),
        "- Noise: one seed per point, so no std. The single buckets show how large the run-to-run scatter is: "
        + (f"they should be ordered by label noise, but {noise_note}; from {fmt(budgets[first_ok])} on the order "
           "is right. " if noise_note and first_ok is not None else "they are ordered by label noise at every "
           "budget. " if not noise_note else f"{noise_note}. ")
        + "The measured gaps between the best and second-best union are "
        + ", ".join(f"{fmt(n)} {g:.4f}" for n, g in zip(budgets, margin))
        + "".join(f"; at {fmt(n)} the gap is {'no larger than' if g <= v[0] else 'above'} the order violation "
                  f"({v[0]:.4f})" for n, g, v in zip(budgets, margin, violations) if v is not None)
        + ". Against the binomial standard error of one error rate on 2,000 test images, sqrt(e(1-e)/2000) at the "
        "best error (" + ", ".join(f"{v:.4f}" for v in se) + "; a lower bound, since seed noise comes on top), "
        "the gaps are " + ", ".join(f"{g / v:.1f}" for g, v in zip(margin, se)) + " standard errors. So the "
        + " and ".join(fmt(n) for n, v in zip(budgets, violations) if v is not None)
        + " winners are not established, "
        + " and ".join(f"{fmt(n)} (top-{measured[i]} vs the next, {margin[i]:.4f})" for i, n in enumerate(budgets)
                       if margin[i] < 2 * se[i]) + " is a tie, and no gap has a seed repeat behind it.",
        f"- Why no shift: the law's half-life for the clean bucket is tau = {tau_str(report['law']['pools'][0]['tau'])}"
        + (" (no measurable loss of utility from repetition)" if report['law']['pools'][0]['tau'] >= 1e5 else "")
        + f": the width-8 CNN on the {size:,} clean images still improves from {budgets[-2] // size} to "
        f"{budgets[-1] // size} epochs (error {single[0][-2]:.4f} to {single[0][-1]:.4f}), so the mechanism of the "
        "paper (repeated top data losing value, so that fresh lower-quality data wins) is not reached within these "
        "budgets, while from " + fmt(budgets[first_ok if first_ok is not None else -1]) + " on the flipped labels "
        "of the lower buckets cost accuracy in order of their noise. The paper's crossover happens at hundreds of "
        "millions of samples seen on DataComp, with buckets that differ in quality scores rather than in planted "
        "label noise.",
        "- Differences from the spec's CPU recipe: Fashion-MNIST buckets of 1,000 images and a small CNN instead "
        "of sklearn digits buckets of about 300 and an MLP; budgets 1k-64k instead of 1k-80k; one seed.",
    ]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / (name + '.md')} and {out / (name + '.png')}")


if __name__ == "__main__":
    main()
