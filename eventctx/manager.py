"""ContextManager: sessions, their contexts (one object per session), TTL and lifecycle."""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

from apscheduler.schedulers.background import BackgroundScheduler

from eventctx.clock import check_count, check_duration
from eventctx.compaction import CompactionReport, compact, finish_removal
from eventctx.context import Gate, Limits, PluginContext, Runtime, _ttl_ms
from eventctx.counters import LiveMetrics
from eventctx.errors import (
    HistoryRemovedError,
    InvalidInputError,
    SessionExistsError,
    SessionExpiredError,
    SessionNotFoundError,
)
from eventctx.events import NewEvent
from eventctx.retention import check_window
from eventctx.snapshots import Restored, SnapshotPolicy, restore, restore_from
from eventctx.state import FOLD_VERSION, fold
from eventctx.store import EventStore
from eventctx.store.heads import SessionHead
from eventctx.store.sessionread import SessionRead

__all__ = ["ACTIVITY_SLACK", "DEFAULT_URL", "ContextManager", "SessionInfo"]

DEFAULT_URL: Final = "sqlite:///eventctx.db"
ACTIVITY_SLACK: Final = 1 / 16
"""``get_context`` records activity only when the stored last activity is older than this
fraction of the session's ttl: a session opened again within it is read, not written, and may
expire up to this fraction of its ttl earlier than its last ``get_context`` would say."""
log = logging.getLogger("eventctx")


def _activity_due(head: SessionHead, now_us: int) -> bool:
    """Whether ``get_context`` must record activity: the stored one is older than the slack."""
    return (
        head.ttl_ms is not None
        and now_us - head.last_activity_us > head.ttl_ms * 1000 * ACTIVITY_SLACK
    )


class _Default:
    def __repr__(self) -> str:
        return "<manager default>"


_DEFAULT: Final = _Default()


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """A live session as listed by ``ContextManager.sessions()``."""

    session_id: str
    version: int
    created_at: datetime
    last_activity: datetime
    expires_at: datetime | None


class ContextManager:
    """Hands out one PluginContext per session and owns their lifecycle.

    ``store`` is an EventStore, a database URL, or None for ``$EVENTCTX_URL`` (default
    ``sqlite:///eventctx.db``). With an ``archive`` directory, cleanup exports each expired
    session there before removing it; with ``retain`` (a duration), cleanup also folds each live
    session's events older than that into its base and removes them (docs/retention.md).
    ``ttl`` is the default lifetime of a
    session without activity (None: for ever). While started, a background job runs
    ``cleanup_expired()`` every ``cleanup_interval`` (None: never). Use ``with manager:`` (or
    ``start()``/``stop()``); after ``stop()`` every method of the manager and its contexts
    raises EventCtxError.
    """

    def __init__(
        self,
        store: EventStore | str | None = None,
        *,
        ttl: timedelta | None = timedelta(hours=24),
        cleanup_interval: timedelta | None = timedelta(hours=1),
        snapshot_every: int = 1000,
        max_key_length: int = 1024,
        max_value_bytes: int = 16 * 1024 * 1024,
        chain_key: bytes | str | None = None,
        archive: str | os.PathLike[str] | None = None,
        retain: timedelta | None = None,
    ) -> None:
        """Open (or adopt) the store; a store opened here from a URL (with ``chain_key`` when
        its chains are keyed) is closed by ``stop()``."""
        check_count(snapshot_every, "snapshot_every")
        check_count(max_key_length, "max_key_length")
        check_count(max_value_bytes, "max_value_bytes")
        self._ttl_ms = _ttl_ms(ttl)
        if cleanup_interval is not None:
            check_duration(cleanup_interval, "cleanup_interval")
        self._cleanup_interval = cleanup_interval
        self._archive = archive
        self._retain = None if retain is None else check_window(retain)
        """How much history cleanup keeps of live sessions (None: all of it)."""
        """Where cleanup exports each expired session before removing it (None: nowhere)."""
        self._scheduler: BackgroundScheduler | None = None
        if store is not None and not isinstance(store, (EventStore, str)):
            raise InvalidInputError(
                f"store must be an EventStore, a database URL or None, not {store!r}"
            )
        self._owns_store = not isinstance(store, EventStore)
        if not isinstance(store, EventStore):
            url = store or os.environ.get("EVENTCTX_URL") or DEFAULT_URL
            store = EventStore.open(url, chain_key=chain_key)
            # A manager dropped without stop() still gives its connections back.
            weakref.finalize(self, store.close)
        self._runtime = Runtime(
            store, Gate(), Limits(max_key_length, max_value_bytes), snapshot_every, self._create
        )
        # Held weakly: a context nobody uses any more is dropped (restored again when asked
        # for), so a manager that opened 100k sessions does not keep 100k states.
        self._contexts: weakref.WeakValueDictionary[str, PluginContext] = (
            weakref.WeakValueDictionary()
        )
        self._lock = threading.Lock()

    @property
    def store(self) -> EventStore:
        """The event store this manager writes to."""
        return self._runtime.store

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> ContextManager:
        """Start the cleanup job (if it has an interval); returns self. Idempotent."""
        self._runtime.gate.check()
        with self._lock:
            if self._cleanup_interval is not None and self._scheduler is None:
                scheduler = BackgroundScheduler(daemon=True)
                scheduler.add_job(
                    self._scheduled_cleanup,
                    "interval",
                    seconds=self._cleanup_interval.total_seconds(),
                    id="eventctx-cleanup",
                    max_instances=1,  # a run never overlaps the previous one
                    coalesce=True,
                )
                scheduler.start()
                self._scheduler = scheduler
        return self

    def stop(self) -> None:
        """Stop the cleanup job, wait for in-flight writes, then close: later calls on the
        manager or its contexts raise EventCtxError. Idempotent."""
        if self._runtime.gate.closed:
            return
        with self._lock:
            scheduler, self._scheduler = self._scheduler, None
        if scheduler is not None:
            scheduler.shutdown(wait=True)
        self._runtime.gate.close()
        with self._lock:
            self._contexts.clear()
        if self._owns_store:
            self._runtime.store.close()

    def __enter__(self) -> ContextManager:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- sessions -----------------------------------------------------------------------------

    def create_context(
        self, session_id: str, ttl: timedelta | _Default | None = _DEFAULT
    ) -> PluginContext:
        """Create a session (SessionExistsError if it is live); a deleted id may be reused."""
        ttl_ms = self._ttl_ms if isinstance(ttl, _Default) else _ttl_ms(ttl)
        with self._runtime.gate:
            created = NewEvent.create("ContextCreated", {"ttl_ms": ttl_ms})
            return self._create([created], session_id)

    def _create(self, events: list[NewEvent], session_id: str) -> PluginContext:
        """Append ``events`` (a ContextCreated first) and hand out the new session's context."""
        runtime = self._runtime
        recorded = runtime.append(session_id, events)
        runtime.counters.add("created")
        ctx = PluginContext(
            runtime, session_id, fold(recorded), SnapshotPolicy(runtime.snapshot_every)
        )
        with self._lock:
            old = self._contexts.get(session_id)
            if old is not None:
                old.writer.close(f"session {session_id!r} was deleted and created again")
            self._contexts[session_id] = ctx
        return ctx

    def get_context(self, session_id: str) -> PluginContext:
        """The session's context, restored from the store if this manager hasn't got it yet.

        Counts as activity (the ttl starts again), recorded lazily: only once the stored last
        activity is older than ``ACTIVITY_SLACK`` of the ttl, so opening a recently active
        session is a read and takes no write lock. SessionNotFoundError for an unknown or
        deleted session, SessionExpiredError for one past its ttl.
        """
        runtime = self._runtime
        store = runtime.store
        with runtime.gate:
            with self._lock:
                ctx = self._contexts.get(session_id)
            head, restored = self._open(session_id, restoring=ctx is None)
            head = self._record_activity(session_id, head)
            if ctx is not None:
                ctx.writer.follow(head)
                return ctx
            if restored is None:  # expired when read, yet a run's lease took it meanwhile
                restored = restore(store, session_id, head.version, head.head_hash)
            state, size, tail = restored
            fresh = PluginContext(
                runtime, session_id, state, SnapshotPolicy(runtime.snapshot_every, size, tail)
            )
            with self._lock:
                ctx = self._contexts.setdefault(session_id, fresh)  # one object per session
            if ctx is fresh:
                runtime.counters.add("restored")
            return ctx

    def _open(self, session_id: str, restoring: bool) -> tuple[SessionHead | None, Restored | None]:
        """The session's head row and, ``restoring`` a live and unexpired session, its state at
        the head: one read transaction, no write lock."""
        store = self._runtime.store

        def read(session: SessionRead) -> tuple[SessionHead | None, Restored | None]:
            head = session.head(FOLD_VERSION if restoring else None)
            if not restoring or head is None or not head.live or head.expired(store.clock()):
                return head, None
            return head, restore_from(session, head.version, head.head_hash)

        for _ in range(2):
            try:
                return store.reading(session_id, read)
            except HistoryRemovedError:
                continue  # retention moved the base past the head just read: read again
        return store.reading(session_id, read)

    def _record_activity(self, session_id: str, head: SessionHead | None) -> SessionHead:
        """``head`` if the session is live and unexpired, recording activity on it when the
        stored activity is older than the slack allows (a write, then the head it left);
        otherwise evict it and raise SessionNotFoundError or SessionExpiredError."""
        store = self._runtime.store
        if head is not None and head.live and _activity_due(head, store.clock()):
            head = store.touch(session_id)
        if head is None or not head.live:
            self._evict(session_id)
            raise SessionNotFoundError(
                f"session {session_id!r} does not exist; create it with create_context"
            )
        if head.expired(store.clock()):
            self._evict(session_id, f"session {session_id!r} expired", expired=True)
            raise SessionExpiredError(
                f"session {session_id!r} expired at {head.expires_at}; create it again"
            )
        return head

    def get_or_create_context(
        self, session_id: str, ttl: timedelta | _Default | None = _DEFAULT
    ) -> PluginContext:
        """The session's context, creating the session if it doesn't exist (or has expired).

        While compaction is removing an expired session (a large one takes a few chunks) this
        waits for it, up to the store's busy timeout, and then creates it afresh.
        """
        deadline = time.monotonic() + self._runtime.store.busy_timeout.total_seconds()
        while True:
            try:
                return self.get_context(session_id)
            except (SessionNotFoundError, SessionExpiredError):
                pass  # an expired session starts again (its versions continue)
            try:
                return self.create_context(session_id, ttl)
            except SessionExistsError:
                continue  # another writer created it first: open theirs
            except SessionExpiredError:
                if time.monotonic() > deadline:
                    raise
                # Being removed: finish it here unless a live compactor is at it (one that
                # died would otherwise leave the session blocked until its lease ran out).
                if not finish_removal(self._runtime.store, session_id):
                    time.sleep(0.01)

    def delete_context(self, session_id: str, purge: bool = False) -> None:
        """Delete a session: append ContextDeleted, keeping its history, or with ``purge``
        remove every row of it. SessionNotFoundError if there is no such live session."""
        runtime = self._runtime
        with runtime.gate:
            if purge:
                if runtime.store.purge(session_id) == 0:
                    raise SessionNotFoundError(f"session {session_id!r} does not exist")
            else:
                runtime.append(session_id, [NewEvent.create("ContextDeleted")])
            self._evict(session_id, f"session {session_id!r} was deleted")

    def cleanup_expired(self, *, dry_run: bool = False) -> CompactionReport:
        """Remove every session whose last activity is older than its ttl, and with ``retain``
        trim the history of the others (what the scheduled job runs); see
        ``eventctx.compaction``. The contexts of removed sessions here are closed."""
        with self._runtime.gate:
            report = compact(
                self._runtime.store, dry_run=dry_run, archive=self._archive, retain=self._retain
            )
        if not dry_run:
            self._runtime.counters.add("cleanups")
            self._runtime.counters.add("expired", report.sessions_removed)
            for session_id in report.sessions:
                self._evict(
                    session_id, f"session {session_id!r} expired and was removed", expired=True
                )
        return report

    def _scheduled_cleanup(self) -> None:
        try:
            report = self.cleanup_expired()
        except Exception:
            log.exception("eventctx cleanup failed; it runs again at the next interval")
            return
        log.info(
            "eventctx cleanup: %d sessions, %d events removed in %.3fs%s",
            report.sessions_removed,
            report.events_removed,
            report.duration_s,
            f" ({report.skipped})" if report.skipped else "",
        )

    def sessions(self) -> list[SessionInfo]:
        """Every live session, ordered by id."""
        with self._runtime.gate:
            heads = self._runtime.store.sessions()
        return [
            SessionInfo(
                h.session_id,
                h.version,
                h.created_at,
                h.last_activity,
                h.expires_at,
            )
            for h in heads
            if h.live
        ]

    def metrics(self) -> LiveMetrics:
        """Live counters of this manager since it was built: contexts active, created,
        restored and expired, appends and their latency, snapshots, cleanups. Reads no
        database; works after ``stop()`` too."""
        with self._lock:
            active = len(self._contexts)
        return self._runtime.counters.read(active)

    def _evict(self, session_id: str, reason: str | None = None, expired: bool = False) -> None:
        with self._lock:
            ctx = self._contexts.pop(session_id, None)
        if ctx is not None:
            ctx.writer.close(reason or f"session {session_id!r} no longer exists", expired=expired)
