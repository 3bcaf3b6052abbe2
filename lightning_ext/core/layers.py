"""Layer selection by name: exact module names or shell-style globs (``net.layer4.*``), one resolver for every
component that takes ``layers`` (include) or ``ignored_layers`` (exclude)."""

from __future__ import annotations

import difflib
import fnmatch
from typing import Iterable, Optional, Sequence

from torch import nn


def match_names(names: Iterable[str], patterns: Optional[Sequence[str]], what: str = "ignored_layers",
                owner: str = "the model", error: type[Exception] = ValueError, strict: bool = True) -> list[str]:
    """The ``names`` matched by ``patterns`` (exact or :func:`fnmatch.fnmatchcase` globs), in ``names`` order.

    With ``strict``, a pattern that matches nothing raises ``error`` with the closest names.

    Example:
        >>> match_names(["net.fc", "net.conv1", "head"], ["net.*"])
        ['net.fc', 'net.conv1']
    """
    names = list(names)
    hit: set[str] = set()
    for pattern in patterns or []:
        if not isinstance(pattern, str):
            raise error(f"`{what}` takes names or glob patterns (strings), got {pattern!r}.")
        hits = {n for n in names if n == pattern or fnmatch.fnmatchcase(n, pattern)}
        if not hits and strict:
            close = difflib.get_close_matches(pattern, names, n=4)
            raise error(f"`{what}` names {pattern!r}, but {owner} has no such entry."
                        + (f" Close names: {', '.join(close)}." if close else ""))
        hit |= hits
    return [n for n in names if n in hit]


def resolve_layer_names(model: nn.Module, patterns: Optional[Sequence[str]], what: str = "ignored_layers",
                        error: type[Exception] = ValueError) -> list[str]:
    """Module names of ``model`` matched by ``patterns``; a pattern matching no module raises ``error``.

    Names are relative to ``model`` (for a LightningModule wrapping ``self.net``: ``net.fc``).
    """
    names = [n for n, _ in model.named_modules() if n]
    return match_names(names, patterns, what, f"{type(model).__name__} (names are relative to it, e.g. 'net.fc')",
                       error)
