"""The append protocol, inside an open write transaction: the session's head row moves first
(the version check, under which writers of one session queue), then the events are inserted.

``stage`` does the head-row part and returns the event rows, chained onto the head it moved;
the group committer inserts the rows of a whole group at once. Where the backend can move the
head and insert in one statement, ``in_one`` makes that statement for an append whose head the
caller believes it knows: when the belief is wrong it changes nothing, and ``stage`` follows.
"""

from __future__ import annotations

from collections.abc import MutableMapping, Sequence
from typing import Any

from eventctx.errors import (
    ConcurrencyError,
    RunInProgressError,
    SessionExistsError,
    SessionExpiredError,
    SessionNotFoundError,
)
from eventctx.events import GENESIS_HASH, Hasher, NewEvent, chain_hash
from eventctx.store.commit import AppendRequest, InOne, RowLockedError, head_after
from eventctx.store.dialect import Cursor
from eventctx.store.heads import (
    ACTIVE,
    DELETED,
    EXPIRED,
    EXPIRING,
    Fence,
    Head,
    expired_at,
)
from eventctx.store.statements import EVENT_COLUMNS, PER_EVENT, EventRow, Statements

__all__ = ["in_one", "stage"]


def stage(
    cur: Cursor,
    sql: Statements,
    request: AppendRequest,
    heads: MutableMapping[str, Head],
    wait: bool,
    now: int,
    hasher: Hasher,
) -> list[EventRow]:
    """Move the head row of ``request``'s session past its events and return their rows
    (hashed with ``hasher``).

    Refusals (SessionExistsError, SessionNotFoundError, SessionExpiredError, ConcurrencyError,
    RunInProgressError for a lost lease) are raised before anything changes. A head row that
    another transaction holds is waited for only with ``wait``, else RowLockedError.
    """
    session_id, events = request.session_id, request.events
    if events[0].type == "ContextCreated":
        rows = _create_head(cur, sql, session_id, events, now, wait, hasher)
    else:
        head = heads.get(session_id, request.head)  # the committer's own is fresher
        rows = _advance_head(cur, sql, request, head, now, wait, hasher)
    heads[session_id] = head_after(rows)
    return rows


def in_one(
    sql: Statements, request: AppendRequest, head: Head | None, now: int, hasher: Hasher
) -> InOne | None:
    """The one statement of ``request`` on top of ``head`` (the committer's or the caller's
    belief), or None when there is none: the backend has no such statement, the append
    creates its session, the head is unknown or not at the expected version."""
    statement = sql.append_in_one if request.fence is None else sql.append_in_one_fenced
    events, expected = request.events, request.expected_version
    if statement is None or head is None or events[0].type == "ContextCreated":
        return None
    if expected is not None and expected != head.version:
        return None
    rows = _chain(request.session_id, events, head, now, hasher)
    params = _head_params(request.session_id, rows, events)
    params["base_version"], params["base_hash"] = head.version, head.hash
    if request.fence is not None:
        params["owner"], params["token"] = request.fence
    columns = dict(zip(EVENT_COLUMNS, zip(*rows, strict=True), strict=True))
    for name in PER_EVENT:
        params[f"{name}s"] = list(columns[name])
    return InOne(statement, params, rows)


def _create_head(
    cur: Cursor,
    sql: Statements,
    session_id: str,
    events: Sequence[NewEvent],
    now: int,
    wait: bool,
    hasher: Hasher,
) -> list[EventRow]:
    """Insert the head row of a new session (or revive a deleted one); return the rows."""
    rows = _chain(session_id, events, Head(0, GENESIS_HASH, now), now, hasher)
    params = _head_params(session_id, rows, events)
    params["ttl_ms"] = events[0].payload.get("ttl_ms")
    while True:
        cur.execute(sql.insert_head, params)
        if cur.rowcount == 1:
            return rows
        try:
            found, status, _ = _locked_head(cur, sql, session_id, now, wait)
            break
        except SessionNotFoundError:
            # PostgreSQL: the row our INSERT ran into was deleted (compaction, a purge) and
            # committed before we could lock it. Nothing is in the way now: insert again.
            continue
    if status == ACTIVE:
        raise SessionExistsError(
            f"session {session_id!r} already exists; use get_context to open it"
        )
    if status == EXPIRING:
        raise SessionExpiredError(
            f"session {session_id!r} expired and is being removed; create it again shortly"
        )
    rows = _chain(session_id, events, found, now, hasher)
    params.update(_head_params(session_id, rows, events))
    cur.execute(sql.recreate_head, params)
    return rows


def _advance_head(
    cur: Cursor,
    sql: Statements,
    request: AppendRequest,
    head: Head | None,
    now: int,
    wait: bool,
    hasher: Hasher,
) -> list[EventRow]:
    """Move a live session's head past the request's events; return their rows.

    First on the caller's belief of the head (one UPDATE when it is right), else on the
    head read under its row lock, which makes the second UPDATE certain to match.
    """
    session_id, events, expected = request.session_id, request.events, request.expected_version
    if head is not None and expected in (None, head.version):
        rows = _chain(session_id, events, head, now, hasher)
        if _move_head(cur, sql, session_id, rows, events, head, request.fence):
            return rows
    found, status, lease = _locked_head(cur, sql, session_id, now, wait)
    if status == DELETED:
        raise SessionNotFoundError(f"session {session_id!r} was deleted")
    if status != ACTIVE:
        raise SessionExpiredError(
            f"session {session_id!r} outlived its ttl; nothing was written. "
            "Create it again to go on"
        )
    if request.fence is not None and lease != request.fence:
        raise RunInProgressError(
            f"the run lease of session {session_id!r} was taken over "
            f"(now held by {lease.owner or 'nobody'}); this runner writes nothing more"
        )
    if expected is not None and found.version != expected:
        raise ConcurrencyError(
            f"session {session_id!r} is at version {found.version}, "
            f"not {expected}; refresh and retry"
        )
    rows = _chain(session_id, events, found, now, hasher)
    if not _move_head(cur, sql, session_id, rows, events, found, request.fence):
        raise ConcurrencyError(  # pragma: no cover - the row is locked
            f"session {session_id!r} moved while its row was locked"
        )
    return rows


def _move_head(
    cur: Cursor,
    sql: Statements,
    session_id: str,
    rows: list[EventRow],
    events: Sequence[NewEvent],
    base: Head,
    fence: Fence | None,
) -> bool:
    new = head_after(rows)
    params = {
        "session_id": session_id,
        "new_version": new.version,
        "new_hash": new.hash,
        "now": new.recorded_at_us,
        "status": DELETED if events[-1].type == "ContextDeleted" else ACTIVE,
        "active": ACTIVE,
        "base_version": base.version,
        "base_hash": base.hash,
    }
    if fence is None:
        cur.execute(sql.advance_head, params)
    else:
        params["owner"], params["token"] = fence
        cur.execute(sql.advance_head_fenced, params)
    return bool(cur.rowcount == 1)


def _locked_head(
    cur: Cursor, sql: Statements, session_id: str, now: int, wait: bool
) -> tuple[Head, str, Fence]:
    """The head row, locked until the transaction ends: the head, its status at ``now``
    (EXPIRED for an active session past its ttl) and its run lease."""
    cur.execute(sql.head_for_update if wait else sql.head_skip_locked, {"session_id": session_id})
    row = cur.fetchone()
    if row is None:
        if not wait:
            cur.execute(sql.session, {"session_id": session_id})
            if cur.fetchone() is not None:
                raise RowLockedError(session_id)
        raise SessionNotFoundError(
            f"session {session_id!r} does not exist; create it with create_context"
        )
    version, head_hash, last_activity, status, ttl_ms, lease_owner, lease_token, lease = row
    if status == ACTIVE and expired_at(last_activity, ttl_ms, now, lease):
        status = EXPIRED
    head = Head(int(version), bytes(head_hash), int(last_activity))
    return head, str(status), Fence(lease_owner or "", int(lease_token))


def _chain(
    session_id: str, events: Sequence[NewEvent], base: Head, now: int, hasher: Hasher
) -> list[EventRow]:
    """Rows for ``events`` on top of ``base``: versions, one recorded_at, and the hash chain."""
    at = now if now > base.recorded_at_us else base.recorded_at_us
    prev = base.hash
    version = base.version
    rows = []
    for event in events:
        version += 1
        digest = chain_hash(
            prev,
            session_id,
            version,
            event.type,
            event.key,
            event.phase,
            event.execution_id,
            at,
            event.data,
            hasher,
        )
        rows.append(
            (
                session_id,
                version,
                event.type,
                event.key,
                event.phase,
                event.execution_id,
                event.data,
                at,
                digest,
                prev,
            )
        )
        prev = digest
    return rows


def _head_params(
    session_id: str, rows: list[EventRow], events: Sequence[NewEvent]
) -> dict[str, Any]:
    new = head_after(rows)
    status = DELETED if events[-1].type == "ContextDeleted" else ACTIVE
    return {
        "session_id": session_id,
        "new_version": new.version,
        "new_hash": new.hash,
        "now": new.recorded_at_us,
        "status": status,
        "active": ACTIVE,
    }
