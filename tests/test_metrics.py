"""Metrics: a manager's live counters."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

from eventctx import ContextManager

# --- live counters ---------------------------------------------------------------------------


def test_manager_metrics_count_exactly(db_url: str) -> None:
    with ContextManager(db_url, cleanup_interval=None, snapshot_every=5) as manager:
        fresh = manager.metrics()
        assert (fresh.appends, fresh.contexts_created, fresh.contexts_active) == (0, 0, 0)
        a = manager.create_context("a")
        for i in range(12):
            a.set("k", i)
        a.update({"x": 1, "y": 2})  # one append, two events
        short = manager.create_context("short", ttl=timedelta(milliseconds=50))
        a.clone("copy")  # created, in one append
        manager.delete_context("copy")
        time.sleep(0.1)
        manager.cleanup_expired(dry_run=True)  # not a cleanup run
        assert manager.cleanup_expired().sessions == ["short"]
        del short
        live = manager.metrics()
        assert live.contexts_created == 3
        assert live.appends == 1 + 12 + 1 + 1 + 1 + 1  # creates, sets, update, clone, delete
        assert live.append_seconds.count == live.appends
        assert 0 < live.append_seconds.sum < 60
        assert (live.contexts_expired, live.cleanups, live.contexts_restored) == (1, 1, 0)
        assert live.contexts_active == 1  # "a"; "copy" and "short" are gone
        snapshots = sum(len(manager.store.snapshots(s)) for s in ("a", "copy"))
        assert live.snapshots == snapshots > 0
    with ContextManager(db_url, cleanup_interval=None) as other:
        held = other.get_context("a")
        assert other.get_context("a") is held  # from the cache: restored once
        live = other.metrics()
        assert (live.contexts_restored, live.contexts_created, live.appends) == (1, 0, 0)
        assert live.contexts_active == 1
        held.set("z", 0)
        assert other.metrics().appends == 1


def test_concurrent_appends_are_all_counted(manager: ContextManager) -> None:
    writes, threads = 50, 4
    shared = manager.create_context("shared")
    before = manager.metrics().appends
    start = threading.Barrier(threads)

    def write(n: int) -> None:
        own = manager.create_context(f"own-{n}")
        start.wait()
        for i in range(writes):
            (shared if i % 2 else own).set(f"k{n}", i)

    workers = [threading.Thread(target=write, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    live = manager.metrics()
    assert live.appends - before == threads * writes + threads  # the writes, and the creates
    assert live.append_seconds.count == live.appends
    assert shared.version == 1 + threads * writes // 2
