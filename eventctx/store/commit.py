"""Group commit: appends that arrive while a commit is in flight share the next transaction.

The first caller becomes the leader: it takes every queued append, moves each session's head
row in one transaction on the store's writer connection (consecutive blind appends to one
session as a single append), inserts all their events at once, commits, hands every caller its
result, and wakes them. Each caller returns only after the transaction holding its events has
committed, so durability is that of one append per transaction, at the cost of one commit for
the whole group.

Callers never harm each other. An append that is refused (a version conflict, a missing or
expired session, a lost run lease) is refused before it changes anything, so the others go on
without it. A head row that another transaction holds locked is not waited for in the group:
that caller appends alone, in its own transaction, waiting for the row up to the busy timeout.
The leader runs no caller's code: it only puts each result in its caller's inbox, in commit
order, and the callers fold their own results after they wake.
"""

from __future__ import annotations

import copy
import threading
from collections import ChainMap, deque
from collections.abc import Callable, Iterator, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from sqlalchemy.engine import Engine

from eventctx import faults
from eventctx.errors import EventCtxError, OutcomeUnknownError, StorageError
from eventctx.events import NewEvent, RecordedEvent
from eventctx.store.dialect import TRIES_AFTER_DROP, Cursor, Dialect, Transaction
from eventctx.store.heads import Fence, Head

__all__ = ["AppendRequest", "GroupCommitter", "Inbox", "RowLockedError"]

_HEADS_KEPT = 4096


Inbox = deque[list[RecordedEvent]]
"""Where the committer puts a caller's recorded events, in commit order."""


@dataclass(slots=True)
class AppendRequest:
    """One caller's append, waiting for the group it is committed in."""

    session_id: str
    events: Sequence[NewEvent]
    expected_version: int | None = None
    head: Head | None = None
    inbox: Inbox | None = None
    fence: Fence | None = None
    result: list[RecordedEvent] | None = None
    error: BaseException | None = None
    alone: bool = False
    """Its head row was locked by another transaction: the caller appends by itself."""
    done: bool = field(default=False)


class RowLockedError(Exception):
    """Raised (inside the committer only) when a head row is locked by another transaction."""


@dataclass(slots=True)
class Staged:
    """An append whose head row has moved, with the event rows still to insert."""

    rows: list[dict[str, Any]]
    requests: list[AppendRequest]


Stage = Callable[[Cursor, AppendRequest, MutableMapping[str, Head], bool], list[dict[str, Any]]]
"""Moves one append's head row inside the open transaction and returns its event rows
(``wait``: whether to wait for a head row another transaction holds, else RowLockedError)."""
Insert = Callable[[Cursor, list[dict[str, Any]]], list[int]]
"""Inserts event rows (staged by ``Stage``) and returns their positions, in order."""


class GroupCommitter:
    """Serializes appends through one writer connection, committing them in groups."""

    def __init__(
        self,
        engine: Engine,
        dialect: Dialect,
        stage: Stage,
        insert: Insert,
        transaction: Transaction,
        stored_hash: Callable[[str, int], bytes | None],
    ) -> None:
        self._engine = engine
        self._dialect = dialect
        self._stage = stage
        self._insert = insert
        self._transaction = transaction
        self._stored_hash = stored_hash
        """The chain hash stored at (session_id, version): how a failed COMMIT is checked."""
        self._mutex = threading.Lock()
        self._cv = threading.Condition(self._mutex)
        self._waiting = 0
        """Threads waiting on ``_cv``: a group only wakes anyone when some are."""
        self._queue: list[AppendRequest] = []
        self._leading = False
        self._conn: Any = None
        self._cur: Any = None
        self._heads: dict[str, Head] = {}
        """Heads this committer last wrote, a better hint than a caller's when writers race."""

    def submit(self, request: AppendRequest) -> list[RecordedEvent]:
        """Append ``request`` (in the next group to commit) and return its recorded events."""
        with self._mutex:
            if not self._leading and not self._queue:  # nothing else in flight: lead alone
                self._leading = True
                batch = [request]
            else:
                self._queue.append(request)
                self._waiting += 1
                while self._leading and not request.done:
                    self._cv.wait()
                self._waiting -= 1
                if not request.done:
                    self._leading = True
                    batch, self._queue = self._queue, []
        if not request.done:
            try:
                if len(batch) == 1:
                    self._commit_one(request)
                else:
                    self._commit(batch)
            finally:
                with self._mutex:
                    for queued in batch:
                        queued.done = True
                    self._leading = False
                    if self._waiting:
                        self._cv.notify_all()
        if request.alone:
            return self._append_alone(request)
        if request.error is not None:
            raise request.error
        assert request.result is not None
        return request.result

    def after_fork(self) -> None:
        """In a forked child: forget the parent's writer connection (never touching it) and
        any group the parent had in flight."""
        self._mutex = threading.Lock()
        self._cv = threading.Condition(self._mutex)
        self._waiting = 0
        self._queue, self._leading = [], False
        self._conn = self._cur = None
        self._heads = {}

    def close(self) -> None:
        """Wait for the group in flight and give the writer connection back."""
        with self._cv:
            self._waiting += 1
            self._cv.wait_for(lambda: not self._leading)
            self._waiting -= 1
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _commit(self, batch: list[AppendRequest]) -> None:
        committing = False
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
                    staged = [
                        s
                        for unit in _units(sorted(batch, key=_session_of))
                        if (s := self._stage_unit(cur, unit, heads)) is not None
                    ]
                    if staged:
                        self._insert_staged(cur, staged)
                    committing = True
                    faults.point("append.before_commit")
                    conn.commit()
                    faults.point("append.after_commit")
                    self._remember(written)
                except BaseException:
                    self._rollback(conn)
                    raise
        except BaseException as exc:
            members = [r for r in batch if not r.alone and r.error is None]
            if committing and isinstance(exc, Exception):
                # The COMMIT itself failed: it may have happened all the same. Look.
                committed = self._resolve(members, exc)
                if committed is None:
                    return
                if committed:
                    self._deliver(batch)
                    return
                # It did not: nothing of the group was committed, as for any earlier failure.
            retry_alone = isinstance(exc, Exception)
            for request in members:
                request.result = None
                if retry_alone:
                    # Nothing was committed. One member's bad row may have failed them all, or
                    # the writer connection was dropped: each appends alone, on a checked pooled
                    # connection, and fails (or not) on its own, harming no other.
                    request.alone = True
                else:
                    request.error = _own_copy(exc)
            return
        self._deliver(batch)

    def _commit_one(self, request: AppendRequest) -> None:
        """``_commit`` for a group of one: the same transaction and outcomes, without sorting,
        merging or mapping a group."""
        committing = False
        try:
            with self._dialect.translate_errors():
                if self._conn is None:
                    self._conn = self._engine.raw_connection()
                    self._cur = self._conn.driver_connection.cursor()
                conn, cur = self._conn.driver_connection, self._cur
                try:
                    self._dialect.begin_write(cur)
                    session_id = request.session_id
                    hint = self._heads.get(session_id)
                    written = {} if hint is None else {session_id: hint}
                    rows: list[dict[str, Any]] | None = None
                    try:
                        rows = self._stage(cur, request, written, False)
                    except RowLockedError:
                        request.alone = True
                    except EventCtxError as exc:
                        request.error = exc
                    if rows is not None:
                        positions = self._insert(cur, rows)
                        request.result = _recorded(iter(positions), iter(rows), request.events)
                    committing = True
                    faults.point("append.before_commit")
                    conn.commit()
                    faults.point("append.after_commit")
                    if rows is not None:
                        self._remember(written)
                except BaseException:
                    self._rollback(conn)
                    raise
        except BaseException as exc:
            if request.alone or request.error is not None:
                return
            if committing and isinstance(exc, Exception):
                committed = self._resolve([request], exc)
                if committed is None:
                    return
                if committed:
                    if request.inbox is not None:
                        request.inbox.append(request.result)  # type: ignore[arg-type]
                    return
            request.result = None
            if isinstance(exc, Exception):
                request.alone = True
            else:
                request.error = _own_copy(exc)
            return
        if request.result is not None and request.inbox is not None:
            request.inbox.append(request.result)

    @staticmethod
    def _deliver(batch: list[AppendRequest]) -> None:
        for request in batch:  # in commit order, before anyone is woken
            if request.result is not None and request.inbox is not None:
                request.inbox.append(request.result)

    def _resolve(self, members: list[AppendRequest], failure: Exception) -> bool | None:
        """After a failed COMMIT, whether the group's events are in the database: the last
        event each member meant to append is there with its chain hash, or not. None when it
        cannot be known (every member then gets OutcomeUnknownError)."""
        expected = [r.result[-1] for r in members if r.result]
        try:
            found = [self._stored_hash(e.session_id, e.version) == e.hash for e in expected]
        except Exception as exc:
            for request in members:
                request.result = None
                request.error = OutcomeUnknownError(
                    f"the database connection failed while committing ({failure}) and the "
                    f"outcome could not be checked ({exc}): the write may or may not be stored; "
                    "read the session before writing it again"
                )
                request.error.__cause__ = failure
            return None
        return bool(found) and all(found)

    def _stage_unit(
        self, cur: Cursor, unit: list[AppendRequest], heads: MutableMapping[str, Head]
    ) -> Staged | None:
        """Move the head of a unit (one request, or blind appends to one session merged)."""
        first = unit[0]
        merged = first
        if len(unit) > 1:
            events = [event for request in unit for event in request.events]
            merged = AppendRequest(first.session_id, events, None, first.head, fence=first.fence)
        try:
            return Staged(self._stage(cur, merged, heads, False), unit)
        except RowLockedError:  # held by another transaction: don't make the group wait for it
            for request in unit:
                request.alone = True
        except EventCtxError as exc:
            # Refusals are decided before the append changes anything (driver errors are not
            # EventCtxErrors yet here), so the rest of the group goes on.
            for request in unit:
                request.error = _own_copy(exc) if len(unit) > 1 else exc
        return None

    def _insert_staged(self, cur: Cursor, staged: list[Staged]) -> None:
        rows = [row for s in staged for row in s.rows]
        positions = iter(self._insert(cur, rows))
        rows_in_order = iter(rows)
        for s in staged:
            for request in s.requests:
                request.result = _recorded(positions, rows_in_order, request.events)

    def _append_alone(self, request: AppendRequest) -> list[RecordedEvent]:
        """Append in a transaction of its own that waits for the head row (busy timeout). One
        the server dropped the connection of, known not committed, is made again."""
        for tries in range(1, TRIES_AFTER_DROP + 1):
            last = tries == TRIES_AFTER_DROP
            try:
                return self._try_alone(request)
            except StorageError as exc:
                if last or isinstance(exc, OutcomeUnknownError) or not self._dialect.dropped(exc):
                    raise
        raise AssertionError("unreachable")

    def _try_alone(self, request: AppendRequest) -> list[RecordedEvent]:
        rows: list[dict[str, Any]] = []
        positions: list[int] = []
        try:
            with self._transaction(write=True) as cur:
                staged = self._stage(cur, request, {}, True)
                positions = self._insert(cur, staged)
                rows = staged
        except Exception as exc:
            if not rows:
                raise
            # Everything but the COMMIT succeeded: it may have happened all the same. Look.
            request.result = _recorded(iter(positions), iter(rows), request.events)
            committed = self._resolve([request], exc)
            if committed is None:
                raise request.error from exc  # type: ignore[misc]
            if not committed:
                raise
        recorded = _recorded(iter(positions), iter(rows), request.events)
        if request.inbox is not None:
            request.inbox.append(recorded)
        return recorded

    def _remember(self, written: dict[str, Head]) -> None:
        heads = self._heads
        for session_id, head in written.items():
            heads.pop(session_id, None)  # re-inserted last: the dict stays in write order
            heads[session_id] = head
        if len(heads) > _HEADS_KEPT:  # forget the least recently written half
            self._heads = dict(list(heads.items())[-_HEADS_KEPT // 2 :])

    def _rollback(self, conn: Any) -> None:
        try:
            conn.rollback()
        except Exception:
            self._conn.invalidate()  # broken: the next group opens a fresh connection
            self._conn = None


def _recorded(
    positions: Iterator[int], rows: Iterator[dict[str, Any]], events: Sequence[NewEvent]
) -> list[RecordedEvent]:
    """``events`` as recorded, from the next of the inserted ``rows`` and their positions."""
    make = tuple.__new__
    return [
        make(
            RecordedEvent,
            (
                next(positions),
                row["session_id"],
                row["version"],
                event.type,
                event.key,
                event.phase,
                event.execution_id,
                event.payload,
                row["recorded_at"],
                row["hash"],
                row["prev_hash"],
            ),
        )
        for event in events
        for row in (next(rows),)
    ]


def _own_copy(exc: BaseException) -> BaseException:
    """An exception of the same type and message for one member of a group, so that no two
    threads raise (and so rewrite the traceback of) one exception object."""
    twin = copy.copy(exc)
    twin.__cause__, twin.__traceback__ = exc, None
    return twin


def _units(batch: list[AppendRequest]) -> list[list[AppendRequest]]:
    """Split a group into units: consecutive blind appends to one session under the same
    fence become one append (one head-row update, one insert of all their events); anything
    else stands alone."""
    units: list[list[AppendRequest]] = []
    for request in batch:
        last = units[-1][0] if units else None
        same = (
            last is not None
            and last.session_id == request.session_id
            and last.fence == request.fence
        )
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
