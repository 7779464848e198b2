"""PluginRunner: runs phases over a session, records the run, retries, and resumes a run whose
process died.

A run holds the session's run lease (on its head row) for its whole length, renewed by a
heartbeat; a second runner on the same session gets RunInProgressError. A lease whose holder
died is taken over at once when the holder was on this host, else when it expires.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from eventctx.context import PluginContext
from eventctx.errors import EventCtxError, RunInProgressError
from eventctx.events import NewEvent
from eventctx.manager import ContextManager
from eventctx.phases import ContextAwarePhase, RetryPolicy, wrap_phases_with_context
from eventctx.store import EventStore

__all__ = ["PluginRunner", "RunResult"]

_HOST = socket.gethostname()


@dataclass(slots=True)
class RunResult:
    """How a run ended. ``error`` is the exception that failed it (nothing is swallowed)."""

    session_id: str
    execution_id: str
    status: str  # "completed" | "failed"
    outputs: dict[str, Any] = field(default_factory=dict)
    durations_ms: dict[str, float] = field(default_factory=dict)
    error: BaseException | None = None


class _Lease:
    """The session's run lease, held by this runner and renewed by a heartbeat thread."""

    def __init__(self, store: EventStore, session_id: str, ttl: timedelta) -> None:
        self._store, self._session_id, self._ttl = store, session_id, ttl
        self.owner = f"{_HOST}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="eventctx-lease", daemon=True)

    def __enter__(self) -> _Lease:
        holder = self._store.take_lease(self._session_id, self.owner, self._ttl)
        if holder is not None and _dead_here(holder[0]):
            holder = self._store.take_lease(
                self._session_id, self.owner, self._ttl, previous=holder[0]
            )
        if holder is not None:
            raise RunInProgressError(
                f"session {self._session_id!r} is being run by {holder[0]} "
                f"(lease until {holder[1]:%Y-%m-%d %H:%M:%S} UTC); wait for it to finish"
            )
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        with contextlib.suppress(EventCtxError):  # if this fails, the lease expires by itself
            self._store.release_lease(self._session_id, self.owner)

    def _beat(self) -> None:
        while not self._stop.wait(self._ttl.total_seconds() / 3):
            # A failed beat is tried again on the next one; the lease outlives two missed beats.
            with contextlib.suppress(EventCtxError):
                self._store.take_lease(self._session_id, self.owner, self._ttl)


def _dead_here(owner: str) -> bool:
    """Whether a lease holder ran on this host in a process that no longer exists."""
    parts = owner.rsplit(":", 2)
    if len(parts) != 3 or parts[0] != _HOST or not parts[1].isdigit():
        return False
    try:
        os.kill(int(parts[1]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, under another user
        return False
    return False


class PluginRunner:
    """Runs a sequence of phases over a session's context and records the run as events.

    ``retries`` is the default policy (extra attempts, or a RetryPolicy); a phase wrapped in
    ``ContextAwarePhase(retry=…)`` has its own. ``lease`` is how long a crashed runner on
    another host keeps the session from being run again.
    """

    def __init__(
        self,
        manager: ContextManager,
        phases: Iterable[Any],
        retries: int | RetryPolicy = 0,
        *,
        lease: timedelta = timedelta(seconds=30),
    ) -> None:
        """Wrap ``phases`` (callables or objects with .name/.execute, sync or async)."""
        self._manager = manager
        self._phases = wrap_phases_with_context(phases)
        self._retry = RetryPolicy.of(retries)
        self._lease = lease

    @property
    def phases(self) -> list[ContextAwarePhase]:
        """The wrapped phases, in order."""
        return list(self._phases)

    def run(self, session_id: str, input: Any = None, resume: bool = False) -> RunResult:
        """Run every phase (sync or async) and return how the run ended.

        ``resume=True`` continues the session's latest unfinished run: completed phases are
        skipped (their stored outputs fed on), an interrupted phase is recorded as failed and
        run again, and ``input=None`` means the recorded input. Without an unfinished run it
        starts a new one; a new session is created.
        """
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.run_async(session_id, input, resume))
        raise EventCtxError("run() was called inside an event loop: use await run_async()")

    async def run_async(
        self, session_id: str, input: Any = None, resume: bool = False
    ) -> RunResult:
        """``run`` for async callers; async phases run on the caller's event loop."""
        ctx = self._manager.get_or_create_context(session_id)
        with _Lease(self._manager.store, session_id, self._lease):
            ctx.refresh()  # see everything the previous holder of the lease wrote
            return await self._run(ctx, input, resume)

    async def _run(self, ctx: PluginContext, run_input: Any, resume: bool) -> RunResult:
        started = time.perf_counter_ns()
        previous_run = ctx._state.run
        done: dict[str, float] = {}
        attempts: dict[str, int] = {}
        if resume and previous_run is not None and previous_run.status == "running":
            execution_id = previous_run.execution_id
            if run_input is None:
                run_input = previous_run.input
            done, attempts = dict(previous_run.completed), dict(previous_run.attempts)
            if previous_run.open_phase is not None:
                ctx._write([_interrupted(previous_run.open_phase, execution_id, attempts)])
        else:
            execution_id = uuid.uuid4().hex
            names = [p.name for p in self._phases]
            started_event = NewEvent.create(
                "RunStarted", {"input": run_input, "phases": names}, execution_id=execution_id
            )
            ctx._write([started_event])
            run_input = started_event.payload["input"]
        result = RunResult(ctx.session_id, execution_id, "completed")
        previous: str | None = None
        for phase in self._phases:
            if phase.name in done:
                result.outputs[phase.name] = ctx._run_value(
                    "outputs", execution_id, phase.name, None
                )
                result.durations_ms[phase.name] = done[phase.name]
            else:
                error = await self._attempts(
                    ctx, phase, execution_id, run_input, attempts, previous, result
                )
                if error is not None:
                    ctx._write([_run_failed(execution_id, phase.name, error, started)])
                    result.status, result.error = "failed", error
                    return result
            previous = phase.name
        duration = (time.perf_counter_ns() - started) / 1e6
        ctx._write(
            [NewEvent.create("RunCompleted", {"duration_ms": duration}, execution_id=execution_id)]
        )
        return result

    async def _attempts(
        self,
        ctx: PluginContext,
        phase: ContextAwarePhase,
        execution_id: str,
        run_input: Any,
        attempts: dict[str, int],
        previous: str | None,
        result: RunResult,
    ) -> Exception | None:
        """Try ``phase`` by its policy; record its output in ``result`` or return the error."""
        policy = phase.retry or self._retry
        tried = 0
        while True:
            tried += 1
            attempt = attempts.get(phase.name, 0) + 1
            attempts[phase.name] = attempt
            try:
                output, duration = await phase.attempt(
                    ctx, execution_id, run_input, attempt, previous
                )
            except Exception as exc:
                if not policy.retries(exc, tried):
                    return exc
                await asyncio.sleep(policy.delay(tried))
                continue
            result.outputs[phase.name] = output
            result.durations_ms[phase.name] = duration
            return None


def _interrupted(phase: str, execution_id: str, attempts: dict[str, int]) -> NewEvent:
    payload = {
        "error_type": "interrupted",
        "message": "the process running this phase stopped before the phase ended",
        "traceback": "",
        "duration_ms": 0.0,
        "attempt": attempts.get(phase, 1),
        "keys_read": [],
    }
    return NewEvent.create("PhaseFailed", payload, phase=phase, execution_id=execution_id)


def _run_failed(execution_id: str, phase: str, error: Exception, started: int) -> NewEvent:
    payload = {
        "phase": phase,
        "error_type": type(error).__qualname__,
        "message": str(error),
        "duration_ms": (time.perf_counter_ns() - started) / 1e6,
    }
    return NewEvent.create("RunFailed", payload, execution_id=execution_id)
