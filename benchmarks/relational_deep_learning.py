"""Relational Deep Learning (arXiv 2312.04615, RelBench 2407.20060) at small scale: a GNN on the raw SQLite tables
vs a model on the seed table alone and one on hand-made time-censored SQL features.

Data: recbole's MovieLens-100K written to SQLite (users, movies, ratings), read with Python's sqlite3
(RelationalDataModule). Task "movie-active-14d" (graph-and-recsys.md section 3): for each movie with a rating at
or before the seed time t, is it rated in (t, t + 14 days]? val 1998-02-25, test 1998-03-25, 2 eval windows.

Claims (the spec's pass rule, with our own measured baselines):
  (1) RDL beats the single-table model: mean test AUROC >= single-table + 0.10;
  (2) RDL matches hand-made features: mean test AUROC >= hand features - 0.02;
  (3) the gain comes from relational hops: the 1-layer RDL falls between the two baselines.
Premise: the hand-made features beat the single-table model by >= 0.05 validation AUROC (the relational
information matters here), and the leak check finds no sampled row later than its seed (else not testable).

Protocol: each arm's learning rate tuned on validation with seed 0 over a grid of two values that includes the
official default (RDL: Adam {0.005 (RelBench), 0.001}; HistGradientBoosting: {0.1 (scikit-learn), 0.05}); then
3 seeds at the chosen value. RDL: 2 layers, num_neighbors [32, 16], channels 64, batch 512, at most 20 epochs,
early stopping on val_auroc (patience 3), best weights restored, test once. One torch thread. The 1-layer
ablation runs at the 2-layer model's chosen lr. Beside the verdict (added later): the spec's 3 layers,
num_neighbors [32, 16, 8], with its own lr grid on seed 0.

    python benchmarks/relational_deep_learning.py            # runs what the JSON lacks, then renders
    python benchmarks/relational_deep_learning.py --render-only
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import fit_early_stopping, mean_std, page_main, verdict_of  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
JSON = ROOT / "docs" / "results" / "relational_deep_learning.json"
SEEDS = (0, 1, 2)
GNN_LRS = (0.005, 0.001)
HGB_LRS = (0.1, 0.05)
GNN = {"channels": 64, "num_layers": 2, "num_neighbors": [32, 16]}
SPEC_FANOUT = [32, 16, 8]  # the spec's (RelBench's) 3-layer model, an extra arm reported beside the verdict
MAX_EPOCHS, PATIENCE = 20, 3
CMD = "python benchmarks/relational_deep_learning.py"
P = {"task": "movie-active-14d", "seeds": list(SEEDS), "gnn_lrs": list(GNN_LRS), "hgb_lrs": list(HGB_LRS),
     "gnn": GNN, "max_epochs": MAX_EPOCHS, "patience": PATIENCE, "batch_size": 512, "threads": 1}
HAND_SQL = """
SELECT t.timestamp AS timestamp, r.item_id AS item_id,
       SUM(r.timestamp > t.timestamp - 7 * 86400) AS n7, SUM(r.timestamp > t.timestamp - 14 * 86400) AS n14,
       SUM(r.timestamp > t.timestamp - 30 * 86400) AS n30, COUNT(*) AS n_all, AVG(r.rating) AS mean_rating,
       (t.timestamp - MIN(r.timestamp)) / 3600.0 AS hours_since_first,
       (t.timestamp - MAX(r.timestamp)) / 3600.0 AS hours_since_last
FROM timestamps t JOIN ratings r ON r.timestamp <= t.timestamp
GROUP BY t.timestamp, r.item_id
"""


def _dm(seed: int, num_neighbors: list[int]):
    from lightning_ext.graph.relational import RelationalDataModule

    dm = RelationalDataModule(num_neighbors=num_neighbors, batch_size=512, seed=seed)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def _tables(dm) -> dict:
    """Per split: single-table features (movie row + seed day) and hand-made SQL features, labels."""
    import pandas as pd

    source = dm._source()
    movies = dm.data["movies"].x.numpy()
    out = {}
    for split, s in dm.splits.items():
        times = sorted(set(s["time"].tolist()))
        hand = source.query(HAND_SQL, times, {})
        key = pd.DataFrame({"timestamp": s["time"].numpy(), "item_id": dm.ids["movies"][s["node"].numpy()]})
        hand = key.merge(hand, on=["timestamp", "item_id"], how="left")
        single = np.concatenate([movies[s["node"].numpy()], (s["time"].numpy()[:, None] / 86400.0)], axis=1)
        out[split] = {"single": single, "hand": np.concatenate([single, hand.iloc[:, 2:].to_numpy(float)], axis=1),
                      "y": s["y"].numpy().astype(int)}
    return out


def _hgb(tables: dict, features: str, lr: float, seed: int) -> dict:
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.metrics import roc_auc_score

    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):  # one OpenMP thread, like torch
        clf = HistGradientBoostingClassifier(learning_rate=lr, random_state=seed)
        clf.fit(tables["train"][features], tables["train"]["y"])
        return {s: float(roc_auc_score(tables[s]["y"], clf.predict_proba(tables[s][features])[:, 1]))
                for s in ("val", "test")}


def _leak_check(dm) -> dict:
    """Max over every sampled timed row of (row time - its seed's time), and the count of rows later than it."""
    worst, leaks, rows = -float("inf"), 0, 0
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        for b in loader:
            seed_time = b["movies"].seed_time
            for t in b.node_types:
                if "time" in b[t] and b[t].num_nodes:
                    d = b[t].time - seed_time[b[t].batch]
                    worst, leaks, rows = max(worst, int(d.max())), leaks + int((d > 0).sum()), rows + d.numel()
    return {"max_time_minus_seed_s": worst, "leaks": leaks, "rows_checked": rows}


def _gnn(seed: int, lr: float, layers: int) -> dict:
    from _common import test_metrics

    from lightning_ext.graph.rdl import RDLModule

    torch.manual_seed(seed)
    dm = _dm(seed, (GNN["num_neighbors"] if layers <= 2 else SPEC_FANOUT)[:layers])
    model = RDLModule(channels=GNN["channels"], num_layers=layers, lr=lr)
    rec = fit_early_stopping(model, dm, MAX_EPOCHS, [], f"rdl L{layers} lr {lr} s{seed}", patience=PATIENCE,
                             monitor="val_auroc")
    rec["test_auroc"] = float(test_metrics(model, dm)["test_auroc"])
    rec["val_auroc"] = rec["best_val"]
    return rec


def main_runs(data: dict) -> None:
    from lightning_ext.core.io import atomic_write_json

    os.environ.setdefault("LIGHTNING_EXT_CACHE", str(Path(tempfile.gettempdir()) / "rdl_bench_cache"))

    def save() -> None:
        atomic_write_json(data, JSON, indent=1)

    if "graph" not in data:
        t0 = time.perf_counter()
        dm = _dm(0, GNN["num_neighbors"])
        data["graph"] = {**dm.stats, "total_setup_s": time.perf_counter() - t0, "label_sql": dm.task.label_sql,
                         "leak_check": _leak_check(dm)}
        save()
        print("graph", data["graph"]["nodes"], data["graph"]["rows"], data["graph"]["leak_check"], flush=True)
    runs = data.setdefault("runs", {})
    tables = None
    for features in ("single", "hand"):
        for lr in HGB_LRS:
            for seed in SEEDS:
                key = f"hgb {features} lr {lr} seed {seed}"
                if key not in runs:
                    tables = tables or _tables(_dm(0, GNN["num_neighbors"]))
                    start = time.perf_counter()
                    runs[key] = {**_hgb(tables, features, lr, seed), "wall_s": time.perf_counter() - start}
                    save()
                    print(key, runs[key], flush=True)
    def gnn(layers: int, lr: float, seed: int) -> None:
        key = f"rdl L{layers} lr {lr} seed {seed}"
        if key not in runs:
            runs[key] = _gnn(seed, lr, layers)
            save()
            print(key, runs[key]["val_auroc"], runs[key]["test_auroc"], flush=True)

    for lr in GNN_LRS:
        gnn(2, lr, 0)
    best = _chosen(runs, "rdl L2", GNN_LRS)
    for layers, seeds in ((2, SEEDS[1:]), (1, SEEDS)):  # the 1-layer ablation at the 2-layer model's lr
        for seed in seeds:
            gnn(layers, best, seed)
    # the spec's 3 layers, num_neighbors [32, 16, 8]: its own lr grid on seed 0, like the 2-layer model
    for lr in GNN_LRS:
        gnn(3, lr, 0)
    for seed in SEEDS[1:]:
        gnn(3, _chosen(runs, "rdl L3", GNN_LRS), seed)


def _val(run: dict) -> float:
    return run["val"] if "val" in run else run["val_auroc"]


def _chosen(runs: dict, prefix: str, lrs) -> float:
    """The learning rate with the best seed-0 validation AUROC (ties: the official default, listed first)."""
    vals = [(_val(runs[f"{prefix} lr {lr} seed 0"]), -i, lr) for i, lr in enumerate(lrs)
            if f"{prefix} lr {lr} seed 0" in runs]
    return max(vals)[2] if vals else lrs[0]


def _results(data: dict) -> dict:
    runs, res = data.get("runs", {}), {}
    for name, prefix, lrs in (("single-table HGB", "hgb single", HGB_LRS), ("hand-made SQL features HGB", "hgb hand",
                              HGB_LRS), ("RDL 2 layers", "rdl L2", GNN_LRS), ("RDL 1 layer (ablation)", "rdl L1",
                              GNN_LRS), ("RDL 3 layers (spec, beside the verdict)", "rdl L3", GNN_LRS)):
        lr = _chosen(runs, "rdl L2" if prefix == "rdl L1" else prefix, lrs)
        fin = [runs[f"{prefix} lr {lr} seed {s}"] for s in SEEDS if f"{prefix} lr {lr} seed {s}" in runs]
        res[name] = {"lr": lr, "runs": fin}
    return res


def render(data: dict):
    from statistics import mean

    res = _results(data)
    g = data.get("graph", {})
    test = {k: [r.get("test", r.get("test_auroc")) for r in v["runs"]] for k, v in res.items()}
    val = {k: [r.get("val", r.get("val_auroc")) for r in v["runs"]] for k, v in res.items()}
    single, hand, rdl, one, three = (test[k] for k in res)
    leak = g.get("leak_check", {})
    premise = bool(val["hand-made SQL features HGB"] and val["single-table HGB"]
                   and mean(val["hand-made SQL features HGB"]) >= mean(val["single-table HGB"]) + 0.05
                   and leak.get("leaks", 1) == 0)
    names = ("RDL >= single-table + 0.10", "RDL >= hand features - 0.02", "1 layer between the baselines")
    needs = {names[0]: ("single-table HGB", "RDL 2 layers"), names[1]: ("hand-made SQL features HGB", "RDL 2 layers"),
             names[2]: ("single-table HGB", "hand-made SQL features HGB", "RDL 1 layer (ablation)")}
    holds = {names[0]: lambda: (mean(rdl) >= mean(single) + 0.10, f"{mean(rdl):.3f} vs {mean(single) + 0.10:.3f}"),
             names[1]: lambda: (mean(rdl) >= mean(hand) - 0.02, f"{mean(rdl):.3f} vs {mean(hand) - 0.02:.3f}"),
             names[2]: lambda: (mean(single) < mean(one) < mean(hand),
                                f"{mean(single):.3f} < {mean(one):.3f} < {mean(hand):.3f}")}
    claims = []
    for name in names:
        arms = needs[name]
        if any(len(test[a]) < len(SEEDS) for a in arms):
            claims.append((name, None, "inconclusive: an arm lacks seeds (the run did not finish)"))
        elif not premise:
            claims.append((name, None, "not testable: premise failed"))
        elif any(not r["converged"] for a in arms if a.startswith("RDL") for r in res[a]["runs"]):
            claims.append((name, None, "inconclusive: a GNN run's best validation epoch is its last"))
        else:
            claims.append((name, *holds[name]()))
    verdict = verdict_of(claims)
    if not premise and all(len(v) == len(SEEDS) for v in test.values()):
        verdict = "not testable here"
    spec3 = ""
    if len(three) == len(SEEDS):
        capped = sum(not r["converged"] for r in res["RDL 3 layers (spec, beside the verdict)"]["runs"])
        spec3 = (f"\nThe spec's 3-layer model (num_neighbors {SPEC_FANOUT}, its own lr grid; added after the 2-layer "
                 f"results, so it is reported beside the verdict, which rests on the pre-registered 2-layer arm): "
                 f"test AUROC {mean_std(three, 3)}; against the pass rules: >= single-table + 0.10 "
                 f"{'holds' if mean(three) >= mean(single) + 0.10 else 'fails'} ({mean(three):.3f} vs "
                 f"{mean(single) + 0.10:.3f}), >= hand features - 0.02 "
                 f"{'holds' if mean(three) >= mean(hand) - 0.02 else 'fails'} ({mean(three):.3f} vs "
                 f"{mean(hand) - 0.02:.3f}); {mean(three) - mean(rdl):+.3f} against 2 layers"
                 f"{f'; {capped} run(s) with the best epoch last' if capped else ''}.\n")
    rows = []
    for name, r in res.items():
        fin = r["runs"]
        budget = (f"{mean(x['epochs'] for x in fin):.1f} epochs, {mean(x['steps'] for x in fin):.0f} steps, "
                  f"{mean(x['samples'] for x in fin):,.0f} samples, best epoch(s) "
                  f"{[x['best_epoch'] + 1 for x in fin]}, {mean(x['wall_s'] for x in fin):.0f} s"
                  if fin and "epochs" in fin[0] else
                  (f"one fit on {g.get('rows', {}).get('train', 0):,} rows, "
                   f"{mean(x['wall_s'] for x in fin):.1f} s" if fin else "-"))
        rows.append(f"| {name} | {r['lr']} | {mean_std(val[name], 3) if val[name] else '-'} | "
                    f"{mean_std(test[name], 3) if test[name] else '-'} | {len(fin)} | {budget} |")
    reading = ""
    if all(len(test[k]) == len(SEEDS) for k in test):
        reading = (f"Reading: the 2-layer RDL ends {mean(hand) - mean(rdl):.3f} AUROC below the hand-made features "
                   f"(the pass margin is 0.020) and {mean(rdl) - mean(single):.3f} above the single-table model; it "
                   f"is {mean(rdl) - mean(one):+.3f} against the 1-layer ablation, so most of what it learns sits in "
                   f"the movie's own past ratings (one hop), and the raters behind them add little on this task.\n")
    runs = data.get("runs", {})
    grid = "\n".join(f"| {k} | {v.get('val', v.get('val_auroc')):.3f} |" for k, v in runs.items() if "seed 0" in k)
    page = f"""# Relational Deep Learning: a GNN on the raw SQLite tables (MovieLens-100K, movie-active-14d)

Papers: Fey et al., "Position: Relational Deep Learning" (ICML 2024, arXiv 2312.04615); Robinson et al.,
"RelBench" (NeurIPS 2024 D&B, arXiv 2407.20060). Components: `RelationalDataModule`
(`lightning_ext/graph/relational.py`, database and task in `relational_db.py`) and `RDLModule`
(`lightning_ext/graph/rdl.py`), temporal neighbour sampling by `PortableNeighborSampler` (no pyg-lib).

**Verdict: {verdict}.**

## Set-up
- Database: recbole's MovieLens-100K written to SQLite (`users`, `movies`, `ratings`; the spec's database; built
  offline from the recbole package), read with Python's `sqlite3`. Graph: nodes
  {', '.join(f'{k} {v:,}' for k, v in g.get('nodes', {}).items())}; edges
  {', '.join(f'{k.split("__")[1]} {v:,}' for k, v in g.get('edges', {}).items())}; built in
  {g.get('build_s', 0):.1f} s (read + encode + edges), labels (the SQL below) in {g.get('labels_s', 0):.1f} s,
  on the loaded machine.
- Task "movie-active-14d", seed times by RelBench's rule (val 1998-02-25, test 1998-03-25, 14 days, 2 eval
  windows): rows {', '.join(f'{k} {v:,}' for k, v in g.get('rows', {}).items())}, positive rate
  {', '.join(f'{k} {v:.3f}' for k, v in g.get('positive_rate', {}).items())} (the spec measured 14,789 / 3,222 /
  3,286 rows at 0.748 / 0.606 / 0.694). Label SQL (SQLite):
```sql{g.get('label_sql', '')}```
- Leak check (every batch of the train, val and test loaders, seed 0, 2-hop sampler): {leak.get('leaks')} of
  {leak.get('rows_checked', 0):,} sampled timed rows later than their seed; max (row time - seed time) =
  {leak.get('max_time_minus_seed_s')} s.
- Baselines: scikit-learn `HistGradientBoostingClassifier` on (a) the seed table alone (the movie's row:
  release year, genres, plus the seed day) and (b) those plus hand-made time-censored SQL features (ratings in
  the last 7/14/30 days, total, mean rating, hours since first/last rating; the SQL is in the script). One
  OpenMP thread (`threadpoolctl`), except the first two single-table fits (seeds 0-1 at lr 0.1), which ran with
  two before the limit was added (same data and seeds; only their seconds differ).
- RDL: `RDLModule` channels {GNN['channels']}, 2 layers, num_neighbors {GNN['num_neighbors']} (uniform, temporal),
  batch 512, Adam, early stopping on val_auroc (patience {PATIENCE}, at most {MAX_EPOCHS} epochs), best weights
  restored, test once. Ablation: 1 layer, num_neighbors [32] (the movie row and its own past ratings only), at
  the 2-layer model's chosen lr (not tuned on its own: the shared machine's load left no time for its grid).
- Tuning alike: every arm's learning rate on seed-0 validation over two values including the official default
  (RDL {list(GNN_LRS)}, HGB {list(HGB_LRS)}), then seeds {list(SEEDS)}. One torch thread (`torch.set_num_threads(1)`)
  on a shared 2-core CPU machine.
- Premise: hand features beat the single table by >= 0.05 val AUROC, and zero leaks: {'holds' if premise else 'fails'}.

## Results (AUROC, mean ± std over seeds)

| arm | chosen lr | val AUROC | test AUROC | seeds | budget (mean per seed) |
|---|---|---|---|---|---|
{chr(10).join(rows)}

Claims:
{chr(10).join(f"- {c}: {'holds' if h else 'fails' if h is not None else 'undecided'} ({w})" for c, h, w in claims)}

{reading}{spec3}
Tuning grid (seed 0, validation AUROC):

| run | val AUROC |
|---|---|
{grid}

![test AUROC per arm](relational_deep_learning.png)

## What this does not cover
- The verdict's RDL has 2 layers (movie, its ratings, their users): the spec's 3 layers with num_neighbors
  [32, 16, 8] looked too slow when the protocol was fixed (~0.75 CPU-s per training step against ~0.06 s for 2
  hops, measured on an idle core), so it was added later as the extra arm above. PyTorch Frame is not installed: columns are one-hot/standardised, not stype-encoded.
- Text columns (titles, zip codes) are dropped (no offline text embedder wired in).

Command: `{CMD}` (JSON: `relational_deep_learning.json`).
"""
    return page, res, verdict


def plot(data: dict, res: dict, path: Path) -> None:
    from lightning_ext.core.plotting import new_figure, save_figure

    fig, axes = new_figure(1, 2, figsize=(10, 3.8))
    ax = axes[0]
    for i, (name, r) in enumerate(res.items()):
        vals = [x.get("test", x.get("test_auroc")) for x in r["runs"]]
        if vals:
            ax.bar(i, np.mean(vals), yerr=np.std(vals), color=f"C{i}")
    ax.set_xticks(range(len(res)), ["single table\nHGB", "hand SQL\nfeatures HGB", "RDL\n2 layers",
                                    "RDL 1 layer\n(ablation)", "RDL 3 layers\n(spec)"], fontsize=7)
    ax.set_ylim(0.5, 1.0)
    ax.set_ylabel("test AUROC")
    ax = axes[1]
    for i, name in enumerate(("RDL 2 layers", "RDL 1 layer (ablation)", "RDL 3 layers (spec, beside the verdict)")):
        for j, x in enumerate(res[name]["runs"]):
            ax.plot(range(1, len(x["history"]) + 1), x["history"], color=f"C{i + 2}", alpha=0.8,
                    label=name if j == 0 else None)
    ax.set_xlabel("epoch")
    ax.set_ylabel("val AUROC")
    ax.legend(fontsize=7)
    save_figure(fig, path)


if __name__ == "__main__":
    page_main(JSON, "relational_deep_learning", P, CMD, main_runs, render, plot)
