"""Which conv filters can be removed together: Torch-Pruning's dependency graph turned into filter groups.

A :class:`FilterGroup` is one set of coupled output channels (a conv's filters with its BatchNorm, the next
layers' input channels, every conv that writes into the same residual sum, depthwise convs, concatenations).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import nn

from lightning_ext.core.layers import resolve_layer_names as _resolve_layer_names
from lightning_ext.core.measure import call_model, eval_mode
from lightning_ext.core.optional import require

Scores = dict[str, torch.Tensor]
Op = list  # [layer_name: str, is_out_channel_pruning: bool, indices: list[int]] (Torch-Pruning's history format)


class PruningError(ValueError):
    """A pruning target or model that cannot be pruned as asked; the message says what to change."""


def _tp():
    return require("torch_pruning", "filter pruning")


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
    """Module names of ``model`` matched by ``patterns`` (exact names or shell patterns such as ``net.layer4.*``):
    :func:`lightning_ext.core.layers.resolve_layer_names`, raising :class:`PruningError`.

    Example:
        >>> resolve_layer_names(nn.Sequential(nn.Conv2d(1, 2, 1), nn.ReLU()), ["0"])
        ['0']
    """
    return _resolve_layer_names(model, patterns, what, error=PruningError)


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
        tied: when the group's channels are input or output channels of a grouped, non-depthwise conv
            (``1 < groups``), the sets of group channels that must go together (the same local channel of every
            conv group); ``None`` when each channel can go alone.
        refusal: why no channel of the group can be removed (a grouped conv sees only part of it), or ``None``.
    """

    root: str
    channels: int
    members: list[tuple[str, list[int], list[int]]] = field(default_factory=list)
    tied: Optional[list[list[int]]] = None
    refusal: Optional[str] = None

    def member_names(self) -> list[str]:
        return [m[0] for m in self.members]


def build_dependency_graph(model: nn.Module, example_inputs: Any):
    """Trace ``model`` with Torch-Pruning (eval mode, autograd on); name the failing layer if tracing fails."""
    tp = _tp()
    try:
        with eval_mode(model), torch.enable_grad(), _track_modules(model) as failed:
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
        with eval_mode(model), torch.no_grad():
            out = call_model(model, example_inputs)
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


def is_grouped_conv(module: nn.Module) -> bool:
    """A grouped conv that is not depthwise (``1 < groups`` and not ``groups == in == out``): its channels can only
    be removed as the same local channel of every conv group."""
    return (isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1
            and not module.groups == module.in_channels == module.out_channels)


def _tie_grouped_channels(group: FilterGroup, items: list, names: dict, is_out) -> None:
    """Fill ``group.tied``/``group.refusal`` from the grouped convs among the dependency ``items``."""
    parent = list(range(group.channels))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    grouped = False
    for item in items:
        module = item.dep.target.module
        if module not in names or not is_grouped_conv(module):
            continue
        grouped = True
        out = is_out(item.dep.handler)
        size = module.out_channels if out else module.in_channels
        block = size // module.groups
        idxs, root = [int(i) for i in item.idxs], [int(i) for i in item.root_idxs]
        if len(set(idxs)) != size:
            group.refusal = (
                f"The filter group rooted at {group.root!r} holds only {len(set(idxs))} of the {size} "
                f"{'output' if out else 'input'} channels of grouped conv {names[module]!r} (groups={module.groups}), "
                f"so removing any would split its groups unevenly; add {group.root!r} to `ignored_layers`."
            )
            continue
        first: dict[int, int] = {}
        for i, r in zip(idxs, root):
            j = i % block
            if j in first:
                parent[find(r)] = find(first[j])
            else:
                first[j] = r
    if grouped:
        components: dict[int, list[int]] = {}
        for i in range(group.channels):
            components.setdefault(find(i), []).append(i)
        group.tied = sorted(components.values())


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
        filter_group = FilterGroup(names[root_module], len(group[0].idxs), members)
        _tie_grouped_channels(filter_group, list(group), names, dg.is_out_channel_pruning_fn)
        groups.append(filter_group)
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


# -- checks of one removal (used by the plan on trial copies) ---------------------------------------------------


def _check_grouped_alignment(group: Any, names: dict, is_out: Any, name: str) -> None:
    """Refuse a removal that would split a grouped (non-depthwise) conv's groups unevenly."""
    for item in group.items:
        module = item.dep.target.module
        if module not in names or not is_grouped_conv(module):
            continue
        out = is_out(item.dep.handler)
        size = module.out_channels if out else module.in_channels
        block = size // module.groups
        idxs = {int(i) for i in item.idxs}
        if idxs != {g * block + j for g in range(module.groups) for j in {i % block for i in idxs}}:
            raise PruningError(
                f"Removing channels {sorted(idxs)[:8]}{'...' if len(idxs) > 8 else ''} of {name!r} would split the "
                f"{module.groups} groups of grouped conv {names[module]!r} unevenly ({'output' if out else 'input'} "
                f"channels); remove the same local channels in every conv group, or add {name!r} to `ignored_layers`."
            )


def _flat_outputs(model: nn.Module, example_inputs: Any) -> list[torch.Tensor]:
    with eval_mode(model), torch.no_grad():
        stack, flat = [call_model(model, example_inputs)], []
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            flat.append(item.detach().float())
        elif isinstance(item, (tuple, list)):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
    return flat


def _max_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> Optional[float]:
    """Largest difference relative to the outputs' scale (``None`` when the shapes differ)."""
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return None
    scale = max([1.0] + [float(y.abs().max()) for y in b if y.numel()])
    return max([0.0] + [float((x - y).abs().max()) for x, y in zip(a, b) if x.numel()]) / scale


def _consumer_masks(group: Any, names: dict, is_out: Any) -> Optional[list[tuple[torch.Tensor, Any]]]:
    """``(weight, index)`` slices that zero the removed channels where they are consumed (``None``: a consumer
    this check cannot mask, or a norm that mixes channels)."""
    masks = []
    for item in group.items:
        module, idxs = item.dep.target.module, [int(i) for i in item.idxs]
        if module not in names:
            continue
        if isinstance(module, (nn.GroupNorm, nn.LayerNorm)):
            return None
        if is_out(item.dep.handler) or isinstance(module, (nn.modules.batchnorm._NormBase, nn.PReLU)):
            continue
        if isinstance(module, nn.Linear):
            masks.append((module.weight, (slice(None), idxs)))
        elif isinstance(module, nn.modules.conv._ConvNd) and module.groups == 1:
            masks.append((module.weight, (idxs,) if module.transposed else (slice(None), idxs)))
        elif isinstance(module, nn.modules.conv._ConvNd) and not module.transposed and not is_grouped_conv(module):
            masks.append((module.weight, (idxs,)))  # depthwise
        elif isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
            block_in, block_out = module.in_channels // module.groups, module.out_channels // module.groups
            for i in idxs:
                g = i // block_in
                masks.append((module.weight, (slice(g * block_out, (g + 1) * block_out), i % block_in)))
        else:
            return None
    return masks


def _removed_filters_are_zero(group: Any, names: dict, is_out: Any) -> bool:
    """Whether every conv/linear whose filters (output channels) the removal takes has zero weights there."""
    found = False
    for item in group.items:
        module = item.dep.target.module
        if module not in names or not is_out(item.dep.handler):
            continue
        if isinstance(module, nn.modules.conv._ConvNd) and module.transposed and module.groups > 1:
            return False
        if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
            dim = 1 if getattr(module, "transposed", False) else 0
            idxs = torch.tensor([int(i) for i in item.idxs], device=module.weight.device)
            if bool(module.weight.detach().index_select(dim, idxs).any()):
                return False
            found = True
    return found
