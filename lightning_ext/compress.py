"""``lightning-ext compress``: a trained LightningModule and a latency budget in, a smaller fine-tuned model out.

One call (or one YAML) chains the library's parts on the user's own module:

1. measure the dense model's latency at the stated batch size on this device (and its validation metric);
2. plan and prune in ``steps`` steps (:func:`~lightning_ext.compression.latency_pruning.plan_latency_pruning`: a
   measured per-group latency table, widths the device runs fast, the plan's latency measured on a pruned copy);
3. after each step, fine-tune with :class:`~lightning_ext.distillation.KnowledgeDistillation` from the dense
   model (``distill_weight=0`` turns it off), optionally on a curated subset
   (:class:`~lightning_ext.curation.FilteredDataModule` with ``scorer`` and ``keep``);
4. verify the budget on the device;
5. write, under ``output_dir``: ``compressed.ckpt`` (a Lightning-style checkpoint with the pruning history, loadable
   into a freshly built dense model by :func:`~lightning_ext.compression.load_pruned_checkpoint`),
   ``report.md`` (the accuracy-latency table and the plans tried), ``pareto.png`` and ``compress.yaml`` (the
   configuration that reproduces it).

It sits at the package's top level because it composes three families' Lightning parts (compression,
distillation, curation), as ``lightning_cli.py`` does.

Example:
    >>> from lightning_ext.compress import compress  # doctest: +SKIP
    >>> result = compress(model, datamodule, speedup=2.0, batch_size=64, num_threads=1)  # doctest: +SKIP
    >>> result.speedup, result.final_metric  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

import torch
import yaml
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from torch import nn
from typing_extensions import override

from lightning_ext.core.io import atomic_torch_save, atomic_write_text
from lightning_ext.core.inputs import batch_inputs
from lightning_ext.core.measure import count_macs_params, measure_latency, trial_copy
from lightning_ext.core.validation import NonNegativeInt, PositiveFloat, PositiveInt, check_positive_int

Criterion = Literal["l1", "beta-rank", "random"]
TrainerSource = Union[Trainer, Callable[[], Trainer], None]


class CompressError(ValueError):
    """A request ``compress`` cannot carry out (the message says what to change)."""


@dataclass
class CompressResult:
    """What :func:`compress` produced (latencies in milliseconds at ``batch_size``)."""

    output_dir: str
    checkpoint_path: str
    report_path: str
    plot_path: str
    config_path: str
    device: str
    batch_size: int
    budget_ms: float
    dense_ms: float
    compressed_ms: float
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    monitor: str
    dense_metric: Optional[float]
    final_metric: Optional[float]
    tolerance: float = 0.0
    steps: list[dict] = field(default_factory=list)
    timing: str = "median wall time of a forward pass"

    @property
    def speedup(self) -> float:
        return self.dense_ms / self.compressed_ms

    @property
    def budget_met(self) -> bool:
        """Whether the verified latency is within the budget (plus the timing tolerance)."""
        return self.compressed_ms <= self.budget_ms * (1 + self.tolerance)


class _CompressHistory(Callback):
    """Keeps the pruning history in every checkpoint of the fine-tuning runs (the one history format)."""

    def __init__(self, steps: list[dict]) -> None:
        self.steps = steps

    @override
    def state_dict(self) -> dict[str, Any]:
        """The pruning steps so far, marked as a pruning history (``load_pruned_checkpoint`` replays them)."""
        from lightning_ext.compression.history import _STATE_MARKER, HISTORY_VERSION

        return {_STATE_MARKER: HISTORY_VERSION, "steps": copy.deepcopy(self.steps)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the pruning steps."""
        self.steps[:] = list(state_dict.get("steps", []))


def _check_request(latency_budget_ms: Optional[float], speedup: Optional[float], distill_weight: float,
                   keep: Any, scorer: Any, tolerance: float) -> None:
    if (latency_budget_ms is None) == (speedup is None):
        raise CompressError("Give exactly one target: `latency_budget_ms` (milliseconds per batch of `batch_size` "
                            "on this device) or `speedup` (> 1, over the dense model).")
    if latency_budget_ms is not None and not (math.isfinite(latency_budget_ms) and latency_budget_ms > 0):
        raise CompressError(f"`latency_budget_ms` must be a finite number > 0, got {latency_budget_ms}.")
    if speedup is not None and not (math.isfinite(speedup) and speedup > 1):
        raise CompressError(f"`speedup` must be a finite number > 1, got {speedup}.")
    if not (math.isfinite(distill_weight) and 0 <= distill_weight <= 1):
        raise CompressError(f"`distill_weight` must be in [0, 1] (0: no distillation), got {distill_weight}.")
    if not (math.isfinite(tolerance) and 0 <= tolerance < 1):
        raise CompressError(f"`tolerance` must be in [0, 1), got {tolerance}.")
    if (keep is None) != (scorer is None):
        raise CompressError("A data budget needs both `keep` (fraction or count of training samples) and "
                            "`scorer` (a lightning_ext.curation scorer); give both or neither.")


def _example_batch(datamodule: LightningDataModule, batch_size: int, device: torch.device) -> torch.Tensor:
    datamodule.prepare_data()
    datamodule.setup("fit")
    try:
        first = next(iter(datamodule.train_dataloader()))
    except StopIteration:
        raise CompressError(f"{type(datamodule).__name__}'s training loader is empty.") from None
    x = batch_inputs(first, CompressError, "compress")
    reps = math.ceil(batch_size / x.shape[0])
    return x.repeat(reps, *([1] * (x.dim() - 1)))[:batch_size].to(device)


def _scores(model: nn.Module, criterion: str, example: torch.Tensor, seed: int, step: int):
    if criterion == "l1":
        from lightning_ext.compression.l1_filter_pruning import l1_filter_scores

        return l1_filter_scores(model)
    if criterion == "random":
        from lightning_ext.compression.random_filter_pruning import random_filter_scores

        return random_filter_scores(model, seed=seed * 1000 + step)
    from lightning_ext.compression.beta_rank_pruning import beta_rank_scores

    with torch.no_grad():
        return beta_rank_scores(model, example)


def _validate(model: LightningModule, datamodule: LightningDataModule, monitor: str, accelerator: str) -> Optional[float]:
    trainer = Trainer(accelerator=accelerator, devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)
    metrics = trainer.validate(model, datamodule=datamodule, verbose=False)
    values = metrics[0] if metrics else {}
    if monitor not in values:
        raise CompressError(f"The model logs no {monitor!r} in validation (it logs {sorted(values) or 'nothing'}); "
                            "set `monitor` to one of those.")
    return float(values[monitor])


def _make_trainer(trainer: TrainerSource, finetune_epochs: int, root: Path, accelerator: str) -> Trainer:
    if isinstance(trainer, Trainer):
        return _single_device(trainer)
    if callable(trainer):
        made = trainer()
        if not isinstance(made, Trainer):
            raise CompressError(f"`trainer` must be a Trainer or a callable returning one; it returned "
                                f"{type(made).__name__}.")
        return _single_device(made)
    return Trainer(max_epochs=finetune_epochs, default_root_dir=str(root), accelerator=accelerator, devices=1,
                   logger=False, enable_checkpointing=False, enable_model_summary=False)


def _single_device(trainer: Trainer) -> Trainer:
    """Refuse a multi-process Trainer: compress prunes the model in place in this process and times it on one
    device, so its fine-tuning must run on that same device (a DDP/FSDP launch would fine-tune copies elsewhere)."""
    if trainer.world_size > 1:
        raise CompressError(f"compress fine-tunes on the one device it measures, but the Trainer runs "
                            f"{trainer.world_size} processes ({type(trainer.strategy).__name__}); set `devices: 1` "
                            "and `num_nodes: 1` (train the dense model distributed beforehand, then compress it).")
    return trainer


def _cost(model: nn.Module, example: torch.Tensor, warmup: int, repeats: int, threads: Optional[int],
          latency_fn: Optional[Callable[[nn.Module, Any], float]] = None) -> dict:
    macs, params = count_macs_params(model, example)
    seconds = (latency_fn(model, example) if latency_fn is not None else
               measure_latency(model, example, warmup=warmup, repeats=repeats, num_threads=threads))
    return {"ms": 1e3 * seconds, "macs": macs, "params": params}


def compress(
    model: LightningModule,
    datamodule: LightningDataModule,
    checkpoint: Optional[str] = None,
    latency_budget_ms: Optional[PositiveFloat] = None,
    speedup: Optional[PositiveFloat] = None,
    batch_size: PositiveInt = 1,
    criterion: Criterion = "l1",
    steps: PositiveInt = 1,
    finetune_epochs: NonNegativeInt = 1,
    distill_weight: float = 0.9,
    temperature: PositiveFloat = 4.0,
    scorer: Optional[Any] = None,
    keep: Optional[Union[PositiveInt, PositiveFloat]] = None,
    ignored_layers: Optional[list[str]] = None,
    width_step: PositiveInt = 8,
    max_widths: PositiveInt = 12,
    num_threads: Optional[PositiveInt] = None,
    repeats: PositiveInt = 10,
    tolerance: float = 0.05,
    monitor: str = "val_acc",
    output_dir: str = "compress",
    device: Literal["cpu", "cuda"] = "cpu",
    seed: int = 0,
    trainer: TrainerSource = None,
    config_yaml: Optional[str] = None,
    progress: bool = True,
    latency_fn: Optional[Callable[[nn.Module, Any], float]] = None,
    resume: bool = False,
    checkpoint_every_n_steps: Optional[PositiveInt] = None,
) -> CompressResult:
    """Prune ``model`` in place to a latency budget, fine-tune it with distillation, and write the results.

    Args:
        model: the trained LightningModule (changed in place: pruned and fine-tuned).
        datamodule: its data; validation gives the metric, training the fine-tuning batches.
        checkpoint: the trained weights to load first (a state dict or Lightning checkpoint, read with
            ``weights_only=True`` and checked for non-finite values); ``None``: the model as given.
        latency_budget_ms: the latency to meet, in ms per forward pass of a batch of ``batch_size`` on ``device``.
        speedup: or the speedup over the dense model (> 1).
        batch_size: the batch size the budget is stated for.
        criterion: filter importance: ``"l1"``, ``"beta-rank"`` or ``"random"``.
        steps: prune-then-fine-tune steps (intermediate speedups grow geometrically).
        finetune_epochs: epochs of fine-tuning per step when ``trainer`` is ``None``.
        distill_weight: the KD weight alpha in ``(1 - alpha) CE + alpha KD`` (0: plain fine-tuning).
        temperature: the KD temperature.
        scorer, keep: a data budget: fine-tune on the ``keep`` samples (fraction or count) the curation
            ``scorer`` prefers (:class:`~lightning_ext.curation.FilteredDataModule`).
        ignored_layers: convs (names or globs) whose filters are kept.
        width_step, max_widths: the latency table's width grid per filter group.
        num_threads: CPU threads during latency measurements (``None``: the current setting).
        repeats: timed passes per latency measurement (the median is kept).
        tolerance: a measurement within this fraction above the budget counts as meeting it.
        monitor: the validation metric reported (what the model logs, e.g. ``val_acc``).
        output_dir: where the results go; relative paths are under the (first) trainer's ``default_root_dir``.
        device: where latency is measured and the model runs.
        seed: for the random criterion and the fine-tuning runs.
        trainer: the fine-tuning Trainer, or a callable returning a fresh one per step (required for
            ``steps > 1`` with your own Trainer settings); ``None`` builds one per step.
        config_yaml: the configuration text written to ``compress.yaml`` (the CLI passes its parsed config).
        progress: show a Rich progress bar of the stages.
        latency_fn: ``(model, inputs) -> seconds`` replacing the median wall-clock measurement everywhere (e.g. a
            deployed runtime's timer, or per-thread CPU time on a shared machine); Python only.
        resume: continue an interrupted run from ``output_dir``: the stages done (dense measurement, each
            pruning step, each fine-tuning) are read from ``compress_state.pt`` there instead of being redone, and
            an interrupted fine-tuning continues from its last checkpoint (mid-epoch too); the request must be the
            one that wrote the state. Without a state there, it starts from the beginning.
        checkpoint_every_n_steps: fine-tuning checkpoints (under ``output_dir/finetune/``, removed once a step
            is done) every this many optimizer steps; ``None``: at each epoch's end.

    Returns:
        A :class:`CompressResult`. Raises :class:`CompressError` (or
        :class:`~lightning_ext.compression.PruningError`) with what to change for a request it cannot carry out.
    """
    from lightning_ext.compression.compress_report import Stages, write_plot, write_report
    from lightning_ext.compression.history import record_step
    from lightning_ext.compression.latency_pruning import build_latency_table, device_name, plan_latency_pruning
    from lightning_ext.compression.plan import apply_pruning_history

    _check_request(latency_budget_ms, speedup, distill_weight, keep, scorer, tolerance)
    check_positive_int("steps", steps)
    if isinstance(trainer, Trainer) and steps > 1:
        raise CompressError("`steps` > 1 fine-tunes once per step and a Trainer fits once: pass a callable that "
                            "returns a fresh Trainer (the CLI does), or `steps: 1`.")
    if device == "cuda" and not torch.cuda.is_available():
        raise CompressError("`device: cuda` but no CUDA device is available here; use `device: cpu`.")
    accelerator = "gpu" if device == "cuda" else "cpu"
    torch.manual_seed(seed)
    first_trainer = _make_trainer(trainer, finetune_epochs, Path.cwd(), accelerator)
    out = Path(output_dir)
    if not out.is_absolute():
        out = Path(first_trainer.default_root_dir) / out
    out.mkdir(parents=True, exist_ok=True)
    if checkpoint is not None:
        from lightning_ext.core.checkpoints import read_state_dict

        try:
            state = read_state_dict(checkpoint, reference_keys=model.state_dict().keys(), name="checkpoint")
        except (ValueError, FileNotFoundError) as err:  # unreadable, missing or non-finite: the user's file
            raise CompressError(f"`checkpoint`: {_one_line(err)}") from err
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise CompressError(f"`checkpoint` {checkpoint} does not fit {type(model).__name__}: missing "
                                f"{sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}; build the model it was "
                                "trained as.")
    dev = torch.device(device)
    model.to(dev)
    example = _example_batch(datamodule, batch_size, dev)
    request = _request(latency_budget_ms=latency_budget_ms, speedup=speedup, batch_size=batch_size,
                       criterion=criterion, steps=steps, distill_weight=distill_weight, temperature=temperature,
                       keep=keep, ignored_layers=ignored_layers, width_step=width_step, max_widths=max_widths,
                       seed=seed, device=device, checkpoint=checkpoint, model=_class_path(model))
    saved = _read_state(out, request) if resume else None
    # the teacher is the dense model as given (before a resumed run replays its pruning)
    teacher = trial_copy(model).eval() if distill_weight > 0 else None
    bar = Stages(progress, steps)
    history: list[dict] = []
    rows: list[dict] = []
    plans: list[dict] = []
    done = 0  # stages finished: 1 = dense measured, then 2k = step k pruned, 2k + 1 = step k fine-tuned
    try:
        if saved is not None:
            from lightning_ext.compression.history import replay_pruning_steps

            history[:], rows[:], plans[:], done = saved["history"], saved["rows"], saved["plans"], saved["done"]
            dense, dense_metric, budget_ms = saved["dense"], saved["dense_metric"], saved["budget_ms"]
            replay_pruning_steps(model, history)
            model.load_state_dict(saved["model"])
            model.to(dev)
            bar.stage(f"resumed after {done} stage(s)")
        else:
            bar.stage("measuring the dense model")
            dense = _cost(model, example, 3, repeats, num_threads, latency_fn)
            dense_metric = _validate(model, datamodule, monitor, accelerator)
            rows.append({"stage": "dense", **dense, "metric": dense_metric})
            bar.update(dense["ms"], dense_metric)
            budget_ms = latency_budget_ms if latency_budget_ms is not None else dense["ms"] / speedup
            if dense["ms"] <= budget_ms:
                raise CompressError(f"The dense model already takes {dense['ms']:.3g} ms <= the budget "
                                    f"{budget_ms:.3g} ms at this batch size; nothing to compress.")
            done = 1
        total = dense["ms"] / budget_ms

        def save_state() -> None:
            _write_state(out, request, model, dense=dense, dense_metric=dense_metric, budget_ms=budget_ms,
                         rows=rows, plans=plans, history=history, done=done)

        if saved is None:
            save_state()
        train_data = datamodule
        if keep is not None:
            from lightning_ext.curation.datamodule import FilteredDataModule

            train_data = FilteredDataModule(datamodule, scorer, keep=keep)
        for k in range(1, steps + 1):
            if done < 2 * k:
                step_budget = dense["ms"] / total ** (k / steps)
                bar.stage(f"step {k}/{steps}: latency table and plan ({step_budget:.3g} ms)")
                model.eval()
                table = build_latency_table(model, example, ignored_layers=ignored_layers, step=width_step,
                                            max_widths=max_widths, repeats=repeats, num_threads=num_threads,
                                            progress=progress, latency_fn=latency_fn)
                plan = plan_latency_pruning(model, example, _scores(model, criterion, example, seed, k),
                                            latency_budget_s=step_budget / 1e3, table=table,
                                            ignored_layers=ignored_layers, repeats=repeats,
                                            num_threads=num_threads, tolerance=tolerance, latency_fn=latency_fn)
                plans += [{"step": k, "position": i, "path_length": plan.path_length, "predicted_ms": 1e3 * p,
                           "measured_ms": 1e3 * m, "chosen": i == plan.position} for i, p, m in plan.history]
                apply_pruning_history(model, plan.ops, example)
                history.append(record_step(model, plan.ops, example[:1], criterion=criterion, budget_ms=step_budget))
                pruned = _cost(model, example, 3, repeats, num_threads, latency_fn)
                rows.append({"stage": f"step {k}: pruned", **pruned,
                             "metric": _validate(model, datamodule, monitor, accelerator)})
                bar.update(pruned["ms"], rows[-1]["metric"])
                done = 2 * k
                save_state()
            if done < 2 * k + 1:
                pruned = {key: rows[-1][key] for key in ("ms", "macs", "params")}
                bar.stage(f"step {k}/{steps}: fine-tuning" + (" with distillation" if teacher is not None else ""))
                model.train()
                ft = first_trainer if k == 1 else _make_trainer(trainer, finetune_epochs, Path(out), accelerator)
                ckpt_dir = out / "finetune" / f"step{k}"
                last = ckpt_dir / "last.ckpt"
                _fine_tune(ft, model, train_data, teacher, distill_weight, temperature, history, ckpt_dir,
                           checkpoint_every_n_steps, str(last) if saved is not None and last.is_file() else None)
                model.to(dev)
                rows.append({"stage": f"step {k}: fine-tuned", **pruned,
                             "metric": _validate(model, datamodule, monitor, accelerator)})
                bar.update(pruned["ms"], rows[-1]["metric"])
                done = 2 * k + 1
                save_state()
                _remove_tree(ckpt_dir)
        bar.stage("verifying the budget")
        final = _cost(model, example, 3, repeats, num_threads, latency_fn)
        rows[-1].update(final)
        if final["ms"] > budget_ms * (1 + tolerance):
            final = _cost(model, example, 3, 2 * repeats, num_threads, latency_fn)  # a second look before failing
            rows[-1].update(final)
    finally:
        bar.close()
    result = CompressResult(
        output_dir=str(out), checkpoint_path=str(out / "compressed.ckpt"), report_path=str(out / "report.md"),
        plot_path=str(out / "pareto.png"), config_path=str(out / "compress.yaml"),
        device=device_name(example, num_threads), batch_size=batch_size, budget_ms=budget_ms,
        dense_ms=dense["ms"], compressed_ms=final["ms"], macs_before=dense["macs"], macs_after=final["macs"],
        params_before=dense["params"], params_after=final["params"], monitor=monitor, dense_metric=dense_metric,
        final_metric=rows[-1]["metric"], tolerance=tolerance, steps=rows,
        timing=("the caller's latency_fn" if latency_fn is not None else "median wall time of a forward pass"))
    _write_checkpoint(model, history, result)
    write_plot(rows, plans, result)
    _write_config(model, datamodule, config_yaml, result, dict(
        checkpoint=checkpoint, latency_budget_ms=latency_budget_ms, speedup=speedup, batch_size=batch_size, criterion=criterion,
        steps=steps, finetune_epochs=finetune_epochs, distill_weight=distill_weight, temperature=temperature,
        keep=keep, ignored_layers=ignored_layers, width_step=width_step, max_widths=max_widths,
        num_threads=num_threads, repeats=repeats, tolerance=tolerance, monitor=monitor, output_dir=output_dir,
        device=device, seed=seed))
    write_report(rows, plans, result)
    if not result.budget_met:
        warnings.warn(f"The compressed model takes {final['ms']:.3g} ms, above the budget {budget_ms:.3g} ms "
                      f"(+{tolerance:.0%}) when verified after fine-tuning (timing noise, or another job on this "
                      f"device); the results in {out} say so. Re-run on a quieter device or raise the budget.",
                      stacklevel=2)
    return result


def _fine_tune(trainer: Trainer, model: LightningModule, data: LightningDataModule, teacher: Optional[nn.Module],
               distill_weight: float, temperature: float, history: list[dict], ckpt_dir: Path,
               every_n_steps: Optional[int], ckpt_path: Optional[str]) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    callbacks: list[Callback] = [_CompressHistory(history)]
    if teacher is not None:
        from lightning_ext.distillation.callback import KnowledgeDistillation

        callbacks.append(KnowledgeDistillation(teacher, weight=distill_weight, temperature=temperature))
    # compress's own resume point (besides any checkpointing the user's Trainer does)
    callbacks.append(ModelCheckpoint(dirpath=str(ckpt_dir), filename="compress-last", save_last=True, save_top_k=0,
                                     every_n_train_steps=every_n_steps, every_n_epochs=None if every_n_steps else 1))
    trainer.callbacks.extend(callbacks)
    if trainer.max_epochs == 0:
        return
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)


_STATE_FILE = "compress_state.pt"
_STATE_VERSION = 1


def _request(**kwargs: Any) -> dict:
    """The arguments that decide what compress does, as plain values (a resumed run must have the same)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in kwargs.items()
            if v is None or isinstance(v, (bool, int, float, str, list, tuple))}


def _write_state(out: Path, request: dict, model: nn.Module, **stages: Any) -> None:
    state = {"version": _STATE_VERSION, "request": request, "model": {k: v.detach().cpu() for k, v in
                                                                       model.state_dict().items()}, **stages}
    atomic_torch_save(state, out / _STATE_FILE)


def _read_state(out: Path, request: dict) -> Optional[dict]:
    """The state an interrupted run left in ``out`` (``None`` when there is none), checked against ``request``."""
    path = out / _STATE_FILE
    if not path.is_file():
        return None
    from lightning_ext.core.checkpoints import load_checkpoint

    try:
        state = load_checkpoint(path, "compress state")
    except ValueError as err:
        raise CompressError(f"{err} Delete it (or choose another `output_dir`) to start over.") from None
    if state.get("version") != _STATE_VERSION or not {"request", "model", "done", "history"} <= state.keys():
        raise CompressError(f"{path} is not a compress state this version can resume; delete it (or choose another "
                            "`output_dir`) to start over.")
    changed = sorted(k for k in request.keys() | state["request"].keys()
                     if request.get(k) != state["request"].get(k))
    if changed:
        was = ", ".join(f"{k}={state['request'].get(k)!r} (now {request.get(k)!r})" for k in changed[:3])
        raise CompressError(f"{path} was written by a different request: {was}; resume with the same settings, or "
                            "use another `output_dir` / `resume: false` to start over.")
    from lightning_ext.core.validation import check_finite_tensors

    check_finite_tensors(state["model"], str(path), CompressError)
    return state


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
    parent = path.parent
    if parent.is_dir() and not any(parent.iterdir()):
        parent.rmdir()


def _write_checkpoint(model: LightningModule, history: list[dict], result: CompressResult) -> None:
    import lightning

    checkpoint = {"state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                  "callbacks": {"CompressHistory": _CompressHistory(history).state_dict()},
                  "pytorch-lightning_version": lightning.__version__,
                  "compress": {k: v for k, v in asdict(result).items() if k != "steps"}}
    atomic_torch_save(checkpoint, result.checkpoint_path)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def _class_path(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _write_config(model: Any, datamodule: Any, config_yaml: Optional[str], result: CompressResult,
                  args: dict) -> None:
    if config_yaml is None:
        def node(obj: Any) -> dict:
            hp = dict(getattr(obj, "hparams", {}) or {})
            return {"class_path": _class_path(obj), **({"init_args": hp} if hp else {})}

        config = {"model": node(model), "data": node(datamodule),
                  **{k: v for k, v in args.items() if v is not None}}
        try:
            config_yaml = yaml.safe_dump(config, sort_keys=False)
        except yaml.YAMLError:
            config_yaml = yaml.safe_dump({k: v for k, v in config.items() if k not in ("model", "data")})
    atomic_write_text("# lightning-ext compress --config compress.yaml\n" + config_yaml, result.config_path)
