"""Backbones for image models: timm models by name (no download) adapted to small images, any ``nn.Module``,
a dummy-batch check, and local pretrained weights read through :mod:`lightning_ext.core.checkpoints`.

The pure core behind :class:`~lightning_ext.vision.image_classifier.ImageClassifier` and the self-supervised
modules (:mod:`lightning_ext.ssl`): both build, adapt and check their backbone here.
"""

from __future__ import annotations

import difflib
import os
from typing import Literal, Optional, Union

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lightning_ext.core.checkpoints import load_checkpoint, match_prefixes, state_dict_from
from lightning_ext.core.optional import require
from lightning_ext.core.validation import check_choice, check_finite_tensors, check_positive_int

__all__ = ["StemDownsample", "adapt_stem", "build_backbone", "create_timm_backbone", "image_pair",
           "load_backbone_weights", "probe_backbone"]

#: How much a CNN stem shrinks the image: 1, 2 or 4 (the ImageNet stem).
StemDownsample = Literal[1, 2, 4]


def image_pair(size: Union[int, tuple[int, int], list[int]], name: str = "image_size") -> tuple[int, int]:
    """``(height, width)`` from an int or a pair, each a positive integer.

    Example:
        >>> image_pair(28), image_pair([8, 12])
        ((28, 28), (8, 12))
    """
    if isinstance(size, int) and not isinstance(size, bool):
        pair = (size, size)
    elif isinstance(size, (tuple, list)):
        pair = tuple(size)
    else:
        pair = ()
    if len(pair) != 2:
        raise ValueError(f"`{name}` must be an int or (height, width), got {size!r}.")
    for value in pair:
        check_positive_int(name, value)
    return int(pair[0]), int(pair[1])


def create_timm_backbone(name: str, num_classes: int, in_chans: int, **kwargs) -> nn.Module:
    """``timm.create_model`` without downloading; unknown names get close suggestions."""
    timm = require("timm", "a backbone given by name")
    import lightning_ext.vision.ffnet  # noqa: F401 - registers the library's own timm models (ffnet_*)
    if name not in timm.list_models():
        close = difflib.get_close_matches(name, timm.list_models(), n=5)
        raise ValueError(
            f"Unknown timm backbone {name!r}."
            + (f" Close names: {', '.join(close)}." if close else " See `timm.list_models()` for names.")
        )
    return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)


def adapt_stem(model: nn.Module, downsample: int) -> list[str]:
    """Reduce how much a timm CNN's stem downsamples: 4 (ImageNet default), 2 or 1.

    ImageNet stems (a stride-2 conv, then a stride-2 max-pool) shrink the image 4x before the first stage;
    on 8x8 or 28x28 inputs that throws most of the image away. ``downsample=2`` sets the first conv's stride
    to 1 and keeps the max-pool; ``1`` also removes the max-pool. Patchify stems (kernel == stride: ViTs,
    ConvNeXt) are never changed. Returns what was changed (empty when nothing applied).
    """
    check_choice("stem_downsample", downsample, (1, 2, 4))
    if downsample == 4:
        return []
    changed = []
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    first = cfg.get("first_conv")
    if isinstance(first, (list, tuple)):
        first = first[0]
    conv = None
    if first:
        try:
            conv = model.get_submodule(first)
        except AttributeError:
            conv = None
    has_pool = isinstance(getattr(model, "maxpool", None), nn.MaxPool2d)
    overlapping = isinstance(conv, nn.Conv2d) and conv.stride != (1, 1) and conv.kernel_size[0] > conv.stride[0]
    if overlapping and (has_pool or downsample == 1):
        conv.stride = (1, 1)
        changed.append(f"{first}.stride=1")
    if has_pool and downsample == 1:
        model.maxpool = nn.Identity()
        changed.append("maxpool removed")
    return changed


def build_backbone(backbone: Union[str, nn.Module], num_classes: int, in_chans: int, image_size: tuple[int, int],
                   stem_downsample: Optional[int] = None, backbone_kwargs: Optional[dict] = None,
                   owner: str = "The model") -> tuple[nn.Module, Optional[int]]:
    """A timm model by name (its stem adapted to the image size) or the given module; returns
    ``(net, stem_downsample)`` with ``None`` resolved to 1 under 64 pixels and 4 otherwise (names only).

    Example:
        >>> net, stem = build_backbone("resnet18", 10, 1, (8, 8))
        >>> stem, net.conv1.stride
        (1, (1, 1))
    """
    if isinstance(backbone, str):
        net = create_timm_backbone(backbone, num_classes, in_chans, **(backbone_kwargs or {}))
        if stem_downsample is None:
            stem_downsample = 1 if min(image_size) < 64 else 4
        changed = adapt_stem(net, stem_downsample)
        if changed:
            rank_zero_info(f"{owner}: adapted the stem of {backbone} ({', '.join(changed)}).")
        return net, stem_downsample
    if isinstance(backbone, nn.Module):
        if backbone_kwargs or stem_downsample is not None:
            raise ValueError("`backbone_kwargs` and `stem_downsample` only apply to timm backbones given by name.")
        return backbone, stem_downsample
    raise TypeError(f"`backbone` must be a timm model name or an nn.Module, got {type(backbone).__name__}.")


def probe_backbone(net: nn.Module, input_shape: tuple[int, ...], name: str) -> Tensor:
    """The output of ``net`` on a zero batch of two ``input_shape`` images (eval mode, no gradient); a backbone
    that cannot take that shape raises a ``ValueError`` saying what to change."""
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            return net(torch.zeros(2, *input_shape))
    except Exception as err:  # noqa: BLE001 - re-raised with advice
        raise ValueError(
            f"Backbone {name} cannot process images of shape {tuple(input_shape)} (channels, height, width): {err}. "
            "Set `image_size`/`in_chans` to your data's, use a backbone that accepts this size, or for "
            "fixed-size models such as ViTs pass `backbone_kwargs: {img_size: <size>}`."
        ) from err
    finally:
        net.train(was_training)


def load_backbone_weights(model: nn.Module, path: Union[str, os.PathLike], in_chans: int) -> dict[str, list[str]]:
    """Load local weights (a state dict, or a Lightning checkpoint) into ``model``.

    Read with :func:`~lightning_ext.core.checkpoints.load_checkpoint` (``torch.load(weights_only=True)``);
    one wrapper prefix (``net.``, ``model.``, ``backbone.``, ...) is added or stripped when that matches the
    model's names better (:func:`~lightning_ext.core.checkpoints.match_prefixes`). RGB first-conv weights are
    summed to match grayscale (``in_chans=1``) as timm does; tensors whose shape still differs (a classifier
    head for another class count) are skipped and reported. A tensor to load that holds NaN or infinity is
    refused (:func:`~lightning_ext.core.validation.check_finite_tensors`).
    """
    where = f"Pretrained weights file {path}"
    own = model.state_dict()
    state = match_prefixes(state_dict_from(load_checkpoint(path, "Pretrained weights file", "pretrained_weights"),
                                           where), own.keys())
    fixed, skipped = {}, []
    for key, value in state.items():
        if key not in own:
            continue
        if value.shape != own[key].shape and value.dim() == 4 and value.shape[1] == 3 and in_chans == 1:
            value = value.sum(dim=1, keepdim=True)
        if value.shape != own[key].shape:
            skipped.append(f"{key} {tuple(value.shape)}->{tuple(own[key].shape)}")
            continue
        fixed[key] = value
    if not fixed:
        raise ValueError(
            f"No tensor in {path} matches the backbone's parameter names; is it a checkpoint of this architecture?"
        )
    check_finite_tensors(fixed, where)
    result = model.load_state_dict(fixed, strict=False)
    return {"missing": list(result.missing_keys), "skipped": skipped}
