"""FedD2SModule: the client-side LightningModule of FedD2S (the method, its loss and schedule: ``fedd2s.py``)."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn
from typing_extensions import override

from lightning_ext.core.guards import buffer_snapshot, check_loss, restore_buffers
from lightning_ext.core.validation import check_number
from lightning_ext.federated.fedd2s import CKPT_DEPTH, FedD2SNet, fedd2s_loss  # noqa: F401 - FedD2SNet: the example
from lightning_ext.vision.classifier import Classifier


class FedD2SModule(Classifier):
    """A :class:`~lightning_ext.vision.classifier.Classifier` over a :class:`FedD2SNet` trained with :func:`fedd2s_loss`.

    The exit depth, ``kd_weight`` and ``temperature`` are attributes a :class:`FedD2SClient` sets each round from the
    server's config; the depth is saved in the checkpoint. Validation, test and prediction use the personal head.
    Logs ``train_loss``, ``train_acc`` (personal head) and ``train_fedd2s/{ce_personal, ce_global, kl_to_personal,
    kl_to_global}``.

    Args:
        net: the :class:`FedD2SNet` (or a net with ``num_blocks`` and ``forward_exit(x, depth)``).
        num_classes: number of classes.
        kd_weight: ``lambda``, the weight of both KL terms (0 = FedPer-like training of two heads).
        temperature: ``T``.
        exit_depth: the depth of the global exit head before any round sets it (``None`` = the last block).
        **kwargs: :class:`~lightning_ext.vision.classifier.Classifier`'s other arguments (optimizer, lr, ...).

    Example:
        >>> module = FedD2SModule(FedD2SNet(widths=(8, 16)), num_classes=10)
        >>> module.exit_depth
        2
    """

    def __init__(self, net: nn.Module, num_classes: int = 10, kd_weight: float = 1.0, temperature: float = 1.0,
                 exit_depth: Optional[int] = None, **kwargs: Any) -> None:
        super().__init__(net, num_classes, **kwargs)
        if not hasattr(net, "forward_exit") or not hasattr(net, "num_blocks"):
            raise TypeError("net must have `num_blocks` and `forward_exit(x, depth)` (e.g. FedD2SNet).")
        check_number("kd_weight", kd_weight, low=0)
        check_number("temperature", temperature, low=0, low_open=True)
        self.kd_weight, self.temperature = float(kd_weight), float(temperature)
        if exit_depth is not None:
            check_number("exit_depth", exit_depth, low=1, high=net.num_blocks, integer=True)
        self.exit_depth = int(net.num_blocks if exit_depth is None else exit_depth)
        if not 1 <= self.exit_depth <= net.num_blocks:
            raise ValueError(f"exit_depth={exit_depth} must lie in [1, {net.num_blocks}].")

    @override
    def _shared_step(self, batch: Any, stage: str) -> Optional[torch.Tensor]:
        if stage != "train":
            return super()._shared_step(batch, stage)
        x, y = batch
        buffers = buffer_snapshot(self) if self.nonfinite_loss == "skip" else None
        personal, exit_logits = self.net.forward_exit(x, self.exit_depth)
        loss, parts = fedd2s_loss(personal, exit_logits, y, self.kd_weight, self.temperature)
        if not check_loss(self, loss, self.nonfinite_loss, batch):
            restore_buffers(self, buffers)
            return None
        self.train_acc(personal, y)
        self.log("train_loss", loss, prog_bar=True)
        self.log("train_acc", self.train_acc)
        for name, value in parts.items():
            self.log(f"train_fedd2s/{name}", value.detach())
        return loss

    @override
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep the exit depth this round trained with (the client's evaluation needs it)."""
        checkpoint[CKPT_DEPTH] = self.exit_depth
