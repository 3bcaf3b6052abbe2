r"""Task Arithmetic: add the scaled sum of task vectors to the pretrained weights.

Ilharco, Ribeiro, Wortsman, Gururangan, Schmidt, Hajishirzi, Farhadi, *Editing Models with Task Arithmetic*,
ICLR 2023, arXiv:2212.04089. Reference code: https://github.com/mlfoundations/task_vectors.

.. math::
    \theta = \theta_0 + \lambda \sum_{k=1}^{N} \tau_k, \qquad \tau_k = \theta_k - \theta_0

The paper picks one :math:`\lambda` on held-out validation data; the AdaMerging code uses 0.3 for eight
tasks, the default here. A sequence of per-task values gives :math:`\theta_0 + \sum_k \lambda_k \tau_k`
(task-wise coefficients, e.g. learned by AdaMerging).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Optional, Union

import torch
from torch import Tensor

from lightning_ext.merging.task_vectors import (
    DEFAULT_MAX_TASK_VECTOR_RATIO,
    OnForeignBase,
    Source,
    StateDict,
    is_head_key,
    iter_finetuned,
    mergeable_keys,
)

__all__ = ["task_arithmetic_merge"]


def task_arithmetic_merge(
    base: StateDict,
    finetuned: Iterable[Source],
    scaling: Union[float, Sequence[float]] = 0.3,
    ignored_layers: Sequence[str] = (),
    max_task_vector_ratio: float = DEFAULT_MAX_TASK_VECTOR_RATIO,
    on_foreign_base: OnForeignBase = "error",
    names: Optional[Sequence[str]] = None,
) -> dict[str, Tensor]:
    r"""Merge fine-tuned models by task arithmetic; returns the merged shared (non-head) state dict.

    Memory: the base (the caller's), one accumulator the size of the shared weights, and one loaded model at a
    time; the task vectors are never materialised (:math:`\lambda_k(\theta_k - \theta_0)` is added tensor by
    tensor). So merging N checkpoints given as paths costs the same memory for any N.

    Args:
        base: the pretrained state dict :math:`\theta_0`.
        finetuned: fine-tuned state dicts or paths (state dict or Lightning checkpoint, read with
            ``weights_only=True``), all fine-tuned from ``base``.
        scaling: :math:`\lambda` (one number), or one :math:`\lambda_k` per model.
        ignored_layers: prefixes of task-specific keys; left out of the result (each task keeps its head).
        max_task_vector_ratio: refuse a model farther than this from the base (relative norm); see
            :func:`~lightning_ext.merging.task_vectors.check_base_distance`.
        on_foreign_base: ``"error"``, ``"warn"`` or ``"ignore"`` for such a model.
        names: names of the models for messages.

    Example:
        >>> base = {"w": torch.tensor([1.0, 1.0]), "head": torch.zeros(3)}
        >>> ft = [{"w": torch.tensor([1.2, 1.0]), "head": torch.ones(3)}, {"w": torch.tensor([1.0, 0.9]), "head": torch.ones(3)}]
        >>> task_arithmetic_merge(base, ft, scaling=1.0, ignored_layers=["head"])
        {'w': tensor([1.2000, 0.9000])}
    """
    sources = list(finetuned)
    stream = iter_finetuned(base, sources, ignored_layers, max_task_vector_ratio, on_foreign_base, names)
    if isinstance(scaling, (int, float)):
        coefs = [float(scaling)] * len(sources)
    else:
        coefs = [float(s) for s in scaling]
        if len(coefs) != len(sources):
            raise ValueError(f"Got {len(coefs)} scaling coefficients for {len(sources)} models; give one per model.")
    keys = mergeable_keys(base, ignored_layers)
    acc = {k: torch.zeros_like(base[k]) for k in keys}
    for coef, (_, state) in zip(coefs, stream):
        for k in keys:
            # acc += coef * (theta_k - theta_0), in place, tensor by tensor (no task vector in memory)
            acc[k].add_(state[k].to(base[k].dtype), alpha=coef).sub_(base[k], alpha=coef)
        del state
    merged: dict[str, Tensor] = {}
    for k, v in base.items():
        if is_head_key(k, ignored_layers):
            continue
        merged[k] = acc.pop(k).add_(v) if k in acc else v.clone()
    return merged
