"""Early-exit (multi-exit) networks: internal classifiers on a backbone's intermediate features, their joint loss,
confidence-threshold inference and the compute each exit costs.

The dynamic network (DyNN) of Haque and Yang, "Dynamic Neural Network is All You Need: Understanding the Robustness
of Dynamic Mechanisms in Neural Networks", ICCV 2023 Workshop on Resource Efficient Deep Learning for Computer
Vision (arXiv 2308.08709; no official code found), in its early-exit form (Shallow-Deep Networks: Kaya, Hong and
Dumitras, "Shallow-Deep Networks: Understanding and Mitigating Network Overthinking", ICML 2019; reference code
https://github.com/yigitcankaya/Shallow-Deep-Networks). The backbone is split into stages; after stage ``k`` an
exit ``f_k`` (average pool + linear) gives logits ``z_k``. The final exit pools globally (the backbone's own
classifier); an internal exit pools to ``exit_pool_size x exit_pool_size`` (default 1: global), which keeps the
spatial layout that early, wide feature maps need (SDN's internal classifiers likewise reduce the map to a small
fixed size instead of a single vector). Training minimises

    L = Σ_k w_k · CE(z_k, y)

and inference leaves at the first exit whose max-softmax reaches the threshold τ (``"confidence"``) or whose
normalised entropy ``H(p_k) / log C`` is at most ``1 − τ`` (``"entropy"``); the last exit always answers.
"""

from __future__ import annotations

import math
from typing import Literal, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_ext.core.validation import check_choice, check_number

__all__ = ["EarlyExitNetwork", "ExitPolicy", "exit_decisions", "joint_exit_loss", "stages_from_timm"]

ExitPolicy = Literal["confidence", "entropy"]


def stages_from_timm(features: nn.Module) -> tuple[list[nn.Sequential], list[int]]:
    """Split a timm ``features_only`` model (``FeatureListNet``) into sequential stages ending at its returned
    layers; returns the stages and their output channels."""
    return_layers = getattr(features, "return_layers", None)
    if return_layers is None or not hasattr(features, "items"):
        raise ValueError("stages_from_timm needs a timm model built with features_only=True (a FeatureListNet)")
    stages, current = [], []
    for name, module in features.items():
        current.append(module)
        if name in return_layers:
            stages.append(nn.Sequential(*current))
            current = []
    return stages, list(features.feature_info.channels())


def joint_exit_loss(exit_logits: Sequence[Tensor], y: Tensor, weights: Optional[Sequence[float]] = None) -> Tensor:
    """``Σ_k w_k · CE(z_k, y)`` over the exits (``weights`` default: all 1).

    Example:
        >>> z = [torch.zeros(2, 3), torch.zeros(2, 3)]
        >>> round(float(joint_exit_loss(z, torch.tensor([0, 2]))), 4)  # 2 · log 3
        2.1972
    """
    weights = [1.0] * len(exit_logits) if weights is None else list(weights)
    if len(weights) != len(exit_logits):
        raise ValueError(f"{len(weights)} exit weights for {len(exit_logits)} exits; give one weight per exit")
    return sum(w * F.cross_entropy(z, y) for w, z in zip(weights, exit_logits))


@torch.no_grad()
def exit_decisions(exit_logits: Sequence[Tensor], threshold: float, policy: str = "confidence") -> Tensor:
    """Index of the exit each sample leaves at: the first whose confidence passes ``threshold`` (else the last).

    Example:
        >>> z = [torch.tensor([[4.0, 0.0], [0.1, 0.0]]), torch.tensor([[0.0, 1.0], [0.0, 1.0]])]
        >>> exit_decisions(z, threshold=0.9).tolist()
        [0, 1]
    """
    check_choice("policy", policy, ("confidence", "entropy"))
    k = len(exit_logits)
    chosen = torch.full((exit_logits[0].shape[0],), k - 1, dtype=torch.long, device=exit_logits[0].device)
    for i in reversed(range(k - 1)):
        p = exit_logits[i].float().softmax(-1)
        if policy == "confidence":
            ok = p.max(-1).values >= threshold
        else:
            entropy = -(p * p.clamp_min(1e-12).log()).sum(-1) / math.log(p.shape[-1])
            ok = entropy <= 1 - threshold
        chosen = torch.where(ok, torch.full_like(chosen, i), chosen)
    return chosen


class EarlyExitNetwork(nn.Module):
    """A backbone split into stages with an internal classifier (pool + linear) after each chosen stage.

    Args:
        stages: the backbone's consecutive stages (their composition is the whole feature extractor).
        channels: output channels of each stage.
        num_classes: classes of every exit.
        exits: 0-based indices of the stages that get an exit; the last stage always has one (the final
            classifier). ``None``: every stage.
        threshold: τ of the inference policy.
        policy: ``"confidence"`` or ``"entropy"``.
        exit_pool_size: output side of the average pool of the internal (non-final) exits (1: global pool); the
            final exit always pools globally.

    Example:
        >>> stages = [nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU()),
        ...           nn.Sequential(nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.ReLU())]
        >>> net = EarlyExitNetwork(stages, [4, 8], num_classes=3)
        >>> [z.shape[1] for z in net.forward_exits(torch.zeros(2, 1, 8, 8))], net(torch.zeros(2, 1, 8, 8)).shape
        ([3, 3], torch.Size([2, 3]))
    """

    def __init__(self, stages: Sequence[nn.Module], channels: Sequence[int], num_classes: int,
                 exits: Optional[Sequence[int]] = None, threshold: float = 0.9,
                 policy: ExitPolicy = "confidence", exit_pool_size: int = 1) -> None:
        super().__init__()
        if len(stages) != len(channels) or not stages:
            raise ValueError(f"EarlyExitNetwork needs one channel count per stage; got {len(stages)} stages and "
                             f"{len(channels)} channel counts")
        n = len(stages)
        exits = list(range(n)) if exits is None else sorted({int(e) for e in exits} | {n - 1})
        if exits[0] < 0 or exits[-1] >= n:
            raise ValueError(f"exit indices must be stage indices in [0, {n - 1}]; got {exits}")
        check_number("threshold", threshold, low=0, high=1)
        check_choice("policy", policy, ("confidence", "entropy"))
        check_number("exit_pool_size", exit_pool_size, low=1, integer=True)
        self.stages = nn.ModuleList(stages)
        self.exit_stages = exits
        sides = [int(exit_pool_size)] * (len(exits) - 1) + [1]
        self.heads = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(s), nn.Flatten(),
                                                 nn.Linear(channels[e] * s * s, num_classes))
                                   for e, s in zip(exits, sides))
        self.threshold, self.policy = float(threshold), policy
        self.flops_fraction: Optional[list[float]] = None  # per exit, set by measure_flops

    @property
    def num_exits(self) -> int:
        return len(self.exit_stages)

    def forward_exits(self, x: Tensor, upto: Optional[int] = None) -> list[Tensor]:
        """Logits of every exit (or of exits ``0..upto``), computing only the stages they need."""
        last = self.num_exits - 1 if upto is None else upto
        out, h, head = [], x, 0
        for i, stage in enumerate(self.stages):
            h = stage(h)
            if head < len(self.exit_stages) and self.exit_stages[head] == i:
                out.append(self.heads[head](h))
                if head == last:
                    break
                head += 1
        return out

    def exit_and_logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The exit each sample takes under the policy (routing without gradient) and that exit's logits."""
        logits = self.forward_exits(x)
        chosen = exit_decisions(logits, self.threshold, self.policy)
        stacked = torch.stack(logits, 1)
        return chosen, stacked[torch.arange(len(x), device=x.device), chosen]

    def forward(self, x: Tensor) -> Tensor:
        """Logits of the exit each sample takes (the dynamic network as a plain classifier)."""
        return self.exit_and_logits(x)[1]

    @torch.no_grad()
    def measure_flops(self, input_shape: Sequence[int]) -> list[float]:
        """FLOPs of one sample up to each exit, as a fraction of the whole network's (torch's FlopCounterMode)."""
        from torch.utils.flop_counter import FlopCounterMode

        was_training = self.training
        self.eval()
        x = torch.zeros(1, *input_shape, device=next(self.parameters()).device)
        flops = []
        for k in range(self.num_exits):
            counter = FlopCounterMode(display=False)
            with counter:
                self.forward_exits(x, upto=k)
            flops.append(counter.get_total_flops())
        self.train(was_training)
        self.flops_fraction = [f / flops[-1] for f in flops]
        return self.flops_fraction


def build_stages(backbone: Union[str, nn.Module], in_chans: int, image_size: tuple[int, int],
                 stem_downsample: Optional[int], out_indices: Optional[Sequence[int]] = None,
                 backbone_kwargs: Optional[dict] = None) -> tuple[list[nn.Module], list[int]]:
    """Stages and channels from a timm name (``features_only``, stem adapted to small images) or a module.

    A module is a timm ``FeatureListNet`` or an ``nn.Sequential`` whose children are the stages (their output
    channels are found with a dummy batch).
    """
    from lightning_ext.core.optional import require
    from lightning_ext.vision.backbones import adapt_stem

    if isinstance(backbone, str):
        from lightning_ext.vision.backbones import create_timm_backbone

        timm = require("timm", "an EarlyExitClassifier backbone given by name")
        if backbone not in timm.list_models():
            create_timm_backbone(backbone, 2, in_chans)  # raises the close-names error
        kwargs = dict(backbone_kwargs or {})
        kwargs["out_indices"] = tuple(out_indices) if out_indices is not None else (1, 2, 3, 4)
        features = timm.create_model(backbone, pretrained=False, features_only=True, in_chans=in_chans, **kwargs)
        if stem_downsample is None:
            stem_downsample = 1 if max(image_size) < 64 else 4
        adapt_stem(features, stem_downsample)
        return stages_from_timm(features)
    if hasattr(backbone, "return_layers"):
        return stages_from_timm(backbone)
    if isinstance(backbone, nn.Sequential):
        stages = list(backbone.children())
        channels, h = [], torch.zeros(2, in_chans, *image_size)
        with torch.no_grad():
            for stage in stages:
                h = stage(h)
                if h.dim() != 4:
                    raise ValueError("every stage of an nn.Sequential backbone must return (B, C, H, W) features; "
                                     f"stage {len(channels)} returned shape {tuple(h.shape)}")
                channels.append(h.shape[1])
        return stages, channels
    raise ValueError(f"backbone must be a timm model name, a timm features_only model or an nn.Sequential of "
                     f"stages; got {type(backbone).__name__}")
