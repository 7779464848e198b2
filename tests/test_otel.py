"""OpenTelemetry tracing, on SQLite and PostgreSQL: live spans and spans exported from the log
match the log's phase attempts one to one, and nothing is traced (or costs anything) without a
tracer provider or without OpenTelemetry."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import eventctx
from eventctx import ContextManager, EventStore, PluginRunner
from eventctx.otel import RUN_SPAN, RunTrace, export_spans

WORKERS = str(Path(__file__).with_name("workers.py"))
ATTEMPT_EVENTS = {"PhaseStarted", "PhaseCompleted", "PhaseFailed"}


def memory_provider() -> tuple[TracerProvider, InMemorySpanExporter]:
    """A tracer provider of our own (the global one can be set only once per process)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def exported(store: EventStore, session_id: str) -> list[ReadableSpan]:
    provider, exporter = memory_provider()
    export_spans(store, session_id, provider)
    return list(exporter.get_finished_spans())


# --- the phases: one fails once, one always fails ---------------------------------------------


def load(_: Any) -> int:
    eventctx.current_context().update({"a": 1, "b": 2})
    return 1


def flaky(_: Any) -> int:
    ctx = eventctx.current_context()
    ctx.set("c", ctx.get("a", 0) + 1)
    if not eventctx.helper().errors():
        raise ValueError("flaky fails its first attempt")
    return 2


def report(_: Any) -> str:
    ctx = eventctx.current_context()
    ctx.delete("b")
    return f"c={ctx.get('c')}"


def broken(_: Any) -> None:
    eventctx.current_context().set("half", True)
    raise RuntimeError("broken always fails")


def two_runs(manager: ContextManager, provider: TracerProvider | None) -> None:
    """A run that completes after a retry, then a run that fails, on session "s"."""
    first = PluginRunner(manager, [load, flaky, report], retries=1, tracer_provider=provider)
    assert first.run("s").status == "completed"
    second = PluginRunner(manager, [load, broken], tracer_provider=provider)
    assert second.run("s").status == "failed"


# --- what the log says, counted without eventctx.otel -----------------------------------------


def log_attempts(store: EventStore, session_id: str) -> list[dict[str, Any]]:
    """Every phase attempt of the session: its start and end events paired by hand."""
    writes = list(store.find(session_id, types={"KeySet", "KeyDeleted"}))
    started: dict[tuple[str | None, str | None], Any] = {}
    attempts = []
    for e in store.find(session_id, types=ATTEMPT_EVENTS):
        who = (e.execution_id, e.phase)
        if e.type == "PhaseStarted":
            started[who] = e
            continue
        start = started.pop(who)
        attempts.append(
            {
                "name": e.phase,
                "execution_id": e.execution_id,
                "attempt": start.payload["attempt"],
                "status": "OK" if e.type == "PhaseCompleted" else "ERROR",
                "start_ns": start.recorded_at_us * 1000,
                "duration_ms": e.payload["duration_ms"] or 0.0,  # None: interrupted, unknown
                "keys_read": e.payload["keys_read"],
                "keys_written": sorted(
                    {
                        w.key
                        for w in writes
                        if (w.execution_id, w.phase) == who
                        and start.version < w.version < e.version
                    }
                ),
            }
        )
    assert not started, "an attempt without an end"
    return attempts


def span_attempts(spans: list[ReadableSpan]) -> list[dict[str, Any]]:
    """The attempt spans in the same shape (durations from the spans' own times)."""
    found = []
    for s in sorted(spans, key=lambda s: s.start_time or 0):
        if s.name == RUN_SPAN:
            continue
        attributes = dict(s.attributes or {})
        found.append(
            {
                "name": s.name,
                "execution_id": attributes["eventctx.execution_id"],
                "attempt": attributes["eventctx.attempt"],
                "status": s.status.status_code.name,
                "start_ns": s.start_time,
                "duration_ms": ((s.end_time or 0) - (s.start_time or 0)) / 1e6,
                "keys_read": list(attributes["eventctx.keys_read"]),
                "keys_written": list(attributes["eventctx.keys_written"]),
            }
        )
    return found


def assert_match_log(spans: list[ReadableSpan], store: EventStore, session_id: str) -> None:
    """One span per attempt, alike in name, status, attempt, keys and duration (±1 ms), each
    the child of its run's root span; one root per run, timed by the run's events."""
    expected, got = log_attempts(store, session_id), span_attempts(spans)
    assert len(got) == len(expected)
    for mine, theirs in zip(got, expected, strict=True):
        assert abs(mine.pop("duration_ms") - theirs.pop("duration_ms")) <= 1.0
        assert mine == theirs
    roots = {
        dict(s.attributes or {})["eventctx.execution_id"]: s for s in spans if s.parent is None
    }
    runs = list(store.find(session_id, types={"RunStarted", "RunCompleted", "RunFailed"}))
    assert len(roots) == sum(e.type == "RunStarted" for e in runs)
    for e in runs:
        root = roots[e.execution_id]
        assert root.name == RUN_SPAN
        if e.type == "RunStarted":
            assert root.start_time == e.recorded_at_us * 1000
        else:
            assert root.end_time == e.recorded_at_us * 1000
            assert root.status.status_code.name == ("OK" if e.type == "RunCompleted" else "ERROR")
    for s in spans:
        if s.parent is not None:
            root = roots[dict(s.attributes or {})["eventctx.execution_id"]]
            assert s.parent.span_id == root.context.span_id
            assert s.context.trace_id == root.context.trace_id


def shape(spans: list[ReadableSpan]) -> list[tuple[Any, ...]]:
    """Everything about spans but their ids, parents by name."""
    names = {s.context.span_id: s.name for s in spans}
    return sorted(
        (
            s.name,
            None if s.parent is None else names[s.parent.span_id],
            s.start_time,
            s.end_time,
            s.status.status_code.name,
            s.status.description,
            dict(s.attributes or {}),
            [(e.name, e.timestamp, dict(e.attributes or {})) for e in s.events],
        )
        for s in spans
    )


# --- live and exported spans -------------------------------------------------------------------


def test_live_spans_match_the_log(manager: ContextManager) -> None:
    provider, exporter = memory_provider()
    two_runs(manager, provider)
    spans = list(exporter.get_finished_spans())
    assert_match_log(spans, manager.store, "s")
    assert [s.name for s in spans if s.parent is None] == [RUN_SPAN, RUN_SPAN]
    assert len(spans) == 2 + 4 + 2  # two runs; load, flaky twice, report; load, broken
    failed = {s.name: s for s in spans if s.status.status_code.name == "ERROR"}
    assert set(failed) == {"flaky", "broken", RUN_SPAN}
    assert failed["flaky"].status.description == "ValueError: flaky fails its first attempt"
    exception = dict(failed["flaky"].events[0].attributes or {})
    assert failed["flaky"].events[0].name == "exception"
    assert exception["exception.type"] == "ValueError"
    assert "flaky fails its first attempt" in str(exception["exception.stacktrace"])
    assert failed[RUN_SPAN].status.description == "RuntimeError: broken always fails"
    flaky_spans = [dict(s.attributes or {}) for s in spans if s.name == "flaky"]
    assert [a["eventctx.attempt"] for a in flaky_spans] == [1, 2]
    assert [a["eventctx.status"] for a in flaky_spans] == ["failed", "completed"]
    assert flaky_spans[0]["eventctx.keys_read"] == ("a",)
    assert flaky_spans[0]["eventctx.keys_written"] == ("c",)  # then rolled back, in the log
    assert dict(failed["broken"].attributes or {})["eventctx.session_id"] == "s"


def test_exported_spans_match_the_log_and_the_live_ones(manager: ContextManager) -> None:
    provider, exporter = memory_provider()
    two_runs(manager, provider)
    live = list(exporter.get_finished_spans())
    spans = exported(manager.store, "s")
    assert_match_log(spans, manager.store, "s")
    assert shape(spans) == shape(live)
    inspector = eventctx.Inspector(manager.store)  # an Inspector is a source as well
    provider, exporter = memory_provider()
    export_spans(inspector, "s", provider)
    assert shape(list(exporter.get_finished_spans())) == shape(live)


def test_a_resumed_run_traces_the_interrupted_attempt(db_url: str) -> None:
    env = {**os.environ, "EVENTCTX_FAULT": "run.after_phase_started@2"}  # in step_two
    killed = subprocess.run(
        [sys.executable, WORKERS, "crash-runner", db_url, "c"], env=env, timeout=60, check=False
    )
    assert killed.returncode == -signal.SIGKILL
    with ContextManager(db_url, cleanup_interval=None) as manager:
        before = {s.name: s for s in exported(manager.store, "c")}
        assert set(before) == {RUN_SPAN, "step_one", "step_two"}
        for name in (RUN_SPAN, "step_two"):  # no end in the log: still running, for all it says
            assert dict(before[name].attributes or {})["eventctx.status"] == "running"
            assert before[name].status.status_code.name == "UNSET"

        provider, exporter = memory_provider()
        from workers import step_one, step_three, step_two  # noqa: PLC0415

        runner = PluginRunner(manager, [step_one, step_two, step_three], tracer_provider=provider)
        assert runner.run("c", resume=True).status == "completed"
        live = list(exporter.get_finished_spans())
        assert_match_log(live, manager.store, "c")
        assert shape(live) == shape(exported(manager.store, "c"))
    attempts = [(s.name, s.status.status_code.name) for s in sorted(live, key=_start)]
    assert attempts == [
        (RUN_SPAN, "OK"),
        ("step_one", "OK"),  # run by the process that died, read back from the log
        ("step_two", "ERROR"),
        ("step_two", "OK"),
        ("step_three", "OK"),
    ]
    interrupted = sorted(live, key=_start)[2]
    assert dict(interrupted.attributes or {})["eventctx.status"] == "interrupted"
    assert str(interrupted.status.description).startswith(
        "interrupted: the process running this phase stopped"
    )
    root = sorted(live, key=_start)[0]
    assert [e.name for e in root.events] == ["eventctx.resumed"]


def test_tracing_never_fails_a_run(
    manager: ContextManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unreachable(*args: Any, **kwargs: Any) -> Any:
        raise eventctx.StorageError("the database went away")

    provider, exporter = memory_provider()
    monkeypatch.setattr(manager.store, "find", unreachable)  # what tracing reads back
    runner = PluginRunner(manager, [load, flaky, report], retries=1, tracer_provider=provider)
    assert runner.run("s").status == "completed"
    monkeypatch.undo()
    spans = list(exporter.get_finished_spans())
    assert len(spans) == 5
    assert all(dict(s.attributes or {})["eventctx.keys_written"] == () for s in spans[:-1])


def _start(span: ReadableSpan) -> tuple[int, bool]:
    return span.start_time or 0, span.parent is not None


def test_a_phase_s_own_spans_are_children_of_its_attempt(manager: ContextManager) -> None:
    provider, exporter = memory_provider()
    tracer = provider.get_tracer("plugin")

    def sync_phase(_: Any) -> None:
        with tracer.start_as_current_span("inside-sync"):
            pass

    async def async_phase(_: Any) -> None:
        await asyncio.sleep(0)
        with tracer.start_as_current_span("inside-async"):
            pass

    runner = PluginRunner(manager, [sync_phase, async_phase], tracer_provider=provider)
    assert runner.run("s").status == "completed"
    assert asyncio.run(runner.run_async("t")).status == "completed"
    spans = {s.context.span_id: s for s in exporter.get_finished_spans()}
    inner = [s for s in spans.values() if s.name.startswith("inside-")]
    assert len(inner) == 4
    for s in inner:
        assert s.parent is not None
        assert spans[s.parent.span_id].name == s.name.replace("inside-", "") + "_phase"
    assert trace.get_current_span() is trace.INVALID_SPAN  # nothing left current after a run


# --- no provider, no OpenTelemetry ---------------------------------------------------------------


def test_without_a_provider_nothing_is_traced(
    manager: ContextManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)  # none set
    calls: list[str] = []

    def spy(owner: Any, name: str) -> None:
        real = getattr(owner, name)

        def counted(*args: Any, **kwargs: Any) -> Any:
            calls.append(f"{owner.__name__}.{name}")
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)

    for owner, name in [
        (trace.ProxyTracerProvider, "get_tracer"),
        (trace.ProxyTracer, "start_span"),
        (trace.NoOpTracer, "start_span"),
        (RunTrace, "__init__"),
        (RunTrace, "observe"),
    ]:
        spy(owner, name)
    monkeypatch.setattr(otel_context, "attach", _refuse)
    trace.get_tracer("control").start_span("control").end()  # the spies do see OTel calls
    assert calls == [
        "ProxyTracerProvider.get_tracer",
        "ProxyTracer.start_span",
        "NoOpTracer.start_span",
    ]
    calls.clear()

    seen: list[object] = []

    def phase(_: Any) -> None:
        seen.append(trace.get_current_span())

    two_runs(manager, None)
    PluginRunner(manager, [phase]).run("s")
    assert calls == []  # no tracer asked for, no span started, no tracing object made
    assert seen == [trace.INVALID_SPAN]


def _refuse(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("an OpenTelemetry context was attached")


def test_eventctx_works_without_opentelemetry(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    script = f"""
import sys
sys.modules["opentelemetry"] = None  # as if it were not installed
import eventctx, eventctx.otel
assert not eventctx.otel.AVAILABLE
with eventctx.ContextManager({url!r}) as manager:
    assert eventctx.PluginRunner(manager, [lambda _: 1]).run("s").status == "completed"
    try:
        eventctx.otel.export_spans(manager.store, "s", None)
    except eventctx.EventCtxError as exc:
        print(exc)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "OpenTelemetry is not installed: pip install eventctx[otel]\n"
