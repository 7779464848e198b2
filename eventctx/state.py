"""The fold: a session's state as a pure function of its events; no I/O, no clock.

``apply(state, event)`` is the reference definition and never mutates its input. ``fold``
copies its base once and then updates that private copy, so rebuilding costs one pass.
A snapshot is this state encoded; ``FOLD_VERSION`` names the rules, and a snapshot written
under other rules is ignored.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Final, NamedTuple

import orjson

from eventctx.errors import IntegrityError
from eventctx.events import GENESIS_HASH, RUN_EVENTS, Hasher, RecordedEvent, chain_hash, sha256

__all__ = [
    "FOLD_VERSION",
    "ChainRow",
    "Provenance",
    "Row",
    "RunState",
    "State",
    "advance",
    "advance_chain",
    "advance_rows",
    "apply",
    "attempt_id",
    "decode_state",
    "fold",
    "rolled_back",
    "state_document",
]

FOLD_VERSION: Final = 7
"""Version of the fold rules; bump it when ``advance`` changes meaning, and add the conversion
of retention bases to the new rules (``eventctx.snapshots.BASE_CONVERSIONS``)."""


class Provenance(NamedTuple):
    """The last write of a key: who wrote it, at which version and time, and how."""

    phase: str | None
    execution_id: str | None
    version: int
    recorded_at_us: int
    op: str  # "set" | "delete"
    attempt: int | None = None
    """The attempt of the phase that wrote it (None outside a phase of the session's run)."""
    prior: int | None = None
    """The version of the key's write before this one (None: the key's first)."""
    created_us: int = 0
    """When the key was last set while absent: the start of its current life."""


@dataclass(slots=True)
class RunState:
    """The session's latest run: what resuming it needs to know."""

    execution_id: str
    input: Any
    phases: list[str]
    status: str = "running"  # "running" | "completed" | "failed"
    completed: dict[str, float] = field(default_factory=dict)
    """Duration in ms of each completed phase."""
    open_phase: str | None = None
    """A phase started without an end: its process died (or it is still running)."""
    attempts: dict[str, int] = field(default_factory=dict)
    """The last attempt number of each phase started."""
    started_us: int = 0
    """When the run first started."""
    segments: list[list[int | None]] = field(default_factory=list)
    """[start µs, end µs, start version] of the run in each process that worked on it (end
    None while that process is on it)."""
    open_version: int = 0
    """The version of the open phase's PhaseStarted."""
    tries: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    """Each attempt of each phase: attempt, status, started_us, ended_us, duration_ms,
    lower_bound, error_type, message, retry_after_ms."""

    def copy(self) -> RunState:
        """An independent copy."""
        return RunState(
            self.execution_id,
            self.input,
            list(self.phases),
            self.status,
            dict(self.completed),
            self.open_phase,
            dict(self.attempts),
            self.started_us,
            [list(segment) for segment in self.segments],
            self.open_version,
            {phase: [dict(t) for t in tries] for phase, tries in self.tries.items()},
        )


class State:
    """A session as of ``version``: its data, per-key provenance, phase outputs and metadata.

    A state decoded from a snapshot keeps its provenance encoded until something reads it (a
    write's fold, ``info``, the read side): a restore that only reads the data never decodes it.
    """

    __slots__ = (
        "_encoded_provenance",
        "_provenance",
        "data",
        "deleted",
        "head_hash",
        "metadata",
        "outputs",
        "recorded_at_us",
        "run",
        "ttl_ms",
        "undo",
        "version",
    )

    def __init__(
        self,
        version: int = 0,
        head_hash: bytes = GENESIS_HASH,
        recorded_at_us: int = 0,
        deleted: bool = False,
        ttl_ms: int | None = None,
        data: dict[str, Any] | None = None,
        provenance: dict[str, Provenance] | None = None,
        outputs: dict[str, dict[str, Any]] | None = None,
        metadata: dict[str, dict[str, Any]] | None = None,
        run: RunState | None = None,
        undo: dict[str, dict[str, list[Any]]] | None = None,
    ) -> None:
        self.version = version
        self.head_hash = head_hash
        self.recorded_at_us = recorded_at_us
        self.deleted = deleted
        self.ttl_ms: int | None = ttl_ms
        """The ttl the session was created with (None: never expires)."""
        self.data: dict[str, Any] = {} if data is None else data
        self._provenance: dict[str, Provenance] | None = {} if provenance is None else provenance
        self._encoded_provenance: bytes | None = None
        """The provenance as its snapshot holds it, while ``_provenance`` is None."""
        self.outputs: dict[str, dict[str, Any]] = {} if outputs is None else outputs
        """Phase outputs per execution id, then per phase name."""
        self.metadata: dict[str, dict[str, Any]] = {} if metadata is None else metadata
        """Helper metadata per execution id, then per key."""
        self.run = run
        self.undo: dict[str, dict[str, list[Any]]] = {} if undo is None else undo
        """Per open isolated attempt (``attempt_id``), what each key it wrote held before it:
        ``[present, value, provenance or None]``, restored if the attempt fails."""

    @property
    def provenance(self) -> dict[str, Provenance]:
        """The last write of each key (decoded from the snapshot on first use)."""
        found = self._provenance
        return self._decode_provenance() if found is None else found

    def _decode_provenance(self) -> dict[str, Provenance]:
        """Decode the provenance once: threads that ask at the same time get the same dict."""
        with _DECODING:
            if self._provenance is None:
                assert self._encoded_provenance is not None
                self._provenance = _decoded_provenance(self._encoded_provenance)
                self._encoded_provenance = None
            return self._provenance

    def _fields(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in _FIELDS)

    def __eq__(self, other: object) -> bool:
        if type(other) is not State:
            return NotImplemented
        return self._fields() == other._fields()

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        shown = ", ".join(f"{n}={v!r}" for n, v in zip(_FIELDS, self._fields(), strict=True))
        return f"State({shown})"

    def copy(self) -> State:
        """An independent copy (values are never mutated in place, so sharing them is safe)."""
        copied = State(
            self.version,
            self.head_hash,
            self.recorded_at_us,
            self.deleted,
            self.ttl_ms,
            dict(self.data),
            None,
            {run: dict(phases) for run, phases in self.outputs.items()},
            {run: dict(values) for run, values in self.metadata.items()},
            None if self.run is None else self.run.copy(),
            {attempt: dict(saved) for attempt, saved in self.undo.items()},
        )
        with _DECODING:  # still encoded: the copy shares the bytes, and decodes them on its own
            copied._provenance = None if self._provenance is None else dict(self._provenance)
            copied._encoded_provenance = self._encoded_provenance
        return copied

    def encode(self) -> bytes:
        """The snapshot bytes of this state: its JSON without the provenance, a newline (which
        compact JSON never holds), then the provenance's JSON, which a restore leaves encoded
        until it is read."""
        with _DECODING:
            found, encoded = self._provenance, self._encoded_provenance
        if found is not None:
            encoded = orjson.dumps({key: list(p) for key, p in found.items()})
        assert encoded is not None
        return orjson.dumps(_document(self)) + _PROVENANCE_FOLLOWS + encoded


_FIELDS: Final = (
    "version",
    "head_hash",
    "recorded_at_us",
    "deleted",
    "ttl_ms",
    "data",
    "provenance",
    "outputs",
    "metadata",
    "run",
    "undo",
)
"""A state's fields, as ``__init__`` takes them."""
_DECODING = threading.Lock()
"""Guards the switch of a state's provenance from encoded to decoded."""
_PROVENANCE_FOLLOWS: Final = b"\n"


def _document(state: State) -> dict[str, Any]:
    return {
        "version": state.version,
        "head_hash": state.head_hash.hex(),
        "recorded_at_us": state.recorded_at_us,
        "deleted": state.deleted,
        "ttl_ms": state.ttl_ms,
        "data": state.data,
        "outputs": state.outputs,
        "metadata": state.metadata,
        "run": None if state.run is None else asdict(state.run),
        "undo": state.undo,
    }


def _decoded_provenance(encoded: bytes) -> dict[str, Provenance]:
    try:
        return _provenance_of(orjson.loads(encoded))
    except (orjson.JSONDecodeError, AttributeError, TypeError) as exc:
        raise IntegrityError(f"a snapshot's provenance cannot be decoded ({exc})") from exc


def _provenance_of(document: dict[str, list[Any]]) -> dict[str, Provenance]:
    make = tuple.__new__  # NamedTuple's own __new__ is Python code
    return {key: make(Provenance, p) for key, p in document.items()}


def state_document(data: bytes) -> dict[str, Any]:
    """Snapshot bytes as one JSON document (provenance included), whichever layout they have:
    what converting a retention base to new fold rules works on."""
    head, follows, provenance = data.partition(_PROVENANCE_FOLLOWS)
    document: dict[str, Any] = orjson.loads(head)
    if follows:
        document["provenance"] = orjson.loads(provenance)
    return document


def decode_state(data: bytes) -> State:
    """A state from its snapshot bytes (those ``encode`` gives, or the single JSON document
    snapshots held before the provenance moved after it); the provenance is left encoded."""
    cut = data.find(_PROVENANCE_FOLLOWS)
    raw = orjson.loads(data if cut < 0 else memoryview(data)[:cut])
    state = State(
        raw["version"],
        bytes.fromhex(raw["head_hash"]),
        raw["recorded_at_us"],
        raw["deleted"],
        raw["ttl_ms"],
        raw["data"],
        _provenance_of(raw["provenance"]) if cut < 0 else None,
        raw["outputs"],
        raw["metadata"],
        None if raw["run"] is None else RunState(**raw["run"]),
        raw["undo"],
    )
    if cut >= 0:  # not yet a state another thread sees: no lock needed
        state._provenance, state._encoded_provenance = None, data[cut + 1 :]
    return state


def apply(state: State, event: RecordedEvent) -> State:
    """The state after ``event``; ``state`` is left untouched."""
    return fold((event,), state)


def fold(events: Iterable[RecordedEvent], base: State | None = None) -> State:
    """The state after ``events`` on top of ``base`` (empty if None); ``base`` is left untouched."""
    state = State() if base is None else base.copy()
    advance(state, events)
    return state


def advance(state: State, events: Iterable[RecordedEvent]) -> None:
    """Apply ``events`` to ``state`` in place; only for a state the caller owns.

    Each event must link to the state it is folded onto: its version follows the state's and
    its ``prev_hash`` is the state's chain head. Otherwise (events missing, or events of another
    history of the session, such as one created again after a purge) it raises
    IntegrityError, and the state reflects the events before that one.
    """
    _fold_rows(state, _linked(state, events), encoded=False)


def advance_rows(state: State, rows: Iterable[Row], head_hash: bytes) -> None:
    """Apply stored rows (``Row``: payloads as encoded) to ``state`` in place, for a reader
    that read them in one consistent view and knows the chain hash of the last one.

    Versions must follow on from the state's (IntegrityError otherwise); the rows are folded
    as they come, no object is made per row.
    """
    start = state.version
    _fold_rows(state, rows, encoded=True)
    if state.version != start:
        state.head_hash = head_hash


def advance_chain(
    state: State, session_id: str, rows: Iterable[ChainRow], hasher: Hasher = sha256
) -> None:
    """Apply stored rows with their chain columns to ``state`` in place, checking each one's
    link and recomputing its hash first (IntegrityError naming the version on a mismatch)."""
    _fold_rows(state, _checked(state, session_id, rows, hasher), encoded=True)


Row = tuple[int, str, str | None, str | None, str | None, Any, int]
"""What the fold reads of an event: version, type, key, phase, execution id, payload (its
stored bytes, or decoded) and recorded_at (µs)."""
ChainRow = tuple[int, str, str | None, str | None, str | None, bytes, int, bytes, bytes]
"""A ``Row`` followed by the event's hash and prev_hash, as stored."""


def _linked(state: State, events: Iterable[RecordedEvent]) -> Iterator[Row]:
    """The fold's rows of ``events``, each checked to chain onto the one before; the state's
    chain head follows every event the fold has applied."""
    version, digest = state.version, state.head_hash
    for _, _, number, kind, key, phase, run_id, payload, when, chain, link in events:
        if (number != version + 1 or link != digest) and (version or number == 1):
            raise IntegrityError(
                f"event version {number} does not chain onto version {version}: "
                + ("the log has a gap" if number != version + 1 else "another history"),
                version=number,
            )
        state.head_hash = digest  # the fold asks for this row once the last one is applied
        yield number, kind, key, phase, run_id, payload, when
        version, digest = number, chain
    state.head_hash = digest


def _checked(
    state: State, session_id: str, rows: Iterable[ChainRow], hasher: Hasher
) -> Iterator[Row]:
    """``rows`` whose link and hash are right, as the fold reads them (see ``_linked``)."""
    version, digest = state.version, state.head_hash
    at_v = f"session {session_id!r} version"
    for number, kind, key, phase, run_id, payload, when, stored, prior in rows:
        try:
            chain, link = bytes(stored), bytes(prior)
            computed = chain_hash(
                link, session_id, number, kind, key, phase, run_id, when, payload, hasher
            )
        except TypeError as exc:  # a column of another type than eventctx writes
            raise IntegrityError(
                f"{at_v} {number}: a stored column ({exc}); run verify",
                session_id=session_id,
                version=number,
            ) from exc
        if chain != computed:
            raise IntegrityError(
                f"{at_v} {number}: stored hash does not match its contents; run verify",
                session_id=session_id,
                version=number,
            )
        if link != digest and (version or number == 1):
            raise IntegrityError(
                f"event version {number} does not chain onto version {version}: another history",
                version=number,
            )
        state.head_hash = digest
        yield number, kind, key, phase, run_id, payload, when
        version, digest = number, chain
    state.head_hash = digest


def _fold_rows(state: State, rows: Iterable[Row], *, encoded: bool) -> None:
    """The fold itself: apply ``rows`` in place (payloads decoded here when ``encoded``).

    A fold of stored rows keeps each key's provenance as a plain tuple while it runs (one
    allocation per write, not two) and makes them Provenance once at the end.
    """
    if encoded:  # stored rows may be none (a snapshot at the head): leave its provenance encoded
        rest = iter(rows)
        first = next(rest, None)
        if first is None:
            return
        rows = itertools.chain((first,), rest)
    data, provenance = state.data, state.provenance
    make = tuple.__new__  # Provenance without NamedTuple's Python-level __new__: the hot path
    loads = orjson.loads
    version, at = state.version, state.recorded_at_us
    prior = provenance.get
    undo = state.undo
    attempts = _attempts(state)
    try:
        for number, kind, key, phase, run_id, stored, when in rows:
            if number != version + 1 and (version or number == 1):
                raise IntegrityError(
                    f"event version {number} does not chain onto version {version}: "
                    "the log has a gap",
                    version=number,
                )
            if kind == "KeySet":
                if undo and phase:
                    _remember(state, run_id, phase, (key,))  # type: ignore[arg-type]
                data[key] = stored if encoded else stored["value"]  # type: ignore[index]
                op = "set"
            elif kind == "KeyDeleted":
                if undo and phase:
                    _remember(state, run_id, phase, (key,))  # type: ignore[arg-type]
                data.pop(key, None)  # type: ignore[arg-type]
                op = "delete"
            else:
                payload = loads(stored) if encoded else stored
                _fold_other(state, kind, number, key, phase, run_id, payload, when, attempts)
                if kind in _RUN_EVENTS:
                    attempts = _attempts(state)
                version, at = number, when
                continue
            last = prior(key)  # type: ignore[arg-type]
            written = (
                phase,
                run_id,
                number,
                when,
                op,
                attempts.get((run_id, phase)) if phase else None,
                None if last is None else last[2],
                last[7] if last is not None and last[4] == "set" else when,
            )
            provenance[key] = written if encoded else make(Provenance, written)  # type: ignore[index, assignment]
            version, at = number, when
    except orjson.JSONDecodeError as exc:  # decoding the row after the last one applied
        raise IntegrityError(
            f"version {version + 1}: the stored payload is not JSON ({exc})", version=version + 1
        ) from exc
    finally:  # the state reflects exactly the events applied, even when one is refused
        if encoded and version != state.version:
            _settle(state)
        state.version, state.recorded_at_us = version, at


def _settle(state: State) -> None:
    """After a fold of stored rows: decode the values still held as their stored payloads
    (only the writes that survive are decoded) and make each provenance a Provenance."""
    make, loads = tuple.__new__, orjson.loads
    provenance = state.provenance
    for key, last in provenance.items():
        if type(last) is tuple:
            provenance[key] = make(Provenance, last)
    data = state.data
    try:
        for key, value in data.items():
            if type(value) is bytes:
                data[key] = loads(value)["value"]
        for saved in state.undo.values():
            for key in saved:
                entry = saved[key]
                if type(entry[1]) is bytes:
                    entry[1] = loads(entry[1])["value"]
    except orjson.JSONDecodeError as exc:
        raise IntegrityError(f"the stored payload of key {key!r} is not JSON ({exc})") from exc


def _fold_other(
    state: State,
    kind: str,
    version: int,
    key: str | None,
    phase: str | None,
    run_id: str | None,
    payload: dict[str, Any],
    at: int,
    attempts: dict[tuple[str | None, str | None], int],
) -> None:
    """Fold an event that is not a key write."""
    if kind == "ContextCleared":
        _clear(state, version, phase, run_id, at, attempts)
    elif kind in _RUN_EVENTS:
        _run_event(state, kind, version, key, phase, run_id, payload, at)
    elif kind == "ContextCreated":
        state.data.clear()
        state.provenance.clear()
        state.outputs.clear()
        state.metadata.clear()
        state.run = None
        state.undo.clear()
        state.deleted = False
        state.ttl_ms = payload.get("ttl_ms")
    elif kind == "ContextDeleted":
        state.deleted = True


def _clear(
    state: State,
    version: int,
    phase: str | None,
    run_id: str | None,
    at: int,
    attempts: dict[tuple[str | None, str | None], int],
) -> None:
    """Fold a ContextCleared: every key deleted, each with its provenance."""
    data, provenance = state.data, state.provenance
    if state.undo and phase:
        _remember(state, run_id, phase, list(data))
    attempt = attempts.get((run_id, phase)) if phase else None
    for cleared in data:
        last = provenance.get(cleared)
        provenance[cleared] = Provenance(
            phase, run_id, version, at, "delete", attempt, None if last is None else last[2], at
        )
    data.clear()


def attempt_id(execution_id: str | None, phase: str) -> str:
    """The key of a phase's open attempt in ``State.undo``."""
    return f"{execution_id or ''}\x00{phase}"


def _remember(state: State, execution_id: str | None, phase: str, keys: Iterable[str]) -> None:
    """Before an isolated attempt writes ``keys``, keep what they hold unless it is the
    attempt's own earlier write: a write made from outside the attempt in between is kept
    (and is what a rollback gives back)."""
    saved = state.undo.get(attempt_id(execution_id, phase))
    if saved is None:
        return
    data, provenance = state.data, state.provenance
    for key in keys:
        last = provenance.get(key)
        if key in saved and last is not None and (last[1], last[0]) == (execution_id, phase):
            continue
        saved[key] = [key in data, data.get(key), None if last is None else list(last)]


def rolled_back(state: State, event: RecordedEvent) -> frozenset[str]:
    """The keys folding ``event`` onto ``state`` gives back to what they held before an
    isolated attempt (empty unless ``event`` ends such an attempt with a failure)."""
    if event.type != "PhaseFailed":
        return frozenset()
    run_id, phase = event.execution_id, event.phase
    saved = state.undo.get(attempt_id(run_id, phase or ""), {})
    return frozenset(key for key in saved if _written_by(state, key, run_id, phase))


def _written_by(state: State, key: str, execution_id: str | None, phase: str | None) -> bool:
    """Whether ``key`` was last written by the attempt of ``phase`` in ``execution_id`` (not
    by anyone since)."""
    last = state.provenance.get(key)  # a plain tuple while a fold of stored rows runs
    return last is not None and last[1] == execution_id and last[0] == phase


def _roll_back(state: State, execution_id: str | None, phase: str | None) -> None:
    """A failed isolated attempt: its keys hold again what they held before it."""
    saved = state.undo.pop(attempt_id(execution_id, phase or ""), None)
    if not saved:
        return
    data, provenance = state.data, state.provenance
    for key, (present, value, last) in saved.items():
        if not _written_by(state, key, execution_id, phase):
            continue  # written since, outside the attempt: that write stands
        if present:
            data[key] = value
        else:
            data.pop(key, None)
        if last is None:
            provenance.pop(key, None)
        else:
            provenance[key] = Provenance(*last)


def _attempts(state: State) -> dict[tuple[str | None, str | None], int]:
    """The attempt each phase of the session's run is in, by (execution id, phase)."""
    run = state.run
    if run is None:
        return {}
    return {(run.execution_id, phase): n for phase, n in run.attempts.items()}


_RUN_EVENTS: Final = RUN_EVENTS | {"MetadataSet"}


def _run_event(
    state: State,
    kind: str,
    version: int,
    key: str | None,
    event_phase: str | None,
    run_id: str | None,
    payload: dict[str, Any],
    at: int,
) -> None:
    """Fold an event of the run/phase lifecycle (MetadataSet included)."""
    execution_id = run_id or ""
    if kind == "MetadataSet":
        state.metadata.setdefault(execution_id, {})[key or ""] = payload["value"]
        return
    if kind == "RunStarted":
        state.run = RunState(execution_id, payload["input"], list(payload["phases"]), started_us=at)
        state.run.segments.append([at, None, version])
        return
    run = state.run if state.run is not None and state.run.execution_id == execution_id else None
    phase = event_phase or ""
    if kind == "PhaseStarted" and payload.get("isolated"):
        state.undo[attempt_id(execution_id, phase)] = {}
    elif kind == "PhaseCompleted":
        state.outputs.setdefault(execution_id, {})[phase] = payload["output"]
        state.undo.pop(attempt_id(execution_id, phase), None)
    elif kind == "PhaseFailed":
        _roll_back(state, run_id, event_phase)
    if run is None:
        return
    if kind == "PhaseStarted":
        run.open_phase, run.open_version = phase, version
        run.attempts[phase] = payload["attempt"]
        run.tries.setdefault(phase, []).append(
            {"attempt": payload["attempt"], "status": "running", "started_us": at}
        )
    elif kind in ("PhaseCompleted", "PhaseFailed"):
        run.open_phase = None
        tries = run.tries.get(phase)
        if tries:
            _ended(tries[-1], kind, payload, at)
        if kind == "PhaseCompleted":
            run.completed[phase] = payload["duration_ms"]
    elif kind == "RunResumed":
        run.input = payload["input"]
        if run.segments:
            run.segments[-1][1] = payload["previous_ended_at_us"]
        run.segments.append([at, None, version])
    else:
        run.status = "completed" if kind == "RunCompleted" else "failed"
        if run.segments:
            run.segments[-1][1] = at


def _ended(attempt: dict[str, Any], kind: str, payload: dict[str, Any], at: int) -> None:
    """Record how an attempt ended (its PhaseCompleted or PhaseFailed)."""
    attempt["ended_us"] = at
    attempt["duration_ms"] = payload["duration_ms"]
    if kind == "PhaseCompleted":
        attempt["status"] = "completed"
        return
    interrupted = payload["error_type"] == "interrupted"
    attempt["status"] = "interrupted" if interrupted else "failed"
    attempt["lower_bound"] = payload.get("lower_bound", False)
    attempt["error_type"], attempt["message"] = payload["error_type"], payload["message"]
    attempt["retry_after_ms"] = payload.get("retry_after_ms")
