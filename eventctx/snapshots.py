"""Snapshots: when to take one, and restoring a state from the latest one plus its tail.

A snapshot is a cache of the fold, written after the append it describes has committed, in
its own transaction: losing one never loses data. One is taken once the bytes appended since
the last one reach the state's own size (so snapshots never cost more storage than the events
they summarise) and either ``MIN_BYTES`` or ``snapshot_every`` events have gone by; and, to
keep restores short, once ``TAIL_EVENTS`` events have gone by whose rows (payloads, hashes and
the other columns) take as much storage as the state.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from itertools import chain, islice
from typing import Any, Final

import orjson

from eventctx import faults
from eventctx.clock import check_count
from eventctx.errors import HistoryRemovedError, IntegrityError, SessionNotFoundError
from eventctx.events import GENESIS_HASH
from eventctx.state import (
    FOLD_VERSION,
    State,
    advance,
    advance_chain,
    advance_rows,
    decode_state,
    state_document,
)
from eventctx.store import EventStore
from eventctx.store.bases import Base
from eventctx.store.log import EventLog
from eventctx.store.sessionread import SessionRead

__all__ = [
    "BASE_CONVERSIONS",
    "MIN_BYTES",
    "ROW_BYTES",
    "TAIL_EVENTS",
    "Restored",
    "SnapshotPolicy",
    "base_state",
    "check_snapshots",
    "fold_log",
    "removed",
    "restore",
    "restore_from",
]

MIN_BYTES: Final = 16 * 1024
"""Appended bytes after which a small state is snapshotted even before ``snapshot_every``."""
TAIL_EVENTS: Final = 128
"""A tail this long is snapshotted as soon as its rows take as much storage as the state."""
ROW_BYTES: Final = 96
"""What an event row stores besides its payload and session id, at least: two 32-byte hashes,
its version, time, position and type."""

Restored = tuple[State, int, int]
"""A restored state, the size of the snapshot it started from (0: none) and its tail length."""

log = logging.getLogger("eventctx")


class SnapshotPolicy:
    """Counts what was appended since the last snapshot of one session and takes the next."""

    __slots__ = ("bytes_since", "events_since", "every", "rows_since", "state_size")

    def __init__(self, every: int, state_size: int = 0, events_since: int = 0) -> None:
        self.every = every
        self.state_size = state_size
        self.events_since = events_since
        self.bytes_since = 0
        """Payload bytes appended since the last snapshot."""
        self.rows_since = 0
        """What those events' rows store (payloads, hashes and the other columns), at least."""

    def after_append(
        self, store: EventStore, session_id: str, state: State, events: int, size: int
    ) -> bool:
        """Count an append; snapshot ``state`` when due, returning whether one was saved. A
        failed snapshot is logged, not raised: the events are committed, and the next due
        snapshot tries again."""
        self.events_since += events
        self.bytes_since += size
        self.rows_since += size + events * (ROW_BYTES + len(session_id))
        if not self._due():
            return False
        try:
            encoded = state.encode()
            faults.point("snapshot.before_save")
            store.save_snapshot(session_id, state.version, FOLD_VERSION, state.head_hash, encoded)
        except Exception as exc:  # a cache: its failure never fails the write that committed
            log.warning(
                "snapshot of %r at version %d not saved: %s", session_id, state.version, exc
            )
            return False
        self.state_size = len(encoded)
        self.events_since = self.bytes_since = self.rows_since = 0
        return True

    def _due(self) -> bool:
        """The payloads since the last snapshot outweigh the state (and ``MIN_BYTES`` or
        ``snapshot_every`` events have gone by), or a tail of ``TAIL_EVENTS`` events takes as
        much storage as the state: either way, no more snapshot bytes than event bytes."""
        if self.bytes_since >= self.state_size and (
            self.bytes_since >= MIN_BYTES or self.events_since >= self.every
        ):
            return True
        return self.events_since >= TAIL_EVENTS and self.rows_since >= self.state_size


def restore(
    store: EventStore, session_id: str, version: int, head_hash: bytes | None = None
) -> Restored:
    """The state at ``version``: the newest usable snapshot at or below it plus the tail, each
    event of which is checked against its hash as it is folded; one read transaction.

    Returns (state, snapshot size, tail length). ``head_hash``, when given, must be the chain
    hash at ``version``. A snapshot that is not what was written (its digest), whose state
    cannot be decoded, or that leads elsewhere is skipped with a warning for a full fold (its
    provenance is decoded only when first read, and raises IntegrityError then if it cannot
    be); a log that fails its own checks raises IntegrityError naming the session and version.
    """
    return store.reading(session_id, lambda read: restore_from(read, version, head_hash))


def restore_from(read: SessionRead, version: int, head_hash: bytes | None = None) -> Restored:
    """``restore`` inside a read transaction the caller holds."""
    session_id = read.session_id
    found = _snapshot(read, version)
    if found is not None:
        state, size = found
        try:
            tail = _tail(read, state, version)
        except IntegrityError:  # not the snapshot's history (purged since), or a bad event
            tail = -1
        if tail >= 0 and _matches(state, version, head_hash):
            return state, size, tail
        log.warning(
            "snapshot of %r at version %d does not match its log; ignored",
            session_id,
            state.version - max(tail, 0),
        )
    try:
        state, size, tail = _from_start(read, version)
    except IntegrityError:
        if read.base() is None:
            raise
        # Retention removed the start of the log while it was read: fold from its base.
        state, size, tail = _from_start(read, version)
    if tail == 0 and not size and read.head() is None:
        raise SessionNotFoundError(f"session {session_id!r} does not exist")
    if not _matches(state, version, head_hash):
        raise IntegrityError(
            f"session {session_id!r}: folding the log gives version {state.version}, expected "
            f"{version} with the head row's chain hash; run verify",
            session_id=session_id,
        )
    return state, size, tail


def _from_start(read: SessionRead, version: int) -> Restored:
    """The state at ``version`` folded from the start of the log, or from the session's
    retention base once its first events are gone: (state, base size, events folded). The
    base is looked up only then, so a whole log costs no extra read."""
    session_id = read.session_id
    try:
        rows = read.chain_rows(1, version)
        first = next(rows, None)
        base = None if first is not None and first[0] == 1 else read.base()
        if base is None:
            if first is not None and first[0] != 1:
                raise IntegrityError("the log has no version 1 and no retention base", version=1)
            state = State()
            whole = chain(() if first is None else (first,), rows)
            advance_chain(state, session_id, whole, read.hasher)
            return state, 0, state.version
        if version < base.version:
            raise _removed_error(session_id, base)
        state = base_state(base)
        return state, len(base.state), _tail(read, state, version)
    except IntegrityError as exc:
        if exc.session_id is not None:
            raise
        raise IntegrityError(
            f"session {session_id!r}: {exc}; run verify", session_id=session_id, version=exc.version
        ) from exc


def removed(source: EventLog, session_id: str, version: int) -> Base | None:
    """The session's retention base; HistoryRemovedError when ``version`` is below it (that
    part of the history was folded into the base and removed)."""
    base = source.base(session_id)
    if base is not None and version < base.version:
        raise _removed_error(session_id, base)
    return base


def _removed_error(session_id: str, base: Base) -> HistoryRemovedError:
    return HistoryRemovedError(
        f"session {session_id!r}: versions before {base.version} were removed by retention "
        f"(their effect is kept in the base at version {base.version}); ask about version "
        f"{base.version} or later",
        session_id=session_id,
        base_version=base.version,
    )


BASE_CONVERSIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {}
"""How a retention base's state (decoded JSON) written under fold rules N becomes one under
N + 1. A snapshot under old rules is simply ignored, but a base cannot be folded again (its
events are gone): a change of ``FOLD_VERSION`` must add its conversion here."""


def base_state(base: Base) -> State:
    """The state a retention base holds, converted to the current fold rules."""
    if base.fold_version == FOLD_VERSION:
        return decode_state(base.state)
    raw = state_document(base.state)
    for rules in range(base.fold_version, FOLD_VERSION):
        convert = BASE_CONVERSIONS.get(rules)
        if convert is None:
            raise IntegrityError(
                f"session {base.session_id!r}: its retention base was written under fold rules "
                f"{base.fold_version}, and this eventctx (rules {FOLD_VERSION}) cannot convert "
                "them; read it with the eventctx release that wrote it",
                session_id=base.session_id,
                version=base.version,
            )
        raw = convert(raw)
    if base.fold_version > FOLD_VERSION:
        raise IntegrityError(
            f"session {base.session_id!r}: its retention base was written under newer fold "
            f"rules ({base.fold_version}) than this eventctx's ({FOLD_VERSION}); upgrade eventctx",
            session_id=base.session_id,
            version=base.version,
        )
    return decode_state(orjson.dumps(raw))


def fold_log(store: EventStore, session_id: str, to_version: int | None = None) -> State:
    """The state at ``to_version`` (None: the head) folded from the whole log, without a
    snapshot: what a replay and ``verify`` compare against.

    One consistent read streams only the columns the fold needs and folds rows as they come
    (memory follows the state, not the history). Versions are checked to follow on; the
    chain hash is taken from the last event (``EventStore.verify`` checks every hash).
    """

    if to_version is not None:
        check_count(to_version, "to_version")

    def fold(read: SessionRead) -> tuple[State, int]:
        head = read.head()
        if head is None:
            raise SessionNotFoundError(f"session {session_id!r} does not exist")
        high = head.version if to_version is None else min(to_version, head.version)
        base = read.base()
        if base is not None and high < base.version:
            raise _removed_error(session_id, base)
        state = State() if base is None else base_state(base)
        last = read.hash_at(high)
        try:
            advance_rows(state, read.fold_rows(state.version + 1, high), last or GENESIS_HASH)
        except IntegrityError as exc:
            raise IntegrityError(
                f"session {session_id!r}: {exc}; run verify",
                session_id=session_id,
                version=exc.version,
            ) from exc
        return state, high

    state, high = store.reading(session_id, fold, consistent=True)
    if state.version != high:
        raise IntegrityError(
            f"session {session_id!r}: the log ends at version {state.version}, not {high}; "
            "run verify",
            session_id=session_id,
            version=state.version + 1,
        )
    return state


def check_snapshots(store: EventStore, session_id: str) -> int:
    """Check every snapshot of a session a restore may use against the fold of its log (one
    pass): the number checked. The first that is not the fold at its version (or no longer
    matches its digest) raises IntegrityError naming the session and version."""
    base = store.base(session_id)
    start = 0 if base is None else base.version
    state = State() if base is None else base_state(base)  # a base that cannot be read fails
    stored = [s for s in store.snapshots(session_id) if s[1] == FOLD_VERSION and s[0] > start]
    if not stored:
        return 0
    events = store.read(session_id, start + 1, stored[-1][0], verify=True)
    for version, _, head_hash, data in stored:
        advance(state, islice(events, version - state.version))
        try:
            same = decode_state(data) == state and head_hash == state.head_hash
        except Exception:
            same = False
        if not same:
            raise IntegrityError(
                f"session {session_id!r}: the snapshot at version {version} is not the fold "
                "of the log at that version",
                session_id=session_id,
                version=version,
            )
    return len(stored)


def _snapshot(read: SessionRead, version: int) -> tuple[State, int] | None:
    """The newest snapshot at or below ``version`` and its size, or None when there is none
    or it cannot be trusted (logged: a snapshot is a cache, the log is the truth)."""
    try:
        found = read.snapshot(FOLD_VERSION, version)
        if found is None:
            return None
        return decode_state(found[2]), len(found[2])
    except IntegrityError as exc:
        log.warning("%s; restoring from the log", exc)
    except Exception as exc:
        log.warning(
            "snapshot of %r cannot be decoded (%s: %s); restoring from the log",
            read.session_id,
            type(exc).__name__,
            exc,
        )
    return None


def _tail(read: SessionRead, state: State, version: int) -> int:
    start = state.version
    advance_chain(state, read.session_id, read.chain_rows(start + 1, version), read.hasher)
    return state.version - start


def _matches(state: State, version: int, head_hash: bytes | None) -> bool:
    return state.version == version and (head_hash is None or state.head_hash == head_hash)
