"""The pruning history in checkpoints: replay it before weights load, or load a pruned checkpoint for inference.

Every pruning-like callback (the filter pruners, :class:`~lightning_ext.compression.DataFreeCompression`) keeps
its history as a list of *steps* in its checkpoint state, marked with :data:`_STATE_MARKER`; a step is
``{"order", "ops", "input_shape", "input_dtype", ...}`` with ``ops`` in Torch-Pruning's history format
(:mod:`~lightning_ext.compression.plan`). One replay path serves all of them: :func:`replay_pruning_steps`
(before Lightning loads the weights, through :func:`_install_replay_hook`) and :func:`load_pruned_checkpoint`.
"""

from __future__ import annotations

import os
from typing import Any, Sequence, Union

import torch
from lightning.pytorch import LightningModule
from torch import nn

from lightning_ext.compression.graph import Op, PruningError
from lightning_ext.compression.plan import _APPLIED_ATTR, _mark_applied, applied_pruning_steps, apply_pruning_history
from lightning_ext.core.checkpoints import WRAPPER_PREFIXES, load_checkpoint, match_prefixes

HISTORY_VERSION = 1
_STATE_MARKER = "filter_pruning_version"  # marks a callback state in a checkpoint as a pruning history


def record_step(model: nn.Module, ops: Sequence[Op], example_inputs: torch.Tensor, **extra: Any) -> dict:
    """Mark ``ops`` (already applied to ``model``) as one pruning step and return its history record."""
    order = len(applied_pruning_steps(model))
    _mark_applied(model, ops)
    return {"order": order, "ops": [[str(n), bool(o), [int(i) for i in idx]] for n, o, idx in ops],
            "input_shape": [1, *example_inputs.shape[1:]],
            "input_dtype": str(example_inputs.dtype).replace("torch.", ""),
            **extra}


def refuse_spawning_launcher(trainer: Any, component: str, error: type[Exception] = PruningError) -> None:
    """Refuse ``ddp_spawn``/``ddp_fork``/``ddp_notebook`` fits: Lightning copies rank 0's weights back into the main
    process's model at the end of fit, and that model still has the unpruned shapes."""
    launcher = getattr(getattr(trainer, "strategy", None), "launcher", None)
    if "_MultiProcessingLauncher" in {c.__name__ for c in type(launcher).__mro__}:
        raise error(
            f"{component} cannot run under strategy='ddp_spawn'/'ddp_fork'/'ddp_notebook': at the end of fit "
            "Lightning copies rank 0's weights back into the main process's model, which still has the unpruned "
            "shapes there. Use strategy='ddp' (one script launched per process), or a single device."
        )


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

    Steps the model already went through (:func:`applied_pruning_steps`) are skipped. A step counts as done
    when it removed as many channels from the same layers: replay only rebuilds shapes for the weights that are
    loaded next, so which indices went does not matter (a compression that ran in ``setup()`` on a fresh model
    matches the checkpoint's step). Returns how many steps were applied now.

    Raises:
        PruningError: when the model has been pruned further than, or differently from, ``steps``
            (channels removed physically cannot be restored).
    """
    wanted = [[[str(n), bool(o), [int(i) for i in idx]] for n, o, idx in s["ops"]] for s in steps]
    done = applied_pruning_steps(model)

    def shape(step_ops: list) -> list:
        return [(n, o, len(idx)) for n, o, idx in step_ops]

    want_shapes, done_shapes = [shape(w) for w in wanted], [shape(d) for d in done]
    if want_shapes[: len(done)] != done_shapes:
        if done_shapes[: len(wanted)] == want_shapes:
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


def _rename_for(model: nn.Module, state: dict) -> tuple[str, str]:
    """``(strip, add)``: the wrapper prefix to strip from, or add to, checkpoint names so that they name parts of
    ``model`` (:func:`lightning_ext.core.checkpoints.match_prefixes`)."""
    matched = match_prefixes(state, model.state_dict().keys())
    if matched is state or not matched:
        return "", ""
    key = next(iter(matched))
    for prefix in WRAPPER_PREFIXES:
        if prefix + key in state:
            return prefix, ""
        if key.startswith(prefix) and key[len(prefix):] in state:
            return "", prefix
    return "", ""


def load_pruned_checkpoint(model: nn.Module, path: Union[str, os.PathLike], strict: bool = True) -> nn.Module:
    """Load a Lightning checkpoint of a pruned run into a freshly built (dense) ``model`` for inference.

    The checkpoint is read with ``torch.load(weights_only=True)`` on the CPU
    (:func:`lightning_ext.core.checkpoints.load_checkpoint`); the pruning steps saved by the pruning callbacks
    (``FilterPruning`` and its subclasses, ``DataFreeCompression``) are replayed on ``model`` (removing as many
    channels from the same layers), then the weights are loaded into the model's own devices. ``model`` may be
    the LightningModule that was trained or the bare network it wraps (a wrapper
    prefix such as ``net.`` is detected and stripped, :func:`lightning_ext.core.checkpoints.match_prefixes`).

    Example:
        >>> from lightning_ext.modules import ImageClassifier  # doctest: +SKIP
        >>> model = load_pruned_checkpoint(ImageClassifier("resnet10t", image_size=28), "last.ckpt")  # doctest: +SKIP
    """
    checkpoint = load_checkpoint(path, "Pruned checkpoint")
    if "state_dict" not in checkpoint:
        raise PruningError(f"{path} is not a Lightning checkpoint (no 'state_dict'); save it with a Trainer.")
    steps = pruning_steps_from_checkpoint(checkpoint)
    strip, add = _rename_for(model, checkpoint["state_dict"])
    own = {n for n, _ in model.named_modules()}

    def rename(name: str) -> str:
        return add + (name[len(strip):] if strip and name.startswith(strip) else name)

    steps = [dict(s, ops=[[rename(op[0]), op[1], op[2]] for op in s["ops"]]) for s in steps]
    missing = [op[0] for s in steps for op in s["ops"] if op[0] not in own][:3]
    if missing:
        raise PruningError(
            f"The checkpoint prunes layers {missing} that {type(model).__name__} does not have (also without a "
            "leading 'net.'-style prefix); build the same architecture the checkpoint was trained with."
        )
    replay_pruning_steps(model, steps)
    state = match_prefixes(checkpoint["state_dict"], model.state_dict().keys())
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
        steps = pruning_steps_from_checkpoint(checkpoint)
        try:
            replay_pruning_steps(self.module, steps)
        except PruningError:
            trainer = getattr(self.module, "_trainer", None)
            fitting = trainer is not None and str(getattr(trainer.state, "fn", "")).endswith("fit")
            if fitting or not _is_earlier_history(self.module, steps):
                raise
            _resize_to_state(self.module, checkpoint.get("state_dict", {}))  # validate/test/predict on it
            object.__setattr__(self.module, _APPLIED_ATTR, [[list(op) for op in s["ops"]] for s in steps])
        self.original(checkpoint)


def _is_earlier_history(model: nn.Module, steps: Sequence[dict]) -> bool:
    """Whether ``steps`` are a prefix (by shapes) of the steps already applied to ``model``."""
    def shape(ops: list) -> list:
        return [(str(n), bool(o), len(idx)) for n, o, idx in ops]

    done = [shape(d) for d in applied_pruning_steps(model)]
    return len(steps) < len(done) and done[: len(steps)] == [shape(s["ops"]) for s in steps]


def _resize_to_state(model: nn.Module, state: dict) -> None:
    """Give the convs, norms and linears of ``model`` the shapes of ``state`` (an earlier, less pruned checkpoint of
    the same run; its weights are loaded next). Raises :class:`PruningError` for any other layer whose shape differs."""
    for name, module in model.named_modules():
        prefix = name + "." if name else ""
        own = {k: v for k, v in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
               if v is not None}
        changed = {k: state[prefix + k] for k, v in own.items()
                   if prefix + k in state and tuple(state[prefix + k].shape) != tuple(v.shape)}
        if not changed:
            continue
        if isinstance(module, nn.modules.conv._ConvNd):
            w = state[prefix + "weight"]
            if module.groups == module.in_channels == module.out_channels:  # depthwise stays depthwise
                module.groups = int(w.shape[0])
            if module.transposed:
                module.in_channels, module.out_channels = int(w.shape[0]), int(w.shape[1]) * module.groups
            else:
                module.out_channels, module.in_channels = int(w.shape[0]), int(w.shape[1]) * module.groups
        elif isinstance(module, nn.modules.batchnorm._NormBase):
            module.num_features = int(next(iter(changed.values())).shape[0])
        elif isinstance(module, nn.Linear):
            module.out_features, module.in_features = (int(d) for d in state[prefix + "weight"].shape)
        else:
            raise PruningError(
                f"The checkpoint was saved before the last pruning step, and layer {name!r} "
                f"({type(module).__name__}) cannot be given its earlier shape; load the checkpoint into a fresh model "
                "with `load_pruned_checkpoint`."
            )
        for key, value in changed.items():
            old = own[key]
            new = torch.empty(value.shape, dtype=old.dtype, device=old.device)
            if isinstance(old, nn.Parameter):
                setattr(module, key, nn.Parameter(new, requires_grad=old.requires_grad))
            else:
                module.register_buffer(key, new)


def _install_replay_hook(pl_module: LightningModule) -> None:
    if not isinstance(pl_module.__dict__.get("on_load_checkpoint"), _ReplayBeforeWeightsLoad):
        object.__setattr__(pl_module, "on_load_checkpoint", _ReplayBeforeWeightsLoad(pl_module))


def _remove_replay_hook(pl_module: LightningModule) -> None:
    if isinstance(pl_module.__dict__.get("on_load_checkpoint"), _ReplayBeforeWeightsLoad):
        del pl_module.__dict__["on_load_checkpoint"]


