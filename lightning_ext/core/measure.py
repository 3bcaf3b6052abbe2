"""What a model costs: parameters, multiply-accumulates (MACs) and measured forward latency.

Shared by every pruning and compression component (:class:`~lightning_ext.callbacks.FilterPruning` and its
subclasses, :class:`~lightning_ext.callbacks.ActivatingWhilePruning`,
:class:`~lightning_ext.callbacks.DataFreeCompression`) and by their benchmarks, so that all of them count and
time the same way.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional, Union

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


def count_macs_params(model: nn.Module, example_inputs: Any) -> tuple[int, int]:
    """Multiply-accumulates of one forward pass on ``example_inputs`` and the number of parameters.

    Uses ``torch_pruning.utils.count_ops_and_params`` in eval mode (every layer type Torch-Pruning knows;
    the MACs are for the whole batch given). The model's training flags are restored.

    Example:
        >>> count_macs_params(nn.Conv2d(1, 4, 3, bias=False), torch.zeros(1, 1, 5, 5))  # 4 filters x 9 x 3x3
        (324, 36)
    """
    tp = require("torch_pruning", "counting MACs")
    with eval_mode(model), torch.no_grad():
        macs, params = tp.utils.count_ops_and_params(model, example_inputs)
    return int(macs), int(params)


def _first_tensor(inputs: Any) -> Optional[torch.Tensor]:
    if isinstance(inputs, torch.Tensor):
        return inputs
    values = inputs.values() if isinstance(inputs, dict) else inputs if isinstance(inputs, (tuple, list)) else []
    return next((v for v in values if isinstance(v, torch.Tensor)), None)


def layer_macs(
    model: nn.Module, inputs: Any, weight_share: Optional[Callable[[nn.Module], float]] = None
) -> Union[int, float]:
    """MACs of the convolution and linear layers for ONE sample of ``inputs`` (the batch size is divided out).

    A conv costs ``in_channels / groups x kernel`` MACs per output element (a transposed conv
    ``out_channels / groups x kernel`` per input element), a linear layer ``in_features`` per output element.
    Other layers (BatchNorm, activations, pooling) are not counted.

    Args:
        model: the model (run once in eval mode under ``no_grad``; its flags are restored).
        inputs: what the model is called with; the batch size is read from the first tensor.
        weight_share: optional ``module -> factor`` multiplying each layer's MACs, e.g. the share of its
            non-zero weights (what a sparse kernel could skip); the result is then a float.

    Example:
        >>> layer_macs(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)), torch.zeros(8, 4))
        18
    """
    first = _first_tensor(inputs)
    batch = int(first.shape[0]) if first is not None and first.dim() > 0 else 1
    total: list[float] = [0]

    def hook(module, args, output):
        if isinstance(module, nn.Linear):
            macs = output.numel() * module.in_features
        elif module.transposed:
            macs = args[0].numel() * (module.out_channels // module.groups) * math.prod(module.kernel_size)
        else:
            macs = output.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)
        total[0] += macs / batch * (weight_share(module) if weight_share is not None else 1)

    kinds = (nn.Linear, nn.modules.conv._ConvNd)
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, kinds)]
    try:
        with eval_mode(model), torch.no_grad():
            call_model(model, inputs)
    finally:
        for h in handles:
            h.remove()
    return int(round(total[0])) if weight_share is None else float(total[0])


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
