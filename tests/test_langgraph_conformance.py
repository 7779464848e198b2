"""LangGraph's own checkpointer conformance suite, every capability, on each backend."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

pytest.importorskip("langgraph.checkpoint.conformance", reason="needs eventctx[langgraph]")

from langgraph.checkpoint.conformance import checkpointer_test, validate
from langgraph.checkpoint.conformance.report import ProgressCallbacks

from eventctx import EventStore
from eventctx.integrations.langgraph import EventCtxSaver

EXPECTED = {
    "put": 17,
    "put_writes": 10,
    "get_tuple": 10,
    "list": 16,
    "delete_thread": 5,
    "delete_for_runs": 7,
    "copy_thread": 8,
    "prune": 8,
}
"""Tests per capability in langgraph-checkpoint-conformance 0.0.2."""


def test_conformance(db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    store = EventStore.open(db_url)

    @checkpointer_test(name=f"EventCtxSaver ({store.dialect_name})")
    async def saver() -> AsyncIterator[EventCtxSaver]:
        yield EventCtxSaver(store)

    try:
        report = asyncio.run(validate(saver, progress=ProgressCallbacks.verbose()))
    finally:
        store.close()
    report.print_report()
    failures = {
        name: result.failures for name, result in report.results.items() if not result.passed
    }
    assert not failures, failures
    assert {name: r.tests_passed for name, r in report.results.items()} == EXPECTED
    assert report.conformance_level() == "FULL"
