"""Staged data pipelines whose per-stage CPU allocation a tuner changes while training runs (InTune).

- :mod:`.staged`: :class:`Stage`, :class:`Allocation`, :class:`StagedPipeline` (torchdata nodes, exactly-once
  delivery across re-configuration and resume).
- :mod:`.agents`: the search space, the value-based RL agent (DQN) and the AUTOTUNE-like hill climber.
- :mod:`.workloads`: real pipelines for benchmarks and examples (PNG images, text rows of ratings).
"""

from lightning_ext.pipeline.staged import Allocation, EpochSampler, PipelineStats, Stage, StagedPipeline

__all__ = ["Allocation", "EpochSampler", "PipelineStats", "Stage", "StagedPipeline"]
