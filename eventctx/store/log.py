"""EventLog: the narrow read interface of an event store, what restoring a context and the
read side (the Inspector) need. ``EventStore`` implements it;
``eventctx.testing.EventLogConformance`` is the suite another implementation runs to show it
behaves the same."""

from __future__ import annotations

from collections.abc import Collection, Iterator
from typing import Protocol

from eventctx.events import RecordedEvent
from eventctx.store.bases import Base
from eventctx.store.heads import SessionHead

__all__ = ["EventLog"]


class EventLog(Protocol):
    """Reads of the event log; none of them writes, records activity or takes a write lock."""

    def session(self, session_id: str) -> SessionHead | None:
        """The session's head row, or None if it never existed (or was purged)."""
        ...

    def sessions(self) -> list[SessionHead]:
        """Every session's head row (deleted ones included), ordered by id."""
        ...

    def base(self, session_id: str) -> Base | None:
        """The session's retention base, or None when its history is whole."""
        ...

    def read(
        self,
        session_id: str,
        from_version: int = 1,
        to_version: int | None = None,
        *,
        verify: bool = False,
    ) -> Iterator[RecordedEvent]:
        """A session's events in version order, ``from_version`` to ``to_version``, streamed;
        with ``verify``, an event whose hash does not match its contents raises
        IntegrityError (naming its session and version)."""
        ...

    def read_versions(self, session_id: str, versions: Collection[int]) -> list[RecordedEvent]:
        """A session's events at ``versions`` (those that exist), in version order."""
        ...

    def find(
        self,
        session_id: str | None = None,
        *,
        types: Collection[str] | None = None,
        key: str | None = None,
        phase: str | None = None,
        execution_id: str | None = None,
        since_us: int | None = None,
        until_us: int | None = None,
        from_version: int = 1,
        to_version: int | None = None,
    ) -> Iterator[RecordedEvent]:
        """The events matching every filter given, of one session in version order or of every
        session in position order, streamed."""
        ...

    def read_after(self, position: int, limit: int = ...) -> list[RecordedEvent]:
        """Up to ``limit`` events of every session after ``position``, in position order
        (commit order: a reader following positions never skips an event)."""
        ...

    def latest_snapshot(
        self, session_id: str, fold_version: int, max_version: int | None = None
    ) -> tuple[int, bytes, bytes] | None:
        """(version, head hash, state bytes) of the newest snapshot under ``fold_version`` at
        or below ``max_version`` whose event still has its chain hash, or None."""
        ...
