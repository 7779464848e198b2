"""Export and import of one large session: events per second each way and the peak memory
they add, on SQLite and on PostgreSQL (``python -m tools.bench.exchange [EVENTS]``, default
1,000,000). Export and import run in a child process of their own, so that the peak RSS
growth is theirs alone."""

from __future__ import annotations

import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import orjson

from eventctx import EventStore, NewEvent
from eventctx.exchange import export_session, import_session
from tools.bench.common import PAYLOAD, each_backend, pg_schema, sqlite_file, table

SESSION = "big"
KEYS = 200


def populate(url: str, events: int) -> None:
    """One session of ``events`` events: its creation, then KeySets over ``KEYS`` keys."""
    with EventStore.open(url) as store:
        store.append(SESSION, [NewEvent.create("ContextCreated", {"ttl_ms": None})])
        for start in range(1, events, 1000):
            batch = [
                NewEvent.create("KeySet", PAYLOAD, key=f"k{i % KEYS}")
                for i in range(start, min(start + 1000, events))
            ]
            store.append(SESSION, batch)


def measure(source: str, target: str, path: str) -> dict[str, float]:
    """Export ``source``'s session to ``path`` and import it into ``target``: seconds each
    and the peak RSS growth in MiB (run in a fresh process)."""
    with EventStore.open(source, read_only=True) as store, EventStore.open(target) as into:
        store.session(SESSION)
        into.sessions()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        export_session(store, SESSION, path)
        exported = time.perf_counter()
        import_session(into, path)
        imported = time.perf_counter()
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "export_s": exported - start,
        "import_s": imported - exported,
        "peak_mib": (after - before) / 1024,
        "file_mib": Path(path).stat().st_size / 2**20,
    }


def run(events: int) -> str:
    """Populate, measure in a child process on each backend, and return the table."""
    rows = []
    for name, url in each_backend():
        populate(url, events)
        with tempfile.TemporaryDirectory() as tmp:
            for suffix in (".jsonl", ".jsonl.gz"):
                with _fresh_like(url) as target:
                    path = str(Path(tmp) / f"s{suffix}")
                    done = subprocess.run(
                        [
                            sys.executable,
                            "-m",
                            "tools.bench.exchange",
                            "--measure",
                            url,
                            target,
                            path,
                        ],
                        capture_output=True,
                        check=True,
                    )
                figures = orjson.loads(done.stdout)
                rows.append(
                    [
                        name,
                        suffix,
                        f"{events / figures['export_s']:,.0f}",
                        f"{events / figures['import_s']:,.0f}",
                        f"{figures['peak_mib']:.1f}",
                        f"{figures['file_mib']:.0f}",
                    ]
                )
    header = ["backend", "file", "export ev/s", "import ev/s", "peak RSS growth MiB", "file MiB"]
    return table(f"Export and import of a {events:,}-event session", header, rows)


@contextmanager
def _fresh_like(url: str) -> Iterator[str]:
    """A fresh database on ``url``'s backend."""
    if url.startswith("sqlite"):
        with sqlite_file() as path:
            yield f"sqlite:///{path}"
    else:
        with pg_schema() as (_, fresh):
            yield fresh


if __name__ == "__main__":
    if sys.argv[1:2] == ["--measure"]:
        sys.stdout.buffer.write(orjson.dumps(measure(*sys.argv[2:5])))
    else:
        print(run(int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000))
