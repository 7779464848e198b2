"""Who holds a lease: an owner id names the host and process that took it, so that a holder
that died on this host is recognised at once instead of waiting out its lease."""

from __future__ import annotations

import os
import socket
import uuid
from typing import Final

__all__ = ["dead_here", "new_owner"]

_HOST: Final = socket.gethostname()


def new_owner() -> str:
    """A fresh owner id for one taking of a lease: ``host:pid:random``."""
    return f"{_HOST}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


def dead_here(owner: str) -> bool:
    """Whether a lease holder ran on this host in a process that no longer exists."""
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
