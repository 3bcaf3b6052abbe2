"""The LightningCLI behind ``lightning-ext fit|validate|test|predict``: subclass mode, short class names resolved
through the catalogue (importing only the classes a config names), early errors for unknown names, and
``test_after_fit``. Imported by :func:`lightning_ext.cli.run_cli` only when a Lightning subcommand runs."""

from __future__ import annotations

import difflib
import importlib
import os
import re
import sys
from argparse import ArgumentError
from pathlib import Path
from typing import Any, Iterable, Optional

import yaml
from lightning.pytorch import Callback, LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException

from lightning_ext import catalogue
from lightning_ext.cli import ConfigError, UnknownClassError

#: Exceptions a constructor raises for a value the user wrote: reported in one line naming the component.
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, NotADirectoryError, IsADirectoryError, ImportError,
               MisconfigurationException)
#: Arguments of :func:`lightning_ext.compress.compress` the CLI provides itself (model, data and trainer come from
#: the config's ``model``/``data``/``trainer`` sections).
_COMPRESS_SKIP = ("model", "datamodule", "trainer", "config_yaml", "latency_fn")
_CLASS_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def _debug() -> bool:
    """``LIGHTNING_EXT_DEBUG=1`` (or jsonargparse's ``JSONARGPARSE_DEBUG``) keeps the full traceback."""
    return bool(os.environ.get("LIGHTNING_EXT_DEBUG") or os.environ.get("JSONARGPARSE_DEBUG"))


def _subclasses(base: type) -> set[type]:
    seen, stack = set(), [base]
    while stack:
        for sub in stack.pop().__subclasses__():
            if sub not in seen:
                seen.add(sub)
                stack.append(sub)
    return seen


def known_short_names() -> dict[str, str]:
    """Short class name -> class path for every class that may be named without its module."""
    import torch

    importlib.import_module("lightning.pytorch.callbacks")
    importlib.import_module("lightning.pytorch.loggers")
    bases = (LightningModule, LightningDataModule, Callback, Logger, torch.optim.Optimizer,
             torch.optim.lr_scheduler.LRScheduler)
    names = {}
    for base in bases:
        for cls in _subclasses(base):
            if not cls.__name__.startswith("_"):
                names.setdefault(cls.__name__, f"{cls.__module__}.{cls.__name__}")
    for entry in catalogue.ENTRIES:
        names[entry.name] = entry.class_path
    return names


def _class_names_in(node: Any, key: Optional[str] = None) -> Iterable[str]:
    """Every class name written in a parsed config: ``class_path`` values and bare strings under model/data."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "class_path" and isinstance(v, str):
                yield v
            else:
                yield from _class_names_in(v, k)
    elif isinstance(node, list):
        for item in node:
            yield from _class_names_in(item, key)
    elif (isinstance(node, str) and key in ("model", "data", "callbacks") and node and node[0].isupper()
          and _CLASS_NAME.match(node)):
        yield node


def read_config(path: Path) -> Any:
    """The parsed YAML of a ``--config`` file; a syntax error is a :class:`ConfigError` naming file:line."""
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or str(err).strip().splitlines()[0]
        raise ConfigError(f"{where}: YAML syntax error: {problem}; "
                          "indent with spaces and close every bracket and quote") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read the config file: {err}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a YAML mapping (trainer:, model:, data:, ...), "
                          f"got a {type(data).__name__}")
    return data


def _names_from_args(args: list[str]) -> list[str]:
    names: list[str] = []
    it = iter(range(len(args)))
    for i in it:
        arg = args[i]
        key, _, value = arg.partition("=")
        if not value and i + 1 < len(args) and not args[i + 1].startswith("--"):
            value = args[i + 1]
        if key == "--config" and value:
            path = Path(value)
            if path.is_file():
                names += list(_class_names_in(read_config(path)))
        elif key in ("--model", "--data", "--trainer.callbacks", "--trainer.callbacks+") and value:
            if value.lstrip().startswith(("{", "[")):  # an inline JSON/YAML value: read the class names inside it
                try:
                    names += list(_class_names_in(yaml.safe_load(value), key.lstrip("-").split(".")[-1].rstrip("+")))
                except yaml.YAMLError:
                    pass  # jsonargparse reports the malformed value with its key
            elif not Path(value).is_file():
                names.append(value)
        elif key.endswith(".class_path") and value:
            names.append(value)
    return names


def check_class_names(args: list[str]) -> None:
    """Raise :class:`UnknownClassError` for a class named in ``args`` (or their configs) that cannot be found."""
    names = _names_from_args(args)
    if not names:
        return
    short = known_short_names()
    for name in names:
        if "." not in name:
            if name in short:
                if name in catalogue._BY_NAME:
                    catalogue.get(name).load()  # jsonargparse resolves short names among imported classes
                continue
            close = difflib.get_close_matches(name, short, n=5, cutoff=0.6)
            raise UnknownClassError(
                f"Unknown class {name!r}."
                + (f" Did you mean: {', '.join(close)}?" if close else "")
                + " Run `lightning-ext list` for our components, or give a full class path (package.module.Class)."
            )
        _check_class_path(name)


def _check_class_path(name: str) -> None:
    """Raise :class:`UnknownClassError` only when ``name`` surely names nothing: its package cannot be found,
    or an imported module lacks the attribute. Anything else (a module that fails for another reason, a path
    this check cannot follow) falls through to jsonargparse, which reports it with its key."""
    parts = name.split(".")
    module, depth = None, len(parts) - 1
    while depth > 0:  # the longest importable module prefix: pkg.mod.Class, pkg.mod.Outer.Inner
        module_name = ".".join(parts[:depth])
        try:
            module = importlib.import_module(module_name)
            break
        except ModuleNotFoundError as err:
            if err.name is None or not module_name.startswith(err.name):
                return  # the module exists but imports something missing: let jsonargparse say so
            depth -= 1
        except Exception:  # noqa: BLE001 - a module that fails to import is reported by jsonargparse
            return
    if module is None:
        raise UnknownClassError(f"Cannot import {name!r}: no module {parts[0]!r} is installed. Give a full class "
                                "path (package.module.Class) or run `lightning-ext list` for our components.")
    obj = module
    for i, attr in enumerate(parts[depth:], start=depth):
        if not hasattr(obj, attr):
            owner = ".".join(parts[:i])
            candidates = [n for n in dir(obj) if not n.startswith("_")]
            close = difflib.get_close_matches(attr, candidates, n=5, cutoff=0.6)
            raise UnknownClassError(
                f"Module {owner!r} has no class {attr!r}."
                + (f" Did you mean: {', '.join(f'{owner}.{c}' for c in close)}?" if close else "")
            )
        obj = getattr(obj, attr)


_NOISE = ("Does not validate against any of the Union subtypes", "Errors:", "Given value type:",
          "Expected a <class 'NoneType'>", "tip:", "usage:")


def _tidy(text: str) -> str:
    text = re.sub(r"<class '(?:[\w.]+\.)?(\w+)'>", r"\1", text)
    return text.replace("typing.", "").rstrip(":").strip()


def summarize_parser_error(message: str) -> str:
    """One line from jsonargparse's nested error: the deepest key (``model.init_args.lr``), the class it belongs
    to, and the innermost reason (``not of type PositiveFloat: -1 does not conform to restriction v>0``)."""
    lines = [ln for ln in message.splitlines() if ln.strip()]
    if not lines:
        return "invalid command line or config"
    stack: list[tuple[int, str]] = []  # (indent, "key" or "<class path>")
    subtypes: dict[int, str] = {}
    given: dict[int, str] = {}
    best: Optional[tuple[int, list[str], str]] = None  # (depth, keys, reason) of the deepest reason
    for raw in lines:
        indent, text = len(raw) - len(raw.lstrip()), raw.strip()
        if text.startswith("- "):
            text, indent = text[2:], indent + 2
        while stack and stack[-1][0] >= indent:
            stack.pop()
        m = re.match(r'(?:Parser key|Key) "([^"]+)":?\s*(.*)$', text)
        if m:
            stack.append((indent, m.group(1)))
            text = m.group(2)
        m = re.match(r"Problem with given class_path '([^']+)':\s*(.*)$", text)
        if m:
            stack.append((indent, f"<{m.group(1)}>"))
            text = m.group(2)
        if not text:
            continue
        if text.startswith("Subtypes:"):
            subtypes[len(stack)] = _tidy(text[len("Subtypes:"):])
            continue
        if text.startswith("Given value:"):
            given[len(stack)] = text[len("Given value:"):].strip()
            continue
        if any(text.startswith(n) for n in _NOISE):
            continue
        if best is None or len(stack) > best[0]:
            best = (len(stack), [k for _, k in stack], text)
    if best is None:
        return _tidy(lines[0])
    depth, keys, text = best
    if text.startswith("Expected a ") and depth in subtypes:  # a Union/Literal: say what it accepts
        text = f"expected one of {subtypes[depth]}, got {given.get(depth, '?')!r}"
    path: list[str] = []
    owner = None
    for key in keys:
        if key.startswith("<"):
            owner = key[1:-1]
            path.append("init_args")
        else:
            for part in key.split("."):
                if not path or part != path[-1]:
                    path.append(part)
    where = ".".join(path) or "command line"
    if where.endswith(".init_args"):
        where = where[: -len(".init_args")]
    hint = (f"; see `--{where.split('.init_args')[0]}.help {owner.rsplit('.', 1)[-1]}` for its arguments"
            if owner else "")
    return f"{where}: {_tidy(text)}" + (f" ({owner.rsplit('.', 1)[-1]})" if owner else "") + hint


def _component_of(err: BaseException) -> str:
    """The class whose constructor raised ``err``: the innermost of ours, else the outermost constructor."""
    ours = outer = None
    tb = err.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name == "__init__" and "self" in frame.f_locals:
            cls = type(frame.f_locals["self"])
            outer = outer or cls
            if cls.__module__.startswith("lightning_ext."):
                ours = cls
        tb = tb.tb_next
    cls = ours or outer
    return cls.__name__ if cls is not None else "a class in the config"


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def summarize_instantiation_error(err: BaseException) -> str:
    """One line for a constructor's error. jsonargparse re-raises an error of a class given by ``class_path`` as
    a Union error ("Does not validate ... Errors: - <the constructor's message> ... Given value:
    Namespace(class_path='pkg.Class', ...)"): keep the constructor's message and name its class."""
    text = str(err)
    if text.startswith("Does not validate against any of the Union subtypes"):
        reasons = [ln.strip()[2:] for ln in text.splitlines()
                   if ln.strip().startswith("- ") and "Expected a <class 'NoneType'>" not in ln]
        owner = re.search(r"class_path='([^']+)'", text)
        name = owner.group(1).rsplit(".", 1)[-1] if owner else _component_of(err)
        return f"{name}: {reasons[0].strip() if reasons else _one_line(err)}"
    return f"{_component_of(err)}: {_one_line(err)}"


class LightningExtCLI(LightningCLI):
    """LightningCLI with subclass mode for model and data, our components importable by short name, a
    ``test_after_fit`` option, and early, suggestive errors for unknown class names."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault(
            "parser_kwargs",
            {"description": "lightning-ext: research methods as Lightning components. "
             "`lightning-ext list` shows them."},
        )
        # parse errors raise ArgumentError (turned into one-line ConfigError below); --help still exits 0
        kwargs["parser_kwargs"] = {"exit_on_error": False, **kwargs["parser_kwargs"]}
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--test_after_fit", type=bool, default=False,
            help="After `fit`, evaluate on the test split (best checkpoint if one was saved).",
        )

    def parse_arguments(self, parser, args) -> None:
        if args is None:
            check_class_names(sys.argv[1:])
        elif isinstance(args, (list, tuple)):
            check_class_names(list(args))
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:
            if _debug():
                raise
            raise ConfigError(summarize_parser_error(str(err))) from err

    def instantiate_classes(self) -> None:
        """Build the classes; a constructor refusing a value becomes one line naming the component."""
        try:
            super().instantiate_classes()
        except USER_ERRORS as err:
            if _debug():
                raise
            raise ConfigError(summarize_instantiation_error(err)) from err

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """Lightning's subcommands plus ``compress`` (:func:`lightning_ext.compress.compress`)."""
        return {**LightningCLI.subcommands(), "compress": set(_COMPRESS_SKIP)}

    def _add_subcommands(self, parser, **kwargs: Any) -> None:
        """Lightning's subcommand parsers (from the Trainer's methods), and ``compress`` from its function."""
        from lightning.pytorch.cli import _get_short_description

        from lightning_ext.compress import compress

        self._subcommand_parsers = {}
        subcommands = parser.add_subcommands()
        for name in self.subcommands():
            sub_kwargs = dict(kwargs.get(name, {}))
            if name == "compress":
                description = _get_short_description(compress)
                sub_kwargs.setdefault("description", description)
                sub = self.init_parser(**sub_kwargs)
                self._add_arguments(sub)
                self._subcommand_method_arguments[name] = sub.add_function_arguments(
                    compress, skip=set(_COMPRESS_SKIP), as_group=True)
            else:
                description = _get_short_description(getattr(self.trainer_class, name))
                sub_kwargs.setdefault("description", description)
                sub = self._prepare_subcommand_parser(self.trainer_class, name, **sub_kwargs)
            self._subcommand_parsers[name] = sub
            subcommands.add_subcommand(name, sub, help=description)

    def _run_compress(self) -> None:
        from lightning_ext.compress import CompressError, compress
        from lightning_ext.compression.graph import PruningError

        args = {k: v for k, v in self.config_init["compress"].items() if k in self._subcommand_method_arguments["compress"]}
        config_yaml = self._subcommand_parsers["compress"].dump(self.config["compress"])
        try:
            self.compress_result = compress(self.model, self.datamodule, trainer=self._compress_trainer,
                                            config_yaml=config_yaml, **args)
        except (CompressError, PruningError) as err:
            if _debug():
                raise
            raise ConfigError(f"compress: {_one_line(err)}") from err
        r = self.compress_result
        print(f"compress: {r.dense_ms:.3g} ms -> {r.compressed_ms:.3g} ms ({r.speedup:.2f}x, budget {r.budget_ms:.3g} "
              f"ms); {r.monitor} {r.dense_metric} -> {r.final_metric}; report {r.report_path}")

    def _compress_trainer(self):
        """The config's Trainer for the first fine-tuning step, a fresh one from the same config after that."""
        if not getattr(self, "_compress_trainer_used", False):
            self._compress_trainer_used = True
            return self.trainer
        return self.instantiate_trainer()

    def _run_subcommand(self, subcommand: str) -> None:
        """Run the subcommand. SIGTERM stops it with ``trainer.interrupted`` set (``main`` then exits 143); a file
        named in the config but missing, found before the first training step, is a one-line user error."""
        try:
            if subcommand == "compress":
                self._run_compress()
            else:
                super()._run_subcommand(subcommand)
        except SIGTERMException:
            return  # Lightning has set trainer.state.status = "interrupted" and torn down
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as err:
            if _debug() or self.trainer.global_step > 0:
                raise
            raise ConfigError(f"{subcommand}: {_one_line(err)} (check the paths in the config and flags)") from err

    def after_fit(self) -> None:
        if not self.config.get("fit", {}).get("test_after_fit", False):
            return
        ckpt = getattr(self.trainer.checkpoint_callback, "best_model_path", "") or None
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt, weights_only=False)


