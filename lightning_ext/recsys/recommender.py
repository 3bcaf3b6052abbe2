"""The shared base of the collaborative-filtering LightningModules: embeddings, BPR, full-ranking evaluation."""

from __future__ import annotations

from typing import Any, Literal, Optional, Sequence, get_args

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import OptimizerCallable
from torch import nn
from typing_extensions import override

from lightning_ext.core.guards import (
    NonFiniteLoss,
    SkippedStepsCheckpoint,
    check_loss,
    check_nonfinite_policy,
    refuse_skip_under_ddp,
)
from lightning_ext.core.validation import PositiveFloat, PositiveInt, check_choice, check_positive, check_positive_int
from lightning_ext.recsys.graph import symmetric_norm_values
from lightning_ext.recsys.metrics import RankingMetrics

#: how the embedding tables (and DCCF's intent prototypes) are initialised
Init = Literal["normal", "xavier_uniform", "xavier_normal"]


def bpr_loss(user: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Mean BPR loss ``softplus(<u, i-> - <u, i+>)`` over a batch of embedding triples."""
    return F.softplus((user * neg).sum(-1) - (user * pos).sum(-1)).mean()


class Recommender(SkippedStepsCheckpoint, LightningModule):
    """Base class: user/item embeddings trained on BPR triples, evaluated by full ranking with known items masked.

    Subclasses implement :meth:`propagate` (the final user and item embeddings), :meth:`training_loss` and,
    when they need the interaction graph, :meth:`prepare`. The numbers of users and items may be left ``None``:
    they are then read from the DataModule's :class:`~lightning_ext.recsys.interactions.Interactions` in
    ``setup`` and saved with the hyperparameters, so checkpoints restore without the data. Graph buffers are
    not saved: after ``load_from_checkpoint`` call :meth:`bind` with the data (a Trainer run does it).

    Training batches are ``(B, 3)`` triples ``(user, positive, negative)``. Validation/test batches are user
    batches (see :mod:`lightning_ext.recsys.interactions`); the module logs ``{val,test}_recall@K`` and
    ``{val,test}_ndcg@K`` for every K in ``eval_ks``. ``predict_step`` returns each user's top ``max(eval_ks)``
    unseen items.

    Args:
        num_users: number of users (``None``: from the data; give both sizes or neither).
        num_items: number of items (``None``: from the data).
        embedding_dim: embedding size.
        lr: learning rate of the default Adam.
        init: ``"normal"`` (std ``init_std``), ``"xavier_uniform"`` or ``"xavier_normal"``.
        init_std: std of the normal initialisation.
        eval_ks: ranking cut-offs logged in validation and test.
        optimizer: optimiser factory ``params -> Optimizer``; overrides ``lr``.
        nonfinite_loss: on a non-finite training loss, ``"error"`` (one line naming the step, epoch and likely
            cause), ``"skip"`` the optimizer step (counted in ``skipped_steps``; refused under DDP) or ``"warn"``
            (see :mod:`lightning_ext.core.guards`).
    """

    def __init__(self, num_users: Optional[PositiveInt] = None, num_items: Optional[PositiveInt] = None,
                 embedding_dim: PositiveInt = 64, lr: PositiveFloat = 1e-3, init: Init = "normal",
                 init_std: PositiveFloat = 0.1, eval_ks: Sequence[PositiveInt] = (10, 20, 40),
                 optimizer: Optional[OptimizerCallable] = None, nonfinite_loss: NonFiniteLoss = "error") -> None:
        super().__init__()
        check_positive_int("embedding_dim", embedding_dim)
        check_nonfinite_policy(nonfinite_loss)
        check_positive("lr", lr)
        check_choice("init", init, get_args(Init))
        check_positive("init_std", init_std)
        if isinstance(eval_ks, (str, bytes)) or not isinstance(eval_ks, Sequence):
            raise ValueError(f"eval_ks must be a list of ranking cut-offs, e.g. [10, 20], got {eval_ks!r}.")
        if not len(eval_ks):
            raise ValueError("eval_ks must list at least one ranking cut-off, e.g. [10, 20].")
        for k in eval_ks:
            check_positive_int("every eval_ks entry", k)
        if (num_users is None) != (num_items is None):
            raise ValueError(f"num_users and num_items go together: give both or neither (None reads both from the "
                             f"data), got num_users={num_users!r}, num_items={num_items!r}.")
        for name, n in (("num_users", num_users), ("num_items", num_items)):
            if n is not None:
                check_positive_int(f"{name} (or None to read it from the data)", n)
        self.save_hyperparameters(ignore=["optimizer"])
        self.embedding_dim, self.lr, self.init, self.init_std = embedding_dim, lr, init, init_std
        self.optimizer_factory = optimizer
        self.nonfinite_loss, self.skipped_steps = nonfinite_loss, 0
        self.num_users, self.num_items = num_users, num_items
        self.user_embedding: Optional[nn.Embedding] = None
        self.item_embedding: Optional[nn.Embedding] = None
        self.val_metrics = RankingMetrics(eval_ks)
        self.test_metrics = RankingMetrics(eval_ks)
        self.eval_ks = tuple(eval_ks)
        self._eval_embeddings: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self.bound = False
        if num_users is not None and num_items is not None:
            self._build(num_users, num_items)
        # a lazily sized model (sizes from the data in setup) receiving weights, e.g. the parent process of a
        # ddp_spawn fit: build the tables from the state's shapes first, or they would be silently dropped
        self._register_load_state_dict_pre_hook(self._build_for_state)

    def _build_for_state(self, state_dict: dict, prefix: str, *args: Any) -> None:
        key = prefix + "user_embedding.weight"
        if self.user_embedding is None and key in state_dict and prefix + "item_embedding.weight" in state_dict:
            device = next((t.device for t in self.buffers()), torch.device("cpu"))
            self._build(int(state_dict[key].shape[0]), int(state_dict[prefix + "item_embedding.weight"].shape[0]))
            self.to(device)

    # -- building --------------------------------------------------------------------------------------------
    def _build(self, num_users: int, num_items: int) -> None:
        self.num_users, self.num_items = num_users, num_items
        self.hparams["num_users"], self.hparams["num_items"] = num_users, num_items
        self.user_embedding = nn.Embedding(num_users, self.embedding_dim)
        self.item_embedding = nn.Embedding(num_items, self.embedding_dim)
        for emb in (self.user_embedding, self.item_embedding):
            self.init_weight(emb.weight)
        self.build_extra()

    def init_weight(self, weight: torch.Tensor) -> None:
        """Initialise a parameter the configured way."""
        if self.init == "normal":
            nn.init.normal_(weight, std=self.init_std)
        elif self.init == "xavier_uniform":
            nn.init.xavier_uniform_(weight)
        else:
            nn.init.xavier_normal_(weight)

    def build_extra(self) -> None:
        """Create parameters beyond the two embedding tables (called once the sizes are known)."""

    def bind(self, data) -> "Recommender":
        """Attach an :class:`~lightning_ext.recsys.interactions.Interactions` record (sizes and graph)."""
        if self.user_embedding is None:
            self._build(data.num_users, data.num_items)
        elif (self.num_users, self.num_items) != (data.num_users, data.num_items):
            raise ValueError(
                f"{type(self).__name__} was built for {self.num_users} users x {self.num_items} items but the data "
                f"has {data.num_users} x {data.num_items}. Leave `num_users`/`num_items` unset to take them from the data."
            )
        device = self.user_embedding.weight.device
        self.prepare(data)
        self.to(device)
        self.bound = True
        return self

    def prepare(self, data) -> None:
        """Build graph buffers from the training interactions (no-op for models without a graph)."""

    def build_graph(self, data) -> torch.Tensor:
        """Keep the training graph as ``self.graph`` and its ``D^-1/2 A D^-1/2`` edge values as the (unsaved) buffer
        ``norm_values``, which it returns: the first step of every graph model's :meth:`prepare`."""
        self.graph = data.graph()
        self.register_buffer("norm_values", symmetric_norm_values(self.graph), persistent=False)
        return self.norm_values

    @override
    def setup(self, stage: str) -> None:
        """Refuse ``nonfinite_loss='skip'`` under DDP; take sizes and graph from the DataModule (unless bound)."""
        refuse_skip_under_ddp(self, self.nonfinite_loss)
        if self.bound:
            return
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        data = getattr(dm, "interactions", None)
        if data is None:
            raise RuntimeError(
                f"{type(self).__name__} needs an InteractionDataModule (LastFMDataModule, MovieLens100KDataModule, "
                "InteractionFileDataModule, ...) passed as `datamodule=`, or call `model.bind(interactions)` first."
            )
        self.bind(data)

    # -- the model -------------------------------------------------------------------------------------------
    def propagate(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Final ``(user_embeddings (U, d), item_embeddings (I, d))`` used for scoring."""
        return self.user_embedding.weight, self.item_embedding.weight

    def training_loss(self, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"loss": total, <part>: value, ...}`` for one batch of triples."""
        raise NotImplementedError

    @override
    def forward(self, users: torch.Tensor) -> torch.Tensor:
        """Scores ``(B, I)`` of every item for these users."""
        user_emb, item_emb = self._eval_embeddings or self.propagate()
        return user_emb[users] @ item_emb.T

    # -- steps -----------------------------------------------------------------------------------------------
    @override
    def training_step(self, batch: torch.Tensor, batch_idx: int) -> Optional[torch.Tensor]:
        """The loss of a ``(B, 3)`` batch of BPR triples; logs ``train_loss`` and its parts (``None``: skipped)."""
        if batch.dim() != 2 or batch.shape[1] != 3:
            raise ValueError(f"training batches must be (B, 3) (user, positive, negative) triples, got {tuple(batch.shape)}.")
        parts = self.training_loss(batch[:, 0], batch[:, 1], batch[:, 2])
        if not check_loss(self, parts["loss"], self.nonfinite_loss):
            return None
        self.log("train_loss", parts["loss"], prog_bar=True, batch_size=len(batch))
        for name, value in parts.items():
            if name != "loss":
                self.log(f"train_{name}", value, on_step=False, on_epoch=True, batch_size=len(batch))
        return parts["loss"]

    def _cache_embeddings(self) -> None:
        with torch.no_grad():
            user_emb, item_emb = self.propagate()
            self._eval_embeddings = (user_emb.detach(), item_emb.detach())

    @override
    def on_validation_epoch_start(self) -> None:
        """Propagate once; every validation batch scores from these embeddings."""
        self._cache_embeddings()

    @override
    def on_test_epoch_start(self) -> None:
        """Propagate once; every test batch scores from these embeddings."""
        self._cache_embeddings()

    @override
    def on_predict_epoch_start(self) -> None:
        """Propagate once; every prediction batch scores from these embeddings."""
        self._cache_embeddings()

    def _eval_step(self, batch: dict, metrics: RankingMetrics) -> None:
        metrics.update(self(batch["users"]), batch["target"], batch["exclude"], copy=False)  # fresh scores

    @override
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Accumulate the ranking metrics of one user batch."""
        self._eval_step(batch, self.val_metrics)

    @override
    def test_step(self, batch: dict, batch_idx: int) -> None:
        """Accumulate the ranking metrics of one user batch."""
        self._eval_step(batch, self.test_metrics)

    @override
    def predict_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """Each user's top ``max(eval_ks)`` items, known items excluded."""
        scores = self(batch["users"])
        scores[batch["exclude"][0], batch["exclude"][1]] = float("-inf")
        return scores.topk(min(max(self.eval_ks), scores.shape[1]), dim=1).indices

    def _log_metrics(self, metrics: RankingMetrics, stage: str) -> None:
        for name, value in metrics.compute().items():
            self.log(f"{stage}_{name}", value, prog_bar=name == "recall@20")
        metrics.reset()
        self._eval_embeddings = None

    @override
    def on_validation_epoch_end(self) -> None:
        """Log ``val_recall@K`` and ``val_ndcg@K``."""
        self._log_metrics(self.val_metrics, "val")

    @override
    def on_test_epoch_end(self) -> None:
        """Log ``test_recall@K`` and ``test_ndcg@K``."""
        self._log_metrics(self.test_metrics, "test")

    @override
    def on_predict_epoch_end(self) -> None:
        """Drop the cached embeddings."""
        self._eval_embeddings = None

    @override
    def on_train_epoch_start(self) -> None:
        """Drop the cached embeddings: training changes them."""
        self._eval_embeddings = None

    @override
    def configure_optimizers(self) -> Any:
        """The injected optimiser factory, else Adam with ``lr``."""
        params = [p for p in self.parameters() if p.requires_grad]
        if self.optimizer_factory is not None:
            return self.optimizer_factory(params)
        return torch.optim.Adam(params, lr=self.lr)

    def squared_norm(self) -> torch.Tensor:
        """Σ ||θ||² over all trainable parameters."""
        return sum(p.pow(2).sum() for p in self.parameters() if p.requires_grad)
