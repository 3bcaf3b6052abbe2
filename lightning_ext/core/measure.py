"""What a model costs: parameters, multiply-accumulates (MACs) and measured forward latency.

One MACs convention for the whole library: **MACs are the multiply-accumulates of ONE sample's forward pass, as
Torch-Pruning's counter** (``torch_pruning.utils.count_ops_and_params``) **counts them**: convolutions and linear
layers (bias additions included), BatchNorm/LayerNorm, activations, pooling, upsampling and attention, run in eval
mode on the first sample of the example inputs. :func:`count_macs_params` gives the total, :func:`layer_macs` the
same count per leaf layer (what a per-layer weighting such as "MACs of the non-zero weights" builds on). Every
pruning and compression component (``FilterPruning`` and its subclasses, ``ActivatingWhilePruning``,
``DataFreeCompression``), their benchmarks and any other family that reports a cost use these two functions,
and log the result under ``macs`` (``pruning/macs``, ``ap/macs``, ``data_free_compression/macs_before``).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch
from torch import nn

from lightning_ext.core.optional import require

__all__ = ["call_model", "count_macs_params", "eval_mode", "layer_macs", "measure_latency", "num_params"]


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode and restore each one's own flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def call_model(model: nn.Module, inputs: Any) -> Any:
    """``model(inputs)``; a tuple/list is passed as positional arguments, a dict as keyword arguments."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def num_params(model: nn.Module) -> int:
    """Number of stored parameters (physically removed channels are gone; masked weights still count)."""
    return sum(p.numel() for p in model.parameters())


def _one_sample(inputs: Any) -> Any:
    """The first sample of every batched tensor in ``inputs`` (a tensor, a tuple/list or a dict)."""
    if isinstance(inputs, torch.Tensor):
        return inputs[:1] if inputs.dim() > 0 else inputs
    if isinstance(inputs, dict):
        return {k: _one_sample(v) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_one_sample(v) for v in inputs)
    return inputs


def trial_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` for counting or trial edits, with attributes that cannot be copied set to ``None``.

    A LightningModule built by LightningCLI can hold attributes that refuse ``deepcopy`` (a scheduler factory,
    hooks holding a live data-loader iterator). They play no part in the forward pass, so when a plain deep copy
    fails the copy gets ``None`` in their place; the user's model is untouched. The common case costs one copy.
    """
    import copy

    try:
        return copy.deepcopy(model)
    except Exception:  # noqa: BLE001 - some attribute refuses a copy: find which, below
        pass
    memo: dict[int, Any] = {}
    for module in model.modules():
        # __getstate__ is what deepcopy copies (a LightningModule's drops its trainer)
        for key, value in module.__getstate__().items():
            if key in ("_parameters", "_buffers", "_modules") or isinstance(value, (torch.Tensor, nn.Module)):
                continue
            try:
                copy.deepcopy(value, {})
            except Exception:  # noqa: BLE001 - anything that refuses a copy is left out of the copy
                memo[id(value)] = None
    return copy.deepcopy(model, memo)


def _count(model: nn.Module, example_inputs: Any, layer_wise: bool):
    tp = require("torch_pruning", "counting MACs")
    inputs = _one_sample(example_inputs)
    try:  # Torch-Pruning's counter deep-copies the model itself
        with eval_mode(model), torch.no_grad():
            return model, tp.utils.count_ops_and_params(model, inputs, layer_wise=layer_wise)
    except TypeError as err:
        if "pickle" not in str(err) and "deepcopy" not in str(err):
            raise
    counted = trial_copy(model)  # an attribute refused the copy: count a copy without it
    with eval_mode(counted), torch.no_grad():
        return counted, tp.utils.count_ops_and_params(counted, inputs, layer_wise=layer_wise)


def count_macs_params(model: nn.Module, example_inputs: Any) -> tuple[int, int]:
    """MACs of one sample's forward pass (the library's one convention, see the module docstring) and the number
    of parameters.

    Only the first sample of ``example_inputs`` is run, so the batch size does not matter. The model's training
    flags are restored.

    Example:
        >>> count_macs_params(nn.Conv2d(1, 4, 3, bias=False), torch.zeros(8, 1, 5, 5))  # 4 filters x 9 x 3x3
        (324, 36)
    """
    _, (macs, params) = _count(model, example_inputs, layer_wise=False)
    return int(macs), int(params)


def layer_macs(model: nn.Module, example_inputs: Any) -> dict[str, int]:
    """MACs of one sample's forward pass per leaf layer that Torch-Pruning's counter counts (module names relative
    to ``model``); the values sum to :func:`count_macs_params`'s total.

    Example:
        >>> layer_macs(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)), torch.zeros(8, 4))
        {'0': 15, '1': 3, '2': 8}
    """
    counted, (_, _, per_module, _) = _count(model, example_inputs, layer_wise=True)
    out = {}
    for name, module in counted.named_modules():
        if next(module.children(), None) is None and per_module.get(module):
            out[name] = int(per_module[module])
    return out


def _first_tensor(inputs: Any) -> Optional[torch.Tensor]:
    if isinstance(inputs, torch.Tensor):
        return inputs
    values = inputs.values() if isinstance(inputs, dict) else inputs if isinstance(inputs, (tuple, list)) else []
    return next((v for v in values if isinstance(v, torch.Tensor)), None)


def measure_latency(
    model: nn.Module, inputs: Any, warmup: int = 3, repeats: int = 10, num_threads: Optional[int] = None
) -> float:
    """Median wall time, in seconds, of one forward pass on ``inputs`` in eval mode under ``inference_mode``.

    On CUDA inputs the device is synchronised around every timed pass.

    Args:
        model: the model (left in its own training mode afterwards).
        inputs: what the model is called with (a tensor, a tuple of positional inputs or a dict).
        warmup: untimed passes first.
        repeats: timed passes; the median is returned.
        num_threads: set ``torch.set_num_threads`` for the measurement (restored afterwards).

    Example:
        >>> measure_latency(nn.Linear(8, 2), torch.zeros(4, 8), warmup=1, repeats=3) > 0
        True
    """
    if repeats < 1:
        raise ValueError(f"`repeats` must be >= 1, got {repeats}.")
    first = _first_tensor(inputs)
    cuda = first is not None and first.is_cuda
    threads = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    times = []
    try:
        with eval_mode(model), torch.inference_mode():
            for i in range(warmup + repeats):
                if cuda:
                    torch.cuda.synchronize(first.device)
                start = time.perf_counter()
                call_model(model, inputs)
                if cuda:
                    torch.cuda.synchronize(first.device)
                if i >= warmup:
                    times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    times.sort()
    return times[len(times) // 2]
