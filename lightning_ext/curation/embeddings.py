"""Embeddings for the scorers: from a model the user names (an ``nn.Module``, a timm backbone name, a
checkpoint), or from the pixels themselves, computed in batches with a progress bar."""

from __future__ import annotations

import copy
from typing import Optional, Union

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from lightning_ext.core.checkpoints import read_state_dict
from lightning_ext.core.validation import PositiveInt, check_positive_int
from lightning_ext.curation.base import ScoringData, _describe
from lightning_ext.curation.training import build_model

__all__ = ["Embedder", "feature_extractor", "l2_normalize"]


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)


def feature_extractor(model: nn.Module) -> nn.Module:
    """The part of ``model`` that returns features: a LightningModule's ``net``, a timm model without its head."""
    net = getattr(model, "net", model) if not hasattr(model, "reset_classifier") else model
    if hasattr(net, "reset_classifier"):
        net = copy.deepcopy(net)
        net.reset_classifier(0)
    return net


class Embedder:
    """Embeds a pool with a model the user names, in batches with a progress bar.

    Args:
        model: ``None`` or ``"pixels"`` (the flattened inputs), a timm backbone name (built without its head,
            random weights unless ``checkpoint`` is given), or any ``nn.Module`` (a timm model or a
            LightningModule with a ``net`` loses its classifier head; other modules are used as they are).
        checkpoint: weights for ``model`` (a state dict or a Lightning checkpoint, read with
            ``torch.load(weights_only=True)``; tensors whose shape differs, such as another head, are skipped).
        in_chans: input channels of a timm backbone built by name (default: read from the data).
        pca_components: project the embeddings on their first principal components (seeded, deterministic).
        normalize: L2-normalise the rows (cosine geometry, as SemDeDup, SSP and DBP use).
        batch_size: samples per forward pass.
        progress: show a tqdm progress bar.
        device: where the model runs (``"cpu"``, ``"cuda"``).

    Example:
        >>> import torch
        >>> emb = Embedder(None, pca_components=2, progress=False).embed(torch.randn(10, 1, 4, 4))
        >>> emb.shape
        (10, 2)
    """

    def __init__(
        self,
        model: Union[nn.Module, str, None] = None,
        checkpoint: Optional[str] = None,
        in_chans: Optional[PositiveInt] = None,
        pca_components: Optional[PositiveInt] = None,
        normalize: bool = True,
        batch_size: PositiveInt = 256,
        progress: bool = True,
        device: str = "cpu",
    ) -> None:
        check_positive_int("batch_size", batch_size)
        for name, value in (("in_chans", in_chans), ("pca_components", pca_components)):
            if value is not None:
                check_positive_int(name, value)
        if model is None and checkpoint is not None:
            raise ValueError("`checkpoint` needs a `model` to load into (an nn.Module or a timm backbone name).")
        self.model = model
        self.checkpoint = checkpoint
        self.in_chans = in_chans
        self.pca_components = pca_components
        self.normalize = normalize
        self.batch_size = batch_size
        self.progress = progress
        self.device = device
        self._net: Optional[nn.Module] = None

    def config(self) -> dict:
        """What changes the embeddings (the model by its weights' hash): part of a scorer's cache key."""
        return {"model": _describe(self.model), "checkpoint": self.checkpoint, "in_chans": self.in_chans,
                "pca_components": self.pca_components, "normalize": self.normalize}

    def network(self, in_chans: int = 1) -> Optional[nn.Module]:
        """The feature network (built and loaded once); ``None`` for pixels."""
        if self.model is None or self.model == "pixels":
            return None
        if self._net is None:
            if isinstance(self.model, str):  # a timm model without its head (num_classes=0), random weights
                net = build_model(self.model, num_classes=0, in_chans=self.in_chans or in_chans, seed=0)
            else:
                net = feature_extractor(self.model)
            if self.checkpoint is not None:
                reference = net.state_dict()
                state = read_state_dict(self.checkpoint, reference_keys=reference.keys(), name="Embedding checkpoint")
                usable = {k: v for k, v in state.items() if k in reference and reference[k].shape == v.shape}
                if not usable:
                    raise ValueError(f"No tensor of {self.checkpoint} matches the embedding model "
                                     f"{type(net).__name__}; check `checkpoint` and `model`.")
                net.load_state_dict(usable, strict=False)
            self._net = net.to(self.device).eval()
        return self._net

    @torch.no_grad()
    def embed(self, data: Union[ScoringData, Dataset, torch.Tensor]) -> np.ndarray:
        """``(N, D)`` float32 embeddings of the inputs, in pool order."""
        from tqdm.auto import tqdm

        if isinstance(data, torch.Tensor):
            data = TensorDataset(data)
        dataset = data.dataset if isinstance(data, ScoringData) else data
        loader = torch.utils.data.DataLoader(dataset, batch_size=self.batch_size, shuffle=False)
        chunks = []
        net = None
        for batch in tqdm(loader, desc="embedding", disable=not self.progress, leave=False):
            x = batch[0] if isinstance(batch, (list, tuple)) else batch
            if net is None:
                net = self.network(in_chans=x.shape[1] if x.dim() == 4 else 1)
            out = x.flatten(1) if net is None else net(x.to(self.device))
            if isinstance(out, (tuple, list)):
                out = out[0]
            chunks.append(out.flatten(1).float().cpu())
        emb = torch.cat(chunks).numpy().astype(np.float32)
        if self.pca_components is not None:
            from sklearn.decomposition import PCA

            k = min(self.pca_components, emb.shape[0], emb.shape[1])
            emb = PCA(n_components=k, random_state=0, svd_solver="randomized" if k < min(emb.shape) // 2 else "full").fit_transform(emb).astype(np.float32)
        if self.normalize:
            emb = l2_normalize(emb)
        return emb
