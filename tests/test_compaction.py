"""TTL cleanup: expiry, the scheduled job, safety under writers, one compactor at a time."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from datetime import timedelta

import orjson
import pytest

from eventctx import (
    ContextManager,
    EventStore,
    SessionExpiredError,
    SessionNotFoundError,
)
from eventctx.cli import main
from eventctx.clock import now_us
from eventctx.compaction import LEASE, compact

SHORT = timedelta(milliseconds=60)


@pytest.fixture
def manager(db_url: str) -> Iterator[ContextManager]:
    with ContextManager(db_url, cleanup_interval=None) as m:
        yield m


def test_idle_sessions_go_and_active_ones_stay(manager: ContextManager) -> None:
    idle = manager.create_context("idle", ttl=SHORT)
    idle.update({"a": 1, "b": 2})
    manager.create_context("forever", ttl=None).set("a", 1)
    manager.create_context("long").set("a", 1)  # the manager's 24 h default
    kept_alive = manager.create_context("busy", ttl=timedelta(milliseconds=400))
    time.sleep(0.15)
    kept_alive.set("still", "here")  # activity restarts its ttl
    report = manager.cleanup_expired()
    assert report.sessions == ["idle"] and report.events_removed == 3
    assert report.skipped is None and report.duration_s > 0
    assert manager.store.session("idle") is None
    assert not list(manager.store.find("idle"))  # no event of it is left
    assert sorted(s.session_id for s in manager.sessions()) == ["busy", "forever", "long"]
    with pytest.raises(SessionExpiredError):
        idle.get("a")  # the open object refuses to go on
    with pytest.raises(SessionNotFoundError):
        manager.get_context("idle")
    assert manager.cleanup_expired().sessions == []


def test_deleted_sessions_are_removed_once_expired(manager: ContextManager) -> None:
    manager.create_context("gone", ttl=SHORT).set("a", 1)
    manager.delete_context("gone")
    assert manager.store.session("gone") is not None  # history kept until compaction
    time.sleep(0.1)
    assert manager.cleanup_expired().sessions == ["gone"]
    assert manager.store.session("gone") is None


def test_expired_session_refuses_writes_before_compaction(manager: ContextManager) -> None:
    ctx = manager.create_context("s", ttl=SHORT)
    ctx.set("a", 1)
    time.sleep(0.1)
    with pytest.raises(SessionExpiredError):
        ctx.set("a", 2)
    assert ctx.version == 2
    with pytest.raises(SessionExpiredError):
        manager.get_context("s")
    again = manager.get_or_create_context("s")  # starts again, versions continue
    assert again.version == 3 and len(again) == 0


def test_other_processes_context_gets_session_expired(db_url: str) -> None:
    with ContextManager(db_url, cleanup_interval=None) as one, ContextManager(db_url) as two:
        ctx = one.create_context("s", ttl=SHORT)
        ctx.set("a", 1)
        time.sleep(0.1)
        assert two.cleanup_expired().sessions == ["s"]
        with pytest.raises(SessionExpiredError, match="expired and was removed"):
            ctx.set("a", 2)


def test_large_sessions_are_removed_in_chunks(manager: ContextManager) -> None:
    ttl = timedelta(milliseconds=500)  # writing "big" must not outlast it on a busy machine
    ctx = manager.create_context("big", ttl=ttl)
    for start in range(0, 1200, 300):
        ctx.update({f"k{i}": i for i in range(start, start + 300)})
    small = manager.create_context("small", ttl=ttl)
    small.set("a", 1)
    time.sleep(0.6)
    report = compact(manager.store, chunk_events=250)
    assert sorted(report.sessions) == ["big", "small"]
    assert report.events_removed == 1201 + 2
    assert manager.store.session("big") is None


def test_dry_run_removes_nothing(
    manager: ContextManager, db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    manager.create_context("s", ttl=SHORT).set("a", 1)
    time.sleep(0.1)
    report = manager.cleanup_expired(dry_run=True)
    assert report.dry_run and report.sessions == ["s"] and report.events_removed == 2
    assert manager.store.session("s") is not None
    assert main(["--url", db_url, "--json", "compact", "--dry-run"]) == 0
    assert orjson.loads(capsys.readouterr().out)["sessions"] == ["s"]
    assert main(["--url", db_url, "compact"]) == 0
    assert "removed 1 expired sessions (2 events" in capsys.readouterr().out
    assert manager.store.session("s") is None


def test_the_scheduled_job_runs_by_itself(db_url: str) -> None:
    with ContextManager(db_url, ttl=SHORT, cleanup_interval=timedelta(milliseconds=100)) as m:
        m.create_context("s").set("a", 1)
        m.create_context("kept", ttl=None)
        deadline = time.monotonic() + 10
        while m.store.session("s") is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert m.store.session("s") is None
        assert [s.session_id for s in m.sessions()] == ["kept"]


def test_two_compactors_never_run_at_once(manager: ContextManager, db_url: str) -> None:
    store = manager.store
    assert store.take_named_lease(LEASE, "other-host:1:x", timedelta(seconds=30)) is None
    manager.create_context("s", ttl=SHORT)
    time.sleep(0.1)
    report = manager.cleanup_expired()
    assert report.sessions == [] and report.skipped and "other-host:1:x" in report.skipped
    store.release_named_lease(LEASE, "other-host:1:x")

    for i in range(300):
        manager.create_context(f"many-{i}", ttl=SHORT)
    time.sleep(0.1)
    spans: list[tuple[float, float, int, str | None]] = []

    def run() -> None:
        with EventStore.open(db_url) as own:
            start = time.monotonic()
            r = compact(own, chunk_events=20)
            spans.append((start, time.monotonic(), r.sessions_removed, r.skipped))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(s[2] for s in spans) == 301
    worked = [s for s in spans if s[3] is None]
    if len(worked) == 2:  # both ran: one after the other
        first, second = sorted(worked)
        assert first[1] <= second[0] + 0.05


def test_a_session_written_after_it_was_listed_is_kept(manager: ContextManager) -> None:
    store = manager.store
    for sid in ("small", "large"):
        manager.create_context(sid, ttl=SHORT).set("a", 1)
    time.sleep(0.1)
    assert sorted(s for s, _ in store.removal.expired_sessions(now_us(), 10)) == ["large", "small"]
    for sid in ("small", "large"):  # created again between listing and removal
        manager.get_or_create_context(sid).set("b", 2)
    assert store.removal.remove_expired(["small"], now_us()) == ([], 0, 0)
    assert store.removal.mark_expiring("large", now_us()) is False
    for sid in ("small", "large"):
        assert manager.get_context(sid).to_dict() == {"b": 2}


def test_writer_racing_expiry_never_loses_an_acknowledged_write(db_url: str) -> None:
    """A writer lets its session expire again and again and at once creates it anew, while
    compaction runs in a loop: every write acknowledged since the session was last created is
    in the database until the session expires again (compaction re-checks under the lock)."""
    ttl = timedelta(milliseconds=60)
    stop = threading.Event()
    rng = random.Random(7)
    errors: list[BaseException] = []
    counts = {"acked": 0, "expired": 0, "checked": 0}

    def writer() -> None:
        try:
            write_bursts()
        except BaseException as exc:
            errors.append(exc)
        finally:
            stop.set()

    def write_bursts() -> None:
        with ContextManager(db_url, cleanup_interval=None) as m:
            ctx = m.get_or_create_context("w", ttl=ttl)
            base, acked = ctx.version, []
            for burst in range(60):
                for i in range(15):
                    time.sleep(rng.random() * 0.003)
                    try:
                        ctx.set(f"b{burst}-{i}", i)
                    except SessionExpiredError:
                        counts["expired"] += 1
                        ctx = m.get_or_create_context("w", ttl=ttl)  # again, at once
                        base, acked = ctx.version, []
                        continue
                    acked.append(f"b{burst}-{i}")
                    counts["acked"] += 1
                # The last write was just now: unless this thread stalled past the ttl before
                # reading (the head row then says so), every acknowledged write is there.
                since = [e.key for e in m.store.read("w", base + 1) if e.type == "KeySet"]
                head = m.store.session("w")
                if head and head.status == "active" and head.version >= base + len(acked):
                    assert since == acked, f"burst {burst}: {len(acked) - len(since)} lost"
                    counts["checked"] += len(acked)
                if rng.random() < 0.5:
                    time.sleep(
                        rng.uniform(0.055, 0.08)
                    )  # let it expire, about as compaction sees it

    def compactor() -> None:
        with EventStore.open(db_url) as store:
            while not stop.is_set():
                compact(store, chunk_events=50)

    threads = [threading.Thread(target=writer), threading.Thread(target=compactor)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert counts["expired"] > 5 and counts["checked"] > 500, counts
