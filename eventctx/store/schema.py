"""The tables, declared once; every DDL statement and the schema files derive from here.

Times are integer microseconds since the Unix epoch (UTC) on both backends: exact, ordered,
and hashed as stored. Payloads are the canonical bytes that were hashed (not JSONB, which
would reorder keys).
"""

from __future__ import annotations

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
from sqlalchemy.engine import Dialect
from sqlalchemy.schema import CreateColumn, CreateIndex, CreateTable

SCHEMA_VERSION: Final = 5
"""The schema version this code writes; stamped in ``eventctx_schema``."""

MAX_SESSION_ID: Final = 512
MAX_NAME: Final = 64
"""The longest event type and execution id a database stores."""


metadata = MetaData()

events = Table(
    "eventctx_events",
    metadata,
    # INTEGER (not BIGINT) on SQLite so the column is the rowid; AUTOINCREMENT so a position
    # freed by compaction is never handed out again.
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
    sqlite_autoincrement=True,
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

# Rows of eventctx_events are immutable: each backend rejects every UPDATE, even a no-op one
# (PostgreSQL's trigger fires per statement, so even an UPDATE matching no row is refused).
_APPEND_ONLY = "eventctx_events is append-only: events are never updated"
TRIGGERS: Final[dict[str, tuple[str, ...]]] = {
    "sqlite": (
        "CREATE TRIGGER eventctx_events_no_update BEFORE UPDATE ON eventctx_events "
        f"BEGIN SELECT RAISE(ABORT, '{_APPEND_ONLY}'); END",
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
}
"""The tables and columns each upgrade from version N to N + 1 adds."""


def migration_statements(from_version: int, dialect: Dialect) -> list[str] | None:
    """DDL that takes a database from ``from_version`` to the next, or None if none exists."""
    added = _ADDED.get(from_version)
    if added is None:
        return None
    return [_add(item, dialect) for item in added]


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
    statements.extend(TRIGGERS[dialect.name])
    return statements
