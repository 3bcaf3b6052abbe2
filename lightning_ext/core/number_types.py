"""More constrained number types for constructor annotations (beside :mod:`lightning_ext.core.validation`'s).

jsonargparse registers one type per restriction and refuses the same restriction under a second name, so
two families that each wrote ``restricted_number_type("X", int, (">=", 2))`` with different names could not be
imported together. :func:`number_type` returns the type already registered for a restriction when there is
one, and families take these shared types from here.
"""

from __future__ import annotations

from typing import Any

from jsonargparse.typing import registered_types, restricted_number_type

__all__ = ["AtLeastTwoInt", "NotBelowOneFloat", "number_type"]


def number_type(name: str, base: type, restrictions: list[tuple[str, Any]], docstring: str) -> type:
    """The jsonargparse type for ``restrictions`` (joined by "and"): the registered one if it exists, else new.

    Example:
        >>> number_type("MyPositive", int, [(">", 0)], "an int > 0").__name__  # already registered
        'PositiveInt'
    """
    existing = registered_types.get((tuple(sorted(restrictions)), base, "and"))
    if existing is not None:
        return existing
    return restricted_number_type(name, base, restrictions, join="and", docstring=docstring)


#: An integer >= 2 (a class count, views per image).
AtLeastTwoInt = number_type("AtLeastTwoInt", int, [(">=", 2)], "an integer >= 2")
#: A finite float >= 1 (an imbalance ratio).
NotBelowOneFloat = number_type("NotBelowOneFloat", float, [(">=", 1)], "a float >= 1")
