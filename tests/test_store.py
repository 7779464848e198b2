"""Conformance suite for EventStore: every test runs on SQLite and PostgreSQL."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from eventctx import (
    ConcurrencyError,
    ContextManager,
    EventStore,
    IntegrityError,
    InvalidInputError,
    NewEvent,
    SchemaError,
    SerializationError,
    SessionExistsError,
    SessionNotFoundError,
    StorageError,
)
from eventctx.clock import now_us
from eventctx.compaction import compact
from eventctx.events import RecordedEvent as RecordedEventT
from eventctx.events import chain_hash, sha256
from eventctx.store import Fence, Head, schema
from eventctx.store.append import _chain
from eventctx.store.commit import AppendRequest, _units
from eventctx.store.core import READ_CHUNK
from eventctx.store.schema import SCHEMA_VERSION
from eventctx.store.statements import EVENT_COLUMNS

WORKERS = str(Path(__file__).with_name("workers.py"))


@pytest.fixture
def store(db_url: str) -> Iterator[EventStore]:
    s = EventStore.open(db_url)
    yield s
    s.close()


def created(ttl_ms: int | None = 60_000) -> NewEvent:
    return NewEvent.create("ContextCreated", {"ttl_ms": ttl_ms})


def key_set(key: str, value: object, **kw: str) -> NewEvent:
    return NewEvent.create("KeySet", {"value": value}, key=key, **kw)


def versions(store: EventStore, session_id: str) -> list[int]:
    return [e.version for e in store.read(session_id)]


def test_append_read_round_trip(store: EventStore) -> None:
    value = {"files": ["a.go", "b.go"], "n": 3, "ratio": 0.5, "ok": True, "none": None}
    store.append("s", [created()])
    appended = store.append(
        "s", [key_set("plan", value, phase="planning", execution_id="e1"), key_set("x", "y")]
    )
    read = list(store.read("s"))
    assert [e.version for e in read] == [1, 2, 3]
    assert read[1:] == appended
    assert read[1].payload == {"value": value}
    assert (read[1].key, read[1].phase, read[1].execution_id) == ("plan", "planning", "e1")
    assert (read[2].phase, read[2].execution_id) == (None, None)
    assert read[0].type == "ContextCreated" and read[0].payload == {"ttl_ms": 60_000}
    assert read[1].position < read[2].position
    assert all(e.recorded_at.tzinfo is UTC for e in read)
    assert read[1].recorded_at_us == read[2].recorded_at_us  # one transaction, one time
    assert read[0].recorded_at_us <= read[1].recorded_at_us


def test_read_ranges_stream_across_chunks(store: EventStore) -> None:
    total = READ_CHUNK * 2 + 17
    store.append("s", [created()])
    store.append("s", [key_set(f"k{i}", i) for i in range(total - 1)])
    assert versions(store, "s") == list(range(1, total + 1))
    assert [e.version for e in store.read("s", 5, 7)] == [5, 6, 7]
    assert [e.version for e in store.read("s", READ_CHUNK - 1, READ_CHUNK + 1)] == [
        READ_CHUNK - 1,
        READ_CHUNK,
        READ_CHUNK + 1,
    ]
    assert list(store.read("s", total + 1)) == []
    with pytest.raises(SessionNotFoundError, match="does not exist"):
        list(store.read("missing"))


def test_head_row_tracks_the_log(store: EventStore) -> None:
    store.append("s", [created(ttl_ms=5000)])
    last = store.append("s", [key_set("a", 1), key_set("b", 2)])[-1]
    head = store.session("s")
    assert head is not None
    assert (head.version, head.head_hash, head.status, head.ttl_ms) == (
        3,
        last.hash,
        "active",
        5000,
    )
    assert head.last_activity_us == last.recorded_at_us
    assert head.expires_at == head.last_activity + head.ttl  # type: ignore[operator]
    assert store.session("other") is None
    assert [h.session_id for h in store.sessions()] == ["s"]


def test_expected_version_conflict_appends_nothing(store: EventStore) -> None:
    store.append("s", [created()])
    store.append("s", [key_set("a", 1)], expected_version=1)
    with pytest.raises(ConcurrencyError, match="version 2, not 1"):
        store.append("s", [key_set("a", 2)], expected_version=1)
    assert versions(store, "s") == [1, 2]
    store.append("s", [key_set("a", 3)], expected_version=2)
    assert versions(store, "s") == [1, 2, 3]


def test_stale_head_hint_appends_at_the_real_head(store: EventStore) -> None:
    first = store.append("s", [created()])[-1]
    stale = Head(first.version, first.hash, first.recorded_at_us)
    store.append("s", [key_set("a", 1)], head=stale)
    appended = store.append("s", [key_set("b", 2)], head=stale)  # head moved: falls back
    assert appended[0].version == 3
    wrong_hash = Head(3, b"\x01" * 32, 0)
    assert store.append("s", [key_set("c", 3)], head=wrong_hash)[0].version == 4
    assert store.verify("s") == 4


def test_create_missing_and_deleted_sessions(store: EventStore) -> None:
    with pytest.raises(SessionNotFoundError):
        store.append("s", [key_set("a", 1)])
    store.append("s", [created()])
    with pytest.raises(SessionExistsError):
        store.append("s", [created()])
    store.append("s", [NewEvent.create("ContextDeleted")])
    head = store.session("s")
    assert head is not None and head.status == "deleted"
    with pytest.raises(SessionNotFoundError, match="deleted"):
        store.append("s", [key_set("a", 1)])
    again = store.append("s", [created(ttl_ms=None)])
    assert again[0].version == 3  # versions continue over the delete
    head = store.session("s")
    assert head is not None and (head.status, head.ttl_ms) == ("active", None)
    assert store.verify("s") == 3


def test_purge_removes_everything(store: EventStore) -> None:
    store.append("s", [created(), key_set("a", 1)])
    store.append("t", [created()])
    assert store.purge("s") == 2
    assert store.session("s") is None and not list(store.find("s"))
    assert versions(store, "t") == [1]
    assert store.append("s", [created()])[0].version == 1


def test_versions_gapless_under_four_racing_processes(store: EventStore, db_url: str) -> None:
    store.append("race", [created()])
    per_process = 60
    procs = [
        subprocess.Popen(
            [sys.executable, WORKERS, "append", db_url, "race", str(per_process), f"p{n}"]
        )
        for n in range(4)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0, 0]
    events = list(store.read("race"))
    assert [e.version for e in events] == list(range(1, 4 * per_process + 2))
    assert len({e.key for e in events[1:]}) == 4 * per_process  # no write lost or duplicated
    assert store.verify("race") == 4 * per_process + 1


def test_events_are_immutable(store: EventStore, db_url: str) -> None:
    store.append("s", [created(), key_set("a", 1)])
    with store.engine.connect() as conn:
        for sql in (
            "UPDATE eventctx_events SET version = version",  # a no-op is refused too
            "UPDATE eventctx_events SET payload = payload WHERE session_id = 's'",
        ):
            with pytest.raises(sa.exc.DBAPIError, match="append-only"):
                conn.exec_driver_sql(sql)
            conn.rollback()
    assert store.verify("s") == 2


def _drop_update_trigger(store: EventStore, conn: sa.Connection) -> None:
    suffix = " ON eventctx_events" if store.dialect_name == "postgresql" else ""
    conn.exec_driver_sql(f"DROP TRIGGER eventctx_events_no_update{suffix}")


def test_hash_chain_catches_tampering(store: EventStore) -> None:
    store.append("s", [created()])
    for i in range(5):
        store.append("s", [key_set(f"k{i}", i)])
    assert store.verify("s") == 6
    with store.engine.begin() as conn:
        _drop_update_trigger(store, conn)
        conn.execute(
            sa.text(
                "UPDATE eventctx_events SET payload = :p WHERE session_id = 's' AND version = 3"
            ),
            {"p": b'{"value":999}'},
        )
    with pytest.raises(IntegrityError, match="version 3: stored hash"):
        store.verify("s")


def test_hash_chain_catches_a_truncated_tail(store: EventStore) -> None:
    store.append("s", [created(), key_set("a", 1), key_set("b", 2)])
    with store.engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM eventctx_events WHERE session_id = 's' AND version = 3"))
    with pytest.raises(IntegrityError, match="ends at version 2"):
        store.verify("s")


def test_failed_batch_appends_nothing(store: EventStore) -> None:
    store.append("s", [created()])
    # A row planted at version 3 makes the second insert of the next batch clash.
    planted = store.append("p", [created()])[0]
    with store.engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO eventctx_events (session_id, version, type, payload, recorded_at, "
                "hash, prev_hash) VALUES ('s', 3, 'KeySet', :p, 0, :h, :h)"
            ),
            {"p": b"{}", "h": planted.hash},
        )
    with pytest.raises(ConcurrencyError):
        store.append("s", [key_set("a", 1), key_set("b", 2)])
    head = store.session("s")
    assert head is not None and head.version == 1
    assert versions(store, "s") == [1, 3]  # only the planted row: the batch left no trace


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (float("nan"), "not finite"),
        (float("inf"), "not finite"),
        ({1, 2}, "builtins.set is not JSON"),
        (2**70, "outside the signed 64-bit range"),
        ({1: "a"}, "dict key 1 is a int"),
        (b"bytes", "builtins.bytes is not JSON"),
        ({"deep": [1, {"x": float("-inf")}]}, r"'k'\['deep'\]\[1\]\['x'\]"),
        (object(), "builtins.object is not JSON"),
    ],
)
def test_values_outside_json_are_refused(store: EventStore, value: object, message: str) -> None:
    store.append("s", [created()])
    with pytest.raises(SerializationError, match=message):
        store.append("s", [key_set("ok", 1), key_set("k", value)])
    assert versions(store, "s") == [1]


HOSTILE_IDS = [
    "it's",
    'say "hi"',
    "'; DROP TABLE eventctx_events; --",
    "Robert'); DELETE FROM eventctx_sessions WHERE ('1'='1",
    "ключ 鍵 🔑",
    "  leading and trailing  ",
    "tab\tnew\nline",
    "%s %(x)s ? :name $1",
    "\\backslash\\",
    "x" * 255,
    "y" * 512,
]


def test_hostile_session_ids_are_plain_data(store: EventStore) -> None:
    for sid in HOSTILE_IDS:
        store.append(sid, [created(), key_set("k", sid)])
    assert sorted(h.session_id for h in store.sessions()) == sorted(HOSTILE_IDS)
    for sid in HOSTILE_IDS:
        events = list(store.read(sid))
        assert [e.session_id for e in events] == [sid, sid]
        assert events[1].payload == {"value": sid}
        assert store.verify(sid) == 2


@pytest.mark.parametrize("bad", ["", "z" * 513, "nul\x00inside", "\ud800", 42, None])
def test_invalid_session_ids_are_refused(store: EventStore, bad: object) -> None:
    with pytest.raises(InvalidInputError, match="session id"):
        store.append(bad, [created()])  # type: ignore[arg-type]
    assert store.sessions() == []


def test_open_is_idempotent_and_safe_across_processes(db_url: str) -> None:
    procs = [subprocess.Popen([sys.executable, WORKERS, "open", db_url]) for _ in range(4)]
    assert [p.wait(timeout=60) for p in procs] == [0, 0, 0, 0]
    with EventStore.open(db_url) as store, store.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT COUNT(*) FROM eventctx_schema").scalar() == 1


def _stamp(db_url: str, version: int) -> None:
    with EventStore.open(db_url) as store, store.engine.begin() as conn:
        conn.exec_driver_sql(f"UPDATE eventctx_schema SET version = {version}")


def test_newer_schema_is_refused(db_url: str) -> None:
    _stamp(db_url, 99)
    with pytest.raises(SchemaError, match="newer"):
        EventStore.open(db_url)


def test_older_schema_asks_for_upgrade(db_url: str) -> None:
    _stamp(db_url, 0)
    with pytest.raises(SchemaError, match="eventctx upgrade"):
        EventStore.open(db_url)
    with pytest.raises(SchemaError, match="no migration from schema version 0"):
        EventStore.upgrade(db_url)  # version 1 is the first: nothing upgrades to it


def test_foreign_tables_without_a_version_are_refused(db_url: str) -> None:
    with EventStore.open(db_url) as store, store.engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE eventctx_schema")
    with pytest.raises(SchemaError, match="no schema version"):
        EventStore.open(db_url)


def test_driver_errors_are_translated(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="nothing was committed") as info:
        EventStore.open(f"sqlite:///{tmp_path / 'no' / 'such' / 'dir.db'}")
    assert info.value.__cause__ is not None
    with pytest.raises(StorageError):
        EventStore.open("postgresql+psycopg://postgres@127.0.0.1:1/none?connect_timeout=2")


DATA = Path(__file__).with_name("data")


def test_upgrade_of_a_committed_version_1_sqlite_file(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    path.write_bytes((DATA / "eventctx-v1.sqlite").read_bytes())
    url = f"sqlite:///{path}"
    with pytest.raises(SchemaError, match=f"version 1 is older than {SCHEMA_VERSION}"):
        EventStore.open(url)
    with EventStore.upgrade(url) as store:
        assert store.upgraded_from == 1
        assert store.verify("legacy") == 9  # the history survives, chain intact
        assert store.base("legacy") is None  # the retention table is there, empty
        assert store.take_named_lease("compaction", "me", timedelta(seconds=1)) is None
        assert store.take_lease("legacy", "me", timedelta(seconds=1)) == Fence("me", 1)
    with EventStore.open(url) as store, ContextManager(store) as manager:
        data = manager.get_context("legacy").to_dict()
        assert data == {
            f"k{i}": {"i": i, "note": "written by schema version 1"} for i in range(1, 7)
        }
        manager.get_context("legacy").set("after", "upgrade")
        assert store.verify("legacy") == 10


def _remove_newest(store: EventStore, how: str) -> None:
    """Remove the events of session "newest", which hold the largest positions, as ``how``."""
    if how == "purge":
        store.purge("newest")
    elif how == "ttl":
        time.sleep(0.01)
        assert compact(store).sessions_removed == 1
    elif how == "in steps":
        time.sleep(0.01)
        assert store.removal.mark_expiring("newest", now_us())
        assert store.removal.delete_events_upto("newest", 2) == 2
        assert store.removal.finish_removal("newest") == (1, 0)
    else:  # retention: every event of both sessions is older than the window
        time.sleep(0.01)
        mark = now_us()
        time.sleep(0.01)
        assert compact(store, retain=timedelta(microseconds=now_us() - mark)).events_trimmed == 5


@pytest.mark.parametrize("how", ["purge", "ttl", "in steps", "retention"])
def test_a_removed_position_is_never_handed_out_again(store: EventStore, how: str) -> None:
    """Positions stay monotonic when a removal takes the largest ones: a follower of the
    global log that saw them would otherwise skip the rows that took them again."""
    store.append("kept", [created(ttl_ms=None), key_set("a", 1)])
    ttl_ms = 1 if how in ("ttl", "in steps") else None
    newest = store.append("newest", [created(ttl_ms), key_set("b", 2), key_set("c", 3)])
    _remove_newest(store, how)
    assert [e.session_id for e in store.read_after(0, 10)] == (
        [] if how == "retention" else ["kept", "kept"]
    )
    after = store.append("kept", [key_set("d", 4), key_set("e", 5)])
    assert [e.position for e in after] == [newest[-1].position + 1, newest[-1].position + 2]
    assert store.verify("kept") == (2 if how == "retention" else 4)


def test_upgrade_to_version_6_keeps_sqlite_positions_above_any_removed(tmp_path: Path) -> None:
    """Version 6 drops AUTOINCREMENT from SQLite's events table: the upgrade rebuilds the
    table as a new database has it, and positions go on above the largest ever handed out."""
    path = tmp_path / "old.sqlite"
    path.write_bytes((DATA / "eventctx-v1.sqlite").read_bytes())
    with sqlite3.connect(path) as conn:  # a removal freed the largest positions
        largest = conn.execute("SELECT max(position) FROM eventctx_events").fetchone()[0]
        conn.execute(
            "INSERT INTO eventctx_events (session_id, version, type, payload, recorded_at, "
            "hash, prev_hash) VALUES ('gone', 1, 'ContextCreated', x'7b7d', 1, x'00', x'00')"
        )
        conn.execute("DELETE FROM eventctx_events WHERE session_id = 'gone'")
    with EventStore.upgrade(f"sqlite:///{path}") as store:
        assert store.verify("legacy") == 9
        appended = store.append("new", [created()])
        assert appended[0].position == largest + 2
    fresh = tmp_path / "fresh.sqlite"
    EventStore.open(f"sqlite:///{fresh}").close()
    assert _schema_of(path) == _schema_of(fresh)


def _schema_of(path: Path) -> list[tuple[str, str]]:
    """The tables, indexes and triggers of a SQLite file: their DDL as SQLite holds it, without
    the whitespace in which a column added later differs."""
    with sqlite3.connect(path) as conn:
        rows = conn.execute(
            "SELECT name, coalesce(sql, '') FROM sqlite_master "
            "WHERE name != 'sqlite_sequence' ORDER BY name"
        ).fetchall()
    return [(str(name), "".join(str(sql).split())) for name, sql in rows]


def test_upgrade_of_a_version_1_postgresql_schema(pg_url: str) -> None:
    text = (DATA / "postgresql-v1.sql").read_text()
    sql = "\n".join(line for line in text.splitlines() if not line.startswith("--"))
    engine = sa.create_engine(pg_url)
    with engine.begin() as conn:
        for statement in filter(str.strip, sql.split(";\n\n")):
            conn.exec_driver_sql(statement)
        conn.exec_driver_sql("INSERT INTO eventctx_schema (version) VALUES (1)")
    engine.dispose()
    with pytest.raises(SchemaError, match=f"version 1 is older than {SCHEMA_VERSION}"):
        EventStore.open(pg_url)
    with EventStore.upgrade(pg_url) as store:
        assert store.upgraded_from == 1
        store.append("s", [created(), key_set("a", 1)])
        assert store.take_named_lease("compaction", "me", timedelta(seconds=1)) is None
        assert store.take_lease("s", "me", timedelta(seconds=1)) == Fence("me", 1)
        assert store.verify("s") == 2
        assert store.base("s") is None


def test_group_commit_keeps_each_callers_result_and_refusals_apart(store: EventStore) -> None:
    """Racing threads share transactions; each gets exactly its own events back, and a
    refused conditional append in a group leaves the others committed."""
    for sid in ("a", "b"):
        store.append(sid, [created()])
    results: dict[str, list[RecordedEventT]] = {}
    refused: list[Exception] = []

    def writer(tag: str, sid: str) -> None:
        mine: list[RecordedEventT] = []
        for i in range(40):
            events = [key_set(f"{tag}-{i}-{j}", j) for j in range(1 + i % 3)]
            mine += store.append(sid, events)
            if i % 10 == 0:
                try:
                    store.append(sid, [key_set("never", 0)], expected_version=1)
                except ConcurrencyError as exc:
                    refused.append(exc)
        results[tag] = mine

    threads = [threading.Thread(target=writer, args=(f"t{n}", "ab"[n % 2])) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(refused) == 6 * 4
    stored = {(e.session_id, e.version): e for sid in "ab" for e in store.read(sid)}
    for sid in "ab":
        assert [v for s, v in stored if s == sid] == list(
            range(1, len([1 for s, _ in stored if s == sid]) + 1)
        )
        assert store.verify(sid) == max(v for s, v in stored if s == sid)
    for tag, mine in results.items():
        assert all(e.key is not None and e.key.startswith(tag) for e in mine)
        assert all(stored[(e.session_id, e.version)] == e for e in mine)
    assert not any(e.key == "never" for e in stored.values())


def test_a_group_never_merges_a_delete_with_writes() -> None:
    def request(session: str, *events: NewEvent, expected: int | None = None) -> AppendRequest:
        return AppendRequest(session, list(events), expected, None, None)

    delete = request("a", NewEvent.create("ContextDeleted"))
    batch = [
        request("b", key_set("x", 1)),
        request("a", key_set("x", 1)),
        request("a", key_set("y", 2)),
        delete,
        request("a", key_set("z", 3)),
        request("a", key_set("w", 4), expected=7),
    ]
    units = _units(sorted(batch, key=lambda r: r.session_id))
    assert [[r.session_id for r in unit] for unit in units] == [
        ["a", "a"],  # two blind writes share one append
        ["a"],  # the delete stands alone: its writes after it must be refused
        ["a"],
        ["a"],  # a conditional write stands alone
        ["b"],
    ]
    assert units[1] == [delete]


def test_compaction_leaves_a_purged_and_recreated_session_alone(store: EventStore) -> None:
    store.append("s", [NewEvent.create("ContextCreated", {"ttl_ms": 1}), key_set("old", 1)])
    time.sleep(0.01)
    assert store.removal.mark_expiring("s", now_us())
    store.purge("s")  # meanwhile: purged and created again
    store.append("s", [created(ttl_ms=None), key_set("new", 2)])
    assert store.removal.delete_events_upto("s", 1) is None
    assert store.removal.finish_removal("s") is None
    assert [e.key for e in store.read("s")] == [None, "new"] and store.verify("s") == 2


def test_verify_all_streams_and_agrees_with_verify(store: EventStore) -> None:
    for sid in ("a", "b", "c", "d"):
        store.append(sid, [created(), *(key_set(f"k{i}", i) for i in range(3))])
    store.append("e", [created()])
    with store.engine.begin() as conn:
        _drop_update_trigger(store, conn)
        conn.execute(
            sa.text(
                "UPDATE eventctx_events SET payload = :p WHERE session_id = 'b' AND version = 2"
            ),
            {"p": b'{"value":999}'},
        )
        conn.execute(sa.text("DELETE FROM eventctx_events WHERE session_id = 'd' AND version = 4"))
        conn.execute(sa.text("DELETE FROM eventctx_events WHERE session_id = 'e'"))
    results = dict(store.verify_all())
    assert list(results) == ["a", "b", "c", "d", "e"]
    assert results["a"] == 4 and results["c"] == 4
    for sid in ("b", "d", "e"):
        with pytest.raises(IntegrityError) as caught:
            store.verify(sid)
        found = results[sid]
        assert isinstance(found, IntegrityError) and str(found) == str(caught.value)


def test_verify_all_does_not_depend_on_how_ids_sort(store: EventStore) -> None:
    """Ids that Python and the database may order differently, and events whose head row is
    gone: every session is reported once, with its own result."""
    ids = ["B", "a", "Ä", "b", "_x", "z9", "Z1"]
    for sid in ids:
        store.append(sid, [created(), key_set("k", 1)])
    with store.engine.begin() as conn:  # a head row removed (events left behind)
        conn.execute(sa.text("DELETE FROM eventctx_sessions WHERE session_id = 'b'"))
    reported = list(store.verify_all())
    assert sorted(sid for sid, _ in reported) == sorted(ids)  # each once
    results = dict(reported)
    assert all(results[sid] == 2 for sid in ids if sid != "b")
    assert isinstance(results["b"], SessionNotFoundError)


def test_a_batch_with_a_lifecycle_event_inside_is_refused(store: EventStore) -> None:
    """The head row takes a batch's lifecycle (and a re-creation's ttl) from its first and
    last events: a creation or deletion in the middle would be misread, so it is refused."""
    store.append("s", [created(), key_set("a", 1)])
    for batch in (
        [NewEvent.create("ContextDeleted"), created(ttl_ms=None)],
        [key_set("b", 2), created(ttl_ms=None), key_set("c", 3)],
    ):
        with pytest.raises(InvalidInputError, match="may only start a batch"):
            store.append("s", batch)
    assert versions(store, "s") == [1, 2]


def test_event_rows_bind_by_position_in_the_column_order(store: EventStore) -> None:
    """Appends bind each row's columns by position: a statement whose parameters come in
    another order than ``EVENT_COLUMNS`` is refused when compiled, never bound askew."""
    dialect = store._dialect
    statement = dialect.insert_events_statement(schema.events, EVENT_COLUMNS)
    returning = statement.returning(schema.events.c.position)
    assert dialect.compile_positional(statement, EVENT_COLUMNS) == store._sql.insert_event
    assert dialect.compile_positional(returning, EVENT_COLUMNS) == store._sql.insert_event_returning
    swapped = (EVENT_COLUMNS[1], EVENT_COLUMNS[0], *EVENT_COLUMNS[2:])
    for either in (statement, returning):
        with pytest.raises(ValueError, match="binds"):
            dialect.compile_positional(either, swapped)


def test_an_append_makes_its_rows_in_the_column_order() -> None:
    """The rows an append inserts hold each column where ``EVENT_COLUMNS`` names it."""
    event = key_set("k", [1, "x"], phase="p", execution_id="e")
    base = Head(4, b"\x01" * 32, 10)
    (row,) = _chain("s", [event], base, 20, sha256)
    assert dict(zip(EVENT_COLUMNS, row, strict=True)) == {
        "session_id": "s",
        "version": 5,
        "type": "KeySet",
        "key": "k",
        "phase": "p",
        "execution_id": "e",
        "payload": event.data,
        "recorded_at": 20,
        "hash": chain_hash(base.hash, "s", 5, "KeySet", "k", "p", "e", 20, event.data),
        "prev_hash": base.hash,
    }


def test_load_refuses_what_is_not_an_event_row_of_the_session(store: EventStore) -> None:
    """``load`` takes EventRow tuples of the session it loads: a mapping, a short row, a list
    or a row of another session is refused by name, and nothing is loaded."""
    row = ("s", 1, "ContextCreated", None, None, None, b"{}", 1, bytes(32), bytes(32))
    for bad in (dict(zip(EVENT_COLUMNS, row, strict=True)), row[:-1], list(row), ("t", *row[1:])):
        with pytest.raises(InvalidInputError, match="EventRow tuples of session 's'"):
            store.load("s", [bad])  # type: ignore[list-item]
        assert store.session("s") is None
