"""The pruning history in checkpoints: replay it before weights load, or load a pruned checkpoint for inference."""

from __future__ import annotations

import os
from typing import Sequence, Union

import torch
from lightning.pytorch import LightningModule
from torch import nn

from lightning_ext.compression.graph import PruningError
from lightning_ext.compression.plan import _mark_applied, applied_pruning_steps, apply_pruning_history

HISTORY_VERSION = 1
_STATE_MARKER = "filter_pruning_version"  # marks a callback state in a checkpoint as a pruning history


def pruning_steps_from_checkpoint(checkpoint: dict) -> list[dict]:
    """Every pruning step saved in a Lightning checkpoint dict by any :class:`FilterPruning`, in applied order."""
    steps = []
    for state in (checkpoint.get("callbacks") or {}).values():
        if isinstance(state, dict) and state.get(_STATE_MARKER):
            steps += state.get("steps", [])
    return sorted(steps, key=lambda s: s["order"])


def _example_from_step(step: dict, device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    dtype = getattr(torch, step.get("input_dtype", "float32"))
    return torch.zeros(tuple(step["input_shape"]), dtype=dtype, device=device)


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def replay_pruning_steps(model: nn.Module, steps: Sequence[dict]) -> int:
    """Bring ``model`` to the shape after ``steps`` (from :func:`pruning_steps_from_checkpoint`).

    Steps the model already went through (:func:`applied_pruning_steps`) are skipped. Returns how many steps
    were applied now.

    Raises:
        PruningError: when the model has been pruned further than, or differently from, ``steps``
            (channels removed physically cannot be restored).
    """
    wanted = [[[str(n), bool(o), [int(i) for i in idx]] for n, o, idx in s["ops"]] for s in steps]
    done = applied_pruning_steps(model)
    if wanted[: len(done)] != done:
        if done[: len(wanted)] == wanted:
            raise PruningError(
                f"The checkpoint was saved after {len(wanted)} pruning step(s), but this model has already been "
                f"pruned {len(done)} step(s); removed channels cannot be restored. Load the checkpoint into a "
                "fresh model with `load_pruned_checkpoint`, or evaluate the final weights (ckpt_path='last' / None)."
            )
        raise PruningError(
            "The checkpoint's pruning history differs from the pruning already applied to this model; load it "
            "into a fresh model with `load_pruned_checkpoint`."
        )
    device = _model_device(model)
    for step, ops in zip(steps[len(done):], wanted[len(done):]):
        apply_pruning_history(model, ops, _example_from_step(step, device))
        _mark_applied(model, ops)
    return len(wanted) - len(done)


def _strip_prefix_for(model: nn.Module, names: Sequence[str]) -> str:
    """The prefix (e.g. ``'net.'``) to strip from checkpoint names so that they name modules of ``model``."""
    if not names:
        return ""
    own = {n for n, _ in model.named_modules()}
    candidates = [""] + sorted({n.split(".")[0] + "." for n in names if "." in n})
    for prefix in candidates:
        if all(n.startswith(prefix) and n[len(prefix):] in own for n in names):
            return prefix
    missing = [n for n in names if n not in own][:3]
    raise PruningError(
        f"The checkpoint prunes layers {missing} that {type(model).__name__} does not have (also without a "
        "leading 'net.'-style prefix); build the same architecture the checkpoint was trained with."
    )


def load_pruned_checkpoint(
    model: nn.Module, path: Union[str, os.PathLike], strict: bool = True, map_location: Union[str, torch.device] = "cpu"
) -> nn.Module:
    """Load a Lightning checkpoint of a pruned run into a freshly built (dense) ``model`` for inference.

    The checkpoint is read with ``torch.load(weights_only=True)``; the pruning steps saved by the
    :class:`FilterPruning` callbacks are replayed on ``model`` (removing the same channels), then the weights
    are loaded. ``model`` may be the LightningModule that was trained or the bare network it wraps (the
    ``net.`` prefix is detected and stripped).

    Example:
        >>> from lightning_ext.modules import ImageClassifier  # doctest: +SKIP
        >>> model = load_pruned_checkpoint(ImageClassifier("resnet10t", image_size=28), "last.ckpt")  # doctest: +SKIP
    """
    checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise PruningError(f"{path} is not a Lightning checkpoint (no 'state_dict'); save it with a Trainer.")
    steps = pruning_steps_from_checkpoint(checkpoint)
    names = [op[0] for s in steps for op in s["ops"]]
    prefix = _strip_prefix_for(model, names)
    if prefix:
        steps = [dict(s, ops=[[op[0][len(prefix):], op[1], op[2]] for op in s["ops"]]) for s in steps]
    replay_pruning_steps(model, steps)
    state = checkpoint["state_dict"]
    if prefix:
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    elif not steps and not any(k in model.state_dict() for k in state):  # dense checkpoint, bare network
        own = model.state_dict()
        for p in sorted({k.split(".")[0] + "." for k in state if "." in k}):
            if any(k[len(p):] in own for k in state if k.startswith(p)):
                state = {k[len(p):]: v for k, v in state.items() if k.startswith(p)}
                break
    model.load_state_dict(state, strict=strict)
    return model


class _ReplayBeforeWeightsLoad:
    """Installed as ``pl_module.on_load_checkpoint``: replays the checkpoint's pruning history before Lightning
    loads the weights (Lightning calls this hook right before ``load_state_dict``, for fit, validate, test and
    predict with ``ckpt_path``), then calls the module's own hook."""

    def __init__(self, module: LightningModule) -> None:
        self.module = module
        self.original = type(module).on_load_checkpoint.__get__(module)

    def __call__(self, checkpoint: dict) -> None:
        replay_pruning_steps(self.module, pruning_steps_from_checkpoint(checkpoint))
        self.original(checkpoint)


def _install_replay_hook(pl_module: LightningModule) -> None:
    if not isinstance(pl_module.__dict__.get("on_load_checkpoint"), _ReplayBeforeWeightsLoad):
        object.__setattr__(pl_module, "on_load_checkpoint", _ReplayBeforeWeightsLoad(pl_module))


def _remove_replay_hook(pl_module: LightningModule) -> None:
    if isinstance(pl_module.__dict__.get("on_load_checkpoint"), _ReplayBeforeWeightsLoad):
        del pl_module.__dict__["on_load_checkpoint"]


