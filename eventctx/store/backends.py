"""Which dialect serves a database URL (the backends import psycopg or sqlite3 lazily)."""

from __future__ import annotations

from sqlalchemy.engine import URL

from eventctx.errors import InvalidInputError
from eventctx.store.dialect import Dialect

__all__ = ["for_url"]


def for_url(url: URL) -> Dialect:
    """The dialect for a database URL; InvalidInputError for an unsupported backend."""
    backend = url.drivername.split("+", 1)[0]
    if backend == "sqlite":
        from eventctx.store.sqlite import SQLiteDialect  # noqa: PLC0415 (lazy: per backend)

        return SQLiteDialect()
    if backend in ("postgresql", "postgres"):
        from eventctx.store.postgresql import PostgreSQLDialect  # noqa: PLC0415 (needs psycopg)

        return PostgreSQLDialect()
    raise InvalidInputError(
        f"unsupported database {url.render_as_string()!r}: use sqlite:///FILE or "
        "postgresql+psycopg://USER@HOST/DB"
    )
