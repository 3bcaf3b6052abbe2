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
import os
import time
from typing import Any, Iterable, Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_ext.core.optional import require
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
    replay_pruning_steps,
)
from lightning_ext.core.measure import count_macs_params, measure_latency
from lightning_ext.compression.plan import (
    PruningPlan,
    _apply_ops,
    _mark_applied,
    applied_pruning_steps,
    apply_pruning_history,
    plan_filter_pruning,
    prune_filters,
)

__all__ = [
    "FilterGroup", "FilterPruning", "PruningError", "PruningPlan", "apply_pruning_history", "applied_pruning_steps",
    "build_dependency_graph", "count_macs_params", "group_scores", "load_pruned_checkpoint", "measure_latency",
    "plan_filter_pruning", "prunable_filter_groups", "prune_filters", "pruning_steps_from_checkpoint",
    "rebuild_optimizers", "replay_pruning_steps", "resolve_layer_names",
]

_SHARDING_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy", "XLAFSDPStrategy")


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


def _batch_inputs(batch: Any) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    if isinstance(batch, dict):
        for key in ("x", "input", "inputs", "image", "images", "pixel_values"):
            if isinstance(batch.get(key), torch.Tensor):
                return batch[key]
    raise PruningError(
        f"Cannot find the model inputs in a training batch of type {type(batch).__name__}; batches must be a "
        "tensor, a tuple/list whose first item is the input tensor, or a dict with key 'x'. Otherwise subclass "
        "the callback and override `batch_inputs`."
    )


class FilterPruning(Callback):
    """Base callback: remove the least important conv filters physically, once or every N epochs, during fit.

    Subclasses supply the importance (:meth:`filter_scores`). At the start of each scheduled epoch the
    callback scores every conv filter, decides on rank 0 which channels each coupled group loses (broadcast to
    all ranks), removes them with Torch-Pruning's dependency graph, rebuilds the optimizers on the new
    parameters (the LR schedule continues) and, under DDP, re-wraps the model. The rest of ``fit`` fine-tunes.

    Schedule: steps at epochs ``start_epoch + i * every_n_epochs`` for ``i < num_steps``; after step ``i`` a
    share ``(i + 1) / num_steps`` of the target is reached (channel ratio of the original channels, or MACs
    reduction of the dense model's MACs).

    Checkpoints: the history (which channels were removed, in order) is the callback state. When a checkpoint
    is loaded through the Trainer (resume, ``validate/test(ckpt_path=...)``) it is replayed before the weights
    load; :func:`load_pruned_checkpoint` does the same for inference without a Trainer.

    Logged at each step: ``pruning/macs``, ``pruning/params``, ``pruning/macs_reduction`` and, when
    ``latency_repeats > 0``, ``pruning/latency_ms`` (batch ``latency_batch_size``) and ``pruning/speedup``
    against the dense model. At the end of fit a plot of ``monitor`` against MACs is saved.

    Args:
        ratio: share of each group's channels to remove in total, in (0, 1).
        target_macs_reduction: share of the dense model's MACs to remove in total, in (0, 1).
        start_epoch: epoch of the first step (0 = before any training).
        every_n_epochs: epochs between steps.
        num_steps: number of steps (1 = one-shot).
        ignored_layers: conv names (relative to the LightningModule, e.g. ``net.conv1``; shell patterns allowed)
            whose filters are kept.
        layer_ratios: per-conv channel ratios overriding ``ratio``.
        calibration_batches: training batches the data-aware importances look at (per process).
        round_to: keep a multiple of this many channels in each group (e.g. 8 for faster CPU/GPU kernels).
        monitor: metric plotted against MACs (recorded after each validation).
        latency_batch_size: batch size of the latency measurement.
        latency_repeats: timed forward passes per measurement; 0 skips latency.
        plot_path: where to save the plot (default ``<log_dir>/<ClassName>_accuracy_vs_macs.png``); ``""`` skips it.
        verbose: print a line per step.
    """

    needs_calibration_data: bool = False

    def __init__(
        self,
        ratio: Optional[float] = None,
        target_macs_reduction: Optional[float] = None,
        start_epoch: int = 0,
        every_n_epochs: int = 1,
        num_steps: int = 1,
        ignored_layers: Optional[list[str]] = None,
        layer_ratios: Optional[dict[str, float]] = None,
        calibration_batches: int = 1,
        round_to: int = 1,
        monitor: str = "val_acc",
        latency_batch_size: int = 64,
        latency_repeats: int = 10,
        plot_path: Optional[str] = None,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        if (ratio is None) == (target_macs_reduction is None):
            raise ValueError(
                f"{type(self).__name__}: give exactly one target: `ratio` (share of channels removed) or "
                "`target_macs_reduction` (share of MACs removed)."
            )
        if ratio is not None and not 0 < ratio < 1:
            raise ValueError(f"`ratio` must be in (0, 1) (the share of channels to remove), got {ratio}.")
        if target_macs_reduction is not None and not 0 < target_macs_reduction < 1:
            raise ValueError(f"`target_macs_reduction` must be in (0, 1), got {target_macs_reduction}.")
        if layer_ratios and ratio is None:
            raise ValueError("`layer_ratios` only applies together with `ratio`.")
        for name, r in (layer_ratios or {}).items():
            if not 0 <= r < 1:
                raise ValueError(f"`layer_ratios[{name!r}]` must be in [0, 1), got {r}.")
        if start_epoch < 0:
            raise ValueError(f"`start_epoch` must be >= 0, got {start_epoch}.")
        if every_n_epochs < 1:
            raise ValueError(f"`every_n_epochs` must be >= 1, got {every_n_epochs}.")
        if num_steps < 1:
            raise ValueError(f"`num_steps` must be >= 1 (1 = one-shot), got {num_steps}.")
        if calibration_batches < 1:
            raise ValueError(f"`calibration_batches` must be >= 1, got {calibration_batches}.")
        if round_to < 1:
            raise ValueError(f"`round_to` must be >= 1 (1 = no rounding), got {round_to}.")
        if latency_batch_size < 1:
            raise ValueError(f"`latency_batch_size` must be >= 1, got {latency_batch_size}.")
        if latency_repeats < 0:
            raise ValueError(f"`latency_repeats` must be >= 0 (0 skips latency), got {latency_repeats}.")
        if ignored_layers is not None and (
            isinstance(ignored_layers, str) or not all(isinstance(n, str) for n in ignored_layers)
        ):
            raise ValueError(f"`ignored_layers` must be a list of module names, got {ignored_layers!r}.")
        self.ratio = ratio
        self.target_macs_reduction = target_macs_reduction
        self.start_epoch = start_epoch
        self.every_n_epochs = every_n_epochs
        self.num_steps = num_steps
        self.ignored_layers = list(ignored_layers or [])
        self.layer_ratios = dict(layer_ratios or {})
        self.calibration_batches = calibration_batches
        self.round_to = round_to
        self.monitor = monitor
        self.latency_batch_size = latency_batch_size
        self.latency_repeats = latency_repeats
        self.plot_path = plot_path
        self.verbose = verbose
        self._reset_state()

    def _reset_state(self) -> None:
        self.steps: list[dict] = []
        self.curve: list[dict] = []
        self.dense: dict = {}  # macs, params, latency_ms of the model before the first step
        self.reference_channels: dict[str, int] = {}
        self.input_shape: Optional[list[int]] = None
        self.input_dtype = "float32"

    # -- schedule ---------------------------------------------------------------------------------------------
    @property
    def prune_epochs(self) -> list[int]:
        """The epochs at whose start a step runs."""
        return [self.start_epoch + i * self.every_n_epochs for i in range(self.num_steps)]

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            ratio=self.ratio, target_macs_reduction=self.target_macs_reduction, start_epoch=self.start_epoch,
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
        """The model input of a training batch (the first item of a tuple, or the batch itself)."""
        return _batch_inputs(batch)

    # -- Lightning hooks --------------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        strategy = trainer.strategy
        names = {c.__name__ for c in type(strategy).__mro__}
        refused = names.intersection(_SHARDING_STRATEGIES)
        if refused:
            raise PruningError(
                f"{type(self).__name__} removes channels physically, which needs every process to hold whole "
                f"parameters; {type(strategy).__name__} shards them. Use a single device or strategy='ddp'."
            )
        launcher = getattr(strategy, "launcher", None)
        if stage == "fit" and "_MultiProcessingLauncher" in {c.__name__ for c in type(launcher).__mro__}:
            raise PruningError(
                f"{type(self).__name__} cannot run under strategy='ddp_spawn'/'ddp_fork'/'ddp_notebook': at the end "
                "of fit Lightning copies rank 0's weights back into the main process's model, which still has the "
                "unpruned shapes there. Use strategy='ddp' (one script launched per process), or a single device."
            )
        resolve_layer_names(pl_module, self.ignored_layers)  # early, clear errors for misspelt names
        convs = set(_conv_names(pl_module))
        for name in self.layer_ratios:
            if name not in convs:
                close = difflib.get_close_matches(name, sorted(convs), n=4)
                raise PruningError(f"`layer_ratios` names {name!r}, which is not a Conv2d of the model."
                                   + (f" Close names: {', '.join(close)}." if close else ""))
        max_epochs = trainer.max_epochs if trainer.max_epochs is not None else -1
        if stage == "fit" and max_epochs >= 0 and self.prune_epochs[-1] >= max_epochs:
            rank_zero_warn(
                f"{type(self).__name__}: steps are scheduled at epochs {self.prune_epochs} but the run has "
                f"{max_epochs} epochs, so the target is not reached; lower `start_epoch`/`every_n_epochs`."
            )
        _install_replay_hook(pl_module)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        _remove_replay_hook(pl_module)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        epochs = self.prune_epochs
        while len(self.steps) < self.num_steps and epochs[len(self.steps)] <= trainer.current_epoch:
            self._prune_step(trainer, pl_module)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            return
        macs = self.steps[-1]["macs"] if self.steps else self._dense_stats(trainer, pl_module)["macs"]
        self.curve.append({"epoch": int(trainer.current_epoch), "step": len(self.steps), "macs": int(macs),
                           self.monitor: float(value)})

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.plot_path == "" or not self.curve:
            return
        root = trainer.log_dir or trainer.default_root_dir  # a collective under DDP: every rank calls it
        if not trainer.is_global_zero:
            return
        path = self.plot_path or os.path.join(root, f"{type(self).__name__}_accuracy_vs_macs.png")
        self.save_plot(path)

    def state_dict(self) -> dict[str, Any]:
        return {
            _STATE_MARKER: HISTORY_VERSION, "steps": copy.deepcopy(self.steps), "curve": copy.deepcopy(self.curve),
            "dense": dict(self.dense), "reference_channels": dict(self.reference_channels),
            "input_shape": self.input_shape, "input_dtype": self.input_dtype,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps = list(state_dict.get("steps", []))
        self.curve = list(state_dict.get("curve", []))
        self.dense = dict(state_dict.get("dense", {}))
        self.reference_channels = dict(state_dict.get("reference_channels", {}))
        self.input_shape = state_dict.get("input_shape")
        self.input_dtype = state_dict.get("input_dtype", "float32")

    # -- the step ---------------------------------------------------------------------------------------------
    def _example_inputs(self, trainer: Trainer, pl_module: LightningModule) -> torch.Tensor:
        if self.input_shape is None:
            example = getattr(pl_module, "example_input_array", None)
            if isinstance(example, torch.Tensor):
                x = example[:1]
            elif getattr(pl_module, "input_shape", None) is not None:
                x = torch.zeros(1, *pl_module.input_shape)
            else:
                x = self.batch_inputs(next(iter(self._train_loader(trainer))))[:1]
            self.input_shape = [1, *x.shape[1:]]
            self.input_dtype = str(x.dtype).replace("torch.", "")
        return torch.zeros(self.input_shape, dtype=getattr(torch, self.input_dtype), device=pl_module.device)

    @staticmethod
    def _train_loader(trainer: Trainer) -> Iterable:
        loader = trainer.train_dataloader
        while isinstance(loader, (list, tuple)) and loader:
            loader = loader[0]
        if isinstance(loader, dict) and loader:
            loader = next(iter(loader.values()))
        if loader is None:
            raise PruningError("No training dataloader is available for calibration batches.")
        return loader

    def _calibration_inputs(self, trainer: Trainer, pl_module: LightningModule) -> list[torch.Tensor]:
        inputs = []
        with torch.random.fork_rng(devices=[]):  # iterating a loader must not shift the training RNG stream
            for batch in self._train_loader(trainer):
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
                    ratio=None if self.ratio is None else self.ratio * fraction,
                    target_macs_reduction=(
                        None if self.target_macs_reduction is None else self.target_macs_reduction * fraction
                    ),
                    ignored_layers=self.ignored_layers,
                    layer_ratios={k: v * fraction for k, v in self.layer_ratios.items()},
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
        order = len(applied_pruning_steps(pl_module))
        _mark_applied(pl_module, payload["ops"])
        rebuild_optimizers(trainer)
        _rewrap_ddp(trainer)
        latency = self._latency_ms(trainer, pl_module)
        step = {
            "order": order, "epoch": int(trainer.current_epoch), "global_step": int(trainer.global_step),
            "ops": payload["ops"], "macs": int(payload["macs"]), "params": int(payload["params"]),
            "latency_ms": latency, "input_shape": list(self.input_shape), "input_dtype": self.input_dtype,
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
        require("matplotlib", "the pruning plot")
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fig, ax = plt.subplots(figsize=(5, 3.5))
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
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path
