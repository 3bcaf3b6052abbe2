"""``ActivatingWhilePruning``: the Lightning wrapper of Activate-while-Pruning (AP).

It watches the model for pruning done by any other callback (Lightning's ``ModelPruning``, this library's filter
pruners, a user's own pruner) and adds the AP step to every pruning event it sees. The pure core (dead-neuron
rate, the AP step, model cost) is :mod:`lightning_ext.compression.ap`.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_ext.compression.ap import (
    PRUNABLE_TYPES,
    _effective_weight,
    _is_reparametrized,
    _take,
    activation_coverage,
    ap_prune_step,
    dead_neuron_rate,
    kept_slices,
    model_cost,
)
from lightning_ext.compression.plan import recorded_channel_changes
from lightning_ext.core.inputs import batch_inputs, first_train_loader
from lightning_ext.core.layers import match_names
from lightning_ext.core.optional import require
from lightning_ext.core.strategy import refuse_sharded_strategy
from lightning_ext.core.validation import NonNegativeInt, OpenUnitInterval, check_number

__all__ = ["ActivatingWhilePruning", "ap_prune_step", "dead_neuron_rate", "model_cost"]


class ActivatingWhilePruning(Callback):
    r"""Activate-while-Pruning (AP): next to any pruner, removes the negative weights that moved least, to lower the dead-neuron rate.

    Paper: Liu, Ghosh, Tan, Motani, *"AP: Selective Activation for De-sparsifying Pruned Neural Networks"*
    (TMLR 2023 as "... Pruned Networks"), arXiv 2212.06145. Reference code:
    https://github.com/Martin1937/Activate-While-Pruning (``resnet_20.py``; read as
    ``Martin1937/AP-Activate-While-Pruning-``).

    AP is not a stand-alone pruner: put it on a Trainer next to one (Lightning's ``ModelPruning``,
    :class:`L1FilterPruning`, :class:`BetaRankPruning`, or your own) and configure that pruner to remove
    ``p - q`` per cycle (``cycle_pruning_ratio - pruning_ratio``). For each cycle AP records
    :math:`\theta_{start}` (the weights when training of the
    cycle starts, e.g. the rewound initialisation for lottery tickets) and :math:`\theta_{end}` (the weights
    at the end of each training epoch, before any pruner acts). When it sees that the base pruner has pruned
    (a weight mask lost entries, weights became exactly zero, or a layer shrank), it removes
    ``k = round(q * N)`` more weights (:math:`q` = ``pruning_ratio``), ``N`` being the weights alive at the
    start of the cycle, chosen among
    the surviving weights with :math:`\theta_{end} < 0` as those with the smallest movement
    :math:`|\theta_{end} - \theta_{start}|` (:func:`ap_prune_step`):

    .. math:: S_t = \operatorname{top}_k^{\min} \{\, |\theta_{end,i} - \theta_{start,i}| \;:\;
              m_i = 1,\ \theta_{end,i} < 0 \,\}, \qquad k = \operatorname{round}(q \cdot N_t)

    Removing a negative weight raises the pre-activation it feeds when that input is non-negative (ReLU
    outputs, pixels in [0, 1]), which lowers the dynamic dead-neuron rate (:func:`dead_neuron_rate`), the
    quantity the paper argues hurts pruned networks. For a first layer fed standardised (mean-zero) inputs it
    can raise it instead (measured in ``docs/results/activating_while_pruning.md``).

    Where this differs from the reference code: the budget is rounded rather than floored; the selection is a
    stable top-k instead of a ``<=`` threshold (which removes too many on ties, e.g. exact-zero movement); only
    Linear/Conv weights are pruned (the code used every parameter named ``weight``, BatchNorm scales
    included); and the cycle boundaries are the base pruner's events rather than a fixed epoch count.

    How it composes with pruners (no dependence on their internals):

    - ``torch.nn.utils.prune`` masks (``ModelPruning``): the AP selection is written into ``weight_mask``,
      so the base pruner's next step counts it as pruned.
    - Pruners that zero weights, and structured pruners that physically remove channels: AP keeps its own
      mask per layer. After every optimizer step it re-zeroes the pruned weights (base pruner's and its own)
      and their optimizer state (momentum, Adam moments), and it zeroes their gradients before the step, so
      momentum or weight decay cannot revive them. When a layer shrank, the kept slices are read from the
      recorded pruning steps (:func:`~lightning_ext.compression.plan.recorded_channel_changes`: this library's
      pruners, :func:`~lightning_ext.compression.apply_pruning_history` and checkpoint replays record them) and
      applied to the last :math:`\theta_{end}` and :math:`\theta_{start}` snapshots, so the AP step works on the
      surviving weights of the shrunk model; :math:`\theta_{start}` of the next cycle is recorded after the
      change. A layer that shrank without a recorded step (e.g. raw Torch-Pruning calls) is skipped for that
      cycle, with a warning.
    - Pruning must happen at epoch boundaries (any epoch-level hook, in any order of the callbacks list):
      AP processes a pruning event at the first training batch after it (or at ``on_train_end`` for the
      last epoch), so checkpoints hold either the state before or after the whole event and a resumed run
      matches an uninterrupted one.

    Use ``ignored_layers`` to spare layers (e.g. the output layer). Logged: ``<prefix>dnr`` after every training
    epoch on a fixed probe batch (the first ``probe_size`` training samples, ``eval`` mode, so BatchNorm uses
    running statistics and nothing is updated; every ReLU counts, ``nn.ReLU`` modules and ``F.relu`` calls alike, and
    a warning names the other activations, e.g. SiLU, that it cannot measure), and at each
    pruning event ``<prefix>{cycle, base_fraction, ap_pruned, sparsity, params, params_nonzero, macs,
    macs_nonzero, latency_ms, dnr}`` (also kept in :attr:`history`). Decisions are taken on rank 0 and
    broadcast under DDP; FSDP and DeepSpeed are refused (their parameters are sharded). The callback state
    (masks, :math:`\theta_{start}`, :math:`\theta_{end}`, history) is saved in checkpoints and loads with
    ``weights_only=True``; it holds two extra copies of the pruned layers' weights.

    Args:
        pruning_ratio: AP's share of each cycle, the paper's :math:`q`: a fraction of the weights alive at the
            cycle's start (reference: 0.02).
        cycle_pruning_ratio: the cycle's total pruning rate, the paper's :math:`p` (reference: 0.2), i.e. the
            base pruner removes ``p - q``. Optional: when given, ``q < p`` is checked and a warning says when the
            measured share removed by an unstructured base pruner is far from ``p - q``.
        layers: names or globs of the ``Linear``/``Conv`` modules AP may prune (``pl_module.named_modules()``
            names, e.g. ``net.0``, ``net.layer*``); all of them by default.
        ignored_layers: names or globs of modules to leave alone (e.g. the classifier head).
        probe_size: training samples in the fixed probe batch for DNR and latency (0 disables both).
        latency_repeats: timed forward passes of the probe batch per pruning event (0 disables latency).
        log_prefix: prefix of the logged metric names.
        verbose: print one line per pruning event (rank 0).

    Example:
        >>> from lightning.pytorch import Trainer
        >>> from lightning.pytorch.callbacks import ModelPruning
        >>> from lightning_ext import DigitsDataModule, ImageClassifier
        >>> model = ImageClassifier("resnet10t", num_classes=10, image_size=8)
        >>> pruner = ModelPruning("l1_unstructured", amount=0.18, parameter_names=["weight"],
        ...                       use_lottery_ticket_hypothesis=False)
        >>> ap = ActivatingWhilePruning(pruning_ratio=0.02, cycle_pruning_ratio=0.2)
        >>> Trainer(max_epochs=3, callbacks=[pruner, ap]).fit(model, datamodule=DigitsDataModule())  # doctest: +SKIP
        >>> ap.history[-1]["dnr"]  # doctest: +SKIP
    """

    def __init__(
        self,
        pruning_ratio: OpenUnitInterval = 0.02,
        cycle_pruning_ratio: Optional[OpenUnitInterval] = None,
        layers: Optional[list[str]] = None,
        ignored_layers: Optional[list[str]] = None,
        probe_size: NonNegativeInt = 128,
        latency_repeats: NonNegativeInt = 5,
        log_prefix: str = "ap/",
        verbose: bool = True,
    ) -> None:
        super().__init__()
        require("torch_pruning", "ActivatingWhilePruning")  # its MACs counter
        check_number("pruning_ratio", pruning_ratio, low=0, high=1, low_open=True, high_open=True)
        if cycle_pruning_ratio is not None:
            check_number("cycle_pruning_ratio", cycle_pruning_ratio, low=0, high=1, low_open=True, high_open=True)
            if pruning_ratio >= cycle_pruning_ratio:
                raise ValueError(
                    f"`pruning_ratio` ({pruning_ratio}) must be smaller than `cycle_pruning_ratio` "
                    f"({cycle_pruning_ratio}): AP takes a share q of each cycle's pruning rate p, and the base "
                    "pruner removes p - q. Lower `pruning_ratio` or raise `cycle_pruning_ratio`."
                )
        for arg, value in (("layers", layers), ("ignored_layers", ignored_layers)):
            if value is not None and (isinstance(value, str) or not all(isinstance(v, str) for v in value)):
                raise TypeError(f"`{arg}` must be a list of module names or globs, got {value!r}.")
        if layers is not None and len(layers) == 0:
            raise ValueError("`layers` is empty; leave it as None to let AP prune every Linear/Conv layer.")
        check_number("probe_size", probe_size, low=0, integer=True)
        check_number("latency_repeats", latency_repeats, low=0, integer=True)
        self.pruning_ratio = float(pruning_ratio)
        self.cycle_pruning_ratio = None if cycle_pruning_ratio is None else float(cycle_pruning_ratio)
        self.layers = list(layers) if layers is not None else None
        self.ignored_layers = list(ignored_layers) if ignored_layers is not None else []
        self.probe_size = int(probe_size)
        self.latency_repeats = int(latency_repeats)
        self.log_prefix = log_prefix
        self.verbose = verbose
        # state (saved in checkpoints)
        self.history: list[dict[str, float]] = []
        self._alive_ref: Optional[dict[str, Tensor]] = None
        self._theta_start: Optional[dict[str, Tensor]] = None
        self._theta_end: Optional[dict[str, Tensor]] = None
        self._changes_seen = 0  # recorded channel removals already accounted for
        self._warned_cycle = False
        # runtime only
        self._names: list[str] = []
        self._probe: Optional[Tensor] = None
        self._probe_ready = False
        self._coverage_checked = False
        self._check_pending = True

    @property
    @override
    def state_key(self) -> str:
        """Identifies this callback's state in a checkpoint by its ratios and layers."""
        return self._generate_state_key(pruning_ratio=self.pruning_ratio, cycle_pruning_ratio=self.cycle_pruning_ratio,
                                        layers=self.layers, ignored_layers=self.ignored_layers)

    # -- setup ----------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Refuse sharded strategies, resolve the layers AP may prune and start a new history for a new fit."""
        refuse_sharded_strategy(trainer, "ActivatingWhilePruning",
                                f"does not support {type(trainer.strategy).__name__}: it masks single weights",
                                error=RuntimeError)
        prunable = [name for name, m in pl_module.named_modules() if isinstance(m, PRUNABLE_TYPES)]
        owner = (f"the Linear/Conv modules of {type(pl_module).__name__} (Prunable modules: {sorted(prunable)[:20]}"
                 + (" ..." if len(prunable) > 20 else "") + ")")
        names = match_names(prunable, self.layers, "layers", owner) if self.layers is not None else prunable
        ignored = set(match_names(prunable, self.ignored_layers, "ignored_layers", owner))
        self._names = [n for n in names if n not in ignored]
        if not self._names:
            raise ValueError(
                "ActivatingWhilePruning has no layer to prune: the model has no Linear/Conv module outside "
                "`ignored_layers`. Check `layers`/`ignored_layers`."
            )
        if stage == "fit":  # a new fit starts a new history; a resumed fit loads its state after setup()
            self.history, self._warned_cycle = [], False
            self._alive_ref = self._theta_start = self._theta_end = None
        self._probe, self._probe_ready = None, False
        self._coverage_checked = False
        self._check_pending = True

    # -- helpers --------------------------------------------------------------------------------------------
    def _modules(self, pl_module: LightningModule) -> dict[str, nn.Module]:
        return {n: pl_module.get_submodule(n) for n in self._names}

    def _snapshot(self, pl_module: LightningModule) -> dict[str, Tensor]:
        return {n: _effective_weight(m)[0].clone() for n, m in self._modules(pl_module).items()}

    def _probe_inputs(self, trainer: Trainer, pl_module: LightningModule) -> Optional[Tensor]:
        if self._probe_ready:
            return self._probe
        self._probe_ready = True
        if self.probe_size == 0:
            return None
        dataset = getattr(first_train_loader(trainer), "dataset", None)
        try:
            n = min(self.probe_size, len(dataset))  # type: ignore[arg-type]
            batch = torch.utils.data.default_collate([dataset[i] for i in range(n)])  # type: ignore[index]
        except (TypeError, NotImplementedError, KeyError, AttributeError):
            rank_zero_warn(
                "ActivatingWhilePruning: the training dataset is not indexable, so no fixed probe batch can be "
                "built; the dead-neuron rate and latency are not logged (pruning is unaffected)."
            )
            return None
        try:
            x = batch_inputs(batch)
        except ValueError:
            rank_zero_warn(
                "ActivatingWhilePruning: training samples are not tensors or (input, target) tuples; the "
                "dead-neuron rate and latency are not logged (pruning is unaffected)."
            )
            return None
        self._probe = x.to(pl_module.device)
        return self._probe

    def _dnr(self, trainer: Trainer, pl_module: LightningModule) -> Optional[float]:
        probe = self._probe_inputs(trainer, pl_module)
        if probe is None:
            return None
        try:
            if not self._coverage_checked and not self._check_coverage(pl_module, probe):
                return None
            return float(dead_neuron_rate(pl_module, probe))
        except Exception as err:  # noqa: BLE001 - a logging aid must not stop training
            rank_zero_warn(
                f"ActivatingWhilePruning: the model cannot be called on the probe batch ({type(err).__name__}: "
                f"{err}); the dead-neuron rate and latency are not logged (pruning is unaffected). Set "
                "`probe_size: 0` to silence this."
            )
            self._probe = None
            return None

    def _check_coverage(self, pl_module: LightningModule, probe: Tensor) -> bool:
        """Warn once when the rate cannot cover every activation; ``False`` when the model applies no ReLU."""
        self._coverage_checked = True
        coverage = activation_coverage(pl_module, probe)
        if coverage["relu"] == 0:
            rank_zero_warn(
                "ActivatingWhilePruning: the model applies no ReLU (no nn.ReLU module, no F.relu/torch.relu call), so "
                "the dead-neuron rate is not logged; AP still prunes."
            )
            self._probe = None
            return False
        if coverage["other"]:
            others = ", ".join(f"{n} {kind}" for kind, n in sorted(coverage["other"].items()))
            rank_zero_warn(
                f"ActivatingWhilePruning: the dead-neuron rate covers {coverage['relu']} ReLU applications, but the "
                f"model (with {coverage['prunable']} prunable Linear/Conv layers) also applies {others} "
                "activations, which it cannot measure; the logged rate is over the ReLUs only."
            )
        return True

    def _log_events(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        row = {self.log_prefix + k: float(v) for k, v in metrics.items()}
        row["epoch"] = float(trainer.current_epoch)  # as Lightning's own logging adds it
        for logger in trainer.loggers:
            logger.log_metrics(row, step=trainer.global_step)

    # -- masks through optimisation -------------------------------------------------------------------------
    def _own_masks(self, pl_module: LightningModule):
        if self._alive_ref is None:
            return
        for name, module in self._modules(pl_module).items():
            if _is_reparametrized(module):
                continue  # torch.nn.utils.prune applies weight_mask in forward; gradients are masked by it
            mask = self._alive_ref.get(name)
            weight = module.weight
            if mask is None or mask.shape != weight.shape:
                continue  # a shape change not processed yet (between a structured prune and the next batch)
            if mask.device != weight.device:
                mask = self._alive_ref[name] = mask.to(weight.device)
            yield module, weight, mask

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer) -> None:
        """Zero the gradients of pruned weights (base pruner's and AP's)."""
        for _module, weight, mask in self._own_masks(pl_module):
            if weight.grad is not None:
                weight.grad.mul_(mask)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Re-zero pruned weights and their optimizer state; at the epoch's end snapshot theta_end, log the DNR."""
        optimizers = trainer.optimizers
        with torch.no_grad():
            for _module, weight, mask in self._own_masks(pl_module):
                weight.mul_(mask)
                for opt in optimizers:
                    for value in opt.state.get(weight, {}).values():
                        if isinstance(value, Tensor) and value.shape == mask.shape:
                            value.mul_(mask)
        total = trainer.num_training_batches
        if math.isinf(total) or batch_idx + 1 >= total:
            self._theta_end = self._snapshot(pl_module)  # before any epoch-end pruner acts
            dnr = self._dnr(trainer, pl_module)
            if dnr is not None:
                pl_module.log(self.log_prefix + "dnr", dnr, on_step=False, on_epoch=True, sync_dist=True)

    # -- cycle bookkeeping ----------------------------------------------------------------------------------
    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Check for a pruning event at the epoch's first batch."""
        self._check_pending = True

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        """Process a pending pruning event, then snapshot theta_start at the cycle's first batch."""
        if self._check_pending:
            self._check_pending = False
            self._process(trainer, pl_module, final=False)
        if self._theta_start is None:
            self._theta_start = self._snapshot(pl_module)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Process a pruning event at the last epoch's end."""
        self._process(trainer, pl_module, final=True)  # pruning at the last epoch's end

    def _process(self, trainer: Trainer, pl_module: LightningModule, final: bool) -> None:
        """Detect a pruning event by another callback since the last check and add the AP step to it."""
        modules = self._modules(pl_module)
        current = {n: _effective_weight(m) for n, m in modules.items()}
        changes = recorded_channel_changes(pl_module)  # the channel removals of the recorded pruning steps
        new_changes = changes[min(self._changes_seen, len(changes)):]
        self._changes_seen = len(changes)
        if self._alive_ref is None:
            self._alive_ref = {n: alive.clone() for n, (_, alive) in current.items()}
            return
        reshaped = [n for n in modules if current[n][1].shape != self._alive_ref[n].shape]
        pruned = any(
            bool((self._alive_ref[n].to(alive.device) & ~alive).any())
            for n, (_, alive) in current.items()
            if n not in reshaped
        )
        if not reshaped and not pruned:
            revived = any(
                bool((alive & ~self._alive_ref[n].to(alive.device)).any()) for n, (_, alive) in current.items()
            )
            if revived:  # a pruner that regrows weights: follow it
                self._alive_ref = {n: alive.clone() for n, (_, alive) in current.items()}
            return
        self._ap_event(trainer, pl_module, modules, current, reshaped, final, new_changes)

    def select(self, weights_start: dict[str, Tensor], weights_end: dict[str, Tensor], masks: dict[str, Tensor],
               k: int) -> dict[str, Tensor]:
        """The weights this callback removes at a pruning event: :func:`ap_prune_step` (a subclass may choose
        others with the same budget and timing, e.g. an equal-budget control in a benchmark)."""
        return ap_prune_step(weights_start, weights_end, masks, k)

    def _ap_event(self, trainer, pl_module, modules, current, reshaped, final, changes) -> None:
        n_start = sum(int(m.sum()) for m in self._alive_ref.values())
        alive_now = {n: alive for n, (_, alive) in current.items()}
        n_after_base = sum(int(m.sum()) for m in alive_now.values())
        start, end = self._theta_start, self._theta_end
        skipped: list[str] = []
        usable: list[str] = []
        if start is None or end is None:
            skipped = list(modules)
        else:
            for n in modules:
                s, e = start.get(n), end.get(n)
                if s is None or e is None or s.shape != e.shape:
                    skipped.append(n)
                elif n in reshaped:
                    idx = kept_slices(e.shape, changes, n)
                    if idx is None or [len(i) for i in idx] != list(current[n][0].shape):
                        skipped.append(n)
                    else:
                        start[n], end[n] = _take(s, idx), _take(e, idx)
                        usable.append(n)
                elif e.shape == alive_now[n].shape:
                    usable.append(n)
                else:
                    skipped.append(n)
        if skipped:
            rank_zero_warn(
                f"ActivatingWhilePruning: no consistent start/end weights for {skipped[:5]}"
                + (" ..." if len(skipped) > 5 else "")
                + " at this pruning event (pruned before the first training epoch ended, mid-epoch, or shrunk "
                "without a recorded pruning step: use this library's pruners or `apply_pruning_history`); AP skips "
                "them this cycle."
            )
        k = int(round(self.pruning_ratio * n_start))
        new_masks = dict(alive_now)
        if usable and k > 0:
            sub = None
            if trainer.is_global_zero:  # decided on rank 0, broadcast (on CPU) to every rank
                sub = self.select(
                    {n: start[n] for n in usable}, {n: end[n] for n in usable}, {n: alive_now[n] for n in usable}, k
                )
                sub = {n: m.cpu() for n, m in sub.items()}
            sub = trainer.strategy.broadcast(sub, src=0)
            new_masks.update({n: m.to(alive_now[n].device) for n, m in sub.items()})
        with torch.no_grad():
            for n, module in modules.items():
                mask = new_masks[n]
                if _is_reparametrized(module):
                    module.weight_mask.mul_(mask.to(module.weight_mask.dtype))
                else:
                    module.weight.mul_(mask.to(module.weight.dtype))
                    for opt in trainer.optimizers:
                        for value in opt.state.get(module.weight, {}).values():
                            if isinstance(value, Tensor) and value.shape == mask.shape:
                                value.mul_(mask.to(value.dtype))
        ap_pruned = n_after_base - sum(int(m.sum()) for m in new_masks.values())
        self._alive_ref = {n: m.clone() for n, m in new_masks.items()}
        self._theta_start, self._theta_end = None, None  # the next cycle starts at the next training batch
        base_fraction = (n_start - n_after_base) / max(1, n_start) if not reshaped else float("nan")
        p, q = self.cycle_pruning_ratio, self.pruning_ratio
        if (p is not None and not reshaped and not self._warned_cycle
                and abs(base_fraction - (p - q)) > 0.25 * (p - q)):
            self._warned_cycle = True
            rank_zero_warn(
                f"ActivatingWhilePruning: the base pruner removed {base_fraction:.3f} of the surviving weights "
                f"in this cycle, but p - q = {p - q:.3f}. Set the base pruner's amount to p - q (AP adds "
                "q) or set `cycle_pruning_ratio` to match."
            )
        total = sum(m.numel() for m in new_masks.values())
        alive_total = sum(int(m.sum()) for m in new_masks.values())
        event: dict[str, float] = {
            "cycle": float(len(self.history) + 1),
            "epoch": float(trainer.current_epoch),
            "step": float(trainer.global_step),
            "base_fraction": base_fraction,
            "ap_requested": float(k),
            "ap_pruned": float(ap_pruned),
            "alive": float(alive_total),
            "sparsity": 1.0 - alive_total / max(1, total),
        }
        dnr = self._dnr(trainer, pl_module)
        if dnr is not None:
            event.update({k_: float(v) for k_, v in model_cost(pl_module, self._probe, self.latency_repeats).items()})
            event["dnr"] = dnr
        self.history.append(event)
        self._log_events(trainer, {k_: v for k_, v in event.items() if k_ not in ("epoch", "step")})
        if self.verbose:
            extra = f", DNR {event['dnr']:.3f}" if "dnr" in event else ""
            rank_zero_info(
                f"ActivatingWhilePruning: cycle {int(event['cycle'])} "
                f"{'at the end of training' if final else f'before epoch {trainer.current_epoch}'}: base pruner "
                f"removed {n_start - n_after_base}, AP "
                f"removed {ap_pruned} negative slow weights; sparsity {event['sparsity']:.3f}{extra}."
            )

    # -- checkpoints ----------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        """Masks, theta_start, theta_end and the history (plain tensors: loads with weights_only=True)."""
        def cpu(d):
            return None if d is None else {k: v.detach().cpu().clone() for k, v in d.items()}

        return {
            "alive_ref": cpu(self._alive_ref),
            "theta_start": cpu(self._theta_start),
            "theta_end": cpu(self._theta_end),
            "history": [dict(h) for h in self.history],
            "warned_cycle": self._warned_cycle,
            "changes_seen": self._changes_seen,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the state saved by :meth:`state_dict`."""
        self._alive_ref = state_dict["alive_ref"]
        self._theta_start = state_dict["theta_start"]
        self._theta_end = state_dict["theta_end"]
        self.history = [dict(h) for h in state_dict["history"]]
        self._warned_cycle = bool(state_dict.get("warned_cycle", False))
        self._changes_seen = int(state_dict.get("changes_seen", 0))
        self._check_pending = True
