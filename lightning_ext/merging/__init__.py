"""Model merging on state dicts, usable without a Trainer (the functional core of issue 5).

- :mod:`~lightning_ext.merging.task_vectors`: :func:`read_state_dict` (``weights_only=True``, non-finite tensors
  refused), :func:`task_vector`, :func:`split_head`/:func:`is_head_key` (``ignored_layers``: task-specific heads
  stay per task), :func:`resolve_ignored_layers`,
  :func:`check_same_architecture` (first differing key and shape), :func:`base_distance` and
  :func:`check_base_distance` (a task vector from another base model is refused), :func:`simple_average`;
- :mod:`~lightning_ext.merging.task_arithmetic`: :func:`task_arithmetic_merge` (Ilharco et al., ICLR 2023);
- :mod:`~lightning_ext.merging.ties_merging`: :func:`ties_merging_merge` (Yadav et al., NeurIPS 2023) and its
  steps :func:`trim_top_k`, :func:`elect_sign`, :func:`disjoint_merge`;
- :mod:`~lightning_ext.merging.ada_merging`: :class:`AdaMergingModel` (task- or layer-wise coefficients as the
  only trainable parameters, merged weights through ``torch.func.functional_call``), :func:`entropy_loss`,
  :func:`fit_ada_merging`, :func:`apply_coefficients` (Yang et al., ICLR 2024);
- :mod:`~lightning_ext.merging.ada_diagnostics`: :class:`AdaMergingHistory`, :func:`diagnose_collapse`,
  :func:`save_coefficients`/:func:`load_coefficients`, :func:`plot_coefficients`, and the label-free check
  :func:`prediction_agreement`/:func:`diagnose_agreement` (merged vs each task's own fine-tuned model on the same
  unlabelled inputs; :func:`finetuned_agreement` computes it for an :class:`AdaMergingModel`);
- :mod:`~lightning_ext.merging.memory`: :func:`measure_peak_memory`.

Average, task arithmetic and TIES stream: they hold the base, an accumulator and one fine-tuned model at a
time, whatever the number of models. AdaMerging must hold every task vector (N model copies): that is inherent
to learning the coefficients by gradient.

The Lightning forms are :class:`~lightning_ext.merging.module.AdaMerging` (a LightningModule whose
parameters are the coefficients), :class:`~lightning_ext.merging.callback.ModelMerging` (merges
fine-tuned checkpoints into the user's own LightningModule) and
:class:`~lightning_ext.merging.multi_task.MultiTaskDataModule` (unlabelled inputs of several tasks).

Example:
    >>> import torch
    >>> from lightning_ext.merging import task_arithmetic_merge, ties_merging_merge
    >>> base = {"w": torch.tensor([1.0, 1.0, 1.0])}
    >>> ft = [{"w": torch.tensor([1.1, 1.0, 0.9])}, {"w": torch.tensor([1.0, 1.2, 0.9])}]
    >>> task_arithmetic_merge(base, ft, scaling=1.0)["w"]
    tensor([1.1000, 1.2000, 0.8000])
    >>> ties_merging_merge(base, ft, density=1.0)["w"]  # disjoint mean: agreeing entries are averaged
    tensor([1.1000, 1.2000, 0.9000])
"""

from lightning_ext.merging.ada_diagnostics import (
    AdaMergingHistory,
    diagnose_agreement,
    diagnose_collapse,
    load_coefficients,
    plot_coefficients,
    save_coefficients,
)
from lightning_ext.merging.ada_diagnostics import prediction_agreement
from lightning_ext.merging.ada_merging import (
    AdaMergingModel,
    apply_coefficients,
    entropy_loss,
    finetuned_agreement,
    fit_ada_merging,
)
from lightning_ext.merging.memory import PeakMemory, measure_peak_memory
from lightning_ext.merging.task_arithmetic import task_arithmetic_merge
from lightning_ext.merging.task_vectors import (
    ArchitectureMismatchError,
    ForeignBaseError,
    base_distance,
    check_base_distance,
    check_same_architecture,
    default_ignored_layers,
    is_head_key,
    read_state_dict,
    resolve_ignored_layers,
    simple_average,
    split_head,
    task_vector,
)
from lightning_ext.merging.ties_merging import disjoint_merge, elect_sign, ties_merging_merge, trim_top_k

__all__ = [
    "AdaMergingHistory",
    "AdaMergingModel",
    "ArchitectureMismatchError",
    "ForeignBaseError",
    "PeakMemory",
    "apply_coefficients",
    "base_distance",
    "check_base_distance",
    "check_same_architecture",
    "default_ignored_layers",
    "diagnose_agreement",
    "diagnose_collapse",
    "disjoint_merge",
    "elect_sign",
    "entropy_loss",
    "finetuned_agreement",
    "fit_ada_merging",
    "is_head_key",
    "load_coefficients",
    "measure_peak_memory",
    "plot_coefficients",
    "prediction_agreement",
    "read_state_dict",
    "resolve_ignored_layers",
    "save_coefficients",
    "simple_average",
    "split_head",
    "task_arithmetic_merge",
    "task_vector",
    "ties_merging_merge",
    "trim_top_k",
]
