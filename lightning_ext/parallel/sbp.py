r"""OneFlow's SBP signatures as PyTorch DTensor placements, and a tensor-parallel plan written in SBP.

Paper: Jinhui Yuan et al., "OneFlow: Redesign the Distributed Deep Learning Framework from Scratch" (arXiv
2110.15032); code https://github.com/Oneflow-Inc/oneflow (SBP: ``oneflow/core/job/sbp_parallel.proto``, the
signatures of matmul in ``oneflow/user/ops/matmul_op.cpp``). A global tensor on a device group has, per mesh
dimension, an SBP: **split(i)** (the shards concatenated along axis ``i`` give the tensor), **broadcast** (every
device holds all of it) or **partial-sum** (every device holds a tensor of the full shape and the global tensor is
their sum). An operator's SBP signature lists its inputs' and output's SBPs; for ``Y = X W^T`` (torch's
``nn.Linear``, weight ``(out, in)``):

.. math::

    B \times S(0)_W \to S(-1)_Y \;(\text{column parallel}),\qquad
    S(-1) \times S(1)_W \to P_Y \xrightarrow{\text{boxing}} B \;(\text{row parallel}),\qquad
    S(0) \times B_W \to S(0)_Y \;(\text{data parallel}).

DTensor is the same abstraction (``Shard(i)``, ``Replicate()``, ``Partial("sum")``, ``redistribute`` = boxing), so
this module maps the notation (:func:`parse_sbp`, :func:`to_placement`, :func:`from_placement`) and turns a plan
``{module name or glob: "input, weight -> output"}`` (YAML-writable) into ``parallelize_module`` styles over a 1-D
tensor-parallel mesh (:func:`apply_sbp_plan`), refusing what it does not support with one line. What is not here:
OneFlow's automatic signature inference and boxing between arbitrary operators, and its actor runtime; plans are
checked only as a chain (each planned module's output SBP must be the next one's input SBP).

Example:
    >>> parse_sbp("S(0)"), str(parse_sbp("broadcast")), to_placement(parse_sbp("P"))
    (SBP(kind='split', dim=0), 'B', Partial(sum))
    >>> parse_signature("B, S(0) -> S(-1)")
    (SBP(kind='broadcast', dim=None), SBP(kind='split', dim=0), SBP(kind='split', dim=-1))
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Optional

from torch import nn

from lightning_ext.core.layers import match_names

__all__ = ["SBP", "SIGNATURES", "apply_sbp_plan", "from_placement", "parse_sbp", "parse_signature", "plan_styles",
           "to_placement"]


@dataclass(frozen=True)
class SBP:
    """One SBP: ``split`` along ``dim``, ``broadcast``, or ``partial`` (sum)."""

    kind: str
    dim: Optional[int] = None

    def __repr__(self) -> str:
        return f"SBP(kind={self.kind!r}, dim={self.dim})"

    def __str__(self) -> str:
        return {"split": f"S({self.dim})", "broadcast": "B", "partial": "P"}[self.kind]


_SPLIT = re.compile(r"^(?:s|split)\((-?\d+)\)$")


def parse_sbp(text: str) -> SBP:
    """``"S(1)"``/``"split(1)"``, ``"B"``/``"broadcast"``, ``"P"``/``"P(sum)"``/``"partial_sum"`` -> :class:`SBP`.

    Example:
        >>> parse_sbp("split(-1)")
        SBP(kind='split', dim=-1)
    """
    t = str(text).strip().lower().replace(" ", "")
    m = _SPLIT.match(t)
    if m:
        return SBP("split", int(m.group(1)))
    if t in ("b", "broadcast"):
        return SBP("broadcast")
    if t in ("p", "p(sum)", "partial", "partial_sum", "partial(sum)", "partialsum"):
        return SBP("partial")
    raise ValueError(f"{text!r} is not an SBP; write S(<dim>) for split, B for broadcast or P for partial-sum")


def to_placement(sbp: SBP) -> Any:
    """The DTensor placement of an SBP: ``Shard(dim)``, ``Replicate()`` or ``Partial("sum")``."""
    from torch.distributed.tensor import Partial, Replicate, Shard

    return {"split": lambda: Shard(sbp.dim), "broadcast": Replicate, "partial": lambda: Partial("sum")}[sbp.kind]()


def from_placement(placement: Any) -> SBP:
    """The SBP of a DTensor placement (``Partial`` must reduce by sum).

    Example:
        >>> from torch.distributed.tensor import Shard
        >>> str(from_placement(Shard(1)))
        'S(1)'
    """
    from torch.distributed.tensor import Partial, Replicate, Shard

    if isinstance(placement, Shard):
        return SBP("split", placement.dim)
    if isinstance(placement, Replicate):
        return SBP("broadcast")
    if isinstance(placement, Partial) and placement.reduce_op == "sum":
        return SBP("partial")
    raise ValueError(f"{placement!r} has no SBP (OneFlow's partial values are sums)")


def parse_signature(text: str) -> tuple[SBP, SBP, SBP]:
    """``"input, weight -> output"`` -> three :class:`SBP` (the weight in torch's layout)."""
    if not isinstance(text, str) or text.count("->") != 1:
        raise ValueError(f"an SBP signature reads 'input, weight -> output' (e.g. 'B, S(0) -> S(-1)'), got {text!r}")
    left, out = text.split("->")
    parts = [p for p in re.split(r",(?![^(]*\))", left) if p.strip()]
    if len(parts) != 2:
        raise ValueError(f"an SBP signature names the input's and the weight's SBP before '->', got {text!r}")
    return parse_sbp(parts[0]), parse_sbp(parts[1]), parse_sbp(out)


def _styles() -> dict:
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    B, S0, S1, Sm1 = SBP("broadcast"), SBP("split", 0), SBP("split", 1), SBP("split", -1)
    col = lambda out: lambda: ColwiseParallel(input_layouts=Replicate(), output_layouts=out)  # noqa: E731
    return {
        nn.Linear: {
            (B, S0, Sm1): ("column parallel", col(Shard(-1))),
            (B, S0, B): ("column parallel, output all-gathered", col(Replicate())),
            (Sm1, S1, B): ("row parallel, partial sums all-reduced", lambda: RowwiseParallel(
                input_layouts=Shard(-1), output_layouts=Replicate())),
            (B, S1, B): ("row parallel on a broadcast input (split locally), all-reduced", lambda: RowwiseParallel(
                input_layouts=Replicate(), output_layouts=Replicate())),
        },
        nn.Embedding: {
            (B, S1, Sm1): ("embedding dimension split", col(Shard(-1))),
            (B, S1, B): ("embedding dimension split, output all-gathered", col(Replicate())),
            (B, S0, B): ("vocabulary split, partial sums all-reduced", lambda: RowwiseParallel(
                input_layouts=Replicate(), output_layouts=Replicate())),
        },
    }


def _describe(table: dict) -> str:
    return "; ".join(f"'{i}, {w} -> {o}' ({what})" for (i, w, o), (what, _) in table.items())


#: the supported signatures per module type, as text: ``{type name: {signature: meaning}}``
SIGNATURES = {
    "Linear": {"B, S(0) -> S(-1)": "column parallel", "B, S(0) -> B": "column parallel, output all-gathered",
               "S(-1), S(1) -> B": "row parallel, partial sums all-reduced",
               "B, S(1) -> B": "row parallel on a broadcast input (split locally), all-reduced"},
    "Embedding": {"B, S(1) -> S(-1)": "embedding dimension split",
                  "B, S(1) -> B": "embedding dimension split, output all-gathered",
                  "B, S(0) -> B": "vocabulary split, partial sums all-reduced"},
}


def plan_styles(module: nn.Module, plan: dict[str, str], check_chain: bool = True) -> dict[str, Callable]:
    """Validate ``plan`` against ``module`` and return ``{module name: ParallelStyle factory}`` (no mesh needed).

    Each key is a module name or glob (relative to ``module``); each value an SBP signature
    ``"input, weight -> output"`` from :data:`SIGNATURES`. Raises ``ValueError`` with one line for an unknown name,
    a module type without SBP signatures, an unsupported signature (including any partial-sum output: OneFlow
    boxes it before the next operator, so write ``-> B``), or, with ``check_chain``, two consecutive planned modules
    whose output and input SBPs differ.

    Example:
        >>> mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
        >>> sorted(plan_styles(mlp, {"0": "B, S(0) -> S(-1)", "2": "S(-1), S(1) -> B"}))
        ['0', '2']
        >>> plan_styles(mlp, {"0": "B, S(0) -> S(-1)", "2": "B, S(1) -> B"})
        Traceback (most recent call last):
        ...
        ValueError: SBP plan: '0' outputs S(-1) but the next planned module '2' expects B; OneFlow would insert boxing here, this helper does not: make them agree (or pass check_chain=False if other code sits between them)
    """
    if not isinstance(plan, dict) or not plan:
        raise ValueError("an SBP plan is a non-empty mapping {module name: 'input, weight -> output'}")
    names = [n for n, _ in module.named_modules() if n]
    table = _styles()
    chosen: dict[str, tuple] = {}
    for pattern, text in plan.items():
        sig = parse_signature(text)
        for name in match_names(names, [pattern], "sbp plan", type(module).__name__):
            sub = module.get_submodule(name)
            kind = next((t for t in table if type(sub) is t), None)
            if kind is None:
                raise ValueError(f"SBP plan: '{name}' is a {type(sub).__name__}; plans cover nn.Linear and "
                                 "nn.Embedding (leave other modules out: they stay broadcast)")
            if sig[2].kind == "partial":
                raise ValueError(f"SBP plan: '{name}' -> P leaves partial sums for the next operator; OneFlow "
                                 "boxes them first: write '-> B' (all-reduce)")
            if sig not in table[kind]:
                raise ValueError(f"SBP plan: {kind.__name__} '{name}' has no signature '{text}'; supported: "
                                 f"{_describe(table[kind])}")
            chosen[name] = sig
    order = [n for n in names if n in chosen]
    if check_chain:
        for a, b in zip(order, order[1:]):
            if chosen[a][2] != chosen[b][0]:
                raise ValueError(f"SBP plan: '{a}' outputs {chosen[a][2]} but the next planned module '{b}' expects "
                                 f"{chosen[b][0]}; OneFlow would insert boxing here, this helper does not: make them "
                                 "agree (or pass check_chain=False if other code sits between them)")
    return {n: table[type(module.get_submodule(n))][chosen[n]][1] for n in order}


def apply_sbp_plan(module: nn.Module, device_mesh: Any, plan: dict[str, str], check_chain: bool = True) -> nn.Module:
    """Parallelise ``module`` in place over the 1-D tensor-parallel ``device_mesh`` by an SBP ``plan`` (see
    :func:`plan_styles`); call it in ``LightningModule.configure_model`` with
    ``self.device_mesh["tensor_parallel"]`` under Lightning's ``ModelParallelStrategy``. Planned weights become
    DTensors with the plan's placements; the module's inputs and outputs stay plain (local) tensors."""
    from torch.distributed.tensor.parallel import parallelize_module

    if getattr(device_mesh, "ndim", 1) != 1:
        raise ValueError(f"apply_sbp_plan needs a 1-D mesh; give the tensor-parallel sub-mesh, e.g. "
                         f"device_mesh['tensor_parallel'] (got {device_mesh.ndim} dimensions)")
    styles = plan_styles(module, plan, check_chain)
    return parallelize_module(module, device_mesh, {name: make() for name, make in styles.items()})
