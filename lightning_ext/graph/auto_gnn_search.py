"""Lightning wrappers of Auto-GNN: :class:`AutoGNNSearch` (the search, one child per training step) and
:class:`SearchedGNN` (the architecture it found, retrained and shipped as a node classifier)."""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

import torch
from lightning.pytorch import LightningModule
from typing_extensions import override

from lightning_ext.core.guards import NonFiniteLoss, check_nonfinite_policy, refuse_skip_under_ddp
from lightning_ext.core.io import atomic_write_text
from lightning_ext.core.optional import require
from lightning_ext.core.paths import output_path
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
from lightning_ext.graph.full_graph_steps import FullGraphNodeSteps

#: A per-layer architecture as YAML writes it.
Architecture = list[dict[str, Union[str, int]]]
#: The 2-layer GCN (16 hidden units, ReLU) in Auto-GNN's search space: SearchedGNN's default architecture.
GCN_LAYERS = ({"attention": "gcn", "aggregation": "sum", "activation": "relu", "heads": 1, "hidden": 16},
              {"attention": "gcn", "aggregation": "sum", "activation": "identity", "heads": 1})


def _check_data(module: LightningModule, num_features: int, num_classes: int) -> None:
    dm = getattr(module.trainer, "datamodule", None) if module._trainer is not None else None
    for attr, want in (("num_features", num_features), ("num_classes", num_classes)):
        have = getattr(dm, attr, None)
        if have is not None and have != want:
            raise ValueError(f"The model has {attr}={want} but the data has {have}; set `model.init_args.{attr}: {have}`.")


def _check_graph(graph: Any, masks: tuple[str, ...]) -> None:
    missing = [m for m in ("x", "edge_index", "y", *masks) if getattr(graph, m, None) is None]
    if missing:
        raise ValueError(f"The graph has no {', '.join(f'`{m}`' for m in missing)}: Auto-GNN needs a node "
                         "classification graph with train/val masks (e.g. PlanetoidDataModule).")
    for m in masks:
        if not bool(graph[m].any()):
            raise ValueError(f"The graph's `{m}` selects no node; give a split with {m.split('_')[0]} nodes.")


class AutoGNNSearch(LightningModule):
    """Auto-GNN (Zhou et al., 2019): GNN architecture search by a conservative RL controller with parameter sharing.

    Paper: "Auto-GNN: Neural Architecture Search of Graph Neural Networks", arXiv 1909.03184 (Frontiers in Big Data
    2022); no official code (the space is GraphNAS's, https://github.com/GraphNAS/GraphNAS). The search runs as
    manual optimisation: each training step (the DataModule yields the single graph, as ``PlanetoidDataModule``
    does) proposes one child with :class:`~lightning_ext.graph.auto_gnn.AutoGNNSearcher`, trains it to early
    stopping on the training nodes, scores it by validation accuracy ``r`` and takes one REINFORCE step of the
    controller of the action class it changed: ``∇ = -(r - b_c) ∇ Σ_l log π_c(a_l)`` (``b_c`` a moving average).
    ``strategy="random"`` samples uniformly at the same child budget. One epoch = one child; the search stops
    after ``max_children`` (or ``max_epochs``). Logs ``search/val_acc``, ``search/best_val_acc``,
    ``search/children``; ``on_train_end`` writes ``best_architecture.yaml`` (a ``SearchedGNN`` config) under the
    run. Resumable: the searcher's state travels in the checkpoint.

    Args:
        num_features: node feature size.
        num_classes: classes (the output layer's width).
        search_space: action class -> choices (``attention``, ``aggregation``, ``activation``, ``heads``,
            ``hidden``); a class left out keeps GraphNAS's choices; ``None``: the whole GraphNAS space.
        num_layers: GNN layers of every child.
        strategy: ``"conservative"`` (AGNN's RCNAS) or ``"random"``.
        share_parameters: children inherit the best architecture's weights in homogeneous layers.
        max_children: children to evaluate.
        child_epochs: epoch cap of a child's fit; child_patience: its early-stopping patience.
        child_lr, child_weight_decay, dropout: the child's Adam and dropout (GraphNAS's defaults).
        controller_lr: Adam learning rate of the controllers.
        entropy_weight: entropy bonus of the controller loss.
        seed: seeds every proposal and child (the global RNG is untouched).
        best_architecture_path: the YAML written at the end, relative to the run folder; ``None`` disables it.

    Example:
        >>> search = AutoGNNSearch(num_features=1433, num_classes=7, max_children=20)
        >>> search.searcher.strategy, len(search.searcher.controllers)
        ('conservative', 5)
    """

    def __init__(
        self,
        num_features: PositiveInt = 1433,
        num_classes: AtLeastTwoInt = 7,
        search_space: Optional[dict[str, list[Union[str, int]]]] = None,
        num_layers: AtLeastTwoInt = 2,
        strategy: Literal["conservative", "random"] = "conservative",
        share_parameters: bool = True,
        max_children: PositiveInt = 100,
        child_epochs: PositiveInt = 200,
        child_patience: PositiveInt = 20,
        child_lr: PositiveFloat = 0.005,
        child_weight_decay: NonNegativeFloat = 5e-4,
        dropout: UnitIntervalRightOpen = 0.6,
        controller_lr: PositiveFloat = 3.5e-4,
        entropy_weight: NonNegativeFloat = 1e-4,
        seed: int = 0,
        best_architecture_path: Optional[str] = "best_architecture.yaml",
    ) -> None:
        super().__init__()
        require("torch_geometric", "AutoGNNSearch")
        from lightning_ext.graph.auto_gnn import AutoGNNSearcher

        for name, value in (("num_features", num_features), ("max_children", max_children),
                            ("child_epochs", child_epochs), ("child_patience", child_patience)):
            check_positive_int(name, value)
        for name, value in (("num_classes", num_classes), ("num_layers", num_layers)):
            check_number(name, value, low=2, integer=True)
        check_choice("strategy", strategy, ("conservative", "random"))
        check_positive("child_lr", child_lr)
        check_positive("controller_lr", controller_lr)
        check_non_negative("child_weight_decay", child_weight_decay)
        check_non_negative("entropy_weight", entropy_weight)
        check_number("dropout", dropout, low=0, high=1, high_open=True)
        check_number("seed", seed, integer=True)
        if best_architecture_path is not None and not str(best_architecture_path).strip():
            raise ValueError("`best_architecture_path` is empty; name a file or use None to write nothing.")
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.searcher = AutoGNNSearcher(
            num_features, num_classes, search_space, num_layers, strategy, share_parameters, child_epochs,
            child_patience, child_lr, child_weight_decay, dropout, controller_lr, entropy_weight, seed=seed)
        self.controllers = self.searcher.controllers  # registered, so the controllers follow the module's device

    @override
    def setup(self, stage: str) -> None:
        """Refuse more than one process (every rank would run the same search); check the data's sizes."""
        if self.trainer.world_size > 1:
            raise ValueError("AutoGNNSearch runs one search in one process; use devices=1 (children are full-graph "
                             "fits of one small graph).")
        _check_data(self, self.hparams.num_features, self.hparams.num_classes)

    @override
    def training_step(self, graph: Any, batch_idx: int) -> None:
        """Propose, train and score one child; one controller step."""
        s = self.searcher
        if s.children >= self.hparams.max_children:
            self.trainer.should_stop = True
            return None
        _check_graph(graph, ("train_mask", "val_mask"))
        if graph.x.size(-1) != self.hparams.num_features:
            raise ValueError(f"The graph has {graph.x.size(-1)} node features but num_features="
                             f"{self.hparams.num_features}; set `num_features: {graph.x.size(-1)}`.")
        opt = self.optimizers()
        s.optimizer_step = opt.step  # counts the controller step in trainer.global_step
        record = s.step(graph)
        if record["changed"] is None:  # no controller update (a random child): a no-op step keeps one step per child
            opt.zero_grad(set_to_none=True)
            opt.step()
        self.log("search/val_acc", record["val_acc"], batch_size=1)
        self.log("search/best_val_acc", s.best_val_acc, batch_size=1, prog_bar=True)
        self.log("search/children", float(s.children), batch_size=1)
        if s.children >= self.hparams.max_children:
            self.trainer.should_stop = True
        return None

    @override
    def on_train_end(self) -> None:
        """Write the best architecture as a ``SearchedGNN`` YAML."""
        path = output_path(self.trainer, self.hparams.best_architecture_path)
        if path is None or self.searcher.best_architecture is None or not self.trainer.is_global_zero:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.architecture_yaml(), path)

    def architecture_yaml(self) -> str:
        """The best architecture as a ``model:`` block for ``SearchedGNN`` (with its validation accuracy)."""
        import yaml

        block = {"model": {"class_path": "SearchedGNN", "init_args": {
            "architecture": self.searcher.best_architecture, "num_features": self.hparams.num_features,
            "num_classes": self.hparams.num_classes, "dropout": self.hparams.dropout, "lr": self.hparams.child_lr,
            "weight_decay": self.hparams.child_weight_decay}}}
        head = (f"# Auto-GNN ({self.hparams.strategy}): best of {self.searcher.children} children, "
                f"validation accuracy {self.searcher.best_val_acc:.4f}\n")
        return head + yaml.safe_dump(block, sort_keys=False)

    @override
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Store the searcher's state (history, best child, baselines, controller optimiser)."""
        checkpoint["auto_gnn_searcher"] = self.searcher.state_dict()

    @override
    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Restore the searcher's state."""
        if "auto_gnn_searcher" not in checkpoint:
            raise ValueError("This checkpoint holds no Auto-GNN search state; resume from an AutoGNNSearch checkpoint.")
        self.searcher.load_state_dict(checkpoint["auto_gnn_searcher"])

    @override
    def configure_optimizers(self):
        """The controllers' Adam (stepped by the searcher; given to Lightning so checkpoints hold it too)."""
        return self.searcher.optimizer


class SearchedGNN(FullGraphNodeSteps, LightningModule):
    """A GNN from Auto-GNN's search space, as a full-batch node classifier (the searched model, retrained).

    Paper: arXiv 1909.03184 (see :class:`AutoGNNSearch`). ``architecture`` is a list of per-layer dicts
    (``attention``, ``aggregation``, ``activation``, ``heads``, and ``hidden`` on every layer but the last), as
    ``AutoGNNSearch`` writes it; the layers are :class:`~lightning_ext.graph.auto_gnn.GraphNASConv`. Each batch is
    one graph with ``train_mask``/``val_mask``/``test_mask``; each stage's loss and accuracy use its mask (the steps
    are :class:`~lightning_ext.graph.full_graph_steps.FullGraphNodeSteps`, shared with ``GCNNodeClassifier``).

    Args:
        architecture: the per-layer choices; ``None``: Kipf & Welling's 2-layer GCN written in this space
            (:data:`GCN_LAYERS`).
        num_features: node feature size; num_classes: classes.
        dropout: dropout before every layer and on attention coefficients.
        lr: Adam learning rate; weight_decay: Adam weight decay.
        nonfinite_loss: on a non-finite training loss: ``"error"``, ``"skip"`` the step (refused under DDP) or
            ``"warn"``.

    Example:
        >>> arch = [{"attention": "gcn", "aggregation": "sum", "activation": "relu", "heads": 1, "hidden": 16},
        ...         {"attention": "gcn", "aggregation": "sum", "activation": "identity", "heads": 1}]
        >>> model = SearchedGNN(arch, num_features=1433, num_classes=7)
        >>> sum(p.numel() for p in model.parameters())
        23109
    """

    def __init__(
        self,
        architecture: Optional[Architecture] = None,
        num_features: PositiveInt = 1433,
        num_classes: AtLeastTwoInt = 7,
        dropout: UnitIntervalRightOpen = 0.6,
        lr: PositiveFloat = 0.005,
        weight_decay: NonNegativeFloat = 5e-4,
        nonfinite_loss: NonFiniteLoss = "error",
    ) -> None:
        super().__init__()
        require("torch_geometric", "SearchedGNN")
        from lightning_ext.graph.auto_gnn import build_gnn, check_architecture

        if architecture is None:
            architecture = [dict(GCN_LAYERS[0]), dict(GCN_LAYERS[1])]
        check_architecture(architecture)
        check_positive_int("num_features", num_features)
        check_number("num_classes", num_classes, low=2, integer=True)
        check_number("dropout", dropout, low=0, high=1, high_open=True)
        check_positive("lr", lr)
        check_non_negative("weight_decay", weight_decay)
        check_nonfinite_policy(nonfinite_loss)
        self.save_hyperparameters()
        self.net = build_gnn(architecture, num_features, num_classes, dropout)
        self.skipped_steps = 0
        self.accuracy = self.stage_accuracies(num_classes)

    @override
    def setup(self, stage: str) -> None:
        """Refuse ``nonfinite_loss='skip'`` under DDP; check the data's ``num_features`` and ``num_classes``."""
        refuse_skip_under_ddp(self, self.hparams.nonfinite_loss)
        _check_data(self, self.hparams.num_features, self.hparams.num_classes)

    @override
    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        """Logits of every node of the graph."""
        return self.net(x, edge_index)

    @override
    def _check_batch(self, graph: Any, stage: str) -> None:
        """Refuse a graph without ``x``/``edge_index``/``y`` or without nodes in this stage's mask."""
        _check_graph(graph, (f"{stage}_mask",))

    @override
    def configure_optimizers(self):
        """Adam with the architecture's learning rate and weight decay."""
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
