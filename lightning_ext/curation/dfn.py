"""Data Filtering Networks (Fang et al., ICLR 2024): a filter model trained on a small trusted set scores how
well each pool sample agrees with it; the pool is filtered to the top fraction."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule
from torch import nn
from torch.utils.data import Dataset, Subset, TensorDataset

from lightning_ext.core.validation import (
    NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, check_positive_int,
)
from lightning_ext.curation.base import Scorer, Scores, ScoringData, _describe, as_dataset
from lightning_ext.curation.training import build_model, check_training_args, local_rng, model_device, train_classifier

__all__ = ["DFNScorer", "FilterNetwork"]


class FilterNetwork(nn.Module):
    """A CLIP-style filter for labelled images: an image tower and one learned "caption" embedding per class,
    compared by cosine similarity with a learned temperature (InfoNCE over the class captions).

    ``forward(x)`` returns the scaled cosine logits against every class; :meth:`agreement` the cosine of each
    image with its own label's embedding, the DFN's "CLIP score".
    """

    def __init__(self, encoder: nn.Module, num_classes: int, embed_dim: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.captions = nn.Parameter(torch.randn(num_classes, embed_dim) / embed_dim ** 0.5)
        self.log_scale = nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))

    def similarities(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.encoder(x), dim=1) @ F.normalize(self.captions, dim=1).T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.log_scale.clamp(max=float(np.log(100.0))).exp() * self.similarities(x)

    @torch.no_grad()
    def agreement(self, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        """Cosine of each image with its label's caption embedding (batches on the model's device, CPU result)."""
        self.eval()
        device = model_device(self)
        out = [self.similarities(x[i:i + batch_size].to(device)).cpu().gather(1, y[i:i + batch_size, None])[:, 0]
               for i in range(0, len(x), batch_size)]
        return torch.cat(out)


class DFNScorer(Scorer):
    """Data Filtering Network score (Fang, Jose, Jain, Schmidt, Toshev and Shankar, "Data Filtering Networks",
    ICLR 2024, arXiv 2309.17425; models only: apple/DFN*-CLIP).

    A filter network is trained on a small **trusted** (clean, curated) set; every pool sample is scored by
    how well it agrees with the filter, and the top fraction is kept. For image-text pools the DFN is a CLIP
    model and the score is its image-text cosine. Here the pool is ``(image, label)`` pairs: the filter is
    the same contrastive model with one learned "caption" embedding per class (:class:`FilterNetwork`), and
    the score is the cosine between a sample's image embedding and its label's caption embedding. The
    paper's finding to keep in mind: filter quality follows the *quality of the filter's training data*, not
    the filter's own accuracy; a filter trained on contaminated data filters badly.

    Args:
        trusted: the trusted set (a Dataset of ``(x, y)`` or a LightningDataModule whose training split is
            used). Exactly one of ``trusted`` and ``trusted_indices`` is given.
        trusted_indices: positions in the pool known to be clean (e.g. a hand-checked sample).
        model: image tower (``None`` = a small CNN; a timm name; an ``nn.Module`` re-initialised).
        embed_dim: width of the shared image/caption space.
        epochs: training epochs on the trusted set.
        lr: Adam learning rate.
        weight_decay: Adam weight decay (the trusted set is small).
        batch_size: training batch size.
        seed: initialisation and shuffling seed (the caller's random state is untouched).
        progress: show a progress bar.
        accelerator: where the filter trains, through Lightning Fabric (``"auto"``, ``"cpu"``, ``"gpu"``, ...).

    Example:
        >>> import torch
        >>> x, y = torch.randn(40, 1, 8, 8), torch.arange(40) % 2
        >>> data = ScoringData.from_tensors(x, y)
        >>> s = DFNScorer(trusted_indices=list(range(10)), epochs=2, progress=False)
        >>> scores = s.score(data)["score"]
        >>> bool(((scores >= -1) & (scores <= 1)).all())
        True
    """

    def __init__(
        self,
        trusted: Union[LightningDataModule, Dataset, None] = None,
        trusted_indices: Optional[Sequence[int]] = None,
        model: Union[nn.Module, str, None] = None,
        embed_dim: PositiveInt = 32,
        epochs: PositiveInt = 30,
        lr: PositiveFloat = 2e-3,
        weight_decay: NonNegativeFloat = 1e-4,
        batch_size: PositiveInt = 64,
        seed: NonNegativeInt = 0,
        progress: bool = True,
        accelerator: str = "auto",
    ) -> None:
        if (trusted is None) == (trusted_indices is None):
            raise ValueError("Give exactly one of `trusted` (a clean Dataset/DataModule) and `trusted_indices` "
                             "(positions of clean samples in the pool).")
        if trusted_indices is not None and len(trusted_indices) == 0:
            raise ValueError("`trusted_indices` is empty: the filter needs trusted samples to learn from.")
        check_positive_int("embed_dim", embed_dim)
        check_training_args(epochs, lr, batch_size, seed, weight_decay)
        self.trusted, self.trusted_indices, self.model = trusted, trusted_indices, model
        self.embed_dim, self.epochs, self.lr, self.weight_decay = embed_dim, epochs, lr, weight_decay
        self.batch_size, self.seed, self.progress, self.accelerator = batch_size, seed, progress, accelerator
        self.filter_: Optional[FilterNetwork] = None

    def config(self) -> dict:
        cfg = super().config()
        if self.trusted is not None and not isinstance(self.trusted, Dataset):
            cfg["trusted"] = {"datamodule": type(self.trusted).__qualname__, "repr": repr(vars(self.trusted).get("hparams", ""))}
        elif isinstance(self.trusted, TensorDataset):
            cfg["trusted"] = [_describe(t) for t in self.trusted.tensors]
        if self.trusted_indices is not None:
            cfg["trusted_indices"] = [int(i) for i in self.trusted_indices]
        return cfg

    def fit_filter(self, data: ScoringData) -> FilterNetwork:
        """Train the filter network on the trusted set (also used by :meth:`score`)."""
        if self.trusted_indices is not None:
            idx = np.asarray(self.trusted_indices, dtype=np.int64)
            if idx.min() < 0 or idx.max() >= len(data):
                raise ValueError(f"`trusted_indices` must lie in [0, {len(data)}), the pool's positions.")
            trusted = Subset(data.dataset, idx.tolist())
        else:
            trusted = as_dataset(self.trusted, "trusted")
        x0 = trusted[0][0]
        in_chans = x0.shape[0] if x0.dim() == 3 else 1
        encoder = build_model(self.model, self.embed_dim, in_chans, self.seed)
        with local_rng(self.seed):
            net = FilterNetwork(encoder, data.num_classes, self.embed_dim)
        self.filter_ = train_classifier(net, trusted, self.epochs, lr=self.lr, batch_size=self.batch_size,
                                        seed=self.seed, weight_decay=self.weight_decay, progress=self.progress,
                                        desc="DFN filter", accelerator=self.accelerator)
        return self.filter_

    def score(self, data: ScoringData) -> Scores:
        net = self.fit_filter(data)
        agree = net.agreement(data.inputs(), torch.as_tensor(data.labels)).numpy()
        return {"score": agree}
