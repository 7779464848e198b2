"""Retention: old events folded into a base and removed, with the current state, provenance,
readers and phase timings kept exactly, the chain verifiable from the base, and nothing lost
to writers and runners racing the job."""

from __future__ import annotations

import base64
import gzip
import io
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

import eventctx
from eventctx import (
    ContextManager,
    EventStore,
    HistoryRemovedError,
    Inspector,
    IntegrityError,
    InvalidInputError,
    PluginRunner,
    snapshots,
    state,
)
from eventctx.cli import main
from eventctx.clock import now_us
from eventctx.compaction import CompactionReport, compact
from eventctx.exchange import export_session, import_session
from eventctx.findings import ABSENT
from eventctx.metrics import log_metrics
from eventctx.retention import build_base, plan
from eventctx.snapshots import restore
from eventctx.store import SessionHead, schema
from eventctx.store.sessionread import SessionRead
from eventctx.timeline import timeline_data


def _mark() -> int:
    """A moment (µs) between the writes before it and those after it."""
    time.sleep(0.01)
    mark = now_us()
    time.sleep(0.01)
    return mark


def _trim(store: EventStore, mark: int, **options: Any) -> CompactionReport:
    """``compact(retain=…)`` with the window starting exactly at ``mark``: the store's clock is
    held still while the job runs, so the window does not drift while it works."""
    now = store.clock()
    clock = store.clock
    store.clock = lambda: now
    try:
        return compact(store, retain=timedelta(microseconds=now - mark), **options)
    finally:
        store.clock = clock


@pytest.fixture
def manager(db_url: str) -> Iterator[ContextManager]:
    with ContextManager(db_url, cleanup_interval=None, snapshot_every=7) as m:
        yield m


def _phases(fail_first: set[str]) -> list[Any]:
    def analysis(inp: Any) -> dict[str, Any]:
        ctx = eventctx.current_context()
        ctx.set("files", inp["n"])
        ctx.set("seen", ctx.get("seen", 0) + 1)
        return {"files": inp["n"]}

    def planning(inp: Any) -> dict[str, Any]:
        ctx = eventctx.current_context()
        ctx.set("plan", [ctx.get("files"), inp["n"]])
        if "planning" in fail_first:  # fails once: a rolled-back attempt, then a retry
            fail_first.discard("planning")
            raise eventctx.PhaseError("flaky")
        return {"steps": 2}

    def execution(inp: Any) -> dict[str, Any]:
        ctx = eventctx.current_context()
        ctx.update({"done": ctx.get("plan"), f"run{inp['n']}": True})
        if inp["n"] % 2:
            ctx.delete("tmp")
        else:
            ctx.set("tmp", inp["n"])
        return {"ok": True}

    return [analysis, planning, execution]


def _run(manager: ContextManager, session_id: str, n: int, flaky: bool = False) -> None:
    runner = PluginRunner(manager, _phases({"planning"} if flaky else set()), retries=1)
    assert runner.run(session_id, input={"n": n}, resume=False).status == "completed"


def _view(insp: Inspector, session_id: str) -> dict[str, Any]:
    """Everything retention must leave exactly as it was."""
    state = insp.state_at(session_id)
    keys = sorted(state.provenance)
    return {
        "data": state.data,
        "provenance": state.provenance,
        "outputs": state.outputs,
        "blame": insp.blame(session_id),
        "readers": {k: insp.readers(session_id, k) for k in keys},
        "stats": insp.phase_stats(session_id),
        "all_stats": insp.phase_stats(),
        "timings": sorted(insp.phase_timings(session_id), key=lambda t: t.recorded_at),
        "latest_run": insp.runs(session_id)[-1],
        "diff": insp.diff_sessions(session_id, "other"),
    }


def test_retention_keeps_state_provenance_readers_and_timings(manager: ContextManager) -> None:
    ctx = manager.create_context("s")
    ctx.update({"tmp": 0, "outside": "a"})
    for n in range(4):
        _run(manager, "s", n, flaky=n == 1)
    ctx.refresh()
    ctx.set("outside", "b")  # an outside write whose prior is removed
    old_version = ctx.version
    mark = _mark()
    _run(manager, "s", 4)
    _run(manager, "s", 5, flaky=True)
    ctx.refresh()
    ctx.set("late", 1)
    _run(manager, "other", 4)
    insp = Inspector(manager.store)
    before = _view(insp, "s")
    at_base = insp.state_at("s", old_version)
    first_run = insp.runs("s")[0].execution_id
    metrics_before = log_metrics(manager.store)
    head = manager.store.session("s")
    assert head is not None

    planned = _trim(manager.store, mark, dry_run=True)
    assert planned.trimmed == {"s": old_version} and planned.events_trimmed == old_version
    assert manager.store.base("s") is None  # a dry run changes nothing

    report = _trim(manager.store, mark)
    assert report.trimmed == {"s": old_version} and report.events_trimmed == old_version
    assert not list(manager.store.read("s", 1, old_version))  # the events are gone
    assert manager.store.base("s") is not None
    assert _view(insp, "s") == before
    assert log_metrics(manager.store).phases == metrics_before.phases  # counted from the base
    with ContextManager(manager.store, cleanup_interval=None) as fresh:
        assert fresh.get_context("s").to_dict() == before["data"]  # restored cold
    assert insp.verify("s").ok and insp.verify("s").events == head.version - old_version
    assert all(r.ok for r in insp.verify())

    _removed_part_says_so(insp, old_version, first_run, head)
    assert insp.state_at("s", old_version) == at_base  # the base itself still answers
    assert insp.base_version("s") == old_version
    steps = list(insp.replay("s"))
    assert steps[0].event.version == old_version + 1 and steps[-1].state.data == before["data"]
    assert next(e.version for e in insp.history("s")) == old_version + 1
    history = insp.key_history("s", "outside")
    assert [(w.version, w.value, w.previous) for w in history] == [
        (old_version, "b", "a"),
    ]
    assert insp.key_history("s", "late")[0].previous is ABSENT

    # Nothing further to do until more of the history ages; a second run is a no-op.
    assert _trim(manager.store, mark).trimmed == {}
    ctx.set("after", 2)  # writes go on from the head
    assert ctx.version == head.version + 1
    assert manager.store.verify("s") == ctx.version - old_version


def _removed_part_says_so(insp: Inspector, base: int, first_run: str, head: SessionHead) -> None:
    """What the removed part of session "s" can no longer answer says so."""
    with pytest.raises(HistoryRemovedError) as removed:
        insp.state_at("s", base - 1)
    assert removed.value.base_version == base
    with pytest.raises(HistoryRemovedError):
        list(insp.replay("s", 1))
    with pytest.raises(HistoryRemovedError, match="earlier runs were removed"):
        insp.rerun("s", "analysis", lambda _: None, execution_id=first_run)
    with pytest.raises(HistoryRemovedError):
        insp.state_at("s", at=head.created_at - timedelta(seconds=1))


def test_the_base_moves_on_and_keeps_accumulating(manager: ContextManager) -> None:
    ctx = manager.create_context("s")
    for n in range(3):
        _run(manager, "s", n, flaky=True)
    mark = _mark()
    for n in range(3, 6):
        _run(manager, "s", n, flaky=n == 4)
    insp = Inspector(manager.store)
    before = _view_without_other(insp)
    first = _trim(manager.store, mark).trimmed["s"]
    assert _view_without_other(insp) == before
    mark = _mark()
    _run(manager, "s", 6)
    before = _view_without_other(insp)
    second = _trim(manager.store, mark).trimmed["s"]
    assert second > first
    after = _view_without_other(insp)
    assert after == before  # the first base's attempts carried into the second, exactly
    assert "run6" in after["data"]
    ctx.refresh()
    assert ctx.to_dict() == after["data"]
    assert insp.verify("s").ok


def _view_without_other(insp: Inspector) -> dict[str, Any]:
    state = insp.state_at("s")
    return {
        "data": state.data,
        "stats": insp.phase_stats("s"),
        "timings": sorted(insp.phase_timings("s"), key=lambda t: t.recorded_at),
    }


def test_retention_races_writers_and_a_runner(db_url: str) -> None:
    """Writers, a runner and the retention job at once: every acknowledged write is in the
    state, runs complete, the chain verifies, and a fresh restore equals the live context."""
    window = timedelta(milliseconds=150)
    errors: list[BaseException] = []
    acknowledged: dict[str, int] = {}
    stop = threading.Event()
    with ContextManager(db_url, cleanup_interval=None, snapshot_every=25) as manager:
        manager.create_context("s")

        def writer(name: str) -> None:
            try:
                ctx = manager.get_context("s")
                i = 0
                while not stop.is_set():
                    ctx.set(f"{name}-{i % 40}", i)
                    acknowledged[f"{name}-{i % 40}"] = i
                    i += 1
            except BaseException as exc:
                errors.append(exc)

        def runner() -> None:
            try:
                n = 0
                while not stop.is_set():
                    _run(manager, "s", n, flaky=n % 3 == 0)
                    n += 1
            except BaseException as exc:
                errors.append(exc)

        def job() -> None:
            try:
                with EventStore.open(db_url) as store:
                    while not stop.is_set():
                        compact(store, retain=window, chunk_events=50)
                        time.sleep(0.05)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=writer, args=(f"w{i}",)) for i in range(2)]
        threads += [threading.Thread(target=runner), threading.Thread(target=job)]
        for t in threads:
            t.start()
        time.sleep(2.5)
        stop.set()
        for t in threads:
            t.join()
        assert not errors, errors
        ctx = manager.get_context("s")
        base = manager.store.base("s")
        assert base is not None and base.version > 100  # the job did remove history
        for key, value in acknowledged.items():
            assert ctx.get(key) == value
        insp = Inspector(manager.store)
        assert insp.verify("s").ok
        with ContextManager(db_url, cleanup_interval=None) as fresh:
            assert fresh.get_context("s").to_dict() == ctx.to_dict()
        assert all(run.status == "completed" for run in insp.runs("s"))


def test_an_interrupted_removal_is_finished_by_the_next_run(manager: ContextManager) -> None:
    ctx = manager.create_context("s")
    for i in range(30):
        ctx.set("k", i)
    mark = _mark()
    ctx.set("k", "new")
    store = manager.store
    # A compactor that moved the base and then died: the events below it are still there.
    head = store.session("s")
    assert head is not None
    now = store.clock()
    planned = plan(store, head, timedelta(microseconds=now - mark), now)
    assert planned is not None and planned.cut == 31
    assert store.bases.move(build_base(store, planned), store.clock(), 0)
    assert store.read_versions("s", [1])  # still there, but no longer part of the history
    insp = Inspector(store)
    with pytest.raises(HistoryRemovedError):
        insp.state_at("s", 5)
    assert insp.verify("s").ok and insp.verify("s").events == 1
    report = _trim(store, mark)
    assert report.trimmed == {"s": 31} and report.events_trimmed == 31
    assert not store.read_versions("s", [1, 31])
    assert insp.state_at("s").data == {"k": "new"} and insp.verify("s").ok


def test_a_tampered_base_is_caught(manager: ContextManager) -> None:
    ctx = manager.create_context("s")
    ctx.set("k", 1)
    mark = _mark()
    ctx.set("k", 2)
    _trim(manager.store, mark)
    with manager.store.engine.begin() as conn:
        conn.execute(
            schema.bases.update().values(state=b'{"forged": true}')  # not the fold it was
        )
    insp = Inspector(manager.store)
    result = insp.verify("s")
    assert not result.ok and "retention base" in str(result.error)
    with pytest.raises(IntegrityError):
        insp.blame("s")


def test_purge_and_ttl_removal_take_the_base_with_them(manager: ContextManager) -> None:
    ctx = manager.create_context("s", ttl=timedelta(milliseconds=600))
    ctx.set("k", 1)
    mark = _mark()
    ctx.set("k", 2)
    assert _trim(manager.store, mark).trimmed == {"s": 2}
    manager.delete_context("s", purge=True)
    assert manager.store.base("s") is None
    again = manager.create_context("s", ttl=timedelta(milliseconds=200))
    again.set("k", 3)
    assert again.version == 2 and Inspector(manager.store).verify("s").ok
    time.sleep(0.3)
    assert compact(manager.store).sessions == ["s"]
    assert manager.store.base("s") is None


def test_compact_retain_on_the_command_line(
    db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with ContextManager(db_url, cleanup_interval=None) as manager:
        ctx = manager.create_context("s")
        ctx.update({"a": 1, "b": 2})
    time.sleep(1.1)
    with ContextManager(db_url, cleanup_interval=None) as manager:
        manager.get_context("s").set("a", 3)
    assert main(["--url", db_url, "compact", "--retain", "1s", "--dry-run"]) == 0
    assert "would fold 3 events of 1 live sessions" in capsys.readouterr().out
    assert main(["--url", db_url, "--json", "compact", "--retain", "1s"]) == 0
    done = orjson.loads(capsys.readouterr().out)
    assert done["trimmed"] == {"s": 3} and done["events_trimmed"] == 3
    assert main(["--url", db_url, "replay", "s", "--version", "2"]) == 1
    assert "removed by retention" in capsys.readouterr().err
    assert main(["--url", db_url, "blame", "s", "a"]) == 0
    assert "3" in capsys.readouterr().out
    with pytest.raises(SystemExit) as usage:
        main(["--url", db_url, "compact", "--retain", "soon"])
    assert usage.value.code == 2
    assert "not a duration" in capsys.readouterr().err


def test_a_trimmed_session_exports_imports_forks_and_archives(
    manager: ContextManager, tmp_path: Path
) -> None:
    ctx = manager.create_context("s", ttl=timedelta(seconds=2))
    ctx.update({"tmp": 0, "outside": "a"})
    for n in range(2):
        _run(manager, "s", n, flaky=n == 1)
    mark = _mark()
    _run(manager, "s", 2)
    base = _trim(manager.store, mark).trimmed["s"]
    insp = Inspector(manager.store)
    want = {
        "data": insp.state_at("s").data,
        "blame": insp.blame("s"),
        "stats": insp.phase_stats("s"),
        "readers": insp.readers("s", "files"),
    }

    def same(store: EventStore, session_id: str) -> None:
        other = Inspector(store)
        assert other.verify(session_id).ok
        assert other.base_version(session_id) == base
        assert other.state_at(session_id).data == want["data"]
        assert other.blame(session_id) == want["blame"]
        assert other.phase_stats(session_id) == want["stats"]
        assert other.readers(session_id, "files") == want["readers"]

    path = tmp_path / "s.jsonl.gz"
    export_session(manager.store, "s", path)
    with EventStore.open(f"sqlite:///{tmp_path / 'elsewhere.db'}") as elsewhere:
        import_session(elsewhere, path)
        same(elsewhere, "s")
    import_session(manager.store, path, as_session="s-copy")
    same(manager.store, "s-copy")

    # A base edited in the file is refused and nothing is written.
    lines = gzip.decompress(path.read_bytes()).split(b"\n")
    header = orjson.loads(lines[0])
    header["base"]["state_b64"] = base64.b64encode(b'{"forged": 1}').decode()
    edited = tmp_path / "edited.jsonl"
    edited.write_bytes(b"\n".join([orjson.dumps(header), *lines[1:]]))
    with pytest.raises(IntegrityError, match="base"):
        import_session(manager.store, edited, as_session="s-edited")
    assert manager.store.session("s-edited") is None and manager.store.base("s-edited") is None

    for change, said in (
        ({"created_at_us": -5}, "out of range"),
        ({"created_at_us": 2**63 + 5}, "out of range"),
        ({"format_version": 1}, "format_version 1"),
    ):
        bad = tmp_path / "bad.jsonl"
        bad.write_bytes(b"\n".join([orjson.dumps(orjson.loads(lines[0]) | change), *lines[1:]]))
        with pytest.raises(InvalidInputError, match=said):
            import_session(manager.store, bad, as_session="s-bad")
    assert manager.store.session("s-bad") is None

    # A fork starts from the base; before it there is nothing to fork from.
    head = manager.store.session("s")
    assert head is not None
    assert insp.fork("s", "s-fork") == head.version
    same(manager.store, "s-fork")
    with pytest.raises(HistoryRemovedError):
        insp.fork("s", "s-early", base - 1)

    # Expired with an archive: the archived file imports back whole.
    time.sleep(2.1)
    report = compact(manager.store, archive=tmp_path / "archive")
    assert report.sessions == ["s", "s-copy", "s-fork"] and len(report.archived) == 3
    (archived,) = [a for a in report.archived if "/s." in a]
    import_session(manager.store, archived)
    same(manager.store, "s")


def test_a_full_fold_racing_the_removal_starts_again_from_the_base(
    manager: ContextManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A restore folding the log from version 1 while retention removes the events under it
    (after its first row): a snapshot read (SQLite) never sees the removal; a reader that sees
    each statement's latest rows (PostgreSQL) starts again from the base."""
    ctx = manager.create_context("s")
    for i in range(7):
        ctx.update({f"k{j}": i for j in range(1000)})  # more than one page of events
    mark = _mark()
    ctx.set("late", 1)
    store = manager.store
    head = store.session("s")
    assert head is not None
    now = store.clock()
    planned = plan(store, head, timedelta(microseconds=now - mark), now)
    assert planned is not None
    assert store.bases.move(build_base(store, planned), store.clock(), 0)
    chain_rows = SessionRead.chain_rows
    raced: list[int] = []

    def racing(read: SessionRead, low: int, high: int) -> Iterator[Any]:
        for i, row in enumerate(chain_rows(read, low, high)):
            if i == 1 and low == 1 and not raced:
                while removed := store.bases.trim("s", planned.cut, 10_000):
                    raced.append(removed)
            yield row

    monkeypatch.setattr(SessionRead, "chain_rows", racing)
    state, _, _ = restore(store, "s", head.version)
    assert sum(raced) == planned.cut and state.data == ctx.to_dict()


def test_the_timeline_starts_from_the_base(manager: ContextManager) -> None:
    ctx = manager.create_context("s")
    ctx.update({"old": 1, "keep": 2})
    mark = _mark()
    _trim(manager.store, mark)  # every event folded: nothing after the base
    insp = Inspector(manager.store)
    data = timeline_data(insp, "s")
    assert data["base"]["data"] == {"old": 1, "keep": 2} and data["events"] == []
    assert data["version"] == 3
    ctx.set("new", 3)
    data = timeline_data(insp, "s")
    assert [e[0] for e in data["events"]] == [4]
    assert data["states"][4]["data"] == {"old": 1, "keep": 2, "new": 3}
    assert next(iter(insp.replay("s"))).event.version == 4
    ctx.refresh()
    mark = _mark()
    _trim(manager.store, mark)
    assert list(insp.replay("s")) == []  # a fully folded session replays nothing
    young = manager.create_context("young", ttl=None)  # only its creation ages: a base at 1
    mark = _mark()
    young.set("k", 1)
    assert _trim(manager.store, mark).trimmed == {"young": 1}
    data = timeline_data(insp, "young")
    assert data["base"] is not None and data["base"]["version"] == 1
    assert [e[0] for e in data["events"]] == [2]


def test_a_fork_or_export_racing_a_base_move_starts_again(
    manager: ContextManager, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx = manager.create_context("s")
    for i in range(5):
        ctx.set("k", i)
    _trim(manager.store, _mark())  # a base at 6
    for i in range(5, 10):
        ctx.set("k", i)
    mark = _mark()
    ctx.set("late", 1)
    store = manager.store

    def moving_first(name: str) -> None:
        original = getattr(EventStore, name)
        calls = []

        def racing(self: EventStore, *args: Any, **kwargs: Any) -> Any:
            if not calls:
                calls.append(_trim(store, mark).trimmed)  # moves it to 11
            return original(self, *args, **kwargs)

        monkeypatch.setattr(EventStore, name, racing)

    moving_first("load")
    insp = Inspector(store)
    assert insp.fork("s", "f") == 12
    assert insp.verify("f").ok and insp.state_at("f").data == {"k": 9, "late": 1}
    assert insp.base_version("f") == 11
    monkeypatch.undo()

    ctx.set("k", 10)
    mark = _mark()
    ctx.set("later", 2)
    moving_first("chain_rows")
    with pytest.raises(eventctx.ConcurrencyError, match="export again"):
        export_session(store, "s", io.BytesIO())  # a file object cannot be rewound
    mark = _mark()
    ctx.set("last", 3)
    moving_first("chain_rows")
    path = tmp_path / "s.jsonl"
    export_session(store, "s", path)  # a path is written again
    import_session(store, path, as_session="s2")
    assert insp.verify("s2").ok and insp.state_at("s2").data == ctx.to_dict()


def test_recorded_heads_and_corrupt_bases_after_trimming(
    db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with ContextManager(db_url, cleanup_interval=None) as manager:
        ctx = manager.create_context("s")
        ctx.set("k", 1)
        early = manager.store.session("s")
        ctx.set("k", 2)
        at_base = manager.store.session("s")
        mark = _mark()
        _trim(manager.store, mark)
        assert early is not None and at_base is not None
        for head, code, said in (
            (at_base, 0, "0 events verified from the retention base at version 3"),
            (early, 1, "cannot be checked"),
        ):
            spec = f"{head.version}:{head.head_hash.hex()}"
            assert main(["--url", db_url, "verify", "s", "--expect-head", spec]) == code
            assert said in capsys.readouterr().out
        forged = f"{at_base.version}:{'00' * 32}"
        assert main(["--url", db_url, "verify", "s", "--expect-head", forged]) == 1
        assert "rewritten" in capsys.readouterr().out
        # A corrupt base fails the all-session readers too, never skipped.
        with manager.store.engine.begin() as conn:
            conn.execute(schema.bases.update().values(history=b'{"ends":[],"replaced":{}}'))
        insp = Inspector(manager.store)
        for read in (insp.phase_stats, lambda: log_metrics(manager.store)):
            with pytest.raises(IntegrityError, match="retention base"):
                read()
        assert not insp.verify("s").ok


def test_a_base_outlives_a_change_of_fold_rules_only_with_a_conversion(
    manager: ContextManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx = manager.create_context("s")
    ctx.update({"a": 1, "b": 2})
    _trim(manager.store, _mark())
    ctx.set("c", 3)
    insp = Inspector(manager.store)
    monkeypatch.setattr(snapshots, "FOLD_VERSION", state.FOLD_VERSION + 1)
    assert not insp.verify("s").ok and "cannot convert" in str(insp.verify("s").error)
    assert not next(r for r in insp.verify() if r.session_id == "s").ok
    with pytest.raises(IntegrityError, match="cannot convert"):
        insp.state_at("s", 3)
    renamed: dict[int, Any] = {state.FOLD_VERSION: lambda raw: raw | {"data": {"A": 1, "B": 2}}}
    monkeypatch.setattr(snapshots, "BASE_CONVERSIONS", renamed)
    assert insp.verify("s").ok and insp.state_at("s", 3).data == {"A": 1, "B": 2}
