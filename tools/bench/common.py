"""Shared benchmark plumbing: databases to run on, timing rounds, and result tables."""

from __future__ import annotations

import os
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa

PG_URL = os.environ.get(
    "EVENTCTX_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
ROUNDS = int(os.environ.get("EVENTCTX_BENCH_ROUNDS", "5"))
PAYLOAD = {"value": {"summary": "x" * 80, "files": ["a.go", "b.go", "c.go"], "score": 0.75}}
"""A ~150-byte payload, the size the raw-driver comparison uses."""


@dataclass(frozen=True)
class Figure:
    """One measured rate: the median of the rounds, with min and max."""

    name: str
    median: float
    low: float
    high: float
    unit: str

    def cell(self) -> str:
        """``median unit (min–max)``, with decimals where the median is small (an outlying
        maximum must not round a 2.09 ms median to "2 ms")."""
        d = 2 if self.median < 100 else 0
        return f"{self.median:,.{d}f} {self.unit} ({self.low:,.{d}f}–{self.high:,.{d}f})"


def measure(name: str, unit: str, count: int, run: Callable[[], None]) -> Figure:
    """Run ``run`` ``ROUNDS`` times (after one warm-up); rate = count / seconds per round."""
    return measure_together(unit, count, {name: run})[name]


def measure_together(
    unit: str, count: int, runs: dict[str, Callable[[], None]]
) -> dict[str, Figure]:
    """``measure`` for each of ``runs``, their rounds taken in turn (``take_turns``)."""
    took = take_turns(runs, lambda seconds: len(seconds) < ROUNDS)
    return {
        name: Figure(name, statistics.median(r), min(r), max(r), unit)
        for name, r in ((name, [count / s for s in seconds]) for name, seconds in took.items())
    }


def take_turns(
    runs: dict[str, Callable[[], Any]], more: Callable[[list[float]], bool]
) -> dict[str, list[float]]:
    """Seconds of each run of ``runs`` after one warm-up each, taken in turn while ``more``
    of a run's seconds so far: figures compared with each other (ours, the raw driver's, the
    peer's) meet the same moments of a noisy machine instead of one getting its quiet minute
    and another its busy one."""
    for run in runs.values():
        run()
    took: dict[str, list[float]] = {name: [] for name in runs}
    pending = list(runs)
    while pending:
        for name in pending:
            start = time.perf_counter()
            runs[name]()
            took[name].append(time.perf_counter() - start)
        pending = [name for name in pending if more(took[name])]
    return took


@contextmanager
def sqlite_file() -> Iterator[Path]:
    """A path for a fresh SQLite database file, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="eventctx-bench-") as tmp:
        yield Path(tmp) / "bench.db"


@contextmanager
def pg_schema() -> Iterator[tuple[str, str]]:
    """A fresh PostgreSQL schema: (its name, a URL whose search path starts with it)."""
    name = f"bench_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(PG_URL, poolclass=sa.pool.NullPool)
    with admin.begin() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{name}"')
    url = sa.make_url(PG_URL).update_query_dict({"options": f"-csearch_path={name}"})
    try:
        yield name, url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA "{name}" CASCADE')
        admin.dispose()


def pg_available() -> bool:
    """Whether the benchmark PostgreSQL server answers."""
    try:
        engine = sa.create_engine(PG_URL, poolclass=sa.pool.NullPool)
        with engine.connect():
            return True
    except sa.exc.OperationalError:
        return False


def each_backend() -> Iterator[tuple[str, str]]:
    """("SQLite", URL of a fresh file), then ("PostgreSQL", URL of a fresh schema) when the
    server answers; each is removed once the caller moves on."""
    with sqlite_file() as path:
        yield "SQLite", f"sqlite:///{path}"
    if pg_available():
        with pg_schema() as (_, url):
            yield "PostgreSQL", url


def table(title: str, header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table (it also reads well in a terminal)."""
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |"]
    lines.append("|" + "|".join("---" for _ in header) + "|")
    lines.extend("| " + " | ".join(row) + " |" for row in rows)
    return "\n".join(lines) + "\n"


def write_until(ctx: Any, stop: threading.Event, latencies: list[float]) -> None:
    """Call ``ctx.set`` until ``stop`` is set, noting each call's latency in ms."""
    i = 0
    while not stop.is_set():
        start = time.perf_counter()
        ctx.set(f"live-{i % 50}", i)
        latencies.append((time.perf_counter() - start) * 1000)
        i += 1


def stalls(during: list[float], alone: list[float]) -> list[str]:
    """A writer's longest and p99 latency while something ran, and alone (table cells)."""
    return [
        f"{max(during):.1f} ms (p99 {_p99(during):.1f} ms, {len(during):,} writes)",
        f"{max(alone):.1f} ms (p99 {_p99(alone):.1f} ms)",
    ]


def _p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98] if len(values) > 1 else values[0]
