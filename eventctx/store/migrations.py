"""Schema bootstrap and migration, inside one write transaction: a new database is created and
stamped (safely when several processes open it at once), an older one is upgraded only when
asked, and a newer or foreign one is refused with SchemaError."""

from __future__ import annotations

from eventctx.errors import SchemaError
from eventctx.store import schema
from eventctx.store.dialect import Cursor, Dialect, fetch_value
from eventctx.store.statements import Statements

__all__ = ["ensure_schema"]


def ensure_schema(cur: Cursor, dialect: Dialect, sql: Statements, *, upgrade: bool) -> None:
    """Create, check or (with ``upgrade``) migrate the schema of the database behind ``cur``."""
    dialect.lock_setup(cur)
    tables = dialect.table_names(cur)
    if schema.schema_version.name not in tables:
        ours = tables & set(schema.metadata.tables)
        if ours:
            raise SchemaError(
                f"database has eventctx tables {sorted(ours)} but no schema version; "
                "it was not created by eventctx or its creation was interrupted"
            )
        for statement in schema.create_statements(dialect.sql_dialect):
            cur.execute(statement)
        cur.execute(sql.stamp, {"version": schema.SCHEMA_VERSION})
        return
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
    for version in range(found, schema.SCHEMA_VERSION):
        steps = schema.migration_statements(version, dialect.sql_dialect)
        if steps is None:
            raise SchemaError(f"no migration from schema version {version} to {version + 1}")
        for statement in steps:
            cur.execute(statement)
        cur.execute(sql.restamp, {"version": version + 1})
