"""Argument checks shared by the package: each returns the value converted or raises a
TypeError (wrong type) or ValueError (out of range) naming the argument."""

from __future__ import annotations

import math
import operator
from typing import Any, Optional

__all__ = ["int_arg", "real_arg", "type_arg", "check_choices", "check_bools"]


def int_arg(v, name: str, *, low: Optional[int] = 1, high: Optional[int] = None,
            optional: bool = False) -> Optional[int]:
    """``v`` as an int in [low, high] (a None bound: unbounded); None passes when ``optional``."""
    if v is None and optional:
        return None
    try:
        if isinstance(v, bool):
            raise TypeError
        v = operator.index(v)  # int and NumPy integers, not floats
    except TypeError:
        kind = "an int or None" if optional else "an int"
        raise TypeError(f"{name} must be {kind}, got {type(v).__name__}") from None
    if (low is not None and v < low) or (high is not None and v > high):
        bounds = " and ".join(f"{op} {b}" for op, b in ((">=", low), ("<=", high)) if b is not None)
        raise ValueError(f"{name} must be an int {bounds}, got {v}")
    return v


def real_arg(v, name: str, *, low: Optional[float] = 0.0, high: Optional[float] = None) -> float:
    """``v`` as a finite float in [low, high] (None: unbounded)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(v).__name__}")
    v = float(v)
    if low is None and not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    if low is not None and not (low <= v < math.inf):
        raise ValueError(f"{name} must be finite and >= {low:g}, got {v}")
    if high is not None and v > high:
        raise ValueError(f"{name} must be finite, >= {low:g} and <= {high:g}, got {v}")
    return v


def check_choices(**values: Any) -> None:
    """Each keyword is ``(value, allowed)``: the value must be a str in ``allowed``."""
    for name, (v, allowed) in values.items():
        if not isinstance(v, str):
            raise TypeError(f"{name} must be a str, got {type(v).__name__}")
        if v not in allowed:
            raise ValueError(f"{name} must be one of {list(allowed)}, got {v!r}")


def check_bools(**values: Any) -> None:
    """TypeError naming the first of ``values`` that is not a bool."""
    for name, v in values.items():
        if not isinstance(v, bool):
            raise TypeError(f"{name} must be a bool, got {type(v).__name__}")


def type_arg(v, name: str, cls, what: str, *, optional: bool = False):
    """``v`` when it is a ``cls`` (or None when ``optional``), else a TypeError: it must be ``what``."""
    if not (isinstance(v, cls) or (optional and v is None)):
        raise TypeError(f"{name} must be {what}{' or None' if optional else ''}, got {type(v).__name__}")
    return v
