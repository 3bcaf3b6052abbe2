"""``BNRecalibration``: recompute a supernet's BatchNorm statistics for the evaluated sub-network before validation
and test, and put the training statistics back afterwards."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Literal, Optional, Union

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn
from typing_extensions import override

from lightning_ext.audio.efficient_tdnn import recalibrate_batchnorm
from lightning_ext.audio.subnet_sampling import check_subnet, find_supernet
from lightning_ext.core.inputs import batch_inputs, first_train_loader
from lightning_ext.core.validation import PositiveInt, check_number, check_positive_int

__all__ = ["BNRecalibration", "batchnorm_state"]


def batchnorm_state(net: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every BatchNorm buffer of ``net`` (running mean/var, batches tracked), by name."""
    return {f"{name}.{b}": getattr(m, b).detach().clone() for name, m in net.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) for b in ("running_mean", "running_var",
                                                                        "num_batches_tracked")
            if getattr(m, b, None) is not None}


def _restore(net: nn.Module, state: dict[str, torch.Tensor]) -> None:
    for name, m in net.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            for b in ("running_mean", "running_var", "num_batches_tracked"):
                if f"{name}.{b}" in state:
                    setattr(m, b, state[f"{name}.{b}"].clone())


class BNRecalibration(Callback):
    r"""Before validation and test, recompute the supernet's BatchNorm running statistics for the sub-network that is
    evaluated, on ``num_batches`` training batches; afterwards put back the training statistics and the active
    sub-network, so training continues exactly as without the callback.

    Paper: "EfficientTDNN: Efficient Architecture Search for Speaker Recognition" (Wang et al., IEEE/ACM TASLP 2022,
    arXiv 2103.13581; reference code https://github.com/mechanicalsea/sugar, ``--num-statistics``: BatchNorm
    statistics re-estimated for each evaluated sub-network). A supernet's shared running statistics average over
    the sub-networks trained; a narrower sub-network's channels see other activations, so it must be evaluated with
    its own: :math:`\mu_c = \frac{1}{N}\sum_{n} x_{n,c}`, :math:`\sigma^2_c` likewise (cumulative average over the
    batches, :func:`~lightning_ext.audio.efficient_tdnn.recalibrate_batchnorm`).

    The batches are drawn from the training loader's dataset with a generator seeded by ``seed`` (the same items at
    every evaluation, collated by the loader's ``collate_fn``; the loader itself is not iterated, so the training
    order and the global RNG are untouched). Each batch's input (``core.inputs.batch_inputs``) goes through the
    module's ``forward`` with the sub-network active.

    Which sub-network: ``subnet`` (``"largest"``, ``"smallest"`` or a config dict, made active for the evaluation),
    or ``"module"``: the module's ``eval_config`` when it has one, else the supernet's active config. ``state_dict``
    holds the count of recalibrations. One process only (refused in ``setup`` under several ranks: each rank would
    recompute statistics on its own batches).

    Args:
        num_batches: training batches to recompute the statistics on.
        subnet: ``"module"``, ``"largest"``, ``"smallest"`` or a sub-network config.
        seed: the seed of the batch draw.
        supernet: attribute path of the supernet in the module (``None``: the only one found).

    Example:
        >>> cb = BNRecalibration(num_batches=4, subnet="smallest")
        >>> cb.num_batches, cb.subnet
        (4, 'smallest')
    """

    def __init__(self, num_batches: PositiveInt = 8,
                 subnet: Union[Literal["module", "largest", "smallest"], dict] = "module", seed: int = 0,
                 supernet: Optional[str] = None) -> None:
        super().__init__()
        check_positive_int("num_batches", num_batches)
        if not isinstance(subnet, dict) and subnet not in ("module", "largest", "smallest"):
            raise ValueError(f"`subnet` must be 'module', 'largest', 'smallest' or a sub-network config dict, got "
                             f"{subnet!r}.")
        check_number("seed", seed, integer=True)
        self.num_batches, self.subnet, self.seed, self.supernet = int(num_batches), subnet, int(seed), supernet
        self.recalibrations = 0
        self._saved: Optional[tuple[dict, Any]] = None

    def target(self, net: Any, pl_module: Any) -> Optional[dict]:
        """The sub-network evaluated (``None``: the largest)."""
        if self.subnet == "largest":
            return net.largest_config()
        if self.subnet == "smallest":
            return net.smallest_config()
        if isinstance(self.subnet, dict):
            return self.subnet
        own = getattr(pl_module, "eval_config", None)
        return own if own is not None else net.active

    def batches(self, trainer: Trainer) -> list[Any]:
        """``num_batches`` seeded training batches (see the class docstring)."""
        loader = first_train_loader(trainer)
        dataset, size = getattr(loader, "dataset", None), getattr(loader, "batch_size", None)
        if dataset is None or not size or not hasattr(dataset, "__len__"):
            raise ValueError("BNRecalibration draws batches from the training loader's map-style dataset and batch "
                             "size; use a DataLoader over a sized dataset with batch_size set.")
        collate = loader.collate_fn
        order = np.random.default_rng(self.seed).permutation(len(dataset))
        chunks = [order[i:i + size] for i in range(0, len(order), size)][:self.num_batches]
        return [collate([dataset[int(j)] for j in chunk]) for chunk in chunks]

    @contextlib.contextmanager
    def recalibrated(self, trainer: Trainer, pl_module: LightningModule, config: Optional[dict]) -> Iterator[None]:
        """Inside: ``config`` active, BatchNorm statistics recomputed for it; on exit both are put back."""
        net = find_supernet(pl_module, self.supernet, "BNRecalibration")
        if config is not None:
            check_subnet(net, config, "subnet")
        # ordinary tensors even inside Lightning's inference mode: the restored buffers are updated in place later
        with torch.inference_mode(False):
            saved, kept = batchnorm_state(net), net.active
        try:
            net.active = config
            device = pl_module.device
            with torch.inference_mode(False), torch.random.fork_rng(devices=[]):
                inputs = [batch_inputs(b, owner="BNRecalibration").to(device) for b in self.batches(trainer)]
                recalibrate_batchnorm(net, inputs, forward=lambda _net, x: pl_module(x))
            self.recalibrations += 1
            yield
        finally:
            net.active = kept
            with torch.inference_mode(False):
                _restore(net, saved)

    def _start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        net = find_supernet(pl_module, self.supernet, "BNRecalibration")
        context = self.recalibrated(trainer, pl_module, self.target(net, pl_module))
        context.__enter__()
        self._saved = context

    def _end(self) -> None:
        context, self._saved = self._saved, None
        if context is not None:
            context.__exit__(None, None, None)

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Refuse several ranks; check the supernet and the sub-network."""
        if trainer.world_size > 1:
            raise ValueError("BNRecalibration runs in one process (each rank would recompute statistics on its own "
                             "batches); set trainer.devices=1.")
        net = find_supernet(pl_module, self.supernet, "BNRecalibration")
        if isinstance(self.subnet, dict):
            check_subnet(net, self.subnet, "subnet")
            if getattr(pl_module, "eval_config", None) not in (None, self.subnet):
                raise ValueError(f"BNRecalibration(subnet=...) and {type(pl_module).__name__}.eval_config name "
                                 "different sub-networks; set one of them.")

    @override
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Recompute the statistics for the evaluated sub-network."""
        self._start(trainer, pl_module)

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Put the training statistics and the active sub-network back."""
        self._end()

    @override
    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Recompute the statistics for the evaluated sub-network."""
        self._start(trainer, pl_module)

    @override
    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Put the statistics and the active sub-network back."""
        self._end()

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        """Put the statistics back after a crash inside an evaluation."""
        self._end()

    @override
    def state_dict(self) -> dict:
        """The count of recalibrations."""
        return {"recalibrations": self.recalibrations}

    @override
    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the count."""
        self.recalibrations = int(state_dict.get("recalibrations", 0))
