"""The Inspector, on histories built by the runner: retries, an interrupted attempt, writes
outside phases, deletes, clears and a several-key update, with known content."""

from __future__ import annotations

import statistics
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import pytest

import eventctx
from eventctx import (
    ContextKeyError,
    ContextManager,
    Inspector,
    InvalidInputError,
    PluginRunner,
    RetryPolicy,
    SessionExistsError,
    SessionNotFoundError,
    StorageError,
    runlog,
)
from eventctx.findings import ABSENT, DELETED
from eventctx.state import fold


def analysis(_: Any) -> dict[str, int]:
    ctx = eventctx.current_context()
    assert ctx.get("a") == 1
    ctx.set("files", 3)
    ctx.delete("b")
    return {"files": 3}


def make_planning() -> Any:
    calls: list[int] = []

    def planning(_: Any) -> str:
        ctx = eventctx.current_context()
        calls.append(1)
        ctx.set("plan", "draft" if len(calls) == 1 else "final")
        if len(calls) == 1:
            raise ConnectionError("planner timed out")
        return f"plan for {ctx.get('files')} files"

    return planning


@dataclass
class Story:
    """What the history holds, to check the Inspector against."""

    first: str
    second: str
    update_version: int


def build(manager: ContextManager, session_id: str = "s") -> Story:
    ctx = manager.create_context(session_id)
    ctx.update({"a": 1, "b": 2})  # outside phases, one update
    update_version = ctx.version
    retry = RetryPolicy(attempts=2, retry_on=(ConnectionError,))
    first = PluginRunner(manager, [analysis, make_planning()], retries=retry).run(session_id)
    assert first.status == "completed"
    # A second run whose process "died" inside analysis, after one write; then resumed.
    second = uuid.uuid4().hex
    ctx.writer.append(
        [
            runlog.run_started(second, {"n": 2}, ["analysis", "planning"]),
            runlog.phase_started(second, "analysis", 1),
            eventctx.NewEvent.create(
                "KeySet", {"value": "half"}, key="files", phase="analysis", execution_id=second
            ),
        ]
    )
    resumed = PluginRunner(manager, [analysis, make_planning()], retries=retry).run(
        session_id, resume=True
    )
    assert resumed.status == "completed" and resumed.execution_id == second
    ctx.clear()
    ctx.set("late", True)
    return Story(first.execution_id, second, update_version)


@pytest.fixture
def story(manager: ContextManager) -> Story:
    return build(manager)


@pytest.fixture
def insp(manager: ContextManager) -> Inspector:
    return Inspector(manager.store)


def test_state_at_every_version_equals_the_replay_from_the_first_event(
    manager: ContextManager, insp: Inspector, story: Story
) -> None:
    events = list(manager.store.read("s"))
    for step in insp.replay("s"):
        expected = fold(events[: step.event.version])
        assert step.state == expected
        assert insp.state_at("s", step.event.version) == expected
    head = manager.get_context("s")
    assert insp.state_at("s").data == head.to_dict() == {"late": True}


def test_state_at_a_time_is_inclusive_and_never_splits_an_update(
    manager: ContextManager, insp: Inspector, story: Story
) -> None:
    events = list(manager.store.read("s"))
    update = [e for e in events if e.version in (story.update_version - 1, story.update_version)]
    assert update[0].recorded_at == update[1].recorded_at  # one update, one time
    at = update[1].recorded_at
    assert insp.state_at("s", at=at).version == story.update_version
    assert insp.state_at("s", at=at).data == {"a": 1, "b": 2}
    before = insp.state_at("s", at=at - timedelta(microseconds=1))
    assert before.version == 1 and before.data == {}


def test_replay_names_the_keys_each_event_changed(insp: Inspector, story: Story) -> None:
    steps = list(insp.replay("s"))
    changed = {s.event.version: s.changed for s in steps}
    assert changed[story.update_version] == {"b"}
    clear = next(s for s in steps if s.event.type == "ContextCleared")
    assert clear.changed == {"a", "files", "plan"}
    rolled = [(s.event.phase, s.changed) for s in steps if s.event.type == "PhaseFailed"]
    assert rolled == [("planning", {"plan"}), ("analysis", {"files"}), ("planning", {"plan"})]
    assert all(
        not s.changed
        for s in steps
        if s.event.type.startswith(("Run", "Phase")) and s.event.type != "PhaseFailed"
    )
    tail = list(insp.replay("s", start=clear.event.version))
    assert tail[0].state.data == {} and tail[-1].state.data == {"late": True}


def test_blame_names_phase_execution_attempt_and_the_replaced_value(
    insp: Inspector, story: Story
) -> None:
    ended = insp.state_at("s").version - 2  # just before the clear
    blame = insp.blame("s", version=ended)
    plan = blame["plan"]
    assert (plan.phase, plan.execution_id, plan.attempt, plan.op) == (
        "planning",
        story.second,
        2,
        "set",
    )
    # The failed first attempt's "draft" was rolled back: this write replaced run 1's "final".
    assert plan.value == "final" and plan.previous == "final"
    b = blame["b"]
    assert (b.phase, b.execution_id, b.attempt, b.op, b.value) == (
        "analysis",
        story.first,
        1,
        "delete",
        ABSENT,
    )
    assert b.previous == 2 and b.previous_version == story.update_version
    a = blame["a"]
    assert (a.phase, a.execution_id, a.attempt, a.value, a.previous) == (
        None,
        None,
        None,
        1,
        ABSENT,
    )
    files = blame["files"]
    assert (files.execution_id, files.attempt, files.value) == (story.second, 2, 3)
    assert files.previous == 3  # the interrupted attempt's "half" was rolled back
    now = insp.blame("s")
    assert now["plan"].op == "delete" and now["plan"].phase is None  # the clear, outside phases
    assert now["late"].value is True
    assert insp.blame("s", "plan", version=ended) == {"plan": plan}


def test_key_history_lists_every_write_oldest_first(insp: Inspector, story: Story) -> None:
    history = insp.key_history("s", "plan")
    assert [(w.value, w.execution_id, w.attempt, w.op, w.rolled_back) for w in history] == [
        ("draft", story.first, 1, "set", True),  # its attempt failed
        ("final", story.first, 2, "set", False),
        ("draft", story.second, 1, "set", True),
        ("final", story.second, 2, "set", False),
        (ABSENT, None, None, "delete", False),  # the clear
    ]
    assert [w.previous for w in history] == [ABSENT, ABSENT, "final", "final", "final"]
    files = insp.key_history("s", "files")
    assert [(w.value, w.attempt, w.rolled_back) for w in files][:3] == [
        (3, 1, False),
        ("half", 1, True),  # the interrupted attempt
        (3, 2, False),
    ]


def test_readers_match_what_phases_read(insp: Inspector, story: Story) -> None:
    readers = insp.readers("s", "files")
    assert [(r.phase, r.execution_id, r.attempt, r.status) for r in readers] == [
        ("planning", story.first, 2, "completed"),
        ("planning", story.second, 2, "completed"),
    ]
    assert [(r.phase, r.execution_id) for r in insp.readers("s", "a")] == [
        ("analysis", story.first),
        ("analysis", story.second),
    ]
    assert insp.readers("s", "never") == []


def test_diff_finds_added_removed_and_changed_keys(insp: Inspector, story: Story) -> None:
    head = insp.state_at("s").version
    diff = insp.diff("s", story.update_version, head - 2)
    assert diff.added == {"files": 3, "plan": "final"}
    assert diff.removed == {"b": 2}
    assert diff.changed == {}
    later = insp.diff("s", head - 2, head)
    assert later.added == {"late": True}
    assert later.removed == {"a": 1, "files": 3, "plan": "final"}
    assert not insp.diff("s", head, head)


def test_runs_list_phases_attempts_and_ends(insp: Inspector, story: Story) -> None:
    first, second = insp.runs("s")
    assert (first.execution_id, first.status, second.status) == (
        story.first,
        "completed",
        "completed",
    )
    planning = first.phase_runs["planning"]
    assert [(a.attempt, a.status) for a in planning.attempts] == [(1, "failed"), (2, "completed")]
    assert planning.attempts[0].error_type == "ConnectionError"
    assert planning.output == "plan for 3 files"
    analysis_run = second.phase_runs["analysis"]
    assert [(a.attempt, a.status) for a in analysis_run.attempts] == [
        (1, "interrupted"),
        (2, "completed"),
    ]
    assert analysis_run.attempts[0].duration_ms is None
    assert second.input == {"n": 2}


def test_diff_sessions_names_the_first_phase_that_diverges(manager: ContextManager) -> None:
    def scan(_: Any) -> str:
        eventctx.current_context().set("files", 3)
        return "scanned"

    def plan_good(_: Any) -> str:
        eventctx.current_context().set("plan", ["lint", "test"])
        return "ok"

    def plan_bad(_: Any) -> str:
        eventctx.current_context().set("plan", ["lint"])
        eventctx.current_context().set("extra", 1)
        return "ok"

    def report(_: Any) -> str:
        return "done"

    good = [scan, eventctx.ContextAwarePhase(plan_good, name="plan"), report]
    bad = [scan, eventctx.ContextAwarePhase(plan_bad, name="plan"), report]
    PluginRunner(manager, good).run("good")
    PluginRunner(manager, bad).run("bad")
    diff = Inspector(manager.store).diff_sessions("good", "bad")
    assert diff.first_divergence == "plan"
    scan_diff, plan_diff, report_diff = diff.phases
    assert not scan_diff.diverges and not report_diff.diverges
    assert plan_diff.keys == {"plan": (["lint", "test"], ["lint"]), "extra": (ABSENT, 1)}
    assert plan_diff.status == ("completed", "completed")
    same = Inspector(manager.store).diff_sessions("good", "good")
    assert same.first_divergence is None


def _percentile(values: list[float], p: float) -> float:
    """Hand-computed: linear between closest ranks (statistics' "inclusive" method)."""
    if p == 50:
        return statistics.median(values)
    return statistics.quantiles(values, n=100, method="inclusive")[int(p) - 1]


def test_phase_stats_percentiles_equal_hand_computed_ones(manager: ContextManager) -> None:
    durations = [12.0, 3.5, 7.25, 100.0, 42.0, 8.0, 15.5, 1.0, 64.0, 27.0, 5.0]
    ctx = manager.create_context("timed")
    run = uuid.uuid4().hex
    for i, ms in enumerate(durations):
        attempt = 2 if i == 3 else 1
        events = [runlog.phase_started(run, "work", attempt)]
        if i == 4:
            events.append(runlog.phase_failed(run, "work", attempt, ValueError("x"), ms, set()))
        else:
            events.append(runlog.phase_completed(run, "work", attempt, None, ms, set()))
        ctx.writer.append(events)
    ctx.writer.append(
        [runlog.phase_started(run, "other", 1), runlog.phase_interrupted(run, "other", 1, None)]
    )
    stats = Inspector(manager.store).phase_stats()
    work = stats["work"]
    assert (work.count, work.failures, work.retries) == (11, 1, 1)
    assert work.mean_ms == pytest.approx(statistics.mean(durations))
    assert work.max_ms == 100.0
    for p, got in ((50, work.p50_ms), (95, work.p95_ms), (99, work.p99_ms)):
        assert got == pytest.approx(_percentile(durations, p))
    other = stats["other"]
    assert (other.count, other.failures) == (1, 1)  # interrupted: counted, no duration
    assert Inspector(manager.store).phase_stats(phase="other").keys() == {"other"}
    timings = list(Inspector(manager.store).phase_timings("timed", phase="other"))
    assert [(t.status, t.duration_ms) for t in timings] == [("interrupted", None)]


def test_a_fork_continues_independently_and_both_chains_verify(
    manager: ContextManager, insp: Inspector, story: Story
) -> None:
    at = story.update_version + 3
    assert insp.fork("s", "s-fork", at) == at
    fork = manager.get_context("s-fork")
    assert fork.to_dict() == insp.state_at("s", at).data and fork.version == at
    fork.set("only-in-fork", 1)
    original = manager.get_context("s")
    original.set("only-in-original", 2)
    assert "only-in-original" not in manager.get_context("s-fork")
    assert "only-in-fork" not in original
    assert insp.verify("s").ok and insp.verify("s-fork").ok
    assert insp.verify("s-fork").events == at + 1
    with pytest.raises(SessionExistsError):
        insp.fork("s", "s-fork", 2)


def test_a_rerun_with_changed_code_reports_the_change_and_leaves_the_session_alone(
    manager: ContextManager, insp: Inspector, story: Story
) -> None:
    before = manager.store.session("s")

    def fixed_planning(_: Any) -> str:
        h = eventctx.helper()
        assert h.previous_output() == {"files": 3}  # earlier outputs are there
        ctx = eventctx.current_context()
        ctx.set("plan", "better")
        return f"better plan for {ctx.get('files')} files"

    report = insp.rerun("s", "planning", fixed_planning, execution_id=story.first)
    assert report.keys == {"plan": ("final", "better")}
    assert report.output_changed and report.output == "better plan for 3 files"
    assert (report.status, report.recorded_status, report.attempt) == ("completed", "completed", 2)
    assert manager.store.session("s") == before  # version and chain head did not move
    first = insp.rerun("s", "planning", fixed_planning, execution_id=story.first, attempt=1)
    assert first.recorded_status == "failed" and first.keys == {"plan": ("draft", "better")}

    def broken(_: Any) -> None:
        raise RuntimeError("still broken")

    failed = insp.rerun("s", "planning", broken)
    assert failed.status == "failed" and isinstance(failed.error, RuntimeError)
    assert failed.keys == {"plan": ("final", ABSENT)}  # it wrote nothing that counts


def test_the_inspector_records_no_activity(
    manager: ContextManager, insp: Inspector, story: Story
) -> None:
    before = manager.store.session("s")
    insp.state_at("s", 3)
    insp.blame("s")
    list(insp.replay("s"))
    insp.runs("s")
    insp.key_history("s", "plan")
    list(insp.history("s", types={"KeySet"}))
    assert manager.store.session("s") == before


def test_history_filters(insp: Inspector, story: Story) -> None:
    plans = list(insp.history("s", types={"KeySet"}, phase="planning"))
    assert [e.payload["value"] for e in plans] == ["draft", "final", "draft", "final"]
    second = list(insp.history("s", execution_id=story.second, types={"PhaseStarted"}))
    assert [(e.phase, e.payload["attempt"]) for e in second] == [
        ("analysis", 1),
        ("analysis", 2),
        ("planning", 1),
        ("planning", 2),
    ]
    everything = list(insp.history("s"))
    middle = everything[len(everything) // 2].recorded_at
    assert all(e.recorded_at >= middle for e in insp.history("s", since=middle))
    assert all(e.recorded_at <= middle for e in insp.history("s", until=middle))


def test_bad_input_gets_precise_errors(insp: Inspector, story: Story) -> None:
    with pytest.raises(SessionNotFoundError, match="compaction"):
        insp.state_at("nope")
    head = insp.state_at("s").version
    for version in (0, -1, head + 1):
        with pytest.raises(InvalidInputError, match="versions 1 to"):
            insp.state_at("s", version)
    with pytest.raises(InvalidInputError, match="naive"):
        insp.state_at("s", at=datetime(2026, 1, 1))
    with pytest.raises(InvalidInputError, match="no event at or before"):
        insp.state_at("s", at=datetime(2000, 1, 1, tzinfo=eventctx.events.UTC))
    with pytest.raises(InvalidInputError, match="has no run in which phase"):
        insp.rerun("s", "deploy", lambda _: None)
    with pytest.raises(InvalidInputError, match="no run with execution id"):
        insp.rerun("s", "planning", lambda _: None, execution_id="nope")
    with pytest.raises(InvalidInputError, match="no attempt 7"):
        insp.rerun("s", "planning", lambda _: None, attempt=7)
    with pytest.raises(ContextKeyError, match="never written"):
        insp.blame("s", "nope")
    with pytest.raises(InvalidInputError, match="no run"):
        insp.diff_sessions("s", _empty(insp))
    with pytest.raises(eventctx.InvalidInputError):
        insp.fork("s", "", 2)


def _empty(insp: Inspector) -> str:
    insp.store.append("empty", [eventctx.NewEvent.create("ContextCreated")])
    return "empty"


def test_a_fork_keeps_the_ttl_of_a_recreated_session(manager: ContextManager) -> None:
    manager.create_context("s", ttl=timedelta(seconds=1)).set("a", 1)
    manager.delete_context("s")
    manager.create_context("s", ttl=None).set("b", 2)
    insp = Inspector(manager.store)
    insp.fork("s", "f")
    head = manager.store.session("f")
    assert head is not None and head.ttl_ms is None
    assert manager.get_context("f").to_dict() == {"b": 2} and insp.verify("f").ok


def test_a_phase_that_clears_the_context_diverges_from_one_that_does_not(
    manager: ContextManager,
) -> None:
    def reset(run_input: Any) -> None:
        if run_input["clear"]:
            eventctx.current_context().clear()

    for sid, clear in (("s", True), ("t", False)):
        manager.create_context(sid).set("keep", 1)
        PluginRunner(manager, [reset]).run(sid, {"clear": clear})
    insp = Inspector(manager.store)
    diff = insp.diff_sessions("s", "t")
    assert diff.first_divergence == "reset"
    assert diff.phases[0].keys == {"keep": (DELETED, ABSENT)}
    assert insp.rerun("s", "reset", lambda _: None).keys == {"keep": (DELETED, ABSENT)}


def test_an_inspector_opened_from_a_url_writes_nothing_but_forks(
    db_url: str, tmp_path: Any
) -> None:
    missing = f"sqlite:///{tmp_path / 'missing.db'}"
    with pytest.raises(StorageError, match="no database at"):
        Inspector(missing)
    assert not (tmp_path / "missing.db").exists()
    with ContextManager(db_url, cleanup_interval=None) as manager:
        manager.create_context("s").set("a", 1)
        PluginRunner(manager, [analysis]).run("s")
        before = manager.store.session("s")
    with Inspector(db_url) as insp:
        assert insp.store.read_only and insp.state_at("s").data["a"] == 1
        assert insp.fork("s", "s2", 2) == 2  # a write it was asked for: made, then let go
        assert insp.verify("s2").ok and insp.store.session("s") == before
        report = insp.rerun("s", "analysis", lambda _: "again")
        assert report.status == "completed" and report.output == "again"
