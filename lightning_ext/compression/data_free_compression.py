"""UDFC: data-free structured pruning plus low-bit weight quantization with a closed-form reconstruction."""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lightning_ext.core.optional import require
from lightning_ext.core.measure import call_model, layer_macs, measure_latency, num_params

__all__ = [
    "CompressionReport",
    "DataFreeCompression",
    "apply_compression_history",
    "data_free_compress",
    "find_compensable_chains",
    "quantize_per_channel",
    "reconstruction_from_bn_statistics",
]

_IMPORTANCE = ("l1_folded", "l1")
_APPLY_AT = ("start", "train_end")
_MARKER = "_lightning_ext_data_free_compression"


class CompressionError(ValueError):
    """A compression request that cannot be carried out as asked (nothing is changed when it is raised)."""


# -- argument checks ----------------------------------------------------------------------------------------


def _check_arguments(prune_ratio, weight_bits, importance, ridge, num_samples, min_channels,
                     input_model="per_channel") -> None:
    if prune_ratio is None and weight_bits is None:
        raise ValueError("Nothing to do: set `prune_ratio` (e.g. 0.3), `weight_bits` (e.g. 6), or both.")
    if prune_ratio is not None:
        if isinstance(prune_ratio, bool) or not isinstance(prune_ratio, (int, float)) or not 0 < prune_ratio < 1:
            raise ValueError(
                f"`prune_ratio` must lie in (0, 1): the share of output channels removed from each prunable "
                f"layer; got {prune_ratio!r}. Use `prune_ratio: null` to quantize only."
            )
    if weight_bits is not None:
        if isinstance(weight_bits, bool) or not isinstance(weight_bits, int) or not 2 <= weight_bits <= 16:
            raise ValueError(
                f"`weight_bits` must be an integer in [2, 16]; got {weight_bits!r}. "
                "Use `weight_bits: null` to prune only."
            )
    if importance not in _IMPORTANCE:
        raise ValueError(f"`importance` must be one of {_IMPORTANCE}, got {importance!r}.")
    if not ridge >= 0:
        raise ValueError(f"`ridge` must be >= 0 (0 = plain least squares), got {ridge!r}.")
    if not isinstance(num_samples, int) or num_samples < 256:
        raise ValueError(f"`num_samples` must be an integer >= 256, got {num_samples!r}.")
    if not isinstance(min_channels, int) or min_channels < 1:
        raise ValueError(f"`min_channels` must be an integer >= 1, got {min_channels!r}.")
    if input_model not in _INPUT_MODELS:
        raise ValueError(f"`input_model` must be one of {_INPUT_MODELS}, got {input_model!r}.")


# -- quantizer ----------------------------------------------------------------------------------------------


def quantize_per_channel(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric uniform per-output-channel fake quantization of a weight tensor.

    Row ``c`` (dimension 0) is mapped to ``Δ_c · clamp(round(w / Δ_c), -q, q)`` with ``q = 2^(bits-1) - 1``
    and ``Δ_c = max|w_c| / q``, so every output channel uses at most ``2^bits - 1`` distinct values. The
    result is returned in the weight's dtype (dequantized, "fake-quantized").

    Example:
        >>> w = torch.tensor([[0.1, -0.5, 0.3], [0.0, 0.0, 0.0]])
        >>> quantize_per_channel(w, 2)
        tensor([[ 0.0000, -0.5000,  0.5000],
                [ 0.0000,  0.0000,  0.0000]])
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
        raise ValueError(f"`bits` must be an integer in [2, 16], got {bits!r}.")
    flat = weight.detach().reshape(weight.shape[0], -1).double()
    qmax = 2 ** (bits - 1) - 1
    scale = flat.abs().amax(dim=1, keepdim=True) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(flat / scale), -qmax, qmax) * scale
    return q.reshape(weight.shape).to(weight.dtype)


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


def _build_graph(model: nn.Module, example_inputs: Any):
    tp = _tp()
    with torch.enable_grad():
        return tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs, verbose=False)


_CHANNELWISE_PREFIXES = (
    "AvgPool", "AdaptiveAvgPool", "MaxPool", "AdaptiveMaxPool", "Mean", "Clone", "View", "Reshape", "UnsafeView",
    "Squeeze", "Unsqueeze", "Flatten", "Alias",
)


def _activation_spec(grad_fn) -> Optional[tuple]:
    """The activation an elementwise autograd node applies, as a picklable spec; ``("skip",)`` for channel-wise
    linear ops (pooling, views); ``None`` when unsupported."""
    name = type(grad_fn).__name__
    if name.startswith("ReluBackward"):
        return ("relu",)
    if name.startswith("HardtanhBackward"):
        return ("hardtanh", float(grad_fn._saved_min_val), float(grad_fn._saved_max_val))
    if name.startswith("LeakyReluBackward"):
        return ("leaky_relu", float(grad_fn._saved_negative_slope))
    if name.startswith("GeluBackward"):
        return ("gelu", str(grad_fn._saved_approximate))
    if name.startswith("SiluBackward"):
        return ("silu",)
    if name.startswith("HardswishBackward"):
        return ("hardswish",)
    if name.startswith("EluBackward"):
        return ("elu", float(grad_fn._saved_alpha))
    if name.startswith(_CHANNELWISE_PREFIXES):
        return ("skip",)
    return None


def _apply_activation(spec: tuple, x: torch.Tensor) -> torch.Tensor:
    kind = spec[0]
    if kind == "relu":
        return torch.relu(x)
    if kind == "hardtanh":
        return torch.clamp(x, spec[1], spec[2])
    if kind == "leaky_relu":
        return torch.nn.functional.leaky_relu(x, spec[1])
    if kind == "gelu":
        return torch.nn.functional.gelu(x, approximate=spec[1])
    if kind == "silu":
        return torch.nn.functional.silu(x)
    if kind == "hardswish":
        return torch.nn.functional.hardswish(x)
    if kind == "elu":
        return torch.nn.functional.elu(x, spec[1])
    raise ValueError(f"unknown activation spec {spec!r}")


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


def find_compensable_chains(model: nn.Module, example_inputs: Any) -> tuple[dict[str, Chain], dict[str, str]]:
    """Every ``conv/linear -> BatchNorm -> activation -> conv/linear`` chain UDFC can prune and compensate.

    Returns ``(chains, skipped)``: chains keyed by producer name, and for every other conv/linear layer the
    reason it cannot be pruned with compensation (residual coupling, no BatchNorm, depthwise, ...).
    """
    was_training = model.training
    model.eval()
    try:
        graph = _build_graph(model, example_inputs)
        order = _execution_order(model, example_inputs)
        chains, skipped = {}, {}
        for name in order:
            found = _chain_of(model, graph, name)
            if isinstance(found, Chain):
                chains[name] = found
            else:
                skipped[name] = found
        return chains, skipped
    finally:
        model.train(was_training)


# -- the closed-form reconstruction -------------------------------------------------------------------------


def _fold(producer: nn.Module, bn: nn.Module) -> dict[str, torch.Tensor]:
    w = producer.weight.detach().reshape(producer.weight.shape[0], -1).double().cpu()
    var = bn.running_var.detach().double().cpu()
    std = torch.sqrt(var + bn.eps)
    gamma, beta = bn.weight.detach().double().cpu(), bn.bias.detach().double().cpu()
    mean = bn.running_mean.detach().double().cpu()
    bias = producer.bias.detach().double().cpu() if producer.bias is not None else torch.zeros_like(mean)
    scale = gamma / std
    return {"w": w, "var": var, "scale": scale, "beta": beta, "folded_bias": beta + scale * (bias - mean)}


_INPUT_MODELS = ("per_channel", "fitted", "shared")


def _joint_covariance(w: torch.Tensor, q: Optional[torch.Tensor], var: torch.Tensor, scale: torch.Tensor,
                      input_model: str) -> torch.Tensor:
    """Covariance of the stacked pre-activations ``[h; h^q]`` (2C x 2C, or C x C without ``q``)."""
    norms = (w ** 2).sum(dim=1)
    ok = (norms > 0) & (var > 0)
    shared = float(torch.median(var[ok] / norms[ok])) if ok.any() else 1.0
    stacked = w if q is None else torch.cat([w, q])
    folded = stacked * scale.repeat(stacked.shape[0] // w.shape[0])[:, None]
    if input_model == "shared":
        return shared * folded @ folded.T
    if input_model == "per_channel":
        gain = torch.where(ok, var / torch.where(ok, norms, torch.ones_like(norms)), torch.full_like(var, shared))
        g = gain.sqrt().repeat(stacked.shape[0] // w.shape[0])[:, None]
        return (g * folded) @ (g * folded).T
    # fitted: Sigma_x = tau^2 I + W^T diag(c) W, the smallest change of tau^2 I that reproduces
    # var_j = W_j Sigma_x W_j^T for every channel j
    gram = w @ w.T
    lhs = gram ** 2
    rhs = var - shared * norms
    c = torch.linalg.solve(lhs + 1e-8 * float(torch.trace(lhs)) / len(lhs) * torch.eye(len(lhs), dtype=lhs.dtype), rhs)
    cross = folded @ w.T
    return shared * folded @ folded.T + cross @ torch.diag(c) @ cross.T


@torch.no_grad()
def reconstruction_from_bn_statistics(
    weight: torch.Tensor,
    running_var: torch.Tensor,
    bn_weight: torch.Tensor,
    bn_bias: torch.Tensor,
    pruned: Sequence[int],
    quantized_weight: Optional[torch.Tensor] = None,
    activations: Sequence[tuple] = (("relu",),),
    input_model: str = "per_channel",
    ridge: float = 1e-3,
    num_samples: int = 8192,
    seed: int = 0,
    eps: float = 1e-5,
) -> dict[str, torch.Tensor]:
    """Closed-form compensation of the next layer for pruned and quantized channels, from BN statistics only.

    Model (no data): the layer's input patches ``x`` are Gaussian and the BN outputs ``h_j = W~_j . x + b~_j``
    (BN-folded filters ``W~_j = gamma_j W_j / sigma_j``) have BN's shift ``beta_j`` as mean. Three covariance
    models, all from the weights and the running variances ``sigma_j^2``: ``input_model="per_channel"``
    (default) correlates the channels as if the input were white, ``corr(h_i, h_j) = cos(W_i, W_j)``, and keeps
    BN's exact marginal ``N(beta_j, gamma_j^2)`` for every channel (each channel has its own input gain
    ``sigma_j^2 / ||W_j||^2``); ``"shared"`` uses one white input ``Sigma_x = tau^2 I``, ``tau^2`` the median
    gain; ``"fitted"`` uses the input covariance closest to ``tau^2 I`` (Frobenius) that reproduces every
    running variance, ``Sigma_x = tau^2 I + W^T diag(c) W`` (negative eigenvalues of the joint covariance are
    clipped). The damaged pre-activations ``h^q_j = Q~_j . x + ...`` (quantized filter, same input and gain)
    share the draw. With ``a = act(h)``, ``b = act(h^q)`` and the damage ``d_c = a_c`` for a pruned channel,
    ``d_j = a_j - b_j`` for a kept (quantized) one, the minimiser of the expected reconstruction error of every
    next-layer output, ``E || V (a - [b_K + b_K R + delta]) ||^2`` for any next-layer weight ``V``, is the
    multivariate least-squares regression of ``d`` on the kept damaged channels ``b_K``:

    ``R = (Cov(b_K) + lambda I)^{-1} Cov(b_K, d)``,  ``delta = E[d] - E[b_K] R``,

    with ``lambda = ridge * tr Cov(b_K) / |K|`` shrinking the compensation towards none. The moments of the
    activations are estimated from ``num_samples`` seeded Gaussian draws (no data). For a linear chain (no
    activation) and a pruned filter in the span of the kept ones, ``R`` and ``delta`` are exact with
    ``"fitted"`` and ``"shared"`` (with ``"per_channel"`` only when the real input is white).

    Args:
        weight: ``(C, F)`` weights of the layer (one row per output channel).
        running_var: ``(C,)`` BN running variance of the layer's output.
        bn_weight: ``(C,)`` BN scale ``gamma``.
        bn_bias: ``(C,)`` BN shift ``beta`` (the mean of the BN output).
        pruned: indices of the pruned output channels.
        quantized_weight: ``(C, F)`` quantized weights; ``None`` when not quantizing.
        activations: activation specs between BN and the next layer (``[]`` for none).
        input_model: ``"per_channel"``, ``"fitted"`` or ``"shared"`` (see above).
        ridge: relative ridge ``lambda``.
        num_samples: Gaussian draws for the moments.
        seed: seed of the draws.
        eps: BN epsilon.

    Returns:
        ``{"kept", "R" (|K| x C), "delta" (C,), "error_before", "error_after"}`` where the errors are the
        model's expected squared reconstruction errors ``sum_i E[e_i^2]`` without and with compensation.

    Example:
        >>> w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
        >>> var = torch.tensor([1.0, 1.0, 2.0], dtype=torch.float64)  # BN statistics of a white input
        >>> out = reconstruction_from_bn_statistics(w, var, var.sqrt(), torch.zeros(3), pruned=[2], activations=[],
        ...                                         ridge=0.0, eps=0.0)
        >>> [round(v, 6) for v in out["R"][:, 2].tolist()]  # channel 2 = channel 0 + channel 1
        [1.0, 1.0]
    """
    if input_model not in _INPUT_MODELS:
        raise ValueError(f"`input_model` must be one of {_INPUT_MODELS}, got {input_model!r}.")
    w = weight.detach().reshape(weight.shape[0], -1).double().cpu()
    channels = w.shape[0]
    pruned_set = set(int(i) for i in pruned)
    kept = [j for j in range(channels) if j not in pruned_set]
    if not kept:
        raise CompressionError("cannot reconstruct a layer with no kept channel")
    var = running_var.detach().double().cpu() + eps
    scale = bn_weight.detach().double().cpu() / torch.sqrt(var)
    beta = bn_bias.detach().double().cpu().reshape(1, -1)
    q = quantized_weight.detach().reshape(channels, -1).double().cpu() if quantized_weight is not None else None
    cov = _joint_covariance(w, q, var, scale, input_model)
    # a factor L with L L^T = cov (negative eigenvalues of a non-PSD fit are clipped)
    evals, evecs = torch.linalg.eigh((cov + cov.T) / 2)
    top = float(evals.max()) if evals.numel() else 0.0
    rank = evals > top * 1e-12 if top > 0 else torch.zeros_like(evals, dtype=torch.bool)
    factor = evecs[:, rank] * torch.sqrt(evals[rank])
    if factor.shape[1] == 0:  # all-zero weights: the pre-activations are constant
        factor = torch.zeros(cov.shape[0], 1, dtype=torch.float64)
    gen = torch.Generator().manual_seed(int(seed))
    k = len(kept)
    kept_t = torch.tensor(kept)
    sum_b = torch.zeros(k, dtype=torch.float64)
    sum_d = torch.zeros(channels, dtype=torch.float64)
    sum_dd = torch.zeros(channels, dtype=torch.float64)
    sum_bb = torch.zeros(k, k, dtype=torch.float64)
    sum_bd = torch.zeros(k, channels, dtype=torch.float64)
    done = 0
    while done < num_samples:
        n = min(2048, num_samples - done)
        z = torch.randn(n, factor.shape[1], generator=gen, dtype=torch.float64)
        pre = z @ factor.T
        h = pre[:, :channels] + beta
        hq = (pre[:, channels:] if q is not None else pre[:, :channels]) + beta
        a, b = h, hq
        for spec in activations:
            a, b = _apply_activation(spec, a), _apply_activation(spec, b)
        bk = b[:, kept_t]
        d = a.clone()
        d[:, kept_t] -= bk
        sum_b += bk.sum(0)
        sum_d += d.sum(0)
        sum_dd += (d * d).sum(0)
        sum_bb += bk.T @ bk
        sum_bd += bk.T @ d
        done += n
    mean_b, mean_d = sum_b / num_samples, sum_d / num_samples
    cov_bb = sum_bb / num_samples - torch.outer(mean_b, mean_b)
    cov_bd = sum_bd / num_samples - torch.outer(mean_b, mean_d)
    var_d = sum_dd / num_samples - mean_d ** 2
    reg = ridge * float(torch.trace(cov_bb)) / k
    if reg > 0:
        r = torch.linalg.solve(cov_bb + reg * torch.eye(k, dtype=torch.float64), cov_bd)
    else:
        r = torch.linalg.pinv(cov_bb, hermitian=True) @ cov_bd
    delta = mean_d - mean_b @ r
    # residual variance of each damaged channel: var(d) - 2 r^T cov_bd + r^T cov_bb r
    explained = (r * cov_bd).sum(0) * 2 - (r * (cov_bb @ r)).sum(0)
    error_before = float((sum_dd / num_samples).sum())
    error_after = float(torch.clamp(var_d - explained, min=0).sum())
    return {"kept": kept_t, "R": r, "delta": delta, "error_before": torch.tensor(error_before),
            "error_after": torch.tensor(error_after)}


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
    """What :func:`data_free_compress` did: sizes before/after, one row per layer, and the pruning history."""

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

    def metrics(self) -> dict[str, float]:
        """Flat numbers for a logger."""
        out = {"params_before": self.params_before, "params_after": self.params_after,
               "macs_before": self.macs_before, "macs_after": self.macs_after}
        if self.latency_ms_before is not None and self.latency_ms_after is not None:
            out.update(latency_ms_before=self.latency_ms_before, latency_ms_after=self.latency_ms_after)
        return {k: float(v) for k, v in out.items()}

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        lines = [
            f"DataFreeCompression: params {self.params_before:,} -> {self.params_after:,} "
            f"({self.params_after / max(1, self.params_before):.1%}), MACs {self.macs_before:,} -> "
            f"{self.macs_after:,} ({self.macs_after / max(1, self.macs_before):.1%})"
            + (f", latency {self.latency_ms_before:.2f} -> {self.latency_ms_after:.2f} ms"
               if self.latency_ms_before is not None and self.latency_ms_after is not None else "")
        ]
        for row in self.layers:
            lines.append(
                f"  {row['name']}: {row['action']}, channels {row['channels_before']} -> {row['channels_after']}"
                + (f", model error {row['error_before']:.3g} -> {row['error_after']:.3g}"
                   if "error_after" in row else "")
                + f", params {row['params_after_step']:,}, MACs {row['macs_after_step']:,}"
            )
        return "\n".join(lines)


def _matches(name: str, patterns: Optional[Sequence[str]]) -> bool:
    return patterns is None or any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _importance(chain_stats: dict, importance: str) -> torch.Tensor:
    l1 = chain_stats["w"].abs().sum(dim=1)
    return l1 * chain_stats["scale"].abs() if importance == "l1_folded" else l1


def data_free_compress(
    model: nn.Module,
    example_inputs: Any,
    prune_ratio: Optional[float] = 0.3,
    weight_bits: Optional[int] = 6,
    compensate: bool = True,
    bias_correction: bool = True,
    importance: str = "l1_folded",
    ridge: float = 1e-3,
    num_samples: int = 8192,
    seed: int = 0,
    layers: Optional[Sequence[str]] = None,
    min_channels: int = 1,
    input_model: str = "per_channel",
    activation_aware: bool = True,
    measure: bool = True,
    latency_repeats: int = 20,
) -> CompressionReport:
    """Prune and quantize ``model`` in place without data (UDFC), compensating in the next layer's weights.

    For each ``conv/linear -> BatchNorm -> activation -> conv/linear`` chain, in forward order: the
    ``round(prune_ratio * C)`` channels with the smallest L1 norm are chosen, the layer's weights are quantized
    per output channel to ``weight_bits``, the next layer is compensated with the closed form of
    :func:`reconstruction_from_bn_statistics`, and the channels are removed physically through
    Torch-Pruning's dependency graph (the conv rows, the BatchNorm entries and the next layer's columns).
    All other conv/linear layers are quantized without compensation. ``example_inputs`` is only traced
    (shapes), never treated as data: any tensor of the right shape works.

    Args:
        model: the network (changed in place).
        example_inputs: a dummy batch for tracing, MAC counting and latency.
        prune_ratio: share of output channels removed from every prunable layer, in (0, 1); ``None`` = none.
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

    Returns:
        A :class:`CompressionReport`.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        ...                     nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        ...                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
        >>> report = data_free_compress(net.eval(), torch.zeros(2, 1, 8, 8), prune_ratio=0.25, weight_bits=6,
        ...                             measure=False, num_samples=1024)
        >>> net[0].out_channels, net[3].in_channels, net[3].out_channels, net[8].in_features
        (6, 6, 6, 6)
        >>> net(torch.zeros(1, 1, 8, 8)).shape
        torch.Size([1, 10])
    """
    _check_arguments(prune_ratio, weight_bits, importance, ridge, num_samples, min_channels, input_model)
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}.")
    was_training = model.training
    model.eval()
    try:
        return _compress(model, example_inputs, prune_ratio, weight_bits, compensate, bias_correction, importance,
                         ridge, num_samples, seed, layers, min_channels, input_model, activation_aware, measure,
                         latency_repeats)
    finally:
        model.train(was_training)


def _compress(model, example_inputs, prune_ratio, weight_bits, compensate, bias_correction, importance, ridge,
              num_samples, seed, layers, min_channels, input_model, activation_aware, measure,
              latency_repeats) -> CompressionReport:
    graph = _build_graph(model, example_inputs)
    order = _execution_order(model, example_inputs)
    chains, skipped = {}, {}
    for name in order:
        if not _matches(name, layers):
            continue
        found = _chain_of(model, graph, name)
        if isinstance(found, Chain):
            chains[name] = found
        else:
            skipped[name] = found
    targets = [n for n in order if _matches(n, layers)]
    if layers is not None and not targets:
        raise CompressionError(f"`layers` {list(layers)} matches no conv/linear layer used in the forward pass; "
                               f"layers are: {', '.join(order)}.")
    # plan the pruning before touching anything, so a bad ratio changes nothing
    plan: dict[str, int] = {}
    if prune_ratio is not None:
        if not chains:
            raise CompressionError(
                "No layer can be pruned with UDFC's reconstruction: it needs a conv/linear layer followed by "
                "BatchNorm, channel-wise activations and a single next conv/linear layer. Reasons per layer: "
                + "; ".join(f"{k}: {v}" for k, v in skipped.items())
            )
        for name in chains:
            channels = model.get_submodule(name).weight.shape[0]
            n = int(round(prune_ratio * channels))
            if channels - n < min_channels:
                raise CompressionError(
                    f"prune_ratio={prune_ratio} would leave layer {name!r} with {channels - n} of {channels} "
                    f"channels (min_channels={min_channels}); lower `prune_ratio` or leave the layer out with "
                    f"`layers`."
                )
            plan[name] = n
    params_before = num_params(model)
    macs_before = layer_macs(model, example_inputs)
    timed = measure and latency_repeats > 0
    latency_before = 1000 * measure_latency(model, example_inputs, repeats=latency_repeats) if timed else None

    rows, history, quantized = [], [], set()
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
            if compensate:
                rec = reconstruction_from_bn_statistics(
                    module.weight, bn.running_var, bn.weight, bn.bias, pruned, q,
                    chain.activations if activation_aware else [], input_model=input_model, ridge=ridge,
                    num_samples=num_samples, seed=seed, eps=bn.eps,
                )
                row["bias_correction"] = _compensate_consumer(model, chain, rec, bias_correction)
                row["error_before"], row["error_after"] = float(rec["error_before"]), float(rec["error_after"])
            if q is not None:
                with torch.no_grad():
                    module.weight.copy_(q)
                quantized.add(name)
            if pruned:
                group = graph.get_pruning_group(module, graph.get_pruner_of_module(module).prune_out_channels, pruned)
                group.prune()
                history.append({"module": name, "pruned": [int(i) for i in pruned], "channels": channels_before})
            row.update(action=("pruned" if pruned else "")
                       + ("+" if pruned and q is not None else "") + ("quantized" if q is not None else "")
                       + (" (compensated)" if compensate else ""),
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
        row["macs_after_step"] = layer_macs(model, example_inputs)
        rows.append(row)

    latency_after = 1000 * measure_latency(model, example_inputs, repeats=latency_repeats) if timed else None
    config = dict(prune_ratio=prune_ratio, weight_bits=weight_bits, compensate=compensate,
                  bias_correction=bias_correction, importance=importance, ridge=ridge, num_samples=num_samples,
                  seed=seed, layers=list(layers) if layers is not None else None, min_channels=min_channels,
                  input_model=input_model, activation_aware=activation_aware)
    return CompressionReport(params_before, num_params(model), macs_before, layer_macs(model, example_inputs),
                             latency_before, latency_after, rows, history, skipped, config)


def apply_compression_history(model: nn.Module, example_inputs: Any, history: Sequence[dict]) -> nn.Module:
    """Re-apply the channel removals of a :class:`CompressionReport` ``history`` to a fresh model (shapes only).

    Used to rebuild the architecture of a compressed model before loading its weights.
    """
    if not history:
        return model
    was_training = model.training
    model.eval()
    try:
        graph = _build_graph(model, example_inputs)
        for step in history:
            module = model.get_submodule(step["module"])
            if module.weight.shape[0] != step["channels"]:
                raise CompressionError(
                    f"cannot replay the compression of {step['module']!r}: it has {module.weight.shape[0]} output "
                    f"channels, the history expects {step['channels']} (a different architecture?)."
                )
            graph.get_pruning_group(module, graph.get_pruner_of_module(module).prune_out_channels,
                                    list(step["pruned"])).prune()
    finally:
        model.train(was_training)
    return model


def _history_from_shapes(model: nn.Module, example_inputs: Any, state_dict: dict, prefix: str = "") -> list[dict]:
    """A history that gives ``model`` the layer shapes found in ``state_dict`` (the last channels are removed;
    which ones does not matter, the weights are loaded afterwards)."""
    history = []
    larger = []
    for name, module in model.named_modules():
        if not _is_weight_layer(module):
            continue
        key = f"{prefix}{name}.weight"
        if key not in state_dict:
            continue
        have, want = module.weight.shape[0], state_dict[key].shape[0]
        if want < have:
            history.append({"module": name, "pruned": list(range(want, have)), "channels": have})
        elif want > have:
            larger.append(f"{name} ({want} > {have})")
    if larger:
        raise CompressionError(
            "The checkpoint holds MORE channels than the compressed model in memory ("
            + ", ".join(larger[:5]) + "): it was saved before DataFreeCompression compressed the model. With "
            "apply_at='start' the model is compressed in setup(), before Lightning loads `ckpt_path`: load "
            "uncompressed weights into the model first (e.g. `load_from_checkpoint`, `pretrained_weights`). With "
            "apply_at='train_end', evaluate the model in memory (ckpt_path=None) or the checkpoint written to "
            "`save_path`."
        )
    if history:
        chains, skipped = find_compensable_chains(model, example_inputs)
        bad = [s["module"] for s in history if s["module"] not in chains]
        if bad:
            raise CompressionError(
                f"The checkpoint has fewer channels in {bad}, which DataFreeCompression cannot prune "
                f"({'; '.join(skipped.get(b, 'unknown') for b in bad)}); it was not written by this callback."
            )
    return history


# -- the Lightning wrapper ----------------------------------------------------------------------------------


class _RebuildShapesBeforeLoad:
    """``load_state_dict`` pre-hook: gives the model the (smaller) layer shapes of the incoming state dict."""

    def __init__(self, callback: "DataFreeCompression") -> None:
        self.callback = callback

    def __call__(self, module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        example = self.callback._example_inputs(module)
        history = _history_from_shapes(module, example, state_dict, prefix)
        if history:
            apply_compression_history(module, example, history)
            _mark(module, self.callback.state_key, history)
            rank_zero_info(f"DataFreeCompression: rebuilt the compressed shapes of {len(history)} layers "
                           "from the checkpoint before loading it.")


def _mark(module: nn.Module, key: str, history: list) -> None:
    marks = dict(getattr(module, _MARKER, {}))
    marks[key] = {"history": history}
    object.__setattr__(module, _MARKER, marks)


def _refuse_strategy(trainer) -> None:
    names = [cls.__name__ for cls in type(trainer.strategy).__mro__]
    for bad in ("FSDP", "DeepSpeed", "ModelParallel"):
        if any(bad in n for n in names):
            raise RuntimeError(
                f"DataFreeCompression does not support {type(trainer.strategy).__name__}: it removes channels from "
                "whole (unsharded) weight tensors. Use a single device or strategy='ddp'."
            )


def _spawns_workers(trainer) -> bool:
    launcher = getattr(trainer.strategy, "launcher", None)
    return launcher is not None and type(launcher).__name__ == "_MultiProcessingLauncher"


class DataFreeCompression(Callback):
    """Data-free structured pruning plus low-bit weight quantization with a closed-form reconstruction (UDFC).

    Paper: Bai, Chen, Shen, Qian, Liu, "Unified Data-Free Compression: Pruning and Quantization without
    Fine-Tuning", ICCV 2023, arXiv:2308.07209. Reference code: none released (the paper says "code will be
    available"); an awesome-list links https://github.com/Dtudy/UDFC, which we could not inspect.

    Without any data or fine-tuning, every ``conv -> BatchNorm -> activation -> conv`` chain loses
    ``round(prune_ratio * C)`` output channels (smallest L1 norm of the BN-folded filter) and all conv/linear
    weights are fake-quantized per output channel to ``weight_bits``. The information lost in layer ``l`` is
    restored by reconstructing the INPUT channels of layer ``l+1`` (what the paper does): with the activations
    ``a`` of layer ``l``, the damaged ones ``b`` and the damage ``d`` (``a_c`` for a pruned channel,
    ``a_j - b_j`` for a quantized one), the next layer's weights become ``V'_K = V_K + V R^T`` and its bias
    ``+ V delta``, where

    .. math::  R = (\\mathrm{Cov}(b_K) + \\lambda I)^{-1}\\,\\mathrm{Cov}(b_K, d), \\qquad
               \\delta = E[d] - E[b_K] R

    minimise the expected reconstruction error ``E||Z^{(l+1)} - \\hat Z^{(l+1)}||^2`` of the next feature map.
    The moments come from BN statistics alone: each BN output is Gaussian with BN's own moments,
    ``h_j ~ N(beta_j, gamma_j^2)``, channels correlate as their filters would on a white input
    (``corr(h_i, h_j) = cos(W_i, W_j)``), and the draws are pushed through the real activation (seeded Monte
    Carlo; no data). Channels are then removed physically through
    Torch-Pruning's dependency graph.

    What is confirmed from the paper (abstract, Fig. 1 caption, and a third-party summary): no data and no
    fine-tuning; pruning and quantization together; the assumption that a damaged channel is partly
    recoverable as a linear combination of other channels; compensation in the input channels of layer
    ``l+1`` to keep ``Z^{(l+1)}``; a reconstruction error with a closed-form minimiser. NOT confirmed (we could
    not read the method section): the paper's exact equations, its two scale factors ``S`` (pruning) and
    ``S'`` (quantization), and how it uses BN statistics. The Gaussian moment model, the multivariate
    regression (whose rows for pruned channels play the role of ``S`` and whose diagonal for quantized ones
    that of ``S'``), the ridge and the bias correction are ours; without an activation and with
    ``input_model="shared"`` the pruning rows reduce to the spec's ridge least squares
    ``s* = (A A^T + lambda I)^{-1} A a_c`` over the folded filters with ``kappa = 0``, the bias mismatch being
    corrected exactly by ``delta`` instead. Only chains whose channels are not coupled elsewhere are pruned (in
    a ResNet: the inner convs of each block); the others are only quantized.

    Usage: ``apply_at="start"`` compresses in ``setup()`` (before optimizers and DDP exist) the model as given,
    e.g. one with pretrained weights; validation/testing then see the compressed model (training after
    compression is possible but moves weights off the quantization grid). ``apply_at="train_end"`` compresses
    after training; checkpoints saved before that hold the uncompressed model, so pass ``save_path`` to write
    the compressed one. Params, MACs and measured latency before/after go to the loggers
    (``data_free_compression/*``) and to :attr:`report`. The state holds the pruning history; a fresh model
    gets the compressed shapes rebuilt before Lightning loads a compressed checkpoint into it. Under DDP,
    rank 0 compresses and broadcasts the result. ``ddp_spawn`` fits are refused (the changed shapes cannot be
    copied back to the main process); FSDP/DeepSpeed are refused.

    Args:
        prune_ratio: share of output channels removed per prunable layer, in (0, 1); ``None`` = quantize only.
        weight_bits: bits per weight in [2, 16]; ``None`` = prune only.
        compensate: apply the closed-form reconstruction; ``False`` = naive prune + quantize.
        bias_correction: correct the expected shift in the next layer's bias (or its BatchNorm mean).
        apply_at: ``"start"`` or ``"train_end"``.
        importance: ``"l1_folded"`` or ``"l1"`` channel ranking.
        ridge: relative ridge of the reconstruction.
        num_samples: Gaussian draws for the activation moments.
        seed: seed of the draws.
        layers: glob patterns of layer names to compress (relative to the LightningModule, e.g. ``net.layer*``).
        min_channels: fewest channels a pruned layer may keep.
        input_model: Gaussian model of the channels from BN statistics: ``"per_channel"`` (BN's exact
            marginals, white-input correlations), ``"fitted"`` or ``"shared"``; see
            :func:`reconstruction_from_bn_statistics`.
        example_input_shape: one input's shape without batch; default: the module's ``example_input_array``
            or ``input_shape``. Only shapes are used, never data.
        latency_batch_size: batch size of the latency measurement.
        latency_repeats: timed passes per latency measurement (0 = skip latency).
        save_path: with ``apply_at="train_end"``, write a checkpoint of the compressed model here (a relative
            path is taken relative to ``trainer.default_root_dir``).
        name: distinguishes several instances in a checkpoint.

    Example:
        >>> from lightning_ext.modules import ImageClassifier
        >>> net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        ...                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
        >>> model = ImageClassifier(net, num_classes=10, image_size=8)
        >>> cb = DataFreeCompression(prune_ratio=0.25, weight_bits=6, latency_repeats=0, num_samples=1024)
        >>> report = cb.compress(model)  # what the callback does in setup() with apply_at="start"
        >>> model.net[0].out_channels, model.net[5].in_features, report.params_after < report.params_before
        (12, 12, True)
        >>> trainer = Trainer(callbacks=[DataFreeCompression(prune_ratio=0.3, weight_bits=6)])  # doctest: +SKIP
        >>> trainer.test(model, datamodule=DigitsDataModule())  # compresses, then tests  # doctest: +SKIP
    """

    def __init__(
        self,
        prune_ratio: Optional[float] = 0.3,
        weight_bits: Optional[int] = 6,
        compensate: bool = True,
        bias_correction: bool = True,
        apply_at: str = "start",
        importance: str = "l1_folded",
        ridge: float = 1e-3,
        num_samples: int = 8192,
        seed: int = 0,
        layers: Optional[list[str]] = None,
        min_channels: int = 1,
        input_model: str = "per_channel",
        example_input_shape: Optional[list[int]] = None,
        latency_batch_size: int = 32,
        latency_repeats: int = 20,
        save_path: Optional[str] = None,
        name: Optional[str] = None,
    ) -> None:
        super().__init__()
        _check_arguments(prune_ratio, weight_bits, importance, ridge, num_samples, min_channels, input_model)
        if apply_at not in _APPLY_AT:
            raise ValueError(f"`apply_at` must be one of {_APPLY_AT}, got {apply_at!r}.")
        if example_input_shape is not None and (
            not all(isinstance(s, int) and s > 0 for s in example_input_shape) or not example_input_shape
        ):
            raise ValueError(
                f"`example_input_shape` must be positive integers (no batch), got {example_input_shape!r}."
            )
        if not isinstance(latency_batch_size, int) or latency_batch_size < 1:
            raise ValueError(f"`latency_batch_size` must be an integer >= 1, got {latency_batch_size!r}.")
        if not isinstance(latency_repeats, int) or latency_repeats < 0:
            raise ValueError(f"`latency_repeats` must be an integer >= 0 (0 skips latency), got {latency_repeats!r}.")
        if save_path is not None and apply_at != "train_end":
            raise ValueError("`save_path` is used with apply_at='train_end' only; with 'start' the usual "
                             "ModelCheckpoint already saves the compressed model.")
        self.prune_ratio, self.weight_bits = prune_ratio, weight_bits
        self.compensate, self.bias_correction = compensate, bias_correction
        self.apply_at, self.importance, self.ridge = apply_at, importance, ridge
        self.num_samples, self.seed, self.layers, self.min_channels = num_samples, seed, layers, min_channels
        self.input_model = input_model
        self.example_input_shape = list(example_input_shape) if example_input_shape is not None else None
        self.latency_batch_size, self.latency_repeats = latency_batch_size, latency_repeats
        self.save_path, self.name = save_path, name
        self.saved_checkpoint: Optional[str] = None
        self.applied = False
        self.history: list[dict] = []
        self.summary: dict[str, float] = {}
        self.report: Optional[CompressionReport] = None
        self._restored = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(prune_ratio=self.prune_ratio, weight_bits=self.weight_bits, name=self.name)

    # -- inputs -------------------------------------------------------------------------------------------
    def _example_inputs(self, module: nn.Module, batch: int = 2) -> torch.Tensor:
        params = list(module.parameters())
        device = params[0].device if params else torch.device("cpu")
        dtype = params[0].dtype if params and params[0].is_floating_point() else torch.float32
        shape = self.example_input_shape
        if shape is None:
            array = getattr(module, "example_input_array", None)
            if isinstance(array, torch.Tensor):
                shape = list(array.shape[1:])
        if shape is None and getattr(module, "input_shape", None) is not None:
            shape = list(module.input_shape)
        if shape is None:
            raise ValueError(
                "DataFreeCompression needs the shape of one input to trace the model (no data is read): set "
                "`example_input_shape`, or `example_input_array`/`input_shape` on the LightningModule."
            )
        return torch.zeros(batch, *shape, device=device, dtype=dtype)

    # -- the work -----------------------------------------------------------------------------------------
    def compress(self, module: nn.Module) -> CompressionReport:
        """Compress ``module`` now (no Trainer needed) and return the report."""
        measure = self.latency_repeats > 0
        example = self._example_inputs(module, self.latency_batch_size if measure else 2)
        report = data_free_compress(
            module, example, self.prune_ratio, self.weight_bits, self.compensate, self.bias_correction,
            self.importance, self.ridge, self.num_samples, self.seed, self.layers, self.min_channels,
            self.input_model, measure=measure, latency_repeats=self.latency_repeats,
        )
        self._record(module, report.history, report)
        return report

    def _record(self, module: nn.Module, history: list, report: Optional[CompressionReport]) -> None:
        self.applied, self.history = True, [dict(h) for h in history]
        self.report = report
        if report is not None:
            self.summary = report.metrics()
        _mark(module, self.state_key, self.history)

    def _compress_in_trainer(self, trainer, pl_module) -> None:
        if trainer.world_size > 1:
            payload = None
            if trainer.global_rank == 0:
                report = self.compress(pl_module)
                state = {k: v.detach().cpu() for k, v in pl_module.state_dict().items()}
                payload = (report.history, state, report.metrics())
            payload = trainer.strategy.broadcast(payload, src=0)
            if trainer.global_rank != 0:
                history, state, metrics = payload
                apply_compression_history(pl_module, self._example_inputs(pl_module), history)
                pl_module.load_state_dict(state)
                self._record(pl_module, history, None)
                self.summary = dict(metrics)
        else:
            self.compress(pl_module)
        if trainer.global_rank == 0 and self.report is not None:
            rank_zero_info(self.report.summary())
            metrics = {f"data_free_compression/{k}": v for k, v in self.summary.items()}
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)

    # -- hooks --------------------------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        _refuse_strategy(trainer)
        self._restored = False
        hooks = getattr(pl_module, "_lightning_ext_udfc_hooks", set())
        if self.state_key not in hooks:
            pl_module.register_load_state_dict_pre_hook(_RebuildShapesBeforeLoad(self))
            object.__setattr__(pl_module, "_lightning_ext_udfc_hooks", hooks | {self.state_key})
        mark = getattr(pl_module, _MARKER, {}).get(self.state_key)
        if mark is not None:  # this model is already compressed by this callback (e.g. fit, then test)
            self.applied, self.history = True, [dict(h) for h in mark["history"]]
            return
        self.applied, self.history = False, []
        if stage == "fit" and _spawns_workers(trainer):
            raise RuntimeError(
                "DataFreeCompression cannot run inside a ddp_spawn/ddp_fork fit: it changes layer shapes in the "
                "worker processes, and Lightning copies the weights back into the main process's uncompressed "
                "model. Use strategy='ddp' (one launched process per device), or compress before fitting "
                "(`DataFreeCompression(...).compress(model)` or `data_free_compress`)."
            )
        if self.apply_at == "start":
            self._compress_in_trainer(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.apply_at != "train_end" or self.applied or self._restored:
            return
        if getattr(pl_module, _MARKER, {}).get(self.state_key) is not None:
            return
        self._compress_in_trainer(trainer, pl_module)
        if self.save_path:
            path = Path(self.save_path)
            if not path.is_absolute():
                path = Path(trainer.default_root_dir) / path
            path.parent.mkdir(parents=True, exist_ok=True)
            trainer.save_checkpoint(str(path))
            self.saved_checkpoint = str(path)
            rank_zero_info(f"DataFreeCompression: saved the compressed model to {path}.")

    # -- state ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"applied": self.applied, "history": [dict(h) for h in self.history], "summary": dict(self.summary)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.applied = bool(state_dict.get("applied", False))
        self.history = [dict(h) for h in state_dict.get("history", [])]
        self.summary = dict(state_dict.get("summary", {}))
        self._restored = self.applied
