"""The session head row as the store reports it: statuses, the expiry rule, session ids.

The expiry rule lives here once, for Python (``expired_at``) and for SQL (``alive_at``), so
that what the store refuses, what compaction removes and what the manager reports agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final, NamedTuple

import sqlalchemy as sa

from eventctx.errors import InvalidInputError
from eventctx.events import from_us
from eventctx.store import schema

__all__ = [
    "ACTIVE",
    "DELETED",
    "EXPIRED",
    "EXPIRING",
    "Fence",
    "Head",
    "LeaseHolder",
    "SessionHead",
    "alive_at",
    "check_session_id",
    "check_text",
    "expired_at",
]

ACTIVE: Final = "active"
DELETED: Final = "deleted"
EXPIRING: Final = "expiring"
"""Head-row status while compaction removes an expired session's rows."""
EXPIRED: Final = "expired"
"""Not stored: an active session past its ttl, as a locked head read reports it."""


def expired_at(
    last_activity_us: int, ttl_ms: int | None, now_us: int, lease_until_us: int | None = None
) -> bool:
    """The expiry rule: a session with a ttl expires once it has been idle for longer; a live
    run lease is activity, so a session being run never expires."""
    if ttl_ms is None or (lease_until_us is not None and lease_until_us >= now_us):
        return False
    return last_activity_us + ttl_ms * 1000 < now_us


def alive_at(now: sa.BindParameter[int]) -> sa.ColumnElement[bool]:
    """The expiry rule in SQL: the head row has not outlived its ttl at ``now``, or a run
    holds a live lease on it."""
    se = schema.sessions
    thousand = sa.literal_column("1000", sa.BigInteger)
    return sa.or_(
        se.c.ttl_ms.is_(None),
        se.c.last_activity + se.c.ttl_ms * thousand >= now,
        # Not just ``>= now``: NULL (no lease) would make the whole test NULL, not false.
        sa.and_(se.c.lease_expires_at.is_not(None), se.c.lease_expires_at >= now),
    )


class Head(NamedTuple):
    """Where a session's log ends: its version, chain head and last event time (a tuple:
    every append makes one or two)."""

    version: int
    hash: bytes
    recorded_at_us: int


class Fence(NamedTuple):
    """A run lease as its holder took it. An append that carries one is refused (with
    RunInProgressError) unless the session's lease is still exactly this one: the check is in
    the statement that moves the head, so a runner that lost its lease writes nothing more."""

    owner: str
    token: int
    """Incremented each time the lease changes hands."""


class LeaseHolder(NamedTuple):
    """Who holds a session's run lease, and until when."""

    owner: str
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class SessionHead:
    """A session's head row."""

    session_id: str
    version: int
    head_hash: bytes
    created_at_us: int
    last_activity_us: int
    ttl_ms: int | None
    status: str
    lease_until_us: int | None = None
    """Until when a run holds the session's lease (None: no run holds it)."""

    @classmethod
    def from_row(cls, row: Any) -> SessionHead:
        """From a row of the store's session columns."""
        session_id, version, head_hash, created_at, last_activity, ttl_ms, status, lease = row
        return cls(
            session_id,
            int(version),
            bytes(head_hash),
            int(created_at),
            int(last_activity),
            None if ttl_ms is None else int(ttl_ms),
            str(status),
            None if lease is None else int(lease),
        )

    @property
    def live(self) -> bool:
        """Whether the session exists for readers and writers (not deleted, not being removed;
        it may still have outlived its ttl: see ``expired``)."""
        return self.status == ACTIVE

    @property
    def created_at(self) -> datetime:
        """When the session was (last) created, UTC."""
        return from_us(self.created_at_us)

    @property
    def last_activity(self) -> datetime:
        """When the session was last written or opened, UTC."""
        return from_us(self.last_activity_us)

    @property
    def ttl(self) -> timedelta | None:
        """How long the session lives without activity; None for ever."""
        return None if self.ttl_ms is None else timedelta(milliseconds=self.ttl_ms)

    def expired(self, now_us: int) -> bool:
        """Whether the session outlived its ttl at ``now_us`` (microseconds since the epoch)."""
        return expired_at(self.last_activity_us, self.ttl_ms, now_us, self.lease_until_us)

    @property
    def expires_at(self) -> datetime | None:
        """When the session expires unless it is used again."""
        ttl = self.ttl
        return None if ttl is None else self.last_activity + ttl


def check_text(text: str, what: str) -> str:
    """``text`` if every database can store it (no NUL, valid unicode), else InvalidInputError."""
    if "\x00" in text:
        raise InvalidInputError(f"{what} {text!r} contains NUL, which a database cannot store")
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidInputError(f"{what} {text!r} is not valid unicode text: {exc}") from None
    return text


def check_session_id(session_id: object) -> str:
    """Return ``session_id`` if it is a valid id, else raise InvalidInputError."""
    if type(session_id) is not str:
        raise InvalidInputError(f"session id must be a str, not {type(session_id).__name__}")
    if not session_id or len(session_id) > schema.MAX_SESSION_ID:
        raise InvalidInputError(
            f"session id must be 1 to {schema.MAX_SESSION_ID} characters without NUL "
            f"(got {len(session_id)} characters)"
        )
    return check_text(session_id, "session id")
