"""Phases: ContextAwarePhase records each attempt as events; the helper shares phase outputs
and metadata within a run.

A phase is any callable (its name is ``__name__``) or an object with ``.name`` and
``.execute(input)``; either may be ``async``. While it runs, its session's context is
current, every write carries the phase name and execution id, and the keys it reads are
collected in memory and stored once, in its end event.
"""

from __future__ import annotations

import asyncio
import inspect
import random
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any

from eventctx import faults, runlog
from eventctx.context import (
    PhaseScope,
    PluginContext,
    SessionWriter,
    active_phase,
    current_context,
    phase_scope,
    use_context,
)
from eventctx.errors import EventCtxError, InvalidInputError
from eventctx.events import NewEvent, RecordedEvent
from eventctx.state import RunState
from eventctx.store import Fence
from eventctx.store.heads import check_text

__all__ = [
    "AttemptResult",
    "ContextAwarePhase",
    "PhaseContextHelper",
    "RetryPolicy",
    "helper",
    "wrap_phases_with_context",
]


@dataclass(frozen=True, slots=True)
class AttemptResult:
    """One attempt of a phase, as the log records it."""

    attempt: int
    status: str  # "completed" | "failed" | "interrupted"
    duration_ms: float | None
    """None only for an interrupted attempt that recorded nothing after it started."""
    lower_bound: bool = False
    """The duration of an interrupted attempt runs to its last recorded event."""
    error_type: str | None = None
    message: str | None = None
    retry_after_ms: float | None = None
    """The wait before the next attempt (None: none followed)."""


def attempt_results(run: RunState) -> dict[str, list[AttemptResult]]:
    """Every attempt of every phase of ``run`` that started, as the log records them."""
    return {
        phase: [
            AttemptResult(
                t["attempt"],
                t["status"],
                t.get("duration_ms"),
                t.get("lower_bound", False),
                t.get("error_type"),
                t.get("message"),
                t.get("retry_after_ms"),
            )
            for t in tries
        ]
        for phase, tries in run.tries.items()
    }


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often a phase is tried: ``attempts`` in all, for exceptions in ``retry_on`` that
    ``retry_if`` (when given) accepts. An exception whose ``retryable`` attribute is False
    (``eventctx.PhaseError``) is never retried; one where it is True always is, while attempts
    remain.

    After failed attempt n the runner waits ``backoff × multiplier^(n-1)`` seconds, at most
    ``max_delay``, spread by ``jitter``: a random factor in [1 - jitter, 1 + jitter].
    """

    attempts: int = 1
    backoff: float = 0.0
    multiplier: float = 2.0
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    retry_if: Callable[[BaseException], bool] | None = None
    max_delay: float | None = None
    jitter: float = 0.0

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.backoff < 0 or self.multiplier < 1:
            raise InvalidInputError(
                "RetryPolicy needs attempts >= 1, backoff >= 0 and multiplier >= 1"
            )
        if not 0 <= self.jitter <= 1 or (self.max_delay is not None and self.max_delay < 0):
            raise InvalidInputError("RetryPolicy needs 0 <= jitter <= 1 and max_delay >= 0")

    @classmethod
    def of(cls, retries: int | RetryPolicy) -> RetryPolicy:
        """A policy from a number of retries (attempts - 1) or a policy."""
        if isinstance(retries, RetryPolicy):
            return retries
        if type(retries) is not int or retries < 0:
            raise InvalidInputError(
                f"retries must be an int >= 0 or a RetryPolicy, not {retries!r}"
            )
        return cls(attempts=retries + 1)

    def retries(self, exc: BaseException, attempt: int) -> bool:
        """Whether ``attempt`` (from 1, in this run) failing with ``exc`` is tried again."""
        if attempt >= self.attempts:
            return False
        marked = getattr(exc, "retryable", None)
        if isinstance(marked, bool):
            return marked
        if not isinstance(exc, self.retry_on):
            return False
        return self.retry_if is None or bool(self.retry_if(exc))

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after failed attempt ``attempt`` (jitter drawn from ``rng``)."""
        wait = self.backoff * self.multiplier ** (attempt - 1)
        if self.max_delay is not None:
            wait = min(wait, self.max_delay)
        if self.jitter:
            wait *= (rng or random).uniform(1 - self.jitter, 1 + self.jitter)
            if self.max_delay is not None:
                wait = min(wait, self.max_delay)
        return wait


class ContextAwarePhase:
    """Wraps a phase so that each attempt is recorded: PhaseStarted, then PhaseCompleted
    (output, duration, keys read) or PhaseFailed (error, traceback, duration, attempt, keys read).
    """

    def __init__(
        self, phase: Any, *, name: str | None = None, retry: int | RetryPolicy | None = None
    ) -> None:
        """``retry`` overrides the runner's policy for this phase."""
        self.phase = phase
        execute = getattr(phase, "execute", None)
        self._call = execute if callable(execute) else phase
        if not callable(self._call):
            raise InvalidInputError(
                f"a phase is a callable or has .execute(input), not {type(phase).__name__}"
            )
        found = name or getattr(phase, "name", None) or getattr(phase, "__name__", None)
        if not found or not isinstance(found, str):
            raise InvalidInputError(f"phase {phase!r} has no name: give it .name or name=")
        self.name: str = check_text(found, "phase name")
        self.retry = None if retry is None else RetryPolicy.of(retry)

    def __repr__(self) -> str:
        return f"<ContextAwarePhase {self.name!r}>"

    def attempt(
        self,
        ctx: PluginContext,
        execution_id: str,
        run_input: Any,
        attempt: int,
        previous: str | None,
        *,
        fence: Fence | None = None,
        run_coroutine: Callable[[Coroutine[Any, Any, Any]], Any] = asyncio.run,
        isolated: bool = True,
        retry: Callable[[BaseException], float | None] | None = None,
        observe: Callable[[list[RecordedEvent]], None] | None = None,
    ) -> tuple[Any, float]:
        """Run one attempt on ``ctx`` in this thread; return (output as stored, duration ms).

        Every write is fenced with ``fence`` (the run lease). An async phase's coroutine is
        handed to ``run_coroutine`` (the runner's: on the caller's event loop, or a new one).
        An ``isolated`` attempt's writes are rolled back if it fails. ``retry`` says, for the
        exception a failed attempt raised, after how many seconds another attempt follows (None:
        none); its PhaseFailed records it. ``observe`` (the run's tracing) is handed each event
        the attempt appends, as recorded.
        """
        writer = ctx.writer
        name = self.name
        started = runlog.phase_started(execution_id, name, attempt, isolated=isolated)
        _record(writer, started, fence, observe)
        faults.point("run.after_phase_started")
        scope = PhaseScope(ctx.session_id, name, execution_id, previous=previous, fence=fence)
        start = time.perf_counter_ns()
        try:
            with phase_scope(scope), use_context(ctx):
                result = self._call(run_input)
                if inspect.iscoroutine(result):
                    result = run_coroutine(result)
                elif inspect.isawaitable(result):
                    result = run_coroutine(_awaited(result))
            duration = (time.perf_counter_ns() - start) / 1e6
            completed = runlog.phase_completed(
                execution_id, name, attempt, result, duration, scope.keys_read
            )
        except BaseException as exc:
            duration = (time.perf_counter_ns() - start) / 1e6
            after = retry(exc) if retry is not None and isinstance(exc, Exception) else None
            failed = runlog.phase_failed(
                execution_id, name, attempt, exc, duration, scope.keys_read, after
            )
            _record(writer, failed, fence, observe)
            raise
        faults.point("run.before_phase_end")
        try:
            _record(writer, completed, fence, observe)
        except InvalidInputError as refused:  # the output itself (too large): the attempt failed
            failed = runlog.phase_failed(
                execution_id, name, attempt, refused, duration, scope.keys_read
            )
            _record(writer, failed, fence, observe)
            raise
        return completed.payload["output"], duration


def _record(
    writer: SessionWriter,
    event: NewEvent,
    fence: Fence | None,
    observe: Callable[[list[RecordedEvent]], None] | None,
) -> None:
    """Append ``event``, fenced; hand it as recorded to ``observe``, if any."""
    recorded = writer.append([event], fence=fence)
    if observe is not None:
        observe(recorded)


async def _awaited(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


def wrap_phases_with_context(phases: Iterable[Any]) -> list[ContextAwarePhase]:
    """Wrap every phase (already wrapped ones are kept); names must be unique."""
    wrapped = [p if isinstance(p, ContextAwarePhase) else ContextAwarePhase(p) for p in phases]
    names = [p.name for p in wrapped]
    if len(set(names)) != len(names):
        raise InvalidInputError(f"phase names must be unique within a runner: {names}")
    if not wrapped:
        raise InvalidInputError("a runner needs at least one phase")
    return wrapped


class PhaseContextHelper:
    """What a running phase shares with the other phases of its run: their outputs and
    metadata, stored as events like everything else."""

    def __init__(self, ctx: PluginContext, scope: PhaseScope) -> None:
        """Use ``eventctx.helper()`` inside a phase instead."""
        self._ctx = ctx
        self._scope = scope

    @property
    def context(self) -> PluginContext:
        """The session's context."""
        return self._ctx

    @property
    def phase(self) -> str:
        """The running phase's name."""
        return self._scope.phase

    @property
    def execution_id(self) -> str:
        """The run's execution id."""
        return self._scope.execution_id

    def set_metadata(self, key: str, value: Any) -> None:
        """Store metadata for this run (a ``MetadataSet`` event, committed on return)."""
        writer = self._ctx.writer
        event = runlog.metadata_set(self.execution_id, self.phase, writer.check_key(key), value)
        writer.append([event], fence=self._scope.fence)

    def get_metadata(self, key: str, default: Any = None) -> Any:
        """Metadata ``key`` of this run, or ``default``."""
        return self._ctx.writer.metadata(self.execution_id, key, default)

    def get_output(self, phase: str, default: Any = None) -> Any:
        """The output ``phase`` returned in this run, or ``default`` if it hasn't completed."""
        return self._ctx.writer.output(self.execution_id, phase, default)

    def errors(self) -> dict[str, list[AttemptResult]]:
        """The failed (and interrupted) attempts of this run so far, per phase: what earlier
        phases, and earlier attempts of this one, ran into."""
        run = self._ctx.writer.run()
        if run is None:
            return {}
        failed = {
            phase: [a for a in attempts if a.status in ("failed", "interrupted")]
            for phase, attempts in attempt_results(run).items()
        }
        return {phase: attempts for phase, attempts in failed.items() if attempts}

    def previous_output(self) -> Any:
        """The output of the phase before this one in the run (None for the first)."""
        previous = self._scope.previous
        return None if previous is None else self.get_output(previous)


def helper() -> PhaseContextHelper:
    """The helper of the phase running in this thread or task; EventCtxError outside one."""
    scope = active_phase()
    if scope is None:
        raise EventCtxError("eventctx.helper() works only inside a phase run by PluginRunner")
    return PhaseContextHelper(current_context(), scope)
