"""The DyCL callback: export the trained model with its data-dependent control flow rewritten, and check it."""

from __future__ import annotations

import importlib
from typing import Any, Literal, Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_ext.core.inputs import batch_inputs
from lightning_ext.core.io import atomic_path, atomic_write_json, atomic_write_text
from lightning_ext.core.paths import check_path_argument, output_path
from lightning_ext.core.strategy import refuse_sharded_strategy
from lightning_ext.core.validation import (NonNegativeFloat, PositiveInt, check_choice, check_number,
                                           check_positive_int)
from lightning_ext.export.dycl import DyCLReport, export_dynamic, rewritten, time_forward

__all__ = ["DynamicExportCheck"]

Variant = Literal["eager", "compiled", "compiled_rewritten", "exported"]
VARIANTS = ("eager", "compiled", "compiled_rewritten", "exported")


class DynamicExportCheck(Callback):
    """Export the trained model with DyCL's control-flow rewriting, check it equals eager, save it and time it.

    DyCL (Chen et al., "DyCL: Dynamic Neural Network Compilation Via Program Rewriting and Graph Optimization",
    ISSTA 2023, arXiv 2307.04963; code https://github.com/SeekingDream/ISSTA23_DyCL) compiles dynamic networks by
    rewriting their data-dependent branches into sub-graphs and a dispatcher. Here, at ``on`` (end of fit or start
    of test), the model (``pl_module``, or its submodule ``module``, optionally wrapped by the class ``wrap``) is:

    1. tried with plain ``torch.export`` (the "before"), then rewritten by
       :func:`~lightning_ext.export.dycl.export_dynamic` (``if`` on a tensor -> ``torch.cond``, bounded ``while``
       -> ``torch.while_loop``; the sites it cannot rewrite are listed with a one-line reason) and exported;
    2. compared with the eager model on ``check_batches`` held-out batches (validation at fit end, test at test
       start): ``|exported(x) - eager(x)| <= atol + rtol |eager(x)|`` elementwise;
    3. saved atomically as a ``.pt2`` (``torch.export.save``) under the run directory;
    4. timed at batch ``latency_batch_size`` (median of ``latency_repeats`` passes, the current thread count):
       eager, ``torch.compile`` of the original (graph breaks allowed), ``torch.compile(fullgraph=True)`` of the
       rewritten model and the exported program, written as a Markdown table with ratios to eager.

    The report (sites, export errors, differences, latency) goes to ``report_path`` and to :attr:`results`; the
    program to :attr:`program`. It runs in one process: more than one process (it hung under two gloo processes) and sharded strategies are refused in ``setup()``.

    Args:
        module: dotted name of the submodule to export (``None``: the LightningModule's ``forward``).
        wrap: import path of a class applied to that module first (e.g.
            ``lightning_ext.export.dynamic_nets.BatchEarlyExit`` for a batch-level early exit).
        on: ``"fit_end"`` or ``"test_start"``.
        check_batches: held-out batches compared.
        atol: absolute tolerance of the comparison.
        rtol: relative tolerance of the comparison.
        dynamic_batch: export with a symbolic batch size (falls back to static shapes if that fails).
        strict: ``torch.export``'s strict mode.
        export_path: where the ``.pt2`` goes (relative to the run directory; ``None``: not saved).
        report_path: the JSON report (``None``: not written).
        latency_path: the Markdown latency table (``None``: not written).
        latency: variants timed (empty: no timing).
        latency_batch_size: batch size of the timing input (taken from the first held-out batch).
        latency_repeats: timed passes per variant.
        on_failure: ``"error"`` raises when the export fails or differs from eager; ``"warn"`` warns.

    Example:
        >>> cb = DynamicExportCheck(module="net", latency=["eager", "exported"])
        >>> cb.on
        'fit_end'
    """

    def __init__(
        self,
        module: Optional[str] = None,
        wrap: Optional[str] = None,
        on: Literal["fit_end", "test_start"] = "fit_end",
        check_batches: PositiveInt = 2,
        atol: NonNegativeFloat = 1e-5,
        rtol: NonNegativeFloat = 1e-4,
        dynamic_batch: bool = True,
        strict: bool = False,
        export_path: Optional[str] = "export/model.pt2",
        report_path: Optional[str] = "export/report.json",
        latency_path: Optional[str] = "export/latency.md",
        latency: Optional[list[Variant]] = None,
        latency_batch_size: PositiveInt = 1,
        latency_repeats: PositiveInt = 20,
        on_failure: Literal["error", "warn"] = "warn",
    ) -> None:
        check_choice("on", on, ("fit_end", "test_start"))
        check_positive_int("check_batches", check_batches)
        check_number("atol", atol, low=0)
        check_number("rtol", rtol, low=0)
        for name, value in (("export_path", export_path), ("report_path", report_path),
                            ("latency_path", latency_path)):
            check_path_argument(name, value)
        latency = list(VARIANTS) if latency is None else list(latency)
        for v in latency:
            check_choice("latency", v, VARIANTS)
        check_positive_int("latency_batch_size", latency_batch_size)
        check_positive_int("latency_repeats", latency_repeats)
        check_choice("on_failure", on_failure, ("error", "warn"))
        if wrap is not None and "." not in wrap:
            raise ValueError(f"wrap must be an import path such as 'package.module.Class', got {wrap!r}")
        self.module, self.wrap, self.on = module, wrap, on
        self.check_batches, self.atol, self.rtol = int(check_batches), float(atol), float(rtol)
        self.dynamic_batch, self.strict = bool(dynamic_batch), bool(strict)
        self.export_path, self.report_path, self.latency_path = export_path, report_path, latency_path
        self.latency, self.latency_batch_size, self.latency_repeats = latency, int(latency_batch_size), int(
            latency_repeats)
        self.on_failure = on_failure
        self.report: Optional[DyCLReport] = None
        self.program: Optional[torch.export.ExportedProgram] = None
        self.results: dict[str, Any] = {}

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Refuse more than one process: a two-process gloo run hung with rank 0 exporting and rank 1 at the barrier
        (measured), so the check runs on one device only (export the trained checkpoint afterwards for DDP fits)."""
        refuse_sharded_strategy(trainer, "DynamicExportCheck", "exports the whole model from one process")
        if trainer.world_size > 1:
            raise RuntimeError("DynamicExportCheck runs in one process only (its export hung under two gloo processes): "
                               "fit with devices=1, or export the saved checkpoint afterwards with `export_dynamic`")

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Export and check the trained model on validation batches."""
        if self.on == "fit_end":
            self._run(trainer, pl_module, "val")

    @override
    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Export and check the model on test batches."""
        if self.on == "test_start":
            self._run(trainer, pl_module, "test")

    # ------------------------------------------------------------------------------------------------ helpers
    def target(self, pl_module: LightningModule) -> nn.Module:
        """The module exported: ``pl_module``, its submodule ``module``, wrapped by ``wrap``."""
        target: nn.Module = pl_module
        if self.module:
            try:
                target = pl_module.get_submodule(self.module)
            except AttributeError:
                names = [n for n, _ in pl_module.named_children()]
                raise ValueError(f"DynamicExportCheck: the LightningModule has no submodule {self.module!r}; its "
                                 f"children are {names}") from None
        if self.wrap:
            path, _, name = self.wrap.rpartition(".")
            try:
                cls = getattr(importlib.import_module(path), name)
            except (ImportError, AttributeError):
                raise ValueError(f"DynamicExportCheck: cannot import wrap={self.wrap!r}; give 'package.module.Class'"
                                 ) from None
            target = cls(target)
        return target

    @staticmethod
    def _held_out(trainer: Trainer, split: str) -> Any:
        loaders = trainer.val_dataloaders if split == "val" else trainer.test_dataloaders
        if loaders is None and trainer.datamodule is not None:
            loaders = getattr(trainer.datamodule, f"{split}_dataloader")()
        while isinstance(loaders, (list, tuple)) and loaders:
            loaders = loaders[0]
        if loaders is None or isinstance(loaders, (list, tuple)):
            raise ValueError(f"DynamicExportCheck needs {split} batches to compare the export with eager; give the "
                             f"Trainer a {split} dataloader or set on='{'test_start' if split == 'val' else 'fit_end'}'")
        return loaders

    def _inputs(self, trainer: Trainer, pl_module: LightningModule, split: str) -> list[Tensor]:
        out = []
        for batch in self._held_out(trainer, split):
            out.append(batch_inputs(batch, owner="DynamicExportCheck").to(pl_module.device))
            if len(out) >= self.check_batches:
                break
        if not out:
            raise ValueError(f"DynamicExportCheck: the {split} dataloader is empty")
        return out

    def _latency(self, model: nn.Module, x: Tensor) -> dict[str, float]:
        times: dict[str, float] = {}
        kw = dict(warmup=3, repeats=self.latency_repeats)
        if "eager" in self.latency:
            times["eager"] = time_forward(model, (x,), **kw)
        if "compiled" in self.latency:
            torch._dynamo.reset()
            times["compiled"] = time_forward(torch.compile(model), (x,), **kw)
        if "compiled_rewritten" in self.latency:
            torch._dynamo.reset()
            with rewritten(model):
                # Inductor's conv layout optimisation feeds nested torch.cond branches channels-last inputs they were
                # not compiled for (a stride assertion, torch 2.14.1): off for the rewritten model
                compiled = torch.compile(model, fullgraph=True, options={"layout_optimization": False})
                times["compiled_rewritten"] = time_forward(compiled, (x,), **kw)
        if "exported" in self.latency and self.program is not None:
            program = self.program
            try:
                with torch.no_grad():
                    program.module()(x)
            except RuntimeError:  # a symbolic batch can carry guards such as batch >= 2: export at this shape
                program = export_dynamic(model, (x,), dynamic_batch=False, strict=self.strict)[0]
            if program is not None:
                times["exported"] = time_forward(program.module(), (x,), **kw)
        torch._dynamo.reset()
        return times

    def _run(self, trainer: Trainer, pl_module: LightningModule, split: str) -> None:
        if trainer.is_global_zero:
            target = self.target(pl_module)
            was_training = target.training
            target.eval()
            try:
                self._check(trainer, target, self._inputs(trainer, pl_module, split))
            finally:
                target.train(was_training)
        trainer.strategy.barrier("DynamicExportCheck")

    def _check(self, trainer: Trainer, model: nn.Module, inputs: list[Tensor]) -> None:
        example = inputs[0]
        self.program, self.report = export_dynamic(model, (example,), self.dynamic_batch, self.strict,
                                                   try_original=True)
        res: dict[str, Any] = {"report": self.report.to_dict(), "sites": [b.line_text() for b in self.report.sites()]}
        problem = "" if self.program is not None else f"the rewritten model did not export: {self.report.error}"
        if self.program is not None:
            exported = self.program.module()
            diffs, same = [], True
            with torch.no_grad():
                for x in inputs:
                    if not self.report.dynamic_batch and x.shape[0] != example.shape[0]:
                        continue
                    got, want = exported(x), model(x)
                    diffs.append(float((got - want).abs().max()))
                    same &= bool(torch.allclose(got, want, atol=self.atol, rtol=self.rtol))
            res.update(max_abs_diff=max(diffs), equal=same, batches_compared=len(diffs))
            if not same:
                problem = f"the exported program differs from eager by up to {max(diffs):.3g} (atol {self.atol})"
            path = output_path(trainer, self.export_path)
            if path is not None:
                with atomic_path(path) as tmp, open(tmp, "wb") as f:
                    torch.export.save(self.program, f)
                res["export_path"] = str(path)
        if self.latency:
            x = example[: self.latency_batch_size]
            if x.shape[0] < self.latency_batch_size:
                x = x.repeat(-(-self.latency_batch_size // x.shape[0]), *([1] * (x.dim() - 1)))[
                    : self.latency_batch_size]
            times = self._latency(model, x)
            res["latency_s"] = times
            res["latency_batch_size"] = self.latency_batch_size
            path = output_path(trainer, self.latency_path)
            if path is not None:
                atomic_write_text(self.latency_table(times, self.latency_batch_size), path)
        self.results = res
        path = output_path(trainer, self.report_path)
        if path is not None:
            atomic_write_json(res, path, indent=1)
        metrics = {"export/exported": float(self.program is not None), "export/rewritten_sites": float(
            sum(b.status == "rewritten" for b in self.report.sites()))}
        if "max_abs_diff" in res:
            metrics["export/max_abs_diff"] = res["max_abs_diff"]
        for name, t in res.get("latency_s", {}).items():
            if name != "eager" and "eager" in res["latency_s"]:
                metrics[f"export/speedup_{name}"] = res["latency_s"]["eager"] / t
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        if problem:
            message = f"DynamicExportCheck: {problem}; sites: " + "; ".join(b.line_text() for b in
                                                                            self.report.not_rewritten)
            if self.on_failure == "error":
                raise RuntimeError(message)
            rank_zero_warn(message)

    @staticmethod
    def latency_table(times: dict[str, float], batch_size: int) -> str:
        """A Markdown table of median latencies with the ratio eager / variant (> 1: faster than eager).

        Example:
            >>> print(DynamicExportCheck.latency_table({"eager": 0.002, "exported": 0.001}, 1).splitlines()[2])
            | eager | 1 | 2.000 | 1.00x |
        """
        rows = ["| variant | batch | median ms | speedup vs eager |", "|---|---|---|---|"]
        base = times.get("eager")
        for name, t in times.items():
            ratio = f"{base / t:.2f}x" if base else "-"
            rows.append(f"| {name} | {batch_size} | {1e3 * t:.3f} | {ratio} |")
        return "\n".join(rows) + "\n"
