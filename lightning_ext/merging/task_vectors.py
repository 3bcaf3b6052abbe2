r"""Task vectors on state dicts: reading checkpoints safely, architecture checks, the base-model distance check
and simple weight averaging.

A task vector is :math:`\tau_k = \theta_k - \theta_0`, the difference between a model fine-tuned on task
:math:`k` and the pretrained model it was fine-tuned from (Ilharco et al., *Editing Models with Task
Arithmetic*, ICLR 2023, arXiv:2212.04089, https://github.com/mlfoundations/task_vectors).

Conventions shared by every merging function of :mod:`lightning_ext.merging`:

- **Sources.** A fine-tuned model is given as a state dict or as a path to one (a ``torch.save``'d state dict
  or a Lightning checkpoint, whose ``"state_dict"`` is used). Paths are read by :mod:`lightning_ext.core.checkpoints`
  (``torch.load(map_location="cpu", weights_only=True)``), one at a time, only when needed, so merging N models
  does not hold N models in memory (see each function for what it holds); a model holding NaN or infinity is
  refused (:func:`read_state_dict`).
- **Heads.** ``ignored_layers`` lists the task-specific layers: module names or globs (``["classifier"]`` matches
  ``classifier.weight`` and ``classifier.1.bias``; ``["heads.*"]`` every layer under ``heads``). They are never
  merged, their shapes may differ between tasks (a 10-class and a 4-class head), and they are *not* in a merged
  state dict: each task keeps its own head (:func:`split_head` extracts it). The Lightning wrappers resolve the
  names against the module first (:func:`resolve_ignored_layers`), so a name matching nothing is refused.
- **What is merged.** Every floating-point entry of the base state dict that is not a head, parameters and
  floating buffers (BatchNorm running statistics) alike; integer buffers (``num_batches_tracked``) are
  copied from the base.
- **Refusals.** A model whose keys or shapes differ from the base's is refused with the first differing key
  and both shapes (:func:`check_same_architecture`); a model whose task vector is far from the base (relative
  norm :math:`\lVert\tau_k\rVert / \lVert\theta_0\rVert` of the weight matrices and kernels above
  ``max_task_vector_ratio``, default 0.5) was
  almost certainly not fine-tuned from this base and is refused, or warned about (:func:`check_base_distance`).
"""

from __future__ import annotations

import fnmatch
import math
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Optional, get_args

import torch
from torch import Tensor, nn

from lightning_ext.core import checkpoints
from lightning_ext.core.checkpoints import Source, load_error_summary
from lightning_ext.core.layers import match_names
from lightning_ext.core.validation import check_choice, check_positive

StateDict = Mapping[str, Tensor]

__all__ = [
    "ArchitectureMismatchError",
    "BaseDistance",
    "ForeignBaseError",
    "FOREIGN_BASE_ACTIONS",
    "base_distance",
    "check_base_distance",
    "check_same_architecture",
    "default_ignored_layers",
    "is_head_key",
    "iter_finetuned",
    "mergeable_keys",
    "read_state_dict",
    "resolve_ignored_layers",
    "simple_average",
    "split_head",
    "task_vector",
]

#: What to do with a model that was not fine-tuned from the base (see :func:`check_base_distance`).
OnForeignBase = Literal["error", "warn", "ignore"]
FOREIGN_BASE_ACTIONS = get_args(OnForeignBase)
DEFAULT_MAX_TASK_VECTOR_RATIO = 0.5
_STAT_SUFFIXES = ("running_mean", "running_var")


class ArchitectureMismatchError(ValueError):
    """Two state dicts to merge do not have the same keys and shapes (outside the heads)."""


class ForeignBaseError(ValueError):
    """A fine-tuned model is too far from the base model to have been fine-tuned from it."""


# -- reading ------------------------------------------------------------------------------------------------------


def read_state_dict(source: Source, reference_keys: Optional[Iterable[str]] = None,
                    name: Optional[str] = None) -> dict[str, Tensor]:
    """:func:`lightning_ext.core.checkpoints.read_state_dict` (``weights_only=True``, Lightning checkpoints
    unwrapped, one wrapper prefix matched to ``reference_keys``), then refuse a tensor holding NaN or infinity:
    merging it would spread the non-finite values to every merged weight.

    Example:
        >>> read_state_dict({"w": torch.tensor([1.0, float("nan")])}, name="task 0")
        Traceback (most recent call last):
        ...
        ValueError: task 0: tensor 'w' holds 1 non-finite value(s) (NaN or inf); check the file or the run that wrote it.
    """
    where = name or (str(source) if isinstance(source, (str, os.PathLike)) else "The state dict")
    try:
        state = checkpoints.read_state_dict(source, reference_keys, name)
    except ValueError as err:
        if err.__cause__ is None or not isinstance(source, (str, os.PathLike)):
            raise
        raise ValueError(
            f"{where} cannot be read with torch.load(weights_only=True): {load_error_summary(err.__cause__)}. A "
            "truncated file (a run killed while saving) or another format? Save it again with "
            "torch.save(model.state_dict(), path) or use a Lightning checkpoint."
        ) from err.__cause__
    return state  # core.checkpoints.read_state_dict refused non-finite tensors, naming `where`


# -- keys and architecture ----------------------------------------------------------------------------------------


def _module_prefixes(key: str) -> Iterator[str]:
    parts = key.split(".")
    for i in range(1, len(parts) + 1):
        yield ".".join(parts[:i])


def is_head_key(key: str, ignored_layers: Sequence[str]) -> bool:
    """Whether ``key`` belongs to an ignored (task-specific) layer: a name or glob (:func:`fnmatch.fnmatchcase`)
    matching the key itself or one of the modules it lies in.

    Example:
        >>> is_head_key("classifier.1.weight", ["classifier"]), is_head_key("classifier_x.weight", ["classifier"])
        (True, False)
        >>> is_head_key("heads.digits.bias", ["heads.*"]), is_head_key("net.4.weight", ["net.[0-9]"])
        (True, True)
    """
    for pattern in ignored_layers:
        p = pattern.rstrip(".")
        if any(prefix == p or fnmatch.fnmatchcase(prefix, p) for prefix in _module_prefixes(key)):
            return True
    return False


def default_ignored_layers(network: nn.Module) -> list[str]:
    """The classifier head of ``network``: the last ``nn.Linear`` in module order (``["classifier.1"]`` for
    torchvision's MobileNetV2, ``["net.fc"]`` for an ``ImageClassifier`` with a ResNet).

    Example:
        >>> default_ignored_layers(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
        ['2']
    """
    linears = [name for name, m in network.named_modules() if isinstance(m, nn.Linear) and name]
    if not linears:
        raise ValueError(
            "Could not find the classifier head (no nn.Linear layer); set `ignored_layers` to the task-specific "
            "layers (module names or globs, e.g. ['head'] or ['net.classifier'])."
        )
    return [linears[-1]]


def resolve_ignored_layers(network: nn.Module, patterns: Optional[Sequence[str]]) -> list[str]:
    """``patterns`` (module or tensor names, or globs; ``None``: :func:`default_ignored_layers`) resolved to the
    names of ``network`` they match, through :func:`lightning_ext.core.layers.match_names`; a pattern matching
    nothing is refused with the closest names. ``[]`` merges every layer.

    Example:
        >>> resolve_ignored_layers(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)), ["1*"])
        ['1']
    """
    if patterns is None:
        return default_ignored_layers(network)
    names = [n for n, _ in network.named_modules() if n]
    names += [k for k in network.state_dict() if k not in names]
    matched = match_names(names, patterns, "ignored_layers", f"{type(network).__name__} (names are relative to it)")
    # a layer inside another matched layer adds nothing
    return [n for n in matched if not any(n.startswith(m + ".") for m in matched if m != n)]


def split_head(state: StateDict, ignored_layers: Sequence[str]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Split a state dict into ``(shared, head)`` by :func:`is_head_key`."""
    shared, head = {}, {}
    for k, v in state.items():
        (head if is_head_key(k, ignored_layers) else shared)[k] = v
    return shared, head


def mergeable_keys(base: StateDict, ignored_layers: Sequence[str] = ()) -> list[str]:
    """Keys that merging changes: floating-point entries of ``base`` outside the heads, in ``base`` order."""
    return [k for k, v in base.items() if v.is_floating_point() and not is_head_key(k, ignored_layers)]


def check_same_architecture(
    reference: StateDict, other: StateDict, ignored_layers: Sequence[str] = (),
    reference_name: str = "the base model", other_name: str = "the model",
) -> None:
    """Raise :class:`ArchitectureMismatchError` naming the first key (outside the heads) whose presence or
    shape differs between ``reference`` and ``other``.

    Example:
        >>> check_same_architecture({"w": torch.zeros(2, 3)}, {"w": torch.zeros(3, 3)}, other_name="task 1")
        Traceback (most recent call last):
        ...
        lightning_ext.merging.task_vectors.ArchitectureMismatchError: Cannot merge task 1 into the base model: ...
    """
    prefix = f"Cannot merge {other_name} into {reference_name}: the architectures differ."
    heads_hint = (
        " If this is a task-specific head (a classifier for another number of classes), list it in "
        "`ignored_layers` so it stays per task."
    )
    for key, ref in reference.items():
        if is_head_key(key, ignored_layers):
            continue
        if key not in other:
            raise ArchitectureMismatchError(
                f"{prefix} First differing key: {key!r} (shape {tuple(ref.shape)} in {reference_name}) is missing "
                f"from {other_name}."
            )
        if tuple(other[key].shape) != tuple(ref.shape):
            raise ArchitectureMismatchError(
                f"{prefix} First differing key: {key!r} has shape {tuple(other[key].shape)} in {other_name} but {tuple(ref.shape)} in "
                f"{reference_name}.{heads_hint}"
            )
    for key, value in other.items():
        if key not in reference and not is_head_key(key, ignored_layers):
            raise ArchitectureMismatchError(
                f"{prefix} First differing key: {key!r} (shape {tuple(value.shape)}) is in {other_name} but not in {reference_name}."
            )


# -- task vectors and the base-distance check ---------------------------------------------------------------------


def task_vector(base: StateDict, finetuned: StateDict, ignored_layers: Sequence[str] = ()) -> dict[str, Tensor]:
    r""":math:`\tau = \theta_{ft} - \theta_0` for every mergeable key (floating, not a head), in the base's dtype.

    Example:
        >>> task_vector({"w": torch.tensor([1.0, 2.0]), "head": torch.zeros(1)},
        ...             {"w": torch.tensor([1.5, 1.0]), "head": torch.ones(1)}, ignored_layers=["head"])
        {'w': tensor([ 0.5000, -1.0000])}
    """
    return {k: finetuned[k].to(base[k].dtype) - base[k] for k in mergeable_keys(base, ignored_layers)}


@dataclass(frozen=True)
class BaseDistance:
    r"""How far a fine-tuned model is from the base: :math:`\lVert\theta - \theta_0\rVert / \lVert\theta_0\rVert`
    over all checked tensors (``ratio``), and the tensor where that ratio is largest."""

    ratio: float
    worst_key: str
    worst_ratio: float


def _checked_keys(base: StateDict, keys: Iterable[str]) -> list[str]:
    # weight matrices and kernels only: biases and normalisation scales (BatchNorm gammas start at 1 in every
    # network) would hide a foreign model, and running statistics legitimately move far on a new input domain
    floating = [k for k in keys if base[k].is_floating_point() and not k.endswith(_STAT_SUFFIXES)]
    weights = [k for k in floating if base[k].dim() >= 2]
    return weights or floating


def base_distance(base: StateDict, finetuned: StateDict, keys: Optional[Sequence[str]] = None) -> BaseDistance:
    r"""Relative distance of ``finetuned`` from ``base`` (one tensor at a time, summed in float64).

    ``keys`` defaults to the floating keys of ``base`` present in ``finetuned``. Only weight matrices and
    kernels (tensors of two or more dimensions) are compared when there are any: biases and normalisation scales
    (BatchNorm's gamma is 1 at initialisation in every network) would make two unrelated networks look close,
    and BatchNorm running statistics legitimately move far when fine-tuning on a new input domain.

    Example:
        >>> base_distance({"w": torch.tensor([[3.0, 4.0]])}, {"w": torch.tensor([[3.0, 4.5]])}).ratio
        0.1
    """
    keys = [k for k in base if base[k].is_floating_point() and k in finetuned] if keys is None else list(keys)
    diff_sq = base_sq = 0.0
    worst_key, worst = "", 0.0
    for k in _checked_keys(base, keys):
        b = base[k]
        d = float(torch.linalg.vector_norm(finetuned[k].to(b.dtype) - b)) ** 2  # one temporary per tensor
        n = float(torch.linalg.vector_norm(b)) ** 2
        diff_sq += d
        base_sq += n
        r = math.sqrt(d / n) if n > 0 else (math.inf if d > 0 else 0.0)
        if r > worst:
            worst_key, worst = k, r
    ratio = math.sqrt(diff_sq / base_sq) if base_sq > 0 else (math.inf if diff_sq > 0 else 0.0)
    return BaseDistance(ratio, worst_key, worst)


def check_base_distance(
    base: StateDict, finetuned: StateDict, max_ratio: float = DEFAULT_MAX_TASK_VECTOR_RATIO, action: OnForeignBase = "error",
    name: str = "the model", keys: Optional[Sequence[str]] = None,
) -> BaseDistance:
    r"""Refuse (``action="error"``), warn about (``"warn"``) or accept (``"ignore"``) a fine-tuned model whose
    relative distance from the base (:func:`base_distance`) exceeds ``max_ratio``.

    Fine-tuning moves the weights of a pretrained model by a few percent of their norm (the task vectors of the
    task-arithmetic paper are small next to the pretrained weights). Two independently initialised or
    independently pretrained networks differ by about :math:`\sqrt{2}` times the norm of either, so a ratio
    near or above 1 means the model was not fine-tuned from this base, and merging its "task vector" would add
    a whole foreign network to the base.
    """
    check_choice("on_foreign_base", action, FOREIGN_BASE_ACTIONS)
    dist = base_distance(base, finetuned, keys)
    if action != "ignore" and dist.ratio > max_ratio:
        message = (
            f"{name} is far from the base model: ||theta - theta_0|| / ||theta_0|| = {dist.ratio:.3g} (largest in "
            f"{dist.worst_key!r}: {dist.worst_ratio:.3g}), above max_task_vector_ratio={max_ratio}. Fine-tuning "
            "usually moves the weights by a few percent; a ratio near or above 1 means it was not fine-tuned from "
            "this base (another pretrained model or another random initialisation), so its task vector is "
            "meaningless. Give the base it was fine-tuned from, or raise `max_task_vector_ratio` (or set "
            "`on_foreign_base='warn'`) if the fine-tuning really moved it this far."
        )
        if action == "error":
            raise ForeignBaseError(message)
        warnings.warn(message, UserWarning, stacklevel=2)
    return dist


def _validate_ratio(max_ratio: float) -> None:
    check_positive("max_task_vector_ratio", max_ratio)


def _names(sources: Sequence[Source], names: Optional[Sequence[str]]) -> list[str]:
    if names is not None:
        if len(names) != len(sources):
            raise ValueError(f"Got {len(names)} names for {len(sources)} models.")
        return [str(n) for n in names]
    out = []
    for i, s in enumerate(sources):
        out.append(f"model {i} ({s})" if isinstance(s, (str, os.PathLike)) else f"model {i}")
    return out


def iter_finetuned(
    base: StateDict, finetuned: Iterable[Source], ignored_layers: Sequence[str] = (),
    max_task_vector_ratio: float = DEFAULT_MAX_TASK_VECTOR_RATIO, on_foreign_base: OnForeignBase = "error",
    names: Optional[Sequence[str]] = None,
) -> Iterator[tuple[str, dict[str, Tensor]]]:
    """Yield ``(name, state_dict)`` for each fine-tuned model, loaded one at a time and checked against ``base``
    (same architecture outside the heads, not from a foreign base). Nothing is kept between iterations. The
    arguments (and an empty list) are refused at the call, not at the first iteration."""
    _validate_ratio(max_task_vector_ratio)
    check_choice("on_foreign_base", on_foreign_base, FOREIGN_BASE_ACTIONS)
    sources = list(finetuned)
    if not sources:
        raise ValueError("No fine-tuned models to merge: give at least one state dict or checkpoint path.")
    labels = _names(sources, names)
    keys = mergeable_keys(base, ignored_layers)
    if not keys:
        raise ValueError("Nothing to merge: the base has no floating-point tensor outside `ignored_layers`.")

    def stream() -> Iterator[tuple[str, dict[str, Tensor]]]:
        for source, label in zip(sources, labels):
            state = read_state_dict(source, reference_keys=base.keys(), name=label)
            check_same_architecture(base, state, ignored_layers, other_name=label)
            check_base_distance(base, state, max_task_vector_ratio, on_foreign_base, label, keys)
            yield label, state

    return stream()


# -- simple averaging ---------------------------------------------------------------------------------------------


def simple_average(
    finetuned: Iterable[Source], ignored_layers: Sequence[str] = (), base: Optional[StateDict] = None,
    max_task_vector_ratio: float = DEFAULT_MAX_TASK_VECTOR_RATIO, on_foreign_base: OnForeignBase = "error",
    names: Optional[Sequence[str]] = None,
) -> dict[str, Tensor]:
    r"""Uniform weight average :math:`\frac{1}{N}\sum_k \theta_k` of the shared (non-head) weights.

    Streams: holds one running sum and one loaded model at a time. Integer buffers come from ``base`` when
    given, else from the first model.
    With ``base`` given, every model is checked against it (architecture, base distance); without, against
    the first model (architecture only). Equal to task arithmetic with :math:`\lambda = 1/N`.

    Example:
        >>> simple_average([{"w": torch.tensor([0.0, 2.0])}, {"w": torch.tensor([1.0, 4.0])}])
        {'w': tensor([0.5000, 3.0000])}
    """
    sources = list(finetuned)
    if not sources:
        raise ValueError("No fine-tuned models to average.")
    labels = _names(sources, names)
    total: dict[str, Tensor] = {}
    reference: Optional[StateDict] = base
    count = 0
    if base is not None:
        stream: Iterable[tuple[str, dict[str, Tensor]]] = iter_finetuned(
            base, sources, ignored_layers, max_task_vector_ratio, on_foreign_base, labels
        )
    else:
        def _plain() -> Iterator[tuple[str, dict[str, Tensor]]]:
            ref = None
            for src, label in zip(sources, labels):
                state = read_state_dict(src, reference_keys=None if ref is None else ref.keys(), name=label)
                if ref is None:
                    ref = state
                else:
                    check_same_architecture(ref, state, ignored_layers, reference_name=labels[0], other_name=label)
                yield label, state
        stream = _plain()
    for _, state in stream:
        if reference is None:
            reference = {k: v for k, v in state.items() if not is_head_key(k, ignored_layers)}
        if not total:
            for k, v in reference.items():
                if is_head_key(k, ignored_layers):
                    continue
                if v.is_floating_point():
                    total[k] = state[k].to(v.dtype).clone()
                else:
                    total[k] = (state[k] if base is None else v).clone()
        else:
            for k in total:
                if total[k].is_floating_point():
                    total[k].add_(state[k].to(total[k].dtype))
        count += 1
        del state
    for k in total:
        if total[k].is_floating_point():
            total[k].div_(count)
    return total
