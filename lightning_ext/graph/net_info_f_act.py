"""``NetInfoFLinkPredictor``: NetInfoF's "Act" link predictor (Lee et al., ICLR 2024) as a LightningModule."""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn
from typing_extensions import override

from lightning_ext.core.guards import NonFiniteLoss, check_loss, check_nonfinite_policy, refuse_skip_under_ddp
from lightning_ext.core.optional import require
from lightning_ext.core.validation import (
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    check_choice,
    check_non_negative,
    check_number,
    check_positive,
    check_positive_int,
)
from lightning_ext.graph.link_prediction import HitsAtK, LinkMRR, check_link_batch
from lightning_ext.graph.net_info_f import COMPONENTS, compatibility_matrix, derived_embeddings


def sparse_group_lasso(weights: list[torch.Tensor], lambda1: float, lambda2: float) -> torch.Tensor:
    """λ1 Σ|w| + λ2 Σ_c ‖w_c‖₂ over the components' weight vectors (NetInfoF's penalty)."""
    flat = [w.flatten() for w in weights]
    return lambda1 * sum(w.abs().sum() for w in flat) + lambda2 * sum(w.norm() for w in flat)


class NetInfoFLinkPredictor(LightningModule):
    """NetInfoF_Act (Lee et al., ICLR 2024): a linear link predictor on compatibility-adjusted node embeddings.

    Paper: https://arxiv.org/abs/2402.07999 ; reference code:
    https://github.com/amazon-science/Network-Usable-Info-Framework . For each derived embedding
    c ∈ ``components`` (U, R, F, P, S: structure, random-walk neighbourhood, features, propagated features
    without/with self-loops; :func:`~lightning_ext.graph.net_info_f.derived_embeddings`) and its compatibility
    matrix H_c, logit(i, j) = Σ_c w_cᵀ((z^c_i H_c) ⊙ z^c_j) + b_c, trained with BCE against the batch's uniform
    random negatives plus λ1 Σ|w| + λ2 Σ_c ‖w_c‖₂ (sparse group lasso), LBFGS. The embeddings are computed in
    ``setup`` from the training message-passing graph of a
    :class:`~lightning_ext.graph.link_prediction.LinkPredictionDataModule` (non-persistent buffers; the same
    seed gives the same embeddings), or by :meth:`fit_embeddings` without a Trainer. Use a batch size covering
    every training edge (one LBFGS step per epoch, as the official code). The official code re-uses one model
    across its λ grid (warm starts); tune λ with one fresh model per grid point.

    Args:
        num_features: node feature size; the embedding size is ``min(dim, num_features)``.
        dim: embedding size d.
        components: which embeddings to use.
        lambda1: L1 weight.
        lambda2: group-L2 weight.
        lr: LBFGS learning rate.
        max_iter: LBFGS iterations per step.
        walks: random walks per node for R.
        seed: seed of the walks and the compatibility matrix's random pairs.
        hits_k: K of the logged Hits@K.
        nonfinite_loss: on a non-finite training loss, ``"error"``, ``"skip"`` the step or ``"warn"``.

    Example:
        >>> model = NetInfoFLinkPredictor(num_features=4, dim=2, components=["U", "F"], walks=4)
        >>> ei = torch.tensor([[0, 1, 1, 2, 2, 3, 3, 0], [1, 0, 2, 1, 3, 2, 0, 3]])
        >>> model.fit_embeddings(torch.eye(4), ei); model(torch.tensor([[0], [2]])).shape
        torch.Size([1])
    """

    def __init__(
        self,
        num_features: PositiveInt = 1433,
        dim: PositiveInt = 128,
        components: list[Literal["U", "R", "F", "P", "S"]] = list(COMPONENTS),
        lambda1: NonNegativeFloat = 1e-4,
        lambda2: NonNegativeFloat = 1e-4,
        lr: PositiveFloat = 0.1,
        max_iter: PositiveInt = 20,
        walks: PositiveInt = 200,
        seed: int = 0,
        hits_k: PositiveInt = 100,
        nonfinite_loss: NonFiniteLoss = "error",
    ) -> None:
        super().__init__()
        require("torch_geometric", "NetInfoFLinkPredictor")
        require("scipy", "NetInfoFLinkPredictor")
        for arg, value in (("num_features", num_features), ("dim", dim), ("max_iter", max_iter), ("walks", walks),
                           ("hits_k", hits_k)):
            check_positive_int(arg, value)
        components = list(components)
        if not components or len(set(components)) != len(components):
            raise ValueError(f"`components` must be a non-empty list of distinct names from {list(COMPONENTS)}, "
                             f"got {components}.")
        for c in components:
            check_choice("components", c, COMPONENTS)
        check_non_negative("lambda1", lambda1)
        check_non_negative("lambda2", lambda2)
        check_positive("lr", lr)
        check_number("seed", seed, integer=True)
        check_nonfinite_policy(nonfinite_loss)
        self.save_hyperparameters()
        self.components = components
        self.d = min(dim, num_features)
        self.heads = nn.ModuleDict({c: nn.Linear(self.d, 1) for c in components})
        self.skipped_steps = 0
        self.metrics = nn.ModuleDict({f"{s}_{m}": (HitsAtK(hits_k) if m == "hits" else LinkMRR())
                                      for s in ("val", "test") for m in ("hits", "mrr")})
        self._ready = False

    def fit_embeddings(self, x: torch.Tensor, edge_index: torch.Tensor) -> None:
        """Compute z^c and x_c = z^c H_c from features and the training graph (both directions)."""
        if x.size(1) != self.hparams.num_features:
            raise ValueError(f"The model has num_features={self.hparams.num_features} but the graph has {x.size(1)}; "
                             f"set `num_features: {x.size(1)}`.")
        x, edge_index = x.detach().cpu(), edge_index.detach().cpu()
        zs = derived_embeddings(edge_index, x, self.d, self.hparams.walks, components=self.components,
                                seed=self.hparams.seed)
        self.set_embeddings(zs, {c: z @ compatibility_matrix(z, edge_index, seed=self.hparams.seed)
                                 for c, z in zs.items()})

    def set_embeddings(self, z: dict, xc: dict) -> None:
        """Use precomputed embeddings ``z[c]`` and adjusted embeddings ``xc[c] = z[c] H_c`` (e.g. shared by the
        models of a λ grid); each ``(n, d)``."""
        device = next(self.heads.parameters()).device
        for c in self.components:
            if c not in z or c not in xc or z[c].size(1) != self.d or xc[c].shape != z[c].shape:
                raise ValueError(f"set_embeddings needs z[{c!r}] and xc[{c!r}] of shape (n, {self.d}).")
            self.register_buffer(f"z_{c}", z[c].to(device), persistent=False)
            self.register_buffer(f"xc_{c}", xc[c].to(device), persistent=False)
        self._ready = True

    @override
    def setup(self, stage: str) -> None:
        """Refuse skip under DDP; compute the embeddings from the DataModule's training graph."""
        refuse_skip_under_ddp(self, self.hparams.nonfinite_loss)
        if self._ready:
            return
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is None or not hasattr(dm, "splits"):
            raise ValueError("NetInfoFLinkPredictor needs an edge split to build its embeddings from the training "
                             f"graph; {type(dm).__name__} has none: use LinkPredictionDataModule.")
        if not dm.splits:
            dm.setup(stage)
        self.fit_embeddings(dm.graph.x, dm.splits["train"]["edge_index"])

    def component_logits(self, targets: torch.Tensor) -> torch.Tensor:
        """``(T, C)`` logits of each component for targets ``(2, T)``."""
        if not self._ready:
            raise RuntimeError("NetInfoFLinkPredictor: call fit_embeddings(x, edge_index) or fit with a "
                               "LinkPredictionDataModule first.")
        return torch.cat([self.heads[c](getattr(self, f"xc_{c}")[targets[0]] * getattr(self, f"z_{c}")[targets[1]])
                          for c in self.components], 1)

    @override
    def forward(self, targets: torch.Tensor) -> torch.Tensor:
        """Logits ``(T,)`` of the target edges."""
        return self.component_logits(targets).sum(1)

    def penalty(self) -> torch.Tensor:
        """The sparse group lasso of the heads' weights."""
        return sparse_group_lasso([self.heads[c].weight for c in self.components], self.hparams.lambda1,
                                  self.hparams.lambda2)

    @override
    def training_step(self, batch: dict, batch_idx: int) -> Optional[torch.Tensor]:
        """BCE of positives against the batch's fresh uniform negatives, plus the penalty."""
        check_link_batch(batch, type(self).__name__)
        pos, neg = batch["pos"], batch["neg"]
        logits = self(torch.cat([pos, neg], 1))
        labels = torch.cat([torch.ones(pos.size(1)), torch.zeros(neg.size(1))]).to(logits)
        loss = F.binary_cross_entropy_with_logits(logits, labels) + self.penalty()
        if not check_loss(self, loss, self.hparams.nonfinite_loss, batch):
            return None
        self.log("train_loss", loss, batch_size=pos.size(1), prog_bar=True)
        return loss

    def _evaluate(self, batch: dict, stage: str) -> None:
        check_link_batch(batch, type(self).__name__)
        pos, neg = batch["pos"], batch["neg"]
        pos_l, neg_l = self(pos), self(neg)
        for m in ("hits", "mrr"):
            metric = self.metrics[f"{stage}_{m}"]
            metric.update(pos_l, neg_l)
            name = f"{stage}_hits@{self.hparams.hits_k}" if m == "hits" else f"{stage}_mrr"
            self.log(name, metric, batch_size=pos.size(1), prog_bar=m == "hits")

    @override
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Hits@K and MRR on the validation edges."""
        self._evaluate(batch, "val")

    @override
    def test_step(self, batch: dict, batch_idx: int) -> None:
        """Hits@K and MRR on the test edges."""
        self._evaluate(batch, "test")

    @override
    def configure_optimizers(self):
        """LBFGS (Lightning passes the closure)."""
        return torch.optim.LBFGS(self.heads.parameters(), lr=self.hparams.lr, max_iter=self.hparams.max_iter)
