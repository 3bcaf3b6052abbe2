"""NetInfoF (Probe and Act) on Cora and CiteSeer: does the Probe predict which information is usable, and does Act
beat a GCN link predictor?

Protocol (fixed before the runs; the page states it and every verdict rule):
- Link prediction: edges split 70/10/20 by ``RandomLinkSplit`` (split seed = run seed), validation/test negatives
  as many uniform non-edges, Hits@100, training edges only in every graph the models and the Probe see.
- Probe (before any training): the five NetInfoF_Scores (U, R, F, P, S) from the training graph and the
  validation edges. Act: all five components, λ1 x λ2 grid chosen on seed 0's validation Hits@100, one fresh model
  per grid point (the official code warm-starts across its grid); LBFGS lr 0.1, early stop on validation
  Hits@100. Single-component Acts (one per component, the chosen λ) give the "trained models' accuracy" the
  Probe should rank. GCN baseline: GAE (linear input + 2-layer GCN + dot product), Adam, lr tuned on seed 0.
- Node classification (the paper's Probe; no official code): the five node scores (k-means clusters of each
  embedding, labels of the validation nodes, public split) against the test accuracy of a logistic regression
  trained on that embedding's training nodes.
- Premise (positive control): every graph's best link Probe score is above 0.5 (better than chance on balanced
  validation edges) and Act's validation Hits@100 is far above a random ranking's (0.19 on average).
- Claim 1: Act mean test Hits@100 >= GCN's + 5 points on both graphs, and >= 70 on Cora (paper: 81.3 vs 67.1).
- Claim 2 (link): Spearman(Probe score, single-component Act test Hits@100) >= 0.6 on each graph (seed means).
- Claim 3 (node): Spearman(node Probe score, single-component test accuracy) >= 0.6 on each graph.
- A run whose best epoch is its last makes its claim inconclusive.
- Scaled down for 2 shared cores (1 thread): 3 seeds (paper 5), a 2 x 2 λ grid (paper 2 x 4), at most
  ``MAX_EPOCHS`` LBFGS epochs (paper 100).

Run::

    nice -n 10 .venv/bin/python benchmarks/net_info_f.py
    .venv/bin/python benchmarks/net_info_f.py --render-only
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from lightning.pytorch import seed_everything

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))
OUT = REPO / "docs" / "results"
JSON = OUT / "net_info_f.json"
warnings.filterwarnings("ignore")

from _common import combine_claims, fit_early_stopping, mean_std, test_metrics  # noqa: E402

ROOT = str(REPO.parent / "shared" / "data" / "planetoid")
GRAPHS, SEEDS, DIM, MAX_EPOCHS, PATIENCE = ["Cora", "CiteSeer"], [0, 1, 2], 128, 25, 4
LAMBDAS = [{"lambda1": l1, "lambda2": l2} for l1 in (1e-4, 1e-5) for l2 in (1e-4, 1e-6)]
GCN_GRID = [{"lr": 0.01}, {"lr": 0.005}]
GCN_EPOCHS, GCN_PATIENCE = 60, 8
PAPER = {"Cora": {"GCN": 67.1, "NetInfoF": 81.3}, "CiteSeer": {"GCN": 60.4, "NetInfoF": 87.3}}
COMPONENTS = ["U", "R", "F", "P", "S"]
NOTE = ("Rerun after PyG's negative sampling was seeded (commit 7aa2d58: validation/test negatives drawn from a "
        "seeded `random`, training negatives seeded per (seed, epoch, edge id)), so these numbers are reproducible. "
        "The first run (commit 268034e, unseeded negatives, same protocol) gave test Hits@100 Act 78.8 ± 2.1 / "
        "88.8 ± 1.6 vs GCN 64.5 ± 4.6 / 58.5 ± 7.1 (Cora / CiteSeer), link-Probe Spearman 1.00 / 1.00, node-Probe "
        "Spearman 1.00 / 0.90, and the verdict reproduced.")


def datamodule(name: str, seed: int, batch_size: int):
    from lightning_ext.graph.link_prediction import LinkPredictionDataModule

    dm = LinkPredictionDataModule(root=ROOT, name=name, val_fraction=0.1, test_fraction=0.2, split_seed=seed,
                                  seed=seed, batch_size=batch_size)
    dm.setup()
    return dm


def embeddings(dm, seed: int):
    from lightning_ext.graph.net_info_f import compatibility_matrix, derived_embeddings

    ei = dm.splits["train"]["edge_index"]
    zs = derived_embeddings(ei, dm.graph.x, DIM, seed=seed)
    return zs, {c: z @ compatibility_matrix(z, ei, seed=seed) for c, z in zs.items()}


def fit_act(dm, zs, xcs, comps, lam, seed):
    from lightning_ext.graph.net_info_f_act import NetInfoFLinkPredictor

    seed_everything(seed)
    model = NetInfoFLinkPredictor(num_features=dm.num_features, dim=DIM, components=comps, seed=seed, **lam)
    model.set_embeddings(zs, xcs)
    rec = fit_early_stopping(model, dm, MAX_EPOCHS, [], f"Act{''.join(comps)} {lam}", patience=PATIENCE,
                             monitor="val_hits@100")
    rec.update(test=test_metrics(model, dm)["test_hits@100"], lam=lam)
    return rec


def fit_gcn(dm, cfg, seed):
    from lightning_ext.graph.gae import GAELinkPredictor

    seed_everything(seed)
    model = GAELinkPredictor(num_features=dm.num_features, hidden=DIM, num_layers=2, **cfg)
    rec = fit_early_stopping(model, dm, GCN_EPOCHS, [], f"GCN {cfg}", patience=GCN_PATIENCE, monitor="val_hits@100")
    rec.update(test=test_metrics(model, dm)["test_hits@100"], cfg=cfg)
    return rec


def node_part(name: str, seed: int = 0) -> dict:
    from sklearn.linear_model import LogisticRegression

    from lightning_ext.graph.net_info_f import derived_embeddings, node_netinfo_score
    from lightning_ext.graph.planetoid import PlanetoidDataModule
    from torch_geometric.utils import remove_self_loops, to_undirected

    dm = PlanetoidDataModule(root=ROOT, name=name)
    dm.setup()
    g = dm.graph
    ei = to_undirected(remove_self_loops(g.edge_index)[0], num_nodes=g.num_nodes)
    zs = derived_embeddings(ei, g.x, DIM, seed=seed)
    out = {}
    for c, z in zs.items():
        score = node_netinfo_score(z, g.y, g.val_mask, seed=seed)
        best_val, best_acc = -1.0, 0.0
        for cval in (0.1, 1.0, 10.0):  # C tuned on the validation nodes
            clf = LogisticRegression(C=cval, max_iter=2000).fit(z[g.train_mask].numpy(), g.y[g.train_mask].numpy())
            val = clf.score(z[g.val_mask].numpy(), g.y[g.val_mask].numpy())
            if val > best_val:
                best_val, best_acc = val, clf.score(z[g.test_mask].numpy(), g.y[g.test_mask].numpy())
        out[c] = {"score": score, "test_acc": best_acc}
    return out


def run_all() -> dict:
    from lightning_ext.graph.net_info_f import link_netinfo_score

    torch.set_num_threads(1)
    start = time.process_time()
    res = {"config": {"graphs": GRAPHS, "seeds": SEEDS, "dim": DIM, "max_epochs": MAX_EPOCHS, "patience": PATIENCE,
                      "lambdas": LAMBDAS, "gcn_grid": GCN_GRID, "gcn_epochs": GCN_EPOCHS, "threads": 1,
                      "note": NOTE},
           "graphs": {}}
    for name in GRAPHS:
        r = {"probe": {}, "act": [], "single": {c: [] for c in COMPONENTS}, "gcn": [], "tuning": {}}
        lam, gcn_cfg = None, None
        for seed in SEEDS:
            dm = datamodule(name, seed, batch_size=1_000_000)
            zs, xcs = embeddings(dm, seed)
            val = dm.splits["val"]
            r["probe"][str(seed)] = {c: link_netinfo_score(zs[c], xcs[c], dm.splits["train"]["edge_index"],
                                                           val["pos"], val["neg"], seed=seed) for c in COMPONENTS}
            if lam is None:
                trials = [fit_act(dm, zs, xcs, COMPONENTS, grid, seed) for grid in LAMBDAS]
                best = max(range(len(trials)), key=lambda i: trials[i]["best_val"])
                lam = LAMBDAS[best]
                r["tuning"]["act"] = [{"lam": t["lam"], "best_val": t["best_val"]} for t in trials]
                r["act"].append(trials[best])
            else:
                r["act"].append(fit_act(dm, zs, xcs, COMPONENTS, lam, seed))
            for c in COMPONENTS:
                r["single"][c].append(fit_act(dm, zs, xcs, [c], lam, seed))
            dm_gcn = datamodule(name, seed, batch_size=1152)
            if gcn_cfg is None:
                trials = [fit_gcn(dm_gcn, cfg, seed) for cfg in GCN_GRID]
                best = max(range(len(trials)), key=lambda i: trials[i]["best_val"])
                gcn_cfg = GCN_GRID[best]
                r["tuning"]["gcn"] = [{"cfg": t["cfg"], "best_val": t["best_val"]} for t in trials]
                r["gcn"].append(trials[best])
            else:
                r["gcn"].append(fit_gcn(dm_gcn, gcn_cfg, seed))
            print(name, seed, "done", time.process_time() - start, flush=True)
        r["node"] = node_part(name)
        res["graphs"][name] = r
        JSON.write_text(json.dumps(res, indent=1))
    res["cpu_s"] = time.process_time() - start
    return res


def spearman(a, b) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def _summary(r):
    probe = {c: statistics.mean(r["probe"][s][c] for s in r["probe"]) for c in COMPONENTS}
    single = {c: statistics.mean(100 * x["test"] for x in r["single"][c]) for c in COMPONENTS}
    return probe, single


def verdict(res):
    c1, c2, c3, premise, converged = [], [], [], [], []
    for name, r in res["graphs"].items():
        act = [100 * x["test"] for x in r["act"]]
        gcn = [100 * x["test"] for x in r["gcn"]]
        probe, single = _summary(r)
        premise.append(max(probe.values()) > 0.5 and min(x["best_val"] for x in r["act"]) > 0.5)
        converged += [x["converged"] for x in r["act"] + r["gcn"] + [y for v in r["single"].values() for y in v]]
        c1.append(statistics.mean(act) >= statistics.mean(gcn) + 5 and (name != "Cora" or statistics.mean(act) >= 70))
        c2.append(spearman([probe[c] for c in COMPONENTS], [single[c] for c in COMPONENTS]) >= 0.6)
        c3.append(spearman([r["node"][c]["score"] for c in COMPONENTS],
                           [r["node"][c]["test_acc"] for c in COMPONENTS]) >= 0.6)
    claims = {"premise": all(premise), "all_converged": all(converged), "act_beats_gcn": all(c1),
              "link_probe_ranks_single_acts": all(c2), "node_probe_ranks_linear_accuracy": all(c3)}
    if not all(premise):
        return "not testable here", claims
    # claim 3 uses closed-form fits (no epochs): it stays testable when an LBFGS run hit its budget
    link = [all(c1), all(c2)] if all(converged) else [None, None]
    return combine_claims([*link, all(c3)]), claims


def plot(res) -> None:
    from lightning_ext.core.plotting import new_figure, save_figure

    fig, axes = new_figure(1, 2, figsize=(9, 3.6))
    for name, r in res["graphs"].items():
        probe, single = _summary(r)
        axes[0].scatter([probe[c] for c in COMPONENTS], [single[c] / 100 for c in COMPONENTS], label=name)
        for c in COMPONENTS:
            axes[0].annotate(c, (probe[c], single[c] / 100))
        axes[1].scatter([r["node"][c]["score"] for c in COMPONENTS], [r["node"][c]["test_acc"] for c in COMPONENTS],
                        label=name)
        for c in COMPONENTS:
            axes[1].annotate(c, (r["node"][c]["score"], r["node"][c]["test_acc"]))
    axes[0].plot([0.5, 1], [0, 1], "k--", lw=0.8, label="y = 2x - 1")
    axes[1].plot([0, 1], [0, 1], "k--", lw=0.8, label="y = x")
    axes[0].set(xlabel="link Probe score", ylabel="single-component Act test Hits@100", title="link prediction")
    axes[1].set(xlabel="node Probe score", ylabel="single-component test accuracy", title="node classification")
    for ax in axes:
        ax.legend(fontsize=7)
    save_figure(fig, OUT / "net_info_f.png")


def render(res) -> None:
    v, claims = verdict(res)
    rows, corr = [], []
    for name, r in res["graphs"].items():
        act = [100 * x["test"] for x in r["act"]]
        gcn = [100 * x["test"] for x in r["gcn"]]
        ep = [x["best_epoch"] + 1 for x in r["act"] + r["gcn"]]
        rows.append(f"| {name} | {mean_std(act, 1)} | {mean_std(gcn, 1)} | {PAPER[name]['NetInfoF']} | "
                    f"{PAPER[name]['GCN']} | {min(ep)}-{max(ep)} |")
        probe, single = _summary(r)
        corr.append(f"| {name} | link | " + " | ".join(f"{probe[c]:.3f} / {single[c]:.1f}" for c in COMPONENTS)
                    + f" | {spearman([probe[c] for c in COMPONENTS], [single[c] for c in COMPONENTS]):.2f} |")
        nd = r["node"]
        corr.append(f"| {name} | node | " + " | ".join(f"{nd[c]['score']:.3f} / {100 * nd[c]['test_acc']:.1f}"
                                                        for c in COMPONENTS)
                    + f" | {spearman([nd[c]['score'] for c in COMPONENTS], [nd[c]['test_acc'] for c in COMPONENTS]):.2f} |")
    tuning = "; ".join(f"{n}: Act " + ", ".join(f"{t['lam']} -> {100 * t['best_val']:.1f}" for t in r["tuning"]["act"])
                       + "; GCN " + ", ".join(f"{t['cfg']} -> {100 * t['best_val']:.1f}" for t in r["tuning"]["gcn"])
                       for n, r in res["graphs"].items())
    cfg = res["config"]
    page = f"""# NetInfoF: measuring (Probe) and exploiting (Act) network usable information

`NetInfoFProbe` and `NetInfoFLinkPredictor` (`lightning_ext.graph`; Lee, Yu, Zhang, Ioannidis, Song, Adeshina,
Zheng and Faloutsos, "NetInfoF Framework: Measuring and Exploiting Network Usable Information", ICLR 2024, arXiv
2402.07999; official code https://github.com/amazon-science/Network-Usable-Info-Framework) on
`LinkPredictionDataModule` and `PlanetoidDataModule`, against `GAELinkPredictor` (GCN + dot product). The
compatibility matrix, the score and Act's logits are tested against explicit implementations in
`tests/test_graph_link_prediction.py`.

Command (CPU, `torch.set_num_threads(1)`, a 2-core machine shared with other jobs; {res.get('cpu_s', 0) / 60:.1f}
CPU-minutes):

```bash
nice -n 10 .venv/bin/python benchmarks/net_info_f.py
```

## Verdict: **{v}**

Claims: {", ".join(f"{k} = {val}" for k, val in claims.items())}.

![NetInfoF results](net_info_f.png)

Link prediction, test Hits@100 (mean ± std over seeds {cfg['seeds']}, each seed its own 70/10/20 split):

| graph | NetInfoF_Act | GCN (GAE) | paper Act | paper GCN | best epochs |
|---|---|---|---|---|---|
{chr(10).join(rows)}

Probe score / trained accuracy per component (link: seed-mean Probe score / single-component Act test Hits@100;
node: Probe score / logistic-regression test accuracy on the public split), and their Spearman correlation:

| graph | task | U | R | F | P | S | Spearman |
|---|---|---|---|---|---|---|---|
{chr(10).join(corr)}

Tuning (seed 0, validation Hits@100): {tuning}.

Reading: each Spearman correlation is over 5 components (one point per embedding), so it is coarse: ρ = 1 has a
one-sided p of about 0.01 and ρ = 0.9 about 0.04 under independence. Act's LBFGS runs peak within a few epochs (the
problem is a convex logistic regression on fixed features); the GCN runs peak much later.
{chr(10) + "Note: " + cfg["note"] + chr(10) if cfg.get("note") else ""}
## Protocol

Claims under test (the paper): Act wins link prediction against GCN (Cora 81.3 vs 67.1, CiteSeer 87.3 vs 60.4);
the Probe's NetInfoF_Score, computed before training, tracks the accuracy trained models reach (Figure 2: link
scores against Hits@K near y = 2x − 1, node scores against accuracy near y = x).

- Link: edges split 70/10/20 by `RandomLinkSplit` (split seed = run seed), validation and test negatives as many
  uniform non-edges, Hits@100; the five embeddings (d = {cfg['dim']}), compatibility matrices and Probe scores come
  from the training edges only. Act: all five components, λ1 ∈ {{1e-4, 1e-5}} x λ2 ∈ {{1e-4, 1e-6}} chosen on seed 0's
  validation Hits@100 with a fresh model per grid point (fixing the official warm-start trap), LBFGS lr 0.1
  (20 iterations per step, one step per epoch over every training edge and fresh uniform negatives), at most
  {cfg['max_epochs']} epochs, early stop after {cfg['patience']} without a new best. Single-component Acts use the chosen λ.
  GCN: linear input + 2-layer GCN (hidden {cfg['dim']}) + dot product, Adam lr ∈ {{0.01, 0.005}} chosen on seed 0,
  batch 1152, at most {cfg['gcn_epochs']} epochs, early stop after 8. Best weights tested once.
- Node: public split; the node Probe clusters each embedding (k-means, 16 clusters) and scores
  2^(−H(class | cluster)) on the 500 validation nodes; the "trained model" is a logistic regression on that embedding
  (C ∈ {{0.1, 1, 10}} chosen on validation nodes), test accuracy on the 1,000 test nodes. Not in the official code
  (the paper's node Probe details are unverified); one seed.
- Rules: premise = best link Probe score > 0.5 and Act validation Hits@100 > 50% on every graph; claim 1 = Act
  mean >= GCN mean + 5 points on both graphs and >= 70 on Cora; claim 2 = Spearman >= 0.6 between link Probe
  scores and single-component Act Hits@100 on each graph; claim 3 = the same for the node Probe and linear
  accuracy; a budget-bound run makes claims 1-2 inconclusive.
- Scaled down: 3 seeds (paper 5), a 2 x 2 λ grid (paper 2 x 4), at most {cfg['max_epochs']} LBFGS epochs (paper 100).
"""
    (OUT / "net_info_f.md").write_text(page)
    plot(res)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--render-only", action="store_true")
    args = ap.parse_args()
    res = json.loads(JSON.read_text()) if args.render_only else run_all()
    if not args.render_only:
        JSON.write_text(json.dumps(res, indent=1))
    render(res)
    print(verdict(res))
