"""LangGraph checkpointing: one graph whose state grows each step, run for ``STEPS`` steps on
EventCtxSaver and on LangGraph's own savers for the same backend (AsyncSqliteSaver,
AsyncPostgresSaver): checkpoints per second and bytes stored per checkpoint.

``python -m tools.bench.langgraph`` prints the table and the targets. Every saver runs in the
same process and event loop, one after another, each on a fresh database (SQLite with
``synchronous=NORMAL`` for both).
"""

from __future__ import annotations

import asyncio
import operator
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, TypedDict

import sqlalchemy as sa
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver
from langgraph.graph import END, START, StateGraph

from eventctx.integrations.langgraph import EventCtxSaver
from tools.bench.common import ROUNDS, Figure, pg_available, pg_schema, sqlite_file, table

STEPS = 50
"""Steps per run: one checkpoint each (and the input's)."""
ENTRY = "x" * 120
"""What each step adds to the state."""

Target = tuple[str, str, bool]
SaverFactory = Callable[[], AbstractAsyncContextManager[BaseCheckpointSaver[Any]]]


class Growing(TypedDict):
    """A state that grows by one entry per step."""

    step: int
    log: Annotated[list[dict[str, Any]], operator.add]


def _step(state: Growing) -> dict[str, Any]:
    return {"step": state["step"] + 1, "log": [{"step": state["step"], "text": ENTRY}]}


def _graph(saver: BaseCheckpointSaver[Any]) -> Any:
    graph = StateGraph(Growing)
    graph.add_node("step", _step)
    graph.add_edge(START, "step")
    graph.add_conditional_edges("step", lambda s: END if s["step"] >= STEPS else "step")
    return graph.compile(checkpointer=saver)


async def _rate(saver: BaseCheckpointSaver[Any]) -> tuple[Figure, int]:
    """Checkpoints per second over ``ROUNDS`` runs (after a warm-up), and how many were
    stored in all."""
    graph = _graph(saver)
    rates, stored = [], 0
    for round_ in range(ROUNDS + 1):
        config: RunnableConfig = {
            "configurable": {"thread_id": f"t-{uuid.uuid4().hex}"},
            "recursion_limit": 200,
        }
        start = time.perf_counter()
        await graph.ainvoke({"step": 0, "log": []}, config)
        seconds = time.perf_counter() - start
        count = len([c async for c in saver.alist(config)])
        stored += count
        if round_:
            rates.append(count / seconds)
    figure = Figure("checkpoints", statistics.median(rates), min(rates), max(rates), "ckpt/s")
    return figure, stored


def _sqlite_bytes(path: Path) -> int:
    """Bytes in use in a SQLite database (after moving its WAL in)."""
    engine = sa.create_engine(f"sqlite:///{path}", poolclass=sa.pool.NullPool)
    with engine.connect() as conn:
        conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
        pages = conn.exec_driver_sql("PRAGMA page_count").scalar_one()
        free = conn.exec_driver_sql("PRAGMA freelist_count").scalar_one()
        size = conn.exec_driver_sql("PRAGMA page_size").scalar_one()
    engine.dispose()
    return int((pages - free) * size)


def _pg_bytes(url: str, schema: str) -> int:
    """Bytes of every table of ``schema`` with its indexes and TOAST."""
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    with engine.connect() as conn:
        found = conn.execute(
            sa.text(
                "SELECT coalesce(sum(pg_total_relation_size(format('%I.%I', schemaname, "
                "tablename)::regclass)), 0) FROM pg_tables WHERE schemaname = :s"
            ),
            {"s": schema},
        ).scalar_one()
    engine.dispose()
    return int(found)


@asynccontextmanager
async def _ours(url: str) -> AsyncIterator[BaseCheckpointSaver[Any]]:
    async with EventCtxSaver(url) as saver:
        yield saver


@asynccontextmanager
async def _sqlite_peer(path: Path) -> AsyncIterator[BaseCheckpointSaver[Any]]:
    async with AsyncSqliteSaver.from_conn_string(str(path)) as saver:
        await saver.setup()
        await saver.conn.execute("PRAGMA synchronous=NORMAL")
        yield saver


@asynccontextmanager
async def _pg_peer(url: str) -> AsyncIterator[BaseCheckpointSaver[Any]]:
    conninfo = sa.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    async with AsyncPostgresSaver.from_conn_string(conninfo) as saver:
        await saver.setup()
        yield saver


async def _one(make: SaverFactory, size: Callable[[], int]) -> Result:
    async with make() as saver:
        figure, stored = await _rate(saver)
    return figure, size() / stored


Result = tuple[Figure, float]
"""Checkpoints per second and bytes stored per checkpoint."""


async def _measure() -> dict[str, tuple[str, Result, Result]]:
    """Per backend: LangGraph's saver's name, our result and its."""
    results: dict[str, tuple[str, Result, Result]] = {}
    with sqlite_file() as ours, sqlite_file() as theirs:
        results["SQLite"] = (
            "AsyncSqliteSaver",
            await _one(lambda: _ours(f"sqlite:///{ours}"), lambda: _sqlite_bytes(ours)),
            await _one(lambda: _sqlite_peer(theirs), lambda: _sqlite_bytes(theirs)),
        )
    if pg_available():
        with pg_schema() as (ours_schema, ours_url), pg_schema() as (peer_schema, peer_url):
            results["PostgreSQL"] = (
                "AsyncPostgresSaver",
                await _one(lambda: _ours(ours_url), lambda: _pg_bytes(ours_url, ours_schema)),
                await _one(lambda: _pg_peer(peer_url), lambda: _pg_bytes(peer_url, peer_schema)),
            )
    return results


def run() -> tuple[str, list[Target]]:
    """Measure on each backend; the table and the targets (at least as fast and at most as
    large as LangGraph's saver for the same backend)."""
    rows, targets = [], []
    for backend, (peer_name, (ours, ours_bytes), (peer, peer_bytes)) in asyncio.run(
        _measure()
    ).items():
        rows.append(
            [
                backend,
                ours.cell(),
                f"{ours_bytes:,.0f}",
                f"{peer_name}: {peer.cell()}",
                f"{peer_bytes:,.0f}",
                f"{ours.median / peer.median:.2f}×",
                f"{ours_bytes / peer_bytes:.2f}×",
            ]
        )
        targets.append(
            (
                f"LangGraph, {backend}: checkpoints/s ≥ {peer_name}",
                f"{ours.median / peer.median:.2f}×",
                ours.median >= peer.median,
            )
        )
        targets.append(
            (
                f"LangGraph, {backend}: bytes per checkpoint ≤ {peer_name}",
                f"{ours_bytes / peer_bytes:.2f}×",
                ours_bytes <= peer_bytes,
            )
        )
    text = table(
        f"LangGraph checkpointing: a state growing each step, {STEPS} steps a run",
        [
            "backend",
            "eventctx ckpt/s",
            "eventctx bytes/ckpt",
            "LangGraph's saver ckpt/s",
            "its bytes/ckpt",
            "speed",
            "size",
        ],
        rows,
    )
    return text, targets


if __name__ == "__main__":
    found_text, found_targets = run()
    print(found_text)
    for name, got, ok in found_targets:
        print(f"{'met' if ok else 'MISSED'}: {name} ({got})")
