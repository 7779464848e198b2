"""Group commit: appends that arrive while a commit is in flight share the next transaction.

The first caller becomes the leader: it takes every queued append, moves each session's head
row in one transaction on the store's writer connection (consecutive blind appends to one
session as a single append), inserts all their events at once, commits, hands every caller its
result, and wakes them; the first caller that queued meanwhile leads the next group. Only it
and the group's callers are woken (each wake-up is a thread switch). Each caller returns only
after the transaction holding its events has committed, so durability is that of one append
per transaction, at the cost of one commit for the whole group.

Where the backend can move a head row and insert in one statement (PostgreSQL), an append
whose head the committer believes it knows is that statement: alone, in autocommit, one round
trip; in a group, the statements and the COMMIT are sent together. A statement whose head was
not as believed changes nothing, and its append is made the usual way (alone, for a group's).

Callers never harm each other. An append that is refused (a version conflict, a missing or
expired session, a lost run lease) is refused before it changes anything, so the others go on
without it. A head row that another transaction holds locked is not waited for in the group:
that caller appends alone, in its own transaction, waiting for the row up to the busy timeout.
The leader runs no caller's code: it only puts each result in its caller's inbox, in commit
order, and the callers fold their own results after they wake.
"""

from __future__ import annotations

import copy
import itertools
import threading
import time
from collections import ChainMap, deque
from collections.abc import Callable, Collection, Iterator, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple

from sqlalchemy.engine import Engine

from eventctx import faults
from eventctx.errors import EventCtxError, OutcomeUnknownError, StorageError
from eventctx.events import NewEvent, RecordedEvent
from eventctx.store.dialect import TRIES_AFTER_DROP, Cursor, Dialect, Transaction
from eventctx.store.heads import Fence, Head
from eventctx.store.statements import EventRow

__all__ = ["AppendRequest", "GroupCommitter", "InOne", "Inbox", "RowLockedError", "head_after"]

_HEADS_KEPT = 4096
_UNKNOWN: Final = itertools.repeat(0)
"""The position of an event whose statement's answer was lost (until it is read back)."""


Inbox = deque[list[RecordedEvent]]
"""Where the committer puts a caller's recorded events, in commit order."""


@dataclass(slots=True, eq=False)
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
    wake: Any = None
    """Released when the append is done, or when its caller is to lead the next group."""
    leads: bool = False
    alone: bool = False
    """Its head row was locked by another transaction: the caller appends by itself."""
    done: bool = field(default=False)


class RowLockedError(Exception):
    """Raised (inside the committer only) when a head row is locked by another transaction."""


@dataclass(slots=True)
class Staged:
    """An append whose head row has moved, with the event rows still to insert."""

    rows: list[EventRow]
    requests: list[AppendRequest]


Stage = Callable[[Cursor, AppendRequest, MutableMapping[str, Head], bool], list[EventRow]]
"""Moves one append's head row inside the open transaction and returns its event rows
(``wait``: whether to wait for a head row another transaction holds, else RowLockedError)."""
Insert = Callable[[Cursor, list[EventRow]], list[int]]
"""Inserts event rows (staged by ``Stage``) and returns their positions, in order."""


class InOne(NamedTuple):
    """An append as one statement: its SQL, parameters and the event rows it inserts (the
    statement returns each one's version and position, or no row if the head was not as
    believed, in which case it changed nothing)."""

    sql: str
    params: dict[str, Any]
    rows: list[EventRow]


Prepare = Callable[[AppendRequest, "Head | None"], InOne | None]
"""The one statement of an append on top of a believed head, where there is one."""


class GroupCommitter:
    """Serializes appends through one writer connection, committing them in groups."""

    def __init__(
        self,
        engine: Engine,
        dialect: Dialect,
        stage: Stage,
        insert: Insert,
        transaction: Transaction,
        stored: Callable[[str, Collection[int]], list[RecordedEvent]],
        prepare: Prepare | None,
        end_backend: Callable[[int], None],
    ) -> None:
        self._engine = engine
        self._dialect = dialect
        self._translating = dialect.translate_errors()
        self._stage = stage
        self._insert = insert
        self._transaction = transaction
        self._stored = stored
        """A session's events at some versions: how a failed COMMIT is checked."""
        self._prepare = prepare
        """Where the backend has one, the one statement of an append (else None)."""
        self._end_backend = end_backend
        """Ends a server process of ours and waits until it has (else raises)."""
        self._mutex = threading.Lock()
        self._cv = threading.Condition(self._mutex)
        self._closing = 0
        """Threads in ``close``, waiting on ``_cv`` for the group in flight."""
        self._queue: list[AppendRequest] = []
        self._last_group = 1
        """Appends in the last group committed."""
        self._leading = False
        self._conn: Any = None
        self._driver: Any = None
        """The driver's own connection under ``_conn`` (valid while ``_conn`` is set)."""
        self._cur: Any = None
        self._pid: int | None = None
        """The server process of the writer connection, where there is one."""
        self._heads: dict[str, Head] = {}
        """Heads this committer last wrote, a better hint than a caller's when writers race."""

    def submit(self, request: AppendRequest) -> list[RecordedEvent]:
        """Append ``request`` (in the next group to commit) and return its recorded events."""
        with self._mutex:
            if self._leading:
                request.wake = wake = threading.Lock()
                wake.acquire()
                self._queue.append(request)
            else:
                self._leading = True
                wake = None
        if wake is not None:
            try:
                wake.acquire()  # released once committed, or to lead the next group
            except BaseException:  # interrupted while waiting: withdraw, if not taken yet
                self._withdraw(request)
                raise
        if not request.done:  # this caller leads: whatever happens, it hands the lead over
            batch = [request]
            try:
                if wake is not None or self._last_group > 1:
                    self._gather(batch, designated=wake is not None)
                if len(batch) == 1:
                    self._commit_one(request)
                else:
                    self._commit(batch)
            finally:
                self._hand_over(batch, request)
        if request.alone:
            return self._append_alone(request)
        if request.error is not None:
            raise request.error
        assert request.result is not None
        return request.result

    def _gather(self, batch: list[AppendRequest], designated: bool) -> None:
        """Add the queued appends to the leader's ``batch``. A leader that found no one
        queued (called only after a group of several) first gives the other writers a moment
        to join: it gives up the GIL once. A writer that runs alone never waits."""
        if not designated:
            time.sleep(0)
        with self._mutex:
            batch += [queued for queued in self._queue if queued is not batch[0]]
            self._queue = []

    def _hand_over(self, batch: list[AppendRequest], leader: AppendRequest) -> None:
        """After a group: the first queued caller leads the next one (woken first, and alone:
        the others wait on), then the group's callers are woken. One the group never got to
        (its leader was interrupted first) appends alone."""
        with self._mutex:
            for queued in batch:
                if queued.result is None and queued.error is None:
                    queued.alone = True
                queued.done = True
            successor = self._next_leader()
            self._last_group = len(batch)
        if successor is not None:
            successor.wake.release()
        for queued in batch:
            if queued is not leader:
                queued.wake.release()

    def _next_leader(self) -> AppendRequest | None:
        """The queued caller to lead next (under the mutex), or None: no one leads."""
        if self._queue:
            self._queue = [queued for queued in self._queue if not queued.done]
        if self._queue:
            successor = self._queue[0]
            successor.leads = True
            return successor
        self._leading = False
        if self._closing:
            self._cv.notify_all()
        return None

    def _withdraw(self, request: AppendRequest) -> None:
        """Take back the append of a caller interrupted while it waited, unless a group has
        taken it; one chosen to lead passes that on."""
        with self._mutex:
            if not any(queued is request for queued in self._queue):
                return  # taken by a group: it commits (or not) without its caller
            self._queue = [queued for queued in self._queue if queued is not request]
            successor = self._next_leader() if request.leads else None
        if successor is not None:
            successor.wake.release()

    def after_fork(self) -> None:
        """In a forked child: forget the parent's writer connection (never touching it) and
        any group the parent had in flight."""
        self._mutex = threading.Lock()
        self._cv = threading.Condition(self._mutex)
        self._closing = 0
        self._queue, self._leading, self._last_group = [], False, 1
        self._conn = self._driver = self._cur = self._pid = None
        self._heads = {}

    def close(self) -> None:
        """Wait for the group in flight and give the writer connection back."""
        with self._cv:
            self._closing += 1
            self._cv.wait_for(lambda: not self._leading)
            self._closing -= 1
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _commit(self, batch: list[AppendRequest]) -> None:
        committing = False
        try:
            with self._translating:
                conn, cur = self._writer()
                try:
                    self._dialect.begin_write(cur)
                    written: dict[str, Head] = {}  # this group's, kept only if it commits
                    heads = ChainMap(written, self._heads)
                    # By session (each one's own order kept): every group, and compaction, locks
                    # head rows in the same order, so two processes never deadlock on them.
                    units = _units(sorted(batch, key=_session_of))
                    in_one: list[tuple[list[AppendRequest], InOne]] = []
                    if self._prepare is not None:
                        in_one, units = self._in_one(self._prepare, units, written)
                    staged = [
                        s for unit in units if (s := self._stage_unit(cur, unit, heads)) is not None
                    ]
                    if staged:
                        self._insert_staged(cur, staged)
                    committing = True
                    faults.point("append.before_commit")
                    if in_one:
                        found = self._dialect.commit_with(conn, [one[:2] for _, one in in_one])
                    else:
                        self._dialect.commit(conn, cur)
                    faults.point("append.after_commit")
                    if in_one:
                        self._take_answers(in_one, found, written)
                    self._remember(written)
                except BaseException:
                    self._rollback(conn)
                    raise
        except BaseException as exc:
            members = [r for r in batch if not r.alone and r.error is None]
            if committing and isinstance(exc, Exception):
                # The COMMIT itself failed: it may have happened all the same. Look.
                self._settle(members, exc, self._pid)
                self._deliver(batch)
                return
            for request in members:  # (each answer is set before its result is cleared)
                if not committing or isinstance(exc, Exception):
                    # Nothing was committed. One member's bad row may have failed them all, or
                    # the writer connection was dropped: each appends alone, on a checked pooled
                    # connection, and fails (or not) on its own, harming no other.
                    request.alone = True
                else:
                    request.error = _interrupted(exc)
                request.result = None
            if not isinstance(exc, Exception):
                raise  # the leader's own thread was interrupted (the members go on)
            return
        self._deliver(batch)

    def _in_one(
        self, prepare: Prepare, units: list[list[AppendRequest]], written: dict[str, Head]
    ) -> tuple[list[tuple[list[AppendRequest], InOne]], list[list[AppendRequest]]]:
        """The units that go as one statement each (sent together with the COMMIT), and the
        rest. A session goes that way only if all of its units can, each on top of the last;
        ``written`` gets the heads they will make, and their members provisional results."""
        fast: list[tuple[list[AppendRequest], InOne]] = []
        slow: list[list[AppendRequest]] = []
        for _, grouped in itertools.groupby(units, key=lambda unit: unit[0].session_id):
            session = list(grouped)
            first = session[0][0]
            head = self._heads.get(first.session_id, first.head)
            made = []
            for unit in session:
                one = prepare(_merged(unit), head)
                if one is None:
                    break
                made.append((unit, one))
                head = head_after(one.rows)
            if len(made) < len(session):
                slow.extend(session)
                continue
            fast.extend(made)
            if head is not None:
                written[first.session_id] = head
            for unit, one in made:
                rows = iter(one.rows)
                for request in unit:
                    request.result = _recorded(_UNKNOWN, rows, request.events)
        return fast, slow

    def _take_answers(
        self,
        in_one: list[tuple[list[AppendRequest], InOne]],
        answers: list[list[Any]],
        written: dict[str, Head],
    ) -> None:
        """Positions for the units that went as one statement; a unit whose head was not as
        believed changed nothing: its members append alone."""
        for (unit, one), found in zip(in_one, answers, strict=True):
            if not found:
                # Not as believed (another store wrote): forget it, the next append reads it.
                written.pop(unit[0].session_id, None)
                self._heads.pop(unit[0].session_id, None)
                for request in unit:
                    request.result = None
                    request.alone = True
                continue
            positions = iter(_positions(found))
            rows = iter(one.rows)
            for request in unit:
                request.result = _recorded(positions, rows, request.events)

    def _writer(self) -> tuple[Any, Cursor]:
        """The writer connection (the pool's, kept; its driver's used directly) and cursor."""
        if self._conn is None:  # (``_conn`` is set last: a failure here leaves none)
            conn = self._engine.raw_connection()
            self._driver = conn.driver_connection
            self._cur = self._driver.cursor()
            self._pid = self._dialect.backend_id(self._driver)
            self._conn = conn
        return self._driver, self._cur

    def _commit_one(self, request: AppendRequest) -> None:
        """``_commit`` for a group of one: the same transaction and outcomes, without sorting,
        merging or mapping a group; as one statement where the backend has one."""
        session_id = request.session_id
        prepare = self._prepare
        one = (
            None if prepare is None else prepare(request, self._heads.get(session_id, request.head))
        )
        if one is not None:
            if self._commit_in_one(request, one):
                return
            # The head was not as believed (nothing changed): read it under its lock instead.
            self._heads.pop(session_id, None)
            request.head = None
        committing = False
        try:
            with self._translating:
                conn, cur = self._writer()
                try:
                    self._dialect.begin_write(cur)
                    hint = self._heads.get(session_id)
                    written = {} if hint is None else {session_id: hint}
                    rows: list[EventRow] | None = None
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
                    self._dialect.commit(conn, cur)
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
                self._settle([request], exc, self._pid)
                self._deliver([request])
                return
            request.result = None
            if isinstance(exc, Exception):
                request.alone = True
            else:
                request.error = _own_copy(exc)
            return
        self._deliver([request])

    def _commit_in_one(self, request: AppendRequest, one: InOne) -> bool:
        """Append ``request`` as ``one``, a transaction of its own: done (committed, refused or
        failed), or False when the head was not as believed and nothing changed."""
        sent = False
        try:
            with self._translating:
                conn, cur = self._writer()
                try:
                    self._dialect.begin_single(cur)
                    faults.point("append.before_commit")
                    sent = True
                    cur.execute(one.sql, one.params)
                    found = cur.fetchall()
                    faults.point("append.after_commit")
                except BaseException:
                    self._rollback(conn)
                    raise
        except BaseException as exc:
            if not isinstance(exc, Exception):
                request.error = _own_copy(exc)
            elif not sent:
                request.alone = True  # nothing was sent: append alone on a checked connection
            else:
                # The statement failed, or its answer was lost: it may have committed. Look.
                request.result = _recorded(_UNKNOWN, iter(one.rows), request.events)
                self._settle([request], exc, self._pid)
                self._deliver([request])
            return True
        if not found:
            return False
        request.result = _recorded(iter(_positions(found)), iter(one.rows), request.events)
        self._remember({request.session_id: head_after(one.rows)})
        self._deliver([request])
        return True

    @staticmethod
    def _deliver(batch: list[AppendRequest]) -> None:
        for request in batch:  # in commit order, before anyone is woken
            if request.result is not None and request.inbox is not None:
                request.inbox.append(request.result)

    def _settle(
        self, members: list[AppendRequest], failure: Exception, backend: int | None
    ) -> None:
        """After a failed COMMIT (or a statement whose answer was lost), each member's outcome:
        one whose events are all stored with their chain hashes was committed (its result is
        read back, positions included); any other was not, and appends alone. When this cannot
        be checked, every member gets OutcomeUnknownError.

        A connection lost on our side can leave its server process running the statement
        (waiting for a lock, say), to commit after we looked: that process (``backend``) is
        ended first, so what is read back is final."""
        try:
            if backend is not None and self._dialect.dropped(failure):
                self._end_backend(backend)
                if backend == self._pid and self._conn is not None:
                    self._conn.invalidate()  # it was the writer's: open a fresh one next time
                    self._conn = None
            stored = [
                self._stored(r.session_id, [e.version for e in r.result or ()]) for r in members
            ]
        except BaseException as exc:
            for request in members:
                unknown = OutcomeUnknownError(
                    f"the database connection failed while committing ({failure}) and the "
                    f"outcome could not be checked ({exc!r}): the write may or may not be "
                    "stored; read the session before writing it again"
                )
                unknown.__cause__ = failure
                request.error, request.result = unknown, None
            if not isinstance(exc, Exception):
                raise  # interrupted while checking: the members have their answer
            return
        for request, found in zip(members, stored, strict=True):
            meant = [e.hash for e in request.result or ()]
            if meant and [e.hash for e in found] == meant:
                request.result = found
            else:
                request.alone = True
                request.result = None

    def _stage_unit(
        self, cur: Cursor, unit: list[AppendRequest], heads: MutableMapping[str, Head]
    ) -> Staged | None:
        """Move the head of a unit (one request, or blind appends to one session merged)."""
        try:
            return Staged(self._stage(cur, _merged(unit), heads, False), unit)
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
        rows: list[EventRow] = []
        positions: list[int] = []
        backend = None
        try:
            with self._transaction(write=True) as cur:
                backend = self._dialect.backend_id(cur.connection)
                staged = self._stage(cur, request, {}, True)
                positions = self._insert(cur, staged)
                rows = staged
        except Exception as exc:
            if not rows:
                raise
            # Everything but the COMMIT succeeded: it may have happened all the same. Look.
            request.result = _recorded(iter(positions), iter(rows), request.events)
            self._settle([request], exc, backend)
            if request.error is not None:
                raise request.error from exc
            if request.result is None:
                raise
        else:
            request.result = _recorded(iter(positions), iter(rows), request.events)
        self._deliver([request])
        return request.result

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
    positions: Iterator[int], rows: Iterator[EventRow], events: Sequence[NewEvent]
) -> list[RecordedEvent]:
    """``events`` as recorded, from the next of the inserted ``rows`` and their positions."""
    make = tuple.__new__
    # zip takes a row only for an event (not strict: that would take one more), so that the
    # next request's events go on from the next row of a group's ``rows``.
    return [
        make(
            RecordedEvent,
            (
                next(positions),
                session_id,
                version,
                event.type,
                event.key,
                event.phase,
                event.execution_id,
                event.payload,
                recorded_at,
                digest,
                prev_hash,
            ),
        )
        for event, (session_id, version, _, _, _, _, _, recorded_at, digest, prev_hash) in zip(
            events, rows, strict=False
        )
    ]


def head_after(rows: list[EventRow]) -> Head:
    """The head a session has once event ``rows`` (as staged, in order) are appended."""
    _, version, _, _, _, _, _, recorded_at, digest, _ = rows[-1]
    return Head(version, digest, recorded_at)


def _positions(found: Sequence[Any]) -> list[int]:
    """The positions a one-statement append returned (as (version, position)), by version."""
    return [int(position) for _, position in sorted(found)]


def _interrupted(exc: BaseException) -> OutcomeUnknownError:
    """What the members of a group get when its leader is interrupted (``exc``) once its
    COMMIT may have been sent."""
    error = OutcomeUnknownError(
        f"the group committing this write was interrupted ({exc!r}) while committing: the "
        "write may or may not be stored; read the session before writing it again"
    )
    error.__cause__ = exc
    return error


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


def _merged(unit: list[AppendRequest]) -> AppendRequest:
    """A unit as one append (its only request, or one of all its requests' events)."""
    first = unit[0]
    if len(unit) == 1:
        return first
    events = [event for request in unit for event in request.events]
    return AppendRequest(first.session_id, events, None, first.head, fence=first.fence)


def _blind(request: AppendRequest) -> bool:
    """Unconditional, and neither creating nor deleting: it only adds to a live session."""
    if request.expected_version is not None:
        return False
    return all(event.type not in _LIFECYCLE for event in request.events)


_LIFECYCLE: Final = frozenset({"ContextCreated", "ContextDeleted"})


def _session_of(request: AppendRequest) -> str:
    return request.session_id
