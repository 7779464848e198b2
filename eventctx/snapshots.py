"""Snapshots: when to take one, and restoring a state from the latest one plus its tail.

A snapshot is a cache of the fold, written after the append it describes has committed, in
its own transaction: losing one never loses data. One is taken once the bytes appended since
the last one reach the state's own size (so snapshots never cost more storage than the events
they summarise) and either ``MIN_BYTES`` or ``snapshot_every`` events have gone by.
"""

from __future__ import annotations

import logging
from typing import Final

from eventctx import faults
from eventctx.errors import IntegrityError
from eventctx.state import FOLD_VERSION, State, advance, decode_state
from eventctx.store import EventStore
from eventctx.store.log import EventLog

__all__ = ["MIN_BYTES", "SnapshotPolicy", "restore"]

MIN_BYTES: Final = 64 * 1024
"""Appended bytes after which a small state is snapshotted even before ``snapshot_every``."""

log = logging.getLogger("eventctx")


class SnapshotPolicy:
    """Counts what was appended since the last snapshot of one session and takes the next."""

    __slots__ = ("bytes_since", "events_since", "every", "state_size")

    def __init__(self, every: int, state_size: int = 0, events_since: int = 0) -> None:
        self.every = every
        self.state_size = state_size
        self.events_since = events_since
        self.bytes_since = 0

    def after_append(
        self, store: EventStore, session_id: str, state: State, events: int, size: int
    ) -> None:
        """Count an append; snapshot ``state`` when due. A failed snapshot is logged, not raised:
        the events are committed, and the next due snapshot tries again."""
        self.events_since += events
        self.bytes_since += size
        if self.bytes_since < self.state_size:
            return
        if self.bytes_since < MIN_BYTES and self.events_since < self.every:
            return
        try:
            encoded = state.encode()
            faults.point("snapshot.before_save")
            store.save_snapshot(session_id, state.version, FOLD_VERSION, state.head_hash, encoded)
        except Exception as exc:  # a cache: its failure never fails the write that committed
            log.warning(
                "snapshot of %r at version %d not saved: %s", session_id, state.version, exc
            )
            return
        self.state_size = len(encoded)
        self.events_since = self.bytes_since = 0


def restore(
    source: EventLog, session_id: str, version: int, head_hash: bytes | None = None
) -> tuple[State, int, int]:
    """The state at ``version``: the newest usable snapshot at or below it plus the tail.

    Returns (state, snapshot size, tail length). ``head_hash``, when given, must be the chain
    hash at ``version``; a snapshot that leads elsewhere is skipped for a full fold, and a
    log that still disagrees raises IntegrityError.
    """
    found = source.latest_snapshot(session_id, FOLD_VERSION, version)
    if found is not None:
        state = decode_state(found[2])
        try:
            tail = _tail(source, session_id, state, version)
        except IntegrityError:  # the tail is not of the snapshot's history (purged since)
            tail = -1
        if tail >= 0 and _matches(state, version, head_hash):
            return state, len(found[2]), tail
        log.warning(
            "snapshot of %r at version %d does not match its log; ignored", session_id, found[0]
        )
    state = State()
    try:
        tail = _tail(source, session_id, state, version)
    except IntegrityError as exc:
        raise IntegrityError(f"session {session_id!r}: {exc}; run verify") from exc
    if not _matches(state, version, head_hash):
        raise IntegrityError(
            f"session {session_id!r}: folding the log gives version {state.version}, expected "
            f"{version} with the head row's chain hash; run verify"
        )
    return state, 0, tail


def _tail(source: EventLog, session_id: str, state: State, version: int) -> int:
    start = state.version
    advance(state, source.read(session_id, start + 1, version))
    return state.version - start


def _matches(state: State, version: int, head_hash: bytes | None) -> bool:
    return state.version == version and (head_hash is None or state.head_hash == head_hash)
