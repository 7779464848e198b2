"""Store-level append throughput next to the raw driver doing the same inserts.

``python -m tools.bench.append`` prints, for SQLite (NORMAL) and PostgreSQL: one event per
transaction, and batches of 100 events per transaction, as events per second (median of the
rounds, min–max) and the ratio to the raw driver.
"""

from __future__ import annotations

import hashlib
import sqlite3
import sys
from collections.abc import Callable
from itertools import count

import orjson
import psycopg
import sqlalchemy as sa

from eventctx import EventStore, NewEvent
from eventctx.store import Head
from tools.bench.common import (
    PAYLOAD,
    PG_URL,
    Figure,
    measure_together,
    pg_available,
    pg_schema,
    sqlite_file,
    table,
)

SINGLE = 2000
BATCHES = 40
BATCH = 100

RAW_DDL = """CREATE TABLE raw_events (
    position {pk}, session_id VARCHAR(512) NOT NULL, version BIGINT NOT NULL,
    type VARCHAR(64) NOT NULL, key TEXT, phase TEXT, execution_id VARCHAR(64),
    payload {blob} NOT NULL, recorded_at BIGINT NOT NULL, hash {blob} NOT NULL,
    prev_hash {blob} NOT NULL, UNIQUE (session_id, version))"""
RAW_INSERT = (
    "INSERT INTO raw_events (session_id, version, type, key, phase, execution_id, payload, "
    "recorded_at, hash, prev_hash) VALUES ({p})"
)


def _raw_row(session: str, version: int) -> tuple[object, ...]:
    digest = hashlib.sha256(b"%d" % version).digest()
    payload = orjson.dumps(PAYLOAD, option=orjson.OPT_SORT_KEYS)
    return (session, version, "KeySet", "k", None, None, payload, 1, digest, digest)


class _Store:
    """Appends through EventStore the way a context does: with its head as the hint."""

    def __init__(self, url: str) -> None:
        self.store = EventStore.open(url)
        self.sessions = count()

    def runner(self, batch: int, times: int) -> Callable[[], None]:
        def run() -> None:
            session = f"s{next(self.sessions)}"
            first = self.store.append(session, [NewEvent.create("ContextCreated")])[-1]
            head = Head(first.version, first.hash, first.recorded_at_us)
            for _ in range(times):
                events = [NewEvent.create("KeySet", PAYLOAD, key="k") for _ in range(batch)]
                last = self.store.append(session, events, head=head)[-1]
                head = Head(last.version, last.hash, last.recorded_at_us)

        return run


def raw_sqlite_writer(
    path: str, synchronous: str = "NORMAL", *, autoincrement: bool = True
) -> Callable[[int, int], Callable[[], None]]:
    """sqlite3 alone (WAL): ``runner(batch, times)`` commits ``times`` transactions. Its
    positions are never reused, as ours are, through AUTOINCREMENT; without it (only for
    comparison) a deletion of the newest rows would let their positions be handed out again."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(f"PRAGMA synchronous = {synchronous}")
    pk = "INTEGER PRIMARY KEY AUTOINCREMENT" if autoincrement else "INTEGER PRIMARY KEY"
    conn.execute(RAW_DDL.format(pk=pk, blob="BLOB"))
    sql = RAW_INSERT.format(p=", ".join("?" * 10))
    sessions = count()

    def runner(batch: int, times: int) -> Callable[[], None]:
        def run() -> None:
            session, version = f"s{next(sessions)}", 0
            for _ in range(times):
                rows = [_raw_row(session, version + i + 1) for i in range(batch)]
                version += batch
                conn.execute("BEGIN")
                if batch == 1:
                    conn.execute(sql, rows[0])
                else:
                    conn.executemany(sql, rows)
                conn.execute("COMMIT")

        return run

    return runner


def raw_pg_writer(schema: str) -> Callable[[int, int], Callable[[], None]]:
    """psycopg alone (synchronous_commit as the server has it), same shape as sqlite's, in as
    few round trips as the driver allows: one event is one INSERT in autocommit; a batch is
    its INSERTs and the COMMIT sent together in pipeline mode."""
    url = sa.make_url(PG_URL)
    conn = psycopg.connect(
        host=url.host,
        port=url.port,
        user=url.username,
        dbname=url.database,
        options=f"-csearch_path={schema}",
    )
    conn.execute(RAW_DDL.format(pk="BIGSERIAL PRIMARY KEY", blob="BYTEA"))
    conn.commit()
    sql = RAW_INSERT.format(p=", ".join(["%s"] * 10))
    sessions = count()

    def runner(batch: int, times: int) -> Callable[[], None]:
        def run() -> None:
            session, version = f"s{next(sessions)}", 0
            conn.autocommit = batch == 1
            with conn.cursor() as cur:
                for _ in range(times):
                    rows = [_raw_row(session, version + i + 1) for i in range(batch)]
                    version += batch
                    if batch == 1:
                        cur.execute(sql, rows[0])
                        continue
                    with conn.pipeline():
                        cur.executemany(sql, rows)
                        conn.commit()

        return run

    return runner


def _pair(
    label: str, ours: _Store, raw: Callable[[int, int], Callable[[], None]], times: int, batch: int
) -> list[str]:
    figures = measure_together(
        "ev/s", times * batch, {"eventctx": ours.runner(batch, times), "raw": raw(batch, times)}
    )
    mine, theirs = figures["eventctx"], figures["raw"]
    return [label, mine.cell(), theirs.cell(), speed(mine, theirs)]


def speed(mine: Figure, raw: Figure) -> str:
    """eventctx's speed as a fraction of the raw driver's (rates, or times in ms)."""
    ratio = raw.median / mine.median if mine.unit == "ms" else mine.median / raw.median
    return f"{ratio:.2f}×"


def run() -> str:
    """Run the append benchmarks; return the result table."""
    rows = []
    with sqlite_file() as ours_path, sqlite_file() as raw_path:
        store = _Store(f"sqlite:///{ours_path}")
        raw = raw_sqlite_writer(str(raw_path))
        rows.append(_pair("SQLite NORMAL, 1 event/txn", store, raw, SINGLE, 1))
        rows.append(_pair(f"SQLite NORMAL, {BATCH} events/txn", store, raw, BATCHES, BATCH))
        store.store.close()
    if pg_available():
        with pg_schema() as (_, url), pg_schema() as (raw_schema, _):
            store = _Store(url)
            raw = raw_pg_writer(raw_schema)
            rows.append(_pair("PostgreSQL, 1 event/txn", store, raw, SINGLE // 2, 1))
            rows.append(_pair(f"PostgreSQL, {BATCH} events/txn", store, raw, BATCHES, BATCH))
            store.store.close()
    else:
        print("PostgreSQL not reachable: its rows are left out", file=sys.stderr)
    return table(
        "Append throughput: EventStore.append vs the raw driver (same rows, same settings)",
        ["workload", "eventctx", "raw driver", "ratio"],
        rows,
    )


if __name__ == "__main__":
    print(run())
