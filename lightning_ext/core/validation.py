"""Argument checks that reject NaN and infinity, with one line naming the argument and what to change.

Constructor signatures use the types below (jsonargparse's constrained types, ``Literal[...]``) so the CLI rejects
a bad YAML value with its config key and ``--help`` lists the choices; the ``check_*`` functions repeat the same
checks for Python callers (``x <= 0`` lets NaN through; these do not).
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any, Iterable, Optional

from jsonargparse.typing import (  # noqa: F401 - re-exported for constructor annotations
    ClosedUnitInterval,
    NonNegativeFloat,
    NonNegativeInt,
    OpenUnitInterval,
    PositiveFloat,
    PositiveInt,
    registered_types,
    restricted_number_type,
)


def number_type(name: str, base: type, restrictions: list[tuple[str, Any]], docstring: str) -> type:
    """The jsonargparse type for ``restrictions`` (joined by "and"): the registered one if it exists, else new.

    jsonargparse registers one type per restriction and refuses the same restriction under a second name, so
    every family takes its constrained types from here (or creates them through this function).

    Example:
        >>> number_type("MyPositive", int, [(">", 0)], "an int > 0").__name__  # already registered
        'PositiveInt'
    """
    existing = registered_types.get((tuple(sorted(restrictions)), base, "and"))
    if existing is not None:
        return existing
    return restricted_number_type(name, base, restrictions, join="and", docstring=docstring)


#: A finite float in [0, 1) (a share removed: ``pruning_ratio``).
UnitIntervalRightOpen = number_type("UnitIntervalRightOpen", float, [(">=", 0), ("<", 1)], "a float in [0, 1)")
#: A finite float in (0, 1] (a kept share: ``keep`` as a fraction, ``train_fraction``, TIES' density).
UnitIntervalLeftOpen = number_type("UnitIntervalLeftOpen", float, [(">", 0.0), ("<=", 1.0)], "a float in (0, 1]")
#: An integer >= 2 (a class count, views per image).
AtLeastTwoInt = number_type("AtLeastTwoInt", int, [(">=", 2)], "an integer >= 2")
#: A finite float >= 1 (an imbalance ratio).
NotBelowOneFloat = number_type("NotBelowOneFloat", float, [(">=", 1)], "a float >= 1")


def check_number(name: str, value: Any, *, low: Optional[float] = None, high: Optional[float] = None,
                 low_open: bool = False, high_open: bool = False, integer: bool = False,
                 error: type[Exception] = ValueError) -> Any:
    """Return ``value`` if it is a finite real number within the bounds, else raise ``error`` naming ``name``.

    Example:
        >>> check_number("temperature", float("nan"), low=0, low_open=True)
        Traceback (most recent call last):
        ...
        ValueError: temperature must be a finite number > 0, got nan.
    """
    bounds = []
    if low is not None:
        bounds.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        bounds.append(f"{'<' if high_open else '<='} {high:g}")
    what = ("an integer" if integer else "a finite number") + (" " + " and ".join(bounds) if bounds else "")
    ok = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok and integer:
        ok = float(value).is_integer()
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        raise error(f"{name} must be {what}, got {value!r}.")
    return value


def check_positive(name: str, value: Any, error: type[Exception] = ValueError) -> Any:
    """A finite number > 0."""
    return check_number(name, value, low=0, low_open=True, error=error)


def check_non_negative(name: str, value: Any, error: type[Exception] = ValueError) -> Any:
    """A finite number >= 0."""
    return check_number(name, value, low=0, error=error)


def check_fraction(name: str, value: Any, *, allow_zero: bool = True, allow_one: bool = True,
                   error: type[Exception] = ValueError) -> Any:
    """A finite number in [0, 1] (ends open as asked)."""
    return check_number(name, value, low=0, high=1, low_open=not allow_zero, high_open=not allow_one, error=error)


def check_positive_int(name: str, value: Any, error: type[Exception] = ValueError) -> Any:
    """An integer >= 1."""
    return check_number(name, value, low=1, integer=True, error=error)


def check_choice(name: str, value: Any, choices: Iterable[Any], error: type[Exception] = ValueError) -> Any:
    """``value`` if it is one of ``choices``, else one line listing them."""
    choices = list(choices)
    if value not in choices:
        raise error(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}.")
    return value


def check_finite_tensors(state: dict, where: str, error: type[Exception] = ValueError) -> dict:
    """Raise ``error`` if any floating tensor in ``state`` holds NaN or infinity (user weights, merged models)."""
    import torch

    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise error(f"{where}: tensor {key!r} holds {bad} non-finite value(s) (NaN or inf); "
                        "check the file or the run that wrote it.")
    return state
