"""One catalogue entry: :class:`Entry` and the shorthand ``_e`` the entry lists use."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Optional

@dataclass(frozen=True)
class Entry:
    """One shipped component: where it lives, what it is and where it comes from."""

    name: str
    kind: str
    family: str
    module: str
    summary: str
    paper: Optional[str] = None
    arxiv: Optional[str] = None
    aliases: tuple[str, ...] = field(default_factory=tuple)
    extra: Optional[str] = None  #: the pip extra its family needs beyond the base install

    @property
    def class_path(self) -> str:
        return f"{self.module}.{self.name}"

    def load(self) -> object:
        """Import the defining module and return the component (a class or a function)."""
        return getattr(importlib.import_module(self.module), self.name)

    def words(self) -> str:
        return " ".join([self.name, *self.aliases, self.paper or "", self.arxiv or "", self.family, self.kind,
                         self.summary]).lower()


def _e(name, kind, family, module, summary, paper=None, arxiv=None, aliases=(), extra=None) -> Entry:
    return Entry(name, kind, family, f"lightning_ext.{family}.{module}", summary, paper, arxiv, tuple(aliases), extra)
