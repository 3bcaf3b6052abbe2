"""The scorer protocol shared by every data filter, and the helpers they use (top-k selection, fingerprints).

A scorer turns a training pool into named arrays (``score`` and whatever else it needs, e.g. cluster ids),
then turns those arrays and a sample budget into kept indices. The expensive half, :meth:`Scorer.score`, is
what :class:`~lightning_ext.curation.datamodule.FilteredDataModule` caches on disk; :meth:`Scorer.select`
is cheap, so changing the kept fraction never rescores.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_ext.core.validation import check_choice, check_number

Scores = dict[str, np.ndarray]

#: Which samples a scorer prefers: the hardest (highest difficulty), the easiest, or a seeded random order.
Which = Literal["hard", "easy", "random"]
WHICH = ("hard", "easy", "random")

__all__ = ["Scorer", "ScoringData", "Scores", "WHICH", "Which", "as_dataset", "check_seed", "check_which",
           "count_to_keep", "dataset_inputs", "fingerprint", "labels_of", "prefer", "top_k"]


def check_which(which: Any) -> str:
    """``which`` if it is ``"hard"``, ``"easy"`` or ``"random"``, else one ValueError naming ``which``."""
    return check_choice("which", which, WHICH)


def check_seed(seed: Any, name: str = "seed") -> int:
    """``seed`` if it is an integer >= 0 (numpy's generators refuse negative seeds), else a ValueError naming it."""
    return int(check_number(name, seed, low=0, integer=True))


def prefer(difficulty: np.ndarray, which: str, seed: int = 0) -> np.ndarray:
    """Turn a per-sample difficulty into a score to keep the top of: itself (``"hard"``), its negation
    (``"easy"``) or, for ``"random"``, seeded uniform draws (NaN stays NaN, so invalid samples stay invalid).

    Example:
        >>> prefer(np.array([0.2, 0.9]), "easy").tolist()
        [-0.2, -0.9]
        >>> float(prefer(np.array([0.2, np.nan]), "random", seed=0)[1])
        nan
    """
    difficulty = np.asarray(difficulty, dtype=np.float64)
    if check_which(which) == "hard":
        return difficulty.copy()
    if which == "easy":
        return -difficulty
    return np.where(np.isnan(difficulty), np.nan, np.random.default_rng(seed).random(len(difficulty)))


def labels_of(dataset: Dataset) -> np.ndarray:
    """Integer labels of a ``(x, y)`` dataset: ``TensorDataset.tensors[1]``, ``.targets``, or one pass over it."""
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) >= 2:
        return dataset.tensors[1].detach().cpu().numpy().astype(np.int64)
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return np.asarray(targets, dtype=np.int64)
    out = []
    for i in range(len(dataset)):
        item = dataset[i]
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise ValueError("Filtering needs a dataset of (x, y) pairs (or one with a `.targets` attribute); "
                             f"item 0 is a {type(item).__name__}.")
        out.append(int(item[1]))
    return np.asarray(out, dtype=np.int64)


def as_dataset(obj: Any, what: str = "data") -> Dataset:
    """A ``(x, y)`` dataset from a Dataset, an input tensor (labels all 0), or a LightningDataModule's
    training split."""
    if isinstance(obj, torch.Tensor):
        return TensorDataset(obj, torch.zeros(len(obj), dtype=torch.long))
    if isinstance(obj, Dataset):
        return obj
    if hasattr(obj, "setup") and hasattr(obj, "train_dataloader"):
        obj.setup("fit")
        return obj.train_dataloader().dataset
    raise TypeError(f"`{what}` must be a Dataset, a tensor or a LightningDataModule, got {type(obj).__name__}.")


def dataset_inputs(dataset: Dataset, batch_size: int = 1024) -> torch.Tensor:
    """All inputs of a ``(x, y)`` dataset as one tensor."""
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[0]
    return torch.cat([batch[0] for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False)])


@dataclass
class ScoringData:
    """What a scorer sees: the training pool (a ``(x, y)`` dataset), its labels and optional per-sample metadata.

    Args:
        dataset: the unfiltered training split, items ``(x, y)``.
        labels: its integer labels (computed from ``dataset`` when omitted).
        metadata: per-sample columns (``{"caption": [...], "width": [...]}``) for rule filters.
        num_classes: number of classes (``labels.max() + 1`` when omitted).
    """

    dataset: Dataset
    labels: Optional[np.ndarray] = None
    metadata: dict[str, Any] = field(default_factory=dict)
    num_classes: Optional[int] = None

    def __post_init__(self) -> None:
        if self.labels is None:
            self.labels = labels_of(self.dataset)
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if len(self.labels) != len(self.dataset):
            raise ValueError(f"{len(self.labels)} labels for {len(self.dataset)} samples.")
        if len(self.labels) == 0:
            raise ValueError("The training pool is empty: there is nothing to filter.")
        if self.num_classes is None:
            self.num_classes = int(self.labels.max()) + 1

    @classmethod
    def from_tensors(cls, x: torch.Tensor, y: Union[torch.Tensor, np.ndarray], **kwargs) -> "ScoringData":
        """A pool from an input tensor and labels."""
        y = torch.as_tensor(np.asarray(y), dtype=torch.long)
        return cls(TensorDataset(torch.as_tensor(x), y), **kwargs)

    def __len__(self) -> int:
        return len(self.labels)

    def loader(self, batch_size: int = 256) -> DataLoader:
        """Batches of ``(x, y)`` in pool order (no shuffling)."""
        return DataLoader(self.dataset, batch_size=batch_size, shuffle=False)

    def inputs(self) -> torch.Tensor:
        """All inputs as one tensor (the tensor itself for a TensorDataset)."""
        return dataset_inputs(self.dataset)


def _describe(value: Any) -> Any:
    """A JSON-able description of a constructor argument, for fingerprints (modules by class and weights)."""
    if isinstance(value, nn.Module):
        h = hashlib.sha1()
        for k, v in value.state_dict().items():
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
        return {"module": type(value).__qualname__, "weights_sha1": h.hexdigest()}
    if isinstance(value, Scorer):
        return value.config()
    if isinstance(value, torch.Tensor):
        return {"tensor_sha1": hashlib.sha1(value.detach().cpu().contiguous().numpy().tobytes()).hexdigest()}
    if isinstance(value, np.ndarray):
        return {"array_sha1": hashlib.sha1(np.ascontiguousarray(value).tobytes()).hexdigest()}
    if isinstance(value, (list, tuple)):
        return [_describe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _describe(v) for k, v in value.items()}
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "config") and callable(value.config):
        return value.config()
    return {"object": type(value).__qualname__, "repr": repr(value)}


class Scorer:
    """Base class of the data scorers: ``score`` a pool once (cached), ``select`` a subset for any budget.

    Subclasses implement :meth:`score`, returning named arrays with at least ``"score"`` (one float per
    sample, higher = more worth keeping; ``-inf`` = never keep). :meth:`select` keeps the ``n_keep``
    highest scores (ties broken by pool order); scorers with structure (per-cluster quotas, whole classes)
    override it. ``n_keep=None`` keeps every sample whose score is finite (a pure filter).

    Every scorer is usable without a Trainer: ``scorer.select(scorer.score(data), data, n)``.
    """

    #: fixed per-class quotas make no sense for some scorers (whole-class pruning); they set this False
    supports_class_balance: bool = True

    def score(self, data: ScoringData) -> Scores:  # pragma: no cover - interface
        raise NotImplementedError

    def select(self, scores: Scores, data: ScoringData, n_keep: Optional[int], class_balanced: bool = False) -> np.ndarray:
        """Indices (sorted) of the kept samples."""
        return top_k(scores["score"], n_keep, data.labels if class_balanced else None)

    def config(self) -> dict:
        """The constructor arguments (with modules described by their weights' hash): part of the cache key."""
        out = {"class": f"{type(self).__module__}.{type(self).__qualname__}"}
        for name in inspect.signature(type(self).__init__).parameters:
            if name in ("self", "args", "kwargs") or name.startswith("_"):
                continue
            if name in ("progress", "verbose", "batch_size", "device", "accelerator"):
                continue  # do not change the scores
            out[name] = _describe(getattr(self, name, None))
        return out

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "class")
        return f"{type(self).__name__}({args})"


def count_to_keep(keep: Union[float, int, None], n: int) -> Optional[int]:
    """``keep`` as a sample count: a float in (0, 1] is a fraction of ``n``, an int a count, None = all valid.

    Example:
        >>> count_to_keep(0.3, 1000), count_to_keep(250, 1000), count_to_keep(None, 1000)
        (300, 250, None)
    """
    if keep is None:
        return None
    if isinstance(keep, bool) or not isinstance(keep, (int, float, np.integer, np.floating)):
        raise ValueError(f"`keep` must be a fraction in (0, 1], a count >= 1 or None, got {keep!r}.")
    if isinstance(keep, float):
        if not 0 < keep <= 1:
            raise ValueError(f"`keep` as a fraction must be in (0, 1], got {keep}; give an int for a sample count.")
        return max(1, int(round(keep * n)))
    keep = int(keep)
    if keep < 1:
        raise ValueError(f"`keep` as a count must be >= 1, got {keep}.")
    if keep > n:
        raise ValueError(f"`keep`={keep} samples requested but the training pool has only {n}.")
    return keep


def top_k(scores: np.ndarray, n_keep: Optional[int], labels: Optional[np.ndarray] = None) -> np.ndarray:
    """Sorted indices of the ``n_keep`` highest finite scores (stable: ties go to the earlier sample).

    With ``labels``, the budget is split over classes in proportion to their sizes (largest remainders) and
    each class keeps its own top scores. ``n_keep=None`` keeps every finite score.

    Example:
        >>> top_k(np.array([0.1, 0.9, 0.5, -np.inf]), 2).tolist()
        [1, 2]
        >>> top_k(np.array([0.1, 0.9, 0.5, 0.7]), 2, labels=np.array([0, 0, 1, 1])).tolist()
        [1, 3]
    """
    scores = np.asarray(scores, dtype=np.float64)
    valid = np.isfinite(scores)
    if n_keep is None:
        return np.flatnonzero(valid)
    if labels is None:
        order = np.argsort(-np.where(valid, scores, -np.inf), kind="stable")
        order = order[valid[order]]
        return np.sort(order[:n_keep])
    classes, sizes = np.unique(labels, return_counts=True)
    quota = n_keep * sizes / sizes.sum()
    base = np.floor(quota).astype(int)
    extra = np.argsort(-(quota - base), kind="stable")[: n_keep - base.sum()]
    base[extra] += 1
    kept = [np.flatnonzero(labels == c)[top_k(scores[labels == c], int(q))] for c, q in zip(classes, base)]
    return np.sort(np.concatenate(kept))


def _hash_item(h: "hashlib._Hash", item: Any) -> None:
    """Feed one sample (tensors, arrays, numbers, strings, nested in tuples/lists/dicts) into ``h``."""
    if isinstance(item, torch.Tensor):
        t = item.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(item, np.ndarray):
        a = np.ascontiguousarray(item)
        h.update(f"A{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    elif isinstance(item, (tuple, list)):
        h.update(f"L{len(item)}".encode())
        for part in item:
            _hash_item(h, part)
    elif isinstance(item, dict):
        h.update(f"D{len(item)}".encode())
        for key in sorted(item, key=str):
            h.update(str(key).encode())
            _hash_item(h, item[key])
    elif hasattr(item, "tobytes"):  # PIL images, numpy scalars
        h.update(type(item).__name__.encode())
        h.update(item.tobytes())
    else:
        h.update(repr(item).encode())


def fingerprint(data: ScoringData, scorer_config: dict, extra: Optional[dict] = None,
                data_version: Optional[str] = None) -> str:
    """The key of the score cache: a hash of the pool and of the scorer's configuration.

    The pool's labels and size are always hashed. Its content is hashed in full: every tensor of a
    TensorDataset, and for any other dataset every item (streamed, item by item: tensors, arrays, numbers,
    strings, nested), so changing any sample changes the key. A user ``data_version`` string replaces the
    content hash (for pools too large to read twice, or with random transforms in ``__getitem__``): the user
    then vouches that the same version means the same samples.
    """
    h = hashlib.sha256()
    h.update(f"n={len(data)}".encode())
    h.update(np.ascontiguousarray(data.labels).tobytes())
    if data_version is not None:
        h.update(f"version={data_version}".encode())
    elif isinstance(data.dataset, TensorDataset):
        for t in data.dataset.tensors:
            _hash_item(h, t)
    else:
        for i in range(len(data.dataset)):
            _hash_item(h, data.dataset[i])
    h.update(json.dumps(scorer_config, sort_keys=True, default=str).encode())
    if extra:
        h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()[:20]
