"""DyCL's program rewriting: the AST pass that turns a ``forward``'s data-dependent control flow into dispatch calls.

:func:`rewrite_forward` parses a module's ``forward`` (its source file, original line numbers kept so tracebacks
point at the user's lines), rewrites each ``if``/``while``/conditional expression it can into a call of the run-time
dispatcher (:func:`lightning_ext.export.dycl.cond` / :func:`~lightning_ext.export.dycl.while_loop`, through a small
recorder that notes whether each predicate was a tensor), unrolls static ``for`` loops that contain a ``return``,
and records one :class:`~lightning_ext.export.dycl.Branch` per site with the reason when a site is left alone.
The rules are listed in :mod:`lightning_ext.export.dycl`.
"""

from __future__ import annotations

import ast
import builtins
import copy
import inspect
import linecache
import textwrap
from dataclasses import dataclass
from typing import Any, Callable, Optional

from torch import Tensor, nn

from lightning_ext.export import dycl

__all__ = ["RewriteResult", "rewrite_forward"]

_MAX_UNROLL = 64
_IGNORED_DECORATORS = {"override"}


@dataclass
class RewriteResult:
    """The rewritten ``forward`` (``None`` when nothing was rewritten) and its sites."""

    forward: Optional[Callable]
    branches: list


class _Recorder:
    """The run-time object the rewritten code calls: dispatch, plus what each predicate turned out to be."""

    def __init__(self, branches: list) -> None:
        self.branches = branches

    def _see(self, site: int, value: Any) -> None:
        if not dycl._traced(value):
            kind = "tensor" if isinstance(value, Tensor) else "python"
            if self.branches[site].observed != "tensor":
                self.branches[site].observed = kind

    def probe(self, site: int, pred: Any) -> Any:
        self._see(site, pred)
        return pred

    def cond(self, site: int, pred: Any, true_fn: Callable, false_fn: Callable, operands: tuple) -> Any:
        self._see(site, pred)
        return dycl.cond(pred, true_fn, false_fn, operands)

    def while_(self, site: int, cond_fn: Callable, body_fn: Callable, carried: tuple) -> tuple:
        if dycl._traced(next((c for c in carried if isinstance(c, Tensor)), None)):
            return dycl.while_loop(cond_fn, body_fn, carried)
        first = [True]

        def seen(*c: Any) -> Any:
            p = cond_fn(*c)
            if first[0]:
                self._see(site, p)
                first[0] = False
            return p

        return dycl.while_loop(seen, body_fn, carried)

    @staticmethod
    def _bool_tensor(v: Any) -> Tensor:
        import torch

        return dycl._as_predicate(v) if isinstance(v, Tensor) else torch.tensor(bool(v))

    def and_(self, *thunks: Callable) -> Any:
        import torch

        v = thunks[0]()
        for th in thunks[1:]:
            if isinstance(v, Tensor) and dycl._traced(v):
                v = torch.logical_and(self._bool_tensor(v), self._bool_tensor(th()))
            elif not v:
                return v
            else:
                v = th()
        return v

    def or_(self, *thunks: Callable) -> Any:
        import torch

        v = thunks[0]()
        for th in thunks[1:]:
            if isinstance(v, Tensor) and dycl._traced(v):
                v = torch.logical_or(self._bool_tensor(v), self._bool_tensor(th()))
            elif v:
                return v
            else:
                v = th()
        return v

    def not_(self, v: Any) -> Any:
        import torch

        return torch.logical_not(self._bool_tensor(v)) if isinstance(v, Tensor) and dycl._traced(v) else not v


# ------------------------------------------------------------------------------------------------ AST analysis
_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)
_COMPS = (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)


def _walk(nodes: Any, into_scopes: bool = False, into_loops: bool = True):
    """Nodes below ``nodes`` (a node or a list), not entering nested scopes (and loops) unless asked."""
    stack = list(nodes) if isinstance(nodes, list) else [nodes]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if not into_scopes and isinstance(child, _SCOPES + _COMPS):
                continue
            if not into_loops and isinstance(child, (ast.For, ast.While)):
                continue
            stack.append(child)


def _stores(nodes: Any) -> set[str]:
    out = {n.id for n in _walk(nodes) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    for n in _walk(nodes):
        if isinstance(n, (ast.Import, ast.ImportFrom)):
            out.update((a.asname or a.name).split(".")[0] for a in n.names)
    return out


def _loads(nodes: Any) -> set[str]:
    return {n.id for n in _walk(nodes, into_scopes=True) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}


def _has(nodes: Any, kinds: tuple, into_loops: bool = True) -> bool:
    return any(isinstance(n, kinds) for n in _walk(nodes, into_loops=into_loops))


def _always_returns(stmts: list) -> bool:
    for s in stmts:
        if isinstance(s, (ast.Return, ast.Raise)):
            return True
        if isinstance(s, ast.If) and _always_returns(s.body) and _always_returns(s.orelse):
            return True
        if isinstance(s, ast.With) and _always_returns(s.body):
            return True
    return False


def _impure(stmts: list) -> str:
    """Why a branch body cannot go into ``torch.cond``/``while_loop`` (empty when it can)."""
    for n in _walk(stmts):
        if isinstance(n, (ast.Attribute, ast.Subscript)) and isinstance(n.ctx, ast.Store):
            return f"it writes to `{ast.unparse(n)}` (state or in-place); branches must be pure functions"
        if isinstance(n, ast.Expr) and isinstance(n.value, ast.Call):
            return f"it calls `{ast.unparse(n.value)[:60]}` for a side effect; branches must be pure functions"
        if isinstance(n, (ast.Global, ast.Nonlocal, ast.Yield, ast.YieldFrom, ast.Await, ast.Try)):
            return f"it contains `{type(n).__name__.lower()}`"
        if isinstance(n, ast.Delete):
            return "it deletes a variable"
    return ""


def _name(id_: str, store: bool = False) -> ast.Name:
    return ast.Name(id=id_, ctx=ast.Store() if store else ast.Load())


def _tuple(names: list, store: bool = False) -> ast.Tuple:
    return ast.Tuple(elts=[_name(n, store) for n in names], ctx=ast.Store() if store else ast.Load())


def _lambda(body: ast.expr) -> ast.Lambda:
    return ast.Lambda(args=ast.arguments(posonlyargs=[], args=[], vararg=None, kwonlyargs=[], kw_defaults=[],
                                         kwarg=None, defaults=[]), body=body)


def _def(name: str, params: list, body: list) -> ast.FunctionDef:
    args = ast.arguments(posonlyargs=[], args=[ast.arg(arg=p) for p in params], vararg=None, kwonlyargs=[],
                         kw_defaults=[], kwarg=None, defaults=[])
    return ast.FunctionDef(name=name, args=args, body=body or [ast.Pass()], decorator_list=[], returns=None,
                           type_comment=None, type_params=[])


def _rt(method: str, *args: ast.expr) -> ast.Call:
    return ast.Call(func=ast.Attribute(value=_name("__dycl_rt"), attr=method, ctx=ast.Load()), args=list(args),
                    keywords=[])


class _Pred(ast.NodeTransformer):
    """A predicate kept in tensor land: ``and``/``or``/``not`` through the recorder, ``.item()``/``bool()`` dropped."""

    def visit_BoolOp(self, node: ast.BoolOp) -> ast.AST:
        self.generic_visit(node)
        return _rt("and_" if isinstance(node.op, ast.And) else "or_", *[_lambda(v) for v in node.values])

    def visit_UnaryOp(self, node: ast.UnaryOp) -> ast.AST:
        self.generic_visit(node)
        return _rt("not_", node.operand) if isinstance(node.op, ast.Not) else node

    def visit_Call(self, node: ast.Call) -> ast.AST:
        self.generic_visit(node)
        f = node.func
        if isinstance(f, ast.Attribute) and f.attr == "item" and not node.args and not node.keywords:
            return f.value
        if isinstance(f, ast.Name) and f.id == "bool" and len(node.args) == 1 and not node.keywords:
            return node.args[0]
        return node

    def visit_Lambda(self, node: ast.Lambda) -> ast.AST:
        return node


class _Rewriter:
    def __init__(self, module: nn.Module, qualname: str, filename: str, fdef: ast.FunctionDef,
                 namespace: dict) -> None:
        self.module, self.qualname, self.filename, self.namespace = module, qualname, filename, namespace
        self.cls = getattr(type(module), "_dycl_original_class", type(module)).__name__
        self.self_name = fdef.args.args[0].arg if fdef.args.args else "self"
        self.branches: list = []
        self.loads = [(n.id, n.lineno) for n in _walk(fdef, into_scopes=True)
                      if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)]

    # -- sites
    def _site(self, node: ast.AST, kind: str, rewrite: Optional[str], reason: str = "") -> int:
        line = linecache.getline(self.filename, node.lineno).strip()
        self.branches.append(dycl.Branch(self.qualname, self.cls, node.lineno, kind, line[:100], rewrite, reason))
        return len(self.branches) - 1

    def _refuse(self, node: ast.If, kind: str, reason: str, bound: set) -> list:
        site = self._site(node, kind, None, reason)
        node.test = _rt("probe", ast.Constant(site), node.test)
        node.body = self.block(node.body, set(bound))
        node.orelse = self.block(node.orelse, set(bound))
        return [node]

    def _used_outside(self, name: str, node: ast.AST) -> bool:
        return any(n == name and not node.lineno <= line <= node.end_lineno for n, line in self.loads)

    # -- blocks
    def block(self, stmts: list, bound: set) -> list:
        out, stmts, i = [], list(stmts), 0
        while i < len(stmts):
            s = stmts[i]
            if isinstance(s, ast.For) and _has(s.body, (ast.Return,)):
                unrolled = self._unroll(s)
                if unrolled is not None:
                    stmts[i:i + 1] = unrolled
                    continue
            if isinstance(s, ast.If):
                new, consumed = self._if(s, stmts[i + 1:], bound)
                out.extend(new)
                if consumed:
                    return out
            elif isinstance(s, ast.While):
                out.extend(self._while(s, bound))
            elif isinstance(s, (ast.For, ast.With)):
                inner = bound | _stores(s)
                s.body = self.block(s.body, inner)
                if isinstance(s, ast.For):
                    s.orelse = self.block(s.orelse, inner)
                out.append(s)
            elif isinstance(s, ast.Try):
                for n in _walk(s):
                    if isinstance(n, (ast.If, ast.While)):
                        self._site(n, "if" if isinstance(n, ast.If) else "while", None,
                                   "inside try/except, which torch.export cannot trace")
                out.append(s)
            else:
                out.append(_IfExps(self).visit(s))
            bound |= _stores(s)
            i += 1
        return out

    def _unroll(self, s: ast.For) -> Optional[list]:
        why = ""
        if s.orelse or _has(s.body, (ast.Break, ast.Continue), into_loops=False):
            why = "a loop with a return and break/continue/else cannot be unrolled"
        free = _loads(s.iter) - {self.self_name} - set(self.namespace) - set(dir(builtins))
        if not why and free:
            why = f"a loop with a return over `{ast.unparse(s.iter)}`, computed at run time, cannot be unrolled"
        if not why:
            try:
                code = compile(ast.Expression(body=s.iter), self.filename, "eval")
                items = list(eval(code, dict(self.namespace), {self.self_name: self.module}))  # noqa: S307
                if len(items) > _MAX_UNROLL:
                    why = f"a loop with a return over {len(items)} items (> {_MAX_UNROLL}) is not unrolled"
            except Exception as exc:  # noqa: BLE001 - anything that fails to evaluate statically is refused
                why = f"a loop with a return whose sequence cannot be evaluated statically ({type(exc).__name__})"
        site = self._site(s, "for", None if why else "unrolled", why)
        if why:
            return None
        seq = f"__dycl_seq{site}"
        out: list = [ast.copy_location(ast.Assign(targets=[_name(seq, True)], value=ast.Call(
            func=_name("list"), args=[s.iter], keywords=[])), s)]
        for k in range(len(items)):
            target = copy.deepcopy(s.target)
            out.append(ast.copy_location(ast.Assign(targets=[target], value=ast.Subscript(
                value=_name(seq), slice=ast.Constant(k), ctx=ast.Load())), s))
            out.extend(copy.deepcopy(s.body))
        return out

    def _if(self, s: ast.If, rest: list, bound: set) -> tuple[list, bool]:
        body_ret, else_ret = _always_returns(s.body), _always_returns(s.orelse)
        if body_ret or else_ret:
            if body_ret:
                t, f = s.body, (s.orelse if else_ret else s.orelse + rest)
            else:
                t, f = s.body + rest, s.orelse
            if not (_always_returns(t) and _always_returns(f)):
                return self._refuse(s, "if-return", "it returns on some paths only (another path falls through)",
                                    bound), False
            if _has(t + f, (ast.Break, ast.Continue), into_loops=False):
                return self._refuse(s, "if-return", "a branch uses break/continue", bound), False
            bad = _impure(t + f)
            if bad:
                return self._refuse(s, "if-return", bad, bound), False
            site = self._site(s, "if-return", "torch.cond")
            params = sorted(_loads(t + f) & bound)
            tdef = _def(f"__dycl_t{site}", params, self.block(t, set(params)))
            fdef = _def(f"__dycl_f{site}", params, self.block(f, set(params)))
            call = _rt("cond", ast.Constant(site), _Pred().visit(s.test), _name(tdef.name), _name(fdef.name),
                       _tuple(params))
            return [ast.copy_location(n, s) for n in (tdef, fdef, ast.Return(value=call))], True
        if _has(s.body + s.orelse, (ast.Return,)):
            return self._refuse(s, "if", "it returns on some paths only (another path falls through)", bound), False
        if _has(s.body + s.orelse, (ast.Break, ast.Continue), into_loops=False):
            return self._refuse(s, "if", "a branch uses break/continue", bound), False
        bad = _impure(s.body + s.orelse)
        if bad:
            return self._refuse(s, "if", bad, bound), False
        st, sf = _stores(s.body), _stores(s.orelse)
        outs = []
        for n in sorted(st | sf):
            if n in bound or (n in st and n in sf):
                outs.append(n)
            elif self._used_outside(n, s):
                return self._refuse(s, "if", f"`{n}` is set on one path only and has no earlier value", bound), False
        if not outs:
            return self._refuse(s, "if", "the branches set no variable (side effects only)", bound), False
        site = self._site(s, "if", "torch.cond")
        params = sorted((_loads(s.body + s.orelse) | set(outs)) & bound)
        ret = ast.Return(value=_tuple(outs))
        tdef = _def(f"__dycl_t{site}", params, self.block(s.body, set(params)) + [ret])
        fdef = _def(f"__dycl_f{site}", params, self.block(s.orelse, set(params)) + [copy.deepcopy(ret)])
        call = _rt("cond", ast.Constant(site), _Pred().visit(s.test), _name(tdef.name), _name(fdef.name),
                   _tuple(params))
        assign = ast.Assign(targets=[_tuple(outs, store=True)], value=call)
        return [ast.copy_location(n, s) for n in (tdef, fdef, assign)], False

    def _while(self, s: ast.While, bound: set) -> list:
        def refuse(reason: str) -> list:
            site = self._site(s, "while", None, reason)
            s.test = _rt("probe", ast.Constant(site), s.test)
            s.body = self.block(s.body, bound | _stores(s.body))
            return [s]

        if s.orelse:
            return refuse("while/else has no torch.while_loop form")
        if _has(s.body, (ast.Return, ast.Break, ast.Continue), into_loops=False):
            return refuse("the loop body uses return/break/continue")
        bad = _impure(s.body)
        if bad:
            return refuse(bad)
        stored = _stores(s.body)
        carried = sorted(stored & bound)
        for n in sorted(stored - bound):
            if n in _loads(s.test) or self._used_outside(n, s):
                return refuse(f"`{n}` is first set inside the loop; give it a value before the loop")
        if not carried:
            return refuse("the loop sets no variable that existed before it")
        site = self._site(s, "while", "torch.while_loop")
        cdef = _def(f"__dycl_wc{site}", carried, [ast.Return(value=_Pred().visit(s.test))])
        bdef = _def(f"__dycl_wb{site}", carried, self.block(s.body, set(bound)) + [ast.Return(value=_tuple(carried))])
        call = _rt("while_", ast.Constant(site), _name(cdef.name), _name(bdef.name), _tuple(carried))
        assign = ast.Assign(targets=[_tuple(carried, store=True)], value=call)
        return [ast.copy_location(n, s) for n in (cdef, bdef, assign)]


class _IfExps(ast.NodeTransformer):
    """``a if p else b`` -> ``cond(p, lambda: a, lambda: b)`` in simple statements (not inside nested scopes)."""

    def __init__(self, rewriter: _Rewriter) -> None:
        self.rw = rewriter

    def visit_IfExp(self, node: ast.IfExp) -> ast.AST:
        self.generic_visit(node)
        site = self.rw._site(node, "ifexp", "torch.cond")
        return ast.copy_location(_rt("cond", ast.Constant(site), _Pred().visit(node.test), _lambda(node.body),
                                     _lambda(node.orelse), ast.Tuple(elts=[], ctx=ast.Load())), node)

    def visit_Lambda(self, node: ast.Lambda) -> ast.AST:
        return node

    def visit_FunctionDef(self, node: ast.FunctionDef) -> ast.AST:
        return node


class _Fixups(ast.NodeTransformer):
    """Zero-argument ``super()`` and private-name mangling, which compiling outside the class body would lose."""

    def __init__(self, self_name: str, cls_name: str) -> None:
        self.self_name, self.prefix = self_name, "_" + cls_name.lstrip("_")

    def visit_Call(self, node: ast.Call) -> ast.AST:
        self.generic_visit(node)
        if isinstance(node.func, ast.Name) and node.func.id == "super" and not node.args:
            node.args = [_name("__dycl_class__"), _name(self.self_name)]
        return node

    def visit_Attribute(self, node: ast.Attribute) -> ast.AST:
        self.generic_visit(node)
        if node.attr.startswith("__") and not node.attr.endswith("__"):
            node.attr = self.prefix + node.attr
        return node


def _forward_site(module: nn.Module, qualname: str, reason: str) -> dycl.Branch:
    cls = getattr(type(module), "_dycl_original_class", type(module))
    return dycl.Branch(qualname, cls.__name__, 0, "forward", "forward", None, reason, observed="tensor")


def rewrite_forward(module: nn.Module, qualname: str = "") -> RewriteResult:
    """Rewrite ``type(module).forward`` for this instance; ``forward`` is ``None`` when there is nothing to rewrite.

    Example:
        >>> from lightning_ext.export.dynamic_nets import MeanGatedNet
        >>> result = rewrite_forward(MeanGatedNet(4))
        >>> [(b.kind, b.rewrite) for b in result.branches]
        [('if', 'torch.cond')]
    """
    cls = getattr(type(module), "_dycl_original_class", type(module))
    fn = cls.forward
    try:
        lines, start = inspect.getsourcelines(fn)
        filename = inspect.getsourcefile(fn) or "<unknown>"
    except (OSError, TypeError):
        return RewriteResult(None, [])
    fdef = ast.parse(textwrap.dedent("".join(lines))).body[0]
    ast.increment_lineno(fdef, start - 1)
    if not isinstance(fdef, ast.FunctionDef) or not _has(fdef.body, (ast.If, ast.While, ast.IfExp)):
        return RewriteResult(None, [])
    decorators = [ast.unparse(d).rsplit(".", 1)[-1] for d in fdef.decorator_list]
    odd = [d for d in decorators if d not in _IGNORED_DECORATORS]
    if odd:
        return RewriteResult(None, [_forward_site(module, qualname, f"forward is decorated with @{odd[0]}")])
    if set(fn.__code__.co_freevars) - {"__class__"}:
        return RewriteResult(None, [_forward_site(module, qualname, "forward closes over an enclosing function")])
    fdef.decorator_list = []
    namespace = dict(fn.__globals__)
    rw = _Rewriter(module, qualname, filename, fdef, namespace)
    params = {a.arg for a in fdef.args.posonlyargs + fdef.args.args + fdef.args.kwonlyargs}
    params |= {a.arg for a in (fdef.args.vararg, fdef.args.kwarg) if a is not None}
    fdef.body = rw.block(fdef.body, params)
    fdef = _Fixups(rw.self_name, cls.__name__).visit(fdef)
    tree = ast.fix_missing_locations(ast.Module(body=[fdef], type_ignores=[]))
    namespace.update(__dycl_rt=_Recorder(rw.branches), __dycl_class__=cls)
    exec(compile(tree, filename, "exec"), namespace)  # noqa: S102 - the user's own forward, rewritten
    forward = namespace[fdef.name]
    forward.__qualname__ = f"{cls.__qualname__}.forward"
    return RewriteResult(forward, rw.branches)
