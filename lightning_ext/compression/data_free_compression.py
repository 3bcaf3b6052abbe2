"""``DataFreeCompression``: the Lightning wrapper of UDFC (data-free pruning + quantization, closed-form
reconstruction). The pure core is :mod:`lightning_ext.compression.udfc`."""

from __future__ import annotations

from typing import Any, Literal, Optional, get_args

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from typing_extensions import override

from lightning_ext.compression.history import (
    HISTORY_VERSION,
    _STATE_MARKER,
    _install_replay_hook,
    _remove_replay_hook,
    record_step,
    refuse_spawning_launcher,
)
from lightning_ext.compression.plan import apply_pruning_history
from lightning_ext.compression.udfc import (
    CompressionError,
    CompressionReport,
    Importance,
    InputModel,
    MaxPoolModel,
    check_arguments,
    data_free_compress,
    find_compensable_chains,
    quantize_per_channel,
    reconstruction_from_bn_statistics,
)
from lightning_ext.core.inputs import example_inputs
from lightning_ext.core.optional import require
from lightning_ext.core.paths import output_path
from lightning_ext.core.strategy import refuse_sharded_strategy
from lightning_ext.core.validation import (
    NonNegativeFloat,
    NonNegativeInt,
    OpenUnitInterval,
    PositiveInt,
    check_choice,
    check_number,
)

__all__ = [
    "CompressionError", "CompressionReport", "DataFreeCompression", "data_free_compress", "find_compensable_chains",
    "quantize_per_channel", "reconstruction_from_bn_statistics",
]

ApplyAt = Literal["start", "train_end"]
_MARKER = "_lightning_ext_data_free_compression"  # on a compressed module: {state_key: the compression step}


class _RefuseUncompressedWeights:
    """``load_state_dict`` pre-hook on a module this callback compressed: a state dict with MORE channels than the
    module was saved before compression and cannot go into it (one clear error instead of size mismatches)."""

    def __call__(self, module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        larger = []
        for name, sub in module.named_modules():
            weight, key = getattr(sub, "weight", None), f"{prefix}{name + '.' if name else ''}weight"
            if isinstance(weight, torch.Tensor) and weight.dim() > 1 and key in state_dict:
                want = state_dict[key].shape[0]
                if want > weight.shape[0]:
                    larger.append(f"{name} ({want} > {weight.shape[0]})")
        if larger:
            raise CompressionError(
                "The checkpoint holds MORE channels than the compressed model in memory ("
                + ", ".join(larger[:5]) + "): it was saved before DataFreeCompression compressed the model. With "
                "apply_at='start' the model is compressed in setup(), before Lightning loads `ckpt_path`: load "
                "uncompressed weights into the model first (e.g. `load_from_checkpoint`, `pretrained_weights`). With "
                "apply_at='train_end', evaluate the model in memory (ckpt_path=None) or the checkpoint written to "
                "`save_path`."
            )


class DataFreeCompression(Callback):
    """Data-free structured pruning plus low-bit weight quantization with a closed-form reconstruction (UDFC).

    Paper: Bai, Chen, Shen, Qian, Liu, "Unified Data-Free Compression: Pruning and Quantization without
    Fine-Tuning", ICCV 2023, arXiv:2308.07209. Reference code: none released (the paper says "code will be
    available"); an awesome-list links https://github.com/Dtudy/UDFC, which we could not inspect.

    Without any data or fine-tuning, every ``conv -> BatchNorm -> activation -> conv`` chain loses
    ``round(pruning_ratio * C)`` output channels (smallest L1 norm of the BN-folded filter) and all conv/linear
    weights are fake-quantized per output channel to ``weight_bits``. The information lost in layer ``l`` is
    restored by reconstructing the INPUT channels of layer ``l+1`` (what the paper does): with the activations
    ``a`` of layer ``l``, the damaged ones ``b`` and the damage ``d`` (``a_c`` for a pruned channel,
    ``a_j - b_j`` for a quantized one), the next layer's weights become ``V'_K = V_K + V R^T`` and its bias
    ``+ V delta``, where

    .. math::  R = (\\mathrm{Cov}(b_K) + \\lambda I)^{-1}\\,\\mathrm{Cov}(b_K, d), \\qquad
               \\delta = E[d] - E[b_K] R

    minimise the expected reconstruction error ``E||Z^{(l+1)} - \\hat Z^{(l+1)}||^2`` of the next feature map.
    The moments come from BN statistics alone: each BN output is Gaussian with BN's own moments,
    ``h_j ~ N(beta_j, gamma_j^2)``, channels correlate as their filters would on a white input
    (``corr(h_i, h_j) = cos(W_i, W_j)``), and the draws are pushed through the real activation (seeded Monte
    Carlo; no data). Channels are then removed physically through
    Torch-Pruning's dependency graph.

    What is confirmed from the paper (abstract, Fig. 1 caption, and a third-party summary): no data and no
    fine-tuning; pruning and quantization together; the assumption that a damaged channel is partly
    recoverable as a linear combination of other channels; compensation in the input channels of layer
    ``l+1`` to keep ``Z^{(l+1)}``; a reconstruction error with a closed-form minimiser. NOT confirmed (we could
    not read the method section): the paper's exact equations, its two scale factors ``S`` (pruning) and
    ``S'`` (quantization), and how it uses BN statistics. The Gaussian moment model, the multivariate
    regression (whose rows for pruned channels play the role of ``S`` and whose diagonal for quantized ones
    that of ``S'``), the ridge and the bias correction are ours; without an activation and with
    ``input_model="shared"`` the pruning rows reduce to the spec's ridge least squares
    ``s* = (A A^T + lambda I)^{-1} A a_c`` over the folded filters with ``kappa = 0``, the bias mismatch being
    corrected exactly by ``delta`` instead. Only chains whose channels are not coupled elsewhere are pruned (in
    a ResNet: the inner convs of each block); the others are only quantized.

    Usage: ``apply_at="start"`` compresses in ``setup()`` (before optimizers and DDP exist) the model as given,
    e.g. one with pretrained weights; validation/testing then see the compressed model (training after
    compression is possible but moves weights off the quantization grid). ``apply_at="train_end"`` compresses
    after training; checkpoints saved before that hold the uncompressed model, so pass ``save_path`` to write
    the compressed one. Params, MACs (one sample, :mod:`lightning_ext.core.measure`) and measured latency
    before/after go to the loggers (``data_free_compression/*``) and to :attr:`report`. The state holds the
    pruning history in the library's one format (:mod:`lightning_ext.compression.history`): Lightning replays it
    on a fresh model before loading a compressed checkpoint into it, and
    :func:`~lightning_ext.compression.load_pruned_checkpoint` does the same without a Trainer. Under DDP,
    rank 0 compresses and broadcasts the result. ``ddp_spawn`` fits are refused (the changed shapes cannot be
    copied back to the main process); FSDP/DeepSpeed are refused.

    Args:
        pruning_ratio: share of output channels removed per prunable layer, in (0, 1); ``None`` = quantize only.
        weight_bits: bits per weight in [2, 16]; ``None`` = prune only.
        compensate: apply the closed-form reconstruction; ``False`` = naive prune + quantize.
        bias_correction: correct the expected shift in the next layer's bias (or its BatchNorm mean).
        apply_at: ``"start"`` or ``"train_end"``.
        importance: ``"l1_folded"`` or ``"l1"`` channel ranking.
        ridge: relative ridge of the reconstruction.
        num_samples: Gaussian draws for the activation moments.
        seed: seed of the draws.
        layers: glob patterns of layer names to compress (relative to the LightningModule, e.g. ``net.layer*``).
        min_channels: fewest channels a pruned layer may keep.
        input_model: Gaussian model of the channels from BN statistics: ``"per_channel"`` (BN's exact
            marginals, white-input correlations), ``"fitted"`` or ``"shared"``; see
            :func:`reconstruction_from_bn_statistics`.
        max_pool: at a max-pool between the BN and the next layer: ``"independent"`` (moments of the pooled
            activations, the window's positions independent), ``"identity"`` (the pool ignored) or ``"stop"``
            (no compensation across it); see :func:`data_free_compress`.
        input_shape: one input's shape without batch; default: the module's ``example_input_array``
            or ``input_shape``. Only shapes are used, never data.
        latency_batch_size: batch size of the latency measurement.
        latency_repeats: timed passes per latency measurement (0 = skip latency).
        save_path: with ``apply_at="train_end"``, write a checkpoint of the compressed model here (relative to
            ``trainer.log_dir``); ``None`` writes none.
        name: distinguishes several instances in a checkpoint.

    Example:
        >>> from lightning_ext.modules import ImageClassifier
        >>> net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        ...                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
        >>> model = ImageClassifier(net, num_classes=10, image_size=8)
        >>> cb = DataFreeCompression(pruning_ratio=0.25, weight_bits=6, latency_repeats=0, num_samples=1024)
        >>> report = cb.compress(model)  # what the callback does in setup() with apply_at="start"
        >>> model.net[0].out_channels, model.net[5].in_features, report.params_after < report.params_before
        (12, 12, True)
        >>> trainer = Trainer(callbacks=[DataFreeCompression(pruning_ratio=0.3, weight_bits=6)])  # doctest: +SKIP
        >>> trainer.test(model, datamodule=DigitsDataModule())  # compresses, then tests  # doctest: +SKIP
    """

    def __init__(
        self,
        pruning_ratio: Optional[OpenUnitInterval] = 0.3,
        weight_bits: Optional[int] = 6,
        compensate: bool = True,
        bias_correction: bool = True,
        apply_at: ApplyAt = "start",
        importance: Importance = "l1_folded",
        ridge: NonNegativeFloat = 1e-3,
        num_samples: int = 8192,
        seed: int = 0,
        layers: Optional[list[str]] = None,
        min_channels: PositiveInt = 1,
        input_model: InputModel = "per_channel",
        max_pool: MaxPoolModel = "independent",
        input_shape: Optional[list[PositiveInt]] = None,
        latency_batch_size: PositiveInt = 32,
        latency_repeats: NonNegativeInt = 20,
        save_path: Optional[str] = None,
        name: Optional[str] = None,
    ) -> None:
        super().__init__()
        require("torch_pruning", "DataFreeCompression")
        check_arguments(pruning_ratio, weight_bits, importance, ridge, num_samples, min_channels, input_model,
                        max_pool)
        check_choice("apply_at", apply_at, get_args(ApplyAt))
        check_number("seed", seed, integer=True)
        if input_shape is not None and (isinstance(input_shape, str) or not input_shape or not all(
                isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in input_shape)):
            raise ValueError(f"`input_shape` must be positive integers (no batch), got {input_shape!r}.")
        check_number("latency_batch_size", latency_batch_size, low=1, integer=True)
        check_number("latency_repeats", latency_repeats, low=0, integer=True)
        if save_path is not None and apply_at != "train_end":
            raise ValueError("`save_path` is used with apply_at='train_end' only; with 'start' the usual "
                             "ModelCheckpoint already saves the compressed model.")
        self.pruning_ratio, self.weight_bits = pruning_ratio, weight_bits
        self.compensate, self.bias_correction = compensate, bias_correction
        self.apply_at, self.importance, self.ridge = apply_at, importance, ridge
        self.num_samples, self.seed, self.layers, self.min_channels = num_samples, seed, layers, min_channels
        self.input_model, self.max_pool = input_model, max_pool
        self.input_shape = list(input_shape) if input_shape is not None else None
        self.latency_batch_size, self.latency_repeats = latency_batch_size, latency_repeats
        self.save_path, self.name = save_path, name
        self.saved_checkpoint: Optional[str] = None
        self.applied = False
        self.steps: list[dict] = []  # the pruning history (one step), in the format of compression.history
        self.summary: dict[str, float] = {}
        self.report: Optional[CompressionReport] = None
        self._restored = False

    @property
    def history(self) -> list[list]:
        """The channels removed, in Torch-Pruning's history format (``[layer, True, indices]`` entries)."""
        return [op for step in self.steps for op in step["ops"]]

    @property
    @override
    def state_key(self) -> str:
        """Identifies this callback's state in a checkpoint by its ratio, bits and name."""
        return self._generate_state_key(pruning_ratio=self.pruning_ratio, weight_bits=self.weight_bits, name=self.name)

    # -- the work -----------------------------------------------------------------------------------------
    def _example_inputs(self, module: nn.Module, batch: int = 2) -> torch.Tensor:
        return example_inputs(module, self.input_shape, None, batch_size=batch)  # shapes only: never data

    def compress(self, module: nn.Module) -> CompressionReport:
        """Compress ``module`` now (no Trainer needed) and return the report."""
        measure = self.latency_repeats > 0
        example = self._example_inputs(module, self.latency_batch_size if measure else 2)
        report = data_free_compress(
            module, example, self.pruning_ratio, self.weight_bits, self.compensate, self.bias_correction,
            self.importance, self.ridge, self.num_samples, self.seed, self.layers, self.min_channels,
            self.input_model, measure=measure, latency_repeats=self.latency_repeats, max_pool=self.max_pool,
        )
        self._record(module, report.history, example, report)
        return report

    def _record(self, module: nn.Module, ops: list, example: torch.Tensor,
                report: Optional[CompressionReport]) -> None:
        self.steps = [record_step(module, ops, example)] if ops else []
        self.applied, self.report = True, report
        if report is not None:
            self.summary = report.metrics()
        marks = dict(getattr(module, _MARKER, {}))
        marks[self.state_key] = {"steps": [dict(s) for s in self.steps]}
        object.__setattr__(module, _MARKER, marks)

    def _compress_in_trainer(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.world_size > 1:
            payload = None
            if trainer.global_rank == 0:
                report = self.compress(pl_module)
                state = {k: v.detach().cpu() for k, v in pl_module.state_dict().items()}
                payload = (report.history, state, report.metrics())
            payload = trainer.strategy.broadcast(payload, src=0)
            if trainer.global_rank != 0:
                ops, state, metrics = payload
                example = self._example_inputs(pl_module)
                apply_pruning_history(pl_module, ops, example)
                pl_module.load_state_dict(state)
                self._record(pl_module, ops, example, None)
                self.summary = dict(metrics)
        else:
            self.compress(pl_module)
        if trainer.global_rank == 0 and self.report is not None:
            rank_zero_info(self.report.summary())
            metrics = {f"data_free_compression/{k}": v for k, v in self.summary.items()}
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)

    # -- hooks --------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Refuse unsupported strategies, install the history replay and, with ``apply_at="start"``, compress."""
        refuse_sharded_strategy(trainer, "DataFreeCompression",
                                f"does not support {type(trainer.strategy).__name__}: it removes channels from whole "
                                "weight tensors", error=RuntimeError)
        self._restored = False
        hooks = getattr(pl_module, "_lightning_ext_udfc_hooks", set())
        if self.state_key not in hooks:
            pl_module.register_load_state_dict_pre_hook(_RefuseUncompressedWeights())
            object.__setattr__(pl_module, "_lightning_ext_udfc_hooks", hooks | {self.state_key})
        _install_replay_hook(pl_module)  # a checkpoint's history is replayed before its weights load
        mark = getattr(pl_module, _MARKER, {}).get(self.state_key)
        if mark is not None:  # this model is already compressed by this callback (e.g. fit, then test)
            self.applied, self.steps = True, [dict(s) for s in mark["steps"]]
            return
        self.applied, self.steps = False, []
        if stage == "fit":
            refuse_spawning_launcher(trainer, "DataFreeCompression", error=RuntimeError)
        if self.apply_at == "start":
            self._compress_in_trainer(trainer, pl_module)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Remove the history replay hook from the module."""
        _remove_replay_hook(pl_module)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """With ``apply_at="train_end"``, compress the trained model and write ``save_path``."""
        if self.apply_at != "train_end" or self.applied or self._restored:
            return
        if getattr(pl_module, _MARKER, {}).get(self.state_key) is not None:
            return
        self._compress_in_trainer(trainer, pl_module)
        path = output_path(trainer, self.save_path)  # log_dir: a collective, every rank calls it
        if path is not None:
            trainer.save_checkpoint(str(path))
            self.saved_checkpoint = str(path)
            rank_zero_info(f"DataFreeCompression: saved the compressed model to {path}.")

    # -- state ----------------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        """Whether the model is compressed, the pruning history (steps) and the logged sizes."""
        return {_STATE_MARKER: HISTORY_VERSION, "applied": self.applied, "steps": [dict(s) for s in self.steps],
                "summary": dict(self.summary)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the state saved by :meth:`state_dict` (the model's shapes are replayed before its weights)."""
        self.applied = bool(state_dict.get("applied", False))
        self.steps = [dict(s) for s in state_dict.get("steps", [])]
        self.summary = dict(state_dict.get("summary", {}))
        self._restored = self.applied
