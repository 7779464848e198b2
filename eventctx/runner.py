"""PluginRunner: runs phases over a session, records the run, retries, and resumes a run whose
process died.

The runner is synchronous: phases run in the caller's thread (an async phase on a loop of its
own). ``run_async`` is a thin surface over it: the run goes to a worker thread, so database
calls never block the caller's event loop, and async phases are run on that loop.

A run holds the session's run lease (on its head row) for its whole length, renewed by a
heartbeat; a second runner on the same session gets RunInProgressError. A lease whose holder
died is taken over at once when the holder was on this host, else when it expires. Every write
of the run is fenced with the lease, so a runner that lost it (paused past its expiry, and
taken over) writes nothing more and stops with RunInProgressError.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from eventctx import otel, runlog
from eventctx.clock import check_duration
from eventctx.context import PluginContext, SessionWriter
from eventctx.errors import EventCtxError, RunInProgressError
from eventctx.manager import ContextManager
from eventctx.owners import abandon, dead_here, new_owner
from eventctx.phases import (
    AttemptResult,
    ContextAwarePhase,
    RetryPolicy,
    attempt_results,
    wrap_phases_with_context,
)
from eventctx.state import RunState
from eventctx.store import EventStore, Fence, LeaseHolder

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider

__all__ = ["PluginRunner", "RunResult"]

RunCoroutine = Callable[[Coroutine[Any, Any, Any]], Any]


@dataclass(slots=True)
class RunResult:
    """How a run ended. ``error`` is the exception that failed it (nothing is swallowed).

    ``outputs`` and ``durations_ms`` hold the completed phases (the duration of the attempt
    that completed). ``attempts`` lists every attempt of every phase that started, failed
    ones included, and ``wall_ms`` each phase's time from its first attempt's start to its
    last attempt's end, back-off included. ``duration_ms`` spans the run from its first start,
    across the processes that worked on it (``segments_ms``: the time in each).
    """

    session_id: str
    execution_id: str
    status: str  # "completed" | "failed"
    outputs: dict[str, Any] = field(default_factory=dict)
    durations_ms: dict[str, float] = field(default_factory=dict)
    error: BaseException | None = None
    attempts: dict[str, list[AttemptResult]] = field(default_factory=dict)
    wall_ms: dict[str, float] = field(default_factory=dict)
    duration_ms: float = 0.0
    segments_ms: list[float] = field(default_factory=list)


class _Lease:
    """The session's run lease, held by this runner and renewed by a heartbeat thread."""

    def __init__(self, store: EventStore, session_id: str, ttl: timedelta) -> None:
        self._store, self._session_id, self._ttl = store, session_id, ttl
        self.owner = new_owner()
        self.fence: Fence | None = None
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="eventctx-lease", daemon=True)

    def __enter__(self) -> _Lease:
        taken = self._store.take_lease(self._session_id, self.owner, self._ttl)
        if isinstance(taken, LeaseHolder) and dead_here(taken.owner):
            taken = self._store.take_lease(
                self._session_id, self.owner, self._ttl, previous=taken.owner
            )
        if isinstance(taken, LeaseHolder):
            raise RunInProgressError(
                f"session {self._session_id!r} is being run by {taken.owner} "
                f"(lease until {taken.expires_at:%Y-%m-%d %H:%M:%S} UTC); wait for it to finish"
            )
        self.fence = taken
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        if self.fence is not None and self._lost is None:
            try:
                self._store.release_lease(self._session_id, self.fence)
            except EventCtxError:  # expires by itself; this process may take it over at once
                abandon(self.owner)

    def check(self, *, ask: bool = False) -> None:
        """Raise RunInProgressError if the lease is known to be lost (with ``ask``, after
        asking the store whether it still holds)."""
        if ask and self._lost is None and not self._renew():
            self._lost = "it was taken over while this runner was not renewing it"
        if self._lost is not None:
            raise RunInProgressError(
                f"this runner lost the run lease of session {self._session_id!r} "
                f"({self._lost}); it stopped and wrote nothing more"
            )

    def _renew(self) -> bool:
        assert self.fence is not None
        try:
            return self._store.renew_lease(self._session_id, self.fence, self._ttl)
        except EventCtxError:
            return True  # the database is unreachable: the fence still guards every write

    def _beat(self) -> None:
        while not self._stop.wait(self._ttl.total_seconds() / 3):
            # A failed beat (the database unreachable) is tried again on the next one; a beat
            # that finds the lease gone ends the heartbeat: the run stops at its next step.
            if not self._renew():
                self._lost = "another runner took it over"
                return


class _Retry:
    """Decides, when attempt ``tried`` (of the run) fails, whether another follows and after
    how long."""

    __slots__ = ("after", "policy", "tried")

    def __init__(self, policy: RetryPolicy, tried: int) -> None:
        self.policy, self.tried = policy, tried
        self.after: float | None = None

    def __call__(self, exc: BaseException) -> float | None:
        retries = self.policy.retries(exc, self.tried)
        self.after = self.policy.delay(self.tried) if retries else None
        return self.after


class PluginRunner:
    """Runs a sequence of phases over a session's context and records the run as events.

    ``retries`` is the default policy (extra attempts, or a RetryPolicy); a phase wrapped in
    ``ContextAwarePhase(retry=…)`` has its own. ``lease`` is how long a crashed runner on
    another host keeps the session from being run again. Runs are traced with
    OpenTelemetry (``eventctx.otel``) when it is installed and ``tracer_provider`` is given,
    or one is set globally.
    """

    def __init__(
        self,
        manager: ContextManager,
        phases: Iterable[Any],
        retries: int | RetryPolicy = 0,
        *,
        lease: timedelta = timedelta(seconds=30),
        isolate_attempts: bool = True,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        """Wrap ``phases`` (callables or objects with .name/.execute, sync or async).

        With ``isolate_attempts`` (the default) a failed or interrupted attempt's writes are
        rolled back: the next attempt and later phases see the context as it was before it.
        """
        self._manager = manager
        self._phases = wrap_phases_with_context(phases)
        self._retry = RetryPolicy.of(retries)
        self._lease = check_duration(
            lease, "lease", minimum=timedelta(milliseconds=99), maximum=timedelta(days=1)
        )
        self.isolate_attempts = isolate_attempts
        """Whether a failed attempt's writes are rolled back (they stay in the log)."""
        self._tracer_provider = tracer_provider

    @property
    def phases(self) -> list[ContextAwarePhase]:
        """The wrapped phases, in order."""
        return list(self._phases)

    @property
    def retry(self) -> RetryPolicy:
        """The retry policy of phases that have none of their own."""
        return self._retry

    @property
    def names(self) -> list[str]:
        """The phases' names, in order."""
        return [p.name for p in self._phases]

    def run(
        self, session_id: str, input: Any = None, resume: bool = False, *, fresh: bool = False
    ) -> RunResult:
        """Run every phase in this thread and return how the run ended.

        A new run sees the keys earlier runs left in the session (that is what restoring
        context across executions is for); ``fresh=True`` clears them first (one
        ``ContextCleared``, in the log). ``resume=True`` continues the session's latest
        unfinished run: completed phases are skipped (their stored outputs fed on), an
        interrupted phase is recorded as failed and run again, and ``input=None`` means the
        recorded input (another input is recorded as the run's). Without an unfinished run it
        starts a new one; a new session is created. Async phases run on one event loop made
        for the run; from async code use ``await run_async()``.
        """
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            # One loop for the async phases of the run (made only if one is async); each runs
            # in the context of its call (the phase's scope), not the loop's first one.
            with asyncio.Runner() as loop:

                def on_the_runs_loop(coro: Coroutine[Any, Any, Any]) -> Any:
                    return loop.run(coro, context=contextvars.copy_context())

                return self._run(session_id, input, resume, fresh, on_the_runs_loop)
        raise EventCtxError("run() was called inside an event loop: use await run_async()")

    async def run_async(
        self, session_id: str, input: Any = None, resume: bool = False, *, fresh: bool = False
    ) -> RunResult:
        """``run`` for async callers: the run goes to a worker thread, so its database calls
        and sync phases never block this event loop; async phases run on this loop."""
        loop = asyncio.get_running_loop()

        def on_this_loop(coro: Coroutine[Any, Any, Any]) -> Any:
            return asyncio.run_coroutine_threadsafe(coro, loop).result()

        return await asyncio.to_thread(self._run, session_id, input, resume, fresh, on_this_loop)

    def _run(
        self,
        session_id: str,
        run_input: Any,
        resume: bool,
        fresh: bool,
        run_coroutine: RunCoroutine,
    ) -> RunResult:
        ctx = self._manager.get_or_create_context(session_id)
        with _Lease(self._manager.store, session_id, self._lease) as lease:
            ctx.refresh()  # see everything the previous holder of the lease wrote
            with otel.traced_run(self._tracer_provider, ctx.writer.store, session_id) as trace:
                run = _Run(self, ctx, lease, run_coroutine, trace)
                return run.execute(run_input, resume, fresh)


@dataclass(slots=True)
class _Run:
    """One run of a runner's phases over a context, under a lease."""

    runner: PluginRunner
    ctx: PluginContext
    lease: _Lease
    run_coroutine: RunCoroutine
    trace: otel.RunTrace | None

    @property
    def writer(self) -> SessionWriter:
        return self.ctx.writer

    def append(self, event: Any) -> None:
        recorded = self.writer.append([event], fence=self.lease.fence)
        if self.trace is not None:
            self.trace.observe(recorded)

    def execute(self, run_input: Any, resume: bool, fresh: bool) -> RunResult:
        previous_run = self.writer.run()
        done: set[str] = set()
        if resume and previous_run is not None and previous_run.status == "running":
            execution_id, done = previous_run.execution_id, set(previous_run.completed)
            run_input = self._resume(previous_run, run_input)
        else:
            execution_id = uuid.uuid4().hex
            if fresh:
                self.append(runlog.context_cleared())
            started_event = runlog.run_started(execution_id, run_input, self.runner.names)
            self.append(started_event)
            run_input = started_event.payload["input"]
        result = RunResult(self.ctx.session_id, execution_id, "completed")
        previous: str | None = None
        for phase in self.runner.phases:
            if phase.name in done:
                result.outputs[phase.name] = self.writer.output(execution_id, phase.name)
            else:
                error = self._attempts(phase, execution_id, run_input, previous, result)
                if error is not None:
                    total, segments = self._span()
                    self.append(runlog.run_failed(execution_id, phase.name, error, total, segments))
                    result.status, result.error = "failed", error
                    return self._timings(result, total, segments)
            previous = phase.name
        total, segments = self._span()
        self.append(runlog.run_completed(execution_id, total, segments))
        return self._timings(result, total, segments)

    def _resume(self, run: RunState, run_input: Any) -> Any:
        """Record that this process takes the run over (with its input, the recorded one
        unless another is given) and close the attempt the last process left open."""
        store, session_id = self.ctx.writer.store, self.ctx.session_id
        segment_start = int(run.segments[-1][2] or 1) if run.segments else 1
        this_segment = store.find(
            session_id, execution_id=run.execution_id, from_version=segment_start
        )
        last_seen = max((e.recorded_at_us for e in this_segment), default=0)
        if run_input is None:
            run_input = run.input
        self.append(runlog.run_resumed(run.execution_id, run_input, last_seen))
        if run.open_phase is not None:
            phase = run.open_phase
            times = [  # in version order, so never decreasing
                e.recorded_at_us
                for e in store.find(
                    session_id,
                    execution_id=run.execution_id,
                    phase=phase,
                    from_version=run.open_version,
                )
            ]
            span = times[-1] - times[0] if times else 0
            duration = span / 1000 if span > 0 else None
            attempt = run.attempts.get(phase, 1)
            self.append(runlog.phase_interrupted(run.execution_id, phase, attempt, duration))
        return self.writer.run().input  # type: ignore[union-attr]

    def _span(self) -> tuple[float, list[float]]:
        """The run's time from its first start to now, and the time in each process."""
        run = self.writer.run()
        assert run is not None
        now = self.ctx.writer.store.clock()
        segments = [
            ((end if end is not None else now) - int(start or 0)) / 1000
            for start, end, *_ in run.segments
        ]
        return (now - run.started_us) / 1000, segments

    def _timings(self, result: RunResult, total: float, segments: list[float]) -> RunResult:
        """Fill the attempts and times of ``result`` from the run as the log records it (the
        run's own span, ``total`` and ``segments``, as its end event records them)."""
        run = self.writer.run()
        assert run is not None
        result.attempts = attempt_results(run)
        for phase, tries in run.tries.items():
            ended = [t["ended_us"] for t in tries if "ended_us" in t]
            if ended:
                result.wall_ms[phase] = (max(ended) - tries[0]["started_us"]) / 1000
            if tries[-1]["status"] == "completed":
                result.durations_ms[phase] = tries[-1]["duration_ms"]
        result.duration_ms, result.segments_ms = total, segments
        return result

    def _attempts(
        self,
        phase: ContextAwarePhase,
        execution_id: str,
        run_input: Any,
        previous: str | None,
        result: RunResult,
    ) -> Exception | None:
        """Try ``phase`` by its policy; record its output in ``result`` or return the error."""
        policy = phase.retry or self.runner.retry
        while True:
            self.lease.check()
            run = self.writer.run()
            attempt = (run.attempts.get(phase.name, 0) if run is not None else 0) + 1
            # The budget is the run's: attempts made by a process that died count too.
            retry = _Retry(policy, attempt)
            try:
                output, _ = phase.attempt(
                    self.ctx,
                    execution_id,
                    run_input,
                    attempt,
                    previous,
                    fence=self.lease.fence,
                    run_coroutine=self.run_coroutine,
                    isolated=self.runner.isolate_attempts,
                    retry=retry,
                    observe=None if self.trace is None else self.trace.observe,
                )
            except Exception as exc:
                self.lease.check(ask=True)  # a write refused for a lost lease ends the run
                if retry.after is None:
                    return exc
                time.sleep(retry.after)
                continue
            result.outputs[phase.name] = output
            return None
