"""SQLite: WAL, a busy timeout, and BEGIN IMMEDIATE for every write so that concurrent
processes queue for the write lock instead of failing with "database is locked". A read-only
store opens an existing file with ``mode=ro`` and leaves its journal mode alone."""

from __future__ import annotations

import functools
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.dialects.sqlite.pysqlite import SQLiteDialect_pysqlite
from sqlalchemy.engine import URL, Engine

from eventctx.errors import ConcurrencyError, EventCtxError, InvalidInputError, StorageError
from eventctx.store.dialect import Cursor, Dialect, StoreOptions, fetch_value
from eventctx.store.schema import events, position_floor

_CONSTRAINT_UNIQUE = 2067  # SQLITE_CONSTRAINT_UNIQUE: the (session_id, version) key
_BUSY = 5  # SQLITE_BUSY: the busy timeout passed

_LARGEST = sa.select(sa.func.max(events.c.position)).scalar_subquery()
_NEXT_POSITION = sa.func.max(
    sa.func.coalesce(_LARGEST, sa.literal_column("0")),
    sa.select(position_floor.c.position).scalar_subquery(),
) + sa.literal_column("1")
"""Above the table's largest position and the floor: two point reads of cached pages, where
AUTOINCREMENT would write its sequence row's page on every commit."""
_RAISE_FLOOR = str(
    sa.update(position_floor)
    .where(position_floor.c.position < _LARGEST)
    .values(position=_LARGEST)
    .compile(dialect=SQLiteDialect_pysqlite())
)


class SQLiteDialect(Dialect):
    """SQLite through the stdlib ``sqlite3`` driver."""

    name = "sqlite"
    sql_dialect = SQLiteDialect_pysqlite(paramstyle="named")
    positional_dialect = SQLiteDialect_pysqlite(paramstyle="qmark")

    def create_engine(self, url: URL, options: StoreOptions) -> Engine:
        database = url.database or ""
        if database in ("", ":memory:") or "mode=memory" in str(url.query):
            raise InvalidInputError(
                "an in-memory SQLite database is private to one connection; "
                "use a file, e.g. sqlite:///eventctx.db (a temporary directory works for tests)"
            )
        connect_args = {"check_same_thread": False, "timeout": options.busy_timeout_s}
        connect: dict[str, Any] = {"connect_args": connect_args}
        if options.read_only:  # mode=ro: SQLite neither creates the file nor writes to it
            uri = f"{_existing_file(database).as_uri()}?mode=ro"
            connect = {"creator": functools.partial(sqlite3.connect, uri, uri=True, **connect_args)}
        engine = sa.create_engine(url, pool_size=8, max_overflow=16, **connect)
        self.prepare_engine(engine, options)
        return engine

    def prepare_engine(self, engine: Engine, options: StoreOptions) -> None:
        busy_ms = int(options.busy_timeout_s * 1000)

        def on_connect(dbapi_conn: sqlite3.Connection, _record: object) -> None:
            # Transactions are begun explicitly (BEGIN IMMEDIATE for writes), never by the driver.
            dbapi_conn.isolation_level = None
            dbapi_conn.execute(f"PRAGMA busy_timeout = {busy_ms}")
            if options.read_only:  # query_only holds for a caller's engine too; WAL would write
                dbapi_conn.execute("PRAGMA query_only = ON")
                return
            _use_wal(dbapi_conn, options.busy_timeout_s)
            dbapi_conn.execute(f"PRAGMA synchronous = {options.synchronous}")

        event.listen(engine, "connect", on_connect)
        engine.dispose()  # connections made before the listener must not be reused

    def begin_write(self, cur: Cursor) -> None:
        cur.execute("BEGIN IMMEDIATE")

    def begin_read(self, cur: Cursor) -> None:
        cur.execute("BEGIN")

    def commit(self, conn: Any, cur: Cursor) -> None:
        # The connection's statement cache keeps COMMIT prepared; ``conn.commit()`` prepares
        # it anew each time.
        cur.execute("COMMIT")

    def table_names(self, cur: Cursor) -> set[str]:
        cur.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        return {row[0] for row in cur.fetchall()}

    def integrity_check(self, cur: Cursor) -> list[str] | None:
        cur.execute("PRAGMA integrity_check")
        found = [line for row in cur.fetchall() for line in str(row[0]).splitlines()]
        return [] if found == ["ok"] else found

    def insert_events(
        self, cur: Cursor, insert: str, returning: str, rows: Sequence[Sequence[Any]]
    ) -> list[int]:
        if len(rows) == 1:
            cur.execute(insert, rows[0])
            return [cur.lastrowid]
        cur.executemany(insert, rows)
        # Under the write lock each row takes the next position, so they end at the last one.
        cur.execute("SELECT last_insert_rowid()")
        last = int(fetch_value(cur))
        return list(range(last - len(rows) + 1, last + 1))

    def insert_events_statement(self, table: sa.Table, columns: Sequence[str]) -> sa.Insert:
        return super().insert_events_statement(table, columns).values(position=_NEXT_POSITION)

    def keep_positions(self, cur: Cursor) -> None:
        cur.execute(_RAISE_FLOOR)

    def insert_ignore(self, table: sa.Table) -> sa.Insert:
        return sqlite_insert(table).on_conflict_do_nothing()

    def classify(self, exc: Exception) -> type[EventCtxError] | None:
        if not isinstance(exc, sqlite3.Error):
            return None
        if getattr(exc, "sqlite_errorcode", None) == _CONSTRAINT_UNIQUE:
            return ConcurrencyError
        return StorageError

    def lock_timed_out(self, exc: Exception) -> bool:
        return isinstance(exc, sqlite3.Error) and getattr(exc, "sqlite_errorcode", None) == _BUSY


def _use_wal(conn: sqlite3.Connection, timeout_s: float) -> None:
    """Put the database in WAL mode (persistent: normally only its first connection does).

    Switching modes needs a moment alone with the file and SQLite reports "locked" at once
    instead of waiting, so a connection that finds it not yet WAL retries for a while.
    """
    deadline = time.monotonic() + timeout_s
    while conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
        try:
            conn.execute("PRAGMA journal_mode = WAL")
        except sqlite3.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.005)


def _existing_file(database: str) -> Path:
    """The absolute path of an existing database file; StorageError if there is none."""
    path = Path(database).absolute()
    if not path.is_file():
        raise StorageError(f"no database at {path}")
    return path
