"""``NoisySpeechDataModule``: real clean speech mixed with real noise recordings at sampled SNRs (offline)."""

from __future__ import annotations

import glob
from fractions import Fraction
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import Dataset
from typing_extensions import override

from lightning_ext.core.optional import require
from lightning_ext.core.sampling import SplitLoaders
from lightning_ext.core.validation import (
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    check_choice,
    check_number,
    check_positive,
    check_positive_int,
)

__all__ = ["NoisySpeechDataModule", "mix_at_snr", "read_audio"]

ALLISON = "/usr/share/asterisk/sounds/en_US_f_Allison/**/*.wav"
SONIC_PI = "/usr/share/sonic-pi/samples/"
#: Default noise types per split (disjoint): sonic-pi-samples recordings and bucklespring-data keyboard clicks.
TRAIN_NOISE = [SONIC_PI + p for p in ("ambi_*.flac", "loop_*.flac", "bass_*.flac", "drum_*.flac", "guit_*.flac",
                                      "tabla_*.flac")]
VAL_NOISE = [SONIC_PI + p for p in ("perc_*.flac", "glitch_*.flac", "mehackit_*.flac", "misc_*.flac")]
TEST_NOISE = [SONIC_PI + "vinyl_*.flac", SONIC_PI + "elec_*.flac", "/usr/share/buckle/wav/*.wav"]
APT = "apt-get install asterisk-core-sounds-en-wav sonic-pi-samples bucklespring-data"


def read_audio(path: str | Path, sample_rate: int, resample: bool = True) -> np.ndarray:
    """A mono float32 waveform of ``path`` at ``sample_rate`` (read with ``soundfile``; channels averaged;
    resampled with SciPy's polyphase filter, or a one-line error when ``resample=False`` and the rates differ)."""
    sf = require("soundfile", "NoisySpeechDataModule")
    data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    wav = data.mean(axis=1)
    if rate != sample_rate:
        if not resample:
            raise ValueError(f"{path} is sampled at {rate} Hz but sample_rate={sample_rate}; set resample=True or "
                             f"sample_rate={rate}.")
        from scipy.signal import resample_poly

        ratio = Fraction(sample_rate, rate)
        wav = resample_poly(wav, ratio.numerator, ratio.denominator).astype(np.float32)
    return wav


def mix_at_snr(clean: np.ndarray, noise: np.ndarray, snr_db: float, eps: float = 1e-10) -> np.ndarray:
    r"""``clean + g * noise`` with :math:`g` such that :math:`10\log_{10}(P_{clean}/P_{g\,noise}) =` ``snr_db``.

    Example:
        >>> s, n = np.ones(4), np.array([1.0, -1.0, 1.0, -1.0])
        >>> float(np.round(10 * np.log10((s ** 2).mean() / ((mix_at_snr(s, n, 6.0) - s) ** 2).mean()), 6))
        6.0
    """
    ps, pn = float(np.mean(clean ** 2)), float(np.mean(noise ** 2))
    gain = np.sqrt(ps / (max(pn, eps) * 10 ** (snr_db / 10)))
    return (clean + gain * noise).astype(np.float32)


def _files(patterns: list[str], what: str) -> list[str]:
    files = sorted({f for p in patterns for f in glob.glob(p, recursive=True)})
    if not files:
        raise FileNotFoundError(f"NoisySpeechDataModule: no {what} files match {patterns}; install the Debian "
                                f"data (`{APT}`) or point `{what}` at your own files.")
    return files


class _Mixtures(Dataset):
    """``(noisy, clean)`` crops, each drawn from a generator seeded by ``(seed, split, index)``."""

    def __init__(self, clean: list[np.ndarray], noise: list[np.ndarray], size: int, length: int,
                 snr_db: tuple[float, float], seed: int, split: int, on_short_clip: str) -> None:
        self.clean, self.noise, self.size, self.length = clean, noise, size, length
        self.snr_db, self.seed, self.split, self.on_short_clip = snr_db, seed, split, on_short_clip

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = np.random.default_rng([self.seed, self.split, index])
        clean = self.clean[int(g.integers(len(self.clean)))]
        n = self.length
        if len(clean) >= n:
            start = int(g.integers(len(clean) - n + 1))
            clean = clean[start:start + n]
        else:  # zero-pad at a random offset (on_short_clip="pad"; "skip" and "error" removed these in setup)
            start = int(g.integers(n - len(clean) + 1))
            clean = np.pad(clean, (start, n - len(clean) - start))
        noise = self.noise[int(g.integers(len(self.noise)))]
        if len(noise) < n:
            noise = np.tile(noise, -(-n // len(noise)))
        start = int(g.integers(len(noise) - n + 1))
        noise = noise[start:start + n]
        noisy = mix_at_snr(clean, noise, float(g.uniform(*self.snr_db)))
        return torch.from_numpy(noisy), torch.from_numpy(clean.astype(np.float32))


class NoisySpeechDataModule(SplitLoaders, LightningDataModule):
    r"""Real clean speech mixed with real noise recordings at sampled SNRs; train, validation and test noise types
    are disjoint, so the test noise is unseen.

    Defaults (Debian packages, offline; ``apt-get install asterisk-core-sounds-en-wav sonic-pi-samples
    bucklespring-data``): clean speech is the 568 professional US-English prompts of one female speaker
    (``asterisk-core-sounds-en-wav``, 8 kHz, 25.5 min), split by utterance ``train/val/test`` with ``split_seed``;
    noise types: training sonic-pi ambient/loop/bass/drum/guitar/tabla recordings, validation percussion/glitch/
    mehackit/misc, test vinyl noise, electronic blips and bucklespring keyboard clicks. Every file is read with
    ``soundfile``, averaged to mono and resampled to ``sample_rate`` (SciPy polyphase). A mixture is a
    ``segment_s`` crop of a clean utterance (random offset) plus a random crop of a noise file (looped when short),
    scaled to an SNR drawn uniformly from ``snr_db``. Each mixture is drawn from a generator seeded by ``(seed,
    split, index)``: ``num_train_mixtures`` training mixtures (the same pool every epoch, shuffled by the seeded,
    resumable loader), and fixed validation and test sets. Batches are ``(noisy (B, N), clean (B, N))``.

    Bad input: a clean utterance shorter than the crop is zero-padded (``on_short_clip="pad"``), dropped
    (``"skip"``) or refused (``"error"``); a file at another rate than ``sample_rate`` with ``resample=False``, a
    file in two splits, or ``val_split + test_split >= 1`` get one line saying what to change.

    Args:
        clean: glob(s) of clean speech files (WAV/FLAC/OGG).
        train_noise, val_noise, test_noise: globs of each split's noise files (disjoint).
        sample_rate: the common rate in Hz.
        resample: resample files at other rates (``False``: refuse them).
        segment_s: crop length in seconds.
        snr_db: ``[low, high]`` SNR range in dB.
        val_split, test_split: fractions of clean utterances held out.
        num_train_mixtures, num_val_mixtures, num_test_mixtures: mixtures per split.
        on_short_clip: ``"pad"``, ``"skip"`` or ``"error"`` for clean clips shorter than the crop.
        split_seed: seed of the utterance split; seed: seed of the mixtures.
        batch_size, num_workers, shuffle, shuffle_seed: the loaders.
    """

    def __init__(self, clean: list[str] = [ALLISON],  # noqa: B006 - read only, YAML-visible defaults
                 train_noise: list[str] = TRAIN_NOISE, val_noise: list[str] = VAL_NOISE,  # noqa: B006
                 test_noise: list[str] = TEST_NOISE,  # noqa: B006
                 sample_rate: PositiveInt = 8000, resample: bool = True, segment_s: PositiveFloat = 1.0,
                 snr_db: tuple[float, float] = (-5.0, 10.0), val_split: float = 0.1, test_split: float = 0.1,
                 num_train_mixtures: PositiveInt = 2000, num_val_mixtures: PositiveInt = 200,
                 num_test_mixtures: PositiveInt = 200, on_short_clip: Literal["pad", "skip", "error"] = "pad",
                 split_seed: NonNegativeInt = 0, seed: NonNegativeInt = 0, batch_size: PositiveInt = 8,
                 num_workers: NonNegativeInt = 0, shuffle: bool = True, shuffle_seed: NonNegativeInt = 0) -> None:
        super().__init__()
        for name, value in (("clean", clean), ("train_noise", train_noise), ("val_noise", val_noise),
                            ("test_noise", test_noise)):
            if isinstance(value, str) or not value or not all(isinstance(v, str) and v for v in value):
                raise ValueError(f"`{name}` must be a non-empty list of glob strings, got {value!r}.")
        check_positive_int("sample_rate", sample_rate)
        check_positive("segment_s", segment_s)
        if len(snr_db) != 2:
            raise ValueError(f"`snr_db` must be [low, high] in dB, got {snr_db!r}.")
        for v in snr_db:
            check_number("snr_db", v)
        if snr_db[0] > snr_db[1]:
            raise ValueError(f"`snr_db` must be [low, high] with low <= high, got {list(snr_db)}.")
        check_number("val_split", val_split, low=0, high=1)
        check_number("test_split", test_split, low=0, high=1)
        if val_split <= 0 or test_split <= 0 or val_split + test_split >= 1:
            raise ValueError(f"val_split ({val_split}) and test_split ({test_split}) must be > 0 with a sum < 1.")
        for name, value in (("num_train_mixtures", num_train_mixtures), ("num_val_mixtures", num_val_mixtures),
                            ("num_test_mixtures", num_test_mixtures), ("batch_size", batch_size)):
            check_positive_int(name, value)
        check_choice("on_short_clip", on_short_clip, ("pad", "skip", "error"))
        for name, value in (("split_seed", split_seed), ("seed", seed), ("num_workers", num_workers),
                            ("shuffle_seed", shuffle_seed)):
            check_number(name, value, low=0, integer=True)
        require("soundfile", type(self).__name__)
        self.clean_globs, self.noise_globs = list(clean), {"train": list(train_noise), "val": list(val_noise),
                                                          "test": list(test_noise)}
        self.sample_rate, self.resample, self.segment_s = sample_rate, resample, float(segment_s)
        self.snr_db = (float(snr_db[0]), float(snr_db[1]))
        self.val_split, self.test_split = val_split, test_split
        self.sizes = {"train": num_train_mixtures, "val": num_val_mixtures, "test": num_test_mixtures}
        self.on_short_clip, self.split_seed, self.seed = on_short_clip, split_seed, seed
        self.batch_size, self.num_workers, self.shuffle, self.shuffle_seed = batch_size, num_workers, shuffle, shuffle_seed
        self.sets: dict[str, Dataset] = {}
        self.files: dict[str, dict[str, list[str]]] = {}

    @property
    def segment_length(self) -> int:
        """Samples per crop."""
        return int(round(self.segment_s * self.sample_rate))

    @override
    def setup(self, stage: Optional[str] = None) -> None:
        """Read and resample the files, split the utterances and build the three mixture sets."""
        if self.sets:
            return
        clean_files = _files(self.clean_globs, "clean")
        noise_files = {s: _files(p, f"{s}_noise") for s, p in self.noise_globs.items()}
        for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
            shared = set(noise_files[a]) & set(noise_files[b])
            if shared:
                raise ValueError(f"{len(shared)} noise file(s) are in both {a}_noise and {b}_noise (e.g. "
                                 f"{sorted(shared)[0]}); make the noise splits disjoint.")
            if set(noise_files[a]) & set(clean_files):
                raise ValueError(f"a file is both clean speech and {a}_noise; separate `clean` from the noise globs.")
        n = self.segment_length
        order = np.random.default_rng(self.split_seed).permutation(len(clean_files))
        n_test = max(1, int(round(self.test_split * len(clean_files))))
        n_val = max(1, int(round(self.val_split * len(clean_files))))
        if n_test + n_val >= len(clean_files):
            raise ValueError(f"{len(clean_files)} clean files are too few for val_split={self.val_split} and "
                             f"test_split={self.test_split}; add files or lower the splits.")
        parts = {"test": order[:n_test], "val": order[n_test:n_test + n_val], "train": order[n_test + n_val:]}
        for split_id, split in enumerate(("train", "val", "test")):
            files = [clean_files[i] for i in sorted(parts[split])]
            clips = [read_audio(f, self.sample_rate, self.resample) for f in files]
            short = [f for f, c in zip(files, clips) if len(c) < n]
            if short and self.on_short_clip == "error":
                raise ValueError(f"{len(short)} clean clip(s) are shorter than the {self.segment_s} s crop (e.g. "
                                 f"{short[0]}); set on_short_clip='pad' or 'skip', or a shorter segment_s.")
            if self.on_short_clip == "skip":
                kept = [(f, c) for f, c in zip(files, clips) if len(c) >= n]
                if not kept:
                    raise ValueError(f"every {split} clip is shorter than the {self.segment_s} s crop; set a shorter "
                                     "segment_s or on_short_clip='pad'.")
                files, clips = [f for f, _ in kept], [c for _, c in kept]
            noise = [read_audio(f, self.sample_rate, self.resample) for f in noise_files[split]]
            noise = [w for w in noise if float(np.mean(w ** 2)) > 1e-10]
            if not noise:
                raise ValueError(f"every {split}_noise file is silent; choose other noise files.")
            self.files[split] = {"clean": files, "noise": noise_files[split]}
            self.sets[split] = _Mixtures(clips, noise, self.sizes[split], n, self.snr_db, self.seed, split_id,
                                         self.on_short_clip)

    def split_dataset(self, split: str) -> Dataset:
        """The mixtures of ``split`` (after ``setup``)."""
        if split not in self.sets:
            raise RuntimeError("NoisySpeechDataModule: call setup() before asking for a dataloader.")
        return self.sets[split]
