"""NCN and NCNC against GAE on Cora link prediction, full graph and with half the training edges dropped.

Protocol (fixed before the runs; the page states it and every verdict rule):
- Cora, edges split 85/5/10 by ``RandomLinkSplit`` (``split_seed`` = run seed), Hits@100 of the positives against
  as many uniform non-edges (NCN's Planetoid protocol). The message-passing graph holds training edges only; the
  "dropped" setting removes 50% of them from the input graph (targets unchanged), the spec's completion test.
- Each model tunes its learning rate on seed 0 / full graph over {official Cora default, 0.01} by validation
  Hits@100 (GAE: 2-layer GCN + dot product, official-default row lr 0.01 and 0.0043); the chosen configuration runs
  seeds 0-2 in both settings. Early stopping on validation Hits@100 (patience ``PATIENCE`` epochs), best weights
  tested once. A run whose best epoch is its last makes its claim inconclusive.
- Premise (positive control): the common-neighbour count heuristic beats random ranking on test Hits@100 (CN
  structure is predictive here), and dropping edges lowers it (the setting does remove common neighbours).
- Claim 1 (NCN >> GAE): full-graph NCN mean test Hits@100 >= GAE's + 5 points.
- Claim 2 (NCNC >= NCN, more so with edges dropped): NCNC mean >= NCN mean on the dropped graph, and on the full
  graph NCNC is not below NCN by more than the larger seed std.
- Scaled down for 2 shared cores (1 thread): hidden 64 (official 256), at most ``MAX_EPOCHS`` epochs (official 100).

Run::

    nice -n 10 .venv/bin/python benchmarks/ncn.py            # runs everything, writes JSON, renders the page
    nice -n 10 .venv/bin/python benchmarks/ncn.py --reuse OLD.json   # keeps the runs a larger cap cannot change
    .venv/bin/python benchmarks/ncn.py --render-only
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

import torch
from lightning.pytorch import seed_everything

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))
OUT = REPO / "docs" / "results"
JSON = OUT / "ncn.json"
warnings.filterwarnings("ignore")

from _common import combine_claims, fit_early_stopping, mean_std, test_metrics  # noqa: E402

ROOT = str(REPO.parent / "shared" / "data" / "planetoid")
SEEDS, HIDDEN, MAX_EPOCHS, PATIENCE, DROP = [0, 1, 2], 64, 60, 8, 0.5
REUSED_FROM = "docs/results/ncn.json as commit 6eaf7ec left it"
NOTE = ("Two earlier runs of this protocol at 40 epochs: commit 2e10542 (PyG's val/test negatives not yet seeded, "
        "not reproducible) gave test Hits@100 GAE 81.8 ± 2.3 / 77.6 ± 4.2, NCN 89.4 ± 3.0 / 87.3 ± 4.3, NCNC "
        "86.7 ± 8.6 / 90.0 ± 2.1 (full / dropped) and the verdict reproduced; the seeded rerun (commit 7b92040 code) "
        "gave GAE 80.1 ± 5.9 / 78.4 ± 5.7, NCN 89.6 ± 3.8 / 89.5 ± 0.3, NCNC 86.0 ± 8.1 / 78.8 ± 16.9 and the "
        "verdict inconclusive, because one GAE run (dropped, seed 2) peaked at epoch 40 of 40. This run raises the "
        "cap to 60 epochs (official 100) for every model, nothing else changed. The runs together show NCNC's "
        "ranking against NCN turns on single collapsed NCNC runs.")
PAPER = {"GAE (GCN)": 66.79, "NCN": 89.05, "NCNC": 89.65}  # Cora HR@100 (NCN paper's table; NCN row Unverified)
GRIDS = {
    "GAE": [{"lr": 0.01}, {"lr": 0.0043}],
    "NCN": [{"lr": 0.0043, "predictor_lr": 0.0024}, {"lr": 0.01, "predictor_lr": 0.01}],
    "NCNC": [{"lr": 0.0043, "predictor_lr": 0.0024}, {"lr": 0.01, "predictor_lr": 0.01}],
}


def build(name: str, cfg: dict):
    from lightning_ext.graph.gae import GAELinkPredictor
    from lightning_ext.graph.ncn import NCN
    from lightning_ext.graph.ncnc import NCNC

    if name == "GAE":
        return GAELinkPredictor(hidden=HIDDEN, num_layers=2, encoder="gcn", decoder="dot", **cfg)
    return {"NCN": NCN, "NCNC": NCNC}[name](hidden=HIDDEN, **cfg)


def datamodule(seed: int, drop: float):
    from lightning_ext.graph.link_prediction import LinkPredictionDataModule

    dm = LinkPredictionDataModule(root=ROOT, name="Cora", val_fraction=0.05, test_fraction=0.1, split_seed=seed,
                                  input_edge_drop=drop, seed=seed)
    dm.setup()
    return dm


def cn_heuristic(dm) -> float:
    """Test Hits@100 of the common-neighbour count (ties broken by a tiny seeded jitter)."""
    from lightning_ext.graph.gae import adjacency
    from lightning_ext.graph.link_prediction import HitsAtK
    from lightning_ext.graph.ncn import common_neighbors

    s = dm.splits["test"]
    adj = adjacency(s["edge_index"], dm.graph.num_nodes)
    scores = []
    for edges in (s["pos"], s["neg"]):
        t, _ = common_neighbors(adj, edges)
        scores.append(torch.bincount(t, minlength=edges.size(1)).float())
    g = torch.Generator().manual_seed(0)
    m = HitsAtK(100)
    m.update(scores[0] + 1e-3 * torch.rand(scores[0].shape, generator=g),
             scores[1] + 1e-3 * torch.rand(scores[1].shape, generator=g))
    return float(m.compute())


def run_one(name: str, cfg: dict, seed: int, drop: float) -> dict:
    seed_everything(seed, workers=True)
    dm = datamodule(seed, drop)
    model = build(name, cfg)
    rec = fit_early_stopping(model, dm, MAX_EPOCHS, [], f"{name} s{seed} drop{drop}", patience=PATIENCE,
                             monitor="val_hits@100")
    test = test_metrics(model, dm)
    rec.update({"test_hits@100": test["test_hits@100"], "test_mrr": test["test_mrr"], "cfg": cfg, "seed": seed,
                "drop": drop})
    return rec


def _key(name: str, cfg: dict, seed: int, drop: float) -> str:
    return json.dumps([name, cfg, seed, drop], sort_keys=True)


def reusable_runs(path: str) -> tuple[dict, dict]:
    """The runs of an earlier JSON of this protocol at a smaller epoch cap that stopped early (their best epoch
    plus ``PATIENCE`` came before that cap), so a larger cap cannot change them (every run is seeded and
    deterministic; :func:`run_all` checks one again). Returns (key -> record, the earlier config)."""
    prev = json.loads(Path(path).read_text())
    cfg = prev["config"]
    same = {k: cfg[k] for k in ("seeds", "hidden", "patience", "drop", "grids")}
    want = {"seeds": SEEDS, "hidden": HIDDEN, "patience": PATIENCE, "drop": DROP, "grids": GRIDS}
    if same != want or cfg["max_epochs"] > MAX_EPOCHS:
        raise SystemExit(f"--reuse {path}: not this protocol at a smaller epoch cap ({same} vs {want})")
    out = {}
    for name, settings in prev["runs"].items():
        for rs in settings.values():
            for r in rs:
                if r["epochs"] < cfg["max_epochs"]:
                    out[_key(name, r["cfg"], r["seed"], r["drop"])] = r
    return out, cfg


def run_all(reuse: Optional[str] = None) -> dict:
    torch.set_num_threads(1)
    res = {"config": {"seeds": SEEDS, "hidden": HIDDEN, "max_epochs": MAX_EPOCHS, "patience": PATIENCE,
                      "drop": DROP, "grids": GRIDS, "threads": 1, "note": NOTE}, "premise": {}, "tuning": {}, "runs": {}}
    start = time.process_time()
    old, old_cfg = reusable_runs(reuse) if reuse else ({}, None)
    if old:
        # determinism check: the cheapest reusable run, run again, must give the same numbers
        key = min(old, key=lambda k: old[k]["cpu_s"])
        name, cfg, seed, drop = json.loads(key)
        again = run_one(name, cfg, seed, drop)
        same = all(again[k] == old[key][k] for k in ("epochs", "best_epoch", "best_val", "test_hits@100", "test_mrr"))
        res["reuse"] = {"from": reuse, "from_max_epochs": old_cfg["max_epochs"], "checked": [name, cfg, seed, drop],
                        "check_equal": same, "reused": []}
        if not same:
            raise SystemExit(f"determinism check failed for {key}: rerun everything without --reuse")

    def run(name, cfg, seed, drop):
        key = _key(name, cfg, seed, drop)
        if key in old:
            res["reuse"]["reused"].append(json.loads(key))
            return dict(old[key], reused=True)
        return run_one(name, cfg, seed, drop)

    for seed in SEEDS:
        res["premise"][str(seed)] = {"cn_full": cn_heuristic(datamodule(seed, 0.0)),
                                     "cn_dropped": cn_heuristic(datamodule(seed, DROP))}
    for name, grid in GRIDS.items():
        trials = [run(name, cfg, 0, 0.0) for cfg in grid]
        best = max(range(len(grid)), key=lambda i: trials[i]["best_val"])
        res["tuning"][name] = [{"cfg": t["cfg"], "best_val": t["best_val"]} for t in trials]
        runs = {"full": [trials[best]], "dropped": []}
        for seed in SEEDS:
            if seed != 0:
                runs["full"].append(run(name, grid[best], seed, 0.0))
            runs["dropped"].append(run(name, grid[best], seed, DROP))
        res["runs"][name] = runs
        JSON.write_text(json.dumps(res, indent=1))
        print(name, "done", time.process_time() - start, flush=True)
    res["cpu_s"] = time.process_time() - start
    return res


def _vals(res, name, setting, key="test_hits@100"):
    return [100 * r[key] for r in res["runs"][name][setting]]


def verdict(res) -> tuple[str, dict]:
    prem = res["premise"].values()
    premise = all(p["cn_full"] > 0.2 for p in prem) and \
        statistics.mean(p["cn_dropped"] for p in prem) < statistics.mean(p["cn_full"] for p in prem)
    converged = all(r["converged"] for n in res["runs"].values() for s in n.values() for r in s)
    mean = lambda xs: statistics.mean(xs)  # noqa: E731
    std = lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0  # noqa: E731
    c1 = mean(_vals(res, "NCN", "full")) >= mean(_vals(res, "GAE", "full")) + 5
    ncn_f, ncnc_f = _vals(res, "NCN", "full"), _vals(res, "NCNC", "full")
    c2 = mean(_vals(res, "NCNC", "dropped")) >= mean(_vals(res, "NCN", "dropped")) and \
        mean(ncnc_f) >= mean(ncn_f) - max(std(ncn_f), std(ncnc_f))
    claims = {"premise": premise, "all_converged": converged, "ncn_beats_gae": c1, "ncnc_geq_ncn": c2}
    if not premise:
        return "not testable here", claims
    if not converged:
        return "inconclusive", claims
    return combine_claims([c1, c2]), claims


def plot(res) -> None:
    from lightning_ext.core.plotting import new_figure, save_figure

    fig, ax = new_figure(figsize=(6, 3.5))
    names, settings = list(res["runs"]), ["full", "dropped"]
    for k, setting in enumerate(settings):
        means = [statistics.mean(_vals(res, n, setting)) for n in names]
        stds = [statistics.stdev(_vals(res, n, setting)) for n in names]
        ax.bar([i + 0.38 * k for i in range(len(names))], means, 0.38, yerr=stds,
               label="full graph" if setting == "full" else f"{int(DROP * 100)}% train edges dropped")
    ax.set_xticks([i + 0.19 for i in range(len(names))], names)
    ax.set_ylabel("Cora test Hits@100 (%)")
    ax.set_ylim(50, 100)
    ax.legend(loc="lower right", fontsize=8)
    save_figure(fig, OUT / "ncn.png")


def render(res) -> None:
    v, claims = verdict(res)
    ru = res.get("reuse")
    rows = []
    for name in res["runs"]:
        cells = [mean_std(_vals(res, name, s), 1) for s in ("full", "dropped")]
        mrr = mean_std(_vals(res, name, "full", "test_mrr"), 1)
        ep = [r["best_epoch"] + 1 for s in res["runs"][name].values() for r in s]
        paper = {"GAE": PAPER["GAE (GCN)"]}.get(name, PAPER.get(name))
        rows.append(f"| {name} | {cells[0]} | {cells[1]} | {mrr} | {min(ep)}-{max(ep)} | {paper} |")
    seeds = res["config"]["seeds"]
    per_seed = []
    for setting in ("full", "dropped"):
        for name in res["runs"]:
            vals = _vals(res, name, setting)
            eps = [r["best_epoch"] + 1 for r in res["runs"][name][setting]]
            per_seed.append(f"| {setting} | {name} | " + " | ".join(f"{v:.1f} (best epoch {e})" for v, e in zip(vals, eps))
                            + " |")
    gap = [a - b for a, b in zip(_vals(res, "NCN", "full"), _vals(res, "GAE", "full"))]
    comp = [a - b for a, b in zip(_vals(res, "NCNC", "dropped"), _vals(res, "NCN", "dropped"))]
    notes = (f"Paired by seed (same split): NCN - GAE on the full graph = {', '.join(f'{g:+.1f}' for g in gap)} points; "
             f"NCNC - NCN with edges dropped = {', '.join(f'{c:+.1f}' for c in comp)} points "
             f"(NCNC ahead in {sum(c > 0 for c in comp)} of {len(comp)} seeds).")
    prem = res["premise"].values()
    fits = [r for n in res["runs"].values() for rs in n.values() for r in rs]
    budget = (f"a run spent {min(r['epochs'] for r in fits)}-{max(r['epochs'] for r in fits)} epochs, "
              f"{min(r['steps'] for r in fits):,}-{max(r['steps'] for r in fits):,} optimizer steps and "
              f"{min(r['samples'] for r in fits):,}-{max(r['samples'] for r in fits):,} training edges seen")
    reuse_line = "" if not ru else (
        f"\nReuse: {len(ru['reused'])} of {len(fits) + sum(len(g) - 1 for g in res['config']['grids'].values())} "
        f"fits (tuning trials included) stopped early before the earlier run's {ru['from_max_epochs']}-epoch cap "
        f"and are taken from it ({REUSED_FROM}): a larger cap cannot change a run that stopped by patience, and every run is seeded "
        f"(rerunning {ru['checked'][0]} {ru['checked'][1]} seed {ru['checked'][2]} drop {ru['checked'][3]} gave "
        f"{'the same' if ru['check_equal'] else 'DIFFERENT'} epochs, validation and test numbers). The fits that "
        f"reached that cap, and the tuning trials it did not store, ran again at {res['config']['max_epochs']}.\n")
    tuning = "; ".join(f"{n}: " + ", ".join(f"{t['cfg']} -> {100 * t['best_val']:.1f}" for t in ts)
                       for n, ts in res["tuning"].items())
    page = f"""# NCN / NCNC: neural common neighbours for link prediction (Cora)

`NCN`, `NCNC` and the `GAELinkPredictor` baseline (`lightning_ext.graph`; Wang, Yang and Zhang, "Neural Common
Neighbor with Completion for Link Prediction", ICLR 2024, arXiv 2302.00890; official code
https://github.com/GraphPKU/NeuralCommonNeighbor) on `LinkPredictionDataModule` (PyG `RandomLinkSplit`). The
predictors and the completion weights are tested against loops written from the equations in
`tests/test_graph_link_prediction.py`.

Command (CPU, `torch.set_num_threads(1)`, a 2-core machine shared with other jobs; {res.get("cpu_s", 0) / 60:.1f}{" (this invocation)" if ru else ""}
CPU-minutes):

```bash
nice -n 10 .venv/bin/python benchmarks/ncn.py{f" --reuse {ru['from']}" if ru else ""}
```

## Verdict: **{v}**

Claims: {", ".join(f"{k} = {val}" for k, val in claims.items())}.

![NCN results](ncn.png)

| model | test Hits@100, full graph | test Hits@100, {int(DROP * 100)}% train edges dropped | test MRR, full | best epochs | paper (Cora HR@100) |
|---|---|---|---|---|---|
{chr(10).join(rows)}

Mean ± std over seeds {res['config']['seeds']} (each seed its own edge split). Premise (positive control):
common-neighbour-count heuristic test Hits@100, full graph {mean_std([100 * p['cn_full'] for p in prem], 1)}, with
edges dropped {mean_std([100 * p['cn_dropped'] for p in prem], 1)}.

Tuning (seed 0, full graph, validation Hits@100): {tuning}.

Config: hidden {res['config']['hidden']}, at most {res['config']['max_epochs']} epochs, early stop after
{res['config']['patience']} epochs without a better validation Hits@100, best epoch's weights tested once; {budget}.
{chr(10) + "Note: " + res["config"]["note"] + chr(10) if res["config"].get("note") else ""}{reuse_line}
Per seed (test Hits@100):

| setting | model | {' | '.join(f'seed {s}' for s in seeds)} |
|---|---|{'---|' * len(seeds)}
{chr(10).join(per_seed)}

{notes}

Reading (this run): NCN beats the tuned GAE on every seed of the full graph (paired, same split) and its level
matches the paper's (about 89). At 60 epochs GAE's tuning picked lr 0.0043 (validation 92.4 vs 92.0 for 0.01), and
GAE seed 1 stopped early at a poor model (best epoch 10), so GAE's mean lands near the paper's GCN row while its
other seeds reach about 80 (the 40-epoch run's GAE, at lr 0.01, averaged about 80). NCNC's two grid points tied on
validation (97.3) and the first, the official default, was kept. NCNC is unstable at this scale: in several runs its
validation Hits@100 peaks within the first 10 epochs and early stopping keeps a poor model (best epochs in the
table), so with edges dropped it trails NCN in every seed; completion helping "more with edges dropped" (claim 2)
fails here. Both decided claims rest on 3 seeds; every fit's best epoch came before its last.
"""
    (OUT / "ncn.md").write_text(page)
    plot(res)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--render-only", action="store_true")
    ap.add_argument("--reuse", help="an earlier JSON of this protocol at a smaller epoch cap: its runs that stopped "
                                    "early are kept (a larger cap cannot change them), the others run again")
    args = ap.parse_args()
    res = json.loads(JSON.read_text()) if args.render_only else run_all(args.reuse)
    if not args.render_only:
        JSON.write_text(json.dumps(res, indent=1))
    render(res)
    print(verdict(res))
