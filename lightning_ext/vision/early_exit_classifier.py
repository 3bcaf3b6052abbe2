"""``EarlyExitClassifier``: a multi-exit (dynamic) image classifier on a timm or plain CNN backbone."""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import Tensor, nn
from typing_extensions import override

from lightning_ext.core.guards import buffer_snapshot, check_loss, restore_buffers
from lightning_ext.core.validation import (
    ClosedUnitInterval,
    NonNegativeFloat,
    PositiveInt,
    check_number,
    check_positive_int,
)
from lightning_ext.vision.backbones import StemDownsample, image_pair
from lightning_ext.vision.classifier import Classifier, NumClasses, check_num_classes
from lightning_ext.vision.early_exit import EarlyExitNetwork, ExitPolicy, build_stages, joint_exit_loss


class EarlyExitClassifier(Classifier):
    """An early-exit classifier: internal classifiers on a backbone's stages, trained jointly, leaving at the first confident exit.

    The dynamic network (DyNN) of "Dynamic Neural Network is All You Need" (Haque and Yang, 2023) in the
    Shallow-Deep-Network form: a timm backbone built with ``features_only`` (stem adapted to small images as in
    :class:`ImageClassifier`) or an ``nn.Sequential`` of stages; an exit (pool + linear) after each stage in
    ``exits``; loss ``Σ_k w_k CE(z_k, y)``. ``forward`` returns the logits of the exit each sample takes under the
    policy, so the model is a plain classifier to metrics and attacks. Logs ``{stage}_acc`` (dynamic),
    ``{stage}_acc_exit{k}`` (each exit alone), ``{stage}_exit_mean`` (0-based exit taken) and
    ``{stage}_flops_fraction`` (FLOPs of the prefix used / whole network, measured once with
    ``torch.utils.flop_counter``). :meth:`static_twin` builds the matching static network (the same backbone, only
    the final classifier), freshly initialised.

    Args:
        backbone: timm model name or an ``nn.Sequential`` of stages (a timm ``features_only`` model also works).
        num_classes: number of classes.
        in_chans: image channels.
        image_size: image height and width.
        out_indices: the timm feature stages to build (timm names only; ``None``: ``(1, 2, 3, 4)``, the
            four residual stages of a ResNet); each is a stage.
        exits: 0-based stages with an exit (the last always has one); ``None``: every stage.
        exit_weights: ``w_k`` per exit (``None``: all 1).
        threshold: τ of the policy (confidence ≥ τ, or normalised entropy ≤ 1 − τ).
        policy: ``"confidence"`` or ``"entropy"``.
        exit_pool_size: internal exits average-pool their stage's map to this side (1: global pool, the default);
            2 keeps a coarse layout, which exits on small early maps need (the final exit always pools globally).
        stem_downsample: stem downsampling of timm CNNs (``None``: 1 under 64 pixels, else 4).
        backbone_kwargs: extra ``timm.create_model`` arguments.
        **kwargs: optimisation arguments of :class:`Classifier`.

    Example:
        >>> model = EarlyExitClassifier("resnet10t", num_classes=10, in_chans=1, image_size=8)
        >>> [z.shape for z in model.forward_exits(torch.zeros(2, 1, 8, 8))][-1], model.num_exits
        (torch.Size([2, 10]), 4)
    """

    def __init__(
        self,
        backbone: Union[str, nn.Module] = "resnet10t",
        num_classes: NumClasses = 10,
        in_chans: PositiveInt = 1,
        image_size: Union[PositiveInt, tuple[PositiveInt, PositiveInt]] = 28,
        out_indices: Optional[list[int]] = None,
        exits: Optional[list[int]] = None,
        exit_weights: Optional[list[NonNegativeFloat]] = None,
        threshold: ClosedUnitInterval = 0.9,
        policy: ExitPolicy = "confidence",
        exit_pool_size: PositiveInt = 1,
        stem_downsample: Optional[StemDownsample] = None,
        backbone_kwargs: Optional[dict] = None,
        **kwargs,
    ) -> None:
        check_num_classes(num_classes)
        check_positive_int("in_chans", in_chans)
        height, width = image_pair(image_size)
        stages, channels = build_stages(backbone, in_chans, (height, width), stem_downsample, out_indices,
                                        backbone_kwargs)
        check_positive_int("exit_pool_size", exit_pool_size)
        net = EarlyExitNetwork(stages, channels, num_classes, exits, threshold, policy, exit_pool_size)
        if exit_weights is not None:
            if len(exit_weights) != net.num_exits:
                raise ValueError(f"`exit_weights` has {len(exit_weights)} entries for {net.num_exits} exits (stages "
                                 f"{net.exit_stages}); give one weight per exit")
            for w in exit_weights:
                check_number("exit_weights", w, low=0)
        super().__init__(net, num_classes, input_shape=(in_chans, height, width), **kwargs)
        ignore = ["optimizer", "scheduler"] + (["backbone"] if isinstance(backbone, nn.Module) else [])
        self.save_hyperparameters(ignore=ignore)
        self.exit_weights = list(exit_weights) if exit_weights is not None else None
        self._twin_args = dict(backbone=backbone, num_classes=num_classes, in_chans=in_chans,
                               image_size=(height, width), out_indices=out_indices, stem_downsample=stem_downsample,
                               backbone_kwargs=backbone_kwargs, **kwargs)
        net.measure_flops(self.input_shape)
        for k in range(net.num_exits):
            setattr(self, f"_exit_acc_val_{k}", type(self.val_acc)(num_classes, average="micro"))
            setattr(self, f"_exit_acc_test_{k}", type(self.val_acc)(num_classes, average="micro"))

    @property
    def num_exits(self) -> int:
        return self.net.num_exits

    def forward_exits(self, x: Tensor, upto: Optional[int] = None) -> list[Tensor]:
        """Logits of every exit (or of exits ``0..upto``)."""
        return self.net.forward_exits(x, upto)

    def exit_and_logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The exit each sample takes and its logits."""
        return self.net.exit_and_logits(x)

    @property
    def flops_fraction(self) -> list[float]:
        """FLOPs up to each exit as a fraction of the whole network's."""
        return self.net.flops_fraction

    def static_twin(self, share_weights: bool = False) -> "EarlyExitClassifier":
        """The static network (SDNN): the same backbone with only the final classifier, freshly initialised, or with
        copies of this network's backbone and final-exit weights (``share_weights``: the dynamic mechanism removed).
        It shares no parameter tensors with this module either way."""
        import copy

        args = copy.deepcopy(self._twin_args)
        if isinstance(args["backbone"], nn.Module):
            for m in args["backbone"].modules():
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()
        twin = EarlyExitClassifier(exits=[len(self.net.stages) - 1], threshold=self.net.threshold,
                                   policy=self.net.policy, **args)
        if share_weights:
            twin.net.stages.load_state_dict(self.net.stages.state_dict())
            twin.net.heads[0].load_state_dict(self.net.heads[-1].state_dict())
        return twin

    @override
    def _shared_step(self, batch: Any, stage: str) -> Optional[Tensor]:
        x, y = batch[0], batch[1]
        buffers = buffer_snapshot(self) if stage == "train" and self.nonfinite_loss == "skip" else None
        logits = self.net.forward_exits(x)
        loss = joint_exit_loss(logits, y, self.exit_weights)
        if stage == "train" and not check_loss(self, loss, self.nonfinite_loss, batch):
            restore_buffers(self, buffers)
            return None
        if stage == "train":
            self.log("train_loss", loss, prog_bar=True)
            self.log("train_loss_epoch", loss, on_step=False, on_epoch=True, sync_dist=True)
            return loss
        with torch.no_grad():
            chosen = self._decisions(logits)
            taken = torch.stack(logits, 1)[torch.arange(len(x), device=x.device), chosen]
        self.log(f"{stage}_loss", loss, prog_bar=stage == "val", sync_dist=True)
        acc = getattr(self, f"{stage}_acc")
        acc(taken, y)
        self.log(f"{stage}_acc", acc, prog_bar=True)
        f1 = getattr(self, f"{stage}_f1")
        f1(taken, y)
        self.log(f"{stage}_f1", f1)
        for k, z in enumerate(logits):
            metric = getattr(self, f"_exit_acc_{stage}_{k}")
            metric(z, y)
            self.log(f"{stage}_acc_exit{k}", metric)
        self.log(f"{stage}_exit_mean", chosen.float().mean(), sync_dist=True)
        flops = torch.tensor(self.net.flops_fraction, device=x.device)[chosen]
        self.log(f"{stage}_flops_fraction", flops.mean(), sync_dist=True)
        return loss

    def _decisions(self, logits: list[Tensor]) -> Tensor:
        from lightning_ext.vision.early_exit import exit_decisions

        return exit_decisions(logits, self.net.threshold, self.net.policy)
