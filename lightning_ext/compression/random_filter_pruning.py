"""Random filter pruning: the control baseline that removes randomly chosen conv filters."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import nn
from typing_extensions import override

from lightning_ext.compression.filter_pruning import FilterPruning, Scores, resolve_layer_names
from lightning_ext.core.validation import check_number


def random_filter_scores(model: nn.Module, seed: int = 0, layers: Optional[Sequence[str]] = None) -> Scores:
    """Uniform random scores for every filter of every ``nn.Conv2d``, reproducible from ``seed``.

    The global RNG is not touched (a private generator draws the scores, in module order).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 2, 1))
        >>> a, b = random_filter_scores(net, seed=3), random_filter_scores(net, seed=3)
        >>> all(torch.equal(a[k], b[k]) for k in a), [tuple(v.shape) for v in a.values()]
        (True, [(4,), (2,)])
    """
    names = resolve_layer_names(model, layers, "layers") if layers is not None else [
        n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)
    ]
    generator = torch.Generator().manual_seed(int(seed))
    out = {}
    for n in names:
        conv = model.get_submodule(n)
        if not isinstance(conv, nn.Conv2d):
            raise ValueError(f"Random filter scores apply to Conv2d layers; {n!r} is {type(conv).__name__}.")
        out[n] = torch.rand(conv.out_channels, generator=generator, dtype=torch.float64)
    return out


class RandomFilterPruning(FilterPruning):
    """Random filter pruning: removes randomly chosen conv filters, the control that importance criteria must beat.

    Not a published method but the standard control in filter-pruning papers, including Beta-Rank's
    (arXiv 2304.07461); with Torch-Pruning groups it removes the same number of channels per layer as
    :class:`~lightning_ext.compression.l1_filter_pruning.L1FilterPruning` and
    :class:`~lightning_ext.compression.beta_rank_pruning.BetaRankPruning` at the same target, so only the
    choice of filters differs. Scores are drawn from ``seed`` and the step number (rank 0 decides and
    broadcasts), so a resumed run removes the same filters.

    Args:
        seed: seed of the random scores.
        **kwargs: the target and schedule, see :class:`~lightning_ext.compression.filter_pruning.FilterPruning`.

    Example:
        >>> RandomFilterPruning(pruning_ratio=0.3, seed=1).seed
        1
    """

    def __init__(self, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        check_number("seed", seed, integer=True)
        self.seed = int(seed)

    @override
    def filter_scores(self, pl_module: LightningModule, inputs: Any, trainer: Trainer) -> Scores:
        """Random scores drawn from ``seed`` and the step number."""
        return random_filter_scores(pl_module, seed=self.seed * 1000 + len(self.steps))
