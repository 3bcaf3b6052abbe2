"""EL2N: the error L2-norm score of Paul, Ganguli and Dziugaite, "Deep Learning on a Data Diet" (NeurIPS 2021)."""

from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lightning_ext.curation.base import Scorer, Scores, ScoringData
from lightning_ext.curation.training import build_model, train_classifier

__all__ = ["EL2NScorer", "el2n_scores"]


@torch.no_grad()
def el2n_scores(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """EL2N (Paul et al., 2021): ``|| softmax(f(x)) - onehot(y) ||_2`` per sample, model in eval mode.

    Example:
        >>> net = nn.Linear(2, 3)
        >>> el2n_scores(net, torch.zeros(4, 2), torch.tensor([0, 1, 2, 0])).shape
        torch.Size([4])
    """
    model.eval()
    out = []
    for i in range(0, len(x), batch_size):
        p = F.softmax(model(x[i:i + batch_size]), dim=1)
        out.append((p - F.one_hot(y[i:i + batch_size], p.shape[1]).float()).norm(dim=1))
    return torch.cat(out)


class EL2NScorer(Scorer):
    """EL2N (Paul et al., NeurIPS 2021, arXiv 2107.07075): the L2 norm of ``softmax(f(x)) - onehot(y)`` from
    proxy models trained briefly on the whole pool, averaged over ``proxies`` initialisations.

    High EL2N marks hard (or mislabelled) samples. The paper keeps the hardest (``keep="hard"``); with label
    noise the hardest are mostly wrong labels, and ``keep="easy"`` keeps the lowest scores instead.
    Reference code: github.com/mansheej/data_diet.

    Args:
        model: proxy architecture (``None`` = a small CNN; a timm name; an ``nn.Module`` re-initialised per proxy).
        proxies: number of independently initialised proxies averaged.
        epochs: training epochs of each proxy (the paper scores early in training).
        keep: ``"hard"`` (highest EL2N kept) or ``"easy"``.
        lr: Adam learning rate of the proxies.
        batch_size: proxy training batch size.
        seed: seed of the first proxy (proxy ``i`` uses ``seed + i``).
        progress: show progress bars.

    Example:
        >>> import torch
        >>> data = ScoringData.from_tensors(torch.randn(32, 1, 8, 8), torch.arange(32) % 2)
        >>> s = EL2NScorer(epochs=1, progress=False)
        >>> s.score(data)["score"].shape
        (32,)
    """

    def __init__(
        self,
        model: Union[nn.Module, str, None] = None,
        proxies: int = 2,
        epochs: int = 1,
        keep: str = "hard",
        lr: float = 1e-3,
        batch_size: int = 128,
        seed: int = 0,
        progress: bool = True,
    ) -> None:
        if proxies < 1:
            raise ValueError(f"`proxies` must be >= 1, got {proxies}.")
        if epochs < 1:
            raise ValueError(f"`epochs` must be >= 1, got {epochs}.")
        if keep not in ("hard", "easy"):
            raise ValueError(f"`keep` must be 'hard' or 'easy', got {keep!r}.")
        self.model, self.proxies, self.epochs, self.keep = model, proxies, epochs, keep
        self.lr, self.batch_size, self.seed, self.progress = lr, batch_size, seed, progress

    def score(self, data: ScoringData) -> Scores:
        x, y = data.inputs(), torch.as_tensor(data.labels)
        total = torch.zeros(len(y))
        for p in range(self.proxies):
            net = build_model(self.model, data.num_classes, x.shape[1] if x.dim() == 4 else 1, self.seed + p)
            train_classifier(net, data.dataset, self.epochs, lr=self.lr, batch_size=self.batch_size,
                             seed=self.seed + p, progress=self.progress, desc=f"EL2N proxy {p + 1}/{self.proxies}")
            total += el2n_scores(net, x, y)
        el2n = (total / self.proxies).numpy()
        return {"score": el2n if self.keep == "hard" else -el2n, "el2n": el2n}
