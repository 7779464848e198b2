"""PostgreSQL through psycopg 3: row locks on the head row order writers of one session;
advisory locks serialize schema creation and make positions commit-ordered."""

from __future__ import annotations

import math
import os
import re
import select
import time
from collections.abc import Sequence
from typing import Any, Final

import psycopg
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg
from sqlalchemy.engine import URL, Engine
from sqlalchemy.sql.expression import ClauseElement

from eventctx.errors import ConcurrencyError, EventCtxError, StorageError
from eventctx.store.dialect import Cursor, Dialect, StoreOptions, fetch_value

_UNIQUE_VIOLATION = "23505"
_LOCK_NOT_AVAILABLE = "55P03"
# Class 08 (connection exception) and the server shutting the session down (57P01-57P03).
_CONNECTION_LOST = ("08", "57P01", "57P02", "57P03")
# Keyed on the schema, so that stores in unrelated schemas of one database never wait on
# each other.
_ARRAY_BIND = re.compile(r"%\((\w+)\)s(::[A-Z0-9() ]+\[\])")
"""A bind parameter cast to an array type, as SQLAlchemy renders it for psycopg."""
PING_AFTER_IDLE_S: Final = 10.0
"""A pooled connection idle longer than this is pinged before use (seconds)."""
_IDLE_SINCE = "eventctx_idle_since"
KEEPALIVES: Final = {
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
}
"""libpq's keepalive settings for connections over TCP: a path that went dead without a word
(no reset) fails a connection idle or waiting on it after about a minute of unanswered
probes, instead of when the kernel's retransmissions give up (15 minutes or more). Data
sent on it and never acknowledged fails it after ``UNACKNOWLEDGED_S`` more than the busy
timeout (``tcp_user_timeout``, from libpq 12). A caller that sets any of these, or names a
service or a connection string, keeps its own."""
UNACKNOWLEDGED_S: Final = 30
_OWN_SETTINGS: Final = (*KEEPALIVES, "tcp_user_timeout", "service", "dsn", "conninfo")
_SETUP_LOCK = "SELECT pg_advisory_xact_lock(hashtext('eventctx:' || current_schema()))"
_INSERT_LOCK_KEY = "hashtext('eventctx:insert:' || current_schema())"


def _array_of(column: sa.Column[Any]) -> ARRAY[Any]:
    """The array type a column's values are bound as. A string's length is left out: a cast
    to ``varchar(n)`` cuts a longer value short without a word, where the column refuses it."""
    kind = column.type
    return ARRAY(sa.Text() if isinstance(kind, sa.String) else kind)


class PostgreSQLDialect(Dialect):
    """PostgreSQL (``postgresql+psycopg://``); ``synchronous_commit`` is left to the server."""

    name = "postgresql"
    sql_dialect = PGDialect_psycopg()  # type: ignore[no-untyped-call]
    positional_dialect = PGDialect_psycopg(paramstyle="format")  # type: ignore[no-untyped-call]
    row_locks = True

    def create_engine(self, url: URL, options: StoreOptions) -> Engine:
        if url.drivername != "postgresql+psycopg":  # postgres://, postgresql://: psycopg 3
            url = url.set(drivername="postgresql+psycopg")
        engine = sa.create_engine(url, pool_size=8, max_overflow=16)
        self.prepare_engine(engine, options)
        return engine

    def prepare_engine(self, engine: Engine, options: StoreOptions) -> None:
        timeout_ms = max(1, int(options.busy_timeout_s * 1000))

        def on_connect(dbapi_conn: psycopg.Connection[Any], _record: object) -> None:
            # The busy timeout: how long any statement waits for a lock another holds.
            with dbapi_conn.cursor() as cur:
                cur.execute(f"SET lock_timeout = {timeout_ms}")
                if options.read_only:  # the server refuses every write of the session
                    cur.execute("SET default_transaction_read_only = on")
            dbapi_conn.commit()

        def on_checkin(dbapi_conn: psycopg.Connection[Any] | None, record: Any) -> None:
            # A read leaves its connection in autocommit (see begin_read): give it back to
            # the pool as SQLAlchemy and every writer expect it, one transaction at a time.
            if dbapi_conn is not None and not dbapi_conn.closed:
                dbapi_conn.autocommit = False
            record.info[_IDLE_SINCE] = time.monotonic()

        def on_checkout(dbapi_conn: psycopg.Connection[Any], record: Any, _proxy: object) -> None:
            # A pooled connection the server dropped (a restart, a terminated backend, its
            # idle timeout) is replaced before use instead of failing the read or write that
            # gets it. The server says so on the socket (an idle connection has nothing to read
            # otherwise): looking costs a system call where a ping costs a round trip. A path
            # that went dead without a word (a NAT or load balancer that forgot an idle flow)
            # only shows when something is sent: a connection idle for a while is pinged.
            if dbapi_conn.closed or _has_input(dbapi_conn.fileno()):
                raise sa.exc.DisconnectionError("the server closed this pooled connection")
            idle_s = time.monotonic() - record.info.get(_IDLE_SINCE, math.inf)
            if idle_s > PING_AFTER_IDLE_S:
                try:
                    engine.dialect.do_ping(dbapi_conn)  # type: ignore[arg-type]
                except psycopg.Error as exc:
                    raise sa.exc.DisconnectionError(f"a pooled connection is gone: {exc}") from exc

        tcp = dict(KEEPALIVES)
        if psycopg.pq.version() >= 120000:
            # Past the busy timeout: a pipeline's statements wait up to it for a lock, and the
            # server reads no more of them meanwhile.
            tcp["tcp_user_timeout"] = (int(options.busy_timeout_s) + UNACKNOWLEDGED_S) * 1000

        def on_do_connect(_dialect: object, _record: object, _args: object, params: Any) -> None:
            own = os.environ.get("PGSERVICE") or any(name in params for name in _OWN_SETTINGS)
            if not own:  # the caller's own settings, or ones we cannot see, stand
                params.update(tcp)

        event.listen(engine, "do_connect", on_do_connect)
        event.listen(engine, "connect", on_connect)
        event.listen(engine, "checkout", on_checkout)
        event.listen(engine, "checkin", on_checkin)
        engine.dispose()  # connections made before the listener must not be reused

    def compile(self, stmt: ClauseElement) -> str:
        # Arrays go in binary: in text each element is quoted and escaped, by a regex in
        # Python, which cost more than the rest of a 100-event append.
        return _ARRAY_BIND.sub(r"%(\1)b\2", super().compile(stmt))

    def binary_rows(self, cur: Cursor) -> None:
        # bytea as text is hex: twice the bytes on the wire, then parsed back in Python.
        cur.format = psycopg.pq.Format.BINARY  # type: ignore[attr-defined]

    def begin_write(self, cur: Cursor) -> None:
        cur.connection.autocommit = False

    def begin_read(self, cur: Cursor) -> None:
        # Under read committed each statement sees what was committed when it started, inside
        # a transaction or not; without one a read saves the BEGIN and COMMIT round trips.
        cur.connection.autocommit = True

    def begin_snapshot(self, cur: Cursor) -> None:
        # Read committed gives each statement its own view; this gives the transaction one.
        cur.connection.autocommit = False
        cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")

    def lock_setup(self, cur: Cursor) -> None:
        cur.execute(_SETUP_LOCK)

    def table_names(self, cur: Cursor) -> set[str]:
        cur.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()"
        )
        return {row[0] for row in cur.fetchall()}

    def integrity_check(self, cur: Cursor) -> list[str] | None:
        # Checking a whole database needs the amcheck extension, which eventctx does not ask
        # a server to have; pages with data checksums are checked as they are read.
        return None

    def insert_events(
        self, cur: Cursor, insert: str, returning: str, rows: Sequence[Sequence[Any]]
    ) -> list[int]:
        if len(rows) == 1:
            cur.execute(returning, rows[0])
            return [int(fetch_value(cur))]
        cur.executemany(returning, rows, returning=True)  # type: ignore[call-arg]
        positions: list[int] = []
        while True:
            positions.append(int(fetch_value(cur)))
            if not cur.nextset():
                return positions

    def insert_events_statement(self, table: sa.Table, columns: Sequence[str]) -> sa.Insert:
        # Positions come from a sequence, handed out before commit: without a lock, rows 1, 2
        # and 4 could be visible while 3 has not committed yet, and a reader following
        # positions would skip 3. The INSERT itself takes a transaction-level advisory lock
        # (in the same round trip) before its row takes a position, and holds it to commit.
        # Inserts so commit one transaction at a time, in position order. Nothing that holds
        # it waits for a row lock: it is taken after the head rows staged before it are
        # locked, and the head rows a group's one-statement appends move after it are locked
        # with SKIP LOCKED (a row another transaction holds is left, its append made alone).
        lock = sa.select(sa.func.pg_advisory_xact_lock(sa.literal_column(_INSERT_LOCK_KEY)))
        row = sa.select(
            *(sa.bindparam(name, type_=table.c[name].type) for name in columns)
        ).select_from(lock.cte("eventctx_insert_lock"))
        return sa.insert(table).from_select(list(columns), row)

    def insert_ignore(self, table: sa.Table) -> sa.Insert:
        return pg_insert(table).on_conflict_do_nothing()

    def append_in_one(
        self, advance: sa.Update, table: sa.Table, per_event: Sequence[str]
    ) -> sa.Insert | None:
        # WITH moved AS (UPDATE head … RETURNING), lock AS (the insert lock, once per row
        # moved) INSERT … SELECT FROM lock, unnest(arrays): nothing is inserted, and the lock
        # is not taken, unless the head row moved. Sent in autocommit, it is the whole append
        # in one round trip; the lock is held to its commit, as for a two-statement append.
        moved = advance.returning(sa.literal_column("session_id")).cte("eventctx_moved")
        lock = (
            sa.select(sa.func.pg_advisory_xact_lock(sa.literal_column(_INSERT_LOCK_KEY)))
            .select_from(moved)
            .cte("eventctx_insert_lock")
        )
        shared = {
            "session_id": sa.bindparam("session_id", type_=table.c.session_id.type),
            "recorded_at": sa.bindparam("now", type_=table.c.recorded_at.type),
        }
        arrays = (
            sa.func.unnest(*(sa.bindparam(f"{n}s", type_=_array_of(table.c[n])) for n in per_event))
            .table_valued(*per_event)
            .render_derived(name="eventctx_rows")
        )
        rows = sa.select(*shared.values(), *(arrays.c[n] for n in per_event)).select_from(
            lock, arrays
        )
        return (
            sa.insert(table)
            .from_select([*shared, *per_event], rows)
            .returning(table.c.version, table.c.position)
        )

    def begin_single(self, cur: Cursor) -> None:
        cur.connection.autocommit = True

    def backend_id(self, conn: Any) -> int | None:
        return int(conn.info.backend_pid)

    def end_backend(self, cur: Cursor, backend: int) -> bool:
        cur.execute("SELECT pg_terminate_backend(%(pid)s)", {"pid": backend})
        cur.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %(pid)s", {"pid": backend})
        return int(fetch_value(cur)) == 0

    def commit_with(
        self, conn: Any, statements: Sequence[tuple[str, dict[str, Any]]]
    ) -> list[list[Any]]:
        # Pipeline mode: the statements and the COMMIT go out together, one round trip. With
        # no transaction open yet, BEGIN goes with them: psycopg would send its own first and
        # wait for it (the connection is in autocommit only for the pipeline's length; a
        # failure leaves a transaction that the committer's rollback ends).
        begin = conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        if begin:  # (psycopg refuses to switch autocommit inside a transaction, even to same)
            conn.autocommit = True
        try:
            with conn.pipeline():
                if begin:
                    conn.execute("BEGIN")
                cursors = [conn.execute(sql, params) for sql, params in statements]
                if begin:
                    conn.execute("COMMIT")
                else:
                    conn.commit()
        finally:
            if conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
                conn.autocommit = False
        return [cur.fetchall() for cur in cursors]

    def classify(self, exc: Exception) -> type[EventCtxError] | None:
        if not isinstance(exc, psycopg.Error):
            return None
        if exc.sqlstate == _UNIQUE_VIOLATION:
            return ConcurrencyError
        return StorageError

    def lock_timed_out(self, exc: Exception) -> bool:
        return isinstance(exc, psycopg.Error) and exc.sqlstate == _LOCK_NOT_AVAILABLE

    def connection_lost(self, exc: BaseException | None) -> bool:
        if not isinstance(exc, psycopg.OperationalError):
            return False  # psycopg reports a connection it found dead with no sqlstate
        return exc.sqlstate is None or exc.sqlstate.startswith(_CONNECTION_LOST)


def _has_input(fd: int) -> bool:
    """Whether the socket ``fd`` has something to read (or is closed) right now."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))
