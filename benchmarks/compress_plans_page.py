"""The plans part of ``docs/results/compress.md`` (``benchmarks/compress.py --part plans``): the plans table, its
plot, its verdict and which rows stand for the current planner. Split from ``benchmarks/compress_page.py``, which
renders the page; nothing here measures.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from lightning_ext.core.plotting import new_figure, save_figure

ROOT = Path(__file__).resolve().parents[1]
JSON = ROOT / "docs" / "results" / "compress.json"
NOISE_LIMIT = 0.05
GOAL_SPEEDUP = 1.15  # the goal: at the same accuracy, >= 1.15x the speedup of a MACs-uniform plan


# -- plans --------------------------------------------------------------------------------------------------------


def paired(times: dict, a: str, b: str) -> float:
    """Median over rounds of time(b) / time(a): > 1 means ``a`` is faster."""
    return statistics.median(tb / ta for ta, tb in zip(times[a], times[b]))


def spread(values: list[float]) -> float:
    q = statistics.quantiles(values, n=4)
    return (q[2] - q[0]) / statistics.median(values)


def plans_verdict(rows: list[dict], models=None) -> tuple[str, list[str]]:
    """At equal MACs the latency plan is >= 1.15x faster than the uniform plan on every reachable model x target
    (reproduced), on some (partly), on none (not reproduced); inconclusive when the dense model's own timing
    spreads by more than ``NOISE_LIMIT`` (IQR / median over rounds)."""
    rows = [r for r in rows if models is None or r["model"] in models]
    done = [r for r in rows if "unreachable" not in r]
    hits = [paired(r["times_ms"], "latency plan", "uniform @ same MACs") >= GOAL_SPEEDUP for r in done]
    met = [paired(r["times_ms"], "latency plan", "dense") >= 0.97 * r["target"] for r in done]
    notes = [f"{sum(hits)}/{len(hits)} model x target pairs at >= {GOAL_SPEEDUP}x",
             f"{sum(met)}/{len(met)} plans met their speedup target within 3% in the final paired timing",
             f"{len(rows) - len(done)} targets out of reach of filter pruning"]
    noise = statistics.median(spread(r["times_ms"]["dense"]) for r in done) if done else math.inf
    notes.append(f"timing noise: median relative spread (IQR / median) of the dense model's rounds {noise:.1%}")
    if noise > NOISE_LIMIT:
        return "inconclusive", notes + [f"the spread exceeds {NOISE_LIMIT:.0%}: the machine was too busy for "
                                        "per-layer latency decisions (the latency table itself is measured under it)"]
    word = "reproduced" if hits and all(hits) else "partly reproduced" if any(hits) else "not reproduced"
    return word, notes


def plans_table(data: dict) -> list[str]:
    L = ["| model | target | dense ms | latency plan ms (speedup) | uniform @ same latency: ms, MACs kept vs plan | "
         "uniform @ same MACs: ms | plan / uniform speed at same MACs | MACs kept (plan) | params kept (plan) | "
         "plans timed | table CPU s | run |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    finished = {m: run["finished"] for run in data["runs"] for m in run["config"]["models"]}
    for r in data["rows"]:
        when = finished.get(r["model"], "")
        if "unreachable" in r:
            L.append(f"| {r['model']} | {r['target']}x | {r['dense_ms']:.2f} | out of reach: "
                     f"{r['unreachable'].split(': with')[-1].split('. Raise')[0]} | | | | | | | "
                     f"{r['table_cpu_s']:.0f} | {when} |")
            continue
        t, m = r["times_ms"], r["models"]
        med = {k: statistics.median(v) for k, v in t.items()}
        L.append(
            f"| {r['model']} | {r['target']}x | {med['dense']:.2f} | {med['latency plan']:.2f} "
            f"({paired(t, 'latency plan', 'dense'):.2f}x) | {med['uniform @ same latency']:.2f}, "
            f"{m['uniform @ same latency']['macs'] / m['latency plan']['macs']:.2f}x | {med['uniform @ same MACs']:.2f} | "
            f"{paired(t, 'latency plan', 'uniform @ same MACs'):.2f}x | "
            f"{m['latency plan']['macs'] / r['dense_macs']:.1%} | {m['latency plan']['params'] / r['dense_params']:.1%} | "
            f"{r['plan_rounds']} | {r['table_cpu_s']:.0f} | {when} |")
    return L


def plot(rows: list[dict]) -> None:
    fig, axes = new_figure(1, 2, figsize=(11, 4))
    for name in sorted({r["model"] for r in rows}):
        rs = [r for r in rows if r["model"] == name and "unreachable" not in r]
        if not rs:
            continue
        axes[0].plot([r["target"] for r in rs], [paired(r["times_ms"], "latency plan", "dense") for r in rs], "o-",
                     label=f"{name}: latency plan")
        axes[0].plot([r["target"] for r in rs], [paired(r["times_ms"], "uniform @ same MACs", "dense") for r in rs],
                     "x--", label=f"{name}: uniform, same MACs")
        axes[1].plot([r["target"] for r in rs], [r["models"]["uniform @ same latency"]["macs"] /
                                                 r["models"]["latency plan"]["macs"] for r in rs], "o-", label=name)
    axes[0].plot([1.25, 3], [1.25, 3], color="gray", lw=0.8)
    axes[0].set_xlabel("target speedup")
    axes[0].set_ylabel("measured speedup over dense (paired)")
    axes[0].legend(fontsize=7)
    axes[1].axhline(1, color="gray", lw=0.8)
    axes[1].set_xlabel("target speedup")
    axes[1].set_ylabel("MACs kept: uniform @ same latency / latency plan")
    axes[1].legend(fontsize=7)
    save_figure(fig, JSON.with_suffix(".png"))


def plans_section(L: list[str], data: dict) -> None:
    runs = data["runs"]
    cfg = runs[-1]["config"]
    L += ["## Plans without training (`--part plans`)", "",
          "Is the latency plan faster than a MACs-uniform plan at equal MACs, and which keeps more MACs at equal "
          "latency? No training: a plan's latency depends on shapes only.", "", "```bash"]
    for run in runs:
        c = run["config"]
        L.append(f"nice -n 10 .venv/bin/python benchmarks/compress.py --part plans --models {' '.join(c['models'])} "
                 f"--speedups {' '.join(f'{v:g}' for v in c['speedups'])} --rounds {c['rounds']} --repeats "
                 f"{c['repeats']} --max-widths {c['max_widths']} --bisect {c['bisect']}"
                 + (" --merge" if c.get("merge") else "") + f"   # finished {run['finished']}")
    L += ["```", "",
          f"Batch {cfg['batch']}, 28x28 grayscale, timm models with stem downsampling 2 and the residual CNN of "
          "`benchmarks/compress.py` (untrained weights: speed depends on shapes only), one thread "
          f"(`torch.set_num_threads(1)`), per-thread CPU time (median of {cfg['repeats']} passes) as the planner's "
          f"`latency_fn`; final timing: {cfg['rounds']} rotating rounds, paired ratios = median over rounds. The "
          "last column says which run measured the row (rows of a later `--merge` run replace that model's rows). "
          f"Machines: {[r['machine'] for r in runs]}.", "",
          _currency_text(data), ""]
    L += plans_table(data)
    L += ["", "MACs kept vs plan > 1: the uniform plan at the same measured latency keeps more MACs than the latency "
          "plan (the latency plan spends its budget where it buys speed, not MACs); < 1: the latency plan keeps more "
          "capacity for the same time.", "", "![plans](compress.png)", ""]


PLANNER_CHANGED = "2026-12-06 14:07"  # after commits 20341e0 and 62f2122 (see _currency_text); UTC


def _currency_text(data: dict) -> str:
    """Which plan rows stand for the current planner. Two changes came after the first plans run: (1) when the
    fast widths cannot meet the budget the greedy path goes on through every measured width before refusing
    (20341e0), which can change only a refused row; (2) each trial prune is also compared with the masked model
    for live filters (62f2122), which can refuse a plan, never change one."""
    finished = {m: run["finished"] for run in data["runs"] for m in run["config"]["models"]}
    old = [r for r in data["rows"] if finished.get(r["model"], "") < PLANNER_CHANGED]
    stale = [f"{r['model']} {r['target']:g}x" for r in old if "unreachable" in r]
    text = ("Are these rows current? Two planner changes came after the first plans run: (1) when the fast widths "
            "cannot meet the budget, the greedy path now goes on through every measured width before refusing "
            "(commit 20341e0), which can change only a refused row; (2) each trial prune is now compared with the "
            "masked model for live filters too (62f2122), which can refuse a plan, not change one. ")
    if not old:
        return text + "Every row was measured with the current planner."
    text += (f"{len(old) - len(stale)} rows measured before them were not refused, so they stand for the current "
             "code")
    redone = sorted({r["model"] for r in data["rows"]} - {r["model"] for r in old})
    if redone:
        text += f"; the {', '.join(redone)} rows were re-measured with the current planner (their run column)"
    return text + (f"; stale (a refused row measured before the change): {', '.join(stale)}." if stale else
                   "; no row is stale.")


