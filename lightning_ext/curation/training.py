"""A small supervised training loop used by the scorers that train a model (EL2N proxies, the DFN filter,
DP4TL's surrogate): plain PyTorch, no Trainer, seeded, with a progress bar."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

__all__ = ["train_classifier", "predict_logits"]


def train_classifier(
    model: nn.Module,
    dataset: Dataset,
    epochs: int,
    lr: float = 1e-3,
    batch_size: int = 128,
    seed: int = 0,
    weight_decay: float = 0.0,
    progress: bool = True,
    desc: str = "training",
    loss_fn: Optional[callable] = None,
) -> nn.Module:
    """Fit ``model`` on ``(x, y)`` batches with Adam and cross-entropy (or ``loss_fn(model, x, y)``)."""
    from tqdm.auto import tqdm

    if epochs < 0:
        raise ValueError(f"`epochs` must be >= 0, got {epochs}.")
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=gen)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    bar = tqdm(total=epochs * len(loader), desc=desc, disable=not progress, leave=False)
    for _ in range(epochs):
        for x, y in loader:
            loss = loss_fn(model, x, y) if loss_fn is not None else F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            bar.update(1)
    bar.close()
    return model.eval()


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """``model(x)`` in eval mode, in batches."""
    model.eval()
    return torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def small_cnn(in_chans: int, num_classes: int, width: int = 16) -> nn.Module:
    """conv(w)-BN-ReLU-pool, conv(2w)-BN-ReLU, global average pool, linear: the default proxy/filter model."""
    return nn.Sequential(
        nn.Conv2d(in_chans, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(8 * width, num_classes),
    )


def build_model(model, num_classes: int, in_chans: int, seed: int) -> nn.Module:
    """A freshly initialised classifier: ``None`` = :func:`small_cnn`, a timm name, or a re-initialised copy
    of the given ``nn.Module`` (every submodule with ``reset_parameters``, seeded)."""
    import copy

    torch.manual_seed(seed)
    if model is None:
        return small_cnn(in_chans, num_classes)
    if isinstance(model, str):
        from lightning_ext.vision.image_classifier import create_timm_backbone

        return create_timm_backbone(model, num_classes=num_classes, in_chans=in_chans)
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be None, a timm backbone name or an nn.Module, got {type(model).__name__}.")
    net = copy.deepcopy(model)
    for m in net.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return net
