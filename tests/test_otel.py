"""OpenTelemetry tracing, on SQLite and PostgreSQL: live spans and spans exported from the log
match the log's phase attempts one to one, the CLI prints or sends them, and nothing is traced
(or costs anything) without a tracer provider or without OpenTelemetry."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import datetime
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any, ClassVar

import orjson
import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import eventctx
from eventctx import ContextManager, EventStore, PluginRunner
from eventctx.events import from_us
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
from eventctx.cli import main
assert not eventctx.otel.AVAILABLE
with eventctx.ContextManager({url!r}) as manager:
    assert eventctx.PluginRunner(manager, [lambda _: 1]).run("s").status == "completed"
    try:
        eventctx.otel.export_spans(manager.store, "s", None)
    except eventctx.EventCtxError as exc:
        print(exc)
sys.exit(main(["--url", {url!r}, "otel", "s"]))
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 1, done.stderr
    install = "OpenTelemetry is not installed: pip install eventctx[otel]"
    assert done.stdout == f"{install}\n"
    assert done.stderr == f"eventctx: {install}\n"


# --- the command line ----------------------------------------------------------------------------


def otel_cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "EVENTCTX_URL"}
    env["OTEL_EXPORTER_OTLP_TRACES_TIMEOUT"] = "1"  # an unreachable endpoint fails in a second
    return subprocess.run(
        [sys.executable, "-m", "eventctx", "--url", url, "otel", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def test_cli_prints_a_span_per_attempt_and_per_run(manager: ContextManager, db_url: str) -> None:
    two_runs(manager, None)
    done = otel_cli(db_url, "s")
    assert done.returncode == 0, done.stderr
    spans = orjson.loads(done.stdout)
    attempts = len(list(manager.store.find("s", types={"PhaseStarted"})))
    runs = len(list(manager.store.find("s", types={"RunStarted"})))
    assert (attempts, runs) == (6, 2)
    assert len(spans) == attempts + runs
    roots = {s["span_id"]: s for s in spans if s["parent_span_id"] is None}
    assert [s["name"] for s in roots.values()] == [RUN_SPAN, RUN_SPAN]
    for s in spans:
        if s["parent_span_id"] is not None:
            assert roots[s["parent_span_id"]]["trace_id"] == s["trace_id"]
        assert s["start_ns"] <= s["end_ns"]
        assert datetime.fromisoformat(s["start"]) == from_us(s["start_ns"] // 1000)
    assert [s["status"] for s in spans if s["name"] == "flaky"] == ["ERROR", "OK"]
    assert spans[0]["attributes"]["eventctx.session_id"] == "s"


def test_cli_unknown_session_is_one_line(manager: ContextManager, db_url: str) -> None:
    done = otel_cli(db_url, "nope")
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith("eventctx: session 'nope' does not exist")
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


class _Collector(BaseHTTPRequestHandler):
    """An OTLP/HTTP endpoint that keeps what it is sent."""

    bodies: ClassVar[list[bytes]] = []

    def do_POST(self) -> None:
        self.bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def collector() -> Iterator[str]:
    server = HTTPServer(("127.0.0.1", 0), _Collector)
    _Collector.bodies = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1/traces"
    server.shutdown()
    server.server_close()


def test_cli_sends_spans_over_otlp(tmp_path: Path, collector: str) -> None:
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http")
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (  # noqa: PLC0415
        ExportTraceServiceRequest,
    )

    url = f"sqlite:///{tmp_path / 'x.db'}"
    with ContextManager(url) as manager:
        two_runs(manager, None)
    done = otel_cli(url, "s", "--endpoint", collector)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"sent 8 spans to {collector}\n"
    request = ExportTraceServiceRequest()
    request.ParseFromString(b"".join(_Collector.bodies))
    names = [s.name for r in request.resource_spans for ss in r.scope_spans for s in ss.spans]
    expected = [RUN_SPAN, "load", "flaky", "flaky", "report", RUN_SPAN, "load", "broken"]
    assert sorted(names) == sorted(expected)

    unreachable = collector.rsplit(":", 1)[0] + ":9/v1/traces"
    done = otel_cli(url, "s", "--endpoint", unreachable)
    assert done.returncode == 1
    assert done.stderr.startswith(f"eventctx: could not export 8 spans to {unreachable}")
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
