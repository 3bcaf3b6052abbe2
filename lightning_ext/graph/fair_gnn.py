"""``FairGNN``: fair node classification with few known sensitive attributes (Dai and Wang, WSDM 2021).

Pure core (plain torch): :func:`fairness_gaps`, :func:`covariance_penalty`, :func:`fairgnn_losses`. The
LightningModule :class:`FairGNN` trains the estimator, encoder, classifier and adversary with them.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from typing_extensions import override

from lightning_ext.core.guards import NonFiniteLoss, check_loss, check_nonfinite_policy, refuse_skip_under_ddp
from lightning_ext.core.optional import require
from lightning_ext.core.validation import (
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    UnitIntervalRightOpen,
    check_non_negative,
    check_number,
    check_positive,
    check_positive_int,
)

__all__ = ["fairness_gaps", "covariance_penalty", "fairgnn_losses", "FairGNN", "check_fairness_graph"]


def fairness_gaps(pred: Tensor, y: Tensor, s: Tensor) -> tuple[float, float]:
    """Demographic-parity and equal-opportunity differences of binary predictions.

    ``Δ_SP = |P(ŷ=1 | s=0) - P(ŷ=1 | s=1)|`` and ``Δ_EO = |P(ŷ=1 | y=1, s=0) - P(ŷ=1 | y=1, s=1)|``; a group with
    no members counts as rate 0 (as an empty mean would be NaN).

    Example:
        >>> fairness_gaps(torch.tensor([1, 1, 0, 0]), torch.tensor([1, 0, 1, 0]), torch.tensor([0, 0, 1, 1]))
        (1.0, 1.0)
    """
    pred, y, s = pred.float().flatten(), y.flatten(), s.flatten()

    def rate(mask: Tensor) -> float:
        return float(pred[mask].mean()) if bool(mask.any()) else 0.0

    dp = abs(rate(s == 0) - rate(s == 1))
    eo = abs(rate((y == 1) & (s == 0)) - rate((y == 1) & (s == 1)))
    return dp, eo


def covariance_penalty(s_score: Tensor, y_score: Tensor) -> Tensor:
    """``|Cov(ŝ, ŷ)|`` over the nodes: ``|mean((ŝ - mean ŝ)(ŷ - mean ŷ))|`` (population covariance)."""
    return ((s_score - s_score.mean()) * (y_score - y_score.mean())).mean().abs()


def fairgnn_losses(y_logit: Tensor, y: Tensor, train_index: Tensor, s_logit_est: Tensor, s_known: Tensor,
                   s_known_index: Tensor, adv_logit: Tensor, alpha: float, beta: float) -> dict[str, Tensor]:
    """FairGNN's generator objective and its parts for one step (all nodes' logits, shape ``(N,)``).

    ``ŝ = σ(f_E(x))`` detached, replaced by the true ``s`` on the nodes whose sensitive attribute is known;
    ``L_G = BCE(ŷ_train, y) + α |Cov(ŝ, σ(ŷ))| - β BCE(f_A(h), ŝ)``. The adversary's own loss is
    ``BCE(f_A(h.detach()), ŝ)`` (returned ``s_score`` is its target).
    """
    s_score = torch.sigmoid(s_logit_est.detach()).clone()
    s_score[s_known_index] = s_known[s_known_index].to(s_score)
    cls = F.binary_cross_entropy_with_logits(y_logit[train_index], y[train_index].to(y_logit))
    cov = covariance_penalty(s_score, torch.sigmoid(y_logit))
    adv = F.binary_cross_entropy_with_logits(adv_logit, s_score)
    return {"loss": cls + alpha * cov - beta * adv, "cls": cls, "cov": cov, "adv": adv, "s_score": s_score}


def check_fairness_graph(graph, where: str = "FairGNN") -> None:
    """Refuse a graph without what fair node classification needs, in one line saying what to add."""
    for attr in ("x", "edge_index", "y", "sens", "sens_mask", "train_mask", "val_mask", "test_mask"):
        if getattr(graph, attr, None) is None:
            hint = (" (the sensitive attribute of every node, 0/1, and the mask of the nodes whose attribute the "
                    "model may see)" if attr in ("sens", "sens_mask") else "")
            raise ValueError(f"{where}: the graph has no `{attr}`{hint}; give a Data graph with x, edge_index, y, "
                             "sens, sens_mask and train/val/test masks (e.g. MovieLensUserGraphDataModule).")
    if not bool(graph.sens_mask.any()):
        raise ValueError(f"{where}: no node has a visible sensitive attribute (`sens_mask` is all false); "
                         "raise the share of visible sensitive labels.")


class FairGNN(LightningModule):
    """FairGNN: a GNN classifier made fair with an adversary and a covariance constraint, few sensitive labels known.

    Paper: Dai and Wang, "Say No to the Discrimination: Learning Fair Graph Neural Networks with Limited Sensitive
    Attribute Information", WSDM 2021, arXiv 2009.01454; reference code: https://github.com/EnyanDai/FairGNN .
    Parts: a sensitive-attribute estimator ``f_E`` (a GCN) trained first, for ``estimator_epochs`` epochs, on the
    nodes whose attribute is visible (``sens_mask``, the paper's ``sens_number`` nodes) and frozen (its output
    detached) afterwards; a one-layer GCN encoder ``f_G``; a linear classifier ``f_C`` and a linear adversary
    ``f_A`` that predicts ``ŝ`` from the embedding. Each later step (one full batch) updates ``f_G, f_C`` with
    ``L_G = BCE(ŷ_train, y) + α |Cov(ŝ, σ(ŷ))| - β BCE(f_A(h), ŝ)``, then ``f_A`` with ``BCE(f_A(h.detach()), ŝ)``,
    where ``ŝ = σ(f_E(x))`` replaced by the true ``s`` where it is visible. ``alpha = beta = 0`` is the plain GCN
    (encoder + classifier) control.

    Logs ``<stage>_acc``, ``<stage>_auc``, ``<stage>_dp`` and ``<stage>_eo`` (demographic-parity and
    equal-opportunity differences, measured with every node's true attribute, as the paper evaluates) and
    ``fair/cov``, ``fair/adv_loss``, ``fair/estimator_acc`` (the estimator on the hidden attributes). The batch is
    one ``torch_geometric.data.Data`` with binary ``y``, ``sens`` (0/1), ``sens_mask`` and train/val/test masks
    (:class:`~lightning_ext.graph.movielens_users.MovieLensUserGraphDataModule`).

    Args:
        num_features: node feature size.
        hidden: encoder and estimator width (128 in the paper's scripts).
        alpha: weight of the covariance constraint (NBA 10, Pokec-n 50, Pokec-z 100).
        beta: weight of the adversarial term.
        estimator_epochs: epochs spent training the estimator before the classifier (0: an untrained estimator).
        dropout: dropout on the input and the embedding.
        lr: Adam learning rate (both optimisers; the estimator's too).
        weight_decay: Adam weight decay.
        nonfinite_loss: on a non-finite training loss: ``"error"``, ``"skip"`` (refused under DDP) or ``"warn"``.

    Example:
        >>> model = FairGNN(num_features=64, alpha=10.0, beta=1.0)
        >>> model.automatic_optimization
        False
    """

    def __init__(
        self,
        num_features: PositiveInt = 64,
        hidden: PositiveInt = 128,
        alpha: NonNegativeFloat = 10.0,
        beta: NonNegativeFloat = 1.0,
        estimator_epochs: int = 200,
        dropout: UnitIntervalRightOpen = 0.5,
        lr: PositiveFloat = 1e-3,
        weight_decay: NonNegativeFloat = 1e-5,
        nonfinite_loss: NonFiniteLoss = "error",
    ) -> None:
        super().__init__()
        require("torch_geometric", "FairGNN")
        check_positive_int("num_features", num_features)
        check_positive_int("hidden", hidden)
        check_non_negative("alpha", alpha)
        check_non_negative("beta", beta)
        check_number("estimator_epochs", estimator_epochs, low=0, integer=True)
        check_number("dropout", dropout, low=0, high=1, high_open=True)
        check_positive("lr", lr)
        check_non_negative("weight_decay", weight_decay)
        check_nonfinite_policy(nonfinite_loss)
        from torch_geometric.nn import GCNConv

        self.save_hyperparameters()
        self.automatic_optimization = False
        self.estimator_conv, self.estimator_head = GCNConv(num_features, hidden), nn.Linear(hidden, 1)
        self.encoder = GCNConv(num_features, hidden)
        self.classifier = nn.Linear(hidden, 1)
        self.adversary = nn.Linear(hidden, 1)
        self.skipped_steps = 0

    def estimate_sensitive(self, x: Tensor, edge_index: Tensor) -> Tensor:
        """``f_E``: logits of the sensitive attribute of every node."""
        h = F.dropout(F.relu(self.estimator_conv(x, edge_index)), self.hparams.dropout, self.training)
        return self.estimator_head(h).squeeze(-1)

    def embed(self, x: Tensor, edge_index: Tensor) -> Tensor:
        """``f_G``: node embeddings."""
        x = F.dropout(x, self.hparams.dropout, self.training)
        return F.dropout(F.relu(self.encoder(x, edge_index)), self.hparams.dropout, self.training)

    @override
    def forward(self, x: Tensor, edge_index: Tensor) -> Tensor:
        """Label logits of every node."""
        return self.classifier(self.embed(x, edge_index)).squeeze(-1)

    @override
    def training_step(self, graph, batch_idx: int) -> Optional[Tensor]:
        """Estimator epochs: BCE of ``f_E`` on the visible attributes; then the ``L_G`` step and the adversary step."""
        check_fairness_graph(graph)
        opt_e, opt_g, opt_a = self.optimizers()
        hp = self.hparams
        if self.current_epoch < hp.estimator_epochs:
            known = graph.sens_mask
            s_logit = self.estimate_sensitive(graph.x, graph.edge_index)
            loss = F.binary_cross_entropy_with_logits(s_logit[known], graph.sens[known].float())
            if not check_loss(self, loss, hp.nonfinite_loss, graph):
                return None
            opt_e.zero_grad()
            self.manual_backward(loss)
            opt_e.step()
            self.log("fair/estimator_loss", loss.detach(), batch_size=1)
            return loss.detach()
        with torch.no_grad():
            was = self.training
            self.eval()
            s_logit = self.estimate_sensitive(graph.x, graph.edge_index)  # frozen estimator
            self.train(was)
        h = self.embed(graph.x, graph.edge_index)
        y_logit = self.classifier(h).squeeze(-1)
        self.adversary.requires_grad_(False)
        parts = fairgnn_losses(y_logit, graph.y, graph.train_mask.nonzero().flatten(), s_logit, graph.sens,
                               graph.sens_mask.nonzero().flatten(), self.adversary(h).squeeze(-1), hp.alpha, hp.beta)
        self.adversary.requires_grad_(True)
        if not check_loss(self, parts["loss"], hp.nonfinite_loss, graph):
            return None
        opt_g.zero_grad()
        self.manual_backward(parts["loss"])
        opt_g.step()
        adv_loss = F.binary_cross_entropy_with_logits(self.adversary(h.detach()).squeeze(-1), parts["s_score"])
        opt_a.zero_grad()
        self.manual_backward(adv_loss)
        opt_a.step()
        self.log("train_loss", parts["cls"].detach(), batch_size=1, prog_bar=True)
        self.log("fair/cov", parts["cov"].detach(), batch_size=1)
        self.log("fair/adv_loss", adv_loss.detach(), batch_size=1)
        return parts["loss"].detach()

    def _evaluate(self, graph, stage: str) -> None:
        check_fairness_graph(graph)
        from torchmetrics.functional.classification import binary_auroc

        mask = graph[f"{stage}_mask"]
        logit = self(graph.x, graph.edge_index)[mask]
        y, s = graph.y[mask], graph.sens[mask]
        pred = (logit > 0).long()
        dp, eo = fairness_gaps(pred, y, s)
        n = int(mask.sum())
        self.log(f"{stage}_acc", (pred == y).float().mean(), batch_size=n, prog_bar=stage == "val")
        self.log(f"{stage}_auc", binary_auroc(logit, y.long()), batch_size=n)
        self.log(f"{stage}_dp", dp, batch_size=n)
        self.log(f"{stage}_eo", eo, batch_size=n)
        hidden = ~graph.sens_mask
        s_pred = (self.estimate_sensitive(graph.x, graph.edge_index)[hidden] > 0).long()
        self.log("fair/estimator_acc", (s_pred == graph.sens[hidden]).float().mean(), batch_size=int(hidden.sum()))

    @override
    def validation_step(self, graph, batch_idx: int) -> None:
        """Accuracy, AUC, Δ_SP and Δ_EO on the validation nodes."""
        self._evaluate(graph, "val")

    @override
    def test_step(self, graph, batch_idx: int) -> None:
        """Accuracy, AUC, Δ_SP and Δ_EO on the test nodes."""
        self._evaluate(graph, "test")

    @override
    def predict_step(self, graph, batch_idx: int) -> Tensor:
        """Predicted label (0/1) of every node."""
        return (self(graph.x, graph.edge_index) > 0).long()

    @override
    def setup(self, stage: str) -> None:
        """Refuse ``nonfinite_loss='skip'`` under DDP; check the data's ``num_features``."""
        refuse_skip_under_ddp(self, self.hparams.nonfinite_loss)
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        have = getattr(dm, "num_features", None)
        if have is not None and have != self.hparams.num_features:
            raise ValueError(f"The model has num_features={self.hparams.num_features} but the data has {have}; "
                             f"set `model.init_args.num_features: {have}`.")

    @override
    def configure_optimizers(self):
        """Adam for the estimator, for encoder + classifier (``L_G``) and for the adversary."""
        hp = self.hparams

        def adam(*modules):
            return torch.optim.Adam([p for m in modules for p in m.parameters()], lr=hp.lr,
                                    weight_decay=hp.weight_decay)

        return [adam(self.estimator_conv, self.estimator_head), adam(self.encoder, self.classifier),
                adam(self.adversary)]
