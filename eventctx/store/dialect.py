"""What differs between backends, behind one small interface; and the one place driver errors
become eventctx errors.

The shared SQL implementation (``eventctx.store.core``) talks to DBAPI connections taken from
the SQLAlchemy pool and runs statements compiled once from the Core tables. A dialect supplies
only engine setup, how a transaction takes the write lock, and the few statements that differ.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Final, Literal

import sqlalchemy as sa
from sqlalchemy.engine import URL, Engine
from sqlalchemy.engine.interfaces import DBAPICursor
from sqlalchemy.sql.expression import ClauseElement

from eventctx.errors import ConcurrencyError, EventCtxError, StorageError

Synchronous = Literal["NORMAL", "FULL"]


Cursor = DBAPICursor
"""A DBAPI cursor (sqlite3 or psycopg)."""

Transaction = Callable[..., AbstractContextManager[Cursor]]
"""``transaction(write=…)``: a cursor in one transaction, committed if the block succeeds."""

TRIES_AFTER_DROP: Final = 3
"""How often an operation is tried in all while the server keeps dropping its connections
before COMMIT (each try on a fresh connection)."""


def fetch_value(cur: Cursor) -> Any:
    """The first column of the statement's next row (a row must come)."""
    row = cur.fetchone()
    if row is None:  # pragma: no cover - only after a statement that always yields a row
        raise StorageError("the database returned no row where one was certain")
    return row[0]


@dataclass(frozen=True, slots=True)
class StoreOptions:
    """Connection settings; each dialect uses what applies to it."""

    synchronous: Synchronous = "NORMAL"
    busy_timeout_s: float = 30.0
    read_only: bool = False
    """Open the database so that nothing can change it: no file, table or row is created."""


class Dialect:
    """Backend specifics; subclasses override only what differs."""

    name: str
    sql_dialect: sa.engine.Dialect
    """Dialect used to compile statements (named or pyformat parameters, so dicts bind)."""
    positional_dialect: sa.engine.Dialect
    """The same with positional parameters, for statements bound from tuples."""
    row_locks: bool = False
    """Whether writers lock single head rows (else the whole database is the write lock)."""

    def create_engine(self, url: URL, options: StoreOptions) -> Engine:
        """An engine for ``url`` configured for eventctx."""
        raise NotImplementedError

    def prepare_engine(self, engine: Engine, options: StoreOptions) -> None:
        """Configure a caller-supplied engine's connections for eventctx."""

    def begin_write(self, cur: Cursor) -> None:
        """Start a transaction that writes (and so queues behind other writers)."""

    def begin_read(self, cur: Cursor) -> None:
        """Start a read transaction (one consistent view for several statements)."""

    def commit(self, conn: Any, cur: Cursor) -> None:
        """Commit the transaction open on ``conn`` (the driver's connection or the pool's
        over it) and its cursor ``cur``."""
        conn.commit()

    def binary_rows(self, cur: Cursor) -> None:
        """Have ``cur`` return rows in the driver's binary format where it has one (bytes
        columns are then not sent as text to be decoded)."""

    def begin_snapshot(self, cur: Cursor) -> None:
        """Start a read transaction whose statements all see the same committed data."""
        self.begin_read(cur)

    def lock_setup(self, cur: Cursor) -> None:
        """Serialize schema creation across processes, inside the write transaction."""

    def table_names(self, cur: Cursor) -> set[str]:
        """Names of the tables visible to this connection."""
        raise NotImplementedError

    def integrity_check(self, cur: Cursor) -> list[str] | None:
        """The damage the database's own consistency check finds in its storage (empty: none),
        or None when the backend has no such check; a hash chain cannot see a broken page
        that no chain read touches."""
        raise NotImplementedError

    def insert_events(
        self, cur: Cursor, insert: str, returning: str, rows: Sequence[Sequence[Any]]
    ) -> list[int]:
        """Insert ``rows`` (tuples in the order of the statement's parameters) with one round
        trip per statement (``insert``, or ``returning``, the same INSERT returning the
        position) and return their positions in order."""
        raise NotImplementedError

    def insert_events_statement(self, table: sa.Table, columns: Sequence[str]) -> sa.Insert:
        """The INSERT of one event row, every column a bind parameter named after it."""
        return sa.insert(table).values({name: sa.bindparam(name) for name in columns})

    def keep_positions(self, cur: Cursor) -> None:
        """Before events are deleted in this write transaction: make sure that no position
        they free is handed out again (where the backend itself would reuse it)."""

    def insert_ignore(self, table: sa.Table) -> sa.Insert:
        """INSERT that does nothing when the primary key exists (rowcount tells which)."""
        raise NotImplementedError

    def append_in_one(
        self, advance: sa.Update, table: sa.Table, per_event: Sequence[str]
    ) -> sa.Insert | None:
        """One statement that moves the head row (``advance``) and, only if it matched, inserts
        the events (each of ``per_event`` bound as ``<name>s``, one array element per event;
        ``session_id`` and ``recorded_at`` bound once, as ``session_id`` and ``now``),
        returning each one's version and position. None where the backend cannot: its appends
        are the UPDATE and the INSERT, in one transaction."""
        return None

    def backend_id(self, conn: Any) -> int | None:
        """The server process serving ``conn`` (the driver's connection), where there is one."""
        return None

    def end_backend(self, cur: Cursor, backend: int) -> bool:
        """Ask the server to end its process ``backend`` (one of ours, whose connection was
        lost); whether it has ended."""
        raise NotImplementedError

    def begin_single(self, cur: Cursor) -> None:
        """Make the next statement a transaction of its own, committed when it returns."""
        raise NotImplementedError

    def commit_with(
        self, conn: Any, statements: Sequence[tuple[str, dict[str, Any]]]
    ) -> list[list[Any]]:
        """Run ``statements`` (SQL and parameters) in the open transaction of ``conn`` (the
        driver's connection) and commit it, in as few round trips as the driver can; the rows
        each statement returned."""
        raise NotImplementedError

    def classify(self, exc: Exception) -> type[EventCtxError] | None:
        """The eventctx error for a driver error, or None when it is not a driver error."""
        raise NotImplementedError

    def lock_timed_out(self, exc: Exception) -> bool:
        """Whether a driver error says the busy timeout passed while waiting for a lock."""
        raise NotImplementedError

    def connection_lost(self, exc: BaseException | None) -> bool:
        """Whether a driver error says the server dropped the connection (so a fresh one may
        succeed); an embedded database has no connection to lose."""
        return False

    def dropped(self, exc: BaseException) -> bool:
        """Whether ``exc`` (as ``translate_errors`` raised it) failed because the server
        dropped the connection: an operation that did not get to COMMIT may be made again."""
        cause = exc.__cause__
        if isinstance(cause, sa.exc.DBAPIError):
            cause = cause.orig
        return self.connection_lost(cause)

    def compile(self, stmt: ClauseElement) -> str:
        """SQL text of a Core statement for this backend's driver."""
        compiled = stmt.compile(dialect=self.sql_dialect)
        binds = getattr(compiled, "binds", {})
        fixed = [name for name, bind in binds.items() if bind.value is not None]
        if fixed:  # a literal became a bind parameter that callers would not know to pass
            raise ValueError(f"statement has unnamed parameters {fixed}: {compiled}")
        return str(compiled)

    def compile_positional(self, stmt: ClauseElement, names: Sequence[str]) -> str:
        """SQL text of a statement bound from tuples whose items are ``names``, in order: the
        driver binds a tuple faster than it looks names up in a dict."""
        compiled = stmt.compile(dialect=self.positional_dialect)
        order = getattr(compiled, "positiontup", None)
        if order != list(names):
            raise ValueError(f"statement binds {order}, not {list(names)}")
        return str(compiled)

    def translate_errors(self) -> _Translating:
        """Re-raise driver errors as eventctx errors, the original chained as the cause."""
        return _Translating(self)

    def translated(self, exc: Exception) -> EventCtxError | None:
        """The eventctx error a driver error ``exc`` is re-raised as (None: as it is)."""
        # The pool wraps errors raised while connecting; classify the driver's own error.
        orig = exc.orig if isinstance(exc, sa.exc.DBAPIError) and exc.orig else exc
        kind = self.classify(orig)
        if kind is None:
            return None
        if self.lock_timed_out(orig):
            return StorageError(
                "gave up waiting for a lock another connection holds (the store's "
                "busy_timeout passed); nothing was committed, try again"
            )
        return kind(_describe(kind, orig))


class _Translating:
    """``Dialect.translate_errors``: a plain context manager, as it is on every append's path
    (it holds no state, so one can serve every transaction of a dialect)."""

    __slots__ = ("_dialect",)

    def __init__(self, dialect: Dialect) -> None:
        self._dialect = dialect

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any
    ) -> None:
        if exc is None or isinstance(exc, EventCtxError) or not isinstance(exc, Exception):
            return
        translated = self._dialect.translated(exc)
        if translated is not None:
            raise translated from exc


def _describe(kind: type[EventCtxError], exc: Exception) -> str:
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if kind is ConcurrencyError:
        return f"another writer appended the same version ({detail}); re-read and retry"
    if kind is StorageError:
        return f"database error, nothing was committed: {detail}"
    return detail
