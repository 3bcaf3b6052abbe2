"""``ImageClassifier``: a timm backbone chosen by name (or any nn.Module) adapted to small images."""

from __future__ import annotations

import difflib
from typing import Optional, Union

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lightning_ext.core.optional import require
from lightning_ext.core.checkpoints import load_checkpoint, state_dict_from
from lightning_ext.vision.classifier import Classifier


def _pair(size: Union[int, tuple[int, int], list[int]]) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    size = tuple(size)
    if len(size) != 2:
        raise ValueError(f"`image_size` must be an int or (height, width), got {size}.")
    return size  # type: ignore[return-value]


def create_timm_backbone(name: str, num_classes: int, in_chans: int, **kwargs) -> nn.Module:
    """``timm.create_model`` without downloading; unknown names get close suggestions."""
    timm = require("timm", "ImageClassifier with a backbone name")
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
    if downsample not in (1, 2, 4):
        raise ValueError(f"`stem_downsample` must be 1, 2 or 4, got {downsample}.")
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


def load_backbone_weights(model: nn.Module, path: str, in_chans: int) -> dict[str, list[str]]:
    """Load local weights (a state dict, or a Lightning checkpoint) into ``model``.

    Loaded with ``torch.load(weights_only=True)``. RGB first-conv weights are summed to match grayscale
    (``in_chans=1``) as timm does; tensors whose shape still differs (a classifier head for another class
    count) are skipped and reported. Keys prefixed ``net.``/``model.``/``backbone.`` are matched too.
    """
    state = state_dict_from(load_checkpoint(path, "Pretrained weights file", "pretrained_weights"),
                            f"Pretrained weights file {path}")
    own = model.state_dict()
    fixed, skipped = {}, []
    for key, value in state.items():
        target = key
        for prefix in ("net.", "model.", "backbone.", "module."):
            if target not in own and target.startswith(prefix):
                target = target[len(prefix) :]
        if target not in own:
            continue
        if value.shape != own[target].shape and value.dim() == 4 and value.shape[1] == 3 and in_chans == 1:
            value = value.sum(dim=1, keepdim=True)
        if value.shape != own[target].shape:
            skipped.append(f"{target} {tuple(value.shape)}->{tuple(own[target].shape)}")
            continue
        fixed[target] = value
    if not fixed:
        raise ValueError(
            f"No tensor in {path} matches the backbone's parameter names; is it a checkpoint of this architecture?"
        )
    result = model.load_state_dict(fixed, strict=False)
    return {"missing": list(result.missing_keys), "skipped": skipped}


class ImageClassifier(Classifier):
    """Image classification with a timm backbone by name (or any ``nn.Module``), for small and large images.

    For names, the backbone is built with ``timm.create_model(name, num_classes, in_chans)`` and no download.
    For images under 64 pixels the ImageNet stem keeps full resolution by default (``stem_downsample=1``:
    first conv stride 1, no max-pool), so 8x8 digits train well; ``stem_downsample=2`` is a cheaper middle
    ground for 28x28 (see :func:`adapt_stem`). On construction a
    dummy batch checks that the backbone accepts ``(in_chans, *image_size)`` and returns ``num_classes``
    logits; a mismatch is a ``ValueError`` that says what to change.

    Args:
        backbone: timm model name (``"resnet18"``) or a module mapping images to ``num_classes`` logits.
        num_classes: number of classes.
        in_chans: image channels.
        image_size: image height and width (int for square).
        stem_downsample: how much the CNN stem shrinks the image (1, 2 or 4 = ImageNet); ``None`` picks 1
            for images under 64 pixels and 4 otherwise.
        pretrained_weights: local file with backbone weights (never downloaded); see
            :func:`load_backbone_weights`.
        backbone_kwargs: extra ``timm.create_model`` arguments (``{"img_size": 28}`` for ViTs,
            ``{"drop_rate": 0.1}``).
        **kwargs: optimisation arguments of :class:`Classifier` (``lr``, ``weight_decay``, ``optimizer``,
            ``scheduler``, ``scheduler_interval``).

    Example:
        >>> model = ImageClassifier("resnet18", num_classes=10, in_chans=1, image_size=8)
        >>> model(torch.zeros(4, 1, 8, 8)).shape
        torch.Size([4, 10])
    """

    def __init__(
        self,
        backbone: Union[str, nn.Module] = "resnet18",
        num_classes: int = 10,
        in_chans: int = 1,
        image_size: Union[int, tuple[int, int]] = 28,
        stem_downsample: Optional[int] = None,
        pretrained_weights: Optional[str] = None,
        backbone_kwargs: Optional[dict] = None,
        **kwargs,
    ) -> None:
        if in_chans < 1:
            raise ValueError(f"`in_chans` must be >= 1, got {in_chans}.")
        height, width = _pair(image_size)
        if height < 1 or width < 1:
            raise ValueError(f"`image_size` must be positive, got {image_size}.")
        if isinstance(backbone, str):
            net = create_timm_backbone(backbone, num_classes, in_chans, **(backbone_kwargs or {}))
            if stem_downsample is None:
                stem_downsample = 1 if min(height, width) < 64 else 4
            changed = adapt_stem(net, stem_downsample)
            if changed:
                rank_zero_info(f"ImageClassifier: adapted the stem of {backbone} ({', '.join(changed)}).")
        elif isinstance(backbone, nn.Module):
            if backbone_kwargs or stem_downsample is not None:
                raise ValueError("`backbone_kwargs` and `stem_downsample` only apply to timm backbones given by name.")
            net = backbone
        else:
            raise TypeError(f"`backbone` must be a timm model name or an nn.Module, got {type(backbone).__name__}.")
        super().__init__(net, num_classes, input_shape=(in_chans, height, width), **kwargs)
        ignore = ["optimizer", "scheduler"] + (["backbone"] if isinstance(backbone, nn.Module) else [])
        self.save_hyperparameters(ignore=ignore)
        if pretrained_weights:
            report = load_backbone_weights(net, pretrained_weights, in_chans)
            rank_zero_info(
                f"ImageClassifier: loaded {pretrained_weights}; not in file: {len(report['missing'])} tensors; "
                f"skipped for shape: {report['skipped'] or 'none'}."
            )
        self._check_backbone(backbone if isinstance(backbone, str) else type(backbone).__name__)

    def _check_backbone(self, name: str) -> None:
        shape = self.input_shape
        was_training = self.net.training
        self.net.eval()
        try:
            with torch.no_grad():
                out = self.net(torch.zeros(2, *shape))
        except Exception as err:  # noqa: BLE001 - re-raised with advice
            raise ValueError(
                f"Backbone {name} cannot process images of shape {shape} (channels, height, width): {err}. "
                "Set `image_size`/`in_chans` to your data's, use a backbone that accepts this size, or for "
                "fixed-size models such as ViTs pass `backbone_kwargs: {img_size: <size>}`."
            ) from err
        finally:
            self.net.train(was_training)
        if tuple(out.shape) != (2, self.num_classes):
            raise ValueError(
                f"Backbone {name} returns outputs of shape {tuple(out.shape[1:])} per image, expected "
                f"({self.num_classes},) logits; give it a classifier head with num_classes outputs."
            )

    def _shape_hint(self, data_shape: tuple[int, ...]) -> str:
        if len(data_shape) != 3:
            return "ImageClassifier needs image data shaped (channels, height, width)."
        return f"Set `in_chans: {data_shape[0]}` and `image_size: [{data_shape[1]}, {data_shape[2]}]`."
