"""``SourceAttributionTextDataModule``: texts of several data providers, each carrying its provider's WASA watermark."""

from __future__ import annotations

import gzip
import os
import random
import re
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import Dataset
from typing_extensions import override

from lightning_ext.core.sampling import SplitLoaders
from lightning_ext.core.validation import (
    NonNegativeInt,
    OpenUnitInterval,
    PositiveInt,
    check_fraction,
    check_number,
    check_positive_int,
)
from lightning_ext.text.wasa import PAD, CharTokenizer, insert_watermark, make_watermarks, strip_watermark

__all__ = ["SourceAttributionTextDataModule", "read_provider", "DEFAULT_PROVIDERS"]

FORTUNES = "/usr/share/games/fortunes"
GCIDE = "/usr/share/dictd/gcide.dict.dz"
#: The offline providers used by default: Debian ``fortunes-min``'s three files, a seeded sample of GCIDE
#: (``dict-gcide``) entries and CPython's ``pydoc_data`` topics.
DEFAULT_PROVIDERS = {
    "fortunes": f"{FORTUNES}/fortunes",
    "literature": f"{FORTUNES}/literature",
    "riddles": f"{FORTUNES}/riddles",
    "gcide": "builtin:gcide",
    "pydoc": "builtin:pydoc",
}
_APT = {FORTUNES: "apt-get install fortunes-min", GCIDE: "apt-get install dict-gcide"}


def _records_of_file(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8", errors="replace")
    if re.search(r"^%\s*$", text, re.M):  # fortune format: records between lines holding one '%'
        return re.split(r"^%\s*$", text, flags=re.M)
    return re.split(r"\n\s*\n", text)  # paragraphs


def _gcide_records(limit: int, seed: int) -> list[str]:
    with gzip.open(GCIDE, "rt", encoding="utf-8", errors="replace") as f:
        body = f.read()
    entries = [e for e in re.split(r"\n(?=\S)", body) if e.count("\n") >= 1 and not e.startswith("00-database")]
    rng = random.Random(seed)
    return rng.sample(entries, min(limit, len(entries)))


def _pydoc_records() -> list[str]:
    from pydoc_data.topics import topics

    return [p for name in sorted(topics) for p in re.split(r"\n\s*\n", topics[name])]


def read_provider(source: str, limit: int = 100_000, seed: int = 0) -> list[str]:
    """A provider's raw records: a text file (``%``-separated fortune records or blank-line paragraphs), a folder
    (one record per file), ``builtin:gcide`` (a seeded sample of GCIDE entries) or ``builtin:pydoc`` (CPython's
    ``pydoc_data`` topics, by paragraph). Raises one line naming what to install or change."""
    if source == "builtin:gcide":
        if not os.path.isfile(GCIDE):
            raise FileNotFoundError(f"{GCIDE} is missing; install it with `{_APT[GCIDE]}` or give another provider.")
        return _gcide_records(limit, seed)
    if source == "builtin:pydoc":
        return _pydoc_records()
    if source.startswith("builtin:"):
        raise ValueError(f"Unknown provider source {source!r}; the builtins are 'builtin:gcide' and 'builtin:pydoc'.")
    path = Path(source).expanduser()
    if path.is_dir():
        return [p.read_text(encoding="utf-8", errors="replace") for p in sorted(path.iterdir()) if p.is_file()]
    if path.is_file():
        return _records_of_file(path)
    hint = next((f"; install it with `{cmd}`" for prefix, cmd in _APT.items() if str(path).startswith(prefix)), "")
    raise FileNotFoundError(f"Provider text {source!r} does not exist{hint}; give a file, a folder or a builtin.")


def _clean(record: str) -> str:
    record = strip_watermark(record).replace("\t", " ").replace("\r", "")
    record = "\n".join(line.rstrip() for line in record.strip("\n").splitlines())
    return re.sub(r" {2,}", " ", record).strip()


def _chunks(record: str, size: int) -> list[str]:
    """``record`` cut into pieces of at most ``size`` characters at spaces or newlines."""
    out = []
    while len(record) > size:
        cut = max(record.rfind(" ", 0, size + 1), record.rfind("\n", 0, size + 1))
        cut = cut if cut > size // 2 else size
        out.append(record[:cut].strip())
        record = record[cut:].strip()
    if record:
        out.append(record)
    return out


class _Texts(Dataset):
    """Fixed-length samples: ``(input_ids, targets, provider, clean_ids)`` -- the watermarked sequence shifted by
    one (``targets`` padded with -100), the provider index, and the text without its watermark (PAD-padded)."""

    def __init__(self, texts: list[str], marked: list[str], providers: list[int], tok: CharTokenizer,
                 length: int) -> None:
        self.texts, self.marked, self.providers, self.tok, self.length = texts, marked, providers, tok, length

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
        n = self.length
        seq = self.tok.encode(self.marked[i])[: n + 1]
        ids = torch.full((n,), PAD, dtype=torch.long)
        targets = torch.full((n,), -100, dtype=torch.long)
        ids[: len(seq) - 1] = torch.tensor(seq[:-1])
        targets[: len(seq) - 1] = torch.tensor(seq[1:])
        clean = torch.full((n,), PAD, dtype=torch.long)
        c = self.tok.encode(self.texts[i])[:n]
        clean[: len(c)] = torch.tensor(c)
        return ids, targets, self.providers[i], clean


class SourceAttributionTextDataModule(SplitLoaders, LightningDataModule):
    """Texts of several data providers for WASA source attribution: every training, validation and test text carries
    its provider's invisible watermark, inserted once after a random word.

    Paper: "WASA: WAtermark-based Source Attribution for Large Language Model-Generated Data" (arXiv 2310.00646;
    no reference code found). Providers are text categories: by default Debian ``fortunes-min``'s three files
    (fortunes, literature, riddles: overlapping styles), a seeded sample of GCIDE dictionary entries (``dict-gcide``)
    and CPython's ``pydoc_data`` topics; any ``name: path`` works (a file of ``%``-separated records or blank-line
    paragraphs, or a folder with one record per file). Records are split per provider into train/val/test **by
    record** (seeded), then cut at word boundaries into chunks that fit ``context_length`` with the watermark.
    Provider watermarks are drawn from a seeded RNG (:func:`~lightning_ext.text.wasa.make_watermarks`) and are
    unique. Any invisible watermark character already in the raw text is removed first. The tokenizer is
    :class:`~lightning_ext.text.wasa.CharTokenizer` (characters, so each watermark character is one token).

    Args:
        providers: provider name -> source (path, ``builtin:gcide`` or ``builtin:pydoc``); ``None``: the defaults.
        max_records: at most this many chunks per provider (seeded sample), so providers weigh alike.
        min_chars: records shorter than this are dropped.
        watermark_length: characters per watermark (WASA: 10).
        num_watermark_symbols: how many of the six invisible characters watermarks use.
        context_length: tokens per training sequence (a chunk holds ``context_length + 1 - watermark_length``
            characters).
        val_fraction, test_fraction: shares of each provider's records.
        seed: the split, the watermarks and the insertion positions.
        batch_size, shuffle, shuffle_seed, num_workers: the loaders (training: seeded, sharded, resumable).

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> for name, word in (("a", "apple"), ("b", "berry")):
        ...     _ = (d / name).write_text("\\n%\\n".join(f"{word} number {i} is tasty" for i in range(20)))
        >>> dm = SourceAttributionTextDataModule({"a": str(d / "a"), "b": str(d / "b")}, min_chars=5,
        ...                                      context_length=32, batch_size=4)
        >>> dm.setup("fit")
        >>> ids, targets, provider, clean = next(iter(dm.train_dataloader()))
        >>> tuple(ids.shape), len(dm.watermarks), dm.num_providers
        ((4, 32), 2, 2)
    """

    def __init__(
        self,
        providers: Optional[dict[str, str]] = None,
        max_records: PositiveInt = 400,
        min_chars: NonNegativeInt = 40,
        watermark_length: PositiveInt = 10,
        num_watermark_symbols: PositiveInt = 6,
        context_length: PositiveInt = 128,
        val_fraction: OpenUnitInterval = 0.1,
        test_fraction: OpenUnitInterval = 0.1,
        seed: int = 0,
        batch_size: PositiveInt = 16,
        shuffle: bool = True,
        shuffle_seed: int = 0,
        num_workers: NonNegativeInt = 0,
    ) -> None:
        super().__init__()
        providers = dict(DEFAULT_PROVIDERS if providers is None else providers)
        if len(providers) < 2:
            raise ValueError(f"providers must name at least two data providers, got {sorted(providers)}.")
        for name, source in providers.items():
            if not isinstance(source, str) or not source.strip():
                raise ValueError(f"providers[{name!r}] must be a path or a builtin source, got {source!r}.")
        check_positive_int("max_records", max_records)
        check_number("min_chars", min_chars, low=0, integer=True)
        check_positive_int("watermark_length", watermark_length)
        check_number("num_watermark_symbols", num_watermark_symbols, low=2, high=6, integer=True)
        check_positive_int("context_length", context_length)
        if context_length + 1 - watermark_length < 8:
            raise ValueError(f"context_length={context_length} leaves fewer than 8 text characters beside a "
                             f"watermark of {watermark_length}; raise context_length.")
        check_fraction("val_fraction", val_fraction, allow_zero=False, allow_one=False)
        check_fraction("test_fraction", test_fraction, allow_zero=False, allow_one=False)
        if val_fraction + test_fraction >= 1:
            raise ValueError(f"val_fraction + test_fraction must be < 1, got {val_fraction} + {test_fraction}.")
        check_positive_int("batch_size", batch_size)
        for name, value in (("num_workers", num_workers), ("seed", seed), ("shuffle_seed", shuffle_seed)):
            check_number(name, value, low=0, integer=True)
        self.save_hyperparameters()
        self.providers = providers
        self.provider_names = list(providers)
        self.max_records, self.min_chars = int(max_records), int(min_chars)
        self.watermark_length, self.context_length = int(watermark_length), int(context_length)
        self.val_fraction, self.test_fraction, self.seed = float(val_fraction), float(test_fraction), int(seed)
        self.batch_size, self.shuffle, self.shuffle_seed = int(batch_size), bool(shuffle), int(shuffle_seed)
        self.num_workers = int(num_workers)
        self.tokenizer = CharTokenizer(int(num_watermark_symbols))
        self.watermarks = make_watermarks(len(providers), self.watermark_length, int(num_watermark_symbols), seed)
        self.splits: dict[str, dict[str, list]] = {}
        self.train_set: Optional[_Texts] = None

    @property
    def num_providers(self) -> int:
        """How many providers (classes of source attribution)."""
        return len(self.provider_names)

    @property
    def chunk_chars(self) -> int:
        """Text characters per sample (the rest of the context holds the watermark)."""
        return self.context_length + 1 - self.watermark_length

    def _build(self) -> None:
        texts: dict[str, list[str]] = {"train": [], "val": [], "test": []}
        labels: dict[str, list[int]] = {"train": [], "val": [], "test": []}
        for p, name in enumerate(self.provider_names):
            rng = random.Random(f"{self.seed}:{name}")
            records = [_clean(r) for r in read_provider(self.providers[name], 20 * self.max_records, self.seed)]
            records = [r for r in records if len(r) >= self.min_chars]
            rng.shuffle(records)
            n_test = max(1, round(self.test_fraction * len(records)))
            n_val = max(1, round(self.val_fraction * len(records)))
            if len(records) < n_test + n_val + 1:
                raise ValueError(f"Provider {name!r} has only {len(records)} records of >= {self.min_chars} "
                                 f"characters; it needs at least 3 (lower min_chars or give it more text).")
            parts = {"test": records[:n_test], "val": records[n_test:n_test + n_val],
                     "train": records[n_test + n_val:]}
            for split, recs in parts.items():
                chunks = [c for r in recs for c in _chunks(r, self.chunk_chars) if len(c) >= self.min_chars // 2 + 1]
                cap = self.max_records if split == "train" else max(1, round(
                    self.max_records * (self.val_fraction if split == "val" else self.test_fraction)
                    / (1 - self.val_fraction - self.test_fraction)))
                if len(chunks) > cap:
                    chunks = rng.sample(chunks, cap)
                texts[split].extend(chunks)
                labels[split].extend([p] * len(chunks))
        for split in texts:
            rng = random.Random(f"{self.seed}:insert:{split}")
            marked = [insert_watermark(t, self.watermarks[y], rng) for t, y in zip(texts[split], labels[split])]
            self.splits[split] = {"texts": texts[split], "marked": marked, "labels": labels[split]}

    @override
    def setup(self, stage: str) -> None:
        """Read the providers, split by record, chunk and watermark (once)."""
        if not self.splits:
            self._build()
            self.train_set = self.split_dataset("train")

    def split_dataset(self, split: str) -> _Texts:
        """The samples of ``split``."""
        if not self.splits:
            raise RuntimeError("SourceAttributionTextDataModule: call setup() before asking for a split.")
        s = self.splits[split]
        return _Texts(s["texts"], s["marked"], s["labels"], self.tokenizer, self.context_length)

    def texts(self, split: str) -> tuple[list[str], list[int]]:
        """The un-watermarked texts of ``split`` and their provider indices (for baselines and attribution)."""
        if not self.splits:
            self.setup("fit")
        return list(self.splits[split]["texts"]), list(self.splits[split]["labels"])

    @override
    def state_dict(self) -> dict[str, Any]:
        """The watermark table and provider names (the data themselves are rebuilt from the seed)."""
        return {"watermarks": list(self.watermarks), "provider_names": list(self.provider_names)}

    @override
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Refuse a checkpoint whose watermark table differs from this configuration's."""
        if list(state.get("watermarks", self.watermarks)) != self.watermarks:
            raise ValueError("The checkpoint's provider watermarks differ from this datamodule's (another seed, "
                             "watermark_length or provider list); resume with the configuration it was trained on.")
