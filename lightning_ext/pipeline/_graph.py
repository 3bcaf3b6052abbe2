"""The machinery under :class:`~lightning_ext.pipeline.StagedPipeline`: one built torchdata node graph
(:class:`_Graph`, with a watchdog for dead worker processes and a non-blocking shutdown), its closable source of
batch payloads (:class:`_Source`) and the timed stage call that carries per-stage busy time with each batch."""

from __future__ import annotations

import atexit
import signal
import threading
import time
import weakref
from typing import Callable, Optional

import numpy as np


class _Source:
    """Batch payloads from ``start`` on; :meth:`close` stops it at the first batch not yet pulled (thread-safe)."""

    def __init__(self, batches: list, start: int) -> None:
        self.batches, self.start, self.next_idx, self.limit = batches, start, start, len(batches)
        self._lock = threading.Lock()

    def __iter__(self) -> "_Source":
        return self

    def __next__(self):
        with self._lock:
            if self.next_idx >= self.limit:
                raise StopIteration
            k = self.next_idx
            self.next_idx += 1
        b = self.batches[k]
        return k, b, b.tolist(), ()

    def close(self) -> int:
        """Pull nothing more; returns the first batch this source will not deliver."""
        with self._lock:
            self.limit = self.next_idx
            return self.limit


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

    def __init__(self, root, mappers: list, tail_nodes: list, watchdog_interval: float,
                 source: Optional[_Source] = None) -> None:
        self.root, self.mappers, self.tail_nodes, self.source = root, mappers, tail_nodes, source
        self.prefetch = 1  # batches it may still hand out after a change of allocation (set by the pipeline)
        self.stop_at: Optional[int] = None  # first batch it must not hand out (set when a change drains it)
        _LIVE_GRAPHS.add(self)
        self.dead_worker: Optional[str] = None
        self._stop = threading.Event()
        self._watchdog = None
        if watchdog_interval > 0 and any(m.method == "process" and (m.num_workers > 0 or hasattr(m, "resize"))
                                         for m in mappers):
            self._watchdog = threading.Thread(target=self._watch, args=(watchdog_interval,), daemon=True)
            self._watchdog.start()

    def processes(self) -> list:
        out = [p for node in self.resizable() for p in node.processes()]
        for m in self.mappers:
            it = _mapper_iter(m)
            if it is not None and it.method == "process":
                out += list(it._workers)
        return out

    def _watch(self, interval: float) -> None:
        while not self._stop.wait(interval):
            for p in self.processes():
                # exit code 0: torchdata let the worker go (its source ended, e.g. a graph draining after a
                # change of allocation); anything else (a signal, an error) is a dead worker
                if not p.is_alive() and p.exitcode != 0:
                    self.dead_worker = f"worker process {p.pid} exited with code {p.exitcode}"
                    self._halt()
                    return

    def resizable(self) -> list:
        """The nodes of this graph that resize in place (``ResizableMapper``: thread stages, the prefetch buffer)."""
        return [n for n in self.mappers + self.tail_nodes if hasattr(n, "resize")]

    def _halt(self) -> None:
        """Make every blocked ``next`` return StopIteration (the pipeline then rebuilds)."""
        for node in self.resizable():
            node._stop.set()
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
        for node in self.resizable():
            procs += node.processes()
            threads += node.stop()
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
