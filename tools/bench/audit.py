"""What audit trust costs: ``ctx.set`` with an unkeyed and a keyed (HMAC-SHA256) chain, and
the hash check a restore makes of every tail event it folds (the same read with and without
it, and a whole cold restore).

``python -m tools.bench.audit`` prints the table; ``make bench`` includes it.
"""

from __future__ import annotations

from functools import partial

from eventctx import ContextManager, EventStore
from eventctx.snapshots import restore
from tools.bench.common import PAYLOAD, Figure, each_backend, measure, table
from tools.bench.restore import timed

KEY = "a benchmark key of thirty-two by"
WRITES = 2000
TAILS = (100, 1000)


def _set_rate(url: str, chain_key: str | None) -> Figure:
    with ContextManager(url, cleanup_interval=None, chain_key=chain_key) as manager:
        ctx = manager.create_context("w", ttl=None)
        value = PAYLOAD["value"]

        def run() -> None:
            for i in range(WRITES):
                ctx.set(f"k{i % 50}", value)

        return measure("ctx.set", "writes/s", WRITES, run)


def _tail_reads(url: str) -> list[list[str]]:
    rows = []
    with ContextManager(url, cleanup_interval=None, snapshot_every=10**9) as manager:
        store = manager.store
        for tail in TAILS:
            ctx = manager.create_context(f"t{tail}", ttl=None)
            for start in range(0, tail - 1, 100):  # updates of up to 100 keys, no snapshot
                keys = range(start, min(start + 100, tail - 1))
                ctx.update({f"k{i}": PAYLOAD["value"] for i in keys})
            sid = f"t{tail}"
            head = store.session(sid)
            assert head is not None
            plain = timed(partial(_read, store, sid, False))
            checked = timed(partial(_read, store, sid, True))
            cold = timed(partial(restore, store, sid, head.version, head.head_hash))
            rows.append(
                [
                    f"{tail:,}-event tail",
                    plain.cell(),
                    checked.cell(),
                    f"{checked.median / plain.median:.2f}×",
                    cold.cell(),
                ]
            )
    return rows


def _read(store: EventStore, session_id: str, verify: bool) -> None:
    for _ in store.read(session_id, verify=verify):
        pass


def run() -> str:
    """Measure on SQLite (and PostgreSQL when it answers); return the Markdown tables."""
    set_rows, tail_rows = [], []
    for (name, url), (_, keyed_url) in zip(each_backend(), each_backend(), strict=True):
        unkeyed, keyed = _set_rate(url, None), _set_rate(keyed_url, KEY)
        ratio = f"{keyed.median / unkeyed.median:.2f}×"
        set_rows.append([name, unkeyed.cell(), keyed.cell(), ratio])
    for name, url in each_backend():
        tail_rows += [[f"{name}: {row[0]}", *row[1:]] for row in _tail_reads(url)]
    return (
        table(
            "Audit: `ctx.set` with an unkeyed and a keyed chain",
            ["backend", "sha256 chain", "HMAC-SHA256 chain", "keyed / unkeyed"],
            set_rows,
        )
        + "\n"
        + table(
            "Audit: the restore-time hash check of the tail, milliseconds (median, min–max)",
            [
                "tail",
                "read",
                "read, each hash checked",
                "checked / read",
                "whole restore (checked)",
            ],
            tail_rows,
        )
    )


if __name__ == "__main__":
    print(run())
