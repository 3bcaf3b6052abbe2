"""Training for the scorers that train a model (EL2N proxies, the DFN filter, DP4TL's surrogate), through
Lightning Fabric: on the accelerator the user names (``"auto"`` picks a GPU when there is one), seeded by a
``seed`` of its own, with a progress bar.

Nothing here touches the caller's random state: initialisation and training run inside
:func:`local_rng`, which forks the global generators, seeds the fork and restores them afterwards, and the
training order comes from a ``torch.Generator`` seeded with ``seed``. The same ``seed`` on the same
accelerator gives the same model.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Callable, Iterator, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_ext.core.optional import require
from lightning_ext.core.validation import check_non_negative, check_number, check_positive, check_positive_int
from lightning_ext.curation.base import check_seed

__all__ = ["build_model", "check_training_args", "local_rng", "model_device", "predict_logits", "small_cnn",
           "train_classifier"]

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


@contextlib.contextmanager
def local_rng(seed: int, device: Union[str, torch.device, None] = None) -> Iterator[None]:
    """Run a block with the CPU generator (and ``device``'s CUDA generator) seeded by ``seed``, then restore
    the caller's random state: randomness inside is a function of ``seed`` only, and the block leaves no trace.

    Example:
        >>> _ = torch.manual_seed(5); ref = torch.rand(1)
        >>> _ = torch.manual_seed(5)
        >>> with local_rng(0):
        ...     a = torch.rand(1)
        >>> bool(torch.rand(1) == ref)  # the caller's stream is untouched
        True
        >>> with local_rng(0):
        ...     b = torch.rand(1)
        >>> bool(a == b)
        True
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(int(seed))
        if cuda:
            with torch.cuda.device(cuda[0]):
                torch.cuda.manual_seed(int(seed))
        yield


def check_training_args(epochs: int, lr: float, batch_size: int, seed: int, weight_decay: float = 0.0,
                        epochs_name: str = "epochs", min_epochs: int = 1) -> None:
    """The checks every scorer that trains repeats in ``__init__`` (one ValueError naming the argument; NaN and
    infinity rejected): ``epochs_name`` an integer >= ``min_epochs``, ``lr`` > 0, ``batch_size`` >= 1, ``seed``
    an integer >= 0, ``weight_decay`` >= 0."""
    check_number(epochs_name, epochs, low=min_epochs, integer=True)
    check_positive("lr", lr)
    check_positive_int("batch_size", batch_size)
    check_seed(seed)
    check_non_negative("weight_decay", weight_decay)


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (or buffer); CPU for a module without tensors."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


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
    loss_fn: Optional[LossFn] = None,
    accelerator: str = "auto",
) -> nn.Module:
    """Fit ``model`` on ``(x, y)`` batches with Adam and cross-entropy (or ``loss_fn(model, x, y)``), through
    :class:`lightning.fabric.Fabric` on one device of ``accelerator``.

    The batch order is drawn from a ``torch.Generator`` seeded with ``seed``; any other randomness (dropout)
    runs under :func:`local_rng`. Returns ``model`` in eval mode, left on the training device (the scoring
    helpers :func:`predict_logits` and :func:`~lightning_ext.curation.el2n.el2n_scores` follow it there).

    Example:
        >>> from torch.utils.data import TensorDataset
        >>> data = TensorDataset(torch.randn(16, 3), torch.arange(16) % 2)
        >>> def fit(seed):
        ...     net = build_model(nn.Linear(3, 2), num_classes=2, in_chans=1, seed=0)
        ...     return train_classifier(net, data, 2, batch_size=4, seed=seed, progress=False, accelerator="cpu").weight
        >>> torch.equal(fit(1), fit(1)), torch.equal(fit(1), fit(2))
        (True, False)
    """
    from lightning.fabric import Fabric
    from tqdm.auto import tqdm

    check_training_args(epochs, lr, batch_size, seed, weight_decay, min_epochs=0)
    fabric = Fabric(accelerator=accelerator, devices=1, precision="32-true")
    with local_rng(seed, fabric.device):
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=True,
                            generator=torch.Generator().manual_seed(int(seed)))
        opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
        wrapped, opt = fabric.setup(model, opt)
        loader = fabric.setup_dataloaders(loader)
        wrapped.train()
        bar = tqdm(total=epochs * len(loader), desc=desc, disable=not progress, leave=False)
        for _ in range(epochs):
            for x, y in loader:
                loss = loss_fn(wrapped, x, y) if loss_fn is not None else F.cross_entropy(wrapped(x), y)
                opt.zero_grad()
                fabric.backward(loss)
                opt.step()
                bar.update(1)
        bar.close()
    return model.eval()


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """``model(x)`` in eval mode, in batches on the model's device; the logits come back on the CPU.

    Example:
        >>> predict_logits(nn.Linear(3, 2), torch.zeros(5, 3)).shape
        torch.Size([5, 2])
    """
    model.eval()
    device = model_device(model)
    return torch.cat([model(x[i:i + batch_size].to(device)).cpu() for i in range(0, len(x), batch_size)])


def small_cnn(in_chans: int, num_classes: int, width: int = 16) -> nn.Module:
    """conv(w)-BN-ReLU-pool, conv(2w)-BN-ReLU, global average pool, linear: the default proxy/filter model."""
    return nn.Sequential(
        nn.Conv2d(in_chans, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(8 * width, num_classes),
    )


def build_model(model: Union[nn.Module, str, None], num_classes: int, in_chans: int, seed: int) -> nn.Module:
    """A freshly initialised classifier, on the CPU, initialised under :func:`local_rng` (``seed``): ``None`` =
    :func:`small_cnn`, a timm model name (random weights, never downloaded), or a copy of the given
    ``nn.Module`` with every submodule that has ``reset_parameters`` re-initialised.

    Example:
        >>> a, b = build_model(None, 3, 1, seed=0), build_model(None, 3, 1, seed=0)
        >>> all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
        True
    """
    with local_rng(seed):
        if model is None:
            return small_cnn(in_chans, num_classes)
        if isinstance(model, str):
            timm = require("timm", f"the timm model {model!r}")
            return timm.create_model(model, pretrained=False, num_classes=num_classes, in_chans=in_chans)
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be None, a timm model name or an nn.Module, got {type(model).__name__}.")
        net = copy.deepcopy(model)
        for m in net.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
        return net
