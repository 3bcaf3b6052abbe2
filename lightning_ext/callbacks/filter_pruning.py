"""Structured filter pruning that removes channels physically: the shared engine and the base callback.

The functional core works on any ``nn.Module`` without a Trainer:

- :func:`prunable_filter_groups` lists the groups of coupled channels Torch-Pruning's dependency graph finds
  (a conv's filters together with its BatchNorm, the next layers' input channels, every conv that writes into
  the same residual sum, depthwise convs, concatenations);
- :func:`plan_filter_pruning` turns per-filter importance scores and a target (a channel ratio or a MACs
  reduction) into a plan: which channels each group loses;
- :func:`apply_pruning_history` removes those channels (also used to replay a checkpoint's history);
- :func:`prune_filters` plans, checks the plan on a copy, then applies it;
- :func:`load_pruned_checkpoint` loads a checkpoint of a pruned run into a fresh (dense) model;
- :func:`count_macs_params`, :func:`measure_latency` and :func:`rebuild_optimizers` (after pruning inside
  ``fit``: new optimizers on the new parameters, LR schedule carried over).

:class:`FilterPruning` is the Lightning wrapper with pluggable importance (:meth:`FilterPruning.filter_scores`);
:class:`~lightning_ext.callbacks.beta_rank_pruning.BetaRankPruning`,
:class:`~lightning_ext.callbacks.l1_filter_pruning.L1FilterPruning` and
:class:`~lightning_ext.callbacks.random_filter_pruning.RandomFilterPruning` subclass it.
"""

from __future__ import annotations

import copy
import difflib
import fnmatch
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_ext._optional import require

HISTORY_VERSION = 1
_STATE_MARKER = "filter_pruning_version"
_APPLIED_ATTR = "_lightning_ext_pruning_applied"  # list of the op lists already applied to a model, in order
_SHARDING_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy", "XLAFSDPStrategy")

Scores = dict[str, torch.Tensor]
Op = list  # [layer_name: str, is_out_channel_pruning: bool, indices: list[int]] (Torch-Pruning's history format)


class PruningError(ValueError):
    """A pruning target or model that cannot be pruned as asked; the message says what to change."""


# -- small helpers ---------------------------------------------------------------------------------------------


def _tp():
    return require("torch_pruning", "filter pruning")


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode and restore each one's own flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


@contextmanager
def _track_modules(model: nn.Module) -> Iterator[list[str]]:
    """Record the stack of modules being executed; after an exception, its last entry is the failing layer."""
    names = {m: n for n, m in model.named_modules()}
    stack: list[str] = []
    failed: list[str] = []

    def pre(module, args):
        stack.append(names.get(module, ""))

    def post(module, args, output):
        if stack:
            stack.pop()

    handles = [m.register_forward_pre_hook(pre) for m in model.modules()]
    handles += [m.register_forward_hook(post) for m in model.modules()]
    try:
        yield failed
    except BaseException:
        failed.extend(stack)
        raise
    finally:
        for h in handles:
            h.remove()


def _describe(model: nn.Module, name: str) -> str:
    if not name:
        return f"the forward of {type(model).__name__} itself"
    return f"layer {name!r} ({type(model.get_submodule(name)).__name__})"


def _forward(model: nn.Module, example_inputs: Any) -> Any:
    if isinstance(example_inputs, dict):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    return model(example_inputs)


def _output_shapes(output: Any) -> Any:
    if isinstance(output, torch.Tensor):
        return tuple(output.shape)
    if isinstance(output, (tuple, list)):
        return [_output_shapes(o) for o in output]
    if isinstance(output, dict):
        return {k: _output_shapes(v) for k, v in output.items()}
    return type(output).__name__


def _conv_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def resolve_layer_names(model: nn.Module, patterns: Optional[Sequence[str]], what: str = "ignored_layers") -> list[str]:
    """Module names of ``model`` matched by ``patterns`` (exact names or shell patterns such as ``net.layer4.*``).

    Raises:
        PruningError: a pattern that matches no module, with the closest names.
    """
    names = [n for n, _ in model.named_modules() if n]
    out: list[str] = []
    for pattern in patterns or []:
        if not isinstance(pattern, str):
            raise PruningError(f"`{what}` takes module names (strings), got {pattern!r}.")
        hits = [n for n in names if n == pattern or fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            close = difflib.get_close_matches(pattern, names, n=4)
            raise PruningError(
                f"`{what}` names {pattern!r}, but {type(model).__name__} has no such module."
                + (f" Close names: {', '.join(close)}." if close else "")
                + " Names are relative to the module being pruned (for a LightningModule, e.g. 'net.fc')."
            )
        out += [h for h in hits if h not in out]
    return out


# -- dependency groups ----------------------------------------------------------------------------------------


@dataclass
class FilterGroup:
    """Output channels that must be removed together.

    Attributes:
        root: name of the conv whose output channels root the group (what a plan names).
        channels: number of channels in the group now.
        members: ``(conv_name, local_indices, root_indices)`` for every conv whose *filters* (output channels)
            belong to the group: residual partners, depthwise convs; ``local_indices[i]`` of that conv is
            channel ``root_indices[i]`` of the group.
    """

    root: str
    channels: int
    members: list[tuple[str, list[int], list[int]]] = field(default_factory=list)

    def member_names(self) -> list[str]:
        return [m[0] for m in self.members]


def build_dependency_graph(model: nn.Module, example_inputs: Any):
    """Trace ``model`` with Torch-Pruning (eval mode, autograd on); name the failing layer if tracing fails."""
    tp = _tp()
    try:
        with _eval_mode(model), torch.enable_grad(), _track_modules(model) as failed:
            return tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs, verbose=False)
    except Exception as err:  # noqa: BLE001 - re-raised with the layer and the fix
        where = _describe(model, failed[-1]) if failed else "the model"
        raise PruningError(
            f"Torch-Pruning's dependency graph cannot trace {type(model).__name__}: {type(err).__name__}: {err} "
            f"(raised in {where}). Check that the example inputs fit the model; if this layer is a custom op, put "
            f"it (or the convs that feed it) in `ignored_layers`."
        ) from err


def _output_modules(model: nn.Module, example_inputs: Any) -> set:
    """Submodules whose output tensor is (part of) the model's output: their channels must stay."""
    produced: dict[int, nn.Module] = {}

    def hook(module, args, output):
        if isinstance(output, torch.Tensor):
            produced[id(output)] = module

    handles = [m.register_forward_hook(hook) for m in model.modules() if m is not model]
    try:
        with _eval_mode(model), torch.no_grad():
            out = _forward(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
    flat, stack = [], [out]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            flat.append(item)
        elif isinstance(item, (tuple, list)):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
    return {produced[id(t)] for t in flat if id(t) in produced}


def _groups_from_graph(model: nn.Module, dg, ignored: Sequence[str], example_inputs: Any) -> list[FilterGroup]:
    tp = _tp()
    names = {m: n for n, m in model.named_modules()}
    ignored_modules = [model.get_submodule(n) for n in ignored]
    at_output = _output_modules(model, example_inputs)
    groups = []
    for group in dg.get_all_groups(ignored_layers=ignored_modules, root_module_types=[nn.Conv2d]):
        # removing these channels would change the model's output shape (a conv classifier head)
        if any(dep.target.type == tp.ops.OPTYPE.OUTPUT or (dep.target.module in at_output and
               dg.is_out_channel_pruning_fn(dep.handler)) for dep, _ in group):
            continue
        root_module = group[0].dep.target.module
        members = []
        for item in group:
            dep, idxs = item.dep, item.idxs
            module = dep.target.module
            if isinstance(module, nn.Conv2d) and dg.is_out_channel_pruning_fn(dep.handler):
                members.append((names[module], [int(i) for i in idxs], [int(i) for i in item.root_idxs]))
        groups.append(FilterGroup(names[root_module], len(group[0].idxs), members))
    position = {n: i for i, (n, _) in enumerate(model.named_modules())}
    return sorted(groups, key=lambda g: position[g.root])  # definition order: readable plans and logs


def prunable_filter_groups(
    model: nn.Module, example_inputs: Any, ignored_layers: Optional[Sequence[str]] = None
) -> list[FilterGroup]:
    """The groups of coupled conv filters of ``model`` that can be pruned, in a deterministic order.

    A group whose channels reach the model's output (a conv classifier head) is left out, and so is a group
    that contains a conv named (or matched by a pattern) in ``ignored_layers``.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3),
        ...                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
        >>> [(g.root, g.channels) for g in prunable_filter_groups(net, torch.zeros(1, 1, 8, 8))]
        [('0', 8), ('3', 4)]
        >>> [g.root for g in prunable_filter_groups(net, torch.zeros(1, 1, 8, 8), ignored_layers=["3"])]
        ['0']
    """
    ignored = resolve_layer_names(model, ignored_layers)
    return _groups_from_graph(model, build_dependency_graph(model, example_inputs), ignored, example_inputs)


def group_scores(group: FilterGroup, scores: Scores) -> torch.Tensor:
    """One score per channel of ``group``: the mean, over the group's convs that have scores, of their filters'.

    Raises:
        PruningError: when no conv of the group has scores.
    """
    total = torch.zeros(group.channels, dtype=torch.float64)
    count = torch.zeros(group.channels, dtype=torch.float64)
    for name, local, root in group.members:
        if name not in scores:
            continue
        s = torch.as_tensor(scores[name]).detach().to("cpu", torch.float64).flatten()
        if s.numel() <= max(local):
            raise PruningError(
                f"Scores for {name!r} have {s.numel()} entries but the layer has at least {max(local) + 1} filters."
            )
        total.index_add_(0, torch.tensor(root), s[torch.tensor(local)])
        count.index_add_(0, torch.tensor(root), torch.ones(len(root), dtype=torch.float64))
    if not bool((count > 0).any()):
        raise PruningError(
            f"No importance scores for the filter group rooted at {group.root!r} (convs {group.member_names()}); "
            "the score function must return one tensor per conv name."
        )
    if not torch.isfinite(total).all():
        raise PruningError(f"Importance scores of the group rooted at {group.root!r} are not finite.")
    return total / count.clamp(min=1)


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


def count_macs_params(model: nn.Module, example_inputs: Any) -> tuple[int, int]:
    """Multiply-accumulates of one forward pass on ``example_inputs`` and the number of parameters.

    Uses ``torch_pruning.utils.count_ops_and_params`` on a copy in eval mode (the model is left untouched).

    Example:
        >>> count_macs_params(nn.Conv2d(1, 4, 3, bias=False), torch.zeros(1, 1, 5, 5))  # 4 filters x 9 x 3x3
        (324, 36)
    """
    tp = _tp()
    with _eval_mode(model), torch.no_grad():
        macs, params = tp.utils.count_ops_and_params(model, example_inputs)
    return int(macs), int(params)


def measure_latency(
    model: nn.Module, inputs: Any, warmup: int = 3, repeats: int = 10, num_threads: Optional[int] = None
) -> float:
    """Median wall time, in seconds, of one forward pass on ``inputs`` in eval mode under ``inference_mode``.

    Args:
        model: the model (left in its own training mode afterwards).
        inputs: what the model is called with (a tensor, a tuple of positional inputs or a dict).
        warmup: untimed passes first.
        repeats: timed passes; the median is returned.
        num_threads: set ``torch.set_num_threads`` for the measurement (restored afterwards).

    Example:
        >>> measure_latency(nn.Linear(8, 2), torch.zeros(4, 8), warmup=1, repeats=3) > 0
        True
    """
    if repeats < 1:
        raise ValueError(f"`repeats` must be >= 1, got {repeats}.")
    threads = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    times = []
    try:
        with _eval_mode(model), torch.inference_mode():
            for i in range(warmup + repeats):
                start = time.perf_counter()
                _forward(model, inputs)
                if i >= warmup:
                    times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    times.sort()
    return times[len(times) // 2]


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
        with _eval_mode(model), torch.no_grad(), _track_modules(model) as failed:
            out = _forward(model, example_inputs)
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
    with _eval_mode(model), torch.no_grad():
        expected = _output_shapes(_forward(model, example_inputs))
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
    with _eval_mode(model), torch.no_grad():
        expected = _output_shapes(_forward(model, example_inputs))

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


# -- checkpoints ----------------------------------------------------------------------------------------------


def _mark_applied(model: nn.Module, ops: Sequence[Op]) -> None:
    applied = list(getattr(model, _APPLIED_ATTR, []))
    applied.append([list(op) for op in ops])
    object.__setattr__(model, _APPLIED_ATTR, applied)


def applied_pruning_steps(model: nn.Module) -> list[list[Op]]:
    """The pruning steps (each a list of ops) already applied to ``model`` by this library, in order."""
    return list(getattr(model, _APPLIED_ATTR, []))


def pruning_steps_from_checkpoint(checkpoint: dict) -> list[dict]:
    """Every pruning step saved in a Lightning checkpoint dict by any :class:`FilterPruning`, in applied order."""
    steps = []
    for state in (checkpoint.get("callbacks") or {}).values():
        if isinstance(state, dict) and state.get(_STATE_MARKER):
            steps += state.get("steps", [])
    return sorted(steps, key=lambda s: s["order"])


def _example_from_step(step: dict, device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    dtype = getattr(torch, step.get("input_dtype", "float32"))
    return torch.zeros(tuple(step["input_shape"]), dtype=dtype, device=device)


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def replay_pruning_steps(model: nn.Module, steps: Sequence[dict]) -> int:
    """Bring ``model`` to the shape after ``steps`` (from :func:`pruning_steps_from_checkpoint`).

    Steps the model already went through (:func:`applied_pruning_steps`) are skipped. Returns how many steps
    were applied now.

    Raises:
        PruningError: when the model has been pruned further than, or differently from, ``steps``
            (channels removed physically cannot be restored).
    """
    wanted = [[[str(n), bool(o), [int(i) for i in idx]] for n, o, idx in s["ops"]] for s in steps]
    done = applied_pruning_steps(model)
    if wanted[: len(done)] != done:
        if done[: len(wanted)] == wanted:
            raise PruningError(
                f"The checkpoint was saved after {len(wanted)} pruning step(s), but this model has already been "
                f"pruned {len(done)} step(s); removed channels cannot be restored. Load the checkpoint into a "
                "fresh model with `load_pruned_checkpoint`, or evaluate the final weights (ckpt_path='last' / None)."
            )
        raise PruningError(
            "The checkpoint's pruning history differs from the pruning already applied to this model; load it "
            "into a fresh model with `load_pruned_checkpoint`."
        )
    device = _model_device(model)
    for step, ops in zip(steps[len(done):], wanted[len(done):]):
        apply_pruning_history(model, ops, _example_from_step(step, device))
        _mark_applied(model, ops)
    return len(wanted) - len(done)


def _strip_prefix_for(model: nn.Module, names: Sequence[str]) -> str:
    """The prefix (e.g. ``'net.'``) to strip from checkpoint names so that they name modules of ``model``."""
    if not names:
        return ""
    own = {n for n, _ in model.named_modules()}
    candidates = [""] + sorted({n.split(".")[0] + "." for n in names if "." in n})
    for prefix in candidates:
        if all(n.startswith(prefix) and n[len(prefix):] in own for n in names):
            return prefix
    missing = [n for n in names if n not in own][:3]
    raise PruningError(
        f"The checkpoint prunes layers {missing} that {type(model).__name__} does not have (also without a "
        "leading 'net.'-style prefix); build the same architecture the checkpoint was trained with."
    )


def load_pruned_checkpoint(
    model: nn.Module, path: Union[str, os.PathLike], strict: bool = True, map_location: Union[str, torch.device] = "cpu"
) -> nn.Module:
    """Load a Lightning checkpoint of a pruned run into a freshly built (dense) ``model`` for inference.

    The checkpoint is read with ``torch.load(weights_only=True)``; the pruning steps saved by the
    :class:`FilterPruning` callbacks are replayed on ``model`` (removing the same channels), then the weights
    are loaded. ``model`` may be the LightningModule that was trained or the bare network it wraps (the
    ``net.`` prefix is detected and stripped).

    Example:
        >>> from lightning_ext.modules import ImageClassifier  # doctest: +SKIP
        >>> model = load_pruned_checkpoint(ImageClassifier("resnet10t", image_size=28), "last.ckpt")  # doctest: +SKIP
    """
    checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise PruningError(f"{path} is not a Lightning checkpoint (no 'state_dict'); save it with a Trainer.")
    steps = pruning_steps_from_checkpoint(checkpoint)
    names = [op[0] for s in steps for op in s["ops"]]
    prefix = _strip_prefix_for(model, names)
    if prefix:
        steps = [dict(s, ops=[[op[0][len(prefix):], op[1], op[2]] for op in s["ops"]]) for s in steps]
    replay_pruning_steps(model, steps)
    state = checkpoint["state_dict"]
    if prefix:
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    elif not steps and not any(k in model.state_dict() for k in state):  # dense checkpoint, bare network
        own = model.state_dict()
        for p in sorted({k.split(".")[0] + "." for k in state if "." in k}):
            if any(k[len(p):] in own for k in state if k.startswith(p)):
                state = {k[len(p):]: v for k, v in state.items() if k.startswith(p)}
                break
    model.load_state_dict(state, strict=strict)
    return model


class _ReplayBeforeWeightsLoad:
    """Installed as ``pl_module.on_load_checkpoint``: replays the checkpoint's pruning history before Lightning
    loads the weights (Lightning calls this hook right before ``load_state_dict``, for fit, validate, test and
    predict with ``ckpt_path``), then calls the module's own hook."""

    def __init__(self, module: LightningModule) -> None:
        self.module = module
        self.original = type(module).on_load_checkpoint.__get__(module)

    def __call__(self, checkpoint: dict) -> None:
        replay_pruning_steps(self.module, pruning_steps_from_checkpoint(checkpoint))
        self.original(checkpoint)


def _install_replay_hook(pl_module: LightningModule) -> None:
    if not isinstance(pl_module.__dict__.get("on_load_checkpoint"), _ReplayBeforeWeightsLoad):
        object.__setattr__(pl_module, "on_load_checkpoint", _ReplayBeforeWeightsLoad(pl_module))


def _remove_replay_hook(pl_module: LightningModule) -> None:
    if isinstance(pl_module.__dict__.get("on_load_checkpoint"), _ReplayBeforeWeightsLoad):
        del pl_module.__dict__["on_load_checkpoint"]


# -- optimizers and DDP ---------------------------------------------------------------------------------------


def rebuild_optimizers(trainer: Trainer) -> None:
    """Re-create the optimizers and LR schedulers on the model's current parameters, keeping the schedule.

    After channels are removed physically the optimizer still holds the old tensors and would silently train
    nothing. This reruns ``configure_optimizers`` (``trainer.strategy.setup_optimizers``), then copies every
    optimizer's per-group hyper-parameters (``lr``, ``initial_lr``, momentum, ...) and every scheduler's state
    (``last_epoch``, ...) from the old objects, so the LR schedule continues where it was. Optimizer state
    such as momentum buffers starts afresh (its tensors had the old shapes).
    """
    strategy = trainer.strategy
    old_groups = [[{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
                  for opt in strategy.optimizers]
    old_scheds = [cfg.scheduler.state_dict() for cfg in strategy.lr_scheduler_configs]
    strategy.setup_optimizers(trainer)
    for opt, groups in zip(strategy.optimizers, old_groups):
        if len(opt.param_groups) != len(groups):
            rank_zero_warn(
                "configure_optimizers returned a different number of parameter groups after pruning; the "
                "hyper-parameters of the old groups were not carried over."
            )
            continue
        for group, old in zip(opt.param_groups, groups):
            group.update(old)
    if len(strategy.lr_scheduler_configs) == len(old_scheds):
        for cfg, state in zip(strategy.lr_scheduler_configs, old_scheds):
            cfg.scheduler.load_state_dict(state)
    else:
        rank_zero_warn("configure_optimizers returned a different number of LR schedulers after pruning; "
                       "their state was not carried over.")


def _rewrap_ddp(trainer: Trainer) -> None:
    """Wrap the (re-shaped) module in a new DistributedDataParallel: DDP registers parameters at wrap time."""
    from torch.nn.parallel import DistributedDataParallel

    strategy = trainer.strategy
    if not isinstance(strategy.model, DistributedDataParallel):
        return
    inner = strategy.model.module
    strategy.model = None  # drop the old reducer (and its autograd hooks) before building the new one
    import gc

    gc.collect()
    strategy.model = strategy._setup_model(inner)
    if hasattr(strategy, "_register_ddp_hooks"):
        strategy._register_ddp_hooks()


# -- the callback ---------------------------------------------------------------------------------------------


def _batch_inputs(batch: Any) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    if isinstance(batch, dict):
        for key in ("x", "input", "inputs", "image", "images", "pixel_values"):
            if isinstance(batch.get(key), torch.Tensor):
                return batch[key]
    raise PruningError(
        f"Cannot find the model inputs in a training batch of type {type(batch).__name__}; batches must be a "
        "tensor, a tuple/list whose first item is the input tensor, or a dict with key 'x'. Otherwise subclass "
        "the callback and override `batch_inputs`."
    )


class FilterPruning(Callback):
    """Base callback: remove the least important conv filters physically, once or every N epochs, during fit.

    Subclasses supply the importance (:meth:`filter_scores`). At the start of each scheduled epoch the
    callback scores every conv filter, decides on rank 0 which channels each coupled group loses (broadcast to
    all ranks), removes them with Torch-Pruning's dependency graph, rebuilds the optimizers on the new
    parameters (the LR schedule continues) and, under DDP, re-wraps the model. The rest of ``fit`` fine-tunes.

    Schedule: steps at epochs ``start_epoch + i * every_n_epochs`` for ``i < num_steps``; after step ``i`` a
    share ``(i + 1) / num_steps`` of the target is reached (channel ratio of the original channels, or MACs
    reduction of the dense model's MACs).

    Checkpoints: the history (which channels were removed, in order) is the callback state. When a checkpoint
    is loaded through the Trainer (resume, ``validate/test(ckpt_path=...)``) it is replayed before the weights
    load; :func:`load_pruned_checkpoint` does the same for inference without a Trainer.

    Logged at each step: ``pruning/macs``, ``pruning/params``, ``pruning/macs_reduction`` and, when
    ``latency_repeats > 0``, ``pruning/latency_ms`` (batch ``latency_batch_size``) and ``pruning/speedup``
    against the dense model. At the end of fit a plot of ``monitor`` against MACs is saved.

    Args:
        ratio: share of each group's channels to remove in total, in (0, 1).
        target_macs_reduction: share of the dense model's MACs to remove in total, in (0, 1).
        start_epoch: epoch of the first step (0 = before any training).
        every_n_epochs: epochs between steps.
        num_steps: number of steps (1 = one-shot).
        ignored_layers: conv names (relative to the LightningModule, e.g. ``net.conv1``; shell patterns allowed)
            whose filters are kept.
        layer_ratios: per-conv channel ratios overriding ``ratio``.
        calibration_batches: training batches the data-aware importances look at (per process).
        round_to: keep a multiple of this many channels in each group (e.g. 8 for faster CPU/GPU kernels).
        monitor: metric plotted against MACs (recorded after each validation).
        latency_batch_size: batch size of the latency measurement.
        latency_repeats: timed forward passes per measurement; 0 skips latency.
        plot_path: where to save the plot (default ``<log_dir>/<ClassName>_accuracy_vs_macs.png``); ``""`` skips it.
        verbose: print a line per step.
    """

    needs_calibration_data: bool = False

    def __init__(
        self,
        ratio: Optional[float] = None,
        target_macs_reduction: Optional[float] = None,
        start_epoch: int = 0,
        every_n_epochs: int = 1,
        num_steps: int = 1,
        ignored_layers: Optional[list[str]] = None,
        layer_ratios: Optional[dict[str, float]] = None,
        calibration_batches: int = 1,
        round_to: int = 1,
        monitor: str = "val_acc",
        latency_batch_size: int = 64,
        latency_repeats: int = 10,
        plot_path: Optional[str] = None,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        if (ratio is None) == (target_macs_reduction is None):
            raise ValueError(
                f"{type(self).__name__}: give exactly one target: `ratio` (share of channels removed) or "
                "`target_macs_reduction` (share of MACs removed)."
            )
        if ratio is not None and not 0 < ratio < 1:
            raise ValueError(f"`ratio` must be in (0, 1) (the share of channels to remove), got {ratio}.")
        if target_macs_reduction is not None and not 0 < target_macs_reduction < 1:
            raise ValueError(f"`target_macs_reduction` must be in (0, 1), got {target_macs_reduction}.")
        if layer_ratios and ratio is None:
            raise ValueError("`layer_ratios` only applies together with `ratio`.")
        for name, r in (layer_ratios or {}).items():
            if not 0 <= r < 1:
                raise ValueError(f"`layer_ratios[{name!r}]` must be in [0, 1), got {r}.")
        if start_epoch < 0:
            raise ValueError(f"`start_epoch` must be >= 0, got {start_epoch}.")
        if every_n_epochs < 1:
            raise ValueError(f"`every_n_epochs` must be >= 1, got {every_n_epochs}.")
        if num_steps < 1:
            raise ValueError(f"`num_steps` must be >= 1 (1 = one-shot), got {num_steps}.")
        if calibration_batches < 1:
            raise ValueError(f"`calibration_batches` must be >= 1, got {calibration_batches}.")
        if round_to < 1:
            raise ValueError(f"`round_to` must be >= 1 (1 = no rounding), got {round_to}.")
        if latency_batch_size < 1:
            raise ValueError(f"`latency_batch_size` must be >= 1, got {latency_batch_size}.")
        if latency_repeats < 0:
            raise ValueError(f"`latency_repeats` must be >= 0 (0 skips latency), got {latency_repeats}.")
        if ignored_layers is not None and (
            isinstance(ignored_layers, str) or not all(isinstance(n, str) for n in ignored_layers)
        ):
            raise ValueError(f"`ignored_layers` must be a list of module names, got {ignored_layers!r}.")
        self.ratio = ratio
        self.target_macs_reduction = target_macs_reduction
        self.start_epoch = start_epoch
        self.every_n_epochs = every_n_epochs
        self.num_steps = num_steps
        self.ignored_layers = list(ignored_layers or [])
        self.layer_ratios = dict(layer_ratios or {})
        self.calibration_batches = calibration_batches
        self.round_to = round_to
        self.monitor = monitor
        self.latency_batch_size = latency_batch_size
        self.latency_repeats = latency_repeats
        self.plot_path = plot_path
        self.verbose = verbose
        self._reset_state()

    def _reset_state(self) -> None:
        self.steps: list[dict] = []
        self.curve: list[dict] = []
        self.dense: dict = {}  # macs, params, latency_ms of the model before the first step
        self.reference_channels: dict[str, int] = {}
        self.input_shape: Optional[list[int]] = None
        self.input_dtype = "float32"

    # -- schedule ---------------------------------------------------------------------------------------------
    @property
    def prune_epochs(self) -> list[int]:
        """The epochs at whose start a step runs."""
        return [self.start_epoch + i * self.every_n_epochs for i in range(self.num_steps)]

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            ratio=self.ratio, target_macs_reduction=self.target_macs_reduction, start_epoch=self.start_epoch,
            every_n_epochs=self.every_n_epochs, num_steps=self.num_steps,
        )

    # -- importance (override) ----------------------------------------------------------------------------
    def filter_scores(
        self, pl_module: LightningModule, inputs: Optional[list[torch.Tensor]], trainer: Trainer
    ) -> Scores:
        """One score per filter for every ``nn.Conv2d`` (name relative to ``pl_module``); higher is kept.

        ``inputs`` are ``calibration_batches`` training inputs of this process when
        :attr:`needs_calibration_data` is set. Statistics must be reduced across processes
        (``trainer.strategy.reduce``) so every rank computes the same scores; the plan is decided on rank 0.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement `filter_scores`.")

    def batch_inputs(self, batch: Any) -> torch.Tensor:
        """The model input of a training batch (the first item of a tuple, or the batch itself)."""
        return _batch_inputs(batch)

    # -- Lightning hooks --------------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        strategy = trainer.strategy
        names = {c.__name__ for c in type(strategy).__mro__}
        refused = names.intersection(_SHARDING_STRATEGIES)
        if refused:
            raise PruningError(
                f"{type(self).__name__} removes channels physically, which needs every process to hold whole "
                f"parameters; {type(strategy).__name__} shards them. Use a single device or strategy='ddp'."
            )
        launcher = getattr(strategy, "launcher", None)
        if stage == "fit" and "_MultiProcessingLauncher" in {c.__name__ for c in type(launcher).__mro__}:
            raise PruningError(
                f"{type(self).__name__} cannot run under strategy='ddp_spawn'/'ddp_fork'/'ddp_notebook': at the end "
                "of fit Lightning copies rank 0's weights back into the main process's model, which still has the "
                "unpruned shapes there. Use strategy='ddp' (one script launched per process), or a single device."
            )
        resolve_layer_names(pl_module, self.ignored_layers)  # early, clear errors for misspelt names
        convs = set(_conv_names(pl_module))
        for name in self.layer_ratios:
            if name not in convs:
                close = difflib.get_close_matches(name, sorted(convs), n=4)
                raise PruningError(f"`layer_ratios` names {name!r}, which is not a Conv2d of the model."
                                   + (f" Close names: {', '.join(close)}." if close else ""))
        max_epochs = trainer.max_epochs if trainer.max_epochs is not None else -1
        if stage == "fit" and max_epochs >= 0 and self.prune_epochs[-1] >= max_epochs:
            rank_zero_warn(
                f"{type(self).__name__}: steps are scheduled at epochs {self.prune_epochs} but the run has "
                f"{max_epochs} epochs, so the target is not reached; lower `start_epoch`/`every_n_epochs`."
            )
        _install_replay_hook(pl_module)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        _remove_replay_hook(pl_module)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        epochs = self.prune_epochs
        while len(self.steps) < self.num_steps and epochs[len(self.steps)] <= trainer.current_epoch:
            self._prune_step(trainer, pl_module)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            return
        macs = self.steps[-1]["macs"] if self.steps else self._dense_stats(trainer, pl_module)["macs"]
        self.curve.append({"epoch": int(trainer.current_epoch), "step": len(self.steps), "macs": int(macs),
                           self.monitor: float(value)})

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.plot_path == "" or not self.curve:
            return
        root = trainer.log_dir or trainer.default_root_dir  # a collective under DDP: every rank calls it
        if not trainer.is_global_zero:
            return
        path = self.plot_path or os.path.join(root, f"{type(self).__name__}_accuracy_vs_macs.png")
        self.save_plot(path)

    def state_dict(self) -> dict[str, Any]:
        return {
            _STATE_MARKER: HISTORY_VERSION, "steps": copy.deepcopy(self.steps), "curve": copy.deepcopy(self.curve),
            "dense": dict(self.dense), "reference_channels": dict(self.reference_channels),
            "input_shape": self.input_shape, "input_dtype": self.input_dtype,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps = list(state_dict.get("steps", []))
        self.curve = list(state_dict.get("curve", []))
        self.dense = dict(state_dict.get("dense", {}))
        self.reference_channels = dict(state_dict.get("reference_channels", {}))
        self.input_shape = state_dict.get("input_shape")
        self.input_dtype = state_dict.get("input_dtype", "float32")

    # -- the step ---------------------------------------------------------------------------------------------
    def _example_inputs(self, trainer: Trainer, pl_module: LightningModule) -> torch.Tensor:
        if self.input_shape is None:
            example = getattr(pl_module, "example_input_array", None)
            if isinstance(example, torch.Tensor):
                x = example[:1]
            elif getattr(pl_module, "input_shape", None) is not None:
                x = torch.zeros(1, *pl_module.input_shape)
            else:
                x = self.batch_inputs(next(iter(self._train_loader(trainer))))[:1]
            self.input_shape = [1, *x.shape[1:]]
            self.input_dtype = str(x.dtype).replace("torch.", "")
        return torch.zeros(self.input_shape, dtype=getattr(torch, self.input_dtype), device=pl_module.device)

    @staticmethod
    def _train_loader(trainer: Trainer) -> Iterable:
        loader = trainer.train_dataloader
        while isinstance(loader, (list, tuple)) and loader:
            loader = loader[0]
        if isinstance(loader, dict) and loader:
            loader = next(iter(loader.values()))
        if loader is None:
            raise PruningError("No training dataloader is available for calibration batches.")
        return loader

    def _calibration_inputs(self, trainer: Trainer, pl_module: LightningModule) -> list[torch.Tensor]:
        inputs = []
        with torch.random.fork_rng(devices=[]):  # iterating a loader must not shift the training RNG stream
            for batch in self._train_loader(trainer):
                inputs.append(self.batch_inputs(batch).to(pl_module.device))
                if len(inputs) >= self.calibration_batches:
                    break
        if not inputs:
            raise PruningError("The training dataloader is empty; calibration needs at least one batch.")
        return inputs

    def _latency_ms(self, trainer: Trainer, pl_module: LightningModule) -> Optional[float]:
        if not self.latency_repeats:
            return None
        value = None
        if trainer.is_global_zero:
            x = self._example_inputs(trainer, pl_module)
            batch = torch.randn(self.latency_batch_size, *x.shape[1:], device=x.device).to(x.dtype)
            value = 1000 * measure_latency(pl_module, batch, warmup=2, repeats=self.latency_repeats)
        return trainer.strategy.broadcast(value, src=0)

    def _dense_stats(self, trainer: Trainer, pl_module: LightningModule) -> dict:
        if not self.dense:
            macs, params = count_macs_params(pl_module, self._example_inputs(trainer, pl_module))
            self.dense = {"macs": macs, "params": params}
        return self.dense

    def _prune_step(self, trainer: Trainer, pl_module: LightningModule) -> None:
        index = len(self.steps)
        start = time.perf_counter()
        example = self._example_inputs(trainer, pl_module)
        dense = self._dense_stats(trainer, pl_module)
        if "latency_ms" not in dense:
            dense["latency_ms"] = self._latency_ms(trainer, pl_module)
        inputs = self._calibration_inputs(trainer, pl_module) if self.needs_calibration_data else None
        scores = self.filter_scores(pl_module, inputs, trainer)
        fraction = (index + 1) / self.num_steps
        payload: Any = None
        if trainer.is_global_zero:
            try:
                if not self.reference_channels:
                    groups = prunable_filter_groups(pl_module, example, self.ignored_layers)
                    self.reference_channels = {g.root: g.channels for g in groups}
                plan = plan_filter_pruning(
                    pl_module, example, scores,
                    ratio=None if self.ratio is None else self.ratio * fraction,
                    target_macs_reduction=(
                        None if self.target_macs_reduction is None else self.target_macs_reduction * fraction
                    ),
                    ignored_layers=self.ignored_layers,
                    layer_ratios={k: v * fraction for k, v in self.layer_ratios.items()},
                    reference_macs=dense["macs"], reference_channels=self.reference_channels,
                    round_to=self.round_to,
                )
                payload = {"ops": plan.ops, "macs": plan.macs_after, "params": plan.params_after,
                           "channels": plan.channels, "reference_channels": self.reference_channels}
            except PruningError as err:
                payload = {"error": str(err)}
        payload = trainer.strategy.broadcast(payload, src=0)
        if "error" in payload:
            raise PruningError(payload["error"])
        self.reference_channels = payload["reference_channels"]
        _apply_ops(pl_module, payload["ops"], example)
        order = len(applied_pruning_steps(pl_module))
        _mark_applied(pl_module, payload["ops"])
        rebuild_optimizers(trainer)
        _rewrap_ddp(trainer)
        latency = self._latency_ms(trainer, pl_module)
        step = {
            "order": order, "epoch": int(trainer.current_epoch), "global_step": int(trainer.global_step),
            "ops": payload["ops"], "macs": int(payload["macs"]), "params": int(payload["params"]),
            "latency_ms": latency, "input_shape": list(self.input_shape), "input_dtype": self.input_dtype,
        }
        self.steps.append(step)
        metrics = {
            "pruning/macs": float(step["macs"]), "pruning/params": float(step["params"]),
            "pruning/macs_reduction": 1.0 - step["macs"] / dense["macs"],
        }
        if latency is not None and dense.get("latency_ms"):
            metrics["pruning/latency_ms"] = latency
            metrics["pruning/speedup"] = dense["latency_ms"] / latency
        pl_module.log_dict(metrics, on_step=False, on_epoch=True, sync_dist=True)  # equal on all ranks
        if self.verbose:
            kept = sum(after for _, after in payload["channels"].values())
            total = sum(before for before, _ in payload["channels"].values())
            lat = ""
            if latency is not None and dense.get("latency_ms"):
                lat = f", latency {latency:.2f} ms (dense {dense['latency_ms']:.2f})"
            rank_zero_info(
                f"{type(self).__name__} step {index + 1}/{self.num_steps} at epoch {trainer.current_epoch}: "
                f"{total - kept} of {total} prunable channels removed; MACs {step['macs'] / 1e6:.2f}M "
                f"({metrics['pruning/macs_reduction']:.1%} below dense), params {step['params'] / 1e6:.3f}M{lat} "
                f"[{time.perf_counter() - start:.1f} s]"
            )

    # -- results ----------------------------------------------------------------------------------------------
    def save_plot(self, path: str) -> str:
        """Plot the recorded ``monitor`` values against MACs (one point per validation) and save a PNG."""
        require("matplotlib", "the pruning plot")
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fig, ax = plt.subplots(figsize=(5, 3.5))
        macs = [p["macs"] / 1e6 for p in self.curve]
        vals = [p[self.monitor] for p in self.curve]
        ax.plot(macs, vals, "-o", color="tab:blue")
        for p, x, y in zip(self.curve, macs, vals):
            ax.annotate(f"e{p['epoch']}", (x, y), fontsize=7, textcoords="offset points", xytext=(3, 3))
        if self.dense:
            ax.axvline(self.dense["macs"] / 1e6, color="grey", ls=":", label="dense MACs")
            ax.legend(fontsize=8)
        ax.set_xlabel("MACs per sample (M)")
        ax.set_ylabel(self.monitor)
        ax.set_title(f"{type(self).__name__}: {self.monitor} vs MACs", fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path
