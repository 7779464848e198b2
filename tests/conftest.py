"""Backends for the shared suite: every test that takes ``db_url`` runs on SQLite (a file) and
on PostgreSQL (its own schema), the latter skipped only when no server answers and
EVENTCTX_REQUIRE_POSTGRES is not 1."""

from __future__ import annotations

import os
import signal
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa

from eventctx import ContextManager

DEFAULT_PG = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
PG_URL = os.environ.get("EVENTCTX_TEST_POSTGRES_URL", DEFAULT_PG)
REQUIRE_PG = os.environ.get("EVENTCTX_REQUIRE_POSTGRES") == "1"
_pg_problem: list[str | None] = []


def _pg_unavailable() -> str | None:
    """Why PostgreSQL can't be used (asked once per run), or None."""
    if not _pg_problem:
        url = sa.make_url(PG_URL)
        try:
            with psycopg.connect(
                host=url.host,
                port=url.port,
                user=url.username,
                password=url.password,
                dbname=url.database,
                connect_timeout=5,
            ):
                _pg_problem.append(None)
        except psycopg.Error as exc:
            _pg_problem.append(f"PostgreSQL at {url.render_as_string()} unavailable: {exc}")
    return _pg_problem[0]


def require_pg() -> None:
    """Skip the test when no PostgreSQL server answers, or fail it when
    EVENTCTX_REQUIRE_POSTGRES=1 (so a missing server never passes unnoticed in CI)."""
    problem = _pg_unavailable()
    if problem:
        if REQUIRE_PG:
            pytest.fail(f"{problem} (EVENTCTX_REQUIRE_POSTGRES=1)")
        pytest.skip(problem)


def pg_schema_url(schema: str) -> str:
    """The test server's URL with ``schema`` first on the search path."""
    url = sa.make_url(PG_URL).update_query_dict({"options": f"-csearch_path={schema}"})
    return url.render_as_string(hide_password=False)


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> str:
    """The backend under test."""
    if request.param == "postgresql":
        require_pg()
    return str(request.param)


@contextmanager
def _pg_schema() -> Iterator[str]:
    schema = f"ectx_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(PG_URL, poolclass=sa.pool.NullPool)
    with admin.begin() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    try:
        yield pg_schema_url(schema)
    finally:
        with admin.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
        admin.dispose()


@pytest.fixture
def db_url(backend: str, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database URL on the backend under test, removed afterwards."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'eventctx.db'}"
        return
    with _pg_schema() as url:
        yield url


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL schema's URL (for PostgreSQL-only tests)."""
    require_pg()
    with _pg_schema() as url:
        yield url


@pytest.fixture
def manager(db_url: str) -> Iterator[ContextManager]:
    """A started ContextManager on the backend under test."""
    with ContextManager(db_url) as m:
        yield m


@pytest.fixture
def ctrl_c() -> Iterator[None]:
    """Ctrl-C (SIGINT) raises KeyboardInterrupt in this test's process, also when the suite
    was started with SIGINT ignored (``nohup``, a job in the background of a script), which
    Python then leaves ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def interruptible(module: str) -> list[str]:
    """The command ``python -m module`` in a child whose Ctrl-C raises KeyboardInterrupt
    however this suite was started (see ``ctrl_c``)."""
    start = (
        "import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
        f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)"
    )
    return [sys.executable, "-c", start]
