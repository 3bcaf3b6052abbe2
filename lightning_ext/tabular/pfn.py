"""The prior-data fitted network (PFN) as plain torch: the transformer with the train/test attention rule and the
Riemann ("bar") distribution for regression.

Paper: Müller, Hollmann, Pineda Arango, Grabocka and Hutter, "Transformers Can Do Bayesian Inference", ICLR 2022
(arXiv 2112.10510); the tabular variant follows Hollmann et al., "TabPFN", ICLR 2023 (arXiv 2207.01848).
Reference code: https://github.com/automl/TransformersCanDoBayesianInference (``bar_distribution.py``,
``transformer.py``), https://github.com/automl/TabPFN (``tabpfn/transformer.py``, ``layer.py``), written anew here.

One token per data point: ``enc_x(x_n) + enc_y(y_n)`` for the first ``pos`` points (the training set, the
"context") and ``enc_x(x_n)`` alone for the rest (the queries). No positional encoding, so the output is invariant
to the order of the points. In every layer each token attends to the training tokens only: training tokens attend
among themselves, queries attend to the training tokens and never to each other or to themselves (TabPFN's
``efficient_eval_masking``), so a query's prediction does not depend on the other queries.

The Riemann distribution with borders ``b_0 < ... < b_K`` turns ``K`` logits into the density
``p(y) = softmax(logits)_k / (b_{k+1} - b_k)`` for ``y`` in bucket ``k``; the prior-predictive loss is its negative
log. The full-support version replaces the two outer buckets by half-normal tails, each holding half its bucket's
mass inside the bucket: ``p(y) = p_0 * HalfNormal(s_0).pdf(b_1 - y)`` for ``y < b_1`` with
``s_0 = w_0 / HalfNormal(1).icdf(0.5)``, and symmetrically on the right.

Input handling (inside the model, so a user passes raw tables): features are z-scored per dataset with the
training points' mean and standard deviation (``zscore=True``, TabPFN's choice; off for the GP prior, where it
would erase the scale that the kernel's lengthscale refers to), clipped to ``[-100, 100]``, missing values (NaN) become 0 (the
training mean), and the ``d`` used features are zero-padded to ``max_features`` and multiplied by
``sqrt(max_features / d)`` so the input norm does not depend on ``d`` (TabPFN scales by ``max_features / d``).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["PFNTransformer", "bar_nll", "bar_mean", "quantile_borders", "normalize_features"]


def _halfnormal_log_pdf(z: Tensor, scale: Tensor) -> Tensor:
    """Log density of a half-normal with ``scale`` at ``z >= 0``."""
    return 0.5 * math.log(2.0 / math.pi) - torch.log(scale) - 0.5 * (z / scale) ** 2


# HalfNormal(1).icdf(0.5) = Phi^-1(0.75)
_HALF_NORMAL_MEDIAN = math.sqrt(2.0) * torch.erfinv(torch.tensor(0.5, dtype=torch.float64)).item()


def bar_nll(logits: Tensor, y: Tensor, borders: Tensor, full_support: bool = True) -> Tensor:
    """PFN Riemann (bar) distribution loss: ``-log(p_k / w_k)`` for the bucket ``k`` holding ``y``, half-normal
    tails on the outer buckets.

    One value per target.

    Args:
        logits: ``(..., K)`` bucket logits.
        y: ``(...)`` targets.
        borders: ``(K + 1,)`` increasing bucket borders.
        full_support: half-normal tails on the outer buckets (targets beyond the borders get a finite density);
            otherwise targets are clamped into ``[b_0, b_K]``.

    Example:
        >>> borders = torch.tensor([-1.0, 0.0, 1.0, 2.0])
        >>> round(float(bar_nll(torch.zeros(3), torch.tensor(0.5), borders)), 4)  # log(3 * 1)
        1.0986
    """
    logits = logits.float()
    borders = borders.to(logits)
    y = y.to(logits)
    widths = borders[1:] - borders[:-1]
    num = widths.numel()
    idx = (torch.searchsorted(borders, y.contiguous(), right=True) - 1).clamp(0, num - 1)
    log_p = torch.log_softmax(logits, -1).gather(-1, idx.unsqueeze(-1)).squeeze(-1)
    log_density = log_p - torch.log(widths[idx])
    if full_support:
        left, right = idx == 0, idx == num - 1
        s_left, s_right = widths[0] / _HALF_NORMAL_MEDIAN, widths[-1] / _HALF_NORMAL_MEDIAN
        tail_left = log_p + _halfnormal_log_pdf((borders[1] - y).clamp_min(0), s_left)
        tail_right = log_p + _halfnormal_log_pdf((y - borders[-2]).clamp_min(0), s_right)
        log_density = torch.where(left, tail_left, torch.where(right, tail_right, log_density))
    return -log_density


def bar_mean(logits: Tensor, borders: Tensor, full_support: bool = True) -> Tensor:
    """Mean of the Riemann distribution of ``logits`` (``(..., K)`` -> ``(...)``)."""
    probs = torch.softmax(logits.float(), -1)
    borders = borders.to(probs)
    widths = borders[1:] - borders[:-1]
    centers = borders[:-1] + widths / 2
    if full_support:  # the mean of a half-normal with scale s is s * sqrt(2 / pi)
        centers = centers.clone()
        centers[0] = borders[1] - widths[0] / _HALF_NORMAL_MEDIAN * math.sqrt(2 / math.pi)
        centers[-1] = borders[-2] + widths[-1] / _HALF_NORMAL_MEDIAN * math.sqrt(2 / math.pi)
    return probs @ centers


def quantile_borders(samples: Tensor, num_buckets: int) -> Tensor:
    """``num_buckets + 1`` borders that put the same number of ``samples`` (targets drawn from the prior) in each
    bucket, from the smallest to the largest sample (the official ``get_bucket_limits``' rule).

    Example:
        >>> quantile_borders(torch.arange(8.0), 4).tolist()
        [0.0, 1.5, 3.5, 5.5, 7.0]
    """
    ys = samples.detach().flatten().double()
    ys = ys[torch.isfinite(ys)]
    if ys.numel() < 2 * num_buckets:
        raise ValueError(f"quantile_borders needs at least {2 * num_buckets} finite samples for {num_buckets} buckets, "
                         f"got {ys.numel()}.")
    ys = ys[: ys.numel() - ys.numel() % num_buckets].sort().values
    per = ys.numel() // num_buckets
    inner = (ys[per - 1 :: per][:-1] + ys[per::per]) / 2
    borders = torch.cat([ys[:1], inner, ys[-1:]]).float()
    if not bool((borders[1:] > borders[:-1]).all()):
        raise ValueError("quantile_borders: the prior's targets have repeated values (a discrete target?); use fewer "
                         "buckets or a continuous prior.")
    return borders


def normalize_features(x: Tensor, pos: int, max_features: int, zscore: bool = True) -> Tensor:
    """z-score ``(B, N, d)`` features with the first ``pos`` points' statistics (NaN-aware; skipped when not
    ``zscore``), clip to [-100, 100], set NaN to 0, pad to ``max_features`` and scale by ``sqrt(max_features / d)``."""
    d = x.shape[-1]
    if d > max_features:
        raise ValueError(f"The model takes at most max_features={max_features} features, got {d}.")
    x = x.float()
    if not zscore:
        return F.pad(torch.nan_to_num(x, nan=0.0) * math.sqrt(max_features / d), (0, max_features - d))
    train = x[:, :pos]
    observed = ~torch.isnan(train)
    count = observed.sum(1, keepdim=True).clamp_min(1)
    mean = torch.where(observed, train, 0.0).sum(1, keepdim=True) / count
    var = torch.where(observed, (train - mean) ** 2, 0.0).sum(1, keepdim=True) / (count - 1).clamp_min(1)
    std = var.sqrt()
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    x = ((x - mean) / std).clamp(-100, 100)
    x = torch.nan_to_num(x, nan=0.0)
    x = x * math.sqrt(max_features / d)
    return F.pad(x, (0, max_features - d))


class _Layer(nn.Module):
    """Pre-LayerNorm transformer layer whose keys and values are the first ``pos`` tokens only."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float) -> None:
        super().__init__()
        self.nhead = nhead
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.ff = nn.Sequential(nn.Linear(d_model, dim_feedforward), nn.GELU(), nn.Dropout(dropout),
                                nn.Linear(dim_feedforward, d_model))
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: Tensor, pos: int) -> Tensor:
        b, n, d = h.shape
        q, k, v = self.qkv(self.norm1(h)).view(b, n, 3, self.nhead, d // self.nhead).permute(2, 0, 3, 1, 4)
        # every token (training and query) attends to the training tokens only
        a = F.scaled_dot_product_attention(q, k[:, :, :pos], v[:, :, :pos],
                                           dropout_p=self.dropout.p if self.training else 0.0)
        h = h + self.dropout(self.out(a.transpose(1, 2).reshape(b, n, d)))
        return h + self.dropout(self.ff(self.norm2(h)))


class PFNTransformer(nn.Module):
    """The PFN: maps a training set ``(x[:, :pos], y_train)`` and queries ``x[:, pos:]`` to one output vector per
    query (class logits, or Riemann-distribution bucket logits).

    Args:
        max_features: features the model accepts (fewer are padded).
        num_outputs: logits per query (``max_classes`` or the number of buckets).
        d_model: token width.
        nhead: attention heads.
        num_layers: transformer layers.
        dim_feedforward: hidden width of the feed-forward blocks.
        dropout: dropout in attention outputs and feed-forward blocks.
        zscore: z-score the features with the training points' statistics (TabPFN); ``False`` feeds them as
            they are (the PFN paper's GP experiments, where the absolute scale of ``x`` carries the lengthscale).

    Example:
        >>> net = PFNTransformer(max_features=4, num_outputs=3, d_model=16, nhead=2, num_layers=1, dim_feedforward=32)
        >>> net(torch.randn(2, 10, 4), torch.randint(0, 3, (2, 6)).float()).shape
        torch.Size([2, 4, 3])
    """

    def __init__(self, max_features: int, num_outputs: int, d_model: int = 128, nhead: int = 4, num_layers: int = 4,
                 dim_feedforward: int = 256, dropout: float = 0.0, zscore: bool = True) -> None:
        super().__init__()
        self.zscore = zscore
        if d_model % nhead:
            raise ValueError(f"d_model={d_model} must be divisible by nhead={nhead}.")
        self.max_features = max_features
        self.enc_x = nn.Linear(max_features, d_model)
        self.enc_y = nn.Linear(1, d_model)
        self.layers = nn.ModuleList([_Layer(d_model, nhead, dim_feedforward, dropout) for _ in range(num_layers)])
        self.norm = nn.LayerNorm(d_model)
        self.decoder = nn.Sequential(nn.Linear(d_model, dim_feedforward), nn.GELU(),
                                     nn.Linear(dim_feedforward, num_outputs))

    def forward(self, x: Tensor, y_train: Tensor, pos: Optional[int] = None) -> Tensor:
        """``x`` ``(B, N, d)`` with the training points first, ``y_train`` ``(B, pos)`` -> ``(B, N - pos, out)``."""
        pos = y_train.shape[1] if pos is None else pos
        if not 0 < pos < x.shape[1]:
            raise ValueError(f"Need at least one training point and one query; got {pos} training points of "
                             f"{x.shape[1]}.")
        h = self.enc_x(normalize_features(x, pos, self.max_features, self.zscore))
        y_tok = self.enc_y(y_train[:, :pos].float().unsqueeze(-1).to(h.dtype))
        h = torch.cat([h[:, :pos] + y_tok, h[:, pos:]], 1)
        for layer in self.layers:
            h = layer(h, pos)
        return self.decoder(self.norm(h[:, pos:]))
