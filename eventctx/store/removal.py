"""The steps TTL compaction is made of, each one bounded transaction (``eventctx.compaction``
composes them). Every step re-checks the session under its head-row lock, so a session
written, purged or created again since it was listed is left alone."""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.sql.expression import ClauseElement

from eventctx.store import schema
from eventctx.store.dialect import Cursor, Dialect, Transaction
from eventctx.store.heads import EXPIRING, alive_at
from eventctx.store.statements import Statements

__all__ = ["Removal"]


class Removal:
    """Physical removal of expired sessions, in steps; get it as ``EventStore.removal``."""

    def __init__(self, transaction: Transaction, sql: Statements, dialect: Dialect) -> None:
        self._transaction = transaction
        self._sql = sql
        self._dialect = dialect

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
        is kept whole; every head row is locked (in id order, the committer's) before any event
        is deleted. A few statements for the whole batch, not several per session. Returns
        (removed ids, events removed, snapshots removed).
        """
        if not session_ids:
            return [], 0, 0
        se, ev, sn = schema.sessions, schema.events, schema.snapshots
        ids = sorted(session_ids)
        with self._transaction(write=True) as cur:
            marked = sorted(
                row[0]
                for row in self._run(
                    cur,
                    sa.update(se)
                    .where(
                        se.c.session_id.in_(ids),
                        sa.or_(
                            se.c.status == EXPIRING, sa.not_(alive_at(sa.bindparam("now", now)))
                        ),
                    )
                    .values(status=EXPIRING)
                    .returning(se.c.session_id),
                ).fetchall()
            )
            if not marked:
                return [], 0, 0
            self._dialect.keep_positions(cur)
            events = self._run(cur, sa.delete(ev).where(ev.c.session_id.in_(marked))).rowcount
            snapshots = self._run(cur, sa.delete(sn).where(sn.c.session_id.in_(marked))).rowcount
            self._run(cur, sa.delete(schema.bases).where(schema.bases.c.session_id.in_(marked)))
            self._run(
                cur, sa.delete(se).where(se.c.session_id.in_(marked), se.c.status == EXPIRING)
            )
        return marked, int(events), int(snapshots)

    def _run(self, cur: Cursor, stmt: ClauseElement) -> Cursor:
        """Run a statement built for this call (its IN lists rendered)."""
        compiled = stmt.compile(
            dialect=self._dialect.sql_dialect, compile_kwargs={"render_postcompile": True}
        )
        cur.execute(str(compiled), compiled.params)
        return cur

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
            self._dialect.keep_positions(cur)
            cur.execute(self._sql.delete_events_upto, {"session_id": session_id, "upto": version})
            return int(cur.rowcount)

    def finish_removal(self, session_id: str) -> tuple[int, int] | None:
        """Remove the rest of a marked session: (events, snapshots) removed, or None if it is
        no longer being removed."""
        params = {"session_id": session_id, "expiring": EXPIRING}
        with self._transaction(write=True) as cur:
            if not self._still_expiring(cur, session_id):
                return None
            self._dialect.keep_positions(cur)
            cur.execute(self._sql.delete_events, params)
            events = int(cur.rowcount)
            cur.execute(self._sql.delete_snapshots, params)
            snapshots = int(cur.rowcount)
            cur.execute(self._sql.delete_base, params)
            cur.execute(self._sql.delete_expiring_head, params)
        return events, snapshots

    def _still_expiring(self, cur: Cursor, session_id: str) -> bool:
        """Lock the head row and tell whether compaction still owns the session."""
        cur.execute(self._sql.head_for_update, {"session_id": session_id})
        row = cur.fetchone()
        return row is not None and row[3] == EXPIRING
