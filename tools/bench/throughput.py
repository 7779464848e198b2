"""``ctx.set`` and ``ctx.update`` of 100 keys, next to the raw driver and eventsourcing.

Every figure is committed events per second, median of the rounds (min–max), measured in the
same run with the same synchronous setting: SQLite NORMAL and FULL, PostgreSQL with
synchronous_commit on.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import count
from typing import Literal

from eventctx import ContextManager, EventStore
from tools.bench.append import raw_pg_writer, raw_sqlite_writer
from tools.bench.common import (
    PAYLOAD,
    Figure,
    measure_together,
    pg_available,
    pg_schema,
    sqlite_file,
)
from tools.bench.peer import PeerContext, peer_app

SETS = 2000
PG_SETS = 600
BATCH = 100
BATCHES = 20


def _ctx_runner(manager: ContextManager, batch: int, times: int) -> Callable[[], None]:
    sessions = count()
    value = PAYLOAD["value"]

    def run() -> None:
        ctx = manager.create_context(f"t{batch}-{next(sessions)}")
        if batch == 1:
            for i in range(times):
                ctx.set(f"k{i % 200}", value)
        else:
            for _ in range(times):
                ctx.update({f"k{i}": value for i in range(batch)})

    return run


def _peer_runner(app: object, batch: int, times: int) -> Callable[[], None]:
    value = PAYLOAD["value"]

    def run() -> None:
        ctx = PeerContext()
        app.save(ctx)  # type: ignore[attr-defined]
        for i in range(times):
            for j in range(batch):
                ctx.set(f"k{(i + j) % 200}", value)
            app.save(ctx)  # type: ignore[attr-defined]

    return run


def _trio(
    manager: ContextManager,
    raw: Callable[[int, int], Callable[[], None]],
    app: object,
    batch: int,
    times: int,
) -> dict[str, Figure]:
    """eventctx, the raw driver and eventsourcing, each committing ``times`` × ``batch``."""
    return measure_together(
        "ev/s",
        batch * times,
        {
            "eventctx": _ctx_runner(manager, batch, times),
            "raw": raw(batch, times),
            "eventsourcing": _peer_runner(app, batch, times),
        },
    )


def run() -> dict[str, dict[str, Figure]]:
    """Every workload, keyed like ``"set SQLite NORMAL"``: {eventctx, raw, eventsourcing}."""
    results: dict[str, dict[str, Figure]] = {}
    modes: tuple[Literal["NORMAL"], Literal["FULL"]] = ("NORMAL", "FULL")
    for synchronous in modes:
        with sqlite_file() as ours, sqlite_file() as raw_path, sqlite_file() as peer_path:
            store = EventStore.open(f"sqlite:///{ours}", synchronous=synchronous)
            raw = raw_sqlite_writer(str(raw_path), synchronous)
            with (
                ContextManager(store, cleanup_interval=None) as manager,
                peer_app("sqlite", sqlite_path=str(peer_path), synchronous=synchronous) as app,
            ):
                results[f"set SQLite {synchronous}"] = _trio(manager, raw, app, 1, SETS)
                if synchronous == "NORMAL":
                    results["update×100 SQLite NORMAL"] = _trio(manager, raw, app, BATCH, BATCHES)
            store.close()
    if pg_available():
        with (
            pg_schema() as (_, url),
            pg_schema() as (raw_schema, _),
            pg_schema() as (peer_schema, _),
        ):
            raw = raw_pg_writer(raw_schema)
            with (
                ContextManager(url, cleanup_interval=None) as manager,
                peer_app("postgresql", pg_schema=peer_schema) as app,
            ):
                results["set PostgreSQL"] = _trio(manager, raw, app, 1, PG_SETS)
                results["update×100 PostgreSQL"] = _trio(manager, raw, app, BATCH, BATCHES)
    return results
