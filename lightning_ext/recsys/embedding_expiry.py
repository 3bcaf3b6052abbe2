"""The Lightning side of Monolith's expirable embeddings: evict stale rows of every collisionless table."""

from __future__ import annotations

from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override

from lightning_ext.core.validation import PositiveInt, check_positive_int
from lightning_ext.recsys.collisionless import CollisionlessEmbedding, reset_optimizer_rows


class EmbeddingExpiry(Callback):
    """Monolith's expirable embeddings: every `every_n_steps` optimizer steps, evict each collisionless table's stale rows.

    Liu et al., *Monolith: Real Time Recommendation System With Collisionless Embedding Table*, arXiv 2209.07663
    (``Evict(max_update_time)`` in github.com/bytedance/monolith ``cuckoo_embedding_hash_table.cc``).

    For every :class:`~lightning_ext.recsys.collisionless.CollisionlessEmbedding` inside the LightningModule,
    rows whose last update is at least the table's ``expire_after`` older than the latest time it has seen
    (event time from the batches, or its training-lookup count) are freed and re-initialised, and the
    optimisers' per-row state of those rows (Adam's moments, ...) is zeroed, so the next id to take a row starts
    fresh. Everything it changes lives in the module's buffers and the optimiser state, so checkpoints restore
    it. Logs ``embedding/evicted`` (rows freed at this step) and ``embedding/rows`` (rows in use).

    Args:
        every_n_steps: eviction period in optimizer steps (Monolith: every ``feature_evict_every_n_hours``).

    Example:
        >>> EmbeddingExpiry(every_n_steps=100)
        EmbeddingExpiry(every_n_steps=100)
    """

    def __init__(self, every_n_steps: PositiveInt = 1) -> None:
        super().__init__()
        self.every_n_steps = check_positive_int("every_n_steps", every_n_steps)

    def __repr__(self) -> str:
        return f"EmbeddingExpiry(every_n_steps={self.every_n_steps})"

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Refuse a module without a collisionless table (nothing to expire; checked after the module's setup)."""
        if not any(isinstance(m, CollisionlessEmbedding) for m in pl_module.modules()):
            raise ValueError(f"EmbeddingExpiry found no CollisionlessEmbedding in {type(pl_module).__name__}; "
                             "remove the callback or use collisionless tables (e.g. CollisionlessMF).")

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        """Evict stale rows every ``every_n_steps`` optimizer steps and reset their optimiser state."""
        if trainer.global_step == 0 or trainer.global_step % self.every_n_steps:
            return
        evicted = rows = 0
        for table in pl_module.modules():
            if not isinstance(table, CollisionlessEmbedding):
                continue
            old = table.evict()
            if len(old):
                for optimizer in trainer.optimizers:
                    reset_optimizer_rows(optimizer, table.weight, old)
            evicted += len(old)
            rows += table.num_rows
        pl_module.log("embedding/evicted", float(evicted), on_step=True, on_epoch=False)
        pl_module.log("embedding/rows", float(rows), on_step=True, on_epoch=False)
