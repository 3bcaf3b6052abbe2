"""GraphTimeSeriesDataModule: the Ethereum token networks as graph time series, with cached zigzag persistence images.

Z-GCNETs' token datasets (Chen, Segovia-Dominguez & Gel, ICML 2021, arXiv 2105.04100; reference code
https://github.com/Z-GCNETs/Z-GCNETs ``token_datasets/``): the 100 most active addresses of the Bytom (272 days) and
Decentraland (206 days) ERC-20 token networks, one weighted edge list per day (``EdgeList_W/``, weights in (0, 1]),
and per node and day its degree in that day's graph (``token_data/*_node_features.npz``; checked here: it equals
the degree of the day's edge list). The series forecast is the node degree (the reference's
``load_st_dataset``); the daily closing prices in ``prices_closed/`` are not used.

Windows (``x``: ``lag`` days, ``y``: the next ``horizon`` days) are cut inside each chronological part: the days are
split ``1 - val_ratio - test_ratio`` / ``val_ratio`` / ``test_ratio`` first, then windowed, so no window crosses a
part (AGCRN's and the reference's ``split_data_by_ratio`` then ``Add_Window_Horizon``). The z-score scaler is fitted
on the training days only (the reference fits it on all days: a small leak avoided here). ``x`` is normalised, ``y``
stays in real units (the model de-normalises, ``real_value=True``).

Each window's zigzag persistence image (:class:`~lightning_ext.graph.zigzag_persistence.ZigzagPersistenceImage`,
H0, over the window's ``lag`` daily graphs, i.e. the days of ``x``) is computed once and cached as ``.npz`` under
``cache_dir`` (a relative ``cache_dir`` lies under ``core.paths.cache_root("GraphTimeSeriesDataModule")``, i.e.
``$LIGHTNING_EXT_CACHE/GraphTimeSeriesDataModule`` or ``~/.cache/lightning_ext/GraphTimeSeriesDataModule``), keyed
by a hash of the data and the image parameters, written atomically and validated on load (key, shape, finite values
in [0, 1]); an invalid file is recomputed. ``zpi_mode``: ``"real"`` (each window's own image), ``"shuffled"`` (the
images permuted among the windows of the same split, seeded by ``zpi_seed``: same marginal distribution, no
alignment) or ``"none"`` (no ``zpi`` key).

Batches: ``{"x": (B, lag, N, 1), "y": (B, horizon, N, 1), "zpi": (B, 1, p, p)}``.

Example:
    >>> dm = GraphTimeSeriesDataModule("Decentraland", lag=7, horizon=7)  # doctest: +SKIP
    >>> dm.setup("fit"); len(dm.train_set), dm.train_set[0]["zpi"].shape  # doctest: +SKIP
    (111, torch.Size([1, 100, 100]))
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import Dataset
from typing_extensions import override

from lightning_ext.core.io import atomic_path
from lightning_ext.core.paths import cache_root, check_path_argument
from lightning_ext.core.sampling import SplitLoaders
from lightning_ext.core.validation import (
    NonNegativeInt,
    OpenUnitInterval,
    PositiveFloat,
    PositiveInt,
    check_choice,
    check_number,
    check_positive,
    check_positive_int,
)
from lightning_ext.graph.zigzag_persistence import ZigzagPersistenceImage

TOKENS = ("Decentraland", "Bytom")


def default_root() -> Path:
    """``$TOKEN_NETWORKS_ROOT``, else ``../shared/data/token_networks``."""
    return Path(os.environ.get("TOKEN_NETWORKS_ROOT", "../shared/data/token_networks"))


def load_token_network(name: str, root: Optional[str] = None) -> tuple[np.ndarray, list[np.ndarray]]:
    """The degree series ``(T, 100, 1)`` float32 and the ``T`` daily weighted edge lists ``(E, 3)`` (0-based ids)
    of token network ``name`` (``"Decentraland"`` or ``"Bytom"``) from the reference's folder layout."""
    check_choice("source", name, TOKENS)
    base = Path(root) if root is not None else default_root()
    feat = base / "token_data" / f"{name}_node_features.npz"
    edge_dir = base / "token_networks" / name / "EdgeList_W"
    if not feat.is_file() or not edge_dir.is_dir():
        raise FileNotFoundError(f"root={str(base)!r} lacks token_data/{name}_node_features.npz or "
                                f"token_networks/{name}/EdgeList_W; point root (or $TOKEN_NETWORKS_ROOT) at the "
                                "Z-GCNETs token_datasets folder (here ../shared/data/token_networks).")
    with np.load(feat) as z:
        series = np.asarray(z[z.files[0]], dtype=np.float32)
    if series.ndim == 2:
        series = series[..., None]
    files = {}
    for f in edge_dir.iterdir():
        m = re.search(r"(\d+)\.txt$", f.name)
        if m:
            files[int(m.group(1))] = f
    t = series.shape[0]
    missing = [d for d in range(1, t + 1) if d not in files]
    if missing:
        raise FileNotFoundError(f"{edge_dir} lacks the edge lists of days {missing[:5]}...; the series has {t} days.")
    graphs = []
    for d in range(1, t + 1):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # numpy warns on an empty file (a day without edges)
            e = np.loadtxt(files[d], ndmin=2)
        e = e.reshape(-1, 3)
        e[:, :2] -= 1  # the files count vertices from 1
        graphs.append(e)
    return series, graphs


class _Windows(Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor, zpi: Optional[torch.Tensor]) -> None:
        self.x, self.y, self.zpi = x, y, zpi

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        out = {"x": self.x[i], "y": self.y[i]}
        if self.zpi is not None:
            out["zpi"] = self.zpi[i]
        return out


class GraphTimeSeriesDataModule(SplitLoaders, LightningDataModule):
    """Token-network graph time series (degree per node and day) with each window's zigzag persistence image.

    See the module docstring (:mod:`lightning_ext.graph.graph_time_series`) for the data, split, scaler and cache.

    Args:
        source: ``"Decentraland"`` (206 days) or ``"Bytom"`` (272 days), 100 nodes each.
        root: the token datasets folder (default ``$TOKEN_NETWORKS_ROOT``, else ``../shared/data/token_networks``).
        lag: input days per window (the reference's token ZPI window: 7).
        horizon: forecast days.
        val_ratio: share of the days for validation (after the training days).
        test_ratio: share of the last days for test.
        normalizer: ``"std"`` (z-score over the training days) or ``"none"``.
        zpi_mode: ``"real"``, ``"shuffled"`` or ``"none"`` (see above).
        alpha: weighted edges above ``alpha`` are dropped before the zigzag (1.0 keeps all token edges).
        resolution: image side ``p``.
        bandwidth: the image's Gaussian bandwidth.
        power: the image's bar-length exponent.
        zpi_seed: seed of the ``"shuffled"`` permutation.
        batch_size: windows per batch.
        shuffle: shuffle the training windows each epoch.
        shuffle_seed: seed of that order.
        num_workers: loader workers.
        cache_dir: the image cache folder (relative: under the cache root; ``None`` computes without caching).
    """

    def __init__(self, source: Literal["Decentraland", "Bytom"] = "Decentraland", root: Optional[str] = None,
                 lag: PositiveInt = 7, horizon: PositiveInt = 7, val_ratio: OpenUnitInterval = 0.2,
                 test_ratio: OpenUnitInterval = 0.2, normalizer: Literal["std", "none"] = "std",
                 zpi_mode: Literal["real", "shuffled", "none"] = "real", alpha: PositiveFloat = 1.0,
                 resolution: PositiveInt = 100, bandwidth: PositiveFloat = 1.0, power: float = 1.0,
                 zpi_seed: int = 0, batch_size: PositiveInt = 8, shuffle: bool = True, shuffle_seed: int = 0,
                 num_workers: NonNegativeInt = 0, cache_dir: Optional[str] = "zpi") -> None:
        super().__init__()
        check_choice("source", source, TOKENS)
        check_path_argument("root", root)
        check_path_argument("cache_dir", cache_dir)
        check_positive_int("lag", lag)
        check_positive_int("horizon", horizon)
        check_number("val_ratio", val_ratio, low=0, high=1, low_open=True, high_open=True)
        check_number("test_ratio", test_ratio, low=0, high=1, low_open=True, high_open=True)
        if val_ratio + test_ratio >= 1:
            raise ValueError(f"val_ratio + test_ratio must be below 1 (got {val_ratio + test_ratio}); leave days "
                             "for training.")
        check_choice("normalizer", normalizer, ("std", "none"))
        check_choice("zpi_mode", zpi_mode, ("real", "shuffled", "none"))
        check_number("zpi_seed", zpi_seed, integer=True)
        check_positive_int("batch_size", batch_size)
        check_number("shuffle_seed", shuffle_seed, integer=True)
        check_number("num_workers", num_workers, low=0, integer=True)
        if not isinstance(shuffle, bool):
            raise ValueError(f"shuffle must be true or false (got {shuffle!r}).")
        check_positive("alpha", alpha)
        self.zpi = ZigzagPersistenceImage(alpha=alpha, resolution=resolution, bandwidth=bandwidth, power=power)
        self.source, self.root, self.lag, self.horizon = source, root, int(lag), int(horizon)
        self.val_ratio, self.test_ratio, self.normalizer, self.zpi_mode = val_ratio, test_ratio, normalizer, zpi_mode
        self.zpi_seed, self.batch_size, self.shuffle, self.shuffle_seed = zpi_seed, batch_size, shuffle, shuffle_seed
        self.num_workers, self.cache_dir, self.resolution = num_workers, cache_dir, int(resolution)
        self.num_nodes: Optional[int] = None
        self.num_channels: Optional[int] = None
        self.scaler: Optional[tuple[float, float]] = None
        self.splits: dict[str, _Windows] = {}
        self.bounds: dict[str, tuple[int, int]] = {}

    # ------------------------------------------------------------------ data
    def _cache_file(self, key: str) -> Optional[Path]:
        if self.cache_dir is None:
            return None
        d = Path(self.cache_dir)
        d = d if d.is_absolute() else cache_root("GraphTimeSeriesDataModule") / d
        return d / f"{self.source}_lag{self.lag}_{key[:16]}.npz"

    def _images(self, graphs: list[np.ndarray], starts: list[int], num_nodes: int, data_hash: str) -> np.ndarray:
        """The real images of the windows starting at ``starts`` (cached)."""
        key = hashlib.sha256(json.dumps({"data": data_hash, "lag": self.lag, "starts": starts,
                                         "zpi": self.zpi.params(), "version": 1}, sort_keys=True).encode()).hexdigest()
        path = self._cache_file(key)
        want = (len(starts), self.resolution, self.resolution)
        if path is not None and path.is_file():
            try:
                with np.load(path) as z:
                    images, stored = z["images"], str(z["key"])
                if stored == key and images.shape == want and np.isfinite(images).all() and \
                        images.min() >= 0 and images.max() <= 1:
                    return images
                warnings.warn(f"{path} does not match this data or is damaged; recomputing the images.")
            except Exception as err:  # a truncated or foreign file
                warnings.warn(f"{path} could not be read ({err}); recomputing the images.")
        images = np.stack([self.zpi(graphs[s:s + self.lag], num_nodes) for s in starts]).astype(np.float32)
        if path is not None:
            with atomic_path(path) as tmp:
                with open(tmp, "wb") as fh:
                    np.savez(fh, images=images, key=np.asarray(key))
        return images

    @override
    def setup(self, stage: Optional[str] = None) -> None:
        """Load the series and graphs, split by days, window, fit the scaler on training days, attach images."""
        if self.splits:
            return
        series, graphs = load_token_network(self.source, self.root)
        t, n, d = series.shape
        self.num_nodes, self.num_channels = n, d
        n_test, n_val = int(t * self.test_ratio), int(t * self.val_ratio)
        n_train = t - n_val - n_test
        self.bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, t)}
        span = self.lag + self.horizon
        for split, (a, b) in self.bounds.items():
            if b - a < span:
                raise ValueError(f"The {split} part has {b - a} days, fewer than lag + horizon = {span}; lower lag "
                                 "or horizon, or change val_ratio/test_ratio.")
        train = series[:n_train]
        self.scaler = (float(train.mean()), float(train.std())) if self.normalizer == "std" else (0.0, 1.0)
        if self.scaler[1] <= 0:
            raise ValueError(f"The training days of {self.source} are constant; use normalizer='none'.")
        h = hashlib.sha256(series.tobytes())
        for g in graphs:
            h.update(np.ascontiguousarray(g, dtype=np.float64).tobytes())
            h.update(b"|")
        data_hash = h.hexdigest()
        starts = {s: list(range(a, b - span + 1)) for s, (a, b) in self.bounds.items()}
        images = None
        if self.zpi_mode != "none":
            every = [i for s in ("train", "val", "test") for i in starts[s]]
            images = dict(zip(every, self._images(graphs, every, n, data_hash)))
        norm = (series - self.scaler[0]) / self.scaler[1]
        for k, (split, st) in enumerate(starts.items()):
            x = torch.from_numpy(np.stack([norm[i:i + self.lag] for i in st]))
            y = torch.from_numpy(np.stack([series[i + self.lag:i + span] for i in st]))
            zpi = None
            if images is not None:
                img = np.stack([images[i] for i in st])
                if self.zpi_mode == "shuffled":
                    rng = np.random.default_rng([self.zpi_seed, k])
                    img = img[rng.permutation(len(img))]
                zpi = torch.from_numpy(img)[:, None]
            self.splits[split] = _Windows(x, y, zpi)

    @property
    def train_set(self) -> _Windows:
        """The training windows (after ``setup``)."""
        return self.split_dataset("train")

    @override
    def split_dataset(self, split: str) -> _Windows:
        """The windows of ``split``."""
        if not self.splits:
            raise RuntimeError("call setup() first")
        return self.splits[split]
