"""Phase semantics users expect (attempt isolation, timings, retries, context parity) and the
small defects found with them."""

from __future__ import annotations

import random
import threading
import time
import uuid
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa

import eventctx
from eventctx import (
    ContextKeyError,
    ContextManager,
    ContextTypeError,
    EventStore,
    Inspector,
    InvalidInputError,
    NewEvent,
    PhaseError,
    PluginContext,
    PluginRunner,
    RecordedEvent,
    RetryPolicy,
    SessionExistsError,
    runlog,
)


def test_type_errors_use_the_right_article(manager: ContextManager) -> None:
    ctx = manager.create_context("s")
    ctx.set("flag", True)
    with pytest.raises(ContextTypeError, match="holds a bool, not an int"):
        ctx.get_int("flag")


@pytest.mark.parametrize("scheme", ["postgresql", "postgres"])
def test_plain_postgresql_urls_use_psycopg(pg_url: str, scheme: str) -> None:
    url = sa.make_url(pg_url).set(drivername=scheme).render_as_string(hide_password=False)
    with EventStore.open(url) as store:
        store.append("s", [NewEvent.create("ContextCreated")])
        assert store.session("s") is not None
        assert store.engine.url.drivername == "postgresql+psycopg"


def _flaky(fail_times: int, outside: PluginContext | None = None) -> Any:
    calls: list[int] = []

    def build(_: Any) -> str:
        calls.append(1)
        ctx = eventctx.current_context()
        ctx.set(f"attempt-{len(calls)}", True)
        ctx.set("result", f"from attempt {len(calls)}")
        if outside is not None and len(calls) == 1:  # another thread writes meanwhile
            writer = threading.Thread(target=outside.set, args=("note", "outside the phase"))
            writer.start()
            writer.join()
        if len(calls) <= fail_times:
            raise ConnectionError(f"attempt {len(calls)} failed")
        return "built"

    return build


def test_only_the_successful_attempts_writes_count(manager: ContextManager) -> None:
    ctx = manager.create_context("s")
    ctx.set("result", "before the run")
    result = PluginRunner(manager, [_flaky(2)], retries=2).run("s")
    assert result.status == "completed"
    assert ctx.to_dict() == {"result": "from attempt 3", "attempt-3": True}
    events = list(manager.store.read("s"))
    written = [e.key for e in events if e.type == "KeySet" and e.phase == "build"]
    assert written == ["attempt-1", "result", "attempt-2", "result", "attempt-3", "result"]
    insp = Inspector(manager.store)
    states = [step.state.data for step in insp.replay("s") if step.event.type == "PhaseFailed"]
    assert states == [{"result": "before the run"}] * 2  # each failure rolled back
    blame = insp.blame("s", "result")["result"]
    assert blame.attempt == 3 and blame.previous == "before the run"
    history = insp.key_history("s", "result")
    assert [(w.attempt, w.rolled_back) for w in history] == [
        (None, False),
        (1, True),
        (2, True),
        (3, False),
    ]
    with ContextManager(manager.store) as fresh:  # a restore folds the same
        assert fresh.get_context("s").to_dict() == ctx.to_dict()


def test_a_write_outside_the_phase_during_a_failed_attempt_stands(
    manager: ContextManager,
) -> None:
    outside = manager.create_context("s")
    PluginRunner(manager, [_flaky(1, outside)], retries=1).run("s")
    assert outside.to_dict() == {
        "note": "outside the phase",
        "attempt-2": True,
        "result": "from attempt 2",
    }


def test_an_interrupted_attempts_writes_are_rolled_back_on_resume(
    manager: ContextManager,
) -> None:
    ctx = manager.create_context("s")
    run = uuid.uuid4().hex
    ctx.writer.append(
        [
            runlog.run_started(run, None, ["build"]),
            runlog.phase_started(run, "build", 1),
            NewEvent.create(
                "KeySet", {"value": "half"}, key="result", phase="build", execution_id=run
            ),
        ]
    )
    seen: list[Any] = []

    def build(_: Any) -> str:
        seen.append(eventctx.current_context().get("result"))
        return "ok"

    assert PluginRunner(manager, [build]).run("s", resume=True).status == "completed"
    assert seen == [None]  # the next attempt does not see the dead one's half-finished work


def test_isolation_can_be_turned_off(manager: ContextManager) -> None:
    ctx = manager.create_context("s")
    PluginRunner(manager, [_flaky(1)], retries=1, isolate_attempts=False).run("s")
    assert ctx.to_dict() == {"attempt-1": True, "attempt-2": True, "result": "from attempt 2"}


def _events(manager: ContextManager, session_id: str, kind: str) -> list[RecordedEvent]:
    return [e for e in manager.store.read(session_id) if e.type == kind]


def _crashed_run(ctx: PluginContext, *, wrote_after: float | None) -> str:
    """What a process that died inside phase "build" leaves behind (a write ``wrote_after``
    seconds into the attempt, or none)."""
    run = uuid.uuid4().hex
    ctx.writer.append([runlog.run_started(run, {"v": 1}, ["build"])])
    ctx.writer.append([runlog.phase_started(run, "build", 1)])
    if wrote_after is not None:
        time.sleep(wrote_after)
        ctx.writer.append(
            [NewEvent.create("KeySet", {"value": 1}, key="k", phase="build", execution_id=run)]
        )
    return run


def _build(_: Any) -> str:
    return "built"


def test_an_interrupted_attempt_has_a_lower_bound_duration_or_none(
    manager: ContextManager,
) -> None:
    ctx = manager.create_context("s")
    _crashed_run(ctx, wrote_after=0.05)
    PluginRunner(manager, [_build]).run("s", resume=True)
    interrupted = _events(manager, "s", "PhaseFailed")[0].payload
    assert interrupted["error_type"] == "interrupted" and interrupted["lower_bound"] is True
    assert interrupted["duration_ms"] >= 50
    other = manager.create_context("t")
    _crashed_run(other, wrote_after=None)
    PluginRunner(manager, [_build]).run("t", resume=True)
    unknown = _events(manager, "t", "PhaseFailed")[0].payload
    assert unknown["duration_ms"] is None and "unknown" in unknown["message"]


def test_run_result_attempts_and_wall_times_equal_the_log(manager: ContextManager) -> None:
    policy = RetryPolicy(attempts=3, backoff=0.03, multiplier=1.0)
    result = PluginRunner(manager, [_flaky(2), _broken], retries=policy).run("s")
    assert result.status == "failed"
    ends = {
        (e.phase, e.payload["attempt"]): e
        for e in manager.store.read("s")
        if e.type in ("PhaseCompleted", "PhaseFailed")
    }
    for phase, attempts in result.attempts.items():
        for a in attempts:
            end = ends[(phase, a.attempt)]
            assert a.duration_ms == end.payload["duration_ms"]
            assert a.status == ("completed" if end.type == "PhaseCompleted" else "failed")
    assert [a.status for a in result.attempts["build"]] == ["failed", "failed", "completed"]
    assert [a.status for a in result.attempts["_broken"]] == ["failed"] * 3  # the failed phase
    starts = [e for e in manager.store.read("s") if e.type == "PhaseStarted"]
    first_start = min(e.recorded_at_us for e in starts if e.phase == "build")
    last_end = ends[("build", 3)].recorded_at_us
    assert result.wall_ms["build"] == (last_end - first_start) / 1000
    assert result.wall_ms["build"] >= 60  # two back-offs of 30 ms
    assert result.durations_ms == {"build": ends[("build", 3)].payload["duration_ms"]}
    failed = _events(manager, "s", "RunFailed")[0].payload
    assert result.duration_ms == failed["duration_ms"]


def _broken(_: Any) -> None:
    raise ValueError("always")


def test_a_resumed_runs_total_spans_both_processes(manager: ContextManager) -> None:
    ctx = manager.create_context("s")
    run = _crashed_run(ctx, wrote_after=0.02)
    time.sleep(0.1)  # the first process is gone for a while
    result = PluginRunner(manager, [_build]).run("s", resume=True)
    assert result.execution_id == run
    completed = _events(manager, "s", "RunCompleted")[0].payload
    started = _events(manager, "s", "RunStarted")[0].recorded_at_us
    ended = _events(manager, "s", "RunCompleted")[0].recorded_at_us
    assert completed["duration_ms"] >= 120
    assert abs(completed["duration_ms"] - (ended - started) / 1000) < 5
    first, second = completed["segments_ms"]
    assert 20 <= first < 100 and second < completed["duration_ms"] - 100
    assert result.duration_ms == completed["duration_ms"]
    assert result.segments_ms == completed["segments_ms"]


def test_a_resume_with_a_new_input_records_it(manager: ContextManager) -> None:
    seen: list[Any] = []

    def build(run_input: Any) -> None:
        seen.append(run_input)

    ctx = manager.create_context("s")
    _crashed_run(ctx, wrote_after=None)
    PluginRunner(manager, [build]).run("s", input={"v": 2}, resume=True)
    assert seen == [{"v": 2}]
    assert _events(manager, "s", "RunResumed")[0].payload["input"] == {"v": 2}
    assert Inspector(manager.store).runs("s")[-1].input == {"v": 2}


def test_a_new_run_sees_earlier_runs_keys_unless_fresh(manager: ContextManager) -> None:
    seen: list[dict[str, Any]] = []

    def look(_: Any) -> None:
        seen.append(eventctx.current_context().to_dict())
        eventctx.current_context().set("ran", len(seen))

    runner = PluginRunner(manager, [look])
    runner.run("s")
    runner.run("s")
    runner.run("s", fresh=True)
    assert seen == [{}, {"ran": 1}, {}]


def test_retries_honour_marks_predicates_and_delays(manager: ContextManager) -> None:
    calls: list[str] = []

    def marked(_: Any) -> None:
        calls.append("marked")
        raise PhaseError("bad credentials", retryable=False)

    policy = RetryPolicy(attempts=5)
    assert PluginRunner(manager, [marked], retries=policy).run("a").status == "failed"
    assert calls == ["marked"]  # not retried
    failed = _events(manager, "a", "PhaseFailed")[0].payload
    assert failed["retry"] is False and failed["retry_after_ms"] is None

    def flagged(_: Any) -> None:
        error = ConnectionError("reset")
        error.retryable = True  # type: ignore[attr-defined]
        calls.append("flagged")
        raise error

    only_value_errors = RetryPolicy(attempts=2, retry_on=(ValueError,))
    PluginRunner(manager, [flagged], retries=only_value_errors).run("b")
    assert calls.count("flagged") == 2  # the attribute wins over retry_on

    def transient(_: Any) -> None:
        calls.append("transient")
        raise TimeoutError("slow" if len(calls) % 2 else "fatal")

    picky = RetryPolicy(attempts=5, retry_if=lambda exc: str(exc) == "slow", backoff=0.001)
    PluginRunner(manager, [transient], retries=picky).run("c")
    tried = [e.payload for e in _events(manager, "c", "PhaseFailed")]
    assert [p["message"] for p in tried][-1] == "fatal" and tried[-1]["retry"] is False
    assert all(p["retry"] and p["retry_after_ms"] == pytest.approx(1.0) for p in tried[:-1])

    capped = RetryPolicy(attempts=9, backoff=1.0, multiplier=10.0, max_delay=5.0, jitter=0.2)
    rng = random.Random(7)
    for attempt in range(1, 9):
        base = min(1.0 * 10.0 ** (attempt - 1), 5.0)
        for _ in range(50):
            wait = capped.delay(attempt, rng)
            assert base * 0.8 <= wait <= min(base * 1.2, 5.0)


def test_a_later_phase_reads_an_earlier_attempts_error(manager: ContextManager) -> None:
    errors: list[Any] = []

    def report(_: Any) -> None:
        errors.append(eventctx.helper().errors())

    PluginRunner(manager, [_flaky(1), report], retries=1).run("s")
    (found,) = errors
    assert list(found) == ["build"]
    (attempt,) = found["build"]
    assert (attempt.attempt, attempt.error_type, attempt.message) == (
        1,
        "ConnectionError",
        "attempt 1 failed",
    )
    assert attempt.retry_after_ms == 0.0


def test_clone_continues_independently_and_names_its_parent(manager: ContextManager) -> None:
    ctx = manager.create_context("s", ttl=timedelta(hours=2))
    ctx.update({"a": 1, "b": [2]})
    copy = ctx.clone("s-copy")
    assert copy.to_dict() == {"a": 1, "b": [2]} and manager.get_context("s-copy") is copy
    copy.set("a", 10)
    ctx.set("c", 3)
    assert ctx.to_dict() == {"a": 1, "b": [2], "c": 3}
    assert copy.to_dict() == {"a": 10, "b": [2]}
    created = next(iter(manager.store.read("s-copy")))
    assert created.payload["parent"] == {"session_id": "s", "version": 3}
    assert created.payload["ttl_ms"] == 2 * 3600 * 1000  # this session's ttl by default
    assert manager.store.verify("s-copy") == 4
    with pytest.raises(SessionExistsError):
        ctx.clone("s-copy")


def test_info_equals_what_the_log_says(manager: ContextManager) -> None:
    ctx = manager.create_context("s")
    ctx.set("k", 1)
    time.sleep(0.002)

    def touch(_: Any) -> None:
        eventctx.current_context().set("k", {"now": "a dict"})

    run = PluginRunner(manager, [touch]).run("s")
    info = ctx.info("k")
    sets = [e for e in manager.store.read("s") if e.key == "k"]
    assert info.created_at == sets[0].recorded_at
    assert info.updated_at == sets[-1].recorded_at and info.version == sets[-1].version
    assert (info.phase, info.execution_id, info.attempt) == ("touch", run.execution_id, 1)
    assert info.json_type == "object"
    ctx.delete("k")
    ctx.set("k", "again")
    again = ctx.info("k")
    assert again.created_at == again.updated_at  # a new life after the delete
    assert (again.phase, again.json_type) == (None, "string")
    with pytest.raises(ContextKeyError):
        ctx.info("missing")


def test_to_json_and_from_json_round_trip(manager: ContextManager) -> None:
    source = manager.create_context("a")
    source.update({"x": [1, {"y": None}], "ü": 1.5, "flag": True})
    target = manager.create_context("b")
    target.set("stale", 1)
    target.from_json(source.to_json())
    assert target.to_dict() == source.to_dict()
    assert target.to_json() == source.to_json()
    version = target.version
    with pytest.raises(InvalidInputError, match="JSON object"):
        target.from_json(b"[1, 2]")
    with pytest.raises(InvalidInputError, match="JSON object"):
        target.from_json("{not json")
    assert target.version == version


def test_phase_metadata_is_kept_apart_from_context_keys(manager: ContextManager) -> None:
    def tag(_: Any) -> None:
        eventctx.helper().set_metadata("language", "go")
        eventctx.current_context().set("files", 3)

    PluginRunner(manager, [tag]).run("s")
    ctx = manager.get_context("s")
    assert ctx.keys() == ["files"] and "language" not in ctx
    assert set(Inspector(manager.store).blame("s")) == {"files"}
    with pytest.raises(ContextKeyError):
        Inspector(manager.store).key_history("s", "language")


def test_a_rollback_keeps_an_outside_write_made_between_the_attempts_writes(
    manager: ContextManager,
) -> None:
    ctx = manager.create_context("s")
    ctx.set("k", "before")

    def twice(_: Any) -> None:
        phase_ctx = eventctx.current_context()
        phase_ctx.set("k", "attempt, first write")
        writer = threading.Thread(target=lambda: ctx.set("k", "outside"))
        writer.start()
        writer.join()
        phase_ctx.set("k", "attempt, second write")
        raise RuntimeError("boom")

    PluginRunner(manager, [twice]).run("s")
    assert ctx.get("k") == "outside"
    history = Inspector(manager.store).key_history("s", "k")
    assert [(w.value, w.rolled_back) for w in history] == [
        ("before", False),
        ("attempt, first write", False),  # superseded by the outside write, not rolled back
        ("outside", False),
        ("attempt, second write", True),
    ]


def test_the_retry_budget_is_the_runs_across_a_crash(manager: ContextManager) -> None:
    ctx = manager.create_context("s")
    run = uuid.uuid4().hex
    ctx.writer.append(
        [
            runlog.run_started(run, None, ["always"]),
            runlog.phase_started(run, "always", 1),
            runlog.phase_failed(run, "always", 1, ValueError("no"), 1.0, set(), 0.0),
            runlog.phase_started(run, "always", 2),  # then the process died
        ]
    )

    def always(_: Any) -> None:
        raise ValueError("always fails")

    result = PluginRunner(manager, [always], retries=RetryPolicy(attempts=2)).run("s", resume=True)
    statuses = [(a.attempt, a.status) for a in result.attempts["always"]]
    assert statuses == [(1, "failed"), (2, "interrupted"), (3, "failed")]  # no fresh budget
