"""Benchmark: Data Filtering Networks (Fang et al., ICLR 2024) on Fashion-MNIST with planted faults.

Pool: 10,000 training images, 30% of labels flipped to a random other class, 5% of images corrupted (noise or
blank, random label). Truth "clean" = label right and image intact. Filters at 50% kept:
- DFN: FilterNetwork (small CNN image tower + one learned caption embedding per class, InfoNCE) trained on a
  TRUSTED set of 500 clean images held out of the pool; score = cosine(image, own label's caption);
- DFN-noisy: the same filter trained on 500 random POOL samples (the paper's finding (ii): a filter trained
  on uncurated data filters badly);
- EL2N (easy): 2 proxy CNNs, 1 epoch each, lowest EL2N kept (a classic in-domain baseline);
- random 50%, and all data (no filter).
Reports the precision / recall of clean samples in each subset, and the test accuracy of the same small CNN
trained on each subset (SELECT-style harness, 3 seeds), and the scoring cost as a ratio to one training
epoch on the full pool. Validation is clean and only reported; nothing is tuned on the test split.

    nice -n 5 .venv/bin/python benchmarks/filtering_dfn.py          # ~10-15 min on one thread
    .venv/bin/python benchmarks/filtering_dfn.py --quick            # smoke test (numbers meaningless)
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

from lightning_ext.curation import DFNScorer, EL2NScorer, RandomScorer, compare_curations, results_table  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "docs" / "results"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    torch.set_num_threads(1)
    n_pool, n_trusted = (1500, 200) if args.quick else (10_000, 500)
    seeds = (0,) if args.quick else tuple(range(args.seeds))
    epochs = 1 if args.quick else args.epochs
    dfn_epochs = 3 if args.quick else 40
    env = environment()
    t0 = time.time()
    pool = planted_pool(n_pool=n_pool, flip=0.3, corrupt=0.05, n_trusted=n_trusted, seed=0)
    clean = pool.clean
    trusted = torch.utils.data.TensorDataset(*pool.trusted)
    noisy_idx = np.random.default_rng(1).choice(n_pool, size=n_trusted, replace=False).tolist()
    curations = {
        "all data": None,
        "random 50%": RandomScorer(seed=0),
        "EL2N easy 50%": EL2NScorer(proxies=2, epochs=1, which="easy", progress=False),
        "DFN-noisy 50%": DFNScorer(trusted_indices=noisy_idx, epochs=dfn_epochs, progress=False),
        "DFN 50%": DFNScorer(trusted=trusted, epochs=dfn_epochs, progress=False),
    }
    res_path = Path(args.out) / ("filtering_dfn_quick.json" if args.quick else "dfn.json")
    done = []

    def on_result(r):
        done.append(r)
        print(f"  {r.curation} seed {r.seed}: test {r.metrics.get('test_acc', float('nan')):.4f} "
              f"precision {r.clean_precision:.3f} fit {r.fit_seconds:.1f}s score {r.score_seconds:.1f}s", flush=True)

    results = compare_curations(lambda: PoolDataModule(pool), cnn_model(), curations, keep=0.5, seeds=seeds,
                                trainer_kwargs={"max_epochs": epochs}, clean_mask=clean, on_result=on_result,
                                equal_size=True, min_per_class=0 if args.quick else 1)
    epoch_s = np.mean([r.fit_seconds for r in results if r.curation == "all data"]) / epochs
    out = {"env": env, "loadavg_end": os.getloadavg(), "total_seconds": time.time() - t0,
           "config": {"n_pool": n_pool, "flip": 0.3, "corrupt": 0.05, "n_trusted": n_trusted, "epochs": epochs,
                      "seeds": seeds, "dfn_epochs": dfn_epochs, "clean_share": float(clean.mean())},
           "epoch_seconds_full_pool": epoch_s,
           "runs": [{k: v for k, v in r.__dict__.items() if k != "kept"} for r in results]}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    res_path.write_text(json.dumps(out, indent=1, default=float))
    print(results_table(results))
    for name in curations:
        rs = [r for r in results if r.curation == name]
        print(f"{name}: test {mean_std([100 * r.metrics['test_acc'] for r in rs])}  score cost "
              f"{np.mean([r.score_seconds for r in rs]) / epoch_s:.2f} epochs")
    if not args.quick:
        plot(results, Path(args.out) / "dfn.png")
    print(f"wrote {res_path} in {time.time() - t0:.0f} s")


def plot(results, path: Path) -> None:
    from lightning_ext.core.plotting import new_figure, save_figure

    names = list(dict.fromkeys(r.curation for r in results))
    acc = [[100 * r.metrics["test_acc"] for r in results if r.curation == n] for n in names]
    prec = [np.mean([r.clean_precision for r in results if r.curation == n]) for n in names]
    fig, ax = new_figure(1, 2, figsize=(11, 3.8))
    ax[0].bar(names, [np.mean(a) for a in acc], yerr=[np.std(a, ddof=1) if len(a) > 1 else 0 for a in acc],
              color="tab:blue")
    ax[0].set_ylabel("test accuracy (%)")
    ax[0].set_ylim(min(np.mean(a) for a in acc) - 5, max(np.mean(a) for a in acc) + 2)
    ax[1].bar(names, prec, color="tab:green")
    ax[1].set_ylabel("share of clean samples kept (precision)")
    for a in ax:
        a.tick_params(axis="x", rotation=25)
    fig.suptitle("Fashion-MNIST pool, 30% labels flipped + 5% corrupted images: filters at 50% kept")
    save_figure(fig, path, dpi=120)


if __name__ == "__main__":
    main()
