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
    "metadata_set",
    "phase_completed",
    "phase_failed",
    "phase_interrupted",
    "phase_started",
    "run_completed",
    "run_failed",
    "run_started",
]

INTERRUPTED = "interrupted"
"""The ``error_type`` of an attempt whose process stopped before the attempt ended."""


def run_started(execution_id: str, run_input: Any, phases: Sequence[str]) -> NewEvent:
    """A run over ``phases`` starts with ``run_input``."""
    return NewEvent.create(
        "RunStarted", {"input": run_input, "phases": list(phases)}, execution_id=execution_id
    )


def run_completed(execution_id: str, duration_ms: float) -> NewEvent:
    """Every phase of the run completed."""
    return NewEvent.create("RunCompleted", {"duration_ms": duration_ms}, execution_id=execution_id)


def run_failed(
    execution_id: str, phase: str | None, error: BaseException, duration_ms: float
) -> NewEvent:
    """The run stopped at ``phase``, whose last attempt raised ``error``."""
    payload = {
        "phase": phase,
        "error_type": type(error).__qualname__,
        "message": str(error),
        "duration_ms": duration_ms,
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
) -> NewEvent:
    """An attempt of ``phase`` raised ``error``."""
    payload = {
        "error_type": type(error).__qualname__,
        "message": str(error),
        "traceback": "".join(traceback.format_exception(error)),
        "duration_ms": duration_ms,
        "attempt": attempt,
        "keys_read": sorted(keys_read),
    }
    return NewEvent.create("PhaseFailed", payload, phase=phase, execution_id=execution_id)


def phase_interrupted(execution_id: str, phase: str, attempt: int) -> NewEvent:
    """An attempt of ``phase`` found started without an end: its process stopped."""
    payload = {
        "error_type": INTERRUPTED,
        "message": "the process running this phase stopped before the phase ended",
        "traceback": "",
        "duration_ms": 0.0,
        "attempt": attempt,
        "keys_read": [],
    }
    return NewEvent.create("PhaseFailed", payload, phase=phase, execution_id=execution_id)


def metadata_set(execution_id: str, phase: str, key: str, value: Any) -> NewEvent:
    """A phase helper stored metadata ``key`` for its run."""
    return NewEvent.create(
        "MetadataSet", {"value": value}, key=key, phase=phase, execution_id=execution_id
    )
