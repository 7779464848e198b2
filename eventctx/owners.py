"""Who holds a lease: an owner id names the host and process that took it, so that a holder
that died on this host (or that this process is done with) is recognised at once instead of
waiting out its lease."""

from __future__ import annotations

import os
import socket
import uuid
from typing import Final

__all__ = ["abandon", "dead_here", "new_owner"]

_HOST: Final = socket.gethostname()
_abandoned: set[str] = set()
"""Owner ids of leases this process is done with but could not release (database down)."""


def new_owner() -> str:
    """A fresh owner id for one taking of a lease: ``host:pid:random``."""
    return f"{_HOST}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


def dead_here(owner: str) -> bool:
    """Whether a lease holder ran on this host in a process that no longer exists, or was
    abandoned by this one."""
    if owner in _abandoned:
        return True
    parts = owner.rsplit(":", 2)
    if len(parts) != 3 or parts[0] != _HOST or not parts[1].isdigit():
        return False
    try:
        os.kill(int(parts[1]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, under another user
        return False
    return False


def abandon(owner: str) -> None:
    """Note that this process is done with the lease ``owner`` took, though it could not
    release it: the next taker here takes it over at once."""
    _abandoned.add(owner)
