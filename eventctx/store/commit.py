"""Group commit: appends that arrive while a commit is in flight share the next transaction.

The first caller becomes the leader: it takes every queued append, runs each inside its own
savepoint (so one refused append does not undo the others) in one transaction on the store's
writer connection, commits once, hands every caller its result, and wakes them. Each caller
returns only after the transaction holding its events has committed, so durability is that of
one append per transaction, at the cost of one commit for the whole group. Alone, an append
runs without a savepoint: one transaction, three statements.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.engine import Engine

from eventctx.errors import EventCtxError
from eventctx.events import NewEvent, RecordedEvent
from eventctx.store.dialect import Cursor, Dialect

__all__ = ["AppendRequest", "GroupCommitter", "Head"]

log = logging.getLogger("eventctx")


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


Apply = Callable[[Cursor, AppendRequest, dict[str, Head]], list[RecordedEvent]]
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
        single = len(batch) == 1
        try:
            with self._dialect.translate_errors():
                conn = self._conn or self._engine.raw_connection()
                self._conn = conn
                cur = conn.cursor()
                try:
                    self._dialect.begin_write(cur)
                    heads: dict[str, Head] = {}
                    for request in batch:
                        if single:
                            request.result = self._apply(cur, request, heads)
                        else:
                            self._apply_in_savepoint(cur, request, heads)
                    conn.commit()
                except BaseException:
                    self._rollback(conn)
                    raise
        except BaseException as exc:  # nothing of the group was committed
            for request in batch:
                request.result, request.error = None, request.error or exc
            return
        for request in batch:  # in commit order, before anyone is woken
            if request.result is not None and request.on_commit is not None:
                try:
                    request.on_commit(request.result)
                except Exception:
                    log.exception("after-commit callback failed; the events are committed")

    def _apply_in_savepoint(
        self, cur: Cursor, request: AppendRequest, heads: dict[str, Head]
    ) -> None:
        cur.execute("SAVEPOINT eventctx_append")
        try:
            with self._dialect.translate_errors():
                request.result = self._apply(cur, request, heads)
        except EventCtxError as exc:
            cur.execute("ROLLBACK TO SAVEPOINT eventctx_append")
            request.error = exc
        cur.execute("RELEASE SAVEPOINT eventctx_append")

    def _rollback(self, conn: Any) -> None:
        try:
            conn.rollback()
        except Exception:
            conn.invalidate()  # broken: the next group opens a fresh connection
            self._conn = None
