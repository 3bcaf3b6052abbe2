"""``TaskConditionedHyperNet``: a classifier whose every weight a hypernetwork generates from a task embedding."""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import Tensor, nn
from typing_extensions import override

from lightning_ext.core.validation import (
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    check_number,
    check_positive_int,
)
from lightning_ext.vision.classifier import Classifier, NumClasses, check_num_classes
from lightning_ext.vision.hypernetwork import HyperInit, TargetHyperNetwork, hypernet_output_penalty
from lightning_ext.vision.mlp_classifier import mlp


class TaskConditionedHyperNet(Classifier):
    """A task-conditioned hypernetwork classifier (von Oswald et al., 2020): one learned embedding per task generates all target weights.

    The target (an MLP from ``mlp_sizes``, or any ``target`` module) runs with the weights
    :class:`~lightning_ext.vision.hypernetwork.TargetHyperNetwork` generates for the batch's task; only the
    generator and the embeddings train, initialised with hyperfan-in so the generated weights start at a normal
    layer's scale. Batches are ``(x, y, task)`` (multi-task: one task id per sample) or ``(x, y)`` (all of task
    ``task_id``: one task at a time, as in continual learning). With ``output_penalty = β > 0`` and ``task_id > 0``
    the training loss adds ``β / T · Σ_{t<T} ||h(e_t) − h*(e_t)||²`` (logged as ``hypernet/output_penalty``), where
    ``h*`` is the hypernetwork when training starts; that snapshot is kept in the checkpoint, so a resumed fit
    regularises towards the same weights. For the next task call :meth:`set_task` and fit again.

    Args:
        num_classes: logits the target returns.
        num_tasks: number of task embeddings.
        target: the network whose weights are generated (its own parameters are frozen and unused).
        mlp_sizes: instead of ``target``: ``[in_features, hidden..., num_classes]`` of a flattening ReLU MLP
            (neither given: ``[64, 32, num_classes]``, for 8x8 digits).
        task_id: the task of ``(x, y)`` batches and of the output penalty.
        emb_dim: task-embedding size.
        hidden: the generator's hidden widths.
        chunk_size: generator outputs per chunk (``None``: all weights at once).
        chunk_emb_dim: chunk-embedding size.
        gain: std of generated weights times √fan_in at initialisation.
        init: ``"hyperfan_in"`` or ``"default"`` (the generator at PyTorch's init: the ablation).
        output_penalty: β of the continual-learning output regulariser (0 disables it).
        **kwargs: optimisation arguments of :class:`Classifier` (``lr``, ``weight_decay``, ``optimizer``, ...).

    Example:
        >>> model = TaskConditionedHyperNet(num_classes=2, num_tasks=5, mlp_sizes=[64, 32, 2], chunk_size=256)
        >>> model(torch.zeros(3, 1, 8, 8), torch.tensor([0, 4, 4])).shape
        torch.Size([3, 2])
    """

    def __init__(
        self,
        num_classes: NumClasses = 10,
        num_tasks: PositiveInt = 1,
        target: Optional[nn.Module] = None,
        mlp_sizes: Optional[list[PositiveInt]] = None,
        task_id: NonNegativeInt = 0,
        emb_dim: PositiveInt = 8,
        hidden: list[PositiveInt] = [64, 64],  # noqa: B006 - jsonargparse needs a literal default to show
        chunk_size: Optional[PositiveInt] = None,
        chunk_emb_dim: PositiveInt = 8,
        gain: PositiveFloat = 1.0,
        init: HyperInit = "hyperfan_in",
        output_penalty: NonNegativeFloat = 0.0,
        **kwargs,
    ) -> None:
        check_num_classes(num_classes)
        check_positive_int("num_tasks", num_tasks)
        check_number("output_penalty", output_penalty, low=0)
        if target is not None and mlp_sizes is not None:
            raise ValueError("TaskConditionedHyperNet takes one of `target` (a module) or `mlp_sizes` "
                             "([in_features, hidden..., num_classes]), not both")
        if target is None and mlp_sizes is None:
            mlp_sizes = [64, 32, num_classes]  # digits-sized default (8x8 inputs), like the library's other defaults
        if mlp_sizes is not None:
            if len(mlp_sizes) < 2:
                raise ValueError(f"`mlp_sizes` needs at least [in_features, num_classes]; got {mlp_sizes}")
            for size in mlp_sizes:
                check_positive_int("mlp_sizes", size)
            if mlp_sizes[-1] != num_classes:
                raise ValueError(f"`mlp_sizes` ends with {mlp_sizes[-1]} outputs but num_classes={num_classes}; "
                                 f"set its last entry to {num_classes}")
            target = nn.Sequential(nn.Flatten(), mlp(mlp_sizes[0], list(mlp_sizes[1:-1]), mlp_sizes[-1]))
        net = TargetHyperNetwork(target, num_tasks, emb_dim, list(hidden), chunk_size, chunk_emb_dim, gain, init)
        super().__init__(net, num_classes, **kwargs)
        self.save_hyperparameters(ignore=["optimizer", "scheduler", "target"])
        self.num_tasks, self.output_penalty = num_tasks, output_penalty
        self._batch_tasks: Optional[Tensor] = None
        self.snapshot: Optional[Tensor] = None
        self.set_task(task_id)

    def set_task(self, task_id: int) -> None:
        """Make ``task_id`` the task of ``(x, y)`` batches; the next fit snapshots the earlier tasks' weights."""
        check_number("task_id", task_id, low=0, integer=True)
        if task_id >= self.num_tasks:
            raise ValueError(f"task_id={task_id} but the model has num_tasks={self.num_tasks}; use a task id in "
                             f"[0, {self.num_tasks - 1}] or build it with more tasks")
        self.task_id, self.snapshot = int(task_id), None

    @override
    def forward(self, x: Tensor, task_id: Union[int, Tensor, None] = None) -> Tensor:
        """Logits of ``x`` for ``task_id`` (an int or one id per sample; ``None``: the batch's or ``self.task_id``)."""
        if task_id is None:
            task_id = self._batch_tasks if self._batch_tasks is not None else self.task_id
        return self.net(x, task_id)

    @override
    def _shared_step(self, batch: Any, stage: str) -> Optional[Tensor]:
        if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
            raise ValueError("TaskConditionedHyperNet needs (x, y) or (x, y, task_id) batches")
        self._batch_tasks = batch[2] if len(batch) == 3 else None
        try:
            loss = super()._shared_step(tuple(batch[:2]), stage)
        finally:
            self._batch_tasks = None
        if stage == "train" and loss is not None and self.output_penalty > 0 and self.snapshot is not None:
            penalty = hypernet_output_penalty(self.net.generate(torch.arange(len(self.snapshot))), self.snapshot)
            self.log("hypernet/output_penalty", penalty)
            loss = loss + self.output_penalty * penalty
        return loss

    @override
    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Predicted class of each input (``(x, y, task)`` batches use their task ids)."""
        if isinstance(batch, (tuple, list)) and len(batch) == 3:
            return self(batch[0], batch[2]).argmax(dim=-1)
        return super().predict_step(batch, batch_idx)

    @override
    def on_train_start(self) -> None:
        """Snapshot the weights generated for tasks ``< task_id`` (unless a resumed checkpoint restored them)."""
        if self.output_penalty > 0 and self.task_id > 0 and self.snapshot is None:
            with torch.no_grad():
                self.snapshot = self.net.generate(torch.arange(self.task_id)).detach().clone()

    @override
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep the task id and the output-penalty snapshot in the checkpoint."""
        checkpoint["hypernet"] = {"task_id": self.task_id, "snapshot": self.snapshot}

    @override
    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Restore the task id and the output-penalty snapshot."""
        state = checkpoint.get("hypernet")
        if state is not None:
            self.set_task(int(state["task_id"]))
            self.snapshot = state["snapshot"]

    @override
    def configure_optimizers(self):
        """As :class:`Classifier`; refuses to train the target's own (frozen) parameters."""
        target = {id(p) for p in self.net.target.parameters()}
        if any(p.requires_grad and id(p) in target for p in self.parameters()):
            raise ValueError("TaskConditionedHyperNet: the target's own parameters must stay frozen (they are "
                             "generated); do not call requires_grad_(True) on model.net.target")
        return super().configure_optimizers()

    def export_target(self, task_id: int) -> nn.Module:
        """A plain ``nn.Module`` with the weights generated for ``task_id``."""
        return self.net.export_target(task_id)
