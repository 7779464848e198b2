"""The Inspector: the read side of the log, for debugging phases and auditing writes.

Every question is answered from the events (and snapshots, a cache of their fold): what the
context was at any version or time, step-by-step replay, who wrote and who read each key, what
changed between two versions or two runs, how long phases take. No method writes to an
inspected session or records activity on it; ``fork`` and ``rerun`` write only new sessions.

The records it returns are in ``eventctx.findings``. Costs are stated per method. "A restore"
is the newest snapshot at or below a version plus the events after it: bounded by the snapshot
policy, not by the length of the history.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime
from heapq import merge
from typing import Any, Final, overload

from eventctx.errors import (
    ConcurrencyError,
    ContextKeyError,
    EventCtxError,
    HistoryRemovedError,
    IntegrityError,
    InvalidInputError,
    SessionExistsError,
    SessionExpiredError,
    SessionNotFoundError,
)
from eventctx.events import (
    RUN_EVENTS,
    NewEvent,
    RecordedEvent,
    encode_payload,
    from_us,
    to_us,
)
from eventctx.findings import (
    ABSENT,
    DELETED,
    Attempt,
    ContextDiff,
    KeyRead,
    KeyWrite,
    PhaseDiff,
    PhaseRun,
    PhaseStats,
    PhaseTiming,
    ReplayStep,
    RerunReport,
    Run,
    SessionDiff,
    VerifyResult,
)
from eventctx.retention import ENDS, Kept, end_status, every_base, previous_values
from eventctx.snapshots import base_state, check_snapshots, removed, restore
from eventctx.state import State, advance, rolled_back
from eventctx.store import EventRow, EventStore, SessionHead
from eventctx.store.bases import Base
from eventctx.store.heads import check_session_id

__all__ = ["Inspector"]

TRIES: Final = 3
"""How often a copy starts again when retention moves the base under it."""


_KEY_TYPES: Final = frozenset({"KeySet", "KeyDeleted", "ContextCleared"})
_RUN_TYPES: Final = RUN_EVENTS
_RESETS: Final = frozenset({"ContextCleared", "ContextCreated"})


# --- the inspector ---------------------------------------------------------------------------


class Inspector:
    """Answers questions about sessions from the log; read-only. Thread-safe.

    ``store`` is an EventStore or a database URL (a store opened here is closed by
    ``close()`` or ``with``).
    """

    def __init__(self, store: EventStore | str, *, chain_key: bytes | str | None = None) -> None:
        """Inspect ``store``: an EventStore, or a URL (with ``chain_key`` when its chains are
        keyed), opened read-only: nothing is created or changed but by ``fork`` and ``rerun``,
        which open the database for writing while they run."""
        self._owns = not isinstance(store, EventStore)
        self._chain_key = chain_key
        self._store = (
            store
            if isinstance(store, EventStore)
            else EventStore.open(store, chain_key=chain_key, read_only=True)
        )

    @property
    def store(self) -> EventStore:
        """The store inspected."""
        return self._store

    def close(self) -> None:
        """Close the store if this Inspector opened it."""
        if self._owns:
            self._store.close()

    def __enter__(self) -> Inspector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the log -----------------------------------------------------------------------------

    def history(
        self,
        session_id: str,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        types: Iterable[str] | None = None,
        phase: str | None = None,
        execution_id: str | None = None,
    ) -> Iterator[RecordedEvent]:
        """The session's events in version order, filtered (times inclusive), streamed; after
        retention, those after its base. Cost: one pass over the session's rows in the
        database; only matches are returned."""
        self._head(session_id)
        return self._store.find(
            session_id,
            from_version=self._first(session_id),
            types=None if types is None else set(types),
            phase=phase,
            execution_id=execution_id,
            since_us=_us(since, "since"),
            until_us=_us(until, "until"),
        )

    def state_at(
        self, session_id: str, version: int | None = None, at: datetime | None = None
    ) -> State:
        """The session's state (data, provenance, outputs, run) after ``version``, or after
        every event recorded at or before ``at`` (an update is never split), or now.
        Cost: a restore; finding the version of ``at`` adds a binary search of point reads."""
        head = self._head(session_id)
        if version is not None and at is not None:
            raise InvalidInputError("give state_at a version or a time, not both")
        if at is not None:
            version = self._version_at(head, at)
        version = self._version(head, version)
        return restore(self._store, session_id, version)[0]

    def base_version(self, session_id: str) -> int:
        """The oldest version the session's history can still answer for: 1, or after
        retention its base's version (earlier ones raise HistoryRemovedError)."""
        self._head(session_id)
        return self._first(session_id) - 1 or 1

    def replay(
        self, session_id: str, start: int | None = None, stop: int | None = None
    ) -> Iterator[ReplayStep]:
        """Each event from ``start`` (the first kept: 1, or after retention the one after the
        base) to ``stop`` with the state right after it and the keys it changed. Cost: a
        restore at ``start - 1``, then one streamed pass; each step's state is a copy (memory
        per step, never per replay)."""
        head = self._head(session_id)
        first = self._first(session_id)
        if start is not None and start < first:
            removed(self._store, session_id, start - 1)
        if start is None and first > head.version:
            return  # retention folded every event into the base: nothing to replay
        start = self._version(head, first if start is None else start)
        stop = self._version(head, stop)
        if stop < start:
            raise InvalidInputError(f"replay stop {stop} is before start {start}")
        state = State() if start == 1 else restore(self._store, session_id, start - 1)[0]
        for event in self._store.read(session_id, start, stop):
            changed = _changed(state, event)
            advance(state, (event,))
            yield ReplayStep(event, state.copy(), changed)

    # --- audit -------------------------------------------------------------------------------

    def blame(
        self, session_id: str, key: str | None = None, version: int | None = None
    ) -> dict[str, KeyWrite]:
        """The last write of each key (or of ``key``) as of ``version`` (now by default),
        deletes included. Cost: a restore, plus one point read per key for the values they
        replaced."""
        state = self.state_at(session_id, version)
        provenance = state.provenance
        if key is not None:
            if key not in provenance:
                raise ContextKeyError(
                    f"key {key!r} was never written in session {session_id!r} "
                    f"up to version {state.version}"
                )
            provenance = {key: provenance[key]}
        base = self._store.base(session_id)
        replaced = previous_values(
            self._store,
            session_id,
            0 if base is None else base.version,
            State() if base is None else base_state(base),
            Kept.of(base).replaced,
            provenance,
        )
        return {
            name: KeyWrite(
                name,
                p.phase,
                p.execution_id,
                p.attempt,
                p.version,
                from_us(p.recorded_at_us),
                state.data[name] if p.op == "set" else ABSENT,
                p.op,
                replaced[name],
                p.prior,
            )
            for name, p in provenance.items()
        }

    def key_history(self, session_id: str, key: str) -> list[KeyWrite]:
        """Every write of ``key``, oldest first (clears and re-creations that removed it
        included); the writes of a failed isolated attempt are marked ``rolled_back``, and the
        next write replaces what the key held before that attempt. After retention it starts
        with the key's last write kept in the base. Cost: one pass over the session's rows in
        the database."""
        self._head(session_id)
        store = self._store
        base = store.base(session_id)
        history: list[KeyWrite] = []
        value: Any = ABSENT
        last: int | None = None
        if base is not None:
            kept = base_state(base)
            if key in kept.provenance:
                history.append(_kept_write(key, kept, Kept.of(base).replaced))
                value, last = history[0].value, history[0].version
        writes = store.find(session_id, key=key, types=_KEY_TYPES, from_version=_after(base))
        context = store.find(session_id, types=_RESETS | _RUN_TYPES, from_version=_after(base))
        attempts: dict[tuple[str | None, str | None], int] = {}
        isolated: dict[tuple[str | None, str | None], _Undo | None] = {}
        for event in merge(writes, context, key=_version_of):
            kind, run = event.type, (event.execution_id, event.phase)
            if kind == "RunStarted":
                attempts.clear()
            elif kind == "PhaseStarted":
                attempts[run] = event.payload["attempt"]
                if event.payload.get("isolated"):
                    isolated[run] = None
            elif kind in ENDS:
                undo = isolated.pop(run, None)
                if kind == "PhaseFailed" and undo is not None and history[-1] is undo.last:
                    for i in undo.writes:  # the attempt's writes did not count
                        history[i] = replace(history[i], rolled_back=True)
                    value, last = undo.value, undo.version
            elif kind in _RESETS and value is ABSENT:
                continue  # it did not hold the key
            elif kind not in _RUN_TYPES:
                undo = None
                if event.phase and run in isolated:
                    undo = isolated[run]
                    if undo is None or not history or history[-1] is not undo.last:
                        undo = _Undo(value, last)  # before it, or after an outside write
                    isolated[run] = undo
                    undo.writes.append(len(history))
                new = event.payload["value"] if kind == "KeySet" else ABSENT
                attempt = attempts.get(run) if event.phase else None
                write = KeyWrite(
                    key,
                    event.phase,
                    event.execution_id,
                    attempt,
                    event.version,
                    event.recorded_at,
                    new,
                    "set" if kind == "KeySet" else "delete",
                    value,
                    last,
                )
                history.append(write)
                if undo is not None:
                    undo.last = write
                value, last = new, event.version
        if not history and base is not None:
            raise HistoryRemovedError(
                f"key {key!r} has no write kept in session {session_id!r}: any before version "
                f"{base.version} were removed by retention",
                session_id=session_id,
                base_version=base.version,
            )
        if not history:
            raise ContextKeyError(f"key {key!r} was never written in session {session_id!r}")
        return history

    def readers(self, session_id: str, key: str) -> list[KeyRead]:
        """The phase attempts that read ``key``, oldest first (those retention removed are kept
        in the base). Cost: one pass over the session's rows in the database (only phase end
        events travel)."""
        self._head(session_id)
        base = self._store.base(session_id)
        kept = Kept.of(base)
        return [
            KeyRead(phase, execution_id, attempt, version, from_us(at), status)
            for version, at, execution_id, phase, attempt, status, _, keys_read in kept.ends
            if key in keys_read
        ] + [
            KeyRead(
                str(e.phase),
                str(e.execution_id),
                e.payload["attempt"],
                e.version,
                e.recorded_at,
                end_status(e),
            )
            for e in self._store.find(session_id, types=ENDS, from_version=_after(base))
            if key in e.payload["keys_read"]
        ]

    def diff(self, session_id: str, v1: int, v2: int) -> ContextDiff:
        """How the data changed from version ``v1`` to ``v2``. Cost: two restores and a
        comparison of the two states."""
        before = self.state_at(session_id, v1).data
        after = self.state_at(session_id, v2).data
        return _diff(before, after)

    # --- runs and timings --------------------------------------------------------------------

    def runs(self, session_id: str) -> list[Run]:
        """Every run of the session, oldest first, with each phase's attempts. Cost: one pass
        over the session's rows in the database (only run and phase events travel)."""
        self._head(session_id)
        runs: dict[str, Run] = {}
        first = self._first(session_id)
        for e in self._store.find(session_id, types=_RUN_TYPES, from_version=first):
            run = runs.get(e.execution_id or "")
            if e.type == "RunStarted":
                runs[e.execution_id or ""] = Run(
                    e.execution_id or "",
                    e.payload["input"],
                    list(e.payload["phases"]),
                    "running",
                    e.version,
                    e.recorded_at,
                )
            elif run is None:
                continue
            elif e.type == "RunResumed":
                run.input = e.payload["input"]  # the input it was resumed with
            elif e.type in ("RunCompleted", "RunFailed"):
                run.status = "completed" if e.type == "RunCompleted" else "failed"
                run.ended_at, run.duration_ms = e.recorded_at, e.payload["duration_ms"]
                run.error_type = e.payload.get("error_type")
                run.message = e.payload.get("message")
            else:
                _phase_event(run, e)
        return list(runs.values())

    def phase_timings(
        self,
        session_id: str | None = None,
        phase: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> Iterator[PhaseTiming]:
        """Every ended phase attempt (of one session, or all), streamed; those retention removed
        come first, from the bases. Cost: one pass over the rows in the database (only phase
        end events travel)."""
        if session_id is not None:
            self._head(session_id)
            found = self._store.base(session_id)
            bases = {} if found is None else {session_id: found}
        else:
            bases = every_base(self._store)
        low, high = _us(since, "since"), _us(until, "until")
        for sid, base in bases.items():
            for _, at, run_id, name, attempt, status, ms, _ in Kept.of(base).ends:
                if (phase is None or name == phase) and (low or at) <= at <= (high or at):
                    yield PhaseTiming(sid, run_id, name, attempt, status, ms, from_us(at))
        for e in self._store.find(
            session_id,
            types=ENDS,
            phase=phase,
            since_us=low,
            until_us=high,
            from_version=_after(bases.get(session_id or "")),
        ):
            if e.session_id in bases and e.version <= bases[e.session_id].version:
                continue  # retention removes it: counted from the base
            status = end_status(e)
            yield PhaseTiming(
                e.session_id,
                str(e.execution_id),
                str(e.phase),
                e.payload["attempt"],
                status,
                e.payload["duration_ms"],
                e.recorded_at,
            )

    def phase_stats(
        self,
        session_id: str | None = None,
        phase: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> dict[str, PhaseStats]:
        """Per phase: attempts ended, failures, retries and duration percentiles, over one
        session or all. Cost: one streamed pass over phase end events; memory per attempt."""
        durations: dict[str, list[float]] = {}
        counts: dict[str, list[int]] = {}
        for t in self.phase_timings(session_id, phase, since, until):
            count = counts.setdefault(t.phase, [0, 0, 0])
            count[0] += 1
            count[1] += t.status != "completed"
            count[2] += t.attempt > 1
            if t.duration_ms is not None and t.status != "interrupted":  # no lower bounds
                durations.setdefault(t.phase, []).append(t.duration_ms)
        return {
            name: _stats(count, sorted(durations.get(name, [])))
            for name, count in sorted(counts.items())
        }

    def diff_sessions(self, first: str, second: str) -> SessionDiff:
        """The latest runs of two sessions aligned by phase: status, duration, output and the
        keys each phase wrote, and the first phase where they diverge. Cost: two passes over
        each session's rows in the database."""
        runs = [self._latest_run(first), self._latest_run(second)]
        writes = [self._phase_writes(s, run) for s, run in zip((first, second), runs, strict=True)]
        # Declared phases first, then any that ran undeclared (a LangGraph run's nodes).
        order = list(
            dict.fromkeys(
                [*runs[0].phases, *runs[1].phases, *runs[0].phase_runs, *runs[1].phase_runs]
            )
        )
        phases = []
        for name in order:
            a, b = (run.phase_runs.get(name, PhaseRun(name)) for run in runs)
            wa, wb = writes[0].get(name, {}), writes[1].get(name, {})
            keys = {
                k: (wa.get(k, ABSENT), wb.get(k, ABSENT))
                for k in dict.fromkeys([*wa, *wb])
                if wa.get(k, ABSENT) != wb.get(k, ABSENT)
            }
            phases.append(
                PhaseDiff(
                    name,
                    (a.status, b.status),
                    (a.duration_ms, b.duration_ms),
                    (a.output, b.output),
                    keys,
                )
            )
        diverged = next((p.phase for p in phases if p.diverges), None)
        return SessionDiff(first, second, phases, diverged)

    # --- what-ifs ----------------------------------------------------------------------------

    def fork(self, session_id: str, new: str, version: int | None = None) -> int:
        """Create session ``new`` whose history is ``session_id`` up to ``version`` (now by
        default), re-chained as its own: it verifies by itself, and writing to either never
        affects the other. Returns the fork's version. Cost: one pass over the events copied."""
        head = self._head(session_id)
        version = self._version(head, version)
        check_session_id(new)
        if self._store.session(new) is not None:
            raise SessionExistsError(f"session {new!r} exists; fork into a new id")
        with self._writable() as store:
            self._copy_into(store, session_id, new, version)
        return version

    def _copy_into(self, store: EventStore, session_id: str, new: str, version: int) -> None:
        """Append ``session_id``'s events up to ``version`` to ``new`` through ``store`` (after
        retention: load its base and the events after it, re-chained under ``new``). When
        retention moves the base while the events are read, it starts again."""
        for _ in range(TRIES):
            base = removed(self._store, session_id, version)  # moved past it meanwhile: raises
            try:
                if base is None:
                    self._append_copies(store, session_id, new, version)
                    return
                head = self._head(session_id)
                rows = self._rechained(store, session_id, new, base, version)
                store.load(new, rows, base, head.created_at_us)
                return
            except _BaseMovedError:
                continue
        raise ConcurrencyError(
            f"retention kept moving the base of session {session_id!r} while it was copied; "
            "nothing was written: try again"
        )

    def _append_copies(self, store: EventStore, session_id: str, new: str, version: int) -> None:
        """Copy a whole log by appending its events to ``new``; a log whose first events go
        meanwhile (retention) leaves no ``new`` behind and raises _BaseMovedError."""
        batch: list[NewEvent] = []
        expected = 1
        for event in self._store.read(session_id, 1, version):
            if event.version != expected:
                if store.session(new) is not None:
                    store.purge(new)  # ours alone so far: nobody else knows the id
                raise _BaseMovedError
            expected += 1
            # The store reads a batch's first and last events as the lifecycle of the session:
            # a re-creation (with its ttl) must start a batch, and a delete must end one only
            # where the history does.
            created = event.type == "ContextCreated"
            if batch and (created or (len(batch) >= 1000 and batch[-1].type != "ContextDeleted")):
                store.append(new, batch)
                batch = []
            batch.append(_copy(event))
        if batch:
            store.append(new, batch)

    def _rechained(
        self, store: EventStore, session_id: str, new: str, base: Base, version: int
    ) -> Iterator[EventRow]:
        """``session_id``'s events after ``base`` up to ``version`` as rows of ``new``, each
        hashed onto the one before it from the base's chain hash."""
        prev = base.head_hash
        expected = base.version + 1
        for number, kind, key, phase, run_id, payload, at, _, _ in self._store.chain_rows(
            session_id, version, base.version + 1
        ):
            if number != expected:  # the base moved on and took these events: not loaded
                raise _BaseMovedError
            expected += 1
            data = bytes(payload)
            digest = store.hash_event(prev, new, number, kind, key, phase, run_id, at, data)
            yield (new, number, kind, key, phase, run_id, data, at, digest, prev)
            prev = digest

    @contextmanager
    def _writable(self) -> Iterator[EventStore]:
        """The store to write a fork through: this one, or (when this Inspector opened the
        database read-only) the same database opened for writing while the call runs."""
        if not self._store.read_only:
            yield self._store
            return
        with EventStore.open(self._store.url, chain_key=self._chain_key) as store:
            yield store

    def rerun(
        self,
        session_id: str,
        phase: str,
        fn: Callable[[Any], Any],
        *,
        execution_id: str | None = None,
        attempt: int | None = None,
    ) -> RerunReport:
        """Run ``fn`` as ``phase`` in a fork of the session at the state just before the
        recorded attempt started (the run's input, earlier outputs and metadata included) and
        compare it with that attempt. The recorded session is untouched; the fork is kept
        (``RerunReport.fork_id``) for inspection."""
        # Running a phase needs the layers above the read side; only rerun does.
        from eventctx.manager import ContextManager  # noqa: PLC0415
        from eventctx.phases import ContextAwarePhase  # noqa: PLC0415

        run = self._run_of(session_id, phase, execution_id)
        attempts = run.phase_runs[phase].attempts
        recorded = attempts[-1] if attempt is None else _attempt(attempts, attempt, phase)
        fork_id = f"{session_id[:400]}~rerun-{uuid.uuid4().hex[:12]}"
        at = self.fork(session_id, fork_id, recorded.started_version - 1)
        index = run.phases.index(phase)
        previous = run.phases[index - 1] if index else None
        error: BaseException | None = None
        output: Any = ABSENT
        with self._writable() as store, ContextManager(store, cleanup_interval=None) as manager:
            ctx = manager.get_context(fork_id)
            started = ctx.version
            try:
                output, _ = ContextAwarePhase(fn, name=phase).attempt(
                    ctx, run.execution_id, run.input, recorded.attempt, previous
                )
            except Exception as exc:
                error = exc
        ended = list(self._store.find(fork_id, types=ENDS, from_version=started + 1))
        duration = ended[-1].payload["duration_ms"] if ended else 0.0
        before = set(self.state_at(fork_id, at).data)
        mine = _writes(
            self._store.find(fork_id, types=_KEY_TYPES, from_version=at + 1), phase, before
        )
        theirs = _writes(
            self._store.find(
                session_id,
                types=_KEY_TYPES,
                from_version=recorded.started_version,
                to_version=recorded.ended_version,
            ),
            phase,
            before,
        )
        keys = {
            k: (theirs.get(k, ABSENT), mine.get(k, ABSENT))
            for k in dict.fromkeys([*theirs, *mine])
            if theirs.get(k, ABSENT) != mine.get(k, ABSENT)
        }
        return RerunReport(
            session_id,
            fork_id,
            phase,
            run.execution_id,
            recorded.attempt,
            recorded.status,
            "failed" if error is not None else "completed",
            recorded.duration_ms,
            duration,
            recorded.output,
            output,
            error,
            keys,
        )

    @overload
    def verify(self, session_id: str) -> VerifyResult: ...

    @overload
    def verify(self, session_id: None = None) -> list[VerifyResult]: ...

    def verify(self, session_id: str | None = None) -> VerifyResult | list[VerifyResult]:
        """Check the hash chain of one session (or of every session), and each snapshot a
        restore may use against the fold of the log: a result naming the session and, on
        failure, the first version that failed. Cost: one pass over the chain per session,
        and a fold up to the newest snapshot of each session that has one."""
        if session_id is not None:
            self._head(session_id)
            return self._verify(session_id)
        snapshotted = self._store.snapshotted()
        snapshotted |= {b.session_id for b in self._store.bases.all() if isinstance(b, Base)}
        return [
            self._snapshots_of(_verified(sid, found))
            if sid in snapshotted
            else _verified(sid, found)
            for sid, found in self._store.verify_all()
        ]

    # --- helpers -----------------------------------------------------------------------------

    def _verify(self, session_id: str) -> VerifyResult:
        try:
            return self._snapshots_of(_verified(session_id, self._store.verify(session_id)))
        except EventCtxError as exc:
            return _verified(session_id, exc)

    def _snapshots_of(self, result: VerifyResult) -> VerifyResult:
        """``result`` with the session's snapshots checked too (when its chain verified)."""
        if not result.ok:
            return result
        try:
            checked = check_snapshots(self._store, result.session_id)
        except EventCtxError as exc:
            return _verified(result.session_id, exc)
        return replace(result, snapshots=checked)

    def _head(self, session_id: str) -> SessionHead:
        head = self._store.session(session_id)
        if head is None:
            raise SessionNotFoundError(
                f"session {session_id!r} does not exist: it was never created, or it was "
                "purged or removed by compaction after its ttl"
            )
        return head

    def _first(self, session_id: str) -> int:
        """The first version the session's log still holds: 1, or its base's version + 1."""
        return _after(self._store.base(session_id))

    def _version(self, head: SessionHead, version: int | None) -> int:
        """``version`` (None: the head) if the session can answer for it."""
        if version is None:
            return head.version
        if type(version) is not int or not 1 <= version <= head.version:
            raise InvalidInputError(
                f"session {head.session_id!r} has versions {self._first(head.session_id)} to "
                f"{head.version}, not {version!r}"
            )
        removed(self._store, head.session_id, version)
        return version

    def _version_at(self, head: SessionHead, at: datetime) -> int:
        """The highest version recorded at or before ``at`` (times never go backwards within a
        session, so a binary search of point reads finds it)."""
        at_us = _us(at, "at")
        assert at_us is not None
        base = self._store.base(head.session_id)
        found = self._store.version_at(head.session_id, at_us, _after(base), head.version)
        if found is None and base is not None:
            if base_state(base).recorded_at_us > at_us:
                raise HistoryRemovedError(
                    f"session {head.session_id!r}: its history before "
                    f"{from_us(base_state(base).recorded_at_us).isoformat()} was removed by "
                    "retention; ask about a later time",
                    session_id=head.session_id,
                    base_version=base.version,
                )
            found = base.version
        if found is None:
            raise InvalidInputError(
                f"session {head.session_id!r} has no event at or before {at.isoformat()}"
            )
        return found

    def _latest_run(self, session_id: str) -> Run:
        runs = self.runs(session_id)
        if not runs:
            raise InvalidInputError(f"session {session_id!r} has no run")
        return runs[-1]

    def _run_of(self, session_id: str, phase: str, execution_id: str | None) -> Run:
        runs = self.runs(session_id)
        if execution_id is not None:
            runs = [r for r in runs if r.execution_id == execution_id]
            if not runs:
                raise self._perhaps_removed(
                    session_id, f"has no run with execution id {execution_id!r}"
                )
        for run in reversed(runs):
            if phase in run.phase_runs:
                return run
        raise self._perhaps_removed(session_id, f"has no run in which phase {phase!r} ran")

    def _perhaps_removed(self, session_id: str, what: str) -> EventCtxError:
        """The error for a run not found: HistoryRemovedError when retention removed runs of
        the session (it may have been one of them), else InvalidInputError."""
        base = self._store.base(session_id)
        if base is None:
            return InvalidInputError(f"session {session_id!r} {what}")
        return HistoryRemovedError(
            f"session {session_id!r} {what} after version {base.version}; earlier runs were "
            "removed by retention",
            session_id=session_id,
            base_version=base.version,
        )

    def _phase_writes(self, session_id: str, run: Run) -> dict[str, dict[str, Any]]:
        """Per phase, what its last attempt in ``run`` left in each key it wrote."""
        found: dict[str, dict[str, Any]] = {}
        for name, phase_run in run.phase_runs.items():
            last = phase_run.attempts[-1]
            events = self._store.find(
                session_id,
                types=_KEY_TYPES,
                execution_id=run.execution_id,
                from_version=last.started_version,
                to_version=last.ended_version,
            )
            before = restore(self._store, session_id, last.started_version - 1)[0].data
            found[name] = _writes(events, name, set(before))
        return found


# --- pure helpers ----------------------------------------------------------------------------


def _verified(session_id: str, found: int | EventCtxError) -> VerifyResult:
    """A check's result: the events verified, or what failed (and at which version)."""
    if isinstance(found, int):
        return VerifyResult(session_id, True, found)
    version = found.version if isinstance(found, IntegrityError) else None
    removing = isinstance(found, SessionExpiredError)
    return VerifyResult(session_id, False, 0, version, str(found), being_removed=removing)


def _us(at: datetime | None, name: str) -> int | None:
    if at is None:
        return None
    if not isinstance(at, datetime):
        raise InvalidInputError(f"{name} must be a datetime, not {type(at).__name__}")
    try:
        return to_us(at)
    except ValueError as exc:
        raise InvalidInputError(f"{name}: {exc}") from None


def _version_of(event: RecordedEvent) -> int:
    return event.version


def _kept_write(key: str, state: State, replaced: dict[str, Any]) -> KeyWrite:
    """The last write of ``key`` that a retention base keeps (its event was removed)."""
    p = state.provenance[key]
    return KeyWrite(
        key,
        p.phase,
        p.execution_id,
        p.attempt,
        p.version,
        from_us(p.recorded_at_us),
        state.data[key] if p.op == "set" else ABSENT,
        p.op,
        replaced.get(key, ABSENT),
        p.prior,
    )


class _BaseMovedError(Exception):
    """Retention moved a session's base while its events were being copied."""


def _after(base: Base | None) -> int:
    """The first version after ``base`` (1 without one)."""
    return 1 if base is None else base.version + 1


def _changed(state: State, event: RecordedEvent) -> frozenset[str]:
    """The keys ``event`` changes when folded onto ``state``."""
    if event.type in ("KeySet", "KeyDeleted"):
        return frozenset((event.key or "",))
    if event.type in _RESETS:
        return frozenset(state.data)
    return rolled_back(state, event)


@dataclass(slots=True)
class _Undo:
    """What a key held before an isolated attempt first wrote it, and that attempt's writes."""

    value: Any
    version: int | None
    writes: list[int] = field(default_factory=list)
    last: KeyWrite | None = None


def _diff(before: dict[str, Any], after: dict[str, Any]) -> ContextDiff:
    return ContextDiff(
        {k: v for k, v in after.items() if k not in before},
        {k: v for k, v in before.items() if k not in after},
        {k: (before[k], v) for k, v in after.items() if k in before and before[k] != v},
    )


def _phase_event(run: Run, event: RecordedEvent) -> None:
    """Fold a phase event into the run's phase attempts."""
    name = event.phase or ""
    phase = run.phase_runs.setdefault(name, PhaseRun(name))
    if event.type == "PhaseStarted":
        phase.attempts.append(
            Attempt(event.payload["attempt"], "running", event.version, event.recorded_at)
        )
        return
    if not phase.attempts or phase.attempts[-1].ended_version is not None:
        return  # an end without a start: nothing to attach it to
    attempt = phase.attempts[-1]
    attempt.status = end_status(event)
    attempt.ended_version = event.version
    attempt.keys_read = list(event.payload["keys_read"])
    attempt.duration_ms = event.payload["duration_ms"]
    if event.type == "PhaseCompleted":
        attempt.output = event.payload["output"]
    else:
        attempt.error_type = event.payload["error_type"]
        attempt.message = event.payload["message"]


def _attempt(attempts: list[Attempt], number: int, phase: str) -> Attempt:
    for candidate in attempts:
        if candidate.attempt == number:
            return candidate
    raise InvalidInputError(f"phase {phase!r} has no attempt {number} in that run")


def _writes(events: Iterable[RecordedEvent], phase: str, present: set[str]) -> dict[str, Any]:
    """What the writes of ``phase`` among ``events`` left in each key (DELETED: removed), the
    keys in ``present`` being those the context held before them (a clear removes those too)."""
    found: dict[str, Any] = {}
    present = set(present)
    for event in events:
        if event.phase != phase:
            continue
        if event.type == "ContextCleared":
            found = dict.fromkeys([*present, *found], DELETED)
            present.clear()
        elif event.type == "KeyDeleted":
            found[event.key or ""] = DELETED
            present.discard(event.key or "")
        else:
            found[event.key or ""] = event.payload["value"]
            present.add(event.key or "")
    return found


def _may_split(last: NewEvent, following: RecordedEvent) -> bool:
    """Whether a fork's batch may end between two events: the store reads a batch that starts
    with a re-creation, or ends in a delete, as a lifecycle change of the whole batch."""
    return following.type != "ContextCreated" and last.type != "ContextDeleted"


def _copy(event: RecordedEvent) -> NewEvent:
    """A recorded event as a new one (same type, envelope and canonical payload)."""
    payload = event.payload
    return NewEvent(
        event.type, payload, encode_payload(payload), event.key, event.phase, event.execution_id
    )


def _percentile(ordered: list[float], p: float) -> float:
    """The ``p``-th percentile of sorted values, interpolating linearly between ranks."""
    if not ordered:
        return math.nan
    rank = (len(ordered) - 1) * p / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _stats(count: list[int], ordered: list[float]) -> PhaseStats:
    return PhaseStats(
        count[0],
        count[1],
        count[2],
        sum(ordered) / len(ordered) if ordered else math.nan,
        _percentile(ordered, 50),
        _percentile(ordered, 95),
        _percentile(ordered, 99),
        ordered[-1] if ordered else math.nan,
    )
