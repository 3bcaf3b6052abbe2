r"""``KnowledgeDistillation``: add a frozen teacher to any training run, without changing its LightningModule.

A thin wrapper of :class:`~lightning_ext.distillation.distiller.Distiller` (teacher, forward hooks, projectors
and the loss terms) and :func:`~lightning_ext.distillation.teacher.build_teacher`; the explicit counterpart is
:class:`~lightning_ext.distillation.module.DistillationModule`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional, Union

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_ext.core.inputs import example_inputs
from lightning_ext.core.optimization import add_param_group
from lightning_ext.core.strategy import refuse_sharded_strategy
from lightning_ext.core.step_wrapper import FitStepWrapping, loss_of, with_loss
from lightning_ext.core.validation import (
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    check_choice,
    check_number,
    check_positive,
)
from lightning_ext.distillation.distiller import Distiller, InputKey, select_input
from lightning_ext.distillation.losses import COMBINE_MODES, CombineMode, WeightSchedule, as_schedule, combine_losses
from lightning_ext.distillation.teacher import build_teacher

__all__ = ["KnowledgeDistillation"]

class KnowledgeDistillation(FitStepWrapping, Callback):
    r"""Knowledge distillation from a frozen teacher into any LightningModule, without changing its code.

    ``Trainer(callbacks=[KnowledgeDistillation(teacher=...)])`` adds the distillation terms to the loss the
    module's own ``training_step`` returns:

    .. math::
        L = (1 - \alpha_k)\, L_{task} + \alpha_k\, T^2\, \mathrm{KL}\big(\mathrm{softmax}(z_t/T) \,\|\,
            \mathrm{softmax}(z_s/T)\big) + \beta_k \sum_{(i,j)} \mathrm{MSE}\big(r_{ij}(h^s_i), h^t_j\big)

    (``combine="add"`` uses :math:`L_{task} + \alpha_k L_{KD}` instead), where :math:`\alpha_k`,
    :math:`\beta_k` are the weights (numbers or schedules of the optimizer step :math:`k`), :math:`z` are
    logits, :math:`h` hooked features and :math:`r_{ij}` learnable projectors. Papers: Hinton, Vinyals, Dean,
    *Distilling the Knowledge in a Neural Network*, arXiv:1503.02531 (no official code; torchdistill's
    ``KDLoss``, https://github.com/yoshitomo-matsubara/torchdistill, is the usual reference); FitNets
    (Romero et al., arXiv:1412.6550, https://github.com/adri-romsor/FitNets) for feature hints; for training
    on pruned data, Ben-Baruch et al., *Distilling the Knowledge in Data Pruning*, arXiv:2403.07854 (no code
    released): combine with ``train_fraction`` on the datamodule and ``weight: KeptFractionWeight``.

    **How a callback changes the loss.** Callback hooks cannot alter the loss, so in ``setup("fit")`` the
    callback installs an instance attribute ``pl_module.training_step`` that calls the original method and
    returns ``loss + distillation`` (the class and its code are untouched; ``teardown`` removes it). The
    student's logits are read by a forward hook on ``student_module`` (default: the LightningModule itself,
    i.e. ``self(x)``) while that original ``training_step`` runs; by default the teacher gets the tensor that
    hooked student module received, i.e. what the student saw after any augmentation inside ``training_step``
    (``input_key`` picks ``batch[input_key]`` instead). Because the sum is returned by
    ``training_step`` itself, Lightning treats it as the module's loss: gradient accumulation divides it like
    any loss, DDP all-reduces the student's gradients, autocast covers the teacher's forward (the KD terms are
    computed in float32), and the student's gradients equal those of the explicitly combined loss (tested).

    **Teacher.** Frozen (``requires_grad=False``) and put in eval mode in ``setup`` (after checking it shares
    no parameter with the student), moved to the student's device (and dtype under
    ``*-true`` precision) in ``on_fit_start``; it is an attribute of the callback, so it is neither in the
    student's ``state_dict``/checkpoint nor in its optimizer. See :func:`~lightning_ext.distillation.teacher.build_teacher` for the accepted
    forms; weights load with ``torch.load(weights_only=True)``. Before training, ``setup`` runs teacher and
    student once on a probe input (``input_shape``, the module's ``example_input_array``, the datamodule's
    ``input_shape``, or its first training batch) and refuses a teacher whose outputs differ from the
    student's, or that cannot take the student's inputs.

    **Projectors.** Feature pairs whose widths differ get a 1x1-conv/linear projector (built in ``setup``
    with ``projector_seed``). They belong to the callback, not to the module: in ``on_fit_start`` (after
    ``configure_optimizers``, before Lightning restores optimizer states on resume) they join optimizer
    ``optimizer_index`` as a new param group copying group 0's hyperparameters (the optimizer's LR schedulers
    get group 0's entry in their per-group lists: ``base_lrs``, ``lr_lambdas`` of ``LambdaLR`` and
    ``MultiplicativeLR``, ``min_lrs``, ``max_lrs``, inside ``SequentialLR`` too, so they schedule it like group 0); their weights are in this callback's
    ``state_dict``; under DDP their gradients are averaged across ranks before each optimizer step.

    Supported: single device, DDP/ddp_spawn, mixed and true precision, gradient accumulation, resume. Refused
    in ``setup``: FSDP, DeepSpeed, model-parallel and XLA strategies (the teacher and projectors are not
    sharded), and manual optimization (call :class:`~lightning_ext.distillation.distiller.Distiller` yourself, or use
    :class:`~lightning_ext.distillation.module.DistillationModule`).

    Args:
        teacher: an ``nn.Module`` (YAML: ``class_path``/``init_args``), ``"timm:<name>"``,
            ``"torchvision:<name>"`` or a module class path; see :func:`~lightning_ext.distillation.teacher.build_teacher`.
        teacher_checkpoint: local weights file for the teacher (state dict or Lightning checkpoint).
        teacher_kwargs: constructor arguments when ``teacher`` is a name or class path.
        weight: logit-KD weight :math:`\alpha` (a number or a
            :class:`~lightning_ext.distillation.losses.WeightSchedule`).
        temperature: KD temperature :math:`T`.
        combine: ``"convex"`` (:math:`(1-\alpha) L_{task} + \alpha L_{KD}`) or ``"add"``
            (:math:`L_{task} + \alpha L_{KD}`).
        feature_pairs: ``{student module: teacher module}`` names for feature distillation; student names are
            relative to the LightningModule (``net.layer3`` for our classifiers), teacher names to the teacher.
        feature_weight: weight :math:`\beta` of the feature terms (number or schedule).
        student_module: the module (relative to the LightningModule) whose output are the student's logits;
            ``""`` is the LightningModule's own forward.
        input_key: ``null`` (default): the teacher gets the input of ``student_module``, what the student saw;
            an int (tuple batches) or a str (dict batches) gives it ``batch[input_key]`` instead.
        input_shape: shape of one input (no batch dim) for the pre-training probe, if it cannot be inferred.
        optimizer_index: which of the module's optimizers trains the projectors.
        projector_seed: seed of the projectors' initial weights.
        log_prefix: logged as ``<prefix>_loss``, ``<prefix>_feature_loss`` and ``<prefix>_weight``.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> from lightning_ext import DigitsDataModule, ImageClassifier
        >>> student = ImageClassifier(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), image_size=8)
        >>> teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        >>> kd = KnowledgeDistillation(teacher, weight=0.9, temperature=4.0)
        >>> trainer = Trainer(max_steps=2, callbacks=[kd], logger=False, enable_checkpointing=False,
        ...                   enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(student, datamodule=DigitsDataModule())
        >>> sorted(k for k in trainer.callback_metrics if k.startswith("train_kd"))
        ['train_kd_loss', 'train_kd_weight']
        >>> "training_step" in vars(student), kd.teacher.training  # wrapper removed; teacher frozen in eval mode
        (False, False)
    """

    def __init__(
        self,
        teacher: Union[str, nn.Module],  # str first: the parser keeps a class path as a string (build_teacher reads it)
        teacher_checkpoint: Optional[str] = None,
        teacher_kwargs: Optional[dict] = None,
        weight: Union[float, WeightSchedule] = 0.9,
        temperature: PositiveFloat = 4.0,
        combine: CombineMode = "convex",
        feature_pairs: Optional[dict[str, str]] = None,
        feature_weight: Union[float, WeightSchedule] = 1.0,
        student_module: str = "",
        input_key: InputKey = None,
        input_shape: Optional[list[PositiveInt]] = None,
        optimizer_index: NonNegativeInt = 0,
        projector_seed: int = 0,
        log_prefix: str = "train_kd",
    ) -> None:
        super().__init__()
        check_choice("combine", combine, COMBINE_MODES)
        check_positive("temperature", temperature)
        self.weight = as_schedule(weight, "weight", combine)
        self.feature_weight = as_schedule(feature_weight, "feature_weight")
        if feature_pairs is not None and (
            not isinstance(feature_pairs, Mapping)
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in feature_pairs.items())
        ):
            raise TypeError("`feature_pairs` must map student module names to teacher module names (str: str).")
        if not isinstance(student_module, str):
            raise TypeError(f"`student_module` must be a module name (str), got {type(student_module).__name__}.")
        if input_key is not None and (isinstance(input_key, bool) or not isinstance(input_key, (int, str))):
            raise TypeError(f"`input_key` must be an int, a str or null, got {input_key!r}.")
        if input_shape is not None:
            if len(input_shape) == 0:
                raise ValueError("input_shape must list the sizes of one input without the batch dimension, got [].")
            for d in input_shape:
                check_number("input_shape", d, low=1, integer=True)
        check_number("optimizer_index", optimizer_index, low=0, integer=True)
        check_number("projector_seed", projector_seed, integer=True)
        if not log_prefix:
            raise ValueError("`log_prefix` must be a non-empty string.")
        teacher_name = teacher if isinstance(teacher, str) else type(teacher).__name__
        self.teacher = build_teacher(teacher, teacher_checkpoint, teacher_kwargs, freeze=False)  # frozen in setup
        self.temperature = float(temperature)
        self.combine = combine
        self.feature_pairs = dict(feature_pairs or {})
        self.student_module = student_module
        self.input_key = input_key
        self.input_shape = tuple(int(d) for d in input_shape) if input_shape is not None else None
        self.optimizer_index = optimizer_index
        self.projector_seed = projector_seed
        self.log_prefix = log_prefix
        self._teacher_name = teacher_name
        self._distiller = Distiller(self.teacher, self.temperature, self.feature_pairs, student_module, projector_seed,
                                    freeze=False)
        self._pending_state: Optional[dict] = None
        self._module: Optional[LightningModule] = None

    @property
    @override
    def state_key(self) -> str:
        """Distinct per teacher, feature pairs, student module and log prefix (several instances may coexist)."""
        return self._generate_state_key(
            teacher=self._teacher_name, feature_pairs=self.feature_pairs, student_module=self.student_module,
            log_prefix=self.log_prefix,
        )

    @property
    def projectors(self) -> nn.ModuleDict:
        """The learnable feature projectors (empty without feature pairs or before ``setup``)."""
        return self._distiller.projectors

    # -- setup: checks, probe, projectors, the training_step wrapper ------------------------------------------
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Check the strategy and the teacher, probe both models, build the projectors, wrap ``training_step``."""
        if stage != "fit":
            return
        refuse_sharded_strategy(trainer, "KnowledgeDistillation", "keeps a whole teacher and whole projectors on "
                                "every process", error=RuntimeError)
        if not pl_module.automatic_optimization:
            raise RuntimeError(
                f"{type(pl_module).__name__} uses manual optimization, so the loss its training_step returns is "
                "not what is backpropagated. Use DistillationModule, or call "
                "lightning_ext.distillation.distiller.Distiller from your training_step."
            )
        if self.teacher is pl_module:
            raise ValueError("The teacher is the student itself; pass a separate (copied) teacher module.")
        student_params = {id(p) for p in pl_module.parameters()}
        if any(id(p) in student_params for p in self.teacher.parameters()):
            raise ValueError(
                "The teacher shares parameters with the student (freezing it would freeze the student). "
                "Pass a copy: copy.deepcopy(model) or a model loaded from its own checkpoint."
            )
        self._distiller.freeze()
        self.weight.setup(trainer)
        self.feature_weight.setup(trainer)
        self._distiller.attach(pl_module)
        self._distiller.checked = False
        probe = self._probe_input(trainer, pl_module)
        if probe is not None:
            self._distiller.build(pl_module, probe, teacher_gets_captured_input=self.input_key is None)
        elif self.feature_pairs:
            raise ValueError(
                "KnowledgeDistillation needs a probe input to size the feature projectors before training, and "
                "none was found (no `input_shape`, no `example_input_array`, no datamodule input). Set `input_shape`."
            )
        else:
            rank_zero_warn("KnowledgeDistillation: no probe input; the teacher is checked on the first training batch.")
        if self._pending_state is not None:
            self._apply_state(self._pending_state)
        self._wrap(trainer, pl_module)

    def _probe_input(self, trainer: Trainer, pl_module: LightningModule) -> Any:
        """Two zero inputs shaped like ``input_shape``, the module's ``example_input_array`` or the datamodule's
        ``input_shape`` (:func:`~lightning_ext.core.inputs.example_inputs`), else the datamodule's first batch;
        ``None`` when there is no datamodule (the module's own ``input_shape`` may not be what ``input_key`` picks)."""
        device = next((p.device for p in pl_module.parameters()), torch.device("cpu"))
        if self.input_shape is not None or isinstance(getattr(pl_module, "example_input_array", None), Tensor):
            return example_inputs(pl_module, self.input_shape, batch_size=2).to(device)
        dm = trainer.datamodule
        shape = getattr(dm, "input_shape", None)
        if shape is not None and (self.input_key is None or self.input_key == 0):
            return example_inputs(pl_module, shape, batch_size=2).to(device)
        if dm is not None:
            try:
                batch = next(iter(dm.train_dataloader()))
                # the probe is what the module's forward receives; with input_key null, guess batch[0]
                x = select_input(batch, self.input_key if self.input_key is not None else 0)
                return x[:2].to(device) if isinstance(x, Tensor) else None
            except Exception:  # noqa: BLE001 - no probe; checked on the first batch instead
                return None
        return None

    def _wrap(self, trainer: Trainer, pl_module: LightningModule) -> None:
        def around(step: Any, args: tuple, kwargs: dict) -> Any:
            batch = args[0] if args else kwargs.get("batch")
            with self._distiller.capturing():
                output = step(*args, **kwargs)
            return self._add_distillation(trainer, pl_module, batch, output)

        # a wrapper left by a KnowledgeDistillation that is not in this trainer (its fit crashed) is dropped
        self._wrap_step(trainer, pl_module, around, stale_kind=KnowledgeDistillation)

    def _add_distillation(self, trainer: Trainer, pl_module: LightningModule, batch: Any, output: Any) -> Any:
        task_loss = loss_of(output, pl_module, "KnowledgeDistillation")
        if task_loss is None:  # the module skipped this batch
            return None
        student_logits = self._distiller.captured_logits
        x = self._distiller.captured_input if self.input_key is None else select_input(batch, self.input_key)
        teacher_logits = self._distiller.teacher_logits(x)
        terms = self._distiller.terms(student_logits, teacher_logits)
        self._distiller.clear()
        step = trainer.global_step
        weight = float(self.weight(step))
        loss = combine_losses(task_loss, terms["kd"], weight, self.combine)
        pl_module.log(f"{self.log_prefix}_loss", terms["kd"].detach(), on_step=True, on_epoch=False)
        pl_module.log(f"{self.log_prefix}_weight", weight, on_step=True, on_epoch=False)
        if "feature" in terms:
            feature_weight = float(self.feature_weight(step))
            if feature_weight < 0:
                raise ValueError(f"`feature_weight` must be >= 0, got {feature_weight} at step {step}.")
            loss = loss + feature_weight * terms["feature"]
            pl_module.log(f"{self.log_prefix}_feature_loss", terms["feature"].detach(), on_step=True, on_epoch=False)
        return with_loss(output, loss)

    # -- device, optimizer, DDP -----------------------------------------------------------------------------
    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Move teacher and projectors to the student's device; sync the projectors; add their param group."""
        dtype = next((p.dtype for p in pl_module.parameters() if p.is_floating_point()), torch.float32)
        self._distiller.to(pl_module.device, dtype=None if dtype == torch.float32 else dtype)
        if trainer.world_size > 1 and len(self.projectors):
            state = trainer.strategy.broadcast({k: v.cpu() for k, v in self.projectors.state_dict().items()}, src=0)
            self.projectors.load_state_dict(state)
        self._ensure_param_group(trainer)

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Keep the teacher in eval mode and the projectors in the optimizer."""
        self.teacher.eval()
        self._ensure_param_group(trainer)  # e.g. after another callback re-ran configure_optimizers

    def _ensure_param_group(self, trainer: Trainer) -> None:
        params = [p for p in self.projectors.parameters()]
        if not params:
            return
        if self.optimizer_index >= len(trainer.optimizers):
            raise ValueError(
                f"`optimizer_index={self.optimizer_index}` but the module has {len(trainer.optimizers)} optimizer(s)."
            )
        optimizer = trainer.optimizers[self.optimizer_index]
        present = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if all(id(p) in present for p in params):
            return
        add_param_group(optimizer, params, [config.scheduler for config in trainer.lr_scheduler_configs])

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        """Under DDP, average the projectors' gradients across ranks."""
        if trainer.world_size <= 1 or not len(self.projectors):
            return
        if optimizer is not trainer.optimizers[self.optimizer_index]:
            return
        params = list(self.projectors.parameters())
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = trainer.strategy.reduce(torch.cat([g.reshape(-1) for g in grads]), reduce_op="mean")
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p).clone()
            offset += n

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Remove the ``training_step`` wrapper and the hooks."""
        if stage != "fit":
            return
        self._unwrap()
        self._distiller.detach()

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        """Leave the user's module as it was when ``fit`` raises (Lightning runs no teardown then)."""
        # Lightning calls no teardown hooks when fit raises: leave the user's module as it was
        self._unwrap()
        self._distiller.detach()

    # -- state ----------------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        """The feature pairs and the projectors' weights."""
        return {
            "feature_pairs": dict(self.feature_pairs),
            "projectors": {k: v.detach().cpu().clone() for k, v in self.projectors.state_dict().items()},
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the projectors now, or once ``setup`` has built them."""
        if self._distiller.built:
            self._apply_state(state_dict)
        else:
            self._pending_state = state_dict

    def _apply_state(self, state: dict[str, Any]) -> None:
        self._pending_state = None
        saved_pairs = dict(state.get("feature_pairs", {}))
        if saved_pairs != self.feature_pairs:
            raise ValueError(
                f"The checkpoint's KnowledgeDistillation state was saved with feature_pairs={saved_pairs}, but this "
                f"callback has feature_pairs={self.feature_pairs}; resume with the same configuration."
            )
        try:
            self.projectors.load_state_dict(state.get("projectors", {}))
        except RuntimeError as err:
            raise ValueError(f"The checkpoint's projector weights do not fit this callback's projectors: {err}") from err
        rank_zero_info(f"KnowledgeDistillation: restored {len(state.get('projectors', {}))} projector tensors.")
