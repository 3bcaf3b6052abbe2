"""``ABEModule``: a LightningModule training an attention-based ensemble with a metric and a divergence loss."""

from __future__ import annotations

from typing import Any, Literal, Optional

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from typing_extensions import override

from lightning_ext.core.distributed import gather_with_grad, world_size
from lightning_ext.core.guards import NonFiniteLoss, check_loss, check_nonfinite_policy, refuse_skip_under_ddp
from lightning_ext.core.optimization import check_optimization, configure_optimization
from lightning_ext.core.paths import check_path_argument
from lightning_ext.core.samples import GREEN, RED, log_sample_image, sample_epoch_due, tile_rows
from lightning_ext.core.validation import (
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    check_choice,
    check_non_negative,
    check_number,
    check_positive_int,
)
from lightning_ext.metric_learning.abe import ABE, divergence_loss, learner_spread, tiny_abe
from lightning_ext.metric_learning.losses import contrastive_loss
from lightning_ext.metric_learning.retrieval import recall_at_k

__all__ = ["ABEModule"]

_SAMPLE_GALLERY = 512  #: validation images kept for the retrieval sample


class ABEModule(LightningModule):
    r"""Deep metric learning with an Attention-based Ensemble: ``M`` attention-masked learners over one network.

    Paper: Kim, Goyal, Chawla, Lee and Kwon, "Attention-based Ensemble for Deep Metric Learning", ECCV 2018,
    arXiv 1804.00382 (no official code; the Keras ``ABE`` of the kerastools repositories is the reference).

    Loss of a batch, with :math:`f_m` the learners' L2-normalised embeddings (:class:`ABE`):

    .. math:: L = \sum_{m=1}^{M} L_{metric}(f_m) + \lambda_{div} L_{div}

    with :func:`~lightning_ext.metric_learning.losses.contrastive_loss` (margin ``margin``) as :math:`L_{metric}`
    and :func:`~lightning_ext.metric_learning.abe.divergence_loss` (margin ``div_margin``). ``div_weight=0`` is the
    paper's "without divergence" ablation; ``num_learners=1`` a single learner (no attention). The published
    weights disagree (a PyTorch port: :math:`\lambda_{div}=0.05`, :math:`m=0.5`; a TF port: 0.5 and 0.5), so both
    are arguments; tune them on the validation retrieval.

    Validation and test embed the whole split and log ``{val,test}_recall@K`` (retrieval by cosine, every item a
    query; on unseen classes with :class:`~lightning_ext.metric_learning.unseen_classes.UnseenClassesDataModule`)
    and ``{val,test}_spread`` (mean squared distance between the learners' embeddings of the same image: the
    ensemble's diversity). Under DDP the training pairs are those of the global batch (embeddings gathered with
    exact gradients) and retrieval runs on the embeddings of all ranks (a split whose size the world size does
    not divide is padded by the distributed sampler with repeated images, which then find themselves: keep the
    evaluation splits divisible or evaluate in one process).

    Args:
        in_chans: input channels of the default network (:func:`~lightning_ext.metric_learning.abe.tiny_abe`).
        width: its base width.
        num_learners: :math:`M`.
        embedding_dim: total embedding dimension :math:`D` (each learner ``D / M``).
        margin: contrastive margin :math:`m`.
        div_weight: :math:`\lambda_{div}`.
        div_margin: :math:`m_{div}` (squared distance; learners' embeddings are unit vectors, so at most 4).
        net: an :class:`ABE` of your own instead of the default network.
        recall_ks: the K of Recall@K.
        lr: learning rate of the default AdamW.
        weight_decay: its weight decay.
        optimizer: optimiser factory (LightningCLI style); overrides ``lr``/``weight_decay``.
        scheduler: LR-scheduler factory.
        scheduler_interval: ``"epoch"`` or ``"step"``.
        nonfinite_loss: ``"error"``, ``"skip"`` or ``"warn"`` on a non-finite training loss.
        sample_images_every_n_epochs: every this many validation epochs of a fit, save a retrieval sample: the
            first ``num_sample_queries`` validation images, each followed by its 5 nearest neighbours among the
            first 512 validation images, framed green (same class) or red (0: never).
        sample_images_dir: where (relative to ``trainer.log_dir``; ``None`` disables the files; TensorBoard gets
            the image too).
        num_sample_queries: query rows in the sample.

    Example:
        >>> model = ABEModule(num_learners=4, embedding_dim=32)
        >>> model(torch.randn(3, 1, 8, 8)).shape
        torch.Size([3, 32])
    """

    def __init__(
        self,
        in_chans: PositiveInt = 1,
        width: PositiveInt = 32,
        num_learners: PositiveInt = 4,
        embedding_dim: PositiveInt = 32,
        margin: NonNegativeFloat = 0.5,
        div_weight: NonNegativeFloat = 0.05,
        div_margin: NonNegativeFloat = 1.0,
        net: Optional[nn.Module] = None,
        recall_ks: list[PositiveInt] = [1, 2, 4, 8],  # noqa: B006 - read only, a YAML-visible default
        lr: PositiveFloat = 1e-3,
        weight_decay: NonNegativeFloat = 0.0,
        optimizer: Optional[OptimizerCallable] = None,
        scheduler: Optional[LRSchedulerCallable] = None,
        scheduler_interval: Literal["epoch", "step"] = "epoch",
        nonfinite_loss: NonFiniteLoss = "error",
        sample_images_every_n_epochs: NonNegativeInt = 5,
        sample_images_dir: Optional[str] = "samples",
        num_sample_queries: PositiveInt = 6,
    ) -> None:
        super().__init__()
        for name, value in (("margin", margin), ("div_weight", div_weight), ("div_margin", div_margin)):
            check_non_negative(name, value)
        check_optimization(lr, weight_decay)
        check_nonfinite_policy(nonfinite_loss)
        check_choice("scheduler_interval", scheduler_interval, ("epoch", "step"))
        check_number("sample_images_every_n_epochs", sample_images_every_n_epochs, low=0, integer=True)
        check_path_argument("sample_images_dir", sample_images_dir)
        check_positive_int("num_sample_queries", num_sample_queries)
        if net is not None and not isinstance(net, ABE):
            raise TypeError(f"net must be an ABE (lightning_ext.metric_learning.abe.ABE); got {type(net).__name__}.")
        self.net = net if net is not None else tiny_abe(in_chans, width, num_learners, embedding_dim)
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler"])
        self.margin, self.div_weight, self.div_margin = margin, div_weight, div_margin
        self.recall_ks = sorted({int(k) for k in recall_ks})
        self.lr, self.weight_decay = lr, weight_decay
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.scheduler_interval, self.nonfinite_loss, self.skipped_steps = scheduler_interval, nonfinite_loss, 0
        self._outputs: dict[str, list] = {"val": [], "test": []}
        self.sample_every, self.sample_dir, self.num_sample_queries = (sample_images_every_n_epochs, sample_images_dir,
                                                                       num_sample_queries)
        self._sample_images: list[torch.Tensor] = []

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The ensemble embedding ``(B, D)`` (the learners' unit embeddings concatenated)."""
        return self.net.embed(x)

    @override
    def setup(self, stage: str) -> None:
        """Refuse ``nonfinite_loss='skip'`` under DDP."""
        refuse_skip_under_ddp(self, self.nonfinite_loss)

    def losses(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """The batch's metric loss (summed over learners), divergence loss and their weighted total.

        Under DDP the embeddings and labels of all ranks are gathered first (gradients flow back to their owners,
        :func:`~lightning_ext.core.distributed.gather_with_grad`), so the pairs are those of the global batch and
        a two-process run trains as one process with the same global batch.
        """
        f = self.net(x)
        if world_size() > 1:
            f = gather_with_grad(f)
            y = self.all_gather(y).flatten(0, 1)
        metric = sum(contrastive_loss(f[:, m], y, self.margin) for m in range(f.shape[1]))
        div = divergence_loss(f, self.div_margin)
        return {"loss": metric + self.div_weight * div, "metric_loss": metric, "div_loss": div, "embeddings": f}

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Optional[torch.Tensor]:
        """Metric plus weighted divergence loss of one batch."""
        x, y = batch
        out = self.losses(x, y)
        if not check_loss(self, out["loss"], self.nonfinite_loss, batch):
            return None
        self.log("train_loss", out["loss"], prog_bar=True)
        self.log("train_metric_loss", out["metric_loss"])
        self.log("train_div_loss", out["div_loss"])
        return out["loss"]

    def _collect(self, batch: Any, stage: str) -> None:
        x, y = batch
        f = self.net(x)
        self._outputs[stage].append((f.detach(), y.detach()))
        if stage == "val" and sample_epoch_due(self, self.sample_every):
            kept = sum(len(i) for i in self._sample_images)
            if kept < _SAMPLE_GALLERY:
                self._sample_images.append(x[:_SAMPLE_GALLERY - kept].detach().cpu())

    def _save_retrieval_sample(self, outputs: list) -> None:
        images, self._sample_images = self._sample_images, []
        if not images:
            return
        x = torch.cat(images)
        n = len(x)
        f = torch.cat([o[0] for o in outputs])[:n].flatten(1).float().cpu()
        y = torch.cat([o[1] for o in outputs])[:n].cpu()
        f = torch.nn.functional.normalize(f, dim=1)
        sim = f @ f.T
        sim.fill_diagonal_(-float("inf"))
        q = min(self.num_sample_queries, n)
        k = min(5, n - 1)
        nearest = sim[:q].topk(k, dim=1).indices
        rows = [[x[i]] + [x[j] for j in nearest[i]] for i in range(q)]
        borders = [[None] + [GREEN if y[j] == y[i] else RED for j in nearest[i]] for i in range(q)]
        log_sample_image(self, tile_rows(rows, borders), "val_retrieval", self.sample_dir,
                         f"epoch {self.current_epoch + 1}: query, then its {k} nearest (green: same class)")

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Embed the batch (retrieval runs at the epoch's end)."""
        self._collect(batch, "val")

    @override
    def test_step(self, batch: Any, batch_idx: int) -> None:
        """Embed the batch (retrieval runs at the epoch's end)."""
        self._collect(batch, "test")

    def _retrieval(self, stage: str) -> None:
        outputs, self._outputs[stage] = self._outputs[stage], []
        if not outputs:
            return
        if stage == "val":
            self._save_retrieval_sample(outputs)
        f = torch.cat([o[0] for o in outputs])
        y = torch.cat([o[1] for o in outputs])
        if self.trainer.world_size > 1:  # every rank evaluates the whole split
            f = self.all_gather(f).flatten(0, 1)
            y = self.all_gather(y).flatten(0, 1)
        recalls = recall_at_k(f.flatten(1), y, self.recall_ks)
        for k, value in recalls.items():
            self.log(f"{stage}_recall@{k}", value, prog_bar=k == self.recall_ks[0], rank_zero_only=False)
        self.log(f"{stage}_spread", learner_spread(f))

    @override
    def on_validation_epoch_end(self) -> None:
        """Recall@K and learner spread of the validation split."""
        self._retrieval("val")

    @override
    def on_test_epoch_end(self) -> None:
        """Recall@K and learner spread of the test split."""
        self._retrieval("test")

    @override
    def configure_optimizers(self):
        """The injected optimiser (default AdamW) and scheduler."""
        return configure_optimization(self, [p for p in self.parameters() if p.requires_grad])
