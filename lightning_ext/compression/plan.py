"""Pruning plans: which channels each filter group loses for a channel ratio or a MACs target, and applying them.

The plan format is Torch-Pruning's pruning history, ``[layer_name, is_out_channel_pruning, indices]`` per
entry, so a plan is also what a checkpoint stores and what :func:`apply_pruning_history` replays.
"""

from __future__ import annotations

import copy
import difflib
import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import nn

from lightning_ext.compression.graph import (
    FilterGroup,
    Op,
    PruningError,
    Scores,
    _conv_names,
    _describe,
    _groups_from_graph,
    _output_shapes,
    _track_modules,
    build_dependency_graph,
    group_scores,
    resolve_layer_names,
)
from lightning_ext.core.measure import call_model, count_macs_params, eval_mode

_APPLIED_ATTR = "_lightning_ext_pruning_applied"  # list of the op lists already applied to a model, in order


# -- plans ------------------------------------------------------------------------------------------------------


@dataclass
class PruningPlan:
    """What one pruning step removes.

    Attributes:
        ops: Torch-Pruning history entries ``[root_conv_name, True, [channel indices]]`` in the order they apply
            (indices in the numbering before this step).
        channels: ``root_name -> (channels before, channels after)`` for every prunable group.
        macs_before, macs_after, params_before, params_after: counted on the example inputs (batch as given).
    """

    ops: list[Op]
    channels: dict[str, tuple[int, int]]
    macs_before: int = 0
    macs_after: int = 0
    params_before: int = 0
    params_after: int = 0

    @property
    def macs_reduction(self) -> float:
        return 1.0 - self.macs_after / self.macs_before if self.macs_before else 0.0


def _round_keep(keep: int, channels: int, round_to: int) -> int:
    """Round a kept-channel count to the nearest multiple of ``round_to`` (at least one multiple, at most all)."""
    if round_to <= 1 or keep < 1:
        return keep
    return min(channels, max(round_to, int(math.floor(keep / round_to + 0.5)) * round_to))


def _counts_for_ratio(
    groups: list[FilterGroup], ratio: float, layer_ratios: dict[str, float], reference_channels: dict[str, int],
    round_to: int = 1,
) -> dict[str, int]:
    """Channels each group loses now so that ``ratio`` of its reference channels are gone in total."""
    counts = {}
    for g in groups:
        r = ratio
        for name in [g.root, *g.member_names()]:
            if name in layer_ratios:
                r = layer_ratios[name]
                break
        reference = reference_channels.get(g.root, g.channels)
        keep = reference - int(math.floor(r * reference + 0.5))
        if keep < 1:
            raise PruningError(
                f"Pruning ratio {r} would leave the filter group rooted at {g.root!r} ({reference} channels) with "
                f"zero channels. Lower the ratio, give this layer its own in `layer_ratios`, or add {g.root!r} to "
                "`ignored_layers`."
            )
        counts[g.root] = max(0, g.channels - _round_keep(keep, g.channels, round_to))
    return counts


def _counts_for_fraction(groups: list[FilterGroup], fraction: float, round_to: int = 1) -> dict[str, int]:
    counts = {}
    for g in groups:
        keep = max(1, g.channels - int(math.floor(fraction * g.channels + 0.5)))
        counts[g.root] = g.channels - _round_keep(keep, g.channels, round_to)
    return counts


def _ops_from_counts(groups: list[FilterGroup], counts: dict[str, int], scores: Optional[Scores]) -> list[Op]:
    ops = []
    for g in groups:
        n = counts.get(g.root, 0)
        if n <= 0:
            continue
        if scores is None:  # only the number of channels matters (MACs search)
            idxs = list(range(g.channels - n, g.channels))
        else:
            order = torch.argsort(group_scores(g, scores), stable=True)  # lowest importance first
            idxs = sorted(int(i) for i in order[:n])
        ops.append([g.root, True, idxs])
    return ops


def _apply_ops(model: nn.Module, ops: Sequence[Op], example_inputs: Any) -> None:
    """Remove channels by replaying ``ops`` (Torch-Pruning history entries) on ``model`` in place."""
    if not ops:
        return
    dg = build_dependency_graph(model, example_inputs)
    for name, is_out, idxs in ops:
        try:
            module = model.get_submodule(name)
        except AttributeError as err:
            raise PruningError(
                f"The pruning history names layer {name!r}, which {type(model).__name__} does not have; was the "
                "history recorded on another architecture?"
            ) from err
        pruner = dg.get_pruner_of_module(module)
        if pruner is None or module not in dg.module2node:
            raise PruningError(f"Layer {name!r} is not part of the traced dependency graph and cannot be pruned.")
        fn = pruner.prune_out_channels if is_out else pruner.prune_in_channels
        size = pruner.get_out_channels(module) if is_out else pruner.get_in_channels(module)
        idxs = [int(i) for i in idxs]
        if size is not None and (min(idxs) < 0 or max(idxs) >= size):
            raise PruningError(f"Channel indices {min(idxs)}..{max(idxs)} are out of range for {name!r} ({size}).")
        group = dg.get_pruning_group(module, fn, idxs)
        if not dg.check_pruning_group(group):
            raise PruningError(f"Removing {len(idxs)} channels of {name!r} would leave a layer with zero channels.")
        group.prune(record_history=False)


def _check_forward(model: nn.Module, example_inputs: Any, expected: Any) -> Optional[tuple[str, BaseException]]:
    """Run the model; return ``(failing layer, error)`` if the forward fails or the output shape changed."""
    try:
        with eval_mode(model), torch.no_grad(), _track_modules(model) as failed:
            out = call_model(model, example_inputs)
    except Exception as err:  # noqa: BLE001 - reported with the layer
        return (failed[-1] if failed else "", err)
    if _output_shapes(out) != expected:
        return ("", RuntimeError(f"the output shape changed from {expected} to {_output_shapes(out)}"))
    return None


def _diagnose(model: nn.Module, ops: Sequence[Op], example_inputs: Any, expected: Any, error: tuple) -> PruningError:
    """Find which groups break the forward pass when pruned alone, for an error that names them."""
    culprits = []
    for op in ops:
        trial = copy.deepcopy(model)
        try:
            _apply_ops(trial, [op], example_inputs)
        except PruningError:
            culprits.append(op[0])
            continue
        if _check_forward(trial, example_inputs, expected) is not None:
            culprits.append(op[0])
    layer, err = error
    culprits = culprits or [op[0] for op in ops]
    return PruningError(
        f"After removing channels, the forward pass fails in {_describe(model, layer)}: {type(err).__name__}: {err}. "
        f"Torch-Pruning's dependency graph did not follow what consumes the output channels of {culprits} (a "
        f"hard-coded reshape, a channel count stored in a plain tensor or a custom op). Add them to "
        f"`ignored_layers` (e.g. ignored_layers: {culprits}). The model was not changed."
    )


def apply_pruning_history(model: nn.Module, history: Sequence[Op], example_inputs: Any) -> nn.Module:
    """Replay a pruning history (Torch-Pruning format ``[layer, is_out, indices]`` entries) on ``model``.

    The model is changed in place (and returned). The history is first replayed on a copy and the copy's
    forward pass checked, so a history that does not fit the model raises :class:`PruningError` and leaves
    the model as it was.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
        >>> _ = apply_pruning_history(net, [["0", True, [1, 5]]], torch.zeros(1, 1, 8, 8))
        >>> net[0].out_channels, net[2].in_channels
        (6, 6)
    """
    ops = [[str(n), bool(o), [int(i) for i in idx]] for n, o, idx in history]
    if not ops:
        return model
    with eval_mode(model), torch.no_grad():
        expected = _output_shapes(call_model(model, example_inputs))
    trial = copy.deepcopy(model)
    _apply_ops(trial, ops, example_inputs)
    error = _check_forward(trial, example_inputs, expected)
    if error is not None:
        raise _diagnose(model, ops, example_inputs, expected, error)
    _apply_ops(model, ops, example_inputs)
    return model


def _macs_after(model: nn.Module, example_inputs: Any, ops: Sequence[Op]) -> int:
    trial = copy.deepcopy(model)
    _apply_ops(trial, ops, example_inputs)
    return count_macs_params(trial, example_inputs)[0]


def plan_filter_pruning(
    model: nn.Module,
    example_inputs: Any,
    scores: Scores,
    ratio: Optional[float] = None,
    target_macs_reduction: Optional[float] = None,
    ignored_layers: Optional[Sequence[str]] = None,
    layer_ratios: Optional[dict[str, float]] = None,
    reference_macs: Optional[int] = None,
    reference_channels: Optional[dict[str, int]] = None,
    round_to: int = 1,
    check: bool = True,
) -> PruningPlan:
    """Decide which filters to remove: the lowest-scoring channels of every prunable group.

    Give exactly one target:

    - ``ratio``: remove this share of each group's channels (``layer_ratios`` overrides it per conv name).
      With ``reference_channels`` (``root -> channels``, e.g. those before the first of several steps) the
      share is of the reference count, so iterative steps can reach a cumulative ratio.
    - ``target_macs_reduction``: remove the same share of channels from every group, the share found by
      bisection so that MACs fall by this fraction of ``reference_macs`` (default: the current MACs).

    Args:
        model: the model (not changed).
        example_inputs: inputs for tracing and counting MACs (a batch of one is enough).
        scores: ``conv name -> one score per filter`` (higher = more important).
        ratio: channel ratio in (0, 1).
        target_macs_reduction: MACs reduction in (0, 1).
        ignored_layers: conv names (or shell patterns) whose filters are never removed.
        layer_ratios: per-conv channel ratios in (0, 1) that override ``ratio``.
        reference_macs: MACs the reduction is measured against.
        reference_channels: channel counts the ratio is measured against.
        round_to: keep a multiple of this many channels per group (8 or 16 suit vectorised CPU/GPU kernels).
        check: replay the plan on a copy and check the forward pass (raises :class:`PruningError` naming the
            layers to ignore when it fails).

    Returns:
        The :class:`PruningPlan` (nothing is removed yet; see :func:`apply_pruning_history`).
    """
    if (ratio is None) == (target_macs_reduction is None):
        raise PruningError("Give exactly one of `ratio` (channel ratio) and `target_macs_reduction`.")
    if ratio is not None and not 0 < ratio < 1:
        raise PruningError(f"`ratio` must be in (0, 1), got {ratio}.")
    if target_macs_reduction is not None and not 0 < target_macs_reduction < 1:
        raise PruningError(f"`target_macs_reduction` must be in (0, 1), got {target_macs_reduction}.")
    layer_ratios = dict(layer_ratios or {})
    if layer_ratios and ratio is None:
        raise PruningError("`layer_ratios` only applies with `ratio`, not with `target_macs_reduction`.")
    if round_to < 1:
        raise PruningError(f"`round_to` must be >= 1, got {round_to}.")
    convs = set(_conv_names(model))
    for name, r in layer_ratios.items():
        if name not in convs:
            close = difflib.get_close_matches(name, sorted(convs), n=4)
            raise PruningError(
                f"`layer_ratios` names {name!r}, which is not a Conv2d of {type(model).__name__}."
                + (f" Close names: {', '.join(close)}." if close else "")
            )
        if not 0 <= r < 1:
            raise PruningError(f"`layer_ratios[{name!r}]` must be in [0, 1), got {r}.")
    ignored = resolve_layer_names(model, ignored_layers)
    dg = build_dependency_graph(model, example_inputs)
    groups = _groups_from_graph(model, dg, ignored, example_inputs)
    if not groups:
        raise PruningError(
            f"{type(model).__name__} has no prunable conv filters"
            + (f" outside `ignored_layers` {ignored}" if ignored else "")
            + "; filter pruning needs Conv2d layers whose outputs do not reach the model output directly."
        )
    macs_before, params_before = count_macs_params(model, example_inputs)
    with eval_mode(model), torch.no_grad():
        expected = _output_shapes(call_model(model, example_inputs))

    if ratio is not None:
        counts = _counts_for_ratio(groups, ratio, layer_ratios, dict(reference_channels or {}), round_to)
    else:
        reference = reference_macs or macs_before
        goal = (1.0 - target_macs_reduction) * reference
        if macs_before <= goal:
            counts = {}
        else:
            keep_one = _counts_for_fraction(groups, 1.0, round_to)
            floor_macs = _macs_after(model, example_inputs, _ops_from_counts(groups, keep_one, None))
            if floor_macs > goal:
                raise PruningError(
                    f"`target_macs_reduction={target_macs_reduction}` cannot be reached: keeping a single channel "
                    f"in every prunable layer still leaves {floor_macs / reference:.1%} of the MACs (ignored layers "
                    "and layers outside the dependency groups keep theirs), so some layer would need zero "
                    "channels. Lower the target or shorten `ignored_layers`."
                )
            cache: dict[tuple, int] = {}

            def excess(fraction: float) -> float:  # MACs above the goal when this share of channels goes
                c = _counts_for_fraction(groups, fraction, round_to)
                key = tuple(sorted(c.items()))
                if key not in cache:
                    cache[key] = _macs_after(model, example_inputs, _ops_from_counts(groups, c, None))
                return cache[key] - goal

            # false position (Illinois) on the share of channels removed from every group: MACs fall roughly
            # quadratically with it, so a few evaluations of pruned copies reach the target
            lo, hi, e_lo, e_hi, side = 0.0, 1.0, macs_before - goal, floor_macs - goal, 0
            best = (abs(e_hi), hi)
            for _ in range(12):
                f = hi - e_hi * (hi - lo) / (e_hi - e_lo) if e_hi != e_lo else (lo + hi) / 2
                e = excess(f)
                best = min(best, (abs(e), f))
                if abs(e) <= 0.002 * reference or hi - lo < 1e-4:
                    break
                if e > 0:
                    lo, e_lo = f, e
                    if side == -1:
                        e_hi /= 2
                    side = -1
                else:
                    hi, e_hi = f, e
                    if side == 1:
                        e_lo /= 2
                    side = 1
            counts = _counts_for_fraction(groups, best[1], round_to)

    ops = _ops_from_counts(groups, counts, scores)
    plan = PruningPlan(
        ops=ops,
        channels={g.root: (g.channels, g.channels - counts.get(g.root, 0)) for g in groups},
        macs_before=macs_before,
        params_before=params_before,
    )
    if check and ops:
        trial = copy.deepcopy(model)
        _apply_ops(trial, ops, example_inputs)
        error = _check_forward(trial, example_inputs, expected)
        if error is not None:
            raise _diagnose(model, ops, example_inputs, expected, error)
        plan.macs_after, plan.params_after = count_macs_params(trial, example_inputs)
    else:
        plan.macs_after, plan.params_after = macs_before, params_before
    return plan


def prune_filters(
    model: nn.Module,
    example_inputs: Any,
    scores: Scores,
    ratio: Optional[float] = None,
    target_macs_reduction: Optional[float] = None,
    ignored_layers: Optional[Sequence[str]] = None,
    layer_ratios: Optional[dict[str, float]] = None,
    round_to: int = 1,
) -> PruningPlan:
    """Remove the lowest-scoring filters of ``model`` in place and return the plan that was applied.

    See :func:`plan_filter_pruning` for the arguments. The plan is checked on a copy first: an error leaves
    the model unchanged.

    Example:
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))
        >>> scores = {"0": torch.arange(8.0), "3": torch.arange(4.0)}
        >>> plan = prune_filters(net, torch.zeros(1, 1, 8, 8), scores, ratio=0.5, ignored_layers=["3"])
        >>> plan.ops, net[0].out_channels, net[1].num_features, net[3].in_channels
        ([['0', True, [0, 1, 2, 3]]], 4, 4, 4)
    """
    plan = plan_filter_pruning(
        model, example_inputs, scores, ratio=ratio, target_macs_reduction=target_macs_reduction,
        ignored_layers=ignored_layers, layer_ratios=layer_ratios, round_to=round_to,
    )
    _apply_ops(model, plan.ops, example_inputs)
    _mark_applied(model, plan.ops)
    return plan


def _mark_applied(model: nn.Module, ops: Sequence[Op]) -> None:
    applied = list(getattr(model, _APPLIED_ATTR, []))
    applied.append([list(op) for op in ops])
    object.__setattr__(model, _APPLIED_ATTR, applied)


def applied_pruning_steps(model: nn.Module) -> list[list[Op]]:
    """The pruning steps (each a list of ops) already applied to ``model`` by this library, in order."""
    return list(getattr(model, _APPLIED_ATTR, []))


