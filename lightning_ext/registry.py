"""The catalogue of shipped components: discovered from the subpackages' export tables, summarised from
their docstrings. ``lightning-ext list`` prints it and the README's component table is checked against it."""

from __future__ import annotations

import importlib
import inspect
import re
from dataclasses import dataclass

KINDS = ("callbacks", "modules", "datamodules")
KIND_TITLES = {"callbacks": "Callbacks", "modules": "LightningModules", "datamodules": "LightningDataModules"}


@dataclass(frozen=True)
class Component:
    """One shipped class: its short name, kind (subpackage), defining module and one-line summary."""

    name: str
    kind: str
    module: str
    summary: str

    @property
    def class_path(self) -> str:
        return f"{self.module}.{self.name}"

    def load(self) -> type:
        return getattr(importlib.import_module(self.module), self.name)


def _summary(obj: object) -> str:
    doc = inspect.getdoc(obj) or ""
    paragraph = doc.strip().split("\n\n")[0]
    text = " ".join(line.strip() for line in paragraph.splitlines())
    text = re.sub(r":\w+:`~?([^`]+)`", lambda m: m.group(1).rsplit(".", 1)[-1], text)  # :class:`~a.B` -> B
    return text.replace("``", "`")


def components(kind: str | None = None) -> list[Component]:
    """All shipped components (importing them), grouped by kind in the order callbacks, modules, datamodules."""
    out = []
    for k in KINDS if kind is None else (kind,):
        pkg = importlib.import_module(f"lightning_ext.{k}")
        for name, sub in sorted(pkg._EXPORTS.items()):
            module = f"lightning_ext.{k}.{sub}"
            cls = getattr(importlib.import_module(module), name)
            out.append(Component(name, k, module, _summary(cls)))
    return out


def import_all() -> None:
    """Import every component so jsonargparse can resolve them by short class name."""
    components()


def markdown_table(items: list[Component] | None = None) -> str:
    """The README's component table: one section row per kind, then name and summary."""
    items = components() if items is None else items
    lines = ["| component | kind | what it is |", "|---|---|---|"]
    for c in items:
        lines.append(f"| `{c.name}` | {KIND_TITLES[c.kind]} | {c.summary} |")
    return "\n".join(lines)
