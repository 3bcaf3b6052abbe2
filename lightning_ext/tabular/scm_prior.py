"""A TabPFN-style structural-causal-model (SCM) prior over classification tables, simplified.

Paper: Hollmann, Müller, Eggensperger and Hutter, "TabPFN: A Transformer That Solves Small Tabular Classification
Problems in a Second", ICLR 2023 (arXiv 2207.01848). Reference code: https://github.com/automl/TabPFN
(``tabpfn/priors/mlp.py``, ``flexible_categorical.py``), written anew here.

Per dataset (a prior over priors: every hyperparameter below is drawn per dataset):

1. A random MLP read as a causal graph: ``L`` layers (1-4) of width ``h``, Gaussian weights with a sampled scale,
   a sampled share of the weights set to zero (sparsity), one activation (tanh, ReLU, identity-plus-sine, leaky),
   and Gaussian noise of sampled scale added at **every** node. Root causes are Gaussian or uniform.
2. With probability ``scm_fraction`` the features and the target are read from **random intermediate nodes**
   (the SCM reading); otherwise the features are the root causes and the target the output (the BNN reading).
3. Classes: ``k`` uniform in ``[2, max_classes]``; the continuous target is cut at ``k - 1`` random quantiles
   (ranking assignment) and the class ids are randomly permuted.
4. Each feature becomes categorical with probability ``categorical_fraction``: cut at random quantiles into 2-10
   levels, written as randomly permuted integer codes.
5. With probability ``missing_fraction`` a dataset gets missing values: each feature entry is NaN with a
   probability uniform in ``(0, max_missing_rate]`` (the model reads NaN as the training mean).

The number of features ``d`` is uniform in ``[min_features, max_features]`` per batch (shared by the batch's
datasets). Left out of TabPFN's prior (stated, not hidden): the GP component of the prior mix, the
differentiable hyperprior, feature warping beyond the categorical conversion, and the "threshold" class assignment.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from typing_extensions import override

from lightning_ext.core.validation import (
    AtLeastTwoInt,
    ClosedUnitInterval,
    PositiveInt,
    check_fraction,
    check_number,
    check_positive_int,
)
from lightning_ext.tabular.priors import PriorDataModule

__all__ = ["SCMPriorDataModule"]


def _uniform(gen: torch.Generator, lo: float, hi: float) -> float:
    return float(torch.empty(1).uniform_(lo, hi, generator=gen))


def _log_uniform(gen: torch.Generator, lo: float, hi: float) -> float:
    return math.exp(_uniform(gen, math.log(lo), math.log(hi)))


def _randint(gen: torch.Generator, lo: int, hi: int) -> int:
    """Uniform in ``[lo, hi]``."""
    return int(torch.randint(lo, hi + 1, (1,), generator=gen))


def _cut(values: Tensor, levels: int, gen: torch.Generator) -> Tensor:
    """Integer levels ``0..levels-1`` from ``levels - 1`` random quantile thresholds (ties broken by rank)."""
    qs = torch.sort(torch.rand(levels - 1, generator=gen) * 0.9 + 0.05).values
    thresholds = torch.quantile(values, qs)
    return (values.unsqueeze(-1) > thresholds).sum(-1)


_ACTS = (torch.tanh, torch.relu, lambda h: h + torch.sin(h), lambda h: torch.nn.functional.leaky_relu(h, 0.1))


class SCMPriorDataModule(PriorDataModule):
    """TabPFN-style SCM prior (simplified): classification tables read from random causal MLPs, with categorical
    features and missing values.

    See the module docstring for what is drawn and what of TabPFN's prior is left out.

    Args:
        min_features: fewest features per batch.
        max_features: most features per batch.
        max_classes: classes per dataset are uniform in ``[2, max_classes]``.
        scm_fraction: share of datasets read as an SCM (features and target at random inner nodes).
        categorical_fraction: probability that a feature is made categorical.
        missing_fraction: share of datasets with missing values.
        max_missing_rate: a dataset with missing values has each entry missing with a rate up to this.
        **kwargs: the stream's arguments (:class:`~lightning_ext.tabular.priors.PriorDataModule`: ``batch_size``,
            ``seq_len``, ``steps_per_epoch``, ``min_train``, ``min_test``, ``val_batches``, ``seed``,
            ``num_workers``).

    Example:
        >>> dm = SCMPriorDataModule(max_features=5, max_classes=3, batch_size=2, seq_len=30)
        >>> b = dm.sample_batch(seed=0, step=0)
        >>> b["x"].shape[:2], int(b["y"].max()) < 3
        (torch.Size([2, 30]), True)
    """

    task = "classification"

    def __init__(self, min_features: PositiveInt = 1, max_features: PositiveInt = 32, max_classes: AtLeastTwoInt = 4,
                 scm_fraction: ClosedUnitInterval = 0.5, categorical_fraction: ClosedUnitInterval = 0.1,
                 missing_fraction: ClosedUnitInterval = 0.0, max_missing_rate: ClosedUnitInterval = 0.2,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        check_positive_int("min_features", min_features)
        check_positive_int("max_features", max_features)
        if min_features > max_features:
            raise ValueError(f"min_features ({min_features}) must be <= max_features ({max_features}).")
        check_number("max_classes", max_classes, low=2, integer=True)
        for name, value in (("scm_fraction", scm_fraction), ("categorical_fraction", categorical_fraction),
                            ("missing_fraction", missing_fraction), ("max_missing_rate", max_missing_rate)):
            check_fraction(name, value)
        self.min_features, self.max_features, self.max_classes = int(min_features), int(max_features), int(max_classes)
        self.scm_fraction, self.categorical_fraction = float(scm_fraction), float(categorical_fraction)
        self.missing_fraction, self.max_missing_rate = float(missing_fraction), float(max_missing_rate)

    @property
    def num_classes(self) -> int:
        """The most classes a dataset of this prior has (the model's ``max_classes`` must be at least this)."""
        return self.max_classes

    @override
    def num_features_of(self, gen: torch.Generator) -> int:
        """Features of one batch: uniform in ``[min_features, max_features]``."""
        return _randint(gen, self.min_features, self.max_features)

    @override
    def sample_dataset(self, gen: torch.Generator, n: int, num_features: int) -> tuple[Tensor, Tensor]:
        """One table: features ``(n, d)`` (NaN where missing) and class ids ``(n,)``."""
        d = num_features
        scm = _uniform(gen, 0, 1) < self.scm_fraction
        layers = _randint(gen, 1, 4) + (1 if scm else 0)
        width = _randint(gen, max(4, d + 1 if scm else 4), max(16, 2 * d + 2))
        roots = d if not scm else _randint(gen, 2, max(2, width))
        weight_scale = _log_uniform(gen, 0.5, 3.0)
        sparsity = _uniform(gen, 0.0, 0.5)
        noise = _log_uniform(gen, 0.01, 0.3)
        act = _ACTS[_randint(gen, 0, len(_ACTS) - 1)]
        if _uniform(gen, 0, 1) < 0.5:
            h = torch.randn(n, roots, generator=gen)
        else:
            h = torch.rand(n, roots, generator=gen) * 2 - 1
        cause = h
        nodes = []
        fan_in = roots
        for _ in range(layers):
            w = torch.randn(fan_in, width, generator=gen) * weight_scale / math.sqrt(fan_in)
            w = w * (torch.rand(fan_in, width, generator=gen) >= sparsity)
            h = act(h @ w) + noise * torch.randn(n, width, generator=gen)
            nodes.append(h)
            fan_in = width
        if scm:
            pool = torch.cat(nodes, 1)
            pick = torch.randperm(pool.shape[1], generator=gen)[: d + 1]
            x, target = pool[:, pick[:d]], pool[:, pick[d]]
        else:
            x = cause
            target = h @ torch.randn(width, generator=gen)
        target = target + noise * torch.randn(n, generator=gen)
        k = _randint(gen, 2, self.max_classes)
        y = _cut(target, k, gen)
        y = torch.randperm(k, generator=gen)[y]
        x = x.clone()
        for j in range(d):
            if _uniform(gen, 0, 1) < self.categorical_fraction:
                levels = _randint(gen, 2, 10)
                x[:, j] = torch.randperm(levels, generator=gen)[_cut(x[:, j], levels, gen)].float()
        if self.missing_fraction and _uniform(gen, 0, 1) < self.missing_fraction:
            rate = _uniform(gen, 0, self.max_missing_rate)
            x[torch.rand(n, d, generator=gen) < rate] = float("nan")
        return x, y.float()
