"""Constructor argument checks shared by the nn modules: a bad size is named when the module is built,
not met later as a shape error, a ZeroDivisionError or a silently empty network."""
from __future__ import annotations

import numbers
from typing import Optional


def as_int(label: str, value, minimum: Optional[int] = None) -> int:
    """``value`` as a Python int (>= ``minimum`` unless None, when the caller names the range): ints and
    numpy integers, never bools or floats (a float count is a mistake to name, not to round)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or (minimum is not None
                                                                              and value < minimum):
        if minimum is None:
            raise ValueError(f"{label} must be an int; got {type(value).__name__} {value!r}")
        raise ValueError(f"{label} must be an int >= {minimum}; got {value!r}")
    return int(value)


def require_ints(who: str, minimum: int, **values) -> None:
    """Each value an int (not a bool) >= ``minimum``."""
    for name, value in values.items():
        as_int(f"{who}: {name}", value, minimum)


def require_positive(who: str, **values) -> None:
    """Each value a real number > 0 (not a bool)."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
            raise ValueError(f"{who}: {name} must be a number > 0; got {value!r}")
