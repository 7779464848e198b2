"""The store's SQL, built from the Core tables and compiled once per dialect."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy import bindparam, func

from eventctx.store import schema
from eventctx.store.dialect import Dialect
from eventctx.store.heads import alive_at

EVENT_COLUMNS: Final = (
    "session_id",
    "version",
    "type",
    "key",
    "phase",
    "execution_id",
    "payload",
    "recorded_at",
    "hash",
    "prev_hash",
)
EventRow = tuple[str, int, str, str | None, str | None, str | None, bytes, int, bytes, bytes]
"""An event row as an append inserts it: its ``EVENT_COLUMNS``, in that order (``payload``
the canonical bytes). A plain tuple: sqlite3 binds a subclass's items one lookup at a time."""
PER_EVENT: Final = tuple(n for n in EVENT_COLUMNS if n not in ("session_id", "recorded_at"))
"""The event columns a one-statement append binds as arrays (``<name>s``, an element per
event); an append's events share their session and time (``session_id`` and ``now``)."""
_ZERO: Final = sa.literal_column("0", sa.Integer)
_SESSION_COLUMNS: Final = (
    schema.sessions.c.session_id,
    schema.sessions.c.version,
    schema.sessions.c.head_hash,
    schema.sessions.c.created_at,
    schema.sessions.c.last_activity,
    schema.sessions.c.ttl_ms,
    schema.sessions.c.status,
    schema.sessions.c.lease_expires_at,
)
HEAD_WIDTH: Final = len(_SESSION_COLUMNS)
"""How many columns a head row has (``SessionHead.from_row``)."""


class Statements:
    """The store's SQL, compiled once for one dialect."""

    def __init__(self, dialect: Dialect) -> None:
        ev, se, sv = schema.events, schema.sessions, schema.schema_version
        c = dialect.compile
        sid: sa.BindParameter[str] = bindparam("session_id")
        insert_event = dialect.insert_events_statement(ev, EVENT_COLUMNS)
        # Bound from EventRow tuples, by position.
        self.insert_event = dialect.compile_positional(insert_event, EVENT_COLUMNS)
        self.insert_event_returning = dialect.compile_positional(
            insert_event.returning(ev.c.position), EVENT_COLUMNS
        )
        locked_head = sa.select(
            se.c.version,
            se.c.head_hash,
            se.c.last_activity,
            se.c.status,
            se.c.ttl_ms,
            se.c.lease_owner,
            se.c.lease_token,
            se.c.lease_expires_at,
        ).where(se.c.session_id == sid)
        self.head_for_update = c(locked_head.with_for_update())
        # In a group commit a head row that another transaction holds is skipped, not waited
        # for (its append is then made alone), so that one session's lock stalls no other.
        self.head_skip_locked = c(locked_head.with_for_update(skip_locked=True))
        self._advance_statements(dialect, sid)
        self.insert_head = self._head_insert(dialect, "now")
        # The head row of a loaded log (an import): created when its log was, active from now.
        self.load_head = self._head_insert(dialect, "created_at")
        # A session created again starts without a run lease; the token moves on, so that a
        # runner of its earlier life is fenced out.
        self.recreate_head = c(
            sa.update(se)
            .where(se.c.session_id == sid)
            .values(
                version=bindparam("new_version"),
                head_hash=bindparam("new_hash"),
                created_at=bindparam("now"),
                last_activity=bindparam("now"),
                ttl_ms=bindparam("ttl_ms"),
                status=bindparam("status"),
                lease_owner=sa.null(),
                lease_expires_at=sa.null(),
                lease_token=se.c.lease_token + sa.literal_column("1", sa.BigInteger),
            )
        )
        # Activity counts only for a live session that has not expired yet: opening an expired
        # session must not bring it back.
        self.touch = c(
            sa.update(se)
            .where(
                se.c.session_id == sid,
                se.c.status == bindparam("active"),
                se.c.last_activity < bindparam("now"),
                alive_at(bindparam("now")),
            )
            .values(last_activity=bindparam("now"))
        )
        self.take_lease = c(
            sa.update(se)
            .where(
                se.c.session_id == sid,
                se.c.status == bindparam("active"),
                sa.or_(
                    se.c.lease_owner.is_(None),
                    se.c.lease_owner == bindparam("previous"),
                    se.c.lease_expires_at < bindparam("now"),
                ),
            )
            .values(
                lease_owner=bindparam("owner"),
                lease_expires_at=bindparam("expires"),
                lease_token=se.c.lease_token + sa.literal_column("1", sa.BigInteger),
            )
            .returning(se.c.lease_token)
        )
        held = (
            se.c.session_id == sid,
            se.c.lease_owner == bindparam("owner"),
            se.c.lease_token == bindparam("token"),
        )
        self.renew_lease = c(
            sa.update(se)
            .where(*held, se.c.status == bindparam("active"))
            .values(lease_expires_at=bindparam("expires"))
        )
        self.read_lease = c(
            sa.select(se.c.lease_owner, se.c.lease_expires_at).where(se.c.session_id == sid)
        )
        self.release_lease = c(
            sa.update(se).where(*held).values(lease_owner=sa.null(), lease_expires_at=sa.null())
        )
        self.expired = c(
            sa.select(se.c.session_id, se.c.version)
            .where(
                sa.or_(
                    se.c.status == bindparam("expiring"),
                    sa.not_(alive_at(bindparam("now"))),
                )
            )
            .order_by(se.c.last_activity)
            .limit(bindparam("limit", type_=sa.Integer))
            .offset(_ZERO)
        )
        # The re-check under the head-row lock: only a session still past its ttl is marked.
        self.mark_expiring = c(
            sa.update(se)
            .where(
                se.c.session_id == sid,
                sa.or_(
                    se.c.status == bindparam("expiring"),
                    sa.not_(alive_at(bindparam("now"))),
                ),
            )
            .values(status=bindparam("expiring"))
        )
        self.delete_events_upto = c(
            sa.delete(ev).where(ev.c.session_id == sid, ev.c.version <= bindparam("upto"))
        )
        self.delete_expiring_head = c(
            sa.delete(se).where(se.c.session_id == sid, se.c.status == bindparam("expiring"))
        )
        le = schema.leases
        self.insert_named_lease = c(
            dialect.insert_ignore(le).values(
                name=bindparam("name"), owner=bindparam("owner"), expires_at=bindparam("expires")
            )
        )
        self.take_named_lease = c(
            sa.update(le)
            .where(
                le.c.name == bindparam("name"),
                sa.or_(
                    le.c.owner == bindparam("owner"),
                    le.c.owner == bindparam("previous"),
                    le.c.expires_at < bindparam("now"),
                ),
            )
            .values(owner=bindparam("owner"), expires_at=bindparam("expires"))
        )
        self.read_named_lease = c(
            sa.select(le.c.owner, le.c.expires_at).where(le.c.name == bindparam("name"))
        )
        self.release_named_lease = c(
            sa.delete(le).where(le.c.name == bindparam("name"), le.c.owner == bindparam("owner"))
        )
        sn = schema.snapshots
        self.insert_snapshot = c(
            dialect.insert_ignore(sn).values(
                {n: bindparam(n) for n in ("session_id", "version", "fold_version", "head_hash")}
                | {n: bindparam(n) for n in ("state", "digest")}
                | {"created_at": bindparam("now")}
            )
        )
        self.session = c(sa.select(*_SESSION_COLUMNS).where(se.c.session_id == sid))
        self.sessions = c(sa.select(*_SESSION_COLUMNS).order_by(se.c.session_id))
        read_cols = (ev.c.position, ev.c.version, ev.c.type, ev.c.key, ev.c.phase)
        in_range = (
            ev.c.session_id == sid,
            ev.c.version >= bindparam("low"),
            ev.c.version <= bindparam("high"),
        )
        self.read_chunk = c(
            sa.select(
                *read_cols,
                ev.c.execution_id,
                ev.c.payload,
                ev.c.recorded_at,
                ev.c.hash,
                ev.c.prev_hash,
            )
            .where(*in_range)
            .order_by(ev.c.version)
            .limit(bindparam("limit", type_=sa.Integer))
            .offset(_ZERO)
        )
        self._fold_statements(c, in_range)
        self._restore_statement(c)
        # The global log, by position (commit-ordered on every backend).
        self.read_after = c(
            sa.select(ev.c.position, *(ev.c[name] for name in EVENT_COLUMNS))
            .where(ev.c.position > bindparam("after"))
            .order_by(ev.c.position)
            .limit(bindparam("limit", type_=sa.Integer))
            .offset(_ZERO)
        )
        self._delete_statements(c, sid)
        self.snapshots_of = c(
            sa.select(sn.c.version, sn.c.fold_version, sn.c.head_hash, sn.c.state, sn.c.digest)
            .where(sn.c.session_id == sid, sn.c.digest.is_not(None))
            .order_by(sn.c.version)
        )
        self.snapshotted = c(sa.select(sn.c.session_id).where(sn.c.digest.is_not(None)).distinct())
        self._schema_statements(c, sv)

    def _advance_statements(self, dialect: Dialect, sid: sa.BindParameter[str]) -> None:
        """Moving a live session's head row past an append, and (where the backend can)
        the whole append in one statement."""
        ev, se, c = schema.events, schema.sessions, dialect.compile
        advance = [
            se.c.session_id == sid,
            se.c.version == bindparam("base_version"),
            se.c.head_hash == bindparam("base_hash"),
            se.c.status == bindparam("active"),
            alive_at(bindparam("now")),
        ]
        if dialect.row_locks:
            unlocked = sa.select(se.c.session_id).where(se.c.session_id == sid)
            advance.append(
                se.c.session_id == unlocked.with_for_update(skip_locked=True).scalar_subquery()
            )
        moved: dict[str, Any] = {
            "version": bindparam("new_version"),
            "head_hash": bindparam("new_hash"),
            "last_activity": bindparam("now"),
            "status": bindparam("status"),
        }
        advance_head = sa.update(se).where(*advance).values(moved)
        # A runner's append: only while the session's run lease is still the one it took.
        advance_fenced = sa.update(se).where(
            *advance,
            se.c.lease_owner == bindparam("owner"),
            se.c.lease_token == bindparam("token"),
        )
        advance_head_fenced = advance_fenced.values(moved)
        self.advance_head = c(advance_head)
        self.advance_head_fenced = c(advance_head_fenced)
        in_one, in_one_fenced = (
            dialect.append_in_one(stmt, ev, PER_EVENT)
            for stmt in (advance_head, advance_head_fenced)
        )
        self.append_in_one = None if in_one is None else c(in_one)
        """The whole append in one statement, where the backend has one (else None)."""
        self.append_in_one_fenced = None if in_one_fenced is None else c(in_one_fenced)

    @staticmethod
    def _head_insert(dialect: Dialect, created_at: str) -> str:
        """A new head row, created at the time bound as ``created_at``, active from ``now``."""
        se = schema.sessions
        return dialect.compile(
            dialect.insert_ignore(se).values(
                session_id=bindparam("session_id"),
                version=bindparam("new_version"),
                head_hash=bindparam("new_hash"),
                created_at=bindparam(created_at),
                last_activity=bindparam("now"),
                ttl_ms=bindparam("ttl_ms"),
                status=bindparam("status"),
            )
        )

    def _delete_statements(self, c: Callable[[Any], str], sid: sa.BindParameter[str]) -> None:
        """Removing each of a session's rows (purge and TTL removal)."""
        ev, se, sn, ba = schema.events, schema.sessions, schema.snapshots, schema.bases
        self.delete_events = c(sa.delete(ev).where(ev.c.session_id == sid))
        self.delete_snapshots = c(sa.delete(sn).where(sn.c.session_id == sid))
        self.delete_head = c(sa.delete(se).where(se.c.session_id == sid))
        self.delete_base = c(sa.delete(ba).where(ba.c.session_id == sid))

    def _fold_statements(
        self, c: Callable[[Any], str], in_range: tuple[sa.ColumnElement[bool], ...]
    ) -> None:
        """What a restore and a full fold read: the newest snapshot, each event's chained
        columns, only its fold columns, and one event's hash."""
        ev = schema.events
        fold_columns = (
            ev.c.version,
            ev.c.type,
            ev.c.key,
            ev.c.phase,
            ev.c.execution_id,
            ev.c.payload,
            ev.c.recorded_at,
        )
        self.read_chain, self.read_fold = (
            c(
                sa.select(*columns)
                .where(*in_range)
                .order_by(ev.c.version)
                .limit(bindparam("limit", type_=sa.Integer))
                .offset(_ZERO)
            )
            for columns in ((*fold_columns, ev.c.hash, ev.c.prev_hash), fold_columns)
        )
        sn = schema.snapshots
        # The newest snapshot is found on the snapshots' key alone (a subquery with a LIMIT is
        # never flattened), then its event's hash is a point read: joined first, PostgreSQL's
        # planner (once it has statistics) joins every snapshot of the session, 8 ms for 500.
        newest = _newest_snapshot(
            sn, bindparam("high"), sn.c.version, sn.c.head_hash, sn.c.state, sn.c.digest
        ).subquery("newest")
        at_newest = sa.and_(
            ev.c.session_id == bindparam("session_id"), ev.c.version == newest.c.version
        )
        self.newest_snapshot = c(
            sa.select(*newest.c, ev.c.hash).select_from(newest.outerjoin(ev, at_newest))
        )
        self.hash_at = c(
            sa.select(ev.c.hash).where(
                ev.c.session_id == bindparam("session_id"), ev.c.version == bindparam("version")
            )
        )

    def _restore_statement(self, c: Callable[[Any], str]) -> None:
        """A cold restore's first read: the head row and, in the same statement, the newest
        snapshot at or below its version with its event's hash (one round trip, not two).
        Both lookups are point reads on their keys, evaluated once (not correlated)."""
        se, sn, ev = schema.sessions, schema.snapshots, schema.events
        older = sn.alias("older")
        head_version = sa.select(se.c.version).where(se.c.session_id == bindparam("session_id"))
        newest_version = _newest_snapshot(
            older, head_version.scalar_subquery(), older.c.version
        ).scalar_subquery()
        self.session_and_snapshot = c(
            sa.select(
                *_SESSION_COLUMNS, sn.c.version, sn.c.head_hash, sn.c.state, sn.c.digest, ev.c.hash
            )
            .select_from(
                se.outerjoin(
                    sn, sa.and_(sn.c.session_id == se.c.session_id, sn.c.version == newest_version)
                ).outerjoin(
                    ev, sa.and_(ev.c.session_id == se.c.session_id, ev.c.version == sn.c.version)
                )
            )
            .where(se.c.session_id == bindparam("session_id"))
        )

    def _schema_statements(self, c: Callable[[Any], str], sv: sa.Table) -> None:
        """The schema stamp, and how the hash chains are computed."""
        self.schema_version = c(sa.select(func.max(sv.c.version)))
        self.stamp = c(sa.insert(sv).values(version=bindparam("version")))
        self.restamp = c(sa.update(sv).values(version=bindparam("version")))
        self.chain_mode = c(sa.select(sv.c.chain, sv.c.key_check))
        self.set_chain_mode = c(
            sa.update(sv).values(chain=bindparam("chain"), key_check=bindparam("key_check"))
        )
        self.any_event = c(
            sa.select(schema.events.c.position)
            .limit(sa.literal_column("1", sa.Integer))
            .offset(_ZERO)
        )


def _newest_snapshot(
    sn: sa.FromClause, high: sa.ColumnElement[Any], *columns: sa.ColumnElement[Any]
) -> sa.Select[Any]:
    """``columns`` of the session's newest snapshot under the fold version at or below
    ``high`` (written whole: with its digest), found on the snapshots' key alone."""
    return (
        sa.select(*columns)
        .where(
            sn.c.session_id == bindparam("session_id"),
            sn.c.fold_version == bindparam("fold_version"),
            sn.c.version <= high,
            sn.c.digest.is_not(None),
        )
        .order_by(sn.c.version.desc())
        .limit(sa.literal_column("1", sa.Integer))
        .offset(_ZERO)
    )
