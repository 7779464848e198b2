"""The events a run records about itself: its start and end, each phase attempt, helper
metadata. One place builds them, so the runner, the phases and the read side agree on their
shape (the payload models are in ``eventctx.events``)."""

from __future__ import annotations

import traceback
from collections.abc import Sequence
from typing import Any

from eventctx.events import NewEvent

__all__ = [
    "INTERRUPTED",
    "context_cleared",
    "metadata_set",
    "phase_completed",
    "phase_failed",
    "phase_interrupted",
    "phase_started",
    "run_completed",
    "run_failed",
    "run_resumed",
    "run_started",
]

INTERRUPTED = "interrupted"
MAX_TRACEBACK = 32 * 1024
"""How much of a failed attempt's traceback is kept (the end, where the error is)."""
"""The ``error_type`` of an attempt whose process stopped before the attempt ended."""


def run_started(execution_id: str, run_input: Any, phases: Sequence[str]) -> NewEvent:
    """A run over ``phases`` starts with ``run_input``."""
    return NewEvent.create(
        "RunStarted", {"input": run_input, "phases": list(phases)}, execution_id=execution_id
    )


def run_resumed(execution_id: str, run_input: Any, previous_ended_at_us: int) -> NewEvent:
    """Another process continues the run with ``run_input``."""
    payload = {"input": run_input, "previous_ended_at_us": previous_ended_at_us}
    return NewEvent.create("RunResumed", payload, execution_id=execution_id)


def run_completed(
    execution_id: str, duration_ms: float, segments_ms: Sequence[float] = ()
) -> NewEvent:
    """Every phase of the run completed, ``duration_ms`` after it first started."""
    payload = {"duration_ms": duration_ms, "segments_ms": list(segments_ms)}
    return NewEvent.create("RunCompleted", payload, execution_id=execution_id)


def run_failed(
    execution_id: str,
    phase: str | None,
    error: BaseException,
    duration_ms: float,
    segments_ms: Sequence[float] = (),
) -> NewEvent:
    """The run stopped at ``phase``, whose last attempt raised ``error``."""
    payload = {
        "phase": phase,
        "error_type": type(error).__qualname__,
        "message": str(error),
        "duration_ms": duration_ms,
        "segments_ms": list(segments_ms),
    }
    return NewEvent.create("RunFailed", payload, execution_id=execution_id)


def phase_started(
    execution_id: str, phase: str, attempt: int, *, isolated: bool = True
) -> NewEvent:
    """Attempt ``attempt`` (from 1) of ``phase`` starts; an ``isolated`` one's writes are
    rolled back by the fold if it fails."""
    return NewEvent.create(
        "PhaseStarted",
        {"attempt": attempt, "isolated": isolated},
        phase=phase,
        execution_id=execution_id,
    )


def phase_completed(
    execution_id: str,
    phase: str,
    attempt: int,
    output: Any,
    duration_ms: float,
    keys_read: set[str],
) -> NewEvent:
    """``phase`` returned ``output`` after reading ``keys_read``."""
    payload = {
        "output": output,
        "duration_ms": duration_ms,
        "attempt": attempt,
        "keys_read": sorted(keys_read),
    }
    return NewEvent.create("PhaseCompleted", payload, phase=phase, execution_id=execution_id)


def phase_failed(
    execution_id: str,
    phase: str,
    attempt: int,
    error: BaseException,
    duration_ms: float,
    keys_read: set[str],
    retry_after_s: float | None = None,
) -> NewEvent:
    """An attempt of ``phase`` raised ``error``; another follows after ``retry_after_s``
    seconds, or none if it is None."""
    payload = {
        "error_type": type(error).__qualname__,
        "message": str(error),
        "traceback": _traceback(error),
        "duration_ms": duration_ms,
        "attempt": attempt,
        "keys_read": sorted(keys_read),
        "retry": retry_after_s is not None,
        "retry_after_ms": None if retry_after_s is None else retry_after_s * 1000,
    }
    return NewEvent.create("PhaseFailed", payload, phase=phase, execution_id=execution_id)


def _traceback(error: BaseException) -> str:
    """The error's traceback, its last ``MAX_TRACEBACK`` characters at most."""
    text = "".join(traceback.format_exception(error))
    return text if len(text) <= MAX_TRACEBACK else "…" + text[-MAX_TRACEBACK:]


def phase_interrupted(
    execution_id: str, phase: str, attempt: int, duration_ms: float | None
) -> NewEvent:
    """An attempt of ``phase`` found started without an end: its process stopped.
    ``duration_ms`` runs to its last recorded event (a lower bound), None if it has none."""
    message = "the process running this phase stopped before the phase ended"
    if duration_ms is None:
        message += "; its duration is unknown: nothing was recorded after it started"
    payload: dict[str, Any] = {
        "error_type": INTERRUPTED,
        "message": message,
        "traceback": "",
        "duration_ms": duration_ms,
        "attempt": attempt,
        "keys_read": [],
        "lower_bound": duration_ms is not None,
        "retry": True,
        "retry_after_ms": 0.0,
    }
    return NewEvent.create("PhaseFailed", payload, phase=phase, execution_id=execution_id)


def context_cleared() -> NewEvent:
    """Every key is removed (a run's fresh start)."""
    return NewEvent.create("ContextCleared")


def metadata_set(execution_id: str, phase: str, key: str, value: Any) -> NewEvent:
    """A phase helper stored metadata ``key`` for its run."""
    return NewEvent.create(
        "MetadataSet", {"value": value}, key=key, phase=phase, execution_id=execution_id
    )
