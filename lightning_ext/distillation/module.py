r"""``DistillationModule``: a student trained against a frozen teacher, composed explicitly."""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from typing_extensions import override

from lightning_ext.core.guards import check_loss
from lightning_ext.core.validation import PositiveFloat, PositiveInt, check_choice, check_number, check_positive
from lightning_ext.distillation.distiller import Distiller
from lightning_ext.distillation.losses import COMBINE_MODES, CombineMode, WeightSchedule, as_schedule, combine_losses
from lightning_ext.distillation.teacher import build_teacher
from lightning_ext.vision.classifier import Classifier

__all__ = ["DistillationModule"]


class DistillationModule(Classifier):
    r"""A student classifier trained with a frozen teacher's soft targets (and features): explicit KD.

    The explicit counterpart of the :class:`~lightning_ext.distillation.callback.KnowledgeDistillation`
    callback, sharing its core (:class:`~lightning_ext.distillation.distiller.Distiller`). On
    ``(x, y)`` batches the training loss is

    .. math::
        L = (1 - \alpha_k)\, \mathrm{CE}(y, z_s) + \alpha_k\, T^2\, \mathrm{KL}\big(\mathrm{softmax}(z_t/T)
            \,\|\, \mathrm{softmax}(z_s/T)\big) + \beta_k \sum_{(i,j)} \mathrm{MSE}\big(r_{ij}(h^s_i), h^t_j\big)

    (``combine="add"``: :math:`\mathrm{CE} + \alpha_k L_{KD}`), following Hinton, Vinyals, Dean, *Distilling
    the Knowledge in a Neural Network* (arXiv:1503.02531; reference implementation: torchdistill's ``KDLoss``,
    https://github.com/yoshitomo-matsubara/torchdistill) and FitNets hints (Romero et al., arXiv:1412.6550,
    https://github.com/adri-romsor/FitNets). Validation and test use the student alone.

    The teacher is built by :func:`~lightning_ext.distillation.teacher.build_teacher` (a module,
    ``"timm:<name>"``, ``"torchvision:<name>"`` or a class path, weights from ``teacher_checkpoint`` loaded
    with ``weights_only=True``), frozen, in eval mode, moved to this module's device in ``on_fit_start``, and
    kept out of ``state_dict()``, ``parameters()`` and so out of checkpoints and optimizers. The projectors,
    in contrast, are ordinary submodules (``projectors``): trained by this module's optimizer, all-reduced
    by DDP and saved in its checkpoints. They are sized at construction by a probe forward on
    ``input_shape``, which also refuses a teacher whose outputs differ from the student's.

    Args:
        student: the student network mapping inputs to ``num_classes`` logits.
        teacher: the teacher (see above).
        num_classes: number of classes.
        teacher_checkpoint: local weights file for the teacher.
        teacher_kwargs: constructor arguments when ``teacher`` is a name or class path.
        weight: logit-KD weight :math:`\alpha` (number or
            :class:`~lightning_ext.distillation.losses.WeightSchedule`).
        temperature: KD temperature :math:`T`.
        combine: ``"convex"`` or ``"add"`` (see above).
        feature_pairs: ``{student module: teacher module}``, names relative to ``student`` and ``teacher``.
        feature_weight: weight :math:`\beta` of the feature terms (number or schedule).
        input_shape: shape of one input without batch dim (needed with ``feature_pairs``); checks teacher and
            student at construction.
        projector_seed: seed of the projectors' initialisation.
        **kwargs: optimisation arguments of :class:`~lightning_ext.vision.classifier.Classifier` (``lr``,
            ``weight_decay``, ``optimizer``, ``scheduler``, ``scheduler_interval``).

    Example:
        >>> student = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
        >>> teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        >>> model = DistillationModule(student, teacher, num_classes=10, input_shape=(1, 8, 8),
        ...                            feature_pairs={"0": "0"})
        >>> sorted(model.state_dict())  # the student and the projector; never the teacher
        ['net.1.bias', 'net.1.weight']
        >>> model = DistillationModule(nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Linear(16, 10)), teacher,
        ...                            num_classes=10, input_shape=(1, 8, 8), feature_pairs={"1": "1"})
        >>> sorted(model.state_dict())
        ['net.1.bias', 'net.1.weight', 'net.2.bias', 'net.2.weight', 'projectors.1__1.weight']
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: Union[str, nn.Module],  # str first: the parser keeps a class path as a string (build_teacher reads it)
        num_classes: int,
        teacher_checkpoint: Optional[str] = None,
        teacher_kwargs: Optional[dict] = None,
        weight: Union[float, WeightSchedule] = 0.9,
        temperature: PositiveFloat = 4.0,
        combine: CombineMode = "convex",
        feature_pairs: Optional[dict[str, str]] = None,
        feature_weight: Union[float, WeightSchedule] = 1.0,
        input_shape: Optional[tuple[PositiveInt, ...]] = None,
        projector_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        if not isinstance(student, nn.Module):
            raise TypeError(f"`student` must be an nn.Module, got {type(student).__name__}.")
        check_choice("combine", combine, COMBINE_MODES)
        check_positive("temperature", temperature)
        weight_schedule = as_schedule(weight, "weight", combine)
        feature_schedule = as_schedule(feature_weight, "feature_weight")
        for d in input_shape or ():
            check_number("input_shape", d, low=1, integer=True)
        check_number("projector_seed", projector_seed, integer=True)
        if feature_pairs and input_shape is None:
            raise ValueError("`feature_pairs` need `input_shape` (one input, no batch dim) to size the projectors.")
        super().__init__(student, num_classes, input_shape=input_shape, **kwargs)
        self.weight, self.feature_weight = weight_schedule, feature_schedule
        self.combine = combine
        teacher_module = build_teacher(teacher, teacher_checkpoint, teacher_kwargs)
        if any(p is q for p in teacher_module.parameters() for q in student.parameters()):
            raise ValueError("The teacher shares parameters with the student; pass a copy (copy.deepcopy).")
        # a plain attribute holding the teacher: not a submodule, so not in state_dict/parameters/optimizer
        self.distiller = Distiller(teacher_module, temperature, feature_pairs, logits_module=None,
                                   projector_seed=projector_seed)
        if input_shape is not None:
            self.distiller.attach(self.net)
            try:
                self.distiller.build(self.net, torch.zeros(2, *self.input_shape))
            finally:
                self.distiller.detach()
        self.projectors = self.distiller.projectors
        ignore = ["student", "teacher", "optimizer", "scheduler"]
        ignore += [n for n, w in (("weight", weight), ("feature_weight", feature_weight)) if isinstance(w, WeightSchedule)]
        self.save_hyperparameters(ignore=ignore)  # plain types only, so checkpoints load with weights_only=True

    @property
    def teacher(self) -> nn.Module:
        """The frozen teacher (not a submodule of this module)."""
        return self.distiller.teacher

    @override
    def setup(self, stage: str) -> None:
        """Set up the weight schedules and attach the distiller's hooks to the student."""
        super().setup(stage)
        if stage == "fit" and self.trainer is not None:
            self.weight.setup(self.trainer)
            self.feature_weight.setup(self.trainer)
        self.distiller.attach(self.net)

    @override
    def teardown(self, stage: str) -> None:
        """Remove the distiller's hooks."""
        self.distiller.detach()

    @override
    def on_fit_start(self) -> None:
        """Move the teacher to the student's device (and dtype under true precision)."""
        dtype = next((p.dtype for p in self.net.parameters() if p.is_floating_point()), torch.float32)
        self.distiller.teacher.to(device=self.device, dtype=None if dtype == torch.float32 else dtype)

    @override
    def on_train_epoch_start(self) -> None:
        """Keep the teacher in eval mode."""
        self.distiller.teacher.eval()

    def distillation_loss(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """Forward the student and the teacher on ``x``; return the logits, every loss term and the total."""
        if not self.distiller._handles:
            self.distiller.attach(self.net)
        with self.distiller.capturing():
            logits = self(x)
        task = F.cross_entropy(logits, y)
        terms = self.distiller.terms(logits, self.distiller.teacher_logits(x))
        step = self.trainer.global_step if self._trainer is not None else 0
        alpha = float(self.weight(step))
        loss = combine_losses(task, terms["kd"], alpha, self.combine)
        out = {"logits": logits, "task": task, "kd": terms["kd"], "weight": torch.tensor(alpha)}
        if "feature" in terms:
            loss = loss + float(self.feature_weight(step)) * terms["feature"]
            out["feature"] = terms["feature"]
        out["loss"] = loss
        return out

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Optional[torch.Tensor]:
        """Task loss plus the distillation terms on an ``(x, y)`` batch; logs every term."""
        x, y = batch
        out = self.distillation_loss(x, y)
        if not check_loss(self, out["loss"], self.nonfinite_loss, batch):
            return None
        self.train_acc(out["logits"], y)
        self.log("train_loss", out["loss"], prog_bar=True)
        self.log("train_loss_epoch", out["loss"], on_step=False, on_epoch=True, sync_dist=True)
        self.log("train_task_loss", out["task"])
        self.log("train_kd_loss", out["kd"])
        self.log("train_kd_weight", out["weight"])
        if "feature" in out:
            self.log("train_kd_feature_loss", out["feature"])
        self.log("train_acc", self.train_acc)
        return out["loss"]
