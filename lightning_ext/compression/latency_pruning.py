"""Latency-aware filter pruning: a measured latency table per filter group and a plan that meets a latency budget.

MACs are a poor proxy for the time a pruned network takes: a conv's latency falls in steps as its width crosses
what the device's kernels vectorise, depthwise and pointwise layers cost more per MAC than dense 3x3 convs, and the
same MACs cut from different layers saves different time. Following HALP (Shen et al., "Structural Pruning via
Latency-Saliency Knapsack", NeurIPS 2022, arXiv 2110.10811; reference code NVlabs/HALP, which builds a latency
lookup table per layer and width on the target device), this module

1. **measures** (:func:`build_latency_table`), for every prunable filter group, the whole model's latency with that
   group alone narrowed to each width of a grid (multiples of ``step``), on the target device, batch size and
   thread count. The table is built once per model and device and cached on disk under
   ``core.paths.cache_root("compression/latency")``, keyed by the architecture, input shape and dtype, device name,
   thread count and torch version; a cached table is validated (key, groups, finite positive times) before use.
2. **plans** (:func:`plan_latency_pruning`): predicts a plan's latency as the dense latency plus the sum of each
   group's measured change, and builds a greedy path from the dense model to the narrowest widths, each move
   removing one measured width step from the group that loses the least importance per second saved (importance =
   the criterion's scores, normalised by each group's mean as Torch-Pruning's global ranking does). Widths are first
   the measured grid points that are not slower than a wider measured width, so each layer is rounded to a
   width the device runs fast (measured, not assumed); only when those cannot meet the budget does the path go on
   through the other measured widths (on a busy machine a narrower width can time slower than the dense model by
   noise alone: a MobileNetV2 table measured under load refused 1.5x that a uniform plan reaches at 1.8x). The stop
   on that path is then found by **timing** pruned
   copies: a bisection, starting where the table predicts the budget is crossed, for the first plan measured within
   the budget (so the additive prediction's error, in either direction, costs neither the budget nor capacity).

This is not HALP's augmented knapsack (which also models the neighbouring layer's width); it is a greedy on the
same kind of table, with whole-model measurements choosing where to stop. Torch-Pruning plans by
MACs or parameters only, which is why it is written here.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_ext.compression.l1_filter_pruning import l1_filter_scores
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
    ...                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 4))
    >>> x = torch.randn(8, 3, 16, 16)
    >>> table = build_latency_table(net, x, step=8, cache_dir=None, progress=False)  # wall clock, this CPU
    >>> sorted(table.widths), table.widths["2"]
    (['0', '2'], [8, 16, 24, 32])

    A deterministic cost in place of the clock (a deployed runtime's timer plugs in the same way):

    >>> from lightning_ext.core.measure import count_macs_params
    >>> cost = lambda m, inputs: count_macs_params(m, inputs)[0] * 1e-9
    >>> table = build_latency_table(net, x, step=8, cache_dir=None, progress=False, latency_fn=cost)
    >>> plan = plan_latency_pruning(net, x, l1_filter_scores(net), speedup=1.5, table=table, latency_fn=cost)
    >>> plan.channels, round(plan.speedup, 2)  # the first conv's filters save the most per importance lost
    ({'0': (32, 16), '2': (32, 32)}, 1.98)
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import nn

from lightning_ext.compression.graph import FilterGroup, PruningError, Scores, _groups_from_graph, group_scores
from lightning_ext.compression.graph import build_dependency_graph, resolve_layer_names
from lightning_ext.compression.plan import PruningPlan, _apply_ops, _ops_from_counts
from lightning_ext.core.io import atomic_write_json
from lightning_ext.core.measure import _first_tensor, count_macs_params, measure_latency, trial_copy
from lightning_ext.core.paths import cache_root
from lightning_ext.core.validation import check_positive_int

TABLE_VERSION = 1
LatencyFn = Callable[[nn.Module, Any], float]


def _timer(example_inputs: Any, warmup: int, repeats: int, num_threads: Optional[int],
           latency_fn: Optional[LatencyFn]) -> Callable[[nn.Module], float]:
    if latency_fn is not None:
        return lambda m: float(latency_fn(m, example_inputs))
    return lambda m: measure_latency(m, example_inputs, warmup=warmup, repeats=repeats, num_threads=num_threads)


# -- keys ---------------------------------------------------------------------------------------------------------


def device_name(example_inputs: Any, num_threads: Optional[int] = None) -> str:
    """The device the inputs live on, as a table key: the GPU's name, or the CPU model and thread count."""
    first = _first_tensor(example_inputs)
    if first is not None and first.is_cuda:
        return f"cuda:{torch.cuda.get_device_name(first.device)}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu:{cpu}:{num_threads or torch.get_num_threads()} threads"


def _shapes(inputs: Any) -> Any:
    if isinstance(inputs, torch.Tensor):
        return [list(inputs.shape), str(inputs.dtype)]
    if isinstance(inputs, dict):
        return {k: _shapes(v) for k, v in sorted(inputs.items())}
    if isinstance(inputs, (tuple, list)):
        return [_shapes(v) for v in inputs]
    return repr(type(inputs).__name__)


def table_key(model: nn.Module, example_inputs: Any, step: int, max_widths: int,
              num_threads: Optional[int] = None) -> dict:
    """What a latency table depends on: architecture (module types and parameter shapes), inputs, device, grid."""
    arch = hashlib.sha256()
    for name, module in model.named_modules():
        arch.update(f"{name}:{type(module).__name__};".encode())
    for name, p in model.named_parameters():
        arch.update(f"{name}:{tuple(p.shape)};".encode())
    return {"version": TABLE_VERSION, "architecture": arch.hexdigest()[:24], "inputs": _shapes(example_inputs),
            "device": device_name(example_inputs, num_threads), "torch": torch.__version__, "step": step,
            "max_widths": max_widths}


def _key_digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


# -- the table ----------------------------------------------------------------------------------------------------


@dataclass
class LatencyTable:
    """Measured latency (seconds) of the whole model with one filter group narrowed to each width of a grid.

    Attributes:
        key: what the table was measured for (:func:`table_key`).
        dense_s: latency of the unpruned model.
        channels: ``group root -> channels`` of the unpruned model.
        widths: ``group root -> measured widths``, ascending, the last one the full width.
        seconds: ``group root -> latency at each width`` (the full width's entry is the dense latency).
    """

    key: dict
    dense_s: float
    channels: dict[str, int]
    widths: dict[str, list[int]]
    seconds: dict[str, list[float]]

    def fast_widths(self, root: str) -> list[int]:
        """The measured widths of ``root`` that are faster than every wider measured width (ascending)."""
        ws, ts = self.widths[root], self.seconds[root]
        keep, best = [], math.inf
        for w, t in sorted(zip(ws, ts), reverse=True):
            if w == ws[-1] or t < best:
                keep.append(w)
                best = min(best, t)
        return sorted(keep)

    def group_seconds(self, root: str, width: int) -> float:
        """Measured latency with ``root`` at ``width`` (linear between measured widths)."""
        ws, ts = self.widths[root], self.seconds[root]
        if width >= ws[-1]:
            return ts[-1]
        if width <= ws[0]:
            return ts[0]
        for (w0, t0), (w1, t1) in zip(zip(ws, ts), zip(ws[1:], ts[1:])):
            if w0 <= width <= w1:
                return t0 + (t1 - t0) * (width - w0) / (w1 - w0)
        return ts[-1]

    def predict(self, channels: dict[str, int]) -> float:
        """Predicted latency of a plan (``root -> channels kept``): dense plus each group's measured change."""
        return self.dense_s + sum(self.group_seconds(r, c) - self.seconds[r][-1] for r, c in channels.items()
                                  if r in self.widths)

    def floor_s(self) -> float:
        """Predicted latency with every group at its narrowest fast width."""
        return self.predict({r: self.fast_widths(r)[0] for r in self.widths})

    def to_dict(self) -> dict:
        return {"key": self.key, "dense_s": self.dense_s, "channels": self.channels, "widths": self.widths,
                "seconds": self.seconds}

    @classmethod
    def from_dict(cls, data: dict) -> "LatencyTable":
        """Read a table, checking its structure (raises ``ValueError`` naming what is wrong)."""
        try:
            table = cls(dict(data["key"]), float(data["dense_s"]), {str(k): int(v) for k, v in data["channels"].items()},
                        {str(k): [int(w) for w in v] for k, v in data["widths"].items()},
                        {str(k): [float(t) for t in v] for k, v in data["seconds"].items()})
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ValueError(f"not a latency table ({type(err).__name__}: {err})") from err
        if not (math.isfinite(table.dense_s) and table.dense_s > 0):
            raise ValueError(f"dense latency {table.dense_s} is not a finite positive number")
        if set(table.widths) != set(table.seconds) or not set(table.widths) <= set(table.channels):
            raise ValueError("widths, seconds and channels name different groups")
        for root, ws in table.widths.items():
            ts = table.seconds[root]
            if len(ws) != len(ts) or not ws or ws != sorted(set(ws)) or ws[0] < 1 or ws[-1] != table.channels[root]:
                raise ValueError(f"group {root!r}: widths {ws} are not ascending up to its {table.channels[root]} "
                                 f"channels, or do not match its {len(ts)} times")
            if not all(math.isfinite(t) and t > 0 for t in ts):
                raise ValueError(f"group {root!r}: latencies {ts} are not all finite and positive")
        return table


def width_grid(channels: int, step: int, max_widths: int) -> list[int]:
    """Widths measured for a group: multiples of ``step`` up to ``channels`` (and ``channels`` itself), at most
    ``max_widths`` of them, evenly thinned, always keeping the narrowest and the full width.

    Example:
        >>> width_grid(64, 8, 20), width_grid(20, 8, 20), width_grid(512, 8, 5)
        ([8, 16, 24, 32, 40, 48, 56, 64], [8, 16, 20], [8, 136, 264, 384, 512])
    """
    grid = sorted({w for w in range(step, channels, step)} | {channels})
    if len(grid) <= max_widths:
        return grid
    picks = {round(i * (len(grid) - 1) / (max_widths - 1)) for i in range(max_widths)}
    return [grid[i] for i in sorted(picks)]


def _prunable(groups: Sequence[FilterGroup]) -> list[FilterGroup]:
    # groups tied by a grouped (non-depthwise) conv, or refused, keep their width
    return [g for g in groups if g.refusal is None and g.tied is None and g.channels > 1]


def _groups(model: nn.Module, example_inputs: Any, ignored_layers: Optional[Sequence[str]]) -> list[FilterGroup]:
    ignored = resolve_layer_names(model, ignored_layers)
    groups = _prunable(_groups_from_graph(model, build_dependency_graph(model, example_inputs), ignored,
                                          example_inputs))
    if not groups:
        raise PruningError(f"{type(model).__name__} has no prunable conv filter groups"
                           + (f" outside `ignored_layers` {ignored}" if ignored else "") + ".")
    return groups


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(TextColumn("latency table"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[what]}"),
                        TimeRemainingColumn(), transient=True)
    progress.start()
    progress.add_task("table", total=total, what="")
    return progress


def build_latency_table(
    model: nn.Module,
    example_inputs: Any,
    ignored_layers: Optional[Sequence[str]] = None,
    step: int = 8,
    max_widths: int = 12,
    warmup: int = 2,
    repeats: int = 7,
    num_threads: Optional[int] = None,
    cache_dir: Optional[Union[str, Path]] = "",
    progress: bool = True,
    latency_fn: Optional[LatencyFn] = None,
) -> LatencyTable:
    """Measure (or read from the cache) the latency of ``model`` with each prunable group at each grid width.

    Args:
        model: the model (not changed; measured in eval mode on the inputs' device).
        example_inputs: a batch of the size the budget is stated for, on the target device.
        ignored_layers: convs (names or globs) whose groups keep their width.
        step: widths are multiples of this (the grid of :func:`width_grid`).
        max_widths: at most this many widths per group.
        warmup, repeats: untimed and timed forward passes per measurement (the median is kept).
        num_threads: ``torch.set_num_threads`` during the measurements (``None``: the current setting).
        cache_dir: folder of cached tables; ``""`` = ``cache_root("compression/latency")``, ``None`` = no cache.
        progress: show a Rich progress bar.
        latency_fn: ``(model, inputs) -> seconds`` replacing the median wall-clock measurement (e.g. a deployed
            runtime's timer, or a deterministic cost in tests); a table measured with it is not cached.

    Returns:
        The :class:`LatencyTable`.
    """
    check_positive_int("step", step)
    check_positive_int("max_widths", max_widths)
    check_positive_int("repeats", repeats)
    if max_widths < 2:
        raise ValueError(f"`max_widths` must be >= 2 (the narrowest and the full width), got {max_widths}.")
    key = table_key(model, example_inputs, step, max_widths, num_threads)
    path = None
    if cache_dir is not None and latency_fn is None:
        folder = cache_root("compression/latency") if cache_dir == "" else Path(cache_dir)
        path = folder / f"{_key_digest(key)}.json"
        if path.exists():
            try:
                table = LatencyTable.from_dict(json.loads(path.read_text()))
                if table.key != key:
                    raise ValueError("its key differs from this model and device")
                return table
            except (ValueError, json.JSONDecodeError) as err:
                warnings.warn(f"Ignoring the cached latency table {path}: {err}; measuring it again.", stacklevel=2)
    groups = _groups(model, example_inputs, ignored_layers)
    grids = {g.root: width_grid(g.channels, step, max_widths) for g in groups}
    bar = _progress(2 + sum(len(v) - 1 for v in grids.values()), progress)

    timed = _timer(example_inputs, warmup, repeats, num_threads, latency_fn)

    try:
        dense = timed(model)
        if bar is not None:
            bar.update(0, advance=1, what=f"dense: {dense * 1e3:.2f} ms")
        widths, seconds = {}, {}
        for g in groups:
            trial = trial_copy(model)
            width, times = g.channels, {g.channels: dense}
            for w in sorted(grids[g.root], reverse=True)[1:]:  # narrow one copy step by step: drop the last ones
                _apply_ops(trial, [[g.root, True, list(range(w, width))]], example_inputs)
                width = w
                times[w] = timed(trial)
                if bar is not None:
                    bar.update(0, advance=1, what=f"{g.root} @ {w}: {times[w] * 1e3:.2f} ms")
            widths[g.root] = sorted(times)
            seconds[g.root] = [times[w] for w in widths[g.root]]
        # timing noise only adds time: the dense latency is the lower of a measurement before and after the groups
        # (the first pass of a process can also pay one-off costs), and every group's full width is that value
        dense = min(dense, timed(model))
        if bar is not None:
            bar.update(0, advance=1, what=f"dense again: {dense * 1e3:.2f} ms")
        for root in seconds:
            seconds[root][-1] = dense
    finally:
        if bar is not None:
            bar.stop()
    table = LatencyTable(key, dense, {g.root: g.channels for g in groups}, widths, seconds)
    LatencyTable.from_dict(table.to_dict())  # a measurement that is not finite and positive is refused here
    if path is not None:
        atomic_write_json(table.to_dict(), path, indent=1)
    return table


# -- the plan -----------------------------------------------------------------------------------------------------


@dataclass
class LatencyPlan(PruningPlan):
    """A :class:`PruningPlan` chosen for a latency budget, with the latencies behind it (seconds).

    Attributes:
        dense_s: measured latency of the unpruned model (the lower of the table's and a new measurement when the
            target is a speedup).
        budget_s: the latency the plan had to meet.
        predicted_s: the table's prediction for the plan.
        measured_s: the plan's latency measured on a pruned copy.
        rounds: plans measured.
        history: ``(position on the greedy path, predicted s, measured s)`` per measured plan.
    """

    dense_s: float = 0.0
    budget_s: float = 0.0
    predicted_s: float = 0.0
    measured_s: float = 0.0
    rounds: int = 0
    history: list = field(default_factory=list)
    position: int = 0  # the chosen plan's position on the greedy path (0 = dense)
    path_length: int = 0

    @property
    def speedup(self) -> float:
        return self.dense_s / self.measured_s if self.measured_s else 1.0


def _normalised(g: FilterGroup, scores: Scores) -> torch.Tensor:
    s = group_scores(g, scores).double().abs()
    return s / s.mean().clamp_min(1e-12)


def plan_latency_pruning(
    model: nn.Module,
    example_inputs: Any,
    scores: Scores,
    latency_budget_s: Optional[float] = None,
    speedup: Optional[float] = None,
    table: Optional[LatencyTable] = None,
    ignored_layers: Optional[Sequence[str]] = None,
    rounds: int = 12,
    tolerance: float = 0.02,
    warmup: int = 2,
    repeats: int = 7,
    num_threads: Optional[int] = None,
    latency_fn: Optional[LatencyFn] = None,
    **table_kwargs: Any,
) -> LatencyPlan:
    """Choose the filters to remove so that the measured latency meets a budget (give exactly one target).

    Args:
        model: the model (not changed).
        example_inputs: a batch of the budget's size on the target device.
        scores: ``conv name -> one importance per filter`` (higher = more important), e.g. L1 or Beta-Rank.
        latency_budget_s: the latency to meet, in seconds per forward pass of ``example_inputs``.
        speedup: or the speedup over the dense model (> 1).
        table: a table from :func:`build_latency_table` (built here with ``table_kwargs`` when ``None``).
        ignored_layers: convs whose groups keep their width.
        rounds: at most this many plans measured while searching the greedy path (about log2 of its length is
            needed).
        tolerance: a measurement within this fraction above the budget counts as meeting it (timing noise).
        warmup, repeats, num_threads: for the measurements of the plans.
        latency_fn: ``(model, inputs) -> seconds`` replacing the wall-clock measurement (see
            :func:`build_latency_table`).

    Returns:
        A :class:`LatencyPlan`; raises :class:`PruningError` with the lowest reachable latency when the budget is
        out of reach.
    """
    if (latency_budget_s is None) == (speedup is None):
        raise ValueError("Give exactly one of `latency_budget_s` (seconds) and `speedup` (> 1).")
    check_positive_int("rounds", rounds)
    if table is None:
        table = build_latency_table(model, example_inputs, ignored_layers=ignored_layers, warmup=warmup,
                                    repeats=repeats, num_threads=num_threads, latency_fn=latency_fn,
                                    **table_kwargs)
    timed = _timer(example_inputs, warmup, repeats, num_threads, latency_fn)
    dense_s = table.dense_s
    if speedup is not None:
        if not (math.isfinite(speedup) and speedup > 1):
            raise ValueError(f"`speedup` must be a finite number > 1, got {speedup}.")
        dense_s = min(dense_s, timed(model))  # a noisy (slow) table measurement must not loosen the budget
        budget = dense_s / speedup
    else:
        if not (math.isfinite(latency_budget_s) and latency_budget_s > 0):
            raise ValueError(f"`latency_budget_s` must be a finite number > 0, got {latency_budget_s}.")
        budget = float(latency_budget_s)
    groups = [g for g in _groups(model, example_inputs, ignored_layers) if g.root in table.widths]
    if {g.root: g.channels for g in groups} != {r: table.channels[r] for r in (g.root for g in groups)}:
        raise PruningError("The latency table was measured on another version of this model (channel counts "
                           "differ); build it again.")
    importance = {g.root: torch.sort(_normalised(g, scores)).values for g in groups}
    fast = {g.root: table.fast_widths(g.root) for g in groups}
    width = {g.root: g.channels for g in groups}
    macs_before, params_before = count_macs_params(model, example_inputs)

    def next_width(root: str) -> Optional[int]:
        lower = [w for w in fast[root] if w < width[root]]
        return lower[-1] if lower else None

    # the greedy path from the dense model to the narrowest widths: each move removes one measured width step from
    # the group that loses the least importance per second the table says it saves
    path = [dict(width)]

    def extend_path() -> None:
        while True:
            best = None
            for root in width:
                w = next_width(root)
                if w is None:
                    continue
                saved = table.group_seconds(root, width[root]) - table.group_seconds(root, w)
                gone = table.channels[root] - width[root]  # importance is ascending: the next (width - w) go
                lost = float(importance[root][gone: gone + width[root] - w].sum())
                ratio = lost / saved if saved > 0 else math.inf
                if best is None or ratio < best[0]:
                    best = (ratio, root, w)
            if best is None:
                break
            width[best[1]] = best[2]
            path.append(dict(width))

    extend_path()
    predicted_path = [table.predict(state) for state in path]
    measured: dict[int, float] = {}

    def measure(i: int) -> float:
        if i not in measured:
            counts = {r: table.channels[r] - w for r, w in path[i].items()}
            trial = trial_copy(model)
            _apply_ops(trial, _ops_from_counts(groups, counts, scores), example_inputs)
            measured[i] = timed(trial)
            if i == len(path) - 1 and measured[i] > limit:
                measured[i] = min(measured[i], timed(trial))  # before refusing, a second look (timing noise)
            history.append((i, predicted_path[i], measured[i]))
        return measured[i]

    # walk the path by measurement: the first state measured within the budget, found by bisection that starts
    # where the table predicts the budget is crossed (the measurement corrects the additive prediction)
    limit, history = budget * (1 + tolerance), []
    last = len(path) - 1
    if measure(last) > limit and any(fast[r] != table.widths[r] for r in fast):
        # the fast widths' end is not enough: go on through every measured width (a width the table found slower
        # than a wider one may be timing noise; here only the measurement of the whole plan decides)
        for root in fast:
            fast[root] = list(table.widths[root])
        extend_path()
        predicted_path = [table.predict(state) for state in path]
        last = len(path) - 1
        measure(last)
    if measured[last] > limit:
        raise PruningError(
            f"The latency budget {budget * 1e3:.3g} ms cannot be reached: with every prunable group at its "
            f"narrowest measured width the model takes {measured[last] * 1e3:.3g} ms (dense {dense_s * 1e3:.3g} "
            f"ms). Raise the budget to at least {measured[last] * 1e3:.3g} ms, lower `step`, or prune layers now in "
            "`ignored_layers`."
        )
    lo, hi = 0, last  # lo: not shown to meet the budget; hi: measured within it
    guess = next((i for i, p in enumerate(predicted_path) if p <= budget), last)
    while hi - lo > 1 and len(history) < rounds:
        mid = guess if lo < guess < hi else (lo + hi) // 2
        guess = -1
        if measure(mid) <= limit:
            hi = mid
        else:
            lo = mid
    width = dict(path[hi])

    def ops_now():
        counts = {r: table.channels[r] - w for r, w in width.items()}
        return _ops_from_counts(groups, counts, scores)

    predicted, measured_s = predicted_path[hi], measured[hi]
    ops = ops_now()
    trial = trial_copy(model)
    _apply_ops(trial, ops, example_inputs)
    macs_after, params_after = count_macs_params(trial, example_inputs)
    return LatencyPlan(ops=ops, channels={g.root: (g.channels, width[g.root]) for g in groups},
                       macs_before=macs_before, macs_after=macs_after, params_before=params_before,
                       params_after=params_after, dense_s=dense_s, budget_s=budget, predicted_s=predicted,
                       measured_s=measured_s, rounds=len(history), history=history, position=hi,
                       path_length=len(path))
