"""No input of one caller breaks another's writes or the store: bad keys and strings, deep
values, huge durations and wrong argument types are refused up front with precise errors."""

from __future__ import annotations

import gc
import os
import signal
import socket
import sqlite3
import struct
import threading
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

import eventctx
from eventctx import (
    ConcurrencyError,
    ContextAwarePhase,
    ContextManager,
    EventCtxError,
    EventStore,
    InvalidInputError,
    NewEvent,
    OutcomeUnknownError,
    PluginRunner,
    SerializationError,
    StorageError,
)
from eventctx.events import MAX_DEPTH
from eventctx.store.commit import AppendRequest

BAD_KEYS = ["bad\ud800key", "nul\x00key"]


@pytest.mark.parametrize("key", BAD_KEYS)
def test_a_bad_key_is_refused_and_harms_no_other_writer(manager: ContextManager, key: str) -> None:
    bad = manager.create_context("bad")
    good = [manager.create_context(f"good-{n}") for n in range(4)]
    errors: list[Exception] = []
    done = threading.Barrier(len(good) + 1)

    def write_good(ctx: Any) -> None:
        done.wait()
        for i in range(40):
            ctx.set(f"k{i}", i)

    def write_bad() -> None:
        done.wait()
        for _ in range(40):
            try:
                bad.set(key, 1)
            except InvalidInputError as exc:
                errors.append(exc)

    threads = [threading.Thread(target=write_good, args=(c,)) for c in good]
    threads.append(threading.Thread(target=write_bad))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 40 and bad.version == 1
    for ctx in good:
        assert len(ctx) == 40 and ctx.version == 41


def test_strings_that_are_not_unicode_are_refused(manager: ContextManager) -> None:
    ctx = manager.create_context("s")
    with pytest.raises(SerializationError, match="surrogates"):
        ctx.set("k", "bad\ud800value")
    with pytest.raises(SerializationError, match="surrogates"):
        ctx.set("k", {"bad\ud800": 1})
    with pytest.raises(InvalidInputError, match="NUL"):
        ContextAwarePhase(lambda _: None, name="a\x00")
    ctx.set("k", "nul\x00in a value is fine")  # escaped in the JSON payload
    assert ctx.get("k") == "nul\x00in a value is fine" and ctx.version == 2


def test_a_group_member_whose_row_fails_fails_alone(db_url: str) -> None:
    """A row the database itself refuses, inside a shared group transaction, fails only its
    own append: the others are appended again alone, each in its own transaction."""
    with EventStore.open(db_url) as store:
        for sid in ("a", "b"):
            store.append(sid, [NewEvent.create("ContextCreated")])
        with store.engine.begin() as conn:  # a stray row where b's next event must go
            conn.execute(
                sa.text(
                    "INSERT INTO eventctx_events (session_id, version, type, payload, "
                    "recorded_at, hash, prev_hash) VALUES ('b', 2, 'KeySet', :p, 0, :h, :h)"
                ),
                {"p": b"{}", "h": bytes(32)},
            )
        ok = AppendRequest("a", [NewEvent.create("KeySet", {"value": 1}, key="k")])
        bad = AppendRequest("b", [NewEvent.create("KeySet", {"value": 2}, key="k")])
        store._committer._commit([ok, bad])  # one transaction for both: the insert clashes
        assert ok.alone and bad.alone and ok.error is None  # each goes on by itself
        assert [e.version for e in store.read("a")] == [1]  # nothing of the group committed
        assert [e.version for e in store._committer._append_alone(ok)] == [2]
        with pytest.raises(ConcurrencyError):
            store._committer._append_alone(bad)
        assert [e.version for e in store.read("a")] == [1, 2]


def test_values_nested_past_the_limit_are_refused_before_anything_is_written(
    manager: ContextManager,
) -> None:
    ctx = manager.create_context("s")
    ok: Any = 1
    for _ in range(MAX_DEPTH):
        ok = [ok]
    ctx.set("deep", ok)  # at the limit: stored, and snapshots of it encode
    too_deep: Any = [ok]
    with pytest.raises(SerializationError, match=f"deeper than {MAX_DEPTH}"):
        ctx.set("deeper", too_deep)
    very: Any = 1
    for _ in range(5000):
        very = {"x": very}
    with pytest.raises(SerializationError, match="deeper than"):
        ctx.set("much-deeper", very)
    assert ctx.version == 2
    ctx._state.encode()  # the state holding the deepest allowed value encodes


def test_durations_and_arguments_are_checked_up_front(manager: ContextManager) -> None:
    with pytest.raises(InvalidInputError, match="ttl must be more than"):
        manager.create_context("forever", ttl=timedelta.max)
    assert manager.store.session("forever") is None
    assert manager.create_context("long", ttl=timedelta(days=365 * 1000)).version == 1
    assert manager.sessions()  # listing still works
    store = manager.store
    for kwargs, match in [
        ({"cleanup_interval": 60}, "cleanup_interval must be a datetime.timedelta"),
        ({"snapshot_every": "10"}, "snapshot_every must be an int"),
        ({"ttl": timedelta(0)}, "ttl must be more than"),
        ({"max_value_bytes": -1}, "max_value_bytes must be an int"),
    ]:
        with pytest.raises(InvalidInputError, match=match):
            ContextManager(store, **kwargs)
    with pytest.raises(InvalidInputError, match="store must be"):
        ContextManager(42)  # type: ignore[arg-type]
    for lease in (30, timedelta(0), timedelta(seconds=-1)):
        with pytest.raises(InvalidInputError, match="lease"):
            PluginRunner(manager, [lambda _: None], lease=lease)  # type: ignore[arg-type]
    ctx = manager.create_context("s")
    with pytest.raises(InvalidInputError, match="mapping"):
        ctx.update([("k", 1)])  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="expected_version must be an int"):
        ctx.update({"k": 1}, expected_version="2")  # type: ignore[arg-type]
    assert ctx.version == 1
    with pytest.raises(InvalidInputError, match="busy_timeout"):
        EventStore.open(str(store.url), busy_timeout=5)  # type: ignore[arg-type]


def test_a_session_with_a_live_run_is_never_expired(manager: ContextManager) -> None:
    """ttl 0.5 s, a 1.5 s phase: compaction runs meanwhile and the session stays, with the
    outputs it had; the run completes."""
    manager.create_context("s", ttl=timedelta(milliseconds=500))
    removed: list[list[str]] = []

    def first(_: Any) -> str:
        return "kept"

    def slow(_: Any) -> str:
        for _ in range(3):
            time.sleep(0.5)
            removed.append(manager.cleanup_expired().sessions)
        return "done"

    runner = PluginRunner(manager, [first, slow], lease=timedelta(seconds=1))
    result = runner.run("s")
    assert result.status == "completed", result.error
    assert removed == [[], [], []]
    assert result.outputs == {"first": "kept", "slow": "done"}
    assert manager.store.session("s") is not None


class _CommitFault:
    """The writer connection, with a COMMIT that fails as a lost connection does: after the
    server committed (``lands``), or before it could."""

    def __init__(self, conn: Any, error: BaseException, *, lands: bool) -> None:
        self._conn, self._error, self._lands = conn, error, lands

    def commit(self) -> None:
        if self._lands:
            self._conn.commit()
        else:
            self._conn.rollback()
        raise self._error

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


class _StatementFault:
    """The writer's cursor, with an append made in one statement (a transaction of its own)
    that fails as a lost connection does: after the server committed it (``lands``), or
    before it got there."""

    def __init__(self, cur: Any, error: BaseException, *, lands: bool) -> None:
        self._cur, self._error, self._lands = cur, error, lands

    def execute(self, sql: str, *params: Any) -> Any:
        if sql == "COMMIT":  # SQLite commits through the cursor
            self._cur.execute("COMMIT" if self._lands else "ROLLBACK")
            raise self._error
        if "eventctx_moved" not in sql:
            return self._cur.execute(sql, *params)
        if self._lands:
            self._cur.execute(sql, *params)
        raise self._error

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cur, name)


def _lost_connection(backend: str) -> Exception:
    if backend == "sqlite":
        return sqlite3.OperationalError("disk I/O error")
    return psycopg.OperationalError("server closed the connection unexpectedly")


def _fail_commits(manager: ContextManager, backend: str, *, lands: bool) -> Callable[[], None]:
    """Make the writer connection's COMMIT fail (after or before the server committed), and
    so an append made in one statement; returns what puts the real connection back."""
    return _fail_commits_of(manager.store, backend, lands=lands)


def _fail_commits_of(
    store: EventStore, backend: str, *, lands: bool, error: BaseException | None = None
) -> Callable[[], None]:
    """``_fail_commits`` of a store (with ``error``, else as a lost connection does)."""
    committer = store._committer
    proxy, driver, cur = committer._conn, committer._driver, committer._cur
    error = error or _lost_connection(backend)
    fault = _CommitFault(driver, error, lands=lands)
    committer._cur = _StatementFault(cur, error, lands=lands)

    class Faulty:
        driver_connection = fault

        def __getattr__(self, name: str) -> Any:
            return getattr(proxy, name)

    committer._conn, committer._driver = Faulty(), fault

    def undo() -> None:
        committer._conn, committer._driver, committer._cur = proxy, driver, cur

    return undo


@pytest.mark.parametrize("lands", [True, False])
def test_a_failed_commit_is_checked_before_it_is_reported(
    manager: ContextManager, backend: str, lands: bool
) -> None:
    ctx = manager.create_context("s")
    ctx.set("warm", 1)  # the committer now holds its writer connection
    undo = _fail_commits(manager, backend, lands=lands)
    try:
        # Landed: reported as done (not as "nothing was committed", which would make the
        # caller write it twice). Not landed: known not committed, so made again alone.
        ctx.set("k", 1)
    finally:
        undo()
    stored = [e.key for e in manager.store.read("s")]
    assert stored.count("k") == 1  # once, either way
    assert ctx.get("k") == 1 and manager.store.verify("s") == ctx.version


def test_a_commit_that_cannot_be_checked_says_the_outcome_is_unknown(
    manager: ContextManager, backend: str
) -> None:
    ctx = manager.create_context("s")
    ctx.set("warm", 1)
    _fail_commits(manager, backend, lands=True)

    def unreachable(*_: Any) -> list[Any]:
        raise StorageError("the database is unreachable")

    manager.store._committer._stored = unreachable
    with pytest.raises(OutcomeUnknownError, match="may or may not be stored"):
        ctx.set("k", 1)


def test_a_group_member_whose_head_moved_behind_the_committer_is_not_lost(
    db_url: str, backend: str
) -> None:
    """The committer's belief about a head can be stale (another store wrote). On PostgreSQL
    that member's append, sent in one statement with the group, changes nothing, is made
    again alone, and the belief is dropped (the next group reads the head); on SQLite the
    group reads the head under its lock. The rest of the group commits either way."""
    with EventStore.open(db_url) as store, EventStore.open(db_url) as other:
        for sid in "abc":
            store.append(sid, [NewEvent.create("ContextCreated")])
        other.append("c", [NewEvent.create("KeySet", {"value": 0}, key="theirs")])
        batch = [
            AppendRequest(sid, [NewEvent.create("KeySet", {"value": 1}, key=f"mine-{n}")])
            for sid in "abc"
            for n in range(2)
        ]
        store._committer._commit(batch)
        done = [r for r in batch if not r.alone]
        in_one = backend == "postgresql"
        assert {r.session_id for r in done} == ({"a", "b"} if in_one else {"a", "b", "c"})
        assert ("c" in store._committer._heads) != in_one
        for request in done:
            assert request.result == store.read_versions(
                request.session_id, [e.version for e in request.result or ()]
            )
        for request in batch:
            if request.alone:
                store._committer._append_alone(request)
        assert [e.key for e in store.read("c")][1:] in (
            ["theirs", "mine-0", "mine-1"],
            ["theirs", "mine-1", "mine-0"],
        )
        assert all(store.verify(sid) == 3 for sid in "ab") and store.verify("c") == 4


class _GroupCommitFault:
    """The store's dialect, with a group's appends made in one statement each and sent with
    the COMMIT failing as a lost connection does: after the server committed (``lands``), or
    before anything was sent."""

    def __init__(self, dialect: Any, error: BaseException, *, lands: bool) -> None:
        self._dialect, self._error, self._lands = dialect, error, lands

    def commit_with(self, conn: Any, statements: Any) -> Any:
        if self._lands:
            self._dialect.commit_with(conn, statements)
        raise self._error

    def __getattr__(self, name: str) -> Any:
        return getattr(self._dialect, name)


def _fail_group_commits(
    store: EventStore, backend: str, *, lands: bool, error: BaseException | None = None
) -> Callable[[], None]:
    """Make a group's COMMIT fail (after or before the server committed): on PostgreSQL the
    pipeline its one-statement appends are sent in, on SQLite the COMMIT itself. Returns what
    puts the store back."""
    if backend == "sqlite":
        return _fail_commits_of(store, backend, lands=lands, error=error)
    committer = store._committer
    real = committer._dialect
    committer._dialect = _GroupCommitFault(real, error or _lost_connection(backend), lands=lands)

    def undo() -> None:
        committer._dialect = real

    return undo


def test_a_group_mixing_staged_and_one_statement_appends_commits_them_all(db_url: str) -> None:
    """A group whose appends go both ways (a session created: staged, its transaction opened
    first; appends on known heads, one of them conditional: one statement each on PostgreSQL,
    sent with the COMMIT) commits every one of them in one transaction, each caller getting
    exactly its stored events."""
    with EventStore.open(db_url) as store:
        for sid in "ab":
            store.append(sid, [NewEvent.create("ContextCreated")])
        batch = [
            AppendRequest("a", [NewEvent.create("KeySet", {"value": 1}, key="fast")]),
            AppendRequest("b", [NewEvent.create("KeySet", {"value": 2}, key="cond")], 1),
            AppendRequest("n", [NewEvent.create("ContextCreated")]),
        ]
        store._committer._commit(batch)
        assert all(not r.alone and r.error is None and r.result for r in batch)
        for request in batch:
            assert request.result == store.read_versions(
                request.session_id, [e.version for e in request.result or ()]
            )
        positions = sorted(e.position for r in batch for e in r.result or ())
        assert positions == list(range(positions[0], positions[0] + 3))  # one commit, no gap
        assert [store.verify(sid) for sid in "abn"] == [2, 2, 1]


@pytest.mark.parametrize("lands", [True, False])
def test_a_group_whose_commit_fails_is_settled_member_by_member(
    db_url: str, backend: str, lands: bool
) -> None:
    """Each member of a group whose COMMIT failed is found committed (with the positions
    stored) or made again alone, on its own; a member whose head had moved behind the
    committer's back changed nothing and is made alone, so no write is lost or doubled."""
    with EventStore.open(db_url) as store, EventStore.open(db_url) as other:
        for sid in "abc":
            store.append(sid, [NewEvent.create("ContextCreated")])
        other.append("c", [NewEvent.create("KeySet", {"value": 0}, key="theirs")])
        committer = store._committer
        undo = _fail_group_commits(store, backend, lands=lands)
        batch = [
            AppendRequest(sid, [NewEvent.create("KeySet", {"value": 1}, key=f"mine-{n}")])
            for sid in "abc"
            for n in range(2)
        ]
        try:
            committer._commit(batch)
        finally:
            undo()
        for request in batch:
            stored = store.read_versions(request.session_id, [2, 3, 4])
            if request.alone:
                assert request.result is None
            else:
                assert request.error is None and request.result
                assert all(e in stored for e in request.result)  # positions as stored
        by_session = {sid: [r for r in batch if r.session_id == sid] for sid in "abc"}
        # Heads as believed: committed exactly when the COMMIT landed.
        assert all(not r.alone for r in by_session["a"] + by_session["b"]) == lands
        assert all(r.alone for r in by_session["a"] + by_session["b"]) == (not lands)
        for request in batch:
            if request.alone:
                committer._append_alone(request)
        for sid in "abc":
            keys = [e.key for e in store.read(sid) if e.key]
            assert sorted(keys) == sorted(["mine-0", "mine-1"] + (["theirs"] if sid == "c" else []))
            assert store.verify(sid) == len(keys) + 1


@pytest.mark.parametrize("field", ["type", "execution_id"])
def test_an_overlong_type_or_execution_id_is_refused_and_harms_no_one(
    manager: ContextManager, field: str
) -> None:
    """What a database column cannot hold is refused before anything is sent, the same on
    every backend (SQLite would store it, PostgreSQL refuse it)."""
    ctx = manager.create_context("s")
    ctx.set("a", 1)
    long = "x" * 65
    event = NewEvent.create(long if field == "type" else "Note", execution_id=long)
    with pytest.raises(InvalidInputError, match="at most 64 characters"):
        manager.store.append("s", [event])
    ctx.set("b", 2)
    assert [e.key for e in manager.store.read("s")] == [None, "a", "b"]


def test_the_one_statement_append_never_cuts_a_value_short(pg_url: str) -> None:
    """Past the store's own check, the one-statement append leaves the column's length to
    the column: an overlong value fails the append, it is not stored cut to size."""
    with EventStore.open(pg_url) as store:
        store.append("s", [NewEvent.create("ContextCreated")])
        event = NewEvent.create("Note", execution_id="x" * 65)
        with pytest.raises(StorageError, match="too long"):
            store._committer.submit(AppendRequest("s", [event]))
        assert store.verify("s") == 1


def test_a_lost_connection_whose_statement_still_runs_is_ended_before_it_is_checked(
    pg_url: str,
) -> None:
    """The writer's connection is lost on our side while its one-statement append waits on
    the server for the insert lock. That server process would commit once the lock is free,
    after the append was checked, found absent and made again: it is ended first, so the
    write is stored once."""
    with EventStore.open(pg_url) as store:
        store.append("s", [NewEvent.create("ContextCreated")])
        store.append("s", [NewEvent.create("KeySet", {"value": 0}, key="warm")])
        writer = store._committer._conn.driver_connection
        pid = writer.info.backend_pid
        schema_name = sa.make_url(pg_url).query["options"].partition("=")[2]
        with psycopg.connect(
            "host=127.0.0.1 user=postgres dbname=test",
            options=f"-csearch_path={schema_name}",
            autocommit=True,
        ) as holder:
            holder.execute(
                "SELECT pg_advisory_lock(hashtext('eventctx:insert:' || current_schema()))"
            )
            done: list[Any] = []
            thread = threading.Thread(
                target=lambda: done.append(
                    store.append("s", [NewEvent.create("KeySet", {"value": 1}, key="once")])
                )
            )
            thread.start()
            for _ in range(500):  # until the statement waits for the lock on the server
                waiting = holder.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE pid = %s AND wait_event_type "
                    "= 'Lock'",
                    (pid,),
                ).fetchone()
                if waiting and waiting[0]:
                    break
                time.sleep(0.01)
            else:
                pytest.fail("the append never waited for the insert lock")
            with socket.socket(fileno=os.dup(writer.pgconn.socket)) as sock:
                sock.shutdown(socket.SHUT_RDWR)  # lost on our side; the server runs on
            time.sleep(0.3)
            holder.execute(
                "SELECT pg_advisory_unlock(hashtext('eventctx:insert:' || current_schema()))"
            )
            thread.join(timeout=30)
        assert done and [e.key for e in done[0]] == ["once"]
        assert [e.key for e in store.read("s")].count("once") == 1
        assert store.verify("s") == 3


def test_a_store_outlives_its_connections_being_dropped(pg_url: str) -> None:
    """A server restart drops every connection: the next reads and writes reconnect (the pool
    checks a connection before use; a write that failed before COMMIT is made again alone)."""
    name = f"eventctx-drop-{uuid.uuid4().hex[:8]}"
    url = sa.make_url(pg_url).update_query_dict({"application_name": name})
    with ContextManager(url.render_as_string(hide_password=False), cleanup_interval=None) as m:
        ctx = m.create_context("s")
        ctx.set("a", 1)
        m.get_context("s")
        with psycopg.connect("host=127.0.0.1 user=postgres dbname=test", autocommit=True) as admin:
            killed = admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = %s",
                (name,),
            ).fetchone()
        assert killed is not None and killed[0] >= 2  # the writer and a pooled reader
        assert m.get_context("s").get("a") == 1  # first try
        ctx.set("b", 2)  # first try
        result = PluginRunner(m, [lambda _: "ok"]).run("s")
        assert result.status == "completed"
        assert m.store.verify("s") == ctx.version


def _set_key(store: EventStore, key: str, done: dict[str, object]) -> None:
    """Append a KeySet of ``key`` to session "s"; once it returns, record it in ``done``."""
    done[key] = store.append("s", [NewEvent.create("KeySet", {"value": key}, key=key)])


@pytest.mark.usefixtures("ctrl_c")
def test_a_caller_interrupted_while_its_append_waits_withdraws_it_and_harms_no_one(
    db_url: str,
) -> None:
    """Ctrl-C while an append waits for the group in flight: that append is not made, and the
    callers queued behind it are still committed (none waits for a leader that left)."""
    store = EventStore.open(db_url)  # closed only if nothing hangs: close waits for it
    store.append("s", [NewEvent.create("ContextCreated")])
    committer = store._committer
    release, leading = threading.Event(), threading.Event()
    commit_one = committer._commit_one

    def held(request: AppendRequest) -> None:  # the first group waits to be released
        if not leading.is_set():
            leading.set()
            release.wait(10)
        commit_one(request)

    committer._commit_one = held  # type: ignore[method-assign]
    done: dict[str, object] = {}

    def append(key: str) -> None:
        _set_key(store, key, done)

    first = threading.Thread(target=append, args=("first",), daemon=True)
    first.start()
    assert leading.wait(10)
    main = threading.get_ident()

    def interrupt_then_queue() -> None:
        deadline = time.monotonic() + 10
        while len(committer._queue) < 1 and time.monotonic() < deadline:
            time.sleep(0.001)
        behind = threading.Thread(target=append, args=("behind",), daemon=True)
        behind.start()
        while len(committer._queue) < 2 and time.monotonic() < deadline:
            time.sleep(0.001)
        signal.pthread_kill(main, signal.SIGINT)
        time.sleep(0.05)
        release.set()
        behind.join(10)
        left.append(behind.is_alive())

    left: list[bool] = []
    helper = threading.Thread(target=interrupt_then_queue, daemon=True)
    helper.start()
    with pytest.raises(KeyboardInterrupt):
        append("interrupted")
    helper.join(15)
    first.join(10)
    assert left == [False], "the append queued behind the interrupted one never committed"
    assert set(done) == {"first", "behind"}
    assert [e.key for e in store.read("s")] == [None, "first", "behind"]
    assert not committer._leading and not committer._queue
    store.close()


@pytest.mark.parametrize("where", ["yielding", "gathered"])
def test_a_leader_interrupted_before_its_group_commits_hands_the_lead_on(
    db_url: str, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """Ctrl-C in a leader before its group commits (while it lets concurrent writers join,
    or once it has gathered them): its own append is not made, any it gathered append alone,
    the next caller leads, and nothing hangs."""
    store = EventStore.open(db_url)  # closed only if nothing hangs: close waits for it
    store.append("s", [NewEvent.create("ContextCreated")])
    committer = store._committer
    committer._last_group = 2  # as after a group of several: the next leader yields once
    done: dict[str, object] = {}

    def append(key: str) -> None:
        _set_key(store, key, done)

    queued = threading.Thread(target=append, args=("queued",), daemon=True)

    class Yielding:
        @staticmethod
        def sleep(_: float) -> None:  # a writer queues behind the leader meanwhile
            queued.start()
            deadline = time.monotonic() + 10
            while not committer._queue and time.monotonic() < deadline:
                time.sleep(0.001)
            if where == "yielding":
                raise KeyboardInterrupt

    def interrupted(_: list[AppendRequest]) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(eventctx.store.commit, "time", Yielding)
    monkeypatch.setattr(committer, "_commit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        append("interrupted")
    monkeypatch.undo()
    queued.join(10)
    assert not queued.is_alive(), "the append queued behind the interrupted leader hangs"
    append("after")
    assert set(done) == {"queued", "after"}
    assert [e.key for e in store.read("s")] == [None, "queued", "after"]
    assert not committer._leading and not committer._queue
    store.close()


@pytest.mark.parametrize("lands", [True, False])
def test_a_leader_interrupted_while_committing_leaves_its_group_an_answer(
    db_url: str, backend: str, lands: bool
) -> None:
    """Ctrl-C in a leader once its COMMIT is under way: the other callers of the group get
    OutcomeUnknownError (not the leader's KeyboardInterrupt, nor a result never checked)."""
    with EventStore.open(db_url) as store:
        for sid in "ab":
            store.append(sid, [NewEvent.create("ContextCreated")])
        committer = store._committer
        undo = _fail_group_commits(store, backend, lands=lands, error=KeyboardInterrupt())
        batch = [
            AppendRequest(sid, [NewEvent.create("KeySet", {"value": 1}, key="k")]) for sid in "ab"
        ]
        try:
            with pytest.raises(KeyboardInterrupt):
                committer._commit(batch)
        finally:
            undo()
        for request in batch:
            assert request.result is None
            assert isinstance(request.error, OutcomeUnknownError)
        stored = {sid: [e.key for e in store.read(sid)] for sid in "ab"}
        assert stored == {sid: [None, "k"] if lands else [None] for sid in "ab"}


def test_a_pooled_connection_the_server_dropped_is_replaced_before_use(pg_url: str) -> None:
    """Even where a drop is not made again (a purge is not retried), a pooled connection whose
    server process is gone is never handed out: its socket says so before any statement."""
    name = f"eventctx-pooled-{uuid.uuid4().hex[:8]}"
    url = sa.make_url(pg_url).update_query_dict({"application_name": name})
    with EventStore.open(url.render_as_string(hide_password=False)) as store:
        store.append("s", [NewEvent.create("ContextCreated")])
        assert store.session("s") is not None  # a pooled reader, idle now
        with psycopg.connect("host=127.0.0.1 user=postgres dbname=test", autocommit=True) as admin:
            gone = "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = %s",
                (name,),
            )
            deadline = time.monotonic() + 10
            while admin.execute(gone, (name,)).fetchone() != (0,):
                assert time.monotonic() < deadline
                time.sleep(0.01)
        assert store.purge("s") == 1  # first try, on a fresh connection
        assert store.session("s") is None


class _SilentDrop:
    """A TCP relay to the PostgreSQL server that, once ``drop`` is called, forgets the flows
    it relays without a word (as a NAT or load balancer that timed out an idle flow does) and
    answers the next packet of one with a reset. New flows are relayed as before."""

    def __init__(self, host: str, port: int) -> None:
        self._upstream = (host, port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._dropped: list[socket.socket] = []  # flows made before the drop
        self._flows: list[tuple[socket.socket, socket.socket]] = []
        self._sockets: list[socket.socket] = [self._listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # closed
                return
            server = socket.create_connection(self._upstream)
            self._sockets += (client, server)
            self._flows.append((client, server))
            threading.Thread(target=self._pump, args=(client, server), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                if source in self._dropped:  # a packet of a forgotten flow: reset it
                    source.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    source.close()
                    return
                sink.sendall(data)
        except OSError:
            return

    def drop(self) -> None:
        """Forget every flow: their server side is closed, their client side hears nothing."""
        for client, server in self._flows:
            self._dropped.append(client)
            server.shutdown(socket.SHUT_RDWR)
        self._flows = []

    def close(self) -> None:
        for sock in self._sockets:
            sock.close()


def test_a_pooled_connection_idle_for_a_while_is_pinged_before_use(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection whose path died silently shows nothing on its socket: one idle for a
    while is pinged, so even an un-retried write (a purge) gets a live connection."""
    url = sa.make_url(pg_url)
    relay = _SilentDrop(url.host or "127.0.0.1", url.port or 5432)
    relayed = url.set(host="127.0.0.1", port=relay.port).render_as_string(hide_password=False)
    with EventStore.open(relayed) as store:
        store.append("s", [NewEvent.create("ContextCreated")])
        assert store.session("s") is not None  # a pooled reader, idle now
        relay.drop()
        monkeypatch.setattr(eventctx.store.postgresql, "PING_AFTER_IDLE_S", 0.0)
        assert store.purge("s") == 1  # first try, on a fresh connection
        assert store.session("s") is None
    relay.close()


def _tcp_settings(store: EventStore) -> tuple[int, int, int, int, int]:
    """The kernel's keepalive and user timeout settings on a pooled connection's socket."""
    conn = store.engine.raw_connection()
    try:
        sock = socket.socket(fileno=conn.driver_connection.fileno())  # type: ignore[union-attr]
        try:
            if sock.family == socket.AF_UNIX:
                pytest.skip("the test server is reached over a Unix socket: no TCP settings")
            return (
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
                sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
                sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
            )
        finally:
            sock.detach()  # the socket stays the connection's
    finally:
        conn.close()


def test_connections_over_tcp_give_up_on_a_path_that_died_without_a_word(pg_url: str) -> None:
    """A path that drops packets without resetting (no relay in user space can: its kernel
    acknowledges them) would leave a ping or a write waiting for the kernel's retransmissions,
    15 minutes or more. Keepalive probes bound that to about a minute, and data left
    unacknowledged fails the connection 30 s past the busy timeout (a pipeline's statements
    may wait that long for a lock while the server reads no more of them). On the store's own
    engine and on a caller's that connects by URL; a caller's own TCP settings stand."""
    with EventStore.open(pg_url) as store:
        assert _tcp_settings(store) == (1, 30, 10, 3, 60_000)
    engine = sa.create_engine(pg_url, poolclass=sa.pool.NullPool)
    with EventStore.open(engine, busy_timeout=timedelta(seconds=5)) as store:
        assert _tcp_settings(store) == (1, 30, 10, 3, 35_000)
    engine.dispose()
    own = sa.make_url(pg_url).update_query_dict({"keepalives_idle": "5"})
    with EventStore.open(own.render_as_string(hide_password=False)) as store:
        keepalive, idle, *_, unacknowledged = _tcp_settings(store)
        assert (keepalive, idle, unacknowledged) == (1, 5, 0)  # theirs, and none of ours


def _forked_append(store: EventStore, session_id: str) -> int:
    """In a forked child: append and read on the child's own connections; the exit status."""
    try:
        store.append(session_id, [NewEvent.create("ContextCreated")])
        for i in range(20):
            store.append(session_id, [NewEvent.create("KeySet", {"value": i}, key=f"k{i}")])
        return 0 if store.verify(session_id) == 21 else 1
    except Exception:
        return 2


def test_a_forked_child_uses_its_own_connections(db_url: str) -> None:
    with EventStore.open(db_url) as store:
        store.append("parent", [NewEvent.create("ContextCreated")])
        assert store.verify("parent") == 1  # the pool and the writer hold connections now
        pid = os.fork()
        if pid == 0:  # the child
            os._exit(_forked_append(store, "child"))
        for i in range(20):  # meanwhile the parent writes on its own connections
            store.append("parent", [NewEvent.create("KeySet", {"value": i}, key=f"k{i}")])
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert store.verify("parent") == 21 and store.verify("child") == 21


def test_size_limits_cover_run_inputs_outputs_and_metadata(db_url: str) -> None:
    with ContextManager(db_url, cleanup_interval=None, max_value_bytes=1024) as manager:
        big = "x" * 2000
        with pytest.raises(InvalidInputError, match="RunStarted payload is 2"):
            PluginRunner(manager, [lambda _: None]).run("a", input=big)

        def returns_big(_: Any) -> str:
            return big

        result = PluginRunner(manager, [returns_big]).run("b")
        assert result.status == "failed" and isinstance(result.error, InvalidInputError)
        ends = [e.type for e in manager.store.read("b") if e.phase == "returns_big"]
        assert ends == ["PhaseStarted", "PhaseFailed"]  # the attempt has its end event

        def big_metadata(_: Any) -> None:
            eventctx.helper().set_metadata("blob", big)

        result = PluginRunner(manager, [big_metadata]).run("c")
        assert isinstance(result.error, InvalidInputError)


def test_a_closed_store_refuses_work_and_a_dropped_manager_closes_its_store(
    db_url: str,
) -> None:
    manager = ContextManager(db_url, cleanup_interval=None)
    manager.create_context("s")
    store = manager.store
    manager.stop()
    with pytest.raises(EventCtxError, match="closed"):
        store.append("s", [NewEvent.create("KeySet", {"value": 1}, key="k")])
    dropped = ContextManager(db_url, cleanup_interval=None)
    dropped_store = dropped.store
    del dropped
    gc.collect()
    with pytest.raises(EventCtxError, match="closed"):
        dropped_store.session("s")


def test_a_manager_keeps_only_the_contexts_in_use(manager: ContextManager) -> None:
    kept = manager.create_context("kept")
    for n in range(300):
        manager.create_context(f"s{n}").set("k", n)
    gc.collect()
    assert manager.get_context("kept") is kept  # one object per session while it is used
    assert len(manager._contexts) < 10  # the others were let go
    assert manager.get_context("s7").get("k") == 7  # and come back restored
