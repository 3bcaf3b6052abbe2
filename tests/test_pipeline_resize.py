"""``reconfigure_mode="resize"``: allocation changes applied in place (ResizableMapper for thread stages,
ResizableProcessMapper for process stages), no graph rebuilt, nothing dropped, exactly-once in-order delivery and
mid-epoch resume kept, a dead worker process still rebuilds."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from lightning_ext.pipeline import Allocation, Stage, StagedPipeline
from tests.test_pipeline_tuner import Check, Double, RecordIds, _dm, _model, _trainer, _tuner


def _threads_pipeline(n=400, sleep_s=0.0005, **kw):
    stages = [Stage("read", Double(), method="thread", min_workers=0),
              Stage("work", Check(sleep_s), method="thread", min_workers=0)]
    return StagedPipeline(n, stages, 8, **kw)


def _mixed_pipeline(n=400, **kw):
    stages = [Stage("read", Double(), method="thread", min_workers=0),
              Stage("work", Check(0.0005), method="process")]
    return StagedPipeline(n, stages, 8, **kw)


def _reference(make, **kw):
    pipe = make(reconfigure_mode="restart", **kw)
    pipe.sampler.set_epoch(1)
    return torch.cat(list(pipe)).tolist()


def _wait_for(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def test_thread_stages_resize_in_place_every_sample_once_in_order_nothing_dropped_no_rebuild():
    reference = _reference(_threads_pipeline, seed=3)
    assert sorted(reference) == list(range(400)) and reference != list(range(400))
    pipe = _threads_pipeline(seed=3, reconfigure_mode="resize", allocation=Allocation((1, 2), 4))
    pipe.sampler.set_epoch(1)
    rng = np.random.default_rng(0)
    seen, changes = [], 0
    for k, batch in enumerate(pipe):
        seen += batch.tolist()
        if k % 2 == 1 and k < 45:  # every other batch, with 0 workers (inline) and the prefetch depth
            changes += pipe.reconfigure(Allocation((int(rng.integers(0, 5)), int(rng.integers(0, 5))),
                                                   int(rng.integers(1, 5))))
    assert seen == reference
    st = pipe.stats
    assert changes > 15 and st.resizes == changes and st.resize_s > 0
    assert st.rebuilds == 1  # the epoch's first build only: no change built a graph
    assert st.dropped_batches == 0 and st.drained_batches == 0 and st.samples == 400
    assert pipe._graphs == [] and pipe.live_workers() == [0, 0]  # the epoch end stopped every thread


def test_process_stages_resize_in_place_too_every_sample_once_in_order():
    reference = _reference(_mixed_pipeline, seed=5)
    pipe = _mixed_pipeline(seed=5, reconfigure_mode="resize", allocation=Allocation((1, 2), 2))
    pipe.sampler.set_epoch(1)
    changes = {2: Allocation((3, 2), 2), 5: Allocation((0, 3), 3), 8: Allocation((0, 1), 3), 9: Allocation((2, 1), 3),
               12: Allocation((2, 4), 2), 13: Allocation((4, 2), 1), 20: Allocation((1, 3), 2)}
    seen = []
    for k, batch in enumerate(pipe):
        seen += batch.tolist()
        if k in changes:
            assert pipe.reconfigure(changes[k])
    assert seen == reference
    st = pipe.stats
    assert st.resizes == len(changes) and st.rebuilds == 1 and st.dropped_batches == 0
    assert pipe.worker_processes() == []


def test_a_process_stage_resized_to_zero_runs_inline_and_a_dead_worker_still_rebuilds():
    stages = [Stage("read", Double(), method="thread"), Stage("work", Check(0.002), method="process", min_workers=0)]
    reference = torch.cat(list(StagedPipeline(300, stages, 8, seed=2, reconfigure_mode="restart"))).tolist()
    pipe = StagedPipeline(300, stages, 8, seed=2, reconfigure_mode="resize", allocation=Allocation((2, 3), 2),
                          watchdog_interval=0.05)
    pipe.fallback_allocation = Allocation((1, 1), 2)
    seen = []
    for k, batch in enumerate(pipe):
        seen += batch.tolist()
        if k == 3:
            pipe.reconfigure(Allocation((2, 0), 2))  # every process retires after its tasks; inline from then on
        if k == 8:
            assert _wait_for(lambda: pipe.live_workers() == [2, 0]) and pipe.worker_processes() == []
            pipe.reconfigure(Allocation((2, 2), 2))
        if k == 12:
            assert len(pipe.worker_processes()) == 2
            import os
            os.kill(pipe.worker_processes()[0].pid, 9)
    assert seen == reference
    assert pipe.stats.failures == 1 and pipe.allocation == Allocation((1, 1), 2)
    assert pipe.stats.resizes == 2 and pipe.stats.rebuilds == 2  # the first build + the rebuild after the death


@pytest.mark.parametrize("make", [_threads_pipeline, _mixed_pipeline], ids=["threads", "thread+process"])
def test_resume_mid_epoch_after_a_resize_gives_the_same_remaining_stream(make):
    full = make(n=203, seed=1, world_size=2, rank=1)
    full.sampler.set_epoch(4)
    expected = [b.tolist() for b in full]
    pipe = make(n=203, seed=1, world_size=2, rank=1, reconfigure_mode="resize")
    pipe.sampler.set_epoch(4)
    it = iter(pipe)
    first = [next(it).tolist() for _ in range(3)]
    assert pipe.reconfigure(Allocation((3, 4), 3))
    first += [next(it).tolist() for _ in range(2)]
    state = pipe.state_dict()
    assert state["position"] == 5 and state["allocation"] == {"workers": [3, 4], "prefetch": 3}
    assert pipe.stats.resizes == 1 and pipe.stats.rebuilds == 1
    pipe.close()
    resumed = make(n=203, seed=1, world_size=2, rank=1, reconfigure_mode="resize")
    resumed.load_state_dict(state)
    assert resumed.allocation == Allocation((3, 4), 3)
    rest = [b.tolist() for b in resumed]
    assert first + rest == expected


def test_shrinking_retires_workers_after_their_task_and_growing_starts_them():
    pipe = _threads_pipeline(n=2000, sleep_s=0.001, reconfigure_mode="resize", allocation=Allocation((1, 6), 2))
    it = iter(pipe)
    seen = sum((next(it).tolist() for _ in range(3)), [])
    assert pipe.live_workers() == [1, 6]
    workers = list(pipe._graphs[-1].stage_nodes[1]._threads)  # the thread objects themselves
    assert len(workers) == 6
    pipe.reconfigure(Allocation((1, 2), 2))
    seen += sum((next(it).tolist() for _ in range(3)), [])
    assert _wait_for(lambda: pipe.live_workers() == [1, 2]), pipe.live_workers()
    assert _wait_for(lambda: sum(t.is_alive() for t in workers) == 2)  # 4 threads really exited
    pipe.reconfigure(Allocation((0, 5), 2))  # the read stage goes inline: its thread retires
    seen += sum((next(it).tolist() for _ in range(3)), [])
    assert _wait_for(lambda: pipe.live_workers() == [0, 5]), pipe.live_workers()
    for _ in range(len(pipe) - 9):  # (iterating ``it`` again would start a new epoch)
        seen += next(it).tolist()
    assert sorted(seen) == list(range(2000))
    assert pipe.stats.resizes == 2 and pipe.stats.rebuilds == 1 and pipe.stats.dropped_batches == 0


def _slow_square(i):
    time.sleep(0.0002 * (i % 5))
    return i * i


def _fails_at_7(i):
    if i == 7:
        raise ValueError("bad sample 7")
    return i


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_the_resizable_mappers_keep_order_while_another_thread_resizes_them_and_report_errors_in_place(kind):
    pytest.importorskip("torchdata")
    from torchdata.nodes import IterableWrapper

    from lightning_ext.pipeline._resizable import ResizableMapper, ResizableProcessMapper

    cls = ResizableMapper if kind == "thread" else ResizableProcessMapper
    n = 3000 if kind == "thread" else 600
    node = cls(IterableWrapper(range(n)), _slow_square, num_workers=2)
    stop = threading.Event()

    def churn():
        rng = np.random.default_rng(1)
        while not stop.is_set():
            node.resize(int(rng.integers(0, 6)))
            time.sleep(0.002 if kind == "thread" else 0.02)

    t = threading.Thread(target=churn)
    t.start()
    try:
        out = list(node)
    finally:
        stop.set()
        t.join()
    assert out == [i * i for i in range(n)]
    node.stop()
    for p in node.processes():
        p.join(2)

    node = cls(IterableWrapper(range(20)), _fails_at_7, num_workers=3)
    got = [next(node) for _ in range(7)]
    with pytest.raises(ValueError, match="bad sample 7"):
        next(node)
    assert got == list(range(7)) and next(node) == 8
    node.stop()


def test_the_tuner_trains_every_sample_once_with_resize_in_place():
    record, tuner = RecordIds(), _tuner(agent="rl")
    dm = _dm(reconfigure_mode="resize")
    _trainer([tuner, record]).fit(_model(), datamodule=dm)
    for epoch in (0, 1):
        assert sorted(record.ids[epoch]) == sorted(dm._splits["train"].tolist())
    assert len({str(h["next"]) for h in tuner.history}) >= 2
    st = dm.train_pipeline.stats
    assert st.resizes >= 1  # read-stage (thread) and prefetch changes applied in place
