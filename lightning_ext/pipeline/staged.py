"""A staged data pipeline on ``torchdata.nodes`` whose per-stage worker counts can change while it runs.

Graph (``reconfigure_mode="drain"`` / ``"restart"``: rebuilt whenever the allocation changes)::

    IterableWrapper(batches of sample ids, from the current position)
      -> ParallelMapper(stage 1, n_1 workers) -> ... -> ParallelMapper(stage S, n_S workers)
      -> Mapper(collate) -> Prefetcher(prefetch) -> [PinMemory]

With ``reconfigure_mode="resize"`` (the default) thread stages run on ``ResizableMapper``, process stages on
``ResizableProcessMapper`` and collate + prefetch on a one-thread ``ResizableMapper`` whose outstanding-item cap is
the prefetch depth.

One task is one batch (the per-sample functions run over the batch inside the worker), because per-sample
tasks cost more in queueing than small stage functions do (spec §1, measured). Every mapper runs
``in_order=True``, so the delivered stream is a function of ``(seed, epoch, rank)`` only, whatever the
allocation. torchdata cannot resize a ``ParallelMapper``'s pool in place, so a change of allocation builds a
new graph, except with ``reconfigure_mode="resize"`` (the default): there every stage and the collate + prefetch
buffer run on hand-written nodes (:mod:`lightning_ext.pipeline._resizable`) whose thread or process pools grow and
shrink in place, workers retiring after the tasks they hold, so a change resizes the running graph: no graph is
built and no work in flight is dropped (counted in :attr:`PipelineStats.resizes`). Measured on the sleep pipeline of
``docs/results/pipeline_tuner.md`` (a change every 8 batches): resize 0.99x the no-change throughput with 0 batches
dropped, with thread stages and with process stages alike, against 0.29-0.44x for drain and restart. With ``reconfigure_mode="drain"`` the old graph stops pulling
and still hands out up to its prefetch depth of batches (ready ones), which hides the new graph's start-up; the new
graph starts right after them, and the old graph's remaining work in flight is dropped (at most two graphs run at
once). With
``"restart"`` the old graph is shut down at once and the new one starts at the first batch not yet handed out,
discarding all the work in flight. Both count the dropped batches in :attr:`PipelineStats.dropped_batches` (a
dead worker always restarts). Either way delivery is exactly-once by construction;
:meth:`StagedPipeline.__next__` also checks the batch index of every batch.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional, Sequence, get_args

import numpy as np

from lightning_ext.core.optional import require
from lightning_ext.pipeline._graph import _Collate, _Graph, _nbytes, _reset_with_default_sigterm, _Source, _StageCall
from lightning_ext.core.sampling import EpochSampler
from lightning_ext.core.validation import (
    NonNegativeFloat, NonNegativeInt, PositiveInt, check_choice, check_non_negative, check_number,
    check_positive_int,
)

_METHODS = ("thread", "process")
_BUDGETS = ("cpu", "io")
ReconfigureMode = Literal["drain", "restart", "resize"]
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
        max_workers: highest worker count a tuner may set (``None``: its budget).
        budget: which budget the stage's workers count against: ``"cpu"`` (workers that compute) or ``"io"``
            (threads that mostly wait, e.g. on remote reads; counted against a tuner's separate ``io_budget``).
            ``None``: ``"io"`` for thread stages, ``"cpu"`` for process stages.
    """

    name: str
    fn: Callable[[Any], Any]
    method: Literal["thread", "process"] = "process"
    min_workers: int = 1
    max_workers: Optional[int] = None
    budget: Optional[Literal["cpu", "io"]] = None

    def __post_init__(self) -> None:
        check_choice(f"Stage {self.name!r}: method", self.method, _METHODS)
        if self.budget is None:
            self.budget = "io" if self.method == "thread" else "cpu"
        check_choice(f"Stage {self.name!r}: budget", self.budget, _BUDGETS)
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
    dropped_batches: int = 0
    drained_batches: int = 0
    resizes: int = 0  # allocation changes applied in place (``reconfigure_mode="resize"``), no graph built
    resize_s: float = 0.0

    def copy(self) -> "PipelineStats":
        return PipelineStats(self.batches, self.samples, self.wait_s, list(self.stage_busy_s), self.rebuilds,
                             self.rebuild_s, self.failures, self.batch_nbytes, self.dropped_batches,
                             self.drained_batches, self.resizes, self.resize_s)


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
        reconfigure_mode: ``"resize"`` (default): the stages' thread / process pools and the prefetch buffer
            are resized in place (nothing dropped, no graph built); ``"drain"``: a new allocation starts a new
            graph while the old one delivers up to its
            prefetch depth of batches more (ready ones, hiding the new graph's start-up; both pools run for a
            moment); ``"restart"``: the old graph is shut down at once and all its work in flight is discarded.

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
        reconfigure_mode: ReconfigureMode = "resize",
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
        check_choice("reconfigure_mode", reconfigure_mode, get_args(ReconfigureMode))
        self.reconfigure_mode = reconfigure_mode
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
        self._graphs: list[_Graph] = []  # [0] delivers now; later ones start where the one before stops
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
            if self.reconfigure_mode == "resize" and self._resize_in_place(allocation):
                return True
            if self.reconfigure_mode in ("drain", "resize") and self._graphs and self._graphs[-1].source is not None:
                self._switch()
            else:
                self._rebuild()
        return True

    def _resize_in_place(self, allocation: Allocation) -> bool:
        """Resize the running graph's pools and prefetch buffer; ``False`` if a changed stage cannot resize.

        In ``"resize"`` mode every stage node resizes; a graph built otherwise (e.g. by a ``"drain"`` pipeline
        whose mode was switched) falls back to ``"drain"`` (a new graph).
        """
        graph = self._graphs[-1] if self._graphs else None
        if graph is None or graph.prefetch_node is None:
            return False
        nodes = graph.stage_nodes
        changed = [i for i, (old, new) in enumerate(zip(graph.allocation.workers, allocation.workers)) if old != new]
        if any(not hasattr(nodes[i], "resize") for i in changed):
            return False
        t0 = time.perf_counter()
        for i in changed:
            nodes[i].resize(allocation.workers[i])
        if allocation.prefetch != graph.allocation.prefetch:
            graph.prefetch_node.resize(1, max_outstanding=allocation.prefetch)
        graph.allocation, graph.prefetch = allocation, allocation.prefetch
        self.stats.resizes += 1
        self.stats.resize_s += time.perf_counter() - t0
        return True

    def _switch(self) -> None:
        """Let the delivering graph hand out at most its prefetch depth more batches; a new graph starts after them.

        The delivering graph stops pulling; the batches it has in its prefetch buffer are ready, so they hide the
        new graph's start-up; anything it pulled beyond them is dropped (bounded: at most two graphs run).
        """
        t0 = time.perf_counter()
        keep = self._graphs[0]
        for graph in self._graphs[1:]:  # a newer graph that has not delivered yet: its work is dropped
            self.stats.dropped_batches += graph.source.close() - graph.source.start
            graph.shutdown(wait=False)
        pulled = keep.source.close()
        stop = min(pulled, self._position + keep.prefetch, keep.stop_at if keep.stop_at is not None else pulled)
        self.stats.dropped_batches += max(0, pulled - stop)
        keep.stop_at = stop
        self._graphs = [keep]
        if stop < len(self._batches):
            self._graphs.append(self._build(stop))
        self.stats.rebuilds += 1
        self.stats.rebuild_s += time.perf_counter() - t0

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
            graph = self._graphs[0]
            if len(self._graphs) > 1 and graph.stop_at is not None and self._position >= graph.stop_at:
                self._graphs.pop(0).shutdown(wait=False)  # its share is delivered: the next graph takes over
                continue
            t0 = time.perf_counter()
            try:
                batch_idx, ids, batch, times = graph.root.next()
            except StopIteration:
                self._on_failure(graph.dead_worker or "the pipeline stopped before the end of the epoch")
                continue
            wait = time.perf_counter() - t0
            if len(self._graphs) > 1:
                self.stats.drained_batches += 1
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

    def _build(self, start: int) -> _Graph:
        from torchdata.nodes import IterableWrapper, Mapper, ParallelMapper, PinMemory, Prefetcher

        source = _Source(self._batches, start)
        node = IterableWrapper(source)
        prefetch = self.allocation.prefetch
        resize = self.reconfigure_mode == "resize"
        if resize:
            from lightning_ext.pipeline._resizable import ResizableMapper, ResizableProcessMapper
        mappers = []
        for stage, w in zip(self.stages, self.allocation.workers):
            if resize and stage.method == "thread":
                node = ResizableMapper(node, _StageCall(stage.fn), num_workers=w, name=stage.name)
            elif resize:
                node = ResizableProcessMapper(node, _StageCall(stage.fn), num_workers=w, name=stage.name,
                                              multiprocessing_context=self.multiprocessing_context)
            else:
                node = ParallelMapper(node, _StageCall(stage.fn), num_workers=w, in_order=True, method=stage.method,
                                      multiprocessing_context=self.multiprocessing_context if stage.method == "process" else None)
            mappers.append(node)
        # collate in this process: process stages hand over numpy/Python objects (pickled), never tensors whose
        # shared-memory handles would die with a worker that is shut down mid-flight
        if resize:  # collate + prefetch buffer in one thread, as Prefetcher(Mapper(collate)), but resizable
            node = ResizableMapper(node, _Collate(self.collate_fn), num_workers=1, max_outstanding=prefetch,
                                   name="prefetch")
            prefetch_node = node
        else:
            node = Mapper(node, _Collate(self.collate_fn))
            node = Prefetcher(node, prefetch_factor=self.allocation.prefetch)
            prefetch_node = None
        tail = [node]
        if self.pin_memory:
            node = PinMemory(node)
            tail.append(node)
        _reset_with_default_sigterm(node)
        graph = _Graph(node, mappers, tail, self.watchdog_interval, source)
        graph.prefetch = prefetch
        graph.allocation, graph.stage_nodes, graph.prefetch_node = self.allocation, mappers, prefetch_node
        return graph

    def _rebuild(self) -> None:
        """Shut every graph down (their work in flight is lost) and start one at the next batch to hand out."""
        t0 = time.perf_counter()
        if self._graphs and self._graphs[-1].source is not None:
            self.stats.dropped_batches += max(0, self._graphs[-1].source.next_idx - self._position)
        self._shutdown(wait=False)
        self._graphs = [self._build(self._position)]
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
        graphs, self._graphs = self._graphs, []
        for graph in graphs:
            graph.shutdown(wait)

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

    def live_workers(self) -> list[int]:
        """Live worker threads per stage of the newest graph's resizable stages (``None`` for other stages).

        Threads that retire after a shrink count until they have finished their current task.
        """
        if not self._graphs:
            return [0] * len(self.stages)
        return [n.live_workers() if hasattr(n, "resize") else None for n in self._graphs[-1].stage_nodes]

    def worker_processes(self) -> list:
        """The live process objects of the current graph (for tests and monitoring)."""
        return [p for graph in self._graphs for p in graph.processes()]

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
