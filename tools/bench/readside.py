"""The read side: Inspector queries on a 10k-event and a 1M-event session of the same shape
(200 keys rewritten over and over), and phase statistics over 10k recorded runs. What a query
costs should follow what it returns, not the length of the history.

``python -m tools.bench.readside`` prints the table; ``make bench`` includes it.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from eventctx import ContextManager, EventStore, Inspector, runlog
from eventctx.events import NewEvent
from tools.bench.common import Figure, each_backend, table
from tools.bench.restore import _populate, timed

SIZES = (10_000, 1_000_000)
RUNS = 10_000
PHASES = ("analysis", "planning", "execution", "report")


def _record_runs(store: EventStore, session_id: str, runs: int) -> int:
    """``runs`` completed runs of four phases (a retry in every tenth), appended in batches;
    returns the session's events."""
    written = 1
    store.append(session_id, [NewEvent.create("ContextCreated")])
    batch: list[NewEvent] = []
    for n in range(runs):
        run = uuid.uuid4().hex
        batch.append(runlog.run_started(run, {"n": n}, PHASES))
        for i, phase in enumerate(PHASES):
            if i == 1 and n % 10 == 0:
                batch.append(runlog.phase_started(run, phase, 1))
                batch.append(runlog.phase_failed(run, phase, 1, TimeoutError(), 5.0, set()))
                batch.append(runlog.phase_started(run, phase, 2))
            else:
                batch.append(runlog.phase_started(run, phase, 1))
            ms = float(10 + (n * 7 + i * 13) % 90)
            batch.append(runlog.phase_completed(run, phase, 1, None, ms, {"k1"}))
        batch.append(runlog.run_completed(run, 200.0))
        if len(batch) >= 1000:
            written += len(store.append(session_id, batch))
            batch = []
    if batch:
        written += len(store.append(session_id, batch))
    return written


def _queries(insp: Inspector, session_id: str, size: int) -> dict[str, Callable[[], Any]]:
    middle = size // 2
    return {
        "state_at (middle version)": lambda: insp.state_at(session_id, middle),
        "blame() of the whole state": lambda: insp.blame(session_id),
        "blame(key)": lambda: insp.blame(session_id, "k7"),
        "diff across 100 versions": lambda: insp.diff(session_id, middle, middle + 100),
        # These two scan the session's rows (no index on key is paid on the append path):
        "key_history(key) (a scan)": lambda: insp.key_history(session_id, "k7"),
        "readers(key) (a scan)": lambda: insp.readers(session_id, "k7"),
    }


def _backend(name: str, url: str) -> list[list[str]]:
    rows: dict[str, dict[int, Figure]] = {}
    with ContextManager(url, cleanup_interval=None) as manager:
        for size in SIZES:
            _populate(manager, f"s{size}", size)
        recorded = _record_runs(manager.store, "runs", RUNS)
        insp = Inspector(manager.store)
        for size in SIZES:
            for query, run in _queries(insp, f"s{size}", size).items():
                rows.setdefault(query, {})[size] = timed(run)
        one = timed(lambda: insp.phase_stats("runs"), rounds=3)
        every = timed(insp.phase_stats, rounds=3)
    out = [
        [f"{name}: {query}", *(by_size[s].cell() for s in SIZES), _ratio(by_size)]
        for query, by_size in rows.items()
    ]
    total = sum(SIZES) + recorded
    out.append([f"{name}: phase_stats of {RUNS:,} runs ({recorded:,} events)", one.cell(), "", ""])
    out.append([f"{name}: phase_stats of every session ({total:,} events)", "", every.cell(), ""])
    return out


def _ratio(by_size: dict[int, Figure]) -> str:
    return f"{by_size[SIZES[-1]].median / by_size[SIZES[0]].median:.2f}×"


def run() -> str:
    """Measure on SQLite (and PostgreSQL when it answers); return the Markdown table."""
    rows = [row for name, url in each_backend() for row in _backend(name, url)]
    return table(
        "Read side: Inspector queries, milliseconds (median, min–max)",
        ["query", f"{SIZES[0]:,}-event session", f"{SIZES[1]:,}-event session", "1M / 10k"],
        rows,
    )


if __name__ == "__main__":
    print(run())
