"""Concurrent writers: 1, 2 and 4 threads or processes calling ``ctx.set``, on one shared
session or each on its own; total committed events per second and p99 latency per call."""

from __future__ import annotations

import statistics
import subprocess
import sys
import threading
import time
from typing import Any

import orjson

from eventctx import ContextManager, EventStore
from eventctx.store.dialect import Synchronous
from tools.bench.common import PAYLOAD, pg_available, pg_schema, sqlite_file

WRITERS = (1, 2, 4)
PER_WRITER = {"sqlite": 1500, "postgresql": 500}


def _write(ctx: Any, count: int, tag: str) -> list[float]:
    latencies = []
    value = PAYLOAD["value"]
    for i in range(count):
        start = time.perf_counter()
        ctx.set(f"{tag}-{i % 100}", value)
        latencies.append(time.perf_counter() - start)
    return latencies


def _threads(
    url: str, writers: int, shared: bool, count: int, synchronous: Synchronous = "NORMAL"
) -> tuple[float, list[float]]:
    store = EventStore.open(url, synchronous=synchronous)
    with store, ContextManager(store, cleanup_interval=None) as manager:
        contexts = [
            manager.get_or_create_context("shared" if shared else f"own-{n}", ttl=None)
            for n in range(writers)
        ]
        results: list[list[float]] = [[] for _ in range(writers)]
        threads = [
            threading.Thread(
                target=lambda n=n: results[n].extend(_write(contexts[n], count, f"t{n}"))
            )
            for n in range(writers)
        ]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - start
    return writers * count / elapsed, [x for r in results for x in r]


_CHILD = """
import sys, time, orjson
from eventctx import ContextManager, EventStore
from eventctx.store.dialect import Synchronous
from tools.bench.writers import _write
url, session, count, tag, start_at = sys.argv[1:6]
with ContextManager(url, cleanup_interval=None) as manager:
    ctx = manager.get_or_create_context(session, ttl=None)
    while time.time() < float(start_at):
        time.sleep(0.001)
    began = time.time()
    latencies = _write(ctx, int(count), tag)
    done = {"began": began, "ended": time.time(), "latencies": latencies}
    sys.stdout.buffer.write(orjson.dumps(done))
"""


def _processes(url: str, writers: int, shared: bool, count: int) -> tuple[float, list[float]]:
    start_at = time.time() + 1.5  # every child connected and ready before the first write
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                _CHILD,
                url,
                "shared-p" if shared else f"own-p{n}",
                str(count),
                f"p{n}",
                str(start_at),
            ],
            stdout=subprocess.PIPE,
        )
        for n in range(writers)
    ]
    outs = [orjson.loads(p.communicate(timeout=600)[0]) for p in procs]
    elapsed = max(o["ended"] for o in outs) - min(o["began"] for o in outs)
    return writers * count / elapsed, [x for o in outs for x in o["latencies"]]


def _p99_ms(latencies: list[float]) -> float:
    return statistics.quantiles(latencies, n=100)[98] * 1000


def _measure(backend: str, url: str) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    count = PER_WRITER[backend]
    for kind, runner in (("threads", _threads), ("processes", _processes)):
        for shared in (True, False):
            for writers in WRITERS:
                rate, latencies = runner(url, writers, shared, count)
                rows[
                    f"{backend} {kind} {'one session' if shared else 'own sessions'} {writers}"
                ] = {
                    "backend": backend,
                    "kind": kind,
                    "shared": shared,
                    "writers": writers,
                    "rate": rate,
                    "p99_ms": _p99_ms(latencies),
                }
    return rows


def run() -> dict[str, Any]:
    """Every configuration's throughput and p99."""
    results: dict[str, Any] = {}
    with sqlite_file() as path:
        results |= _measure("sqlite", f"sqlite:///{path}")
    with sqlite_file() as path:  # durable commits: what sharing one buys is the fsync
        for writers in WRITERS:
            rate, latencies = _threads(
                f"sqlite:///{path}", writers, True, PER_WRITER["sqlite"], "FULL"
            )
            rows = {"backend": "sqlite FULL", "kind": "threads", "shared": True}
            results[f"sqlite FULL threads one session {writers}"] = rows | {
                "writers": writers,
                "rate": rate,
                "p99_ms": _p99_ms(latencies),
            }
    if pg_available():
        with pg_schema() as (_, url):
            results |= _measure("postgresql", url)
    return results
