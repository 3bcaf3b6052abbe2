"""``NetMambaModule``: NetMamba's masked-autoencoder pretraining and flow classification as a LightningModule."""

from __future__ import annotations

from typing import Any, Literal, Optional

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from typing_extensions import override

from lightning_ext.core.checkpoints import read_state_dict
from lightning_ext.core.guards import NonFiniteLoss, check_nonfinite_policy
from lightning_ext.core.optimization import check_num_classes, check_optimization
from lightning_ext.core.validation import (
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    UnitIntervalRightOpen,
    check_choice,
    check_fraction,
    check_number,
    check_positive_int,
)
from lightning_ext.traffic.classification import TrafficClassifierBase
from lightning_ext.traffic.net_mamba import NetMamba

__all__ = ["NetMambaModule"]


class NetMambaModule(TrafficClassifierBase):
    r"""NetMamba: masked-autoencoder pretraining and classification of flows' bytes with unidirectional Mamba blocks.

    Paper: "NetMamba: Efficient Network Traffic Classification via Pre-training Unidirectional Mamba" (Wang et al.,
    ICNP 2024, arXiv 2405.11449); reference code https://github.com/wangtz19/NetMamba. The network is
    :class:`~lightning_ext.traffic.net_mamba.NetMamba` (stride embedding, Mamba blocks with a PyTorch selective scan
    on CPU and mamba-ssm's kernel on CUDA when installed, CLS appended last). Batches are
    ``(bytes (B, byte_length) in [-1, 1], label)`` from
    :class:`~lightning_ext.traffic.pcap_bursts.PcapBurstDataModule` with ``representation="netmamba_bytes"``.

    - ``task="mae"``: loss :math:`\sum_i m_i \lVert \hat x_i - x_i\rVert^2 / (s \sum_i m_i)` over the masked
      ``mask_ratio`` of the tokens (labels unused). Masks are drawn from a generator seeded by ``seed`` and the
      global step, so a resumed run draws the same masks. Logs ``train_loss``, ``val_loss``.
    - ``task="classify"``: cross-entropy (``label_smoothing``, 0.1 in NetMamba) on the last position; logs accuracy,
      balanced accuracy and macro F1. ``pretrained_path`` loads an MAE run's weights (``weights_only=True``,
      checked for NaN/inf; the head and decoder are not loaded); ``freeze_encoder`` trains the head only.

    Args:
        task: ``"mae"`` or ``"classify"``.
        num_classes: classes (checked against the datamodule).
        byte_length, stride, dim, depth, d_state, expand, decoder_dim, decoder_depth, drop_path: the network
            (NetMamba: 1600, 4, 256, 4, 16, 2, 128, 2, 0.1).
        mask_ratio: share of tokens masked in pretraining (0.9).
        backend: ``"auto"``, ``"torch"`` or ``"mamba_ssm"`` (the scan; see MambaBlock).
        pretrained_path, freeze_encoder: start from pretrained weights; train only the head.
        label_smoothing, lr, weight_decay, optimizer, scheduler, scheduler_interval, nonfinite_loss, seed: training.

    Example:
        >>> model = NetMambaModule(num_classes=3, byte_length=64, dim=16, depth=1, decoder_dim=8, decoder_depth=1)
        >>> model(torch.randn(2, 64)).shape
        torch.Size([2, 3])
    """

    def __init__(
        self,
        task: Literal["mae", "classify"] = "classify",
        num_classes: PositiveInt = 2,
        byte_length: PositiveInt = 1600,
        stride: PositiveInt = 4,
        dim: PositiveInt = 256,
        depth: PositiveInt = 4,
        d_state: PositiveInt = 16,
        expand: PositiveInt = 2,
        decoder_dim: PositiveInt = 128,
        decoder_depth: PositiveInt = 2,
        drop_path: UnitIntervalRightOpen = 0.1,
        mask_ratio: UnitIntervalRightOpen = 0.9,
        backend: Literal["auto", "torch", "mamba_ssm"] = "auto",
        pretrained_path: Optional[str] = None,
        freeze_encoder: bool = False,
        label_smoothing: UnitIntervalRightOpen = 0.1,
        lr: PositiveFloat = 1e-3,
        weight_decay: NonNegativeFloat = 0.05,
        optimizer: Optional[OptimizerCallable] = None,
        scheduler: Optional[LRSchedulerCallable] = None,
        scheduler_interval: Literal["epoch", "step"] = "epoch",
        nonfinite_loss: NonFiniteLoss = "error",
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_choice("task", task, ("mae", "classify"))
        check_num_classes(num_classes)
        for name, value in (("byte_length", byte_length), ("stride", stride), ("dim", dim), ("depth", depth),
                            ("d_state", d_state), ("expand", expand), ("decoder_dim", decoder_dim),
                            ("decoder_depth", decoder_depth)):
            check_positive_int(name, value)
        if byte_length % stride:
            raise ValueError(f"byte_length ({byte_length}) must be a multiple of stride ({stride}); the datamodule's "
                             "packets * (header_bytes + payload_bytes) gives byte_length.")
        check_fraction("drop_path", drop_path, allow_one=False)
        check_fraction("mask_ratio", mask_ratio, allow_one=False)
        check_fraction("label_smoothing", label_smoothing, allow_one=False)
        check_choice("backend", backend, ("auto", "torch", "mamba_ssm"))
        check_optimization(lr, weight_decay)
        check_nonfinite_policy(nonfinite_loss)
        check_choice("scheduler_interval", scheduler_interval, ("epoch", "step"))
        check_number("seed", seed, low=0, integer=True)
        if pretrained_path == "":
            raise ValueError("pretrained_path must name a checkpoint; use None (null in YAML) to start from scratch.")
        if freeze_encoder and pretrained_path is None:
            raise ValueError("freeze_encoder=True needs pretrained_path (a frozen random encoder learns nothing).")
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.task, self.num_classes, self.mask_ratio, self.seed = task, num_classes, mask_ratio, seed
        self.byte_length, self.label_smoothing = byte_length, label_smoothing
        self.lr, self.weight_decay, self.nonfinite_loss = lr, weight_decay, nonfinite_loss
        self.optimizer_factory, self.scheduler_factory, self.scheduler_interval = optimizer, scheduler, scheduler_interval
        self.net = NetMamba(byte_length, stride, dim, depth, num_classes, d_state, expand, decoder_dim, decoder_depth,
                            drop_path, backend)
        if pretrained_path is not None:
            self.load_encoder(pretrained_path)
        if freeze_encoder:
            for name, p in self.net.named_parameters():
                p.requires_grad_(name.startswith("head."))
        self._init_metrics()

    def load_encoder(self, path: str) -> None:
        """Load an earlier run's encoder weights (``net.*`` minus the head and the MAE decoder)."""
        own = self.net.state_dict()
        state = read_state_dict(path, reference_keys=[f"net.{k}" for k in own], name="pretrained_path")
        state = {k[4:]: v for k, v in state.items() if k.startswith("net.")}
        encoder = {k: v for k, v in state.items() if not k.startswith(("head.", "decoder", "mask_token"))}
        if not encoder:
            raise ValueError(f"pretrained_path {path} holds no NetMamba weights (no `net.*` keys).")
        bad = [k for k, v in encoder.items() if k not in own or own[k].shape != v.shape]
        if bad:
            raise ValueError(f"pretrained_path {path} does not fit this network (e.g. {bad[:3]}); build it with the "
                             "pretraining run's byte_length, stride, dim, depth, d_state and expand.")
        self.net.load_state_dict(encoder, strict=False)

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``(B, num_classes)`` of bytes ``(B, byte_length)``."""
        return self.net(x)

    @override
    def logits(self, *inputs: torch.Tensor) -> torch.Tensor:
        """Class logits of the bytes."""
        return self.net(inputs[0])

    @property
    @override
    def uses_labels(self) -> bool:
        """Pretraining ignores labels."""
        return self.task == "classify"

    @override
    def setup(self, stage: str) -> None:
        """Also refuse a datamodule whose flows have another byte length."""
        super().setup(stage)
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        layout = getattr(dm, "layout", None)
        if layout is not None and getattr(dm, "representation", "") == "netmamba_bytes":
            length = layout["packets"] * (layout["header_bytes"] + layout["payload_bytes"])
            if length != self.byte_length:
                raise ValueError(f"the datamodule gives {length} bytes per flow but NetMambaModule has byte_length="
                                 f"{self.byte_length}; set `model.init_args.byte_length: {length}`.")

    @override
    def objective(self, batch: Any, stage: str) -> torch.Tensor:
        """MAE loss (``task="mae"``) or cross-entropy with metrics."""
        if self.task == "classify":
            return super().objective(batch, stage)
        step = self.global_step if self._trainer is not None else 0
        offset = {"train": 0, "val": 1, "test": 2}[stage]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + 3 * step + offset)
        return self.net.mae(batch[0], self.mask_ratio, g)[0]
