"""Retention bases: a session's oldest events folded into one row and then removed.

A base is not a cache: once its events are gone it is the only record of them, so it is
written before any event goes, checked against its digest on every read (IntegrityError, never
skipped), and removed only with its session. Each step is one bounded transaction that
re-checks the session under a lock (the head row's when the base moves, the base row's while
the events below it are removed, so writers go on): a session purged (and perhaps created
again) since it was read is left alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy import bindparam

from eventctx.errors import IntegrityError
from eventctx.events import Hasher, base_digest
from eventctx.store import schema
from eventctx.store.dialect import Cursor, Dialect
from eventctx.store.heads import EXPIRING

__all__ = ["Base", "Bases"]


class Base(NamedTuple):
    """A session's base: its state at ``version`` (the fold of every event up to it, encoded
    as a snapshot is), the chain hash at ``version``, and what the read side keeps of the
    removed events (``history``, JSON)."""

    session_id: str
    version: int
    fold_version: int
    head_hash: bytes
    state: bytes
    history: bytes


class Bases:
    """Reading and moving retention bases; get it as ``EventStore.bases``."""

    def __init__(
        self,
        run: Callable[..., Any],
        dialect: Dialect,
        hasher: Callable[[], Hasher],
    ) -> None:
        self._run = run
        self._hasher = hasher
        self._dialect = dialect
        ba, ev, se, sn = schema.bases, schema.events, schema.sessions, schema.snapshots
        c = dialect.compile
        sid: sa.BindParameter[str] = bindparam("session_id")
        columns = (ba.c.version, ba.c.fold_version, ba.c.head_hash, ba.c.state, ba.c.history)
        self._get = c(sa.select(*columns, ba.c.digest).where(ba.c.session_id == sid))
        self._all = c(sa.select(ba.c.session_id, *columns, ba.c.digest).order_by(ba.c.session_id))
        self._head = c(sa.select(se.c.status).where(se.c.session_id == sid).with_for_update())
        self._event_hash = c(
            sa.select(ev.c.hash).where(ev.c.session_id == sid, ev.c.version == bindparam("v"))
        )
        self._version = c(sa.select(ba.c.version).where(ba.c.session_id == sid))
        self._version_for_update = c(
            sa.select(ba.c.version).where(ba.c.session_id == sid).with_for_update()
        )
        self._delete = c(sa.delete(ba).where(ba.c.session_id == sid))
        self._insert = c(
            sa.insert(ba).values(
                {n: bindparam(n) for n in ("session_id", "version", "fold_version", "head_hash")}
                | {n: bindparam(n) for n in ("state", "history", "digest")}
                | {"created_at": bindparam("now")}
            )
        )
        self._drop_snapshots = c(
            sa.delete(sn).where(sn.c.session_id == sid, sn.c.version <= bindparam("v"))
        )
        self._first = c(sa.select(sa.func.min(ev.c.version)).where(ev.c.session_id == sid))
        self._trim = c(
            sa.delete(ev).where(ev.c.session_id == sid, ev.c.version <= bindparam("upto"))
        )

    # --- reading ------------------------------------------------------------------------------

    def get(self, session_id: str) -> Base | None:
        """The session's base, or None (its history is whole). One that no longer matches its
        digest raises IntegrityError: its events are gone, so nothing can stand in for it."""

        found: Base | None = self._run(lambda cur: self.read(cur, session_id), write=False)
        return found

    def read(self, cur: Cursor, session_id: str) -> Base | None:
        """``get`` inside the caller's transaction."""
        cur.execute(self._get, {"session_id": session_id})
        row = cur.fetchone()
        return None if row is None else self._checked(session_id, *row)

    def all(self) -> Iterator[Base | IntegrityError]:
        """Every base in session order (one query), or the IntegrityError of one that no
        longer matches its digest."""

        def read(cur: Cursor) -> list[Any]:
            cur.execute(self._all)
            return list(cur.fetchall())

        for session_id, *row in self._run(read, write=False):
            try:
                yield self._checked(str(session_id), *row)
            except IntegrityError as exc:
                yield exc

    def _checked(
        self,
        session_id: str,
        version: int,
        fold_version: int,
        head_hash: bytes,
        state: bytes,
        history: bytes,
        digest: bytes,
    ) -> Base:
        base = Base(
            session_id,
            int(version),
            int(fold_version),
            bytes(head_hash),
            bytes(state),
            bytes(history),
        )
        if bytes(digest) != self.digest(base):
            raise IntegrityError(
                f"session {session_id!r}: its retention base at version {base.version} is not "
                "what was written (its digest does not match); run verify",
                session_id=session_id,
                version=base.version,
            )
        return base

    def digest(self, base: Base) -> bytes:
        """The digest a base is stored with (keyed like the chain)."""
        return base_digest(*base, hasher=self._hasher())

    # --- moving a base ------------------------------------------------------------------------

    def move(self, base: Base, now: int, previous: int) -> bool:
        """Make ``base`` the session's base, in one transaction: under the head-row lock, only
        if the session is not being removed, its base is still at ``previous`` (0: none), and
        its event at ``base.version`` still has ``base.head_hash`` (the same history). The
        snapshots it supersedes go in the same transaction; the events are removed afterwards
        by ``trim``. False, changing nothing, when the session changed meanwhile."""
        params = {"session_id": base.session_id, "v": base.version}

        def move(cur: Cursor) -> bool:
            cur.execute(self._head, params)
            status = cur.fetchone()
            if status is None or status[0] == EXPIRING:
                return False
            cur.execute(self._version, params)
            found = cur.fetchone()
            current = 0 if found is None else int(found[0])
            if current == base.version:  # moved by a try whose connection dropped after COMMIT?
                cur.execute(self._get, params)
                row = cur.fetchone()
                return row is not None and bytes(row[5]) == self.digest(base)
            if current != previous:
                return False
            cur.execute(self._event_hash, params)
            stored = cur.fetchone()
            if stored is None or bytes(stored[0]) != base.head_hash:
                return False
            cur.execute(self._delete, params)
            cur.execute(self._insert, base._asdict() | {"digest": self.digest(base), "now": now})
            cur.execute(self._drop_snapshots, params)
            return True

        return bool(self._run(move, write=True))

    def insert(self, cur: Cursor, base: Base, now: int) -> None:
        """Store ``base`` with its digest, in the caller's write transaction (a new session's
        base when a log is loaded, or a moved one)."""
        cur.execute(self._insert, base._asdict() | {"digest": self.digest(base), "now": now})

    def trim(self, session_id: str, version: int, chunk: int) -> int | None:
        """Remove up to ``chunk`` of the oldest events at or below ``version``, the session's
        base (one transaction): the number removed (0: none left), or None when the session's
        base is no longer at ``version`` (purged, perhaps created again, or moved on)."""
        params: dict[str, Any] = {"session_id": session_id, "v": version}

        def trim(cur: Cursor) -> int | None:
            # The base row's lock, not the head row's: writers to the session go on meanwhile,
            # and a purge (which removes the base too) waits for this chunk or is seen done.
            cur.execute(self._version_for_update, params)
            found = cur.fetchone()
            if found is None or int(found[0]) != version:
                return None
            cur.execute(self._first, params)
            first = cur.fetchone()
            if first is None or first[0] is None or int(first[0]) > version:
                return 0
            self._dialect.keep_positions(cur)
            cur.execute(self._trim, params | {"upto": min(version, int(first[0]) + chunk - 1)})
            return int(cur.rowcount)

        result: int | None = self._run(trim, write=True)
        return result
