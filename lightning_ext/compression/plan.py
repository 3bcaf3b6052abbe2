"""Pruning plans: which channels each filter group loses for a pruning ratio or a MACs target, and applying them.

The plan format is Torch-Pruning's pruning history, ``[layer_name, is_out_channel_pruning, indices]`` per
entry, so a plan is also what a checkpoint stores and what :func:`apply_pruning_history` replays. It is the one
history format of every pruning-like component (the filter pruners and UDFC); applying it also records which
weight slices each layer lost (:func:`recorded_channel_changes`).
"""

from __future__ import annotations

import difflib
import itertools
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
    _check_grouped_alignment,
    _consumer_masks,
    _removed_filters_are_zero,
    _flat_outputs,
    _max_difference,
    group_scores,
    is_grouped_conv,
    resolve_layer_names,
)
from lightning_ext.core.measure import call_model, count_macs_params, eval_mode, trial_copy
from lightning_ext.core.validation import check_number, check_positive_int

_APPLIED_ATTR = "_lightning_ext_pruning_applied"  # list of the op lists already applied to a model, in order
_CHANGES_ATTR = "_lightning_ext_channel_changes"  # per applied op: which weight slices each layer lost
_SEQUENCE = itertools.count()  # orders the change records of several (sub)modules


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
    groups: list[FilterGroup], pruning_ratio: float, layer_pruning_ratios: dict[str, float],
    reference_channels: dict[str, int], round_to: int = 1,
) -> dict[str, int]:
    """Channels each group loses now so that ``pruning_ratio`` of its reference channels are gone in total."""
    counts = {}
    for g in groups:
        r = pruning_ratio
        for name in [g.root, *g.member_names()]:
            if name in layer_pruning_ratios:
                r = layer_pruning_ratios[name]
                break
        reference = reference_channels.get(g.root, g.channels)
        keep = reference - int(math.floor(r * reference + 0.5))
        if keep < 1:
            raise PruningError(
                f"Pruning ratio {r} would leave the filter group rooted at {g.root!r} ({reference} channels) with "
                f"zero channels. Lower the ratio, give this layer its own in `layer_pruning_ratios`, or add "
                f"{g.root!r} to `ignored_layers`."
            )
        counts[g.root] = max(0, g.channels - _round_keep(keep, g.channels, round_to))
    return counts


def _counts_for_fraction(groups: list[FilterGroup], fraction: float, round_to: int = 1) -> dict[str, int]:
    counts = {}
    for g in groups:
        keep = max(1, g.channels - int(math.floor(fraction * g.channels + 0.5)))
        counts[g.root] = g.channels - _round_keep(keep, g.channels, round_to)
    return counts


def _tied_choice(g: FilterGroup, n: int, scores: Optional[Scores]) -> list[int]:
    """``n`` channels (as near as whole tied sets allow, never all) of a group tied by a grouped conv: the tied sets
    (same local channel of every conv group) with the lowest mean score, or the last ones without scores."""
    comps = g.tied or []
    if scores is None:
        keys = [-float(max(c)) for c in comps]
    else:
        s = group_scores(g, scores)
        keys = [float(s[torch.tensor(c)].mean()) for c in comps]
    chosen: list[int] = []
    for k in sorted(range(len(comps)), key=lambda k: (keys[k], k)):
        size = len(comps[k])
        if len(chosen) + size >= g.channels or len(chosen) >= n:
            break
        if len(chosen) + size > n and len(chosen) + size - n >= n - len(chosen):
            break
        chosen += comps[k]
    return sorted(chosen)


def _ops_from_counts(groups: list[FilterGroup], counts: dict[str, int], scores: Optional[Scores]) -> list[Op]:
    ops = []
    for g in groups:
        n = counts.get(g.root, 0)
        if n <= 0:
            continue
        if g.refusal:
            raise PruningError(g.refusal)
        if g.tied is not None:  # a grouped conv: the same local channels of every conv group
            idxs = _tied_choice(g, n, scores)
            if not idxs:
                continue
        elif scores is None:  # only the number of channels matters (MACs search)
            idxs = list(range(g.channels - n, g.channels))
        else:
            order = torch.argsort(group_scores(g, scores), stable=True)  # lowest importance first
            idxs = sorted(int(i) for i in order[:n])
        ops.append([g.root, True, idxs])
    return ops


def _weight_dim(module: nn.Module, out: bool) -> Optional[int]:
    """The dimension of ``module.weight`` that an output (``out``) or input channel removal slices, if known."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return None
    if weight.dim() == 1:
        return 0
    if isinstance(module, nn.modules.conv._ConvNd):
        if module.groups > 1 and module.groups == module.in_channels:  # depthwise: in and out channels are one
            return 0
        if module.groups > 1 and not out:
            return None  # an input channel of a grouped conv is not one slice of its weight
        return (1 if out else 0) if module.transposed else (0 if out else 1)
    if isinstance(module, nn.Linear):
        return 0 if out else 1
    return None


def _apply_op(model: nn.Module, dg: Any, op: Op, names: dict, example_inputs: Any = None,
              verify: bool = False) -> None:
    """Remove the channels of one history entry through Torch-Pruning's graph ``dg``; record what each layer lost.

    With ``verify`` (trial copies), the outputs after the removal are compared with the model whose removed channels
    are zeroed where they are consumed: they must match (so a model whose channels Torch-Pruning's graph maps
    wrongly, such as a channel shuffle, is refused with the layer to ignore instead of being pruned silently
    wrong)."""
    name, is_out, idxs = op
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
    out_fn = dg.is_out_channel_pruning_fn
    _check_grouped_alignment(group, names, out_fn, name)
    coupled = sorted({names[i.dep.target.module] for i in group.items if i.dep.target.module in names})
    lost: dict[str, dict[int, set]] = {}
    for item in group.items:
        target = item.dep.target.module
        dim = _weight_dim(target, out_fn(item.dep.handler)) if target in names else None
        if dim is not None:
            lost.setdefault(names[target], {}).setdefault(dim, set()).update(int(i) for i in item.idxs)
    dead = verify and _removed_filters_are_zero(group, names, out_fn)
    # with verify, the pruned model must compute what the model with the removed channels masked at every consumer
    # does (dead or not: a consumer that reads the channels elsewhere than Torch-Pruning thinks, e.g. after a
    # channel shuffle, makes them differ)
    masks = _consumer_masks(group, names, out_fn) if verify else None
    if masks is not None:
        saved = [(w, w.detach().clone()) for w in {id(w): w for w, _ in masks}.values()]
        with torch.no_grad():
            for w, index in masks:
                w[index] = 0
        masked = _flat_outputs(model, example_inputs)
        with torch.no_grad():
            for w, copy_ in saved:
                w.copy_(copy_)
    try:
        group.prune(record_history=False)
    except Exception as err:  # noqa: BLE001 - Torch-Pruning's own errors, re-raised with the layer
        detail = " ".join(str(err).split())
        raise PruningError(
            f"Torch-Pruning failed to remove {len(idxs)} channels of {name!r} (coupled layers {coupled[:6]}): "
            f"{type(err).__name__}: {detail}. Add {name!r} to `ignored_layers`."
        ) from err
    if masks is not None:
        try:
            diff = _max_difference(_flat_outputs(model, example_inputs), masked)
        except Exception:  # noqa: BLE001 - a failing forward is reported with its layer by the caller's check
            diff = None
        if diff is not None and diff > 1e-5:
            raise PruningError(
                f"After removing channels of {name!r}, the model's output differs by {diff:.3g} (relative) from the "
                f"model with those channels zeroed{' (they were dead)' if dead else ''}: Torch-Pruning did not "
                f"follow every consumer among {coupled[:6]}. Add {name!r} to `ignored_layers`."
            )
    record = {layer: {d: sorted(v) for d, v in dims.items()} for layer, dims in lost.items()}
    changes = model.__dict__.setdefault(_CHANGES_ATTR, [])
    changes.append((next(_SEQUENCE), record))


def _apply_ops(model: nn.Module, ops: Sequence[Op], example_inputs: Any, dg: Any = None,
               verify: bool = False) -> None:
    """Remove channels by replaying ``ops`` (Torch-Pruning history entries) on ``model`` in place.

    ``dg`` is a dependency graph of ``model`` built by the caller (built here when ``None``); ``verify`` compares
    outputs after each entry (see :func:`_apply_op`; for trial copies)."""
    if not ops:
        return
    dg = dg if dg is not None else build_dependency_graph(model, example_inputs)
    names = {m: n for n, m in model.named_modules()}
    for op in ops:
        _apply_op(model, dg, op, names, example_inputs, verify)


def recorded_channel_changes(model: nn.Module) -> list[dict[str, dict[int, list[int]]]]:
    """What every channel removal applied to ``model`` (or to one of its submodules) by this library took away.

    One entry per history entry applied (by a pruning callback, :func:`apply_pruning_history`, a checkpoint
    replay or UDFC), in the order applied: ``layer name -> {weight dimension -> removed indices}`` (indices in
    the numbering before that entry; names relative to ``model``). Derived from the pruning history when it is
    applied, so it is what a component reads to find which slices of a layer survived (e.g.
    :class:`~lightning_ext.compression.ActivatingWhilePruning` after a layer shrank).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3))
        >>> _ = apply_pruning_history(net, [["0", True, [1, 2]]], torch.zeros(1, 1, 8, 8))
        >>> recorded_channel_changes(net)
        [{'0': {0: [1, 2]}, '2': {1: [1, 2]}}]
    """
    records = []
    for prefix, sub in model.named_modules():
        for seq, record in sub.__dict__.get(_CHANGES_ATTR, []):
            pre = prefix + "." if prefix else ""
            records.append((seq, {pre + name: dims for name, dims in record.items()}))
    return [record for _, record in sorted(records, key=lambda r: r[0])]


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
        trial = trial_copy(model)
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
    trial = trial_copy(model)
    _apply_ops(trial, ops, example_inputs, verify=True)
    error = _check_forward(trial, example_inputs, expected)
    if error is not None:
        raise _diagnose(model, ops, example_inputs, expected, error)
    _apply_ops(model, ops, example_inputs)
    return model


def check_pruning_target(pruning_ratio: Optional[float], macs_reduction: Optional[float],
                         layer_pruning_ratios: Optional[dict[str, float]] = None, round_to: int = 1,
                         error: type[Exception] = PruningError) -> dict[str, float]:
    """Check a pruning target (exactly one of ``pruning_ratio`` and ``macs_reduction``, finite, in (0, 1)) and
    return ``layer_pruning_ratios`` as a dict.

    Example:
        >>> check_pruning_target(float("nan"), None)
        Traceback (most recent call last):
        ...
        lightning_ext.compression.graph.PruningError: pruning_ratio must be a finite number > 0 and < 1, got nan.
    """
    if (pruning_ratio is None) == (macs_reduction is None):
        raise error("Give exactly one target: `pruning_ratio` (share of channels removed) or `macs_reduction` "
                    "(share of MACs removed).")
    for name, value in (("pruning_ratio", pruning_ratio), ("macs_reduction", macs_reduction)):
        if value is not None:
            check_number(name, value, low=0, high=1, low_open=True, high_open=True, error=error)
    layer_pruning_ratios = dict(layer_pruning_ratios or {})
    if layer_pruning_ratios and pruning_ratio is None:
        raise error("`layer_pruning_ratios` only applies with `pruning_ratio`, not with `macs_reduction`.")
    for name, r in layer_pruning_ratios.items():
        check_number(f"layer_pruning_ratios[{name!r}]", r, low=0, high=1, high_open=True, error=error)
    check_positive_int("round_to", round_to, error=error)
    return layer_pruning_ratios


def _macs_after(model: nn.Module, example_inputs: Any, ops: Sequence[Op]) -> int:
    trial = trial_copy(model)
    _apply_ops(trial, ops, example_inputs)
    return count_macs_params(trial, example_inputs)[0]


def plan_filter_pruning(
    model: nn.Module,
    example_inputs: Any,
    scores: Scores,
    pruning_ratio: Optional[float] = None,
    macs_reduction: Optional[float] = None,
    ignored_layers: Optional[Sequence[str]] = None,
    layer_pruning_ratios: Optional[dict[str, float]] = None,
    reference_macs: Optional[int] = None,
    reference_channels: Optional[dict[str, int]] = None,
    round_to: int = 1,
    check: bool = True,
) -> PruningPlan:
    """Decide which filters to remove: the lowest-scoring channels of every prunable group.

    Give exactly one target:

    - ``pruning_ratio``: remove this share of each group's channels (``layer_pruning_ratios`` overrides it per
      conv name).
      With ``reference_channels`` (``root -> channels``, e.g. those before the first of several steps) the
      share is of the reference count, so iterative steps can reach a cumulative ratio.
    - ``macs_reduction``: remove the same share of channels from every group, the share found by
      bisection so that MACs fall by this fraction of ``reference_macs`` (default: the current MACs).

    Args:
        model: the model (not changed).
        example_inputs: inputs for tracing and counting MACs (a batch of one is enough).
        scores: ``conv name -> one score per filter`` (higher = more important).
        pruning_ratio: share of channels removed, in (0, 1).
        macs_reduction: share of the MACs removed, in (0, 1) (:mod:`lightning_ext.core.measure`'s convention).
        ignored_layers: conv names (or shell patterns) whose filters are never removed.
        layer_pruning_ratios: per-conv pruning ratios in [0, 1) that override ``pruning_ratio``.
        reference_macs: MACs the reduction is measured against.
        reference_channels: channel counts the ratio is measured against.
        round_to: keep a multiple of this many channels per group (8 or 16 suit vectorised CPU/GPU kernels).
        check: replay the plan on a copy and check the forward pass (raises :class:`PruningError` naming the
            layers to ignore when it fails).

    Returns:
        The :class:`PruningPlan` (nothing is removed yet; see :func:`apply_pruning_history`).
    """
    layer_pruning_ratios = check_pruning_target(pruning_ratio, macs_reduction, layer_pruning_ratios, round_to)
    convs = set(_conv_names(model))
    for name in layer_pruning_ratios:
        if name not in convs:
            close = difflib.get_close_matches(name, sorted(convs), n=4)
            raise PruningError(
                f"`layer_pruning_ratios` names {name!r}, which is not a Conv2d of {type(model).__name__}."
                + (f" Close names: {', '.join(close)}." if close else "")
            )
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

    if pruning_ratio is not None:
        counts = _counts_for_ratio(groups, pruning_ratio, layer_pruning_ratios, dict(reference_channels or {}),
                                   round_to)
    else:
        reference = reference_macs or macs_before
        goal = (1.0 - macs_reduction) * reference
        if macs_before <= goal:
            counts = {}
        else:
            keep_one = _counts_for_fraction(groups, 1.0, round_to)
            floor_macs = _macs_after(model, example_inputs, _ops_from_counts(groups, keep_one, None))
            if floor_macs > goal:
                raise PruningError(
                    f"`macs_reduction={macs_reduction}` cannot be reached: keeping a single channel "
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
    removed = {op[0]: len(op[2]) for op in ops}
    plan = PruningPlan(
        ops=ops,
        channels={g.root: (g.channels, g.channels - removed.get(g.root, 0)) for g in groups},
        macs_before=macs_before,
        params_before=params_before,
    )
    if check and ops:
        trial = trial_copy(model)
        _apply_ops(trial, ops, example_inputs, verify=True)
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
    pruning_ratio: Optional[float] = None,
    macs_reduction: Optional[float] = None,
    ignored_layers: Optional[Sequence[str]] = None,
    layer_pruning_ratios: Optional[dict[str, float]] = None,
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
        >>> plan = prune_filters(net, torch.zeros(1, 1, 8, 8), scores, pruning_ratio=0.5, ignored_layers=["3"])
        >>> plan.ops, net[0].out_channels, net[1].num_features, net[3].in_channels
        ([['0', True, [0, 1, 2, 3]]], 4, 4, 4)
    """
    plan = plan_filter_pruning(
        model, example_inputs, scores, pruning_ratio=pruning_ratio, macs_reduction=macs_reduction,
        ignored_layers=ignored_layers, layer_pruning_ratios=layer_pruning_ratios, round_to=round_to,
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


