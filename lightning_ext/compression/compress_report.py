"""The presentation side of ``lightning-ext compress``: its report page, its Pareto plot and its progress bar.

Kept apart from :mod:`lightning_ext.compress` (the stages themselves) so each file stays readable; nothing here
measures or changes a model.
"""

from __future__ import annotations

import time
from typing import Any, Optional

from lightning_ext.core.io import atomic_write_text
from lightning_ext.core.plotting import new_figure, save_figure

__all__ = ["Stages", "write_plot", "write_report"]


def write_plot(rows: list[dict], plans: list[dict], result: Any) -> None:
    fig, (ax, bx) = new_figure(1, 2, figsize=(10, 4))
    points = [r for r in rows if r["metric"] is not None]
    ax.plot([r["ms"] for r in points], [r["metric"] for r in points], "o-", color="tab:blue")
    for r in points:
        ax.annotate(r["stage"], (r["ms"], r["metric"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axvline(result.budget_ms, color="tab:red", ls="--", label=f"budget {result.budget_ms:.3g} ms")
    ax.set_xlabel(f"latency, ms (batch {result.batch_size}, {result.device})")
    ax.set_ylabel(result.monitor)
    ax.set_title("accuracy vs measured latency")
    ax.legend(fontsize=8)
    bx.plot([p["predicted_ms"] for p in plans], [p["measured_ms"] for p in plans], "s", color="tab:green")
    if plans:
        lo = min(min(p["predicted_ms"], p["measured_ms"]) for p in plans)
        hi = max(max(p["predicted_ms"], p["measured_ms"]) for p in plans)
        bx.plot([lo, hi], [lo, hi], color="gray", lw=0.8)
    bx.set_xlabel("predicted by the latency table, ms")
    bx.set_ylabel("measured, ms")
    bx.set_title("plans tried")
    save_figure(fig, result.plot_path)


def write_report(rows: list[dict], plans: list[dict], result: Any) -> None:
    def metric(v: Optional[float]) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    met = "met" if result.compressed_ms <= result.budget_ms else (
        f"met within the {result.tolerance:.0%} timing tolerance" if result.budget_met else "MISSED")
    lines = [f"# Compression report ({time.strftime('%Y-%m-%d %H:%M:%S')})", "",
             f"- Device: {result.device}; batch {result.batch_size}; latency = {result.timing}.",
             f"- Budget: {result.budget_ms:.3f} ms; dense {result.dense_ms:.3f} ms; compressed "
             f"{result.compressed_ms:.3f} ms ({result.speedup:.2f}x faster); budget {met}.",
             f"- MACs {result.macs_before:,} -> {result.macs_after:,}; parameters {result.params_before:,} -> "
             f"{result.params_after:,}.",
             f"- {result.monitor}: dense {metric(result.dense_metric)} -> compressed {metric(result.final_metric)}.",
             "", "| stage | latency (ms) | speedup | MACs | params | " + result.monitor + " |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['stage']} | {r['ms']:.3f} | {result.dense_ms / r['ms']:.2f}x | {r['macs']:,} | "
                     f"{r['params']:,} | {metric(r['metric'])} |")
    lines += ["", "## Plans tried", "",
              "Each step's greedy path runs from the current model (position 0) to the narrowest widths; plans along "
              "it were pruned on a copy and timed, and the first one within the budget was kept.", "",
              "| step | position on the path | predicted by the table (ms) | measured (ms) | kept |",
              "|---|---|---|---|---|"]
    lines += [f"| {p['step']} | {p['position']} / {p['path_length'] - 1} | {p['predicted_ms']:.3f} | "
              f"{p['measured_ms']:.3f} | {'yes' if p['chosen'] else ''} |" for p in plans]
    lines += ["", "![accuracy vs latency](pareto.png)", "",
              "Load it in a fresh process: build the dense model, then "
              "`lightning_ext.compression.load_pruned_checkpoint(model, 'compressed.ckpt')`. Reproduce: "
              "`lightning-ext compress --config compress.yaml`.", ""]
    atomic_write_text("\n".join(lines), result.report_path)


class Stages:
    """A Rich progress bar over the stages, with the current latency and metric."""

    def __init__(self, enabled: bool, steps: int) -> None:
        self.progress = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(TextColumn("compress"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[stage]} | {task.fields[now]}"), TimeElapsedColumn())
            self.progress.start()
            self.task = self.progress.add_task("compress", total=2 + 2 * steps, stage="", now="")

    def stage(self, text: str) -> None:
        if self.progress is not None:
            started = self.progress.tasks[0].fields["stage"] != ""
            self.progress.update(self.task, advance=1 if started else 0, stage=text)

    def update(self, ms: float, metric: Optional[float]) -> None:
        if self.progress is not None:
            self.progress.update(self.task, now=f"{ms:.3g} ms, metric {'n/a' if metric is None else f'{metric:.4f}'}")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.update(self.task, advance=1)
            self.progress.stop()
