"""EfficientTDNN: a weight-sharing supernet of SE-Res2 TDNNs with elastic depth, width and kernel size, and the
search for a sub-network under a MACs budget."""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lightning_ext.core.validation import check_positive_int

__all__ = ["EfficientTDNN", "LogMel", "evolutionary_search", "make_divisible", "recalibrate_batchnorm"]

Sel = Union[None, int, torch.Tensor]


def make_divisible(value: float, divisor: int = 8) -> int:
    """``value`` rounded to the nearest multiple of ``divisor`` (at least ``divisor``, never 10% below ``value``),
    the reference's ``_make_divisible``.

    Example:
        >>> make_divisible(0.35 * 128), make_divisible(0.25 * 64), make_divisible(3.0)
        (48, 16, 8)
    """
    out = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return out + divisor if out < 0.9 * value else out


def _take(w: torch.Tensor, dim: int, sel: Sel) -> torch.Tensor:
    if sel is None:
        return w
    if isinstance(sel, int):
        return w.narrow(dim, 0, sel)
    return w.index_select(dim, sel)


def _size(full: int, sel: Sel) -> int:
    return full if sel is None else (sel if isinstance(sel, int) else int(sel.numel()))


class _Conv(nn.Module):
    """Conv1d whose first/selected input and output channels and centred kernel are chosen per call; a smaller
    kernel is the centre of the larger one times a learned matrix initialised to the identity (the reference's
    ``k53``/``k31`` kernel transforms, after Once-for-All)."""

    def __init__(self, cin: int, cout: int, kernel: int = 1, dilation: int = 1, elastic: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv1d(cin, cout, kernel, padding=(kernel - 1) // 2 * dilation, dilation=dilation, bias=False)
        self.kernel, self.dilation = kernel, dilation
        self.transforms = nn.ParameterDict({str(k): nn.Parameter(torch.eye(k)) for k in range(kernel - 2, 0, -2)}
                                           if elastic else {})

    def forward(self, x: torch.Tensor, cin: Sel = None, cout: Sel = None, kernel: Optional[int] = None) -> torch.Tensor:
        kernel = self.kernel if kernel is None else kernel
        if kernel == self.kernel and _size(self.conv.in_channels, cin) == self.conv.in_channels \
                and _size(self.conv.out_channels, cout) == self.conv.out_channels:
            return self.conv(x)
        w = _take(_take(self.conv.weight, 1, cin), 0, cout)
        k = self.kernel
        while k > kernel:
            w = w[:, :, 1:-1] @ self.transforms[str(k - 2)]
            k -= 2
        return F.conv1d(x, w, None, 1, (kernel - 1) // 2 * self.dilation, self.dilation)


class _BN(nn.BatchNorm1d):
    """BatchNorm1d over the first/selected channels (their running statistics are updated in place)."""

    def forward(self, x: torch.Tensor, sel: Sel = None) -> torch.Tensor:  # type: ignore[override]
        if _size(self.num_features, sel) == self.num_features:
            return super().forward(x)
        if isinstance(sel, int):
            sel = torch.arange(sel, device=x.device)
        use_stats = self.training or self.running_mean is None
        mean, var = self.running_mean[sel], self.running_var[sel]
        out = F.batch_norm(x, None if use_stats else mean, None if use_stats else var, self.weight[sel],
                           self.bias[sel], use_stats, 0.0, self.eps)
        if self.training:  # the selected channels' statistics, with the layer's momentum (None: cumulative)
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                dims = [0, 2] if x.dim() == 3 else [0]
                n = x.numel() / x.size(1)
                # out of place: an earlier full-width pass of this step saved the buffers for its backward
                self.running_mean = self.running_mean.index_put((sel,), (1 - m) * mean + m * x.mean(dims))
                self.running_var = self.running_var.index_put(
                    (sel,), (1 - m) * var + m * x.var(dims, unbiased=False) * n / max(n - 1, 1))
        return out


class _Linear(nn.Linear):
    def forward(self, x: torch.Tensor, cin: Sel = None, cout: Sel = None) -> torch.Tensor:  # type: ignore[override]
        if _size(self.in_features, cin) == self.in_features and _size(self.out_features, cout) == self.out_features:
            return super().forward(x)
        return F.linear(x, _take(_take(self.weight, 1, cin), 0, cout), _take(self.bias, 0, cout))


class _Block(nn.Module):
    """SE-Res2 dilated TDNN block (ECAPA-TDNN's): 1x1 conv, Res2 dilated conv in ``scale`` groups, 1x1 conv, SE."""

    def __init__(self, channels: int, mid: int, kernel: int, dilation: int, scale: int, se_reduction: int,
                 elastic: bool) -> None:
        super().__init__()
        if mid % scale:
            raise ValueError(f"block width {mid} must be a multiple of res2_scale={scale}.")
        self.mid, self.scale, self.group = mid, scale, mid // scale
        self.first, self.first_bn = _Conv(channels, mid, elastic=elastic), _BN(mid)
        self.convs = nn.ModuleList(_Conv(self.group, self.group, kernel, dilation, elastic) for _ in range(scale - 1))
        self.bns = nn.ModuleList(_BN(self.group) for _ in range(scale - 1))
        self.last, self.last_bn = _Conv(mid, channels, elastic=elastic), _BN(channels)
        self.se_reduction = se_reduction
        self.reduce = _Linear(channels, max(1, channels // se_reduction))
        self.expand = _Linear(max(1, channels // se_reduction), channels)

    def forward(self, x: torch.Tensor, c: int, mid: int, kernel: int) -> torch.Tensor:
        a = mid // self.scale
        idx = None if mid == self.mid else torch.arange(self.mid, device=x.device).view(self.scale, -1)[:, :a].flatten()
        out = self.first_bn(F.relu(self.first(x, c, idx)), idx)
        parts, outs, sp = torch.split(out, a, 1), [], None
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
            sp = parts[i] if sp is None else parts[i] + sp
            sp = bn(F.relu(conv(sp, a, a, kernel)), a)
            outs.append(sp)
        out = torch.cat(outs + [parts[-1]], 1)
        out = self.last_bn(F.relu(self.last(out, idx, c)), c)
        r = max(1, c // self.se_reduction)
        gate = torch.sigmoid(self.expand(F.relu(self.reduce(out.mean(2), c, r)), r, c))
        return out * gate.unsqueeze(2)


class EfficientTDNN(nn.Module):
    r"""EfficientTDNN's dynamic TDNN supernet: a speaker-embedding network whose depth, widths and kernel sizes
    are chosen per forward pass from one set of shared weights.

    Paper: "EfficientTDNN: Efficient Architecture Search for Speaker Recognition" (Wang et al., IEEE/ACM TASLP 2022,
    arXiv 2103.13581); reference code https://github.com/mechanicalsea/sugar (``sugar/models/dynamictdnn.py``,
    ``sugar/modules/dynamicarch.py``), re-implemented here. Layout (the reference ``DynamicTDNN``): a Conv1d (kernel
    ``kernel_size``) + ReLU + BN from the ``n_mels`` features to ``channels``; ``num_blocks`` SE-Res2 blocks with
    dilations 2, 3, ... and dense residual aggregation (:math:`o_i = B_i(o_{i-1}) + \sum_{j<i} o_j`); a 1x1 conv
    over the concatenated block outputs to ``catconv_channels``; attentive statistics pooling; BN; a linear layer to
    ``embed_dim``; BN.

    A sub-network is a dict ``{"depth": d, "channels": c, "widths": [w_1..w_B], "kernels": [k_0..k_B],
    "catconv": c'}`` (:meth:`largest_config`): the first ``d`` blocks run, every layer keeps its first channels (a
    block's Res2 groups each keep their first ``w_i / scale`` channels, as in the reference), a kernel smaller than
    the layer's is the centre of its weight times a learned transform (identity at start). Set it with
    :attr:`active` (``None``: the largest). :meth:`static` builds an ordinary network of a config's sizes (fresh
    weights), which is how MACs are counted (:meth:`macs`) and how a sub-network is trained from scratch.

    Example:
        >>> net = EfficientTDNN(n_mels=16, channels=32, num_blocks=2, catconv_channels=48, embed_dim=8)
        >>> net.active = net.smallest_config()
        >>> net(torch.randn(2, 16, 50)).shape
        torch.Size([2, 8])
    """

    def __init__(self, n_mels: int = 40, channels: int = 128, widths: Union[int, Sequence[int]] = 128,
                 num_blocks: int = 3, kernel_size: Union[int, Sequence[int]] = 5, catconv_channels: int = 384,
                 embed_dim: int = 64, res2_scale: int = 8, se_reduction: int = 4, attention_dim: int = 64,
                 width_ratios: Sequence[float] = (0.25, 0.35, 0.5, 0.75, 1.0), kernel_choices: Sequence[int] = (1, 3, 5),
                 min_depth: Optional[int] = None, elastic: bool = True) -> None:
        super().__init__()
        for name, v in (("n_mels", n_mels), ("channels", channels), ("num_blocks", num_blocks),
                        ("catconv_channels", catconv_channels), ("embed_dim", embed_dim), ("res2_scale", res2_scale),
                        ("se_reduction", se_reduction), ("attention_dim", attention_dim)):
            check_positive_int(name, v)
        widths = [widths] * num_blocks if isinstance(widths, int) else list(widths)
        kernels = [kernel_size] * (num_blocks + 1) if isinstance(kernel_size, int) else list(kernel_size)
        if len(widths) != num_blocks or len(kernels) != num_blocks + 1 or any(k % 2 == 0 for k in kernels):
            raise ValueError(f"`widths` needs {num_blocks} values and `kernel_size` {num_blocks + 1} odd values, got "
                             f"{widths} and {kernels}.")
        if not width_ratios or any(not 0 < r <= 1 for r in width_ratios):
            raise ValueError(f"`width_ratios` must be values in (0, 1], got {list(width_ratios)}.")
        self.n_mels, self.channels, self.widths, self.kernels = n_mels, channels, widths, kernels
        self.num_blocks, self.catconv_channels, self.embed_dim = num_blocks, catconv_channels, embed_dim
        self.res2_scale, self.se_reduction, self.attention_dim = res2_scale, se_reduction, attention_dim
        self.width_ratios, self.kernel_choices = sorted(width_ratios), sorted(kernel_choices)
        self.min_depth = max(1, num_blocks - 2) if min_depth is None else min_depth
        self.layer1, self.bn1 = _Conv(n_mels, channels, kernels[0], elastic=elastic), _BN(channels)
        self.blocks = nn.ModuleList(_Block(channels, w, k, i + 2, res2_scale, se_reduction, elastic)
                                    for i, (w, k) in enumerate(zip(widths, kernels[1:])))
        self.catconv = _Conv(channels * num_blocks, catconv_channels, elastic=elastic)
        self.att1 = _Conv(catconv_channels, attention_dim, elastic=elastic)
        self.att2 = _Conv(attention_dim, catconv_channels, elastic=elastic)
        self.bnpool = _BN(2 * catconv_channels)
        self.linear = _Linear(2 * catconv_channels, embed_dim)
        self.bnembed = nn.BatchNorm1d(embed_dim)
        self.active: Optional[dict] = None
        self._arch = dict(n_mels=n_mels, embed_dim=embed_dim, res2_scale=res2_scale, se_reduction=se_reduction,
                          attention_dim=attention_dim)

    # --- the search space -------------------------------------------------------------------------------------------
    def largest_config(self) -> dict:
        """The whole network."""
        return {"depth": self.num_blocks, "channels": self.channels, "widths": list(self.widths),
                "kernels": list(self.kernels), "catconv": self.catconv_channels}

    def _choices(self, full: int, divisor: int = 8) -> list[int]:
        return sorted({min(full, make_divisible(r * full, divisor)) for r in self.width_ratios})

    def smallest_config(self) -> dict:
        """The smallest depth, width and kernel everywhere."""
        return {"depth": self.min_depth, "channels": self._choices(self.channels)[0],
                "widths": [self._choices(w, self.res2_scale)[0] for w in self.widths],
                "kernels": [min([k for k in self.kernel_choices if k <= full] or [full]) for full in self.kernels],
                "catconv": self._choices(self.catconv_channels)[0]}

    def sample_config(self, generator: np.random.Generator) -> dict:
        """A sub-network drawn uniformly per choice (depth, each width, each kernel) with ``generator``."""
        pick = lambda xs: xs[int(generator.integers(len(xs)))]  # noqa: E731
        return {"depth": pick(list(range(self.min_depth, self.num_blocks + 1))),
                "channels": pick(self._choices(self.channels)),
                "widths": [pick(self._choices(w, self.res2_scale)) for w in self.widths],
                "kernels": [pick([k for k in self.kernel_choices if k <= full] or [full]) for full in self.kernels],
                "catconv": pick(self._choices(self.catconv_channels))}

    def uniform_config(self, ratio: float) -> dict:
        """Every width scaled by ``ratio`` (rounded to multiples of 8 / of ``res2_scale``), full depth and kernels:
        the uniformly shrunk network."""
        shrink = lambda full, d=8: min(full, make_divisible(ratio * full, d))  # noqa: E731
        return {"depth": self.num_blocks, "channels": shrink(self.channels),
                "widths": [shrink(w, max(8, self.res2_scale)) for w in self.widths], "kernels": list(self.kernels),
                "catconv": shrink(self.catconv_channels)}

    def static(self, config: Optional[dict] = None) -> "EfficientTDNN":
        """An ordinary (non-elastic) network with the sizes of ``config`` and fresh weights."""
        c = self.largest_config() if config is None else config
        d = c["depth"]
        return EfficientTDNN(channels=c["channels"], widths=c["widths"][:d], num_blocks=d,
                             kernel_size=c["kernels"][:d + 1], catconv_channels=c["catconv"], elastic=False,
                             **self._arch)

    def macs(self, config: Optional[dict] = None, frames: int = 100) -> int:
        """MACs of one sample of ``frames`` feature frames through the sub-network ``config`` (the library's counter,
        :func:`lightning_ext.core.measure.count_macs_params`, on :meth:`static`)."""
        from lightning_ext.core.measure import count_macs_params

        return count_macs_params(self.static(config).eval(), torch.zeros(2, self.n_mels, frames))[0]

    # --- forward ----------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embeddings ``(B, embed_dim)`` of features ``(B, n_mels, T)`` through the active sub-network."""
        c = self.largest_config() if self.active is None else self.active
        ch, d, cat = c["channels"], c["depth"], c["catconv"]
        out = self.bn1(F.relu(self.layer1(x, None, ch, c["kernels"][0])), ch)
        outs, total = [], out
        for i in range(d):
            out = self.blocks[i](out, ch, c["widths"][i], c["kernels"][i + 1]) + total
            outs.append(out)
            total = total + out
        idx = None if (d == self.num_blocks and ch == self.channels) else \
            torch.arange(self.channels * self.num_blocks, device=x.device).view(self.num_blocks, -1)[:d, :ch].flatten()
        out = F.relu(self.catconv(torch.cat(outs, 1), idx, cat))
        alpha = torch.softmax(self.att2(torch.tanh(self.att1(out, cat, None)), None, cat), dim=2)
        mean = (alpha * out).sum(2)
        std = ((alpha * out ** 2).sum(2) - mean ** 2).clamp(min=1e-9).sqrt()
        pool_idx = None if cat == self.catconv_channels else \
            torch.arange(2 * self.catconv_channels, device=x.device).view(2, -1)[:, :cat].flatten()
        out = self.bnpool(torch.cat([mean, std], 1), pool_idx)
        return self.bnembed(self.linear(out, pool_idx, None))


class LogMel(nn.Module):
    """Log mel filter-bank features ``(B, n_mels, frames)`` of waveforms ``(B, N)``: Hamming-windowed STFT, HTK mel
    triangles, ``log(x + 1e-6)``, mean over time removed per utterance (no parameters).

    Example:
        >>> LogMel(8000, n_mels=24)(torch.randn(2, 8000)).shape
        torch.Size([2, 24, 101])
    """

    def __init__(self, sample_rate: int = 8000, n_mels: int = 40, win_ms: float = 25.0, hop_ms: float = 10.0) -> None:
        super().__init__()
        self.win = int(round(sample_rate * win_ms / 1000))
        self.hop = int(round(sample_rate * hop_ms / 1000))
        self.n_fft = 1 << (self.win - 1).bit_length()
        mel = lambda f: 2595 * np.log10(1 + f / 700)  # noqa: E731
        points = 700 * (10 ** (np.linspace(mel(20.0), mel(sample_rate / 2), n_mels + 2) / 2595) - 1)
        freqs = np.linspace(0, sample_rate / 2, self.n_fft // 2 + 1)
        lo, mid, hi = points[:-2, None], points[1:-1, None], points[2:, None]
        fb = np.maximum(0, np.minimum((freqs - lo) / (mid - lo), (hi - freqs) / (hi - mid)))
        self.register_buffer("fbank", torch.tensor(fb, dtype=torch.float32), persistent=False)
        self.register_buffer("window", torch.hamming_window(self.win), persistent=False)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        spec = torch.stft(wav, self.n_fft, self.hop, self.win, self.window, center=True, return_complex=True)
        out = torch.log(self.fbank @ spec.abs().pow(2) + 1e-6)
        return out - out.mean(2, keepdim=True)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches, forward: Optional[Callable] = None) -> None:
    """Recompute every BatchNorm's running statistics for the active sub-network from ``batches`` (cumulative
    average, statistics reset, no weight change; modes and momenta restored), as the reference does with
    ``--num-statistics`` before evaluating a sub-network. ``forward(model, batch)`` defaults to ``model(batch)``."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta, flags = [bn.momentum for bn in bns], [(m, m.training) for m in model.modules()]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    try:
        for batch in batches:
            model(batch) if forward is None else forward(model, batch)
    finally:
        for bn, momentum in zip(bns, momenta):
            bn.momentum = momentum
        for m, flag in flags:
            m.training = flag


def evolutionary_search(sample: Callable[[np.random.Generator], dict], fitness: Callable[[dict], float],
                        macs: Callable[[dict], int], budget: int, population: int = 8, generations: int = 3,
                        mutate_prob: float = 0.3, seed: int = 0, max_tries: int = 200) -> tuple[dict, list[dict]]:
    """The best sub-network (lowest ``fitness``) with ``macs(config) <= budget``, by a small evolutionary loop (the
    reference searches with geatpy over an accuracy predictor; here ``fitness`` is measured directly, e.g. the
    validation EER of the weight-shared sub-network): ``population`` random feasible configs, then per generation
    the better half survives and the rest are mutants (each gene redrawn from ``sample`` with ``mutate_prob``) and
    crossovers of survivors, infeasible children redrawn. Returns the best config and every evaluation
    ``{"config", "macs", "fitness"}`` in order.

    Example:
        >>> space = lambda g: {"w": int(g.integers(1, 10))}
        >>> best, history = evolutionary_search(space, lambda c: -c["w"], lambda c: c["w"], budget=6, seed=0)
        >>> best
        {'w': 6}
    """
    rng = np.random.default_rng(seed)
    seen: dict[str, dict] = {}
    history: list[dict] = []

    def feasible(make) -> Optional[dict]:
        for _ in range(max_tries):
            c = make()
            m = macs(c)
            if m <= budget:
                return c
        return None

    def evaluate(c: dict) -> dict:
        key = repr(c)
        if key not in seen:
            seen[key] = {"config": c, "macs": int(macs(c)), "fitness": float(fitness(c))}
            history.append(seen[key])
        return seen[key]

    pop = [r for r in (feasible(lambda: sample(rng)) for _ in range(population)) if r is not None]
    if not pop:
        raise ValueError(f"no sub-network within {max_tries} draws fits the MACs budget {budget}; raise the budget.")
    scored = sorted((evaluate(c) for c in pop), key=lambda r: r["fitness"])
    for _ in range(generations):
        parents = [r["config"] for r in scored[:max(1, population // 2)]]

        def child() -> dict:
            a = parents[int(rng.integers(len(parents)))]
            b = parents[int(rng.integers(len(parents)))]
            fresh = sample(rng)
            return {k: (fresh[k] if rng.random() < mutate_prob else (a[k] if rng.random() < 0.5 else b[k]))
                    for k in a}

        kids = [r for r in (feasible(child) for _ in range(population - len(parents))) if r is not None]
        scored = sorted({repr(r["config"]): r for r in scored[:len(parents)] + [evaluate(k) for k in kids]}.values(),
                        key=lambda r: r["fitness"])
    return scored[0]["config"], history
