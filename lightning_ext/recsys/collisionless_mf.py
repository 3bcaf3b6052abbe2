"""MF-BPR on Monolith's collisionless embedding tables (the Lightning wrapper of :mod:`.collisionless`)."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from lightning.pytorch.cli import OptimizerCallable
from typing_extensions import override

from lightning_ext.core.guards import NonFiniteLoss
from lightning_ext.core.validation import (
    NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, check_non_negative, check_positive_int,
)
from lightning_ext.recsys.collisionless import Admission, CollisionlessEmbedding
from lightning_ext.recsys.recommender import Recommender, bpr_loss


class CollisionlessMF(Recommender):
    """MF-BPR whose user and item tables are Monolith collisionless embeddings (admission filter, expiry, exact rows).

    Liu et al., *Monolith: Real Time Recommendation System With Collisionless Embedding Table*, arXiv 2209.07663.
    The score is ``<e_u, e_i>`` as in :class:`~lightning_ext.recsys.mf_bpr.MFBPR`, but a user or item only gets
    a row once the table admits it (``admission``/``occurrence_threshold``), rows can expire (``expire_after``
    training lookups, with the :class:`~lightning_ext.recsys.embedding_expiry.EmbeddingExpiry` callback) and ids
    without a row score from zeros. Loss: mean BPR plus ``reg_weight · ½(||e_u||² + ||e_i+||² + ||e_i-||²) / B``.

    Args:
        user_capacity: rows of the user table (default: the number of users).
        item_capacity: rows of the item table (default: the number of items).
        admission: ``"none"``, ``"counting"`` or ``"probabilistic"`` (both tables).
        occurrence_threshold: admission threshold T (both tables).
        expire_after: row age in training lookups at which EmbeddingExpiry frees a row (``None``: never).
        reg_weight: L2 weight on the batch's embeddings.
        num_users, num_items, embedding_dim, lr, init_std, eval_ks, optimizer, nonfinite_loss: see
            :class:`~lightning_ext.recsys.recommender.Recommender` (rows start as N(0, init_std²)).

    Example:
        >>> model = CollisionlessMF(num_users=5, num_items=7, embedding_dim=4)
        >>> loss = model.training_loss(torch.tensor([0, 1]), torch.tensor([2, 3]), torch.tensor([4, 5]))["loss"]
        >>> model.user_embedding.num_rows, model.item_embedding.num_rows
        (2, 4)
    """

    def __init__(self, user_capacity: Optional[PositiveInt] = None, item_capacity: Optional[PositiveInt] = None,
                 admission: Admission = "none", occurrence_threshold: NonNegativeInt = 0,
                 expire_after: Optional[PositiveFloat] = None, reg_weight: NonNegativeFloat = 1e-4,
                 num_users: Optional[PositiveInt] = None, num_items: Optional[PositiveInt] = None,
                 embedding_dim: PositiveInt = 64, lr: PositiveFloat = 1e-3, init_std: PositiveFloat = 0.1,
                 eval_ks: Sequence[PositiveInt] = (10, 20, 40), optimizer: Optional[OptimizerCallable] = None,
                 nonfinite_loss: NonFiniteLoss = "error") -> None:
        for name, cap in (("user_capacity", user_capacity), ("item_capacity", item_capacity)):
            if cap is not None:
                check_positive_int(f"{name} (or None: one row per user/item)", cap)
        self.user_capacity, self.item_capacity = user_capacity, item_capacity
        self.table_kwargs = dict(admission=admission, occurrence_threshold=occurrence_threshold,
                                 expire_after=expire_after)
        CollisionlessEmbedding(1, 1, **self.table_kwargs)  # validate the table arguments before anything else
        self.reg_weight = check_non_negative("reg_weight", reg_weight)
        super().__init__(num_users, num_items, embedding_dim, lr, "normal", init_std, eval_ks, optimizer,
                         nonfinite_loss)
        self.hparams.pop("init", None)

    def _build(self, num_users: int, num_items: int) -> None:
        self.num_users, self.num_items = num_users, num_items
        self.hparams["num_users"], self.hparams["num_items"] = num_users, num_items
        self.user_embedding = CollisionlessEmbedding(self.embedding_dim, self.user_capacity or num_users,
                                                     self.init_std, seed=0, **self.table_kwargs)
        self.item_embedding = CollisionlessEmbedding(self.embedding_dim, self.item_capacity or num_items,
                                                     self.init_std, seed=1, **self.table_kwargs)

    @override
    def setup(self, stage: str) -> None:
        """Refuse more than one process (each rank would admit different ids into its own rows); then as the base."""
        if self._trainer is not None and self.trainer.world_size > 1:
            raise ValueError("CollisionlessMF runs in one process: under DDP every rank would admit different ids into "
                             "the same rows of its table copy; use `devices=1` (or a hashed or full table).")
        super().setup(stage)

    def _build_for_state(self, state_dict: dict, prefix: str, *args: Any) -> None:
        """Tables are sized by capacity, not by the data: nothing to infer from a state's shapes."""

    def propagate(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every user's and item's current embedding (zeros without a row); never inserts."""
        users = self.user_embedding.read(torch.arange(self.num_users, device=self.user_embedding.keys.device))
        items = self.item_embedding.read(torch.arange(self.num_items, device=self.item_embedding.keys.device))
        return users, items

    def training_loss(self, users, pos, neg):
        u, i, j = self.user_embedding(users), self.item_embedding(pos), self.item_embedding(neg)
        bpr = bpr_loss(u, i, j)
        reg = self.reg_weight * 0.5 * (u.pow(2).sum() + i.pow(2).sum() + j.pow(2).sum()) / len(users)
        return {"loss": bpr + reg, "bpr": bpr, "reg": reg}
