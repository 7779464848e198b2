"""A session's timeline as one self-contained HTML page (``eventctx timeline S -o FILE.html``).

The page needs no network: its HTML, CSS and JavaScript are inlined from the package's
``timeline.html`` and the session is embedded as JSON. Phases are bars on a time axis per run,
key writes are markers on their phase's lane, and clicking one shows the context at that
version with each key's writer. A small session embeds the state at each write; a big one
embeds only the events, and the page folds them forward itself (with checkpoints), by the same
rules as ``eventctx.state``.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Any, Final

import orjson

from eventctx.errors import InvalidInputError
from eventctx.events import RecordedEvent
from eventctx.findings import Run
from eventctx.inspect import Inspector
from eventctx.render import plain
from eventctx.state import Provenance, State, advance
from eventctx.store import EventStore

__all__ = ["EMBED_STATES_UP_TO", "timeline_data", "timeline_html", "write_timeline"]

EMBED_STATES_UP_TO: Final = 300
"""Up to this many key writes, the page embeds the state at each; beyond, it folds events."""

_WRITES: Final = frozenset({"KeySet", "KeyDeleted", "ContextCleared"})
_FOLDED: Final = _WRITES | {
    "ContextCreated",
    "RunStarted",
    "PhaseStarted",
    "PhaseCompleted",
    "PhaseFailed",
}
"""The event types that change the data or its writers (what the page folds)."""
_PLACEHOLDER: Final = "/*TIMELINE_DATA*/"


def write_timeline(
    source: Inspector | EventStore | str,
    session_id: str,
    path: str | Path,
    *,
    embed_states_up_to: int = EMBED_STATES_UP_TO,
) -> Path:
    """Write the timeline page of ``session_id`` to ``path`` and return the path. ``source``
    is an Inspector, an EventStore or a database URL (opened read-only here). An unknown
    session raises SessionNotFoundError, a path that cannot be written InvalidInputError;
    either way nothing is written."""
    inspector = source if isinstance(source, Inspector) else Inspector(source)
    try:
        page = timeline_html(inspector, session_id, embed_states_up_to=embed_states_up_to)
    finally:
        if inspector is not source:
            inspector.close()
    target = Path(path)
    try:
        target.write_text(page, encoding="utf-8")
    except OSError as exc:
        raise InvalidInputError(f"cannot write {target}: {exc.strerror or exc}") from None
    return target


def timeline_html(
    inspector: Inspector, session_id: str, *, embed_states_up_to: int = EMBED_STATES_UP_TO
) -> str:
    """The page: the template with the session's data embedded, escaped so that no stored
    string can close the script element that holds it."""
    data = orjson.dumps(
        timeline_data(inspector, session_id, embed_states_up_to=embed_states_up_to),
        option=orjson.OPT_NON_STR_KEYS,
    ).decode()
    data = data.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    template = files("eventctx").joinpath("timeline.html").read_text(encoding="utf-8")
    before, _, after = template.partition(_PLACEHOLDER)
    return before + data + after


def timeline_data(
    inspector: Inspector, session_id: str, *, embed_states_up_to: int = EMBED_STATES_UP_TO
) -> dict[str, Any]:
    """What the page shows, as JSON data: the session, its runs with each attempt's span,
    phase statistics, the chain check, the events it folds, and (for a small session) the
    state after each write."""
    runs = inspector.runs(session_id)
    stats = inspector.phase_stats(session_id)
    verified = inspector.verify(session_id)
    store = inspector.store
    kept = store.base(session_id)
    base = State() if kept is None else inspector.state_at(session_id, kept.version)
    events = list(store.read(session_id, base.version + 1))
    times = {e.version: e.recorded_at_us for e in events}
    last_us = events[-1].recorded_at_us if events else base.recorded_at_us
    writes = sum(e.type in _WRITES for e in events)
    folded, states = _fold(events, base, embed_states=writes <= embed_states_up_to)
    return {
        "session_id": session_id,
        "version": events[-1].version if events else base.version,
        "start_us": events[0].recorded_at_us if events else last_us,
        "end_us": last_us,
        "base": None if kept is None else _base(base),
        "verify": {"ok": verified.ok, "events": verified.events, "error": verified.error},
        "runs": [_run(run, times, last_us) for run in runs],
        "stats": plain(stats),
        "events": folded,
        "states": states,
    }


def _run(run: Run, times: dict[int, int], last_us: int) -> dict[str, Any]:
    """A run with each phase attempt's start and end on the time axis (µs)."""
    attempts: list[dict[str, Any]] = []
    for name in dict.fromkeys([*run.phases, *run.phase_runs]):
        phase_run = run.phase_runs.get(name)
        for a in phase_run.attempts if phase_run else []:
            start = times.get(a.started_version, last_us)
            if a.status == "interrupted" or a.ended_version is None:
                # The end of an interrupted attempt is recorded when it is found, later: its
                # bar ends at its last known moment (its duration is a lower bound).
                end = start + int((a.duration_ms or 0) * 1000) if a.duration_ms else last_us
            else:
                end = times.get(a.ended_version, last_us)
            attempts.append(
                {
                    "phase": name,
                    "attempt": a.attempt,
                    "status": a.status,
                    "started_version": a.started_version,
                    "ended_version": a.ended_version,
                    "start_us": start,
                    "end_us": max(end, start),
                    "duration_ms": a.duration_ms,
                    "error": a.message if a.error_type is None else f"{a.error_type}: {a.message}",
                }
            )
    ends = [a["end_us"] for a in attempts]
    return {
        "execution_id": run.execution_id,
        "status": run.status,
        "phases": list(dict.fromkeys([*run.phases, *run.phase_runs])),
        "start_us": times.get(run.started_version, last_us),
        "end_us": max([times.get(run.started_version, last_us), *ends]),
        "duration_ms": run.duration_ms,
        "attempts": attempts,
    }


def _writer(p: Provenance) -> list[Any]:
    """A key's writer as the page keeps it: phase, execution, attempt, version, op."""
    return [p.phase, p.execution_id, p.attempt, p.version, p.op]


def _base(state: State) -> dict[str, Any]:
    """Where the page starts folding after retention: the base's data, writers and run."""
    run = state.run
    return {
        "version": state.version,
        "data": state.data,
        "writers": {k: _writer(p) for k, p in state.provenance.items()},
        "run": None if run is None else run.execution_id,
        "attempts": {} if run is None else run.attempts,
    }


def _fold(
    events: list[RecordedEvent], base: State, *, embed_states: bool
) -> tuple[list[list[Any]], dict[int, dict[str, Any]] | None]:
    """The events the page folds, as ``[version, µs, type, key, phase, execution, extra,
    before]`` (``extra``: a KeySet's value, a PhaseStarted's attempt and isolation;
    ``before``: what a write replaced, ``[value]`` or ``[]``, or the keys a clear removed),
    and the state after each write when ``embed_states``, folded on ``base``."""
    state = base.copy()
    folded: list[list[Any]] = []
    states: dict[int, dict[str, Any]] | None = {} if embed_states else None
    for e in events:
        if e.type not in _FOLDED:
            advance(state, (e,))
            continue
        extra: Any = None
        before: Any = None
        if e.type == "KeySet":
            extra = e.payload["value"]
        elif e.type == "PhaseStarted":
            extra = [e.payload["attempt"], bool(e.payload.get("isolated"))]
        if e.type in ("KeySet", "KeyDeleted"):
            key = e.key or ""
            before = [state.data[key]] if key in state.data else []
        elif e.type == "ContextCleared":
            before = list(state.data)
        advance(state, (e,))
        folded.append(
            [e.version, e.recorded_at_us, e.type, e.key, e.phase, e.execution_id, extra, before]
        )
        if states is not None and e.type in _WRITES:
            states[e.version] = {
                "data": dict(state.data),
                "writers": {k: _writer(state.provenance[k]) for k in state.data},
            }
    return folded, states
