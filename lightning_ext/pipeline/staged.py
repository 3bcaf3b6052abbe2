"""A staged data pipeline on ``torchdata.nodes`` whose per-stage worker counts can change while it runs.

Graph, rebuilt whenever the allocation changes::

    IterableWrapper(batches of sample ids, from the current position)
      -> ParallelMapper(stage 1, n_1 workers) -> ... -> ParallelMapper(stage S, n_S workers)
      -> Mapper(collate) -> Prefetcher(prefetch) -> [PinMemory]

One task is one batch (the per-sample functions run over the batch inside the worker), because per-sample
tasks cost more in queueing than small stage functions do (spec §1, measured). Every mapper runs
``in_order=True``, so the delivered stream is a function of ``(seed, epoch, rank)`` only, whatever the
allocation: a change of allocation shuts the old graph down and starts a new one at the first batch not yet
handed out, and the work in flight is discarded. That is what makes delivery exactly-once by construction;
:meth:`StagedPipeline.__next__` also checks the batch index of every batch it hands out.
"""

from __future__ import annotations

import atexit
import math
import signal
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional, Sequence, get_args

import numpy as np

from lightning_ext.core.optional import require
from lightning_ext.core.sampling import EpochSampler
from lightning_ext.core.validation import (
    NonNegativeFloat, NonNegativeInt, PositiveInt, check_choice, check_non_negative, check_number,
    check_positive_int,
)

_METHODS = ("thread", "process")
#: start methods of process stages (``None``: the OS default)
MPContext = Literal["fork", "spawn", "forkserver"]


@dataclass
class Stage:
    """One pipeline stage: a per-sample function run by its own pool of workers.

    Args:
        name: stage name (used in logs and allocations).
        fn: per-sample function; the first stage receives sample indices. For ``method="process"`` it must
            be picklable when the multiprocessing context is not ``fork`` (use a module-level class).
        method: ``"thread"`` (I/O-bound work) or ``"process"`` (CPU-bound Python work, no GIL contention).
        min_workers: lowest worker count a tuner may set (0 runs the stage inline in the upstream thread).
        max_workers: highest worker count a tuner may set (``None``: the CPU budget).
    """

    name: str
    fn: Callable[[Any], Any]
    method: Literal["thread", "process"] = "process"
    min_workers: int = 1
    max_workers: Optional[int] = None

    def __post_init__(self) -> None:
        check_choice(f"Stage {self.name!r}: method", self.method, _METHODS)
        check_number(f"Stage {self.name!r}: min_workers", self.min_workers, low=0, integer=True)
        if self.max_workers is not None:
            check_number(f"Stage {self.name!r}: max_workers", self.max_workers, low=max(1, self.min_workers),
                         integer=True)


@dataclass(frozen=True)
class Allocation:
    """Workers per stage (in stage order) and the prefetch depth (batches buffered for the trainer)."""

    workers: tuple[int, ...]
    prefetch: int = 2

    def __post_init__(self) -> None:
        for w in self.workers:
            check_number("Allocation: every worker count", w, low=0, integer=True)
        object.__setattr__(self, "workers", tuple(int(w) for w in self.workers))
        check_positive_int("Allocation: prefetch", self.prefetch)

    @property
    def total(self) -> int:
        return sum(self.workers)

    def to_dict(self) -> dict:
        return {"workers": list(self.workers), "prefetch": self.prefetch}

    @classmethod
    def from_dict(cls, d: dict) -> "Allocation":
        return cls(tuple(d["workers"]), int(d["prefetch"]))

    def __str__(self) -> str:
        return "/".join(map(str, self.workers)) + f" p{self.prefetch}"


@dataclass
class PipelineStats:
    """Cumulative counters of a pipeline (take differences between two :meth:`copy` calls for a window)."""

    batches: int = 0
    samples: int = 0
    wait_s: float = 0.0
    stage_busy_s: list = field(default_factory=list)
    rebuilds: int = 0
    rebuild_s: float = 0.0
    failures: int = 0
    batch_nbytes: int = 0

    def copy(self) -> "PipelineStats":
        return PipelineStats(self.batches, self.samples, self.wait_s, list(self.stage_busy_s), self.rebuilds,
                             self.rebuild_s, self.failures, self.batch_nbytes)


class _StageCall:
    """Runs a per-sample function over one batch payload and times it (the time travels with the batch)."""

    def __init__(self, fn: Callable) -> None:
        self.fn = fn

    def __call__(self, payload):
        batch_idx, ids, items, times = payload
        t0 = time.perf_counter()
        out = [self.fn(x) for x in items]
        return batch_idx, ids, out, times + (time.perf_counter() - t0,)


class _Collate:
    def __init__(self, collate: Callable) -> None:
        self.collate = collate

    def __call__(self, payload):
        batch_idx, ids, items, times = payload
        return batch_idx, ids, self.collate(items), times


def _nbytes(obj) -> int:
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.element_size() * obj.nelement()
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(o) for o in obj)
    if isinstance(obj, dict):
        return sum(_nbytes(o) for o in obj.values())
    return 0


def _mapper_iter(node):
    """The running ``_ParallelMapperIter`` inside a ``ParallelMapper`` (``None`` when inline or not started)."""
    impl = getattr(node, "_it", None)
    it = getattr(impl, "_it", None)
    return it if it is not None and hasattr(it, "_workers") else None


_LIVE_GRAPHS: "weakref.WeakSet[_Graph]" = weakref.WeakSet()


_REAPING: set = set()  # worker processes of stopped graphs not yet joined


@atexit.register
def _shutdown_all() -> None:  # an exception that ends the program must not leave worker processes behind
    for graph in list(_LIVE_GRAPHS):
        graph.shutdown()
    _reap([], list(_REAPING))


def _reset_with_default_sigterm(node) -> None:
    """``node.reset()`` forks the worker processes; fork them with the default SIGTERM action.

    Trainers install SIGTERM handlers that only record the signal; inherited by a worker, such a handler
    makes the worker ignore ``terminate()``.
    """
    if threading.current_thread() is not threading.main_thread():
        node.reset()
        return
    old = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        node.reset()
    finally:
        signal.signal(signal.SIGTERM, old)


class _Graph:
    """One built node graph plus the watchdog that notices dead worker processes."""

    def __init__(self, root, mappers: list, tail_nodes: list, watchdog_interval: float) -> None:
        self.root, self.mappers, self.tail_nodes = root, mappers, tail_nodes
        _LIVE_GRAPHS.add(self)
        self.dead_worker: Optional[str] = None
        self._stop = threading.Event()
        self._watchdog = None
        if watchdog_interval > 0 and any(m.method == "process" and m.num_workers > 0 for m in mappers):
            self._watchdog = threading.Thread(target=self._watch, args=(watchdog_interval,), daemon=True)
            self._watchdog.start()

    def processes(self) -> list:
        out = []
        for m in self.mappers:
            it = _mapper_iter(m)
            if it is not None and it.method == "process":
                out += list(it._workers)
        return out

    def _watch(self, interval: float) -> None:
        while not self._stop.wait(interval):
            for p in self.processes():
                if not p.is_alive():
                    self.dead_worker = f"worker process {p.pid} exited with code {p.exitcode}"
                    self._halt()
                    return

    def _halt(self) -> None:
        """Make every blocked ``next`` return StopIteration (the pipeline then rebuilds)."""
        for m in self.mappers:
            it = _mapper_iter(m)
            if it is not None:
                it._stop.set()
                it._mp_stop.set()
        for node in self.tail_nodes:
            it = getattr(node, "_it", None)
            if it is not None and hasattr(it, "_stop_event"):
                it._stop_event.set()

    def shutdown(self, wait: bool = True) -> None:
        """Stop the graph; with ``wait=False`` the threads and processes are reaped in the background."""
        self._stop.set()
        self._halt()
        threads, procs = [], []
        for node in self.tail_nodes:
            it = getattr(node, "_it", None)
            thread = getattr(it, "_thread", None)
            if thread is not None:
                threads.append(thread)
                it._shutdown = _noop  # reaped here; torchdata's __del__ could run in one of these threads
        for m in self.mappers:
            it = _mapper_iter(m)
            if it is None:
                continue
            for q in (it._in_q, it._intermed_q):  # drop queued work so workers exit promptly
                try:
                    while True:
                        q.get_nowait()
                except Exception:
                    pass
                if hasattr(q, "cancel_join_thread"):
                    q.cancel_join_thread()
            threads += [it._read_thread, it._sort_thread]
            it._shutdown = _noop
            if it.method == "process":
                procs += it._workers
                # torchdata's __del__ would test these processes from forked children of later graphs
                it._workers = []
            else:
                threads += it._workers
        _LIVE_GRAPHS.discard(self)
        _REAPING.update(procs)
        if wait:
            _reap(threads, procs)
        else:
            threading.Thread(target=_reap, args=(threads, procs), daemon=True).start()


def _noop() -> None:
    pass


def _reap(threads: list, procs: list) -> None:
    deadline = time.monotonic() + 1.0
    for t in threads:
        if t.is_alive() and t is not threading.current_thread():
            t.join(timeout=max(0.0, deadline - time.monotonic()))
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.terminate()
            p.join(timeout=0.5)
        if p.is_alive():
            p.kill()
            p.join(timeout=0.5)
        _REAPING.discard(p)


class StagedPipeline:
    """An iterable of batches whose stages each have their own worker pool, re-configurable while it runs.

    Iterate it like a DataLoader (``len``, one epoch per ``iter``, ``sampler.set_epoch``); change the
    allocation any time with :meth:`reconfigure`. The stream of batches does not depend on the allocation:
    each epoch delivers every index of this rank's shard exactly once, in the sampler's order.

    Args:
        num_samples: samples in the dataset (indices ``0..num_samples-1`` go into the first stage).
        stages: the stages, in order. Process stages should return numpy arrays or Python objects (they are
            pickled to the next stage); the batch is collated in this process.
        batch_size: samples per batch.
        allocation: initial :class:`Allocation` (default: the stages' ``min_workers`` but at least 1 each,
            prefetch 2).
        collate_fn: turns the list of the last stage's outputs into a batch (default
            ``torch.utils.data.default_collate``).
        shuffle, seed, drop_last: per-epoch shuffling (seeded with ``(seed, epoch)``) and incomplete batches.
        rank, world_size: this process's shard under DDP.
        pin_memory: add a ``PinMemory`` node (only useful with a CUDA device).
        multiprocessing_context: start method for process stages (``None``: the OS default).
        watchdog_interval: seconds between liveness checks of worker processes (0 disables). A dead worker
            makes the pipeline rebuild at the current position with :attr:`fallback_allocation` (set by a
            tuner to its last good allocation) and count a failure in :attr:`stats`.
        max_restarts: consecutive failed rebuilds tolerated before raising.

    Example:
        >>> p = StagedPipeline(10, [Stage("square", lambda i: i * i, method="thread")], batch_size=4, shuffle=False)
        >>> [b.tolist() for b in p]
        [[0, 1, 4, 9], [16, 25, 36, 49], [64, 81]]
    """

    batch_sampler = None  # Lightning inspects loaders like DataLoaders; batching is internal

    def __init__(
        self,
        num_samples: PositiveInt,
        stages: Sequence[Stage],
        batch_size: PositiveInt,
        allocation: Optional[Allocation] = None,
        collate_fn: Optional[Callable] = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        rank: NonNegativeInt = 0,
        world_size: PositiveInt = 1,
        pin_memory: bool = False,
        multiprocessing_context: Optional[MPContext] = None,
        watchdog_interval: NonNegativeFloat = 0.5,
        max_restarts: NonNegativeInt = 3,
    ) -> None:
        require("torchdata", "StagedPipeline")
        if not stages:
            raise ValueError("A StagedPipeline needs at least one Stage.")
        if len({s.name for s in stages}) != len(stages):
            raise ValueError(f"Stage names must be unique, got {[s.name for s in stages]}.")
        for name, value in (("num_samples", num_samples), ("batch_size", batch_size), ("world_size", world_size)):
            check_positive_int(name, value)
        check_number("rank", rank, low=0, integer=True)
        check_non_negative("watchdog_interval", watchdog_interval)
        check_number("max_restarts", max_restarts, low=0, integer=True)
        if multiprocessing_context is not None:
            check_choice("multiprocessing_context", multiprocessing_context, get_args(MPContext))
        self.stages = list(stages)
        self.batch_size, self.drop_last = batch_size, drop_last
        self.sampler = EpochSampler(num_samples, shuffle, seed, rank, world_size)
        if collate_fn is None:
            from torch.utils.data import default_collate as collate_fn
        self.collate_fn = collate_fn
        self.pin_memory = pin_memory
        self.multiprocessing_context = multiprocessing_context
        self.watchdog_interval = watchdog_interval
        self.max_restarts = max_restarts
        self.allocation = self.validate(allocation or self.default_allocation())
        self.fallback_allocation: Optional[Allocation] = None
        self.stats = PipelineStats(stage_busy_s=[0.0] * len(self.stages))
        self.failure_log: list[str] = []
        self._graph: Optional[_Graph] = None
        self._batches: list[np.ndarray] = []
        self._position = 0  # next batch index to hand out in the current epoch
        self._consumed = 0  # batches the trainer used, counted when a datamodule calls mark_consumed()
        self._tracking_consumed = False
        self._epoch_active = False
        self._pending_start = False
        self._resume: Optional[dict] = None

    # -- configuration -------------------------------------------------------------------------------------
    @property
    def stage_names(self) -> list[str]:
        return [s.name for s in self.stages]

    def default_allocation(self) -> Allocation:
        return Allocation(tuple(max(1, s.min_workers) for s in self.stages), 2)

    def validate(self, allocation: Allocation) -> Allocation:
        if not isinstance(allocation, Allocation):
            raise TypeError(f"Expected an Allocation, got {type(allocation).__name__}.")
        if len(allocation.workers) != len(self.stages):
            raise ValueError(f"The allocation has {len(allocation.workers)} worker counts for "
                             f"{len(self.stages)} stages {self.stage_names}.")
        for s, w in zip(self.stages, allocation.workers):
            if w < s.min_workers or (s.max_workers is not None and w > s.max_workers):
                raise ValueError(f"Stage {s.name!r}: {w} workers is outside [{s.min_workers}, {s.max_workers}].")
        return allocation

    def reconfigure(self, allocation: Allocation) -> bool:
        """Switch to ``allocation``; mid-epoch the graph restarts at the first batch not yet handed out.

        Returns whether anything changed.
        """
        allocation = self.validate(allocation)
        if allocation == self.allocation:
            return False
        self.allocation = allocation
        if self._epoch_active and self._position < len(self._batches):
            self._rebuild()
        return True

    # -- iteration -----------------------------------------------------------------------------------------
    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> "StagedPipeline":
        # The epoch starts lazily at the first ``next``: trainers may create the iterator before ``set_epoch``
        # (Lightning does on the first epoch of a resumed run), as DataLoader's samplers are read lazily too.
        self._shutdown()
        self._epoch_active = False
        self._pending_start = True
        return self

    def _start_epoch(self) -> None:
        self._pending_start = False
        ids = self.sampler.indices()
        self._batches = [ids[i : i + self.batch_size] for i in range(0, len(ids), self.batch_size)]
        if self.drop_last and self._batches and len(self._batches[-1]) < self.batch_size:
            self._batches.pop()
        start = 0
        if self._resume is not None:
            if self._resume["epoch"] == self.sampler.epoch and self._resume["position"] < len(self._batches):
                start = self._resume["position"]
            self._resume = None
        self._position = start
        self._consumed = start
        self._epoch_active = True
        self._restarts = 0
        if self._position < len(self._batches):
            self._rebuild()

    def __next__(self):
        if self._pending_start:
            self._start_epoch()
        while True:
            if self._position >= len(self._batches):
                self._finish_epoch()
                raise StopIteration
            t0 = time.perf_counter()
            try:
                batch_idx, ids, batch, times = self._graph.root.next()
            except StopIteration:
                self._on_failure(self._graph.dead_worker or "the pipeline stopped before the end of the epoch")
                continue
            wait = time.perf_counter() - t0
            if batch_idx != self._position:  # cannot happen with in_order mappers; guard the invariant anyway
                raise RuntimeError(f"StagedPipeline delivered batch {batch_idx} where {self._position} was due.")
            self._position += 1
            self._restarts = 0
            st = self.stats
            st.batches += 1
            st.samples += len(ids)
            st.wait_s += wait
            for i, t in enumerate(times):
                st.stage_busy_s[i] += t
            st.batch_nbytes = _nbytes(batch)
            self.last_ids = ids
            return batch

    def _finish_epoch(self) -> None:
        self._shutdown()
        self._epoch_active = False

    def _build(self):
        from torchdata.nodes import IterableWrapper, Mapper, ParallelMapper, PinMemory, Prefetcher

        start = self._position
        payloads = [(start + k, b, b.tolist(), ()) for k, b in enumerate(self._batches[start:])]
        node = IterableWrapper(payloads)
        mappers = []
        for stage, w in zip(self.stages, self.allocation.workers):
            node = ParallelMapper(node, _StageCall(stage.fn), num_workers=w, in_order=True, method=stage.method,
                                  multiprocessing_context=self.multiprocessing_context if stage.method == "process" else None)
            mappers.append(node)
        # collate in this process: process stages hand over numpy/Python objects (pickled), never tensors whose
        # shared-memory handles would die with a worker that is shut down mid-flight
        node = Mapper(node, _Collate(self.collate_fn))
        node = Prefetcher(node, prefetch_factor=self.allocation.prefetch)
        tail = [node]
        if self.pin_memory:
            node = PinMemory(node)
            tail.append(node)
        _reset_with_default_sigterm(node)
        return _Graph(node, mappers, tail, self.watchdog_interval)

    def _rebuild(self) -> None:
        t0 = time.perf_counter()
        self._shutdown(wait=False)
        self._graph = self._build()
        self.stats.rebuilds += 1
        self.stats.rebuild_s += time.perf_counter() - t0

    def _on_failure(self, reason: str) -> None:
        self._restarts += 1
        self.stats.failures += 1
        self.failure_log.append(f"batch {self._position}: {reason} (allocation {self.allocation})")
        if self._restarts > self.max_restarts:
            self._shutdown()
            raise RuntimeError(f"StagedPipeline: {self._restarts} consecutive failures; last: {reason}. "
                               f"Log: {self.failure_log[-3:]}")
        if self.fallback_allocation is not None:
            self.allocation = self.validate(self.fallback_allocation)
        self._rebuild()

    def _shutdown(self, wait: bool = True) -> None:
        if self._graph is not None:
            self._graph.shutdown(wait)
            self._graph = None

    def close(self) -> None:
        """Stop every worker (also called at the end of each epoch)."""
        self._shutdown()
        self._epoch_active = False

    def __del__(self) -> None:
        try:
            self._shutdown()
        except Exception:
            pass

    # -- measurements ------------------------------------------------------------------------------------
    def buffer_bytes(self, allocation: Optional[Allocation] = None) -> int:
        """Estimated bytes held in flight: two tasks per worker per stage plus the prefetch buffer.

        The size of a batch is the last delivered batch's (0 before the first batch).
        """
        a = allocation or self.allocation
        return self.stats.batch_nbytes * (sum(2 * max(1, w) for w in a.workers) + a.prefetch)

    def worker_processes(self) -> list:
        """The live process objects of the current graph (for tests and monitoring)."""
        return self._graph.processes() if self._graph is not None else []

    # -- checkpointing -----------------------------------------------------------------------------------
    def mark_consumed(self) -> None:
        """Count one batch as used by the trainer (called by the datamodule: trainers fetch ahead)."""
        self._tracking_consumed = True
        self._consumed += 1

    def state_dict(self) -> dict:
        """Epoch, batches used so far in it, and the allocation; resuming continues at the next batch."""
        position = min(self._consumed, self._position) if self._tracking_consumed else self._position
        return {"epoch": self.sampler.epoch, "position": position, "allocation": self.allocation.to_dict(),
                "num_batches": len(self)}

    def load_state_dict(self, state: dict) -> None:
        """Resume: the next ``iter`` of the same epoch starts at the saved position, with the saved allocation."""
        self.allocation = self.validate(Allocation.from_dict(state["allocation"]))
        self._resume = {"epoch": int(state["epoch"]), "position": int(state["position"])}
        self.sampler.set_epoch(int(state["epoch"]))
