"""Activate-while-Pruning (AP), the pure core: the dead-neuron rate, the AP step and a model's cost.

Paper: Liu, Ghosh, Tan, Motani, "AP: Selective Activation for De-sparsifying Pruned Neural Networks" (TMLR 2023),
arXiv 2212.06145. Reference code: https://github.com/Martin1937/Activate-While-Pruning. The step removes, among
the surviving weights with :math:`\\theta_{end} < 0`, those that moved least during the cycle,
:math:`S = \\operatorname{top}_k^{\\min} |\\theta_{end} - \\theta_{start}|`, which lowers the dynamic
dead-neuron rate of ReLU networks.

- :func:`dead_neuron_rate`: the dynamic dead-neuron rate (DNR) of a model's ReLUs on a batch;
- :func:`ap_prune_step`: the AP step on dictionaries of weights and masks;
- :func:`model_cost`: parameters, MACs (dense and non-zero, :mod:`lightning_ext.core.measure`'s convention) and
  measured latency of a model on a batch;
- :func:`kept_slices`: which slices of a layer's weight survived the recorded channel removals
  (:func:`~lightning_ext.compression.plan.recorded_channel_changes`).

No Trainer needed; the Lightning wrapper is
:class:`~lightning_ext.compression.activating_while_pruning.ActivatingWhilePruning`.

Example:
    >>> start = {"w": torch.tensor([-1.0, -1.0, 2.0])}
    >>> end = {"w": torch.tensor([-1.5, -1.1, 2.5])}
    >>> ap_prune_step(start, end, {"w": torch.ones(3, dtype=torch.bool)}, amount=1)["w"].tolist()
    [True, False, True]
"""

from __future__ import annotations

import warnings
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from lightning_ext.core.measure import count_macs_params, layer_macs, measure_latency
from lightning_ext.core.validation import check_number

__all__ = ["activation_coverage", "ap_prune_step", "dead_neuron_rate", "kept_slices", "model_cost"]

RELU_TYPES = (nn.ReLU, nn.ReLU6)
PRUNABLE_TYPES = (nn.Linear, nn.modules.conv._ConvNd)


_RELU_FUNCS = (F.relu, F.relu_, F.relu6, torch.relu, torch.relu_, Tensor.relu, Tensor.relu_)
_OTHER_ACTIVATIONS = {
    F.gelu: "gelu", F.silu: "silu", F.hardswish: "hardswish", F.mish: "mish", F.elu: "elu", F.selu: "selu",
    F.celu: "celu", F.leaky_relu: "leaky_relu", F.softplus: "softplus", F.prelu: "prelu",
}


class _ActivationCounter(TorchFunctionMode):
    """Counts ReLU outputs (``nn.ReLU``/``nn.ReLU6`` modules, ``F.relu``, ``torch.relu``, ``Tensor.relu``, ``F.relu6``,
    ``F.hardtanh(min_val=0)``) and other activation calls, named by the module whose forward made the call."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.names = {m: n for n, m in model.named_modules()}
        self.stack: list[list] = []  # [module name, relu calls so far]
        self.counts: dict[str, list[int]] = {}
        self.other: dict[str, int] = {}

    def pre(self, module, args) -> None:
        self.stack.append([self.names.get(module, ""), 0, module])

    def post(self, module, args, output) -> None:
        if self.stack:
            self.stack.pop()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        relu = func in _RELU_FUNCS or (func is F.hardtanh and float(
            kwargs.get("min_val", args[1] if len(args) > 1 else -1.0)) == 0.0)
        if relu and isinstance(out, Tensor):
            frame = self.stack[-1] if self.stack else ["", 0, None]
            name = frame[0] if isinstance(frame[2], RELU_TYPES) else f"{frame[0] or '<model>'}:relu{frame[1]}"
            frame[1] += 1
            count = self.counts.setdefault(name, [0, 0])
            count[0] += int((out <= 0).sum())
            count[1] += out.numel()
        elif func in _OTHER_ACTIVATIONS:
            self.other[_OTHER_ACTIVATIONS[func]] = self.other.get(_OTHER_ACTIVATIONS[func], 0) + 1
        return out


def _count_activations(model: nn.Module, inputs: Tensor) -> _ActivationCounter:
    counter = _ActivationCounter(model)
    handles = [m.register_forward_pre_hook(counter.pre) for m in model.modules()]
    handles += [m.register_forward_hook(counter.post) for m in model.modules()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), counter:
            model(inputs)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return counter


def activation_coverage(model: nn.Module, inputs: Tensor) -> dict:
    """What :func:`dead_neuron_rate` measures on ``model``: ``relu`` (ReLU applications measured, modules and
    functional calls), ``other`` (``{kind: calls}`` of other activations it cannot measure, e.g. ``silu``) and
    ``prunable`` (the model's Linear/Conv layers).

    Example:
        >>> activation_coverage(nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1)), torch.zeros(1, 2))
        {'relu': 1, 'other': {}, 'prunable': 2}
    """
    counter = _count_activations(model, inputs)
    prunable = sum(isinstance(m, PRUNABLE_TYPES) for m in model.modules())
    return {"relu": len(counter.counts), "other": dict(counter.other), "prunable": prunable}


def dead_neuron_rate(
    model: nn.Module,
    inputs: Tensor,
    modules: Optional[Union[dict[str, nn.Module], list[nn.Module]]] = None,
    per_layer: bool = False,
) -> Union[float, dict[str, float]]:
    r"""Dynamic dead-neuron rate: the share of (sample, ReLU unit) pairs whose ReLU output is zero.

    .. math:: \mathrm{DNR} = \frac{1}{\sum_l N U_l} \sum_l \sum_{n=1}^{N} \sum_{u=1}^{U_l}
              \mathbb{1}\left[\mathrm{ReLU}(z_{l,u}(x_n)) = 0\right]

    where ``U_l`` counts every output element of ReLU ``l`` for one sample (channel x position for conv
    features). The paper (Liu et al., arXiv 2212.06145) calls the rate *dynamic* because it depends on the
    input and changes during optimisation. It is measured here on the given batch at every ReLU the forward
    pass applies: ``nn.ReLU``/``nn.ReLU6`` modules and functional calls (``F.relu``, ``torch.relu``,
    ``x.relu()``, ``F.relu6``), seen through a ``TorchFunctionMode`` (a ReLU applied twice counts twice; per layer,
    a functional call is named ``<calling module>:relu<k>``). Other activations (SiLU, GELU, ...) are not
    measured; :func:`activation_coverage` counts them. The model runs once in ``eval`` mode under
    ``torch.no_grad()`` (BatchNorm uses running statistics, nothing is updated) and its training mode is restored.

    Args:
        model: the network; called as ``model(inputs)``.
        inputs: one batch of inputs.
        modules: only these ReLU modules (a ``{name: module}`` dict or a list, hooked); every ReLU by default.
        per_layer: return ``{name: rate}`` per ReLU instead of the overall rate.

    Returns:
        The overall rate in ``[0, 1]``, or the per-ReLU rates.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
        >>> with torch.no_grad():
        ...     _ = net[0].weight.copy_(torch.eye(2)), net[0].bias.zero_()
        >>> dead_neuron_rate(net, torch.tensor([[1.0, -1.0], [-1.0, -1.0]]))  # 3 of 4 outputs are zero
        0.75
    """
    if modules is None:
        counts = _count_activations(model, inputs).counts
        if not counts:
            raise ValueError(
                "dead_neuron_rate found no ReLU in the forward pass (no nn.ReLU/nn.ReLU6 module ran and no "
                "F.relu/torch.relu call was made); the rate is defined for ReLU networks."
            )
        return _rates(counts, per_layer)
    named = dict(modules) if isinstance(modules, dict) else {f"relu{i}": m for i, m in enumerate(modules)}
    if not named:
        raise ValueError("dead_neuron_rate got an empty `modules`; leave it as None to measure every ReLU.")
    counts: dict[str, list[int]] = {name: [0, 0] for name in named}

    def make_hook(name: str):
        def hook(_module, _inp, out):
            counts[name][0] += int((out <= 0).sum())
            counts[name][1] += out.numel()

        return hook

    handles = [m.register_forward_hook(make_hook(name)) for name, m in named.items()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(inputs)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    ran = {name: c for name, c in counts.items() if c[1] > 0}
    if not ran:
        raise RuntimeError("None of the hooked ReLU modules ran in the forward pass; pass the ones the model uses.")
    return _rates(ran, per_layer)


def _rates(counts: dict[str, list[int]], per_layer: bool) -> Union[float, dict[str, float]]:
    if per_layer:
        return {name: dead / total for name, (dead, total) in counts.items()}
    return sum(c[0] for c in counts.values()) / sum(c[1] for c in counts.values())


def ap_prune_step(
    weights_start: dict[str, Tensor],
    weights_end: dict[str, Tensor],
    masks: dict[str, Tensor],
    amount: Union[float, int],
) -> dict[str, Tensor]:
    r"""The AP step: remove the surviving *negative* weights that moved least during the cycle.

    Among the weights alive in ``masks`` with :math:`\theta_{end} < 0`, the ``k`` with the smallest movement
    :math:`|\theta_{end} - \theta_{start}|` are removed, globally over all tensors:

    .. math:: S = \operatorname*{arg\,min}_{|S| = k,\; S \subseteq \{i:\, m_i = 1,\; \theta_{end,i} < 0\}}
              \sum_{i \in S} |\theta_{end,i} - \theta_{start,i}|

    Selection is a stable top-k (ties go to the tensor listed first, then the lower flat index), never a
    threshold: many weights on constant-zero inputs have exactly zero movement and a ``<=`` threshold
    would remove more than ``k``.

    Args:
        weights_start: ``{name: tensor}`` at the start of the cycle (:math:`\theta_{start}`).
        weights_end: ``{name: tensor}`` at the end of the cycle, before the base pruner (:math:`\theta_{end}`).
        masks: ``{name: bool tensor}``, ``True`` where a weight is still alive (after the base pruner).
        amount: how many weights AP removes (the paper's :math:`q` when a fraction): a float in ``(0, 1)``
            removes ``round(amount * alive)`` weights, ``alive`` counted in ``masks``; an ``int >= 0`` removes
            exactly that many. When fewer negative survivors exist, all are removed and a warning says so.

    Returns:
        New masks (the inputs are not modified).

    Example:
        >>> start = {"w": torch.tensor([0.0, -1.0, -1.0, -1.0, 2.0])}
        >>> end = {"w": torch.tensor([0.0, -1.5, -1.1, -3.0, 1.0])}
        >>> alive = {"w": torch.tensor([False, True, True, True, True])}
        >>> ap_prune_step(start, end, alive, amount=1)["w"]  # -1.1 moved least among the negatives
        tensor([False,  True, False,  True,  True])
    """
    if set(weights_start) != set(masks) or set(weights_end) != set(masks):
        raise ValueError(
            f"weights_start, weights_end and masks must have the same keys; got {sorted(weights_start)}, "
            f"{sorted(weights_end)} and {sorted(masks)}."
        )
    for name, m in masks.items():
        if weights_start[name].shape != m.shape or weights_end[name].shape != m.shape:
            raise ValueError(
                f"{name}: shapes differ: start {tuple(weights_start[name].shape)}, end "
                f"{tuple(weights_end[name].shape)}, mask {tuple(m.shape)}. Record weights_start after any "
                "change of the layer's shape."
            )
    alive_total = sum(int(m.bool().sum()) for m in masks.values())
    if isinstance(amount, float):
        check_number("amount", amount, low=0, high=1, low_open=True, high_open=True)
        k = int(round(amount * alive_total))
    elif isinstance(amount, int) and not isinstance(amount, bool):
        k = check_number("amount", amount, low=0, integer=True)
    else:
        raise TypeError(f"`amount` must be a float in (0, 1) or an int >= 0, got {amount!r}.")
    scores, owners, positions = [], [], []
    for i, name in enumerate(masks):
        alive = masks[name].bool().flatten()
        end = weights_end[name].detach().flatten()
        start = weights_start[name].detach().flatten().to(end.device, end.dtype)
        candidates = torch.nonzero(alive.to(end.device) & (end < 0)).flatten()
        scores.append((end[candidates] - start[candidates]).abs().float().cpu())
        positions.append(candidates.cpu())
        owners.append(torch.full((candidates.numel(),), i, dtype=torch.long))
    all_scores = torch.cat(scores) if scores else torch.empty(0)
    if k > all_scores.numel():
        warnings.warn(
            f"ap_prune_step: asked to remove {k} weights but only {all_scores.numel()} surviving weights are "
            "negative; removing all of them.",
            stacklevel=2,
        )
        k = all_scores.numel()
    new_masks = {name: m.bool().clone() for name, m in masks.items()}
    if k == 0:
        return new_masks
    chosen = torch.sort(all_scores, stable=True).indices[:k]
    all_owners, all_positions = torch.cat(owners)[chosen], torch.cat(positions)[chosen]
    for i, name in enumerate(masks):
        idx = all_positions[all_owners == i]
        if idx.numel():
            flat = new_masks[name].view(-1)
            flat[idx.to(flat.device)] = False
    return new_masks


def model_cost(model: nn.Module, inputs: Tensor, latency_repeats: int = 5) -> dict[str, float]:
    """Parameters, MACs of one sample (dense and counting only non-zero weights) and forward latency on ``inputs``.

    ``params`` counts stored parameters (physically removed channels disappear, masked weights do not);
    ``params_nonzero`` counts the non-zero ones (``torch.nn.utils.prune`` masks applied). ``macs`` is
    :func:`~lightning_ext.core.measure.count_macs_params` (the library's one convention: one sample,
    Torch-Pruning's counter); ``macs_nonzero`` scales each ``Conv``/``Linear`` layer's MACs
    (:func:`~lightning_ext.core.measure.layer_macs`) by the share of its non-zero weights (what a sparse kernel
    could skip). ``latency_ms`` is the median of ``latency_repeats`` timed forward passes of the whole batch in
    ``eval`` mode after one warm-up (``nan`` when ``latency_repeats`` is 0). The model's training mode is restored.

    Example:
        >>> cost = model_cost(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)), torch.zeros(8, 4), 0)
        >>> cost["params"], cost["macs"]  # 4*3 + 3 (bias) + 3 (ReLU) + 3*2 + 2 (bias)
        (23, 26)
    """
    params, nonzero = 0, 0
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            params += p.numel()
            eff = p.detach()
            if name.endswith("_orig") and isinstance(getattr(module, name[: -len("_orig")] + "_mask", None), Tensor):
                eff = eff * getattr(module, name[: -len("_orig")] + "_mask")
            nonzero += int(torch.count_nonzero(eff))
    macs_nonzero = 0.0
    for name, macs in layer_macs(model, inputs).items():
        module = model.get_submodule(name)
        if isinstance(module, PRUNABLE_TYPES):
            weight, _ = _effective_weight(module)
            macs *= float(torch.count_nonzero(weight)) / max(1, weight.numel())
        macs_nonzero += macs
    latency = (1000.0 * measure_latency(model, inputs, warmup=1, repeats=latency_repeats) if latency_repeats > 0
               else float("nan"))
    return {
        "params": params,
        "params_nonzero": nonzero,
        "macs": count_macs_params(model, inputs)[0],
        "macs_nonzero": macs_nonzero,
        "latency_ms": latency,
    }


def _effective_weight(module: nn.Module) -> tuple[Tensor, Tensor]:
    """``(weight used in forward, alive mask)``, also under ``torch.nn.utils.prune`` reparametrisation."""
    mask = getattr(module, "weight_mask", None)
    orig = getattr(module, "weight_orig", None)
    if isinstance(mask, Tensor) and isinstance(orig, Tensor):
        return (orig.detach() * mask).detach(), mask.detach().bool()
    w = module.weight.detach()
    return w, w != 0


def _is_reparametrized(module: nn.Module) -> bool:
    mask, orig = getattr(module, "weight_mask", None), getattr(module, "weight_orig", None)
    return isinstance(mask, Tensor) and isinstance(orig, Tensor)


def kept_slices(shape: Sequence[int], changes: Sequence[dict], name: str) -> Optional[list[Tensor]]:
    """Indices ``I_d`` per dimension such that a weight of ``shape`` sliced by them is the weight of layer ``name``
    after the recorded channel removals ``changes`` (:func:`~lightning_ext.compression.plan.recorded_channel_changes`
    entries, in order); ``None`` when a record does not fit ``shape``.

    Example:
        >>> [i.tolist() for i in kept_slices((4, 3), [{"fc": {0: [1]}}, {"fc": {0: [0], 1: [2]}}], "fc")]
        [[2, 3], [0, 1]]
    """
    kept = [torch.arange(int(n)) for n in shape]
    for record in changes:
        for dim, removed in record.get(name, {}).items():
            dim = int(dim)
            if dim >= len(kept) or (removed and max(removed) >= len(kept[dim])):
                return None
            alive = torch.ones(len(kept[dim]), dtype=torch.bool)
            alive[torch.as_tensor(list(removed), dtype=torch.long)] = False
            kept[dim] = kept[dim][alive]
    return kept


def _take(t: Tensor, indices: list[Tensor]) -> Tensor:
    for d, idx in enumerate(indices):
        t = t.index_select(d, idx.to(t.device))
    return t
