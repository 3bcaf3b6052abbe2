"""Helpers shared by the pruning benchmarks (Fashion-MNIST ResNet-10t recipe, quiet fits, test predictions).

Kept here so that every benchmark trains and evaluates the same way; not part of the library.
"""

from __future__ import annotations

import functools
import statistics
import sys
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer

from lightning_ext.modules import ImageClassifier


class EpochPrinter(Callback):
    """Prints one line per training epoch (loss and seconds): progress for long, log-less benchmark runs."""

    def __init__(self, label: str) -> None:
        self.label, self.start = label, 0.0

    def on_train_epoch_start(self, trainer, pl_module):
        self.start = time.time()

    def on_train_epoch_end(self, trainer, pl_module):
        loss = trainer.callback_metrics.get("train_loss_epoch")
        shown = f"loss {float(loss):.3f} " if loss is not None else ""
        print(f"  [{self.label}] epoch {trainer.current_epoch + 1}/{trainer.max_epochs} "
              f"{shown}({time.time() - self.start:.0f} s)", flush=True)


def resnet10t_fmnist(stem_downsample: int, lr: float, epochs: int) -> ImageClassifier:
    """timm ResNet-10t for 28x28 grayscale, SGD (momentum 0.9, weight decay 5e-4) with a cosine schedule."""
    return ImageClassifier(
        "resnet10t", num_classes=10, in_chans=1, image_size=28, stem_downsample=stem_downsample,
        optimizer=functools.partial(torch.optim.SGD, lr=lr, momentum=0.9, weight_decay=5e-4),
        scheduler=functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=epochs),
    )


def fit(model, dm, epochs: int, callbacks: list, label: str) -> float:
    """Fit on CPU without validation, logger or checkpoints; returns the wall-clock seconds."""
    start = time.time()
    Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
            callbacks=[*callbacks, EpochPrinter(label)]).fit(model, datamodule=dm)
    return time.time() - start


@torch.no_grad()
def test_predictions(model, dm) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted and true labels on the datamodule's test split (eval mode)."""
    dm.setup("test")
    model.eval()
    preds, labels = [], []
    for x, y in dm.test_dataloader():
        preds.append(model(x).argmax(1))
        labels.append(y)
    return torch.cat(preds), torch.cat(labels)


def mean_std(values, digits: int = 2) -> str:
    """``mean ± std`` (sample std; 0 for a single value)."""
    values = list(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {std:.{digits}f}"


class KeepBestWeights(Callback):
    """Early stopping on a validation metric that also keeps the best epoch's weights (in memory) and restores them.

    Stops after ``patience`` validations without improvement; records the per-epoch metric, the best epoch and
    whether the run stopped because the metric stopped improving (``converged``) or because ``max_epochs`` ran out.
    """

    def __init__(self, monitor: str = "val_acc", patience: int = 2, mode: str = "max") -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"mode={mode!r}: use 'max' or 'min'.")
        self.monitor, self.patience, self.sign = monitor, patience, 1.0 if mode == "max" else -1.0
        self.best, self.best_epoch, self.best_state, self.history = -float("inf"), -1, None, []

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        value = self.sign * float(trainer.callback_metrics[self.monitor])  # mode 'min': the negated metric
        self.history.append(value)
        if value > self.best:
            self.best, self.best_epoch = value, trainer.current_epoch
            self.best_state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        elif trainer.current_epoch - self.best_epoch >= self.patience:
            trainer.should_stop = True

    def on_train_end(self, trainer, pl_module):  # before later callbacks' on_train_end (e.g. ModelPruning's)
        if self.best_state is not None:
            pl_module.load_state_dict(self.best_state)


def fit_early_stopping(model, dm, max_epochs: int, callbacks: list, label: str, patience: int = 2,
                       monitor: str = "val_acc") -> dict:
    """Fit with a validation pass per epoch, stop after ``patience`` epochs without improvement of ``monitor`` and
    restore the best epoch's weights. Returns the budget actually spent and the convergence record:
    ``epochs`` run, ``best_epoch`` (0-based), ``converged`` (the best epoch is not the last one run),
    ``steps``/``samples`` (optimizer steps and training samples seen), ``history`` (monitor per epoch),
    ``wall_s`` and ``cpu_s`` (this process's CPU time)."""
    keeper = KeepBestWeights(monitor, patience)
    model.train()  # Lightning keeps the modules' modes: a model evaluated before (eval mode) must train in train mode
    start, cpu = time.time(), time.process_time()
    trainer = Trainer(max_epochs=max_epochs, accelerator="cpu", devices=1, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, callbacks=[keeper, *callbacks, EpochPrinter(label)])
    trainer.fit(model, datamodule=dm)
    epochs = len(keeper.history)
    steps = int(trainer.global_step)
    return {"epochs": epochs, "best_epoch": keeper.best_epoch, "converged": keeper.best_epoch < epochs - 1,
            "best_val": keeper.best, "history": keeper.history, "steps": steps,
            "samples": epochs * len(dm.train_set), "wall_s": time.time() - start,
            "cpu_s": time.process_time() - cpu}


def test_metrics(model, dm) -> dict:
    """The test split's logged metrics of ``model`` (one process, no logger), e.g. after :func:`fit_early_stopping`."""
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False)
    return trainer.test(model, datamodule=dm, verbose=False)[0]


@torch.no_grad()
def reestimate_batchnorm(model, batches) -> None:
    """Re-estimate every BatchNorm's running mean and variance from ``batches`` (inputs only): statistics reset, a
    cumulative average over the batches in train mode, no gradient and no weight change; the model's modes and
    the BNs' momenta are restored."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in bns]
    flags = [(m, m.training) for m in model.modules()]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average: every batch weighs the same
    model.train()
    try:
        for x in batches:
            model(x)
    finally:
        for bn, momentum in zip(bns, momenta):
            bn.momentum = momentum
        for m, flag in flags:
            m.training = flag


def combine_claims(claims) -> str:
    """One verdict from per-claim results (True holds, False fails, None not testable or inconclusive): *not
    testable here* when none was testable, *reproduced* when all were and all hold, *partly reproduced* when some
    hold, else *not reproduced*."""
    claims = list(claims)
    testable = [c for c in claims if c is not None]
    if not testable:
        return "not testable here"
    if len(testable) == len(claims) and all(testable):
        return "reproduced"
    return "partly reproduced" if any(testable) else "not reproduced"


def verdict_of(claims) -> str:
    """:func:`combine_claims` of ``(name, holds, why)`` claims, but *inconclusive* when no claim was decided and a
    reason says so (a budget or seed shortfall is not "not testable")."""
    claims = list(claims)
    if all(c is None for _, c, _ in claims) and any(why.startswith("inconclusive") for _, _, why in claims):
        return "inconclusive"
    return combine_claims([c for _, c, _ in claims])


def pop_option(name: str, many: bool = False) -> list[str]:
    """Remove ``name VALUE`` (``many``: every value up to the next ``--option``) from ``sys.argv`` and return the
    values (``[]`` when absent): options of a script whose ``main`` is :func:`page_main`, which parses only
    ``--render-only``."""
    if name not in sys.argv:
        return []
    i = sys.argv.index(name)
    end = i + 2 if not many else next((j for j in range(i + 1, len(sys.argv)) if sys.argv[j].startswith("--")),
                                      len(sys.argv))
    values = sys.argv[i + 1:end]
    del sys.argv[i:end]
    return values


def page_main(json_path, stem: str, protocol: dict, command: str, main_runs, render, plot) -> None:
    """The shared ``main`` of a results page's script: ``--render-only`` or run (resuming from the JSON), then
    render the page and plot from the JSON, one torch thread. ``render(data) -> (page, res, verdict)``;
    ``plot(data, res, path)``."""
    import argparse
    import json
    import platform

    from lightning_ext.core.io import atomic_write_json, atomic_write_text

    ap = argparse.ArgumentParser()
    ap.add_argument("--render-only", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    json_path = Path(json_path)
    data = json.loads(json_path.read_text()) if json_path.exists() else {}
    data.setdefault("meta", {"commands": []})
    data["meta"].update(protocol=protocol, machine=f"{platform.machine()}, torch {torch.__version__}")
    if not args.render_only:
        if command not in data["meta"]["commands"]:
            data["meta"]["commands"].append(command)
        main_runs(data)
        atomic_write_json(data, json_path, indent=1)
    page, res, verdict = render(data)
    plot(data, res, json_path.parent / f"{stem}.png")
    atomic_write_text(page, json_path.parent / f"{stem}.md")
    print("verdict:", verdict)


def rounds_budget(meta: dict) -> str:
    """A federated benchmark's round budget in words: ``meta`` holds ``rounds`` and, when early stopping is on,
    ``patience``."""
    if meta.get("patience"):
        after = f", never before round {meta['min_rounds']}" if meta.get("min_rounds") else ""
        return (f"up to {meta['rounds']} rounds (stopping after {meta['patience']} rounds without a better "
                f"validation accuracy{after})")
    return f"{meta['rounds']} rounds"


def superseded_summary(data: dict, arms: dict, chosen_lr, json_name: str) -> str:
    """One markdown bullet per superseded protocol kept in ``data["superseded"]`` (``{"meta", "runs"}`` with run
    keys ``arm|lr|seed``): each named arm's mean test accuracy at the lr its first seed chose then. ``arms`` maps
    an arm key to its label; ``chosen_lr(data, arm, lrs, seed)`` is the benchmark's own rule."""
    import statistics

    out = []
    for old in data.get("superseded", []):
        means = []
        for arm, label in arms.items():
            lr = chosen_lr({"runs": old["runs"]}, arm, old["meta"]["lrs"], old["meta"]["seeds"][0])
            v = [r["test"] for k, r in old["runs"].items() if k.split("|")[:2] == [arm, str(lr)]]
            means.append(f"{label} {100 * statistics.mean(v):.2f} % ({len(v)} runs)" if v else f"{label} n/a")
        out.append(f"- Superseded protocol ({rounds_budget(old['meta'])}, lrs {old['meta']['lrs']}; kept in "
                   f"{json_name} under `superseded`): test accuracy {', '.join(means)}; inconclusive there because "
                   f"a best validation round was the last.\n")
    return "".join(out)


def patience_stop(history: list, patience: int, min_rounds: int = 0) -> bool:
    """Early stopping for hand-written round loops: True once ``len(history) >= min_rounds`` and the best value of
    ``history`` (higher is better; ties to the earliest) is ``patience`` or more entries back. ``patience`` 0: never."""
    if not patience or len(history) < min_rounds:
        return False
    best = max(range(len(history)), key=lambda t: history[t])
    return len(history) - 1 - best >= patience


def supersede_changed_protocol(data: dict, protocol: dict) -> dict:
    """If ``data["meta"]`` was run under another ``protocol`` (its keys compared; absent keys count as 0 and a
    fresh JSON matches anything), move its runs to ``data["superseded"]`` and start ``data["runs"]`` afresh.
    Returns the meta whose ``runtime_s`` the new protocol carries on from (empty when superseded)."""
    old = data.get("meta", {})
    if old.get("rounds") is None or all(old.get(k, 0) == v for k, v in protocol.items()):
        return old
    if data["runs"]:  # a superseded protocol: keep its runs beside the new ones, out of the verdict
        data.setdefault("superseded", []).append({"meta": old, "runs": data["runs"]})
    data["runs"] = {}
    return {}  # the runtime counts this protocol's runs only
