"""``ctx.set`` throughput and restore time, next to the raw driver.

``python -m tools.bench.context`` prints, for SQLite (NORMAL) and PostgreSQL: ``ctx.set`` (one
committed event per call) against the raw driver's INSERT + COMMIT of the same row; and the
time to restore a session of 1k and 100k events in a cold manager (snapshots on), by a full
fold (no snapshot), and by the raw driver selecting the rows and decoding them with orjson.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from functools import partial
from itertools import count
from typing import Any

import orjson

from eventctx import ContextManager, EventStore
from eventctx.state import fold
from tools.bench.append import SINGLE, raw_pg_writer, raw_sqlite_writer, speed
from tools.bench.common import (
    PAYLOAD,
    ROUNDS,
    Figure,
    measure,
    pg_available,
    pg_schema,
    sqlite_file,
    table,
)

HISTORIES = (1_000, 100_000)
KEYS = 200


def _set_runner(manager: ContextManager) -> Callable[[], None]:
    sessions = count()

    def run() -> None:
        ctx = manager.create_context(f"set-{next(sessions)}")
        for i in range(SINGLE):
            ctx.set(f"k{i % KEYS}", PAYLOAD["value"])

    return run


def _populate(manager: ContextManager, session_id: str, events: int) -> None:
    ctx = manager.create_context(session_id)
    for start in range(0, events - 1, 1000):
        batch = min(1000, events - 1 - start)
        ctx.update(
            {f"k{(start + i) % KEYS}": {"i": start + i, **PAYLOAD["value"]} for i in range(batch)}
        )


def _ms(run: Callable[[], Any]) -> Figure:
    run()
    times = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1000)
    return Figure("", statistics.median(times), min(times), max(times), "ms")


def _full_fold(store: EventStore, session_id: str) -> None:
    fold(store.read(session_id))


def _raw_restore(store: EventStore, session_id: str) -> Callable[[], dict[str, Any]]:
    sql = "SELECT type, key, payload FROM eventctx_events WHERE session_id = {p} ORDER BY version"
    param = "?" if store.dialect_name == "sqlite" else "%s"

    def run() -> dict[str, Any]:
        raw = store.engine.raw_connection()
        try:
            cur = raw.cursor()
            cur.execute(sql.format(p=param), (session_id,))
            data: dict[str, Any] = {}
            for type_, key, payload in cur.fetchall():
                if type_ == "KeySet":
                    data[key] = orjson.loads(payload)["value"]
            raw.rollback()
            return data
        finally:
            raw.close()

    return run


def _rows(
    label: str, url: str, raw_writer: Callable[[int, int], Callable[[], None]]
) -> list[list[str]]:
    rows = []
    with ContextManager(url) as manager:
        mine = measure("set", "ev/s", SINGLE, _set_runner(manager))
        theirs = measure("raw", "ev/s", SINGLE, raw_writer(1, SINGLE))
        rows.append(
            [f"{label}: ctx.set, 1 event/txn", mine.cell(), theirs.cell(), speed(mine, theirs)]
        )
        for events in HISTORIES:
            _populate(manager, f"h{events}", events)
    store = EventStore.open(url)
    try:
        for events in HISTORIES:
            sid = f"h{events}"

            def cold(sid: str = sid) -> None:
                with ContextManager(store) as m:
                    m.get_context(sid)

            snap = _ms(cold)
            full = _ms(partial(_full_fold, store, sid))
            raw = _ms(_raw_restore(store, sid))
            assert fold(store.read(sid)).data == _raw_restore(store, sid)()
            name = f"{label}: restore {events:,} events"
            rows.append([f"{name}, snapshots on", snap.cell(), raw.cell(), speed(snap, raw)])
            rows.append([f"{name}, full fold", full.cell(), raw.cell(), speed(full, raw)])
    finally:
        store.close()
    return rows


def run() -> str:
    """Run the context benchmarks; return the result table."""
    rows: list[list[str]] = []
    with sqlite_file() as ours, sqlite_file() as raw_path:
        rows += _rows("SQLite NORMAL", f"sqlite:///{ours}", raw_sqlite_writer(str(raw_path)))
    if pg_available():
        with pg_schema() as (_, url), pg_schema() as (raw_schema, _):
            rows += _rows("PostgreSQL", url, raw_pg_writer(raw_schema))
    return table(
        "Context: ctx.set and restore vs the raw driver (speed vs raw > 1: eventctx is faster)",
        ["workload", "eventctx", "raw driver", "speed vs raw"],
        rows,
    )


if __name__ == "__main__":
    print(run())
