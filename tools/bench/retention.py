"""Retention: trimming a long-lived session while a writer keeps writing to it.

``python -m tools.bench.retention [EVENTS]`` builds one session of EVENTS events (200k by
default, 1000 keys per update) through eventctx, lets them age past a one-second
window, then runs ``compact(retain=…)`` once while a thread keeps calling ``ctx.set`` on that
same session. It prints events folded and removed per second, that writer's worst and p99
latency next to its latency alone, and the cold restore time before and after.
"""

from __future__ import annotations

import statistics
import sys
import threading
import time
from datetime import timedelta

from eventctx import ContextManager
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

EVENTS = 200_000
WINDOW = timedelta(seconds=1)
ALONE_S = 1.0


def _cold_restore_ms(url: str) -> float:
    times = []
    for _ in range(5):
        with ContextManager(url, cleanup_interval=None) as manager:
            start = time.perf_counter()
            manager.get_context("long")
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def _measure(label: str, url: str, events: int) -> list[str]:
    with ContextManager(url, cleanup_interval=None) as manager:
        ctx = manager.create_context("long", ttl=None)
        alone: list[float] = []
        stop = threading.Event()
        timer = threading.Timer(ALONE_S, stop.set)
        timer.start()
        write_until(ctx, stop, alone)
        for start in range(0, events - 1, 1000):
            ctx.update(
                {f"k{i % 5000}": PAYLOAD for i in range(start, min(start + 1000, events - 1))}
            )
        time.sleep(WINDOW.total_seconds() + 0.1)
        before_ms = _cold_restore_ms(url)
        during: list[float] = []
        stop = threading.Event()
        writer = threading.Thread(target=write_until, args=(ctx, stop, during))
        writer.start()
        report = compact(manager.store, retain=WINDOW)
        stop.set()
        writer.join()
        assert report.events_trimmed >= events, report  # with what the writer alone wrote
        fresh = manager.store.session("long")
        kept = fresh.version - report.trimmed["long"] if fresh else -1
        assert manager.store.verify("long") == kept
    after_ms = _cold_restore_ms(url)
    rate = report.events_trimmed / report.duration_s
    return [
        label,
        f"{report.events_trimmed:,} events in {report.duration_s:.1f} s",
        f"{rate:,.0f} ev/s",
        *stalls(during, alone),
        f"{before_ms:.2f} ms → {after_ms:.2f} ms",
    ]


def run(events: int = EVENTS) -> str:
    """Run the retention benchmark; return the result table."""
    rows = []
    with sqlite_file() as path:
        rows.append(_measure("SQLite NORMAL", f"sqlite:///{path}", events))
    if pg_available():
        with pg_schema() as (_, url):
            rows.append(_measure("PostgreSQL", url, events))
    return table(
        f"Retention: one session's {events:,} oldest events folded into its base and removed, "
        "a ctx.set writer on the same session running alongside",
        [
            "backend",
            "trimmed",
            "rate",
            "writer's longest stall",
            "writer alone",
            "cold restore before → after (with the writer's tail)",
        ],
        rows,
    )


if __name__ == "__main__":
    print(run(int(sys.argv[1]) if len(sys.argv) > 1 else EVENTS))
