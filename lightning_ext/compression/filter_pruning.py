"""``FilterPruning``: the base callback that removes conv filters physically during ``fit``.

The engine it drives lives in :mod:`lightning_ext.compression` and works without a Trainer (filter groups from
Torch-Pruning's dependency graph, plans for a channel ratio or a MACs target, the pruning history, MACs and
latency). This module adds what only a training run needs: rebuilding the optimizers on the new parameters
with the LR schedule carried over, re-wrapping DDP, the schedule of prune steps, the decision on rank 0, the
history in the checkpoint, logging and the accuracy-vs-MACs plot.

:class:`~lightning_ext.compression.beta_rank_pruning.BetaRankPruning`,
:class:`~lightning_ext.compression.l1_filter_pruning.L1FilterPruning` and
:class:`~lightning_ext.compression.random_filter_pruning.RandomFilterPruning` subclass it with their importance.
The engine's public functions are re-exported here for convenience.
"""

from __future__ import annotations

import copy
import difflib
import importlib
import time
from typing import Any, Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_ext.compression.graph import (
    FilterGroup,
    PruningError,
    Scores,
    _conv_names,
    build_dependency_graph,
    group_scores,
    prunable_filter_groups,
    resolve_layer_names,
)
from lightning_ext.compression.history import (
    HISTORY_VERSION,
    _STATE_MARKER,
    _install_replay_hook,
    _remove_replay_hook,
    load_pruned_checkpoint,
    pruning_steps_from_checkpoint,
    record_step,
    refuse_spawning_launcher,
    replay_pruning_steps,
)
from lightning_ext.compression.plan import (
    PruningPlan,
    _apply_ops,
    applied_pruning_steps,
    apply_pruning_history,
    check_pruning_target,
    plan_filter_pruning,
    prune_filters,
)
from lightning_ext.core.inputs import batch_inputs, example_inputs, first_train_loader
from lightning_ext.core.measure import count_macs_params, measure_latency
from lightning_ext.core.optional import require
from lightning_ext.core.paths import check_path_argument, output_path
from lightning_ext.core.plotting import new_figure, save_figure
from lightning_ext.core.strategy import refuse_sharded_strategy
from lightning_ext.core.validation import (
    NonNegativeInt,
    OpenUnitInterval,
    PositiveInt,
    UnitIntervalRightOpen,
    check_number,
    check_positive_int,
)

__all__ = [
    "FilterGroup", "FilterPruning", "PruningError", "PruningPlan", "apply_pruning_history", "applied_pruning_steps",
    "build_dependency_graph", "count_macs_params", "group_scores", "load_pruned_checkpoint", "measure_latency",
    "plan_filter_pruning", "prunable_filter_groups", "prune_filters", "pruning_steps_from_checkpoint",
    "rebuild_optimizers", "replay_pruning_steps", "resolve_layer_names",
]

#: Default ``plot_path``; ``{name}`` is replaced by the callback's class name.
DEFAULT_PLOT_PATH = "{name}_accuracy_vs_macs.png"


# -- optimizers and DDP ---------------------------------------------------------------------------------------


def rebuild_optimizers(trainer: Trainer) -> None:
    """Re-create the optimizers and LR schedulers on the model's current parameters, keeping the schedule.

    After channels are removed physically the optimizer still holds the old tensors and would silently train
    nothing. This reruns ``configure_optimizers`` (``trainer.strategy.setup_optimizers``), then copies every
    optimizer's per-group hyper-parameters (``lr``, ``initial_lr``, momentum, ...) and every scheduler's state
    (``last_epoch``, ...) from the old objects, so the LR schedule continues where it was. Optimizer state
    such as momentum buffers starts afresh (its tensors had the old shapes).
    """
    strategy = trainer.strategy
    old_groups = [[{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
                  for opt in strategy.optimizers]
    old_scheds = [cfg.scheduler.state_dict() for cfg in strategy.lr_scheduler_configs]
    strategy.setup_optimizers(trainer)
    for opt, groups in zip(strategy.optimizers, old_groups):
        if len(opt.param_groups) != len(groups):
            rank_zero_warn(
                "configure_optimizers returned a different number of parameter groups after pruning; the "
                "hyper-parameters of the old groups were not carried over."
            )
            continue
        for group, old in zip(opt.param_groups, groups):
            group.update(old)
    if len(strategy.lr_scheduler_configs) == len(old_scheds):
        for cfg, state in zip(strategy.lr_scheduler_configs, old_scheds):
            cfg.scheduler.load_state_dict(state)
    else:
        rank_zero_warn("configure_optimizers returned a different number of LR schedulers after pruning; "
                       "their state was not carried over.")


def _rewrap_ddp(trainer: Trainer) -> None:
    """Wrap the (re-shaped) module in a new DistributedDataParallel: DDP registers parameters at wrap time."""
    from torch.nn.parallel import DistributedDataParallel

    strategy = trainer.strategy
    if not isinstance(strategy.model, DistributedDataParallel):
        return
    inner = strategy.model.module
    strategy.model = None  # drop the old reducer (and its autograd hooks) before building the new one
    import gc

    gc.collect()
    strategy.model = strategy._setup_model(inner)
    if hasattr(strategy, "_register_ddp_hooks"):
        strategy._register_ddp_hooks()


# -- the callback ---------------------------------------------------------------------------------------------


class FilterPruning(Callback):
    """Base callback: remove the least important conv filters physically, once or every N epochs, during fit.

    Subclasses supply the importance (:meth:`filter_scores`). At the start of each scheduled epoch the
    callback scores every conv filter, decides on rank 0 which channels each coupled group loses (broadcast to
    all ranks), removes them with Torch-Pruning's dependency graph, rebuilds the optimizers on the new
    parameters (the LR schedule continues) and, under DDP, re-wraps the model. The rest of ``fit`` fine-tunes.

    Schedule: steps at epochs ``start_epoch + i * every_n_epochs`` for ``i < num_steps``; after step ``i`` a
    share ``(i + 1) / num_steps`` of the target is reached (pruning ratio of the original channels, or MACs
    reduction of the dense model's MACs).

    Checkpoints: the history (which channels were removed, in order) is the callback state. When a checkpoint
    is loaded through the Trainer (resume, ``validate/test(ckpt_path=...)``) it is replayed before the weights
    load; :func:`load_pruned_checkpoint` does the same for inference without a Trainer.

    Logged at each step: ``pruning/macs``, ``pruning/params``, ``pruning/macs_reduction`` and, when
    ``latency_repeats > 0``, ``pruning/latency_ms`` (batch ``latency_batch_size``) and ``pruning/speedup``
    against the dense model. MACs follow :mod:`lightning_ext.core.measure`'s convention (one sample). At the end
    of fit a plot of ``monitor`` against MACs is saved.

    Args:
        pruning_ratio: share of each group's channels to remove in total, in (0, 1).
        macs_reduction: share of the dense model's MACs to remove in total, in (0, 1).
        start_epoch: epoch of the first step (0 = before any training).
        every_n_epochs: epochs between steps.
        num_steps: number of steps (1 = one-shot).
        ignored_layers: conv names or globs (relative to the LightningModule, e.g. ``net.conv1``, ``net.layer4.*``)
            whose filters are kept.
        layer_pruning_ratios: per-conv pruning ratios in [0, 1) overriding ``pruning_ratio``.
        calibration_batches: training batches the data-aware importances look at (per process).
        round_to: keep a multiple of this many channels in each group (e.g. 8 for faster CPU/GPU kernels).
        monitor: metric plotted against MACs (recorded after each validation).
        input_shape: shape of one input without the batch dimension; default: the module's
            ``example_input_array`` or ``input_shape``, else the first training batch.
        latency_batch_size: batch size of the latency measurement.
        latency_repeats: timed forward passes per measurement; 0 skips latency.
        plot_path: the plot's file, relative to ``trainer.log_dir`` (``{name}`` = the class name); ``None`` skips it.
        verbose: print a line per step.
    """

    needs_calibration_data: bool = False

    def __init__(
        self,
        pruning_ratio: Optional[OpenUnitInterval] = None,
        macs_reduction: Optional[OpenUnitInterval] = None,
        start_epoch: NonNegativeInt = 0,
        every_n_epochs: PositiveInt = 1,
        num_steps: PositiveInt = 1,
        ignored_layers: Optional[list[str]] = None,
        layer_pruning_ratios: Optional[dict[str, UnitIntervalRightOpen]] = None,
        calibration_batches: PositiveInt = 1,
        round_to: PositiveInt = 1,
        monitor: str = "val_acc",
        input_shape: Optional[list[PositiveInt]] = None,
        latency_batch_size: PositiveInt = 64,
        latency_repeats: NonNegativeInt = 10,
        plot_path: Optional[str] = DEFAULT_PLOT_PATH,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        require("torch_pruning", type(self).__name__)
        layer_pruning_ratios = check_pruning_target(pruning_ratio, macs_reduction, layer_pruning_ratios, round_to,
                                                    error=ValueError)
        check_number("start_epoch", start_epoch, low=0, integer=True)
        for name, value in (("every_n_epochs", every_n_epochs), ("num_steps", num_steps),
                            ("calibration_batches", calibration_batches), ("latency_batch_size", latency_batch_size)):
            check_positive_int(name, value)
        check_number("latency_repeats", latency_repeats, low=0, integer=True)
        if ignored_layers is not None and (isinstance(ignored_layers, str) or not all(
                isinstance(n, str) for n in ignored_layers)):
            raise ValueError(f"`ignored_layers` must be a list of module names or globs, got {ignored_layers!r}.")
        if input_shape is not None and (isinstance(input_shape, str) or not isinstance(input_shape, (list, tuple))):
            raise ValueError(f"`input_shape` must be a list of positive integers (no batch), got {input_shape!r}.")
        for i, size in enumerate(input_shape or []):
            check_positive_int(f"input_shape[{i}]", size)
        self.pruning_ratio = pruning_ratio
        self.macs_reduction = macs_reduction
        self.start_epoch = start_epoch
        self.every_n_epochs = every_n_epochs
        self.num_steps = num_steps
        self.ignored_layers = list(ignored_layers or [])
        self.layer_pruning_ratios = layer_pruning_ratios
        self.calibration_batches = calibration_batches
        self.round_to = round_to
        self.monitor = monitor
        self.example_shape = None if input_shape is None else [1, *map(int, input_shape)]
        self.latency_batch_size = latency_batch_size
        self.latency_repeats = latency_repeats
        self.plot_path = plot_path
        check_path_argument("plot_path", plot_path)
        self.verbose = verbose
        self._reset_state()

    def _reset_state(self) -> None:
        self.steps: list[dict] = []
        self.curve: list[dict] = []
        self.dense: dict = {}  # macs, params, latency_ms of the model before the first step
        self.reference_channels: dict[str, int] = {}
        self.input_dtype = "float32"

    # -- schedule ---------------------------------------------------------------------------------------------
    @property
    def prune_epochs(self) -> list[int]:
        """The epochs at whose start a step runs."""
        return [self.start_epoch + i * self.every_n_epochs for i in range(self.num_steps)]

    @property
    @override
    def state_key(self) -> str:
        """Identifies this callback's state in a checkpoint by its target and schedule."""
        return self._generate_state_key(
            pruning_ratio=self.pruning_ratio, macs_reduction=self.macs_reduction, start_epoch=self.start_epoch,
            every_n_epochs=self.every_n_epochs, num_steps=self.num_steps,
        )

    # -- importance (override) ----------------------------------------------------------------------------
    def filter_scores(
        self, pl_module: LightningModule, inputs: Optional[list[torch.Tensor]], trainer: Trainer
    ) -> Scores:
        """One score per filter for every ``nn.Conv2d`` (name relative to ``pl_module``); higher is kept.

        ``inputs`` are ``calibration_batches`` training inputs of this process when
        :attr:`needs_calibration_data` is set. Statistics must be reduced across processes
        (``trainer.strategy.reduce``) so every rank computes the same scores; the plan is decided on rank 0.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement `filter_scores`.")

    def batch_inputs(self, batch: Any) -> torch.Tensor:
        """The model input of a training batch (:func:`lightning_ext.core.inputs.batch_inputs`)."""
        return batch_inputs(batch, PruningError, "the callback")

    # -- Lightning hooks --------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Refuse unsupported strategies, check layer names and install the history replay before weights load."""
        refuse_sharded_strategy(trainer, type(self).__name__, "removes channels physically", error=PruningError)
        averaging = getattr(importlib.import_module("lightning.pytorch.callbacks"), "WeightAveraging", ())
        if stage == "fit" and any(isinstance(cb, averaging) for cb in trainer.callbacks):
            raise PruningError(
                f"{type(self).__name__} cannot run next to a WeightAveraging/EMA callback: its averaged copy keeps the "
                "unpruned shapes. Remove that callback, or average the weights after pruning in a separate fit."
            )
        if stage == "fit":
            refuse_spawning_launcher(trainer, type(self).__name__)
        resolve_layer_names(pl_module, self.ignored_layers)  # early, clear errors for misspelt names
        convs = set(_conv_names(pl_module))
        for name in self.layer_pruning_ratios:
            if name not in convs:
                close = difflib.get_close_matches(name, sorted(convs), n=4)
                raise PruningError(f"`layer_pruning_ratios` names {name!r}, which is not a Conv2d of the model."
                                   + (f" Close names: {', '.join(close)}." if close else ""))
        max_epochs = trainer.max_epochs if trainer.max_epochs is not None else -1
        if stage == "fit" and max_epochs >= 0 and self.prune_epochs[-1] >= max_epochs:
            rank_zero_warn(
                f"{type(self).__name__}: steps are scheduled at epochs {self.prune_epochs} but the run has "
                f"{max_epochs} epochs, so the target is not reached; lower `start_epoch`/`every_n_epochs`."
            )
        _install_replay_hook(pl_module)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Remove the history replay hook from the module."""
        _remove_replay_hook(pl_module)

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Run the pruning steps scheduled up to this epoch."""
        epochs = self.prune_epochs
        while len(self.steps) < self.num_steps and epochs[len(self.steps)] <= trainer.current_epoch:
            self._prune_step(trainer, pl_module)

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Record the monitored metric against the current MACs for the plot."""
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            return
        macs = self.steps[-1]["macs"] if self.steps else self._dense_stats(trainer, pl_module)["macs"]
        self.curve.append({"epoch": int(trainer.current_epoch), "step": len(self.steps), "macs": int(macs),
                           self.monitor: float(value)})

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Save the plot of the monitored metric against MACs (rank 0)."""
        if self.plot_path is None or not self.curve:
            return
        path = output_path(trainer, self.plot_path.format(name=type(self).__name__))  # log_dir: a collective
        if trainer.is_global_zero:
            self.save_plot(str(path))

    @override
    def state_dict(self) -> dict[str, Any]:
        """The pruning history (steps), the plot's curve and the dense model's cost."""
        return {
            _STATE_MARKER: HISTORY_VERSION, "steps": copy.deepcopy(self.steps), "curve": copy.deepcopy(self.curve),
            "dense": dict(self.dense), "reference_channels": dict(self.reference_channels),
            "input_shape": self.example_shape, "input_dtype": self.input_dtype,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the state saved by :meth:`state_dict` (the model's shapes are replayed separately)."""
        self.steps = list(state_dict.get("steps", []))
        self.curve = list(state_dict.get("curve", []))
        self.dense = dict(state_dict.get("dense", {}))
        self.reference_channels = dict(state_dict.get("reference_channels", {}))
        self.example_shape = state_dict.get("input_shape") or self.example_shape
        self.input_dtype = state_dict.get("input_dtype", "float32")

    # -- the step ---------------------------------------------------------------------------------------------
    def _example_inputs(self, trainer: Trainer, pl_module: LightningModule) -> torch.Tensor:
        if self.example_shape is None:
            x = example_inputs(pl_module, None, trainer, error=PruningError)
            self.example_shape = [1, *x.shape[1:]]
            self.input_dtype = str(x.dtype).replace("torch.", "")
        return torch.zeros(self.example_shape, dtype=getattr(torch, self.input_dtype), device=pl_module.device)

    def _calibration_inputs(self, trainer: Trainer, pl_module: LightningModule) -> list[torch.Tensor]:
        inputs = []
        with torch.random.fork_rng(devices=[]):  # iterating a loader must not shift the training RNG stream
            for batch in first_train_loader(trainer, PruningError):
                inputs.append(self.batch_inputs(batch).to(pl_module.device))
                if len(inputs) >= self.calibration_batches:
                    break
        if not inputs:
            raise PruningError("The training dataloader is empty; calibration needs at least one batch.")
        return inputs

    def _latency_ms(self, trainer: Trainer, pl_module: LightningModule) -> Optional[float]:
        if not self.latency_repeats:
            return None
        value = None
        if trainer.is_global_zero:
            x = self._example_inputs(trainer, pl_module)
            batch = torch.randn(self.latency_batch_size, *x.shape[1:], device=x.device).to(x.dtype)
            value = 1000 * measure_latency(pl_module, batch, warmup=2, repeats=self.latency_repeats)
        return trainer.strategy.broadcast(value, src=0)

    def _dense_stats(self, trainer: Trainer, pl_module: LightningModule) -> dict:
        if not self.dense:
            macs, params = count_macs_params(pl_module, self._example_inputs(trainer, pl_module))
            self.dense = {"macs": macs, "params": params}
        return self.dense

    def _prune_step(self, trainer: Trainer, pl_module: LightningModule) -> None:
        index = len(self.steps)
        start = time.perf_counter()
        example = self._example_inputs(trainer, pl_module)
        dense = self._dense_stats(trainer, pl_module)
        if "latency_ms" not in dense:
            dense["latency_ms"] = self._latency_ms(trainer, pl_module)
        inputs = self._calibration_inputs(trainer, pl_module) if self.needs_calibration_data else None
        scores = self.filter_scores(pl_module, inputs, trainer)
        fraction = (index + 1) / self.num_steps
        payload: Any = None
        if trainer.is_global_zero:
            try:
                if not self.reference_channels:
                    groups = prunable_filter_groups(pl_module, example, self.ignored_layers)
                    self.reference_channels = {g.root: g.channels for g in groups}
                plan = plan_filter_pruning(
                    pl_module, example, scores,
                    pruning_ratio=None if self.pruning_ratio is None else self.pruning_ratio * fraction,
                    macs_reduction=None if self.macs_reduction is None else self.macs_reduction * fraction,
                    ignored_layers=self.ignored_layers,
                    layer_pruning_ratios={k: v * fraction for k, v in self.layer_pruning_ratios.items()},
                    reference_macs=dense["macs"], reference_channels=self.reference_channels,
                    round_to=self.round_to,
                )
                payload = {"ops": plan.ops, "macs": plan.macs_after, "params": plan.params_after,
                           "channels": plan.channels, "reference_channels": self.reference_channels}
            except PruningError as err:
                payload = {"error": str(err)}
        payload = trainer.strategy.broadcast(payload, src=0)
        if "error" in payload:
            raise PruningError(payload["error"])
        self.reference_channels = payload["reference_channels"]
        _apply_ops(pl_module, payload["ops"], example)
        record = record_step(pl_module, payload["ops"], example)
        rebuild_optimizers(trainer)
        _rewrap_ddp(trainer)
        latency = self._latency_ms(trainer, pl_module)
        step = {
            "order": record["order"], "epoch": int(trainer.current_epoch), "global_step": int(trainer.global_step),
            "ops": payload["ops"], "macs": int(payload["macs"]), "params": int(payload["params"]),
            "latency_ms": latency, "input_shape": record["input_shape"], "input_dtype": record["input_dtype"],
        }
        self.steps.append(step)
        metrics = {
            "pruning/macs": float(step["macs"]), "pruning/params": float(step["params"]),
            "pruning/macs_reduction": 1.0 - step["macs"] / dense["macs"],
        }
        if latency is not None and dense.get("latency_ms"):
            metrics["pruning/latency_ms"] = latency
            metrics["pruning/speedup"] = dense["latency_ms"] / latency
        pl_module.log_dict(metrics, on_step=False, on_epoch=True, sync_dist=True)  # equal on all ranks
        if self.verbose:
            kept = sum(after for _, after in payload["channels"].values())
            total = sum(before for before, _ in payload["channels"].values())
            lat = ""
            if latency is not None and dense.get("latency_ms"):
                lat = f", latency {latency:.2f} ms (dense {dense['latency_ms']:.2f})"
            rank_zero_info(
                f"{type(self).__name__} step {index + 1}/{self.num_steps} at epoch {trainer.current_epoch}: "
                f"{total - kept} of {total} prunable channels removed; MACs {step['macs'] / 1e6:.2f}M "
                f"({metrics['pruning/macs_reduction']:.1%} below dense), params {step['params'] / 1e6:.3f}M{lat} "
                f"[{time.perf_counter() - start:.1f} s]"
            )

    # -- results ----------------------------------------------------------------------------------------------
    def save_plot(self, path: str) -> str:
        """Plot the recorded ``monitor`` values against MACs (one point per validation) and save a PNG."""
        fig, ax = new_figure(figsize=(5, 3.5))
        macs = [p["macs"] / 1e6 for p in self.curve]
        vals = [p[self.monitor] for p in self.curve]
        ax.plot(macs, vals, "-o", color="tab:blue")
        for p, x, y in zip(self.curve, macs, vals):
            ax.annotate(f"e{p['epoch']}", (x, y), fontsize=7, textcoords="offset points", xytext=(3, 3))
        if self.dense:
            ax.axvline(self.dense["macs"] / 1e6, color="grey", ls=":", label="dense MACs")
            ax.legend(fontsize=8)
        ax.set_xlabel("MACs per sample (M)")
        ax.set_ylabel(self.monitor)
        ax.set_title(f"{type(self).__name__}: {self.monitor} vs MACs", fontsize=9)
        return str(save_figure(fig, path, dpi=120))
