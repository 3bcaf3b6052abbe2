"""``AdaMerging``: a LightningModule whose trainable parameters are the merging coefficients."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torchmetrics import MeanMetric
from typing_extensions import override

from lightning_ext.core.paths import output_path
from lightning_ext.core.strategy import refuse_sharded_strategy
from lightning_ext.core.validation import (
    ClosedUnitInterval,
    PositiveFloat,
    PositiveInt,
    check_choice,
    check_fraction,
    check_positive,
    check_positive_int,
)
from lightning_ext.merging.ada_diagnostics import (
    AdaMergingHistory,
    check_output_paths,
    diagnose_collapse,
    plot_coefficients,
    save_coefficients,
)
from lightning_ext.merging.ada_merging import GRANULARITIES, AdaMergingModel, Granularity, ada_merging_loss
from lightning_ext.merging.task_vectors import (
    DEFAULT_MAX_TASK_VECTOR_RATIO,
    FOREIGN_BASE_ACTIONS,
    OnForeignBase,
    resolve_ignored_layers,
)
from lightning_ext.merging.ties_merging import Density, check_density

__all__ = ["AdaMerging"]


class AdaMerging(LightningModule):
    r"""AdaMerging: learns task- or layer-wise merging coefficients by entropy minimisation on unlabelled inputs.

    Paper: Yang et al., *AdaMerging: Adaptive Model Merging for Multi-Task Learning*, ICLR 2024,
    arXiv:2310.02575; reference code https://github.com/EnnengYang/AdaMerging. The merged model
    :math:`\theta = \theta_0 + \sum_k \mathrm{clamp}(\lambda_k^{(l)}, 0, 1)\,\tau_k` (see
    :class:`~lightning_ext.merging.ada_merging.AdaMergingModel`) keeps each task's own frozen head; the only
    trainable parameters are the coefficients :math:`\lambda` (initialised at ``prior`` = 0.3). ``fit`` on a
    :class:`~lightning_ext.merging.multi_task.MultiTaskDataModule` minimises, per step, the sum over tasks of
    the mean prediction entropy on one unlabelled batch of each task (Adam, lr 1e-3, as in the paper; the paper
    runs 500 steps: ``trainer.max_steps: 500``). Validation/test loaders, one per task in task order, give
    ``{val,test}_acc/<task>`` and their mean ``{val,test}_acc``; labels are only used there.

    The base :math:`\theta_0` is ``network``'s weights, or ``base_checkpoint``. ``checkpoints`` are the models
    fine-tuned from it, one per task, in the datamodule's task order (state dicts or Lightning checkpoints,
    ``weights_only=True``, read one at a time). Each is checked against the base: same architecture outside the
    heads (else the first differing key and shapes are reported) and close to the base (relative norm of its
    task vector at most ``max_task_vector_ratio``). Task vectors are held in memory (N model copies: inherent
    to the method), not in the checkpoint, which stores the base and the coefficients.

    **The heads matter.** AdaMerging assumes each task's head was trained for the *pretrained* body and left
    frozen during fine-tuning (the paper's CLIP zero-shot heads). Heads trained jointly with the body can make
    entropy minimisation collapse (a task confidently predicting one class); the run records the entropy,
    the share of the dominant predicted class per task and the coefficients over steps, warns on signs of
    collapse at the end (:func:`~lightning_ext.merging.ada_merging.diagnose_collapse`), and saves a plot.

    Logged: ``train_entropy`` (and ``train_entropy/<task>``), ``coef_mean/<task>``, ``coef_at_bounds`` (share of
    coefficients at a clamp bound). At the end of ``fit`` (rank 0) the coefficients are saved to
    ``coefficients_path`` (usable by the ``ModelMerging`` callback) and plotted per layer and task, with the
    entropy and coefficient curves, to ``plot_path``; relative paths go to the trainer's log directory
    (``trainer.log_dir``), ``None`` disables either. Both files are written atomically.

    Supported: single device and DDP (coefficient gradients are averaged across ranks by DDP). Refused in
    ``setup``: FSDP, DeepSpeed, model-parallel and XLA strategies.

    Args:
        network: the architecture with the pretrained weights (YAML: ``class_path``/``init_args``).
        checkpoints: fine-tuned checkpoints, one per task, in task order.
        base_checkpoint: pretrained weights to load into ``network`` first (its head may differ).
        ignored_layers: the task-specific layers (heads) each task keeps: module names or globs of ``network``
            (``None``: the last ``nn.Linear``, see :func:`~lightning_ext.merging.task_vectors.default_ignored_layers`;
            ``[]``: merge every layer).
        task_names: names for logs (default: the checkpoint file stems).
        granularity: ``"layer"`` or ``"task"``.
        prior: initial coefficient value.
        lr: Adam learning rate.
        ties_density: AdaMerging++: TIES-process the task vectors first, keeping this share of each (the TIES
            paper's :math:`k`, e.g. 0.2); ``None``: plain AdaMerging.
        max_task_vector_ratio: refuse fine-tuned models farther than this from the base (relative norm).
        on_foreign_base: ``"error"``, ``"warn"`` or ``"ignore"`` for such models.
        plot_path: PNG of the coefficients and curves (relative to ``trainer.log_dir``; ``None`` disables).
        coefficients_path: file of the learned coefficients (relative to ``trainer.log_dir``; ``None`` disables).
        record_every_n_steps: coefficient snapshots for the plot and the history every this many steps.

    Example:
        >>> import tempfile, os
        >>> torch.manual_seed(0) and None
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
        >>> tmp = tempfile.mkdtemp()
        >>> paths = []
        >>> for i in range(2):
        ...     state = {k: v + 0.01 * torch.randn_like(v) for k, v in net.state_dict().items()}
        ...     paths.append(os.path.join(tmp, f"task{i}.pt")); torch.save(state, paths[-1])
        >>> model = AdaMerging(net, paths, plot_path=None, coefficients_path=None)
        >>> model.ignored_layers, model.task_names, model.merger.coefficients().shape
        (['3'], ['task0', 'task1'], torch.Size([2, 2]))
    """

    def __init__(
        self,
        network: nn.Module,
        checkpoints: list[str],
        base_checkpoint: Optional[str] = None,
        ignored_layers: Optional[list[str]] = None,
        task_names: Optional[list[str]] = None,
        granularity: Granularity = "layer",
        prior: ClosedUnitInterval = 0.3,
        lr: PositiveFloat = 1e-3,
        ties_density: Optional[Density] = None,
        max_task_vector_ratio: PositiveFloat = DEFAULT_MAX_TASK_VECTOR_RATIO,
        on_foreign_base: OnForeignBase = "error",
        plot_path: Optional[str] = "ada_merging_coefficients.png",
        coefficients_path: Optional[str] = "ada_merging_coefficients.pt",
        record_every_n_steps: PositiveInt = 10,
    ) -> None:
        super().__init__()
        if not isinstance(network, nn.Module):
            raise TypeError(f"`network` must be an nn.Module, got {type(network).__name__}.")
        if isinstance(checkpoints, (str, Path)) or not checkpoints:
            raise ValueError("`checkpoints` must be a non-empty list of fine-tuned checkpoint paths, one per task.")
        check_choice("granularity", granularity, GRANULARITIES)
        check_fraction("prior", prior)  # coefficients are clamped to [0, 1]
        check_positive("lr", lr)
        if ties_density is not None:
            check_density(ties_density, "ties_density")
        check_positive("max_task_vector_ratio", max_task_vector_ratio)
        check_choice("on_foreign_base", on_foreign_base, FOREIGN_BASE_ACTIONS)
        check_positive_int("record_every_n_steps", record_every_n_steps)
        check_output_paths(plot_path=plot_path, coefficients_path=coefficients_path)
        if task_names is not None and len(task_names) != len(checkpoints):
            raise ValueError(f"Got {len(task_names)} task names for {len(checkpoints)} checkpoints; give one per checkpoint.")
        self.save_hyperparameters(ignore=["network"])
        self.ignored_layers = resolve_ignored_layers(network, ignored_layers)
        self.task_names = [str(n) for n in task_names] if task_names is not None else [Path(str(c)).stem for c in checkpoints]
        if len(set(self.task_names)) != len(self.task_names):
            self.task_names = [f"{n}_{i}" for i, n in enumerate(self.task_names)]
        self.merger = AdaMergingModel.from_finetuned(
            network, [str(c) for c in checkpoints], self.ignored_layers, base=base_checkpoint, ties_density=ties_density,
            granularity=granularity, prior=prior, task_names=self.task_names,
            max_task_vector_ratio=max_task_vector_ratio, on_foreign_base=on_foreign_base,
        )
        self.lr = lr
        self.plot_path, self.coefficients_path = plot_path, coefficients_path
        self._plot_file: Optional[Path] = None
        self._coefficients_file: Optional[Path] = None
        self.record_every_n_steps = record_every_n_steps
        self.history = AdaMergingHistory(list(self.task_names))
        self.val_acc = nn.ModuleList(MeanMetric() for _ in self.task_names)
        self.test_acc = nn.ModuleList(MeanMetric() for _ in self.task_names)

    @property
    def num_tasks(self) -> int:
        return self.merger.num_tasks

    @override
    def forward(self, x: Tensor, task: int = 0) -> Tensor:
        """The merged network on ``x`` with the head of ``task``."""
        return self.merger(x, task)

    def coefficients(self) -> Tensor:
        """The clamped coefficients, ``(layers, tasks)``."""
        return self.merger.coefficients()

    def merged_state_dict(self, task: Optional[int] = None) -> dict[str, Tensor]:
        """The merged network's state dict (with the head of ``task`` when given)."""
        return self.merger.merged_state_dict(task)

    def export(self, task: Optional[int] = None) -> nn.Module:
        """A standalone merged network (with ``task``'s head)."""
        return self.merger.export(task)

    # -- checks --------------------------------------------------------------------------------------------------
    @override
    def setup(self, stage: str) -> None:
        """Refuse sharded strategies and a datamodule with another task count; resolve the output paths."""
        refuse_sharded_strategy(self.trainer, "AdaMerging", "keeps every task vector whole on each process",
                                error=RuntimeError)
        # on every rank: trainer.log_dir is a collective under DDP
        self._plot_file = output_path(self.trainer, self.plot_path)
        self._coefficients_file = output_path(self.trainer, self.coefficients_path)
        dm = self.trainer.datamodule
        tasks = getattr(dm, "num_tasks", None)
        if tasks is not None and tasks != self.num_tasks:
            raise ValueError(
                f"AdaMerging has {self.num_tasks} task models but {type(dm).__name__} serves {tasks} tasks; list one "
                "checkpoint per task, in the datamodule's task order."
            )

    # -- steps ---------------------------------------------------------------------------------------------------
    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """The summed entropy over one unlabelled batch of each task; logs entropies and coefficients."""
        if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[1], (int, Tensor)) and not isinstance(batch[0], (tuple, list)):
            batch = [batch]  # a single (x, task) pair
        pairs = [(x, int(task)) for x, task in batch]
        loss, entropies, shares, tasks = ada_merging_loss(self.merger, pairs)
        per_task_entropy = [float("nan")] * self.num_tasks
        per_task_share = [float("nan")] * self.num_tasks
        for task, e, s in zip(tasks, entropies, shares):
            per_task_entropy[task], per_task_share[task] = e, s
            self.log(f"train_entropy/{self.task_names[task]}", e, on_step=True, on_epoch=False)
        self.log("train_entropy", loss.detach(), prog_bar=True, on_step=True, on_epoch=False)
        lam = self.merger.coefficients().detach()
        for k, name in enumerate(self.task_names):
            self.log(f"coef_mean/{name}", lam[:, k].mean(), on_step=True, on_epoch=False)
        self.history.record(self.global_step, per_task_entropy, per_task_share, lam, self.merger.clamp_range,
                            snapshot=self.global_step % self.record_every_n_steps == 0)
        self.log("coef_at_bounds", self.history.at_bounds[-1], on_step=True, on_epoch=False)
        return loss

    def _eval_step(self, batch: Any, dataloader_idx: int, stage: str) -> None:
        x, y = batch[0], batch[1]
        if not 0 <= dataloader_idx < self.num_tasks:
            raise ValueError(f"{stage} dataloader {dataloader_idx} has no task model ({self.num_tasks} tasks).")
        logits = self.merger(x, dataloader_idx)
        getattr(self, f"{stage}_acc")[dataloader_idx].update((logits.argmax(dim=1) == y).float())

    @override
    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Accuracy of the merged model on task ``dataloader_idx``."""
        self._eval_step(batch, dataloader_idx, "val")

    @override
    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Accuracy of the merged model on task ``dataloader_idx``."""
        self._eval_step(batch, dataloader_idx, "test")

    def _log_accuracy(self, stage: str) -> None:
        metrics = getattr(self, f"{stage}_acc")
        values = []
        for name, metric in zip(self.task_names, metrics):
            if metric.update_count == 0:
                continue
            value = metric.compute()
            values.append(value)
            self.log(f"{stage}_acc/{name}", value, add_dataloader_idx=False)
            metric.reset()
        if values:
            self.log(f"{stage}_acc", torch.stack(values).mean(), prog_bar=True, add_dataloader_idx=False)

    @override
    def on_validation_epoch_end(self) -> None:
        """Log ``val_acc/<task>`` and their mean ``val_acc``."""
        self._log_accuracy("val")

    @override
    def on_test_epoch_end(self) -> None:
        """Log ``test_acc/<task>`` and their mean ``test_acc``."""
        self._log_accuracy("test")

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Adam on the coefficients (betas 0.9/0.999, no weight decay), as in the paper."""
        return torch.optim.Adam([self.merger.raw_coefficients], lr=self.lr, betas=(0.9, 0.999), weight_decay=0.0)

    # -- results -------------------------------------------------------------------------------------------------
    @override
    def on_fit_end(self) -> None:
        """Warn on signs of collapse; save the coefficients and the plot (rank 0)."""
        if not self.trainer.is_global_zero:
            return
        for message in diagnose_collapse(self.history):
            rank_zero_warn(f"AdaMerging: possible collapse: {message}")
        lam = self.merger.coefficients().detach().cpu()
        coefficients_file, plot_file = self._coefficients_file, self._plot_file
        if coefficients_file is not None:
            save_coefficients(coefficients_file, lam, self.merger.layer_names, self.task_names, self.merger.granularity)
        if plot_file is not None:
            plot_coefficients(plot_file, lam, self.merger.layer_names, self.task_names, self.history,
                              title=f"AdaMerging ({self.merger.granularity}-wise)")
        saved = [str(p) for p in (coefficients_file, plot_file) if p is not None]
        if saved:
            rank_zero_info(f"AdaMerging: saved {', '.join(saved)}.")

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the run's history beside the coefficients."""
        checkpoint["ada_merging_history"] = self.history.to_dict()

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the run's history."""
        state = checkpoint.get("ada_merging_history")
        if state is not None:
            self.history = AdaMergingHistory.from_dict(state)
