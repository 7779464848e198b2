"""TTL cleanup: physically remove sessions whose last activity is older than their ttl.

``compact(store)`` is a plain function returning a report; the manager's scheduled job only
calls it. It works in bounded chunks, each its own transaction, so writers to other sessions
wait for one chunk at most. Every session is re-checked under its head-row lock before it is
touched: one written since it was listed is kept whole, and a writer that comes after it was
marked gets SessionExpiredError, so no acknowledged write ever vanishes and no session is
left half-removed (a large one is marked first, then emptied chunk by chunk).

After compaction nothing of a removed session remains: its history, snapshots, blame and
replay are gone with it. Sessions without a ttl, and live ones, are never touched by TTL
removal. With ``retain``, live sessions keep only the events of that window, the rest folded
into their base (``eventctx.retention`` says what the read side can still answer).
One compactor runs at a time across processes and hosts (a lease row, renewed per chunk).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Final

from eventctx import faults
from eventctx.errors import EventCtxError
from eventctx.exchange import archive_session
from eventctx.owners import dead_here, new_owner
from eventctx.retention import Plan, build_base, check_window, plan
from eventctx.store import EventStore

__all__ = ["CompactionReport", "compact", "finish_removal"]

LEASE: Final = "compaction"
CHUNK_EVENTS: Final = 5000
"""Events removed per transaction (many small sessions share one; a large one takes several)."""
_LIST: Final = 1000


@dataclass(slots=True)
class CompactionReport:
    """What a compaction run did (or, with ``dry_run``, would do)."""

    dry_run: bool = False
    sessions: list[str] = field(default_factory=list)
    """Ids of the sessions removed (or that would be)."""
    events_removed: int = 0
    snapshots_removed: int = 0
    kept: int = 0
    """Sessions listed as expired but written before they could be removed."""
    archived: list[str] = field(default_factory=list)
    """The archive files written (with an archive directory)."""
    trimmed: dict[str, int] = field(default_factory=dict)
    """With ``retain``: each session whose oldest events were folded into its base (or would
    be), with its new base version."""
    events_trimmed: int = 0
    """Events retention removed (or would remove) from live sessions."""
    skipped: str | None = None
    """Why the run did nothing or stopped early (another compactor holds the lease)."""
    duration_s: float = 0.0

    @property
    def sessions_removed(self) -> int:
        """How many sessions were removed."""
        return len(self.sessions)


def compact(
    store: EventStore,
    *,
    dry_run: bool = False,
    chunk_events: int = CHUNK_EVENTS,
    lease: timedelta = timedelta(seconds=60),
    archive: str | os.PathLike[str] | None = None,
    retain: timedelta | None = None,
) -> CompactionReport:
    """Remove every expired session from ``store``; with ``dry_run`` only list them. With an
    ``archive`` directory, each is first exported there, durably (``archive_session``): one
    that cannot be archived stays, frozen, and is not removed. With ``retain``, then fold
    every live session's events older than that window into its base and remove them."""
    started = time.perf_counter()
    report = CompactionReport(dry_run=dry_run)
    if retain is not None:
        check_window(retain)
    if dry_run:
        for session_id, version in store.removal.expired_sessions(store.clock(), 2**31 - 1):
            report.sessions.append(session_id)
            report.events_removed += version
        if retain is not None:
            for planned in _plans(store, retain):
                report.trimmed[planned.session_id] = planned.cut
                report.events_trimmed += planned.events
        report.duration_s = time.perf_counter() - started
        return report
    owner = new_owner()
    holder = store.take_named_lease(LEASE, owner, lease)
    if holder is not None and dead_here(holder.owner):  # a compactor that crashed: go on now
        holder = store.take_named_lease(LEASE, owner, lease, previous=holder.owner)
    if holder is not None:
        report.skipped = f"another compactor ({holder[0]}) holds the lease until {holder[1]}"
        report.duration_s = time.perf_counter() - started
        return report
    try:
        compactor = _Compactor(store, report, owner, chunk_events, lease, archive)
        if compactor.run() and retain is not None:
            compactor.retain(retain)
    finally:
        store.release_named_lease(LEASE, owner)
        report.duration_s = time.perf_counter() - started
    return report


def finish_removal(
    store: EventStore, session_id: str, *, lease: timedelta = timedelta(seconds=60)
) -> bool:
    """Finish removing one expired session now (what a compactor that died left half done):
    True when it is gone, False when another live compactor is at work."""
    owner = new_owner()
    holder = store.take_named_lease(LEASE, owner, lease)
    if holder is not None and dead_here(holder.owner):
        holder = store.take_named_lease(LEASE, owner, lease, previous=holder.owner)
    if holder is not None:
        return False
    try:
        store.removal.finish_removal(session_id)
    finally:
        store.release_named_lease(LEASE, owner)
    return True


def _plans(store: EventStore, window: timedelta) -> list[Plan]:
    """What retention would do to each live session now."""
    now = store.clock()
    found = (plan(store, head, window, now) for head in store.sessions())
    return [p for p in found if p is not None]


@dataclass(slots=True)
class _Compactor:
    store: EventStore
    report: CompactionReport
    owner: str
    chunk: int
    lease: timedelta
    archive: str | os.PathLike[str] | None = None

    def run(self) -> bool:
        """Remove the expired sessions; False if the lease was lost."""
        seen: set[str] = set()
        while True:
            listed = [
                c
                for c in self.store.removal.expired_sessions(self.store.clock(), _LIST)
                if c[0] not in seen
            ]
            if not listed:
                return True
            batch: list[str] = []
            size = 0
            for session_id, version in listed:
                seen.add(session_id)
                if self.archive is not None or version > self.chunk:
                    if not self._remove_large(session_id, version):
                        return False
                    continue
                if size + version > self.chunk and batch:
                    if not self._remove_small(batch):
                        return False
                    batch, size = [], 0
                batch.append(session_id)
                size += version
            if batch and not self._remove_small(batch):
                return False

    def retain(self, window: timedelta) -> None:
        """Move each live session's base up to ``window`` ago (re-checked under its head-row
        lock), then remove the events below it a chunk at a time (under the base row's)."""
        for planned in _plans(self.store, window):
            if not self._renew():
                return
            if planned.cut > planned.start:
                base = build_base(self.store, planned)
                if not self.store.bases.move(base, self.store.clock(), planned.start):
                    continue  # purged or re-created meanwhile: the next run looks again
            faults.point("retention.base_moved")
            while True:
                if not self._renew():
                    return  # the base is in place: the next run removes the rest
                removed = self.store.bases.trim(planned.session_id, planned.cut, self.chunk)
                if not removed:
                    break
                self.report.events_trimmed += removed
            self.report.trimmed[planned.session_id] = planned.cut

    def _renew(self) -> bool:
        """Keep the lease for the next chunk; False (and the reason reported) if it was lost."""
        holder = self.store.take_named_lease(LEASE, self.owner, self.lease)
        if holder is not None:
            self.report.skipped = f"lost the lease to {holder[0]}; stopped between chunks"
        return holder is None

    def _remove_small(self, batch: list[str]) -> bool:
        if not self._renew():
            return False
        removed, events, snapshots = self.store.removal.remove_expired(batch, self.store.clock())
        self.report.sessions.extend(removed)
        self.report.events_removed += events
        self.report.snapshots_removed += snapshots
        self.report.kept += len(batch) - len(removed)
        return True

    def _remove_large(self, session_id: str, version: int) -> bool:
        if not self._renew():
            return False
        if not self.store.removal.mark_expiring(session_id, self.store.clock()):
            self.report.kept += 1
            return True
        if self.archive is not None:
            try:  # frozen now: what is archived is exactly what is removed
                self.report.archived.append(
                    str(archive_session(self.store, session_id, self.archive))
                )
            except EventCtxError as exc:
                self.report.skipped = f"not removed, could not archive: {exc}"
                return True  # left marked: the next run archives and removes it
        for upto in range(self.chunk, version, self.chunk):
            if not self._renew():
                return False  # marked: the next run finishes it
            faults.point("compaction.mid_session")
            removed = self.store.removal.delete_events_upto(session_id, upto)
            if removed is None:  # purged meanwhile (and perhaps created again): not ours now
                return True
            self.report.events_removed += removed
        finished = self.store.removal.finish_removal(session_id)
        if finished is not None:
            self.report.events_removed += finished[0]
            self.report.snapshots_removed += finished[1]
            self.report.sessions.append(session_id)
        return True
