"""The wall clock, in the one unit eventctx stores: integer microseconds since the Unix epoch.

Components that need the time take a clock (a callable returning it), so that the store and
the fold never read the time by themselves and tests can move it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any, Final

from eventctx.errors import InvalidInputError

__all__ = ["MAX_DURATION", "Clock", "check_count", "check_duration", "now_us"]

MAX_DURATION: Final = timedelta(days=365 * 1000)
"""The longest duration eventctx accepts (a ttl of 1,000 years is "for ever" in practice;
times stay within the range of a datetime and of 64-bit microseconds)."""

Clock = Callable[[], int]
"""Returns the current time in microseconds since the Unix epoch, UTC."""


def now_us() -> int:
    """The wall clock in microseconds since the Unix epoch."""
    return time.time_ns() // 1000


def check_duration(
    value: Any,
    name: str,
    *,
    minimum: timedelta = timedelta(0),
    maximum: timedelta = MAX_DURATION,
) -> timedelta:
    """``value`` if it is a timedelta above ``minimum`` and at most ``maximum``, else
    InvalidInputError naming the argument."""
    if not isinstance(value, timedelta):
        raise InvalidInputError(
            f"{name} must be a datetime.timedelta, not {type(value).__name__} {value!r}"
        )
    if not minimum < value <= maximum:
        raise InvalidInputError(
            f"{name} must be more than {minimum} and at most {maximum}, not {value}"
        )
    return value


def check_count(value: Any, name: str, *, minimum: int = 1) -> int:
    """``value`` if it is an int of at least ``minimum``, else InvalidInputError."""
    if type(value) is not int or value < minimum:
        raise InvalidInputError(f"{name} must be an int of at least {minimum}, not {value!r}")
    return value
