"""DNIS's bi-level search as a LightningModule: rating prediction on :class:`~.dnis.DNISEmbedding` (the wrapper)."""

from __future__ import annotations

from typing import Any, Literal, Optional, Sequence, get_args

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn
from torchmetrics import MeanSquaredError
from typing_extensions import override

from lightning_ext.core.guards import NonFiniteLoss, check_loss, check_nonfinite_policy, refuse_skip_under_ddp
from lightning_ext.core.strategy import require_find_unused_parameters
from lightning_ext.core.validation import (
    NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, check_choice, check_fraction, check_non_negative,
    check_number, check_positive, check_positive_int,
)
from lightning_ext.recsys.dnis import DNISEmbedding, SearchSpace

#: the network on top of the two embeddings
Backbone = Literal["mlp", "fm"]


def normalized_alpha_grad(grad: torch.Tensor) -> torch.Tensor:
    """DNIS's ``alpha_grad_norm``: each feature block's (row's) α gradient divided by its mean absolute value."""
    return grad / grad.abs().mean(1, keepdim=True).clamp(min=1e-12)


class DNISRecommender(LightningModule):
    """DNIS (Cheng et al., 2020): rating prediction whose embedding dimensions are searched bi-level (weights on train, α on validation), then pruned.

    Cheng, Shen and Huang, *Differentiable Neural Input Search for Recommender Systems*, arXiv 2006.04466.
    Reference code: github.com/Viperccc/AutoSrh (``main_nas.py``, ``model/nas.py``; defaults of ``DNIS-CF.sh``).

    Prediction ``r̂ = μ + b_u + b_i + g(e_u, e_i)`` with ``g`` an MLP on ``[e_u ‖ e_i]`` or the FM term
    ``<e_u, e_i>``; users and items share one :class:`~lightning_ext.recsys.dnis.DNISEmbedding` (one frequency
    ranking, as in the official code). Loss: MSE. Phases by epoch, under manual optimisation with two optimisers:

    1. warm start (``warm_start_epochs``): all weights with Adam (``lr_w``), α fixed at 1;
    2. search (``search_epochs``): per step, the ``"train"`` batch updates the embeddings and biases (the backbone
       too unless ``freeze_backbone_in_search``, the official choice); the ``"search"`` batch updates α by SGD
       (``lr_a``) on ``MSE + l1 · Σ|α|``, first order, the gradient of each feature block divided by its mean
       absolute value when ``alpha_grad_norm``; α clamped to [0, 1] after each step;
    3. retrain: at the first retrain epoch α is pruned to ``prune_budget`` of the embedding parameters (``None``:
       no pruning), the weight optimiser's state is reset and all weights train with α frozen as a 0/1 mask.

    Batches: ``{"train": (ids (B, 2), rating), "search": (ids, rating)}`` from
    :class:`~lightning_ext.recsys.movielens_ratings.MovieLens100KRatingsDataModule` (the search part is also the
    validation split). Logs ``train_loss``, ``val_mse``, ``test_mse``, ``dnis/embedding_parameters`` and, in
    search, ``dnis/alpha_mean``.

    Args:
        num_ids: ids in the shared space (``None``: the DataModule's ``num_ids``).
        backbone: ``"mlp"`` or ``"fm"``.
        embedding_dim: embedding size.
        mlp_hidden: hidden widths of the MLP backbone.
        feature_blocks, dim_blocks, search_space, normalize: see :class:`~lightning_ext.recsys.dnis.DNISEmbedding`.
        lr_w: Adam learning rate of the weights.
        lr_a: SGD learning rate of α.
        l1: L1 weight on α in the search step.
        warm_start_epochs: epochs before the search.
        search_epochs: search epochs (0: no search, a plain model).
        prune_budget: share of the embedding parameters kept after the search (``None``: no pruning).
        alpha_grad_norm: divide each feature block's α gradient by its mean absolute value.
        freeze_backbone_in_search: only embeddings and biases train during the search.
        nonfinite_loss: ``"error"``, ``"skip"`` or ``"warn"`` (see :mod:`lightning_ext.core.guards`).

    Example:
        >>> model = DNISRecommender(num_ids=10, embedding_dim=8, dim_blocks=4, feature_blocks=2)
        >>> model(torch.tensor([[0, 7], [3, 9]])).shape
        torch.Size([2])
    """

    def __init__(self, num_ids: Optional[PositiveInt] = None, backbone: Backbone = "mlp", embedding_dim: PositiveInt = 64,
                 mlp_hidden: Sequence[PositiveInt] = (64,), feature_blocks: PositiveInt = 10,
                 dim_blocks: PositiveInt = 16, search_space: SearchSpace = "free", normalize: bool = False,
                 lr_w: PositiveFloat = 1e-3, lr_a: PositiveFloat = 1e-2, l1: NonNegativeFloat = 1e-5,
                 warm_start_epochs: NonNegativeInt = 20, search_epochs: NonNegativeInt = 30,
                 prune_budget: Optional[float] = 0.5, alpha_grad_norm: bool = True,
                 freeze_backbone_in_search: bool = True, nonfinite_loss: NonFiniteLoss = "error") -> None:
        super().__init__()
        if num_ids is not None:
            check_positive_int("num_ids (or None: from the data)", num_ids)
        check_choice("backbone", backbone, get_args(Backbone))
        check_positive_int("embedding_dim", embedding_dim)
        for width in mlp_hidden:
            check_positive_int("every mlp_hidden width", width)
        check_positive("lr_w", lr_w)
        check_positive("lr_a", lr_a)
        check_non_negative("l1", l1)
        check_number("warm_start_epochs", warm_start_epochs, low=0, integer=True)
        check_number("search_epochs", search_epochs, low=0, integer=True)
        if prune_budget is not None:
            check_fraction("prune_budget (or None: no pruning)", prune_budget, allow_zero=False)
        check_nonfinite_policy(nonfinite_loss)
        check_positive_int("feature_blocks", feature_blocks)
        check_positive_int("dim_blocks", dim_blocks)
        check_choice("search_space", search_space, get_args(SearchSpace))
        if embedding_dim % dim_blocks:
            raise ValueError(f"embedding_dim ({embedding_dim}) must be a multiple of dim_blocks ({dim_blocks}).")
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.backbone_kind, self.embedding_dim, self.mlp_hidden = backbone, embedding_dim, tuple(mlp_hidden)
        self.block_args = dict(feature_blocks=feature_blocks, dim_blocks=dim_blocks, search_space=search_space,
                               normalize=normalize)
        self.lr_w, self.lr_a, self.l1 = lr_w, lr_a, l1
        self.warm_start_epochs, self.search_epochs, self.prune_budget = warm_start_epochs, search_epochs, prune_budget
        self.alpha_grad_norm, self.freeze_backbone_in_search = alpha_grad_norm, freeze_backbone_in_search
        self.nonfinite_loss = nonfinite_loss
        self.embedding: Optional[DNISEmbedding] = None
        self.val_mse, self.test_mse = MeanSquaredError(), MeanSquaredError()
        if num_ids is not None:
            self._build(num_ids)

    def _build(self, num_ids: int, frequency=None, mean: float = 0.0) -> None:
        self.hparams["num_ids"] = num_ids
        self.embedding = DNISEmbedding(num_ids, self.embedding_dim, frequency, **self.block_args)
        self.bias = nn.Embedding(num_ids, 1)
        nn.init.zeros_(self.bias.weight)
        self.global_bias = nn.Parameter(torch.tensor([float(mean)]))
        if self.backbone_kind == "mlp":
            layers, width = [], 2 * self.embedding_dim
            for hidden in self.mlp_hidden:
                layers += [nn.Linear(width, hidden), nn.ReLU()]
                width = hidden
            self.backbone = nn.Sequential(*layers, nn.Linear(width, 1))
        else:
            self.backbone = None

    @override
    def setup(self, stage: str) -> None:
        """Build from the DataModule's ``num_ids``, ``frequency`` and training mean (unless built)."""
        refuse_skip_under_ddp(self, self.nonfinite_loss)
        if self._trainer is not None:
            require_find_unused_parameters(self.trainer, "DNISRecommender",
                                           "leaves α or the frozen weights without a gradient in some steps")
        if self.embedding is not None:
            return
        dm = self.trainer.datamodule if self._trainer is not None else None
        if dm is None or getattr(dm, "num_ids", None) is None:
            raise RuntimeError("DNISRecommender needs MovieLens100KRatingsDataModule (or a DataModule with `num_ids`, "
                               "`frequency`) as `datamodule=`, or `num_ids` given.")
        dm.setup(stage)
        self._build(dm.num_ids, dm.frequency, getattr(dm, "train_mean", 0.0))

    # -- model -----------------------------------------------------------------------------------------------
    @override
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Predicted ratings ``(B,)`` of ``(B, 2)`` ``(user id, item id)`` rows."""
        if ids.dim() != 2 or ids.shape[1] != 2:
            raise ValueError(f"DNISRecommender takes (B, 2) (user id, item id) rows, got {tuple(ids.shape)}.")
        e = self.embedding(ids)  # (B, 2, d)
        out = self.global_bias + self.bias(ids).sum((1, 2))
        if self.backbone is None:
            return out + (e[:, 0] * e[:, 1]).sum(-1)
        return out + self.backbone(e.reshape(len(ids), -1)).squeeze(-1)

    def phase(self, epoch: Optional[int] = None) -> str:
        """``"warm"``, ``"search"`` or ``"retrain"`` at this epoch."""
        epoch = self.current_epoch if epoch is None else epoch
        if epoch < self.warm_start_epochs:
            return "warm"
        return "search" if epoch < self.warm_start_epochs + self.search_epochs else "retrain"

    def _weight_params(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if n != "embedding.alpha"]

    @override
    def configure_optimizers(self) -> Any:
        """Adam over the weights (``lr_w``) and SGD over α (``lr_a``)."""
        return [torch.optim.Adam(self._weight_params(), lr=self.lr_w),
                torch.optim.SGD([self.embedding.alpha], lr=self.lr_a)]

    # -- steps -----------------------------------------------------------------------------------------------
    @override
    def on_train_epoch_start(self) -> None:
        """Prune α at the first retrain epoch (once) and reset the weight optimiser's state."""
        if (self.phase() == "retrain" and self.search_epochs and self.prune_budget is not None
                and not bool(self.embedding.pruned)):
            self.embedding.prune(budget=self.prune_budget)
            self.optimizers()[0].optimizer.state.clear()
        self.log("dnis/embedding_parameters", float(self.embedding.parameter_count()), on_epoch=True, on_step=False)

    @override
    def training_step(self, batch: dict, batch_idx: int) -> Optional[torch.Tensor]:
        """One weight step on the ``"train"`` batch; in the search phase also one α step on the ``"search"`` batch."""
        if not isinstance(batch, dict) or "train" not in batch:
            raise ValueError("DNISRecommender trains on {'train': (ids, rating), 'search': (ids, rating)} batches "
                             "(MovieLens100KRatingsDataModule's CombinedLoader).")
        opt_w, opt_a = self.optimizers()
        ids, rating = batch["train"]
        loss = F.mse_loss(self(ids), rating)
        if not check_loss(self, loss, self.nonfinite_loss, batch):
            return None
        opt_w.zero_grad()
        self.manual_backward(loss)
        self.embedding.alpha.grad = None
        searching = self.phase() == "search"
        if searching and self.freeze_backbone_in_search and self.backbone is not None:
            for p in self.backbone.parameters():
                p.grad = None
        if searching:
            self.global_bias.grad = None  # the official search updates only `feature` parameters
        opt_w.step()
        self.log("train_loss", loss, prog_bar=True, batch_size=len(ids))
        if searching and batch.get("search") is not None:
            self._search_step(opt_a, *batch["search"])
        return loss

    def search_loss(self, ids: torch.Tensor, rating: torch.Tensor) -> torch.Tensor:
        """The architecture step's objective on a search batch: ``MSE + l1 · Σ|α|``."""
        return F.mse_loss(self(ids), rating) + self.l1 * self.embedding.alpha.abs().sum()

    def _search_step(self, opt_a, ids: torch.Tensor, rating: torch.Tensor) -> None:
        alpha = self.embedding.alpha
        loss = self.search_loss(ids, rating)
        opt_a.zero_grad()
        self.manual_backward(loss)
        for p in self._weight_params():
            p.grad = None
        if self.alpha_grad_norm and alpha.grad is not None:
            alpha.grad = normalized_alpha_grad(alpha.grad)
        opt_a.step()
        with torch.no_grad():
            alpha.clamp_(0.0, 1.0)
        self.log("dnis/alpha_mean", alpha.detach().mean(), on_step=False, on_epoch=True, batch_size=len(ids))

    @override
    def validation_step(self, batch, batch_idx: int) -> None:
        """Accumulate the validation MSE."""
        self.val_mse.update(self(batch[0]), batch[1])

    @override
    def on_validation_epoch_end(self) -> None:
        """Log ``val_mse``."""
        self.log("val_mse", self.val_mse.compute(), prog_bar=True)
        self.val_mse.reset()

    @override
    def test_step(self, batch, batch_idx: int) -> None:
        """Accumulate the test MSE."""
        self.test_mse.update(self(batch[0]), batch[1])

    @override
    def on_test_epoch_end(self) -> None:
        """Log ``test_mse``."""
        self.log("test_mse", self.test_mse.compute())
        self.test_mse.reset()
