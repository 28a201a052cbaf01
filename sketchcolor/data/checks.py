"""Argument checks that fail with a message naming the argument and what was expected."""

from __future__ import annotations

import numbers
from typing import Callable


def check_int(name: str, value: object, minimum: int) -> None:
    """Raise ValueError unless ``value`` is an int (bools excluded) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def check_real(name: str, value: object, expected: str, condition: Callable[[float], bool]) -> None:
    """Raise ValueError ("<name> must be <expected>") unless ``value`` is a real number (bools
    excluded) that satisfies ``condition``; NaN satisfies no comparison, so it is rejected."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not condition(float(value)):
        raise ValueError(f"{name} must be {expected}, got {value!r}")
