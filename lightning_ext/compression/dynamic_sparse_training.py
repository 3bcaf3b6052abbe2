"""DSL (Dynamic Sparse Learning, Wang et al., WSDM 2024): sparse-from-scratch training with prune-and-grow.

The pure core (:func:`update_ratio_schedule`, :func:`random_masks`, :func:`prune_and_grow`,
:class:`DynamicSparsity`) is in :mod:`lightning_ext.compression.dynamic_sparsity` (re-exported here) and works on
any set of parameters and any optimizer without a Trainer; the Lightning callback :class:`DynamicSparseTraining`
drives it from the training hooks.
"""

from __future__ import annotations

import math
from typing import Any, Optional, get_args

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from typing_extensions import override

from lightning_ext.compression.dynamic_sparsity import (
    DynamicSparsity,
    Targets,
    prune_and_grow,
    random_masks,
    sparse_parameters,
    update_ratio_schedule,
)
from lightning_ext.core.strategy import refuse_sharded_strategy
from lightning_ext.core.validation import OpenUnitInterval, PositiveInt, UnitIntervalRightOpen, check_choice, check_number

__all__ = ["DynamicSparseTraining", "DynamicSparsity", "prune_and_grow", "random_masks", "sparse_parameters",
           "update_ratio_schedule"]


class DynamicSparseTraining(Callback):
    r"""DSL (Wang et al., WSDM 2024): trains embeddings and linear layers sparse from scratch, pruning by magnitude and regrowing by gradient every ``delta_t`` steps.

    Paper: Wang, Sui, Wu, Zheng, Xiong, *"Dynamic Sparse Learning: A Novel Paradigm for Efficient
    Recommendation"*, WSDM 2024, arXiv 2402.02855. Reference code: https://github.com/shuyao-wang/DSL
    (``LightGCN/utils/core.py::Masking``; read, not copied).

    When training starts (``on_train_start``) every selected tensor gets a random mask keeping a share ``density`` of its entries (exact
    count, per tensor: the official ``sparse_init='uniform'``) and the weights are multiplied by it. Before each
    optimizer step the gradients are masked; after it the weights are re-masked. Every :math:`\Delta T` =
    ``delta_t`` optimizer steps, in every tensor, :math:`n = \lceil p_t \cdot nnz \rceil` active weights of smallest
    :math:`|w|` are dropped and the :math:`n` inactive positions with the largest :math:`|g|` of the current batch
    are grown (value 0), with the cosine update ratio

    .. math:: p_t = \eta_{min} + (p_0 - \eta_{min}) \, \tfrac{1}{2}\left(1 + \cos\tfrac{\pi t}{T}\right)

    (:math:`p_0` = ``update_ratio``, :math:`\eta_{min}` = ``min_update_ratio``, :math:`T` = ``total_steps``,
    default the Trainer's estimated optimizer steps). The optimizer state (momentum, Adam's moments) of the
    inactive entries is zeroed at every mask change; the masked gradients keep it zero in between. Each tensor's
    density stays fixed (the official ``redistribution='none'``); inside an embedding table the updates move
    capacity between rows, so users and items end with different numbers of active dimensions.

    Where this differs from the reference code: exact-count masks and stable top-k selections (the code draws
    Bernoulli masks and drops everything at or below the n-th magnitude, which drops more on ties); the gradients
    of inactive weights are masked before the step and Adam's moments are masked too (the code masks SGD
    momentum only, so its Adam keeps moments for inactive entries); ``mask_gradients=False`` restores the code's
    order (and masks Adam's first moment after each step).

    Distributed: masks are drawn from a CPU generator seeded with ``seed`` (the same on every rank) and updated
    from the all-reduced gradients of identical weights, so every rank computes the same masks; rank 0's masks are
    also broadcast after the draw and after every update, so no rank can drift (e.g. by a tie broken differently
    on another device). Strategies that shard parameters (FSDP, DeepSpeed) are refused in ``setup()``.
    The state (masks, step count, total steps, history) is saved in checkpoints, loads with ``weights_only=True``,
    and a resumed fit (also mid-epoch) continues exactly.

    Logged at each update (and kept in :attr:`history`): ``<prefix>update_ratio``, ``<prefix>grown`` (entries
    newly activated) and ``<prefix>density``.

    Args:
        density: share of each selected tensor kept active, in (0, 1) (official default 0.5).
        delta_t: optimizer steps between prune-and-grow updates, :math:`\Delta T` (official: 100 for MultVAE, 2000
            for NeuMF, 3000 for LightGCN).
        update_ratio: :math:`p_0`, the share of active weights replaced at the first update (official 0.5).
        min_update_ratio: :math:`\eta_{min}`, the ratio reached at ``total_steps`` (official 0.005).
        targets: module types made sparse: ``"all"`` (``nn.Embedding`` and ``nn.Linear``), ``"embedding"`` or
            ``"linear"``.
        layers: names or globs of the modules to make sparse among ``targets`` (``None``: all of them).
        ignored_layers: names or globs of modules to keep dense.
        include_bias: mask the biases of ``nn.Linear`` modules too (the official code masks every parameter).
        mask_gradients: mask the gradients before each step (default). ``False``: the official order (dense
            gradients into the step, then weights and first moments masked after it; second moments keep the
            inactive entries' history; see :class:`DynamicSparsity`).
        total_steps: :math:`T` (``None``: ``trainer.estimated_stepping_batches``).
        seed: seed of the initial masks.
        log_prefix: prefix of the logged metric names.
        verbose: print one line per update (rank 0).

    Example:
        >>> from lightning.pytorch import Trainer
        >>> from lightning_ext.datamodules import MovieLens100KDataModule
        >>> from lightning_ext.modules import MFBPR
        >>> dsl = DynamicSparseTraining(density=0.5, delta_t=100)
        >>> Trainer(max_epochs=50, callbacks=[dsl]).fit(MFBPR(), datamodule=MovieLens100KDataModule())  # doctest: +SKIP
        >>> dsl.history[-1]["density"]  # doctest: +SKIP
        0.5
    """

    def __init__(
        self,
        density: OpenUnitInterval = 0.5,
        delta_t: PositiveInt = 100,
        update_ratio: OpenUnitInterval = 0.5,
        min_update_ratio: UnitIntervalRightOpen = 0.005,
        targets: Targets = "all",
        layers: Optional[list[str]] = None,
        ignored_layers: Optional[list[str]] = None,
        include_bias: bool = True,
        mask_gradients: bool = True,
        total_steps: Optional[PositiveInt] = None,
        seed: int = 0,
        log_prefix: str = "dsl/",
        verbose: bool = False,
    ) -> None:
        super().__init__()
        check_number("density", density, low=0, high=1, low_open=True, high_open=True)
        check_number("delta_t (optimizer steps between updates)", delta_t, low=1, integer=True)
        check_number("update_ratio", update_ratio, low=0, high=1, low_open=True, high_open=True)
        check_number("min_update_ratio", min_update_ratio, low=0, high=update_ratio)
        check_choice("targets", targets, get_args(Targets))
        for arg, value in (("layers", layers), ("ignored_layers", ignored_layers)):
            if value is not None and (isinstance(value, str) or not all(isinstance(v, str) for v in value)):
                raise TypeError(f"`{arg}` must be a list of module names or globs, got {value!r}.")
        if layers is not None and len(layers) == 0:
            raise ValueError("`layers` is empty; leave it as None to make every targeted layer sparse.")
        if total_steps is not None:
            check_number("total_steps", total_steps, low=1, integer=True)
        check_number("seed", seed, integer=True)
        self.density, self.delta_t = float(density), int(delta_t)
        self.update_ratio, self.min_update_ratio = float(update_ratio), float(min_update_ratio)
        self.targets, self.include_bias, self.mask_gradients = targets, bool(include_bias), bool(mask_gradients)
        self.layers = list(layers) if layers is not None else None
        self.ignored_layers = list(ignored_layers) if ignored_layers is not None else None
        self.total_steps, self.seed, self.log_prefix, self.verbose = total_steps, int(seed), log_prefix, verbose
        self.sparsity: Optional[DynamicSparsity] = None
        self._loaded: Optional[dict[str, Any]] = None
        self._grads: Optional[dict[str, Tensor]] = None
        self._stepped = False

    @property
    def history(self) -> list[dict[str, float]]:
        """One record per prune-and-grow update: step, update ratio, entries grown, density."""
        return self.sparsity.history if self.sparsity is not None else []

    @property
    def masks(self) -> dict[str, Tensor]:
        """The current boolean masks, by parameter name (empty before fit)."""
        return self.sparsity.masks if self.sparsity is not None else {}

    @property
    @override
    def state_key(self) -> str:
        """Identifies this callback's state in a checkpoint by its density, interval and layers."""
        return self._generate_state_key(density=self.density, delta_t=self.delta_t, targets=self.targets,
                                        layers=self.layers, ignored_layers=self.ignored_layers)

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Refuse strategies that shard parameters; a new fit starts from new masks (a resume loads them after)."""
        refuse_sharded_strategy(trainer, "DynamicSparseTraining", "masks single weights of whole parameter tensors",
                                error=ValueError)
        if stage == "fit":
            self.sparsity, self._loaded, self._grads, self._stepped = None, None, None, False

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Select the layers and build the masks (or install the checkpoint's); mask weights and optimizer state.

        Done when training starts rather than in ``on_fit_start``: the train loader exists by then, so reading
        ``estimated_stepping_batches`` cannot rebuild it (which would drop a mid-epoch resume's loader state)."""
        params = sparse_parameters(pl_module, self.targets, self.layers, self.ignored_layers, self.include_bias)
        total = self.total_steps
        if total is None:
            estimated = trainer.estimated_stepping_batches
            if not math.isfinite(estimated):
                raise ValueError("DynamicSparseTraining cannot size its cosine schedule: the Trainer has no step "
                                 "limit (max_epochs=-1, max_steps=-1). Set `total_steps`.")
            total = max(1, int(estimated))
        loaded, self._loaded = self._loaded, None
        masks = loaded["masks"] if loaded is not None else None
        if masks is None and trainer.world_size > 1:
            masks = random_masks({n: tuple(p.shape) for n, p in params.items()}, self.density, self.seed)
            masks = trainer.strategy.broadcast(masks, src=0)
        self.sparsity = DynamicSparsity(params, self.density, self.delta_t, total, self.update_ratio,
                                        self.min_update_ratio, self.seed, masks=masks,
                                        mask_gradients=self.mask_gradients)
        if loaded is not None:
            self.sparsity.load_state_dict(loaded)
        self.sparsity.apply(trainer.optimizers)
        if self.verbose:
            rank_zero_info(f"DynamicSparseTraining: {len(params)} tensors at density {self.density} "
                           f"({sum(int(m.sum()) for m in self.sparsity.masks.values())} of "
                           f"{sum(m.numel() for m in self.sparsity.masks.values())} entries active), "
                           f"update every {self.delta_t} steps over T={self.sparsity.total_steps}.")

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer) -> None:
        """Mask the gradients (keeping dense copies before an update step)."""
        if self.sparsity is None:
            return
        grads = self.sparsity.before_step([optimizer])
        if grads is not None:
            self._grads = grads
        self._stepped = True

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """After an optimizer step: re-mask the weights; every ``delta_t`` steps prune and grow."""
        if self.sparsity is None or not self._stepped:
            return  # gradient accumulation or a skipped step: no optimizer step in this batch
        self._stepped = False
        record = self.sparsity.after_step(trainer.optimizers, self._grads)
        self._grads = None
        if record is None:
            return
        if trainer.world_size > 1:  # every rank computed the same masks; rank 0's are authoritative
            masks = trainer.strategy.broadcast({n: m.cpu() for n, m in self.sparsity.masks.items()}, src=0)
            self.sparsity.set_masks(masks)
            self.sparsity.apply(trainer.optimizers)
        row = {self.log_prefix + k: v for k, v in record.items() if k != "step"}
        row["epoch"] = float(trainer.current_epoch)  # as Lightning's own logging adds it
        for logger in trainer.loggers:
            logger.log_metrics(row, step=trainer.global_step)
        if self.verbose:
            rank_zero_info(f"DynamicSparseTraining: step {int(record['step'])}: update ratio "
                           f"{record['update_ratio']:.4f}, {int(record['grown'])} entries regrown.")

    @override
    def state_dict(self) -> dict[str, Any]:
        """Masks, step count, total steps and history (tensors and plain values: loads with weights_only=True)."""
        return self.sparsity.state_dict() if self.sparsity is not None else {}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the saved state; it is installed when training starts, once the layers are known."""
        self._loaded = dict(state_dict) if state_dict else None
