"""TGNLinkPredictor: TGN (PyG's TGNMemory) for future-link prediction on an event stream, optionally with PRES."""

from __future__ import annotations

import time
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from typing_extensions import override

from lightning_ext.core.guards import check_loss, check_nonfinite_policy, refuse_skip_under_ddp
from lightning_ext.core.optional import require
from lightning_ext.core.validation import (NonNegativeFloat, OpenUnitInterval, PositiveFloat, PositiveInt,
                                           UnitIntervalRightOpen, check_choice, check_number, check_positive_int)
from lightning_ext.graph.pres import code_coherence, coherence_loss, pres_memory_class


class _AttentionEmbedding(nn.Module):
    """PyG ``examples/tgn.py``'s ``GraphAttentionEmbedding``: one ``TransformerConv`` over recent neighbours with
    edge features ``[time_enc(last_update[src] - t_event) || msg]``."""

    def __init__(self, in_channels: int, out_channels: int, msg_dim: int, time_enc: nn.Module, dropout: float):
        super().__init__()
        from torch_geometric.nn import TransformerConv

        self.time_enc = time_enc
        self.conv = TransformerConv(in_channels, out_channels // 2, heads=2, dropout=dropout,
                                    edge_dim=msg_dim + time_enc.out_channels)

    def forward(self, x: Tensor, last_update: Tensor, edge_index: Tensor, t: Tensor, msg: Tensor) -> Tensor:
        rel_t = (last_update[edge_index[0]] - t).to(x.dtype)
        return self.conv(x, edge_index, torch.cat([self.time_enc(rel_t), msg], dim=-1))


class _LinkHead(nn.Module):
    """PyG ``examples/tgn.py``'s ``LinkPredictor``: ``Lin(ReLU(Lin_src(z_src) + Lin_dst(z_dst)))``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.lin_src, self.lin_dst, self.lin_final = (nn.Linear(channels, channels), nn.Linear(channels, channels),
                                                      nn.Linear(channels, 1))

    def forward(self, z_src: Tensor, z_dst: Tensor) -> Tensor:
        return self.lin_final(F.relu(self.lin_src(z_src) + self.lin_dst(z_dst))).squeeze(-1)


class _NeighborState(nn.Module):
    """Holds PyG's ``LastNeighborLoader`` and puts its buffers into ``state_dict`` (extra state)."""

    def __init__(self, num_nodes: int, size: int) -> None:
        super().__init__()
        from torch_geometric.nn.models.tgn import LastNeighborLoader

        self.loader = LastNeighborLoader(num_nodes, size=size)

    def get_extra_state(self) -> dict:
        return {"neighbors": self.loader.neighbors.clone(), "e_id": self.loader.e_id.clone(),
                "cur_e_id": torch.tensor(int(self.loader.cur_e_id))}

    def set_extra_state(self, state: dict) -> None:
        self.loader.neighbors.copy_(state["neighbors"]), self.loader.e_id.copy_(state["e_id"])
        self.loader.cur_e_id = int(state["cur_e_id"])


class TGNLinkPredictor(LightningModule):
    """TGN future-link prediction on a continuous-time event stream, with optional PRES memory correction.

    Rossi et al., "Temporal Graph Networks for Deep Learning on Dynamic Graphs" (arXiv 2006.10637), as PyG's
    ``examples/tgn.py`` builds it (``TGNMemory`` with ``IdentityMessage``/``LastAggregator``, ``LastNeighborLoader``,
    one ``TransformerConv``); PRES from Su, Zou, Wu, "PRES: Toward Scalable Memory-Based Dynamic Graph Neural
    Networks" (ICLR 2024, arXiv 2402.04284; https://github.com/jwsu825/MDGNN_BS). Per temporal batch the memory of
    the batch's nodes applies the messages stored by earlier batches (``s_updated``). With ``pres=True`` it is
    corrected toward a prediction: ``s = gamma * (s_prev + mu) + (1 - gamma) * s_updated`` with ``mu`` each node's
    running mean transition (the single-Gaussian case of the paper's mixture), ``gamma = sigmoid(theta)`` starting
    at ``pres_gamma``; the loss adds ``coherence_weight * (1 - mean_i cos(s_i, s_prev_i))`` over the batch's nodes,
    with gradient unless ``coherence_detach`` (the official code detaches it, so it trains nothing).
    ``pres_variant="code"`` follows the official code instead: ``mu`` is the global min-max (to [-1, 1]) of a
    per-node running sum of ``1 + minmax(s - s_prev)``, ``gamma`` is raw (``pres_gamma`` fixed, or learnable from
    it), the coherence is a column-wise cosine of row-normalised memories; unlike the official code it runs on the
    batch's nodes only. Loss: BCE on each positive event and one negative destination per event (drawn from a
    generator seeded by ``seed``, epoch and batch). Memory and neighbour buffers are reset at the start of each
    training epoch; validation continues from the training memory and test from the validation memory; the
    memory's pending messages and the neighbour buffers are in ``state_dict``, so a resumed fit is exact. Use
    with :class:`~lightning_ext.graph.temporal_events.TemporalEventDataModule` and ``num_sanity_val_steps=0``.

    Args:
        memory_dim: memory size.
        time_dim: time-encoding size.
        embedding_dim: embedding size (even: two attention heads).
        num_neighbors: recent neighbours kept per node.
        dropout: attention dropout.
        lr: Adam learning rate.
        pres: enable PRES.
        pres_variant: ``"paper"`` (Gaussian prediction, sigmoid gamma) or ``"code"`` (the official code's rules).
            On ML-100K events (docs/results/pres.md, 5 seeds) only ``"code"`` (with ``learn_gamma=False``,
            ``coherence_detach=True``) kept the accuracy at batch 800; ``"paper"`` did not.
        pres_gamma: initial (or fixed) gamma, in (0, 1).
        learn_gamma: learn gamma.
        coherence_weight: weight of the memory-coherence loss.
        coherence_detach: detach the coherence term (the official code's behaviour: no training effect).
        seed: seed of the training negatives.
        nonfinite_loss: policy on a non-finite training loss.

    Example:
        >>> m = TGNLinkPredictor(memory_dim=8, time_dim=8, embedding_dim=8, pres=True)
        >>> m.hparams.pres_gamma
        0.9
    """

    def __init__(self, memory_dim: PositiveInt = 100, time_dim: PositiveInt = 100, embedding_dim: PositiveInt = 100,
                 num_neighbors: PositiveInt = 10, dropout: UnitIntervalRightOpen = 0.1, lr: PositiveFloat = 1e-4,
                 pres: bool = False, pres_variant: Literal["paper", "code"] = "paper",
                 pres_gamma: OpenUnitInterval = 0.9, learn_gamma: bool = True,
                 coherence_weight: NonNegativeFloat = 0.1, coherence_detach: bool = False, seed: int = 0,
                 nonfinite_loss: Literal["error", "skip", "warn"] = "error") -> None:
        super().__init__()
        for name, value in (("memory_dim", memory_dim), ("time_dim", time_dim), ("embedding_dim", embedding_dim),
                            ("num_neighbors", num_neighbors)):
            check_positive_int(name, value)
        if embedding_dim % 2:
            raise ValueError(f"embedding_dim must be even (two attention heads), got {embedding_dim}.")
        check_number("dropout", dropout, low=0, high=1, high_open=True)
        check_number("lr", lr, low=0, low_open=True)
        check_choice("pres_variant", pres_variant, ("paper", "code"))
        check_number("pres_gamma", pres_gamma, low=0, high=1, low_open=True, high_open=True)
        check_number("coherence_weight", coherence_weight, low=0)
        check_number("seed", seed, integer=True)
        check_nonfinite_policy(nonfinite_loss)
        self.save_hyperparameters()
        require("torch_geometric", "TGNLinkPredictor")
        self.nonfinite_loss = nonfinite_loss
        self._net: Optional[nn.Module] = None
        self._restored: Optional[tuple[int, int]] = None
        self._epoch_start, self._epoch_events = time.perf_counter(), 0  # a fit resumed mid-epoch skips the hook

    def bind(self, num_nodes: int, msg_dim: int, dst_range: tuple[int, int]) -> None:
        """Build the networks for a graph of ``num_nodes`` nodes and ``msg_dim``-dimensional event messages."""
        if self._net is not None:
            return
        from torch_geometric.nn.models.tgn import IdentityMessage, LastAggregator

        h = self.hparams
        memory = pres_memory_class()(num_nodes, msg_dim, h.memory_dim, h.time_dim,
                                     message_module=IdentityMessage(msg_dim, h.memory_dim, h.time_dim),
                                     aggregator_module=LastAggregator(),
                                     pres=h.pres_variant if h.pres else None, gamma=h.pres_gamma,
                                     learn_gamma=h.learn_gamma)
        self._net = nn.ModuleDict({
            "memory": memory,
            "gnn": _AttentionEmbedding(h.memory_dim, h.embedding_dim, msg_dim, memory.time_enc, h.dropout),
            "head": _LinkHead(h.embedding_dim),
            "neighbors": _NeighborState(num_nodes, h.num_neighbors)})
        self.register_buffer("_progress", torch.tensor([-1, 0]), persistent=True)  # (epoch, batches) of the memory
        self.dst_range = dst_range
        self._assoc = torch.empty(num_nodes, dtype=torch.long)
        self._reset_stream()

    @property
    def memory(self) -> Any:
        """The (PRES-wrapped) ``TGNMemory``."""
        return self._net["memory"]

    @property
    def neighbor_loader(self) -> Any:
        """PyG's ``LastNeighborLoader``."""
        return self._net["neighbors"].loader

    def _reset_stream(self) -> None:
        self.memory.reset_state()
        self.neighbor_loader.reset_state()

    @override
    def setup(self, stage: str) -> None:
        """Build from the DataModule (``num_nodes``, ``msg_dim``, ``dst_range``, ``data``); refuse several ranks."""
        refuse_skip_under_ddp(self, self.nonfinite_loss)
        if self.trainer.world_size > 1:
            raise ValueError("TGNLinkPredictor is single-process: its memory must see the whole event stream in "
                             "order; train with devices=1.")
        dm = self.trainer.datamodule
        if dm is None or not hasattr(dm, "data"):
            raise ValueError("TGNLinkPredictor needs a TemporalEventDataModule (a datamodule with `data`, "
                             "`num_nodes`, `msg_dim`, `dst_range`).")
        dm.setup(stage)
        self.bind(dm.num_nodes, dm.msg_dim, dm.dst_range)
        self._event_t, self._event_msg = dm.data.t, dm.data.msg

    def _embed(self, n_id: Tensor) -> tuple[Tensor, Tensor]:
        n_id, edge_index, e_id = self.neighbor_loader(n_id)
        self._assoc[n_id] = torch.arange(n_id.numel())
        s_prev = self.memory.memory[n_id].detach().clone()
        s, last_update = self.memory(n_id)
        z = self._net["gnn"](s, last_update, edge_index, self._event_t[e_id].to(s.device),
                             self._event_msg[e_id].to(s.device))
        return z, s, s_prev

    def _scores(self, batch: dict, neg_dst: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        src, dst = batch["src"], batch["dst"]
        z, s, s_prev = self._embed(torch.cat([src, dst, neg_dst]).unique())
        a = self._assoc
        return (self._net["head"](z[a[src]], z[a[dst]]), self._net["head"](z[a[src]], z[a[neg_dst]]), s, s_prev)

    def _advance(self, batch: dict) -> None:
        self.memory.update_state(batch["src"], batch["dst"], batch["t"], batch["msg"])
        self.neighbor_loader.cur_e_id = int(batch["e_id"][0])  # neighbour e_ids are global event indices
        self.neighbor_loader.insert(batch["src"], batch["dst"])

    def _train_negatives(self, batch: dict, batch_idx: int) -> Tensor:
        g = torch.Generator().manual_seed(int(self.hparams.seed) * 1_000_003 + int(batch["e_id"][0]) * 7919
                                          + self.current_epoch)
        return torch.randint(*self.dst_range, (batch["src"].numel(),), generator=g).to(batch["src"].device)

    @override
    def on_train_epoch_start(self) -> None:
        """Reset memory and neighbours (not when resuming inside this epoch)."""
        restored, self._restored = self._restored, None
        if restored is None or restored[0] != self.current_epoch or restored[1] == 0:
            self._reset_stream()
            self._progress.copy_(torch.tensor([self.current_epoch, 0]))
        self._epoch_start, self._epoch_events = time.perf_counter(), 0

    @override
    def training_step(self, batch: dict, batch_idx: int) -> Optional[Tensor]:
        """BCE on positives and negatives (+ the PRES coherence loss); then store the batch's messages."""
        pos, neg, s, s_prev = self._scores(batch, self._train_negatives(batch, batch_idx))
        loss = (F.binary_cross_entropy_with_logits(pos, torch.ones_like(pos))
                + F.binary_cross_entropy_with_logits(neg, torch.zeros_like(neg)))
        h = self.hparams
        if h.pres:
            coh = coherence_loss(s, s_prev) if h.pres_variant == "paper" else code_coherence(s, s_prev)
            if h.coherence_detach:
                coh = coh.detach()
            self.log("pres/coherence", coh.detach(), on_step=False, on_epoch=True)
            self.log("pres/gamma", self.memory.gamma().detach(), on_step=False, on_epoch=True)
            loss = loss + h.coherence_weight * coh
        self._advance(batch)
        self._progress[1] += 1
        self._epoch_events += int(batch["src"].numel())
        self.log("train_loss", loss.detach(), on_step=False, on_epoch=True, batch_size=int(pos.numel()))
        if not check_loss(self, loss, self.nonfinite_loss, batch):
            return None
        return loss

    @override
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Detach the memory after the optimiser step (truncated backpropagation through the stream)."""
        self.memory.detach()

    @override
    def on_train_epoch_end(self) -> None:
        """Log the training throughput (events per second)."""
        elapsed = time.perf_counter() - self._epoch_start
        if elapsed > 0 and self._epoch_events:
            self.log("train_events_per_s", self._epoch_events / elapsed)

    def _eval_step(self, batch: dict, stage: str) -> None:
        pos, neg, _, _ = self._scores(batch, batch["neg_dst"])
        self._advance(batch)
        scores = torch.cat([pos, neg]).sigmoid()
        target = torch.cat([torch.ones_like(pos), torch.zeros_like(neg)]).long()
        self._metrics[f"{stage}_ap"].update(scores, target)
        self._metrics[f"{stage}_auroc"].update(scores, target)

    def _eval_start(self, stage: str) -> None:
        from torchmetrics.classification import BinaryAUROC, BinaryAveragePrecision

        self._metrics = {f"{stage}_ap": BinaryAveragePrecision(), f"{stage}_auroc": BinaryAUROC()}

    def _eval_end(self, stage: str) -> None:
        for name, metric in self._metrics.items():
            self.log(name, metric.compute())

    @override
    def on_validation_epoch_start(self) -> None:
        """Fresh AP/AUROC accumulators; the memory continues from training."""
        self._eval_start("val")

    @override
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Score each event against its fixed negative, then store the events."""
        self._eval_step(batch, "val")

    @override
    def on_validation_epoch_end(self) -> None:
        """Log ``val_ap`` and ``val_auroc``."""
        self._eval_end("val")

    @override
    def on_test_epoch_start(self) -> None:
        """Fresh AP/AUROC accumulators; the memory continues from validation."""
        self._eval_start("test")

    @override
    def test_step(self, batch: dict, batch_idx: int) -> None:
        """Score each test event against its fixed negative, then store the events."""
        self._eval_step(batch, "test")

    @override
    def on_test_epoch_end(self) -> None:
        """Log ``test_ap`` and ``test_auroc``."""
        self._eval_end("test")

    @override
    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Remember which epoch and batch the restored memory belongs to (skip that epoch's reset)."""
        progress = checkpoint["state_dict"].get("_progress")
        if progress is not None:
            self._restored = (int(progress[0]), int(progress[1]))

    @override
    def configure_optimizers(self) -> Any:
        """Adam over every parameter (PyG's example)."""
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
