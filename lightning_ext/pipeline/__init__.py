"""Staged data pipelines whose per-stage CPU allocation a tuner changes while training runs (InTune).

- :mod:`.staged`: :class:`Stage`, :class:`Allocation`, :class:`StagedPipeline` (torchdata nodes, exactly-once
  delivery across re-configuration and resume). Its training order is :class:`~lightning_ext.core.sampling.EpochSampler`
  (re-exported here as ``EpochSampler``).
- :mod:`.agents`: the search space, the value-based RL agent (DQN) and the AUTOTUNE-like hill climber.
- :mod:`.workloads`: real pipelines for benchmarks and examples (PNG images, text rows of ratings).
- :mod:`.tuner` / :mod:`.datamodule`: the Lightning wrappers ``PipelineTuner`` and ``StagedPipelineDataModule``.

torchdata (the ``[pipeline]`` extra) is imported only when a pipeline is built, never by importing this package.
"""

from lightning_ext.core.sampling import EpochSampler
from lightning_ext.pipeline.staged import Allocation, PipelineStats, Stage, StagedPipeline

__all__ = ["Allocation", "EpochSampler", "PipelineStats", "Stage", "StagedPipeline"]
