"""PluginRunner and phases, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import workers

import eventctx
from eventctx import (
    ContextAwarePhase,
    ContextManager,
    EventCtxError,
    PluginRunner,
    RecordedEvent,
    RetryPolicy,
    RunInProgressError,
    RunResult,
    SerializationError,
)
from eventctx.store import Fence

WORKERS = str(Path(__file__).with_name("workers.py"))


def log(manager: ContextManager, session_id: str) -> list[RecordedEvent]:
    return list(manager.store.read(session_id))


def phase_events(manager: ContextManager, session_id: str, phase: str) -> list[str]:
    return [
        e.type for e in log(manager, session_id) if e.phase == phase and e.type.startswith("Phase")
    ]


def test_phase_writes_carry_phase_and_execution(manager: ContextManager) -> None:
    def analysis(inp: dict[str, Any]) -> dict[str, Any]:
        eventctx.current_context().set("lang", inp["lang"])
        return {"files": 3}

    def planning(inp: dict[str, Any]) -> str:
        h = eventctx.helper()
        assert h.phase == "planning" and h.previous_output() == {"files": 3}
        h.context.set("plan", ["a"])
        return "planned"

    ctx = manager.create_context("s")
    ctx.set("outside", 1)
    result = PluginRunner(manager, [analysis, planning]).run("s", input={"lang": "go"})
    assert result.status == "completed" and result.error is None
    assert result.outputs == {"analysis": {"files": 3}, "planning": "planned"}
    assert set(result.durations_ms) == {"analysis", "planning"}
    events = {e.key: e for e in log(manager, "s") if e.type == "KeySet"}
    assert (events["outside"].phase, events["outside"].execution_id) == (None, None)
    assert (events["lang"].phase, events["lang"].execution_id) == ("analysis", result.execution_id)
    assert (events["plan"].phase, events["plan"].execution_id) == ("planning", result.execution_id)
    types = [e.type for e in log(manager, "s")]
    assert types[2] == "RunStarted" and types[-1] == "RunCompleted"
    assert ctx.get("plan") == ["a"]  # the manager's context object saw the phase's writes


def test_keys_read_are_in_the_end_event(manager: ContextManager) -> None:
    manager.create_context("s").update({"a": 1, "b": 2})

    def reader(_: Any) -> int:
        ctx = eventctx.current_context()
        return int(ctx.get_int("a") + ctx["b"] + ctx.get("missing", 0))

    def failing_reader(_: Any) -> None:
        eventctx.current_context().get("a")
        raise RuntimeError("boom")

    PluginRunner(manager, [reader, failing_reader]).run("s")
    ends = {e.phase: e for e in log(manager, "s") if e.type in ("PhaseCompleted", "PhaseFailed")}
    assert ends["reader"].payload["keys_read"] == ["a", "b", "missing"]
    assert ends["reader"].payload["output"] == 3
    assert ends["failing_reader"].payload["keys_read"] == ["a"]
    assert [e.type for e in log(manager, "s")] == [  # reads append nothing of their own
        "ContextCreated",
        "KeySet",
        "KeySet",
        "RunStarted",
        "PhaseStarted",
        "PhaseCompleted",
        "PhaseStarted",
        "PhaseFailed",
        "RunFailed",
    ]


def test_one_phase_failed_per_attempt(manager: ContextManager) -> None:
    calls: list[int] = []

    def flaky(_: Any) -> None:
        calls.append(1)
        raise ValueError(f"attempt {len(calls)} failed")

    def never(_: Any) -> None:
        raise AssertionError("not reached")

    result = PluginRunner(manager, [flaky, never], retries=2).run("s")
    assert result.status == "failed" and isinstance(result.error, ValueError)
    assert str(result.error) == "attempt 3 failed"
    failed = [e for e in log(manager, "s") if e.type == "PhaseFailed"]
    assert [(e.phase, e.payload["attempt"]) for e in failed] == [
        ("flaky", 1),
        ("flaky", 2),
        ("flaky", 3),
    ]
    assert failed[0].payload["error_type"] == "ValueError"
    assert "attempt 1 failed" in failed[0].payload["traceback"]
    assert phase_events(manager, "s", "never") == []
    run_failed = [e for e in log(manager, "s") if e.type == "RunFailed"]
    assert len(run_failed) == 1 and run_failed[0].payload["phase"] == "flaky"


def test_retry_that_succeeds_completes_the_run(manager: ContextManager) -> None:
    calls: list[int] = []

    def flaky(_: Any) -> str:
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionError("transient")
        return "ok"

    policy = RetryPolicy(attempts=3, backoff=0.01, retry_on=(ConnectionError,))
    result = PluginRunner(manager, [ContextAwarePhase(flaky, retry=policy)]).run("s")
    assert result.status == "completed" and result.outputs == {"flaky": "ok"}
    assert phase_events(manager, "s", "flaky") == [
        "PhaseStarted",
        "PhaseFailed",
        "PhaseStarted",
        "PhaseCompleted",
    ]


def test_non_retryable_errors_are_not_retried(manager: ContextManager) -> None:
    def broken(_: Any) -> None:
        raise KeyError("config")

    policy = RetryPolicy(attempts=5, retry_on=(ConnectionError,))
    result = PluginRunner(manager, [broken], retries=policy).run("s")
    assert isinstance(result.error, KeyError)
    assert phase_events(manager, "s", "broken") == ["PhaseStarted", "PhaseFailed"]


def test_output_that_is_not_json_fails_the_phase(manager: ContextManager) -> None:
    def returns_a_set(_: Any) -> set[int]:
        return {1, 2}

    result = PluginRunner(manager, [returns_a_set]).run("s")
    assert result.status == "failed" and isinstance(result.error, SerializationError)
    assert phase_events(manager, "s", "returns_a_set") == ["PhaseStarted", "PhaseFailed"]


class Report:
    """A phase object with .name and an async .execute."""

    name = "report"

    async def execute(self, inp: Any) -> str:
        await asyncio.sleep(0.02)
        eventctx.current_context().set("report", "done")
        return f"report for {inp['repo']}"


async def summarize(inp: Any) -> str:
    await asyncio.sleep(0.001)
    assert eventctx.helper().phase == "summarize"  # its own scope, not the first phase's
    return str(eventctx.helper().get_output("report"))


def test_async_phases_under_run_and_run_async(manager: ContextManager) -> None:
    runner = PluginRunner(manager, [Report(), summarize])
    result = runner.run("sync", input={"repo": "x"})
    assert result.outputs == {"report": "report for x", "summarize": "report for x"}
    assert result.durations_ms["report"] >= 20
    result = asyncio.run(runner.run_async("async", input={"repo": "y"}))
    assert result.outputs["summarize"] == "report for y"
    assert manager.get_context("async").get("report") == "done"

    async def inside_a_loop() -> None:
        with pytest.raises(EventCtxError, match="run_async"):
            runner.run("z")

    asyncio.run(inside_a_loop())


def test_concurrent_run_raises_run_in_progress(manager: ContextManager) -> None:
    entered, release = threading.Event(), threading.Event()

    def slow(_: Any) -> None:
        entered.set()
        release.wait(30)

    runner = PluginRunner(manager, [slow])
    first: list[eventctx.RunResult] = []
    thread = threading.Thread(target=lambda: first.append(runner.run("s")))
    thread.start()
    assert entered.wait(30)
    with pytest.raises(RunInProgressError, match="is being run by"):
        PluginRunner(manager, [slow]).run("s")
    release.set()
    thread.join()
    assert first[0].status == "completed"
    assert PluginRunner(manager, [lambda _: None], retries=0).run("s").status == "completed"


def test_lease_of_a_crashed_remote_runner_expires(manager: ContextManager) -> None:
    manager.create_context("s")
    ghost = "another-host:4242:abc"
    assert manager.store.take_lease("s", ghost, timedelta(milliseconds=300)) == Fence(ghost, 1)
    runner = PluginRunner(manager, [workers.analysis])
    with pytest.raises(RunInProgressError, match="another-host"):
        runner.run("s", input={})
    time.sleep(0.4)
    assert runner.run("s", input={}).status == "completed"


def test_helper_outside_a_phase_raises() -> None:
    with pytest.raises(EventCtxError, match="inside a phase"):
        eventctx.helper()


def test_metadata_and_outputs_are_shared_within_a_run(manager: ContextManager) -> None:
    result = PluginRunner(manager, [workers.analysis, workers.planning]).run("s", input={"r": 1})
    assert result.outputs["planning"] == {"steps": 2, "language": "go", "files": 3}
    ctx = manager.get_context("s")
    assert ctx.get("planned-from") == {"files": 3, "input": {"r": 1}}
    meta = [e for e in log(manager, "s") if e.type == "MetadataSet"]
    assert [(m.key, m.phase, m.payload) for m in meta] == [("files", "analysis", {"value": 3})]


def test_resume_without_an_open_run_starts_a_new_one(manager: ContextManager) -> None:
    runner = PluginRunner(manager, [workers.analysis])
    first = runner.run("new-session", input={"a": 1}, resume=True)  # creates the session
    second = runner.run("new-session", input={"a": 2}, resume=True)
    assert first.status == second.status == "completed"
    assert first.execution_id != second.execution_id
    assert second.outputs["analysis"]["input"] == {"a": 2}


def test_sigkill_in_phase_two_then_resume(manager: ContextManager, db_url: str) -> None:
    env = {**os.environ, "EVENTCTX_TEST_HANG": "1"}
    child = subprocess.Popen(
        [sys.executable, WORKERS, "run-plugin", db_url, "crash"],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert child.stdout is not None and child.stdout.readline().strip() == "hanging"
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=30)

    committed = manager.get_context("crash").to_dict()
    assert committed == {
        "language": "go",
        "planned-from": {"files": 3, "input": {"repo": "x"}},
    }  # every write the child made before it died
    result = PluginRunner(manager, [workers.analysis, workers.planning]).run("crash", resume=True)
    assert result.status == "completed"
    assert result.outputs["analysis"] == {"files": 3, "input": {"repo": "x"}}  # stored, fed on
    assert result.outputs["planning"] == {"steps": 2, "language": "go", "files": 3}
    assert phase_events(manager, "crash", "analysis") == ["PhaseStarted", "PhaseCompleted"]
    assert phase_events(manager, "crash", "planning") == [
        "PhaseStarted",
        "PhaseFailed",
        "PhaseStarted",
        "PhaseCompleted",
    ]
    interrupted = next(e for e in log(manager, "crash") if e.type == "PhaseFailed")
    assert interrupted.payload["error_type"] == "interrupted"
    assert interrupted.payload["lower_bound"] and interrupted.payload["duration_ms"] > 0
    runs = {e.execution_id for e in log(manager, "crash") if e.execution_id}
    assert runs == {result.execution_id}  # the same run, continued
    completed = next(e for e in log(manager, "crash") if e.type == "RunCompleted").payload
    assert len(completed["segments_ms"]) == 2  # the killed process, then this one
    assert completed["duration_ms"] >= sum(completed["segments_ms"])
    assert result.duration_ms == completed["duration_ms"]
    assert manager.get_context("crash").get("plan") == ["lint", "test"]
    assert manager.store.verify("crash") == len(log(manager, "crash"))


def test_a_runner_that_lost_its_lease_writes_nothing_more(
    manager: ContextManager, db_url: str
) -> None:
    """Runner A is paused (SIGSTOP) past its lease; B takes the session over and completes
    the run; A, continued, must not write into it and must stop with RunInProgressError."""
    manager.create_context("s")
    child = subprocess.Popen(
        [sys.executable, WORKERS, "run-contested", db_url, "s"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "in-phase"
        os.kill(child.pid, signal.SIGSTOP)
        time.sleep(1.5)  # A's lease (1 s) runs out while it is stopped

        def contested(_: Any) -> str:
            eventctx.current_context().set("winner", "resuming runner")
            return "resuming runner"

        resumed = PluginRunner(manager, [contested]).run("s", resume=True)
        assert resumed.status == "completed"
    finally:
        os.kill(child.pid, signal.SIGCONT)
    out, _ = child.communicate(timeout=30)
    assert out.startswith("RunInProgressError"), out
    events = log(manager, "s")
    assert [e.type for e in events].count("RunCompleted") == 1
    assert events[-1].type == "RunCompleted"  # nothing after the resumed run's end
    assert [e.type for e in events].count("PhaseCompleted") == 1
    ctx = manager.get_context("s")
    ctx.refresh()
    assert ctx.get("winner") == "resuming runner"


def test_a_lease_taken_over_fences_every_write(manager: ContextManager) -> None:
    """The fence is checked by the statement that moves the head: a write carrying a lease
    that was taken over is refused, and nothing is appended."""
    ctx = manager.create_context("s")
    store = manager.store
    first = store.take_lease("s", "a", timedelta(milliseconds=1))
    assert first == Fence("a", 1)
    time.sleep(0.01)
    assert store.take_lease("s", "b", timedelta(seconds=30)) == Fence("b", 2)
    assert not store.renew_lease("s", first, timedelta(seconds=30))
    with pytest.raises(RunInProgressError, match="taken over"):
        ctx.writer.append([eventctx.NewEvent.create("KeySet", {"value": 1}, key="k")], fence=first)
    assert ctx.version == 1 and "k" not in ctx
    ctx.writer.append(
        [eventctx.NewEvent.create("KeySet", {"value": 2}, key="k")], fence=Fence("b", 2)
    )
    assert ctx.get("k") == 2
    ctx.set("outside", 1)  # writes outside a run are not fenced
    assert ctx.version == 3


def test_sync_phases_run_in_the_callers_thread(manager: ContextManager) -> None:
    """A sync phase may use asyncio.run (no event loop is running around it)."""
    caller = threading.get_ident()

    def uses_asyncio(_: Any) -> int:
        assert threading.get_ident() == caller
        return asyncio.run(asyncio.sleep(0, result=7))

    assert PluginRunner(manager, [uses_asyncio]).run("s").outputs == {"uses_asyncio": 7}


def test_run_async_never_blocks_its_event_loop(manager: ContextManager) -> None:
    """While a sync phase and the run's database calls work, the caller's loop keeps ticking;
    async phases run on the caller's loop, with the context current."""
    seen: dict[str, Any] = {}

    def blocking(_: Any) -> None:
        time.sleep(0.3)
        eventctx.current_context().set("blocking", True)

    async def on_the_loop(_: Any) -> None:
        seen["loop"] = asyncio.get_running_loop()
        eventctx.current_context().set("async", eventctx.helper().phase)

    async def main() -> tuple[RunResult, int]:
        seen["caller"] = asyncio.get_running_loop()
        ticks = 0
        task = asyncio.create_task(PluginRunner(manager, [blocking, on_the_loop]).run_async("s"))
        while not task.done():
            await asyncio.sleep(0.01)
            ticks += 1
        return task.result(), ticks

    result, ticks = asyncio.run(main())
    assert result.status == "completed", result.error
    assert ticks >= 15  # ~30 ticks in 0.3 s when the loop is free; 0 or 1 when blocked
    assert seen["loop"] is seen["caller"]
    assert manager.get_context("s").to_dict() == {"blocking": True, "async": "on_the_loop"}
