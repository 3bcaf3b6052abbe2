"""``PcapBurstDataModule``: labelled flows of pcap captures as netFound burst tokens or NetMamba byte arrays."""

from __future__ import annotations

from typing import Literal, Optional

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import TensorDataset
from typing_extensions import override

from lightning_ext.core.optional import require
from lightning_ext.core.paths import check_path_argument
from lightning_ext.core.sampling import SplitLoaders
from lightning_ext.core.validation import (
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    check_choice,
    check_fraction,
    check_number,
    check_positive,
    check_positive_int,
)
from lightning_ext.traffic.flows import cached, find_pcaps, labelled_flows, source_key, time_split

__all__ = ["PcapBurstDataModule"]


class PcapBurstDataModule(SplitLoaders, LightningDataModule):
    r"""Labelled flows of pcap captures as netFound burst tokens or NetMamba byte arrays, split by time.

    Packets (read with dpkt) -> bidirectional flows -> one of two representations
    (:mod:`lightning_ext.traffic.pcap`):

    - ``"netfound_bursts"`` (netFound, arXiv 2310.17025): batches ``(tokens (B, bursts, 1 + packets*T) long,
      metadata (B, bursts, 4) float, label)``; 12 header tokens per packet (+ ``payload_tokens``), CLS per burst.
    - ``"netmamba_bytes"`` (NetMamba, arXiv 2405.11449): batches ``(bytes (B, packets*(header+payload)) float in
      [-1, 1], label)``, the first ``packets`` packets' header and payload bytes, IP addresses zeroed.

    Leakage (spec 2.0): on generated traffic the server port names the application, so ports (and, for bytes,
    IP-ID and checksums) are masked by default; ``setup`` runs a shortcut check (held-out accuracy of the label
    from the server port, the client port and the addresses alone, :func:`~lightning_ext.traffic.pcap.shortcut_check`)
    and says which fields would leak and whether they are masked (``shortcuts`` holds the numbers). Splits are
    by flow start time (earliest ``1 - val_fraction - test_fraction`` train) or by capture file, never by random
    flow. ``labels_per_class`` keeps that many training flows per class (seeded by ``seed``: the few-shot setting).

    Args:
        pcap_paths: pcap/pcapng files, folders or globs.
        label_from: ``"manifest"`` (``<capture>.labels.json`` from the capture recipe) or ``"dir"`` (parent folder).
        labels: keep only these labels (each must have flows); ``None`` keeps all.
        representation: ``"netfound_bursts"`` or ``"netmamba_bytes"``.
        mask_ports: zero the ports (bytes) / leave the port tokens out (bursts).
        mask_ids: zero IP-ID and checksums in the bytes.
        max_bursts, max_packets, payload_tokens, burst_gap: netFound's burst layout (12, 6, 0, 10 ms by default;
            netFound v2 strips payload).
        packets, header_bytes, payload_bytes: NetMamba's layout (5 x (80 + 240) bytes by default).
        min_packets: drop flows with fewer packets.
        idle_timeout: seconds of silence that end a flow.
        split_by, val_fraction, test_fraction: the split.
        labels_per_class: few-shot training subset (``None``: every training flow).
        batch_size, shuffle, shuffle_seed, num_workers, seed: loaders and the few-shot draw.
        cache_dir: parsed tensors cache (relative: under ``$LIGHTNING_EXT_CACHE/pcap_bursts``; ``None`` disables).

    Example:
        >>> dm = PcapBurstDataModule(["captures/day0"], representation="netmamba_bytes")  # doctest: +SKIP
    """

    def __init__(
        self,
        pcap_paths: Optional[list[str]] = None,
        label_from: Literal["manifest", "dir"] = "manifest",
        labels: Optional[list[str]] = None,
        representation: Literal["netfound_bursts", "netmamba_bytes"] = "netfound_bursts",
        mask_ports: bool = True,
        mask_ids: bool = True,
        max_bursts: PositiveInt = 12,
        max_packets: PositiveInt = 6,
        payload_tokens: NonNegativeInt = 0,
        burst_gap: PositiveFloat = 0.01,
        packets: PositiveInt = 5,
        header_bytes: PositiveInt = 80,
        payload_bytes: NonNegativeInt = 240,
        min_packets: PositiveInt = 1,
        idle_timeout: PositiveFloat = 60.0,
        split_by: Literal["time", "capture"] = "time",
        val_fraction: float = 0.2,
        test_fraction: float = 0.2,
        labels_per_class: Optional[PositiveInt] = None,
        batch_size: PositiveInt = 32,
        shuffle: bool = True,
        shuffle_seed: int = 0,
        num_workers: NonNegativeInt = 0,
        seed: int = 0,
        cache_dir: Optional[str] = "default",
    ) -> None:
        super().__init__()
        require("dpkt", type(self).__name__)
        check_choice("label_from", label_from, ("manifest", "dir"))
        check_choice("representation", representation, ("netfound_bursts", "netmamba_bytes"))
        check_choice("split_by", split_by, ("time", "capture"))
        for name, value in (("max_bursts", max_bursts), ("max_packets", max_packets), ("packets", packets),
                            ("header_bytes", header_bytes), ("min_packets", min_packets), ("batch_size", batch_size)):
            check_positive_int(name, value)
        for name, value in (("payload_tokens", payload_tokens), ("payload_bytes", payload_bytes),
                            ("num_workers", num_workers), ("shuffle_seed", shuffle_seed), ("seed", seed)):
            check_number(name, value, low=0, integer=True)
        check_positive("burst_gap", burst_gap)
        check_positive("idle_timeout", idle_timeout)
        check_fraction("val_fraction", val_fraction, allow_one=False)
        check_fraction("test_fraction", test_fraction, allow_one=False)
        if val_fraction + test_fraction >= 1:
            raise ValueError(f"val_fraction + test_fraction must be < 1, got {val_fraction} + {test_fraction}; "
                             "leave flows for training.")
        if labels_per_class is not None:
            check_positive_int("labels_per_class", labels_per_class)
        check_path_argument("cache_dir", cache_dir)
        if pcap_paths is None:
            raise ValueError("PcapBurstDataModule needs pcap_paths: capture files or folders (make some with "
                             "`python -m lightning_ext.traffic.capture --out DIR`).")
        self.save_hyperparameters()
        self.pcap_paths, self.label_from, self.labels = list(pcap_paths), label_from, labels
        self.representation, self.mask_ports, self.mask_ids = representation, mask_ports, mask_ids
        self.layout = dict(max_bursts=max_bursts, max_packets=max_packets, payload_tokens=payload_tokens,
                           burst_gap=burst_gap, packets=packets, header_bytes=header_bytes,
                           payload_bytes=payload_bytes)
        self.min_packets, self.idle_timeout = min_packets, idle_timeout
        self.split_by, self.val_fraction, self.test_fraction = split_by, val_fraction, test_fraction
        self.labels_per_class, self.seed = labels_per_class, seed
        self.batch_size, self.shuffle, self.shuffle_seed, self.num_workers = batch_size, shuffle, shuffle_seed, num_workers
        self.cache_dir = cache_dir
        self.class_names: list[str] = []
        self.shortcuts: dict[str, float] = {}
        self._splits: dict[str, TensorDataset] = {}

    @property
    def num_classes(self) -> int:
        """Number of labels (after ``setup``)."""
        return len(self.class_names)

    def _build(self) -> dict:
        from lightning_ext.traffic.pcap import netfound_tokens, netmamba_bytes

        flows, names, origin = labelled_flows(find_pcaps(self.pcap_paths), self.label_from, self.idle_timeout,
                                              self.min_packets, self.labels, type(self).__name__)
        classes = sorted(set(names))
        out: dict = {"classes": classes, "y": torch.tensor([classes.index(n) for n in names]),
                     "origin": torch.tensor(origin),
                     "ports": torch.tensor([[f.cport, f.sport] for f in flows], dtype=torch.long),
                     "addresses": torch.tensor([[int.from_bytes(f.client[-3:], "big"), int.from_bytes(f.server[-3:], "big")]
                                                   for f in flows])}
        lay = self.layout
        if self.representation == "netfound_bursts":
            pairs = [netfound_tokens(f, lay["max_bursts"], lay["max_packets"], lay["payload_tokens"],
                                     lay["burst_gap"], include_ports=not self.mask_ports) for f in flows]
            out["tokens"] = torch.from_numpy(np.stack([p[0] for p in pairs]))
            out["meta"] = torch.from_numpy(np.stack([p[1] for p in pairs]))
        else:
            out["bytes"] = torch.from_numpy(np.stack([
                netmamba_bytes(f, lay["packets"], lay["header_bytes"], lay["payload_bytes"], self.mask_ports,
                               self.mask_ids) for f in flows]))
        return out

    @override
    def setup(self, stage: Optional[str] = None) -> None:
        """Parse (or load from the cache) every capture, split by time, run the shortcut check."""
        if self._splits:
            return
        from lightning_ext.traffic.pcap import shortcut_check

        files = find_pcaps(self.pcap_paths)
        options = dict(self.layout, representation=self.representation, mask_ports=self.mask_ports,
                       mask_ids=self.mask_ids, label_from=self.label_from, labels=self.labels,
                       min_packets=self.min_packets, idle_timeout=self.idle_timeout)
        main = "tokens" if self.representation == "netfound_bursts" else "bytes"
        data = cached("pcap_bursts", None if self.cache_dir is None else str(self.cache_dir),
                      source_key(files, options), self._build, ("y", "origin", main))
        self.class_names = list(data["classes"])
        y = data["y"]
        split = time_split(len(y), data["origin"].tolist(), self.split_by, self.val_fraction, self.test_fraction)
        for name in ("train", "val", "test"):
            if len(split[name]) == 0:
                raise ValueError(f"the {name} split is empty ({len(y)} labelled flows); capture longer or change "
                                 "val_fraction/test_fraction.")
        missing = [c for i, c in enumerate(self.class_names) if not (y[split["train"]] == i).any()]
        if missing:
            raise ValueError(f"no training flows of label(s) {missing}: they start after the training period; "
                             "capture longer, use split_by='capture', or drop them from `labels`.")
        cols = {"server_port": data["ports"][:, 1].numpy(), "client_port": data["ports"][:, 0].numpy(),
                "addresses": data["addresses"][:, 0].numpy() * 2**24 + data["addresses"][:, 1].numpy()}
        self.shortcuts = shortcut_check(cols, y.numpy(), split["train"], split["val"])
        majority = float((y[split["val"]] == torch.bincount(y[split["train"]]).argmax()).float().mean())
        leaky = {k: v for k, v in self.shortcuts.items() if v > max(0.9, majority + 0.2)}
        state = "masked in the inputs" if self.mask_ports else "NOT masked (mask_ports=False): the model can read them"
        if leaky and not self.mask_ports:
            rank_zero_warn(f"shortcut check: {leaky} alone predict the label on validation flows (majority "
                           f"{majority:.2f}); ports are {state}.")
        else:
            rank_zero_info(f"shortcut check: single-field validation accuracy {self.shortcuts} (majority "
                           f"{majority:.2f}); addresses are zeroed and ports are {state}.")
        train = split["train"]
        if self.labels_per_class is not None:
            g = torch.Generator().manual_seed(self.seed)
            keep = []
            for c in range(len(self.class_names)):
                idx = train[(y[train] == c).numpy()]
                keep += idx[torch.randperm(len(idx), generator=g)[:self.labels_per_class].numpy()].tolist()
            train = np.sort(np.asarray(keep))
        split["train"] = train
        if self.representation == "netfound_bursts":
            tensors = (data["tokens"], data["meta"])
        else:
            tensors = ((data["bytes"].float() / 255.0 - 0.5) / 0.5,)
        self._splits = {k: TensorDataset(*(t[torch.as_tensor(v)] for t in tensors), y[torch.as_tensor(v)])
                        for k, v in split.items()}

    @property
    def train_set(self):
        """The training split (after ``setup``)."""
        return self.split_dataset("train")

    def split_dataset(self, split: str) -> TensorDataset:
        """The dataset of ``split`` (``"train"``, ``"val"`` or ``"test"``)."""
        if not self._splits:
            raise RuntimeError("PcapBurstDataModule.setup() has not run; call dm.setup() or pass it to a Trainer.")
        return self._splits[split]
