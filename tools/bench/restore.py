"""Restore and fold: a cold manager restoring a session (snapshots on), a full fold (no
snapshot), the raw driver's select + orjson, and eventsourcing's ``repository.get`` with and
without snapshots; plus the peak memory of replaying 1M events.

The sessions hold 200 keys written over and over, so the state stays the same size while the
history grows: restore time with snapshots should not grow with it.
"""

from __future__ import annotations

import sqlite3
import statistics
import subprocess
import sys
from collections.abc import Callable
from contextlib import closing
from functools import partial
from typing import Any

import orjson
import sqlalchemy as sa

from eventctx import ContextManager, EventStore
from eventctx.snapshots import fold_log
from eventctx.state import fold
from tools.bench.common import (
    PAYLOAD,
    ROUNDS,
    Figure,
    pg_available,
    pg_schema,
    sqlite_file,
    take_turns,
)
from tools.bench.peer import PeerContext, peer_app

SQLITE_SIZES = (1_000, 10_000, 100_000, 1_000_000)
PG_SIZES = (1_000, 10_000, 100_000, 1_000_000)
PEER_FULL_MAX = 100_000
"""eventsourcing replays without snapshots only up to here (1M takes it most of a minute)."""
KEYS = 200
PEER_SNAPSHOT_EVERY = 1000
TIMED_S = 0.3
TIMED_MAX = 300


def timed(run: Callable[[], Any], rounds: int = ROUNDS) -> Figure:
    """Median (min–max) milliseconds of ``rounds`` runs after a warm-up, or of more while they
    take under ``TIMED_S`` in all (up to ``TIMED_MAX``): a figure of a millisecond is the
    median of a few hundred runs, not of five that one scheduler hiccup can move."""
    return timed_together({"": run}, rounds)[""]


def timed_together(runs: dict[str, Callable[[], Any]], rounds: int = ROUNDS) -> dict[str, Figure]:
    """``timed`` for each of ``runs``, their runs taken in turn (``take_turns``)."""

    def more(seconds: list[float]) -> bool:
        return len(seconds) < rounds or (sum(seconds) < TIMED_S and len(seconds) < TIMED_MAX)

    took = take_turns(runs, more)
    return {
        name: Figure("", statistics.median(ms), min(ms), max(ms), "ms")
        for name, ms in ((name, [s * 1000 for s in seconds]) for name, seconds in took.items())
    }


def _populate(manager: ContextManager, session_id: str, events: int) -> None:
    ctx = manager.create_context(session_id, ttl=None)
    value = PAYLOAD["value"]
    written = 1
    while written < events:
        batch = min(KEYS, events - written)
        ctx.update({f"k{i}": value for i in range(batch)})
        written += batch


def _peer_populate(app: Any, events: int) -> Any:
    ctx = PeerContext()
    app.save(ctx)
    value = PAYLOAD["value"]
    for start in range(1, events, 1000):
        for i in range(start, min(start + 1000, events)):
            ctx.set(f"k{i % KEYS}", value)
        app.save(ctx)
    return ctx.id


def _raw_fold(store: EventStore, session_id: str) -> Callable[[], dict[str, Any]]:
    param = "?" if store.dialect_name == "sqlite" else "%s"
    sql = (
        "SELECT type, key, payload FROM eventctx_events "
        f"WHERE session_id = {param} ORDER BY version"
    )

    def run() -> dict[str, Any]:
        raw = store.engine.raw_connection()
        try:
            cur = raw.cursor()
            cur.execute(sql, (session_id,))
            data: dict[str, Any] = {}
            loads = orjson.loads
            for type_, key, payload in cur.fetchall():
                if type_ == "KeySet":
                    data[key] = loads(payload)["value"]
            raw.rollback()
            return data
        finally:
            raw.close()

    return run


def _full_fold(store: EventStore, session_id: str) -> None:
    fold_log(store, session_id)


def _cold(store: EventStore, session_id: str) -> Callable[[], None]:
    def run() -> None:
        with ContextManager(store, cleanup_interval=None) as manager:
            manager.get_context(session_id)

    return run


def _settle(store: EventStore, peer_env: dict[str, Any]) -> None:
    """Bring both libraries' databases to where a service's would be a while after its writes,
    before any restore is timed.

    On PostgreSQL: vacuum every table and refresh the planner's statistics, as autovacuum does
    once it catches up with tables filled in seconds (until then a plan may read every
    snapshot of a session to find its newest: a bitmap scan of 1.8 ms for 5,000, where the
    index scan takes 0.05 ms), then write the pages the writes and the vacuum left dirty to
    disk, as the checkpointer does within minutes: otherwise both passes compete with the
    first timed runs for the 2 cores. On SQLite: copy each write-ahead log into its database
    file and empty it, as the last connection to close a file does."""
    if store.dialect_name == "sqlite":
        for path in (store.engine.url.database, peer_env["sqlite_path"]):
            with closing(sqlite3.connect(str(path))) as conn:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return
    with store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        ours = conn.exec_driver_sql("SELECT current_schema()").scalar_one()
        for schema in (ours, peer_env["pg_schema"]):
            found = conn.execute(
                sa.text("SELECT tablename FROM pg_tables WHERE schemaname = :schema"),
                {"schema": schema},
            )
            for table in found.scalars().all():
                conn.exec_driver_sql(f'VACUUM (ANALYZE) "{schema}"."{table}"')
        conn.exec_driver_sql("CHECKPOINT")


def _measure(
    label: str, url: str, sizes: tuple[int, ...], peer_env: dict[str, Any]
) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    with ContextManager(url, cleanup_interval=None) as manager:
        for n in sizes:
            _populate(manager, f"h{n}", n)
    store = EventStore.open(url)
    with (
        peer_app(snapshot_every=PEER_SNAPSHOT_EVERY, **peer_env) as snap_app,
        peer_app(**peer_env) as full_app,
    ):
        for n in sizes:
            sid = f"h{n}"
            assert fold_log(store, sid) == fold(store.read(sid))
            assert fold_log(store, sid).data == _raw_fold(store, sid)()
            peer_id = _peer_populate(snap_app, n)
            _settle(store, peer_env)
            runs: dict[str, Callable[[], Any]] = {
                "snapshots": _cold(store, sid),
                "eventsourcing snapshots": partial(snap_app.repository.get, peer_id),
                "full fold": partial(_full_fold, store, sid),
                "raw": _raw_fold(store, sid),
            }
            if n <= PEER_FULL_MAX:
                runs["eventsourcing full"] = partial(full_app.repository.get, peer_id)
            rows[f"{label} {n}"] = {"events": n, "eventsourcing full": None} | timed_together(runs)
    store.close()
    return rows


def _memory(url: str) -> dict[str, float]:
    """Peak RSS while a fresh process replays the 1M-event session, beyond the final state."""
    script = (
        "import sys\n"
        "from eventctx import EventStore\n"
        "from eventctx.snapshots import fold_log\n"
        "def status(field):  # kB; VmHWM is this process's peak (ru_maxrss survives exec)\n"
        "    for line in open('/proc/self/status'):\n"
        "        if line.startswith(field):\n"
        "            return int(line.split()[1]) / 1024\n"
        "store = EventStore.open(sys.argv[1])\n"
        "before = status('VmRSS')\n"
        "state = fold_log(store, 'h1000000')\n"
        "print(before, status('VmHWM'), len(state.encode()) / 2**20, state.version)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, url], capture_output=True, text=True, check=True
    ).stdout.split()
    before, peak, state_mib, version = map(float, out)
    assert version == 1_000_000
    return {
        "before_mib": before,
        "peak_mib": peak,
        "state_mib": state_mib,
        "added_mib": peak - before,
    }


def run() -> dict[str, Any]:
    """Every restore figure, keyed by ``"<backend> <events>"``, plus ``memory``."""
    results: dict[str, Any] = {}
    with sqlite_file() as ours, sqlite_file() as peer_path:
        url = f"sqlite:///{ours}"
        results |= _measure(
            "SQLite", url, SQLITE_SIZES, {"backend": "sqlite", "sqlite_path": str(peer_path)}
        )
        results["memory"] = _memory(url)
    if pg_available():
        with pg_schema() as (_, url), pg_schema() as (peer_schema, _):
            results |= _measure(
                "PostgreSQL", url, PG_SIZES, {"backend": "postgresql", "pg_schema": peer_schema}
            )
    return results
