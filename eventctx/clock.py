"""The wall clock, in the one unit eventctx stores: integer microseconds since the Unix epoch.

Components that need the time take a clock (a callable returning it), so that the store and
the fold never read the time by themselves and tests can move it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["Clock", "now_us"]

Clock = Callable[[], int]
"""Returns the current time in microseconds since the Unix epoch, UTC."""


def now_us() -> int:
    """The wall clock in microseconds since the Unix epoch."""
    return time.time_ns() // 1000
