"""The out-of-core section of the DiskGNN page, from ``disk_gnn_memory.json`` (``benchmarks/disk_gnn_memory.py``)."""

from __future__ import annotations

import json
from pathlib import Path

MEMORY_JSON = Path(__file__).resolve().parents[1] / "docs" / "results" / "disk_gnn_memory.json"
MIB = 2**20


def _arm(data: dict, name: str, limited: bool) -> dict | None:
    return next((a for a in data["arms"] if a["arm"] == name and bool(a.get("limit_bytes")) == limited), None)


def memory_claim(path: Path = MEMORY_JSON):
    """``(name, holds, why)``: the packed arm completes under a limit smaller than the feature table, and the
    in-memory arm (the positive control) does not; ``None`` when not run or when the limit did not bind."""
    name = "out of core"
    if not path.exists():
        return name, None, "inconclusive: not run"
    data = json.loads(path.read_text())
    packed, control = _arm(data, "packed", True), _arm(data, "in_memory", True)
    limit, table = data["protocol"]["limit_gib"] * 2**30, data["feature_table_bytes"]
    if not packed or not control or not packed.get("limit_enforced"):
        return name, None, "not testable here: no writable memory cgroup, the limit was not enforced"
    if table <= limit:
        return name, None, "not testable here: the feature table fits in the limit"
    if control["completed"]:
        return name, None, "not testable here: in-memory training completed under the limit, so it did not bind"
    return name, bool(packed["completed"]), (
        f"packed training {'completed' if packed['completed'] else 'failed'} under a {limit / 2**30:.1f} GiB limit "
        f"with a {table / 2**30:.2f} GiB feature table; in-memory training under the same limit was killed "
        f"(exit {control['returncode']})")


def memory_section(path: Path = MEMORY_JSON) -> str:
    if not path.exists():
        return ("## Out of core: training under a memory limit\n\nNot run yet: `python benchmarks/disk_gnn_memory.py`"
                " (a few CPU-minutes and ~9 GB of temporary disk).\n")
    d = json.loads(path.read_text())
    p = d["protocol"]
    rows = []
    for a in d["arms"]:
        lim = f"{a['limit_bytes'] / 2**30:.1f} GiB" if a.get("limit_bytes") else "none"
        cg = a.get("cgroup", {})
        epochs = a.get("epoch_s") or []
        outcome = "completed" if a["completed"] else (
            f"killed by the limit (exit {a['returncode']}, OOM kills {cg.get('oom_kills', '?')})"
            if a["returncode"] and a.get("limit_bytes") else f"failed (exit {a['returncode']})")
        rows.append(f"| {a['arm'].replace('_', '-')} | {lim} | {outcome} | "
                    + (f"{a['peak_rss_anon'] / MIB:,.0f} | {a['peak_vm_rss'] / MIB:,.0f} | " if "peak_rss_anon" in a
                       else "n/a | n/a | ")
                    + (f"{cg['peak_bytes'] / MIB:,.0f}" if cg.get("peak_bytes") else "n/a") + " | "
                    + (", ".join(f"{e:.1f}" for e in epochs) or "n/a") + " | "
                    + (f"{a['val_acc']:.3f}" if "val_acc" in a else "n/a") + " | "
                    + (f"{a['bytes_read'] / MIB:,.0f}" if "bytes_read" in a else "n/a") + f" | {a['wall_s']:.0f} |")
    name, holds, why = memory_claim(path)
    packed, free, mem = _arm(d, "packed", True), _arm(d, "packed", False), _arm(d, "in_memory", False)
    ratio = ""
    if packed and free and mem and packed.get("epoch_s") and free.get("epoch_s") and mem.get("epoch_s"):
        r, r_free = sum(packed["epoch_s"]) / sum(mem["epoch_s"]), sum(free["epoch_s"]) / sum(mem["epoch_s"])
        hits = packed.get("cgroup", {}).get("limit_hits")
        ratio = (f" Epoch time against in-memory training without a limit (the same batches and model, one thread "
                 f"each, the files evicted from the page cache before each run): packed without a limit "
                 f"{r_free:.2f}x, packed under the limit {r:.2f}x. Under the limit the kernel reclaims all the time"
                 + (f" ({hits:,} times the cgroup hit its limit)" if hits else "") + ": anonymous memory takes "
                 f"{packed['peak_rss_anon'] / MIB:,.0f} MiB of the {p['limit_gib']:.1f} GiB, and the rest is shared "
                 "by the packed blocks, the memory-mapped table that validation reads, and the file pages of the "
                 "torch libraries, which are evicted and read again. The graph's topology (edge index and CSR) "
                 "stays in memory, as in DiskGNN.")
    after = next((a["after_imports"] for a in d["arms"] if "after_imports" in a), {})
    return f"""## Out of core: training under a memory limit

`{d['command']}` (finished {d['finished']}; {d['machine']}; generation {d['generate_s']:.0f} s, whole run
{d['wall_s'] / 60:.1f} min). A generated planted-partition graph: {p['nodes']:,} nodes, {p['degree']} edges each
(80% inside one of {p['blocks']} blocks), {p['dim']} float32 features (noise plus a class-mean signal of scale
{p['signal']}), so the feature table is **{d['feature_table_bytes'] / 2**30:.2f} GiB**; {p['train_seeds']:,}
training seeds, batch {p['batch_size']}, fan-out {p['num_neighbors']}, GraphSAGE ({p['num_layers']} layers, hidden
{p['hidden']}, lr {p['lr']}), {p['epochs']} epochs. Each arm is its own process; the limited ones run inside a memory
cgroup with a hard limit of **{p['limit_gib']:.1f} GiB** (anonymous memory plus the page cache it charges). The
in-memory arm trains on the same pre-sampled batches with the feature table loaded into memory first: under the
limit it is the positive control (it must be killed, else the limit did not bind). Peak anonymous RSS is what must
fit (file-backed pages of the memory-mapped table count in RSS but the kernel reclaims them); the interpreter with
torch, Lightning and PyG imported already holds {after.get('RssAnon', 0) / MIB:,.0f} MiB of it (a CUDA build of
torch).

Preparation (sampling the batch pool, copying the table into the store and packing the blocks) ran without a limit,
as a separate process; its peak anonymous RSS is in the table's first row. Wall-clock times are from a 2-core machine
shared with other jobs.

Result: {'holds' if holds else ('fails' if holds is False else 'not decided')} ({why}).{ratio}

| arm | memory limit | outcome | peak anon RSS MiB | peak RSS MiB | cgroup peak MiB | epoch s | val acc | MiB read | wall s |
|---|---|---|---|---|---|---|---|---|---|
""" + "\n".join(rows) + "\n"
