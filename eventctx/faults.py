"""Named fault points for the crash suite: ``EVENTCTX_FAULT=<name>`` (or ``<name>@<n>``) makes
the process kill itself (SIGKILL) the first (or n-th) time it reaches that point, so tests can
die exactly where a real crash would hurt most. Unset (always, outside tests), a point costs
one comparison."""

from __future__ import annotations

import os
import signal
from typing import Final

__all__ = ["POINTS", "point"]

POINTS: Final = (
    "append.before_commit",
    "append.after_commit",
    "snapshot.before_save",
    "compaction.mid_session",
    "retention.base_moved",
    "run.after_phase_started",
    "run.before_phase_end",
)
"""Every fault point, in the order a write meets them."""

_SPEC: Final = os.environ.get("EVENTCTX_FAULT") or ""
_ARMED: Final = _SPEC.partition("@")[0] or None
_left = [int(_SPEC.partition("@")[2] or 1)]


def point(name: str) -> None:
    """Die here, at once and without cleanup, if ``EVENTCTX_FAULT`` names this point (and
    this is the n-th time it is reached)."""
    if _ARMED is not None and name == _ARMED:
        _left[0] -= 1
        if _left[0] <= 0:
            os.kill(os.getpid(), signal.SIGKILL)
