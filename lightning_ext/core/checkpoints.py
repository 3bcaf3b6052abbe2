"""Reading user-supplied weights safely: ``torch.load(weights_only=True)``, unwrapping, wrapper-prefix matching.

Every component that loads a file a user names (a teacher, models to merge, pretrained backbone weights)
reads it through :func:`load_checkpoint` / :func:`read_state_dict`, so all of them refuse pickled code the same
way and give the same advice when a file cannot be read.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor

Source = Union[str, os.PathLike, Mapping[str, Tensor]]

#: Prefixes that wrappers add to parameter names (``ImageClassifier.net``, DDP's ``module``, ``torch.compile``).
WRAPPER_PREFIXES = ("net.", "model.", "module.", "backbone.", "student.", "teacher.", "_orig_mod.")

__all__ = ["WRAPPER_PREFIXES", "load_checkpoint", "load_error_summary", "match_prefixes", "read_state_dict",
           "state_dict_from"]


def _hparam_number_types() -> list[type]:
    """The constrained number types of ``jsonargparse.typing`` (``PositiveFloat``, ``NonNegativeInt``, ...).

    A LightningModule whose constructor is annotated with them (ours are, so the CLI checks values) saves its
    hyperparameters as instances of those ``float``/``int`` subclasses, and ``torch.load(weights_only=True)``
    refuses any global it does not know: without this allowlist a checkpoint written by ``lightning-ext fit`` could
    not be read back by the library (found by the held-out ``lightning-ext compress`` run). They hold a number and
    validate it when rebuilt; no code of the file runs."""
    try:
        import jsonargparse.typing as typing_module

        import lightning_ext.core.validation  # noqa: F401 - registers the library's own constrained types there
    except ImportError:  # pragma: no cover - jsonargparse ships with lightning[extra], which the CLI needs
        return []
    found = []
    for value in vars(typing_module).values():
        if (isinstance(value, type) and issubclass(value, (int, float)) and value not in (int, float, bool)
                and value.__module__ == typing_module.__name__):
            found.append(value)
    return found


def load_error_summary(err: BaseException) -> str:
    """The one line that matters of a ``torch.load`` error (torch's own messages span several paragraphs).

    Example:
        >>> load_error_summary(RuntimeError("PytorchStreamReader failed reading zip archive: failed finding "
        ...                                 "central directory. This is an internal miniz error."))
        'PytorchStreamReader failed reading zip archive: failed finding central directory'
    """
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\s+was not an allowed global|\.?\s+Please use|\n\n|$)", text, re.S)
    line = found.group(1) if found else text.strip().split("\n")[0]
    line = " ".join(line.split()).split(". ")[0].rstrip(".")
    return line or type(err).__name__


def load_checkpoint(path: Union[str, os.PathLike], what: str = "Checkpoint", argument: str = "") -> dict:
    """Read a file saved with ``torch.save`` as a dict, with ``torch.load(weights_only=True)`` on the CPU.

    Args:
        path: the file.
        what: how error messages name the file (e.g. ``"Teacher checkpoint"``).
        argument: the constructor argument that named the file, for the "check ..." advice.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file cannot be read without unpickling code, or does not hold a dict.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"{what} {file} does not exist" + (f"; check `{argument}`." if argument else "."))
    try:
        with torch.serialization.safe_globals(_hparam_number_types()):
            obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - re-raised with advice
        raise ValueError(
            f"Could not read {what.lower()} {file} with torch.load(weights_only=True): {load_error_summary(err)}. "
            "Save weights as a "
            "state dict (torch.save(model.state_dict(), path)) or as a Lightning checkpoint of plain types."
        ) from err
    if not isinstance(obj, Mapping):
        raise ValueError(f"{what} {file} holds a {type(obj).__name__}, expected a state dict or a Lightning checkpoint.")
    return dict(obj)


def state_dict_from(obj: Mapping, where: str = "The checkpoint") -> dict[str, Tensor]:
    """The tensors of a state dict, unwrapping a Lightning checkpoint (``"state_dict"``) or a
    ``{"model_state_dict": ...}`` / ``{"model": ...}`` file.

    Example:
        >>> state_dict_from({"state_dict": {"w": torch.ones(1)}, "epoch": 3})
        {'w': tensor([1.])}
    """
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    state = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, Tensor)}
    if not state:
        raise ValueError(f"{where} contains no tensors: expected a state dict or a Lightning checkpoint.")
    return state


def match_prefixes(
    state: dict[str, Tensor], reference: Iterable[str], prefixes: Iterable[str] = WRAPPER_PREFIXES
) -> dict[str, Tensor]:
    """Add or strip one wrapper prefix (``net.``, ``model.``, ...) if that makes the keys match ``reference`` better.

    Example:
        >>> sorted(match_prefixes({"net.fc.weight": torch.ones(1)}, ["fc.weight"]))
        ['fc.weight']
    """
    ref = set(reference)
    best, best_overlap = state, len(ref & state.keys())
    if best_overlap == len(state):
        return state
    for prefix in prefixes:
        stripped = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        added = {prefix + k: v for k, v in state.items()}
        for candidate in (stripped, added):
            overlap = len(ref & candidate.keys())
            if overlap > best_overlap:
                best, best_overlap = candidate, overlap
    return best


def read_state_dict(source: Source, reference_keys: Optional[Iterable[str]] = None, name: Optional[str] = None,
                    check_finite: bool = True) -> dict[str, Tensor]:
    """A state dict from a mapping or a file (``torch.load(weights_only=True)``, on the CPU).

    With ``check_finite`` (the default), a floating tensor holding NaN or infinity is refused with a
    :class:`ValueError` naming the tensor: user weights are never merged, distilled from or fine-tuned silently
    broken.

    Lightning checkpoints (and ``{"model_state_dict": ...}``/``{"model": ...}`` files) are unwrapped; only
    tensor values are kept. With ``reference_keys``, one wrapper prefix (:data:`WRAPPER_PREFIXES`) is added or
    stripped if that makes the keys match better, so a checkpoint of an ``ImageClassifier`` (keys ``net.*``)
    fits its bare backbone and vice versa.

    Example:
        >>> read_state_dict({"net.w": torch.ones(2)}, reference_keys=["w"])
        {'w': tensor([1., 1.])}
    """
    if isinstance(source, Mapping):
        state = state_dict_from(source, name or "The state dict")
    elif isinstance(source, (str, os.PathLike)):
        state = state_dict_from(load_checkpoint(source, name or "Checkpoint"), name or str(source))
    else:
        raise TypeError(f"Weights must be given as a state dict or a path, got {type(source).__name__}.")
    if reference_keys is not None:
        state = match_prefixes(state, reference_keys)
    if check_finite:
        from lightning_ext.core.validation import check_finite_tensors

        check_finite_tensors(state, name or (str(source) if not isinstance(source, Mapping) else "The state dict"))
    return state
