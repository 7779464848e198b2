"""OpenTelemetry tracing of runs: live while a runner runs, or exported from the log afterwards.

A run is a trace: a root span ``eventctx.run`` with a child span per phase attempt, named after
the phase. One fold over the run's events builds both kinds, with the times the log recorded,
so a run traced live and the same run exported agree. OpenTelemetry is optional
(``pip install eventctx[otel]``): without it, or without a tracer provider, a runner traces
nothing and does no work for it per phase.
"""

from __future__ import annotations

import logging
import traceback
from contextlib import AbstractContextManager, nullcontext
from contextvars import Token
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, NamedTuple

from eventctx.errors import EventCtxError
from eventctx.events import RUN_EVENTS, RecordedEvent, from_us
from eventctx.inspect import Inspector
from eventctx.store import EventStore

try:
    from opentelemetry import context as otel_context
    from opentelemetry import trace
except ImportError:  # the otel extra is not installed: nothing is traced
    AVAILABLE = False
else:
    AVAILABLE = True

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.trace import Span, Tracer, TracerProvider

__all__ = [
    "AVAILABLE",
    "RUN_SPAN",
    "RunTrace",
    "export_spans",
    "recorded_spans",
    "send_otlp",
    "span_document",
    "traced_run",
]

RUN_SPAN: Final = "eventctx.run"
"""The name of a run's root span (an attempt's span is named after its phase)."""
_INSTALL: Final = "OpenTelemetry is not installed: pip install eventctx[otel]"
_TRACED: Final = RUN_EVENTS | {"KeySet", "KeyDeleted"}
_OFF: Final = nullcontext(None)


class _Outcome(NamedTuple):
    """How a span's run or attempt ended, as the log says."""

    status: str  # "completed" | "failed" | "interrupted" | "running" (no end recorded)
    error_type: str | None = None
    message: str | None = None
    traceback: str = ""


@dataclass(slots=True)
class _Attempt:
    """A phase attempt whose span is open."""

    span: Span
    start_ns: int
    token: Token[Context] | None
    """While the attempt runs in this process and its span is current: what restores the
    context from before."""
    keys_written: set[str] = field(default_factory=set)


@dataclass(slots=True)
class _Run:
    """A run whose root span is open."""

    span: Span
    last_us: int
    """When its last event was recorded: where it ends if the log holds no end."""
    attempts: dict[str, _Attempt] = field(default_factory=dict)


class _Spans:
    """Folds a session's run events, in version order, into spans: a trace per run and a
    child span per phase attempt. Live tracing and export both use it, so they agree."""

    def __init__(self, tracer: Tracer, session_id: str, parent: Context | None) -> None:
        """Runs' root spans are children of ``parent`` (None: the current span, if any)."""
        self._tracer = tracer
        self._session_id = session_id
        self._parent = parent
        self._runs: dict[str, _Run] = {}

    def feed(self, event: RecordedEvent, *, current: bool = False) -> None:
        """Fold ``event``; with ``current``, an attempt it starts runs now, in this thread: its
        span becomes the current one, so the phase's own spans are its children."""
        execution_id, at = event.execution_id or "", event.recorded_at_us
        if event.type == "RunStarted":
            span = self._tracer.start_span(
                RUN_SPAN, self._parent, start_time=at * 1000, attributes=self._ids(execution_id)
            )
            self._runs[execution_id] = _Run(span, at)
            return
        run = self._runs.get(execution_id)
        if run is None:
            return  # not a run's event, or its run's start was removed by retention
        run.last_us = at
        kind, phase = event.type, event.phase or ""
        if kind == "PhaseStarted":
            attributes = {**self._ids(execution_id), "eventctx.attempt": event.payload["attempt"]}
            span = self._tracer.start_span(
                phase,
                trace.set_span_in_context(run.span),
                start_time=at * 1000,
                attributes=attributes,
            )
            token = otel_context.attach(trace.set_span_in_context(span)) if current else None
            run.attempts[phase] = _Attempt(span, at * 1000, token)
        elif kind in ("KeySet", "KeyDeleted"):
            if phase in run.attempts:
                run.attempts[phase].keys_written.add(event.key or "")
        elif kind in ("PhaseCompleted", "PhaseFailed"):
            attempt = run.attempts.pop(phase, None)
            if attempt is not None:
                # The phase's own time, as measured; its events' commits are outside it.
                duration_ns = round((event.payload["duration_ms"] or 0) * 1e6)
                attempt.span.set_attribute("eventctx.keys_read", event.payload["keys_read"])
                _end_attempt(attempt, _outcome(event), attempt.start_ns + duration_ns)
        elif kind == "RunResumed":
            run.span.add_event("eventctx.resumed", timestamp=at * 1000)
        else:  # RunCompleted, RunFailed
            del self._runs[execution_id]
            _finish(run.span, _outcome(event), at * 1000)

    def close(self, error: BaseException | None = None) -> None:
        """End the spans of runs with no end in the log (still going, or their process
        stopped) at their last recorded event, status "running"; ``error`` is why this
        process stopped tracing them."""
        outcome = _Outcome("running")
        if error is not None:
            text = "".join(traceback.format_exception(error))
            outcome = _Outcome("running", type(error).__qualname__, str(error), text)
        for run in self._runs.values():
            end_ns = run.last_us * 1000
            for attempt in run.attempts.values():
                _end_attempt(attempt, outcome, end_ns)
            _finish(run.span, outcome, end_ns)
        self._runs.clear()

    def _ids(self, execution_id: str) -> dict[str, str]:
        return {"eventctx.session_id": self._session_id, "eventctx.execution_id": execution_id}


def _outcome(event: RecordedEvent) -> _Outcome:
    """How the run or attempt that ``event`` ends ended."""
    if event.type in ("PhaseCompleted", "RunCompleted"):
        return _Outcome("completed")
    payload = event.payload
    error_type = payload["error_type"]
    status = "interrupted" if error_type == "interrupted" else "failed"
    return _Outcome(status, error_type, payload["message"], payload.get("traceback", ""))


def _end_attempt(attempt: _Attempt, outcome: _Outcome, end_ns: int) -> None:
    """End an attempt's span (no longer current, if it was)."""
    if attempt.token is not None:
        otel_context.detach(attempt.token)
    attempt.span.set_attribute("eventctx.keys_written", sorted(attempt.keys_written))
    _finish(attempt.span, outcome, end_ns)


def _finish(span: Span, outcome: _Outcome, end_ns: int) -> None:
    """Set a span's status from ``outcome`` and end it at ``end_ns``: OK when completed; ERROR
    with a description when it failed or was interrupted, a failure's exception recorded."""
    span.set_attribute("eventctx.status", outcome.status)
    if outcome.status == "completed":
        span.set_status(trace.Status(trace.StatusCode.OK))
    elif outcome.error_type is not None:
        description = f"{outcome.error_type}: {outcome.message}"
        span.set_status(trace.Status(trace.StatusCode.ERROR, description))
        if outcome.status != "interrupted":  # an interrupted attempt raised nothing
            exception = {"exception.type": outcome.error_type, "exception.message": outcome.message}
            if outcome.traceback:
                exception["exception.stacktrace"] = outcome.traceback
            span.add_event("exception", exception, timestamp=end_ns)
    span.end(end_time=end_ns)


class RunTrace:
    """Traces one run live. The runner hands it each event the run appends; the phases' own
    writes between them (and, when the run is resumed, the run so far) are read back from
    the log, so the spans are those an export of the run makes."""

    def __init__(self, tracer: Tracer, store: EventStore, session_id: str) -> None:
        self._spans = _Spans(tracer, session_id, None)
        self._store = store
        self._session_id = session_id
        self._seen: int | None = None

    def observe(self, recorded: list[RecordedEvent]) -> None:
        """Fold events the run just appended, after those of the run it did not append."""
        for event in recorded:
            if event.execution_id is None:
                continue  # a fresh run's clear, before the run starts
            first = 1 if self._seen is None else self._seen + 1
            if event.type != "RunStarted" and event.version > first:
                for earlier in self._read(event.execution_id, first, event.version - 1):
                    self._spans.feed(earlier)
            self._spans.feed(event, current=True)
            self._seen = event.version

    def _read(self, execution_id: str, first: int, last: int) -> list[RecordedEvent]:
        """The run's traced events from version ``first`` to ``last``; none if the database
        fails (tracing never fails a run: its spans then lack what those events say)."""
        try:
            return list(
                self._store.find(
                    self._session_id,
                    types=_TRACED,
                    execution_id=execution_id,
                    from_version=first,
                    to_version=last,
                )
            )
        except EventCtxError:
            return []

    def __enter__(self) -> RunTrace:
        return self

    def __exit__(self, kind: object, error: BaseException | None, tb: object) -> None:
        self._spans.close(error)


def traced_run(
    tracer_provider: TracerProvider | None, store: EventStore, session_id: str
) -> AbstractContextManager[RunTrace | None]:
    """A RunTrace for a run of ``session_id`` when OpenTelemetry is installed and a tracer
    provider is given or set globally; else a context that yields None and does nothing."""
    if not AVAILABLE:
        return _OFF
    if tracer_provider is None:
        tracer_provider = trace.get_tracer_provider()
        if isinstance(tracer_provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
            return _OFF  # none was set
    return RunTrace(tracer_provider.get_tracer("eventctx"), store, session_id)


def export_spans(
    source: EventStore | Inspector, session_id: str, tracer_provider: TracerProvider
) -> None:
    """Emit every run of ``session_id`` in the log to ``tracer_provider``: a trace each, with
    the spans live tracing makes (recorded times, statuses, attributes). A run without an end
    in the log (still going, or its process stopped and it was not resumed) ends at its last
    recorded event with status "running". SessionNotFoundError for an unknown session."""
    if not AVAILABLE:
        raise EventCtxError(_INSTALL)
    inspector = source if isinstance(source, Inspector) else Inspector(source)
    spans = _Spans(tracer_provider.get_tracer("eventctx"), session_id, otel_context.Context())
    for event in inspector.history(session_id, types=_TRACED):
        spans.feed(event)
    spans.close()


def recorded_spans(source: EventStore | Inspector, session_id: str) -> list[ReadableSpan]:
    """The spans ``export_spans`` emits for ``session_id``, collected in memory (this needs
    opentelemetry-sdk), in order of start."""
    try:  # the SDK only here: tracing live needs the API alone
        from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: PLC0415
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: PLC0415
            InMemorySpanExporter,
        )
    except ImportError:
        raise EventCtxError(_INSTALL) from None
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    export_spans(source, session_id, provider)
    return sorted(exporter.get_finished_spans(), key=lambda s: (s.start_time, s.parent is not None))


def span_document(span: ReadableSpan) -> dict[str, Any]:
    """A span as JSON: ids in hex, times as ISO 8601 and as ns since the epoch."""
    context, parent = span.context, span.parent
    start, end = span.start_time or 0, span.end_time or 0
    return {
        "trace_id": None if context is None else trace.format_trace_id(context.trace_id),
        "span_id": None if context is None else trace.format_span_id(context.span_id),
        "parent_span_id": None if parent is None else trace.format_span_id(parent.span_id),
        "name": span.name,
        "start": _iso(start),
        "end": _iso(end),
        "start_ns": start,
        "end_ns": end,
        "status": span.status.status_code.name,
        "status_description": span.status.description,
        "attributes": dict(span.attributes or {}),
        "events": [
            {"name": e.name, "time": _iso(e.timestamp), "attributes": dict(e.attributes or {})}
            for e in span.events
        ],
    }


def _iso(ns: int) -> str:
    return from_us(ns // 1000).isoformat(timespec="microseconds")


def send_otlp(spans: list[ReadableSpan], endpoint: str) -> None:
    """Send ``spans`` to the OTLP/HTTP traces endpoint ``endpoint`` (the full URL, e.g.
    ``http://localhost:4318/v1/traces``); EventCtxError if they were not accepted."""
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # noqa: PLC0415
            OTLPSpanExporter,
        )
        from opentelemetry.sdk.trace.export import SpanExportResult  # noqa: PLC0415
    except ImportError:
        raise EventCtxError(
            "exporting over OTLP needs its exporter: "
            "pip install opentelemetry-exporter-otlp-proto-http"
        ) from None
    exporter = OTLPSpanExporter(endpoint=endpoint)
    # The exporter says why an export failed only in its log: keep the first complaint.
    logger = logging.getLogger(OTLPSpanExporter.__module__)
    complaints = _Complaints()
    logger.addHandler(complaints)
    propagate, logger.propagate = logger.propagate, False
    try:
        result = exporter.export(spans)
    finally:
        logger.propagate = propagate
        logger.removeHandler(complaints)
        exporter.shutdown()  # type: ignore[no-untyped-call]
    if result is not SpanExportResult.SUCCESS:
        said = f"; the exporter said first: {complaints.first}" if complaints.first else ""
        raise EventCtxError(f"could not export {len(spans)} spans to {endpoint}{said}")


class _Complaints(logging.Handler):
    """Keeps the first message logged to it."""

    def __init__(self) -> None:
        super().__init__()
        self.first: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.first is None:
            self.first = record.getMessage()
