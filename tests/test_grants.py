"""The database roles of docs/security.md, run as written: the application's role appends
and runs but cannot delete or update events (nor compact); the maintenance role compacts."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from eventctx import ContextManager, EventStore, PluginRunner, StorageError
from eventctx.compaction import compact

DOC = Path(__file__).resolve().parents[1] / "docs" / "security.md"


def _grants() -> str:
    found = re.search(r"```sql\n(.*?)```", DOC.read_text(), re.S)
    assert found, "docs/security.md has no sql block"
    return found.group(1)


@pytest.fixture
def roles(pg_url: str) -> Iterator[tuple[str, str]]:
    """URLs of the schema as an application role and as a maintenance role, granted as the
    document says."""
    url = sa.make_url(pg_url)
    schema = re.search(r"search_path=(\w+)", str(url.query["options"]))
    assert schema
    tag = uuid.uuid4().hex[:8]
    app, maintenance = f"ectx_app_{tag}", f"ectx_maint_{tag}"
    EventStore.open(pg_url).close()  # the owner creates the schema
    admin = sa.create_engine(pg_url, poolclass=sa.pool.NullPool)
    sql = (
        _grants()
        .replace("eventctx_schema_name", schema[1])
        .replace("eventctx_maintenance", maintenance)
        .replace("eventctx_app", app)
    )
    with admin.begin() as conn:
        conn.exec_driver_sql(f"CREATE ROLE {app} LOGIN")
        conn.exec_driver_sql(f"CREATE ROLE {maintenance} LOGIN")
        for statement in re.sub(r"--[^\n]*", "", sql).split(";"):
            if statement.strip():
                conn.exec_driver_sql(statement)
    try:
        yield (
            url.set(username=app).render_as_string(hide_password=False),
            url.set(username=maintenance).render_as_string(hide_password=False),
        )
    finally:
        with admin.begin() as conn:
            for role in (app, maintenance):
                conn.exec_driver_sql(f"DROP OWNED BY {role}")
                conn.exec_driver_sql(f"DROP ROLE {role}")
        admin.dispose()


def test_the_application_appends_and_the_maintenance_role_compacts(
    roles: tuple[str, str],
) -> None:
    app_url, maintenance_url = roles
    with ContextManager(app_url, cleanup_interval=None, snapshot_every=2) as manager:
        ctx = manager.create_context("kept", ttl=None)
        for i in range(5):
            ctx.set(f"k{i}", i)  # snapshots too
        result = PluginRunner(manager, [lambda _: "ok"]).run("kept")
        assert result.status == "completed"
        manager.create_context("short", ttl=timedelta(milliseconds=100)).set("a", 1)
        assert manager.store.verify("kept") == manager.get_context("kept").version
        engine = manager.store.engine
        for sql in (
            "DELETE FROM eventctx_events",
            "UPDATE eventctx_events SET payload = payload",
            "DELETE FROM eventctx_sessions",
            "DELETE FROM eventctx_snapshots",
            "DELETE FROM eventctx_bases",
        ):
            with engine.connect() as conn, pytest.raises(sa.exc.DBAPIError, match="denied"):
                conn.exec_driver_sql(sql)
        time.sleep(0.2)
        with pytest.raises(StorageError, match="denied"):
            compact(manager.store)  # the application cannot remove anything
        with pytest.raises(StorageError, match="denied"):
            compact(manager.store, retain=timedelta(microseconds=1))  # nor trim history
        kept = manager.get_context("kept").to_dict()
    with EventStore.open(maintenance_url) as store:
        report = compact(store, retain=timedelta(microseconds=1))
        assert report.sessions == ["short"] and store.session("short") is None
        assert report.trimmed["kept"] > 1  # up to the latest run, which stays whole
        assert store.verify("kept") > 0
    with ContextManager(app_url, cleanup_interval=None) as manager:
        assert manager.get_context("kept").to_dict() == kept
