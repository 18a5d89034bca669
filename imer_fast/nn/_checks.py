"""Constructor argument checks shared by the nn modules: a bad size is named when the module is built,
not met later as a shape error, a ZeroDivisionError or a silently empty network."""
from __future__ import annotations

import numbers


def require_ints(who: str, minimum: int, **values) -> None:
    """Each value an int (not a bool) >= ``minimum``."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
            raise ValueError(f"{who}: {name} must be an int >= {minimum}; got {value!r}")


def require_positive(who: str, **values) -> None:
    """Each value a real number > 0 (not a bool)."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
            raise ValueError(f"{who}: {name} must be a number > 0; got {value!r}")
