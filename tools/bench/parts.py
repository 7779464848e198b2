"""Where a ``ctx.set`` on SQLite spends its time, timed in parts (not part of ``make bench``).

``python -m tools.bench.parts`` prints CPU and wall time per call, best of the rounds, for:
the whole call; the same calls with the writer's cursor replaced by one that does nothing
(the Python alone); the append's four statements driven from a minimal loop with the same
rows (SQLite alone, plus that loop's own Python); and the raw driver's INSERT and COMMIT.
The first two include their share of the snapshots (about one per 180 calls here; in the
second, of a state the no-op cursor never stored).
Sampling profilers charge the interpreter's time around a C call to that call, which is why
these are timed rather than sampled.
"""

from __future__ import annotations

import hashlib
import sqlite3
import time
from collections.abc import Callable
from contextlib import closing
from itertools import count
from typing import Any

import orjson

from eventctx import ContextManager, EventStore
from eventctx.store.commit import GroupCommitter
from eventctx.store.heads import ACTIVE
from tools.bench.append import raw_sqlite_writer
from tools.bench.common import PAYLOAD, sqlite_file, table

CALLS = 2000
ROUNDS = 7


class _NoCursor:
    """A writer cursor (and connection) on which every statement succeeds at once."""

    rowcount = 1
    lastrowid = 0

    def execute(self, sql: str, params: Any = ()) -> None:
        self.lastrowid += 1

    def commit(self) -> None:
        pass

    def rollback(self) -> None:
        pass


def _best(run: Callable[[], None]) -> tuple[float, float]:
    """(CPU µs, wall µs) per call, each the best of ``ROUNDS`` after a warm-up."""
    run()
    cpu = wall = float("inf")
    for _ in range(ROUNDS):
        started_cpu, started = time.process_time(), time.perf_counter()
        run()
        cpu = min(cpu, time.process_time() - started_cpu)
        wall = min(wall, time.perf_counter() - started)
    return cpu / CALLS * 1e6, wall / CALLS * 1e6


def _statements_alone(
    conn: sqlite3.Connection, store: EventStore, session_id: str
) -> Callable[[], None]:
    """The four statements of an append (BEGIN IMMEDIATE, the head UPDATE, the INSERT,
    COMMIT) on ``conn``, to the store's own file, from a loop that only builds their rows."""
    sql = store._sql
    conn.execute("PRAGMA synchronous = NORMAL")
    cur = conn.cursor()
    version, head = cur.execute(
        "SELECT version, head_hash FROM eventctx_sessions WHERE session_id = ?", (session_id,)
    ).fetchone()
    state = [version, head]
    clock = count(time.time_ns() // 1000)

    def run() -> None:
        version, head = state
        for i in range(CALLS):
            payload = orjson.dumps(PAYLOAD, option=orjson.OPT_SORT_KEYS)
            digest = hashlib.sha256(head + payload).digest()
            now = next(clock)
            cur.execute("BEGIN IMMEDIATE")
            moved = {
                "session_id": session_id,
                "new_version": version + 1,
                "new_hash": digest,
                "now": now,
                "status": ACTIVE,
                "active": ACTIVE,
                "base_version": version,
                "base_hash": head,
            }
            cur.execute(sql.advance_head, moved)
            assert cur.rowcount == 1
            row = (session_id, version + 1, "KeySet", f"k{i % 200}", None, None)
            cur.execute(sql.insert_event, (*row, payload, now, digest, head))
            cur.execute("COMMIT")
            version, head = version + 1, digest
        state[:] = [version, head]

    return run


def run() -> str:
    """Time each part; return the table."""
    value = PAYLOAD["value"]
    with sqlite_file() as ours, sqlite_file() as raw_path, sqlite_file() as alone_path:
        parts: dict[str, tuple[float, float]] = {}
        with (
            EventStore.open(f"sqlite:///{ours}") as store,
            ContextManager(store, cleanup_interval=None) as manager,
        ):
            ctx = manager.create_context("parts")

            def sets() -> None:
                for i in range(CALLS):
                    ctx.set(f"k{i % 200}", value)

            parts["ctx.set"] = _best(sets)
            nothing = _NoCursor()
            writer = GroupCommitter._writer
            GroupCommitter._writer = lambda self: (nothing, nothing)  # type: ignore[method-assign,assignment,return-value]
            try:
                parts["ctx.set, its Python alone"] = _best(sets)
            finally:
                GroupCommitter._writer = writer  # type: ignore[method-assign]
        with (
            EventStore.open(f"sqlite:///{alone_path}") as store,
            ContextManager(store, cleanup_interval=None) as manager,
        ):
            manager.create_context("parts")
            with closing(sqlite3.connect(alone_path, isolation_level=None)) as conn:
                alone = _statements_alone(conn, store, "parts")
                parts["its four statements alone"] = _best(alone)
        parts["raw driver: INSERT and COMMIT"] = _best(raw_sqlite_writer(str(raw_path))(1, CALLS))
    rows = [[name, f"{cpu:.1f} µs", f"{wall:.1f} µs"] for name, (cpu, wall) in parts.items()]
    return table(
        f"Where a ctx.set's time goes (SQLite NORMAL, best of {ROUNDS} × {CALLS:,} calls)",
        ["part", "CPU per call", "wall per call"],
        rows,
    )


if __name__ == "__main__":
    print(run())
