"""A ``torchdata.nodes`` mapper whose thread pool can grow and shrink while it runs (``reconfigure_mode="resize"``)."""

from __future__ import annotations

import pickle
import queue
import signal
import threading
import traceback
from typing import Any, Callable, Dict, Optional

from torchdata.nodes import BaseNode
from typing_extensions import override

_POLL_S = 0.05  # how often blocked threads look at the stop flag


class _Failed:
    """An exception raised by the function or the source, re-raised to the consumer at its place in the order."""

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class ResizableMapper(BaseNode):
    """Maps ``fn`` over ``source`` with a pool of threads that :meth:`resize` changes in place, in order.

    Hand-written because torchdata 0.11's ``ParallelMapper`` cannot resize its pool: its workers, queues and
    semaphore are fixed at ``reset``, so every change of allocation had to build a new node graph and drop (or
    drain) the work in flight. Measured on the sleep pipeline of ``benchmarks/pipeline_tuner.py`` (allocation
    flipping 4/8/2 <-> 5/7/2 every 8 batches; see ``docs/results/pipeline_tuner.md``, "Cost of an allocation
    change"; 3 repetitions of 10 s, load average about 3 on 2 cores): resizing in place kept 0.99 ± 0.00x the
    throughput of the same repetition's run without changes and dropped no batch, where a rebuild ("restart",
    0.38x, 329 batches dropped) or a bounded drain of the old graph ("drain", 0.44x, 306 dropped) lost most of it.

    How: each worker thread reserves a slot (at most ``max_outstanding`` items pulled but not yet handed on),
    pulls the next item from ``source`` under a lock (which numbers it), applies ``fn`` and files the result
    under its number; :meth:`next` hands results out strictly by number, so the order is the source's whatever
    the pool size. :meth:`resize` starts threads, or asks that many to retire: a retiring thread finishes the task
    it holds and exits before reserving another, so no item in flight is lost and none is pulled twice. With
    0 workers the consumer's own thread does the work (inline, as ``ParallelMapper(num_workers=0)``), after the
    items already pulled by retiring workers have been handed out.

    Args:
        source: the upstream node (called from one thread at a time).
        fn: the function applied to every item (exceptions reach the consumer at that item's place).
        num_workers: threads at start (0: inline).
        max_outstanding: most items pulled and not yet handed on (``None``: twice the workers, as
            ``ParallelMapper``'s default, at least 1); a prefetch buffer is ``num_workers=1`` with
            ``max_outstanding`` = the prefetch depth.
        name: thread-name prefix (for debugging).
    """

    method = "thread"  # read by the pipeline's watchdog, which only watches worker processes

    def __init__(self, source: BaseNode, fn: Callable[[Any], Any], num_workers: int = 1,
                 max_outstanding: Optional[int] = None, name: str = "stage") -> None:
        super().__init__()
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}.")
        self.source, self.fn, self.name = source, fn, name
        self._target = int(num_workers)
        self._fixed_cap = max_outstanding
        self._cond = threading.Condition()
        self._pull_lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._spawned = 0
        self._retire = 0
        self._started = False
        self._reset_state()

    def _reset_state(self) -> None:
        self._results: dict[int, Any] = {}
        self._pulled = 0  # items numbered so far
        self._next = 0  # number of the next item to hand out
        self._reserved = 0  # slots taken: pulled (or being pulled) and not yet handed out
        self._end: Optional[int] = None  # number of items the source had, once it is exhausted

    # -- pool size -------------------------------------------------------------------------------------------
    @property
    def num_workers(self) -> int:
        """The pool size asked for (threads that are retiring after their current task are not counted)."""
        return self._target

    @property
    def max_outstanding(self) -> int:
        return self._fixed_cap if self._fixed_cap is not None else max(1, 2 * self._target)

    def live_workers(self) -> int:
        """Worker threads alive now (retiring ones count until they exit)."""
        with self._cond:
            return sum(t.is_alive() for t in self._threads)

    def resize(self, num_workers: int, max_outstanding: Optional[int] = None) -> None:
        """Change the pool to ``num_workers`` threads (and the outstanding-item cap, if given) without a restart."""
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}.")
        with self._cond:
            if max_outstanding is not None:
                self._fixed_cap = max_outstanding
            self._target = int(num_workers)
            if self._started and not self._stop.is_set():
                self._adjust()
            self._cond.notify_all()

    def _adjust(self) -> None:  # under self._cond
        staying = len(self._threads) - self._retire
        if self._target < staying:
            self._retire += staying - self._target
            return
        keep = min(self._retire, self._target - staying)  # cancel retirements before starting threads
        self._retire -= keep
        for _ in range(self._target - staying - keep):
            self._spawned += 1
            t = threading.Thread(target=self._work, name=f"{self.name}-{self._spawned}", daemon=True)
            self._threads.append(t)
            t.start()

    # -- BaseNode ----------------------------------------------------------------------------------------------
    @override
    def reset(self, initial_state: Optional[Dict[str, Any]] = None) -> None:
        super().reset(initial_state)
        if self._started:
            raise RuntimeError("ResizableMapper is started once per graph; build a new one to restart.")
        self.source.reset(initial_state.get("source") if initial_state else None)
        with self._cond:
            self._reset_state()
            self._started = True
            self._on_start()
            self._adjust()

    def _on_start(self) -> None:  # under self._cond; the process variant starts its queues and threads here
        pass

    def processes(self) -> list:
        """Worker processes (none: this node's workers are threads)."""
        return []

    @override
    def next(self) -> Any:
        with self._cond:
            while True:
                if self._next in self._results:
                    item = self._results.pop(self._next)
                    self._next += 1
                    self._reserved -= 1
                    self._cond.notify_all()
                    break
                if self._stop.is_set() or (self._end is not None and self._next >= self._end):
                    raise StopIteration
                if self._target == 0 and self._reserved == 0:  # inline: the consumer's thread does the task
                    self._reserved += 1
                    self._cond.release()
                    try:
                        self._task()
                    finally:
                        self._cond.acquire()
                    continue
                self._cond.wait(_POLL_S)
        if isinstance(item, _Failed):
            raise item.exc
        return item

    @override
    def get_state(self) -> Dict[str, Any]:
        return {"handed_out": self._next}

    # -- workers -----------------------------------------------------------------------------------------------
    def _work(self) -> None:
        me = threading.current_thread()
        try:
            while True:
                with self._cond:
                    while True:
                        if self._stop.is_set() or self._end is not None:
                            return
                        if self._retire > 0:
                            self._retire -= 1
                            return
                        if self._reserved < self.max_outstanding:
                            self._reserved += 1
                            break
                        self._cond.wait(_POLL_S)
                if not self._task():
                    return
        finally:
            with self._cond:
                if me in self._threads:
                    self._threads.remove(me)
                self._cond.notify_all()

    def _task(self) -> bool:
        """Pull one item (a slot is reserved), map it and file the result; ``False`` when the source is done."""
        failed = None
        with self._pull_lock:
            if self._stop.is_set() or self._end is not None:
                with self._cond:
                    self._reserved -= 1
                    self._cond.notify_all()
                return False
            try:
                item = next(self.source)
            except StopIteration:
                with self._cond:
                    self._reserved -= 1
                    if self._end is None:
                        self._end = self._pulled
                    self._cond.notify_all()
                return False
            except Exception as e:  # the source failed: hand the error on at this place in the order
                item, failed = None, _Failed(e)
            seq = self._pulled
            self._pulled += 1
        if failed is None:
            try:
                out = self.fn(item)
            except Exception as e:
                out = _Failed(e)
        else:
            out = failed
        with self._cond:
            self._results[seq] = out
            self._cond.notify_all()
        return True

    # -- shutdown ----------------------------------------------------------------------------------------------
    def stop(self) -> list:
        """Make every thread (and a blocked :meth:`next`) stop at its next look; returns the threads to join."""
        self._stop.set()
        with self._cond:
            self._results.clear()
            self._cond.notify_all()
            return list(self._threads)


def _start_with_default_sigterm(proc) -> None:
    """Start ``proc`` with the default SIGTERM action (a trainer's recording handler would make it ignore
    ``terminate()``); only the main thread may change signal handlers."""
    if threading.current_thread() is not threading.main_thread():
        proc.start()
        return
    old = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        proc.start()
    finally:
        signal.signal(signal.SIGTERM, old)


_RETIRE = None  # the last task a worker process gets: it exits with code 0


def _process_worker(fn: Callable, wid: int, in_q, out_q, stop) -> None:
    """Loop of worker process ``wid``: map its tasks ``(seq, item)`` in order until the retire message or stop."""
    while not stop.is_set():
        try:
            task = in_q.get(timeout=_POLL_S)
        except queue.Empty:
            continue
        if task is _RETIRE:
            return
        seq, item = task
        try:
            out = fn(item)
        except Exception as e:  # sent as a picklable error carrying the worker's traceback
            out = _Failed(_picklable(e))
        out_q.put((seq, wid, out))


def _picklable(e: BaseException) -> BaseException:
    try:
        pickle.dumps(e)
        return e
    except Exception:
        return RuntimeError(f"{type(e).__name__}: {e}\n{traceback.format_exc()}")


class _Proc:
    """One worker process with its own task queue."""

    __slots__ = ("proc", "in_q", "tasks", "retiring")

    def __init__(self, proc, in_q) -> None:
        self.proc, self.in_q, self.tasks, self.retiring = proc, in_q, 0, False


class ResizableProcessMapper(ResizableMapper):
    """:class:`ResizableMapper` whose workers are processes (CPU-bound Python stages), resized in place too.

    A feeder thread reserves a slot, pulls the next item from ``source`` (numbering it) and sends it to the least
    busy worker process that is not retiring, through that worker's own queue; a collector thread files the results
    by number, and :meth:`next` hands them out in order. :meth:`resize` starts processes, or sends a retire message
    to the least busy ones: it queues behind the tasks that worker already has, so the worker finishes them and exits
    (code 0); no task is lost and none goes to a retiring worker. Any other exit is a dead worker, which the
    pipeline's watchdog turns into a rebuild (the tasks it held are lost, so this node alone cannot go on). With 0
    workers the consumer's thread maps the items itself, after the ones already sent are handed out.

    Measured on the same benchmark as :class:`ResizableMapper` with the stages as processes (load average 4-7 on 2
    cores): 0.99 ± 0.01x the no-change throughput, 0 batches dropped, 0.028 s per change (forking the added
    process), against 0.35x for "drain" and 0.29x for "restart" (0.4-0.55 s per change, 250-270 batches dropped).

    Args:
        multiprocessing_context: start method (``None``: the OS default); ``fn`` must be picklable unless it is
            ``"fork"``.
        others: as :class:`ResizableMapper`.
    """

    method = "process"

    def __init__(self, source: BaseNode, fn: Callable[[Any], Any], num_workers: int = 1,
                 max_outstanding: Optional[int] = None, name: str = "stage",
                 multiprocessing_context: Optional[str] = None) -> None:
        import multiprocessing as mp

        super().__init__(source, fn, num_workers, max_outstanding, name)
        self._ctx = mp.get_context(multiprocessing_context)
        self._procs: dict[int, _Proc] = {}

    @override
    def _on_start(self) -> None:
        self._out_q, self._mp_stop = self._ctx.Queue(), self._ctx.Event()
        for target in (self._feed, self._collect):
            t = threading.Thread(target=target, name=f"{self.name}-{target.__name__[1:]}", daemon=True)
            self._threads.append(t)
            t.start()

    def _prune(self) -> None:  # under self._cond: forget retired workers that have exited
        for wid in [w for w, p in self._procs.items() if p.retiring and p.proc.exitcode == 0]:
            p = self._procs.pop(wid)
            p.proc.join(0)
            p.in_q.cancel_join_thread()  # its queue is empty

    @override
    def _adjust(self) -> None:  # under self._cond
        self._prune()
        staying = sorted((p for p in self._procs.values() if not p.retiring), key=lambda p: p.tasks)
        for p in staying[: max(0, len(staying) - self._target)]:
            p.retiring = True
            p.in_q.put(_RETIRE)
        for _ in range(self._target - len(staying)):
            self._spawned += 1
            in_q = self._ctx.Queue()
            proc = self._ctx.Process(target=_process_worker,
                                     args=(self.fn, self._spawned, in_q, self._out_q, self._mp_stop),
                                     name=f"{self.name}-{self._spawned}", daemon=True)
            _start_with_default_sigterm(proc)
            self._procs[self._spawned] = _Proc(proc, in_q)

    @override
    def live_workers(self) -> int:
        with self._cond:
            self._prune()
            return sum(p.proc.is_alive() for p in self._procs.values())

    @override
    def processes(self) -> list:
        """The worker processes, retiring ones included until they have exited."""
        with self._cond:
            self._prune()
            return [p.proc for p in self._procs.values()]

    def _feed(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._stop.is_set() or self._end is not None:
                        return
                    if self._target > 0 and self._reserved < self.max_outstanding:
                        self._reserved += 1
                        break
                    self._cond.wait(_POLL_S)
            failed = None
            with self._pull_lock:
                if self._stop.is_set() or self._end is not None:
                    return
                try:
                    item = next(self.source)
                except StopIteration:
                    with self._cond:
                        self._reserved -= 1
                        if self._end is None:
                            self._end = self._pulled
                        self._cond.notify_all()
                    return
                except Exception as e:
                    failed = _Failed(e)
                seq = self._pulled
                self._pulled += 1
            if failed is None:
                with self._cond:
                    ready = [p for p in self._procs.values() if not p.retiring]
                    if ready:
                        worker = min(ready, key=lambda p: p.tasks)
                        worker.tasks += 1
                        worker.in_q.put((seq, item))
                        continue
                try:  # no worker left (resized to 0 while this item was pulled): map it here
                    out = self.fn(item)
                except Exception as e:
                    out = _Failed(e)
            else:
                out = failed
            with self._cond:
                self._results[seq] = out
                self._cond.notify_all()

    def _collect(self) -> None:
        while not self._stop.is_set():
            try:
                seq, wid, out = self._out_q.get(timeout=_POLL_S)
            except (queue.Empty, EOFError, OSError):
                continue
            with self._cond:
                if wid in self._procs:
                    self._procs[wid].tasks -= 1
                self._results[seq] = out
                self._cond.notify_all()

    @override
    def stop(self) -> list:
        threads = super().stop()
        if self._started:
            self._mp_stop.set()
            with self._cond:
                queues = [self._out_q] + [p.in_q for p in self._procs.values()]
            for q in queues:
                q.cancel_join_thread()
        return threads
