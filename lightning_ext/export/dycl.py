r"""DyCL (Chen et al., ISSTA 2023) for PyTorch 2: make a module with data-dependent control flow exportable.

Paper: Simin Chen, Shiyi Wei, Cong Liu, Wei Yang, "DyCL: Dynamic Neural Network Compilation Via Program Rewriting
and Graph Optimization", ISSTA 2023 (arXiv 2307.04963); reference code https://github.com/SeekingDream/ISSTA23_DyCL
(``src/static_analysis.py`` walks ``forward``'s AST and splits it at ``If`` nodes; the sub-graphs are compiled
separately and a host program dispatches between them).

In PyTorch the host dispatcher already exists as higher-order operators: a branch on a tensor predicate
``p`` becomes

.. math:: y = \mathrm{cond}(p, f_\text{true}, f_\text{false}, \text{operands}),

and a loop ``while p(c): c = g(c)`` becomes ``c = \mathrm{while\_loop}(p, g, c)``, both of which ``torch.export``
and ``torch.compile(fullgraph=True)`` capture as one graph. This module does the program rewriting
(:mod:`lightning_ext.export.dycl_rewrite`) and checks the result.

What is automatic: :func:`rewritten` / :func:`make_exportable` rewrite the ``forward`` of the module and of every
submodule defined outside ``torch`` (AST level, per instance):

* ``if``/``elif``/``else`` whose branches assign variables -> ``torch.cond`` returning those variables;
* ``if p: return a`` (early return, also when the other path is the rest of the function) -> ``return cond(...)``;
* ``for`` loops over a static sequence (``self.blocks``, ``enumerate``/``zip``/``range`` of it) that contain a
  ``return`` are unrolled first, so the SDN/BranchyNet early-exit loop becomes a chain of ``cond``;
* ``while p: ...`` -> ``torch.while_loop`` (integer loop counters become 0-dim tensors while traced);
* ``a if p else b`` -> ``cond``; ``and``/``or``/``not`` and ``.item()`` inside a predicate stay tensor ops.

Every rewritten site dispatches at run time: a Python predicate (``self.training``, a shape test) runs the Python
branch as before, a tensor predicate runs eagerly as before, and only a traced tensor predicate becomes
``torch.cond``/``torch.while_loop``; eager outputs are therefore unchanged. What is not rewritten is reported, one
line each (:class:`Branch`): returns on some paths only, ``break``/``continue``, writes to attributes or
subscripts, side-effect calls, loops over data-dependent counts, code inside ``try``. The explicit API for those
cases is :func:`cond` / :func:`while_loop` (the same dispatch, callable from user code).

Scope: one predicate per call (batch-level exits). A per-sample exit needs masking (``torch.where``), not ``cond``:
the library's :class:`~lightning_ext.vision.early_exit.EarlyExitNetwork` already works that way and exports as is.

Example:
    >>> import torch
    >>> from lightning_ext.export.dynamic_nets import MeanGatedNet
    >>> net = MeanGatedNet(4).eval()
    >>> x = torch.randn(3, 4)
    >>> program, report = export_dynamic(net, (x,))
    >>> [b.status for b in report.branches], report.exported
    (['rewritten'], True)
    >>> bool(torch.allclose(program.module()(x), net(x)) and torch.allclose(program.module()(-x), net(-x)))
    True
"""

from __future__ import annotations

import contextlib
import copy
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

__all__ = ["Branch", "DyCLReport", "compiles_fullgraph", "cond", "export_dynamic", "make_exportable", "rewritten",
           "time_forward", "while_loop"]


def _traced(x: Any) -> bool:
    """Whether ``x`` is being traced (dynamo, strict or non-strict export) rather than run eagerly."""
    if torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return True
    from torch._subclasses.fake_tensor import is_fake

    return isinstance(x, Tensor) and is_fake(x)


def _as_predicate(pred: Tensor) -> Tensor:
    if pred.dtype != torch.bool:
        pred = pred != 0
    return pred.reshape(()) if pred.dim() else pred


def _lift(args: Sequence[Any], fn: Callable) -> tuple[Callable, tuple[Tensor, ...]]:
    """``fn`` as a function of the tensor arguments only (the others are closed over); outputs that are inputs are
    cloned (``torch.cond``/``while_loop`` refuse outputs aliasing inputs)."""
    idx = [i for i, a in enumerate(args) if isinstance(a, Tensor)]

    def lifted(*tensors: Tensor) -> Any:
        full = list(args)
        for i, t in zip(idx, tensors):
            full[i] = t
        out = fn(*full)
        one = not isinstance(out, (tuple, list))
        outs = [o.clone() if isinstance(o, Tensor) and any(o is t for t in tensors) else o
                for o in ((out,) if one else out)]
        return outs[0] if one else tuple(outs)

    return lifted, tuple(args[i] for i in idx)


def cond(pred: Any, true_fn: Callable, false_fn: Callable, operands: Sequence[Any] = ()) -> Any:
    """``true_fn(*operands) if pred else false_fn(*operands)`` that stays one graph when traced.

    A Python predicate, or a tensor predicate run eagerly, calls the chosen branch in Python; a traced tensor
    predicate becomes ``torch.cond`` (non-tensor operands are closed over). Both branches must then return tensors
    (or tuples of tensors) of equal shapes and dtypes, and must not mutate their inputs.

    Example:
        >>> x = torch.tensor([1.0, -2.0])
        >>> cond(x.sum() > 0, lambda v: v * 2, lambda v: -v, (x,))
        tensor([-1.,  2.])
    """
    if isinstance(pred, Tensor) and _traced(pred):
        t_fn, tensors = _lift(operands, true_fn)
        f_fn, _ = _lift(operands, false_fn)
        return torch.cond(_as_predicate(pred), t_fn, f_fn, tensors)
    return true_fn(*operands) if bool(pred) else false_fn(*operands)


def while_loop(cond_fn: Callable, body_fn: Callable, carried: Sequence[Any]) -> tuple:
    """``while cond_fn(*c): c = body_fn(*c)``, returning ``c``; one ``torch.while_loop`` when traced on a tensor
    predicate (Python integers among ``carried`` then become 0-dim tensors).

    Example:
        >>> while_loop(lambda i, x: x.sum() < 10, lambda i, x: (i + 1, x * 2), (0, torch.ones(2)))
        (3, tensor([8., 8.]))
    """
    carried = tuple(carried)
    if any(isinstance(c, Tensor) and _traced(c) for c in carried) or torch.compiler.is_compiling():
        first = cond_fn(*carried)
        if isinstance(first, Tensor):
            carried = tuple(torch.tensor(c) if isinstance(c, (int, float)) and not isinstance(c, bool) else c
                            for c in carried)
            c_fn, tensors = _lift(carried, lambda *c: _as_predicate(cond_fn(*c)))
            b_fn, _ = _lift(carried, body_fn)
            if len(tensors) != len(carried):
                raise TypeError("torch.while_loop carries tensors only; a loop variable is neither a tensor nor a "
                                "number")
            return tuple(torch.while_loop(c_fn, b_fn, tensors))
    while bool(cond_fn(*carried)):
        carried = tuple(body_fn(*carried))
    return carried


@dataclass
class Branch:
    """One control-flow site of a rewritten ``forward``: where, what, and what became of it."""

    module: str  #: qualified name of the submodule ("" for the root)
    cls: str  #: its class
    line: int  #: line in the source file
    kind: str  #: "if", "if-return", "while", "ifexp", "for" (unrolled)
    source: str  #: the source line, stripped
    rewrite: Optional[str]  #: "torch.cond", "torch.while_loop", "unrolled", or None (not rewritten)
    reason: str = ""  #: why it was not rewritten (one line)
    observed: str = "not reached"  #: predicate type seen while probing: "tensor", "python", "not reached"

    @property
    def status(self) -> str:
        """``rewritten`` (a tensor predicate now in cond/while_loop), ``static`` (a Python predicate: the tracer
        specialises it), ``unrolled``, ``not rewritten`` (a tensor predicate left as Python: export will fail on it)
        or ``unknown`` (not reached by the probe inputs)."""
        if self.kind in ("for", "forward"):
            return "unrolled" if self.rewrite else "not rewritten"
        if self.observed == "python":
            return "static"
        if self.observed == "not reached":
            return "unknown"
        return "rewritten" if self.rewrite else "not rewritten"

    def line_text(self) -> str:
        """One line: ``cls:line  kind  status  (reason)``."""
        what = f"{self.cls}:{self.line} {self.kind} `{self.source}`"
        if self.status == "not rewritten":
            return f"{what}: not rewritten: {self.reason}"
        return f"{what}: {self.status}" + (f" ({self.rewrite})" if self.status == "rewritten" else "")


@dataclass
class DyCLReport:
    """What :func:`export_dynamic` found and did."""

    branches: list[Branch] = field(default_factory=list)
    exported_before: Optional[bool] = None  #: whether the original module exported (None: not tried)
    error_before: str = ""
    exported: bool = False  #: whether the rewritten module exported
    error: str = ""  #: first line of the export error, and the user line it points to
    dynamic_batch: bool = False  #: whether the program takes any batch size

    @property
    def not_rewritten(self) -> list[Branch]:
        """Sites with a tensor predicate that stayed Python (each with its one-line reason)."""
        return [b for b in self.branches if b.status == "not rewritten"]

    def sites(self) -> list[Branch]:
        """The sites merged by source line (an unrolled loop repeats its branches): a tensor seen at any copy
        counts, and the line is rewritten only if every copy was."""
        merged: dict[tuple, Branch] = {}
        for b in self.branches:
            key = (b.module, b.line, b.kind)
            if key not in merged:
                merged[key] = Branch(**asdict(b))
                continue
            m = merged[key]
            if b.observed == "tensor" or m.observed == "not reached":
                m.observed = b.observed if m.observed != "tensor" else m.observed
            if m.rewrite != b.rewrite:
                m.rewrite, m.reason = None, m.reason or b.reason
        return list(merged.values())

    def lines(self) -> list[str]:
        """One line per source site, then the export outcome."""
        out = [b.line_text() for b in self.sites()] or ["no data-dependent control flow found"]
        out.append("exported" if self.exported else f"export failed: {self.error}")
        return out

    def to_dict(self) -> dict:
        """JSON-ready form (with each site's status)."""
        d = asdict(self)
        for b, row in zip(self.branches, d["branches"]):
            row["status"] = b.status
        return d


def _user_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        origin = getattr(type(module), "_dycl_original_class", type(module))
        mod = origin.forward.__module__ or ""
        if not (mod.startswith("torch.") or mod.startswith("lightning.")):
            yield name, module


def _swap(model: nn.Module, report: DyCLReport) -> list[tuple[nn.Module, type]]:
    from lightning_ext.export.dycl_rewrite import rewrite_forward

    swapped: list[tuple[nn.Module, type]] = []
    try:
        for name, module in _user_modules(model):
            cls = type(module)
            result = rewrite_forward(module, name)
            report.branches.extend(result.branches)
            if result.forward is None:
                continue
            sub = type(cls.__name__, (cls,), {"forward": result.forward, "__module__": cls.__module__,
                                                "__qualname__": cls.__qualname__, "_dycl_original_class": cls})
            module.__class__ = sub
            swapped.append((module, cls))
    except BaseException:
        _restore(swapped)
        raise
    return swapped


def _restore(swapped: list[tuple[nn.Module, type]]) -> None:
    for module, cls in reversed(swapped):
        module.__class__ = cls


@contextlib.contextmanager
def rewritten(model: nn.Module, report: Optional[DyCLReport] = None) -> Iterator[DyCLReport]:
    """Rewrite ``model`` in place for the duration of the block (each instance's class is swapped for a subclass
    with the rewritten ``forward``); the report's sites fill in as the model runs.

    Example:
        >>> from lightning_ext.export.dynamic_nets import MeanGatedNet
        >>> net = MeanGatedNet(4)
        >>> with rewritten(net) as report:
        ...     _ = net(torch.ones(2, 4))
        >>> type(net).__name__, report.branches[0].observed
        ('MeanGatedNet', 'tensor')
    """
    report = DyCLReport() if report is None else report
    swapped = _swap(model, report)
    try:
        yield report
    finally:
        _restore(swapped)


def make_exportable(model: nn.Module, *example_inputs: Any) -> tuple[nn.Module, DyCLReport]:
    """A rewritten deep copy of ``model`` (it stays rewritten; ``model`` is untouched) and its report;
    ``example_inputs`` (optional) are run once to observe which predicates are tensors."""
    clone = copy.deepcopy(model)
    report = DyCLReport()
    _swap(clone, report)
    if example_inputs:
        with torch.no_grad():
            clone(*example_inputs)
    return clone, report


def time_forward(fn: Callable, inputs: tuple, warmup: int = 3, repeats: int = 20) -> float:
    """Median wall time in seconds of ``fn(*inputs)`` under ``no_grad`` (for exported programs too, which refuse
    ``.eval()``); put modules in eval mode first."""
    import time

    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    times = []
    with torch.no_grad():
        for i in range(warmup + repeats):
            start = time.perf_counter()
            fn(*inputs)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


def _error_line(exc: BaseException, files: set[str]) -> str:
    first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
    where = ""
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        if frame.filename in files:
            where = f" (at {frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}: {(frame.line or '').strip()})"
            break
    if not where:
        for ln in str(exc).splitlines():
            if ln.strip().startswith("Caused by:"):
                where = " (" + ln.strip()[:160] + ")"
                break
    return f"{type(exc).__name__}: {first[:240]}{where}"


def _export(model: nn.Module, inputs: tuple, dynamic_batch: bool, strict: bool):
    shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1, max=1 << 16)
        shapes = tuple({0: batch} if isinstance(x, Tensor) and x.dim() else None for x in inputs)
    return torch.export.export(model, inputs, dynamic_shapes=shapes, strict=strict)


def export_dynamic(model: nn.Module, example_inputs: tuple, dynamic_batch: bool = True, strict: bool = False,
                   try_original: bool = False) -> tuple[Optional[torch.export.ExportedProgram], DyCLReport]:
    """Rewrite ``model``'s data-dependent control flow (in place, undone afterwards), probe it on
    ``example_inputs`` and ``torch.export`` it.

    Args:
        model: the module (put it in eval mode first if it should be exported for inference).
        example_inputs: positional inputs of one call.
        dynamic_batch: export with a symbolic batch dimension (first dim of every tensor input); if that fails the
            export is retried with static shapes.
        strict: ``torch.export``'s strict (dynamo) mode.
        try_original: first try to export the unmodified module (``report.exported_before``).

    Returns:
        ``(program, report)``; ``program`` is ``None`` when the export failed (``report.error`` says why).
    """
    import inspect

    report = DyCLReport()
    inputs = tuple(example_inputs)
    if try_original:
        try:
            _export(model, inputs, False, strict)
            report.exported_before = True
        except Exception as exc:  # noqa: BLE001 - any tracer failure is the finding
            report.exported_before, report.error_before = False, _error_line(exc, set())
    program = None
    with rewritten(model, report):
        with torch.no_grad():
            model(*inputs)
        files = {inspect.getsourcefile(type(m)) or "" for _, m in _user_modules(model)}
        for dyn in ((True, False) if dynamic_batch else (False,)):
            try:
                program = _export(model, inputs, dyn, strict)
                report.exported, report.dynamic_batch, report.error = True, dyn, ""
                break
            except Exception as exc:  # noqa: BLE001
                report.error = _error_line(exc, files)
    return program, report


def compiles_fullgraph(model: nn.Module, *inputs: Any) -> tuple[bool, str]:
    """Whether ``torch.compile(model, fullgraph=True, backend="eager")`` captures ``model(*inputs)`` as one graph
    (dynamo only, no code generation), and the first line of the error when it does not."""
    import torch._dynamo as dynamo

    dynamo.reset()
    try:
        with torch.no_grad():
            torch.compile(model, fullgraph=True, backend="eager")(*inputs)
        return True, ""
    except Exception as exc:  # noqa: BLE001 - the failure is the finding
        return False, _error_line(exc, set())
    finally:
        dynamo.reset()
