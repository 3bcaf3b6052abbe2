r"""TIES-Merging: trim each task vector, elect one sign per parameter, average only the agreeing entries.

Yadav, Tam, Choshen, Raffel, Bansal, *TIES-Merging: Resolving Interference When Merging Models*, NeurIPS
2023, arXiv:2306.01708. Reference code: https://github.com/prateeky2806/ties-merging (the AdaMerging and
FusionBench repositories carry the same ``ties_merging_utils``).

1. **Trim**: keep the share :math:`k` (``density``, default 20 %) of entries of each task vector with the largest
   magnitude, over the whole (shared) model, and zero the rest.
2. **Elect sign**: :math:`\gamma = \mathrm{sign}(\sum_k \hat\tau_k)`, the sign of the total mass per
   parameter; parameters whose mass is exactly 0 get the majority sign of all parameters.
3. **Disjoint merge**: :math:`\tau_m = ` the mean of the non-zero :math:`\hat\tau_k` entries whose sign
   equals :math:`\gamma` (``merge="sum"``: their sum, as in the AdaMerging repository's TIES baseline).
4. :math:`\theta = \theta_0 + \lambda\,\tau_m` (default :math:`\lambda = 1`; the paper tunes it on validation).

Difference from the reference code: it keeps the entries ``>=`` the ``(d - int(d k))``-th smallest magnitude,
i.e. one entry more than ``int(d k)``; here exactly the top ``max(1, int(d k))`` magnitudes are kept (plus
ties at the threshold).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Literal, Optional, get_args

import torch
from torch import Tensor

from lightning_ext.core.validation import UnitIntervalLeftOpen, check_choice, check_number
from lightning_ext.merging.task_vectors import (
    DEFAULT_MAX_TASK_VECTOR_RATIO,
    OnForeignBase,
    Source,
    StateDict,
    is_head_key,
    iter_finetuned,
    mergeable_keys,
)

__all__ = ["Density", "MergeMode", "check_density", "disjoint_merge", "elect_sign", "ties_merging_merge",
           "ties_selected_task_vectors", "trim_top_k"]

#: A share kept by TIES' trim step, in (0, 1] (``density``, the paper's :math:`k`).
Density = UnitIntervalLeftOpen

#: How TIES combines the agreeing entries: their mean (the paper) or their sum.
MergeMode = Literal["mean", "sum"]
MERGE_MODES = get_args(MergeMode)


def check_density(density: float, name: str = "density") -> float:
    """``density`` if it is a finite number in (0, 1], else one ValueError naming ``name``."""
    try:
        return check_number(name, density, low=0, high=1, low_open=True)
    except ValueError:
        raise ValueError(f"{name} (the share of each task vector's entries kept, the paper's k) must be a finite "
                         f"number in (0, 1], got {density!r}; 0.2 keeps the top 20%.") from None


def trim_top_k(flat: Tensor, density: float) -> Tensor:
    """Keep the share ``density`` (the paper's :math:`k`) of entries of a 1-d tensor with the largest magnitude
    (ties at the threshold kept), zero the rest; a new tensor.

    Example:
        >>> trim_top_k(torch.tensor([3.0, -1.0, 0.5, -2.0]), 0.5)
        tensor([ 3.,  0.,  0., -2.])
    """
    check_density(density)
    d = flat.numel()
    n_keep = max(1, int(d * density))
    if n_keep >= d:
        return flat.clone()
    magnitude = flat.abs()
    threshold = torch.kthvalue(magnitude.float(), d - n_keep + 1).values
    return torch.where(magnitude >= threshold, flat, torch.zeros((), dtype=flat.dtype, device=flat.device))


def elect_sign(mass: Tensor) -> Tensor:
    """``sign(mass)``, with zeros set to the majority sign (the sign of the sum of all signs); int8.

    Example:
        >>> elect_sign(torch.tensor([3.0, 2.0, 0.0, -6.0]))
        tensor([ 1,  1,  1, -1], dtype=torch.int8)
    """
    sign = torch.sign(mass).to(torch.int8)
    majority = torch.sign(sign.sum(dtype=torch.int64)).to(torch.int8)
    return torch.where(sign == 0, majority, sign)


def disjoint_merge(trimmed: Tensor, sign: Tensor, merge: str = "mean") -> Tensor:
    """Mean (or sum) over the first dimension of the entries whose sign equals ``sign`` (zeros never count).

    Example:
        >>> t = torch.tensor([[3.0, 0.0, 0.0, -2.0], [-1.0, 2.0, 0.0, -4.0], [-1.0, 0.0, 0.0, 0.0]])
        >>> disjoint_merge(t, elect_sign(t.sum(0)))
        tensor([ 3.,  2.,  0., -3.])
    """
    check_choice("merge", merge, MERGE_MODES)
    agree = (trimmed * sign.to(trimmed.dtype)) > 0
    total = (trimmed * agree).sum(0)
    if merge == "sum":
        return total
    return total / agree.sum(0).clamp(min=1).to(trimmed.dtype)


def _flat(base: StateDict, state: StateDict, keys: Sequence[str]) -> Tensor:
    return torch.cat([(state[k].float() - base[k].float()).reshape(-1) for k in keys])


def _unflatten(flat: Tensor, base: StateDict, keys: Sequence[str]) -> Iterator[tuple[str, Tensor]]:
    offset = 0
    for k in keys:
        n = base[k].numel()
        yield k, flat[offset:offset + n].view(base[k].shape)
        offset += n


def _elect(base: StateDict, sources: list, keys: Sequence[str], density: float, ignored_layers: Sequence[str],
           max_ratio: float, on_foreign_base: str, names: Optional[Sequence[str]]) -> tuple[Tensor, list[str]]:
    mass: Optional[Tensor] = None
    labels = []
    for label, state in iter_finetuned(base, sources, ignored_layers, max_ratio, on_foreign_base, names):
        trimmed = trim_top_k(_flat(base, state, keys), density)
        del state
        mass = trimmed if mass is None else mass.add_(trimmed)
        labels.append(label)
    assert mass is not None  # iter_finetuned refuses an empty list
    return elect_sign(mass), labels


def ties_merging_merge(
    base: StateDict,
    finetuned: Iterable[Source],
    density: float = 0.2,
    scaling: float = 1.0,
    merge: MergeMode = "mean",
    ignored_layers: Sequence[str] = (),
    max_task_vector_ratio: float = DEFAULT_MAX_TASK_VECTOR_RATIO,
    on_foreign_base: OnForeignBase = "error",
    names: Optional[Sequence[str]] = None,
) -> dict[str, Tensor]:
    r"""Merge fine-tuned models with TIES-Merging; returns the merged shared (non-head) state dict.

    Streams in two passes over ``finetuned`` (paths are read twice): the first accumulates the trimmed task
    vectors' total mass to elect the signs, the second accumulates the agreeing entries and their count. It
    holds the base, a float32 flat accumulator, an int8 sign vector, a count vector and one model (plus its flat
    task vector) at a time: the memory does not grow with the number of models.

    Args:
        base: the pretrained state dict.
        finetuned: fine-tuned state dicts or checkpoint paths (``weights_only=True``).
        density: share :math:`k` of each task vector's entries kept by magnitude (0.2 = top 20 %).
        scaling: :math:`\lambda` applied to the merged task vector.
        merge: ``"mean"`` (TIES) or ``"sum"`` of the agreeing entries.
        ignored_layers: prefixes of task-specific keys, left out (each task keeps its head).
        max_task_vector_ratio: refuse models farther than this from the base (relative norm).
        on_foreign_base: ``"error"``, ``"warn"`` or ``"ignore"``.
        names: names of the models for messages.

    Example:
        >>> base = {"w": torch.zeros(4)}
        >>> ft = [{"w": torch.tensor([3.0, -1.0, 0.5, -2.0])}, {"w": torch.tensor([-1.0, 2.0, -0.2, -4.0])}]
        >>> ties_merging_merge(base, ft, density=0.5, on_foreign_base="ignore")
        {'w': tensor([ 3.,  2.,  0., -3.])}
    """
    check_density(density)
    check_choice("merge", merge, MERGE_MODES)
    sources = list(finetuned)
    keys = mergeable_keys(base, ignored_layers)
    sign, labels = _elect(base, sources, keys, density, ignored_layers, max_task_vector_ratio, on_foreign_base, names)
    total: Optional[Tensor] = None
    count: Optional[Tensor] = None
    count_dtype = torch.uint8 if len(sources) < 256 else torch.int32
    for _, state in iter_finetuned(base, sources, ignored_layers, max_task_vector_ratio, "ignore", labels):
        trimmed = trim_top_k(_flat(base, state, keys), density)
        del state
        agree = (trimmed * sign) > 0
        trimmed.mul_(agree)
        total = trimmed if total is None else total.add_(trimmed)
        count = agree.to(count_dtype) if count is None else count.add_(agree.to(count_dtype))
    assert total is not None and count is not None
    if merge == "mean":
        total.div_(count.clamp(min=1).float())
    del count, sign
    merged: dict[str, Tensor] = {}
    flat_parts = dict(_unflatten(total, base, keys))
    for key, v in base.items():
        if is_head_key(key, ignored_layers):
            continue
        if key in flat_parts:
            merged[key] = (v.float() + scaling * flat_parts[key]).to(v.dtype)
        else:
            merged[key] = v.clone()
    return merged


def ties_selected_task_vectors(
    base: StateDict,
    finetuned: Iterable[Source],
    density: float = 0.2,
    ignored_layers: Sequence[str] = (),
    max_task_vector_ratio: float = DEFAULT_MAX_TASK_VECTOR_RATIO,
    on_foreign_base: OnForeignBase = "error",
    names: Optional[Sequence[str]] = None,
) -> Iterator[tuple[str, dict[str, Tensor], dict[str, Tensor]]]:
    r"""Yield ``(name, selected task vector, head)`` per model: its trimmed task vector with only the entries
    that agree with the elected sign (what AdaMerging++ learns coefficients over). Two passes, like
    :func:`ties_merging_merge`; one model's vectors are alive per iteration (the caller decides what to keep)."""
    check_density(density)
    sources = list(finetuned)
    keys = mergeable_keys(base, ignored_layers)
    sign, labels = _elect(base, sources, keys, density, ignored_layers, max_task_vector_ratio, on_foreign_base, names)
    for label, state in iter_finetuned(base, sources, ignored_layers, max_task_vector_ratio, "ignore", labels):
        head = {key: v for key, v in state.items() if is_head_key(key, ignored_layers)}
        trimmed = trim_top_k(_flat(base, state, keys), density)
        del state
        trimmed.mul_((trimmed * sign) > 0)
        yield label, {key: part.to(base[key].dtype) for key, part in _unflatten(trimmed, base, keys)}, head
