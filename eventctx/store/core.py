"""EventStore: the one SQL implementation of the event log over SQLAlchemy 2 Core.

Statements are compiled once from the Core tables and run on pooled DBAPI connections, one
round trip each. An append is one transaction that updates the session's head row first (the
version check: writers to one session queue on that row) and then inserts the events.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, MutableMapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import URL, Engine

from eventctx.errors import (
    ConcurrencyError,
    IntegrityError,
    InvalidInputError,
    SchemaError,
    SessionExistsError,
    SessionExpiredError,
    SessionNotFoundError,
)
from eventctx.events import (
    GENESIS_HASH,
    NewEvent,
    RecordedEvent,
    chain_hash,
    from_us,
)
from eventctx.store import schema
from eventctx.store.commit import AppendRequest, GroupCommitter, Head
from eventctx.store.dialect import (
    Cursor,
    Dialect,
    StoreOptions,
    Synchronous,
    fetch_value,
    for_url,
)
from eventctx.store.statements import Statements

__all__ = ["EventStore", "Head", "SessionHead"]

ACTIVE: Final = "active"
DELETED: Final = "deleted"
EXPIRING: Final = "expiring"
"""Head-row status while compaction removes an expired session's rows."""
EXPIRED: Final = "expired"
"""Not stored: an active session past its ttl, as ``_locked_head`` reports it."""
READ_CHUNK: Final = 5000
_NO_UPPER: Final = 2**62


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
        return self.ttl_ms is not None and self.last_activity_us + self.ttl_ms * 1000 < now_us

    @property
    def expires_at(self) -> datetime | None:
        """When the session expires unless it is used again."""
        ttl = self.ttl
        return None if ttl is None else self.last_activity + ttl


def check_session_id(session_id: object) -> str:
    """Return ``session_id`` if it is a valid id, else raise InvalidInputError."""
    if type(session_id) is not str:
        raise InvalidInputError(f"session id must be a str, not {type(session_id).__name__}")
    if not session_id or len(session_id) > schema.MAX_SESSION_ID or "\x00" in session_id:
        raise InvalidInputError(
            f"session id must be 1 to {schema.MAX_SESSION_ID} characters without NUL "
            f"(got {len(session_id)} characters)"
        )
    if not session_id.isascii():
        try:
            session_id.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidInputError(f"session id is not valid unicode text: {exc}") from None
    return session_id


def now_us() -> int:
    """The wall clock in microseconds since the Unix epoch."""
    return time.time_ns() // 1000


class EventStore:
    """The append-only event log of every session, in SQLite or PostgreSQL.

    Thread-safe; share one per process and database. Open with :meth:`open`.
    """

    def __init__(
        self, engine: Engine, dialect: Dialect, busy_timeout: timedelta = timedelta(seconds=30)
    ) -> None:
        """Wrap a prepared engine; use :meth:`open`, which also checks the schema."""
        self._engine = engine
        self._dialect = dialect
        self.busy_timeout = busy_timeout
        """How long an operation waits for locks held by others before it gives up."""
        self._sql = Statements(dialect)
        self._committer = GroupCommitter(engine, dialect, self._apply_append)

    # --- opening ------------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        target: str | URL | Engine,
        *,
        synchronous: Synchronous = "NORMAL",
        busy_timeout: timedelta = timedelta(seconds=30),
    ) -> EventStore:
        """Open a store, creating and stamping the schema in a new database.

        ``target`` is a URL (``sqlite:///file.db``, ``postgresql+psycopg://user@host/db``) or an
        Engine. ``synchronous`` is SQLite's durability level (``FULL`` also survives power loss).
        Raises SchemaError for a database of another schema version.
        """
        store = cls._connect(target, synchronous, busy_timeout)
        try:
            store._ensure_schema(upgrade=False)
        except BaseException:
            store.close()
            raise
        return store

    @classmethod
    def upgrade(
        cls,
        target: str | URL | Engine,
        *,
        synchronous: Synchronous = "NORMAL",
        busy_timeout: timedelta = timedelta(seconds=30),
    ) -> EventStore:
        """Open a store and migrate an older schema to the current version first."""
        store = cls._connect(target, synchronous, busy_timeout)
        try:
            store._ensure_schema(upgrade=True)
        except BaseException:
            store.close()
            raise
        return store

    @classmethod
    def _connect(
        cls, target: str | URL | Engine, synchronous: Synchronous, busy_timeout: timedelta
    ) -> EventStore:
        if synchronous not in ("NORMAL", "FULL"):
            raise InvalidInputError(f"synchronous must be 'NORMAL' or 'FULL', not {synchronous!r}")
        options = StoreOptions(synchronous, busy_timeout.total_seconds())
        if isinstance(target, Engine):
            dialect = for_url(target.url)
            dialect.prepare_engine(target, options)
            return cls(target, dialect, busy_timeout)
        url = sa.make_url(target)
        dialect = for_url(url)
        return cls(dialect.create_engine(url, options), dialect, busy_timeout)

    def _ensure_schema(self, *, upgrade: bool) -> None:
        with self._transaction(write=True) as cur:
            self._dialect.lock_setup(cur)
            tables = self._dialect.table_names(cur)
            if schema.schema_version.name not in tables:
                ours = tables & set(schema.metadata.tables)
                if ours:
                    raise SchemaError(
                        f"database has eventctx tables {sorted(ours)} but no schema version; "
                        "it was not created by eventctx or its creation was interrupted"
                    )
                for statement in schema.create_statements(self._dialect.sql_dialect):
                    cur.execute(statement)
                cur.execute(self._sql.stamp, {"version": schema.SCHEMA_VERSION})
                return
            cur.execute(self._sql.schema_version)
            found = fetch_value(cur)
            if found is None or found > schema.SCHEMA_VERSION:
                raise SchemaError(
                    f"database schema version {found} is newer than this eventctx understands "
                    f"({schema.SCHEMA_VERSION}); upgrade the eventctx package"
                )
            if found < schema.SCHEMA_VERSION and not upgrade:
                raise SchemaError(
                    f"database schema version {found} is older than {schema.SCHEMA_VERSION}; "
                    "back it up, then run `eventctx upgrade` or EventStore.upgrade(url)"
                )
            for version in range(found, schema.SCHEMA_VERSION):
                steps = schema.migration_statements(version, self._dialect.sql_dialect)
                if steps is None:
                    raise SchemaError(
                        f"no migration from schema version {version} to {version + 1}"
                    )
                for statement in steps:
                    cur.execute(statement)
                cur.execute(self._sql.restamp, {"version": version + 1})

    @property
    def url(self) -> URL:
        """The database URL (password hidden when rendered)."""
        return self._engine.url

    @property
    def dialect_name(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return self._dialect.name

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine (for tools that need direct SQL access)."""
        return self._engine

    def close(self) -> None:
        """Close every pooled connection; the store can't be used afterwards."""
        self._committer.close()
        self._engine.dispose()

    def __enter__(self) -> EventStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- transactions -------------------------------------------------------------------------

    @contextmanager
    def _transaction(self, *, write: bool) -> Iterator[Cursor]:
        """A pooled connection in one transaction; committed only if the block succeeds."""
        with self._dialect.translate_errors():
            raw = self._engine.raw_connection()
            try:
                cur = raw.cursor()
                if write:
                    self._dialect.begin_write(cur)
                else:
                    self._dialect.begin_read(cur)
                yield cur
                raw.commit()
            except BaseException:
                try:
                    raw.rollback()
                except Exception:
                    raw.invalidate()  # the connection is broken; don't hand it out again
                raise
            finally:
                raw.close()

    # --- writing ------------------------------------------------------------------------------

    def append(
        self,
        session_id: str,
        events: Sequence[NewEvent],
        *,
        expected_version: int | None = None,
        head: Head | None = None,
        on_commit: Callable[[list[RecordedEvent]], None] | None = None,
    ) -> list[RecordedEvent]:
        """Append ``events`` to a session in one transaction and return them as recorded.

        A batch starting with ``ContextCreated`` creates the session (SessionExistsError if it
        is live; a deleted one starts again, its versions continuing). Otherwise the session must
        exist (SessionNotFoundError). With ``expected_version`` the head must be at that version
        (ConcurrencyError); without it the events go on top of whatever the head is. ``head`` is
        the caller's belief about the head: when right, the append costs two statements.
        Concurrent appends share transactions (group commit); each returns once its own is
        committed. ``on_commit`` is called with the recorded events after the commit, in
        commit order, before this returns.
        """
        check_session_id(session_id)
        if not events:
            return []
        request = AppendRequest(session_id, events, expected_version, head, on_commit)
        return self._committer.submit(request)

    def _apply_append(
        self, cur: Cursor, request: AppendRequest, heads: MutableMapping[str, Head]
    ) -> list[RecordedEvent]:
        """One append inside the group's transaction: head row first, then the events."""
        session_id, events = request.session_id, request.events
        now = now_us()
        if events[0].type == "ContextCreated":
            rows = self._create_head(cur, session_id, events, now)
        else:
            head = heads.get(session_id, request.head)  # the committer's own is fresher
            rows = self._advance_head(cur, session_id, events, now, request.expected_version, head)
        positions = self._dialect.insert_events(cur, self._sql, rows)
        last = rows[-1]
        heads[session_id] = Head(last["version"], last["hash"], last["recorded_at"])
        make = tuple.__new__
        return [
            make(
                RecordedEvent,
                (
                    position,
                    session_id,
                    row["version"],
                    event.type,
                    event.key,
                    event.phase,
                    event.execution_id,
                    event.payload,
                    row["recorded_at"],
                    row["hash"],
                ),
            )
            for position, row, event in zip(positions, rows, events, strict=True)
        ]

    def _create_head(
        self, cur: Cursor, session_id: str, events: Sequence[NewEvent], now: int
    ) -> list[dict[str, Any]]:
        """Insert the head row of a new session (or revive a deleted one); return the rows."""
        rows = _chain(session_id, events, Head(0, GENESIS_HASH, now), now)
        params = _head_params(session_id, rows, events)
        params["ttl_ms"] = events[0].payload.get("ttl_ms")
        while True:
            cur.execute(self._sql.insert_head, params)
            if cur.rowcount == 1:
                return rows
            try:
                found, status = self._locked_head(cur, session_id, now)
                break
            except SessionNotFoundError:
                # PostgreSQL: the row our INSERT ran into was deleted (compaction, a purge) and
                # committed before we could lock it. Nothing is in the way now: insert again.
                continue
        if status == ACTIVE:
            raise SessionExistsError(
                f"session {session_id!r} already exists; use get_context to open it"
            )
        if status == EXPIRING:
            raise SessionExpiredError(
                f"session {session_id!r} expired and is being removed; create it again shortly"
            )
        rows = _chain(session_id, events, found, now)
        params.update(_head_params(session_id, rows, events))
        cur.execute(self._sql.recreate_head, params)
        return rows

    def _advance_head(
        self,
        cur: Cursor,
        session_id: str,
        events: Sequence[NewEvent],
        now: int,
        expected_version: int | None,
        head: Head | None,
    ) -> list[dict[str, Any]]:
        """Move a live session's head past ``events``; return their rows.

        First on the caller's belief of the head (one UPDATE when it is right), else on the
        head read under its row lock, which makes the second UPDATE certain to match.
        """
        if head is not None and expected_version in (None, head.version):
            rows = _chain(session_id, events, head, now)
            if self._move_head(cur, session_id, rows, events, head):
                return rows
        found, status = self._locked_head(cur, session_id, now)
        if status == DELETED:
            raise SessionNotFoundError(f"session {session_id!r} was deleted")
        if status != ACTIVE:
            raise SessionExpiredError(
                f"session {session_id!r} outlived its ttl; nothing was written. "
                "Create it again to go on"
            )
        if expected_version is not None and found.version != expected_version:
            raise ConcurrencyError(
                f"session {session_id!r} is at version {found.version}, "
                f"not {expected_version}; refresh and retry"
            )
        rows = _chain(session_id, events, found, now)
        if not self._move_head(cur, session_id, rows, events, found):  # pragma: no cover
            raise ConcurrencyError(f"session {session_id!r} moved while its row was locked")
        return rows

    def _move_head(
        self,
        cur: Cursor,
        session_id: str,
        rows: list[dict[str, Any]],
        events: Sequence[NewEvent],
        base: Head,
    ) -> bool:
        params = _head_params(session_id, rows, events)
        params.update(base_version=base.version, base_hash=base.hash)
        cur.execute(self._sql.advance_head, params)
        return bool(cur.rowcount == 1)

    def _locked_head(self, cur: Cursor, session_id: str, now: int) -> tuple[Head, str]:
        """The head row, locked until the transaction ends, and its status at ``now``
        (EXPIRED for an active session past its ttl)."""
        cur.execute(self._sql.head_for_update, {"session_id": session_id})
        row = cur.fetchone()
        if row is None:
            raise SessionNotFoundError(
                f"session {session_id!r} does not exist; create it with create_context"
            )
        version, head_hash, last_activity, status, ttl_ms = row
        if status == ACTIVE and ttl_ms is not None and last_activity + ttl_ms * 1000 < now:
            status = EXPIRED
        return Head(int(version), bytes(head_hash), int(last_activity)), str(status)

    def touch(self, session_id: str) -> SessionHead | None:
        """Record activity on a live, unexpired session now; return its head row (or None).

        The ttl counts from here. A deleted or expired session is left as it is.
        """
        check_session_id(session_id)
        params = {"session_id": session_id, "now": now_us(), "active": ACTIVE}
        with self._transaction(write=True) as cur:
            cur.execute(self._sql.touch, params)
            cur.execute(self._sql.session, params)
            row = cur.fetchone()
        return None if row is None else _session_head(row)

    def take_lease(
        self, session_id: str, owner: str, ttl: timedelta, *, previous: str | None = None
    ) -> tuple[str, datetime] | None:
        """Take (or renew) the run lease of a live session for ``ttl``.

        Succeeds when the lease is free, expired, already ``owner``'s, or held by ``previous``
        (a holder known to be dead). Returns None on success, else (holder, expires_at).
        """
        check_session_id(session_id)
        now = now_us()
        params = {
            "session_id": session_id,
            "owner": owner,
            "previous": previous or "",
            "now": now,
            "expires": now + ttl // timedelta(microseconds=1),
            "active": ACTIVE,
        }
        with self._transaction(write=True) as cur:
            cur.execute(self._sql.take_lease, params)
            if cur.rowcount == 1:
                return None
            cur.execute(self._sql.read_lease, params)
            row = cur.fetchone()
        if row is None or row[0] is None:
            raise SessionNotFoundError(f"session {session_id!r} does not exist or was deleted")
        return str(row[0]), from_us(int(row[1]))

    def release_lease(self, session_id: str, owner: str) -> None:
        """Give up ``owner``'s run lease (a no-op if it no longer holds it)."""
        check_session_id(session_id)
        with self._transaction(write=True) as cur:
            cur.execute(self._sql.release_lease, {"session_id": session_id, "owner": owner})

    def take_named_lease(
        self, name: str, owner: str, ttl: timedelta
    ) -> tuple[str, datetime] | None:
        """Take (or renew) the store-wide lease ``name`` for ``ttl``: None on success, else
        (holder, expires_at). One holder at a time across processes and hosts."""
        now = now_us()
        params = {
            "name": name,
            "owner": owner,
            "now": now,
            "expires": now + ttl // timedelta(microseconds=1),
        }
        with self._transaction(write=True) as cur:
            cur.execute(self._sql.insert_named_lease, params)
            if cur.rowcount == 1:
                return None
            cur.execute(self._sql.take_named_lease, params)
            if cur.rowcount == 1:
                return None
            cur.execute(self._sql.read_named_lease, params)
            row = cur.fetchone()
        if row is None:  # released between our statements: try again
            return self.take_named_lease(name, owner, ttl)
        return str(row[0]), from_us(int(row[1]))

    def release_named_lease(self, name: str, owner: str) -> None:
        """Give up the lease ``name`` if ``owner`` still holds it."""
        with self._transaction(write=True) as cur:
            cur.execute(self._sql.release_named_lease, {"name": name, "owner": owner})

    # --- compaction ---------------------------------------------------------------------------

    def expired_sessions(self, now: int, limit: int) -> list[tuple[str, int]]:
        """Up to ``limit`` sessions past their ttl at ``now`` (µs), or being removed, with their
        versions (which bound their event counts), least recently active first."""
        params = {"now": now, "limit": limit, "expiring": EXPIRING}
        with self._transaction(write=False) as cur:
            cur.execute(self._sql.expired, params)
            return [(str(sid), int(version)) for sid, version in cur.fetchall()]

    def remove_expired(self, session_ids: Sequence[str], now: int) -> tuple[list[str], int, int]:
        """In one transaction, remove every listed session that is still expired at ``now``.

        Each head row is re-checked under its lock, so a session written since it was listed
        is kept whole. Returns (removed ids, events removed, snapshots removed).
        """
        removed: list[str] = []
        events = snapshots = 0
        sql = self._sql
        with self._transaction(write=True) as cur:
            for session_id in sorted(session_ids):  # the committer's lock order: no deadlock
                params = {"session_id": session_id, "now": now, "expiring": EXPIRING}
                cur.execute(sql.mark_expiring, params)
                if cur.rowcount != 1:
                    continue
                cur.execute(sql.delete_events, params)
                events += cur.rowcount
                cur.execute(sql.delete_snapshots, params)
                snapshots += cur.rowcount
                cur.execute(sql.delete_expiring_head, params)
                removed.append(session_id)
        return removed, events, snapshots

    def mark_expiring(self, session_id: str, now: int) -> bool:
        """Mark a session still expired at ``now`` as being removed (appends then refuse it
        with SessionExpiredError); False if it was written since and so is kept."""
        with self._transaction(write=True) as cur:
            cur.execute(
                self._sql.mark_expiring,
                {"session_id": session_id, "now": now, "expiring": EXPIRING},
            )
            return bool(cur.rowcount == 1)

    def delete_events_upto(self, session_id: str, version: int) -> int | None:
        """Delete a marked session's events up to ``version`` (one bounded transaction);
        None, deleting nothing, if the session is no longer being removed (purged, and
        perhaps created again)."""
        with self._transaction(write=True) as cur:
            if not self._still_expiring(cur, session_id):
                return None
            cur.execute(self._sql.delete_events_upto, {"session_id": session_id, "upto": version})
            return int(cur.rowcount)

    def finish_removal(self, session_id: str) -> tuple[int, int] | None:
        """Remove the rest of a marked session: (events, snapshots) removed, or None if it is
        no longer being removed."""
        params = {"session_id": session_id, "expiring": EXPIRING}
        with self._transaction(write=True) as cur:
            if not self._still_expiring(cur, session_id):
                return None
            cur.execute(self._sql.delete_events, params)
            events = int(cur.rowcount)
            cur.execute(self._sql.delete_snapshots, params)
            snapshots = int(cur.rowcount)
            cur.execute(self._sql.delete_expiring_head, params)
        return events, snapshots

    def _still_expiring(self, cur: Cursor, session_id: str) -> bool:
        """Lock the head row and tell whether compaction still owns the session."""
        cur.execute(self._sql.head_for_update, {"session_id": session_id})
        row = cur.fetchone()
        return row is not None and row[3] == EXPIRING

    def save_snapshot(
        self, session_id: str, version: int, fold_version: int, head_hash: bytes, state: bytes
    ) -> None:
        """Store a snapshot of a session's folded state at ``version`` (a cache: idempotent)."""
        params = {
            "session_id": session_id,
            "version": version,
            "fold_version": fold_version,
            "head_hash": head_hash,
            "state": state,
            "now": now_us(),
        }
        with self._transaction(write=True) as cur:
            cur.execute(self._sql.insert_snapshot, params)

    def latest_snapshot(
        self, session_id: str, fold_version: int, max_version: int | None = None
    ) -> tuple[int, bytes, bytes] | None:
        """(version, head hash, state bytes) of the newest snapshot written under
        ``fold_version`` at or below ``max_version``, or None."""
        params = {
            "session_id": session_id,
            "fold_version": fold_version,
            "high": _NO_UPPER if max_version is None else max_version,
        }
        with self._transaction(write=False) as cur:
            cur.execute(self._sql.latest_snapshot, params)
            row = cur.fetchone()
        return None if row is None else (int(row[0]), bytes(row[1]), bytes(row[2]))

    def purge(self, session_id: str) -> int:
        """Physically remove a session: events, snapshots and head row. Returns events removed."""
        check_session_id(session_id)
        params = {"session_id": session_id}
        with self._transaction(write=True) as cur:
            cur.execute(self._sql.delete_head, params)
            cur.execute(self._sql.delete_snapshots, params)
            cur.execute(self._sql.delete_events, params)
            return int(cur.rowcount)

    # --- reading ------------------------------------------------------------------------------

    def session(self, session_id: str) -> SessionHead | None:
        """The session's head row, or None if it never existed (or was purged)."""
        check_session_id(session_id)
        with self._transaction(write=False) as cur:
            cur.execute(self._sql.session, {"session_id": session_id})
            row = cur.fetchone()
        return None if row is None else _session_head(row)

    def sessions(self) -> list[SessionHead]:
        """Every session's head row (deleted ones included), ordered by id."""
        with self._transaction(write=False) as cur:
            cur.execute(self._sql.sessions)
            return [_session_head(row) for row in cur.fetchall()]

    def read(
        self, session_id: str, from_version: int = 1, to_version: int | None = None
    ) -> Iterator[RecordedEvent]:
        """Stream a session's events in version order, ``from_version`` to ``to_version``.

        Rows are fetched in chunks, each in its own short transaction; no connection is held
        while the caller iterates, and the history is never materialised whole.
        """
        check_session_id(session_id)
        high = _NO_UPPER if to_version is None else to_version
        make, loads = tuple.__new__, orjson.loads  # the hot path of every restore
        for rows in self._pages(self._sql.read_chunk, session_id, from_version, high, 1):
            for position, version, type_, key, phase, execution_id, payload, at, hash_ in rows:
                yield make(
                    RecordedEvent,
                    (
                        position,
                        session_id,
                        version,
                        type_,
                        key,
                        phase,
                        execution_id,
                        loads(payload),
                        at,
                        hash_ if type(hash_) is bytes else bytes(hash_),
                    ),
                )

    def _pages(
        self, sql: str, session_id: str, low: int, high: int, version_at: int
    ) -> Iterator[Sequence[Any]]:
        """Rows of ``sql`` for versions ``low``..``high`` in version order, a chunk at a time,
        each chunk in its own short transaction (``version_at``: the version's column)."""
        params: dict[str, Any] = {
            "session_id": session_id,
            "low": low,
            "high": high,
            "limit": READ_CHUNK,
        }
        while True:
            with self._transaction(write=False) as cur:
                cur.execute(sql, params)
                rows = cur.fetchall()
            if rows:
                yield rows
            if len(rows) < READ_CHUNK:
                return
            params["low"] = rows[-1][version_at] + 1

    def verify(self, session_id: str) -> int:
        """Recompute a session's hash chain; return the events checked or raise IntegrityError.

        Catches a changed row, a missing or reordered event, and a truncated tail (the head row
        holds the chain head).
        """
        found = self.session(session_id)
        if found is None:
            raise SessionNotFoundError(f"session {session_id!r} does not exist")
        expected_version, prev = 1, GENESIS_HASH
        for rows in self._pages(self._sql.read_chain, session_id, 1, _NO_UPPER, 0):
            for version, type_, key, phase, execution_id, payload, at, hash_, prev_hash in rows:
                where = f"session {session_id!r} version {version}"
                if version != expected_version:
                    raise IntegrityError(f"{where}: expected version {expected_version} (a gap)")
                if bytes(prev_hash) != prev:
                    raise IntegrityError(f"{where}: prev_hash does not match the previous event")
                prev = chain_hash(
                    prev, session_id, version, type_, key, phase, execution_id, at, bytes(payload)
                )
                if prev != bytes(hash_):
                    raise IntegrityError(f"{where}: stored hash does not match its contents")
                expected_version += 1
        checked = expected_version - 1
        if checked != found.version or prev != found.head_hash:
            raise IntegrityError(
                f"session {session_id!r}: log ends at version {checked} but the head row says "
                f"{found.version}; events are missing or the head row was altered"
            )
        return checked


def _chain(
    session_id: str, events: Sequence[NewEvent], base: Head, now: int
) -> list[dict[str, Any]]:
    """Rows for ``events`` on top of ``base``: versions, one recorded_at, and the hash chain."""
    at = now if now > base.recorded_at_us else base.recorded_at_us
    prev = base.hash
    version = base.version
    rows = []
    for event in events:
        version += 1
        digest = chain_hash(
            prev,
            session_id,
            version,
            event.type,
            event.key,
            event.phase,
            event.execution_id,
            at,
            event.data,
        )
        rows.append(
            {
                "session_id": session_id,
                "version": version,
                "type": event.type,
                "key": event.key,
                "phase": event.phase,
                "execution_id": event.execution_id,
                "payload": event.data,
                "recorded_at": at,
                "hash": digest,
                "prev_hash": prev,
            }
        )
        prev = digest
    return rows


def _head_params(
    session_id: str, rows: list[dict[str, Any]], events: Sequence[NewEvent]
) -> dict[str, Any]:
    last = rows[-1]
    status = DELETED if events[-1].type == "ContextDeleted" else ACTIVE
    return {
        "session_id": session_id,
        "new_version": last["version"],
        "new_hash": last["hash"],
        "now": last["recorded_at"],
        "status": status,
        "active": ACTIVE,
    }


def _session_head(row: Sequence[Any]) -> SessionHead:
    session_id, version, head_hash, created_at, last_activity, ttl_ms, status = row
    return SessionHead(
        session_id,
        int(version),
        bytes(head_hash),
        int(created_at),
        int(last_activity),
        None if ttl_ms is None else int(ttl_ms),
        str(status),
    )
