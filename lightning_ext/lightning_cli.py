"""The LightningCLI behind ``lightning-ext fit|validate|test|predict``: subclass mode, short class names resolved
through the catalogue (importing only the classes a config names), early errors for unknown names, and
``test_after_fit``. Imported by :func:`lightning_ext.cli.run_cli` only when a Lightning subcommand runs."""

from __future__ import annotations

import difflib
import importlib
import sys
from pathlib import Path
from typing import Any, Iterable, Optional

import yaml
from lightning.pytorch import Callback, LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import Logger

from lightning_ext import catalogue
from lightning_ext.cli import UnknownClassError

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
    elif isinstance(node, str) and key in ("model", "data", "callbacks") and node and node[0].isupper():
        yield node


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
                names += list(_class_names_in(yaml.safe_load(path.read_text())))
        elif key in ("--model", "--data", "--trainer.callbacks", "--trainer.callbacks+") and value and not value.startswith("{"):
            if not Path(value).is_file():
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
        module_name, _, attr = name.rpartition(".")
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise UnknownClassError(f"Cannot import module {module_name!r} for class {name!r}: {err}.") from err
        if not hasattr(module, attr):
            candidates = [n for n in dir(module) if not n.startswith("_")]
            close = difflib.get_close_matches(attr, candidates, n=5, cutoff=0.6)
            raise UnknownClassError(
                f"Module {module_name!r} has no class {attr!r}."
                + (f" Did you mean: {', '.join(f'{module_name}.{c}' for c in close)}?" if close else "")
            )


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
        super().parse_arguments(parser, args)

    def after_fit(self) -> None:
        if not self.config.get("fit", {}).get("test_after_fit", False):
            return
        ckpt = getattr(self.trainer.checkpoint_callback, "best_model_path", "") or None
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt, weights_only=False)


