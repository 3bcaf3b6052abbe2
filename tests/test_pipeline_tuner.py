"""StagedPipeline (exactly-once delivery across allocation changes, worker death and resume), the tuning
agents on a simulated pipeline, and PipelineTuner inside Lightning (pipeline and DataLoader modes, resume, DDP)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback, Trainer
from torch import nn

from lightning_ext.callbacks import PipelineTuner
from lightning_ext.datamodules import StagedPipelineDataModule
from lightning_ext.modules import MLPClassifier
from lightning_ext.pipeline import Allocation, Stage, StagedPipeline
from lightning_ext.pipeline.agents import DQNAgent, HillClimber, Observation, SearchSpace
from lightning_ext.testing import assert_same_parameters, crash_and_resume
from tests.conftest import needs_fashion_mnist


class Double:
    def __call__(self, i):
        return i, 2 * i


class Check:
    def __init__(self, sleep_s=0.0):
        self.sleep_s = sleep_s

    def __call__(self, item):
        i, twice = item
        assert twice == 2 * i
        time.sleep(self.sleep_s)
        return np.int64(i)


def _ids_pipeline(n=500, batch_size=8, sleep_s=0.0, **kw):
    stages = [Stage("read", Double(), method="thread", min_workers=0),
              Stage("work", Check(sleep_s), method="process")]
    return StagedPipeline(n, stages, batch_size, **kw)


# -- the pipeline --------------------------------------------------------------------------------------------
def test_every_sample_once_in_the_same_order_whatever_the_allocation_does():
    static = _ids_pipeline(seed=3)
    static.sampler.set_epoch(1)
    reference = torch.cat(list(static)).tolist()
    assert sorted(reference) == list(range(500)) and reference != list(range(500))

    pipe = _ids_pipeline(seed=3)
    pipe.sampler.set_epoch(1)
    rng = np.random.default_rng(0)
    seen = []
    for k, batch in enumerate(pipe):
        seen += batch.tolist()
        if k % 5 == 2:  # change often, including inline (0 workers) and prefetch
            pipe.reconfigure(Allocation((int(rng.integers(0, 4)), int(rng.integers(1, 4))), int(rng.integers(1, 5))))
    assert seen == reference
    assert pipe.stats.rebuilds + pipe.stats.resizes > 5 and pipe.stats.samples == 500
    assert pipe.worker_processes() == []  # the epoch end stopped every worker


def test_resume_mid_epoch_from_state_dict_and_sharding():
    pipe = _ids_pipeline(n=203, seed=1, world_size=2, rank=1)
    pipe.sampler.set_epoch(4)
    it = iter(pipe)
    first = [next(it).tolist() for _ in range(5)]
    state = pipe.state_dict()
    pipe.close()
    resumed = _ids_pipeline(n=203, seed=1, world_size=2, rank=1)
    resumed.load_state_dict(state)
    rest = [b.tolist() for b in resumed]
    full = _ids_pipeline(n=203, seed=1, world_size=2, rank=1)
    full.sampler.set_epoch(4)
    assert first + rest == [b.tolist() for b in full]
    other = _ids_pipeline(n=203, seed=1, world_size=2, rank=0)
    other.sampler.set_epoch(4)
    ids = sum(first + rest, []) + torch.cat(list(other)).tolist()
    assert set(ids) == set(range(203)) and len(ids) == 204  # one index repeated to pad, like DistributedSampler


def test_a_dead_worker_is_replaced_with_the_fallback_allocation_and_nothing_is_lost():
    pipe = _ids_pipeline(n=400, allocation=Allocation((2, 3), 2), sleep_s=0.002, watchdog_interval=0.05)
    pipe.fallback_allocation = Allocation((1, 1), 2)
    seen = []
    for k, batch in enumerate(pipe):
        seen += batch.tolist()
        if k == 3:
            os.kill(pipe.worker_processes()[0].pid, 9)
    assert sorted(seen) == list(range(400))
    assert pipe.stats.failures == 1 and pipe.allocation == Allocation((1, 1), 2)
    assert "exited with code -9" in pipe.failure_log[0]


def test_bad_configurations_are_refused():
    with pytest.raises(ValueError, match="unique"):
        StagedPipeline(10, [Stage("a", abs), Stage("a", abs)], 2)
    pipe = _ids_pipeline()
    with pytest.raises(ValueError, match="2 stages"):
        pipe.reconfigure(Allocation((1,), 2))
    with pytest.raises(ValueError, match="outside"):
        pipe.reconfigure(Allocation((1, 0), 2))  # the process stage needs >= 1 worker
    with pytest.raises(ValueError, match="method"):
        Stage("x", abs, method="gpu")


# -- the agents, on a simulated pipeline (no timing noise) --------------------------------------------------------
RATES = (2500.0, 600.0, 1200.0)  # samples/s one worker of each stage delivers


def _simulated(a: Allocation, cores=6, rng=None) -> float:
    t = min(r * w for r, w in zip(RATES, a.workers)) * min(1.0, cores / max(1, a.total))
    t *= 1 - 0.15 / a.prefetch
    return t * (1 + 0.03 * rng.standard_normal()) if rng is not None else t


def _run(agent, space, decisions, rng):
    a = space.clip(Allocation((1, 1, 1), 2))
    proposals = []
    for _ in range(decisions):
        t = _simulated(a, rng=rng)
        busy = tuple(min(1.0, t / (r * max(w, 1))) for r, w in zip(RATES, a.workers))
        a = agent.act(Observation(a, t, 0.0, busy, batch_bytes=1000.0))
        proposals.append(a)
    return proposals


def test_rl_agent_finds_a_near_optimal_allocation_within_budget_and_hill_climber_stops_at_a_local_optimum():
    space = SearchSpace(("read", "decode", "augment"), (1, 1, 1), (8, 8, 8), 8, (1, 4), memory_budget=14_000)
    oracle = max(_simulated(a) for a in space.all_allocations((1, 2, 3, 4)) if space.valid(a, 1000.0))
    agent = DQNAgent(space, explore_decisions=120, seed=0)
    proposals = _run(agent, space, 150, np.random.default_rng(0))
    assert all(space.valid(a, 1000.0) for a in proposals)  # CPU budget and memory budget respected
    assert agent.settled and _simulated(agent.best) >= 0.95 * oracle, (agent.best, oracle)
    assert proposals[-1] == agent.best

    climber = HillClimber(space, min_gain=0.05)
    proposals = _run(climber, space, 60, np.random.default_rng(0))
    assert climber.settled and all(space.valid(a, 1000.0) for a in proposals)
    assert proposals[-1] == climber.best and _simulated(climber.best) > 1.5 * _simulated(space.minimum())
    # one increment at a time cannot leave a plateau where two stages are co-bottlenecks: a local optimum
    assert _simulated(climber.best) < _simulated(agent.best)


def test_agents_round_trip_their_state():
    space = SearchSpace(("a", "b", "c"), (1, 1, 1), (6, 6, 6), 6)
    for make in (lambda: DQNAgent(space, explore_decisions=30, seed=1), lambda: HillClimber(space)):
        a, b = make(), make()
        _run(a, space, 20, np.random.default_rng(1))
        b.load_state_dict(a.state_dict())
        obs = Observation(Allocation((2, 2, 2), 2), 900.0, 0.1, (0.5, 0.9, 0.7), 100.0)
        assert a.act(obs) == b.act(obs)
        assert a.state_dict()["decisions"] == b.state_dict()["decisions"] == 21


# -- issue 16: learning within the budget, the busy-time baseline, action space = oracle grid, I/O budget,
# -- the cost of an allocation change ----------------------------------------------------------------------------
def test_the_q_network_learns_within_the_exploration_budget_and_the_ablations_do_not():
    space = SearchSpace(("read", "decode", "augment"), (1, 1, 1), (8, 8, 8), 8, (2, 2))
    agent = DQNAgent(space, explore_decisions=60, epsilon_decisions=60, seed=0)
    _run(agent, space, 30, np.random.default_rng(0))
    assert agent.first_update_decision == 9  # 8 transitions stored after the 9th decision
    assert agent.updates == 4 * (30 - 8) and agent.parameter_change() > 0
    restored = DQNAgent(space, explore_decisions=60, epsilon_decisions=60, seed=0)
    restored.load_state_dict(agent.state_dict())
    assert restored.updates == agent.updates and restored.first_update_decision == 9
    for kw in (dict(updates_per_decision=0), dict(updates_per_decision=0, epsilon_start=1.0, epsilon_end=1.0)):
        ablation = DQNAgent(space, explore_decisions=60, seed=0, **kw)
        _run(ablation, space, 30, np.random.default_rng(0))
        assert ablation.updates == 0 and ablation.parameter_change() == 0.0 and ablation.best is not None


def test_the_exploration_schedule_does_not_depend_on_the_budget_so_budgets_are_prefixes():
    space = SearchSpace(("read", "decode", "augment"), (1, 1, 1), (8, 8, 8), 8, (2, 2))
    kw = dict(epsilon_decisions=10, learn_start=4, updates_per_decision=1, batch_size=8, seed=3)
    short, long = DQNAgent(space, explore_decisions=30, **kw), DQNAgent(space, explore_decisions=240, **kw)
    assert _run(short, space, 29, np.random.default_rng(5)) == _run(long, space, 29, np.random.default_rng(5))
    assert short.updates == long.updates > 0
    assert short.best_measured() == long.best_measured() and short.epsilon == long.epsilon


def test_busy_time_baseline_allocates_in_proportion_to_measured_busy_time():
    from lightning_ext.pipeline.agents import BusyTimeAllocator

    space = SearchSpace(("read", "decode", "augment"), (1, 1, 1), (14, 14, 14), 14, (2, 2))
    agent = BusyTimeAllocator(space)
    # 1/1/1 delivers 250 samples/s; stages cost 2/4/1 ms per sample -> busy shares 0.5, 1.0, 0.25 per worker
    nxt = agent.act(Observation(Allocation((1, 1, 1), 2), 250.0, 0.5, (0.5, 1.0, 0.25)))
    assert nxt == Allocation((4, 8, 2), 2) and not agent.settled
    # at 4/8/2 (2000 samples/s) every worker is busy all the time: the same costs, so it settles there
    assert agent.act(Observation(nxt, 2000.0, 0.0, (1.0, 1.0, 1.0))) == nxt
    assert agent.settled and agent.best == nxt and agent.decisions == 2
    # I/O threads and CPU workers are split within their own budgets
    io_space = SearchSpace(("read", "decode", "augment"), (1, 1, 1), (12, 4, 4), 4, (2, 2), None,
                           (True, False, False), 12)
    got = BusyTimeAllocator(io_space).act(Observation(Allocation((1, 1, 1), 2), 100.0, 0.9, (1.0, 0.3, 0.1)))
    assert got == Allocation((12, 3, 1), 2)


def test_busy_time_baseline_resumes_from_its_state_dict_with_the_same_decisions():
    from lightning_ext.pipeline.agents import BusyTimeAllocator

    space = SearchSpace(("read", "decode", "augment"), (1, 1, 1), (14, 14, 14), 14, (2, 2))
    first = Observation(Allocation((1, 1, 1), 2), 250.0, 0.5, (0.5, 1.0, 0.25))
    second = Observation(Allocation((4, 8, 2), 2), 1500.0, 0.0, (1.0, 0.5, 1.0))
    whole = BusyTimeAllocator(space, max_rounds=3)
    whole.act(first)
    resumed = BusyTimeAllocator(space, max_rounds=3)
    resumed.load_state_dict(whole.state_dict())
    assert resumed.act(second) == whole.act(second)
    assert (resumed.decisions, resumed.settled, resumed.measured) == (whole.decisions, whole.settled, whole.measured)


def _reachable(space):
    start = space.minimum()
    seen, todo = {start}, [start]
    while todo:
        a = todo.pop()
        for act in space.actions():
            b = space.apply(a, act)
            if b is not None and b not in seen:
                seen.add(b)
                todo.append(b)
    return seen


@pytest.mark.parametrize("prefetch", [(2, 2), (1, 3)])
def test_the_action_space_reaches_exactly_the_oracle_grid(prefetch):
    for space in (SearchSpace(("a", "b", "c"), (1, 1, 1), (6, 6, 6), 6, prefetch),
                  SearchSpace(("a", "b", "c"), (1, 1, 1), (5, 3, 3), 3, prefetch, None, (True, False, False), 5)):
        grid = space.all_allocations()
        assert len(grid) == len(set(grid)) and _reachable(space) == set(grid)
        assert {a.prefetch for a in grid} == set(range(prefetch[0], prefetch[1] + 1))
    assert not any(a[0] == "prefetch" for a in SearchSpace(("a",), (1,), (4,), 4, (2, 2)).actions())


def test_io_threads_count_against_their_own_budget_not_the_cpu_budget():
    stages = [Stage("read", abs, method="thread"), Stage("decode", abs), Stage("augment", abs)]
    assert [s.budget for s in stages] == ["io", "cpu", "cpu"]
    space = SearchSpace.for_stages(stages, cpu_budget=2, prefetch_range=(2, 2), io_budget=12)
    assert space.max_workers == (12, 2, 2)
    assert space.valid(Allocation((12, 1, 1), 2)) and space.cpu_workers(Allocation((12, 1, 1), 2)) == 2
    assert not space.valid(Allocation((12, 2, 1), 2)) and not space.valid(Allocation((13, 1, 1), 2))
    assert space.even_split(2) == Allocation((12, 1, 1), 2)
    # a thread stage may declare itself CPU-bound; without an I/O budget everything shares the CPU budget
    charged = SearchSpace.for_stages([Stage("read", abs, "thread", budget="cpu")] + stages[1:], 3, (2, 2), None, 12)
    assert not charged.valid(Allocation((2, 1, 1), 2))
    assert not SearchSpace.for_stages(stages, 3, (2, 2)).valid(Allocation((2, 1, 1), 2))


@pytest.mark.parametrize("mode", ["restart", "drain"])
def test_the_cost_of_an_allocation_change_is_measured_and_draining_drops_nothing(mode):
    static = _ids_pipeline(n=400, sleep_s=0.001, seed=2)
    reference = torch.cat(list(static)).tolist()
    pipe = _ids_pipeline(n=400, sleep_s=0.001, seed=2, allocation=Allocation((1, 2), 4), reconfigure_mode=mode)
    seen, changes = [], {3: Allocation((1, 1), 4), 9: Allocation((2, 3), 2), 10: Allocation((1, 2), 4),
                         20: Allocation((0, 1), 1)}
    for k, batch in enumerate(pipe):
        seen += batch.tolist()
        assert len(pipe._graphs) <= 2
        if k in changes:  # 10: a change while the previous graph still drains
            assert pipe.reconfigure(changes[k])
    assert seen == reference  # exactly once, in order, either way
    st = pipe.stats
    assert st.rebuilds == 5 and st.rebuild_s > 0  # the epoch's first build + 4 changes, each timed
    assert st.dropped_batches > 0  # work in flight beyond what is handed out is thrown away
    if mode == "restart":
        assert st.drained_batches == 0
    else:  # the old graph handed out its ready batches, at most its prefetch depth per change
        assert 0 < st.drained_batches <= 4 + 4 + 2 + 4
    assert pipe.worker_processes() == []


# -- Lightning ----------------------------------------------------------------------------------------------------
class RecordIds(Callback):
    """Records the sample ids (x[:, 0]) of every trained batch, per epoch; optionally writes them per rank."""

    def __init__(self, out_dir=None):
        self.ids, self.out_dir = {}, out_dir

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.ids.setdefault(trainer.current_epoch, []).extend(batch[0][:, 0].long().tolist())

    def on_fit_end(self, trainer, pl_module):
        if self.out_dir:
            tuner = next(c for c in trainer.callbacks if isinstance(c, PipelineTuner))
            Path(self.out_dir, f"rank{trainer.global_rank}.json").write_text(json.dumps(
                {"ids": self.ids, "history": [h["next"] for h in tuner.history]}))


def _dm(**kw):
    args = dict(workload="synthetic", batch_size=16, train_samples=480, test_samples=32, val_fraction=0.0,
                synthetic_cpu_ms=0.05, seed=0)
    args.update(kw)
    return StagedPipelineDataModule(**args)


def _model():
    torch.manual_seed(0)
    return MLPClassifier(num_features=8, num_classes=2, hidden=[16], lr=0.01)


def _tuner(**kw):
    args = dict(agent="rl", cpu_budget=4, decide_every_n_batches=3, min_window_s=0.0, warmup_batches=1,
                explore_decisions=6)
    args.update(kw)
    return PipelineTuner(**args)


def _trainer(callbacks, **kw):
    args = dict(accelerator="cpu", devices=1, max_epochs=2, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0)
    args.update(kw)
    return Trainer(callbacks=callbacks, **args)


@pytest.mark.parametrize("agent", ["rl", "hill_climb"])
def test_tuner_changes_the_allocation_while_every_sample_is_trained_once(agent, tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    record, tuner = RecordIds(), _tuner(agent=agent, plot_path=str(tmp_path / "tuning.png"))
    trainer = _trainer([tuner, record], logger=CSVLogger(str(tmp_path), name="", version=""))
    dm = _dm()
    trainer.fit(_model(), datamodule=dm)
    for epoch in (0, 1):
        assert sorted(record.ids[epoch]) == sorted(dm._splits["train"].tolist())
    allocations = {str(h["next"]) for h in tuner.history}
    assert len(tuner.history) >= 10 and len(allocations) >= 2  # it decided and acted
    # the process stage within the CPU budget, the reading threads within the (default 4x) I/O budget
    assert all(h["workers"][1] <= 4 and h["workers"][0] <= 16 for h in tuner.history)
    assert dm.train_pipeline.stats.rebuilds >= 2
    assert (tmp_path / "tuning.png").stat().st_size > 0
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0]
    assert "pipeline/throughput" in header and "pipeline/workers_transform" in header


def test_crash_and_resume_restores_the_agent_and_trains_like_an_uninterrupted_run(tmp_path):
    full, resumed, info = crash_and_resume(_model, _dm, lambda: [_tuner(explore_decisions=8)], max_epochs=3,
                                           crash_epoch=2, tmp_path=tmp_path, limit_val_batches=0,
                                           num_sanity_val_steps=0)
    assert_same_parameters(full, resumed)  # the data order does not depend on the allocation
    tuner, uninterrupted = info["resumed_callbacks"][0], info["full_callbacks"][0]
    # the resumed agent continued from the checkpoint: a fresh one could decide at most 30 / 3 = 10 times in the
    # last epoch (window counts vary a little: a window after a change skips warm-up batches)
    assert tuner.agent.decisions == len(tuner.history) > 12
    assert abs(tuner.agent.decisions - uninterrupted.agent.decisions) <= 3
    assert tuner.agent.settled and tuner.settled_at_s is not None and tuner.best_allocation is not None
    saved = torch.load(info["checkpoint"], weights_only=False)["callbacks"]
    state = next(v for k, v in saved.items() if "PipelineTuner" in k)
    assert state["agent"]["decisions"] == tuner.agent.decisions and "q" in state["agent"]


class CrashAtStep(Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError("crash")


def test_mid_epoch_resume_trains_every_sample_once(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    first = RecordIds()
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=7, save_top_k=-1)
    with pytest.raises(RuntimeError, match="crash"):
        _trainer([_tuner(), first, ckpt, CrashAtStep(10)], enable_checkpointing=True, max_epochs=1).fit(
            _model(), datamodule=_dm())
    path = next(tmp_path.glob("*step=7.ckpt"))
    second = RecordIds()
    dm = _dm()
    _trainer([_tuner(), second], max_epochs=1).fit(_model(), datamodule=dm, ckpt_path=str(path), weights_only=False)
    trained = first.ids[0][: 7 * 16] + second.ids[0]
    assert sorted(trained) == sorted(dm._splits["train"].tolist())


def test_dataloader_mode_tunes_workers_and_prefetch_at_epoch_boundaries():
    from torch.utils.data import DataLoader, TensorDataset

    x = torch.randn(256, 8)
    ds = TensorDataset(x, (x[:, 0] > 0).long())
    loader = DataLoader(ds, batch_size=32, num_workers=0)
    tuner = PipelineTuner(agent="hill_climb", mode="dataloader", cpu_budget=2, max_prefetch=3)
    workers = []

    class Watch(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            dl = trainer.train_dataloader
            workers.append((dl.num_workers, dl.prefetch_factor))

    _trainer([tuner, Watch()], max_epochs=4).fit(_model(), train_dataloaders=loader)
    assert workers[0] == (0, None)
    assert any(w > 0 and p is not None for w, p in workers[1:])  # raised num_workers with a prefetch_factor
    assert len(tuner.history) == 4


def test_clear_errors():
    with pytest.raises(ValueError, match="agent"):
        PipelineTuner(agent="ppo")
    with pytest.raises(ValueError, match="mode"):
        PipelineTuner(mode="auto")
    with pytest.raises(ValueError, match="cpu_budget"):
        PipelineTuner(cpu_budget=0)
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(TensorDataset(torch.randn(8, 8), torch.zeros(8, dtype=torch.long)), batch_size=4)
    with pytest.raises(TypeError, match="mode='dataloader'"):
        _trainer([PipelineTuner()], max_epochs=1).fit(_model(), train_dataloaders=loader)
    with pytest.raises(ValueError, match="workload"):
        StagedPipelineDataModule("criteo")
    with pytest.raises(ValueError, match="unknown stages"):
        dm = _dm(workers={"decode": 2})
        dm.setup()
        dm.train_dataloader()


# -- workloads ----------------------------------------------------------------------------------------------------
def test_movielens_rows_pipeline_parses_hashes_and_normalises(tmp_path):
    dm = StagedPipelineDataModule("movielens_rows", batch_size=32, train_samples=200, test_samples=50,
                                  cache_dir=str(tmp_path), workers={"parse": 2})
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 67) and x.dtype == torch.float32 and set(y.tolist()) <= {0, 1}
    assert x[:, 3:].abs().sum(1).min() >= 1  # hashed categoricals present
    assert x[:, :3].abs().max() < 10  # standardised dense fields
    assert len(dm._splits["test"]) == 50 and not set(dm._splits["test"]) & set(dm._splits["train"])
    dm.teardown()


@needs_fashion_mnist
def test_fashion_mnist_png_pipeline_decodes_and_augments(tmp_path):
    dm = StagedPipelineDataModule("fashion_mnist_png", batch_size=16, train_samples=48, test_samples=16,
                                  cache_dir=str(tmp_path), val_fraction=0.25)
    dm.setup()
    assert len(list(tmp_path.glob("fashion_mnist_png_train_48/*.png"))) == 48
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 1, 28, 28) and y.dtype == torch.long
    xt, _ = next(iter(dm.test_dataloader()))
    assert abs(float(xt.mean())) < 1.0
    dm.teardown()


@pytest.mark.ddp
@pytest.mark.slow
def test_ddp_rank_zero_decides_and_every_rank_applies_it(tmp_path):
    record = RecordIds(out_dir=str(tmp_path))
    dm = _dm(batch_size=8, train_samples=240)
    _trainer([_tuner(), record], devices=2, strategy="ddp_spawn", max_epochs=1).fit(_model(), datamodule=dm)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["history"] == r1["history"] and len({str(h) for h in r0["history"]}) >= 2
    dm.setup()
    assert sorted(r0["ids"]["0"] + r1["ids"]["0"]) == sorted(dm._splits["train"].tolist())


# -- house rules: validation, optional dependency, paths ------------------------------------------------------------
NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("kwargs, name", [
    ({"agent": "ppo"}, "agent"), ({"mode": "auto"}, "mode"), ({"cpu_budget": 0}, "cpu_budget"),
    ({"cpu_budget": 2.5}, "cpu_budget"), ({"memory_budget_mb": NAN}, "memory_budget_mb"),
    ({"memory_budget_mb": -1.0}, "memory_budget_mb"), ({"decide_every_n_batches": 0}, "decide_every_n_batches"),
    ({"min_window_s": NAN}, "min_window_s"), ({"min_window_s": INF}, "min_window_s"),
    ({"min_window_s": -0.1}, "min_window_s"), ({"warmup_batches": -1}, "warmup_batches"),
    ({"warmup_batches": 20}, "warmup_batches"), ({"max_prefetch": 0}, "max_prefetch"),
    ({"explore_decisions": 0}, "explore_decisions"), ({"min_gain": NAN}, "min_gain"), ({"seed": 1.5}, "seed"),
])
def test_pipeline_tuner_refuses_bad_values_naming_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name) as err:
        PipelineTuner(**kwargs)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("kwargs, name", [
    ({"workload": "criteo"}, "workload"), ({"batch_size": 0}, "batch_size"), ({"prefetch": 0}, "prefetch"),
    ({"train_samples": 0}, "train_samples"), ({"test_samples": -5}, "test_samples"),
    ({"val_fraction": NAN}, "val_fraction"), ({"val_fraction": 1.0}, "val_fraction"),
    ({"read_latency_ms": INF}, "read_latency_ms"), ({"read_latency_ms": -1.0}, "read_latency_ms"),
    ({"synthetic_cpu_ms": NAN}, "synthetic_cpu_ms"), ({"hash_buckets": 0}, "hash_buckets"),
    ({"workers": {"read": -1}}, "workers"), ({"multiprocessing_context": "threads"}, "multiprocessing_context"),
])
def test_staged_pipeline_datamodule_refuses_bad_values_naming_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        StagedPipelineDataModule(**kwargs)


def test_pipeline_parts_refuse_bad_values_naming_the_argument():
    stage = Stage("read", abs, method="thread")
    table = [
        (lambda: Stage("x", abs, min_workers=-1), "min_workers"),
        (lambda: Stage("x", abs, min_workers=2, max_workers=1), "max_workers"),
        (lambda: Allocation((1, -1)), "worker count"),
        (lambda: Allocation((1,), prefetch=0), "prefetch"),
        (lambda: StagedPipeline(0, [stage], 4), "num_samples"),
        (lambda: StagedPipeline(10, [stage], 0), "batch_size"),
        (lambda: StagedPipeline(10, [stage], 4, watchdog_interval=NAN), "watchdog_interval"),
        (lambda: StagedPipeline(10, [stage], 4, max_restarts=-1), "max_restarts"),
        (lambda: StagedPipeline(10, [stage], 4, world_size=0), "world_size"),
        (lambda: SearchSpace(("a",), (1,), (2,), 0), "cpu_budget"),
        (lambda: SearchSpace(("a",), (1,), (2,), 2, memory_budget=NAN), "memory_budget"),
        (lambda: HillClimber(SearchSpace(("a",), (1,), (2,), 2), min_gain=-0.1), "min_gain"),
        (lambda: DQNAgent(SearchSpace(("a",), (1,), (2,), 2), explore_decisions=0), "explore_decisions"),
        (lambda: DQNAgent(SearchSpace(("a",), (1,), (2,), 2), gamma=NAN), "gamma"),
        (lambda: DQNAgent(SearchSpace(("a",), (1,), (2,), 2), lr=0.0), "lr"),
        (lambda: DQNAgent(SearchSpace(("a",), (1,), (2,), 2), explore_decisions=8, learn_start=8), "learn_start"),
        (lambda: SearchSpace(("a", "b"), (1, 1), (2, 2), 2, io_stages=(True, False)), "io_budget"),
        (lambda: Stage("x", abs, budget="gpu"), "budget"),
        (lambda: StagedPipeline(10, [stage], 4, reconfigure_mode="later"), "reconfigure_mode"),
        (lambda: PipelineTuner(min_prefetch=3, max_prefetch=2), "min_prefetch"),
        (lambda: PipelineTuner(agent="busy_time", mode="dataloader"), "busy_time"),
    ]
    for make, name in table:
        with pytest.raises(ValueError, match=name):
            make()


def test_a_missing_torchdata_is_reported_at_construction_with_the_install_line(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torchdata", None)  # makes `import torchdata` fail
    for make in (lambda: PipelineTuner(), lambda: StagedPipelineDataModule("synthetic")):
        with pytest.raises(ModuleNotFoundError, match="pip install"):
            make()


def test_importing_the_facades_and_the_pipeline_package_does_not_import_torchdata():
    import subprocess
    import sys

    code = ("import sys, lightning_ext.callbacks, lightning_ext.datamodules, lightning_ext.pipeline; "
            "from lightning_ext.callbacks import PipelineTuner; print('torchdata' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_pipeline_uses_the_shared_epoch_sampler_and_caches_under_the_cache_root(tmp_path, monkeypatch):
    from lightning_ext.core.sampling import EpochSampler as Shared
    from lightning_ext.pipeline import EpochSampler

    assert EpochSampler is Shared and isinstance(_ids_pipeline().sampler, Shared)
    monkeypatch.setenv("LIGHTNING_EXT_CACHE", str(tmp_path))
    assert StagedPipelineDataModule("synthetic").cache_dir == tmp_path / "pipeline"
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ValueError, match="cache_dir"):
        StagedPipelineDataModule("synthetic", cache_dir=str(tmp_path / "a_file"))


def test_an_incomplete_cached_folder_is_written_again(tmp_path):
    from lightning_ext.pipeline.workloads import write_movielens_rows

    folder = write_movielens_rows(tmp_path)
    rows = (folder / "rows.txt").read_bytes()
    (folder / "stats.json").unlink()  # COMPLETE is still there, a file it needs is not
    assert write_movielens_rows(tmp_path) == folder
    assert (folder / "stats.json").is_file() and (folder / "rows.txt").read_bytes() == rows
    assert [p.name for p in tmp_path.iterdir()] == ["movielens_rows"]  # no staging folder left behind


def test_plot_path_is_relative_to_the_log_dir_and_none_disables_it(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    for plot_path in ("plots/tuning.png", None):
        tuner = _tuner(agent="hill_climb", plot_path=plot_path)
        logger = CSVLogger(str(tmp_path), name="run", version=str(plot_path is None))
        _trainer([tuner], logger=logger, max_epochs=1).fit(_model(), datamodule=_dm(train_samples=160))
        assert tuner.history
        pngs = list(Path(logger.log_dir).rglob("*.png"))
        assert pngs == ([Path(logger.log_dir) / "plots" / "tuning.png"] if plot_path else [])
