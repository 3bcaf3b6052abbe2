"""Benchmark: DP4TL source-class pruning (Zhang et al., NeurIPS 2023) for transfer to a digits task.

Source (25 classes, 28x28): Fashion-MNIST (10 classes, 600 each), MNIST-5k digits (10 classes, 400 each for the
source) and 5 distractor classes of noise images (400 each). Target: scikit-learn's 8x8 digits upsampled to
28x28, 500 training images, its own test split (360). LM (label mapping): a surrogate CNN trained 1 epoch on
the source predicts a source class for every target training image; the most predicted classes are kept.
Pretraining: the same small CNN on the full source, on LM-pruned sources keeping 60 / 40 / 20% of the classes
(40-80% pruned), and on randomly pruned sources of the same class counts; then the whole network is
fine-tuned on the target (same steps for all). Reported: target test accuracy (3 seeds), pretraining time,
and which classes LM keeps.

    nice -n 5 .venv/bin/python benchmarks/filtering_dp4tl.py         # ~10 min on one thread
    .venv/bin/python benchmarks/filtering_dp4tl.py --quick           # smoke test (numbers meaningless)
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
import torch.nn.functional as F
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import mean_std  # noqa: E402
from _filtering_data import environment  # noqa: E402

from lightning_ext.datamodules import DigitsDataModule, MNIST5kDataModule  # noqa: E402
from lightning_ext.datamodules.fashion_mnist import FashionMNISTDataModule  # noqa: E402
from lightning_ext.filtering import DP4TLLabelMapping, ScoringData  # noqa: E402
from lightning_ext.filtering.training import predict_logits, small_cnn, train_classifier  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "docs" / "results"


def build(per_class: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    fa = FashionMNISTDataModule().load_arrays()
    mn = MNIST5kDataModule().load_arrays()
    xs, ys = [], []
    for c in range(10):
        i = rng.choice(np.flatnonzero(fa.y == c), per_class, replace=False)
        xs.append(fa.x[i].reshape(-1, 28, 28)); ys.append(np.full(per_class, c))
    for c in range(10):
        i = rng.choice(np.flatnonzero(mn.y == c), min(per_class, 400), replace=False)
        xs.append(mn.x[i].reshape(-1, 28, 28)); ys.append(np.full(len(i), 10 + c))
    for c in range(5):  # distractors: noise at five different scales
        n = min(per_class, 400)
        base = rng.random((n, 28 // (c + 1) + 1, 28 // (c + 1) + 1))
        img = torch.nn.functional.interpolate(torch.as_tensor(base)[:, None], size=(28, 28), mode="nearest")[:, 0].numpy()
        xs.append(img); ys.append(np.full(n, 20 + c))
    x = np.concatenate(xs).astype(np.float32)
    y = np.concatenate(ys)
    mean, std = x.mean(), x.std()
    src = (torch.as_tensor((x - mean) / std)[:, None], torch.as_tensor(y))
    dm = DigitsDataModule()
    arr = dm.load_arrays()
    split = dm.split_indices(arr)
    up = lambda a: F.interpolate(torch.as_tensor(a.reshape(-1, 1, 8, 8), dtype=torch.float32), size=(28, 28),  # noqa: E731
                                 mode="bilinear", align_corners=False)
    tr = rng.choice(split["train"], 500, replace=False)
    tx, vx = up(arr.x[tr]), up(arr.x[split["test"]])
    tmean, tstd = tx.mean(), tx.std()
    target_train = ((tx - tmean) / tstd, torch.as_tensor(arr.y[tr]))
    target_test = ((vx - tmean) / tstd, torch.as_tensor(arr.y[split["test"]]))
    return src, target_train, target_test


def pretrain_and_transfer(src_x, src_y, target_train, target_test, epochs, ft_epochs, seed) -> dict:
    torch.manual_seed(seed)
    net = small_cnn(1, 25, width=16)
    t = time.perf_counter()
    train_classifier(net, TensorDataset(src_x, src_y), epochs, lr=2e-3, seed=seed, progress=False)
    pre_s = time.perf_counter() - t
    net[-1] = torch.nn.Linear(net[-1].in_features, 10)
    train_classifier(net, TensorDataset(*target_train), ft_epochs, lr=1e-3, batch_size=32, seed=seed, progress=False)
    acc = float((predict_logits(net, target_test[0]).argmax(1) == target_test[1]).float().mean())
    return {"test_acc": acc, "pretrain_seconds": pre_s}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    torch.set_num_threads(1)
    per_class = 100 if args.quick else 400
    epochs, ft_epochs = (1, 1) if args.quick else (4, 15)
    seeds = (0,) if args.quick else tuple(range(args.seeds))
    env, t0 = environment(), time.time()
    (sx, sy), target_train, target_test = build(per_class)
    data = ScoringData.from_tensors(sx, sy)
    lm = DP4TLLabelMapping(target=target_train[0], surrogate_epochs=1, class_fraction=1.0, progress=False)
    scores = lm.score(data)
    counts = scores["class_counts"]
    order = np.argsort(-counts, kind="stable")
    print("LM counts per source class (0-9 fashion, 10-19 MNIST digits, 20-24 noise):", counts.tolist(), flush=True)
    rows: dict[str, list] = {}
    variants = [("full source (25 classes)", np.arange(25))]
    for frac in (0.6, 0.4, 0.2):
        k = int(round(frac * 25))
        variants.append((f"LM keep {k}/25", np.sort(order[:k])))
        variants.append((f"random keep {k}/25", np.sort(np.random.default_rng(7).choice(25, k, replace=False))))
    for name, classes in variants:
        mask = np.isin(sy.numpy(), classes)
        for seed in seeds:
            r = pretrain_and_transfer(sx[torch.as_tensor(mask)], sy[torch.as_tensor(mask)], target_train, target_test,
                                      epochs, ft_epochs, seed)
            r["classes"] = classes.tolist()
            r["samples"] = int(mask.sum())
            rows.setdefault(name, []).append(r)
            print(f"  {name} seed {seed}: target acc {r['test_acc']:.4f} pretrain {r['pretrain_seconds']:.1f}s", flush=True)
    report = {"env": env, "loadavg_end": os.getloadavg(), "total_seconds": time.time() - t0, "lm_counts": counts.tolist(),
              "config": {"per_class": per_class, "epochs": epochs, "ft_epochs": ft_epochs, "seeds": seeds}, "rows": rows}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / ("filtering_dp4tl_quick.json" if args.quick else "dp4tl.json")).write_text(json.dumps(report, indent=1))
    full_s = np.mean([r["pretrain_seconds"] for r in rows["full source (25 classes)"]])
    for name, rs in rows.items():
        print(f"{name:26s} target acc {mean_std([100 * r['test_acc'] for r in rs])}  pretrain speed-up "
              f"{full_s / np.mean([r['pretrain_seconds'] for r in rs]):.2f}x  classes {rs[0]['classes']}")
    print(f"done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
