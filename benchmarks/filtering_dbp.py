"""Benchmark: density-based pruning (Abbas et al., ICLR 2024) vs SemDeDup vs SSP prototypicality vs random at
30% kept, on Fashion-MNIST with planted redundancy.

Pool: 10,000 training images of which 3,000 are planted near-duplicates (300 images x 10 jittered copies),
5% corrupted (noise/blank, random label); condition "clean labels" keeps the labels, condition "30% flipped"
also flips 30% of the labels. Embeddings: PCA-32 of the pixels (label-free; the paper uses DINOv2).
Pruners at 30% kept: random; SSP-hard / SSP-easy (k=10); SemDeDup (k=50, top 30% by 1 - max similarity);
DBP (SemDeDup eps=0.01 first, k=50, tau in {0.1, 0.5}, hardest per cluster). The same small CNN is trained
on each subset (3 seeds) and tested on the official test split; "all data" is the reference. Also reported:
the share of planted duplicates and corrupted images in each subset, the correlation between a cluster's
DBP complexity and the share of it kept, and scoring cost in epochs of full-pool training.

    nice -n 5 .venv/bin/python benchmarks/filtering_dbp.py          # ~15 min on one thread
    .venv/bin/python benchmarks/filtering_dbp.py --quick            # smoke test (numbers meaningless)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import mean_std  # noqa: E402
from _filtering_data import PoolDataModule, cnn_model, environment, planted_pool  # noqa: E402

from lightning_ext.curation import (  # noqa: E402
    DensityBasedPruning, Embedder, RandomScorer, ScoringData, SelfSupervisedPrototypes, SemDeDup,
    compare_curations, results_table,
)

OUT = Path(__file__).resolve().parents[1] / "docs" / "results"


def curations(k: int):
    emb = Embedder(pca_components=32, progress=False)
    return {
        "all data": None,
        "random": RandomScorer(seed=0),
        "SSP hard": SelfSupervisedPrototypes(emb, num_clusters=10, which="hard"),
        "SSP easy": SelfSupervisedPrototypes(emb, num_clusters=10, which="easy"),
        "SemDeDup": SemDeDup(emb, num_clusters=k),
        "DBP tau=0.1": DensityBasedPruning(emb, num_clusters=k, temperature=0.1, dedup_eps=0.01),
        "DBP tau=0.5": DensityBasedPruning(emb, num_clusters=k, temperature=0.5, dedup_eps=0.01),
    }


def complexity_vs_share(pool, k: int, keep: float) -> dict:
    """DBP's own check: do complex (sparse, far-apart) clusters keep a larger share?"""
    s = DensityBasedPruning(Embedder(pca_components=32, progress=False), num_clusters=k, temperature=0.5, dedup_eps=0.01)
    data = ScoringData.from_tensors(pool.x, pool.y)
    scores = s.score(data)
    kept = s.select(scores, data, int(keep * len(data)))
    assign = scores["cluster"]
    sizes = np.bincount(assign[assign >= 0], minlength=k)
    share = np.bincount(assign[kept], minlength=k) / np.maximum(sizes, 1)
    dup_share = np.bincount(assign[(assign >= 0) & pool.duplicate], minlength=k) / np.maximum(sizes, 1)
    rho = float(np.corrcoef(np.argsort(np.argsort(scores["complexity"])), np.argsort(np.argsort(share)))[0, 1])
    return {"spearman_complexity_vs_kept_share": rho,
            "removed_by_dedup": int((assign < 0).sum()),
            "duplicates_removed_by_dedup": int(((assign < 0) & pool.duplicate).sum()),
            "kept_share_in_duplicate_heavy_clusters": float(share[dup_share > 0.5].mean()) if (dup_share > 0.5).any() else None,
            "kept_share_elsewhere": float(share[dup_share <= 0.5].mean())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--conditions", default="clean,flipped", help="comma list of: clean, flipped")
    args = ap.parse_args()
    torch.set_num_threads(1)
    n_pool, dup_sources, k = (1500, 45, 10) if args.quick else (10_000, 300, 50)
    seeds = (0,) if args.quick else tuple(range(args.seeds))
    epochs = 1 if args.quick else args.epochs
    keep = 0.3
    env, t0 = environment(), time.time()
    report = {"env": env, "config": {"n_pool": n_pool, "dup_sources": dup_sources, "dup_copies": 10, "corrupt": 0.05,
                                     "k": k, "keep": keep, "epochs": epochs, "seeds": seeds}, "conditions": {}}
    tables = {}
    wanted = args.conditions.split(",")
    for cond, flip in [c for c, key in ((("clean labels", 0.0), "clean"), (("30% flipped", 0.3), "flipped")) if key in wanted]:
        pool = planted_pool(n_pool=n_pool, flip=flip, corrupt=0.05, dup_sources=dup_sources, dup_copies=10, seed=0)
        print(f"== {cond}: duplicates {pool.duplicate.sum()}, corrupted {pool.corrupted.sum()}, flipped {pool.flipped.sum()}",
              flush=True)

        def on_result(r):
            print(f"  [{cond}] {r.curation} seed {r.seed}: test {r.metrics.get('test_acc', float('nan')):.4f} "
                  f"fit {r.fit_seconds:.1f}s score {r.score_seconds:.1f}s", flush=True)

        results = compare_curations(lambda: PoolDataModule(pool), cnn_model(), curations(k), keep=keep, seeds=seeds,
                                    trainer_kwargs={"max_epochs": epochs}, clean_mask=pool.clean,
                                    min_per_class=0 if args.quick else 1, on_result=on_result)
        epoch_s = np.mean([r.fit_seconds for r in results if r.curation == "all data"]) / epochs
        rows = {}
        for name in dict.fromkeys(r.curation for r in results):
            rs = [r for r in results if r.curation == name]
            kept = rs[0].kept
            rows[name] = {
                "test_acc": [r.metrics["test_acc"] for r in rs], "val_acc": [r.metrics["val_acc"] for r in rs],
                "duplicate_share": float(pool.duplicate[kept].mean()), "corrupted_share": float(pool.corrupted[kept].mean()),
                "flipped_share": float(pool.flipped[kept].mean()),
                "score_cost_epochs": float(np.mean([r.score_seconds for r in rs]) / epoch_s),
                "fit_seconds": [r.fit_seconds for r in rs]}
        report["conditions"][cond] = {"rows": rows, "epoch_seconds_full_pool": epoch_s,
                                      "dbp_check": complexity_vs_share(pool, k, keep)}
        tables[cond] = results_table(results)
        print(tables[cond], flush=True)
        report["loadavg_end"], report["total_seconds"] = os.getloadavg(), time.time() - t0
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / ("filtering_dbp_quick.json" if args.quick else "density_based_pruning.json")).write_text(
            json.dumps(report, indent=1, default=float))
    for cond, c in report["conditions"].items():
        print(cond, c["dbp_check"])
        for name, row in c["rows"].items():
            print(f"  {name:12s} test {mean_std([100 * a for a in row['test_acc']])}  dup {row['duplicate_share']:.3f} "
                  f"corrupt {row['corrupted_share']:.3f} flipped {row['flipped_share']:.3f} cost {row['score_cost_epochs']:.2f} ep")
    if not args.quick:
        plot(report, Path(args.out) / "density_based_pruning.png")
    print(f"done in {time.time() - t0:.0f} s")


def plot(report, path: Path) -> None:
    from lightning_ext.core.plotting import new_figure, save_figure

    conds = list(report["conditions"])
    fig, axes = new_figure(1, len(conds), figsize=(6 * len(conds), 3.8))
    for ax, cond in zip(np.atleast_1d(axes), conds):
        rows = report["conditions"][cond]["rows"]
        names = list(rows)
        means = [100 * np.mean(rows[n]["test_acc"]) for n in names]
        stds = [100 * np.std(rows[n]["test_acc"], ddof=1) if len(rows[n]["test_acc"]) > 1 else 0 for n in names]
        ax.bar(names, means, yerr=stds, color=["gray"] + ["tab:blue"] * (len(names) - 1))
        ax.set_ylim(min(means) - 4, max(means) + 2)
        ax.set_title(f"{cond}: 30% kept")
        ax.set_ylabel("test accuracy (%)")
        ax.tick_params(axis="x", rotation=30)
    save_figure(fig, path, dpi=120)


if __name__ == "__main__":
    main()
