"""RDLModule: Relational Deep Learning's reference model (table encoders, temporal encoder, heterogeneous GraphSAGE)."""

from __future__ import annotations

from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from typing_extensions import override

from lightning_ext.core.guards import check_loss, check_nonfinite_policy, refuse_skip_under_ddp
from lightning_ext.core.optional import require
from lightning_ext.core.validation import check_choice, check_number

_DAY = 86400.0


class _ResidualBlock(nn.Module):
    """``x + Linear(ReLU(LayerNorm(x)))``: one block of the per-table encoder."""

    def __init__(self, channels: int, dropout: float) -> None:
        super().__init__()
        self.norm, self.lin, self.dropout = nn.LayerNorm(channels), nn.Linear(channels, channels), dropout

    def forward(self, x: Tensor) -> Tensor:
        return x + F.dropout(self.lin(F.relu(self.norm(x))), self.dropout, self.training)


class RDLModule(LightningModule):
    """Relational Deep Learning's model on a temporal heterogeneous graph: per-table encoders, time encoding,
    hetero SAGE.

    Fey et al., "Position: Relational Deep Learning" (ICML 2024, arXiv 2312.04615); the RelBench reference model
    (arXiv 2407.20060; https://github.com/snap-stanford/relbench ``relbench/modeling/nn.py`` and
    ``examples/model.py``). For a sampled batch with seed times ``t``:

    ``h_v^0 = Enc_{type(v)}(x_v) + Lin_{type(v)}(PE((t_{seed(v)} - time_v) / 86400))`` (the time term only for
    timed tables), then ``L`` layers ``h^l = ReLU(LayerNorm_type(sum_{r into type} SAGE_r(h^{l-1})))`` and a linear
    head on the seed rows; loss BCE-with-logits, model selection on ``val_auroc``. ``Enc`` is a linear layer and
    ``encoder_layers`` residual blocks over the table's encoded columns (RelBench uses PyTorch Frame's ResNet over
    per-column stype encoders; PyTorch Frame is not installed here, so the columns are one-hot/standardised by
    :func:`~lightning_ext.graph.relational_db.build_hetero_data` instead). The graph's node and edge types come from
    :class:`~lightning_ext.graph.relational.RelationalDataModule` in ``setup`` (or :meth:`bind`).

    Args:
        channels: hidden size.
        num_layers: message-passing layers (match the data's hops).
        encoder_layers: residual blocks in each table encoder.
        aggr: SAGE neighbour aggregation (``"sum"`` in RelBench's entity example).
        time_encoding: add the relative-time positional encoding to timed tables.
        dropout: dropout in the encoders and between layers.
        lr: Adam learning rate (RelBench's default 0.005).
        weight_decay: Adam weight decay.
        nonfinite_loss: policy on a non-finite training loss (``"error"``, ``"skip"``, ``"warn"``).

    Example:
        >>> from torch_geometric.data import HeteroData
        >>> m = RDLModule(channels=8, num_layers=1)
        >>> m.bind((["a", "b"], [("b", "to", "a")]), {"a": 3, "b": 2}, "a", ["b"])
        >>> g = HeteroData(); g["a"].x = torch.randn(2, 3); g["b"].x = torch.randn(3, 2)
        >>> g["b"].time = torch.tensor([1, 2, 3]); g["b"].batch = torch.tensor([0, 1, 1])
        >>> g["a"].seed_time = torch.tensor([5, 6]); g["a"].batch_size = 2
        >>> g["b", "to", "a"].edge_index = torch.tensor([[0, 1, 2], [0, 1, 1]])
        >>> m(g).shape
        torch.Size([2])
    """

    def __init__(self, channels: int = 64, num_layers: int = 2, encoder_layers: int = 2,
                 aggr: Literal["sum", "mean", "max"] = "sum", time_encoding: bool = True, dropout: float = 0.0,
                 lr: float = 0.005, weight_decay: float = 0.0,
                 nonfinite_loss: Literal["error", "skip", "warn"] = "error") -> None:
        super().__init__()
        require("torch_geometric", "RDLModule")
        check_number("channels", channels, low=1, integer=True)
        check_number("num_layers", num_layers, low=1, integer=True)
        check_number("encoder_layers", encoder_layers, low=0, integer=True)
        check_choice("aggr", aggr, ("sum", "mean", "max"))
        if not isinstance(time_encoding, bool):
            raise ValueError(f"time_encoding must be True or False, got {time_encoding!r}")
        check_number("dropout", dropout, low=0, high=1, high_open=True)
        check_number("lr", lr, low=0, low_open=True)
        check_number("weight_decay", weight_decay, low=0)
        check_nonfinite_policy(nonfinite_loss)
        self.save_hyperparameters()
        self.graph_spec: Optional[dict[str, Any]] = None
        from torchmetrics.classification import BinaryAUROC

        self.auroc = nn.ModuleDict({"val": BinaryAUROC(), "test": BinaryAUROC()})
        self.skipped_steps = 0

    # ------------------------------------------------------------------ building from the data's schema
    def bind(self, metadata: tuple, feature_dims: dict[str, int], entity_table: str,
             timed_types: list[str]) -> None:
        """Build the encoders, convolutions and head for a graph schema (``RelationalDataModule`` gives it)."""
        from torch_geometric.nn import HeteroConv, LayerNorm, SAGEConv
        from torch_geometric.nn.encoding import PositionalEncoding

        node_types, edge_types = list(metadata[0]), [tuple(et) for et in metadata[1]]
        if entity_table not in node_types:
            raise ValueError(f"entity_table {entity_table!r} is not a node type of the graph ({node_types})")
        spec = {"node_types": node_types, "edge_types": edge_types, "entity_table": entity_table,
                "feature_dims": {t: int(feature_dims[t]) for t in node_types}, "timed_types": list(timed_types)}
        if self.graph_spec is not None:
            if spec != self.graph_spec:
                raise ValueError("RDLModule was built for another graph schema; build a new module for this data")
            return
        hp, ch = self.hparams, int(self.hparams.channels)
        self.encoders = nn.ModuleDict({t: nn.Sequential(nn.Linear(spec["feature_dims"][t], ch),
                                                        *[_ResidualBlock(ch, hp.dropout)
                                                          for _ in range(hp.encoder_layers)])
                                       for t in node_types})
        self.time_encoder = PositionalEncoding(ch)
        self.time_lins = nn.ModuleDict({t: nn.Linear(ch, ch) for t in spec["timed_types"]}) \
            if hp.time_encoding else nn.ModuleDict()
        self.convs = nn.ModuleList([HeteroConv({et: SAGEConv((ch, ch), ch, aggr=hp.aggr) for et in edge_types},
                                               aggr="sum") for _ in range(hp.num_layers)])
        self.norms = nn.ModuleList([nn.ModuleDict({t: LayerNorm(ch, mode="node") for t in node_types})
                                    for _ in range(hp.num_layers)])
        self.head = nn.Linear(ch, 1)
        self.graph_spec = spec

    def _bind_from_datamodule(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        needed = ("metadata", "feature_dims", "entity_table", "timed_types")
        if dm is None or not all(hasattr(dm, n) for n in needed):
            raise ValueError("RDLModule builds itself from a RelationalDataModule (its metadata, feature_dims, "
                             "entity_table): use one as data, or call model.bind(...) first")
        dm.setup("fit")
        self.bind(dm.metadata(), dm.feature_dims, dm.entity_table, dm.timed_types)

    @override
    def setup(self, stage: str) -> None:
        """Build the network from the DataModule's schema; refuse ``nonfinite_loss='skip'`` under DDP."""
        refuse_skip_under_ddp(self, self.hparams.nonfinite_loss)
        self._bind_from_datamodule()

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the graph schema so a checkpoint rebuilds the same network."""
        checkpoint["rdl_graph_spec"] = self.graph_spec

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Build the network from the checkpoint's schema before its weights load."""
        spec = checkpoint.get("rdl_graph_spec")
        if spec is not None:
            self.bind((spec["node_types"], spec["edge_types"]), spec["feature_dims"], spec["entity_table"],
                      spec["timed_types"])

    # ------------------------------------------------------------------ the model
    @override
    def forward(self, batch: Any) -> Tensor:
        """Logits of the batch's seed rows (``batch[entity][:batch_size]``)."""
        if self.graph_spec is None:
            raise RuntimeError("RDLModule is not built yet: call bind(...) or fit it with a RelationalDataModule")
        entity = self.graph_spec["entity_table"]
        seed_time = batch[entity].seed_time.to(torch.float32)
        x = {t: self.encoders[t](batch[t].x) for t in self.graph_spec["node_types"] if t in batch.node_types}
        for t, lin in self.time_lins.items():
            if t in x and "time" in batch[t] and x[t].shape[0]:
                rel = (seed_time[batch[t].batch] - batch[t].time.to(torch.float32)) / _DAY
                x[t] = x[t] + lin(self.time_encoder(rel))
        edges = {et: batch[et].edge_index for et in batch.edge_types if et in self.graph_spec["edge_types"]}
        for conv, norms in zip(self.convs, self.norms):
            out = conv(x, edges)
            x = {t: F.dropout(F.relu(norms[t](out.get(t, h))), self.hparams.dropout, self.training)
                 for t, h in x.items()}
        return self.head(x[entity][: int(batch[entity].batch_size)]).squeeze(-1)

    def _step(self, batch: Any, stage: str) -> Optional[Tensor]:
        entity = self.graph_spec["entity_table"]
        n = int(batch[entity].batch_size)
        logits, y = self(batch), batch[entity].y[:n].float()
        loss = F.binary_cross_entropy_with_logits(logits, y)
        if stage == "train":
            if not check_loss(self, loss, self.hparams.nonfinite_loss, batch):
                return None
            self.log("train_loss", loss, batch_size=n, prog_bar=True)
            return loss
        self.auroc[stage](logits.detach(), y.long())
        self.log(f"{stage}_loss", loss, batch_size=n)
        self.log(f"{stage}_auroc", self.auroc[stage], batch_size=n, prog_bar=True)
        return loss

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Optional[Tensor]:
        """BCE on the seed rows."""
        return self._step(batch, "train")

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Loss and AUROC on the seed rows."""
        self._step(batch, "val")

    @override
    def test_step(self, batch: Any, batch_idx: int) -> None:
        """Loss and AUROC on the seed rows."""
        self._step(batch, "test")

    @override
    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Probabilities of the seed rows."""
        return torch.sigmoid(self(batch))

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Adam."""
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
