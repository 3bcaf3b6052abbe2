"""EL2N: the error L2-norm score of Paul, Ganguli and Dziugaite, "Deep Learning on a Data Diet" (NeurIPS 2021)."""

from __future__ import annotations

from typing import Union

import torch
import torch.nn.functional as F
from torch import nn

from lightning_ext.core.validation import NonNegativeInt, PositiveFloat, PositiveInt, check_positive_int
from lightning_ext.curation.base import Scorer, Scores, ScoringData, Which, check_which, prefer
from lightning_ext.curation.training import build_model, check_training_args, model_device, train_classifier

__all__ = ["EL2NScorer", "el2n_scores"]


@torch.no_grad()
def el2n_scores(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """EL2N (Paul et al., 2021): ``|| softmax(f(x)) - onehot(y) ||_2`` per sample, model in eval mode, batches
    on the model's device; the scores come back on the CPU.

    Example:
        >>> net = nn.Linear(2, 3)
        >>> el2n_scores(net, torch.zeros(4, 2), torch.tensor([0, 1, 2, 0])).shape
        torch.Size([4])
    """
    model.eval()
    device = model_device(model)
    out = []
    for i in range(0, len(x), batch_size):
        p = F.softmax(model(x[i:i + batch_size].to(device)), dim=1).cpu()
        out.append((p - F.one_hot(y[i:i + batch_size].cpu(), p.shape[1]).float()).norm(dim=1))
    return torch.cat(out)


class EL2NScorer(Scorer):
    """EL2N (Paul et al., NeurIPS 2021, arXiv 2107.07075): the L2 norm of ``softmax(f(x)) - onehot(y)`` from
    proxy models trained briefly on the whole pool, averaged over ``proxies`` initialisations.

    Warning:
        **Do not use the default to clean noisy labels.** The default ``which="hard"`` is the paper's rule for
        *pruning clean data* (keep the hardest, drop the easy): a high EL2N also marks a wrong label, so on a
        noisy pool ``"hard"`` keeps the mislabelled samples *first*. In a held-out check (30% flipped labels,
        1 scoring epoch) the hard half kept 468 of 700 flipped labels where a random half keeps about 335. To
        filter label noise pass ``which="easy"`` (lowest EL2N kept; the class-balanced selection of
        :class:`~lightning_ext.curation.datamodule.FilteredDataModule` keeps it from starving hard classes).
        The default stays ``"hard"`` so that ``EL2NScorer()`` is the published method.

    High EL2N marks hard (or mislabelled) samples. ``"random"`` is a seeded random order, the control at the
    same cost. The paper scores after a few epochs of training (``epochs``; 1 here is a cheap choice, the
    paper's CIFAR-10 runs score at epoch 20 of 200) and averages 10 proxies. Proxies train through Lightning
    Fabric (:func:`~lightning_ext.curation.training.train_classifier`) on ``accelerator``.
    Reference code: github.com/mansheej/data_diet.

    Args:
        model: proxy architecture (``None`` = a small CNN; a timm name; an ``nn.Module`` re-initialised per proxy).
        proxies: number of independently initialised proxies averaged.
        epochs: training epochs of each proxy (the paper scores early in training).
        which: ``"hard"`` (highest EL2N kept; the paper's rule for clean data, keeps wrong labels first),
            ``"easy"`` (lowest kept; use this to filter noisy labels) or ``"random"``.
        lr: Adam learning rate of the proxies.
        batch_size: proxy training batch size.
        seed: seed of the first proxy (proxy ``i`` uses ``seed + i``); the caller's random state is untouched.
        progress: show progress bars.
        accelerator: where the proxies train (``"auto"``, ``"cpu"``, ``"gpu"``, ...; Lightning's names).

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
        proxies: PositiveInt = 2,
        epochs: PositiveInt = 1,
        which: Which = "hard",
        lr: PositiveFloat = 1e-3,
        batch_size: PositiveInt = 128,
        seed: NonNegativeInt = 0,
        progress: bool = True,
        accelerator: str = "auto",
    ) -> None:
        check_positive_int("proxies", proxies)
        check_training_args(epochs, lr, batch_size, seed)
        check_which(which)
        self.model, self.proxies, self.epochs, self.which = model, proxies, epochs, which
        self.lr, self.batch_size, self.seed, self.progress = lr, batch_size, seed, progress
        self.accelerator = accelerator

    def score(self, data: ScoringData) -> Scores:
        x, y = data.inputs(), torch.as_tensor(data.labels)
        total = torch.zeros(len(y))
        for p in range(self.proxies):
            net = build_model(self.model, data.num_classes, x.shape[1] if x.dim() == 4 else 1, self.seed + p)
            train_classifier(net, data.dataset, self.epochs, lr=self.lr, batch_size=self.batch_size,
                             seed=self.seed + p, progress=self.progress, desc=f"EL2N proxy {p + 1}/{self.proxies}",
                             accelerator=self.accelerator)
            total += el2n_scores(net, x, y)
        el2n = (total / self.proxies).numpy()
        return {"score": prefer(el2n, self.which, self.seed), "el2n": el2n}
