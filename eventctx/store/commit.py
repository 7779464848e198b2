"""Group commit: appends that arrive while a commit is in flight share the next transaction.

The first caller becomes the leader: it takes every queued append, runs them one after the
other in one transaction on the store's writer connection (consecutive blind appends to one
session as a single append), commits once, hands every caller its result, and wakes them.
Each caller returns only after the transaction holding its events
has committed, so durability is that of one append per transaction, at the cost of one commit
for the whole group. An append that is refused (a version conflict, a missing or expired
session) is refused before it changes anything, so the others go on without it; a driver
error fails the whole group, and nothing of it is committed.
"""

from __future__ import annotations

import logging
import threading
from collections import ChainMap
from collections.abc import Callable, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from sqlalchemy.engine import Engine

from eventctx.errors import EventCtxError
from eventctx.events import NewEvent, RecordedEvent
from eventctx.store.dialect import Cursor, Dialect

__all__ = ["AppendRequest", "GroupCommitter", "Head"]

log = logging.getLogger("eventctx")
_HEADS_KEPT = 4096


@dataclass(frozen=True, slots=True)
class Head:
    """Where a session's log ends: its version, chain head and last event time."""

    version: int
    hash: bytes
    recorded_at_us: int


@dataclass(slots=True)
class AppendRequest:
    """One caller's append, waiting for the group it is committed in."""

    session_id: str
    events: Sequence[NewEvent]
    expected_version: int | None
    head: Head | None
    on_commit: Callable[[list[RecordedEvent]], None] | None
    result: list[RecordedEvent] | None = None
    error: BaseException | None = None
    done: bool = field(default=False)


Apply = Callable[[Cursor, AppendRequest, MutableMapping[str, Head]], list[RecordedEvent]]
"""Runs one append inside the open transaction; updates the batch's view of session heads."""


class GroupCommitter:
    """Serializes appends through one writer connection, committing them in groups."""

    def __init__(self, engine: Engine, dialect: Dialect, apply: Apply) -> None:
        self._engine = engine
        self._dialect = dialect
        self._apply = apply
        self._cv = threading.Condition()
        self._queue: list[AppendRequest] = []
        self._leading = False
        self._conn: Any = None
        self._cur: Any = None
        self._heads: dict[str, Head] = {}
        """Heads this committer last wrote, a better hint than a caller's when writers race."""

    def submit(self, request: AppendRequest) -> list[RecordedEvent]:
        """Append ``request`` (in the next group to commit) and return its recorded events."""
        with self._cv:
            self._queue.append(request)
            while self._leading and not request.done:
                self._cv.wait()
            if not request.done:
                self._leading = True
                batch, self._queue = self._queue, []
        if not request.done:
            try:
                self._commit(batch)
            finally:
                with self._cv:
                    for queued in batch:
                        queued.done = True
                    self._leading = False
                    self._cv.notify_all()
        if request.error is not None:
            raise request.error
        assert request.result is not None
        return request.result

    def close(self) -> None:
        """Wait for the group in flight and give the writer connection back."""
        with self._cv:
            self._cv.wait_for(lambda: not self._leading)
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _commit(self, batch: list[AppendRequest]) -> None:
        try:
            with self._dialect.translate_errors():
                if self._conn is None:  # the pool's connection, kept; its driver's used directly
                    self._conn = self._engine.raw_connection()
                    self._cur = self._conn.driver_connection.cursor()
                conn, cur = self._conn.driver_connection, self._cur
                try:
                    self._dialect.begin_write(cur)
                    written: dict[str, Head] = {}  # this group's, kept only if it commits
                    heads = ChainMap(written, self._heads)
                    # By session (each one's own order kept): every group, and compaction, locks
                    # head rows in the same order, so two processes never deadlock on them.
                    for unit in _units(sorted(batch, key=_session_of)):
                        self._apply_unit(cur, unit, heads)
                    conn.commit()
                    self._remember(written)
                except BaseException:
                    self._rollback(conn)
                    raise
        except BaseException as exc:  # a driver error: nothing of the group was committed
            for request in batch:
                request.result, request.error = None, request.error or exc
            return
        for request in batch:  # in commit order, before anyone is woken
            if request.result is not None and request.on_commit is not None:
                try:
                    request.on_commit(request.result)
                except Exception:
                    log.exception("after-commit callback failed; the events are committed")

    def _remember(self, written: dict[str, Head]) -> None:
        heads = self._heads
        for session_id, head in written.items():
            heads.pop(session_id, None)  # re-inserted last: the dict stays in write order
            heads[session_id] = head
        if len(heads) > _HEADS_KEPT:  # forget the least recently written half
            self._heads = dict(list(heads.items())[-_HEADS_KEPT // 2 :])

    def _apply_unit(
        self, cur: Cursor, unit: list[AppendRequest], heads: MutableMapping[str, Head]
    ) -> None:
        """Append a unit (one request, or blind appends to one session merged into one)."""
        first = unit[0]
        merged = first
        if len(unit) > 1:
            events = [event for request in unit for event in request.events]
            merged = AppendRequest(first.session_id, events, None, first.head, None)
        try:
            recorded = self._apply(cur, merged, heads)
        except EventCtxError as exc:
            # Refusals are decided before the append changes anything (driver errors are not
            # EventCtxErrors yet here), so the rest of the group goes on.
            for request in unit:
                request.error = exc
            return
        start = 0
        for request in unit:
            request.result = recorded[start : start + len(request.events)]
            start += len(request.events)

    def _rollback(self, conn: Any) -> None:
        try:
            conn.rollback()
        except Exception:
            self._conn.invalidate()  # broken: the next group opens a fresh connection
            self._conn = None


def _units(batch: list[AppendRequest]) -> list[list[AppendRequest]]:
    """Split a group into units: consecutive blind appends to one session become one append
    (one head-row update, one insert of all their events); anything else stands alone."""
    units: list[list[AppendRequest]] = []
    for request in batch:
        last = units[-1][0] if units else None
        same = last is not None and last.session_id == request.session_id
        if same and _blind(request) and _blind(last):  # type: ignore[arg-type]
            units[-1].append(request)
            continue
        units.append([request])
    return units


def _blind(request: AppendRequest) -> bool:
    """Unconditional, and neither creating nor deleting: it only adds to a live session."""
    if request.expected_version is not None:
        return False
    return all(event.type not in _LIFECYCLE for event in request.events)


_LIFECYCLE: Final = frozenset({"ContextCreated", "ContextDeleted"})


def _session_of(request: AppendRequest) -> str:
    return request.session_id
