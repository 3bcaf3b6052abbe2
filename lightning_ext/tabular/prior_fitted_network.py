"""``PriorFittedNetwork``: the PFN transformer trained by the prior-predictive loss on a prior DataModule."""

from __future__ import annotations

import math
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor
from typing_extensions import override

from lightning_ext.core.guards import (
    NonFiniteLoss,
    SkippedStepsCheckpoint,
    check_loss,
    check_nonfinite_policy,
    refuse_skip_under_ddp,
)
from lightning_ext.core.optimization import check_optimization, configure_optimization
from lightning_ext.core.validation import (
    AtLeastTwoInt,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    UnitIntervalRightOpen,
    check_choice,
    check_number,
    check_positive_int,
)
from lightning_ext.tabular.pfn import PFNTransformer, bar_mean, bar_nll, quantile_borders

__all__ = ["PriorFittedNetwork"]


class PriorFittedNetwork(SkippedStepsCheckpoint, LightningModule):
    """PFN (Müller et al., ICLR 2022; TabPFN): a transformer trained on datasets drawn from a prior to predict
    held-out points from a training set in one forward pass.

    Trained this way it approximates the prior's posterior predictive distribution.

    Paper: Müller, Hollmann, Pineda Arango, Grabocka and Hutter, "Transformers Can Do Bayesian Inference",
    ICLR 2022 (arXiv 2112.10510); TabPFN (Hollmann et al., ICLR 2023, arXiv 2207.01848) for classification.
    Reference code: https://github.com/automl/TransformersCanDoBayesianInference, https://github.com/automl/TabPFN.

    Each training batch is a dict from a prior DataModule (:mod:`lightning_ext.tabular.priors`) holding ``x``
    ``(B, N, d)``, ``y`` ``(B, N)`` and ``single_eval_pos``; the model sees the first ``single_eval_pos`` points
    with their targets and predicts the rest. The prior-predictive loss is
    ``E_{D ~ p(D)} [-log q_theta(y_query | x_query, D_train)]``: cross-entropy over ``max_classes`` logits for
    ``task="classification"``, the Riemann (bar) distribution's negative log density over ``num_buckets`` buckets
    for ``task="regression"`` (:func:`~lightning_ext.tabular.pfn.bar_nll`). The bucket borders are quantiles of
    targets drawn from the datamodule's prior at the first ``setup`` (or uniform on ``bucket_range``) and are
    saved with the weights.

    Logs ``train_loss`` and ``val_loss`` (nats per query). The optimiser and LR scheduler are injected
    LightningCLI-style; without a scheduler, ``warmup_steps > 0`` gives linear warm-up then cosine decay over
    the trainer's estimated steps. Works under ``precision="bf16-mixed"`` (the loss is computed in float32) and
    with ``accumulate_grad_batches``; clip gradients with ``gradient_clip_val`` (1.0 in the paper's code).

    Args:
        task: ``"classification"`` or ``"regression"``.
        max_features: the most features a dataset may have.
        max_classes: class logits (classification).
        num_buckets: Riemann-distribution buckets (regression).
        bucket_range: ``[low, high]`` for uniform borders; ``None`` takes prior quantiles from the datamodule.
        d_model: token width.
        nhead: attention heads.
        num_layers: transformer layers.
        dim_feedforward: feed-forward width.
        dropout: dropout.
        zscore_features: z-score features with the training points' statistics inside the model (TabPFN);
            ``False`` for priors where the absolute scale of ``x`` matters (the GP prior).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up steps before a cosine decay (0: constant learning rate).
        optimizer: optimiser factory ``params -> Optimizer``; overrides ``lr``/``weight_decay``.
        scheduler: LR-scheduler factory (overrides ``warmup_steps``).
        scheduler_interval: step the injected scheduler every ``"epoch"`` or ``"step"``.
        nonfinite_loss: ``"error"``, ``"skip"`` or ``"warn"`` on a non-finite training loss.

    Example:
        >>> from lightning_ext.tabular.priors import GPPriorDataModule
        >>> model = PriorFittedNetwork("regression", max_features=1, num_buckets=20, bucket_range=[-3.0, 3.0],
        ...                            d_model=16, nhead=2, num_layers=1, dim_feedforward=32)
        >>> batch = GPPriorDataModule(batch_size=2, seq_len=12).sample_batch(seed=0, step=0)
        >>> float(model.loss(batch)) > 0
        True
    """

    def __init__(
        self,
        task: Literal["classification", "regression"] = "classification",
        max_features: PositiveInt = 32,
        max_classes: AtLeastTwoInt = 10,
        num_buckets: AtLeastTwoInt = 100,
        bucket_range: Optional[list[float]] = None,
        d_model: PositiveInt = 128,
        nhead: PositiveInt = 4,
        num_layers: PositiveInt = 4,
        dim_feedforward: PositiveInt = 256,
        dropout: UnitIntervalRightOpen = 0.0,
        zscore_features: bool = True,
        lr: PositiveFloat = 5e-4,
        weight_decay: NonNegativeFloat = 0.0,
        warmup_steps: NonNegativeInt = 0,
        optimizer: Optional[OptimizerCallable] = None,
        scheduler: Optional[LRSchedulerCallable] = None,
        scheduler_interval: Literal["epoch", "step"] = "step",
        nonfinite_loss: NonFiniteLoss = "error",
    ) -> None:
        super().__init__()
        check_choice("task", task, ("classification", "regression"))
        for name, value in (("max_features", max_features), ("d_model", d_model), ("nhead", nhead),
                            ("num_layers", num_layers), ("dim_feedforward", dim_feedforward)):
            check_positive_int(name, value)
        check_number("max_classes", max_classes, low=2, integer=True)
        check_number("num_buckets", num_buckets, low=2, integer=True)
        check_number("dropout", dropout, low=0, high=1, high_open=True)
        check_number("warmup_steps", warmup_steps, low=0, integer=True)
        check_optimization(lr, weight_decay)
        check_choice("scheduler_interval", scheduler_interval, ("epoch", "step"))
        check_nonfinite_policy(nonfinite_loss)
        if d_model % nhead:
            raise ValueError(f"d_model ({d_model}) must be divisible by nhead ({nhead}).")
        if bucket_range is not None:
            if len(bucket_range) != 2 or not all(math.isfinite(v) for v in bucket_range) \
                    or not bucket_range[0] < bucket_range[1]:
                raise ValueError(f"bucket_range must be [low, high] with finite low < high, got {bucket_range}.")
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.task, self.max_features, self.max_classes = task, int(max_features), int(max_classes)
        self.num_buckets = int(num_buckets)
        outputs = self.max_classes if task == "classification" else self.num_buckets
        self.net = PFNTransformer(self.max_features, outputs, d_model, nhead, num_layers, dim_feedforward, dropout,
                                  bool(zscore_features))
        if bucket_range is not None:
            borders = torch.linspace(float(bucket_range[0]), float(bucket_range[1]), self.num_buckets + 1)
        else:
            borders = torch.full((self.num_buckets + 1,), float("nan"))  # filled from the prior in setup()
        self.register_buffer("borders", borders if task == "regression" else torch.zeros(0))
        self.lr, self.weight_decay, self.warmup_steps = lr, weight_decay, int(warmup_steps)
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.scheduler_interval = scheduler_interval
        self.nonfinite_loss, self.skipped_steps = nonfinite_loss, 0

    # -- setup -------------------------------------------------------------------------------------------------
    @override
    def setup(self, stage: str) -> None:
        """Refuse ``nonfinite_loss='skip'`` under DDP, check the datamodule against the model, set the borders."""
        refuse_skip_under_ddp(self, self.nonfinite_loss)
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        task = getattr(dm, "task", None)
        if task is not None and task != self.task:
            raise ValueError(f"PriorFittedNetwork(task={self.task!r}) got {type(dm).__name__}, a {task} prior; set "
                             f"`model.init_args.task: {task}`.")
        classes = getattr(dm, "num_classes", None)
        if self.task == "classification" and classes is not None and classes > self.max_classes:
            raise ValueError(f"{type(dm).__name__} draws up to {classes} classes but max_classes={self.max_classes}; "
                             f"set `model.init_args.max_classes: {classes}`.")
        features = getattr(dm, "max_features", getattr(dm, "num_features", None))
        if features is not None and features > self.max_features:
            raise ValueError(f"{type(dm).__name__} draws up to {features} features but max_features="
                             f"{self.max_features}; set `model.init_args.max_features: {features}`.")
        if self.task == "regression" and bool(torch.isnan(self.borders).any()):
            if dm is None or not hasattr(dm, "target_samples"):
                raise ValueError("PriorFittedNetwork(task='regression') needs `bucket_range` or a prior datamodule "
                                 "with `target_samples()` to place its bucket borders.")
            borders = quantile_borders(dm.target_samples(), self.num_buckets)
            self.borders.copy_(borders.to(self.borders.device))

    # -- the model ----------------------------------------------------------------------------------------------
    @override
    def forward(self, x: Tensor, y_train: Tensor) -> Tensor:
        """Logits for the queries ``x[:, y_train.shape[1]:]`` given the training points and their targets."""
        return self.net(x, y_train)

    def loss_terms(self, batch: dict[str, Tensor]) -> Tensor:
        """The per-query negative log-likelihood ``(B, N - pos)`` of a prior batch (float32)."""
        x, y = batch["x"], batch["y"]
        pos = int(batch["single_eval_pos"])
        out = self.net(x, y[:, :pos]).float()
        target = y[:, pos:]
        if self.task == "classification":
            return F.cross_entropy(out.reshape(-1, out.shape[-1]), target.reshape(-1).long(),
                                   reduction="none").view(target.shape)
        if bool(torch.isnan(self.borders).any()):
            raise RuntimeError("The bucket borders are not set: give `bucket_range` or fit with a prior datamodule.")
        return bar_nll(out, target, self.borders)

    def loss(self, batch: dict[str, Tensor]) -> Tensor:
        """Mean negative log-likelihood per query (nats), ignoring NaN targets."""
        terms = self.loss_terms(batch)
        keep = ~torch.isnan(batch["y"][:, int(batch["single_eval_pos"]):])
        return terms[keep].mean()

    @torch.no_grad()
    def predict_mean(self, x: Tensor, y_train: Tensor) -> Tensor:
        """Regression: the predictive mean per query; classification: class probabilities."""
        out = self(x, y_train)
        if self.task == "classification":
            return torch.softmax(out.float(), -1)
        return bar_mean(out, self.borders)

    # -- steps ------------------------------------------------------------------------------------------------
    @override
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Optional[Tensor]:
        """Prior-predictive loss of one batch of datasets (``None`` skips a non-finite step)."""
        loss = self.loss(batch)
        if not check_loss(self, loss, self.nonfinite_loss, batch):
            return None
        self.log("train_loss", loss, prog_bar=True, batch_size=batch["x"].shape[0])
        return loss

    @override
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        """Log ``val_loss`` on a fixed prior batch."""
        self.log("val_loss", self.loss(batch), prog_bar=True, sync_dist=True, batch_size=batch["x"].shape[0])

    @override
    def configure_optimizers(self) -> Any:
        """AdamW (or the injected optimiser), with warm-up + cosine when ``warmup_steps > 0``."""
        config = configure_optimization(self, self.parameters())
        if self.scheduler_factory is not None or not self.warmup_steps:
            return config
        warmup, total = self.warmup_steps, []

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            if not total:  # read lazily: asking for it in configure_optimizers loads the train loader before a
                # resumed fit restores its state, and the resumed run would replay the stream from the start
                total.append(max(int(self.trainer.estimated_stepping_batches), warmup + 1))
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total[0] - warmup))))

        scheduler = torch.optim.lr_scheduler.LambdaLR(config, factor)
        return {"optimizer": config, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
