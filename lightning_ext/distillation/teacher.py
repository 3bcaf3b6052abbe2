"""The teacher of knowledge distillation: built from a module, a model name or a class path, loaded from a
user's weights file through :mod:`lightning_ext.core.checkpoints` (``weights_only=True``, wrapper prefixes matched,
non-finite tensors refused), frozen. Used by both distillation wrappers; no Trainer needed."""

from __future__ import annotations

import difflib
import importlib
from pathlib import Path
from typing import Optional, Union

from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_ext.core.checkpoints import load_checkpoint, match_prefixes, state_dict_from
from lightning_ext.core.optional import require
from lightning_ext.core.validation import check_finite_tensors

__all__ = ["build_teacher", "load_teacher_weights"]


def _read_checkpoint(path: Union[str, Path]) -> dict:
    return load_checkpoint(path, "Teacher checkpoint", "teacher_checkpoint")


def close_names(name: str, names: list[str]) -> str:
    """The text ``" Close names: a, b."`` for the names closest to ``name`` (empty when none is close)."""
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    return f" Close names: {', '.join(close)}." if close else ""


def load_teacher_weights(module: nn.Module, path: Union[str, Path]) -> None:
    """Load a state dict or Lightning checkpoint into ``module`` with ``torch.load(weights_only=True)``.

    Key prefixes that wrappers add (``net.``, ``model.``, ``module.``, ``_orig_mod.``, ...) are matched in
    both directions. Every parameter and buffer of ``module`` must be found with the right shape, otherwise a
    ``ValueError`` lists what is missing: distilling from a half-loaded teacher would silently teach noise.
    Extra tensors in the file are ignored with a warning; a tensor holding NaN or infinity is refused.
    """
    state = state_dict_from(_read_checkpoint(path), f"Teacher checkpoint {path}")
    check_finite_tensors(state, f"Teacher checkpoint {path}")
    own = module.state_dict()
    best = match_prefixes(state, own.keys())
    missing = sorted(own.keys() - best.keys())
    if missing:
        raise ValueError(
            f"Teacher checkpoint {path} does not match the teacher architecture {type(module).__name__}: "
            f"{len(missing)} of its {len(own)} tensors are missing (e.g. {missing[:3]}); file keys look like "
            f"{sorted(state)[:3]}. Build `teacher` with the architecture the checkpoint was saved from."
        )
    wrong = [f"{k}: file {tuple(best[k].shape)} vs model {tuple(own[k].shape)}" for k in own if best[k].shape != own[k].shape]
    if wrong:
        raise ValueError(
            f"Teacher checkpoint {path} has tensors of other shapes than the teacher ({len(wrong)}, e.g. "
            f"{wrong[:3]}). Check the teacher's constructor arguments (num_classes, widths)."
        )
    extra = best.keys() - own.keys()
    if extra:
        rank_zero_warn(f"KnowledgeDistillation: ignored {len(extra)} tensors of {path} not in the teacher, e.g. {sorted(extra)[:3]}.")
    module.load_state_dict({k: best[k] for k in own}, strict=True)


def build_teacher(
    teacher: Union[nn.Module, str], checkpoint: Optional[str] = None, kwargs: Optional[dict] = None,
    freeze: bool = True,
) -> nn.Module:
    """Build (or take) the teacher and load its weights; returns it frozen and in eval mode (``freeze``).

    ``teacher`` is an ``nn.Module`` (in YAML: ``{class_path: ..., init_args: ...}``, e.g. an
    ``ImageClassifier`` with ``pretrained_weights``), or a string: ``"timm:<name>"`` (``timm.create_model``
    without download), ``"torchvision:<name>"`` (``torchvision.models.get_model(weights=None)``) or the class
    path of any ``nn.Module``/``LightningModule``. ``kwargs`` go to that constructor; for a LightningModule
    class with a Lightning ``checkpoint``, the checkpoint's saved hyperparameters are used first (``kwargs``
    override them), so ``teacher: my_pkg.MyModel`` + ``teacher_checkpoint: best.ckpt`` restores a trained run.
    ``checkpoint`` is loaded with :func:`load_teacher_weights` (``weights_only=True``).
    """
    kwargs = dict(kwargs or {})
    if isinstance(teacher, nn.Module):
        if kwargs:
            raise ValueError("`teacher_kwargs` only apply when `teacher` is a name or a class path, not a module.")
        module = teacher
    elif isinstance(teacher, str):
        module = _teacher_from_string(teacher, checkpoint, kwargs)
    else:
        raise TypeError(
            f"`teacher` must be an nn.Module, 'timm:<name>', 'torchvision:<name>' or a class path, got "
            f"{type(teacher).__name__}."
        )
    if checkpoint:
        load_teacher_weights(module, checkpoint)
    if freeze:
        module.eval().requires_grad_(False)
    return module


def _teacher_from_string(spec: str, checkpoint: Optional[str], kwargs: dict) -> nn.Module:
    if spec.endswith((".ckpt", ".pt", ".pth", ".bin", ".safetensors")) or "/" in spec:
        raise ValueError(
            f"`teacher={spec!r}` looks like a file. Give the architecture in `teacher` (a module, 'timm:<name>' "
            "or a class path) and the weights file in `teacher_checkpoint`."
        )
    kind, sep, name = spec.partition(":")
    if sep and kind == "timm":
        timm = require("timm", "KnowledgeDistillation with a timm teacher")
        if name not in timm.list_models():
            raise ValueError(f"Unknown timm model {name!r}.{close_names(name, timm.list_models())}")
        return timm.create_model(name, pretrained=False, **kwargs)
    if sep and kind == "torchvision":
        models = require("torchvision.models", "KnowledgeDistillation with a torchvision teacher")
        names = list(models.list_models())
        if name not in names:
            raise ValueError(f"Unknown torchvision model {name!r}.{close_names(name, names)}")
        return models.get_model(name, weights=None, **kwargs)
    if sep:
        raise ValueError(f"Unknown teacher source {kind!r} in {spec!r}; use 'timm:<name>', 'torchvision:<name>' or a class path.")
    module_name, _, attr = spec.rpartition(".")
    if not module_name:
        raise ValueError(
            f"`teacher={spec!r}` is not a class path; use 'package.module.Class', 'timm:<name>' or 'torchvision:<name>'."
        )
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"Cannot import the teacher class {spec!r}: {err}.") from err
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"The teacher class {spec!r} is not an nn.Module subclass.")
    if checkpoint and issubclass(cls, LightningModule):
        hparams = _read_checkpoint(checkpoint).get("hyper_parameters") or {}
        kwargs = {**dict(hparams), **kwargs}
    return cls(**kwargs)
