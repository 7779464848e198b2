"""EventStore passes the read interface's conformance suite on every backend."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from eventctx import EventStore
from eventctx.testing import EventLogConformance


class TestEventStore(EventLogConformance):
    @pytest.fixture
    def event_log(self, db_url: str) -> Iterator[EventStore]:
        with EventStore.open(db_url) as store:
            yield store
