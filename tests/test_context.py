"""PluginContext and ContextManager semantics, on SQLite and PostgreSQL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import orjson
import pydantic
import pytest
import sqlalchemy as sa

import eventctx
from eventctx import (
    ConcurrencyError,
    ContextKeyError,
    ContextManager,
    ContextTypeError,
    EventCtxError,
    EventStore,
    InvalidInputError,
    SerializationError,
    SessionExistsError,
    SessionExpiredError,
    SessionNotFoundError,
)
from eventctx.manager import ACTIVITY_SLACK
from eventctx.state import FOLD_VERSION, fold

WORKERS = str(Path(__file__).with_name("workers.py"))


def events_of(manager: ContextManager, session_id: str) -> list[eventctx.RecordedEvent]:
    return list(manager.store.read(session_id))


class Config(pydantic.BaseModel):
    language: str
    depth: int = 1


def test_create_get_and_one_object_per_session(manager: ContextManager) -> None:
    ctx = manager.create_context("s")
    assert ctx.session_id == "s" and ctx.version == 1 and len(ctx) == 0
    assert manager.get_context("s") is ctx
    assert manager.get_or_create_context("s") is ctx
    with pytest.raises(SessionExistsError):
        manager.create_context("s")
    with pytest.raises(SessionNotFoundError):
        manager.get_context("nope")
    other = manager.get_or_create_context("new")
    assert other.version == 1 and other is not ctx
    assert [s.session_id for s in manager.sessions()] == ["new", "s"]


def test_reads_and_typed_accessors(manager: ContextManager) -> None:
    ctx = manager.create_context("s")
    ctx.update({"n": 3, "f": 1.5, "s": "go", "b": True, "l": [1, 2], "d": {"k": [1]}, "none": None})
    assert ctx.keys() == ["n", "f", "s", "b", "l", "d", "none"]
    assert (ctx.get_int("n"), ctx.get_float("f"), ctx.get_float("n")) == (3, 1.5, 3.0)
    assert (ctx.get_str("s"), ctx.get_bool("b")) == ("go", True)
    assert (ctx.get_list("l"), ctx.get_dict("d")) == ([1, 2], {"k": [1]})
    assert ctx["none"] is None and "none" in ctx and "zz" not in ctx
    assert ctx.get("zz") is None and ctx.get("zz", 7) == 7
    assert ctx.get_int("zz", default=0) == 0
    with pytest.raises(ContextKeyError, match="'zz' is not in session 's'"):
        ctx.get_int("zz")
    with pytest.raises(KeyError):
        ctx["zz"]
    with pytest.raises(ContextTypeError, match="holds a str, not an int"):
        ctx.get_int("s")
    with pytest.raises(TypeError):
        ctx.get_int("b")  # a bool is not an int
    with pytest.raises(ContextTypeError):
        ctx.get_bool("n")
    assert ctx.to_dict() == orjson.loads(ctx.to_json())
    assert ctx.to_json().startswith(b'{"b":true,"d"')  # canonical: sorted keys


def test_returned_values_are_copies(manager: ContextManager) -> None:
    ctx = manager.create_context("s")
    value = {"files": ["a"]}
    ctx.set("plan", value)
    value["files"].append("mutated by caller")
    got = ctx.get("plan")
    got["files"].append("mutated by reader")
    ctx.get_dict("plan")["x"] = 1
    ctx.to_dict()["plan"]["files"].clear()
    assert ctx.get("plan") == {"files": ["a"]}


def test_models_are_stored_as_json(manager: ContextManager) -> None:
    ctx = manager.create_context("s")
    ctx.set("cfg", Config(language="go", depth=2))
    ctx.set("nested", {"cfgs": [Config(language="py")]})
    assert ctx.get("cfg") == {"language": "go", "depth": 2}
    assert ctx.get_model("cfg", Config) == Config(language="go", depth=2)
    assert ctx.get("nested") == {"cfgs": [{"language": "py", "depth": 1}]}
    ctx.set("bad", {"depth": "deep"})
    with pytest.raises(ContextTypeError, match="does not validate as Config"):
        ctx.get_model("bad", Config)


def test_write_semantics_and_versions(manager: ContextManager) -> None:
    ctx = manager.create_context("s")
    ctx.set("a", 1)
    assert ctx.version == 2
    ctx.update({})
    assert ctx.version == 2  # nothing appended
    ctx.update({"b": 2, "c": 3})
    assert ctx.version == 4
    events = events_of(manager, "s")
    assert [e.type for e in events] == ["ContextCreated", "KeySet", "KeySet", "KeySet"]
    assert events[2].recorded_at_us == events[3].recorded_at_us  # one transaction
    assert ctx.delete("zz") is False and ctx.version == 4
    assert ctx.delete("a") is True and ctx.version == 5 and "a" not in ctx
    with pytest.raises(ContextKeyError):
        del ctx["a"]
    ctx["d"] = 4
    ctx.clear()
    assert len(ctx) == 0 and ctx.version == 7
    assert [e.type for e in events_of(manager, "s")][-3:] == [
        "KeyDeleted",
        "KeySet",
        "ContextCleared",
    ]
    assert all(e.phase is None and e.execution_id is None for e in events_of(manager, "s"))
    ts = [e.recorded_at for e in events_of(manager, "s")]
    assert ts == sorted(ts)


@pytest.mark.parametrize(
    "value", [float("nan"), {1, 2}, 2**70, float("-inf"), b"x", {"k": (1, object())}]
)
def test_bad_values_append_nothing(manager: ContextManager, value: object) -> None:
    ctx = manager.create_context("s")
    ctx.set("ok", 1)
    with pytest.raises(SerializationError, match="'bad'"):
        ctx.set("bad", value)
    with pytest.raises(SerializationError):
        ctx.update({"fine": 1, "bad": value})
    assert ctx.version == 2 and ctx.keys() == ["ok"]
    assert len(events_of(manager, "s")) == 2


def test_bad_keys_and_sizes_are_refused(db_url: str) -> None:
    with ContextManager(db_url, max_key_length=8, max_value_bytes=100) as manager:
        ctx = manager.create_context("s")
        for key in ("", "k" * 9, 3, None):
            with pytest.raises(InvalidInputError, match="context keys"):
                ctx.set(key, 1)  # type: ignore[arg-type]
        with pytest.raises(InvalidInputError, match="over the 100-byte limit"):
            ctx.set("big", "x" * 200)
        ctx.set("k" * 8, "x" * 50)
        assert ctx.version == 2


def test_conditional_update_after_another_writer(db_url: str) -> None:
    with ContextManager(db_url) as one, ContextManager(db_url) as two:
        mine = one.create_context("s")
        theirs = two.get_context("s")
        mine.update({"a": 1}, expected_version=1)
        assert mine.version == 2
        theirs.set("b", 2)  # blind: appended at the head although this object was behind
        assert theirs.version == 3 and theirs.to_dict() == {"a": 1, "b": 2}
        with pytest.raises(ConcurrencyError, match="at version 3, not 2"):
            mine.update({"a": 10}, expected_version=mine.version)
        assert mine.version == 2 and mine.get("a") == 1  # refused: unchanged
        mine.refresh()
        assert mine.version == 3 and mine.get("b") == 2
        mine.update({"a": 10}, expected_version=3)
        mine.set("c", 3)
        assert two.get_context("s").to_dict() == {"a": 10, "b": 2, "c": 3}


def test_blind_write_folds_in_what_others_wrote(db_url: str) -> None:
    with ContextManager(db_url) as one, ContextManager(db_url) as two:
        a = one.create_context("s")
        b = two.get_context("s")
        b.set("x", "from b")
        a.set("x", "from a")  # last writer wins
        assert a.get("x") == "from a" and a.version == 3
        b.refresh()
        assert b.get("x") == "from a"


def test_restore_in_a_new_process_equals_what_was_written(
    manager: ContextManager, db_url: str
) -> None:
    ctx = manager.create_context("s")
    written = {"plan": {"steps": ["a", "b"]}, "n": 2**62, "pi": 3.14159, "t": "ключ 🔑", "z": None}
    ctx.update(written)
    ctx.delete("z")
    out = subprocess.run(
        [sys.executable, WORKERS, "ctx-dump", db_url, "s"], capture_output=True, check=True
    ).stdout.splitlines()
    assert orjson.loads(out[0]) == {k: v for k, v in written.items() if k != "z"}
    assert int(out[1]) == ctx.version


def test_restore_of_another_process_writes(manager: ContextManager, db_url: str) -> None:
    subprocess.run([sys.executable, WORKERS, "ctx-set", db_url, "s", "30", "w"], check=True)
    ctx = manager.get_context("s")
    assert ctx.version == 31
    assert ctx.to_dict() == {f"w-{i}": {"writer": "w", "i": i} for i in range(30)}


def test_four_processes_times_150_sets(manager: ContextManager, db_url: str) -> None:
    manager.create_context("race")
    procs = [
        subprocess.Popen([sys.executable, WORKERS, "ctx-set", db_url, "race", "150", f"p{n}"])
        for n in range(4)
    ]
    assert [p.wait(timeout=300) for p in procs] == [0, 0, 0, 0]
    ctx = manager.get_context("race")
    assert len(ctx) == 600 and ctx.version == 601
    assert [e.version for e in events_of(manager, "race")] == list(range(1, 602))
    assert manager.store.verify("race") == 601


def run_threads(writer: Callable[[str], None], count: int) -> None:
    """Run ``writer(tag)`` in ``count`` threads at once and wait for them."""
    threads = [threading.Thread(target=writer, args=(f"t{n}",)) for n in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_threads_share_one_context(manager: ContextManager) -> None:
    ctx = manager.create_context("s")

    def writer(tag: str) -> None:
        for i in range(150):
            ctx.set(f"{tag}-{i}", i)

    run_threads(writer, 4)
    assert len(ctx) == 600 and ctx.version == 601
    assert [e.version for e in events_of(manager, "s")] == list(range(1, 602))


def test_threads_with_their_own_managers(db_url: str, manager: ContextManager) -> None:
    manager.create_context("s")

    def writer(tag: str) -> None:
        with ContextManager(db_url) as own:
            ctx = own.get_context("s")
            for i in range(150):
                ctx.set(f"{tag}-{i}", i)

    run_threads(writer, 4)
    ctx = manager.get_context("s")
    assert len(ctx) == 600 and ctx.version == 601
    assert manager.store.verify("s") == 601


def test_stopped_manager_refuses_everything(db_url: str) -> None:
    manager = ContextManager(db_url)
    with manager:
        ctx = manager.create_context("s")
        ctx.set("a", 1)
    for call in (
        lambda: ctx.set("a", 2),
        lambda: ctx.get("a"),
        ctx.to_dict,
        lambda: len(ctx),
        ctx.refresh,
        lambda: manager.get_context("s"),
        lambda: manager.create_context("t"),
        manager.sessions,
    ):
        with pytest.raises(EventCtxError, match="manager stopped"):
            call()
    assert repr(ctx) == "<PluginContext 's' v2, 1 keys>"  # still printable for debugging
    manager.stop()  # idempotent
    with ContextManager(db_url) as again:
        assert again.get_context("s").to_dict() == {"a": 1}


def test_stop_waits_for_in_flight_writes(db_url: str) -> None:
    manager = ContextManager(db_url)
    ctx = manager.create_context("s")
    done: list[int] = []

    def writer() -> None:
        try:
            for i in range(10_000):
                ctx.set("k", i)
                done.append(i)
        except EventCtxError:
            pass

    thread = threading.Thread(target=writer)
    thread.start()
    time.sleep(0.05)
    manager.stop()
    thread.join()
    with ContextManager(db_url) as again:
        assert again.get_context("s").get("k") == done[-1]  # every acknowledged write is there


def test_delete_keeps_history_and_the_id_can_be_reused(manager: ContextManager) -> None:
    ctx = manager.create_context("s")
    ctx.set("a", 1)
    manager.delete_context("s")
    with pytest.raises(SessionNotFoundError):
        manager.get_context("s")
    with pytest.raises(SessionNotFoundError):
        ctx.set("a", 2)
    with pytest.raises(SessionNotFoundError):
        manager.delete_context("s")
    assert [e.type for e in events_of(manager, "s")] == [
        "ContextCreated",
        "KeySet",
        "ContextDeleted",
    ]
    assert manager.sessions() == []
    again = manager.create_context("s")
    assert again.version == 4 and len(again) == 0
    again.set("b", 2)
    assert manager.store.verify("s") == 5


def test_delete_in_another_manager_is_seen(db_url: str) -> None:
    with ContextManager(db_url) as one, ContextManager(db_url) as two:
        ctx = one.create_context("s")
        two.delete_context("s")
        with pytest.raises(SessionNotFoundError):
            ctx.set("a", 1)
        with pytest.raises(SessionNotFoundError):
            one.get_context("s")


def test_purge_removes_every_row(manager: ContextManager) -> None:
    manager.create_context("s").set("a", 1)
    manager.delete_context("s", purge=True)
    assert not list(manager.store.find("s")) and manager.store.session("s") is None
    with pytest.raises(SessionNotFoundError):
        manager.delete_context("s", purge=True)
    assert manager.create_context("s").version == 1


def test_ttl_is_stored_and_expiry_is_refused(db_url: str) -> None:
    with ContextManager(db_url, ttl=timedelta(hours=2)) as manager:
        manager.create_context("default")
        manager.create_context("forever", ttl=None)
        manager.create_context("short", ttl=timedelta(milliseconds=50))
        heads = {h.session_id: h for h in manager.store.sessions()}
        assert heads["default"].ttl_ms == 2 * 3600 * 1000
        assert heads["forever"].ttl_ms is None
        info = {i.session_id: i for i in manager.sessions()}
        assert info["forever"].expires_at is None
        assert info["default"].expires_at == info["default"].last_activity + timedelta(hours=2)
        time.sleep(0.12)
        with pytest.raises(SessionExpiredError):
            manager.get_context("short")
        fresh = manager.get_or_create_context("short")
        assert len(fresh) == 0 and fresh.version == 2  # created, (expired,) created again
        with pytest.raises(InvalidInputError):
            manager.create_context("neg", ttl=timedelta(seconds=-1))


def test_get_context_refreshes_activity(db_url: str) -> None:
    with ContextManager(db_url, ttl=timedelta(milliseconds=300)) as manager:
        manager.create_context("s")
        for _ in range(4):
            time.sleep(0.1)
            manager.get_context("s")  # keeps it alive past its ttl from creation
        assert manager.get_context("s").version == 1


def test_current_context(manager: ContextManager) -> None:
    ctx = manager.create_context("s")
    with pytest.raises(EventCtxError, match="no current context"):
        eventctx.current_context()
    with eventctx.use_context(ctx):
        assert eventctx.current_context() is ctx
    with pytest.raises(EventCtxError):
        eventctx.current_context()


def test_default_url_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"sqlite:///{tmp_path / 'env.db'}"
    monkeypatch.setenv("EVENTCTX_URL", url)
    with ContextManager() as manager:
        manager.create_context("s")
    with EventStore.open(url) as store:
        assert store.session("s") is not None


def test_snapshots_are_taken_and_used(db_url: str) -> None:
    with ContextManager(db_url, snapshot_every=10) as manager:
        ctx = manager.create_context("s")
        for i in range(35):
            ctx.set(f"k{i % 7}", i)
        found = manager.store.latest_snapshot("s", eventctx.state.FOLD_VERSION)
        assert found is not None and found[0] > 1
        expected = ctx.to_dict()
    with ContextManager(db_url) as manager:
        assert manager.get_context("s").to_dict() == expected


def test_unusable_snapshots_are_ignored(db_url: str) -> None:
    with ContextManager(db_url) as manager:
        ctx = manager.create_context("s")
        ctx.update({"a": 1, "b": 2})
        head = manager.store.session("s")
        assert head is not None
        manager.store.save_snapshot("s", head.version, 999, head.head_hash, b"not a state")
        wrong_chain = eventctx.State(version=head.version, head_hash=b"\x00" * 32, data={"x": 1})
        manager.store.save_snapshot(
            "s", head.version, eventctx.state.FOLD_VERSION, b"\x00" * 32, wrong_chain.encode()
        )
    with ContextManager(db_url) as manager:
        assert manager.get_context("s").to_dict() == {"a": 1, "b": 2}


def test_a_cold_restore_folds_from_the_newest_usable_snapshot(db_url: str) -> None:
    with ContextManager(db_url, cleanup_interval=None) as manager:
        ctx = manager.create_context("s")
        for key in "abcd":
            ctx.set(key, key)
        store = manager.store
        at_3 = fold(store.read("s", 1, 3))
        store.save_snapshot("s", 3, FOLD_VERSION, at_3.head_hash, at_3.encode())
        # Newer ones: of other fold rules (never usable), and past the head (no event of it).
        at_4 = fold(store.read("s", 1, 4))
        store.save_snapshot("s", 4, FOLD_VERSION + 1, at_4.head_hash, at_4.encode())
        ahead = eventctx.State(version=9, head_hash=b"\x01" * 32, data={"x": 1})
        store.save_snapshot("s", 9, FOLD_VERSION, ahead.head_hash, ahead.encode())
        expected = ctx.to_dict()
    with ContextManager(db_url, cleanup_interval=None) as manager:
        before = manager.store.rows_read
        assert manager.get_context("s").to_dict() == expected
        assert manager.store.rows_read - before == 2  # the tail after version 3: 4 and 5


def test_sigkill_loses_no_acknowledged_write(manager: ContextManager, db_url: str) -> None:
    child = subprocess.Popen(
        [sys.executable, WORKERS, "ctx-ack", db_url, "killed"], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    acknowledged = -1
    for line in child.stdout:
        acknowledged = int(line)
        if acknowledged >= 300:
            break
    os.kill(child.pid, signal.SIGKILL)  # mid-write, no chance to clean up
    child.wait(timeout=30)
    for line in child.stdout:  # acknowledgements already in the pipe count too
        acknowledged = int(line)
    ctx = manager.get_context("killed")
    data = ctx.to_dict()
    assert all(data[f"k{i}"] == i for i in range(acknowledged + 1))
    assert ctx.version in (acknowledged + 2, acknowledged + 3)  # at most one unacknowledged
    assert manager.store.verify("killed") == ctx.version


def test_a_write_after_the_session_was_purged_and_created_elsewhere(db_url: str) -> None:
    with ContextManager(db_url, cleanup_interval=None) as manager:
        ctx = manager.create_context("s")
        ctx.update({"a": 1, "b": 2})
        with EventStore.open(db_url) as other:  # another process purges and creates it anew
            other.purge("s")
            other.append("s", [eventctx.NewEvent.create("ContextCreated", {"ttl_ms": None})])
        ctx.set("y", 1)  # lands at version 2 of the new session
        assert ctx.version == 2 and ctx.to_dict() == {"y": 1}


def test_get_context_never_moves_a_context_back(manager: ContextManager) -> None:
    ctx = manager.create_context("s")
    ctx.set("a", 1)
    seen_by_get_context = manager.store.touch("s")  # read before another thread's write...
    ctx.set("x", 1)  # ...commits and is folded in
    with ctx._lock:  # what get_context then does with the head it read
        ctx._sync(seen_by_get_context, fresh=False)
    assert ctx.version == 3 and ctx.get("x") == 1


def test_a_snapshot_of_an_earlier_history_is_never_used(db_url: str) -> None:
    with ContextManager(db_url, cleanup_interval=None) as manager:
        ctx = manager.create_context("s")
        ctx.update({"old": 1, "older": 2})
        stale = ctx._state.encode()
        head = manager.store.session("s")
        assert head is not None
        manager.delete_context("s", purge=True)
        again = manager.create_context("s")
        again.update({"new": 1, "newer": 2})  # the same version as the stale snapshot
        store = manager.store
        store.save_snapshot("s", head.version, FOLD_VERSION, head.head_hash, stale)
        again.set("newest", 3)  # a tail after it, whose last hash is the head's
    with ContextManager(db_url, cleanup_interval=None) as manager:
        assert manager.get_context("s").to_dict() == {"new": 1, "newer": 2, "newest": 3}


@contextmanager
def _write_lock_held(db_url: str, session_id: str) -> Iterator[None]:
    """Another connection holding what a write needs: SQLite's database write lock
    (BEGIN IMMEDIATE), PostgreSQL's lock on the session's head row."""
    engine = sa.create_engine(db_url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            raw = conn.connection.dbapi_connection
            assert raw is not None
            cur = raw.cursor()
            if engine.dialect.name == "sqlite":
                raw.isolation_level = None
                cur.execute("BEGIN IMMEDIATE")
            else:
                cur.execute(
                    "SELECT 1 FROM eventctx_sessions WHERE session_id = %s FOR UPDATE",
                    (session_id,),
                )
            try:
                yield
            finally:
                raw.rollback()
    finally:
        engine.dispose()


def test_reads_never_take_the_write_lock(db_url: str) -> None:
    with ContextManager(db_url, ttl=timedelta(hours=1), cleanup_interval=None) as writer:
        writer.create_context("s").update({"a": 1, "b": 2})
    store = EventStore.open(db_url, busy_timeout=timedelta(seconds=3))
    with _write_lock_held(db_url, "s"), ContextManager(store, cleanup_interval=None) as manager:
        started = time.monotonic()
        ctx = manager.get_context("s")  # a cold restore of a recently active session
        assert ctx.to_dict() == {"a": 1, "b": 2}
        assert manager.get_context("s") is ctx  # and again, from memory
        insp = eventctx.Inspector(store)
        assert insp.state_at("s").data == {"a": 1, "b": 2}
        assert [e.version for e in insp.history("s")] == [1, 2, 3]
        assert set(insp.blame("s")) == {"a", "b"}
        assert time.monotonic() - started < 1.5  # never waited for the lock
    store.close()


def test_get_context_records_activity_only_past_the_slack(db_url: str) -> None:
    ttl = timedelta(seconds=4)  # slack: 250 ms
    with ContextManager(db_url, ttl=ttl, cleanup_interval=None) as manager:
        manager.create_context("s")
        created = manager.store.session("s")
        assert created is not None
        with ContextManager(db_url, cleanup_interval=None) as other:
            other.get_context("s")  # within the slack: read only
            head = manager.store.session("s")
            assert head is not None and head.last_activity_us == created.last_activity_us
            time.sleep(ttl.total_seconds() * ACTIVITY_SLACK + 0.05)
            other.get_context("s")  # past it: recorded
            head = manager.store.session("s")
            assert head is not None and head.last_activity_us > created.last_activity_us
