"""Helpers shared by the pruning benchmarks (Fashion-MNIST ResNet-10t recipe, quiet fits, test predictions).

Kept here so that every benchmark trains and evaluates the same way; not part of the library.
"""

from __future__ import annotations

import functools
import statistics
import time

import torch
from lightning.pytorch import Callback, Trainer

from lightning_ext.modules import ImageClassifier


class EpochPrinter(Callback):
    """Prints one line per training epoch (loss and seconds): progress for long, log-less benchmark runs."""

    def __init__(self, label: str) -> None:
        self.label, self.start = label, 0.0

    def on_train_epoch_start(self, trainer, pl_module):
        self.start = time.time()

    def on_train_epoch_end(self, trainer, pl_module):
        loss = trainer.callback_metrics.get("train_loss_epoch")
        print(f"  [{self.label}] epoch {trainer.current_epoch + 1}/{trainer.max_epochs} "
              f"loss {float(loss):.3f} ({time.time() - self.start:.0f} s)", flush=True)


def resnet10t_fmnist(stem_downsample: int, lr: float, epochs: int) -> ImageClassifier:
    """timm ResNet-10t for 28x28 grayscale, SGD (momentum 0.9, weight decay 5e-4) with a cosine schedule."""
    return ImageClassifier(
        "resnet10t", num_classes=10, in_chans=1, image_size=28, stem_downsample=stem_downsample,
        optimizer=functools.partial(torch.optim.SGD, lr=lr, momentum=0.9, weight_decay=5e-4),
        scheduler=functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=epochs),
    )


def fit(model, dm, epochs: int, callbacks: list, label: str) -> float:
    """Fit on CPU without validation, logger or checkpoints; returns the wall-clock seconds."""
    start = time.time()
    Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
            callbacks=[*callbacks, EpochPrinter(label)]).fit(model, datamodule=dm)
    return time.time() - start


@torch.no_grad()
def test_predictions(model, dm) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted and true labels on the datamodule's test split (eval mode)."""
    dm.setup("test")
    model.eval()
    preds, labels = [], []
    for x, y in dm.test_dataloader():
        preds.append(model(x).argmax(1))
        labels.append(y)
    return torch.cat(preds), torch.cat(labels)


def mean_std(values, digits: int = 2) -> str:
    """``mean ± std`` (sample std; 0 for a single value)."""
    values = list(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {std:.{digits}f}"
