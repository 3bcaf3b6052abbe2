"""Scaling laws for data filtering (Goyal, Maini, Lipton, Raghunathan and Kolter, "Scaling Laws for Data
Filtering -- Data Curation cannot be Compute Agnostic", CVPR 2024, arXiv 2404.07177;
github.com/locuslab/scaling_laws_data_filtering), and compute-aware selection built on them."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal, Optional, Sequence

import numpy as np

from lightning_ext.core.validation import (
    PositiveFloat, PositiveInt, check_choice, check_number, check_positive, check_positive_int,
)
from lightning_ext.curation.base import Scorer, Scores, ScoringData, top_k

__all__ = ["ComputeAwareSelection", "FilteringScalingLaw", "PoolLaw"]


@dataclass
class PoolLaw:
    """One quality bucket's law: error ``a * n^b + d`` on first use, exponent halving every ``tau`` repetitions."""

    a: float
    b: float
    tau: float

    def __post_init__(self) -> None:
        check_positive("a", self.a)
        check_number("b", self.b, high=0, high_open=True)  # a pool's utility: error falls with data
        check_positive("tau", self.tau)  # utility half-life in repetitions


class FilteringScalingLaw:
    """Repetition-aware scaling law of data pools (Goyal et al., CVPR 2024), in pure Python/numpy.

    Each pool (quality bucket, best first) has error ``y = a * n^b + d`` when its samples are fresh. Seeing
    the data again decays the utility: in repetition ``k`` (0 = first pass) the exponent is
    ``b_k = b * 2^(-k / tau)``, so ``y(n) - d = a * n_0^b_0 * prod_{k>=1} (n_k / n_{k-1})^b_k`` with ``n_k`` the
    cumulative samples seen at the end of repetition k (in units of ``unit`` samples). A union of ``p``
    equal buckets repeats once every ``p * size`` samples (k counts passes over the union) and its exponent in
    pass k is the mean of its buckets' decayed exponents, with one of two rules (``mixture``):

    - ``"official"`` (default), as ``estimate_best_pool.py`` of the reference code: each bucket's half-life is
      multiplied by the number of buckets in the union, ``b_k = mean_i b_i * 2^(-k / (tau_i * p))``;
    - ``"repetitions"``: ``b_k = mean_i b_i * 2^(-k / tau_i)``, i.e. a bucket seen k times in a union decays
      as when it is seen k times alone.

    The two are **not** equivalent: in pass k over the union every bucket has been seen k times, so the
    official rule makes a bucket decay p times more slowly inside a union of p buckets than alone, which
    favours larger unions. ``d`` (irreducible error) is fixed, as in the paper's grid search; the code's
    variant that multiplies ``d`` into the product is not used, and each bucket keeps its own ``a`` (the code
    asserts one shared ``a`` and writes the law as ``(a n)^b``; a union here takes the geometric mean of its
    buckets' ``a``).

    Args:
        pools: the buckets' laws, best first (dicts with ``a``, ``b``, ``tau`` or :class:`PoolLaw`).
        bucket_size: samples per bucket.
        d: irreducible error.
        unit: samples per unit of ``n`` (the paper normalises by 1e5).
        mixture: how a union's buckets decay with repetition: ``"official"`` (half-lives scaled by the number of
            buckets, the reference code) or ``"repetitions"`` (see above).

    Example:
        >>> law = FilteringScalingLaw([{"a": 1.0, "b": -0.5, "tau": 1.0}, {"a": 1.0, "b": -0.4, "tau": 4.0}],
        ...                           bucket_size=100, d=0.0)
        >>> law.best_pool(50), law.best_pool(10_000)  # small budget: the best bucket; large: both
        (1, 2)
    """

    def __init__(self, pools: Sequence = (), bucket_size: PositiveInt = 1, d: float = 0.1,
                 unit: PositiveFloat = 1.0, mixture: Literal["official", "repetitions"] = "official") -> None:
        check_positive_int("bucket_size", bucket_size)
        check_choice("mixture", mixture, ("official", "repetitions"))
        check_number("d", d)
        check_positive("unit", unit)
        self.pools = [p if isinstance(p, PoolLaw) else PoolLaw(**p) for p in pools]
        self.bucket_size, self.d, self.unit, self.mixture = bucket_size, d, unit, mixture

    def config(self) -> dict:
        return {"pools": [asdict(p) for p in self.pools], "bucket_size": self.bucket_size, "d": self.d,
                "unit": self.unit, "mixture": self.mixture}

    @staticmethod
    def curve(a: float, b_per_repetition, samples_seen: float, pool_size: float, d: float, unit: float = 1.0) -> float:
        """The piecewise law for one pool (or union) of ``pool_size`` samples; ``b_per_repetition(k)``."""
        n = samples_seen / unit
        size = pool_size / unit
        if n <= 0:
            raise ValueError("`samples_seen` must be > 0.")
        log = np.log(a) + b_per_repetition(0) * np.log(min(n, size))
        k, end = 1, size
        while n > end:
            nxt = min(n, end + size)
            log += b_per_repetition(k) * (np.log(nxt) - np.log(end))
            k, end = k + 1, nxt
        return float(np.exp(log) + d)

    def error(self, samples_seen: float, num_buckets: Optional[int] = None, buckets: Optional[Sequence[int]] = None) -> float:
        """Predicted error after ``samples_seen`` samples from the top ``num_buckets`` (or given ``buckets``)."""
        if buckets is None:
            if num_buckets is None or not 1 <= num_buckets <= len(self.pools):
                raise ValueError(f"`num_buckets` must be in [1, {len(self.pools)}], got {num_buckets}.")
            buckets = range(num_buckets)
        chosen = [self.pools[i] for i in buckets]
        a = float(np.exp(np.mean([np.log(p.a) for p in chosen])))
        scale = len(chosen) if self.mixture == "official" else 1

        def b_k(k: int) -> float:
            return float(np.mean([p.b * 2.0 ** (-k / (p.tau * scale)) for p in chosen]))

        return self.curve(a, b_k, samples_seen, len(chosen) * self.bucket_size, self.d, self.unit)

    def best_pool(self, samples_seen: float) -> int:
        """How many of the top buckets to train on for a budget of ``samples_seen`` (argmin predicted error)."""
        if not self.pools:
            raise ValueError("The law has no pools: fit them with `fit_bucket` first.")
        errors = [self.error(samples_seen, m) for m in range(1, len(self.pools) + 1)]
        return int(np.argmin(errors)) + 1

    @staticmethod
    def fit_bucket(samples_seen: Sequence[float], errors: Sequence[float], pool_size: int, d: float = 0.1,
                   unit: float = 1.0, b_grid: Optional[Sequence[float]] = None,
                   tau_grid: Optional[Sequence[float]] = None) -> PoolLaw:
        """Fit ``(a, b, tau)`` of one bucket from runs with repeated epochs: grid search over ``b`` and ``tau``
        (the paper's choice; scipy was unstable), ``a`` in closed form (least squares for fixed b, tau).

        Example:
            >>> truth = FilteringScalingLaw([{"a": 2.0, "b": -0.4, "tau": 3.0}], bucket_size=100, d=0.1)
            >>> n = [50, 100, 300, 1000, 3000]
            >>> fit = FilteringScalingLaw.fit_bucket(n, [truth.error(m, 1) for m in n], 100, d=0.1)
            >>> abs(fit.b + 0.4) < 0.03, abs(fit.a - 2.0) < 0.2
            (True, True)
        """
        n = np.asarray(samples_seen, dtype=float)
        y = np.asarray(errors, dtype=float) - d
        if len(n) != len(y) or len(n) < 2:
            raise ValueError("Give at least two (samples_seen, error) points of equal length.")
        if np.any(y <= 0):
            raise ValueError(f"Every error must exceed the irreducible error d={d}; lower `d`.")
        b_grid = np.linspace(-1.5, -0.005, 300) if b_grid is None else np.asarray(b_grid)
        tau_grid = np.concatenate([np.geomspace(0.25, 64, 40), [1e6]]) if tau_grid is None else np.asarray(tau_grid)
        best, best_loss = None, np.inf
        for tau in tau_grid:
            # every exponent is b times a decay, so log g = b * s with s the law's log for b = 1
            s = np.log([FilteringScalingLaw.curve(1.0, lambda k: 2.0 ** (-k / tau), m, pool_size, 0.0, unit)
                        for m in n])
            for b in b_grid:
                g = np.exp(b * s)
                a = float((g * y).sum() / (g * g).sum())
                if a <= 0:
                    continue
                loss = float(((np.log(a * g) - np.log(y)) ** 2).sum())
                if loss < best_loss:
                    best, best_loss = PoolLaw(a=a, b=float(b), tau=float(tau)), loss
        return best


class ComputeAwareSelection(Scorer):
    """Compute-aware data filtering (Goyal et al., CVPR 2024): choose *how much* to keep for a training budget.

    The pool is ranked by a quality ``scorer`` and cut into equal buckets (best first); a fitted
    :class:`FilteringScalingLaw` over those buckets predicts the error of training on the top 1, 2, ... buckets
    for ``samples_seen`` samples, and the best union is kept. Small budgets favour aggressive filtering,
    large budgets larger pools (the quality-quantity trade-off).

    Use with ``FilteredDataModule(keep=None)``: the kept size is this scorer's decision.

    Args:
        scorer: the quality score that ranks the pool.
        law: the fitted law; its number of pools is the number of buckets.
        samples_seen: the training budget (samples seen, repetitions included).

    Example:
        >>> import torch
        >>> from lightning_ext.curation.random_selection import RandomScorer
        >>> data = ScoringData.from_tensors(torch.zeros(200, 1), torch.zeros(200, dtype=torch.long))
        >>> law = FilteringScalingLaw([{"a": 1.0, "b": -0.5, "tau": 1.0}, {"a": 1.0, "b": -0.4, "tau": 4.0}],
        ...                           bucket_size=100, d=0.0)
        >>> s = ComputeAwareSelection(RandomScorer(), law, samples_seen=50)
        >>> len(s.select(s.score(data), data, None))
        100
    """

    def __init__(self, scorer: Scorer, law: FilteringScalingLaw, samples_seen: PositiveInt) -> None:
        check_positive_int("samples_seen", samples_seen)
        if not law.pools:
            raise ValueError("`law` has no fitted pools.")
        self.scorer, self.law, self.samples_seen = scorer, law, samples_seen

    def score(self, data: ScoringData) -> Scores:
        return self.scorer.score(data)

    def num_buckets(self) -> int:
        return self.law.best_pool(self.samples_seen)

    def select(self, scores: Scores, data: ScoringData, n_keep: Optional[int], class_balanced: bool = False) -> np.ndarray:
        if n_keep is not None:
            raise ValueError("ComputeAwareSelection chooses the kept size from the budget: set `keep: null`.")
        m, p = self.num_buckets(), len(self.law.pools)
        n = int(round(len(data) * m / p))
        return top_k(scores["score"], n, data.labels if class_balanced else None)
