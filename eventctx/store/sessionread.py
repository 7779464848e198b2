"""SessionRead: one read transaction on one session, what a restore or a full fold reads.

A cold restore is a few short reads on one connection (the head row, the newest snapshot and
its event's hash, the tail after it) and a full fold streams only the columns the fold needs;
neither takes a write lock or records anything.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Final

from eventctx.events import Hasher
from eventctx.store.bases import Base
from eventctx.store.dialect import Cursor
from eventctx.store.heads import SessionHead
from eventctx.store.statements import HEAD_WIDTH, Statements

__all__ = ["PAGE", "SessionRead"]

PAGE: Final = 5000
"""Rows per statement: what a reader holds in memory at once."""

SnapshotCheck = Callable[[str, int, int, bytes, bytes, bytes], None]
"""Raises IntegrityError unless a snapshot matches the digest stored with it."""


class SessionRead:
    """Reads of one session inside one read transaction (a store's ``reading``)."""

    __slots__ = (
        "_ahead",
        "_base_of",
        "_check",
        "_cur",
        "_sql",
        "hasher",
        "rows_read",
        "session_id",
    )

    def __init__(
        self,
        cur: Cursor,
        sql: Statements,
        session_id: str,
        hasher: Hasher,
        check_snapshot: SnapshotCheck,
        base_of: Callable[[Cursor, str], Base | None],
    ) -> None:
        self._cur, self._sql, self._check = cur, sql, check_snapshot
        self._base_of = base_of
        self.session_id = session_id
        self.hasher = hasher
        """The store's chain hash, for checking rows read."""
        self.rows_read = 0
        self._ahead: tuple[int, int, Any] | None = None
        """(fold version, head version, snapshot row) read with the head row, not used yet."""

    def head(self, fold_version: int | None = None) -> SessionHead | None:
        """The session's head row, or None if it never existed (or was purged). With
        ``fold_version``, the same statement reads the newest snapshot of those fold rules at
        the head's version, which the next ``snapshot`` at that version then takes: a cold
        restore's head and snapshot in one round trip."""
        cur = self._cur
        params: dict[str, Any] = {"session_id": self.session_id}
        if fold_version is None:
            cur.execute(self._sql.session, params)
            row = cur.fetchone()
            return None if row is None else SessionHead.from_row(row)
        params["fold_version"] = fold_version
        cur.execute(self._sql.session_and_snapshot, params)
        row = cur.fetchone()
        if row is None:
            return None
        head = SessionHead.from_row(row[:HEAD_WIDTH])
        self._ahead = (fold_version, head.version, row[HEAD_WIDTH:])
        return head

    def snapshot(self, fold_version: int, high: int) -> tuple[int, bytes, bytes] | None:
        """(version, head hash, state bytes) of the newest snapshot under ``fold_version`` at
        or below ``high`` whose event still has its chain hash, or None; IntegrityError when it
        is not what was written. One statement reads the snapshot and its event's hash."""
        params = {"session_id": self.session_id, "fold_version": fold_version, "high": high}
        ahead, self._ahead = self._ahead, None
        while True:
            if ahead is not None and ahead[:2] == (fold_version, high):
                row, ahead = ahead[2], None
            else:
                self._cur.execute(self._sql.newest_snapshot, params)
                row = self._cur.fetchone()
            if row is None or row[0] is None:
                return None
            found = (int(row[0]), bytes(row[1]), bytes(row[2]))
            if row[4] is not None and bytes(row[4]) == found[1]:  # else of a history since
                self._check(self.session_id, fold_version, *found, bytes(row[3]))  # purged
                return found
            params["high"] = found[0] - 1

    def base(self) -> Base | None:
        """The session's retention base, or None when its history is whole; IntegrityError
        when it is not what was written."""
        return self._base_of(self._cur, self.session_id)

    def hash_at(self, version: int) -> bytes | None:
        """The chain hash of the event at ``version``, or None if there is none."""
        self._cur.execute(self._sql.hash_at, {"session_id": self.session_id, "version": version})
        row = self._cur.fetchone()
        return None if row is None else bytes(row[0])

    def chain_rows(self, low: int, high: int) -> Iterator[Any]:
        """Versions ``low``..``high`` with every chained column (``state.ChainRow``)."""
        return self._pages(self._sql.read_chain, low, high)

    def fold_rows(self, low: int, high: int) -> Iterator[Any]:
        """Versions ``low``..``high`` with only what the fold reads (``state.Row``)."""
        return self._pages(self._sql.read_fold, low, high)

    def _pages(self, sql: str, low: int, high: int) -> Iterator[Any]:
        """The rows of ``sql`` in version order (its first column), a page per statement."""
        cur = self._cur
        if low > high:  # nothing to read (a restore whose snapshot is at the head)
            return
        params: dict[str, Any] = {
            "session_id": self.session_id,
            "low": low,
            "high": high,
            "limit": PAGE,
        }
        while True:
            cur.execute(sql, params)
            rows = cur.fetchall()
            self.rows_read += len(rows)
            yield from rows
            if len(rows) < PAGE:
                return
            params["low"] = rows[-1][0] + 1
