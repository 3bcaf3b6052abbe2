"""``FlowWindowDataModule``: NetFlow-like records of pcap flows in start-time order, as windows of consecutive flows."""

from __future__ import annotations

from typing import Literal, Optional

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import Dataset
from typing_extensions import override

from lightning_ext.core.optional import require
from lightning_ext.core.paths import check_path_argument
from lightning_ext.core.sampling import SplitLoaders
from lightning_ext.core.validation import NonNegativeInt, PositiveFloat, PositiveInt, check_choice, check_fraction
from lightning_ext.core.validation import check_number, check_positive, check_positive_int
from lightning_ext.traffic.flows import cached, find_pcaps, labelled_flows, source_key, time_split

__all__ = ["FlowWindowDataModule", "fit_preprocessing"]


def fit_preprocessing(numeric: np.ndarray, categorical: np.ndarray, levels: int) -> dict:
    """FlowTransformer's ``StandardPreProcessing`` fitted on training rows: per numeric column its min and range,
    per categorical column its ``levels`` most frequent values (coded 1..levels; anything else 0)."""
    lo, hi = numeric.min(0), numeric.max(0)
    tops = []
    for c in range(categorical.shape[1]):
        vals, counts = np.unique(categorical[:, c], return_counts=True)
        tops.append(vals[np.argsort(-counts, kind="stable")[:levels]])
    return {"min": lo, "range": hi - lo, "levels": tops}


def apply_preprocessing(numeric: np.ndarray, categorical: np.ndarray, prep: dict) -> tuple[np.ndarray, np.ndarray]:
    """``log(x - min + 1) / log(range + 1)`` per numeric column; categorical values to their level codes."""
    num = np.log(np.maximum(numeric - prep["min"], 0) + 1) / np.log(prep["range"] + 1 + 1e-12)
    num = np.where(prep["range"] > 0, num, 0.0).astype(np.float32)
    cat = np.zeros(categorical.shape, dtype=np.int64)
    for c, top in enumerate(prep["levels"]):
        table = {v: i + 1 for i, v in enumerate(top.tolist())}
        cat[:, c] = [table.get(v, 0) for v in categorical[:, c].tolist()]
    return num, cat


class _Windows(Dataset):
    def __init__(self, num: torch.Tensor, cat: torch.Tensor, y: torch.Tensor, ends: np.ndarray, window: int):
        self.num, self.cat, self.y, self.ends, self.window = num, cat, y, ends, window

    def __len__(self) -> int:
        return len(self.ends)

    def __getitem__(self, i: int):
        end = int(self.ends[i])
        rows = slice(end - self.window + 1, end + 1)
        return self.num[rows], self.cat[rows], self.y[end]


class FlowWindowDataModule(SplitLoaders, LightningDataModule):
    r"""Windows of ``window`` consecutive flow records (in flow start-time order) labelled by their last flow.

    FlowTransformer (arXiv 2304.14746, https://github.com/liamdm/FlowTransformer, ``framework/flow_transformer.py``):
    the context of a flow is the flows just before it in time, so rows are never shuffled before windowing. Each flow
    of the captures (read with dpkt) becomes a NetFlow-like record (:func:`~lightning_ext.traffic.pcap.flow_features`:
    15 numeric fields, 5 categorical; the two port fields only with ``include_ports=True``, since on generated traffic
    the server port names the class). Pre-processing is fitted on training rows only
    (:func:`fit_preprocessing`, the official ``StandardPreProcessing(n_categorical_levels=32)``). The last
    ``test_fraction`` of flows (by start time) test, the ``val_fraction`` before them validate; a window's earlier
    rows may reach into the preceding split (past context, never a label). With ``balanced_train`` the training
    windows are resampled (seeded) to equal counts per class, as the official 50/50 benign/malicious batches;
    evaluation keeps the natural mix (report balanced accuracy or F1).

    Batches: ``(numeric (B, window, 15) float, categorical (B, window, C) long, label (B,))``. ``benign_labels``
    turns the task into intrusion detection: label 0 for those, 1 for everything else.

    Args:
        pcap_paths, label_from, labels, min_packets, idle_timeout, split_by, val_fraction, test_fraction, cache_dir:
            as in :class:`~lightning_ext.traffic.pcap_bursts.PcapBurstDataModule`.
        benign_labels: labels of benign traffic (binary task); ``None`` keeps one class per label.
        window: flows per window (FlowTransformer's default 8).
        include_ports: add the client and server port as categorical fields (a leakage probe).
        n_categorical_levels: most frequent values kept per categorical field.
        balanced_train: resample training windows to equal class counts.
        batch_size, shuffle, shuffle_seed, num_workers, seed: loaders and the balanced draw.

    Example:
        >>> dm = FlowWindowDataModule(["captures/ids"], benign_labels=["http", "tls", "dns"])  # doctest: +SKIP
    """

    def __init__(
        self,
        pcap_paths: Optional[list[str]] = None,
        label_from: Literal["manifest", "dir"] = "manifest",
        labels: Optional[list[str]] = None,
        benign_labels: Optional[list[str]] = None,
        window: PositiveInt = 8,
        include_ports: bool = False,
        n_categorical_levels: PositiveInt = 32,
        balanced_train: bool = True,
        min_packets: PositiveInt = 1,
        idle_timeout: PositiveFloat = 60.0,
        split_by: Literal["time", "capture"] = "time",
        val_fraction: float = 0.2,
        test_fraction: float = 0.2,
        batch_size: PositiveInt = 128,
        shuffle: bool = True,
        shuffle_seed: int = 0,
        num_workers: NonNegativeInt = 0,
        seed: int = 0,
        cache_dir: Optional[str] = "default",
    ) -> None:
        super().__init__()
        require("dpkt", type(self).__name__)
        check_choice("label_from", label_from, ("manifest", "dir"))
        check_choice("split_by", split_by, ("time", "capture"))
        for name, value in (("window", window), ("n_categorical_levels", n_categorical_levels),
                            ("min_packets", min_packets), ("batch_size", batch_size)):
            check_positive_int(name, value)
        for name, value in (("num_workers", num_workers), ("shuffle_seed", shuffle_seed), ("seed", seed)):
            check_number(name, value, low=0, integer=True)
        check_positive("idle_timeout", idle_timeout)
        check_fraction("val_fraction", val_fraction, allow_one=False)
        check_fraction("test_fraction", test_fraction, allow_one=False)
        if val_fraction + test_fraction >= 1:
            raise ValueError(f"val_fraction + test_fraction must be < 1, got {val_fraction} + {test_fraction}.")
        check_path_argument("cache_dir", cache_dir)
        if pcap_paths is None:
            raise ValueError("FlowWindowDataModule needs pcap_paths: capture files or folders (make some with "
                             "`python -m lightning_ext.traffic.capture --out DIR --attacks`).")
        self.save_hyperparameters()
        self.pcap_paths, self.label_from, self.labels, self.benign = list(pcap_paths), label_from, labels, benign_labels
        self.window, self.include_ports, self.levels = window, include_ports, n_categorical_levels
        self.balanced_train, self.min_packets, self.idle_timeout = balanced_train, min_packets, idle_timeout
        self.split_by, self.val_fraction, self.test_fraction = split_by, val_fraction, test_fraction
        self.batch_size, self.shuffle, self.shuffle_seed, self.num_workers = batch_size, shuffle, shuffle_seed, num_workers
        self.seed, self.cache_dir = seed, cache_dir
        self.class_names: list[str] = []
        self.categorical_cardinalities: list[int] = []
        self._splits: dict[str, _Windows] = {}

    @property
    def num_classes(self) -> int:
        """Number of classes (2 with ``benign_labels``), after ``setup``."""
        return len(self.class_names)

    @property
    def num_numeric(self) -> int:
        """Numeric fields per record."""
        from lightning_ext.traffic.pcap import NUMERIC_FEATURES

        return len(NUMERIC_FEATURES)

    def _categorical_names(self) -> tuple[str, ...]:
        from lightning_ext.traffic.pcap import CATEGORICAL_FEATURES, PORT_FEATURES

        return CATEGORICAL_FEATURES + (PORT_FEATURES if self.include_ports else ())

    def _build(self) -> dict:
        from lightning_ext.traffic.pcap import CATEGORICAL_FEATURES, NUMERIC_FEATURES, PORT_FEATURES, flow_features

        flows, names, origin = labelled_flows(find_pcaps(self.pcap_paths), self.label_from, self.idle_timeout,
                                              self.min_packets, self.labels, type(self).__name__)
        rows = [flow_features(f) for f in flows]
        return {"names": names, "origin": torch.tensor(origin),
                "numeric": torch.tensor([[r[k] for k in NUMERIC_FEATURES] for r in rows], dtype=torch.float64),
                "categorical": torch.tensor([[r[k] for k in CATEGORICAL_FEATURES + PORT_FEATURES] for r in rows],
                                            dtype=torch.float64)}

    @override
    def setup(self, stage: Optional[str] = None) -> None:
        """Parse (or load from the cache) the captures, fit the pre-processing on training rows, cut windows."""
        if self._splits:
            return
        files = find_pcaps(self.pcap_paths)
        options = dict(label_from=self.label_from, labels=self.labels, min_packets=self.min_packets,
                       idle_timeout=self.idle_timeout, kind="flow_features")
        data = cached("flow_windows", None if self.cache_dir is None else str(self.cache_dir),
                      source_key(files, options), self._build, ("names", "origin", "numeric"))
        names = list(data["names"])
        if self.benign is not None:
            unknown = sorted(set(self.benign) - set(names))
            if unknown:
                raise ValueError(f"benign_labels {unknown} have no flows in the captures (labels found: "
                                 f"{sorted(set(names))}); fix benign_labels.")
            self.class_names = ["benign", "attack"]
            y = torch.tensor([0 if n in self.benign else 1 for n in names])
        else:
            self.class_names = sorted(set(names))
            y = torch.tensor([self.class_names.index(n) for n in names])
        split = time_split(len(y), data["origin"].tolist(), self.split_by, self.val_fraction, self.test_fraction)
        n_cat = len(self._categorical_names())
        numeric, categorical = data["numeric"].numpy(), data["categorical"].numpy()[:, :n_cat]
        prep = fit_preprocessing(numeric[split["train"]], categorical[split["train"]], self.levels)
        num, cat = apply_preprocessing(numeric, categorical, prep)
        self.categorical_cardinalities = [self.levels + 1] * n_cat
        num_t, cat_t = torch.from_numpy(num), torch.from_numpy(cat)
        ends = {k: v[v >= self.window - 1] for k, v in split.items()}
        for k, v in ends.items():
            if len(v) == 0:
                raise ValueError(f"the {k} split has no window of {self.window} flows ({len(y)} labelled flows); "
                                 "capture longer or lower `window`.")
        missing = [c for i, c in enumerate(self.class_names) if not (y[ends["train"]] == i).any()]
        if missing:
            raise ValueError(f"no training flows of class(es) {missing}; capture longer or change the labels.")
        if self.balanced_train:
            g = np.random.default_rng(self.seed)
            train_y = y[ends["train"]].numpy()
            per = int(np.ceil(len(train_y) / len(self.class_names)))
            picks = [g.choice(ends["train"][train_y == c], per, replace=(train_y == c).sum() < per)
                     for c in range(len(self.class_names))]
            ends["train"] = np.sort(np.concatenate(picks))
        counts = {k: np.bincount(y[v].numpy(), minlength=len(self.class_names)).tolist() for k, v in ends.items()}
        rank_zero_info(f"FlowWindowDataModule: windows per class {self.class_names}: {counts}; ports "
                       f"{'included (leakage probe)' if self.include_ports else 'left out'}.")
        self._splits = {k: _Windows(num_t, cat_t, y, v, self.window) for k, v in ends.items()}

    @property
    def train_set(self):
        """The training split (after ``setup``)."""
        return self.split_dataset("train")

    def split_dataset(self, split: str) -> _Windows:
        """The windows of ``split`` (``"train"``, ``"val"`` or ``"test"``)."""
        if not self._splits:
            raise RuntimeError("FlowWindowDataModule.setup() has not run; call dm.setup() or pass it to a Trainer.")
        return self._splits[split]
