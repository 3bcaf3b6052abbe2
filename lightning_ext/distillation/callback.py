r"""``KnowledgeDistillation``: add a frozen teacher to any training run, without changing its LightningModule.

The functional core is :class:`Distiller` (teacher, forward hooks, projectors and the loss terms, usable
without a Trainer) with the pure losses of :mod:`lightning_ext.distillation.losses`; the callback
below and :class:`~lightning_ext.distillation.module.DistillationModule` are thin wrappers of it.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from lightning_ext.core.optional import require
from lightning_ext.core.checkpoints import load_checkpoint, match_prefixes, state_dict_from
from lightning_ext.distillation.losses import (
    COMBINE_MODES,
    WeightSchedule,
    as_schedule,
    combine_losses,
    feature_mse_loss,
    kd_kl_loss,
    make_projector,
)

InputKey = Optional[Union[int, str]]

def _read_checkpoint(path: Union[str, Path]) -> dict:
    return load_checkpoint(path, "Teacher checkpoint", "teacher_checkpoint")


# -- the teacher ----------------------------------------------------------------------------------------------


def _close(name: str, names: list[str]) -> str:
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    return f" Close names: {', '.join(close)}." if close else ""


def load_teacher_weights(module: nn.Module, path: Union[str, Path]) -> None:
    """Load a state dict or Lightning checkpoint into ``module`` with ``torch.load(weights_only=True)``.

    Key prefixes that wrappers add (``net.``, ``model.``, ``module.``, ``_orig_mod.``, ...) are matched in
    both directions. Every parameter and buffer of ``module`` must be found with the right shape, otherwise a
    ``ValueError`` lists what is missing: distilling from a half-loaded teacher would silently teach noise.
    Extra tensors in the file are ignored with a warning.
    """
    state = state_dict_from(_read_checkpoint(path), f"Teacher checkpoint {path}")
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
            raise ValueError(f"Unknown timm model {name!r}.{_close(name, timm.list_models())}")
        return timm.create_model(name, pretrained=False, **kwargs)
    if sep and kind == "torchvision":
        models = require("torchvision.models", "KnowledgeDistillation with a torchvision teacher")
        names = list(models.list_models())
        if name not in names:
            raise ValueError(f"Unknown torchvision model {name!r}.{_close(name, names)}")
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


def _as_logits(output: Any) -> Tensor:
    """The logits tensor of a model output: the tensor itself, ``output.logits``/``output["logits"]`` or ``output[0]``."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    if hasattr(output, "logits") and isinstance(output.logits, Tensor):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"Cannot find logits in a model output of type {type(output).__name__}.")


def select_input(batch: Any, key: InputKey) -> Any:
    """The model input of a batch: ``batch[key]`` for tuples/lists (int) and mappings (str); a bare tensor is the input."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(key, int) and isinstance(batch, (tuple, list)):
        if not -len(batch) <= key < len(batch):
            raise IndexError(f"`input_key={key}` is out of range for a batch of {len(batch)} elements.")
        return batch[key]
    if isinstance(key, str) and isinstance(batch, Mapping):
        if key not in batch:
            raise KeyError(f"`input_key={key!r}` is not in the batch; its keys are {sorted(batch)}.")
        return batch[key]
    raise TypeError(
        f"Cannot take `input_key={key!r}` from a batch of type {type(batch).__name__}: use an int for tuple/list "
        "batches, a str for dict batches, or null to give the teacher the student's own input."
    )


# -- the functional core --------------------------------------------------------------------------------------


class Distiller:
    r"""Teacher, forward hooks, projectors and the distillation terms: the core both wrappers share.

    Usable without a Trainer: :meth:`attach` registers forward hooks on the student (feature modules, and the
    module whose output are the logits when ``logits_module`` is given) and on the teacher; inside
    :meth:`capturing` the student's hooked outputs are recorded (first call per module);
    :meth:`teacher_logits` runs the frozen teacher under ``no_grad``; :meth:`terms` returns the logit KD term
    (:func:`~lightning_ext.distillation.losses.kd_kl_loss`) and the summed feature terms
    (:func:`~lightning_ext.distillation.losses.feature_mse_loss` after each pair's projector).

    Args:
        teacher: the teacher module (frozen and put in eval mode here).
        temperature: KD temperature :math:`T`.
        feature_pairs: ``{student_module_name: teacher_module_name}`` to distil features between.
        logits_module: name of the student module whose output are the logits (``""``: the student itself);
            ``None`` when the caller passes logits to :meth:`terms` directly.
        projector_seed: seed of the projectors' initialisation (the global RNG is left untouched).
        freeze: freeze the teacher now (else call :meth:`freeze` later, e.g. after checking it shares no
            parameters with the student).

    Example:
        >>> torch.manual_seed(0) and None
        >>> student = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> teacher = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
        >>> d = Distiller(teacher, feature_pairs={"0": "0"})
        >>> d.attach(student)
        >>> d.build(student, torch.zeros(2, 4))  # checks shapes, builds the 8->16 projector
        >>> with d.capturing():
        ...     logits = student(torch.randn(5, 4))
        >>> terms = d.terms(logits, d.teacher_logits(torch.randn(5, 4)))
        >>> sorted(terms), list(d.projectors)
        (['feature', 'kd'], ['0__0'])
    """

    def __init__(
        self,
        teacher: nn.Module,
        temperature: float = 4.0,
        feature_pairs: Optional[Mapping[str, str]] = None,
        logits_module: Optional[str] = None,
        projector_seed: int = 0,
        freeze: bool = True,
    ) -> None:
        if temperature <= 0:
            raise ValueError(f"`temperature` must be > 0, got {temperature}.")
        self.teacher = teacher
        if freeze:
            self.freeze()
        self.temperature = float(temperature)
        self.feature_pairs = dict(feature_pairs or {})
        self.logits_module = logits_module
        self.projector_seed = projector_seed
        self.projectors = nn.ModuleDict()
        self.built = False
        self.checked = False
        self._handles: list[Any] = []
        self._capturing = False
        self._student_feats: dict[str, Tensor] = {}
        self._teacher_feats: dict[str, Tensor] = {}
        self._logits: Optional[Tensor] = None
        self._logits_input: Any = None

    def freeze(self) -> None:
        """Put the teacher in eval mode and turn off its gradients."""
        self.teacher.eval().requires_grad_(False)

    @staticmethod
    def projector_key(student_name: str, teacher_name: str) -> str:
        return f"{student_name.replace('.', '_')}__{teacher_name.replace('.', '_')}"

    # -- hooks --------------------------------------------------------------------------------------------
    @staticmethod
    def _module(root: nn.Module, name: str, role: str, arg: str) -> nn.Module:
        if name == "":
            return root
        try:
            return root.get_submodule(name)
        except AttributeError:
            names = [n for n, _ in root.named_modules() if n]
            raise ValueError(
                f"The {role} has no module named {name!r} (in `{arg}`).{_close(name, names)} "
                f"Its top-level modules are {[n for n, _ in root.named_children()][:10]}."
            ) from None

    def attach(self, student: nn.Module) -> None:
        """Register the forward hooks on ``student`` and the teacher (replacing earlier ones)."""
        self.detach()
        for s_name, t_name in self.feature_pairs.items():
            s_mod = self._module(student, s_name, "student", "feature_pairs")
            t_mod = self._module(self.teacher, t_name, "teacher", "feature_pairs")
            self._handles.append(s_mod.register_forward_hook(functools.partial(self._student_hook, s_name)))
            self._handles.append(t_mod.register_forward_hook(functools.partial(self._teacher_hook, t_name)))
        if self.logits_module is not None:
            mod = self._module(student, self.logits_module, "student", "student_module")
            self._handles.append(mod.register_forward_hook(self._logits_hook))

    def detach(self) -> None:
        """Remove every hook this distiller registered and drop what they captured."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.clear()

    def clear(self) -> None:
        """Drop the captured tensors (they hold the autograd graph of the last step)."""
        self._student_feats, self._teacher_feats, self._logits, self._logits_input = {}, {}, None, None

    def __getstate__(self) -> dict:
        # pickled for ddp_spawn: no hook handles, no captured (graph-holding) tensors
        state = dict(self.__dict__)
        state.update(_handles=[], _capturing=False, _student_feats={}, _teacher_feats={}, _logits=None,
                     _logits_input=None)
        return state

    def _student_hook(self, name: str, module: nn.Module, args: tuple, output: Any) -> None:
        if self._capturing and name not in self._student_feats:
            self._student_feats[name] = _as_logits(output)

    def _teacher_hook(self, name: str, module: nn.Module, args: tuple, output: Any) -> None:
        self._teacher_feats[name] = _as_logits(output)

    def _logits_hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._capturing and self._logits is None:
            self._logits = _as_logits(output)
            self._logits_input = args[0] if args else None

    @contextlib.contextmanager
    def capturing(self) -> Iterator[None]:
        """Record the student's hooked outputs during the block (earlier records are cleared first)."""
        self._student_feats, self._logits, self._logits_input = {}, None, None
        self._capturing = True
        try:
            yield
        finally:
            self._capturing = False

    @property
    def captured_logits(self) -> Tensor:
        if self._logits is None:
            raise RuntimeError(
                f"The student module {self.logits_module or '(the LightningModule itself)'!r} did not run during "
                "training_step, so no student logits were captured. Set `student_module` to the submodule that "
                "computes the logits (e.g. 'net' when training_step calls self.net(x) instead of self(x))."
            )
        return self._logits

    @property
    def captured_input(self) -> Any:
        if self._logits_input is None:
            raise RuntimeError("No student input was captured; set `input_key` to pick the input from the batch.")
        return self._logits_input

    # -- teacher, checks, projectors ------------------------------------------------------------------------
    def to(self, device: Union[str, torch.device], dtype: Optional[torch.dtype] = None) -> "Distiller":
        """Move the teacher and the projectors (and cast them when ``dtype`` is given)."""
        self.teacher.to(device=device, dtype=dtype)
        self.projectors.to(device=device, dtype=dtype)
        return self

    def teacher_logits(self, x: Any) -> Tensor:
        """The frozen teacher's logits for ``x`` (no gradient, eval mode, on ``x``'s device)."""
        if self.teacher.training:
            self.teacher.eval()
        if isinstance(x, Tensor):
            param = next(self.teacher.parameters(), None)
            if param is not None and param.device != x.device:
                self.teacher.to(x.device)
        self._teacher_feats = {}
        with torch.no_grad():
            return _as_logits(self.teacher(x)).detach()

    def check(self, student_logits: Tensor, teacher_logits: Tensor) -> None:
        """Refuse a teacher whose outputs do not match the student's (class count, shape)."""
        s, t = tuple(student_logits.shape[1:]), tuple(teacher_logits.shape[1:])
        if s != t:
            hint = (
                f" The teacher predicts {t[-1]} classes and the student {s[-1]}: use a teacher trained for the "
                "student's classes (set its num_classes)."
                if len(s) == len(t) and s[:-1] == t[:-1] else ""
            )
            raise ValueError(
                f"The teacher's outputs do not match the student's: teacher {t} per sample, student {s}.{hint}"
            )
        if student_logits.shape[0] != teacher_logits.shape[0]:
            raise ValueError(
                f"The teacher returned {teacher_logits.shape[0]} rows for a batch on which the student returned "
                f"{student_logits.shape[0]}; check `input_key`."
            )
        self.checked = True

    def build(self, student: Union[nn.Module, Callable[[Any], Any]], probe: Any, teacher_gets_captured_input: bool = False) -> None:
        """Run student and teacher once on ``probe`` (no grad, eval mode): check their outputs agree and
        build a projector for every feature pair whose widths differ. The hooks must be attached.
        ``teacher_gets_captured_input`` gives the teacher the input the ``logits_module`` received."""
        modules = [m for m in (student, self.teacher) if isinstance(m, nn.Module)]
        modes = [m.training for m in modules]
        for m in modules:
            m.eval()
        try:
            with torch.no_grad():
                try:
                    with self.capturing():
                        out = student(probe)
                except Exception as err:  # noqa: BLE001 - re-raised with advice
                    raise ValueError(
                        f"The student could not run on the probe input {_describe(probe)}: {err}. Set `input_shape` "
                        "(or `input_key`) so the probe matches what the model receives."
                    ) from err
                s_logits = self._logits if self.logits_module is not None else _as_logits(out)
                if s_logits is None:
                    s_logits = self.captured_logits  # raises with advice
                x = self.captured_input if teacher_gets_captured_input else probe
                try:
                    t_logits = self.teacher_logits(x)
                except Exception as err:  # noqa: BLE001 - re-raised with advice
                    raise ValueError(
                        f"The teacher cannot process the student's inputs {_describe(x)}: {err}. The teacher must "
                        "accept the same inputs as the student (channels, image size)."
                    ) from err
                self.check(s_logits, t_logits)
                feats = dict(self._student_feats), dict(self._teacher_feats)
        finally:
            for m, mode in zip(modules, modes):
                m.train(mode)
        self._build_projectors(*feats)

    def _build_projectors(self, student_feats: dict[str, Tensor], teacher_feats: dict[str, Tensor]) -> None:
        projectors = nn.ModuleDict()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.projector_seed)
            for s_name, t_name in self.feature_pairs.items():
                if s_name not in student_feats:
                    raise ValueError(f"The student module {s_name!r} (in `feature_pairs`) did not run on the probe input.")
                if t_name not in teacher_feats:
                    raise ValueError(f"The teacher module {t_name!r} (in `feature_pairs`) did not run on the probe input.")
                s_shape, t_shape = student_feats[s_name].shape[1:], teacher_feats[t_name].shape[1:]
                proj = make_projector(s_shape, t_shape)
                projectors[self.projector_key(s_name, t_name)] = proj if proj is not None else nn.Identity()
        device = next((p.device for p in self.teacher.parameters()), torch.device("cpu"))
        self.projectors = projectors.to(device)
        self.built = True

    # -- loss terms -----------------------------------------------------------------------------------------
    def terms(self, student_logits: Tensor, teacher_logits: Tensor) -> dict[str, Tensor]:
        """``{"kd": T^2 KL, "feature": sum of feature MSEs}`` (``feature`` only when there are feature pairs)."""
        if not self.checked:
            self.check(student_logits, teacher_logits)
        out = {"kd": kd_kl_loss(student_logits, teacher_logits, self.temperature)}
        if self.feature_pairs:
            if not self.built:
                raise RuntimeError("Feature distillation needs the projectors: call build(student, probe) first.")
            total = student_logits.new_zeros((), dtype=torch.float32)
            for s_name, t_name in self.feature_pairs.items():
                if s_name not in self._student_feats:
                    raise RuntimeError(f"The student module {s_name!r} (in `feature_pairs`) did not run in this step.")
                if t_name not in self._teacher_feats:
                    raise RuntimeError(f"The teacher module {t_name!r} (in `feature_pairs`) did not run in this step.")
                proj = self.projectors[self.projector_key(s_name, t_name)]
                total = total + feature_mse_loss(proj(self._student_feats[s_name]), self._teacher_feats[t_name])
            out["feature"] = total
        return out


def _describe(x: Any) -> str:
    return f"of shape {tuple(x.shape)}" if isinstance(x, Tensor) else f"of type {type(x).__name__}"


# -- the callback ---------------------------------------------------------------------------------------------

_UNSUPPORTED_STRATEGIES = ("FSDP", "DeepSpeed", "ModelParallel", "XLA")


class KnowledgeDistillation(Callback):
    r"""Knowledge distillation from a frozen teacher into any LightningModule, without changing its code.

    ``Trainer(callbacks=[KnowledgeDistillation(teacher=...)])`` adds the distillation terms to the loss the
    module's own ``training_step`` returns:

    .. math::
        L = (1 - \alpha_k)\, L_{task} + \alpha_k\, T^2\, \mathrm{KL}\big(\mathrm{softmax}(z_t/T) \,\|\,
            \mathrm{softmax}(z_s/T)\big) + \beta_k \sum_{(i,j)} \mathrm{MSE}\big(r_{ij}(h^s_i), h^t_j\big)

    (``combine="add"`` uses :math:`L_{task} + \alpha_k L_{KD}` instead), where :math:`\alpha_k`,
    :math:`\beta_k` are the weights (numbers or schedules of the optimizer step :math:`k`), :math:`z` are
    logits, :math:`h` hooked features and :math:`r_{ij}` learnable projectors. Papers: Hinton, Vinyals, Dean,
    *Distilling the Knowledge in a Neural Network*, arXiv:1503.02531 (no official code; torchdistill's
    ``KDLoss``, https://github.com/yoshitomo-matsubara/torchdistill, is the usual reference); FitNets
    (Romero et al., arXiv:1412.6550, https://github.com/adri-romsor/FitNets) for feature hints; for training
    on pruned data, Ben-Baruch et al., *Distilling the Knowledge in Data Pruning*, arXiv:2403.07854 (no code
    released): combine with ``train_fraction`` on the datamodule and ``weight: KeptFractionWeight``.

    **How a callback changes the loss.** Callback hooks cannot alter the loss, so in ``setup("fit")`` the
    callback installs an instance attribute ``pl_module.training_step`` that calls the original method and
    returns ``loss + distillation`` (the class and its code are untouched; ``teardown`` removes it). The
    student's logits are read by a forward hook on ``student_module`` (default: the LightningModule itself,
    i.e. ``self(x)``) while that original ``training_step`` runs; the teacher gets ``batch[input_key]`` (or,
    with ``input_key: null``, the tensor the hooked student module received). Because the sum is returned by
    ``training_step`` itself, Lightning treats it as the module's loss: gradient accumulation divides it like
    any loss, DDP all-reduces the student's gradients, autocast covers the teacher's forward (the KD terms are
    computed in float32), and the student's gradients equal those of the explicitly combined loss (tested).

    **Teacher.** Frozen (``requires_grad=False``) and put in eval mode in ``setup`` (after checking it shares
    no parameter with the student), moved to the student's device (and dtype under
    ``*-true`` precision) in ``on_fit_start``; it is an attribute of the callback, so it is neither in the
    student's ``state_dict``/checkpoint nor in its optimizer. See :func:`build_teacher` for the accepted
    forms; weights load with ``torch.load(weights_only=True)``. Before training, ``setup`` runs teacher and
    student once on a probe input (``input_shape``, the module's ``example_input_array``, the datamodule's
    ``input_shape``, or its first training batch) and refuses a teacher whose outputs differ from the
    student's, or that cannot take the student's inputs.

    **Projectors.** Feature pairs whose widths differ get a 1x1-conv/linear projector (built in ``setup``
    with ``projector_seed``). They belong to the callback, not to the module: in ``on_fit_start`` (after
    ``configure_optimizers``, before Lightning restores optimizer states on resume) they join optimizer
    ``optimizer_index`` as a new param group copying group 0's hyperparameters (LR schedulers that keep
    ``base_lrs`` are extended, so they schedule it too); their weights are in this callback's
    ``state_dict``; under DDP their gradients are averaged across ranks before each optimizer step.

    Supported: single device, DDP/ddp_spawn, mixed and true precision, gradient accumulation, resume. Refused
    in ``setup``: FSDP, DeepSpeed, model-parallel and XLA strategies (the teacher and projectors are not
    sharded), and manual optimization (call :class:`Distiller` yourself, or use
    :class:`~lightning_ext.distillation.module.DistillationModule`).

    Args:
        teacher: an ``nn.Module`` (YAML: ``class_path``/``init_args``), ``"timm:<name>"``,
            ``"torchvision:<name>"`` or a module class path; see :func:`build_teacher`.
        teacher_checkpoint: local weights file for the teacher (state dict or Lightning checkpoint).
        teacher_kwargs: constructor arguments when ``teacher`` is a name or class path.
        weight: logit-KD weight :math:`\alpha` (a number or a
            :class:`~lightning_ext.distillation.losses.WeightSchedule`).
        temperature: KD temperature :math:`T`.
        combine: ``"convex"`` (:math:`(1-\alpha) L_{task} + \alpha L_{KD}`) or ``"add"``
            (:math:`L_{task} + \alpha L_{KD}`).
        feature_pairs: ``{student module: teacher module}`` names for feature distillation; student names are
            relative to the LightningModule (``net.layer3`` for our classifiers), teacher names to the teacher.
        feature_weight: weight :math:`\beta` of the feature terms (number or schedule).
        student_module: the module (relative to the LightningModule) whose output are the student's logits;
            ``""`` is the LightningModule's own forward.
        input_key: where the teacher's input is in the batch (int for tuples, str for dicts); ``null`` uses
            the input of ``student_module``.
        input_shape: shape of one input (no batch dim) for the pre-training probe, if it cannot be inferred.
        optimizer_index: which of the module's optimizers trains the projectors.
        projector_seed: seed of the projectors' initial weights.
        log_prefix: logged as ``<prefix>_loss``, ``<prefix>_feature_loss`` and ``<prefix>_weight``.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> from lightning_ext import DigitsDataModule, ImageClassifier
        >>> student = ImageClassifier(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), image_size=8)
        >>> teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        >>> kd = KnowledgeDistillation(teacher, weight=0.9, temperature=4.0)
        >>> trainer = Trainer(max_steps=2, callbacks=[kd], logger=False, enable_checkpointing=False,
        ...                   enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(student, datamodule=DigitsDataModule())
        >>> sorted(k for k in trainer.callback_metrics if k.startswith("train_kd"))
        ['train_kd_loss', 'train_kd_weight']
        >>> "training_step" in vars(student), kd.teacher.training  # wrapper removed; teacher frozen in eval mode
        (False, False)
    """

    def __init__(
        self,
        teacher: Union[nn.Module, str],
        teacher_checkpoint: Optional[str] = None,
        teacher_kwargs: Optional[dict] = None,
        weight: Union[float, WeightSchedule] = 0.9,
        temperature: float = 4.0,
        combine: str = "convex",
        feature_pairs: Optional[dict[str, str]] = None,
        feature_weight: Union[float, WeightSchedule] = 1.0,
        student_module: str = "",
        input_key: InputKey = 0,
        input_shape: Optional[list[int]] = None,
        optimizer_index: int = 0,
        projector_seed: int = 0,
        log_prefix: str = "train_kd",
    ) -> None:
        super().__init__()
        if combine not in COMBINE_MODES:
            raise ValueError(f"`combine` must be one of {COMBINE_MODES}, got {combine!r}.")
        if temperature <= 0:
            raise ValueError(f"`temperature` must be > 0, got {temperature}.")
        self.weight = as_schedule(weight, "weight")
        self.feature_weight = as_schedule(feature_weight, "feature_weight")
        if combine == "convex" and isinstance(weight, (int, float)) and not 0 <= weight <= 1:
            raise ValueError(f"With combine='convex' `weight` must be in [0, 1], got {weight}; or use combine='add'.")
        if feature_pairs is not None and (
            not isinstance(feature_pairs, Mapping)
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in feature_pairs.items())
        ):
            raise TypeError("`feature_pairs` must map student module names to teacher module names (str: str).")
        if not isinstance(student_module, str):
            raise TypeError(f"`student_module` must be a module name (str), got {type(student_module).__name__}.")
        if input_key is not None and (isinstance(input_key, bool) or not isinstance(input_key, (int, str))):
            raise TypeError(f"`input_key` must be an int, a str or null, got {input_key!r}.")
        if input_shape is not None and (len(input_shape) == 0 or any(int(d) < 1 for d in input_shape)):
            raise ValueError(f"`input_shape` must be a list of positive sizes (no batch dim), got {input_shape}.")
        if optimizer_index < 0:
            raise ValueError(f"`optimizer_index` must be >= 0, got {optimizer_index}.")
        if not log_prefix:
            raise ValueError("`log_prefix` must be a non-empty string.")
        teacher_name = teacher if isinstance(teacher, str) else type(teacher).__name__
        self.teacher = build_teacher(teacher, teacher_checkpoint, teacher_kwargs, freeze=False)  # frozen in setup
        self.temperature = float(temperature)
        self.combine = combine
        self.feature_pairs = dict(feature_pairs or {})
        self.student_module = student_module
        self.input_key = input_key
        self.input_shape = tuple(int(d) for d in input_shape) if input_shape is not None else None
        self.optimizer_index = optimizer_index
        self.projector_seed = projector_seed
        self.log_prefix = log_prefix
        self._teacher_name = teacher_name
        self._distiller = Distiller(self.teacher, self.temperature, self.feature_pairs, student_module, projector_seed,
                                    freeze=False)
        self._pending_state: Optional[dict] = None
        self._module: Optional[LightningModule] = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            teacher=self._teacher_name, feature_pairs=self.feature_pairs, student_module=self.student_module,
            log_prefix=self.log_prefix,
        )

    @property
    def projectors(self) -> nn.ModuleDict:
        """The learnable feature projectors (empty without feature pairs or before ``setup``)."""
        return self._distiller.projectors

    # -- setup: checks, probe, projectors, the training_step wrapper ------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        strategy = type(trainer.strategy).__name__
        if any(name in strategy for name in _UNSUPPORTED_STRATEGIES):
            raise RuntimeError(
                f"KnowledgeDistillation does not support {strategy}: the teacher and projectors are not sharded. "
                "Use a single device or DDP (strategy='ddp')."
            )
        if not pl_module.automatic_optimization:
            raise RuntimeError(
                f"{type(pl_module).__name__} uses manual optimization, so the loss its training_step returns is "
                "not what is backpropagated. Use DistillationModule, or call "
                "lightning_ext.distillation.callback.Distiller from your training_step."
            )
        if self.teacher is pl_module:
            raise ValueError("The teacher is the student itself; pass a separate (copied) teacher module.")
        student_params = {id(p) for p in pl_module.parameters()}
        if any(id(p) in student_params for p in self.teacher.parameters()):
            raise ValueError(
                "The teacher shares parameters with the student (freezing it would freeze the student). "
                "Pass a copy: copy.deepcopy(model) or a model loaded from its own checkpoint."
            )
        self._distiller.freeze()
        self.weight.setup(trainer)
        self.feature_weight.setup(trainer)
        self._distiller.attach(pl_module)
        self._distiller.checked = False
        probe = self._probe_input(trainer, pl_module)
        if probe is not None:
            self._distiller.build(pl_module, probe, teacher_gets_captured_input=self.input_key is None)
        elif self.feature_pairs:
            raise ValueError(
                "KnowledgeDistillation needs a probe input to size the feature projectors before training, and "
                "none was found (no `input_shape`, no `example_input_array`, no datamodule input). Set `input_shape`."
            )
        else:
            rank_zero_warn("KnowledgeDistillation: no probe input; the teacher is checked on the first training batch.")
        if self._pending_state is not None:
            self._apply_state(self._pending_state)
        self._wrap(trainer, pl_module)

    def _probe_input(self, trainer: Trainer, pl_module: LightningModule) -> Any:
        device = next((p.device for p in pl_module.parameters()), torch.device("cpu"))
        if self.input_shape is not None:
            return torch.zeros(2, *self.input_shape, device=device)
        example = getattr(pl_module, "example_input_array", None)
        if isinstance(example, Tensor):
            return example.to(device)
        dm = trainer.datamodule
        shape = getattr(dm, "input_shape", None)
        if shape is not None and (self.input_key is None or self.input_key == 0):
            return torch.zeros(2, *shape, device=device)
        if dm is not None and self.input_key is not None:
            try:
                batch = next(iter(dm.train_dataloader()))
                x = select_input(batch, self.input_key)
                return x[:2].to(device) if isinstance(x, Tensor) else None
            except Exception:  # noqa: BLE001 - no probe; checked on the first batch instead
                return None
        return None

    def _wrap(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._unwrap()
        # a wrapper left by a KnowledgeDistillation that is not in this trainer (its fit crashed) is dropped
        current = pl_module.__dict__.get("training_step")
        while getattr(current, "_lightning_ext_kd", None) is not None and current._lightning_ext_kd not in trainer.callbacks:
            previous = current._lightning_ext_previous
            if previous is None:
                del pl_module.__dict__["training_step"]
            else:
                pl_module.__dict__["training_step"] = previous
            current = previous
        original = pl_module.training_step
        previous = pl_module.__dict__.get("training_step")
        callback = self

        @functools.wraps(original)
        def training_step(*args: Any, **kwargs: Any) -> Any:
            batch = args[0] if args else kwargs.get("batch")
            with callback._distiller.capturing():
                output = original(*args, **kwargs)
            return callback._add_distillation(trainer, pl_module, batch, output)

        training_step._lightning_ext_kd = self  # type: ignore[attr-defined]
        training_step._lightning_ext_previous = previous  # type: ignore[attr-defined]
        pl_module.training_step = training_step  # type: ignore[method-assign]
        self._module = pl_module

    def _unwrap(self) -> None:
        module, self._module = self._module, None
        if module is None:
            return
        current = module.__dict__.get("training_step")
        if getattr(current, "_lightning_ext_kd", None) is self:
            previous = current._lightning_ext_previous
            if previous is None:
                del module.__dict__["training_step"]
            else:
                module.__dict__["training_step"] = previous

    def _add_distillation(self, trainer: Trainer, pl_module: LightningModule, batch: Any, output: Any) -> Any:
        if output is None:  # the module skipped this batch
            return None
        if isinstance(output, Tensor):
            task_loss = output
        elif isinstance(output, Mapping) and isinstance(output.get("loss"), Tensor):
            task_loss = output["loss"]
        else:
            raise TypeError(
                f"{type(pl_module).__name__}.training_step returned {type(output).__name__}; KnowledgeDistillation "
                "needs the loss tensor or a dict with a 'loss' tensor."
            )
        student_logits = self._distiller.captured_logits
        x = self._distiller.captured_input if self.input_key is None else select_input(batch, self.input_key)
        teacher_logits = self._distiller.teacher_logits(x)
        terms = self._distiller.terms(student_logits, teacher_logits)
        self._distiller.clear()
        step = trainer.global_step
        weight = float(self.weight(step))
        loss = combine_losses(task_loss, terms["kd"], weight, self.combine)
        pl_module.log(f"{self.log_prefix}_loss", terms["kd"].detach(), on_step=True, on_epoch=False)
        pl_module.log(f"{self.log_prefix}_weight", weight, on_step=True, on_epoch=False)
        if "feature" in terms:
            feature_weight = float(self.feature_weight(step))
            if feature_weight < 0:
                raise ValueError(f"`feature_weight` must be >= 0, got {feature_weight} at step {step}.")
            loss = loss + feature_weight * terms["feature"]
            pl_module.log(f"{self.log_prefix}_feature_loss", terms["feature"].detach(), on_step=True, on_epoch=False)
        if isinstance(output, Tensor):
            return loss
        return {**output, "loss": loss}

    # -- device, optimizer, DDP -----------------------------------------------------------------------------
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        dtype = next((p.dtype for p in pl_module.parameters() if p.is_floating_point()), torch.float32)
        self._distiller.to(pl_module.device, dtype=None if dtype == torch.float32 else dtype)
        if trainer.world_size > 1 and len(self.projectors):
            state = trainer.strategy.broadcast({k: v.cpu() for k, v in self.projectors.state_dict().items()}, src=0)
            self.projectors.load_state_dict(state)
        self._ensure_param_group(trainer)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.teacher.eval()
        self._ensure_param_group(trainer)  # e.g. after another callback re-ran configure_optimizers

    def _ensure_param_group(self, trainer: Trainer) -> None:
        params = [p for p in self.projectors.parameters()]
        if not params:
            return
        if self.optimizer_index >= len(trainer.optimizers):
            raise ValueError(
                f"`optimizer_index={self.optimizer_index}` but the module has {len(trainer.optimizers)} optimizer(s)."
            )
        optimizer = trainer.optimizers[self.optimizer_index]
        present = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if all(id(p) in present for p in params):
            return
        group = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
        group["params"] = params
        optimizer.add_param_group(group)
        for config in trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if getattr(scheduler, "optimizer", None) is optimizer and hasattr(scheduler, "base_lrs"):
                if len(scheduler.base_lrs) < len(optimizer.param_groups):
                    scheduler.base_lrs.append(group.get("initial_lr", group["lr"]))
                last = getattr(scheduler, "_last_lr", None)
                if isinstance(last, list) and len(last) < len(optimizer.param_groups):
                    last.append(group["lr"])

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        if trainer.world_size <= 1 or not len(self.projectors):
            return
        if optimizer is not trainer.optimizers[self.optimizer_index]:
            return
        params = list(self.projectors.parameters())
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = trainer.strategy.reduce(torch.cat([g.reshape(-1) for g in grads]), reduce_op="mean")
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p).clone()
            offset += n

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._unwrap()
        self._distiller.detach()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # Lightning calls no teardown hooks when fit raises: leave the user's module as it was
        self._unwrap()
        self._distiller.detach()

    # -- state ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "feature_pairs": dict(self.feature_pairs),
            "projectors": {k: v.detach().cpu().clone() for k, v in self.projectors.state_dict().items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._distiller.built:
            self._apply_state(state_dict)
        else:
            self._pending_state = state_dict

    def _apply_state(self, state: dict[str, Any]) -> None:
        self._pending_state = None
        saved_pairs = dict(state.get("feature_pairs", {}))
        if saved_pairs != self.feature_pairs:
            raise ValueError(
                f"The checkpoint's KnowledgeDistillation state was saved with feature_pairs={saved_pairs}, but this "
                f"callback has feature_pairs={self.feature_pairs}; resume with the same configuration."
            )
        try:
            self.projectors.load_state_dict(state.get("projectors", {}))
        except RuntimeError as err:
            raise ValueError(f"The checkpoint's projector weights do not fit this callback's projectors: {err}") from err
        rank_zero_info(f"KnowledgeDistillation: restored {len(state.get('projectors', {}))} projector tensors.")
