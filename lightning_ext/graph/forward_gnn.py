"""``ForwardGNN``: forward learning of GNNs (Park et al., ICLR 2024): layer-local objectives, no backprop between layers.

Pure core (plain torch, no Trainer): :func:`l2_normalize_rows`, :func:`add_virtual_class_nodes`,
:func:`single_forward_loss`, :func:`forward_forward_loss`, :func:`append_labels`, :func:`saved_activation_bytes`.
The LightningModule :class:`ForwardGNN` trains a PyG conv stack with them under manual optimisation.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Literal, Optional

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from typing_extensions import override

from lightning_ext.core.guards import NonFiniteLoss, check_loss, check_nonfinite_policy, refuse_skip_under_ddp
from lightning_ext.core.optional import require
from lightning_ext.core.validation import (
    AtLeastTwoInt,
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    UnitIntervalRightOpen,
    check_choice,
    check_non_negative,
    check_number,
    check_positive,
    check_positive_int,
)

#: How the stack learns: the paper's single-forward (virtual class nodes) or forward-forward (label appending)
#: layer-local objectives, or end-to-end backpropagation through the same stack (the control).
Learning = Literal["single_forward", "forward_forward", "backprop"]
#: Which PyG convolution each layer is.
Conv = Literal["gcn", "sage", "gat"]


def l2_normalize_rows(x: Tensor, eps: float = 1e-8) -> Tensor:
    """Row-wise L2 normalisation applied before every forward-learned layer (the paper's "LayerNormalization").

    Example:
        >>> l2_normalize_rows(torch.tensor([[3.0, 4.0]]))
        tensor([[0.6000, 0.8000]])
    """
    return x / (x.norm(dim=1, keepdim=True) + eps)


def add_virtual_class_nodes(edge_index: Tensor, y: Tensor, train_mask: Tensor, num_nodes: int, num_classes: int,
                            bidirectional: bool = True) -> Tensor:
    """Edges of the graph plus one virtual node per class (index ``num_nodes + c``) linked to its training nodes.

    Each training node ``i`` of class ``c`` gets the edge ``i -> num_nodes + c`` (and ``num_nodes + c -> i`` when
    ``bidirectional``); validation and test nodes are not linked, so no label leaks.

    Example:
        >>> ei = torch.tensor([[0, 1], [1, 0]])
        >>> add_virtual_class_nodes(ei, torch.tensor([0, 1]), torch.tensor([True, False]), 2, 2)
        tensor([[0, 1, 0, 2],
                [1, 0, 2, 0]])
    """
    train = train_mask.nonzero().flatten()
    virtual = num_nodes + y[train]
    new = [torch.stack([train, virtual])]
    if bidirectional:
        new.append(torch.stack([virtual, train]))
    return torch.cat([edge_index, *new], dim=1)


def single_forward_loss(h: Tensor, y: Tensor, train_index: Tensor, virtual_index: Tensor,
                        temperature: float = 1.0) -> Tensor:
    """Single-forward layer loss: cross-entropy of ``h_train · h_virtualᵀ / T`` with the true class (no negatives).

    Args:
        h: layer output of every node, virtual nodes included, ``(N + C, d)``.
        y: class of every real node.
        train_index: indices of the training nodes.
        virtual_index: indices of the ``C`` virtual class nodes, in class order.
        temperature: the paper's T.
    """
    logits = h[train_index] @ h[virtual_index].T / temperature
    return F.cross_entropy(logits, y[train_index])


def forward_forward_loss(h_pos: Tensor, h_neg: Tensor, theta: float = 2.0) -> Tensor:
    """Forward-forward layer loss: BCE of ``goodness - θ`` (goodness = Σ h², per node) for positive/negative rows.

    The mean over the positive and the negative rows, as one binary cross-entropy on their concatenation.
    """
    goodness = torch.cat([h_pos.pow(2).sum(1), h_neg.pow(2).sum(1)]) - theta
    target = torch.cat([torch.ones(len(h_pos)), torch.zeros(len(h_neg))]).to(goodness)
    return F.binary_cross_entropy_with_logits(goodness, target)


def append_labels(x: Tensor, labels: Tensor, labelled: Tensor, num_classes: int) -> Tensor:
    """``[x, one_hot(label)]`` for ``labelled`` nodes and ``[x, 1/C ... 1/C]`` for the rest (label appending)."""
    extra = torch.full((len(x), num_classes), 1.0 / num_classes, dtype=x.dtype, device=x.device)
    extra[labelled] = F.one_hot(labels[labelled], num_classes).to(x.dtype)
    return torch.cat([x, extra], dim=1)


@contextlib.contextmanager
def saved_activation_bytes(module: Optional[nn.Module] = None) -> Iterator[list]:
    """Count the bytes of the tensors autograd saves for backward inside the block (distinct storages).

    This is the activation memory a training step holds at its peak (just before ``backward``). Storages of
    ``module``'s parameters and buffers are not counted (they are alive anyway); gradients and optimiser state are
    not part of it either. The yielded list receives one number when the block exits.

    Example:
        >>> w = torch.ones(3, 3, requires_grad=True)
        >>> with saved_activation_bytes() as out:
        ...     loss = (torch.ones(2, 3) @ w).sum()
        >>> out[0]  # the (2, 3) float input, kept for w's gradient
        24
    """
    skip = {t.untyped_storage().data_ptr() for t in (*module.parameters(), *module.buffers())} if module else set()
    seen: dict[int, int] = {}

    def pack(t: Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    out: list = []
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield out
    out.append(sum(seen.values()))


def _make_conv(conv: str, in_channels: int, out_channels: int) -> nn.Module:
    from torch_geometric.nn import GATConv, GCNConv, SAGEConv

    if conv == "gcn":
        return GCNConv(in_channels, out_channels)
    if conv == "sage":
        return SAGEConv(in_channels, out_channels)
    return GATConv(in_channels, out_channels, heads=1)


class ForwardGNN(LightningModule):
    """Forward learning of a GNN: each layer trained alone on a local loss, no gradient between layers (ICLR 2024).

    Paper: Park, Mao, Wang, Faloutsos, Shah and Li, "Forward Learning of Graph Neural Networks", ICLR 2024,
    arXiv 2403.11004; reference code: https://github.com/facebookresearch/forwardgnn (CC-BY-NC; re-implemented).
    Each layer ``ℓ`` has its own Adam optimiser; its input is the detached, row-L2-normalised output of layer
    ``ℓ-1``; layers are trained one after another (layer 0 until its validation accuracy stops improving for
    ``patience`` epochs or ``epochs_per_layer`` run out, its best weights kept, then layer 1, ...), so a step
    keeps only one layer's activations. One Lightning epoch is one full-batch step on the active layer; fitting
    ends by itself after the last layer (set ``max_epochs >= num_layers * epochs_per_layer``).

    - ``learning="single_forward"`` (SF): one virtual node per class, linked to its training nodes; layer loss
      ``CE(H_train H_virtualᵀ / T, y)``; prediction ``argmax Σ_ℓ softmax(H_ℓ H_virtual,ℓᵀ / T)``.
    - ``learning="forward_forward"`` (FF, label appending): the input is ``[x, one_hot(y)]`` for training nodes
      (a uniform ``1/C`` row for the rest); negatives append a random wrong label; layer loss
      ``BCE(Σ h² - θ, pos/neg)``. Prediction: for each class ``c``, every non-training node gets ``c`` appended
      and the class with the largest goodness summed over layers wins (``C`` forward passes).
    - ``learning="backprop"``: the same stack trained end to end with cross-entropy (the last layer outputs the
      classes), the control for accuracy and memory.

    Each batch is one ``torch_geometric.data.Data`` graph with ``train_mask``/``val_mask``/``test_mask`` (as
    :class:`~lightning_ext.graph.planetoid.PlanetoidDataModule` yields). Logs ``train_loss``, ``val_acc``/
    ``test_acc`` (the prediction of the layers trained so far), ``val_layer_acc`` (the active layer alone),
    ``forward/active_layer`` and ``forward/saved_bytes`` (activation bytes autograd kept in the step, see
    :func:`saved_activation_bytes`). Defaults follow ``exp/nodeclass/nodeclass-sf.sh`` (4 layers, hidden 128,
    lr 1e-3, T = 1, patience 100) except ``epochs_per_layer`` (1000 there).

    Args:
        num_features: node feature size.
        num_classes: number of classes.
        learning: ``"single_forward"``, ``"forward_forward"`` or ``"backprop"``.
        conv: PyG layer type: ``"gcn"``, ``"sage"`` or ``"gat"`` (one head).
        num_layers: conv layers.
        hidden: width of every layer (the last backprop layer outputs ``num_classes``).
        dropout: dropout on each layer's input while training.
        lr: Adam learning rate (every layer's optimiser).
        weight_decay: Adam weight decay.
        temperature: SF's T.
        theta: FF's goodness threshold θ.
        bidirectional: SF virtual edges in both directions (else training node -> virtual node only).
        virtual_edges: link the virtual nodes at all (``False``: isolated prototypes, the paper's ablation).
        epochs_per_layer: most epochs (steps) per forward-learned layer.
        patience: epochs without a better validation accuracy before the active layer stops.
        seed: seeds the frozen virtual-node features and FF's negative labels.
        nonfinite_loss: on a non-finite training loss: ``"error"``, ``"skip"`` the step (refused under DDP) or
            ``"warn"``.

    Example:
        >>> model = ForwardGNN(num_features=1433, num_classes=7, learning="single_forward")
        >>> len(model.convs), model.automatic_optimization
        (4, False)
    """

    def __init__(
        self,
        num_features: PositiveInt = 1433,
        num_classes: AtLeastTwoInt = 7,
        learning: Learning = "single_forward",
        conv: Conv = "gcn",
        num_layers: PositiveInt = 4,
        hidden: PositiveInt = 128,
        dropout: UnitIntervalRightOpen = 0.0,
        lr: PositiveFloat = 1e-3,
        weight_decay: NonNegativeFloat = 0.0,
        temperature: PositiveFloat = 1.0,
        theta: float = 2.0,
        bidirectional: bool = True,
        virtual_edges: bool = True,
        epochs_per_layer: PositiveInt = 200,
        patience: PositiveInt = 100,
        seed: int = 0,
        nonfinite_loss: NonFiniteLoss = "error",
    ) -> None:
        super().__init__()
        require("torch_geometric", "ForwardGNN")
        for name, value in (("num_features", num_features), ("num_layers", num_layers), ("hidden", hidden),
                            ("epochs_per_layer", epochs_per_layer), ("patience", patience)):
            check_positive_int(name, value)
        check_number("num_classes", num_classes, low=2, integer=True)
        check_choice("learning", learning, ("single_forward", "forward_forward", "backprop"))
        check_choice("conv", conv, ("gcn", "sage", "gat"))
        check_number("dropout", dropout, low=0, high=1, high_open=True)
        check_positive("lr", lr)
        check_non_negative("weight_decay", weight_decay)
        check_positive("temperature", temperature)
        check_number("theta", theta)
        check_number("seed", seed, integer=True)
        for name, value in (("bidirectional", bidirectional), ("virtual_edges", virtual_edges)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be true or false, got {value!r}.")
        check_nonfinite_policy(nonfinite_loss)
        self.save_hyperparameters()
        self.automatic_optimization = False
        in_dim = num_features + (num_classes if learning == "forward_forward" else 0)
        dims = [in_dim] + [hidden] * num_layers
        if learning == "backprop":
            dims[-1] = num_classes
        self.convs = nn.ModuleList(_make_conv(conv, a, b) for a, b in zip(dims[:-1], dims[1:]))
        gen = torch.Generator().manual_seed(seed)
        # frozen random virtual-node features (an nn.Embedding-style N(0, 1) init), a buffer: saved, never trained
        self.register_buffer("virtual_x", torch.randn(num_classes, num_features, generator=gen))
        self.active_layer, self.layer_epochs, self.layer_best, self.layer_best_epoch = 0, 0, -1.0, -1
        self.layer_best_state: Optional[dict] = None
        self.layer_history: list[dict] = []  #: per finished layer: epochs run, best epoch, best val accuracy
        self.skipped_steps = 0
        self.last_saved_bytes = 0

    # ----------------------------------------------------------------------------------------------- forward
    def _graph_inputs(self, graph, fake_labels: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """Node features and edges the stack sees (virtual nodes for SF, appended labels for FF)."""
        hp = self.hparams
        if hp.learning == "single_forward":
            x = torch.cat([graph.x, self.virtual_x.to(graph.x)])
            if hp.virtual_edges:
                ei = add_virtual_class_nodes(graph.edge_index, graph.y, graph.train_mask, graph.num_nodes,
                                             hp.num_classes, hp.bidirectional)
            else:
                ei = graph.edge_index
            return x, ei
        if hp.learning == "forward_forward":
            labels = graph.y if fake_labels is None else fake_labels
            labelled = graph.train_mask if fake_labels is None else torch.ones_like(graph.train_mask)
            return append_labels(graph.x, labels, labelled, hp.num_classes), graph.edge_index
        return graph.x, graph.edge_index

    def _layer(self, i: int, h: Tensor, edge_index: Tensor) -> Tensor:
        hp = self.hparams
        if hp.learning != "backprop":
            h = l2_normalize_rows(h)
        h = F.dropout(h, hp.dropout, self.training)
        h = self.convs[i](h, edge_index)
        last_bp = hp.learning == "backprop" and i == len(self.convs) - 1
        return h if last_bp else F.relu(h)

    def layer_outputs(self, x: Tensor, edge_index: Tensor, upto: Optional[int] = None) -> list[Tensor]:
        """Outputs of layers ``0..upto`` (all by default); forward-learned layers get detached inputs."""
        outs, h = [], x
        for i in range(len(self.convs) if upto is None else upto + 1):
            if self.hparams.learning != "backprop":
                h = h.detach()
            h = self._layer(i, h, edge_index)
            outs.append(h)
        return outs

    def _sf_probs(self, h: Tensor, n: int) -> Tensor:
        return torch.softmax(h[:n] @ h[n:].T / self.hparams.temperature, dim=1)

    @torch.no_grad()
    def class_scores(self, graph, layers: Optional[list[int]] = None) -> Tensor:
        """Per-node class scores of the given layers (default: every layer) summed: SF probabilities, FF goodness."""
        hp, n = self.hparams, graph.num_nodes
        layers = list(range(len(self.convs))) if layers is None else layers
        if hp.learning == "backprop":
            return self.layer_outputs(graph.x, graph.edge_index)[-1]
        if hp.learning == "single_forward":
            outs = self.layer_outputs(*self._graph_inputs(graph), upto=max(layers))
            return sum(self._sf_probs(outs[i], n) for i in layers)
        scores = []
        for c in range(hp.num_classes):
            labels = torch.where(graph.train_mask, graph.y, torch.full_like(graph.y, c))
            outs = self.layer_outputs(*self._graph_inputs(graph, fake_labels=labels), upto=max(layers))
            scores.append(sum(outs[i].pow(2).sum(1) for i in layers))
        return torch.stack(scores, dim=1)

    @override
    def forward(self, graph) -> Tensor:
        """Class scores of every real node (argmax = prediction)."""
        return self.class_scores(graph)

    # ---------------------------------------------------------------------------------------------- training
    def local_loss(self, graph, layer: int, generator: Optional[torch.Generator] = None) -> Tensor:
        """The training loss of ``layer`` (inputs from the frozen layers below, detached); backprop: the full CE."""
        hp, n = self.hparams, graph.num_nodes
        train = graph.train_mask.nonzero().flatten()
        if hp.learning == "backprop":
            out = self.layer_outputs(graph.x, graph.edge_index)[-1]
            return F.cross_entropy(out[train], graph.y[train])
        if hp.learning == "single_forward":
            x, ei = self._graph_inputs(graph)
            h = self._frozen_input(x, ei, layer)
            h = self._layer(layer, h, ei)
            virtual = torch.arange(n, n + hp.num_classes, device=h.device)
            return single_forward_loss(h, graph.y, train, virtual, hp.temperature)
        shift = torch.randint(1, hp.num_classes, graph.y.shape, generator=generator).to(graph.y.device)
        wrong = torch.where(graph.train_mask, (graph.y + shift) % hp.num_classes, graph.y)
        hs = []
        for labels in (graph.y, wrong):  # positives: true labels appended; negatives: a wrong label
            x = append_labels(graph.x, labels, graph.train_mask, hp.num_classes)
            h = self._frozen_input(x, graph.edge_index, layer)
            hs.append(self._layer(layer, h, graph.edge_index)[train])
        return forward_forward_loss(hs[0], hs[1], hp.theta)

    def _frozen_input(self, x: Tensor, edge_index: Tensor, layer: int) -> Tensor:
        """The detached output of the frozen layers below ``layer`` (evaluation mode, no graph kept)."""
        if layer == 0:
            return x
        was = self.training
        self.eval()
        with torch.no_grad():
            h = self.layer_outputs(x, edge_index, upto=layer - 1)[-1]
        self.train(was)
        return h

    @override
    def training_step(self, graph, batch_idx: int) -> Optional[Tensor]:
        """One full-batch step of the active layer's optimiser on its local loss (all layers for backprop)."""
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        layer = 0 if self.hparams.learning == "backprop" else self.active_layer
        opt = optimizers[layer]
        gen = torch.Generator().manual_seed(self.hparams.seed * 1_000_003 + int(self.global_step))
        with saved_activation_bytes(self) as saved:
            loss = self.local_loss(graph, layer, gen)
        self.last_saved_bytes = saved[0]
        if not check_loss(self, loss, self.hparams.nonfinite_loss, graph):
            return None
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        self.log("train_loss", loss.detach(), batch_size=1, prog_bar=True)
        self.log("forward/active_layer", float(layer), batch_size=1)
        self.log("forward/saved_bytes", float(saved[0]), batch_size=1)
        return loss.detach()

    def _accuracy(self, graph, mask: Tensor, layers: Optional[list[int]] = None) -> Tensor:
        pred = self.class_scores(graph, layers).argmax(1)
        return (pred[mask] == graph.y[mask]).float().mean()

    def _trained_layers(self) -> list[int]:
        return list(range(self.active_layer + 1))

    @override
    def validation_step(self, graph, batch_idx: int) -> None:
        """Validation accuracy of the layers trained so far, and of the active layer alone (its stopping rule)."""
        n_val = int(graph.val_mask.sum())
        if self.hparams.learning == "backprop":
            self.log("val_acc", self._accuracy(graph, graph.val_mask), batch_size=n_val, prog_bar=True)
            return
        layers = self._trained_layers()
        self.log("val_acc", self._accuracy(graph, graph.val_mask, layers), batch_size=n_val, prog_bar=True)
        self._layer_acc = float(self._accuracy(graph, graph.val_mask, [self.active_layer]))
        self.log("val_layer_acc", self._layer_acc, batch_size=n_val)

    @override
    def on_validation_epoch_end(self) -> None:
        """Keep the active layer's best weights; after ``patience`` flat epochs restore them and move up a layer."""
        if self.hparams.learning == "backprop" or self.trainer.sanity_checking or not hasattr(self, "_layer_acc"):
            return
        hp = self.hparams
        conv = self.convs[self.active_layer]
        if self._layer_acc > self.layer_best:
            self.layer_best, self.layer_best_epoch = self._layer_acc, self.layer_epochs
            self.layer_best_state = {k: v.detach().clone() for k, v in conv.state_dict().items()}
        self.layer_epochs += 1
        if self.layer_epochs - 1 - self.layer_best_epoch >= hp.patience or self.layer_epochs >= hp.epochs_per_layer:
            conv.load_state_dict(self.layer_best_state)
            self.layer_history.append({"layer": self.active_layer, "epochs": self.layer_epochs,
                                       "best_epoch": self.layer_best_epoch, "best_val_acc": self.layer_best})
            if self.active_layer == len(self.convs) - 1:
                self.trainer.should_stop = True
            else:
                self.active_layer += 1
                self.layer_epochs, self.layer_best, self.layer_best_epoch, self.layer_best_state = 0, -1.0, -1, None
        del self._layer_acc

    @override
    def test_step(self, graph, batch_idx: int) -> None:
        """Test accuracy of every layer's summed scores (and per layer for the forward-learned variants)."""
        n_test = int(graph.test_mask.sum())
        self.log("test_acc", self._accuracy(graph, graph.test_mask), batch_size=n_test)
        if self.hparams.learning != "backprop":
            for i in range(len(self.convs)):
                self.log(f"test_layer{i}_acc", self._accuracy(graph, graph.test_mask, [i]), batch_size=n_test)

    @override
    def predict_step(self, graph, batch_idx: int) -> Tensor:
        """Predicted class of every node."""
        return self.class_scores(graph).argmax(1)

    @override
    def setup(self, stage: str) -> None:
        """Refuse ``nonfinite_loss='skip'`` under DDP; check the data's ``num_features`` and ``num_classes``."""
        refuse_skip_under_ddp(self, self.hparams.nonfinite_loss)
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        for attr in ("num_features", "num_classes"):
            have, want = getattr(dm, attr, None), self.hparams[attr]
            if have is not None and have != want:
                raise ValueError(f"The model has {attr}={want} but the data has {have}; set `model.init_args.{attr}: {have}`.")

    @override
    def configure_optimizers(self):
        """One Adam per layer (forward learning), or one for the whole stack (backprop)."""
        hp = self.hparams
        groups = [self.convs] if hp.learning == "backprop" else list(self.convs)
        return [torch.optim.Adam(g.parameters(), lr=hp.lr, weight_decay=hp.weight_decay) for g in groups]

    @override
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Save the layer schedule (active layer, its epochs, its best accuracy and weights)."""
        checkpoint["forward_gnn"] = {"active_layer": self.active_layer, "layer_epochs": self.layer_epochs,
                                     "layer_best": self.layer_best, "layer_best_epoch": self.layer_best_epoch,
                                     "layer_best_state": self.layer_best_state,
                                     "layer_history": list(self.layer_history)}

    @override
    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Restore the layer schedule saved by :meth:`on_save_checkpoint`."""
        state = checkpoint.get("forward_gnn")
        if state:
            self.active_layer, self.layer_epochs = state["active_layer"], state["layer_epochs"]
            self.layer_best, self.layer_best_epoch = state["layer_best"], state["layer_best_epoch"]
            self.layer_best_state = state["layer_best_state"]
            self.layer_history = list(state.get("layer_history", []))
