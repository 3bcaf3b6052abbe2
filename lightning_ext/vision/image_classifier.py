"""``ImageClassifier``: a timm backbone chosen by name (or any nn.Module) adapted to small images."""

from __future__ import annotations

from typing import Optional, Union

from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from typing_extensions import override

from lightning_ext.core.validation import PositiveInt, check_positive_int
from lightning_ext.vision.backbones import (  # noqa: F401 - adapt_stem, create_timm_backbone re-exported
    StemDownsample,
    adapt_stem,
    build_backbone,
    create_timm_backbone,
    image_pair,
    load_backbone_weights,
    probe_backbone,
)
from lightning_ext.vision.classifier import Classifier, NumClasses, check_num_classes


class ImageClassifier(Classifier):
    """Image classification with a timm backbone by name (or any ``nn.Module``), for small and large images.

    For names, the backbone is built with ``timm.create_model(name, num_classes, in_chans)`` and no download.
    For images under 64 pixels the ImageNet stem keeps full resolution by default (``stem_downsample=1``:
    first conv stride 1, no max-pool), so 8x8 digits train well; ``stem_downsample=2`` is a cheaper middle
    ground for 28x28 (see :func:`~lightning_ext.vision.backbones.adapt_stem`). On construction a
    dummy batch checks that the backbone accepts ``(in_chans, *image_size)`` and returns ``num_classes``
    logits; a mismatch is a ``ValueError`` that says what to change.

    Args:
        backbone: timm model name (``"resnet18"``) or a module mapping images to ``num_classes`` logits.
        num_classes: number of classes.
        in_chans: image channels.
        image_size: image height and width (int for square).
        stem_downsample: how much the CNN stem shrinks the image (1, 2 or 4 = ImageNet); ``None`` picks 1
            for images under 64 pixels and 4 otherwise.
        pretrained_weights: local file with backbone weights (never downloaded), read with
            ``torch.load(weights_only=True)``; NaN or infinite tensors are refused. See
            :func:`~lightning_ext.vision.backbones.load_backbone_weights`.
        backbone_kwargs: extra ``timm.create_model`` arguments (``{"img_size": 28}`` for ViTs,
            ``{"drop_rate": 0.1}``).
        **kwargs: optimisation arguments of :class:`Classifier` (``lr``, ``weight_decay``, ``optimizer``,
            ``scheduler``, ``scheduler_interval``).

    Example:
        >>> import torch
        >>> model = ImageClassifier("resnet18", num_classes=10, in_chans=1, image_size=8)
        >>> model(torch.zeros(4, 1, 8, 8)).shape
        torch.Size([4, 10])
    """

    def __init__(
        self,
        backbone: Union[str, nn.Module] = "resnet18",
        num_classes: NumClasses = 10,
        in_chans: PositiveInt = 1,
        image_size: Union[PositiveInt, tuple[PositiveInt, PositiveInt]] = 28,
        stem_downsample: Optional[StemDownsample] = None,
        pretrained_weights: Optional[str] = None,
        backbone_kwargs: Optional[dict] = None,
        **kwargs,
    ) -> None:
        check_positive_int("in_chans", in_chans)
        check_num_classes(num_classes)
        height, width = image_pair(image_size)
        net, stem_downsample = build_backbone(backbone, num_classes, in_chans, (height, width), stem_downsample,
                                              backbone_kwargs, "ImageClassifier")
        super().__init__(net, num_classes, input_shape=(in_chans, height, width), **kwargs)
        ignore = ["optimizer", "scheduler"] + (["backbone"] if isinstance(backbone, nn.Module) else [])
        self.save_hyperparameters(ignore=ignore)
        if pretrained_weights:
            report = load_backbone_weights(net, pretrained_weights, in_chans)
            rank_zero_info(
                f"ImageClassifier: loaded {pretrained_weights}; not in file: {len(report['missing'])} tensors; "
                f"skipped for shape: {report['skipped'] or 'none'}."
            )
        name = backbone if isinstance(backbone, str) else type(backbone).__name__
        out = probe_backbone(self.net, self.input_shape, name)
        if tuple(out.shape) != (2, self.num_classes):
            raise ValueError(
                f"Backbone {name} returns outputs of shape {tuple(out.shape[1:])} per image, expected "
                f"({self.num_classes},) logits; give it a classifier head with num_classes outputs."
            )

    def _shape_hint(self, data_shape: tuple[int, ...]) -> str:
        if len(data_shape) != 3:
            return "ImageClassifier needs image data shaped (channels, height, width)."
        return f"Set `in_chans: {data_shape[0]}` and `image_size: [{data_shape[1]}, {data_shape[2]}]`."
