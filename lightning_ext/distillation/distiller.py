r"""The distiller core: teacher forward, forward hooks, projectors and the distillation loss terms.

:class:`Distiller` is what both Lightning wrappers of this family share
(:class:`~lightning_ext.distillation.callback.KnowledgeDistillation` and
:class:`~lightning_ext.distillation.module.DistillationModule`); it needs no Trainer. The pure losses are in
:mod:`lightning_ext.distillation.losses`, the teacher's construction in :mod:`lightning_ext.distillation.teacher`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Mapping
from typing import Any, Callable, Iterator, Optional, Union

import torch
from torch import Tensor, nn

from lightning_ext.core.validation import check_positive
from lightning_ext.distillation.losses import feature_mse_loss, kd_kl_loss, make_projector
from lightning_ext.distillation.teacher import close_names

__all__ = ["Distiller", "InputKey", "select_input"]

InputKey = Optional[Union[int, str]]

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
        check_positive("temperature", temperature)
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
                f"The {role} has no module named {name!r} (in `{arg}`).{close_names(name, names)} "
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
