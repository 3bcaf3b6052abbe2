"""DyCL benchmark (issue 32): rewritten dynamic networks export and compile, equal eager, and their latency.

Claim (DyCL, ISSTA 2023, arXiv 2307.04963, abstract): compiling dynamic neural networks succeeds for every tested
network (100%) and the compiled programs run 1.12x-20.21x faster than the original DyNNs in their framework, with the
same outputs. Here: five networks with data-dependent control flow (an if/else on a tensor mean, SkipNet-style block
gates, an adaptive-steps while loop, a batch-level early exit over the library's EarlyExitNetwork trained on digits
with the DynamicExportCheck callback, and the library's per-sample EarlyExitNetwork as a control that needs no
rewrite), 3 seeds each, batch 1, one thread.

Premise: plain ``torch.export`` fails on every dynamic network (otherwise rewriting is not needed).

    cd /work/main && .venv/bin/python benchmarks/dycl.py        # writes docs/results/dycl.{json,md,png}
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import fit_early_stopping, mean_std, page_main, verdict_of  # noqa: E402

from lightning_ext.export.callback import DynamicExportCheck  # noqa: E402
from lightning_ext.export.dycl import compiles_fullgraph, export_dynamic, rewritten, time_forward  # noqa: E402
from lightning_ext.export.dynamic_nets import BatchEarlyExit, IterativeRefiner, MeanGatedNet, SkipGateNet  # noqa: E402

import os  # noqa: E402

SMOKE = bool(os.environ.get("DYCL_SMOKE"))  # a tiny run into a temporary folder, to check the script
OUT = Path(os.environ["DYCL_OUT"]) if SMOKE else Path(__file__).resolve().parents[1] / "docs" / "results"
SEEDS = (0,) if SMOKE else (0, 1, 2)
DIM = 64
N_SYNTH = 5 if SMOKE else 100  # held-out inputs per synthetic network (batch 1)
ROUNDS, REPEATS = (1, 3) if SMOKE else (3, 30)  # latency: median over rounds of the median over repeats, variants interleaved per round
VARIANTS = ("eager", "compiled", "compiled_rewritten", "exported")
MODELS = ("mean_gated", "skip_gate", "refiner", "early_exit_batch", "early_exit_masked")
PROTOCOL = dict(seeds=list(SEEDS), dim=DIM, synthetic_inputs=N_SYNTH, batch_size=1, threads=1, rounds=ROUNDS,
                repeats=REPEATS, variants=list(VARIANTS), tolerance="atol 1e-5 + rtol 1e-4",
                early_exit="EarlyExitClassifier on sklearn digits, 3-stage conv backbone (16/32/64 ch), exits after "
                           "every stage, tau 0.9, AdamW lr 3e-3, early stopping on val_acc (patience 3, cap 30)")
COMMAND = "cd /work/main && .venv/bin/python benchmarks/dycl.py"


def synthetic_inputs(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + seed)  # scales spread so that every branch is taken
    return [torch.randn(1, DIM, generator=g) * float(torch.empty(1).uniform_(0.1, 3.0, generator=g))
            + float(torch.empty(1).uniform_(-1.0, 1.0, generator=g)) for _ in range(N_SYNTH)]


_TRAINED: dict = {}
#: Inductor's conv layout optimisation hands nested torch.cond branches channels-last inputs they were not compiled
#: for (a stride assertion, torch 2.14.1); both compiled variants run without it
COMPILE_OPTIONS = {"layout_optimization": False}


def train_early_exit(seed: int):
    if seed not in _TRAINED:
        _TRAINED[seed] = _train_early_exit(seed)
    return _TRAINED[seed]


def _train_early_exit(seed: int):
    from lightning.pytorch import seed_everything

    from lightning_ext.data.digits import DigitsDataModule
    from lightning_ext.vision.early_exit_classifier import EarlyExitClassifier

    seed_everything(seed, workers=True)
    backbone = nn.Sequential(
        nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()),
        nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU()),
        nn.Sequential(nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU()))
    model = EarlyExitClassifier(backbone, num_classes=10, in_chans=1, image_size=8, threshold=0.9, lr=3e-3)
    dm = DigitsDataModule(batch_size=64)
    check = DynamicExportCheck(module="net", wrap="lightning_ext.export.dynamic_nets.BatchEarlyExit",
                               check_batches=3, export_path=None, report_path=None, latency_path=None, latency=[])
    fit = fit_early_stopping(model, dm, 2 if SMOKE else 30, [check], f"early exit s{seed}", patience=3)
    dm.setup("test")
    xs = [x[i:i + 1] for x, _ in dm.test_dataloader() for i in range(len(x))]
    fit["callback"] = {k: check.results[k] for k in ("equal", "max_abs_diff", "batches_compared")}
    fit["callback_sites"] = check.results["sites"]
    return model.net.eval(), xs, fit


def latency(model: nn.Module, program, x: torch.Tensor) -> dict:
    torch._dynamo.reset()
    fns = {"eager": model, "compiled": torch.compile(model, options=COMPILE_OPTIONS), "exported": program.module()}
    compile_s = {}
    for name in ("compiled",):
        t = time.time()
        time_forward(fns[name], (x,), warmup=2, repeats=1)
        compile_s[name] = time.time() - t
    rounds = {v: [] for v in VARIANTS}
    with rewritten(model):
        fns["compiled_rewritten"] = torch.compile(model, fullgraph=True, options=COMPILE_OPTIONS)
        t = time.time()
        time_forward(fns["compiled_rewritten"], (x,), warmup=2, repeats=1)
        compile_s["compiled_rewritten"] = time.time() - t
        for _ in range(ROUNDS):
            for v in VARIANTS:
                if v == "compiled":
                    continue  # the original's compiled code runs outside the rewrite below
                rounds[v].append(time_forward(fns[v], (x,), warmup=5, repeats=REPEATS))
    for _ in range(ROUNDS):
        rounds["compiled"].append(time_forward(fns["compiled"], (x,), warmup=5, repeats=REPEATS))
    torch._dynamo.reset()
    return {"median_s": {v: statistics.median(r) for v, r in rounds.items()}, "compile_s": compile_s}


def run_model(name: str, seed: int) -> dict:
    torch.manual_seed(seed)
    extra: dict = {}
    if name in ("early_exit_batch", "early_exit_masked"):
        net, xs, fit = train_early_exit(seed)
        extra["fit"] = {k: v for k, v in fit.items() if k != "history"}
        model = BatchEarlyExit(net) if name == "early_exit_batch" else net
    else:
        model = {"mean_gated": MeanGatedNet, "skip_gate": SkipGateNet, "refiner": IterativeRefiner}[name](DIM)
        xs = synthetic_inputs(seed)
    model.eval()
    example = xs[0]
    program, report = export_dynamic(model, (example,), dynamic_batch=False, try_original=True)
    full_before, _ = compiles_fullgraph(model, example)
    with rewritten(model):
        full_after, full_err = compiles_fullgraph(model, example)
    res = {"exported_before": report.exported_before, "error_before": report.error_before[:200],
           "exported": report.exported, "error": report.error[:300], "fullgraph_before": full_before,
           "fullgraph_after": full_after, "fullgraph_error": full_err[:200],
           "sites": [b.line_text() for b in report.sites()], **extra}
    if program is None:
        return res
    diffs, same, outcomes = [], True, {}
    exported = program.module()
    with torch.no_grad():
        for x in xs:
            want, got = model(x), exported(x)
            diffs.append(float((got - want).abs().max()))
            same &= bool(torch.allclose(got, want, atol=1e-5, rtol=1e-4))
            if name == "early_exit_batch":  # which exit answered: compare with each head's logits
                h, k_taken = x, None
                for k, (seg, head) in enumerate(zip(model.segments, model.heads)):
                    h = seg(h)
                    if torch.equal(head(h), want):
                        k_taken = k
                        break
                outcomes[str(k_taken)] = outcomes.get(str(k_taken), 0) + 1
    res.update(max_abs_diff=max(diffs), equal=same, inputs=len(xs), exits=outcomes)
    res["latency"] = latency(model, program, example)
    return res


def main_runs(data: dict) -> None:
    runs = data.setdefault("runs", {})
    for seed in SEEDS:
        for name in MODELS:
            key = f"{name}/{seed}"
            if key in runs:
                continue
            start = time.time()
            runs[key] = run_model(name, seed)
            runs[key]["wall_s"] = time.time() - start
            print(key, {k: runs[key].get(k) for k in ("exported_before", "exported", "equal", "max_abs_diff")},
                  f"{runs[key]['wall_s']:.0f} s", flush=True)
            from lightning_ext.core.io import atomic_write_json
            atomic_write_json(data, OUT / "dycl.json", indent=1)


def _speedups(runs: dict, name: str, variant: str) -> list[float]:
    out = []
    for seed in SEEDS:
        r = runs.get(f"{name}/{seed}", {})
        lat = r.get("latency", {}).get("median_s", {})
        if variant in lat:
            out.append(lat["eager"] / lat[variant])
    return out


def _label(h, why: str) -> str:
    if h is None:
        return "inconclusive" if why.startswith("inconclusive") else "not testable here"
    return "holds" if h else "fails"


def _ms(values, digits):
    return mean_std(values, digits) if values else "-"


def render(data: dict):
    runs = data.get("runs", {})
    dyn = [m for m in MODELS if m != "early_exit_masked"]
    rows = []
    for m in MODELS:
        rs = [runs[f"{m}/{s}"] for s in SEEDS if f"{m}/{s}" in runs]
        if not rs:
            continue
        lat = {v: [1e3 * r["latency"]["median_s"][v] for r in rs if "latency" in r] for v in VARIANTS}
        rows.append(f"| {m} | {sum(bool(r['exported_before']) for r in rs)}/{len(rs)} | "
                    f"{sum(bool(r['exported']) for r in rs)}/{len(rs)} | "
                    f"{sum(bool(r['fullgraph_after']) for r in rs)}/{len(rs)} | "
                    f"{max(r.get('max_abs_diff', float('nan')) for r in rs):.2g} | "
                    + " | ".join(_ms(lat[v], 3) for v in VARIANTS) + " | "
                    + " | ".join(_ms(_speedups(runs, m, v), 2) for v in VARIANTS[1:]) + " |")
    done = [runs[f"{m}/{s}"] for m in dyn for s in SEEDS if f"{m}/{s}" in runs]
    complete = len(done) == len(dyn) * len(SEEDS)
    premise = bool(done) and all(r["exported_before"] is False for r in done)
    seen = [m for m in dyn if any(f"{m}/{s}" in runs for s in SEEDS)]
    checks = []
    if premise:
        checks.append(("every rewritten network exports and compiles as one graph",
                       all(r["exported"] and r["fullgraph_after"] for r in done), ""))
        checks.append(("exported outputs equal eager on every held-out input", all(r.get("equal") for r in done), ""))
        fast = {m: statistics.mean(_speedups(runs, m, "compiled_rewritten")) for m in seen}
        checks.append(("compiled rewritten network >= 1.12x faster than eager (mean over seeds), every network",
                       all(v >= 1.12 for v in fast.values()), ", ".join(f"{m} {v:.2f}x" for m, v in fast.items())))
    if not done:
        claims = [("premise", None, "not testable: no runs")]
    elif not premise:
        claims = [("premise", None, "not testable: a dynamic network exported without rewriting")]
    elif not complete:
        have = sorted({s for s in SEEDS for m in dyn if f"{m}/{s}" in runs})
        claims = [(c, None, f"inconclusive: only seeds {have} finished by the deadline ({len(done)} of "
                            f"{len(dyn) * len(SEEDS)} runs); on those: {'holds' if h else 'fails'} {w}")
                  for c, h, w in checks]
    else:
        claims = checks
    verdict = verdict_of(claims)
    fits = [runs[f"early_exit_batch/{s}"]["fit"] for s in SEEDS if f"early_exit_batch/{s}" in runs]
    fit_line = "; ".join(f"seed {i}: best epoch {f['best_epoch'] + 1}/{f['epochs']}, val acc {f['best_val']:.3f}, "
                         f"{f['steps']} steps, {f['samples']} samples" for i, f in enumerate(fits))
    exits = [runs[f"early_exit_batch/{s}"].get("exits", {}) for s in SEEDS if f"early_exit_batch/{s}" in runs]
    sites = {m: runs[f"{m}/0"]["sites"] for m in MODELS if f"{m}/0" in runs}
    errs = {m: runs[f"{m}/0"]["error_before"] for m in MODELS if f"{m}/0" in runs}
    wall = sum(r.get("wall_s", 0) for r in runs.values())
    status = "" if complete else (
        f"\n\nStatus: only {len(runs)} of {len(MODELS) * len(SEEDS)} runs finished before the deadline (seed 0; the "
        "control `early_exit_masked` did not run): the shared 2-core machine was at load 15-20 and the niced process "
        "got a few percent of a core, mostly spent in Inductor's C++ compiles. The numbers below are one seed, so "
        "every claim is inconclusive; rerunning the command resumes from the JSON.")
    exit_note = ""
    if exits and all(set(e) == {"2"} for e in exits):  # exit 2: the last of the three stages
        exit_note = (" Every test image left at the last exit (the internal exits never reached confidence 0.9), so "
                     "on test data only that path ran; tests/test_export.py checks both paths against eager.")
    page = f"""# DyCL: compiling dynamic networks by rewriting their control flow (issue 32)

**Verdict: {verdict}.**{status}

Claim (DyCL, Chen et al., ISSTA 2023, arXiv 2307.04963): rewriting a dynamic network's data-dependent control
flow lets a DL compiler compile every tested DyNN (100%), and the compiled programs run 1.12x-20.21x faster than
the original DyNNs in their framework. Here the rewriting is `lightning_ext.export` (AST pass: `if` -> `torch.cond`,
static loops with a `return` unrolled, `while` -> `torch.while_loop`) and the compilers are `torch.export` and
`torch.compile` (Inductor, CPU).

Command: `{COMMAND}` (resumes from `docs/results/dycl.json`; `--render-only` redraws). One PyTorch thread
(`torch.set_num_threads(1)`), niced, on a shared 2-core machine ({data['meta'].get('machine', '')}); total wall time
{wall / 60:.1f} min. Seeds {list(SEEDS)} (network initialisation, inputs and the early-exit training).

## Set-up
- `mean_gated`: `if mean(h) > 0` picks one of two layers (dim {DIM}); `skip_gate`: 3 residual blocks each run only if
  its gate fires (SkipNet/BlockDrop style); `refiner`: `while` the update is above 1e-3 and fewer than 30 steps;
  inputs: {N_SYNTH} held-out vectors per seed, batch 1, scales spread so that every branch occurs.
- `early_exit_batch`: `BatchEarlyExit` (return at the first exit whose confidence reaches 0.9) over the library's
  `EarlyExitNetwork` trained here with `EarlyExitClassifier` on sklearn digits (the DynamicExportCheck callback ran at
  fit end on 3 validation batches); inputs: the 360 test images, batch 1. Training: {fit_line}.
  Exit taken on the test images (exit index: count): {exits}.{exit_note}
- `early_exit_masked` (control): the same trained network's own forward (every exit, per-sample `torch.where`):
  no data-dependent branch, so it exports without rewriting.
- Latency: median over {ROUNDS} rounds of the median of {REPEATS} timed calls (5 warm-up), variants interleaved
  within a round; `compiled` = `torch.compile` of the original (graph breaks allowed), `compiled_rewritten` =
  `torch.compile(fullgraph=True)` of the rewritten network, `exported` = the `ExportedProgram`'s module (no code
  generation). Speedup = eager / variant.
- Tolerance: `allclose(atol=1e-5, rtol=1e-4)`.

## Results (mean ± std over seeds)

| network | plain export ok | export after rewrite | one graph after rewrite | max abs diff | eager ms | compiled ms | compiled rewritten ms | exported ms | speedup compiled | speedup compiled rewritten | speedup exported |
|---|---|---|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

Premise (plain `torch.export` fails on every dynamic network): {'holds' if premise else 'fails or incomplete'}.
Errors before rewriting (seed 0): {errs}

Sites found (seed 0): {sites}

![speedups](dycl.png)

## Claims
{chr(10).join(f'- {c}: **{_label(h, w)}** {w}' for c, h, w in claims)}

## Reading
Compilation success and output equality are what the rewriting controls; the speedup depends on how much of the
eager time is Python and dispatch overhead that one captured graph removes, which is large for these small networks
at batch 1 on one CPU thread and would be smaller for large ones. The exported program's own module replays the
graph op by op in Python and is not a compiled executable; DyCL's executables correspond to `compiled_rewritten`.
AOTInductor packages (`.pt2` compiled ahead of time) were not timed.
"""
    return page, {"claims": claims}, verdict


def plot(data: dict, res: dict, path: Path) -> None:
    from lightning_ext.core.plotting import new_figure, save_figure

    runs = data.get("runs", {})
    fig, ax = new_figure(figsize=(7.5, 3.6))
    width = 0.27
    for j, v in enumerate(VARIANTS[1:]):
        means, stds = [], []
        for m in MODELS:
            s = _speedups(runs, m, v)
            means.append(statistics.mean(s) if s else 0.0)
            stds.append(statistics.stdev(s) if len(s) > 1 else 0.0)
        ax.bar([i + (j - 1) * width for i in range(len(MODELS))], means, width, yerr=stds, label=v, capsize=2)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(1.12, color="grey", lw=0.8, ls="--")
    ax.set_xticks(range(len(MODELS)))
    ax.set_xticklabels(MODELS, fontsize=8)
    ax.set_ylabel("speedup vs eager (batch 1, 1 thread)")
    ax.legend(fontsize=8)
    save_figure(fig, path)


if __name__ == "__main__":
    page_main(OUT / "dycl.json", "dycl", PROTOCOL, COMMAND, main_runs, render, plot)
