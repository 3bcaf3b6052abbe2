"""Benchmark: the data-filtering scaling law (Goyal et al., CVPR 2024): does the best kept pool grow with compute?

Pool: 4 quality buckets of Fashion-MNIST training images (1,000 each) with 0 / 20 / 40 / 60% of labels flipped
(the truth a perfect quality score would recover). The same small CNN trains on the top 1, 2, 3 or 4 buckets
for budgets of 1k, 4k, 16k and 64k samples seen (repeating epochs as needed); error = 1 - test accuracy.
The law (a, b, tau per bucket, d fixed) is fitted on single-bucket curves, then asked which union is best at
each budget; reproduced if the measured best pool shifts from the top bucket at small budgets to larger unions
at large budgets, and the law's choice matches.

    nice -n 5 .venv/bin/python benchmarks/filtering_scaling_law.py    # ~10 min on one thread
    .venv/bin/python benchmarks/filtering_scaling_law.py --quick      # smoke test (numbers meaningless)
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
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _filtering_data import environment, planted_pool  # noqa: E402

from lightning_ext.filtering import FilteringScalingLaw  # noqa: E402
from lightning_ext.filtering.training import predict_logits, small_cnn, train_classifier  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "docs" / "results"


def run(x, y, test, samples_seen: int, seed: int, batch: int = 64) -> float:
    torch.manual_seed(seed)
    net = small_cnn(1, 10, width=8)
    # exactly `samples_seen` samples: whole epochs over the pool, the last one truncated
    full, rest = divmod(samples_seen, len(y))
    if full:
        train_classifier(net, TensorDataset(x, y), full, lr=2e-3, batch_size=batch, seed=seed, progress=False)
    if rest:
        idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:rest]
        train_classifier(net, TensorDataset(x[idx], y[idx]), 1, lr=2e-3, batch_size=batch, seed=seed, progress=False)
    return 1.0 - float((predict_logits(net, test[0]).argmax(1) == test[1]).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    torch.set_num_threads(1)
    size = 200 if args.quick else 1000
    budgets = (400, 1600) if args.quick else (1000, 4000, 16000, 64000)
    noise = (0.0, 0.2, 0.4, 0.6)
    env, t0 = environment(), time.time()
    pool = planted_pool(n_pool=4 * size, flip=0.0, corrupt=0.0, n_val=0, n_trusted=0, seed=0)
    rng = np.random.default_rng(0)
    y = pool.y.clone()
    for b, p in enumerate(noise):
        idx = np.arange(b * size, (b + 1) * size)
        f = rng.choice(idx, int(p * size), replace=False)
        y[f] = (y[f] + torch.as_tensor(rng.integers(1, 10, len(f)))) % 10
    test = (pool.test[0][:2000], pool.test[1][:2000])
    single, unions = {}, {}
    for b in range(4):
        sl = slice(b * size, (b + 1) * size)
        single[b] = [run(pool.x[sl], y[sl], test, n, seed=0) for n in budgets]
        print(f"bucket {b} (noise {noise[b]}): errors {np.round(single[b], 3).tolist()}", flush=True)
    for m in (1, 2, 3, 4):
        sl = slice(0, m * size)
        unions[m] = [run(pool.x[sl], y[sl], test, n, seed=0) for n in budgets]
        print(f"top-{m} union: errors {np.round(unions[m], 3).tolist()}", flush=True)
    d = 0.5 * min(min(v) for v in single.values())
    law = FilteringScalingLaw([FilteringScalingLaw.fit_bucket(budgets, single[b], size, d=d) for b in range(4)],
                              bucket_size=size, d=d)
    measured = [int(np.argmin([unions[m][i] for m in (1, 2, 3, 4)])) + 1 for i in range(len(budgets))]
    predicted = [law.best_pool(n) for n in budgets]
    report = {"env": env, "loadavg_end": os.getloadavg(), "total_seconds": time.time() - t0, "budgets": budgets,
              "noise": noise, "bucket_size": size, "single_bucket_errors": single, "union_errors": unions,
              "law": law.config(), "measured_best_union": measured, "predicted_best_union": predicted,
              "predicted_union_errors": {m: [law.error(n, m) for n in budgets] for m in (1, 2, 3, 4)}}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / ("filtering_scaling_quick.json" if args.quick else "data_filtering_scaling_law.json")).write_text(
        json.dumps(report, indent=1, default=float))
    print("budgets", budgets, "measured best union", measured, "law's choice", predicted)
    print(f"done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
