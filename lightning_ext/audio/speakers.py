"""``SpeakerDataModule``: utterances grouped by speaker, speakers disjoint between training and verification trials."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from fractions import Fraction
from typing import Literal, Optional

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import Dataset
from typing_extensions import override

from lightning_ext.audio.noisy_speech import ALLISON, read_audio
from lightning_ext.core.optional import require
from lightning_ext.core.sampling import SplitLoaders
from lightning_ext.core.validation import (
    AtLeastTwoInt,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    check_choice,
    check_number,
    check_positive,
    check_positive_int,
)

__all__ = ["HEDGEWARS", "SpeakerDataModule", "synthesize_espeak", "warp_voice"]

APT = "apt-get install asterisk-core-sounds-en-wav"
#: Debian ``hedgewars-data``: 15 game voice packs (839 OGG clips, 44.1/48 kHz), one folder per pack.
HEDGEWARS = "/usr/share/games/hedgewars/Data/Sounds/voices/*/*.ogg"
#: Harvard sentences, lists 1 and 2 (IEEE Recommended Practice for Speech Quality Measurements, 1969).
SENTENCES = (
    "The birch canoe slid on the smooth planks.", "Glue the sheet to the dark blue background.",
    "It's easy to tell the depth of a well.", "These days a chicken leg is a rare dish.",
    "Rice is often served in round bowls.", "The juice of lemons makes fine punch.",
    "The box was thrown beside the parked truck.", "The hogs were fed chopped corn and garbage.",
    "Four hours of steady work faced us.", "A large size in stockings is hard to sell.",
    "The boy was there when the sun rose.", "A rod is used to catch pink salmon.",
    "The source of the huge river is the clear spring.", "Kick the ball straight and follow through.",
    "Help the woman get back to her feet.", "A pot of tea helps to pass the evening.",
    "Smoky fires lack flame and heat.", "The soft cushion broke the man's fall.",
    "The salt breeze came across from the sea.", "The girl at the booth sold fifty bonds.")


def synthesize_espeak(voice: str, sentences: list[str], sample_rate: int) -> list[tuple[str, np.ndarray]]:
    """``sentences`` spoken by the espeak-ng voice ``voice`` (e.g. ``"en+m3"``, ``"en-us+f2"``; formant synthesis,
    Debian ``espeak-ng``), as ``(name, waveform at sample_rate)`` pairs, synthesised into a temporary folder."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise FileNotFoundError("SpeakerDataModule: tts_voices needs the espeak-ng program; `apt-get install "
                                "espeak-ng`, or set tts_voices=[].")
    def names(arg: str) -> set[str]:
        rows = subprocess.run([exe, arg], capture_output=True, text=True, timeout=60).stdout.splitlines()[1:]
        return {v.lower() for r in rows if len(r.split()) >= 5 for v in (r.split()[1], r.split()[3],
                                                                          r.split()[4].split("/")[-1])}

    base, _, variant = voice.partition("+")
    if base.lower() not in names("--voices") or (variant and variant.lower() not in names("--voices=variant")):
        raise ValueError(f"espeak-ng could not speak with voice {voice!r} (unknown language or variant); list "
                         "voices with `espeak-ng --voices` and variants with `espeak-ng --voices=variant`.")
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, text in enumerate(sentences):
            path = os.path.join(tmp, f"{i:02d}.wav")
            done = subprocess.run([exe, "-v", voice, "-w", path, text], capture_output=True, text=True, timeout=60)
            if done.returncode != 0 or not os.path.exists(path):
                raise ValueError(f"espeak-ng could not speak with voice {voice!r} ({done.stderr.strip()[:120]}); "
                                 "list voices with `espeak-ng --voices` and variants with `--voices=variant`.")
            out.append((f"espeak:{voice}/{i:02d}", read_audio(path, sample_rate, True)))
    return out


def warp_voice(wav: np.ndarray, warp: float, sample_rate: int, resonance_hz: float = 0.0,
               resonance_db: float = 0.0) -> np.ndarray:
    r"""A pseudo-speaker's version of ``wav``: played ``warp`` times faster (pitch and formants scaled by ``warp``,
    as a shorter vocal tract would; SciPy polyphase resampling by a rational approximation of ``1/warp``), then
    coloured by a peaking resonance of ``resonance_db`` dB at ``resonance_hz`` (an RBJ biquad, Q = 2).

    Example:
        >>> x = np.sin(2 * np.pi * 200 * np.arange(8000) / 8000).astype(np.float32)
        >>> y = warp_voice(x, 1.25, 8000)
        >>> len(y), int(np.argmax(np.abs(np.fft.rfft(y))) * 8000 / len(y))  # 0.8 s long, 250 Hz
        (6400, 250)
    """
    from scipy.signal import lfilter, resample_poly

    check_positive("warp", warp)
    ratio = Fraction(1.0 / warp).limit_denominator(50)
    out = resample_poly(wav, ratio.numerator, ratio.denominator) if ratio != 1 else np.asarray(wav)
    if resonance_db and 0 < resonance_hz < sample_rate / 2:
        a = 10 ** (resonance_db / 40)
        w0 = 2 * np.pi * resonance_hz / sample_rate
        alpha = np.sin(w0) / 4.0  # Q = 2
        b = [1 + alpha * a, -2 * np.cos(w0), 1 - alpha * a]
        den = [1 + alpha / a, -2 * np.cos(w0), 1 - alpha / a]
        out = lfilter(b, den, out)
    return out.astype(np.float32)


class _Crops(Dataset):
    """``(waveform, speaker index)`` crops: training crops drawn from a generator seeded by ``(seed, index)``
    (random utterance, random offset), evaluation crops one per utterance (centred, zero-padded when short)."""

    def __init__(self, clips: list[np.ndarray], labels: list[int], length: int, size: Optional[int], seed: int,
                 pad_mode: str = "zeros") -> None:
        self.clips, self.labels, self.length, self.size, self.seed = clips, labels, length, size, seed
        self.pad_mode = pad_mode

    def __len__(self) -> int:
        return len(self.clips) if self.size is None else self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        n = self.length
        if self.size is None:  # evaluation: utterance ``index``, centred crop
            clip, label = self.clips[index], self.labels[index]
            start = max(0, (len(clip) - n) // 2)
            offset = max(0, (n - len(clip)) // 2)
        else:
            g = np.random.default_rng([self.seed, index])
            u = int(g.integers(len(self.clips)))
            clip, label = self.clips[u], self.labels[u]
            start = int(g.integers(len(clip) - n + 1)) if len(clip) >= n else 0
            offset = int(g.integers(n - len(clip) + 1)) if len(clip) < n else 0
        crop = clip[start:start + n]
        mode = "wrap" if self.pad_mode == "wrap" and len(crop) else "constant"
        crop = np.pad(crop, (offset, n - len(crop) - offset), mode=mode)
        return torch.from_numpy(crop.astype(np.float32)), label


class SpeakerDataModule(SplitLoaders, LightningDataModule):
    r"""Utterances grouped by speaker for speaker recognition: training speakers for classification, and disjoint
    validation and test speakers whose utterances form the verification trials (every pair of utterances; target
    when both come from one speaker).

    Speakers come from ``speaker_from``:

    - ``"parent_dir"``: the speaker of a file is its parent folder's name (e.g. voice packs
      ``<root>/<speaker>/*.ogg``); files are read with ``soundfile``, averaged to mono, resampled to ``sample_rate``.
      Real recorded voices on Debian: ``files=[HEDGEWARS]`` (``apt-get install hedgewars-data``: 15 game voice
      packs, 39-67 clips each; treat a pack as a speaker, though some packs may share a voice actor).
    - ``"pseudo_warp"`` (the default, because the machine this library is tested on has speech of only one real
      speaker installed, the Asterisk "Allison" prompts: ``apt-get install asterisk-core-sounds-en-wav``):
      ``num_speakers`` **synthetic pseudo-speakers** made from one voice. The files are shuffled (``split_seed``)
      and dealt to the speakers, so no utterance is shared; speaker ``k`` gets a vocal-tract-length warp (pitch and
      formants scaled by a factor log-spaced over ``warp_range``, assigned to speakers in a shuffled order so the
      held-out speakers' warps interleave the training ones) and a peaking resonance at a seeded frequency and
      gain (:func:`warp_voice`). This is a stand-in that keeps the pipeline honest (disjoint utterances and
      speakers), not a substitute for real multi-speaker speech: a verifier may learn the warp and colouring.

    Synthetic TTS speakers can be added with ``tts_voices`` (espeak-ng voices such as ``"en+m3"``; ``apt-get install
    espeak-ng``): each voice speaks ``tts_sentences`` Harvard sentences and becomes the speaker ``espeak:<voice>``.
    With ``tts_split="train"`` (default) they only add training speakers, so verification stays on the recorded
    speech; ``"any"`` puts them in the pool that is split.

    Speakers are split ``train/val/test`` (``val_speakers`` and ``test_speakers`` counts, shuffled by
    ``split_seed``). Training batches are ``(waveform (B, N), speaker index)`` random ``crop_s`` crops (a pool of
    ``num_train_crops`` drawn from a generator seeded by ``(seed, index)``); validation and test batches are one
    centred ``eval_crop_s`` crop per utterance with the split's own speaker index, in a fixed order.

    Bad input: a clip shorter than the crop is zero-padded (``on_short_clip="pad"``), dropped (``"skip"``) or
    refused (``"error"``); a file at another rate than ``sample_rate`` with ``resample=False`` is refused; a
    validation/test speaker with fewer than two utterances (no target trial) and too few speakers for the split
    get one line saying what to change.

    Args:
        files: glob(s) of the speech files (``**`` allowed).
        speaker_from: ``"pseudo_warp"`` or ``"parent_dir"``.
        num_speakers: pseudo-speakers to make (``"pseudo_warp"`` only).
        warp_range: ``[low, high]`` warp factors of the pseudo-speakers.
        resonance_db: ``[low, high]`` gain range in dB of each pseudo-speaker's resonance.
        val_speakers, test_speakers: speakers held out for validation and test trials.
        sample_rate: the common rate in Hz; resample: resample files at other rates (``False``: refuse them).
        crop_s: training crop length in seconds; eval_crop_s: evaluation crop length.
        num_train_crops: training crops per epoch (a fixed seeded pool).
        on_short_clip: ``"pad"``, ``"skip"`` or ``"error"`` for clips shorter than ``crop_s``.
        pad_mode: how a short clip is padded to its crop: ``"zeros"`` (silence) or ``"wrap"`` (the clip repeated, as
            the reference's loader does with ``numpy.pad(..., "wrap")``, so the crop carries no duration cue).
        max_files: use at most this many files (after the seeded shuffle); ``None``: all.
        tts_voices: espeak-ng voices to add as synthetic speakers; tts_sentences: sentences each (1-20);
            tts_split: ``"train"`` (training speakers only) or ``"any"``.
        split_seed: seed of the speaker split and pseudo-speakers; seed: seed of the training crops.
        batch_size, num_workers, shuffle, shuffle_seed: the loaders.

    Example:
        >>> dm = SpeakerDataModule(num_speakers=6, val_speakers=2, test_speakers=2, max_files=60)
        >>> dm.setup(); len(dm.speakers["train"]), len(dm.speakers["test"])  # doctest: +SKIP
        (2, 2)
    """

    def __init__(self, files: list[str] = [ALLISON],  # noqa: B006 - read only, YAML-visible default
                 speaker_from: Literal["pseudo_warp", "parent_dir"] = "pseudo_warp",
                 num_speakers: AtLeastTwoInt = 40, warp_range: tuple[float, float] = (0.8, 1.25),
                 resonance_db: tuple[float, float] = (3.0, 9.0), val_speakers: PositiveInt = 8,
                 test_speakers: PositiveInt = 8, sample_rate: PositiveInt = 8000, resample: bool = True,
                 crop_s: PositiveFloat = 1.0, eval_crop_s: PositiveFloat = 2.0, num_train_crops: PositiveInt = 2000,
                 on_short_clip: Literal["pad", "skip", "error"] = "pad", max_files: Optional[PositiveInt] = None,
                 tts_voices: list[str] = [], tts_sentences: PositiveInt = 20,  # noqa: B006 - read only
                 tts_split: Literal["train", "any"] = "train", pad_mode: Literal["zeros", "wrap"] = "zeros",
                 split_seed: NonNegativeInt = 0, seed: NonNegativeInt = 0, batch_size: PositiveInt = 32,
                 num_workers: NonNegativeInt = 0, shuffle: bool = True, shuffle_seed: NonNegativeInt = 0) -> None:
        super().__init__()
        if isinstance(files, str) or not files or not all(isinstance(v, str) and v for v in files):
            raise ValueError(f"`files` must be a non-empty list of glob strings, got {files!r}.")
        check_choice("speaker_from", speaker_from, ("pseudo_warp", "parent_dir"))
        check_number("num_speakers", num_speakers, low=2, integer=True)
        for name, pair, low in (("warp_range", warp_range, 1e-3), ("resonance_db", resonance_db, -40.0)):
            if len(pair) != 2:
                raise ValueError(f"`{name}` must be [low, high], got {pair!r}.")
            for v in pair:
                check_number(name, v, low=low, high=40.0)
            if pair[0] > pair[1]:
                raise ValueError(f"`{name}` must be [low, high] with low <= high, got {list(pair)}.")
        for name, value in (("val_speakers", val_speakers), ("test_speakers", test_speakers),
                            ("sample_rate", sample_rate), ("num_train_crops", num_train_crops),
                            ("batch_size", batch_size)):
            check_positive_int(name, value)
        check_positive("crop_s", crop_s)
        check_positive("eval_crop_s", eval_crop_s)
        check_choice("on_short_clip", on_short_clip, ("pad", "skip", "error"))
        if max_files is not None:
            check_positive_int("max_files", max_files)
        for name, value in (("split_seed", split_seed), ("seed", seed), ("num_workers", num_workers),
                            ("shuffle_seed", shuffle_seed)):
            check_number(name, value, low=0, integer=True)
        if isinstance(tts_voices, str) or not all(isinstance(v, str) and v.strip() for v in tts_voices):
            raise ValueError(f"`tts_voices` must be a list of espeak-ng voice names, got {tts_voices!r}.")
        check_number("tts_sentences", tts_sentences, low=1, high=len(SENTENCES), integer=True)
        check_choice("tts_split", tts_split, ("train", "any"))
        check_choice("pad_mode", pad_mode, ("zeros", "wrap"))
        self.pad_mode = pad_mode
        require("soundfile", type(self).__name__)
        self.tts_voices, self.tts_sentences, self.tts_split = list(tts_voices), int(tts_sentences), tts_split
        self.file_globs, self.speaker_from, self.num_speakers = list(files), speaker_from, num_speakers
        self.warp_range = (float(warp_range[0]), float(warp_range[1]))
        self.resonance_db = (float(resonance_db[0]), float(resonance_db[1]))
        self.held_out = {"val": val_speakers, "test": test_speakers}
        self.sample_rate, self.resample = sample_rate, resample
        self.crop_s, self.eval_crop_s, self.num_train_crops = float(crop_s), float(eval_crop_s), num_train_crops
        self.on_short_clip, self.max_files, self.split_seed, self.seed = on_short_clip, max_files, split_seed, seed
        self.batch_size, self.num_workers, self.shuffle, self.shuffle_seed = batch_size, num_workers, shuffle, shuffle_seed
        self.sets: dict[str, Dataset] = {}
        self.speakers: dict[str, list[str]] = {}
        self.files: dict[str, list[str]] = {}

    @property
    def num_classes(self) -> int:
        """Training speakers (after ``setup``)."""
        if "train" not in self.speakers:
            raise RuntimeError("SpeakerDataModule: call setup() before asking for num_classes.")
        return len(self.speakers["train"])

    def _grouped(self) -> dict[str, list[tuple[str, np.ndarray]]]:
        files = sorted({f for p in self.file_globs for f in glob.glob(p, recursive=True)})
        if not files:
            raise FileNotFoundError(f"SpeakerDataModule: no files match {self.file_globs}; install the Debian data "
                                    f"(`{APT}`) or point `files` at your own speech.")
        rng = np.random.default_rng(self.split_seed)
        files = [files[i] for i in rng.permutation(len(files))][:self.max_files]
        groups: dict[str, list[tuple[str, np.ndarray]]] = {}
        if self.speaker_from == "parent_dir":
            for f in sorted(files):
                groups.setdefault(os.path.basename(os.path.dirname(f)), []).append(
                    (f, read_audio(f, self.sample_rate, self.resample)))
            return groups
        if len(files) < 2 * self.num_speakers:
            raise ValueError(f"{len(files)} files are too few for {self.num_speakers} pseudo-speakers with two "
                             "utterances each; lower num_speakers or add files.")
        lo, hi = np.log(self.warp_range[0]), np.log(self.warp_range[1])
        warps = np.exp(np.linspace(lo, hi, self.num_speakers))[rng.permutation(self.num_speakers)]
        centres = np.exp(rng.uniform(np.log(300.0), np.log(0.4 * self.sample_rate), self.num_speakers))
        gains = rng.uniform(*self.resonance_db, self.num_speakers)
        for k in range(self.num_speakers):
            name = f"pseudo{k:03d}_warp{warps[k]:.3f}"
            groups[name] = [(f, warp_voice(read_audio(f, self.sample_rate, self.resample), float(warps[k]),
                                           self.sample_rate, float(centres[k]), float(gains[k])))
                            for f in files[k::self.num_speakers]]
        return groups

    @override
    def setup(self, stage: Optional[str] = None) -> None:
        """Read the files, group them by speaker, split the speakers and build the crop sets."""
        if self.sets:
            return
        groups = self._grouped()
        tts = {f"espeak:{v}" for v in self.tts_voices}
        for v in self.tts_voices:
            groups[f"espeak:{v}"] = synthesize_espeak(v, list(SENTENCES[:self.tts_sentences]), self.sample_rate)
        n, n_eval = int(round(self.crop_s * self.sample_rate)), int(round(self.eval_crop_s * self.sample_rate))
        for name in list(groups):
            short = [f for f, c in groups[name] if len(c) < n]
            if short and self.on_short_clip == "error":
                raise ValueError(f"{len(short)} clip(s) are shorter than the {self.crop_s} s crop (e.g. {short[0]}); "
                                 "set on_short_clip='pad' or 'skip', or a shorter crop_s.")
            if self.on_short_clip == "skip":
                groups[name] = [(f, c) for f, c in groups[name] if len(c) >= n]
            if not groups[name]:
                del groups[name]
        extra = sorted(tts & set(groups)) if self.tts_split == "train" else []
        names = sorted(set(groups) - set(extra))
        need = self.held_out["val"] + self.held_out["test"] + (0 if len(extra) >= 2 else 2 - len(extra))
        if len(names) < need:
            raise ValueError(f"{len(names)} speakers are too few for val_speakers={self.held_out['val']}, "
                             f"test_speakers={self.held_out['test']} and two training speakers; add speakers or "
                             "hold out fewer.")
        order = [names[i] for i in np.random.default_rng([self.split_seed, 1]).permutation(len(names))]
        n_test, n_val = self.held_out["test"], self.held_out["val"]
        self.speakers = {"test": sorted(order[:n_test]), "val": sorted(order[n_test:n_test + n_val]),
                         "train": sorted(order[n_test + n_val:] + extra)}
        for split in ("val", "test"):
            lonely = [s for s in self.speakers[split] if len(groups[s]) < 2]
            if lonely:
                raise ValueError(f"{split} speaker {lonely[0]!r} has {len(groups[lonely[0]])} utterance(s): a trial "
                                 "speaker needs at least two (a target trial); add utterances or drop the speaker.")
        for split in ("train", "val", "test"):
            items = [(f, c, i) for i, s in enumerate(self.speakers[split]) for f, c in groups[s]]
            self.files[split] = [f for f, _, _ in items]
            clips, labels = [c for _, c, _ in items], [i for _, _, i in items]
            if split == "train":
                self.sets[split] = _Crops(clips, labels, n, self.num_train_crops, self.seed, self.pad_mode)
            else:
                self.sets[split] = _Crops(clips, labels, n_eval, None, self.seed, self.pad_mode)

    def split_dataset(self, split: str) -> Dataset:
        """The crops of ``split`` (after ``setup``)."""
        if split not in self.sets:
            raise RuntimeError("SpeakerDataModule: call setup() before asking for a dataloader.")
        return self.sets[split]
