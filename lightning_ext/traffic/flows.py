"""What both pcap DataModules share: finding pcaps, labelling flows, splitting by time, and the validated cache."""

from __future__ import annotations

import glob
import hashlib
import ipaddress
import json
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from lightning_ext.core.io import atomic_torch_save
from lightning_ext.core.paths import cache_root
from lightning_ext.core.optional import require

CACHE_VERSION = 1


def find_pcaps(pcap_paths: Sequence[str]) -> list[Path]:
    """Files, folders (searched recursively for ``*.pcap``/``*.pcapng``) and globs, in sorted order."""
    if isinstance(pcap_paths, (str, Path)):
        pcap_paths = [str(pcap_paths)]
    found: list[Path] = []
    for item in pcap_paths:
        p = Path(item)
        if p.is_dir():
            found += sorted(q for q in p.rglob("*") if q.suffix in (".pcap", ".pcapng"))
        elif p.is_file():
            found.append(p)
        else:
            found += sorted(Path(q) for q in glob.glob(str(item), recursive=True) if Path(q).is_file())
    if not found:
        raise FileNotFoundError(f"no pcap files found in pcap_paths={list(pcap_paths)}; give capture files, folders "
                                "holding *.pcap, or globs (make captures with `python -m lightning_ext.traffic.capture`).")
    return sorted(set(found))


def _address(b: bytes) -> str:
    return str(ipaddress.ip_address(b))


def labelled_flows(files: Sequence[Path], label_from: str, idle_timeout: float, min_packets: int,
                   wanted: Optional[Sequence[str]], purpose: str) -> tuple[list, list[str], list[int]]:
    """Flows of every file with a label: ``(flows, label names, file index)``, flows sorted by start time.

    ``label_from="manifest"`` reads ``<name>.labels.json`` beside each pcap (written by the capture recipe: client
    address -> label); ``"dir"`` labels every flow of a file by its parent folder's name. Unlabelled flows are
    dropped. A label in ``wanted`` with no flow is refused with one line.
    """
    require("dpkt", purpose)
    from lightning_ext.traffic.pcap import flows_of, read_packets

    flows, names, origin = [], [], []
    for i, path in enumerate(files):
        table: dict[str, str] = {}
        if label_from == "manifest":
            manifest = path.with_name(path.stem + ".labels.json")
            if not manifest.is_file():
                raise FileNotFoundError(f"{path} has no label manifest {manifest.name} beside it; write one "
                                        "({\"labels\": {\"<client address>\": \"<label>\"}}) or use label_from='dir'.")
            table = json.loads(manifest.read_text())["labels"]
        for flow in flows_of(read_packets(path), idle_timeout, source=str(path)):
            if len(flow.packets) < min_packets:
                continue
            if label_from == "dir":
                label = path.parent.name
            else:
                label = table.get(_address(flow.client)) or table.get(_address(flow.server))
            if label is None or (wanted is not None and label not in wanted):
                continue
            flows.append(flow)
            names.append(label)
            origin.append(i)
    order = sorted(range(len(flows)), key=lambda k: flows[k].start)
    flows, names, origin = [flows[k] for k in order], [names[k] for k in order], [origin[k] for k in order]
    present = set(names)
    for label in wanted or ():
        if label not in present:
            raise ValueError(f"the captures {[str(f) for f in files][:3]} have no flows of label {label!r} (found "
                             f"{sorted(present)}); capture that application or drop it from `labels`.")
    if not flows:
        raise ValueError(f"no labelled flows in {[str(f) for f in files][:3]}; check the label manifests.")
    return flows, names, origin


def time_split(n: int, origin: Sequence[int], split_by: str, val_fraction: float,
               test_fraction: float) -> dict[str, np.ndarray]:
    """Indices of train/val/test: by start time (earliest flows train), or by capture file (the last files test)."""
    if split_by == "capture":
        files = sorted(set(origin))
        if len(files) < 3:
            raise ValueError(f"split_by='capture' needs at least 3 capture files, got {len(files)}; use "
                             "split_by='time' or capture more days.")
        n_test = max(1, round(len(files) * test_fraction))
        n_val = max(1, round(len(files) * val_fraction))
        val_f, test_f = set(files[-n_test - n_val:-n_test]), set(files[-n_test:])
        o = np.asarray(origin)
        return {"train": np.flatnonzero(~np.isin(o, list(val_f | test_f))),
                "val": np.flatnonzero(np.isin(o, list(val_f))), "test": np.flatnonzero(np.isin(o, list(test_f)))}
    n_test, n_val = int(round(n * test_fraction)), int(round(n * val_fraction))
    idx = np.arange(n)
    return {"train": idx[:n - n_val - n_test], "val": idx[n - n_val - n_test:n - n_test], "test": idx[n - n_test:]}


def source_key(files: Sequence[Path], options: dict[str, Any]) -> str:
    """A digest of the files (path, size, mtime, their manifests) and the options that shaped the arrays."""
    parts = [json.dumps(options, sort_keys=True, default=str), str(CACHE_VERSION)]
    for f in files:
        st = f.stat()
        parts.append(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}")
        m = f.with_name(f.stem + ".labels.json")
        if m.is_file():
            parts.append(hashlib.sha256(m.read_bytes()).hexdigest())
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def cached(component: str, cache_dir: Optional[str], key: str, build: Callable[[], dict],
           required: Sequence[str]) -> dict:
    """``build()``'s dict of arrays, loaded from ``<cache>/<key>.pt`` when it is valid (same key, every required
    entry, equal lengths), rebuilt and written atomically otherwise."""
    import torch

    if cache_dir is None:
        return build()
    root = Path(cache_dir) if Path(cache_dir).is_absolute() else cache_root(component) / cache_dir
    path = root / f"{key}.pt"
    if path.is_file():
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
            lengths = {len(data[k]) for k in required}
            if data.get("key") == key and len(lengths) == 1:
                return data
        except Exception:  # noqa: BLE001 - an unreadable or partial cache is rebuilt, never trusted
            pass
    data = build()
    data["key"] = key
    atomic_torch_save(data, path)
    return data
