"""MF-BPR (Rendle et al., UAI 2009): matrix factorisation trained with BPR, the baseline of every graph CF paper."""

from __future__ import annotations

from typing import Optional, Sequence

from lightning.pytorch.cli import OptimizerCallable

from lightning_ext.core.guards import NonFiniteLoss
from lightning_ext.core.validation import NonNegativeFloat, PositiveFloat, PositiveInt
from lightning_ext.recsys.lightgcn import LightGCN
from lightning_ext.recsys.recommender import Init


class MFBPR(LightGCN):
    """MF-BPR (Rendle et al., UAI 2009): score ``<e_u, e_i>`` of free embeddings, BPR loss with L2 on the batch's embeddings.

    Rendle, Freudenthaler, Gantner and Schmidt-Thieme, *BPR: Bayesian Personalized Ranking from Implicit
    Feedback*, UAI 2009. This is exactly :class:`~lightning_ext.recsys.lightgcn.LightGCN` with 0 layers (same
    loss, regulariser, initialisation and optimiser), the baseline of LightGCN's ablation.

    Args:
        reg_weight: L2 weight ``reg_weight · ½ Σ||e||² / B`` on the batch's embeddings.
        num_users, num_items, embedding_dim, lr, init, init_std, eval_ks, optimizer, nonfinite_loss: see
            :class:`~lightning_ext.recsys.recommender.Recommender`.

    Example:
        >>> MFBPR(num_users=5, num_items=7, embedding_dim=4).propagate()[1].shape
        torch.Size([7, 4])
    """

    def __init__(self, reg_weight: NonNegativeFloat = 1e-4, num_users: Optional[PositiveInt] = None,
                 num_items: Optional[PositiveInt] = None, embedding_dim: PositiveInt = 64, lr: PositiveFloat = 1e-3,
                 init: Init = "normal", init_std: PositiveFloat = 0.1, eval_ks: Sequence[PositiveInt] = (10, 20, 40),
                 optimizer: Optional[OptimizerCallable] = None, nonfinite_loss: NonFiniteLoss = "error") -> None:
        super().__init__(0, reg_weight, num_users, num_items, embedding_dim, lr, init, init_std, eval_ks, optimizer,
                         nonfinite_loss)
        self.hparams.pop("num_layers", None)
