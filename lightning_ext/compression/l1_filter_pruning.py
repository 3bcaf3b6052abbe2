"""L1-norm filter pruning: remove the conv filters with the smallest sum of absolute weights."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import nn
from typing_extensions import override

from lightning_ext.compression.filter_pruning import FilterPruning, Scores, resolve_layer_names


def l1_filter_scores(model: nn.Module, layers: Optional[Sequence[str]] = None) -> Scores:
    r"""L1 norm of every filter of every ``nn.Conv2d``: :math:`s_k = \sum |W_{k,:,:,:}|`.

    Args:
        model: the network.
        layers: conv names or globs to score (default: all ``nn.Conv2d``).

    Returns:
        ``conv name -> float64 tensor with one score per filter``.

    Example:
        >>> conv = nn.Conv2d(1, 3, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = conv.weight.copy_(torch.tensor([1.0, -3.0, 2.0]).view(3, 1, 1, 1))
        >>> l1_filter_scores(nn.Sequential(conv))["0"].tolist()
        [1.0, 3.0, 2.0]
    """
    names = resolve_layer_names(model, layers, "layers") if layers is not None else [
        n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)
    ]
    out = {}
    for n in names:
        conv = model.get_submodule(n)
        if not isinstance(conv, nn.Conv2d):
            raise ValueError(f"L1 filter scores apply to Conv2d layers; {n!r} is {type(conv).__name__}.")
        out[n] = conv.weight.detach().to("cpu", torch.float64).abs().flatten(1).sum(1)
    return out


class L1FilterPruning(FilterPruning):
    r"""L1-norm filter pruning (Li et al., ICLR 2017): removes the conv filters with the smallest sum of absolute
    weights.

    Paper: "Pruning Filters for Efficient ConvNets" (Li, Kadav, Durdanovic, Samet, Graf), arXiv 1608.08710.
    No official code was released; the Beta-Rank repository's L1 baseline
    (https://github.com/mohofar/Beta-Rank, ``rank_generation.py``: ``l1_filters``) ranks filters the same way
    within a layer (its score is the mean absolute weight times the number of output positions).

    Score of filter :math:`k`: :math:`s_k = \sum_{c,i,j} |W_{k,c,i,j}|`. Data-free. Convs tied by a residual sum
    share one decision with their scores averaged (Torch-Pruning groups). Used as the baseline of
    :class:`~lightning_ext.compression.beta_rank_pruning.BetaRankPruning`.

    Args:
        **kwargs: the target and schedule, see :class:`~lightning_ext.compression.filter_pruning.FilterPruning`.

    Example:
        >>> pruner = L1FilterPruning(pruning_ratio=0.5, ignored_layers=["net.fc"])
        >>> pruner.prune_epochs
        [0]
        >>> L1FilterPruning(macs_reduction=0.6, start_epoch=1, every_n_epochs=2, num_steps=3).prune_epochs
        [1, 3, 5]
    """

    @override
    def filter_scores(self, pl_module: LightningModule, inputs: Any, trainer: Trainer) -> Scores:
        """L1 norms of every conv's filters."""
        return l1_filter_scores(pl_module)
