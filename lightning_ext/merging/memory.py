"""Peak memory of a call: what a merge really holds at its worst moment.

On CUDA the allocator's own statistics are exact (``torch.cuda.max_memory_allocated``). On the CPU, PyTorch
keeps no such counter, and the process's resident size mixes in whatever the C allocator caches, so the CPU
measurement replays the allocation and free events that ``torch.profiler`` records with
``profile_memory=True``: the peak of live tensor bytes allocated during the call, above what was live when it
started. Memory freed and re-allocated inside a single operator is not seen (its net effect is), and allocations
outside PyTorch's allocator (numpy arrays) are not counted. Profiling slows the call down: time it separately.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch

__all__ = ["PeakMemory", "measure_peak_memory"]


@dataclass(frozen=True)
class PeakMemory:
    """Peak and final bytes allocated by a call, above what was allocated when it started."""

    peak_bytes: int
    end_bytes: int
    device: str
    method: str
    seconds: float

    @property
    def peak_mib(self) -> float:
        return self.peak_bytes / 2**20


def _cpu_peak(fn: Callable[..., Any], args: tuple, kwargs: dict) -> tuple[Any, int, int]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False) as prof:
        result = fn(*args, **kwargs)
    deltas = []
    for event in prof.events():
        usage = getattr(event, "cpu_memory_usage", 0) or 0
        children = sum(getattr(c, "cpu_memory_usage", 0) or 0 for c in event.cpu_children)
        own = usage - children  # an operator's total includes its children's allocations
        if own:
            deltas.append((event.time_range.start, own))
    deltas.sort(key=lambda item: item[0])
    current = peak = 0
    for _, delta in deltas:
        current += delta
        peak = max(peak, current)
    return result, int(peak), int(current)


def measure_peak_memory(
    fn: Callable[..., Any], *args: Any, device: Optional[Union[str, torch.device]] = None, **kwargs: Any
) -> tuple[Any, PeakMemory]:
    """Call ``fn(*args, **kwargs)`` and return ``(result, PeakMemory)``.

    Args:
        fn: the call to measure.
        device: ``"cuda"``/``"cuda:N"`` measures that GPU's allocator; anything else (default) the CPU tensors.

    Example:
        >>> _, mem = measure_peak_memory(lambda: torch.zeros(1_000_000).add_(1).sum())
        >>> 3.9e6 < mem.peak_bytes < 4.5e6, mem.end_bytes < 1e3
        (True, True)
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    start = time.perf_counter()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        result = fn(*args, **kwargs)
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev) - base
        end = torch.cuda.memory_allocated(dev) - base
        return result, PeakMemory(int(peak), int(end), str(dev), "cuda-allocator", time.perf_counter() - start)
    result, peak, end = _cpu_peak(fn, args, kwargs)
    return result, PeakMemory(peak, end, "cpu", "torch-profiler", time.perf_counter() - start)
