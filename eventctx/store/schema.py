"""The tables, declared once; every DDL statement and the schema files derive from here.

Times are integer microseconds since the Unix epoch (UTC) on both backends: exact, ordered,
and hashed as stored. Payloads are the canonical bytes that were hashed (not JSONB, which
would reorder keys).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from sqlalchemy import (
    BigInteger,
    Column,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects import sqlite
from sqlalchemy.engine import Dialect
from sqlalchemy.schema import CreateColumn, CreateIndex, CreateTable

SCHEMA_VERSION: Final = 6
"""The schema version this code writes; stamped in ``eventctx_schema``."""

MAX_SESSION_ID: Final = 512
MAX_NAME: Final = 64
"""The longest event type and execution id a database stores."""


metadata = MetaData()

events = Table(
    "eventctx_events",
    metadata,
    # INTEGER (not BIGINT) on SQLite so the column is the rowid. A position freed by a removal
    # is never handed out again: PostgreSQL's sequence never goes back, and on SQLite an append
    # takes positions above ``position_floor`` (AUTOINCREMENT would write its sequence row's
    # page on every commit).
    Column(
        "position",
        BigInteger().with_variant(Integer(), "sqlite"),
        primary_key=True,
        autoincrement=True,
    ),
    Column("session_id", String(MAX_SESSION_ID), nullable=False),
    Column("version", BigInteger, nullable=False),
    Column("type", String(MAX_NAME), nullable=False),
    Column("key", Text),
    Column("phase", Text),
    Column("execution_id", String(MAX_NAME)),
    Column("payload", LargeBinary, nullable=False),
    Column("recorded_at", BigInteger, nullable=False),
    Column("hash", LargeBinary, nullable=False),
    Column("prev_hash", LargeBinary, nullable=False),
    # The one index on the hot table: every read is by session and version. Blame of the
    # current state lives in the folded provenance, so no (session, key) index is paid per append.
    UniqueConstraint("session_id", "version", name="eventctx_events_session_version"),
)

sessions = Table(
    "eventctx_sessions",
    metadata,
    Column("session_id", String(MAX_SESSION_ID), primary_key=True),
    Column("version", BigInteger, nullable=False),
    Column("head_hash", LargeBinary, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("last_activity", BigInteger, nullable=False),
    Column("ttl_ms", BigInteger),
    Column("status", String(16), nullable=False),
    Column("lease_owner", String(128)),
    Column("lease_expires_at", BigInteger),
    # The run lease's fencing token: incremented each time the lease is taken, and checked
    # (with the owner) by every append a runner makes.
    Column("lease_token", BigInteger, nullable=False, server_default=text("0")),
)

snapshots = Table(
    "eventctx_snapshots",
    metadata,
    Column("session_id", String(MAX_SESSION_ID), nullable=False),
    Column("version", BigInteger, nullable=False),
    Column("fold_version", Integer, nullable=False),
    Column("head_hash", LargeBinary, nullable=False),
    Column("state", LargeBinary, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    # The hash (keyed like the chain) of the fields above: a restore uses only a snapshot that
    # still matches it. None in snapshots written before schema version 4 (never used).
    Column("digest", LargeBinary),
    PrimaryKeyConstraint("session_id", "version", name="eventctx_snapshots_pk"),
)

bases = Table(
    "eventctx_bases",
    metadata,
    Column("session_id", String(MAX_SESSION_ID), primary_key=True),
    # The session's base after retention: its events up to ``version`` were folded into
    # ``state`` and removed; the chain goes on from ``head_hash``, the hash at ``version``.
    Column("version", BigInteger, nullable=False),
    Column("fold_version", Integer, nullable=False),
    Column("head_hash", LargeBinary, nullable=False),
    Column("state", LargeBinary, nullable=False),
    # What the read side keeps of the removed events (phase ends, replaced values), JSON.
    Column("history", LargeBinary, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    # The hash (keyed like the chain) of the fields above but ``created_at``.
    Column("digest", LargeBinary, nullable=False),
)
"""One row per session whose oldest events retention has folded away; never a cache."""

leases = Table(
    "eventctx_leases",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("owner", String(128), nullable=False),
    Column("expires_at", BigInteger, nullable=False),
)
"""Named leases held across processes and hosts (the compaction job's, one at a time)."""

schema_version = Table(
    "eventctx_schema",
    metadata,
    Column("version", Integer, nullable=False),
    # How the hash chains are computed: "sha256", or "hmac-sha256" under a key the application
    # holds (never stored; ``key_check`` only tells a right key from a wrong one).
    Column("chain", String(16), nullable=False, server_default=text("'sha256'")),
    Column("key_check", LargeBinary),
)

position_floor = Table(
    "eventctx_position_floor",
    MetaData(),
    Column("position", Integer, nullable=False),
)
"""SQLite only, one row: no position at or below it is handed out again. Each removal of
events raises it to the largest position in the table first (``Dialect.keep_positions``)."""

# Rows of eventctx_events are immutable: each backend rejects every UPDATE, even a no-op one
# (PostgreSQL's trigger fires per statement, so even an UPDATE matching no row is refused).
_APPEND_ONLY = "eventctx_events is append-only: events are never updated"
_SQLITE_NO_UPDATE: Final = (
    "CREATE TRIGGER eventctx_events_no_update BEFORE UPDATE ON eventctx_events "
    f"BEGIN SELECT RAISE(ABORT, '{_APPEND_ONLY}'); END"
)
_SQLITE_FLOOR: Final = str(CreateTable(position_floor).compile(dialect=sqlite.dialect())).strip()
_AFTER_TABLES: Final[dict[str, tuple[str, ...]]] = {
    # Each backend's statements after the shared tables: the append-only trigger, and on
    # SQLite the position floor with its one row.
    "sqlite": (
        _SQLITE_NO_UPDATE,
        _SQLITE_FLOOR,
        "INSERT INTO eventctx_position_floor (position) VALUES (0)",
    ),
    "postgresql": (
        "CREATE FUNCTION eventctx_reject_update() RETURNS trigger LANGUAGE plpgsql AS $$ "
        f"BEGIN RAISE EXCEPTION '{_APPEND_ONLY}' USING ERRCODE = 'restrict_violation'; END $$",
        "CREATE TRIGGER eventctx_events_no_update BEFORE UPDATE ON eventctx_events "
        "FOR EACH STATEMENT EXECUTE FUNCTION eventctx_reject_update()",
    ),
}


_ADDED: Final[dict[int, tuple[Table | Column[Any], ...]]] = {
    1: (leases,),
    2: (sessions.c.lease_token,),
    3: (schema_version.c.chain, schema_version.c.key_check, snapshots.c.digest),
    4: (bases,),
    5: (),
}
"""The tables and columns each upgrade from version N to N + 1 adds."""


def migration_statements(from_version: int, dialect: Dialect) -> list[str] | None:
    """DDL that takes a database from ``from_version`` to the next, or None if none exists."""
    added = _ADDED.get(from_version)
    if added is None:
        return None
    rebuilt = _REBUILT.get((from_version, dialect.name))
    return [_add(item, dialect) for item in added] + ([] if rebuilt is None else rebuilt(dialect))


def _sqlite_events_without_autoincrement(dialect: Dialect) -> list[str]:
    """Version 6 on SQLite: the floor starts at the largest position ever handed out (the
    AUTOINCREMENT sequence's), then the events table is copied into one without it."""
    old, columns = f"{events.name}_v5", ", ".join(c.name for c in events.columns)
    return [
        _SQLITE_FLOOR,
        "INSERT INTO eventctx_position_floor (position) SELECT max("
        "coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'eventctx_events'), 0), "
        "coalesce((SELECT max(position) FROM eventctx_events), 0))",
        f"ALTER TABLE {events.name} RENAME TO {old}",
        str(CreateTable(events).compile(dialect=dialect)).strip(),
        f"INSERT INTO {events.name} ({columns}) SELECT {columns} FROM {old}",
        f"DROP TABLE {old}",  # and its trigger, which followed it
        _SQLITE_NO_UPDATE,
    ]


_REBUILT: Final[dict[tuple[int, str], Callable[[Dialect], list[str]]]] = {
    (5, "sqlite"): _sqlite_events_without_autoincrement,
}
"""What an upgrade from version N changes on one backend beyond what it adds (``_ADDED``)."""


def _add(item: Table | Column[Any], dialect: Dialect) -> str:
    if isinstance(item, Table):
        return str(CreateTable(item).compile(dialect=dialect)).strip()
    spec = str(CreateColumn(item).compile(dialect=dialect)).strip()
    return f"ALTER TABLE {item.table.name} ADD COLUMN {spec}"


def create_statements(dialect: Dialect) -> list[str]:
    """Every DDL statement that creates the schema on ``dialect``, in order."""
    statements: list[str] = []
    for table in metadata.sorted_tables:
        statements.append(str(CreateTable(table).compile(dialect=dialect)).strip())
        statements.extend(
            str(CreateIndex(index).compile(dialect=dialect)).strip() for index in table.indexes
        )
    statements.extend(_AFTER_TABLES[dialect.name])
    return statements
