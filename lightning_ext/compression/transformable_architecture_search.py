"""``TransformableArchitectureSearch``: the TAS width search during the first epochs of ``fit``, then the physically
thinner network keeps training (with :class:`~lightning_ext.distillation.KnowledgeDistillation` beside it).

The search itself is :class:`~lightning_ext.compression.tas.WidthSearch` (plain torch); this module adds the
schedule, the architecture optimiser, the checkpoint state and the pruning step.
"""

from __future__ import annotations

import copy
from typing import Any, Literal, Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.nn import functional as F
from typing_extensions import override

from lightning_ext.compression.filter_pruning import rebuild_optimizers
from lightning_ext.compression.graph import PruningError, resolve_layer_names
from lightning_ext.compression.history import (
    HISTORY_VERSION,
    _STATE_MARKER,
    _install_replay_hook,
    _remove_replay_hook,
    record_step,
    refuse_spawning_launcher,
)
from lightning_ext.compression.tas import (
    DEFAULT_WIDTH_RATIOS,
    WidthSearch,
    arch_optimizer_for,
    arch_step,
    tau_at,
)
from lightning_ext.core.inputs import batch_inputs, example_inputs
from lightning_ext.core.measure import count_macs_params
from lightning_ext.core.optional import require
from lightning_ext.core.strategy import refuse_sharded_strategy
from lightning_ext.core.validation import (
    NonNegativeFloat,
    OpenUnitInterval,
    PositiveFloat,
    PositiveInt,
    check_number,
    check_positive,
    check_positive_int,
)

__all__ = ["TransformableArchitectureSearch"]


class TransformableArchitectureSearch(Callback):
    r"""TAS (Dong & Yang, NeurIPS 2019): searches each conv's width with learnable distributions under a MACs target,
    then removes the unused filters physically.

    Paper: "Network Pruning via Transformable Architecture Search", arXiv 1905.09717; reference code
    https://github.com/D-X-Y/AutoDL-Projects (``docs/NeurIPS-2019-TAS.md``). The search space, the channel-wise
    interpolation, the expected-cost model and the loss
    :math:`\mathrm{CE} + \lambda_{cost} L_{flop}` are in :mod:`lightning_ext.compression.tas`.

    **Search phase** (epochs ``0 .. search_epochs - 1``): mixing hooks on the searched layers make the module's
    forward the Gumbel-mixed network (two sampled widths per layer, aligned by channel-wise interpolation). The
    module's own ``training_step`` trains the weights; after each batch the callback takes one architecture step on
    the same batch (cross-entropy of ``pl_module(x)`` against ``y`` plus ``flops_weight`` x the cost loss, Adam with
    betas (0.5, 0.999) on the logits only). Gumbel :math:`\tau` falls from ``tau_max`` to ``tau_min`` on a cosine
    over the search epochs. Validation during the search runs the most likely widths; each validation records
    those widths, their cost and ``monitor``.

    **Pruning** (start of epoch ``search_epochs``): with ``select="best_in_band"`` (the reference script's choice) the
    widths kept are those of the validation, among the search's, whose widths cost within ``flops_tolerance`` of the
    target and scored the best ``monitor``; without such a validation (or with ``select="last"``) the most likely
    widths at the end of the search, projected into the band when they miss it (``project``). The filters beyond each layer's kept width are removed by
    the library's pruning engine (:func:`~lightning_ext.compression.plan.apply_pruning_history`), the optimisers
    are rebuilt on the new parameters (LR schedule carried over) and the rest of ``fit`` retrains the thinner
    network. Add :class:`~lightning_ext.distillation.KnowledgeDistillation` with the dense model as teacher (the
    paper retrains with KD, T = 4, weight 0.9); give it ``weight: LinearWeight(start=0, end=0.9, steps=1,
    delay=<search steps>)`` to distil only after the search.

    Deviations from the paper (ours): width only (no depth search); one shared BatchNorm per layer; the
    architecture step uses the training batch (the paper alternates two halves of the training set; the
    functional :func:`~lightning_ext.compression.tas.search_step` takes two batches). Batches must be
    ``(inputs, targets)`` for a classifier whose forward returns logits.

    Checkpoints: the logits, the architecture optimiser, the Gumbel generator and, after pruning, the pruning
    history (replayed before the weights load, as for every pruning callback). Supported: one device. Refused in
    ``setup``: sharded strategies and several processes (the architecture step is per process).

    Args:
        macs_reduction: share of the dense MACs to remove, in (0, 1) (the paper's FLOPs target is ``1 - this``).
        search_epochs: epochs of search before the pruning step.
        width_ratios: candidate shares of each conv's channels (the reference code's 0.3 .. 1.0).
        tau_max: Gumbel temperature at the start of the search.
        tau_min: Gumbel temperature at its end.
        arch_lr: Adam learning rate of the architecture logits.
        arch_weight_decay: their weight decay.
        flops_weight: :math:`\lambda_{cost}` (the reference scripts' ``FLOP_weight`` 2).
        flops_tolerance: no cost loss while the most likely widths cost between ``target - tolerance`` and
            ``target`` (share of the dense MACs; ``FLOP_tolerant`` 0.05); also the band of ``select``.
        select: which widths to keep: ``"best_in_band"`` or ``"last"`` (see above).
        project: when the kept widths cost more than ``flops_tolerance`` away from the target, move them into the
            band with :meth:`~lightning_ext.compression.tas.WidthSearch.project_widths` (ours; the reference code
            keeps them as they are).
        monitor: the validation metric ``select="best_in_band"`` maximises.
        ignored_layers: conv names or globs (relative to the LightningModule) whose width is kept.
        input_shape: shape of one input without the batch dimension (default: from the module or the data).
        seed: seed of the logits and the Gumbel draws.
        verbose: print the searched widths when pruning.

    Example:
        >>> tas = TransformableArchitectureSearch(macs_reduction=0.5, search_epochs=2)
        >>> tas.width_ratios
        [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    """

    def __init__(
        self,
        macs_reduction: OpenUnitInterval = 0.5,
        search_epochs: PositiveInt = 1,
        width_ratios: Optional[list[PositiveFloat]] = None,
        tau_max: PositiveFloat = 5.0,
        tau_min: PositiveFloat = 0.1,
        arch_lr: PositiveFloat = 1e-3,
        arch_weight_decay: NonNegativeFloat = 1e-3,
        flops_weight: NonNegativeFloat = 2.0,
        flops_tolerance: NonNegativeFloat = 0.05,
        select: Literal["best_in_band", "last"] = "best_in_band",
        project: bool = True,
        monitor: str = "val_acc",
        ignored_layers: Optional[list[str]] = None,
        input_shape: Optional[list[PositiveInt]] = None,
        seed: int = 0,
        verbose: bool = True,
    ) -> None:
        require("torch_pruning", "TransformableArchitectureSearch")  # the pruning engine removes the filters
        super().__init__()
        check_number("macs_reduction", macs_reduction, low=0, high=1, low_open=True, high_open=True)
        check_positive_int("search_epochs", search_epochs)
        width_ratios = list(DEFAULT_WIDTH_RATIOS if width_ratios is None else width_ratios)
        if not width_ratios:
            raise ValueError("`width_ratios` must list at least one share of channels in (0, 1].")
        for i, r in enumerate(width_ratios):
            check_number(f"width_ratios[{i}]", r, low=0, high=1, low_open=True)
        for name, value in (("tau_max", tau_max), ("tau_min", tau_min), ("arch_lr", arch_lr)):
            check_positive(name, value)
        if tau_min > tau_max:
            raise ValueError(f"`tau_min` ({tau_min}) must not exceed `tau_max` ({tau_max}).")
        for name, value in (("arch_weight_decay", arch_weight_decay), ("flops_weight", flops_weight)):
            check_number(name, value, low=0)
        check_number("flops_tolerance", flops_tolerance, low=0, high=1, high_open=True)
        if select not in ("best_in_band", "last"):
            raise ValueError(f"`select` must be 'best_in_band' or 'last', got {select!r}.")
        if ignored_layers is not None and (isinstance(ignored_layers, str) or not all(
                isinstance(n, str) for n in ignored_layers)):
            raise ValueError(f"`ignored_layers` must be a list of module names or globs, got {ignored_layers!r}.")
        if input_shape is not None and (isinstance(input_shape, str) or not isinstance(input_shape, (list, tuple))):
            raise ValueError(f"`input_shape` must be a list of positive integers (no batch), got {input_shape!r}.")
        for i, size in enumerate(input_shape or []):
            check_positive_int(f"input_shape[{i}]", size)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"`seed` must be an int, got {seed!r}.")
        self.macs_reduction = float(macs_reduction)
        self.search_epochs = int(search_epochs)
        self.width_ratios = [float(r) for r in width_ratios]
        self.tau_max, self.tau_min = float(tau_max), float(tau_min)
        self.arch_lr, self.arch_weight_decay = float(arch_lr), float(arch_weight_decay)
        self.flops_weight, self.flops_tolerance = float(flops_weight), float(flops_tolerance)
        self.select, self.monitor = select, monitor
        if not isinstance(project, bool):
            raise ValueError(f"`project` must be true or false, got {project!r}.")
        self.project = project
        self.candidates: list[dict] = []  # per search validation: widths, their MACs share, the monitored value
        self.ignored_layers = list(ignored_layers or [])
        self.input_shape = None if input_shape is None else [int(s) for s in input_shape]
        self.seed = seed
        self.verbose = verbose
        self.search: Optional[WidthSearch] = None
        self.arch_optimizer: Optional[torch.optim.Optimizer] = None
        self.steps: list[dict] = []
        self.dense: dict = {}
        self._pending: Optional[dict] = None
        self._module: Optional[LightningModule] = None

    @property
    @override
    def state_key(self) -> str:
        """Identifies this callback's state by its target and schedule."""
        return self._generate_state_key(macs_reduction=self.macs_reduction, search_epochs=self.search_epochs)

    @property
    def pruned(self) -> bool:
        """Whether the searched widths have been applied."""
        return bool(self.steps)

    # -- Lightning hooks --------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Refuse unsupported strategies, check layer names and install the history replay before weights load."""
        refuse_sharded_strategy(trainer, type(self).__name__, "removes channels physically", error=PruningError)
        if stage == "fit" and trainer.world_size > 1:
            raise PruningError(
                f"{type(self).__name__} runs on one process only (world size {trainer.world_size}): each process "
                "would step its own architecture logits on its own batches. Search on one device, then train further "
                "with any strategy."
            )
        if stage == "fit":
            refuse_spawning_launcher(trainer, type(self).__name__)
            max_epochs = trainer.max_epochs if trainer.max_epochs is not None else -1
            if 0 <= max_epochs <= self.search_epochs:
                rank_zero_warn(f"{type(self).__name__}: the search takes {self.search_epochs} epochs but the run has "
                               f"{max_epochs}, so the searched widths are never applied; raise `max_epochs`.")
        resolve_layer_names(pl_module, self.ignored_layers)
        _install_replay_hook(pl_module)
        self._module = pl_module

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Build the search space (or restore it from the checkpoint) and attach the mixing hooks."""
        if self.pruned:  # (a run resumed at the end of the search prunes at its first epoch start)
            return
        x = self._example(trainer, pl_module)
        self.search = WidthSearch(pl_module, x, self.width_ratios, self.ignored_layers, self.seed).to(pl_module.device)
        self.search.check_reachable(self.macs_reduction, error=PruningError)
        self.arch_optimizer = arch_optimizer_for(self.search, self.arch_lr, self.arch_weight_decay)
        if self._pending is not None:
            self.search.load_state_dict(self._pending["logits"])
            self.search.load_extra_state(self._pending["extra"])
            self.arch_optimizer.load_state_dict(self._pending["arch_optimizer"])
            self._pending = None
        self.dense = {"macs": int(self.search.dense_macs), "params": int(self.search.dense_params)}
        self.search.attach(pl_module)

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Set the Gumbel temperature for this epoch, or apply the searched widths once the search is over."""
        if self.search is None:
            return
        if trainer.current_epoch >= self.search_epochs:
            self._prune(trainer, pl_module)
            return
        self.search.tau = tau_at(trainer.current_epoch / self.search_epochs, self.tau_max, self.tau_min)
        self.search.mode = "sample"

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        """Draw the widths the module's training step will mix."""
        if self.search is not None:
            self.search.mode = "sample"
            self.search.resample()

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """One architecture step on this batch (cross-entropy + the cost loss)."""
        if self.search is None:
            return
        if not (isinstance(batch, (tuple, list)) and len(batch) >= 2 and isinstance(batch[1], torch.Tensor)):
            raise PruningError(f"{type(self).__name__}'s architecture step needs (inputs, targets) batches for a "
                               f"classifier; got a {type(batch).__name__}.")
        x = batch_inputs(batch, PruningError, "the callback")
        stats = arch_step(pl_module, self.search, self.arch_optimizer, (x, batch[1]), self.macs_reduction,
                          self.flops_weight, self.flops_tolerance)
        pl_module.log_dict({"tas/arch_ce": stats["arch_ce"], "tas/flops_loss": stats["flops_loss"],
                            "tas/macs_share": stats["macs_share"], "tas/tau": float(self.search.tau)},
                           on_step=True, on_epoch=False)

    @override
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Validate the most likely widths during the search."""
        if self.search is not None:
            self.search.mode = "argmax"

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Record the validated widths with their cost and ``monitor``; back to Gumbel mixing for training."""
        if self.search is None:
            return
        self.search.mode = "sample"
        value = trainer.callback_metrics.get(self.monitor)
        if trainer.sanity_checking or value is None:
            return
        widths = self.search.widths()
        self.candidates.append({"epoch": int(trainer.current_epoch), "widths": widths, "value": float(value),
                                "macs_share": self.search.macs_of(widths) / self.search.dense_macs})

    def chosen_widths(self) -> dict[str, int]:
        """The widths the pruning step keeps (see ``select`` and ``project``)."""
        if self.select == "best_in_band":
            band = [c for c in self.candidates
                    if abs(c["macs_share"] - (1 - self.macs_reduction)) <= self.flops_tolerance + 1e-12]
            if band:
                return dict(max(band, key=lambda c: c["value"])["widths"])
        widths = self.search.widths()
        share = self.search.macs_of(widths) / self.search.dense_macs
        if self.project and abs(share - (1 - self.macs_reduction)) > self.flops_tolerance + 1e-12:
            widths = self.search.project_widths(self.macs_reduction, self.flops_tolerance, widths)
        return widths

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Remove the mixing hooks and the history replay hook."""
        if self.search is not None:
            self.search.detach()
        _remove_replay_hook(pl_module)

    @override
    def state_dict(self) -> dict[str, Any]:
        """The search (logits, Gumbel generator, temperature, Adam state) and the pruning history."""
        state: dict[str, Any] = {_STATE_MARKER: HISTORY_VERSION, "steps": copy.deepcopy(self.steps),
                                 "dense": dict(self.dense), "input_shape": self.input_shape,
                                 "candidates": copy.deepcopy(self.candidates)}
        if self.search is not None:
            state["search"] = {"logits": {k: v.detach().cpu().clone() for k, v in self.search.state_dict().items()},
                               "extra": self.search.extra_state(),
                               "arch_optimizer": copy.deepcopy(self.arch_optimizer.state_dict())}
        elif self._pending is not None:
            state["search"] = self._pending
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the history now and the search when it is rebuilt in ``on_fit_start``."""
        self.steps = list(state_dict.get("steps", []))
        self.dense = dict(state_dict.get("dense", {}))
        self.input_shape = state_dict.get("input_shape") or self.input_shape
        self.candidates = list(state_dict.get("candidates", []))
        self._pending = state_dict.get("search")

    # -- internals --------------------------------------------------------------------------------------------
    def _example(self, trainer: Trainer, pl_module: LightningModule) -> torch.Tensor:
        x = example_inputs(pl_module, self.input_shape, trainer, error=PruningError)
        self.input_shape = list(x.shape[1:])
        return x

    def _prune(self, trainer: Trainer, pl_module: LightningModule) -> None:
        search = self.search
        search.detach()
        x = self._example(trainer, pl_module)
        widths = self.chosen_widths()
        search.set_widths(widths)
        ops = search.prune(pl_module, x)
        record = record_step(pl_module, ops, x)
        rebuild_optimizers(trainer)
        macs, params = count_macs_params(pl_module, x)
        self.steps.append({**record, "epoch": int(trainer.current_epoch), "global_step": int(trainer.global_step),
                           "widths": widths, "macs": int(macs), "params": int(params)})
        self.search, self.arch_optimizer = None, None
        pl_module.log_dict({"tas/macs": float(macs), "tas/params": float(params),
                            "tas/macs_reduction": 1.0 - macs / self.dense["macs"]}, on_step=False, on_epoch=True)
        if self.verbose:
            rank_zero_info(f"{type(self).__name__}: searched widths {widths}; MACs {macs / 1e6:.3f}M "
                           f"({1 - macs / self.dense['macs']:.1%} below dense, target {self.macs_reduction:.0%})")
