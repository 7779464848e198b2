"""The peer library, ``eventsourcing``, configured as fairly as we know how: explicit
event classes (its fastest way to trigger), WAL, and on SQLite the same ``synchronous``
setting as ours (its own default leaves SQLite at FULL)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from eventsourcing.application import Application
from eventsourcing.domain import Aggregate
from eventsourcing.sqlite import SQLiteConnectionPool

from tools.bench.common import PG_URL

_original_create = SQLiteConnectionPool._create_connection
_synchronous = ["NORMAL"]


def _create_connection(self: SQLiteConnectionPool) -> Any:
    """Its pool's connection factory, plus our ``PRAGMA synchronous``."""
    conn = _original_create(self)
    raw: sqlite3.Connection = conn._sqlite_conn
    raw.execute(f"PRAGMA synchronous = {_synchronous[0]}")
    return conn


SQLiteConnectionPool._create_connection = _create_connection  # type: ignore[method-assign]


class PeerContext(Aggregate):
    """A context as an eventsourcing aggregate: one event per key set."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}

    class KeySet(Aggregate.Event):
        key: str
        value: Any

        def apply(self, aggregate: Any) -> None:
            aggregate.data[self.key] = self.value

    def set(self, key: str, value: Any) -> None:
        self.trigger_event(self.KeySet, key=key, value=value)


@contextmanager
def peer_app(
    backend: str,
    *,
    sqlite_path: str | None = None,
    pg_schema: str | None = None,
    synchronous: str = "NORMAL",
    snapshot_every: int | None = None,
) -> Iterator[Any]:
    """An eventsourcing Application on ``backend``, optionally snapshotting."""
    _synchronous[0] = synchronous
    if backend == "sqlite":
        env = {"PERSISTENCE_MODULE": "eventsourcing.sqlite", "SQLITE_DBNAME": str(sqlite_path)}
    else:
        url = sa.make_url(PG_URL)
        env = {
            "PERSISTENCE_MODULE": "eventsourcing.postgres",
            "POSTGRES_DBNAME": str(url.database),
            "POSTGRES_HOST": str(url.host),
            "POSTGRES_PORT": str(url.port or 5432),
            "POSTGRES_USER": str(url.username),
            "POSTGRES_PASSWORD": url.password or "",
            "POSTGRES_SCHEMA": str(pg_schema),
        }
    if snapshot_every:
        env["IS_SNAPSHOTTING_ENABLED"] = "y"
    cls = type(
        "PeerApp",
        (Application,),
        {"snapshotting_intervals": {PeerContext: snapshot_every}} if snapshot_every else {},
    )
    app = cls(env=env)
    try:
        yield app
    finally:
        app.close()
