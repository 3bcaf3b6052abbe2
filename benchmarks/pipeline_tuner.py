"""InTune-style pipeline tuning benchmark: static default, even split, hill climber, RL agent and the oracle.

Every configuration trains the same Lightning run (a fixed-cost training step, like a GPU step that leaves the
CPUs to the pipeline) on a real staged pipeline, and is measured by samples/s delivered to the trainer and the
trainer's data-wait fraction:

- ``png``: Fashion-MNIST PNG files: read (threads) / decode (processes) / augment (processes);
- ``rows``: MovieLens-100K text rows: read / parse / featurize (feature hashing, normalisation);
- ``png_remote``: the PNG pipeline with 2 ms per read, emulating remote storage (the case where reads need
  many more threads than there are cores).

The oracle is the best static allocation of an exhaustive search over the grid of allocations (measured
first, in short runs); then all five configurations run in interleaved rounds (rotated order), so background
load hits them alike. Ratios are computed within each round. Tuners are measured over the whole run and over
its last ``--steady-seconds`` (steady state); static runs only over the same final window.

Run (the results page used this):
    nice -n 5 .venv/bin/python benchmarks/pipeline_tuner.py --rounds 2
Smoke test:
    .venv/bin/python benchmarks/pipeline_tuner.py --quick
On a bigger machine: ``--cpus 16`` (worker budget = ``slots_per_cpu * cpus`` per scenario).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn

from lightning_ext.pipeline.tuner import PipelineTuner, plot_tuning
from lightning_ext.datamodules import StagedPipelineDataModule
from lightning_ext.pipeline import Allocation
from lightning_ext.pipeline.agents import SearchSpace

SCENARIOS = {
    # name: workload, batch size, read latency (ms), training step (ms), worker slots per CPU, samples
    "png": dict(workload="fashion_mnist_png", batch_size=64, read_latency_ms=0.0, step_ms=5.0, slots_per_cpu=2,
                train_samples=60000),
    "rows": dict(workload="movielens_rows", batch_size=128, read_latency_ms=0.0, step_ms=4.0, slots_per_cpu=2,
                 train_samples=None),
    "png_remote": dict(workload="fashion_mnist_png", batch_size=64, read_latency_ms=2.0, step_ms=5.0,
                       slots_per_cpu=4, train_samples=60000),
}
MIN_WINDOW_S = 0.5
CONFIGS = ("default", "even_split", "hill_climb", "rl", "oracle")


class FixedStep(LightningModule):
    """A tiny linear model whose training step also sleeps ``step_ms``: the accelerator's share of a step."""

    def __init__(self, num_features: int, step_ms: float) -> None:
        super().__init__()
        self.head, self.step_s = nn.Linear(num_features, 2), step_ms / 1000

    def training_step(self, batch, batch_idx):
        x, y = batch
        time.sleep(self.step_s)
        return nn.functional.cross_entropy(self.head(x.flatten(1)), y % 2)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class Meter(Callback):
    """Per-batch clock and sample count; stops the run after ``seconds`` of training."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.times, self.samples, self.waits = seconds, [], [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        now = time.perf_counter()
        pipe = trainer.datamodule.train_pipeline
        self.times.append(now)
        self.samples.append(len(batch[1]))
        self.waits.append(pipe.stats.wait_s)
        if now - self.times[0] >= self.seconds:
            trainer.should_stop = True

    def window(self, last_seconds: float | None) -> dict:
        """Throughput and data-wait fraction over the whole run or its last ``last_seconds``."""
        t, s, w = self.times, self.samples, self.waits
        start = 1
        if last_seconds is not None:
            start = max(1, next((i for i, x in enumerate(t) if x >= t[-1] - last_seconds), 1))
        dt = max(t[-1] - t[start - 1], 1e-9)
        return {"samples_per_s": sum(s[start:]) / dt, "wait_fraction": (w[-1] - w[start - 1]) / dt,
                "seconds": dt}


def run_config(scn: dict, allocation: Allocation | None, agent: str | None, seconds: float, budget: int,
               steady: float, seed: int, explore: int, decide_every: int, trace_png: str | None = None) -> dict:
    dm = StagedPipelineDataModule(scn["workload"], batch_size=scn["batch_size"], train_samples=scn["train_samples"],
                                  val_fraction=0.0, read_latency_ms=scn["read_latency_ms"], seed=seed,
                                  workers=None if allocation is None else dict(zip(STAGES[scn["workload"]],
                                                                                   allocation.workers)),
                                  prefetch=2 if allocation is None else allocation.prefetch)
    meter = Meter(seconds)
    callbacks = [meter]
    tuner = None
    if agent is not None:
        tuner = PipelineTuner(agent=agent, cpu_budget=budget, decide_every_n_batches=decide_every,
                              min_window_s=MIN_WINDOW_S, warmup_batches=2, explore_decisions=explore, seed=seed,
                              memory_budget_mb=1024)
        callbacks.append(tuner)
    model = FixedStep(dm.num_features, scn["step_ms"])
    trainer = Trainer(accelerator="cpu", devices=1, max_epochs=1000, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                      num_sanity_val_steps=0, callbacks=callbacks)
    trainer.fit(model, datamodule=dm)
    dm.teardown()
    out = {"whole": meter.window(None), "steady": meter.window(steady)}
    if tuner is not None:
        out.update(settled_s=tuner.settled_at_s, decisions=tuner.agent.decisions,
                   final=str(tuner.history[-1]["next"]["workers"]) + f" p{tuner.history[-1]['next']['prefetch']}",
                   best=str(tuner.best_allocation), rebuilds=dm.train_pipeline.stats.rebuilds)
        if trace_png:
            plot_tuning(tuner.history, STAGES[scn["workload"]], trace_png,
                        f"{agent} on {scn['workload']} (read latency {scn['read_latency_ms']} ms, budget {budget})")
            out["trace"] = [{k: h[k] for k in ("time_s", "throughput", "workers", "prefetch", "settled")}
                            for h in tuner.history]
    return out


STAGES = {"fashion_mnist_png": ["read", "decode", "augment"], "movielens_rows": ["read", "parse", "featurize"]}


def grid(budget: int, coarse: bool) -> list[Allocation]:
    space = SearchSpace(("a", "b", "c"), (1, 1, 1), (budget,) * 3, budget)
    allocs = space.all_allocations((2,))
    if coarse:  # keep read counts 1, 2, 4, 6, ... and transform counts up to 3
        keep = {1, 2} | set(range(4, budget + 1, 2))
        allocs = [a for a in allocs if a.workers[0] in keep and max(a.workers[1:]) <= 3]
    return allocs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs the pipeline may use")
    ap.add_argument("--scenarios", default="png,rows,png_remote")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--static-seconds", type=float, default=20.0)
    ap.add_argument("--tuner-seconds", type=float, default=60.0)
    ap.add_argument("--steady-seconds", type=float, default=20.0)
    ap.add_argument("--grid-seconds", type=float, default=5.0)
    ap.add_argument("--explore", type=int, default=50, help="RL decisions before settling")
    ap.add_argument("--decide-every", type=int, default=12, help="batches per measurement window")
    ap.add_argument("--min-window", type=float, default=1.0, help="seconds a measurement window lasts at least")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="smoke test: tiny runs, writes to /tmp")
    ap.add_argument("--out", default="docs/results/pipeline_tuner")
    ap.add_argument("--report-only", action="store_true", help="rewrite the plot and print tables from <out>.json")
    args = ap.parse_args()
    if args.report_only:
        results = json.loads(Path(f"{args.out}.json").read_text())
        write_plot(results, f"{args.out}.png")
        print(markdown(results))
        return
    torch.set_num_threads(args.threads)
    global MIN_WINDOW_S
    MIN_WINDOW_S = args.min_window
    if args.quick:
        args.rounds, args.static_seconds, args.tuner_seconds, args.steady_seconds = 1, 2.0, 6.0, 2.0
        args.grid_seconds, args.explore, args.decide_every, MIN_WINDOW_S = 1.0, 6, 4, 0.0
        args.out = "/tmp/pipeline_tuner_quick/pipeline_tuner"
        for s in SCENARIOS.values():
            s["train_samples"] = 4000 if s["workload"] == "fashion_mnist_png" else 20000
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = {"args": vars(args), "cpus_seen": os.cpu_count(), "scenarios": {}}
    t_start = time.time()

    def save():
        results["runtime_s"] = time.time() - t_start
        Path(f"{out}.json").write_text(json.dumps(results, indent=1))

    for name in args.scenarios.split(","):
        scn = SCENARIOS[name]
        budget = scn["slots_per_cpu"] * args.cpus
        space = SearchSpace(tuple(STAGES[scn["workload"]]), (1, 1, 1), (budget,) * 3, budget)
        res = results["scenarios"][name] = {"scenario": scn, "budget": budget, "grid": {}, "rounds": []}
        allocs = grid(budget, coarse=budget > 6)
        if args.quick:
            allocs = allocs[:3]
        print(f"[{name}] budget {budget} workers, exhaustive search over {len(allocs)} allocations", flush=True)
        for a in allocs:
            r = run_config(scn, a, None, args.grid_seconds, budget, args.grid_seconds, 0, args.explore,
                           args.decide_every)
            res["grid"][str(a)] = r["whole"]["samples_per_s"]
            print(f"  grid {a}: {r['whole']['samples_per_s']:.0f} samples/s", flush=True)
        oracle = max(allocs, key=lambda a: res["grid"][str(a)])
        res["oracle"] = str(oracle)
        fixed = {"default": Allocation((1, 1, 1), 2), "even_split": space.even_split(2), "oracle": oracle}
        for rnd in range(args.rounds):
            order = CONFIGS[rnd % len(CONFIGS):] + CONFIGS[: rnd % len(CONFIGS)]
            row = {"loadavg_start": os.getloadavg()}
            for cfg in order:
                if cfg in fixed:
                    r = run_config(scn, fixed[cfg], None, args.static_seconds, budget, args.steady_seconds, rnd,
                                   args.explore, args.decide_every)
                    r["allocation"] = str(fixed[cfg])
                else:
                    trace = f"{out}_{name}_{cfg}_trace.png" if rnd == 0 else None
                    r = run_config(scn, None, cfg, args.tuner_seconds, budget, args.steady_seconds, rnd,
                                   args.explore, args.decide_every, trace)
                row[cfg] = r
                extra = f" settled at {r['settled_s']:.0f}s on {r['best']}" if "settled_s" in r and r["settled_s"] else ""
                print(f"  round {rnd} {cfg:10s} steady {r['steady']['samples_per_s']:7.0f}/s "
                      f"(wait {r['steady']['wait_fraction']:.2f}) whole {r['whole']['samples_per_s']:7.0f}/s{extra}",
                      flush=True)
            row["loadavg_end"] = os.getloadavg()
            res["rounds"].append(row)
            save()
    save()
    write_plot(results, f"{out}.png")
    print(markdown(results))
    print(f"done in {time.time() - t_start:.0f} s; wrote {out}.json and {out}.png")


def summary(res: dict, cfg: str, key: str = "steady") -> tuple[float, float]:
    vals = [r[cfg][key]["samples_per_s"] for r in res["rounds"]]
    return statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def _ms(vals: list[float], digits: int = 0) -> str:
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{statistics.mean(vals):.{digits}f} ± {sd:.{digits}f}"


def markdown(results: dict) -> str:
    """Tables for the results page: per scenario, every configuration's throughput and its ratios per round."""
    lines = []
    for name, res in results["scenarios"].items():
        rounds = res["rounds"]
        lines += [f"### {name}: budget {res['budget']} workers, oracle {res['oracle']}", "",
                  "| configuration | allocation | steady samples/s | whole-run samples/s | data-wait (steady) | "
                  "x oracle (steady) | x default (steady) | x hill climber (steady) | settled after |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for cfg in CONFIGS:
            steady = [r[cfg]["steady"]["samples_per_s"] for r in rounds]
            whole = [r[cfg]["whole"]["samples_per_s"] for r in rounds]
            wait = [r[cfg]["steady"]["wait_fraction"] for r in rounds]
            ratio = {b: [r[cfg]["steady"]["samples_per_s"] / r[b]["steady"]["samples_per_s"] for r in rounds]
                     for b in ("oracle", "default", "hill_climb")}
            alloc = ", ".join(r[cfg].get("allocation") or r[cfg].get("best") or "?" for r in rounds)
            settled = [r[cfg]["settled_s"] for r in rounds if r[cfg].get("settled_s") is not None]
            n_tuned = sum(1 for r in rounds if "decisions" in r[cfg])
            settle = "-" if not n_tuned else (f"{_ms(settled)} s ({len(settled)}/{n_tuned} runs)" if settled
                                              else f"not within the run (0/{n_tuned})")
            lines.append(f"| {cfg} | {alloc} | {_ms(steady)} | {_ms(whole)} | {_ms(wait, 2)} | "
                         f"{_ms(ratio['oracle'], 2)} | {_ms(ratio['default'], 2)} | {_ms(ratio['hill_climb'], 2)} | "
                         f"{settle} |")
        loads = [f"{r['loadavg_start'][0]:.1f}-{r['loadavg_end'][0]:.1f}" for r in rounds]
        grid = ", ".join(f"{k}: {v:.0f}" for k, v in sorted(res["grid"].items(), key=lambda kv: -kv[1]))
        lines += ["", f"1-min load average per round (start-end): {', '.join(loads)}.", "",
                  f"Exhaustive search ({len(res['grid'])} allocations, {results['args']['grid_seconds']:.0f} s each, "
                  f"samples/s): {grid}.", ""]
    return "\n".join(lines)


def write_plot(results: dict, path: str) -> None:
    from lightning_ext.core.plotting import new_figure, save_figure

    names = list(results["scenarios"])
    fig, axes = new_figure(1, len(names), figsize=(4.2 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        res = results["scenarios"][name]
        means, stds = zip(*(summary(res, c) for c in CONFIGS))
        ax.bar(range(len(CONFIGS)), means, yerr=stds, color=["#999", "#bbb", "#6a9fd4", "#d46a6a", "#555"])
        ax.set_xticks(range(len(CONFIGS)), [c.replace("_", "\n") for c in CONFIGS], fontsize=8)
        ax.set_title(f"{name} (budget {res['budget']} workers)", fontsize=9)
        ax.set_ylabel("samples/s (steady state)")
    save_figure(fig, path)


if __name__ == "__main__":
    main()
