"""FFNet (MetaMixer): a convolutional network whose token mixer is an FFN-shaped "FFNified attention" with
large-kernel depthwise convolutions, registered with timm as ``ffnet_nano`` and ``ffnet_1`` .. ``ffnet_4``.

Yun, Lee and Ro, "MetaMixer Is All You Need" (arXiv 2406.02021, 2024; the repository now titles it "FFNet:
MetaMixer-based Efficient Convolutional Mixer Design"); reference code: https://github.com/ysj9909/FFNet
(``models/ffnet.py``). Ported from the block definition (not copied): the official file does not import under
timm >= 1.0 (``_update_default_kwargs`` is gone), its stem ignores ``in_chans`` and ``pretrained=True`` reads an
undefined path.

MetaMixer reads self-attention as query-key-value memory and keeps that structure while replacing its two
interactions by depthwise convolutions and softmax by GELU ("FFNification"). One FFBlock on ``x`` (channels C) is

    x = x + DropPath(γ₁ · DW₂(GELU(DW₁(BN(W_q x)))))          # token mixer: query 1x1, key DW k₁xk₁, value DW k₂xk₂
    x = x + DropPath(γ₂ · W₂ GELU(W₁ DW(x)))                  # channel mixer: depthwise conv then FFN (ratio r)

where a 7x7 depthwise conv is trained as RepVGG branches (7x7+BN plus 3x3+BN, summed), γ is an optional per-channel
layer scale and stochastic-depth rates grow linearly from 0 to ``drop_path_rate`` over the blocks. Stem: two
3x3 convs (stride 2 each) with BN and GELU; stages 2-4 start with a stride-2 7x7 RepVGG depthwise downsampling and
a residual BN + 1x1 conv; head: BN, global average pool, linear.

Differences from the official file (on purpose): ``in_chans`` is honoured; when ``drop_path_rate > 0`` every
residual gets a ``timm.layers.DropPath`` (the first block's at rate 0), so a later schedule
(:class:`~lightning_ext.vision.scheduled_drop_path.ScheduledDropPath`) reaches all of them; ``stem_stride``
(4, 2, 1) keeps resolution for small images; ``token_mixer`` selects the ablations ``"linear"`` (GELU removed: the
two depthwise convs collapse to one linear filter) and ``"none"`` (no token mixer); ``features_only`` works through
timm's feature extraction. No pretrained weights exist offline: ``pretrained=True`` is refused.

How to get ``timm.create_model("ffnet_1")``: after ``import lightning_ext``, the first ``import timm`` registers the
names (a one-shot import hook, :mod:`lightning_ext.timm_hook`; ``import lightning_ext`` itself stays light and
imports neither torch nor timm). Importing this module registers them too.

Example:
    >>> import timm, torch
    >>> import lightning_ext.vision.ffnet  # registers ffnet_* with timm
    >>> net = timm.create_model("ffnet_nano", in_chans=1, num_classes=10, stem_stride=2)
    >>> net(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

from typing import Literal, Optional, Sequence, Union

import torch
from timm.layers import DropPath, LayerNorm2d, SelectAdaptivePool2d, SqueezeExcite, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import Tensor, nn

from lightning_ext.core.validation import check_choice, check_fraction, check_number, check_positive_int

__all__ = ["FFNet", "FFBlock", "TokenMixer", "ChannelMixer", "RepDWConv", "ConvBN", "DepthwiseConv2d", "PatchMerging",
           "VARIANTS", "TokenMixerKind"]

TokenMixerKind = Literal["ffnified", "linear", "none"]

#: The registered variants: depth and width per stage, the channel mixer's depthwise kernel, layer scale (None =
#: off), the default drop-path rate and the stem width (official ``register_model`` functions; nano is ours).
VARIANTS: dict[str, dict] = {
    "ffnet_nano": dict(depths=(1, 1, 2, 1), dims=(32, 64, 128, 256), channel_kernel=3, layer_scale=None,
                       drop_path_rate=0.0, stem_dim=32),
    "ffnet_1": dict(depths=(2, 2, 8, 2), dims=(80, 160, 320, 640), channel_kernel=3, layer_scale=None,
                    drop_path_rate=0.1, stem_dim=64),
    "ffnet_2": dict(depths=(3, 3, 15, 3), dims=(88, 176, 352, 704), channel_kernel=7, layer_scale=None,
                    drop_path_rate=0.15, stem_dim=64),
    "ffnet_3": dict(depths=(4, 4, 22, 5), dims=(96, 192, 384, 768), channel_kernel=7, layer_scale=1e-6,
                    drop_path_rate=0.35, stem_dim=64),
    "ffnet_4": dict(depths=(4, 4, 27, 3), dims=(128, 256, 512, 1024), channel_kernel=7, layer_scale=1e-6,
                    drop_path_rate=0.4, stem_dim=64),
}


_TAP_INDEX: dict[tuple, tuple[Tensor, int, int]] = {}


def _tap_index(h: int, w: int, k: int, stride: int, pad: int, device: torch.device) -> tuple[Tensor, int, int]:
    """For a k x k conv on an h x w map: ``(index (P, Q), ho, wo)``, the kernel tap (``u·k + v``) that links output
    position p to input position q, or ``k·k`` (a zero) where none does."""
    key = (h, w, k, stride, pad, str(device))
    if key not in _TAP_INDEX:
        ho, wo = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
        i, j, u, v = torch.meshgrid(torch.arange(ho), torch.arange(wo), torch.arange(k), torch.arange(k),
                                    indexing="ij")
        y, x = i * stride + u - pad, j * stride + v - pad
        ok = (y >= 0) & (y < h) & (x >= 0) & (x < w)
        index = torch.full((ho * wo, h * w), k * k, dtype=torch.long)
        index[(i * wo + j)[ok], (y * w + x)[ok]] = (u * k + v)[ok]
        _TAP_INDEX[key] = (index.to(device), ho, wo)
    return _TAP_INDEX[key]


class DepthwiseConv2d(nn.Conv2d):
    """A depthwise ``nn.Conv2d`` (``groups == in_channels``, any channel multiplier) that computes small maps as a
    dense matrix product: each channel's convolution written as its ``(H'W', HW)`` matrix of kernel taps.

    Why our own: on the 2x2-7x7 maps of small images, PyTorch's CPU depthwise convolution (oneDNN) spends most of an
    FFNet training step on 7x7 kernels that mostly read padding; the matrix form gives the same outputs and gradients
    (to float rounding; tested against ``F.conv2d``) and was 3-16x faster per layer (forward + backward, one thread;
    4x4 and 2x2 maps, stride 1 and 2) in the FFNet benchmark's set-up. Used when ``H·W <= 4·k²``; larger maps, and
    ``dense_small_maps = False``, use ``F.conv2d``. Same parameters and state-dict keys as ``nn.Conv2d``.
    """

    dense_small_maps: bool = True

    def forward(self, x: Tensor) -> Tensor:
        k, (h, w) = self.kernel_size[0], x.shape[-2:]
        if (not self.dense_small_maps or h * w > 4 * k * k or self.kernel_size[0] != self.kernel_size[1]
                or self.padding_mode != "zeros" or isinstance(self.padding, str) or len(set(self.stride)) != 1
                or len(set(self.padding)) != 1 or self.dilation != (1, 1) or x.dim() != 4):
            return super().forward(x)
        index, ho, wo = _tap_index(h, w, k, self.stride[0], self.padding[0], x.device)
        out_c = self.out_channels
        taps = torch.cat([self.weight.reshape(out_c, k * k), self.weight.new_zeros(out_c, 1)], 1)
        xs = x.reshape(x.shape[0], x.shape[1], h * w)
        if out_c != x.shape[1]:
            xs = xs.repeat_interleave(out_c // x.shape[1], dim=1)
        out = torch.einsum("opq,boq->bop", taps[:, index], xs)
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1)
        return out.reshape(x.shape[0], out_c, ho, wo)


def _conv(in_dim: int, out_dim: int, kernel_size: int, stride: int, groups: int, bias: bool) -> nn.Conv2d:
    """``nn.Conv2d`` with padding ``k // 2``; a :class:`DepthwiseConv2d` when depthwise."""
    cls = DepthwiseConv2d if groups == in_dim and groups > 1 else nn.Conv2d
    return cls(in_dim, out_dim, kernel_size, stride, kernel_size // 2, groups=groups, bias=bias)


class ConvBN(nn.Sequential):
    """A bias-free convolution followed by BatchNorm (weight 1, bias 0)."""

    def __init__(self, in_dim: int, out_dim: int, kernel_size: int = 1, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.c = _conv(in_dim, out_dim, kernel_size, stride, groups, bias=False)
        self.bn = nn.BatchNorm2d(out_dim)


class RepDWConv(nn.Module):
    """A k x k depthwise conv trained as two branches, ``ConvBN(k x k) + ConvBN((k//2) x (k//2))`` (RepVGG style);
    ``out_dim`` may be a multiple of ``in_dim`` (a channel multiplier, used when downsampling)."""

    def __init__(self, in_dim: int, out_dim: int, kernel_size: int = 7, stride: int = 1) -> None:
        super().__init__()
        self.large = ConvBN(in_dim, out_dim, kernel_size, stride, groups=in_dim)
        self.small = ConvBN(in_dim, out_dim, kernel_size // 2, stride, groups=in_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.large(x) + self.small(x)


def _depthwise(dim: int, kernel_size: int, norm: bool) -> nn.Module:
    """The official choice: a RepVGG 7x7 for kernel 7, else one depthwise conv (with BN, or with a bias)."""
    if kernel_size == 7:
        return RepDWConv(dim, dim, 7)
    if norm:
        return ConvBN(dim, dim, kernel_size, groups=dim)
    return _conv(dim, dim, kernel_size, 1, dim, bias=True)


class TokenMixer(nn.Module):
    """FFNified attention: query projection (1x1 conv + BN), "key" depthwise conv, GELU in place of softmax, "value"
    depthwise conv. ``linear=True`` drops the GELU (an ablation: the two convolutions become one linear filter)."""

    def __init__(self, dim: int, key_kernel: int = 7, value_kernel: int = 7, linear: bool = False) -> None:
        super().__init__()
        self.query = ConvBN(dim, dim, 1)
        self.key = _depthwise(dim, key_kernel, norm=False)
        self.act = nn.Identity() if linear else nn.GELU()
        self.value = _depthwise(dim, value_kernel, norm=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.value(self.act(self.key(self.query(x))))


class ChannelMixer(nn.Module):
    """A depthwise conv, then the FFN ``1x1 (r·C) -> GELU -> 1x1 (C)``."""

    def __init__(self, dim: int, kernel_size: int = 7, expansion: float = 3.0) -> None:
        super().__init__()
        hidden = int(dim * expansion)
        self.dw = _depthwise(dim, kernel_size, norm=True)
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(self.dw(x))))


class _Residual(nn.Module):
    """``x + DropPath(γ · f(x))`` with an optional per-channel layer scale γ."""

    def __init__(self, fn: nn.Module, dim: int, drop_path: Optional[float], layer_scale: Optional[float]) -> None:
        super().__init__()
        self.fn = fn
        self.gamma = nn.Parameter(torch.full((dim, 1, 1), float(layer_scale))) if layer_scale is not None else None
        self.drop_path = DropPath(drop_path) if drop_path is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        y = self.fn(x)
        if self.gamma is not None:
            y = y * self.gamma
        return x + self.drop_path(y)


class FFBlock(nn.Module):
    """One FFNet block: residual token mixer, optional squeeze-excite, residual channel mixer (shared drop path)."""

    def __init__(self, dim: int, token_mixer: TokenMixerKind = "ffnified", key_kernel: int = 7,
                 value_kernel: int = 7, channel_kernel: int = 7, expansion: float = 3.0,
                 drop_path: Optional[float] = None, layer_scale: Optional[float] = None, use_se: bool = False) -> None:
        super().__init__()
        self.token = (None if token_mixer == "none" else
                      _Residual(TokenMixer(dim, key_kernel, value_kernel, linear=token_mixer == "linear"), dim,
                                drop_path, layer_scale))
        self.se = SqueezeExcite(dim, 0.25) if use_se else nn.Identity()
        self.channel = _Residual(ChannelMixer(dim, channel_kernel, expansion), dim, drop_path, layer_scale)

    def forward(self, x: Tensor) -> Tensor:
        if self.token is not None:
            x = self.token(x)
        return self.channel(self.se(x))


class PatchMerging(nn.Module):
    """Stride-2 downsampling: a 7x7 RepVGG depthwise conv with channel multiplier ``out_dim / in_dim``, then
    ``y + Conv1x1(BN(y))``."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        if out_dim % in_dim:
            raise ValueError(f"FFNet: each stage's width must be a multiple of the previous one's ({in_dim} -> "
                             f"{out_dim}); change `dims`.")
        self.dw = RepDWConv(in_dim, out_dim, 7, stride=2)
        self.norm = nn.BatchNorm2d(out_dim)
        self.proj = nn.Conv2d(out_dim, out_dim, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x = self.dw(x)
        return x + self.proj(self.norm(x))


def _per_stage(name: str, value: Union[float, Sequence[float]], stages: int) -> list:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * stages
    if len(values) != stages:
        raise ValueError(f"FFNet: `{name}` needs one value per stage ({stages}), got {len(values)}.")
    return values


class FFNet(nn.Module):
    """FFNet (MetaMixer, Yun et al., 2024): an FFN-only convolutional network whose token mixer is FFNified
    attention (1x1 query projection, large-kernel depthwise key and value convolutions, GELU); a timm model.

    Args:
        depths: blocks per stage.
        dims: channels per stage (each a multiple of the previous one).
        in_chans: image channels.
        num_classes: classifier outputs (0 = no head: the pooled features).
        stem_dim: width of the stem's first conv.
        stem_stride: total stem stride, 4 (ImageNet, official), 2 or 1 (small images).
        token_mixer: ``"ffnified"`` (the method), ``"linear"`` (GELU removed), ``"none"`` (channel mixers only).
        key_kernels / value_kernels: the token mixer's depthwise kernels per stage; ``None`` = the official
            ``[3, 3, 7, 7]`` (3 in the first half of the stages, 7 after).
        channel_kernel: the channel mixer's depthwise kernel (3 in FFNet-1, 7 otherwise).
        expansion: the channel FFN's hidden ratio (3), one value or one per stage.
        layer_scale: initial per-channel layer scale, ``None`` for none (FFNet-3/4 use 1e-6).
        use_se: squeeze-excite after the token mixer of even-indexed blocks (off in every official variant).
        drop_path_rate: stochastic depth of the last block (linear from 0); 0 builds no DropPath module.
        drop_rate: dropout before the classifier.
        global_pool: timm pool type (``"avg"``; ``""`` keeps the feature map).
        norm_last: ``"batch"`` (official default) or ``"layer"`` before pooling.

    Example:
        >>> net = FFNet(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64), in_chans=1, num_classes=3, stem_stride=1)
        >>> net(torch.zeros(2, 1, 16, 16)).shape, net.feature_info[-1]["reduction"]
        (torch.Size([2, 3]), 8)
    """

    def __init__(self, depths: Sequence[int] = (2, 2, 8, 2), dims: Sequence[int] = (80, 160, 320, 640),
                 in_chans: int = 3, num_classes: int = 1000, stem_dim: int = 64, stem_stride: Literal[1, 2, 4] = 4,
                 token_mixer: TokenMixerKind = "ffnified", key_kernels: Optional[Sequence[int]] = None,
                 value_kernels: Optional[Sequence[int]] = None, channel_kernel: int = 3,
                 expansion: Union[float, Sequence[float]] = 3.0, layer_scale: Optional[float] = None,
                 use_se: bool = False, drop_path_rate: float = 0.0, drop_rate: float = 0.0,
                 global_pool: str = "avg", norm_last: Literal["batch", "layer"] = "batch") -> None:
        super().__init__()
        depths, dims = list(depths), list(dims)
        if not depths or len(depths) != len(dims):
            raise ValueError(f"FFNet: `depths` and `dims` need one entry per stage each, got {depths} and {dims}.")
        for name, values in (("depths", depths), ("dims", dims)):
            for v in values:
                check_positive_int(name, v)
        check_positive_int("in_chans", in_chans)
        check_positive_int("stem_dim", stem_dim)
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 0:
            raise ValueError(f"FFNet: `num_classes` must be an int >= 0 (0 = no head), got {num_classes!r}.")
        check_choice("stem_stride", stem_stride, (1, 2, 4))
        check_choice("token_mixer", token_mixer, ("ffnified", "linear", "none"))
        check_choice("norm_last", norm_last, ("batch", "layer"))
        check_fraction("drop_path_rate", drop_path_rate, allow_one=False)
        check_fraction("drop_rate", drop_rate, allow_one=False)
        stages = len(dims)
        official = [3 if i < stages // 2 else 7 for i in range(stages)]  # [3, 3, 7, 7] for four stages
        key_kernels = official if key_kernels is None else key_kernels
        value_kernels = official if value_kernels is None else value_kernels
        keys, values = _per_stage("key_kernels", key_kernels, stages), _per_stage("value_kernels", value_kernels,
                                                                                   stages)
        ratios = _per_stage("expansion", expansion, stages)
        for k in [*keys, *values, channel_kernel]:
            if not isinstance(k, int) or k < 1 or k % 2 == 0:
                raise ValueError(f"FFNet: depthwise kernels must be odd positive ints (7 = RepVGG 7x7+3x3), got {k!r}.")
        for r in ratios:
            check_number("expansion", r, low=0.0, low_open=True)
        if layer_scale is not None:
            check_number("layer_scale", layer_scale, low=0.0, low_open=True)

        self.num_classes, self.drop_rate, self.grad_checkpointing = num_classes, drop_rate, False
        self.num_features = self.head_hidden_size = dims[-1]
        s1, s2 = {4: (2, 2), 2: (1, 2), 1: (1, 1)}[stem_stride]
        self.stem = nn.Sequential(ConvBN(in_chans, stem_dim, 3, s1), nn.GELU(), ConvBN(stem_dim, dims[0], 3, s2))
        n_blocks = sum(depths)
        rates = [drop_path_rate * b / max(n_blocks - 1, 1) for b in range(n_blocks)]  # linspace(0, rate, n)
        blocks, self.feature_info, reduction, stage_list = 0, [], stem_stride, []
        for i in range(stages):
            layers = []
            if i > 0:
                layers.append(PatchMerging(dims[i - 1], dims[i]))
                reduction *= 2
            for d in range(depths[i]):
                layers.append(FFBlock(dims[i], token_mixer, keys[i], values[i], channel_kernel, ratios[i],
                                      rates[blocks] if drop_path_rate > 0 else None, layer_scale,
                                      use_se and d % 2 == 0))
                blocks += 1
            stage_list.append(nn.Sequential(*layers))
            self.feature_info.append(dict(num_chs=dims[i], reduction=reduction, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stage_list)
        self.norm = nn.BatchNorm2d(dims[-1]) if norm_last == "batch" else LayerNorm2d(dims[-1])
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """The classifier head (timm API)."""
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A new head for ``num_classes`` outputs (timm API)."""
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: Tensor) -> Tensor:
        """Stem, stages and the last norm: the ``(N, dims[-1], H/32, W/32)`` map (stem stride 4)."""
        return self.norm(self.stages(self.stem(x)))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Pool, dropout and classify (``pre_logits=True`` stops before the linear layer)."""
        x = self.head_drop(self.global_pool(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def _cfg(**kwargs) -> dict:
    return {"url": "", "num_classes": 1000, "input_size": (3, 256, 256), "pool_size": None, "crop_pct": 0.9,
            "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
            "first_conv": "stem.0.c", "classifier": "head", "license": "apache-2.0",
            "paper_ids": "arXiv:2406.02021", **kwargs}


default_cfgs = generate_default_cfgs({
    "ffnet_nano.untrained": _cfg(input_size=(3, 224, 224)),
    "ffnet_1.untrained": _cfg(),
    "ffnet_2.untrained": _cfg(),
    "ffnet_3.untrained": _cfg(crop_pct=0.95),
    "ffnet_4.untrained": _cfg(crop_pct=0.95),
})


def _create(variant: str, pretrained: bool, **kwargs) -> FFNet:
    if pretrained:
        raise ValueError(f"{variant} has no pretrained weights (none are downloaded): use pretrained=False, or load "
                         "your own file with ImageClassifier(pretrained_weights=...).")
    for key, value in VARIANTS[variant].items():
        kwargs.setdefault(key, value)
    return build_model_with_cfg(FFNet, variant, pretrained=False,
                                feature_cfg=dict(out_indices=(0, 1, 2, 3), flatten_sequential=True), **kwargs)


@register_model
def ffnet_nano(pretrained: bool = False, **kwargs) -> FFNet:
    """FFNet-nano (ours, for tests): depths 1, 1, 2, 1; widths 32-256; stem 32; no drop path by default."""
    return _create("ffnet_nano", pretrained, **kwargs)


@register_model
def ffnet_1(pretrained: bool = False, **kwargs) -> FFNet:
    """FFNet-1: depths 2, 2, 8, 2; widths 80-640; channel-mixer kernel 3; drop path 0.1 (13.7 M in the README)."""
    return _create("ffnet_1", pretrained, **kwargs)


@register_model
def ffnet_2(pretrained: bool = False, **kwargs) -> FFNet:
    """FFNet-2: depths 3, 3, 15, 3; widths 88-704; drop path 0.15 (26.9 M in the README)."""
    return _create("ffnet_2", pretrained, **kwargs)


@register_model
def ffnet_3(pretrained: bool = False, **kwargs) -> FFNet:
    """FFNet-3: depths 4, 4, 22, 5; widths 96-768; layer scale 1e-6; drop path 0.35 (48.3 M in the README)."""
    return _create("ffnet_3", pretrained, **kwargs)


@register_model
def ffnet_4(pretrained: bool = False, **kwargs) -> FFNet:
    """FFNet-4: depths 4, 4, 27, 3; widths 128-1024; layer scale 1e-6; drop path 0.4 (79.2 M in the README)."""
    return _create("ffnet_4", pretrained, **kwargs)
