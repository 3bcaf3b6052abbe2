r"""``FireTogetherWireTogether``: FTWT dynamic channel gating as a Lightning callback over the pure core
:mod:`lightning_ext.compression.ftwt`."""

from __future__ import annotations

from typing import Any, Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from typing_extensions import override

from lightning_ext.compression.ftwt import Activation, FTWTGating, Target
from lightning_ext.core.inputs import example_inputs
from lightning_ext.core.optimization import add_param_group
from lightning_ext.core.strategy import refuse_sharded_strategy
from lightning_ext.core.step_wrapper import loss_of, unwrap_training_step, with_loss, wrap_training_step
from lightning_ext.core.validation import (
    ClosedUnitInterval,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    UnitIntervalLeftOpen,
    UnitIntervalRightOpen,
    check_choice,
    check_number,
    check_positive,
)

__all__ = ["FireTogetherWireTogether"]


class FireTogetherWireTogether(Callback):
    r"""FTWT (Elkerdawy et al., CVPR 2022): per-input channel gating of every conv+BN by mask predictors trained self-supervised on the heat-map mass target, decoupled from the task loss; logs dynamic MACs.

    Paper: Elkerdawy, Elhoushi, Zhang, Ray, *"Fire Together Wire Together: A Dynamic Pruning Approach with
    Self-Supervised Mask Prediction"*, CVPR 2022, arXiv 2110.08232. Reference code:
    https://github.com/selkerdawy/FTWT (``utils/layers.py``, ``utils/utils.py``, ``cifar.py``; read, not copied).

    Each ``Conv2d -> BatchNorm2d`` pair gets a predictor :math:`P_l` (global average pool of the layer input,
    softmax over its channels, linear with bias). The BN output is multiplied by the gate
    :math:`g = 1[\sigma(P_l(\operatorname{sg}(x))) > 0.5]` (equal to gating after a following ReLU). The
    predictors learn from the heat-map mass target: per sample, with :math:`p_c` the channel's spatial max of the
    (ReLU'd) BN output normalised over channels, sorted descending, channel :math:`c` is labelled 1 iff the
    cumulative mass up to it stays within :math:`r` (``mass_ratio``; see
    :func:`~lightning_ext.compression.ftwt.mass_targets`), and the loss the module's ``training_step`` returns
    becomes

    .. math:: L = L_{task} + w \cdot \frac{1}{L}\sum_l \sum_c \operatorname{mean}_b
              \operatorname{BCEWithLogits}(z_{l,bc}, t_{l,bc}),

    with :math:`w = 1` during the first ``cooldown`` share of the epochs (of ``max_steps`` when the Trainer has no
    epoch limit), then 0: the predictors are frozen and the backbone adapts to their gates. Because the predictor
    sees the detached input and the gate carries no gradient, the two terms train disjoint parameters (the
    official ``decoupled`` mode).

    **Optimizer.** The predictors belong to this callback (not to the module's ``state_dict``). In
    ``on_fit_start`` (after ``configure_optimizers``, before a resume restores optimizer states) they join
    optimizer ``optimizer_index`` as their own param group with group 0's hyperparameters except
    ``lr=predictor_lr`` and ``weight_decay=0`` (official: SGD, lr 0.1, no weight decay, no schedule); the
    optimizer's LR schedulers get an entry for the new group so they keep working, and the group's lr is set back
    to ``predictor_lr`` (0 after the cooldown) before every optimizer step, so the user's schedule never moves it.
    With Adam-like optimizers pick a smaller ``predictor_lr`` (e.g. 1e-3).

    **Dynamic MACs.** Per sample, over the gated convs: active output channels x output H*W x (active input
    channels / groups x k*k + bias), with active inputs those not exactly zero for that sample; see
    :class:`~lightning_ext.compression.ftwt.FTWTGating`. Logged per validation/test epoch as
    ``<prefix>val_macs``, ``<prefix>val_macs_reduction`` (1 - dynamic/dense over the gated convs) and their
    ``test`` twins (summed over processes under DDP), and kept in :attr:`summaries`. During training:
    ``<prefix>mask_loss``, ``<prefix>mask_acc``. The gates only save work with a gather-conv kernel; here the
    computation stays dense.

    The gates are on the module from ``setup`` to ``teardown`` of every stage, so ``trainer.validate/test`` with
    this callback run gated; outside Lightning, ``callback.gating.attach()`` gates the module again and
    ``detach()`` removes the hooks (a module is never left hooked, so it still pickles and copies).

    Supported: single device and DDP (predictor gradients averaged across processes before each step, the MACs
    counts summed), gradient accumulation, resume (the predictors are in this callback's state; also mid-epoch).
    Refused in ``setup``: sharded strategies and manual optimization.

    Args:
        mass_ratio: :math:`r`, the heat-map mass kept per sample, in (0, 1] (official default 1.0: only channels
            with ~zero activation are labelled 0).
        target: ``"mass"`` (default) or ``"uniform"`` (the official ``gt-type uniform``: the lowest
            ``pruning_ratio`` share of channels per sample labelled 0).
        pruning_ratio: for ``target="uniform"``, in [0, 1).
        cooldown: share of training with the predictors learning, in [0, 1] (official 0.5).
        predictor_lr: the predictors' learning rate (official 0.1 with SGD).
        softmax: softmax over the pooled input channels in each predictor (official default).
        activation: ``"relu"`` (official: the score is taken after the activation) or ``"none"`` (of the BN output).
        layers: conv names or globs to gate (relative to the LightningModule, e.g. ``net.3``); ``None`` = every conv
            followed by a BatchNorm2d.
        ignored_layers: conv names or globs never gated.
        input_shape: shape of one input (no batch) for the probe that finds the conv+BN pairs, if neither the
            module nor the datamodule tells it.
        optimizer_index: which optimizer trains the predictors.
        seed: seed of the predictors' initial weights.
        log_prefix: prefix of the logged names.
        verbose: print the gated layers at setup and the MACs per validation (rank 0).

    Example:
        >>> from torch import nn
        >>> from lightning.pytorch import Trainer
        >>> from lightning_ext.datamodules import DigitsDataModule
        >>> from lightning_ext.modules import ImageClassifier
        >>> net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        ...                     nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        ...                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
        >>> ftwt = FireTogetherWireTogether(mass_ratio=0.9, cooldown=0.5)
        >>> trainer = Trainer(max_epochs=2, limit_train_batches=3, limit_val_batches=2, callbacks=[ftwt],
        ...                   logger=False, enable_checkpointing=False, enable_progress_bar=False,
        ...                   enable_model_summary=False)
        >>> trainer.fit(ImageClassifier(net, num_classes=10, image_size=8), datamodule=DigitsDataModule())
        >>> sorted(ftwt.gating.keys.values()), 0 < ftwt.summaries["val"]["macs_reduction"] < 1
        (['net_0', 'net_3'], True)
    """

    def __init__(
        self,
        mass_ratio: UnitIntervalLeftOpen = 1.0,
        target: Target = "mass",
        pruning_ratio: UnitIntervalRightOpen = 0.0,
        cooldown: ClosedUnitInterval = 0.5,
        predictor_lr: PositiveFloat = 0.1,
        softmax: bool = True,
        activation: Activation = "relu",
        layers: Optional[list[str]] = None,
        ignored_layers: Optional[list[str]] = None,
        input_shape: Optional[list[PositiveInt]] = None,
        optimizer_index: NonNegativeInt = 0,
        seed: int = 0,
        log_prefix: str = "ftwt/",
        verbose: bool = False,
    ) -> None:
        super().__init__()
        check_number("mass_ratio (the heat-map mass r kept per sample)", mass_ratio, low=0, high=1, low_open=True)
        check_choice("target", target, ("mass", "uniform"))
        check_number("pruning_ratio", pruning_ratio, low=0, high=1, high_open=True)
        if target == "mass" and pruning_ratio:
            raise ValueError("`pruning_ratio` is for target='uniform'; with target='mass' set `mass_ratio` instead.")
        check_number("cooldown (share of training with the predictors learning)", cooldown, low=0, high=1)
        check_positive("predictor_lr", predictor_lr)
        check_choice("activation", activation, ("relu", "none"))
        for arg, value in (("layers", layers), ("ignored_layers", ignored_layers)):
            if value is not None and (isinstance(value, str) or not all(isinstance(v, str) for v in value)):
                raise TypeError(f"`{arg}` must be a list of module names or globs, got {value!r}.")
        if layers is not None and len(layers) == 0:
            raise ValueError("`layers` is empty; leave it as None to gate every conv followed by a BatchNorm2d.")
        if input_shape is not None:
            if len(input_shape) == 0:
                raise ValueError("input_shape must list the sizes of one input without the batch dimension, got [].")
            for d in input_shape:
                check_number("input_shape", d, low=1, integer=True)
        check_number("optimizer_index", optimizer_index, low=0, integer=True)
        check_number("seed", seed, integer=True)
        if not log_prefix:
            raise ValueError("`log_prefix` must be a non-empty string.")
        self.mass_ratio, self.target, self.pruning_ratio = float(mass_ratio), target, float(pruning_ratio)
        self.cooldown, self.predictor_lr = float(cooldown), float(predictor_lr)
        self.softmax, self.activation = bool(softmax), activation
        self.layers = list(layers) if layers is not None else None
        self.ignored_layers = list(ignored_layers) if ignored_layers is not None else None
        self.input_shape = tuple(int(d) for d in input_shape) if input_shape is not None else None
        self.optimizer_index, self.seed, self.log_prefix, self.verbose = optimizer_index, int(seed), log_prefix, verbose
        self.gating: Optional[FTWTGating] = None
        self.summaries: dict[str, dict[str, Any]] = {}
        self._pending: Optional[dict[str, Any]] = None
        self._module: Optional[LightningModule] = None
        self._learning = False

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (e.g. by ``ddp_spawn``) without the gating and the logging functions Lightning bound to the last
        fit's module: that module holds the gating hooks, and a fit on another module builds fresh predictors anyway
        (a checkpoint's state is what carries them over)."""
        state = self.__dict__.copy()
        state["gating"], state["_module"] = None, None
        for name in ("log", "log_dict"):  # Lightning binds these to the last fit's module, which holds the hooks
            state.pop(name, None)
        return state

    @property
    @override
    def state_key(self) -> str:
        """Distinct per target, mass ratio and layers."""
        return self._generate_state_key(mass_ratio=self.mass_ratio, target=self.target, layers=self.layers,
                                        ignored_layers=self.ignored_layers)

    # -- setup ------------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Refuse sharded strategies and manual optimization; find the conv+BN pairs, build the predictors, put
        the gates on the module and (for fit) wrap ``training_step`` to add the predictors' loss."""
        refuse_sharded_strategy(trainer, "FireTogetherWireTogether", "keeps whole mask predictors and gates whole "
                                "channels on every process", error=ValueError)
        if stage == "fit" and not pl_module.automatic_optimization:
            raise ValueError(f"{type(pl_module).__name__} uses manual optimization, so FireTogetherWireTogether "
                             "cannot add the predictors' loss; use lightning_ext.compression.ftwt.FTWTGating and "
                             "add gating.loss() to your loss yourself.")
        if self.gating is None or self.gating.model is not pl_module:
            if self.gating is not None:
                self.gating.detach()
            dm = getattr(trainer, "datamodule", None)
            shape = self.input_shape or (None if isinstance(getattr(pl_module, "example_input_array", None), Tensor)
                                         else getattr(dm, "input_shape", None))
            probe = example_inputs(pl_module, shape, trainer, batch_size=2)
            self.gating = FTWTGating(pl_module, probe, self.mass_ratio, self.target, self.pruning_ratio,
                                     self.softmax, self.activation, self.layers, self.ignored_layers, self.seed,
                                     owner="FireTogetherWireTogether")
            if self.verbose:
                rank_zero_info(f"FireTogetherWireTogether gates {len(self.gating.pairs)} conv+BN pairs: "
                               f"{', '.join(c for c, _ in self.gating.pairs)}.")
        if self._pending is not None:
            self.gating.load_state_dict(self._pending)
            self._pending = None
        self.gating.attach()
        self.gating.recording = False
        if stage == "fit":
            self._wrap(pl_module)

    def _wrap(self, pl_module: LightningModule) -> None:
        self._unwrap()
        wrap_training_step(pl_module, self, lambda step, args, kwargs: self._add_mask_loss(
            pl_module, step(*args, **kwargs)))
        self._module = pl_module

    def _unwrap(self) -> None:
        module, self._module = self._module, None
        if module is not None:
            unwrap_training_step(module, self)

    def _add_mask_loss(self, pl_module: LightningModule, output: Any) -> Any:
        gating = self.gating
        if output is None or not self._learning or not gating.has_records():
            gating.clear()
            return output
        try:
            task_loss = loss_of(output, pl_module, "FireTogetherWireTogether")
        except TypeError:
            gating.clear()
            raise
        loss_mask = gating.loss()
        pl_module.log(f"{self.log_prefix}mask_loss", loss_mask.detach(), on_step=True, on_epoch=False)
        pl_module.log(f"{self.log_prefix}mask_acc", gating.last_accuracy, on_step=True, on_epoch=False)
        return with_loss(output, task_loss + loss_mask.to(task_loss.dtype))

    # -- training ---------------------------------------------------------------------------------------------
    def _cooldown_reached(self, trainer: Trainer) -> bool:
        if self.cooldown >= 1:
            return False
        if self.cooldown <= 0:
            return True
        if trainer.max_epochs is not None and trainer.max_epochs > 0:
            return trainer.current_epoch >= int(self.cooldown * trainer.max_epochs)
        if trainer.max_steps is not None and trainer.max_steps > 0:
            return trainer.global_step >= int(self.cooldown * trainer.max_steps)
        raise ValueError("FireTogetherWireTogether cannot place its cooldown: the Trainer has neither max_epochs nor "
                         "max_steps. Set one, or cooldown=1.0 (predictors learn throughout) or 0.0 (never).")

    def _group(self, trainer: Trainer) -> dict:
        if self.optimizer_index >= len(trainer.optimizers):
            raise ValueError(f"`optimizer_index={self.optimizer_index}` but the module has "
                             f"{len(trainer.optimizers)} optimizer(s).")
        optimizer = trainer.optimizers[self.optimizer_index]
        params = list(self.gating.predictors.parameters())
        ids = {id(p) for p in params}
        for group in optimizer.param_groups:
            if any(id(p) in ids for p in group["params"]):
                return group
        schedulers = [c.scheduler for c in trainer.lr_scheduler_configs]
        return add_param_group(optimizer, params, schedulers, lr=self.predictor_lr, weight_decay=0.0)

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Move the predictors to the module's device, sync them from rank 0, add their param group."""
        self.gating.to(pl_module.device)
        if trainer.world_size > 1:
            state = {k: v.cpu() for k, v in self.gating.predictors.state_dict().items()}
            self.gating.predictors.load_state_dict(trainer.strategy.broadcast(state, src=0))
        self._cooldown_reached(trainer)  # refuse an unbounded Trainer before training
        self._group(trainer)

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        """Before the cooldown the predictors learn (their targets are recorded); after it they are frozen."""
        self._learning = not self._cooldown_reached(trainer)
        self.gating.recording = self._learning
        self.gating.measuring = False
        self.gating.predictors.train(self._learning)

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        """Pin the predictors' lr (0 after the cooldown); under DDP average their gradients across processes."""
        if optimizer is not trainer.optimizers[self.optimizer_index]:
            return
        self._group(trainer)["lr"] = self.predictor_lr if self._learning else 0.0
        if trainer.world_size <= 1 or not self._learning:
            return
        params = list(self.gating.predictors.parameters())
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = trainer.strategy.reduce(torch.cat([g.reshape(-1) for g in grads]), reduce_op="mean")
        offset = 0
        for p in params:
            p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
            offset += p.numel()

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Stop recording targets outside training steps."""
        self.gating.recording = False
        self.gating.clear()

    # -- evaluation: dynamic MACs -----------------------------------------------------------------------------
    def _start(self) -> None:
        self.gating.recording = False
        self.gating.measuring = True
        self.gating.reset_stats()

    def _finish(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        stats = self.gating.stats_tensor()
        if trainer.world_size > 1:
            stats = trainer.strategy.reduce(stats.to(pl_module.device), reduce_op="sum").cpu()
            self.gating.load_stats_tensor(stats)
        summary = self.gating.summary()
        self.gating.measuring = False
        if trainer.sanity_checking:
            return
        self.summaries[stage] = summary
        pl_module.log(f"{self.log_prefix}{stage}_macs", float(summary["macs"]))
        pl_module.log(f"{self.log_prefix}{stage}_macs_reduction", float(summary["macs_reduction"]))
        if self.verbose:
            rank_zero_info(f"FireTogetherWireTogether: {stage} dynamic MACs {summary['macs']:.4g} of "
                           f"{summary['dense_macs']:.4g} (-{100 * summary['macs_reduction']:.1f}%).")

    @override
    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Reset the MACs counts."""
        self._start()

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Log the mean dynamic MACs per sample of the validation epoch."""
        self._finish(trainer, pl_module, "val")

    @override
    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Reset the MACs counts."""
        self._start()

    @override
    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Log the mean dynamic MACs per sample of the test epoch."""
        self._finish(trainer, pl_module, "test")

    # -- teardown and state -----------------------------------------------------------------------------------
    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Remove the ``training_step`` wrapper and the gates' hooks (the predictors are kept)."""
        self._unwrap()
        if self.gating is not None:
            self.gating.recording = False
            self.gating.detach()

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        """Leave the user's module as it was when ``fit`` raises (Lightning runs no teardown then)."""
        self._unwrap()
        if self.gating is not None:
            self.gating.detach()

    @override
    def state_dict(self) -> dict[str, Any]:
        """The gated pairs and the predictors' weights (tensors and plain values: loads with weights_only=True)."""
        return self.gating.state_dict() if self.gating is not None else {}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the predictors now, or once ``setup`` has built them."""
        if not state_dict:
            return
        if self.gating is not None:
            self.gating.load_state_dict(state_dict)
        else:
            self._pending = dict(state_dict)
