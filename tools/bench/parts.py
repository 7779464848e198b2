"""Where a write's time goes on SQLite, timed in parts (not part of ``make bench``).

``python -m tools.bench.parts`` prints CPU and wall time per event, best of the rounds, for
``ctx.set`` and for ``ctx.update`` of 100 keys:

- the whole call, and its Python alone (the writer's cursor replaced by one that does
  nothing; this includes the snapshots' encoding, not their writes);
- the append's statements (BEGIN IMMEDIATE, the head-row UPDATE, the INSERT, COMMIT) driven
  from a minimal loop that only builds their rows;
- the least any design that keeps those statements must do: the same loop, plus what the
  value rules, the audit chain and a thread-safe context ask of every event (the key and
  value checks, the canonical encoding and the decoded copy, the chain hash, the fold under a
  lock), without snapshots;
- the raw driver's INSERT (``executemany`` for a batch) and COMMIT, into a table with
  AUTOINCREMENT (its positions are never reused, as ours are) and, for comparison, without;
- eventsourcing;

and then the pages a ``ctx.set`` and the raw driver's single-event commit add to the
write-ahead log.

Sampling profilers charge the interpreter's time around a C call to that call, which is why
these are timed rather than sampled.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from itertools import count
from pathlib import Path
from typing import Any

import orjson

from eventctx import ContextManager, EventStore
from eventctx.events import RecordedEvent, chain_hash, check_value, encode_payload, sha256
from eventctx.state import State, advance
from eventctx.store.commit import GroupCommitter
from eventctx.store.heads import ACTIVE, check_text
from tools.bench.append import raw_sqlite_writer
from tools.bench.common import PAYLOAD, sqlite_file, table
from tools.bench.peer import peer_app
from tools.bench.throughput import _peer_runner

EVENTS = 2000
"""Events per round: 2,000 calls of ``ctx.set``, or 20 of ``update`` of ``BATCH`` keys."""
BATCH = 100
ROUNDS = 7
PAGE_COMMITS = 200
"""Commits whose pages are counted: at about four pages each, fewer than the 1,000 at which
SQLite checkpoints the log."""


class _NoCursor:
    """A writer cursor (and connection) on which every statement succeeds at once."""

    rowcount = 1
    lastrowid = 0

    def execute(self, sql: str, params: Any = ()) -> None:
        self.lastrowid += 1

    def executemany(self, sql: str, rows: list[Any]) -> None:
        self.lastrowid += len(rows)

    def fetchone(self) -> tuple[int]:
        return (self.lastrowid,)

    def commit(self) -> None:
        pass

    def rollback(self) -> None:
        pass


def _best(run: Callable[[], None]) -> tuple[float, float]:
    """(CPU µs, wall µs) per event, each the best of ``ROUNDS`` after a warm-up."""
    run()
    cpu = wall = float("inf")
    for _ in range(ROUNDS):
        started_cpu, started = time.process_time(), time.perf_counter()
        run()
        cpu = min(cpu, time.process_time() - started_cpu)
        wall = min(wall, time.perf_counter() - started)
    return cpu / EVENTS * 1e6, wall / EVENTS * 1e6


@contextmanager
def _no_writes() -> Iterator[None]:
    """Every append's statements go to a cursor that does nothing."""
    nothing = _NoCursor()
    writer = GroupCommitter._writer
    GroupCommitter._writer = lambda self: (nothing, nothing)  # type: ignore[method-assign,assignment,return-value]
    try:
        yield
    finally:
        GroupCommitter._writer = writer  # type: ignore[method-assign]


def _writes(ctx: Any, batch: int) -> Callable[[], None]:
    """``EVENTS`` events through ``ctx``: ``set`` calls, or ``update`` calls of ``batch``."""
    value = PAYLOAD["value"]

    def run() -> None:
        if batch == 1:
            for i in range(EVENTS):
                ctx.set(f"k{i % 200}", value)
        else:
            for _ in range(EVENTS // batch):
                ctx.update({f"k{i}": value for i in range(batch)})

    return run


def _pinned(
    conn: sqlite3.Connection, store: EventStore, session_id: str, batch: int, *, work: bool
) -> Callable[[], None]:
    """``EVENTS`` events appended with the design's statements on ``conn`` (the store's own
    file), ``batch`` per transaction; with ``work``, doing what every event needs too."""
    sql = store._sql
    conn.execute("PRAGMA synchronous = NORMAL")
    cur = conn.cursor()
    version, head = cur.execute(
        "SELECT version, head_hash FROM eventctx_sessions WHERE session_id = ?", (session_id,)
    ).fetchone()
    folded = State(version=version, head_hash=head)
    lock = threading.Lock()
    clock = count(time.time_ns() // 1000)
    value = PAYLOAD["value"]

    def run() -> None:
        nonlocal version, head
        for start in range(0, EVENTS, batch):
            now, prev, last = next(clock), head, version
            rows, recorded = [], []
            for i in range(start, start + batch):
                key, last = f"k{i % 200}", last + 1
                if work:
                    if not 0 < len(key) <= 1024:  # the default key length limit
                        raise ValueError(key)
                    check_text(key, "key")
                    check_value(value, key)
                    data = encode_payload({"value": value})
                    copy = orjson.loads(data)
                    digest = chain_hash(
                        prev, session_id, last, "KeySet", key, None, None, now, data
                    )
                    envelope = (session_id, last, "KeySet", key, None, None)
                    recorded.append(RecordedEvent(0, *envelope, copy, now, digest, prev))
                else:
                    data = orjson.dumps(PAYLOAD, option=orjson.OPT_SORT_KEYS)
                    digest = sha256(prev + data)
                rows.append((session_id, last, "KeySet", key, None, None, data, now, digest, prev))
                prev = digest
            with lock:
                cur.execute("BEGIN IMMEDIATE")
                moved = {
                    "session_id": session_id,
                    "new_version": last,
                    "new_hash": prev,
                    "now": now,
                    "status": ACTIVE,
                    "active": ACTIVE,
                    "base_version": version,
                    "base_hash": head,
                }
                cur.execute(sql.advance_head, moved)
                assert cur.rowcount == 1
                if batch == 1:
                    cur.execute(sql.insert_event, rows[0])
                else:
                    cur.executemany(sql.insert_event, rows)
                cur.execute("COMMIT")
                if work:
                    advance(folded, recorded)
            version, head = last, prev

    return run


def _pages(path: Path, commit: Callable[[int], None]) -> float:
    """Pages a commit adds to the write-ahead log of ``path``: ``commit(n)`` makes ``n``
    commits, too few for SQLite to checkpoint the log meanwhile."""
    with closing(sqlite3.connect(path)) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        commit(PAGE_COMMITS)
        busy, frames, _ = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        assert not busy
    return float(frames) / PAGE_COMMITS


def pages() -> str:
    """The pages a ``ctx.set`` and a raw single-event commit write, as a sentence."""
    value = PAYLOAD["value"]
    with sqlite_file() as ours, sqlite_file() as raw_path:
        with (
            EventStore.open(f"sqlite:///{ours}") as store,
            ContextManager(store, cleanup_interval=None) as manager,
        ):
            ctx = manager.create_context("pages")

            def sets(n: int) -> None:
                for i in range(n):
                    ctx.set(f"k{i % 200}", value)

            per_set = _pages(ours, sets)
        raw = raw_sqlite_writer(str(raw_path))
        per_insert = _pages(raw_path, lambda n: raw(1, n)())
    return (
        f"Pages of 4 KB a commit adds to the write-ahead log ({PAGE_COMMITS} commits): "
        f"{per_set:.2f} for a `ctx.set` (its snapshots included), {per_insert:.2f} for the "
        "raw driver's INSERT and COMMIT.\n"
    )


def _workload(batch: int) -> dict[str, tuple[float, float]]:
    """Every part of one workload (``ctx.set``, or ``update`` of ``batch`` keys)."""
    parts: dict[str, tuple[float, float]] = {}
    with (
        sqlite_file() as ours,
        sqlite_file() as alone_path,
        sqlite_file() as raw_path,
        sqlite_file() as reusing_path,
        sqlite_file() as peer_path,
    ):
        with (
            EventStore.open(f"sqlite:///{ours}") as store,
            ContextManager(store, cleanup_interval=None) as manager,
        ):
            writes = _writes(manager.create_context("parts"), batch)
            parts["the whole call"] = _best(writes)
            with _no_writes():
                parts["its Python alone"] = _best(writes)
        with (
            EventStore.open(f"sqlite:///{alone_path}") as store,
            ContextManager(store, cleanup_interval=None) as manager,
        ):
            manager.create_context("statements")
            manager.create_context("least")
            with closing(sqlite3.connect(alone_path, isolation_level=None)) as conn:
                statements = _pinned(conn, store, "statements", batch, work=False)
                parts["its statements alone"] = _best(statements)
                least = _pinned(conn, store, "least", batch, work=True)
                parts["the least any design with these statements does"] = _best(least)
        raw = raw_sqlite_writer(str(raw_path))(batch, EVENTS // batch)
        parts["raw driver: INSERT and COMMIT"] = _best(raw)
        reusing = raw_sqlite_writer(str(reusing_path), autoincrement=False)
        parts["the same without AUTOINCREMENT (positions reusable)"] = _best(
            reusing(batch, EVENTS // batch)
        )
        with peer_app("sqlite", sqlite_path=str(peer_path)) as app:
            parts["eventsourcing"] = _best(_peer_runner(app, batch, EVENTS // batch))
    return parts


def run() -> str:
    """Time each part of both workloads; return the tables."""
    tables = []
    for batch, name in ((1, "ctx.set"), (BATCH, f"update of {BATCH} keys")):
        parts = _workload(batch)
        walls = (parts["raw driver: INSERT and COMMIT"][1], parts["eventsourcing"][1])
        rows = [
            [part, f"{cpu:.2f} µs", f"{wall:.2f} µs", *(f"{w / wall:.2f}×" for w in walls)]
            for part, (cpu, wall) in parts.items()
        ]
        tables.append(
            table(
                f"Where the time of {name} goes (SQLite NORMAL, per event, best of "
                f"{ROUNDS} × {EVENTS:,} events; rates from wall time)",
                ["part", "CPU", "wall", "rate × raw", "rate × eventsourcing"],
                rows,
            )
        )
    return "\n".join(tables) + "\n" + pages()


if __name__ == "__main__":
    print(run())
