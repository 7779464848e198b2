"""Maintenance at scale: checking the chains of, and compacting, 100k small sessions.

``python -m tools.bench.maintenance`` prints the table. The sessions (three events each) are
written in bulk, with their real hash chains, so that setting up takes seconds.
"""

from __future__ import annotations

import time
from typing import Any

import sqlalchemy as sa

from eventctx import EventStore, NewEvent
from eventctx.compaction import compact
from eventctx.events import GENESIS_HASH, sha256
from eventctx.store import Head, schema
from eventctx.store.append import _chain
from eventctx.store.commit import head_after
from eventctx.store.statements import EVENT_COLUMNS
from tools.bench.common import each_backend, table

SESSIONS = 100_000
EVENTS = [
    NewEvent.create("ContextCreated", {"ttl_ms": 1}),
    NewEvent.create("KeySet", {"value": {"files": 3}}, key="a"),
    NewEvent.create("KeySet", {"value": "go"}, key="b"),
]


def _fill(store: EventStore, sessions: int) -> None:
    now = store.clock() - 10_000_000  # ten seconds ago: expired (ttl 1 ms)
    with store.engine.begin() as conn:
        for start in range(0, sessions, 10_000):
            rows: list[dict[str, Any]] = []
            heads = []
            for n in range(start, min(start + 10_000, sessions)):
                sid = f"s{n:07d}"
                chained = _chain(sid, EVENTS, Head(0, GENESIS_HASH, now), now, sha256)
                rows += [dict(zip(EVENT_COLUMNS, row, strict=True)) for row in chained]
                heads.append(
                    {
                        "session_id": sid,
                        "version": len(chained),
                        "head_hash": head_after(chained).hash,
                        "created_at": now,
                        "last_activity": now,
                        "ttl_ms": 1,
                        "status": "active",
                    }
                )
            conn.execute(sa.insert(schema.sessions), heads)
            conn.execute(sa.insert(schema.events), rows)


def _timed(run: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    result = run()
    return time.perf_counter() - start, result


def _backend(name: str, url: str) -> list[list[str]]:
    with EventStore.open(url) as store:
        _fill(store, SESSIONS)
        one_by_one, checked = _timed(
            lambda: sum(store.verify(h.session_id) for h in store.sessions())
        )
        streamed, results = _timed(lambda: list(store.verify_all()))
        assert checked == 3 * SESSIONS and all(n == 3 for _, n in results)
        compacted, report = _timed(lambda: compact(store))
        assert report.sessions_removed == SESSIONS
    return [
        [f"{name}: verify each session", f"{one_by_one:.1f} s", f"{SESSIONS / one_by_one:,.0f}/s"],
        [f"{name}: verify_all (one pass)", f"{streamed:.1f} s", f"{SESSIONS / streamed:,.0f}/s"],
        [f"{name}: compact every session", f"{compacted:.1f} s", f"{SESSIONS / compacted:,.0f}/s"],
    ]


def run() -> str:
    """Measure on SQLite (and PostgreSQL when it answers); return the Markdown table."""
    rows = [row for name, url in each_backend() for row in _backend(name, url)]
    return table(
        f"Maintenance of {SESSIONS:,} sessions of three events",
        ["operation", "time", "sessions per second"],
        rows,
    )


if __name__ == "__main__":
    print(run())
