"""What the Inspector returns: plain, immutable-where-possible records of replay steps, writes
and reads of keys, diffs, runs and their attempts, timings and checks."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, NamedTuple

from eventctx.events import RecordedEvent
from eventctx.state import State

__all__ = [
    "ABSENT",
    "DELETED",
    "Attempt",
    "ContextDiff",
    "KeyRead",
    "KeyWrite",
    "PhaseDiff",
    "PhaseRun",
    "PhaseStats",
    "PhaseTiming",
    "ReplayStep",
    "RerunReport",
    "Run",
    "SessionDiff",
    "VerifyResult",
]


class _Absent:
    """The marker for "no value": a key absent, a phase that wrote nothing, no output."""

    def __repr__(self) -> str:
        return "ABSENT"

    def __bool__(self) -> bool:
        return False


ABSENT: Final = _Absent()
"""Stands for a value that is not there (a JSON ``null`` is a value: ``None``)."""


class _Deleted:
    """The marker for a key a phase removed (deleted, or cleared with the rest)."""

    def __repr__(self) -> str:
        return "DELETED"


DELETED: Final = _Deleted()
"""In a comparison of what phases wrote: the phase removed the key (ABSENT: it did not
write it at all)."""


class ReplayStep(NamedTuple):
    """One step of a replay: an event, the state right after it, and the keys it changed."""

    event: RecordedEvent
    state: State
    changed: frozenset[str]


@dataclass(frozen=True, slots=True)
class KeyWrite:
    """A write of a key: who made it (phase, execution, attempt; None outside a phase), when,
    what it stored (``value``; ABSENT for a delete), what it replaced (``previous``) and
    whether it was rolled back with a failed attempt."""

    key: str
    phase: str | None
    execution_id: str | None
    attempt: int | None
    version: int
    recorded_at: datetime
    value: Any
    op: str  # "set" | "delete"
    previous: Any = ABSENT
    previous_version: int | None = None
    rolled_back: bool = False
    """Made by an attempt that failed: it no longer counts (it stays in the log)."""


@dataclass(frozen=True, slots=True)
class KeyRead:
    """A phase attempt that read a key (from its end event's ``keys_read``)."""

    phase: str
    execution_id: str
    attempt: int
    version: int
    """The version of the attempt's end event."""
    recorded_at: datetime
    status: str  # "completed" | "failed" | "interrupted"


@dataclass(frozen=True, slots=True)
class ContextDiff:
    """How the data changed from one state to another."""

    added: dict[str, Any] = field(default_factory=dict)
    removed: dict[str, Any] = field(default_factory=dict)
    changed: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    """Key -> (old value, new value)."""

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed)


@dataclass(slots=True)
class Attempt:
    """One attempt of a phase in a run."""

    attempt: int
    status: str  # "running" | "completed" | "failed" | "interrupted"
    started_version: int
    started_at: datetime
    ended_version: int | None = None
    duration_ms: float | None = None
    error_type: str | None = None
    message: str | None = None
    keys_read: list[str] = field(default_factory=list)
    output: Any = ABSENT


@dataclass(slots=True)
class PhaseRun:
    """A phase within a run: its attempts, oldest first."""

    phase: str
    attempts: list[Attempt] = field(default_factory=list)

    @property
    def status(self) -> str:
        """The status of its last attempt ("pending" if it never started)."""
        return self.attempts[-1].status if self.attempts else "pending"

    @property
    def output(self) -> Any:
        """The output of its completed attempt, or ABSENT."""
        return self.attempts[-1].output if self.attempts else ABSENT

    @property
    def duration_ms(self) -> float | None:
        """The duration of its last attempt, when it ended."""
        return self.attempts[-1].duration_ms if self.attempts else None


@dataclass(slots=True)
class Run:
    """A run of a session: its input, phases (in order), attempts, and how it ended."""

    execution_id: str
    input: Any
    phases: list[str]
    status: str  # "running" | "completed" | "failed"
    started_version: int
    started_at: datetime
    ended_at: datetime | None = None
    duration_ms: float | None = None
    error_type: str | None = None
    message: str | None = None
    phase_runs: dict[str, PhaseRun] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PhaseDiff:
    """One phase of two runs side by side (each pair is (first, second))."""

    phase: str
    status: tuple[str, str]
    duration_ms: tuple[float | None, float | None]
    output: tuple[Any, Any]
    keys: dict[str, tuple[Any, Any]]
    """Keys the phase wrote differently: key -> (value, value); ABSENT where it did not write
    the key, DELETED where it removed it."""

    @property
    def diverges(self) -> bool:
        """Whether the phase behaved differently (timings aside)."""
        return (
            bool(self.keys) or self.status[0] != self.status[1] or self.output[0] != self.output[1]
        )


@dataclass(frozen=True, slots=True)
class SessionDiff:
    """The latest runs of two sessions, aligned by phase."""

    first: str
    second: str
    phases: list[PhaseDiff]
    first_divergence: str | None
    """The first phase (in run order) that behaved differently, or None."""


@dataclass(frozen=True, slots=True)
class PhaseTiming:
    """One ended attempt of a phase."""

    session_id: str
    execution_id: str
    phase: str
    attempt: int
    status: str  # "completed" | "failed" | "interrupted"
    duration_ms: float | None
    """For an interrupted attempt, a lower bound (to its last event), or None."""
    recorded_at: datetime


@dataclass(frozen=True, slots=True)
class PhaseStats:
    """Attempts of one phase: how many ended, failed, were retries, and their durations (ms;
    percentiles interpolate linearly between the closest ranks; interrupted attempts have no
    duration and are left out of them)."""

    count: int
    failures: int
    retries: int
    mean_ms: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float


@dataclass(frozen=True, slots=True)
class RerunReport:
    """A phase run again in a fork, against the recorded attempt."""

    session_id: str
    fork_id: str
    phase: str
    execution_id: str
    attempt: int
    recorded_status: str
    status: str
    recorded_duration_ms: float | None
    duration_ms: float
    recorded_output: Any
    output: Any
    error: BaseException | None
    keys: dict[str, tuple[Any, Any]]
    """Keys written differently: key -> (recorded, re-run); ABSENT where not written, DELETED
    where removed."""

    @property
    def output_changed(self) -> bool:
        """Whether the re-run returned another output."""
        return bool(self.recorded_output != self.output)


@dataclass(frozen=True, slots=True)
class VerifyResult:
    """The check of one session: its hash chain, and its snapshots against the fold."""

    session_id: str
    ok: bool
    events: int
    """Events verified (when ok)."""
    version: int | None = None
    """The first version that failed."""
    error: str | None = None
    snapshots: int = 0
    """Snapshots checked against the fold of the log (when ok)."""
    being_removed: bool = False
    """Compaction is (or was, before it crashed) removing the session: nothing to check."""
