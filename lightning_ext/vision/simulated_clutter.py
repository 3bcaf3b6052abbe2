"""``SimulatedClutterDataModule``: real image sequences with simulated, temporally stationary clutter added."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from typing_extensions import override

from lightning_ext.core.sampling import SplitLoaders
from lightning_ext.core.validation import (
    NonNegativeInt,
    OpenUnitInterval,
    PositiveFloat,
    PositiveInt,
    check_fraction,
    check_number,
    check_positive_int,
)

__all__ = ["SimulatedClutterDataModule", "simulate_clutter"]

VISP_ROOT = Path("/usr/share/visp-images-data/ViSP-images")
_SOURCES = {"visp:mbt/cube": "mbt/cube", "visp:mire-2": "mire-2", "visp:cube": "cube"}


def _load_frames(source: str, size: int) -> torch.Tensor:
    from PIL import Image

    folder = VISP_ROOT / _SOURCES[source] if source in _SOURCES else Path(source).expanduser()
    if not folder.is_dir():
        hint = ("install Debian's visp-images-data (`apt-get install visp-images-data`)" if source in _SOURCES
                else "pass a folder of frames (.pgm/.png/.jpg, sorted by name) or one of " + ", ".join(_SOURCES))
        raise FileNotFoundError(f"SimulatedClutterDataModule: {folder} does not exist; {hint}.")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".pgm", ".png", ".jpg", ".jpeg", ".tif"))
    if not files:
        raise FileNotFoundError(f"SimulatedClutterDataModule: no image frames in {folder}.")
    frames = []
    for p in files:
        img = Image.open(p).convert("L")
        w, h = img.size
        side = min(w, h)  # centre square crop, then resize
        img = img.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
        frames.append(np.asarray(img.resize((size, size), Image.BILINEAR), dtype=np.float32) / 255.0)
    return torch.from_numpy(np.stack(frames))


def simulate_clutter(t: int, size: int, generator: torch.Generator, amplitude: tuple[float, float] = (0.2, 0.6),
                     near_field: bool = True, reverberation: bool = True) -> torch.Tensor:
    r"""Clutter ``(T, H, W)`` that is nearly static in time, as in echocardiography (the paper's two kinds).

    Near field (NF): a bright haze in the top 10-20% of the image, a sum of 3-5 wide Gaussian blobs, its amplitude
    modulated slowly over the clip (:math:`1 + 0.1\sin(2\pi t/T + \varphi)`). Reverberation lines (RL): horizontal
    bands at multiples of a random depth :math:`d`, amplitude decaying geometrically with the band's order, a
    slight sinusoidal tilt, static in time. Peak amplitudes are drawn in ``amplitude``. Our model, following the
    paper's description (its vendor simulations are not public).

    Example:
        >>> c = simulate_clutter(4, 32, torch.Generator().manual_seed(0))
        >>> tuple(c.shape), bool((c >= 0).all()), float((c[0] - c[1]).abs().max()) < 0.1
        ((4, 32, 32), True, True)
    """
    def u(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=generator))

    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    static = torch.zeros(size, size)
    nf = torch.zeros(size, size)
    if near_field:
        depth = u(0.1, 0.2)
        for _ in range(int(u(3, 6))):
            cx, cy, sx, sy = u(0, 1), u(0, depth), u(0.1, 0.3), u(0.03, 0.08)
            nf += torch.exp(-((xx - cx) ** 2 / (2 * sx ** 2) + (yy - cy) ** 2 / (2 * sy ** 2)))
        nf = nf / nf.max().clamp_min(1e-6) * u(*amplitude)
    if reverberation:
        d, peak, decay, tilt = u(0.12, 0.25), u(*amplitude), u(0.5, 0.8), u(-0.03, 0.03)
        width = u(0.008, 0.02)
        for k in range(1, int(1 / d) + 1):
            centre = k * d + tilt * torch.sin(2 * math.pi * xx)
            static += peak * decay ** (k - 1) * torch.exp(-((yy - centre) ** 2) / (2 * width ** 2))
    phase = u(0, 2 * math.pi)
    times = torch.arange(t, dtype=torch.float32)
    modulation = 1 + 0.1 * torch.sin(2 * math.pi * times / max(t, 1) + phase)
    return static.expand(t, -1, -1) + modulation.view(t, 1, 1) * nf


class SimulatedClutterDataModule(SplitLoaders, LightningDataModule):
    r"""Real image sequences with simulated, temporally stationary clutter added (the clutter filter's task).

    Frames of a real sequence (default: Debian ``visp-images-data``'s ``mbt/cube``, 218 camera frames of a moving
    cube, 480x640; or any folder of frames) are centre-cropped, resized to ``size x size`` and scaled to [0, 1].
    The sequence is cut **in time**: the first ``train_fraction`` of the frames for training, the next
    ``val_fraction`` for validation, the rest for testing (no test frame is ever trained on). Each split yields
    clips of ``clip_len`` consecutive frames (training clips every ``train_stride`` frames, evaluation clips
    without overlap); each clip gets its own clutter from :func:`simulate_clutter` (drawn once from ``seed`` and the
    clip's index, so epochs and resumed runs see the same data). Batches are ``(cluttered, clean, mask)``, each
    ``(B, 1, T, H, W)``: ``cluttered = clip(clean + clutter, 0, 1)`` and ``mask = clutter > mask_threshold``.

    Args:
        source: ``"visp:mbt/cube"``, ``"visp:mire-2"``, ``"visp:cube"`` or a folder of frames sorted by name.
        clip_len: frames per clip (T).
        size: frame side after resizing (divisible by 8 for a 4-level filter).
        train_stride: frames between training clip starts.
        amplitude_low, amplitude_high: range of the clutter's peak amplitude.
        near_field, reverberation: which clutter kinds to add.
        mask_threshold: clutter level that counts as cluttered in ``mask``.
        train_fraction, val_fraction: shares of the frames (in time order) for training and validation.
        seed: seed of the clutter.
        batch_size, num_workers, shuffle, shuffle_seed: the training loader.

    Example:
        >>> dm = SimulatedClutterDataModule(clip_len=8, size=32, batch_size=2)
        >>> dm.setup()
        >>> [tuple(t.shape) for t in next(iter(dm.train_dataloader()))]
        [(2, 1, 8, 32, 32), (2, 1, 8, 32, 32), (2, 1, 8, 32, 32)]
    """

    def __init__(self, source: str = "visp:mbt/cube", clip_len: PositiveInt = 16, size: PositiveInt = 64,
                 train_stride: PositiveInt = 4, amplitude_low: PositiveFloat = 0.2, amplitude_high: PositiveFloat = 0.6,
                 near_field: bool = True, reverberation: bool = True, mask_threshold: PositiveFloat = 0.05,
                 train_fraction: OpenUnitInterval = 0.7, val_fraction: OpenUnitInterval = 0.1, seed: NonNegativeInt = 0,
                 batch_size: PositiveInt = 4, num_workers: NonNegativeInt = 0, shuffle: bool = True,
                 shuffle_seed: NonNegativeInt = 0) -> None:
        super().__init__()
        for name, value in (("clip_len", clip_len), ("size", size), ("train_stride", train_stride),
                            ("batch_size", batch_size)):
            check_positive_int(name, value)
        check_number("amplitude_low", amplitude_low, low=0, low_open=True)
        check_number("amplitude_high", amplitude_high, low=amplitude_low, high=1)
        check_number("mask_threshold", mask_threshold, low=0, low_open=True)
        check_fraction("train_fraction", train_fraction, allow_zero=False, allow_one=False)
        check_fraction("val_fraction", val_fraction, allow_zero=False, allow_one=False)
        if train_fraction + val_fraction >= 1:
            raise ValueError(f"`train_fraction` + `val_fraction` = {train_fraction + val_fraction:g} leaves no test "
                             "frames; make their sum < 1.")
        if not (near_field or reverberation):
            raise ValueError("Set `near_field` or `reverberation` (or both): with neither there is no clutter.")
        for name, value in (("seed", seed), ("num_workers", num_workers), ("shuffle_seed", shuffle_seed)):
            check_number(name, value, low=0, integer=True)
        self.source, self.clip_len, self.size, self.train_stride = source, clip_len, size, train_stride
        self.amplitude = (amplitude_low, amplitude_high)
        self.near_field, self.reverberation, self.mask_threshold = near_field, reverberation, mask_threshold
        self.train_fraction, self.val_fraction, self.seed = train_fraction, val_fraction, seed
        self.batch_size, self.num_workers, self.shuffle, self.shuffle_seed = batch_size, num_workers, shuffle, shuffle_seed
        self._splits: dict[str, list] = {}

    def _clips(self, frames: torch.Tensor, stride: int, offset: int) -> list:
        out = []
        for i, start in enumerate(range(0, len(frames) - self.clip_len + 1, stride)):
            clean = frames[start:start + self.clip_len]
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + offset + i)
            clutter = simulate_clutter(self.clip_len, self.size, g, self.amplitude, self.near_field, self.reverberation)
            out.append(((clean + clutter).clamp(0, 1)[None], clean[None], (clutter > self.mask_threshold)[None]))
        return out

    @override
    def setup(self, stage: Optional[str] = None) -> None:
        """Load and resize the frames, split them in time, build the cluttered clips."""
        if self._splits:
            return
        frames = _load_frames(self.source, self.size)
        n = len(frames)
        a, b = round(n * self.train_fraction), round(n * (self.train_fraction + self.val_fraction))
        if min(a, b - a, n - b) < self.clip_len:
            raise ValueError(f"{n} frames split {a}/{b - a}/{n - b} leave a split shorter than clip_len="
                             f"{self.clip_len}; use a shorter clip_len or other fractions.")
        self._splits = {"train": self._clips(frames[:a], self.train_stride, 0),
                        "val": self._clips(frames[a:b], self.clip_len, 100_000),
                        "test": self._clips(frames[b:], self.clip_len, 200_000)}

    @property
    def train_set(self) -> list:
        """The training clips."""
        return self.split_dataset("train")

    def split_dataset(self, split: str) -> list:
        """The clips of ``split``."""
        if not self._splits:
            raise RuntimeError("Call SimulatedClutterDataModule.setup() before asking for data.")
        return self._splits[split]
