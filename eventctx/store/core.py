"""EventStore: the one SQL implementation of the event log over SQLAlchemy 2 Core.

Statements are compiled once from the Core tables and run on pooled DBAPI connections, one
round trip each. What happens inside an append is in ``append`` (head row first, then the
events) and ``commit`` (group commit); schema creation and upgrades in ``migrations``;
compaction's steps in ``removal``. Time comes from the store's clock.
"""

from __future__ import annotations

import os
import time
import weakref
from collections.abc import (
    Callable,
    Collection,
    Iterable,
    Iterator,
    Mapping,
    MutableMapping,
    Sequence,
)
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Final, TypeVar

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import URL, Engine

from eventctx.clock import Clock, check_duration, now_us
from eventctx.errors import (
    ChainKeyError,
    ConcurrencyError,
    EventCtxError,
    IntegrityError,
    InvalidInputError,
    SessionExistsError,
    SessionExpiredError,
    SessionNotFoundError,
    StorageError,
)
from eventctx.events import (
    GENESIS_HASH,
    Hasher,
    NewEvent,
    RecordedEvent,
    chain_hash,
    from_us,
    key_check,
    keyed_hasher,
    sha256,
    snapshot_digest,
)
from eventctx.store import append as append_protocol
from eventctx.store import schema
from eventctx.store.backends import for_url
from eventctx.store.bases import Base, Bases
from eventctx.store.commit import AppendRequest, GroupCommitter, Inbox, InOne
from eventctx.store.dialect import (
    TRIES_AFTER_DROP,
    Cursor,
    Dialect,
    StoreOptions,
    Synchronous,
)
from eventctx.store.heads import (
    ACTIVE,
    DELETED,
    EXPIRING,
    Fence,
    Head,
    LeaseHolder,
    SessionHead,
    check_session_id,
)
from eventctx.store.migrations import check_schema, ensure_schema
from eventctx.store.removal import Removal
from eventctx.store.sessionread import SessionRead
from eventctx.store.statements import EVENT_COLUMNS, EventRow, Statements

__all__ = ["EventStore"]

READ_CHUNK: Final = 5000
LOAD_BATCH: Final = 1000
"""Rows per INSERT round trip when a whole log is loaded."""
_NO_UPPER: Final = 2**62
_READ_ONLY: Final = "the store was opened read-only: open it without read_only=True to write"
T = TypeVar("T")


class EventStore:
    """The append-only event log of every session, in SQLite or PostgreSQL.

    Thread-safe; share one per process and database. Open with :meth:`open`.
    """

    def __init__(
        self,
        engine: Engine,
        dialect: Dialect,
        busy_timeout: timedelta = timedelta(seconds=30),
        clock: Clock = now_us,
        *,
        read_only: bool = False,
    ) -> None:
        """Wrap a prepared engine; use :meth:`open`, which also checks the schema."""
        self._engine = engine
        self._dialect = dialect
        self._closed = False
        self.read_only = read_only
        """Whether every write is refused (StorageError): the store only reads."""
        self.upgraded_from: int | None = None
        """The schema version :meth:`upgrade` migrated the database from (None: none was)."""
        self.rows_read = 0
        """Rows this store has read so far (approximate under threads): what a long command
        shows as its progress."""
        self.busy_timeout = busy_timeout
        """How long an operation waits for locks held by others before it gives up."""
        self.clock = clock
        """The time of appends, activity and leases, in µs since the epoch."""
        self._sql = Statements(dialect)
        self._hasher: Hasher = sha256
        """The chain's hash: keyed (HMAC) once the store is opened with the database's key."""
        self.chain_mode = "sha256"
        """How the chains are hashed: ``sha256``, or ``hmac-sha256`` under the store's key."""
        self._committer = GroupCommitter(
            engine,
            dialect,
            self._stage,
            self._insert,
            self._transaction,
            self.read_versions,
            None if self._sql.append_in_one is None else self._in_one,
            self._end_backend,
        )
        self.removal = Removal(self._transaction, self._sql, dialect)
        """The steps compaction is made of (``eventctx.compaction`` runs them)."""
        self.bases = Bases(self._run, dialect, lambda: self._hasher)
        """Retention bases (``eventctx.retention`` moves them)."""
        # A forked child must not share the parent's connections: it gets its own.
        ref = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: _after_fork(ref))

    # --- opening ------------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        target: str | URL | Engine,
        *,
        synchronous: Synchronous = "NORMAL",
        busy_timeout: timedelta = timedelta(seconds=30),
        chain_key: bytes | str | None = None,
        read_only: bool = False,
    ) -> EventStore:
        """Open a store, creating and stamping the schema in a new database.

        ``target`` is a URL (``sqlite:///file.db``, ``postgresql+psycopg://user@host/db``) or an
        Engine. ``synchronous`` is SQLite's durability level (``FULL`` also survives power loss).
        ``chain_key`` (else ``$EVENTCTX_CHAIN_KEY``) keys the hash chains with HMAC-SHA256; a
        database takes the mode of the first store that opens it while it has no events, and
        then refuses any other (ChainKeyError). Raises SchemaError for a database of another
        schema version.

        ``read_only`` opens an existing eventctx database without changing anything: a missing
        SQLite file raises StorageError, a database without eventctx's tables SchemaError, and
        every write StorageError (SQLite opens the file read-only, PostgreSQL sessions are
        read-only). A caller's Engine decides itself whether connecting creates a file.
        """
        store = cls._connect(target, synchronous, busy_timeout, read_only=read_only)
        try:
            store._ensure_schema(upgrade=False)
            store._use_chain_key(chain_key)
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
        chain_key: bytes | str | None = None,
    ) -> EventStore:
        """Open a store and migrate an older schema to the current version first."""
        store = cls._connect(target, synchronous, busy_timeout, read_only=False)
        try:
            store.upgraded_from = store._ensure_schema(upgrade=True)
            store._use_chain_key(chain_key)
        except BaseException:
            store.close()
            raise
        return store

    @classmethod
    def _connect(
        cls,
        target: str | URL | Engine,
        synchronous: Synchronous,
        busy_timeout: timedelta,
        read_only: bool,
    ) -> EventStore:
        if synchronous not in ("NORMAL", "FULL"):
            raise InvalidInputError(f"synchronous must be 'NORMAL' or 'FULL', not {synchronous!r}")
        check_duration(busy_timeout, "busy_timeout", maximum=timedelta(days=1))
        options = StoreOptions(synchronous, busy_timeout.total_seconds(), read_only)
        if isinstance(target, Engine):
            dialect = for_url(target.url)
            dialect.prepare_engine(target, options)
            return cls(target, dialect, busy_timeout, read_only=read_only)
        try:
            url = sa.make_url(target)
        except (sa.exc.ArgumentError, ValueError, TypeError) as exc:
            raise InvalidInputError(
                f"{target!r} is not a database URL: use sqlite:///FILE or "
                "postgresql+psycopg://USER@HOST/DB"
            ) from exc
        dialect = for_url(url)
        return cls(dialect.create_engine(url, options), dialect, busy_timeout, read_only=read_only)

    def _ensure_schema(self, *, upgrade: bool) -> int | None:
        """Check, create or (with ``upgrade``) migrate the schema: the version migrated from."""
        if self.read_only:
            with self._transaction(write=False) as cur:
                check_schema(cur, self._dialect, self._sql)
            return None
        with self._transaction(write=True) as cur:
            return ensure_schema(cur, self._dialect, self._sql, upgrade=upgrade)

    def _use_chain_key(self, chain_key: bytes | str | None) -> None:
        """Hash with ``chain_key`` (or $EVENTCTX_CHAIN_KEY) if the database is keyed with it."""
        if chain_key is None:
            chain_key = os.environ.get("EVENTCTX_CHAIN_KEY") or None
        if isinstance(chain_key, str):
            chain_key = chain_key.encode()
        if chain_key is not None and (type(chain_key) is not bytes or len(chain_key) < 16):
            raise InvalidInputError("a chain key is bytes or str of at least 16 bytes")
        hasher = sha256 if chain_key is None else keyed_hasher(chain_key)
        mode = "sha256" if chain_key is None else "hmac-sha256"
        check = None if chain_key is None else key_check(hasher)

        def stored_mode(rows: Sequence[Any]) -> tuple[str, bytes | None]:
            chain, stored_check = rows[0]
            return str(chain), None if stored_check is None else bytes(stored_check)

        def settle(cur: Cursor) -> tuple[str, bytes | None] | None:
            cur.execute(self._sql.chain_mode)
            found = stored_mode(cur.fetchall())
            if found == (mode, check):
                return None
            cur.execute(self._sql.any_event)
            if cur.fetchone() is not None:
                return found
            cur.execute(self._sql.set_chain_mode, {"chain": mode, "key_check": check})
            return None  # no events yet: the database takes this store's mode

        stored = stored_mode(self._fetch(self._sql.chain_mode))
        if stored == (mode, check):
            self._hasher, self.chain_mode = hasher, mode
            return
        found = stored if self.read_only else self._run(settle, write=True)
        if found is not None:
            if found[0] == "sha256":
                raise ChainKeyError(
                    "this database's hash chains are not keyed, yet a chain key was given: "
                    "open it without one (if it was keyed, its chain mode was changed)"
                )
            raise ChainKeyError(
                "this database's hash chains are keyed: give its key (chain_key= or "
                "EVENTCTX_CHAIN_KEY)"
                if chain_key is None
                else "the chain key given is not this database's key"
            )
        self._hasher = hasher
        self.chain_mode = mode

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

    def _after_fork(self) -> None:
        self._committer.after_fork()
        self._engine.dispose(close=False)  # the parent's connections stay the parent's

    def close(self) -> None:
        """Close every pooled connection; the store can't be used afterwards."""
        self._closed = True
        self._committer.close()
        self._engine.dispose()

    def __enter__(self) -> EventStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- transactions -------------------------------------------------------------------------

    @contextmanager
    def _transaction(self, *, write: bool, consistent: bool = False) -> Iterator[Cursor]:
        """A pooled connection in one transaction; committed only if the block succeeds.
        ``consistent``: a read whose statements all see the same committed log."""
        if self._closed:
            raise EventCtxError("the store is closed: open it again to go on")
        if write and self.read_only:
            raise StorageError(_READ_ONLY)
        with self._dialect.translate_errors():
            raw = self._engine.raw_connection()
            try:
                cur = raw.cursor()
                if write:
                    self._dialect.begin_write(cur)
                elif consistent:
                    self._dialect.begin_snapshot(cur)
                else:
                    self._dialect.begin_read(cur)
                yield cur
                self._dialect.commit(raw, cur)
            except BaseException:
                try:
                    raw.rollback()
                except Exception:
                    raw.invalidate()  # the connection is broken; don't hand it out again
                raise
            finally:
                raw.close()

    def _run(self, work: Callable[[Cursor], T], *, write: bool, consistent: bool = False) -> T:
        """``work`` in one short transaction. When the server dropped the connection, it is
        made again on a fresh connection instead of failing its caller (a restart or a
        terminated backend costs no error once the server answers): ``work`` must be safe to
        repeat even when the dropped try did commit."""
        for tries in range(1, TRIES_AFTER_DROP + 1):
            try:
                with self._transaction(write=write, consistent=consistent) as cur:
                    return work(cur)
            except StorageError as exc:
                if tries == TRIES_AFTER_DROP or not self._dialect.dropped(exc):
                    raise
        raise AssertionError("unreachable")

    def _fetch(self, sql: str, params: Mapping[str, Any] | None = None) -> list[Any]:
        """The rows of one read (made again on a fresh connection if the server dropped it)."""

        def rows(cur: Cursor) -> list[Any]:
            cur.execute(sql, params or {})
            return list(cur.fetchall())

        found = self._run(rows, write=False)
        self.rows_read += len(found)
        return found

    # --- writing ------------------------------------------------------------------------------

    def append(
        self,
        session_id: str,
        events: Sequence[NewEvent],
        *,
        expected_version: int | None = None,
        head: Head | None = None,
        inbox: Inbox | None = None,
        fence: Fence | None = None,
    ) -> list[RecordedEvent]:
        """Append ``events`` to a session in one transaction and return them as recorded.

        A batch starting with ``ContextCreated`` creates the session (SessionExistsError if it
        is live; a deleted one starts again, its versions continuing). Otherwise the session must
        exist (SessionNotFoundError). With ``expected_version`` the head must be at that version
        (ConcurrencyError); without it the events go on top of whatever the head is. ``head`` is
        the caller's belief about the head: when right, the append is one statement on
        PostgreSQL and two on SQLite. With
        ``fence`` (a run lease as taken), the session's lease must still be that one
        (RunInProgressError). Concurrent appends share transactions (group commit); each returns
        once its own is committed. ``inbox``, when given, receives the recorded events once
        committed (in commit order within a group, before any of its callers returns; an
        append made alone, past a locked head row, arrives when it commits).
        """
        check_session_id(session_id)
        if self._closed:
            raise EventCtxError("the store is closed: open it again to go on")
        if self.read_only:
            raise StorageError(_READ_ONLY)
        if not events:
            return []
        for event in events:
            if len(event.type) > schema.MAX_NAME or len(event.execution_id or "") > schema.MAX_NAME:
                raise InvalidInputError(
                    f"an event type and an execution id are at most {schema.MAX_NAME} "
                    f"characters (got {event.type!r}, {event.execution_id!r})"
                )
        if len(events) > 1 and _lifecycle_inside(events):
            raise InvalidInputError(
                "a ContextCreated may only start a batch and a ContextDeleted only end one: "
                "the head row takes a batch's lifecycle from its first and last events"
            )
        request = AppendRequest(session_id, events, expected_version, head, inbox, fence)
        return self._committer.submit(request)

    def _stage(
        self, cur: Cursor, request: AppendRequest, heads: MutableMapping[str, Head], wait: bool
    ) -> list[EventRow]:
        return append_protocol.stage(
            cur, self._sql, request, heads, wait, self.clock(), self._hasher
        )

    def _end_backend(self, backend: int) -> None:
        """End the server process ``backend`` (a lost connection of ours) and wait, up to the
        busy timeout, until it has: StorageError if it will not."""
        deadline = time.monotonic() + self.busy_timeout.total_seconds()
        while not self._run(lambda cur: self._dialect.end_backend(cur, backend), write=False):
            if time.monotonic() > deadline:
                raise StorageError(f"the server process {backend} of a lost connection runs on")
            time.sleep(0.005)

    def _in_one(self, request: AppendRequest, head: Head | None) -> InOne | None:
        return append_protocol.in_one(self._sql, request, head, self.clock(), self._hasher)

    def _insert(self, cur: Cursor, rows: list[EventRow]) -> list[int]:
        sql = self._sql
        return self._dialect.insert_events(cur, sql.insert_event, sql.insert_event_returning, rows)

    def touch(self, session_id: str) -> SessionHead | None:
        """Record activity on a live, unexpired session now; return its head row (or None).

        The ttl counts from here. A deleted or expired session is left as it is.
        """
        check_session_id(session_id)
        params = {"session_id": session_id, "now": self.clock(), "active": ACTIVE}

        def touch(cur: Cursor) -> Any:
            cur.execute(self._sql.touch, params)
            cur.execute(self._sql.session, params)
            return cur.fetchone()

        row = self._run(touch, write=True)
        return None if row is None else SessionHead.from_row(row)

    def take_lease(
        self, session_id: str, owner: str, ttl: timedelta, *, previous: str | None = None
    ) -> Fence | LeaseHolder:
        """Take the run lease of a live session for ``ttl``, as ``owner`` (unique per taking).

        Succeeds when the lease is free, expired, or held by ``previous`` (a holder known to
        be dead), and returns the lease as a Fence (its token one more than the last one);
        otherwise returns who holds it.
        """
        check_session_id(session_id)
        now = self.clock()
        params = {
            "session_id": session_id,
            "owner": owner,
            "previous": previous or "",
            "now": now,
            "expires": now + ttl // timedelta(microseconds=1),
            "active": ACTIVE,
        }

        tries: list[None] = []

        def take(cur: Cursor) -> Fence | Any:
            if tries:  # an earlier try whose connection dropped may have taken it: take over
                params["previous"] = owner
            tries.append(None)
            cur.execute(self._sql.take_lease, params)
            taken = cur.fetchone()
            if taken is not None:
                return Fence(owner, int(taken[0]))
            cur.execute(self._sql.read_lease, params)
            return cur.fetchone()

        row = self._run(take, write=True)
        if isinstance(row, Fence):
            return row
        if row is None or row[0] is None:
            raise SessionNotFoundError(f"session {session_id!r} does not exist or was deleted")
        return LeaseHolder(str(row[0]), from_us(int(row[1])))

    def renew_lease(self, session_id: str, fence: Fence, ttl: timedelta) -> bool:
        """Extend the run lease ``fence`` by ``ttl`` from now; False if it is no longer held
        (taken over, released, or the session deleted)."""
        now = self.clock()
        params = {
            "session_id": session_id,
            "owner": fence.owner,
            "token": fence.token,
            "expires": now + ttl // timedelta(microseconds=1),
            "active": ACTIVE,
        }

        def renew(cur: Cursor) -> bool:
            cur.execute(self._sql.renew_lease, params)
            return bool(cur.rowcount == 1)

        return self._run(renew, write=True)

    def release_lease(self, session_id: str, fence: Fence) -> None:
        """Give up the run lease ``fence`` (a no-op if it is no longer held)."""
        check_session_id(session_id)
        params = {"session_id": session_id, "owner": fence.owner, "token": fence.token}
        self._run(lambda cur: cur.execute(self._sql.release_lease, params), write=True)

    def take_named_lease(
        self, name: str, owner: str, ttl: timedelta, *, previous: str | None = None
    ) -> LeaseHolder | None:
        """Take (or renew) the store-wide lease ``name`` for ``ttl``: None on success, else
        who holds it. One holder at a time across processes and hosts; ``previous`` names a
        holder known to be dead, whose lease is taken over at once."""
        now = self.clock()
        params = {
            "name": name,
            "owner": owner,
            "previous": previous or "",
            "now": now,
            "expires": now + ttl // timedelta(microseconds=1),
        }

        def take(cur: Cursor) -> Any:
            cur.execute(self._sql.insert_named_lease, params)
            if cur.rowcount == 1:
                return True
            cur.execute(self._sql.take_named_lease, params)
            if cur.rowcount == 1:
                return True
            cur.execute(self._sql.read_named_lease, params)
            return cur.fetchone()

        row = self._run(take, write=True)
        if row is True:
            return None
        if row is None:  # released between our statements: try again
            return self.take_named_lease(name, owner, ttl, previous=previous)
        return LeaseHolder(str(row[0]), from_us(int(row[1])))

    def release_named_lease(self, name: str, owner: str) -> None:
        """Give up the lease ``name`` if ``owner`` still holds it."""
        params = {"name": name, "owner": owner}
        self._run(lambda cur: cur.execute(self._sql.release_named_lease, params), write=True)

    # --- snapshots and purge -----------------------------------------------------------------

    def save_snapshot(
        self, session_id: str, version: int, fold_version: int, head_hash: bytes, state: bytes
    ) -> None:
        """Store a snapshot of a session's folded state at ``version`` (a cache: idempotent),
        with the digest a restore checks it against."""
        digest = snapshot_digest(session_id, version, fold_version, head_hash, state, self._hasher)
        params = {
            "session_id": session_id,
            "version": version,
            "fold_version": fold_version,
            "head_hash": head_hash,
            "state": state,
            "digest": digest,
            "now": self.clock(),
        }
        self._run(lambda cur: cur.execute(self._sql.insert_snapshot, params), write=True)

    def latest_snapshot(
        self, session_id: str, fold_version: int, max_version: int | None = None
    ) -> tuple[int, bytes, bytes] | None:
        """(version, head hash, state bytes) of the newest snapshot written under
        ``fold_version`` at or below ``max_version``, or None. A snapshot that no longer
        matches the digest stored with it raises IntegrityError (restore then folds the log)."""
        high = _NO_UPPER if max_version is None else max_version
        return self.reading(session_id, lambda read: read.snapshot(fold_version, high))

    def snapshots(self, session_id: str) -> list[tuple[int, int, bytes, bytes]]:
        """Every snapshot of a session a restore may use, in version order: (version, fold
        version, head hash, state bytes). One that no longer matches its digest raises
        IntegrityError. (Snapshots written before digests existed are never used.)"""
        check_session_id(session_id)
        found = []
        for version, fold_version, head_hash, state, digest in self._fetch(
            self._sql.snapshots_of, {"session_id": session_id}
        ):
            row = (int(version), int(fold_version), bytes(head_hash), bytes(state))
            self._check_snapshot(session_id, row[1], row[0], row[2], row[3], bytes(digest))
            found.append(row)
        return found

    def snapshotted(self) -> set[str]:
        """The sessions that have a snapshot a restore may use (one query)."""
        return {str(row[0]) for row in self._fetch(self._sql.snapshotted)}

    def _check_snapshot(
        self,
        session_id: str,
        fold_version: int,
        version: int,
        head_hash: bytes,
        state: bytes,
        digest: bytes,
    ) -> None:
        expected = snapshot_digest(
            session_id, version, fold_version, head_hash, state, self._hasher
        )
        if expected != digest:
            raise IntegrityError(
                f"session {session_id!r}: the snapshot at version {version} is not what was "
                "written (its digest does not match)",
                session_id=session_id,
                version=version,
            )

    def purge(self, session_id: str) -> int:
        """Physically remove a session: events, snapshots and head row. Returns events removed."""
        check_session_id(session_id)
        params = {"session_id": session_id}
        with self._transaction(write=True) as cur:
            cur.execute(self._sql.delete_head, params)
            cur.execute(self._sql.delete_snapshots, params)
            cur.execute(self._sql.delete_base, params)
            self._dialect.keep_positions(cur)
            cur.execute(self._sql.delete_events, params)
            return int(cur.rowcount)

    # --- export and import --------------------------------------------------------------------

    def chain_rows(
        self, session_id: str, to_version: int, from_version: int = 1
    ) -> Iterator[Sequence[Any]]:
        """A session's events ``from_version`` to ``to_version`` as stored, in version order:
        every column but the session id and position (``ChainCheck.feed``'s arguments), a
        chunk per short transaction. What an export writes."""
        check_session_id(session_id)
        for rows in self._pages(self._sql.read_chain, session_id, from_version, to_version, 0):
            yield from rows

    def chain_check(self, head: SessionHead, base: Base | None = None) -> ChainCheck:
        """A check of the chain that ends at ``head`` (and starts after ``base``, if any),
        hashed as this store hashes."""
        return ChainCheck(head, self._hasher, base)

    def hash_event(
        self,
        prev_hash: bytes,
        session_id: str,
        version: int,
        type_: str,
        key: str | None,
        phase: str | None,
        execution_id: str | None,
        recorded_at_us: int,
        payload: bytes,
    ) -> bytes:
        """An event's chain hash as this store computes it (keyed when the store is)."""
        return chain_hash(
            prev_hash,
            session_id,
            version,
            type_,
            key,
            phase,
            execution_id,
            recorded_at_us,
            payload,
            self._hasher,
        )

    def load(
        self,
        session_id: str,
        rows: Iterable[EventRow],
        base: Base | None = None,
        created_at: int | None = None,
    ) -> int:
        """Insert a new session's whole log (after ``base``, its retention base, if it has
        one), then its head row, in one write transaction; return the events inserted.

        ``rows`` are event rows as appends make them (``EventRow``), in version order;
        they are inserted a batch at a time as they come, so a log of any length streams. The
        head row is what appends would have left: the last creation's time (``created_at``
        when the creation is in the base) and ttl, the last event's version and hash, deleted
        if the log ends with a delete; the ttl counts from now. A session that exists raises
        SessionExistsError, a row that is not an EventRow of the session InvalidInputError;
        whatever ``rows`` raises rolls everything back.
        """
        check_session_id(session_id)
        exists = SessionExistsError(f"session {session_id!r} exists already: nothing was loaded")
        params: dict[str, Any] = {"session_id": session_id}
        last: tuple[int, bytes, str] | None = None  # the version, hash and type of the last
        if base is not None:
            # The state's JSON, before the newline that starts its provenance (if any).
            state = orjson.loads(base.state.partition(b"\n")[0])
            params.update(created_at=created_at, ttl_ms=state["ttl_ms"])
            last = (base.version, base.head_hash, "ContextDeleted" if state["deleted"] else "")
        count = 0
        with self._transaction(write=True) as cur:
            cur.execute(self._sql.session, params)
            if cur.fetchone() is not None:
                raise exists
            if base is not None:
                self.bases.insert(cur, base._replace(session_id=session_id), self.clock())
            batch: list[EventRow] = []
            for row in rows:
                if type(row) is not tuple or len(row) != len(EVENT_COLUMNS) or row[0] != session_id:
                    raise InvalidInputError(
                        f"load takes EventRow tuples of session {session_id!r} "
                        f"({', '.join(EVENT_COLUMNS)}), not {row!r:.200}; nothing was loaded"
                    )
                _, version, kind, _, _, _, payload, recorded_at, digest, _ = row
                if kind == "ContextCreated":
                    params["created_at"] = recorded_at
                    params["ttl_ms"] = orjson.loads(payload).get("ttl_ms")
                batch.append(row)
                last = (version, digest, kind)
                if len(batch) == LOAD_BATCH:
                    count += self._load_batch(cur, batch, exists)
                    batch = []
            count += self._load_batch(cur, batch, exists)
            if last is None or params.get("created_at") is None:
                raise IntegrityError(
                    f"session {session_id!r}: a log without a ContextCreated cannot be loaded",
                    session_id=session_id,
                )
            params.update(
                new_version=last[0],
                new_hash=last[1],
                now=self.clock(),
                status=DELETED if last[2] == "ContextDeleted" else ACTIVE,
            )
            cur.execute(self._sql.load_head, params)
            if cur.rowcount != 1:  # created by another writer meanwhile
                raise exists
        return count

    def _load_batch(self, cur: Cursor, batch: list[EventRow], exists: SessionExistsError) -> int:
        if not batch:
            return 0
        try:
            self._insert(cur, batch)
        except ConcurrencyError:  # its versions were taken: created by another writer meanwhile
            raise exists from None
        return len(batch)

    # --- reading ------------------------------------------------------------------------------

    def reading(
        self, session_id: str, work: Callable[[SessionRead], T], *, consistent: bool = False
    ) -> T:
        """``work`` on one read transaction of ``session_id`` on one pooled connection (its
        head row, newest snapshot and rows: see SessionRead); what a restore and a full fold
        use. ``consistent``: every statement sees the same committed log. Made again on a
        fresh connection when the server dropped it, so ``work`` must only read."""
        check_session_id(session_id)

        def run(cur: Cursor) -> T:
            self._dialect.binary_rows(cur)
            read = SessionRead(
                cur, self._sql, session_id, self._hasher, self._check_snapshot, self.bases.read
            )
            try:
                return work(read)
            finally:
                self.rows_read += read.rows_read

        return self._run(run, write=False, consistent=consistent)

    def session(self, session_id: str) -> SessionHead | None:
        """The session's head row, or None if it never existed (or was purged)."""
        check_session_id(session_id)
        rows = self._fetch(self._sql.session, {"session_id": session_id})
        return SessionHead.from_row(rows[0]) if rows else None

    def sessions(self) -> list[SessionHead]:
        """Every session's head row (deleted ones included), ordered by id."""
        return [SessionHead.from_row(row) for row in self._fetch(self._sql.sessions)]

    def base(self, session_id: str) -> Base | None:
        """The session's retention base (its events up to the base's version were folded
        into it and removed), or None when its history is whole."""
        check_session_id(session_id)
        return self.bases.get(session_id)

    def read(
        self,
        session_id: str,
        from_version: int = 1,
        to_version: int | None = None,
        *,
        verify: bool = False,
    ) -> Iterator[RecordedEvent]:
        """Stream a session's events in version order, ``from_version`` to ``to_version``.

        Rows are fetched in chunks, each in its own short transaction; no connection is held
        while the caller iterates, and the history is never materialised whole. A session that
        does not exist (never created, or purged) raises SessionNotFoundError. A stored payload
        that is not JSON raises IntegrityError naming the session and version; with ``verify``
        so does an event whose stored hash does not match its contents (a folder that also
        checks each ``prev_hash`` link has then checked the chain of what it read).
        """
        check_session_id(session_id)
        high = _NO_UPPER if to_version is None else to_version
        make, loads, hasher = tuple.__new__, orjson.loads, self._hasher  # every restore's path
        empty = True
        for rows in self._pages(self._sql.read_chunk, session_id, from_version, high, 1):
            empty = False
            for position, version, type_, key, phase, run_id, payload, at, stored, prior in rows:
                try:
                    digest = stored if type(stored) is bytes else bytes(stored)
                    link = prior if type(prior) is bytes else bytes(prior)
                    if verify and digest != chain_hash(
                        link, session_id, version, type_, key, phase, run_id, at, payload, hasher
                    ):
                        raise IntegrityError(
                            f"session {session_id!r} version {version}: stored hash does not "
                            "match its contents; run verify",
                            session_id=session_id,
                            version=version,
                        )
                    value = loads(payload)
                except (orjson.JSONDecodeError, TypeError) as exc:
                    raise _unreadable(session_id, version, exc) from exc
                yield make(
                    RecordedEvent,
                    (
                        position,
                        session_id,
                        version,
                        type_,
                        key,
                        phase,
                        run_id,
                        value,
                        at,
                        digest,
                        link,
                    ),
                )
        if empty and self.session(session_id) is None:
            raise SessionNotFoundError(f"session {session_id!r} does not exist")

    def read_versions(self, session_id: str, versions: Collection[int]) -> list[RecordedEvent]:
        """The events of a session at ``versions`` (those that exist), in version order: point
        reads by the (session, version) key, so the cost follows how many are asked for."""
        check_session_id(session_id)
        wanted = sorted(set(versions))
        events: list[RecordedEvent] = []
        for start in range(0, len(wanted), 500):
            ev = schema.events
            stmt = (
                sa.select(*_EVENT_COLUMNS)
                .where(ev.c.session_id == session_id, ev.c.version.in_(wanted[start : start + 500]))
                .order_by(ev.c.version)
            )
            events.extend(self._select(stmt))
        return events

    def version_at(self, session_id: str, at_us: int, low: int, high: int) -> int | None:
        """The highest version from ``low`` to ``high`` recorded at or before ``at_us``, or
        None: a binary search of point reads (times never go backwards within a session)."""
        found = None
        while low <= high:
            middle = (low + high) // 2
            event = self.read_versions(session_id, [middle])
            if event and event[0].recorded_at_us <= at_us:
                found, low = middle, middle + 1
            else:
                high = middle - 1
        return found

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
        """Stream the events that match every filter given: of one session in version order
        (its versions ``from_version`` to ``to_version``), or of every session in position
        order. Times are µs since the epoch, both ends inclusive.

        The filters run in the database, so only matching rows travel; it still reads every
        row of the session (or of the log) to test them: no index beyond (session, version)
        is paid for on the append path.
        """
        ev = schema.events
        where: list[sa.ColumnElement[bool]] = []
        if session_id is not None:
            check_session_id(session_id)
            where += [ev.c.session_id == session_id, ev.c.version >= from_version]
            if to_version is not None:
                where.append(ev.c.version <= to_version)
        if types is not None:
            where.append(ev.c.type.in_(sorted(types)))
        for column, value in ((ev.c.key, key), (ev.c.phase, phase)):
            if value is not None:
                where.append(column == value)
        if execution_id is not None:
            where.append(ev.c.execution_id == execution_id)
        if since_us is not None:
            where.append(ev.c.recorded_at >= since_us)
        if until_us is not None:
            where.append(ev.c.recorded_at <= until_us)
        order = ev.c.version if session_id is not None else ev.c.position
        after = sa.bindparam("after", 0, type_=sa.BigInteger)
        stmt = (
            sa.select(*_EVENT_COLUMNS)
            .where(*where, order > after)
            .order_by(order)
            .limit(sa.bindparam("limit", READ_CHUNK, type_=sa.Integer))
        )
        compiled = stmt.compile(
            dialect=self._dialect.sql_dialect, compile_kwargs={"render_postcompile": True}
        )
        sql, params = str(compiled), dict(compiled.params)
        at = 2 if session_id is not None else 0
        while True:
            rows = self._fetch(sql, params)
            yield from map(_event_of, rows)
            if len(rows) < READ_CHUNK:
                return
            params["after"] = rows[-1][at]

    def _select(self, stmt: sa.Select[Any]) -> list[RecordedEvent]:
        """Run an ad hoc read of event rows (columns as ``_EVENT_COLUMNS``)."""
        compiled = stmt.compile(
            dialect=self._dialect.sql_dialect, compile_kwargs={"render_postcompile": True}
        )
        return list(map(_event_of, self._fetch(str(compiled), compiled.params)))

    def read_after(self, position: int, limit: int = READ_CHUNK) -> list[RecordedEvent]:
        """Up to ``limit`` events of every session with positions after ``position``, in
        position order: the global log, one page at a time.

        Positions are commit-ordered on every backend, so a reader that follows them (from the
        last position it saw) never skips an event, however many writers there are.
        """
        params = {"after": position, "limit": limit}
        return list(map(_event_of, self._fetch(self._sql.read_after, params)))

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
            rows = self._fetch(sql, params)
            if rows:
                yield rows
            if len(rows) < READ_CHUNK:
                return
            params["low"] = rows[-1][version_at] + 1

    def integrity_check(self) -> list[str] | None:
        """Run the database's own consistency check of its storage: the damage found (empty:
        none), or None where the backend has none (PostgreSQL without the amcheck extension).
        It sees broken pages that no hash chain read touches (indexes, other tables)."""
        return self._run(self._dialect.integrity_check, write=False)

    def verify(self, session_id: str) -> int:
        """Recompute a session's hash chain; return the events checked or raise IntegrityError.

        Catches a changed row, a missing or reordered event, and a truncated tail (the head row
        holds the chain head). After retention the chain is checked from the session's base
        (whose own digest is checked first). A session being removed raises
        SessionExpiredError.
        """
        found = self.session(session_id)
        if found is None:
            raise SessionNotFoundError(f"session {session_id!r} does not exist")
        check = ChainCheck(found, self._hasher, self.bases.get(session_id))
        for rows in self._pages(self._sql.read_chain, session_id, check.expected, _NO_UPPER, 0):
            for row in rows:
                check.feed(*row)
        return check.finish()

    def verify_all(self) -> Iterator[tuple[str, int | EventCtxError]]:
        """Check every session's chain in one streamed pass over the log (a few round trips
        per thousands of events, not several per session): for each session, in id order, the
        events verified or the error ``verify`` would raise."""
        heads = {h.session_id: h for h in self.sessions()}
        bases: dict[str, Base | IntegrityError] = {}
        for found in self.bases.all():
            bases[found.session_id if isinstance(found, Base) else str(found.session_id)] = found
        ev = schema.events
        stmt = (
            sa.select(ev.c.session_id, *(ev.c[n] for n in _CHAIN_COLUMNS))
            .where(
                sa.tuple_(ev.c.session_id, ev.c.version)
                > sa.tuple_(sa.bindparam("after_session", ""), sa.bindparam("after_version", 0))
            )
            .order_by(ev.c.session_id, ev.c.version)
            .limit(sa.bindparam("limit", READ_CHUNK, type_=sa.Integer))
        )
        compiled = stmt.compile(dialect=self._dialect.sql_dialect)
        sql, params = str(compiled), dict(compiled.params)
        seen: set[str] = set()
        current: tuple[str, ChainCheck] | None = None

        def check_of(session_id: str) -> ChainCheck:
            base = bases.get(session_id)
            if isinstance(base, IntegrityError):
                return ChainCheck(heads.get(session_id), self._hasher, error=base)
            return ChainCheck(heads.get(session_id), self._hasher, base)

        while True:
            rows = self._fetch(sql, params)
            for session_id, *row in rows:  # grouped by session, in the database's order
                if current is None or current[0] != session_id:
                    if current is not None:
                        yield current[0], current[1].result()
                    seen.add(session_id)  # None: events without a head row (removed meanwhile)
                    current = (session_id, check_of(session_id))
                current[1].feed(*row)
            if len(rows) < READ_CHUNK:
                break
            params["after_session"], params["after_version"] = rows[-1][0], rows[-1][1]
        if current is not None:
            yield current[0], current[1].result()
        for session_id in sorted(heads.keys() - seen):  # head rows without any event
            yield session_id, check_of(session_id).result()


class ChainCheck:
    """The hash-chain check of one session, fed its events in version order (after the first
    failure it only waits for ``finish`` to report it)."""

    __slots__ = ("error", "expected", "first", "hasher", "head", "prev")

    def __init__(
        self,
        head: SessionHead | None,
        hasher: Hasher,
        base: Base | None = None,
        *,
        error: IntegrityError | None = None,
    ) -> None:
        """Check from the start of the log, or from ``base`` after retention (its events,
        if some are still being removed, are skipped); ``error``: already failed."""
        self.head, self.hasher = head, hasher
        self.first, self.prev = (
            (1, GENESIS_HASH) if base is None else (base.version + 1, base.head_hash)
        )
        self.expected = self.first
        self.error = error

    def feed(
        self,
        version: int,
        type_: str,
        key: str | None,
        phase: str | None,
        execution_id: str | None,
        payload: bytes,
        at: int,
        hash_: bytes,
        prev_hash: bytes,
    ) -> None:
        if self.error is not None or self.head is None or version < self.first:
            return
        session_id = self.head.session_id
        where: dict[str, Any] = {"session_id": session_id, "version": version}
        at_v = f"session {session_id!r} version {version}"
        try:
            link, payload, hash_ = bytes(prev_hash), bytes(payload), bytes(hash_)
        except TypeError:  # a column of another type than eventctx writes (SQLite allows it)
            self.error = IntegrityError(f"{at_v}: a stored column has the wrong type", **where)
            return
        if version != self.expected:
            self.error = IntegrityError(
                f"{at_v}: expected version {self.expected} (a gap)", **where
            )
        elif link != self.prev:
            self.error = IntegrityError(
                f"{at_v}: prev_hash does not match the previous event", **where
            )
        else:
            self.prev = chain_hash(
                self.prev,
                session_id,
                version,
                type_,
                key,
                phase,
                execution_id,
                at,
                payload,
                self.hasher,
            )
            if self.prev != hash_:
                self.error = IntegrityError(
                    f"{at_v}: stored hash does not match its contents", **where
                )
            self.expected += 1

    def finish(self) -> int:
        """The events verified; raises what the check found."""
        head = self.head
        if head is None:
            raise SessionNotFoundError("the session was removed while it was being checked")
        if head.status == EXPIRING:
            raise SessionExpiredError(
                f"session {head.session_id!r} expired and is being removed (its first events "
                "are gone already); there is nothing to verify"
            )
        if self.error is not None:
            raise self.error
        last = self.expected - 1
        if last != head.version or self.prev != head.head_hash:
            raise IntegrityError(
                f"session {head.session_id!r}: log ends at version {last} but the head row "
                f"says {head.version}; events are missing or the head row was altered",
                session_id=head.session_id,
                version=last + 1,
            )
        return self.expected - self.first

    def result(self) -> int | EventCtxError:
        """What ``finish`` returns or raises, as a value."""
        try:
            return self.finish()
        except EventCtxError as exc:
            return exc


_CHAIN_COLUMNS: Final = EVENT_COLUMNS[1:]
"""What the chain check reads of each event: every column but the session id."""


def _lifecycle_inside(events: Sequence[NewEvent]) -> bool:
    """Whether a session is created after the start of ``events``, or deleted before their end."""
    return any(e.type == "ContextCreated" for e in events[1:]) or any(
        e.type == "ContextDeleted" for e in events[:-1]
    )


def _after_fork(ref: weakref.ReferenceType[EventStore]) -> None:
    store = ref()
    if store is not None:
        store._after_fork()


_EVENT_COLUMNS: Final = tuple(schema.events.c[name] for name in ("position", *EVENT_COLUMNS))
"""An event row's columns, in RecordedEvent's order."""


def _event_of(row: Sequence[Any]) -> RecordedEvent:
    """A RecordedEvent from a row of ``_EVENT_COLUMNS``."""
    try:
        return tuple.__new__(
            RecordedEvent, (*row[:7], orjson.loads(row[7]), row[8], bytes(row[9]), bytes(row[10]))
        )
    except (orjson.JSONDecodeError, TypeError) as exc:
        raise _unreadable(row[1], row[2], exc) from exc


def _unreadable(session_id: str, version: int, exc: Exception) -> IntegrityError:
    """A stored row that cannot be read as an event: a payload that is not JSON, or a column
    of another type than eventctx writes."""
    what = "the stored payload is not JSON" if isinstance(exc, ValueError) else "a stored column"
    return IntegrityError(
        f"session {session_id!r} version {version}: {what} ({exc}); run verify",
        session_id=session_id,
        version=version,
    )
