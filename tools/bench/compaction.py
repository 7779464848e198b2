"""Compaction throughput and the stall it causes a concurrent writer.

``python -m tools.bench.compaction`` fills SQLite and PostgreSQL with 1M events over 10k
expired sessions, runs ``compact`` once while a thread keeps calling ``ctx.set`` on a live
session, and prints events removed per second and that writer's worst and p99 latency, next
to its latency with no compaction running.
"""

from __future__ import annotations

import hashlib
import threading
import time
from typing import Any

import orjson

from eventctx import ContextManager, EventStore
from eventctx.clock import now_us
from eventctx.compaction import compact
from tools.bench.common import (
    PAYLOAD,
    pg_available,
    pg_schema,
    sqlite_file,
    stalls,
    table,
    write_until,
)

SESSIONS = 10_000
PER_SESSION = 100
BASELINE_S = 2.0

_EVENT_COLS = (
    "session_id, version, type, key, phase, execution_id, payload, recorded_at, hash, prev_hash"
)
_HEAD_COLS = "session_id, version, head_hash, created_at, last_activity, ttl_ms, status"


def _rows(session: int, at: int) -> list[tuple[Any, ...]]:
    payload = orjson.dumps(PAYLOAD, option=orjson.OPT_SORT_KEYS)
    digest = hashlib.sha256(b"x").digest()
    sid = f"expired-{session}"
    return [
        (sid, v, "KeySet", f"k{v}", None, None, payload, at, digest, digest)
        for v in range(1, PER_SESSION + 1)
    ]


def _populate(store: EventStore) -> None:
    """10k expired head rows and their 1M events, written straight through the driver."""
    at = now_us() - 3_600_000_000
    heads = [
        (f"expired-{i}", PER_SESSION, bytes(32), at, at, 1000, "active") for i in range(SESSIONS)
    ]
    raw = store.engine.raw_connection()
    try:
        cur = raw.cursor()
        if store.dialect_name == "sqlite":
            cur.executemany(
                f"INSERT INTO eventctx_sessions ({_HEAD_COLS}) VALUES (?,?,?,?,?,?,?)", heads
            )
            for i in range(SESSIONS):
                cur.executemany(
                    f"INSERT INTO eventctx_events ({_EVENT_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?)",
                    _rows(i, at),
                )
        else:
            with cur.copy(f"COPY eventctx_sessions ({_HEAD_COLS}) FROM STDIN") as copy:
                for head in heads:
                    copy.write_row(head)
            with cur.copy(f"COPY eventctx_events ({_EVENT_COLS}) FROM STDIN") as copy:
                for i in range(SESSIONS):
                    for row in _rows(i, at):
                        copy.write_row(row)
        raw.commit()
    finally:
        raw.close()


def _measure(label: str, url: str) -> list[str]:
    with ContextManager(url, cleanup_interval=None) as manager:
        store = manager.store
        t = time.perf_counter()
        _populate(store)
        fill_s = time.perf_counter() - t
        ctx = manager.create_context("live", ttl=None)
        baseline: list[float] = []
        stop = threading.Event()
        timer = threading.Timer(BASELINE_S, stop.set)
        timer.start()
        write_until(ctx, stop, baseline)
        during: list[float] = []
        stop = threading.Event()
        writer = threading.Thread(target=write_until, args=(ctx, stop, during))
        writer.start()
        report = compact(store)
        stop.set()
        writer.join()
        assert report.sessions_removed == SESSIONS, report
        assert report.events_removed == SESSIONS * PER_SESSION, report
        assert ctx.get("live-0") is not None
    rate = report.events_removed / report.duration_s
    return [
        label,
        f"{report.events_removed:,} events / {report.sessions_removed:,} sessions in "
        f"{report.duration_s:.1f} s (filled in {fill_s:.0f} s)",
        f"{rate:,.0f} ev/s",
        *stalls(during, baseline),
    ]


def run() -> str:
    """Run the compaction benchmark; return the result table."""
    rows = []
    with sqlite_file() as path:
        rows.append(_measure("SQLite NORMAL", f"sqlite:///{path}"))
    if pg_available():
        with pg_schema() as (_, url):
            rows.append(_measure("PostgreSQL", url))
    return table(
        "Compaction: 1M expired events over 10k sessions, one ctx.set writer running alongside",
        ["backend", "removed", "rate", "writer's longest stall", "writer alone"],
        rows,
    )


if __name__ == "__main__":
    print(run())
