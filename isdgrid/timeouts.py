"""check_timeout: the one check of every ``timeout`` argument the grid takes."""

from __future__ import annotations

import math
import numbers

__all__ = ["check_timeout"]


def check_timeout(value: object, what: str) -> float | None:
    """``value`` as seconds to wait: a number >= 0, or None for no limit.

    ``math.inf`` also means no limit (returned as None: the standard library's waits
    refuse an infinite timeout). Raises ``TypeError`` at once for anything that is not a
    real number (a string, a bool) and ``ValueError`` for NaN or a negative number, naming
    ``what`` took it (e.g. ``"acquire_service"``).
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what}: timeout must be a number of seconds >= 0 or None, not {value!r}")
    seconds = float(value)
    if math.isnan(seconds) or seconds < 0:
        raise ValueError(f"{what}: timeout must be a number of seconds >= 0 or None, not {value!r}")
    return None if math.isinf(seconds) else seconds
