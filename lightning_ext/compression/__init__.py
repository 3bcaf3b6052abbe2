"""Structured pruning engine, usable on any ``nn.Module`` without a Trainer.

- :mod:`~lightning_ext.compression.graph`: :func:`prunable_filter_groups`, the groups of coupled conv filters that
  Torch-Pruning's dependency graph finds (BN, residual adds, depthwise convs, concatenations);
- :mod:`~lightning_ext.compression.plan`: :func:`plan_filter_pruning` turns per-filter scores and a target (a
  ``pruning_ratio`` or a ``macs_reduction``) into a plan, :func:`apply_pruning_history` removes those channels,
  :func:`prune_filters` does both and :func:`recorded_channel_changes` tells which weight slices each layer lost;
- :mod:`~lightning_ext.compression.latency_pruning`: :func:`build_latency_table` measures (and caches) each
  filter group's latency at each width on the target device; :func:`plan_latency_pruning` meets a latency budget
  or speedup with measured widths, checked by timing the pruned copy;
- :mod:`~lightning_ext.compression.history`: the one history format and replay path of every pruning-like
  callback; :func:`load_pruned_checkpoint` loads a pruned (or UDFC-compressed) run's checkpoint into a fresh
  (dense) model by replaying the history saved in it;
- :mod:`~lightning_ext.compression.udfc` (UDFC: data-free pruning + quantization with a closed-form
  reconstruction) and :mod:`~lightning_ext.compression.ap` (Activate-while-Pruning: dead-neuron rate, the AP
  step, model cost): pure cores, no Trainer needed;
- :mod:`~lightning_ext.core.measure`: :func:`count_macs_params`, :func:`layer_macs`, :func:`measure_latency`,
  one MACs convention (one sample, Torch-Pruning's counter) for every pruning and compression component.

The Lightning callbacks built on them sit beside them (``filter_pruning.py`` and its importance subclasses
``beta_rank_pruning.py``, ``l1_filter_pruning.py``, ``random_filter_pruning.py``; ``activating_while_pruning.py``;
``data_free_compression.py``) and are exported by :mod:`lightning_ext.callbacks`. Torch-Pruning is the
``compression`` extra: ``pip install "lightning-ext[compression]"``.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_ext.compression import count_macs_params, prune_filters
    >>> net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3),
    ...                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    >>> x = torch.zeros(1, 1, 8, 8)
    >>> plan = prune_filters(net, x, {"0": torch.arange(8.0), "3": torch.arange(4.0)}, pruning_ratio=0.5)
    >>> net[0].out_channels, net[3].out_channels, net[6].in_features
    (4, 2, 2)
    >>> count_macs_params(net, x)[0] < plan.macs_before
    True
"""

from lightning_ext.compression.dsnot import DSnoTReport, dsnot_prune
from lightning_ext.compression.dynamic_sparsity import DynamicSparsity, prune_and_grow, update_ratio_schedule
from lightning_ext.compression.graph import FilterGroup, PruningError, prunable_filter_groups, resolve_layer_names
from lightning_ext.compression.history import load_pruned_checkpoint, pruning_steps_from_checkpoint, replay_pruning_steps
from lightning_ext.compression.latency_pruning import (
    LatencyPlan,
    LatencyTable,
    build_latency_table,
    plan_latency_pruning,
)
from lightning_ext.compression.plan import (
    PruningPlan,
    applied_pruning_steps,
    apply_pruning_history,
    plan_filter_pruning,
    prune_filters,
    recorded_channel_changes,
)
from lightning_ext.core.measure import count_macs_params, layer_macs, measure_latency, num_params

__all__ = [
    "DSnoTReport", "dsnot_prune",
    "DynamicSparsity", "prune_and_grow", "update_ratio_schedule",
    "FilterGroup", "LatencyPlan", "LatencyTable", "PruningError", "PruningPlan", "applied_pruning_steps",
    "apply_pruning_history", "build_latency_table", "count_macs_params", "layer_macs", "load_pruned_checkpoint",
    "measure_latency", "num_params", "plan_filter_pruning", "plan_latency_pruning", "prunable_filter_groups",
    "prune_filters", "pruning_steps_from_checkpoint", "recorded_channel_changes", "replay_pruning_steps",
    "resolve_layer_names",
]
