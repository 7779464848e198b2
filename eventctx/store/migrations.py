"""Schema bootstrap and migration, inside one write transaction: a new database is created and
stamped (safely when several processes open it at once), an older one is upgraded only when
asked, and a newer or foreign one is refused with SchemaError. A read-only store only checks,
with reads alone."""

from __future__ import annotations

from eventctx.errors import SchemaError
from eventctx.store import schema
from eventctx.store.dialect import Cursor, Dialect, fetch_value
from eventctx.store.statements import Statements

__all__ = ["check_schema", "ensure_schema"]


def ensure_schema(cur: Cursor, dialect: Dialect, sql: Statements, *, upgrade: bool) -> int | None:
    """Create, check or (with ``upgrade``) migrate the schema of the database behind ``cur``:
    the older version it was migrated from, or None (created, or already current)."""
    dialect.lock_setup(cur)
    if not _stamped(cur, dialect):
        for statement in schema.create_statements(dialect.sql_dialect):
            cur.execute(statement)
        cur.execute(sql.stamp, {"version": schema.SCHEMA_VERSION})
        return None
    found = _version(cur, sql, upgrade=upgrade)
    for version in range(found, schema.SCHEMA_VERSION):
        steps = schema.migration_statements(version, dialect.sql_dialect)
        if steps is None:
            raise SchemaError(f"no migration from schema version {version} to {version + 1}")
        for statement in steps:
            cur.execute(statement)
        cur.execute(sql.restamp, {"version": version + 1})
    return found if found < schema.SCHEMA_VERSION else None


def check_schema(cur: Cursor, dialect: Dialect, sql: Statements) -> None:
    """Check that the database behind ``cur`` has this eventctx's schema, changing nothing:
    only SELECTs, so it runs in a read transaction of a read-only connection."""
    if not _stamped(cur, dialect):
        raise SchemaError("not an eventctx database (no eventctx tables)")
    _version(cur, sql, upgrade=False)


def _stamped(cur: Cursor, dialect: Dialect) -> bool:
    """Whether the database has eventctx's schema stamp (False: no eventctx table at all)."""
    tables = dialect.table_names(cur)
    if schema.schema_version.name in tables:
        return True
    ours = tables & set(schema.metadata.tables)
    if ours:
        raise SchemaError(
            f"database has eventctx tables {sorted(ours)} but no schema version; "
            "it was not created by eventctx or its creation was interrupted"
        )
    return False


def _version(cur: Cursor, sql: Statements, *, upgrade: bool) -> int:
    """The stamped schema version, if this eventctx can use it (older ones with ``upgrade``)."""
    cur.execute(sql.schema_version)
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
    return int(found)
