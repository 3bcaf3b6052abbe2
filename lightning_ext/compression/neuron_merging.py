"""Neuron Merging, the pure core: data-free structured pruning that folds each pruned channel into its most
similar kept channel of the same layer (no Trainer, no data, no fine-tuning).

Paper: Kim, Kim, Lee, Kwak, "Neuron Merging: Compensating for Pruned Neurons", NeurIPS 2020, arXiv 2010.13160.
Reference code: https://github.com/friendshipkim/neuron-merging (``decompose.py``,
``create_scaling_mat_conv_thres_bn``). UDFC (:mod:`lightning_ext.compression.udfc`) builds on it: where UDFC
regresses the damage on all kept channels, Neuron Merging replaces a pruned channel ``i`` by ONE kept channel
``k`` times a scale, ``a_i ~ S_ik a_k``, and moves that share into the next layer's weights:
``V'_k = V_k + S_ik V_i``. For ``conv -> BatchNorm -> ReLU`` with filters ``W_i = s W_k`` (``s > 0``), the BN
outputs satisfy ``y_i = S y_k + c`` with

.. math::  S = s\\,\\frac{\\gamma_i/\\sigma_i}{\\gamma_k/\\sigma_k}, \\qquad
           c = \\beta_i + \\frac{\\gamma_i}{\\sigma_i}(s\\mu_k - \\mu_i) - S\\beta_k,

so ``relu(y_i) = S relu(y_k)`` exactly when ``c = 0`` and ``S > 0`` (positive homogeneity; the same holds for a
max-pool after the ReLU, ``max(S a) = S max(a)``). The partner ``k`` minimises
``lamda * cosine distance(W_i, W_k) + (1 - lamda) * minmax-normalised |c| / S`` and the merge is skipped when its
cosine similarity is below ``threshold`` (the official defaults for VGG-16 on CIFAR-10: ``threshold=0.1``,
``lamda=0.85``). ``convention="official"`` reproduces the reference code's numbers, which differ from the
derivation above: it uses ``S = s (gamma_k / gamma_i) (var_i / var_k)`` with the running VARIANCE (no epsilon)
for the BN factor, inverted relative to ``S`` above, and the matching bias term
``|gamma_k / var_k (s (mu_i - var_i beta_i / gamma_i) - mu_k) + beta_k| / S``. Ours, not the paper's: merges with
``S <= 0`` are skipped by default (``positive_only``; a negative scale does not commute with ReLU or max-pool;
the reference code merges them), and the channels to prune are chosen by the caller (the reference code ranks
raw filters by L1 norm).

Example:
    >>> w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.1]])
    >>> ones, zeros = torch.ones(3), torch.zeros(3)
    >>> out = merge_matrix(w, kept=[0, 1], bn_weight=ones, bn_bias=zeros, running_mean=zeros, running_var=ones,
    ...                    eps=0.0)
    >>> [round(v, 4) for v in out["S"][2].tolist()]  # channel 2 ~ 2.0025 x channel 0 (norm ratio; same BN)
    [2.0025, 0.0]
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Sequence, get_args

import torch
from torch import nn

from lightning_ext.core.validation import check_choice, check_number

__all__ = ["merge_matrix", "neuron_merging_compress"]

Convention = Literal["exact", "official"]
_CONVENTIONS = get_args(Convention)


def _check(threshold: float, lamda: float, convention: str) -> None:
    check_number("threshold", threshold, low=0, high=1)
    check_number("lamda", lamda, low=0, high=1)
    check_choice("convention", convention, _CONVENTIONS)


@torch.no_grad()
def merge_matrix(
    weight: torch.Tensor,
    kept: Sequence[int],
    bn_weight: torch.Tensor,
    bn_bias: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    threshold: float = 0.1,
    lamda: float = 0.85,
    convention: Convention = "exact",
    positive_only: bool = True,
    eps: float = 1e-5,
) -> dict[str, Any]:
    """Neuron Merging's scaling matrix for one ``conv/linear -> BatchNorm`` layer.

    Args:
        weight: ``(C, ...)`` weights of the layer (one row per output channel).
        kept: indices of the kept channels (the others are pruned and merged when possible).
        bn_weight: ``(C,)`` BN scale ``gamma``.
        bn_bias: ``(C,)`` BN shift ``beta``.
        running_mean: ``(C,)`` BN running mean ``mu``.
        running_var: ``(C,)`` BN running variance.
        threshold: smallest cosine similarity of a merge in [0, 1] (0 merges every pruned channel).
        lamda: weight of the cosine distance against the bias mismatch in the partner's score, in [0, 1].
        convention: ``"exact"`` (the derivation in the module docstring) or ``"official"`` (the reference code).
        positive_only: skip merges whose scale is not positive.
        eps: BN epsilon (``"exact"`` only; the reference code uses the variance without it).

    Returns:
        ``{"S": (C, |K|) float64 (1 on the kept channels' own column, the scale at the partner of a merged
        pruned channel, 0 elsewhere), "partner": {pruned: kept index or -1}, "merged": int, "skipped_threshold":
        int, "skipped_sign": int}``.
    """
    _check(threshold, lamda, convention)
    w = weight.detach().reshape(weight.shape[0], -1).double().cpu()
    channels = w.shape[0]
    kept = [int(k) for k in kept]
    if not kept or len(set(kept)) != len(kept) or not all(0 <= k < channels for k in kept):
        raise ValueError(f"`kept` must be distinct channel indices in [0, {channels}); got {kept}.")
    gamma, beta = bn_weight.detach().double().cpu(), bn_bias.detach().double().cpu()
    mu, var = running_mean.detach().double().cpu(), running_var.detach().double().cpu()
    norms = w.norm(dim=1)
    unit = w / torch.where(norms > 0, norms, torch.ones_like(norms))[:, None]
    cos_dist = 1.0 - unit @ unit.T
    kept_t = torch.tensor(kept)
    out = torch.zeros(channels, len(kept), dtype=torch.float64)
    out[kept_t, torch.arange(len(kept))] = 1.0
    partner, merged, skipped_threshold, skipped_sign = {}, 0, 0, 0
    sigma = var if convention == "official" else torch.sqrt(var + eps)
    for i in range(channels):
        if i in kept:
            continue
        s = norms[i] / torch.where(norms[kept_t] > 0, norms[kept_t], torch.ones_like(norms[kept_t]))
        g_k, b_k, m_k, sg_k = gamma[kept_t], beta[kept_t], mu[kept_t], sigma[kept_t]
        if convention == "official":
            scale = s * (g_k / gamma[i]) * (sigma[i] / sg_k)
            bias = ((g_k / sg_k) * (s * (-(sigma[i] * beta[i] / gamma[i]) + mu[i]) - m_k) + b_k).abs() / scale
        else:
            scale = s * (gamma[i] / sigma[i]) / (g_k / sg_k)
            c = beta[i] + gamma[i] / sigma[i] * (s * m_k - mu[i]) - scale * b_k
            bias = c.abs() / scale.abs()
        span = bias.max() - bias.min()
        bias_n = (bias - bias.min()) / span if span > 0 else torch.zeros_like(bias)
        score = lamda * cos_dist[i, kept_t] + (1 - lamda) * bias_n
        j = int(torch.argmin(score))
        if threshold and 1.0 - float(cos_dist[i, kept[j]]) < threshold:
            partner[i] = -1
            skipped_threshold += 1
            continue
        if positive_only and not float(scale[j]) > 0:
            partner[i] = -1
            skipped_sign += 1
            continue
        out[i, j] = scale[j]
        partner[i] = kept[j]
        merged += 1
    return {"S": out, "partner": partner, "merged": merged, "skipped_threshold": skipped_threshold,
            "skipped_sign": skipped_sign}


def _merge_reconstruction(module, bn, chain, pruned, q, *, threshold, lamda, convention, positive_only, **_):
    """Neuron Merging in UDFC's ``reconstruct`` format: ``R`` (|K| x C) holds the scales, ``delta`` is zero."""
    channels = module.weight.shape[0]
    kept = [j for j in range(channels) if j not in set(pruned)]
    out = merge_matrix(module.weight, kept, bn.weight, bn.bias, bn.running_mean, bn.running_var, threshold, lamda,
                       convention, positive_only, bn.eps)
    r = torch.zeros(len(kept), channels, dtype=torch.float64)
    for i in pruned:
        r[:, i] = out["S"][i]
    return {"kept": torch.tensor(kept), "R": r, "delta": torch.zeros(channels, dtype=torch.float64),
            "merged": out["merged"], "merge_skipped": out["skipped_threshold"] + out["skipped_sign"]}


def neuron_merging_compress(
    model: nn.Module,
    example_inputs: Any,
    pruning_ratio: float = 0.3,
    weight_bits: Optional[int] = None,
    threshold: float = 0.1,
    lamda: float = 0.85,
    convention: Convention = "exact",
    positive_only: bool = True,
    importance: str = "l1_folded",
    layers: Optional[Sequence[str]] = None,
    min_channels: int = 1,
    measure: bool = True,
    latency_repeats: int = 20,
):
    """Prune ``model`` in place with Neuron Merging (and optionally quantize its weights naively).

    Same chains, channel choice, physical removal and per-channel quantizer as
    :func:`~lightning_ext.compression.udfc.data_free_compress`; only the compensation differs (the merge of
    :func:`merge_matrix`, no bias correction, no compensation of the quantization). ``example_inputs`` is only
    traced. Returns UDFC's :class:`~lightning_ext.compression.udfc.CompressionReport` (rows carry ``merged``).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        ...                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
        >>> report = neuron_merging_compress(net.eval(), torch.zeros(2, 1, 8, 8), pruning_ratio=0.25, measure=False)
        >>> net[0].out_channels, net[5].in_features
        (6, 6)
    """
    from lightning_ext.compression.udfc import _compress, check_arguments

    _check(threshold, lamda, convention)
    check_arguments(pruning_ratio, weight_bits, importance, 1e-3, 8192, min_channels)
    if pruning_ratio is None:
        raise ValueError("`pruning_ratio` must be set: Neuron Merging compensates pruned channels only.")

    def reconstruct(module, bn, chain, pruned, q, **_):
        return _merge_reconstruction(module, bn, chain, pruned, q, threshold=threshold, lamda=lamda,
                                     convention=convention, positive_only=positive_only)

    was_training = model.training
    model.eval()
    try:
        report = _compress(model, example_inputs, pruning_ratio, weight_bits, True, False, importance, 0.0, 8192, 0,
                           layers, min_channels, "per_channel", True, measure, latency_repeats, "identity",
                           reconstruct)
    finally:
        model.train(was_training)
    report.config.update(method="neuron_merging", threshold=threshold, lamda=lamda, convention=convention,
                         positive_only=positive_only)
    return report
