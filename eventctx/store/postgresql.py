"""PostgreSQL through psycopg 3: row locks on the head row order writers of one session;
an advisory lock serializes schema creation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg
from sqlalchemy.engine import URL, Engine

from eventctx.errors import ConcurrencyError, EventCtxError, StorageError
from eventctx.store.dialect import Cursor, Dialect, StoreOptions, fetch_value
from eventctx.store.statements import Statements

_UNIQUE_VIOLATION = "23505"


class PostgreSQLDialect(Dialect):
    """PostgreSQL (``postgresql+psycopg://``); ``synchronous_commit`` is left to the server."""

    name = "postgresql"
    sql_dialect = PGDialect_psycopg()  # type: ignore[no-untyped-call]

    def create_engine(self, url: URL, options: StoreOptions) -> Engine:
        if url.drivername != "postgresql+psycopg":
            url = url.set(drivername="postgresql+psycopg")
        return sa.create_engine(url, pool_size=8, max_overflow=16, pool_pre_ping=False)

    def lock_setup(self, cur: Cursor) -> None:
        # Key the lock on the schema so that setups of unrelated schemas don't wait on each other.
        cur.execute("SELECT pg_advisory_xact_lock(hashtext('eventctx:' || current_schema()))")

    def table_names(self, cur: Cursor) -> set[str]:
        cur.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()"
        )
        return {row[0] for row in cur.fetchall()}

    def insert_events(
        self, cur: Cursor, sql: Statements, rows: Sequence[dict[str, Any]]
    ) -> list[int]:
        if len(rows) == 1:
            cur.execute(sql.insert_event_returning, rows[0])
            return [int(fetch_value(cur))]
        cur.executemany(sql.insert_event_returning, rows, returning=True)  # type: ignore[call-arg]
        positions: list[int] = []
        while True:
            positions.append(int(fetch_value(cur)))
            if not cur.nextset():
                return positions

    def insert_ignore(self, table: sa.Table) -> sa.Insert:
        return pg_insert(table).on_conflict_do_nothing()

    def classify(self, exc: Exception) -> type[EventCtxError] | None:
        if not isinstance(exc, psycopg.Error):
            return None
        if exc.sqlstate == _UNIQUE_VIOLATION:
            return ConcurrencyError
        return StorageError
