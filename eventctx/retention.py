"""Retention for long-lived sessions: events older than a window are folded into the session's
base and removed, so a session that runs every hour for months keeps what each run leaves in
its state (outputs, the ends of its phase attempts), not every event it wrote.

The window is a duration (``retain=timedelta(days=30)``): "how far back can I replay" is what
users ask of a debugging history, and it does not depend on how often a plugin runs. Runs are
never split: a run that started before the window goes whole with what came before it or stays
whole, and a session's latest run always stays, so ``runs`` and ``diff_sessions`` answer as
before. What is kept of the removed part:

- the state at the base (data, per-key provenance, phase outputs, metadata, the run), so the
  current state and ``blame`` are unchanged, including the value each live write replaced;
- every phase attempt's end (when, how long, how it ended, which keys it read), so
  ``phase_stats``, ``phase_timings`` and ``readers`` are unchanged, percentiles exact;
- the chain hash at the base: the chain verifies from there, and the base has its own digest.

What is not kept: the removed events themselves, so ``replay``, ``history``, ``state_at`` and
``key_history`` start at the base, and asking about an earlier version raises
HistoryRemovedError. ``eventctx.compaction`` runs this with TTL removal under its lease.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Final

import orjson

from eventctx.errors import IntegrityError, InvalidInputError
from eventctx.events import RecordedEvent
from eventctx.findings import ABSENT
from eventctx.snapshots import base_state
from eventctx.state import FOLD_VERSION, Provenance, State, advance
from eventctx.store import EventStore, SessionHead
from eventctx.store.bases import Base
from eventctx.store.heads import ACTIVE

__all__ = [
    "ENDS",
    "WHOLE",
    "Kept",
    "Plan",
    "build_base",
    "check_window",
    "end_status",
    "every_base",
    "plan",
    "previous_values",
]

ENDS: Final = frozenset({"PhaseCompleted", "PhaseFailed"})
_RUN_BOUNDS: Final = frozenset({"RunStarted", "RunCompleted", "RunFailed"})
WHOLE: Final = frozenset({"CheckpointSaved"})
"""Event types whose sessions retention leaves whole: a LangGraph thread's checkpoints are
deltas on their parents that its saver reads from the start (it prunes them itself)."""


@dataclass(frozen=True, slots=True)
class Plan:
    """What retention would do to one session: fold ``start + 1 .. cut`` into a new base."""

    session_id: str
    base: Base | None
    """The session's base when planned (None: its history is whole)."""
    cut: int
    """The new base version (``start`` when only an interrupted removal is to be finished)."""

    @property
    def start(self) -> int:
        """The current base version (0: the history is whole)."""
        return 0 if self.base is None else self.base.version

    @property
    def events(self) -> int:
        """Events the new base removes."""
        return self.cut - self.start


@dataclass(slots=True)
class Kept:
    """What a base keeps of its removed events for the read side (its ``history``)."""

    ends: list[list[Any]]
    """Each phase attempt's end: [version, recorded_at µs, execution id, phase, attempt,
    status, duration_ms, keys_read], oldest first."""
    replaced: dict[str, Any]
    """For each key whose last write is at or below the base, the value that write replaced
    (a key missing here replaced nothing)."""
    removed: int = 0
    """Events removed in all."""

    @classmethod
    def of(cls, base: Base | None) -> Kept:
        """The history a base keeps (empty without a base)."""
        if base is None:
            return cls([], {})
        raw = orjson.loads(base.history)
        return cls(raw["ends"], raw["replaced"], raw["removed"])

    def encode(self) -> bytes:
        """The bytes stored as the base's history."""
        return orjson.dumps({"ends": self.ends, "replaced": self.replaced, "removed": self.removed})


def every_base(store: EventStore) -> dict[str, Base]:
    """Every session's retention base, by session; one that no longer matches its digest
    raises IntegrityError (a base is never skipped: its events are gone)."""
    found: dict[str, Base] = {}
    for base in store.bases.all():
        if isinstance(base, IntegrityError):
            raise base
        found[base.session_id] = base
    return found


def check_window(window: timedelta) -> timedelta:
    """``window`` if it is a usable retention window."""
    if not isinstance(window, timedelta) or window <= timedelta(0):
        raise InvalidInputError(f"retain must be a positive timedelta, not {window!r}")
    return window


def end_status(event: RecordedEvent) -> str:
    """How the phase attempt ``event`` ends went: completed, failed or interrupted."""
    if event.type == "PhaseCompleted":
        return "completed"
    return "interrupted" if event.payload["error_type"] == "interrupted" else "failed"


def plan(store: EventStore, head: SessionHead, window: timedelta, now_us: int) -> Plan | None:
    """Where retention would put ``head``'s session's base at ``now_us``, or None when nothing
    is to be done. Costs a few point reads and one pass over the run events after the base."""
    if head.status != ACTIVE:
        return None
    session_id = head.session_id
    base = store.base(session_id)
    start = 0 if base is None else base.version
    leftover = base is not None and bool(store.read_versions(session_id, [start]))
    cutoff = now_us - window // timedelta(microseconds=1)
    cut = store.version_at(session_id, cutoff - 1, start + 1, head.version) or start
    if cut > start:
        cut = _whole_runs(store, session_id, start, cut)
    if cut > start or leftover:
        return Plan(session_id, base, max(cut, start))
    return None


def _whole_runs(store: EventStore, session_id: str, start: int, cut: int) -> int:
    """``cut`` moved back so that no run is split and the latest run stays: a run lasts from
    its RunStarted to its close, or to the next RunStarted (one never closed was abandoned).
    ``start`` (nothing to trim) for a session that must stay whole (``WHOLE``)."""
    runs: list[list[int]] = []  # [started, ended]
    for event in store.find(session_id, types=_RUN_BOUNDS | WHOLE, from_version=start + 1):
        if event.type in WHOLE:
            return start
        if event.type == "RunStarted":
            if runs and runs[-1][1] == 0:
                runs[-1][1] = event.version - 1
            runs.append([event.version, 0])
        elif runs and runs[-1][1] == 0:
            runs[-1][1] = event.version
    if runs:
        cut = min(cut, runs[-1][0] - 1)  # the latest run stays whole
    for started, ended in runs:
        if started <= cut < (ended or cut + 1):
            cut = started - 1
    return cut


def build_base(store: EventStore, planned: Plan) -> Base:
    """The new base of ``planned``: the old base (or the empty state) with the events up to the
    cut folded on, every one checked against its hash and link as it is read, and what the
    read side keeps of them."""
    session_id, old = planned.session_id, planned.base
    kept = Kept.of(old)
    before = State() if old is None else base_state(old)
    state = before.copy()
    for event in _ends_noted(
        store.read(session_id, planned.start + 1, planned.cut, verify=True), kept
    ):
        advance(state, (event,))
    kept.removed += planned.events
    values = previous_values(
        store, session_id, planned.start, before, kept.replaced, state.provenance
    )
    kept.replaced = {key: value for key, value in values.items() if value is not ABSENT}
    return Base(
        session_id, state.version, FOLD_VERSION, state.head_hash, state.encode(), kept.encode()
    )


def _ends_noted(events: Iterator[RecordedEvent], kept: Kept) -> Iterator[RecordedEvent]:
    """``events``, noting each phase attempt's end in ``kept`` as it passes."""
    for event in events:
        if event.type in ENDS:
            payload = event.payload
            kept.ends.append(
                [
                    event.version,
                    event.recorded_at_us,
                    event.execution_id,
                    event.phase,
                    payload["attempt"],
                    end_status(event),
                    payload["duration_ms"],
                    payload["keys_read"],
                ]
            )
        yield event


def previous_values(
    store: EventStore,
    session_id: str,
    base_version: int,
    base: State,
    base_replaced: dict[str, Any],
    provenance: dict[str, Provenance],
) -> dict[str, Any]:
    """For each key of ``provenance``, the value its last write replaced (ABSENT: none): read
    from the log where that earlier write is still there, else from the base (``base``, the
    state at ``base_version``, and ``base_replaced``, what the base's own writes replaced)."""
    wanted = [
        p.prior for p in provenance.values() if p.prior is not None and p.prior > base_version
    ]
    found = {e.version: _value_after(e) for e in store.read_versions(session_id, wanted)}
    values: dict[str, Any] = {}
    for key, p in provenance.items():
        if p.prior is None:
            values[key] = ABSENT
        elif p.prior > base_version:
            values[key] = found.get(p.prior, ABSENT)
        elif p.version <= base_version:
            values[key] = base_replaced.get(key, ABSENT)
        else:  # the write it replaced is the base's last write of the key
            values[key] = base.data.get(key, ABSENT)
    return values


def _value_after(event: RecordedEvent) -> Any:
    """The value a key held after ``event`` wrote it (ABSENT after a delete or a clear)."""
    return event.payload["value"] if event.type == "KeySet" else ABSENT
