"""A constrained type for shares that may be whole but not empty: a float in (0, 1] (a kept fraction, a share
of classes kept), beside :mod:`lightning_ext.core.validation`'s types (``UnitIntervalRightOpen`` is [0, 1)).

jsonargparse registers one type per restriction and refuses the same restriction under a second name, so the
type already registered for (0, 1] (by any family, under any name) is reused when there is one.
"""

from __future__ import annotations

from jsonargparse.typing import registered_types, restricted_number_type

__all__ = ["UnitIntervalLeftOpen"]

_RESTRICTIONS = [(">", 0.0), ("<=", 1.0)]

#: A finite float in (0, 1] (a kept share: ``keep`` as a fraction, ``class_fraction``).
UnitIntervalLeftOpen = registered_types.get((tuple(sorted(_RESTRICTIONS)), float, "and")) or restricted_number_type(
    "UnitIntervalLeftOpen", float, _RESTRICTIONS, join="and", docstring="a float in (0, 1]")
