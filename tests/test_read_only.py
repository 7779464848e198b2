"""EventStore.open(read_only=True): reads an existing eventctx database and changes nothing,
neither creating a file or a table nor letting any write through."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from eventctx import EventStore, NewEvent, SchemaError, StorageError
from eventctx.compaction import compact
from eventctx.store import Fence


def _tables(url: str) -> set[str]:
    """The tables of the database (SQLite) or schema (PostgreSQL) behind ``url``."""
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            return set(sa.inspect(conn).get_table_names())
    finally:
        engine.dispose()


def _file(url: str) -> Path | None:
    """The database file behind a SQLite ``url`` (None for PostgreSQL)."""
    made = sa.make_url(url)
    return Path(made.database or "") if made.get_backend_name() == "sqlite" else None


def test_a_read_only_store_reads_and_refuses_every_write(db_url: str) -> None:
    with EventStore.open(db_url) as writer:
        writer.append("s", [NewEvent.create("ContextCreated", {"ttl_ms": None})])
        writer.append("s", [NewEvent.create("KeySet", {"value": 1}, key="a")])
    with EventStore.open(db_url, read_only=True) as store:
        assert store.read_only
        assert [h.session_id for h in store.sessions()] == ["s"]
        assert [e.key for e in store.read("s")] == [None, "a"]
        assert store.verify("s") == 2 and dict(store.verify_all()) == {"s": 2}
        head = store.session("s")
        writes = [
            lambda: store.append("s", [NewEvent.create("KeySet", {"value": 2}, key="b")]),
            lambda: store.append("t", [NewEvent.create("ContextCreated", {"ttl_ms": None})]),
            lambda: store.touch("s"),
            lambda: store.take_lease("s", "me", timedelta(seconds=5)),
            lambda: store.release_lease("s", Fence("me", 1)),
            lambda: store.take_named_lease("job", "me", timedelta(seconds=5)),
            lambda: store.save_snapshot("s", 2, 1, b"h" * 32, b"{}"),
            lambda: store.purge("s"),
            lambda: compact(store),
        ]
        for write in writes:
            with pytest.raises(StorageError, match="opened read-only"):
                write()
        # Below the store, the database refuses too (SQLite: mode=ro; PostgreSQL: read-only
        # sessions).
        with store.engine.connect() as conn, pytest.raises(sa.exc.DBAPIError, match=r"read-?only"):
            conn.exec_driver_sql("CREATE TABLE intruder (x INTEGER)")
    with EventStore.open(db_url) as writer:
        assert writer.session("s") == head and writer.verify("s") == 2  # no lease, no activity
    assert "intruder" not in _tables(db_url)


def test_a_caller_engine_is_made_read_only(db_url: str) -> None:
    EventStore.open(db_url).close()
    engine = sa.create_engine(db_url)
    with EventStore.open(engine, read_only=True) as store:
        assert store.sessions() == []
        with store.engine.connect() as conn, pytest.raises(sa.exc.DBAPIError, match=r"read-?only"):
            conn.exec_driver_sql("CREATE TABLE intruder (x INTEGER)")
    assert "intruder" not in _tables(db_url)


def test_a_missing_sqlite_file_is_not_created(tmp_path: Path) -> None:
    path = tmp_path / "typo.db"
    with pytest.raises(StorageError, match=f"^no database at {re.escape(str(path))}$"):
        EventStore.open(f"sqlite:///{path}", read_only=True)
    assert list(tmp_path.iterdir()) == []


def test_a_foreign_database_is_refused_unchanged(db_url: str) -> None:
    engine = sa.create_engine(db_url, poolclass=sa.pool.NullPool)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total INTEGER)")
        conn.exec_driver_sql("INSERT INTO invoices VALUES (1, 100)")
    engine.dispose()
    file = _file(db_url)
    before = file.read_bytes() if file else None
    with pytest.raises(SchemaError, match=r"^not an eventctx database \(no eventctx tables\)$"):
        EventStore.open(db_url, read_only=True)
    assert _tables(db_url) == {"invoices"}
    if file:
        assert file.read_bytes() == before
        assert [p.name for p in file.parent.iterdir()] == [file.name]  # not even a journal


def test_an_empty_postgresql_schema_stays_empty(pg_url: str) -> None:
    with pytest.raises(SchemaError, match="not an eventctx database"):
        EventStore.open(pg_url, read_only=True)
    assert _tables(pg_url) == set()


@pytest.mark.parametrize(("version", "says"), [(1, "older"), (99, "newer")])
def test_another_schema_version_is_refused_unchanged(db_url: str, version: int, says: str) -> None:
    with EventStore.open(db_url) as store, store.engine.begin() as conn:
        conn.exec_driver_sql(f"UPDATE eventctx_schema SET version = {version}")
    tables, file = _tables(db_url), _file(db_url)
    before = file.read_bytes() if file else None
    with pytest.raises(SchemaError, match=f"schema version {version} is {says}"):
        EventStore.open(db_url, read_only=True)
    if file:
        assert file.read_bytes() == before
    assert _tables(db_url) == tables
    engine = sa.create_engine(db_url, poolclass=sa.pool.NullPool)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT version FROM eventctx_schema").scalar() == version
    engine.dispose()
