"""Phase semantics users expect (attempt isolation, timings, retries, context parity) and the
small defects found with them."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from eventctx import ContextManager, ContextTypeError, EventStore, NewEvent


def test_type_errors_use_the_right_article(manager: ContextManager) -> None:
    ctx = manager.create_context("s")
    ctx.set("flag", True)
    with pytest.raises(ContextTypeError, match="holds a bool, not an int"):
        ctx.get_int("flag")


@pytest.mark.parametrize("scheme", ["postgresql", "postgres"])
def test_plain_postgresql_urls_use_psycopg(pg_url: str, scheme: str) -> None:
    url = sa.make_url(pg_url).set(drivername=scheme).render_as_string(hide_password=False)
    with EventStore.open(url) as store:
        store.append("s", [NewEvent.create("ContextCreated")])
        assert store.session("s") is not None
        assert store.engine.url.drivername == "postgresql+psycopg"
