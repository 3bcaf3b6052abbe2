"""``FlowTransformerModule``: FlowTransformer's swappable encoding, transformer and head as a LightningModule."""

from __future__ import annotations

from typing import Literal, Optional

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from typing_extensions import override

from lightning_ext.core.guards import NonFiniteLoss, check_nonfinite_policy
from lightning_ext.core.optimization import check_num_classes, check_optimization
from lightning_ext.core.validation import (
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    UnitIntervalRightOpen,
    check_choice,
    check_fraction,
    check_positive_int,
)
from lightning_ext.traffic.classification import TrafficClassifierBase
from lightning_ext.traffic.flow_transformer import ENCODINGS, HEADS, FlowTransformer

__all__ = ["FlowTransformerModule"]


class FlowTransformerModule(TrafficClassifierBase):
    r"""Flow-based intrusion detection with FlowTransformer: encoding, transformer and head chosen in YAML.

    Paper: "FlowTransformer: A Transformer Framework for Flow-based Network Intrusion Detection Systems" (Manocchio
    et al., arXiv 2304.14746); reference code https://github.com/liamdm/FlowTransformer. The network is
    :class:`~lightning_ext.traffic.flow_transformer.FlowTransformer`; batches are ``(numeric (B, W, F),
    categorical (B, W, C), label)`` windows of consecutive flows from
    :class:`~lightning_ext.traffic.flow_windows.FlowWindowDataModule`, labelled by their last flow. Loss:
    cross-entropy (the official binary cross-entropy for two classes); logs accuracy, balanced accuracy and macro
    F1 (training batches are balanced, evaluation is not: read balanced accuracy or F1).

    Args:
        num_classes: classes (2 for benign/attack; checked against the datamodule).
        num_numeric, categorical_cardinalities, window: the datamodule's record layout (15 numeric fields; 5
            categorical of 33 codes each with 32 levels; window 8), checked in ``setup``.
        encoding: ``"record_embed"`` or ``"categorical_embed"``.
        encoder: ``"encoder"`` (bidirectional) or ``"decoder"`` (causal).
        head: ``"last_token"``, ``"cls"``, ``"gap"`` (global average pooling) or ``"flatten"``.
        d_model, layers, heads, ff_dim, categorical_dim, mlp_dim, dropout: sizes (the official BasicTransformer:
            2 layers, 128 internal, 2 heads; MLP [128], dropout 0.1).
        lr, weight_decay, optimizer, scheduler, scheduler_interval, nonfinite_loss: training.

    Example:
        >>> model = FlowTransformerModule(num_numeric=3, categorical_cardinalities=[4], window=4, d_model=16)
        >>> model(torch.rand(2, 4, 3), torch.zeros(2, 4, 1, dtype=torch.long)).shape
        torch.Size([2, 2])
    """

    def __init__(
        self,
        num_classes: PositiveInt = 2,
        num_numeric: PositiveInt = 15,
        categorical_cardinalities: Optional[list[int]] = None,
        window: PositiveInt = 8,
        encoding: Literal["record_embed", "categorical_embed"] = "record_embed",
        encoder: Literal["encoder", "decoder"] = "encoder",
        head: Literal["last_token", "cls", "gap", "flatten"] = "last_token",
        d_model: PositiveInt = 64,
        layers: PositiveInt = 2,
        heads: PositiveInt = 2,
        ff_dim: PositiveInt = 128,
        categorical_dim: PositiveInt = 16,
        mlp_dim: PositiveInt = 128,
        dropout: UnitIntervalRightOpen = 0.1,
        lr: PositiveFloat = 1e-3,
        weight_decay: NonNegativeFloat = 0.0,
        optimizer: Optional[OptimizerCallable] = None,
        scheduler: Optional[LRSchedulerCallable] = None,
        scheduler_interval: Literal["epoch", "step"] = "epoch",
        nonfinite_loss: NonFiniteLoss = "error",
    ) -> None:
        super().__init__()
        check_num_classes(num_classes)
        cards = [33] * 5 if categorical_cardinalities is None else list(categorical_cardinalities)
        for name, value in (("num_numeric", num_numeric), ("window", window), ("d_model", d_model),
                            ("layers", layers), ("heads", heads), ("ff_dim", ff_dim),
                            ("categorical_dim", categorical_dim), ("mlp_dim", mlp_dim), *[
                                (f"categorical_cardinalities[{i}]", c) for i, c in enumerate(cards)]):
            check_positive_int(name, value)
        if d_model % heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by heads ({heads}).")
        check_choice("encoding", encoding, ENCODINGS)
        check_choice("encoder", encoder, ("encoder", "decoder"))
        check_choice("head", head, HEADS)
        check_fraction("dropout", dropout, allow_one=False)
        check_optimization(lr, weight_decay)
        check_nonfinite_policy(nonfinite_loss)
        check_choice("scheduler_interval", scheduler_interval, ("epoch", "step"))
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.num_classes, self.num_numeric, self.cards, self.window = num_classes, num_numeric, cards, window
        self.lr, self.weight_decay, self.nonfinite_loss = lr, weight_decay, nonfinite_loss
        self.optimizer_factory, self.scheduler_factory, self.scheduler_interval = optimizer, scheduler, scheduler_interval
        self.net = FlowTransformer(num_numeric, cards, num_classes, window, encoding, encoder, head, d_model, layers,
                                   heads, ff_dim, categorical_dim, mlp_dim, dropout)
        self._init_metrics()

    @override
    def forward(self, numeric: torch.Tensor, categorical: torch.Tensor) -> torch.Tensor:
        """Class logits ``(B, num_classes)``."""
        return self.net(numeric, categorical)

    @override
    def logits(self, *inputs: torch.Tensor) -> torch.Tensor:
        """Class logits of ``(numeric, categorical)``."""
        return self.net(inputs[0], inputs[1])

    @override
    def setup(self, stage: str) -> None:
        """Also refuse a datamodule with another record layout or window."""
        super().setup(stage)
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is None or not hasattr(dm, "categorical_cardinalities"):
            return
        theirs = dict(num_numeric=dm.num_numeric, categorical_cardinalities=list(dm.categorical_cardinalities),
                      window=dm.window)
        ours = dict(num_numeric=self.num_numeric, categorical_cardinalities=self.cards, window=self.window)
        for key, value in theirs.items():
            if value != ours[key]:
                raise ValueError(f"the datamodule has {key}={value} but FlowTransformerModule has {ours[key]}; set "
                                 f"`model.init_args.{key}: {value}`.")
