"""``PipelineTuner``: learns, while training runs, how to split CPUs across the stages of the input pipeline.

InTune (Nagrecha et al., "InTune: Reinforcement Learning-based Data Pipeline Optimization for Deep
Recommendation Models", RecSys 2023, arXiv 2308.08500; no official code). The functional core lives in
:mod:`lightning_ext.pipeline` (the staged pipeline, the RL agent, the AUTOTUNE-like hill climber); this
callback measures windows of training, asks the agent for the next allocation and applies it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Literal, Optional, get_args

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_ext.core.optional import require
from lightning_ext.core.paths import output_path
from lightning_ext.core.plotting import new_figure, save_figure
from lightning_ext.core.validation import (
    NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, check_choice, check_non_negative, check_number,
    check_positive, check_positive_int,
)
from lightning_ext.pipeline.agents import Agent, BusyTimeAllocator, DQNAgent, HillClimber, Observation, SearchSpace
from lightning_ext.pipeline.staged import Allocation, Stage, StagedPipeline
from lightning_ext.core.paths import check_path_argument

AgentName = Literal["rl", "hill_climb", "busy_time"]
Mode = Literal["pipeline", "dataloader"]
AGENTS: tuple[str, ...] = get_args(AgentName)
#: default RL exploration: decisions are windows of batches in pipeline mode, whole epochs in dataloader mode
PIPELINE_EXPLORE_DECISIONS = 100
DATALOADER_EXPLORE_DECISIONS = 6
MODES: tuple[str, ...] = get_args(Mode)


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def default_memory_budget() -> Optional[float]:
    """Half of the available RAM, as tf.data AUTOTUNE (``kRamBudgetShare = 0.5``); ``None`` (no limit) if unknown."""
    try:
        return 0.5 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        return None


def plot_tuning(history: list[dict], stage_names: list[str], path: str | os.PathLike, title: str = "") -> Path:
    """Throughput and workers per stage (and prefetch) over time, from a tuner's ``history``; saves a PNG.

    Drawn with :mod:`lightning_ext.core.plotting` (matplotlib's object API, the backend left alone) and written
    atomically; returns ``path``.
    """
    t = [h["time_s"] for h in history]
    fig, (ax1, ax2) = new_figure(2, 1, figsize=(8, 5), sharex=True)
    ax1.plot(t, [h["throughput"] for h in history], lw=1)
    ax1.set_ylabel("samples/s")
    if title:
        ax1.set_title(title)
    for i, name in enumerate(stage_names):
        ax2.step(t, [h["workers"][i] for h in history], where="post", label=name)
    ax2.step(t, [h["prefetch"] for h in history], where="post", ls="--", label="prefetch")
    settled = [h["time_s"] for h in history if h.get("settled")]
    for ax in (ax1, ax2):
        if settled:
            ax.axvline(settled[0], color="grey", ls=":", lw=1)
    ax2.set_ylabel("workers")
    ax2.set_xlabel("seconds")
    ax2.legend(fontsize=7, loc="upper left", ncol=len(stage_names) + 1)
    return save_figure(fig, path)


def _batch_len(batch: Any) -> int:
    if hasattr(batch, "shape") and len(batch.shape):
        return int(batch.shape[0])
    if isinstance(batch, (list, tuple)) and batch:
        return _batch_len(batch[0])
    if isinstance(batch, dict) and batch:
        return _batch_len(next(iter(batch.values())))
    return 1


class PipelineTuner(Callback):
    """Tunes the input pipeline's CPU allocation while training runs: an RL agent (InTune) or a hill climber.

    ``mode="pipeline"`` (with :class:`~lightning_ext.datamodules.StagedPipelineDataModule` or any training
    loader that is a :class:`~lightning_ext.pipeline.StagedPipeline`): every ``decide_every_n_batches``
    batches the tuner measures the window (samples/s delivered to the trainer, the trainer's data-wait
    fraction, each stage's busy fraction, estimated buffer memory) and the agent moves CPU units between
    stages, adds or releases one, or changes the prefetch depth, within ``cpu_budget`` workers and
    ``memory_budget_mb``. The pipeline resizes its worker pools in place (``reconfigure_mode="resize"``;
    the other modes build a new graph at the next unused batch), so no sample is lost or repeated.
    If a worker process dies, the pipeline rebuilds with the tuner's last good allocation and the agent is
    told (reward -1).

    ``mode="dataloader"`` (a plain ``torch.utils.data.DataLoader``): ``num_workers`` and ``prefetch_factor``
    are tuned once per epoch, at the epoch boundary, the only point where they take effect (persistent
    workers are shut down so the change applies; ``prefetch_factor`` is set together with ``num_workers``).
    Each decision in this mode therefore costs a whole epoch (spent on a possibly slower setting), so the
    RL agent's default exploration is :data:`DATALOADER_EXPLORE_DECISIONS` decisions (epochs), not the
    pipeline mode's 100 windows. When fit ends (or stops on an error) the DataLoader is set to the best
    allocation the agent measured (:attr:`final_allocation`), or back to the user's own settings when it
    has none yet, never left on the last exploratory one.

    Agents: ``"rl"`` is a DQN (2x64 MLP, learning from its 9th decision, epsilon-greedy for
    ``explore_decisions`` decisions, then it settles on the best allocation it measured and watches for
    drift); ``"hill_climb"`` is tf.data AUTOTUNE's HILL_CLIMB on measured throughput; ``"busy_time"`` splits
    each budget in proportion to the stages' measured busy time per sample (a cost model, as AUTOTUNE and
    Plumber use; pipeline mode only). Workers of I/O stages (thread stages, unless a :class:`Stage` says
    otherwise) count against ``io_budget``, not ``cpu_budget``: threads that wait on reads cost little CPU. The agent, its best allocation and the tuning history are saved in
    checkpoints, so a resumed run continues where it left off. Under DDP rank 0 decides on measurements
    averaged over ranks and broadcasts the allocation; each rank runs it on its own pipeline with
    ``cpu_budget`` (default: this machine's CPUs divided by the processes per machine).

    Logged (``trainer.logger``, rank 0): ``pipeline/throughput``, ``pipeline/wait_fraction``,
    ``pipeline/workers_<stage>``, ``pipeline/prefetch``, ``pipeline/settled``. ``plot_path`` saves a PNG of
    throughput and allocation over time when fitting ends (relative to ``trainer.log_dir``).

    Args:
        agent: ``"rl"`` or ``"hill_climb"``.
        mode: ``"pipeline"`` or ``"dataloader"``.
        cpu_budget: most workers of CPU stages in total per process (``None``: CPUs per process on this machine).
        io_budget: most threads of I/O stages in total per process (``None``: 4x the CPU budget).
        memory_budget_mb: most estimated in-flight batch memory (``None``: half the available RAM).
        decide_every_n_batches: batches per measurement window (``mode="pipeline"``).
        min_window_s: a window also lasts at least this many seconds (short windows are noisy).
        warmup_batches: batches skipped after a change before measuring (the pipeline refills).
        min_prefetch: lowest prefetch depth (``min_prefetch == max_prefetch``: prefetch is not tuned).
        max_prefetch: highest prefetch depth (``prefetch_factor`` in dataloader mode).
        explore_decisions: decisions the RL agent explores before settling (``None``: 100 windows in
            pipeline mode, :data:`DATALOADER_EXPLORE_DECISIONS` in dataloader mode, where each one is an epoch).
        min_gain: relative gain the hill climber needs to keep an increment.
        seed: seed of the RL agent.
        plot_path: save a throughput/allocation plot here at the end of fit, relative to ``trainer.log_dir``
            (an absolute path is used as given; ``None``: no plot).
        verbose: print every decision (rank 0).

    Example:
        >>> from lightning.pytorch import Trainer
        >>> tuner = PipelineTuner(agent="rl", cpu_budget=4, decide_every_n_batches=20)
        >>> trainer = Trainer(callbacks=[tuner], max_epochs=1)  # doctest: +SKIP
    """

    def __init__(
        self,
        agent: AgentName = "rl",
        mode: Mode = "pipeline",
        cpu_budget: Optional[PositiveInt] = None,
        io_budget: Optional[PositiveInt] = None,
        memory_budget_mb: Optional[PositiveFloat] = None,
        decide_every_n_batches: PositiveInt = 20,
        min_window_s: NonNegativeFloat = 0.5,
        warmup_batches: NonNegativeInt = 2,
        min_prefetch: PositiveInt = 1,
        max_prefetch: PositiveInt = 8,
        explore_decisions: Optional[PositiveInt] = None,
        min_gain: NonNegativeFloat = 0.05,
        seed: int = 0,
        plot_path: Optional[str] = None,
        verbose: bool = False,
    ) -> None:
        require("torchdata", "PipelineTuner")
        check_choice("agent", agent, AGENTS)
        check_choice("mode", mode, MODES)
        if cpu_budget is not None:
            check_positive_int("cpu_budget (workers in total, or None)", cpu_budget)
        if io_budget is not None:
            check_positive_int("io_budget (I/O threads in total, or None)", io_budget)
        check_positive_int("min_prefetch", min_prefetch)
        if agent == "busy_time" and mode != "pipeline":
            raise ValueError("agent='busy_time' needs per-stage busy times: use it with mode='pipeline'.")
        if memory_budget_mb is not None:
            check_positive("memory_budget_mb (or None)", memory_budget_mb)
        for name, value in (("decide_every_n_batches", decide_every_n_batches), ("max_prefetch", max_prefetch)):
            check_positive_int(name, value)
        if min_prefetch > max_prefetch:
            raise ValueError(f"min_prefetch={min_prefetch} is above max_prefetch={max_prefetch}; lower it.")
        if explore_decisions is not None:
            check_positive_int("explore_decisions (or None for the mode's default)", explore_decisions)
        else:
            explore_decisions = DATALOADER_EXPLORE_DECISIONS if mode == "dataloader" else PIPELINE_EXPLORE_DECISIONS
        if agent == "rl" and explore_decisions < 2:
            raise ValueError(f"explore_decisions={explore_decisions} leaves the RL agent no decision to learn in; "
                             f"use at least 2.")
        check_non_negative("min_window_s", min_window_s)
        check_number("warmup_batches (below decide_every_n_batches)", warmup_batches, low=0,
                     high=decide_every_n_batches, high_open=True, integer=True)
        check_non_negative("min_gain", min_gain)
        check_number("seed", seed, integer=True)
        self.agent_name, self.mode, self.cpu_budget = agent, mode, cpu_budget
        self.memory_budget_mb, self.decide_every_n_batches = memory_budget_mb, decide_every_n_batches
        self.warmup_batches, self.max_prefetch, self.min_window_s = warmup_batches, max_prefetch, min_window_s
        self.min_prefetch, self.io_budget = min_prefetch, io_budget
        self.explore_decisions, self.min_gain, self.seed = explore_decisions, min_gain, seed
        self.plot_path, self.verbose = plot_path, verbose
        check_path_argument("plot_path", plot_path)
        self.agent: Optional[Agent] = None
        self.space: Optional[SearchSpace] = None
        self.history: list[dict] = []
        self.settled_at_s: Optional[float] = None
        self.final_allocation: Optional[Allocation] = None  # what the DataLoader was left with (dataloader mode)
        self._original: Optional[tuple[int, Optional[int]]] = None  # the user's (num_workers, prefetch_factor)
        self._time_offset = 0.0  # tuning seconds before a resume
        self._pending_state: Optional[dict] = None
        self._reset_window()

    def _reset_window(self) -> None:
        self._batches_in_window = -1  # -1: not started
        self._skip = 0
        self._t0 = 0.0
        self._stats0 = None
        self._samples = 0
        self._wait = 0.0
        self._batch_end_t: Optional[float] = None

    # -- setup ---------------------------------------------------------------------------------------------
    def _budgets(self, trainer: Trainer) -> tuple[int, int, Optional[float]]:
        per_machine = max(1, trainer.world_size // max(1, getattr(trainer, "num_nodes", 1)))
        cpus = self.cpu_budget or max(1, available_cpus() // per_machine)
        memory = self.memory_budget_mb * 2**20 if self.memory_budget_mb else default_memory_budget()
        return cpus, self.io_budget or 4 * cpus, memory

    def _pipeline(self, trainer: Trainer) -> StagedPipeline:
        loader = trainer.train_dataloader
        if isinstance(loader, StagedPipeline):
            return loader
        raise TypeError(
            f"PipelineTuner(mode='pipeline') needs a StagedPipeline as the training loader (e.g. from "
            f"StagedPipelineDataModule), got {type(loader).__name__}. For a torch DataLoader use "
            f"PipelineTuner(mode='dataloader'), which tunes num_workers and prefetch_factor per epoch."
        )

    def _dataloader(self, trainer: Trainer):
        from torch.utils.data import DataLoader

        loader = trainer.train_dataloader
        if not isinstance(loader, DataLoader):
            raise TypeError(f"PipelineTuner(mode='dataloader') needs a torch DataLoader for training, got "
                            f"{type(loader).__name__}; for a StagedPipeline use mode='pipeline'.")
        return loader

    def _make_agent(self, space: SearchSpace) -> Agent:
        if self.agent_name == "rl":
            # learning starts within exploration even when it is a handful of epochs (dataloader mode)
            learn_start = max(1, min(8, self.explore_decisions - 1))
            return DQNAgent(space, explore_decisions=self.explore_decisions, learn_start=learn_start, seed=self.seed)
        if self.agent_name == "busy_time":
            return BusyTimeAllocator(space)
        return HillClimber(space, min_gain=self.min_gain)

    def _current(self, trainer: Trainer) -> Allocation:
        if self.mode == "pipeline":
            return self._pipeline(trainer).allocation
        dl = self._dataloader(trainer)
        return Allocation((dl.num_workers,), dl.prefetch_factor or 2)

    def _apply(self, trainer: Trainer, allocation: Allocation) -> bool:
        if self.mode == "pipeline":
            pipe = self._pipeline(trainer)
            changed = pipe.reconfigure(allocation)
            pipe.fallback_allocation = self.agent.last_good or self.agent.best or allocation
            return changed
        dl = self._dataloader(trainer)
        w = allocation.workers[0]
        if (dl.num_workers, dl.prefetch_factor) == (w, allocation.prefetch if w else None):
            return False
        iterator = getattr(dl, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):  # persistent workers: restart them
            iterator._shutdown_workers()
            dl._iterator = None
        dl.num_workers = w
        dl.prefetch_factor = allocation.prefetch if w > 0 else None  # None with 0 workers, required otherwise
        return True

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Build the search space and the agent (restored from a checkpoint if one was loaded); apply the start allocation."""
        cpus, io, memory = self._budgets(trainer)
        if self.mode == "pipeline":
            stages = self._pipeline(trainer).stages
        else:
            self._dataloader(trainer)
            stages = [Stage("workers", None, "process", min_workers=0)]
        self.space = SearchSpace.for_stages(stages, cpus, (self.min_prefetch, self.max_prefetch), memory, io)
        self.agent = self._make_agent(self.space)
        self.final_allocation = None
        if self.mode == "dataloader":
            dl = self._dataloader(trainer)
            self._original = (dl.num_workers, dl.prefetch_factor)
        self._fit_start = time.perf_counter()
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
            self.agent.load_state_dict(state["agent"])
            self._time_offset = float(state["time_s"])
            self._apply(trainer, self.space.clip(Allocation.from_dict(state["allocation"])))
        else:
            self._apply(trainer, self.space.clip(self._current(trainer)))
        self._reset_window()

    # -- measurement ---------------------------------------------------------------------------------------
    def _now(self) -> float:
        return self._time_offset + time.perf_counter() - self._fit_start

    @override
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        """Dataloader mode: count the time since the last batch ended as waiting for data."""
        if self.mode == "dataloader" and self._batch_end_t is not None:
            self._wait += time.perf_counter() - self._batch_end_t

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        """Count the batch into the measurement window; decide when the window is full."""
        if self.mode == "dataloader":
            self._samples += _batch_len(batch)
            self._batch_end_t = time.perf_counter()
            return
        if self._skip > 0:
            self._skip -= 1
            return
        pipe = self._pipeline(trainer)
        if self._batches_in_window < 0:
            self._t0, self._stats0, self._batches_in_window = time.perf_counter(), pipe.stats.copy(), 0
            return
        self._batches_in_window += 1
        if (self._batches_in_window >= self.decide_every_n_batches
                and time.perf_counter() - self._t0 >= self.min_window_s):
            self._decide(trainer, self._pipeline_observation(pipe))

    def _pipeline_observation(self, pipe: StagedPipeline) -> Observation:
        dt = max(time.perf_counter() - self._t0, 1e-9)
        s0, s1 = self._stats0, pipe.stats
        a = pipe.allocation
        busy = tuple((b1 - b0) / (dt * max(1, w)) for b0, b1, w in zip(s0.stage_busy_s, s1.stage_busy_s, a.workers))
        mem = pipe.buffer_bytes() / self.space.memory_budget if self.space.memory_budget else 0.0
        return Observation(a, (s1.samples - s0.samples) / dt, (s1.wait_s - s0.wait_s) / dt, busy, s1.batch_nbytes,
                           mem, failed=s1.failures > s0.failures, seconds=dt)

    @override
    def on_train_epoch_start(self, trainer, pl_module) -> None:
        """Start a fresh measurement window (pipeline mode skips the warm-up batches)."""
        if self.mode == "dataloader":
            self._t0, self._samples, self._wait, self._batch_end_t = time.perf_counter(), 0, 0.0, None
        else:
            self._reset_window()
            self._skip = self.warmup_batches

    @override
    def on_train_epoch_end(self, trainer, pl_module) -> None:
        """Dataloader mode: decide the next epoch's ``num_workers`` and ``prefetch_factor`` from this epoch."""
        if self.mode != "dataloader" or self._samples == 0:
            return
        dt = max(time.perf_counter() - self._t0, 1e-9)
        self._decide(trainer, Observation(self._current(trainer), self._samples / dt, self._wait / dt, (), 0.0,
                                          0.0, seconds=dt))

    # -- decision ------------------------------------------------------------------------------------------
    def _reduce(self, trainer: Trainer, obs: Observation) -> Observation:
        if trainer.world_size <= 1:
            return obs
        import torch

        vec = torch.tensor([obs.throughput, obs.wait_fraction, obs.memory_fraction, float(obs.failed), *obs.busy],
                           dtype=torch.float64)
        vec = trainer.strategy.reduce(vec, reduce_op="mean").tolist()
        return Observation(obs.allocation, vec[0], vec[1], tuple(vec[4:]), obs.batch_bytes, vec[2],
                           failed=vec[3] > 0, seconds=obs.seconds)

    def _decide(self, trainer: Trainer, obs: Observation) -> None:
        obs = self._reduce(trainer, obs)
        new = self.agent.act(obs).to_dict() if trainer.is_global_zero else None
        if trainer.world_size > 1:
            new = trainer.strategy.broadcast(new, src=0)
            self.agent.settled = bool(trainer.strategy.broadcast(self.agent.settled, src=0))
        new = Allocation.from_dict(new)
        if self.agent.settled and self.settled_at_s is None:
            self.settled_at_s = self._now()
        changed = self._apply(trainer, new)
        entry = {"time_s": self._now(), "step": trainer.global_step, "throughput": obs.throughput,
                 "wait_fraction": obs.wait_fraction, "workers": list(obs.allocation.workers),
                 "prefetch": obs.allocation.prefetch, "next": new.to_dict(), "settled": self.agent.settled,
                 "failed": obs.failed}
        self.history.append(entry)
        if trainer.is_global_zero:
            self._log(trainer, obs)
            if self.verbose:
                rank_zero_info(f"PipelineTuner[{self.agent_name}] {obs.allocation} -> {new}: "
                               f"{obs.throughput:.0f} samples/s, wait {obs.wait_fraction:.2f}")
        self._reset_window()
        self._skip = self.warmup_batches if changed else 0

    def _log(self, trainer: Trainer, obs: Observation) -> None:
        if trainer.logger is None:
            return
        metrics = {"pipeline/throughput": obs.throughput, "pipeline/wait_fraction": obs.wait_fraction,
                   "pipeline/prefetch": float(obs.allocation.prefetch), "pipeline/settled": float(self.agent.settled)}
        for name, w in zip(self.space.stage_names, obs.allocation.workers):
            metrics[f"pipeline/workers_{name}"] = float(w)
        trainer.logger.log_metrics(metrics, step=trainer.global_step)

    def _best_found(self) -> Optional[Allocation]:
        """The agent's best measured allocation (a hill climber's kept one while it still climbs), if any."""
        if self.agent is None:
            return None
        if self.agent.best is not None:
            return self.agent.best
        current = getattr(self.agent, "current", None)
        if current is not None and getattr(self.agent, "current_tput", 0.0) > 0:
            return current
        return None

    def _restore_dataloader(self, trainer: Trainer) -> None:
        if self.mode != "dataloader" or self.agent is None or self.final_allocation is not None:
            return
        best = self._best_found()
        if best is not None:
            self.final_allocation = self.space.clip(best)
            workers = self.final_allocation.workers[0]
            setting = (workers, self.final_allocation.prefetch if workers else None)
        elif self._original is not None:
            setting = self._original
            self.final_allocation = Allocation((setting[0],), setting[1] or 2)
        else:
            return
        dl = self._dataloader(trainer)
        if (dl.num_workers, dl.prefetch_factor) == setting:
            return
        iterator = getattr(dl, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
            dl._iterator = None
        dl.num_workers, dl.prefetch_factor = setting
        w = setting[0]
        rank_zero_info(f"PipelineTuner: the training DataLoader is left with num_workers={w}, "
                       f"prefetch_factor={dl.prefetch_factor} ({'best measured' if best is not None else 'your own'}).")

    @override
    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        """Dataloader mode: a fit stopped by an error still leaves the DataLoader on a measured or the user's setting."""
        self._restore_dataloader(trainer)

    @override
    def on_fit_end(self, trainer, pl_module) -> None:
        """Dataloader mode: leave the best allocation (or the user's own) on the DataLoader; save the plot."""
        self._restore_dataloader(trainer)
        path = output_path(trainer, self.plot_path)
        if path is not None and self.history and trainer.is_global_zero and self.space is not None:
            plot_tuning(self.history, list(self.space.stage_names), path,
                        f"PipelineTuner ({self.agent_name}, {self.mode})")

    # -- checkpoint ----------------------------------------------------------------------------------------
    @property
    def best_allocation(self) -> Optional[Allocation]:
        return None if self.agent is None else self.agent.best

    @override
    def state_dict(self) -> dict[str, Any]:
        """The agent, the allocation running now, the tuning clock and history."""
        if self.agent is None:
            return dict(self._pending_state or {})
        current = self.history[-1]["next"] if self.history else None
        return {"agent_name": self.agent_name, "mode": self.mode, "agent": self.agent.state_dict(),
                "allocation": current or (self.agent.best or self.space.minimum()).to_dict(),
                "time_s": self._now(), "settled_at_s": self.settled_at_s, "history": self.history[-2000:]}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the saved tuner state until ``on_train_start`` rebuilds the agent from it."""
        if not state_dict:
            return
        if state_dict["agent_name"] != self.agent_name or state_dict["mode"] != self.mode:
            raise ValueError(f"The checkpoint holds a PipelineTuner(agent={state_dict['agent_name']!r}, "
                             f"mode={state_dict['mode']!r}); this one is agent={self.agent_name!r}, "
                             f"mode={self.mode!r}. Use the same settings to resume.")
        self._pending_state = state_dict
        self.settled_at_s = state_dict.get("settled_at_s")
        self.history = list(state_dict.get("history", []))
