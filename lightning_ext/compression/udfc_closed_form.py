"""UDFC's closed form: per-channel weight quantization and the reconstruction of the next layer from BN statistics.

Part of the pure UDFC core (:mod:`lightning_ext.compression.udfc`); see
:func:`reconstruction_from_bn_statistics` for the model and the equations.

Example:
    >>> quantize_per_channel(torch.tensor([[0.1, -0.5, 0.3]]), 2)
    tensor([[ 0.0000, -0.5000,  0.5000]])
"""

from __future__ import annotations

from typing import Literal, Optional, Sequence, get_args

import torch
from torch import nn

from lightning_ext.compression.graph import PruningError
from lightning_ext.core.validation import check_choice

__all__ = ["CompressionError", "quantize_per_channel", "reconstruction_from_bn_statistics"]

InputModel = Literal["per_channel", "fitted", "shared"]
_INPUT_MODELS = get_args(InputModel)


class CompressionError(PruningError):
    """A compression request that cannot be carried out as asked (nothing is changed when it is raised)."""


def check_bits(name: str, bits) -> int:
    """``bits`` if it is an ``int`` in [2, 16] (floats such as ``6.0`` are refused), else one ValueError line."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
        raise ValueError(f"`{name}` must be an integer in [2, 16]; got {bits!r}.")
    return bits


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
    check_bits("bits", bits)
    flat = weight.detach().reshape(weight.shape[0], -1).double()
    qmax = 2 ** (bits - 1) - 1
    scale = flat.abs().amax(dim=1, keepdim=True) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(flat / scale), -qmax, qmax) * scale
    return q.reshape(weight.shape).to(weight.dtype)



_CHANNELWISE_PREFIXES = (
    "AvgPool", "AdaptiveAvgPool", "Mean", "Clone", "View", "Reshape", "UnsafeView",
    "Squeeze", "Unsqueeze", "Flatten", "Alias",
)


def _activation_spec(grad_fn) -> Optional[tuple]:
    """The activation an elementwise autograd node applies, as a picklable spec; ``("skip",)`` for channel-wise
    linear ops (average pooling, views); ``("max_pool", window)`` for a max-pool with a fixed window (not linear:
    the moments are taken through the max, see :func:`reconstruction_from_bn_statistics`); ``None`` when
    unsupported (e.g. an adaptive max-pool, whose window depends on the input size)."""
    name = type(grad_fn).__name__
    if name.startswith("MaxPool"):
        window = 1
        for k in grad_fn._saved_kernel_size:
            window *= int(k)
        return ("max_pool", window)
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
    if kind == "max_pool":  # rows are independent draws of the window's positions, grouped by `window`
        return x.reshape(-1, spec[1], x.shape[-1]).amax(dim=1)
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



def _fold(producer: nn.Module, bn: nn.Module) -> dict[str, torch.Tensor]:
    w = producer.weight.detach().reshape(producer.weight.shape[0], -1).double().cpu()
    var = bn.running_var.detach().double().cpu()
    std = torch.sqrt(var + bn.eps)
    gamma, beta = bn.weight.detach().double().cpu(), bn.bias.detach().double().cpu()
    mean = bn.running_mean.detach().double().cpu()
    bias = producer.bias.detach().double().cpu() if producer.bias is not None else torch.zeros_like(mean)
    scale = gamma / std
    return {"w": w, "var": var, "scale": scale, "beta": beta, "folded_bias": beta + scale * (bias - mean)}


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
    input_model: InputModel = "per_channel",
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

    A max-pool between the BN and the next layer (spec ``("max_pool", m)``) is not linear, so the regression is
    fitted on the POOLED activations: each sample draws the ``m`` positions of a pooling window independently
    (our assumption: no spatial correlation is known without data) and the damage, the regressors and the bias
    correction are all taken after the max. Treating the pool as the identity (what this function did before)
    assumes perfectly correlated positions instead.

    Args:
        weight: ``(C, F)`` weights of the layer (one row per output channel).
        running_var: ``(C,)`` BN running variance of the layer's output.
        bn_weight: ``(C,)`` BN scale ``gamma``.
        bn_bias: ``(C,)`` BN shift ``beta`` (the mean of the BN output).
        pruned: indices of the pruned output channels.
        quantized_weight: ``(C, F)`` quantized weights; ``None`` when not quantizing.
        activations: activation specs between BN and the next layer, in order (``[]`` for none;
            ``("max_pool", m)`` for a max-pool over ``m`` positions).
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
    check_choice("input_model", input_model, _INPUT_MODELS)
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
    window = 1
    for spec in activations:
        if spec[0] == "max_pool":
            window *= int(spec[1])
    done = 0
    while done < num_samples:
        n = min(2048, num_samples - done)
        z = torch.randn(n * window, factor.shape[1], generator=gen, dtype=torch.float64)
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


