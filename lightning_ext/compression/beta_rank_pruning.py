"""Beta-Rank filter pruning: filter magnitude scaled by output over input activation variability."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Literal, Optional, Sequence, Union, get_args

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from torch import nn
from typing_extensions import override

from lightning_ext.compression.filter_pruning import FilterPruning, Scores, resolve_layer_names
from lightning_ext.core.measure import eval_mode
from lightning_ext.core.validation import PositiveFloat, check_choice, check_positive

RatioDirection = Literal["out/in", "in/out"]
RATIO_DIRECTIONS = get_args(RatioDirection)


class _ConvStatistics:
    """Running sums for one conv: per (filter, output position) of its output, and per (group, output position)
    of the receptive-field patch of its input. Float64; summed over batches (and, by the caller, ranks)."""

    def __init__(self, conv: nn.Conv2d) -> None:
        self.conv = conv
        self.out_sum = self.out_sq = None
        self.in_sum = self.in_sq = self.in_count = None
        self.out_count = 0.0

    def __call__(self, module: nn.Conv2d, args: tuple, output: torch.Tensor) -> None:
        x = args[0].detach().to(torch.float64)
        y = output.detach().to(torch.float64)
        conv = self.conv
        batch, channels, height, width = x.shape
        groups = conv.groups
        kernel = torch.ones(groups, 1, *conv.kernel_size, dtype=torch.float64, device=x.device)
        xs = x.reshape(batch, groups, channels // groups, height, width)
        s1, s2 = xs.sum(2), (xs * xs).sum(2)  # per group: sum and sum of squares over its input channels
        mask = torch.ones(1, 1, height, width, dtype=torch.float64, device=x.device)
        pad = conv._reversed_padding_repeated_twice
        if any(pad):  # zero padding: padded elements add nothing to the sums and are not counted
            s1, s2, mask = F.pad(s1, pad), F.pad(s2, pad), F.pad(mask, pad)

        def window_sum(t: torch.Tensor, g: int) -> torch.Tensor:
            return F.conv2d(t, kernel[:g], stride=conv.stride, dilation=conv.dilation, groups=g)

        in_sum, in_sq = window_sum(s1, groups).sum(0), window_sum(s2, groups).sum(0)  # (G, H', W')
        in_count = window_sum(mask, 1)[0, 0] * batch * (channels // groups)  # (H', W') valid elements
        if in_sum.shape[1:] != y.shape[2:]:
            raise RuntimeError(
                f"Beta-Rank: receptive-field statistics of shape {tuple(in_sum.shape[1:])} do not match the output "
                f"{tuple(y.shape[2:])} of {conv}."
            )
        if self.out_sum is None:
            self.out_sum, self.out_sq = y.sum(0), (y * y).sum(0)
            self.in_sum, self.in_sq, self.in_count = in_sum, in_sq, in_count
        else:
            self.out_sum += y.sum(0)
            self.out_sq += (y * y).sum(0)
            self.in_sum += in_sum
            self.in_sq += in_sq
            self.in_count += in_count
        self.out_count += batch

    def flat(self) -> torch.Tensor:
        count = torch.tensor([self.out_count], dtype=torch.float64, device=self.out_sum.device)
        parts = (self.out_sum, self.out_sq, self.in_sum, self.in_sq, self.in_count, count)
        return torch.cat([t.flatten() for t in parts])

    def load_flat(self, flat: torch.Tensor) -> None:
        offset = 0
        for name in ("out_sum", "out_sq", "in_sum", "in_sq", "in_count"):
            t = getattr(self, name)
            setattr(self, name, flat[offset: offset + t.numel()].view_as(t))
            offset += t.numel()
        self.out_count = float(flat[offset])

    @staticmethod
    def _std(total: torch.Tensor, squares: torch.Tensor, count) -> tuple[torch.Tensor, torch.Tensor]:
        mean = total / count
        return (squares / count - mean * mean).clamp(min=0).sqrt(), mean

    def scores(self, ratio_direction: str, eps: float) -> torch.Tensor:
        out_channels = self.out_sum.shape[0]
        sigma_out, mean_out = self._std(self.out_sum, self.out_sq, self.out_count)  # (C_out, H', W')
        sigma_in, mean_in = self._std(self.in_sum, self.in_sq, self.in_count.clamp(min=1))  # (G, H', W')
        per_group = out_channels // self.in_sum.shape[0]
        sigma_in = sigma_in.repeat_interleave(per_group, dim=0)
        mean_in = mean_in.repeat_interleave(per_group, dim=0)
        # a standard deviation within rounding error of zero makes the ratio undefined: that position is skipped
        in_ok = (sigma_in > eps * (1 + mean_in.abs())) & (self.in_count > 0)
        out_ok = sigma_out > eps * (1 + mean_out.abs())
        if ratio_direction == "out/in":
            term = torch.where(in_ok, sigma_out / torch.where(in_ok, sigma_in, 1.0), 0.0)
        else:
            term = torch.where(out_ok & in_ok, sigma_in / torch.where(out_ok, sigma_out, 1.0), 0.0)
        weight = self.conv.weight.detach().to(torch.float64).abs().flatten(1).mean(1).to(term.device)
        return weight * term.sum(dim=(1, 2))


def beta_rank_scores(
    model: nn.Module,
    inputs: Union[torch.Tensor, Iterable[torch.Tensor]],
    ratio_direction: RatioDirection = "out/in",
    layers: Optional[Sequence[str]] = None,
    reduce_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    normalize: bool = True,
    eps: float = 1e-6,
) -> Scores:
    r"""Beta-Rank importance of every filter of every ``nn.Conv2d`` of ``model``.

    For filter :math:`k` of a conv with weight :math:`W_k`, output :math:`Y` (the conv output, before BN) and
    input :math:`X`, over the calibration samples:

    .. math::

        R_k = \operatorname{mean}(|W_k|) \sum_{p} \frac{\sigma_{\text{out}}(k, p)}{\sigma_{\text{in}}(p)}

    where :math:`p` runs over output positions, :math:`\sigma_{\text{out}}(k, p)` is the standard deviation
    of :math:`Y_{:, k, p}` over the samples, and :math:`\sigma_{\text{in}}(p)` the standard deviation over
    samples and all elements of the receptive-field patch of :math:`X` that feeds position :math:`p` (the
    input channels of the filter's group for grouped/depthwise convs; zero padding excluded).
    ``ratio_direction="in/out"`` uses :math:`\sigma_{\text{in}} / \sigma_{\text{out}}` instead, the paper's
    equation. Positions whose denominator is zero (constant activations) are skipped. With ``normalize`` the
    scores are min-max scaled within each layer, as in the official code.

    Args:
        model: the network; run in eval mode under ``no_grad`` (its modes are restored).
        inputs: one batch or an iterable of batches (tensors the model is called with).
        ratio_direction: ``"out/in"`` (the official code, default) or ``"in/out"`` (the paper's equation).
        layers: conv names or globs to score (default: all ``nn.Conv2d``).
        reduce_fn: sums a float64 tensor across processes (e.g. ``lambda t: strategy.reduce(t, reduce_op="sum")``)
            so every rank gets statistics over the global calibration batch.
        normalize: min-max scale within each layer.
        eps: relative tolerance under which a standard deviation counts as zero.

    Returns:
        ``conv name -> float64 tensor with one score per filter`` (higher = more important).

    Example:
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2))
        >>> scores = beta_rank_scores(net, torch.randn(16, 1, 9, 9))
        >>> {name: tuple(s.shape) for name, s in scores.items()}
        {'0': (4,), '2': (6,)}
        >>> float(scores["2"].min()), float(scores["2"].max())  # min-max normalised per layer
        (0.0, 1.0)
    """
    check_choice("ratio_direction", ratio_direction, RATIO_DIRECTIONS)
    names = resolve_layer_names(model, layers, "layers") if layers is not None else [
        n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)
    ]
    convs = {n: model.get_submodule(n) for n in names}
    bad = [n for n, m in convs.items() if not isinstance(m, nn.Conv2d)]
    if bad:
        raise ValueError(f"Beta-Rank scores Conv2d layers only; {bad} are not Conv2d.")
    stats = {n: _ConvStatistics(m) for n, m in convs.items()}
    handles = [convs[n].register_forward_hook(stats[n]) for n in names]
    batches = [inputs] if isinstance(inputs, torch.Tensor) else list(inputs)
    if not batches:
        raise ValueError("Beta-Rank needs at least one calibration batch.")
    try:
        with eval_mode(model), torch.no_grad():
            for batch in batches:
                model(batch)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in names if stats[n].out_sum is None]
    if missing:
        raise ValueError(f"Convs {missing} were not executed by the forward pass; they cannot be scored.")
    if reduce_fn is not None and names:  # one collective for all layers
        flat = torch.cat([stats[n].flat() for n in names])
        flat = reduce_fn(flat)
        offset = 0
        for n in names:
            size = stats[n].flat().numel()
            stats[n].load_flat(flat[offset: offset + size])
            offset += size
    scores = {}
    for n in names:
        r = stats[n].scores(ratio_direction, eps).cpu()
        if normalize:
            span = r.max() - r.min()
            r = (r - r.min()) / span if span > 0 else torch.zeros_like(r)
        scores[n] = r
    return scores


class BetaRankPruning(FilterPruning):
    r"""Beta-Rank filter pruning (Homayounfar et al., 2023): keeps the filters whose outputs vary most relative to
    their inputs.

    Paper: "β-Rank: A Robust Convolutional Filter Pruning Method for Imbalanced Medical Image Analysis"
    (Homayounfar, Koohi-Moghadam, Rawassizadeh, Vardhanabhuti), arXiv 2304.07461. Reference code:
    https://github.com/mohofar/Beta-Rank (``rank_generation.py``: ``std_filters``; ``tuning.py``).

    Rank of filter :math:`k` (see :func:`beta_rank_scores`):
    :math:`R_k = \operatorname{mean}|W_k| \cdot \sum_p \sigma_{\text{out}}(k,p) / \sigma_{\text{in}}(p)`,
    min-max normalised per layer; the lowest-ranked filters go. Statistics come from ``calibration_batches``
    training batches (the code uses one batch), the model in eval mode, the conv output taken before BN.

    Where this follows the code rather than the paper, or neither:

    - ``ratio_direction="out/in"`` (default) is what the released code computes (``a / b`` with ``a`` the
      output std, ``b`` the input-patch std); the paper's equation writes
      :math:`R^\beta = R^{L1} \cdot |\sigma_{\text{in}} / \sigma_{\text{out}}|`, available as ``"in/out"``.
      The paper's results came from the code.
    - The input patch is the real receptive field (height x width window with stride, dilation and groups;
      zero padding excluded). The code slices the (channel, height) axes of an NCHW tensor and ignores padding.
    - Positions with a zero standard deviation are skipped (the code skips only NaNs and would divide by zero).
    - The code's ResNet loader rescales kept filters by ``1 + rank`` (with an index bug); not replicated.
    - Pruning is per coupled group (Torch-Pruning): convs tied by a residual sum share one keep/drop decision,
      with their per-layer ranks averaged. Under DDP the sums behind every standard deviation are reduced
      across processes, so the ranks are those of the global calibration batch.

    Args:
        ratio_direction: ``"out/in"`` (code) or ``"in/out"`` (paper equation).
        eps: relative tolerance under which a standard deviation counts as zero.
        **kwargs: the target and schedule, see :class:`~lightning_ext.compression.filter_pruning.FilterPruning`
            (``pruning_ratio`` or ``macs_reduction``, ``start_epoch``, ``every_n_epochs``, ``num_steps``,
            ``ignored_layers``, ``layer_pruning_ratios``, ``calibration_batches``, ...).

    Example:
        >>> from lightning.pytorch import Trainer
        >>> from lightning_ext.datamodules import DigitsDataModule
        >>> from lightning_ext.modules import ImageClassifier
        >>> model = ImageClassifier("resnet10t", num_classes=10, image_size=8)
        >>> pruner = BetaRankPruning(macs_reduction=0.5, ignored_layers=["net.fc"], latency_repeats=0)
        >>> trainer = Trainer(max_epochs=1, callbacks=[pruner], logger=False, enable_checkpointing=False,
        ...                   enable_progress_bar=False, limit_train_batches=2, limit_val_batches=1)  # doctest: +SKIP
        >>> trainer.fit(model, datamodule=DigitsDataModule())  # doctest: +SKIP
        >>> round(1 - pruner.steps[-1]["macs"] / pruner.dense["macs"], 2)  # doctest: +SKIP
        0.5
    """

    needs_calibration_data = True

    def __init__(self, ratio_direction: RatioDirection = "out/in", eps: PositiveFloat = 1e-6, **kwargs: Any) -> None:
        if ratio_direction not in RATIO_DIRECTIONS:
            raise ValueError(
                f"`ratio_direction` must be 'out/in' (the official code) or 'in/out' (the paper's equation), "
                f"got {ratio_direction!r}."
            )
        check_positive("eps", eps)
        super().__init__(**kwargs)
        self.ratio_direction = ratio_direction
        self.eps = eps

    @override
    def filter_scores(
        self, pl_module: LightningModule, inputs: Optional[list[torch.Tensor]], trainer: Trainer
    ) -> Scores:
        """Beta-Rank scores of every conv from the calibration inputs, statistics summed over the ranks."""

        def reduce_sum(t: torch.Tensor) -> torch.Tensor:
            return trainer.strategy.reduce(t, reduce_op="sum")

        return beta_rank_scores(pl_module, inputs, ratio_direction=self.ratio_direction, reduce_fn=reduce_sum,
                                eps=self.eps)

    @override
    def state_dict(self) -> dict[str, Any]:
        """The pruning history (see :class:`FilterPruning`) and the ratio direction."""
        state = super().state_dict()
        state["ratio_direction"] = self.ratio_direction
        return state
