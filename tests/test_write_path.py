"""Regression tests for the write path: a context never shows data of another incarnation of
its session, the group committer isolates callers, and reads are audited."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from eventctx import (
    ContextManager,
    EventStore,
    IntegrityError,
    InvalidInputError,
    NewEvent,
    PluginRunner,
    RecordedEvent,
    RunInProgressError,
    SessionNotFoundError,
    StorageError,
)
from eventctx.state import fold
from eventctx.store import Fence
from eventctx.store.commit import AppendRequest


def _recreate(url: str, session_id: str, values: dict[str, int]) -> None:
    """What another process does: purge the session, create it anew and write ``values``."""
    with EventStore.open(url) as other:
        other.purge(session_id)
        other.append(session_id, [NewEvent.create("ContextCreated", {"ttl_ms": None})])
        for key, value in values.items():
            other.append(session_id, [NewEvent.create("KeySet", {"value": value}, key=key)])


def test_a_write_after_a_purge_and_a_same_length_incarnation(db_url: str) -> None:
    with ContextManager(db_url, cleanup_interval=None) as manager:
        ctx = manager.create_context("s")
        ctx.set("a", 1)
        ctx.set("b", 2)  # v3
        _recreate(db_url, "s", {"x": 10, "y": 20})  # also v3, another chain
        ctx.set("z", 3)
        expected = {"x": 10, "y": 20, "z": 3}
        assert ctx.to_dict() == expected and ctx.version == 4
        ctx.refresh()
        assert ctx.to_dict() == expected
        assert manager.get_context("s").to_dict() == expected
    with ContextManager(db_url, cleanup_interval=None) as fresh:
        assert fresh.get_context("s").to_dict() == expected


def test_a_refresh_after_a_purge_and_a_longer_incarnation(db_url: str) -> None:
    with ContextManager(db_url, cleanup_interval=None) as manager:
        ctx = manager.create_context("s")
        ctx.set("a", 1)
        ctx.set("b", 2)  # v3
        _recreate(db_url, "s", {"x": 10, "y": 20, "w": 30})  # v4
        ctx.refresh()
        assert ctx.to_dict() == {"x": 10, "y": 20, "w": 30} and ctx.version == 4
        _recreate(db_url, "s", {"p": 1, "q": 2, "r": 3, "t": 4})  # v5, from the same v4 view
        assert manager.get_context("s").to_dict() == {"p": 1, "q": 2, "r": 3, "t": 4}


def test_the_fold_checks_each_events_chain_link() -> None:
    genesis = bytes(32)
    events = [
        RecordedEvent(1, "s", 1, "ContextCreated", None, None, None, {}, 1, b"h1", genesis),
        RecordedEvent(2, "s", 2, "KeySet", "k", None, None, {"value": 1}, 2, b"h2", b"h1"),
    ]
    assert fold(events).data == {"k": 1}
    forged = events[1]._replace(prev_hash=b"elsewhere")
    with pytest.raises(IntegrityError, match="chain"):
        fold([events[0], forged])


def _key_set(key: str, value: object) -> NewEvent:
    return NewEvent.create("KeySet", {"value": value}, key=key)


def test_a_reader_following_positions_never_skips_a_row(db_url: str) -> None:
    """Writers on four connections race; a follower reading the global log by position
    (from the last position it saw) must see every row, in position order."""
    writers, per_writer = 4, 150
    stores = [EventStore.open(db_url) for _ in range(writers)]
    for n, store in enumerate(stores):
        store.append(f"w{n}", [NewEvent.create("ContextCreated")])
    seen: list[int] = []
    stop = threading.Event()

    def follow() -> None:
        with EventStore.open(db_url) as reader:
            last = 0
            while True:
                finished = stop.is_set()
                page = reader.read_after(last, 1000)
                seen.extend(e.position for e in page)
                last = page[-1].position if page else last
                if finished and not page:
                    return

    def write(n: int) -> None:
        for i in range(per_writer):
            stores[n].append(f"w{n}", [_key_set(f"k{i}", i)])

    follower = threading.Thread(target=follow)
    follower.start()
    threads = [threading.Thread(target=write, args=(n,)) for n in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    follower.join()
    everything = [e.position for e in stores[0].read_after(0, 10 * writers * per_writer)]
    for store in stores:
        store.close()
    assert len(everything) == writers * (per_writer + 1)
    assert seen == everything  # nothing skipped, nothing twice, in order


def test_a_locked_session_stalls_no_other_session(pg_url: str) -> None:
    """Another connection holds session a's head row; an append to a waits for it (up to the
    busy timeout, then a clear StorageError, nothing committed) while one to b goes through."""
    store = EventStore.open(pg_url, busy_timeout=timedelta(seconds=1.5))
    for sid in "ab":
        store.append(sid, [NewEvent.create("ContextCreated")])
    locker = sa.create_engine(pg_url, poolclass=sa.pool.NullPool)
    failed: list[Exception] = []

    def append_to_a() -> None:
        try:
            store.append("a", [_key_set("k", 1)])
        except StorageError as exc:
            failed.append(exc)

    with locker.connect() as conn:
        conn.exec_driver_sql("SELECT 1 FROM eventctx_sessions WHERE session_id = 'a' FOR UPDATE")
        waiting = threading.Thread(target=append_to_a)
        started = time.perf_counter()
        waiting.start()
        time.sleep(0.2)  # a's append is now waiting for the row
        store.append("b", [_key_set("k", 1)])
        assert time.perf_counter() - started < 0.8
        waiting.join(10)
        assert 1.4 < time.perf_counter() - started < 5
        conn.rollback()
    locker.dispose()
    assert len(failed) == 1 and "busy_timeout" in str(failed[0])
    assert [e.version for e in store.read("a")] == [1]  # nothing of it was committed
    assert [e.version for e in store.read("b")] == [1, 2]
    store.append("a", [_key_set("k", 2)])  # and the session works once the lock is gone
    store.close()


def test_the_busy_timeout_ends_a_wait_for_the_sqlite_write_lock(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    store = EventStore.open(url, busy_timeout=timedelta(seconds=0.5))
    store.append("a", [NewEvent.create("ContextCreated")])
    other = sqlite3.connect(tmp_path / "db.sqlite", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    started = time.perf_counter()
    with pytest.raises(StorageError, match="busy_timeout"):
        store.append("a", [_key_set("k", 1)])
    assert 0.4 < time.perf_counter() - started < 3
    other.rollback()
    other.close()
    assert [e.version for e in store.read("a")] == [1]
    store.close()


def test_each_member_of_a_group_gets_its_own_error(db_url: str) -> None:
    """Merged appends refused together raise distinct exception objects, so no two threads
    raise (and rewrite the traceback of) the same one."""
    with EventStore.open(db_url) as store:
        batch = [AppendRequest("missing", [_key_set("k", i)]) for i in range(3)]
        store._committer._commit(batch)
        errors = [r.error for r in batch]
        assert all(isinstance(e, SessionNotFoundError) for e in errors)
        assert len({id(e) for e in errors}) == 3


def test_reads_of_every_key_are_recorded_for_the_phase(manager: ContextManager) -> None:
    ctx = manager.create_context("s")
    ctx.update({"a": 1, "b": 2})

    def reader(_: object) -> None:
        assert "a" in ctx and len(ctx) == 2
        ctx.keys()
        ctx.to_dict()
        ctx.to_json()

    def membership(_: object) -> None:
        assert "zz" not in ctx

    PluginRunner(manager, [reader, membership]).run("s")
    ends = [e for e in manager.store.read("s") if e.type == "PhaseCompleted"]
    assert [e.payload["keys_read"] for e in ends] == [["a", "b"], ["zz"]]


@pytest.mark.parametrize(
    "url, message",
    [
        ("foo", "not a database URL"),
        ("mysql://x/y", "unsupported database"),
        ("sqlite://", "in-memory SQLite"),
        ("sqlite:///:memory:", "in-memory SQLite"),
    ],
)
def test_a_bad_url_is_an_eventctx_error(url: str, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        EventStore.open(url)


def test_the_cli_reports_a_bad_url_in_one_line() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "eventctx", "--url", "foo", "sessions"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith("eventctx: 'foo' is not a database URL")
    assert result.stderr.count("\n") == 1


def test_a_context_whose_session_vanished_after_its_write_is_closed(db_url: str) -> None:
    with ContextManager(db_url, cleanup_interval=None) as manager:
        ctx = manager.create_context("s")
        ctx.update({"old": 1})
        with EventStore.open(db_url) as other:  # another process: purge, create, and later delete
            other.purge("s")
            other.append("s", [NewEvent.create("ContextCreated"), _key_set("new", 1)])
            store = manager.store
            append = store.append

            def then_deleted(*args: Any, **kwargs: Any) -> Any:
                recorded = append(*args, **kwargs)
                other.append("s", [NewEvent.create("ContextDeleted")])  # before our fold
                return recorded

            store.append = then_deleted  # type: ignore[method-assign]
            ctx.set("mine", 1)
            store.append = append  # type: ignore[method-assign]
        with pytest.raises(SessionNotFoundError):
            ctx.keys()  # never the purged history's keys


def test_a_session_created_again_starts_without_the_old_run_lease(db_url: str) -> None:
    with EventStore.open(db_url) as store:
        store.append("s", [NewEvent.create("ContextCreated")])
        old = store.take_lease("s", "runner-a", timedelta(seconds=30))
        assert isinstance(old, Fence)
        store.append("s", [NewEvent.create("ContextDeleted")])
        store.append("s", [NewEvent.create("ContextCreated")])
        with pytest.raises(RunInProgressError):
            store.append("s", [_key_set("k", 1)], fence=old)
        taken = store.take_lease("s", "runner-b", timedelta(seconds=30))
        assert isinstance(taken, Fence) and taken.token > old.token
