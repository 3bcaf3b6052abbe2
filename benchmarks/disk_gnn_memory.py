"""DiskGNN out of core: training under a memory limit smaller than the feature table (issue 24's check).

Claim (the issue's DiskGNN item): on a generated graph whose features exceed a set memory budget, training with
`OfflineSampledDataModule` (pre-sampled batches, packed per-batch features on disk) completes under that budget,
with its peak RSS measured, and its epoch time is reported against in-memory training of the same batches.

Set-up: a planted-partition graph of ``nodes`` nodes (``degree`` edges each, 80% inside the node's block), float32
features of ``dim`` dims (Gaussian noise plus a class-mean signal, so the model can learn), written to a
temporary folder as ``.npy`` files (the ``graph_dir`` form a user's own graph takes). One child process per arm,
one torch thread each, so that each arm's peak memory is its own:

- ``prepare`` (no limit): ``OfflineSampledDataModule.setup`` samples the batch pool and packs it (timed);
- ``packed @ limit``: the same DataModule (the store is validated and reused) trains ``epochs`` epochs of
  `SampledNodeClassifier` inside a memory cgroup whose limit is ``limit_gib`` (anonymous memory plus the page
  cache it charges; page cache is reclaimable, anonymous memory is not);
- ``in-memory @ limit`` (positive control for the limit): the same batches, with the feature table loaded into
  memory first; it must be killed by the limit, else the limit did not bind and the check is not testable;
- ``packed`` and ``in-memory`` without a limit: epoch times and peak RSS side by side.

Before each child the feature and packed files are evicted from the page cache (``posix_fadvise(DONTNEED)``).
Peak memory: the kernel's ``VmHWM`` and ``RssAnon`` sampled every 20 ms (file-backed pages of the mapped feature
table count in ``VmRSS`` but are reclaimable; ``RssAnon`` is what must fit), and the cgroup's own peak usage.
The limit needs a writable cgroup memory controller (v1 or v2); without one the arms run unlimited and the page
says the limit was not enforced.

    python benchmarks/disk_gnn_memory.py               # writes docs/results/disk_gnn_memory.json
    python benchmarks/disk_gnn.py --render-only        # renders its section of docs/results/disk_gnn.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from disk_gnn import _evict as evict  # noqa: E402  (page cache eviction, shared with the I/O benchmark)

ROOT = Path(__file__).resolve().parents[1]
JSON = ROOT / "docs" / "results" / "disk_gnn_memory.json"
P = dict(nodes=2_000_000, dim=512, blocks=50, degree=5, classes=10, signal=0.1, train_seeds=10_240, val_seeds=1_000,
         batch_size=256, num_neighbors=[5, 5], hidden=64, num_layers=2, lr=1e-2, epochs=2, limit_gib=2.0)
CMD = "python benchmarks/disk_gnn_memory.py"


# -- the graph ---------------------------------------------------------------------------------------------------


def make_graph(root: Path) -> Path:
    """Planted partition with class-mean features, written chunk by chunk (the table never sits in memory)."""
    rng = np.random.default_rng(0)
    n, blocks, deg = P["nodes"], P["blocks"], P["degree"]
    block = rng.integers(0, blocks, n)
    y = block % P["classes"]
    order = np.argsort(block, kind="stable")
    starts = np.searchsorted(block[order], np.arange(blocks + 1))
    src = np.repeat(np.arange(n), deg)
    dst = rng.integers(0, n, src.size)
    intra = rng.random(src.size) < 0.8
    b = block[src[intra]]
    dst[intra] = order[starts[b] + (rng.random(b.size) * (starts[b + 1] - starts[b])).astype(np.int64)]
    root.mkdir(parents=True, exist_ok=True)
    means = rng.standard_normal((P["classes"], P["dim"])).astype(np.float32) * P["signal"]
    x = np.lib.format.open_memmap(root / "x.npy", mode="w+", dtype=np.float32, shape=(n, P["dim"]))
    for lo in range(0, n, 65536):
        hi = min(n, lo + 65536)
        x[lo:hi] = rng.standard_normal((hi - lo, P["dim"]), dtype=np.float32) + means[y[lo:hi]]
    x.flush()
    del x
    perm = rng.permutation(n)
    t, v = P["train_seeds"], P["val_seeds"]
    for name, arr in (("edge_index", np.stack([src, dst])), ("y", y), ("train_idx", perm[:t]),
                      ("val_idx", perm[t: t + v]), ("test_idx", perm[t + v: t + 2 * v])):
        np.save(root / f"{name}.npy", arr)
    return root


# -- a memory cgroup ---------------------------------------------------------------------------------------------


class MemoryCgroup:
    """A child memory cgroup of this process's own (v1 or v2) with a hard limit; ``None`` from :meth:`create` when
    the controller is not writable here."""

    def __init__(self, path: Path, v2: bool) -> None:
        self.path, self.v2 = path, v2

    @classmethod
    def create(cls, limit_bytes: int):
        lines = Path("/proc/self/cgroup").read_text().splitlines()
        v1 = [ln.split(":", 2)[2] for ln in lines if ln.split(":", 2)[1] == "memory"]
        candidates = [(Path("/sys/fs/cgroup/memory") / v1[0].lstrip("/"), False)] if v1 else []
        v2 = [ln.split(":", 2)[2] for ln in lines if ln.startswith("0::")]
        if v2:
            candidates.append((Path("/sys/fs/cgroup") / v2[0].lstrip("/"), True))
        for parent, is_v2 in candidates:
            path = parent / f"lightning_ext_disk_gnn_{os.getpid()}"
            try:
                path.mkdir(exist_ok=True)
                (path / ("memory.max" if is_v2 else "memory.limit_in_bytes")).write_text(str(limit_bytes))
                return cls(path, is_v2)
            except OSError:
                shutil.rmtree(path, ignore_errors=True)
        return None

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))

    def stats(self) -> dict:
        def read(name):
            try:
                return (self.path / name).read_text()
            except OSError:
                return ""
        if self.v2:
            events = dict(ln.split() for ln in read("memory.events").splitlines() if ln)
            peak = read("memory.peak").strip()
            return {"peak_bytes": int(peak) if peak else None, "oom_kills": int(events.get("oom_kill", 0))}
        oom = dict(ln.split() for ln in read("memory.oom_control").splitlines() if ln)
        return {"peak_bytes": int(read("memory.max_usage_in_bytes") or 0),
                "limit_hits": int(read("memory.failcnt") or 0), "oom_kills": int(oom.get("oom_kill", 0))}

    def remove(self) -> None:
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)


# -- one arm in a child process ----------------------------------------------------------------------------------


def _status() -> dict:
    s = Path("/proc/self/status").read_text()
    return {k: int(v) * 1024 for k, v in re.findall(r"^(VmRSS|VmHWM|RssAnon|RssFile):\s+(\d+) kB", s, re.M)}


def child(arm: str, graph: str, store: str, out: str) -> None:
    peak = {"RssAnon": 0, "VmRSS": 0}
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            st = _status()
            for k in peak:
                peak[k] = max(peak[k], st.get(k, 0))
            stop.wait(0.02)

    threading.Thread(target=watch, daemon=True).start()
    import torch
    from lightning.pytorch import Callback, Trainer, seed_everything

    from lightning_ext.graph.offline_sampled import OfflineSampledDataModule
    from lightning_ext.graph.sampled_node_classifier import SampledNodeClassifier

    torch.set_num_threads(1)
    after_imports = _status()
    seed_everything(0, verbose=False)
    dm = OfflineSampledDataModule(graph_dir=graph, num_neighbors=P["num_neighbors"], batch_size=P["batch_size"],
                                  pool_epochs=1, store_dir=store, seed=0)
    t0 = time.time()
    dm.setup("fit")
    record = {"arm": arm, "setup_s": time.time() - t0, "after_imports": after_imports}
    if arm == "prepare":
        record["store_bytes"] = {f.name: f.stat().st_size for f in Path(store).iterdir()}
    else:
        if arm == "in_memory":  # the same batches, gathered from a table loaded into memory
            t0 = time.time()
            dm.features = np.load(dm.dir / "features.npy")
            dm.packing = "none"
            record["load_s"] = time.time() - t0
        epoch_s = []

        class EpochTimer(Callback):
            def on_train_epoch_start(self, trainer, pl_module):
                self.t0 = time.time()

            def on_train_epoch_end(self, trainer, pl_module):
                epoch_s.append(time.time() - self.t0)

        model = SampledNodeClassifier(num_features=dm.feature_dim, num_classes=dm.num_classes, hidden=P["hidden"],
                                      num_layers=P["num_layers"], dropout=0.0, lr=P["lr"])
        trainer = Trainer(max_epochs=P["epochs"], accelerator="cpu", devices=1, logger=False,
                          enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                          num_sanity_val_steps=0, callbacks=[EpochTimer()])
        trainer.fit(model, datamodule=dm)
        record.update(epoch_s=epoch_s, val_acc=float(trainer.callback_metrics["val_acc"]),
                      steps=int(trainer.global_step), rows_read=dm.io_stats.rows, bytes_read=dm.io_stats.bytes)
    stop.set()
    record.update(peak_rss_anon=peak["RssAnon"], peak_vm_rss=peak["VmRSS"], vm_hwm=_status()["VmHWM"])
    Path(out).write_text(json.dumps(record))


def run_arm(arm: str, graph: Path, store: Path, tmp: Path, limit_bytes: int | None) -> dict:
    evict(graph / "x.npy", store / "features.npy", store / "packed.bin")
    out = tmp / f"{arm}-{limit_bytes}.json"
    out.unlink(missing_ok=True)
    group = MemoryCgroup.create(limit_bytes) if limit_bytes else None
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, __file__, "--child", arm, "--graph", str(graph), "--store", str(store),
                             "--out", str(out), "--nodes", str(P["nodes"])], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            preexec_fn=(lambda: group.add(os.getpid())) if group else None)  # in the group from exec
    _, err = proc.communicate()
    record = json.loads(out.read_text()) if out.exists() else {"arm": arm}
    record.update(returncode=proc.returncode, wall_s=time.time() - t0, limit_bytes=limit_bytes,
                  limit_enforced=group is not None, completed=proc.returncode == 0 and out.exists())
    if proc.returncode:
        record["stderr_tail"] = err.strip().splitlines()[-3:]
    if group:
        record["cgroup"] = group.stats()
        group.remove()
    print(arm, limit_bytes, {k: v for k, v in record.items() if k not in ("after_imports", "stderr_tail")},
          flush=True)
    return record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", choices=["prepare", "packed", "in_memory"])
    ap.add_argument("--graph")
    ap.add_argument("--store")
    ap.add_argument("--out")
    ap.add_argument("--work", default=None, help="folder for the generated graph and store (default: a temp dir)")
    ap.add_argument("--nodes", type=int, default=P["nodes"], help="graph size (a smaller one for a smoke run)")
    ap.add_argument("--limit-gib", type=float, default=P["limit_gib"])
    ap.add_argument("--json", default=str(JSON))
    args = ap.parse_args()
    P.update(nodes=args.nodes, limit_gib=args.limit_gib)
    if args.child:
        child(args.child, args.graph, args.store, args.out)
        return
    limit = int(P["limit_gib"] * 2**30)
    started = time.time()
    with tempfile.TemporaryDirectory(dir=args.work) as tmp_name:
        tmp = Path(tmp_name)
        t0 = time.time()
        graph = make_graph(tmp / "graph")
        gen_s = time.time() - t0
        store = tmp / "store"
        arms = [run_arm("prepare", graph, store, tmp, None)]
        for arm, lim in (("packed", limit), ("in_memory", limit), ("packed", None), ("in_memory", None)):
            arms.append(run_arm(arm, graph, store, tmp, lim))
        feature_bytes = (graph / "x.npy").stat().st_size
    data = {"protocol": P, "command": CMD, "feature_table_bytes": feature_bytes, "generate_s": gen_s, "arms": arms,
            "wall_s": time.time() - started, "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f} at the end"}
    sys.path.insert(0, str(ROOT))
    from lightning_ext.core.io import atomic_write_json

    atomic_write_json(data, Path(args.json), indent=1)
    print("wrote", args.json, flush=True)


if __name__ == "__main__":
    main()
