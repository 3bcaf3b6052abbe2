"""UDFC, the pure core: data-free structured pruning plus low-bit weight quantization with a closed-form
reconstruction of the next layer (no Trainer needed).

Paper: Bai, Chen, Shen, Qian, Liu, "Unified Data-Free Compression: Pruning and Quantization without Fine-Tuning",
ICCV 2023, arXiv 2308.07209. Reference code: none released. For every ``conv/linear -> BatchNorm -> activation ->
conv/linear`` chain the next layer's input channels are compensated with

.. math::  R = (\\mathrm{Cov}(b_K) + \\lambda I)^{-1}\\,\\mathrm{Cov}(b_K, d), \\qquad \\delta = E[d] - E[b_K] R

(:func:`~lightning_ext.compression.udfc_closed_form.reconstruction_from_bn_statistics`), then the channels are
removed through Torch-Pruning's dependency graph, recorded in the library's one pruning-history format
(``[layer, True, indices]`` entries, :mod:`lightning_ext.compression.plan`), so a compressed model is rebuilt by
the same replay as a filter-pruned one (:func:`~lightning_ext.compression.apply_pruning_history`,
:func:`~lightning_ext.compression.load_pruned_checkpoint`). The Lightning wrapper is
:class:`~lightning_ext.compression.data_free_compression.DataFreeCompression`.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Optional, Sequence, Union, get_args

import torch
from torch import nn

from lightning_ext.compression.graph import build_dependency_graph
from lightning_ext.compression.plan import _apply_op
from lightning_ext.compression.udfc_closed_form import (
    _INPUT_MODELS,
    CompressionError,
    InputModel,
    _activation_spec,
    _fold,
    check_bits,
    quantize_per_channel,
    reconstruction_from_bn_statistics,
)
from lightning_ext.core.layers import match_names
from lightning_ext.core.measure import call_model, count_macs_params, measure_latency, num_params
from lightning_ext.core.optional import require
from lightning_ext.core.validation import check_choice, check_non_negative, check_number

__all__ = [
    "CompressionError", "CompressionReport", "data_free_compress", "find_compensable_chains", "quantize_per_channel",
    "reconstruction_from_bn_statistics",
]

Importance = Literal["l1_folded", "l1"]
_IMPORTANCE = get_args(Importance)
MaxPoolModel = Literal["independent", "identity", "stop"]
_MAX_POOL = get_args(MaxPoolModel)


def check_arguments(pruning_ratio, weight_bits, importance, ridge, num_samples, min_channels,
                    input_model="per_channel", max_pool="independent") -> None:
    """Check UDFC's arguments; one ValueError line naming the argument (NaN and infinity are refused)."""
    if pruning_ratio is None and weight_bits is None:
        raise ValueError("Nothing to do: set `pruning_ratio` (e.g. 0.3), `weight_bits` (e.g. 6), or both.")
    if pruning_ratio is not None:
        check_number("pruning_ratio", pruning_ratio, low=0, high=1, low_open=True, high_open=True)
    if weight_bits is not None:
        check_bits("weight_bits", weight_bits)
    check_choice("importance", importance, _IMPORTANCE)
    check_non_negative("ridge", ridge)
    check_number("num_samples", num_samples, low=256, integer=True)
    check_number("min_channels", min_channels, low=1, integer=True)
    check_choice("input_model", input_model, _INPUT_MODELS)
    check_choice("max_pool", max_pool, _MAX_POOL)


# -- the model's structure ----------------------------------------------------------------------------------


@dataclass
class Chain:
    """``producer -> BatchNorm -> channel-wise ops -> consumer``: the unit UDFC compresses and compensates."""

    producer: str
    bn: str
    consumer: str
    activations: list  # activation specs applied to the BN output, in order (pooling/reshape are skipped)
    consumer_bn: Optional[str] = None  # a BatchNorm right after the consumer (receives the bias correction)




def _tp():
    return require("torch_pruning", "DataFreeCompression")


def _is_weight_layer(module: nn.Module) -> bool:
    conv = isinstance(module, nn.modules.conv._ConvNd) and not module.transposed
    return conv or isinstance(module, nn.Linear)


def _execution_order(model: nn.Module, example_inputs: Any) -> list[str]:
    """Names of conv/linear layers in the order the forward pass first calls them."""
    names = {m: n for n, m in model.named_modules()}
    order: list[str] = []
    handles = []

    def hook(module, args, output):
        name = names[module]
        if name not in order:
            order.append(name)

    for module in model.modules():
        if _is_weight_layer(module):
            handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            call_model(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
    return order


def _chain_of(model: nn.Module, graph, producer_name: str) -> Union[Chain, str]:
    """The compensable chain starting at ``producer_name``, or the reason why there is none."""
    tp = _tp()
    producer = model.get_submodule(producer_name)
    if isinstance(producer, nn.modules.conv._ConvNd) and producer.groups != 1:
        return "grouped/depthwise convolution (its output channels are coupled to its input channels)"
    node = graph.module2node.get(producer)
    if node is None:
        return "not traced by the dependency graph"
    bn_types = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    if len(node.outputs) != 1 or not isinstance(node.outputs[0].module, bn_types):
        return "not followed by exactly one BatchNorm (UDFC needs its statistics)"
    bn_node = node.outputs[0]
    bn = bn_node.module
    if not bn.track_running_stats or bn.running_var is None or not bn.affine:
        return "its BatchNorm has no running statistics or no affine parameters"
    activations: list = []
    cur, reshaped = bn_node, False
    while True:
        if len(cur.outputs) != 1:
            return "its output feeds several layers (residual or branch): pruning it is coupled elsewhere"
        nxt = cur.outputs[0]
        if nxt.type in (tp.ops.OPTYPE.CONV, tp.ops.OPTYPE.LINEAR):
            consumer = nxt.module
            break
        if nxt.type == tp.ops.OPTYPE.RESHAPE:
            reshaped = True
        elif nxt.type == tp.ops.OPTYPE.ELEMENTWISE:
            spec = _activation_spec(nxt.grad_fn)
            op = type(nxt.grad_fn).__name__
            if spec is None and op.startswith(("Add", "Sub", "Mul")):
                return f"it joins a residual/gated branch ({op}): pruning it is coupled with other layers"
            if spec is None:
                return f"unsupported operation {op} between it and the next layer"
            if spec[0] != "skip":
                activations.append(spec)
        else:
            return f"a {nxt.type.name.lower()} operation lies between it and the next layer"
        cur = nxt
    if not _is_weight_layer(consumer):
        return "the next layer is not a convolution or linear layer"
    channels = producer.weight.shape[0]
    if isinstance(consumer, nn.Linear):
        if consumer.in_features != channels:
            return "the next linear layer does not read one feature per channel (flattened spatial map)"
    else:
        if consumer.groups != 1 or consumer.in_channels != channels:
            return "the next convolution is grouped/depthwise"
        if reshaped:
            return "a reshape lies between it and the next convolution"
    names = {m: n for n, m in model.named_modules()}
    group = graph.get_pruning_group(producer, graph.get_pruner_of_module(producer).prune_out_channels, [0])
    members = {dep.target.module for dep, _ in group.items if isinstance(dep.target.module, nn.Module)
               and (_is_weight_layer(dep.target.module) or isinstance(dep.target.module, bn_types))}
    if members != {producer, bn, consumer}:
        return "pruning it is coupled with other layers: " + ", ".join(sorted(names.get(m, "?") for m in members))
    consumer_bn = None
    cnode = graph.module2node.get(consumer)
    if cnode is not None and len(cnode.outputs) == 1 and isinstance(cnode.outputs[0].module, bn_types):
        consumer_bn = names[cnode.outputs[0].module]
    return Chain(producer_name, names[bn], names[consumer], activations, consumer_bn)


def _chains(model: nn.Module, graph: Any, names: Sequence[str]) -> tuple[dict[str, Chain], dict[str, str]]:
    chains, skipped = {}, {}
    for name in names:
        found = _chain_of(model, graph, name)
        if isinstance(found, Chain):
            chains[name] = found
        else:
            skipped[name] = found
    return chains, skipped


def find_compensable_chains(model: nn.Module, example_inputs: Any) -> tuple[dict[str, Chain], dict[str, str]]:
    """Every ``conv/linear -> BatchNorm -> activation -> conv/linear`` chain UDFC can prune and compensate.

    Returns ``(chains, skipped)``: chains keyed by producer name, and for every other conv/linear layer the
    reason it cannot be pruned with compensation (residual coupling, no BatchNorm, depthwise, ...).
    """
    was_training = model.training
    model.eval()
    try:
        graph = build_dependency_graph(model, example_inputs)
        return _chains(model, graph, _execution_order(model, example_inputs))
    finally:
        model.train(was_training)


def _compensate_consumer(model: nn.Module, chain: Chain, rec: dict, bias_correction: bool) -> str:
    """Fold ``R`` and ``delta`` into the next layer; return where the bias correction went."""
    consumer = model.get_submodule(chain.consumer)
    v = consumer.weight.detach().double().cpu()
    kept = rec["kept"]
    transfer = rec["R"].clone()
    transfer[torch.arange(len(kept)), kept] += 1.0  # b_K reproduces itself, plus the correction
    new_cols = torch.einsum("oi...,ji->oj...", v, transfer)
    with torch.no_grad():
        weight = consumer.weight
        full = v.clone()
        full[:, kept] = new_cols
        weight.copy_(full.to(weight.dtype).to(weight.device))
    if not bias_correction:
        return "off"
    spatial = tuple(range(2, v.dim()))
    shift = (v.sum(dim=spatial) if spatial else v) @ rec["delta"]  # (O,)
    with torch.no_grad():
        if consumer.bias is not None:
            consumer.bias.add_(shift.to(consumer.bias.dtype).to(consumer.bias.device))
            return "consumer bias"
        if chain.consumer_bn is not None:
            bn = model.get_submodule(chain.consumer_bn)
            bn.running_mean.sub_(shift.to(bn.running_mean.dtype).to(bn.running_mean.device))
            return f"{chain.consumer_bn}.running_mean"
    return "none (next layer has no bias and no BatchNorm)"



# -- the functional core ------------------------------------------------------------------------------------


@dataclass
class CompressionReport:
    """What :func:`data_free_compress` did: sizes before/after (MACs: one sample, :mod:`lightning_ext.core.measure`'s
    convention), one row per layer, and the pruning history (Torch-Pruning format ``[layer, True, indices]``, the
    format :func:`~lightning_ext.compression.apply_pruning_history` replays)."""

    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    latency_ms_before: Optional[float]
    latency_ms_after: Optional[float]
    layers: list = field(default_factory=list)
    history: list = field(default_factory=list)
    skipped: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    compensated: int = 0  # layers whose consumer received the closed-form compensation

    def metrics(self) -> dict[str, float]:
        """Flat numbers for a logger."""
        out = {"params_before": self.params_before, "params_after": self.params_after,
               "macs_before": self.macs_before, "macs_after": self.macs_after, "compensated_layers": self.compensated}
        if self.latency_ms_before is not None and self.latency_ms_after is not None:
            out.update(latency_ms_before=self.latency_ms_before, latency_ms_after=self.latency_ms_after)
        return {k: float(v) for k, v in out.items()}

    def to_dict(self) -> dict:
        """The report as plain types (JSON-ready)."""
        return asdict(self)

    def summary(self) -> str:
        """A readable summary, one line per layer."""
        lines = [
            f"DataFreeCompression: params {self.params_before:,} -> {self.params_after:,} "
            f"({self.params_after / max(1, self.params_before):.1%}), MACs {self.macs_before:,} -> "
            f"{self.macs_after:,} ({self.macs_after / max(1, self.macs_before):.1%})"
            + (f", latency {self.latency_ms_before:.2f} -> {self.latency_ms_after:.2f} ms"
               if self.latency_ms_before is not None and self.latency_ms_after is not None else "")
            + f"; {self.compensated} of {len(self.layers)} layers compensated"
        ]
        for row in self.layers:
            lines.append(
                f"  {row['name']}: {row['action']}, channels {row['channels_before']} -> {row['channels_after']}"
                + (f", model error {row['error_before']:.3g} -> {row['error_after']:.3g}"
                   if "error_after" in row else "")
                + f", params {row['params_after_step']:,}, MACs {row['macs_after_step']:,}"
            )
        return "\n".join(lines)


def _importance(chain_stats: dict, importance: str) -> torch.Tensor:
    l1 = chain_stats["w"].abs().sum(dim=1)
    return l1 * chain_stats["scale"].abs() if importance == "l1_folded" else l1


def data_free_compress(
    model: nn.Module,
    example_inputs: Any,
    pruning_ratio: Optional[float] = 0.3,
    weight_bits: Optional[int] = 6,
    compensate: bool = True,
    bias_correction: bool = True,
    importance: Importance = "l1_folded",
    ridge: float = 1e-3,
    num_samples: int = 8192,
    seed: int = 0,
    layers: Optional[Sequence[str]] = None,
    min_channels: int = 1,
    input_model: InputModel = "per_channel",
    activation_aware: bool = True,
    measure: bool = True,
    latency_repeats: int = 20,
    max_pool: MaxPoolModel = "independent",
) -> CompressionReport:
    """Prune and quantize ``model`` in place without data (UDFC), compensating in the next layer's weights.

    For each ``conv/linear -> BatchNorm -> activation -> conv/linear`` chain, in forward order: the
    ``round(pruning_ratio * C)`` channels with the smallest L1 norm are chosen, the layer's weights are quantized
    per output channel to ``weight_bits``, the next layer is compensated with the closed form of
    :func:`reconstruction_from_bn_statistics`, and the channels are removed physically through
    Torch-Pruning's dependency graph (the conv rows, the BatchNorm entries and the next layer's columns).
    All other conv/linear layers are quantized without compensation. ``example_inputs`` is only traced
    (shapes), never treated as data: any tensor of the right shape works.

    Args:
        model: the network (changed in place).
        example_inputs: a dummy batch for tracing, MAC counting and latency.
        pruning_ratio: share of output channels removed from every prunable layer, in (0, 1); ``None`` = none.
        weight_bits: weight bit width in [2, 16]; ``None`` = no quantization.
        compensate: apply the closed-form reconstruction (``False`` = naive prune and quantize).
        bias_correction: also correct the expected shift (next layer's bias, or its BatchNorm's running mean).
        importance: ``"l1_folded"`` (L1 of the BN-folded filter) or ``"l1"`` (L1 of the raw filter).
        ridge: relative ridge of the reconstruction (0 = plain least squares).
        num_samples: Gaussian draws for the activation moments.
        seed: seed of those draws.
        layers: glob patterns of the layer names to compress (default: all).
        min_channels: fewest channels a pruned layer may keep; a ratio that leaves fewer is refused.
        input_model: how the BN statistics become a joint Gaussian model of the channels, see
            :func:`reconstruction_from_bn_statistics` (``"per_channel"``, ``"fitted"`` or ``"shared"``).
        activation_aware: push the Gaussian pre-activations through the traced activation (ReLU, ...) when
            computing the moments; ``False`` treats the chain as linear (an ablation).
        measure: measure parameters, MACs and latency before and after (MACs/params per layer always).
        latency_repeats: timed forward passes per latency measurement.
        max_pool: what the compensation does at a max-pool between the BN and the next layer (max is not
            linear): ``"independent"`` fits the regression on max-pooled activations, the window's positions
            drawn independently; ``"identity"`` ignores the pool (the moments and the bias correction are those
            before the pool, exact only for perfectly correlated positions); ``"stop"`` does not compensate a
            chain with a max-pool (its channels are pruned and quantized naively).

    Returns:
        A :class:`CompressionReport`.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        ...                     nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        ...                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
        >>> report = data_free_compress(net.eval(), torch.zeros(2, 1, 8, 8), pruning_ratio=0.25, weight_bits=6,
        ...                             measure=False, num_samples=1024)
        >>> net[0].out_channels, net[3].in_channels, net[3].out_channels, net[8].in_features
        (6, 6, 6, 6)
        >>> net(torch.zeros(1, 1, 8, 8)).shape
        torch.Size([1, 10])
    """
    check_arguments(pruning_ratio, weight_bits, importance, ridge, num_samples, min_channels, input_model, max_pool)
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}.")
    was_training = model.training
    model.eval()
    try:
        return _compress(model, example_inputs, pruning_ratio, weight_bits, compensate, bias_correction, importance,
                         ridge, num_samples, seed, layers, min_channels, input_model, activation_aware, measure,
                         latency_repeats, max_pool)
    finally:
        model.train(was_training)


def _udfc_reconstruction(module, bn, chain, pruned, q, *, activations, input_model, ridge, num_samples, seed):
    return reconstruction_from_bn_statistics(module.weight, bn.running_var, bn.weight, bn.bias, pruned, q, activations,
                                             input_model=input_model, ridge=ridge, num_samples=num_samples, seed=seed,
                                             eps=bn.eps)


def _compress(model, example_inputs, pruning_ratio, weight_bits, compensate, bias_correction, importance, ridge,
              num_samples, seed, layers, min_channels, input_model, activation_aware, measure,
              latency_repeats, max_pool="independent", reconstruct=_udfc_reconstruction) -> CompressionReport:
    """The work of :func:`data_free_compress`; ``reconstruct(module, bn, chain, pruned, q, **options)`` returns
    ``{"kept", "R", "delta", ...}`` (another compensation, e.g. Neuron Merging, plugs in here)."""
    graph = build_dependency_graph(model, example_inputs)
    order = _execution_order(model, example_inputs)
    targets = match_names(order, layers, "layers", strict=False) if layers is not None else list(order)
    chains, skipped = _chains(model, graph, targets)
    if layers is not None and not targets:
        raise CompressionError(f"`layers` {list(layers)} matches no conv/linear layer used in the forward pass; "
                               f"layers are: {', '.join(order)}.")
    # plan the pruning before touching anything, so a bad ratio changes nothing
    plan: dict[str, int] = {}
    if pruning_ratio is not None and not chains and weight_bits is not None:
        warnings.warn(
            "DataFreeCompression: no layer can be pruned with UDFC's reconstruction (" + "; ".join(
                f"{k}: {v}" for k, v in skipped.items()) + f"), so the layers {list(targets)} are only quantized "
            f"to {weight_bits} bits, without compensation.", UserWarning, stacklevel=3)
        pruning_ratio = None
    if pruning_ratio is not None:
        if not chains:
            raise CompressionError(
                "No layer can be pruned with UDFC's reconstruction: it needs a conv/linear layer followed by "
                "BatchNorm, channel-wise activations and a single next conv/linear layer. Reasons per layer: "
                + "; ".join(f"{k}: {v}" for k, v in skipped.items())
            )
        for name in chains:
            channels = model.get_submodule(name).weight.shape[0]
            n = int(round(pruning_ratio * channels))
            if channels - n < min_channels:
                raise CompressionError(
                    f"pruning_ratio={pruning_ratio} would leave layer {name!r} with {channels - n} of {channels} "
                    f"channels (min_channels={min_channels}); lower `pruning_ratio` or leave the layer out with "
                    f"`layers`."
                )
            plan[name] = n
    params_before = num_params(model)
    macs_before = count_macs_params(model, example_inputs)[0]
    timed = measure and latency_repeats > 0
    latency_before = 1000 * measure_latency(model, example_inputs, repeats=latency_repeats) if timed else None

    rows, history, quantized = [], [], set()
    names = {m: n for n, m in model.named_modules()}
    for name in targets:
        module = model.get_submodule(name)
        channels_before = module.weight.shape[0]
        row: dict[str, Any] = {"name": name, "channels_before": channels_before}
        chain = chains.get(name)
        n_prune = plan.get(name, 0)
        if chain is not None and (n_prune > 0 or weight_bits is not None):
            bn = model.get_submodule(chain.bn)
            stats = _fold(module, bn)
            pruned = []
            if n_prune:
                score = _importance(stats, importance)
                pruned = sorted(torch.argsort(score, stable=True)[:n_prune].tolist())
            q = quantize_per_channel(module.weight, weight_bits) if weight_bits is not None else None
            if chain.consumer in quantized:
                raise CompressionError(f"internal order error: {chain.consumer} was quantized before {name}")
            pooled = any(spec[0] == "max_pool" for spec in chain.activations)
            acts = [a for a in chain.activations if not (max_pool == "identity" and a[0] == "max_pool")]
            if compensate and not (pooled and max_pool == "stop"):
                rec = reconstruct(module, bn, chain, pruned, q, activations=acts if activation_aware else [],
                                  input_model=input_model, ridge=ridge, num_samples=num_samples, seed=seed)
                row["bias_correction"] = _compensate_consumer(model, chain, rec, bias_correction)
                if "error_after" in rec:
                    row["error_before"], row["error_after"] = float(rec["error_before"]), float(rec["error_after"])
                row.update({k: v for k, v in rec.items() if k.startswith("merge")})
            if q is not None:
                with torch.no_grad():
                    module.weight.copy_(q)
                quantized.add(name)
            if pruned:
                op = [name, True, [int(i) for i in pruned]]
                _apply_op(model, graph, op, names)  # the graph follows the layers it already pruned
                history.append(op)
            row.update(action=("pruned" if pruned else "")
                       + ("+" if pruned and q is not None else "") + ("quantized" if q is not None else "")
                       + (" (compensated)" if "bias_correction" in row else ""),
                       consumer=chain.consumer, pruned=pruned)
        elif weight_bits is not None:
            with torch.no_grad():
                module.weight.copy_(quantize_per_channel(module.weight, weight_bits))
            quantized.add(name)
            row.update(action="quantized", reason=skipped.get(name, "not prunable"))
        else:
            continue
        row["channels_after"] = module.weight.shape[0]
        row["params_after_step"] = num_params(model)
        row["macs_after_step"] = count_macs_params(model, example_inputs)[0]
        rows.append(row)

    latency_after = 1000 * measure_latency(model, example_inputs, repeats=latency_repeats) if timed else None
    config = dict(pruning_ratio=pruning_ratio, weight_bits=weight_bits, compensate=compensate,
                  bias_correction=bias_correction, importance=importance, ridge=ridge, num_samples=num_samples,
                  seed=seed, layers=list(layers) if layers is not None else None, min_channels=min_channels,
                  input_model=input_model, activation_aware=activation_aware, max_pool=max_pool)
    compensated = sum("bias_correction" in row for row in rows)
    return CompressionReport(params_before, num_params(model), macs_before, count_macs_params(model, example_inputs)[0],
                             latency_before, latency_after, rows, history, skipped, config, compensated)


