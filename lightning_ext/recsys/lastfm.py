"""LastFM with the LightGCN split (LightGCN-PyTorch's ``data/lastfm``), read from a local copy."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np

from lightning_ext.recsys.interactions import InteractionDataModule


def _read_tsv_pairs(path: Path) -> np.ndarray:
    try:  # `user item weight`; some weights are written 3.2e+05
        rows = np.loadtxt(path, dtype=np.float64, ndmin=2)
    except ValueError as err:
        raise ValueError(f"{path}: expected tab-separated `user item weight` rows of numbers; the file is truncated "
                         f"or foreign ({err}).") from None
    if rows.size == 0 or rows.shape[1] < 2:
        raise ValueError(f"{path}: expected tab-separated `user item weight` rows (an empty or truncated file?).")
    if not np.isfinite(rows[:, :2]).all() or (rows[:, :2] < 1).any():
        raise ValueError(f"{path}: user and item ids must be finite and >= 1 (the files are 1-indexed).")
    return rows[:, :2].astype(np.int64) - 1  # the files are 1-indexed


class LastFMDataModule(InteractionDataModule):
    """LastFM, LightGCN split: ``data1.txt`` train / ``test1.txt`` test, every listed (user, artist) pair positive.

    Protocol ``lastfm (LightGCN split)``: the files of LightGCN-PyTorch's ``data/lastfm`` (1,892 users, 4,489
    items, 42,135 train / 10,533 test pairs, tab-separated ``user item weight``, 1-indexed; the play-count weight
    is ignored, as in LightGCN). Every pair is implicit positive feedback. The split is the published one, not
    re-drawn; validation is carved per user out of ``data1.txt`` (``val_fraction``, ``split_seed``).

    Args:
        root: folder with ``data1.txt`` and ``test1.txt``; default ``$LASTFM_ROOT``, else ``../shared/data/lastfm``
            beside the repository.
        **kwargs: :class:`~lightning_ext.recsys.interactions.InteractionDataModule` arguments.

    Example:
        >>> dm = LastFMDataModule(root="../shared/data/lastfm")  # doctest: +SKIP
        >>> dm.setup(); dm.interactions.stats()  # doctest: +SKIP
        {'users': 1892, 'items': 4489, 'train': 37964, 'val': 4171, 'test': 10533}
    """

    protocol = "lastfm (LightGCN split: data1.txt train / test1.txt test, all pairs positive)"
    NUM_USERS, NUM_ITEMS = 1892, 4489

    def __init__(self, root: Optional[str] = None, **kwargs) -> None:
        super().__init__(**kwargs)
        default = Path(__file__).resolve().parents[3] / "shared" / "data" / "lastfm"
        self.root = Path(root or os.environ.get("LASTFM_ROOT") or default).expanduser()
        missing = [f for f in ("data1.txt", "test1.txt") if not (self.root / f).is_file()]
        if missing:
            raise FileNotFoundError(
                f"LastFM files {missing} not found in {self.root}. Copy `data/lastfm` of LightGCN-PyTorch "
                "(github.com/gusye1234/LightGCN-PyTorch) there, or pass `root=` / set $LASTFM_ROOT."
            )

    def load_splits(self):
        train = _read_tsv_pairs(self.root / "data1.txt")
        test = _read_tsv_pairs(self.root / "test1.txt")
        return train, test, self.NUM_USERS, self.NUM_ITEMS
