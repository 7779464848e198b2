"""The steps TTL compaction is made of, each one bounded transaction (``eventctx.compaction``
composes them). Every step re-checks the session under its head-row lock, so a session
written, purged or created again since it was listed is left alone."""

from __future__ import annotations

from collections.abc import Sequence

from eventctx.store.dialect import Cursor, Transaction
from eventctx.store.heads import EXPIRING
from eventctx.store.statements import Statements

__all__ = ["Removal"]


class Removal:
    """Physical removal of expired sessions, in steps; get it as ``EventStore.removal``."""

    def __init__(self, transaction: Transaction, sql: Statements) -> None:
        self._transaction = transaction
        self._sql = sql

    def expired_sessions(self, now: int, limit: int) -> list[tuple[str, int]]:
        """Up to ``limit`` sessions past their ttl at ``now`` (µs), or being removed, with their
        versions (which bound their event counts), least recently active first."""
        params = {"now": now, "limit": limit, "expiring": EXPIRING}
        with self._transaction(write=False) as cur:
            cur.execute(self._sql.expired, params)
            return [(str(sid), int(version)) for sid, version in cur.fetchall()]

    def remove_expired(self, session_ids: Sequence[str], now: int) -> tuple[list[str], int, int]:
        """In one transaction, remove every listed session that is still expired at ``now``.

        Each head row is re-checked under its lock, so a session written since it was listed
        is kept whole; every head row is locked before any event is deleted. Returns (removed
        ids, events removed, snapshots removed).
        """
        events = snapshots = 0
        sql = self._sql
        with self._transaction(write=True) as cur:
            marked = []
            for session_id in sorted(session_ids):  # the committer's lock order: no deadlock
                params = {"session_id": session_id, "now": now, "expiring": EXPIRING}
                cur.execute(sql.mark_expiring, params)
                if cur.rowcount == 1:
                    marked.append(params)
            for params in marked:
                cur.execute(sql.delete_events, params)
                events += cur.rowcount
                cur.execute(sql.delete_snapshots, params)
                snapshots += cur.rowcount
                cur.execute(sql.delete_expiring_head, params)
        return [str(p["session_id"]) for p in marked], events, snapshots

    def mark_expiring(self, session_id: str, now: int) -> bool:
        """Mark a session still expired at ``now`` as being removed (appends then refuse it
        with SessionExpiredError); False if it was written since and so is kept."""
        with self._transaction(write=True) as cur:
            cur.execute(
                self._sql.mark_expiring,
                {"session_id": session_id, "now": now, "expiring": EXPIRING},
            )
            return bool(cur.rowcount == 1)

    def delete_events_upto(self, session_id: str, version: int) -> int | None:
        """Delete a marked session's events up to ``version`` (one bounded transaction);
        None, deleting nothing, if the session is no longer being removed (purged, and
        perhaps created again)."""
        with self._transaction(write=True) as cur:
            if not self._still_expiring(cur, session_id):
                return None
            cur.execute(self._sql.delete_events_upto, {"session_id": session_id, "upto": version})
            return int(cur.rowcount)

    def finish_removal(self, session_id: str) -> tuple[int, int] | None:
        """Remove the rest of a marked session: (events, snapshots) removed, or None if it is
        no longer being removed."""
        params = {"session_id": session_id, "expiring": EXPIRING}
        with self._transaction(write=True) as cur:
            if not self._still_expiring(cur, session_id):
                return None
            cur.execute(self._sql.delete_events, params)
            events = int(cur.rowcount)
            cur.execute(self._sql.delete_snapshots, params)
            snapshots = int(cur.rowcount)
            cur.execute(self._sql.delete_expiring_head, params)
        return events, snapshots

    def _still_expiring(self, cur: Cursor, session_id: str) -> bool:
        """Lock the head row and tell whether compaction still owns the session."""
        cur.execute(self._sql.head_for_update, {"session_id": session_id})
        row = cur.fetchone()
        return row is not None and row[3] == EXPIRING
