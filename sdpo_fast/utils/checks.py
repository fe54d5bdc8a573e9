"""Argument checks that raise ValueError naming the argument."""
from __future__ import annotations

import math


def check_int(name: str, value, minimum: int | None = None, *, optional: bool = False) -> None:
    """`value` is an int (not a bool) >= minimum; None passes when optional."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise ValueError(f"{name} must be an integer{bound}, got {value!r}")


def is_finite_number(value) -> bool:
    """Whether `value` is an int or float (not a bool) that is finite as a float (an int too large for one is not)."""
    try:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    except OverflowError:
        return False


def check_number(name: str, value, *, positive: bool = False, optional: bool = False, what: str | None = None) -> None:
    """`value` is a finite real number >= 0 (> 0 when positive); None passes when optional."""
    if optional and value is None:
        return
    if not is_finite_number(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be {what or 'a finite number ' + ('> 0' if positive else '>= 0')}, "
                         f"got {value!r}")


def check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")


def check_choice(name: str, value, options) -> None:
    if value not in options:
        raise ValueError(f"{name} must be one of {list(options)}, got {value!r}")
