"""Audit trust: what restore returns and what verify reports hold against a snapshot or an
event edited, damaged or rewritten behind eventctx's back, and (with a chain key) against a
whole chain recomputed by someone without the key."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import orjson
import pytest
import sqlalchemy as sa

from eventctx import ChainKeyError, ContextManager, EventStore, Inspector, IntegrityError
from eventctx.events import chain_hash, sha256, snapshot_digest
from eventctx.state import FOLD_VERSION

KEY = "a key the application holds, not the database"


def _write(url: str, chain_key: str | None = None) -> None:
    """Session ``s``: 30 writes of k0..k9 (versions 2..31), a snapshot on the way."""
    with ContextManager(url, cleanup_interval=None, snapshot_every=10, chain_key=chain_key) as m:
        ctx = m.create_context("s", ttl=None)
        for i in range(30):
            ctx.set(f"k{i % 10}", i)


def _truth() -> dict[str, int]:
    return {f"k{i}": 20 + i for i in range(10)}


def _newest_snapshot(conn: sa.Connection) -> tuple[int, bytes]:
    row = conn.execute(
        sa.text(
            "SELECT version, state FROM eventctx_snapshots WHERE session_id = 's' "
            "ORDER BY version DESC LIMIT 1"
        )
    ).one()
    return int(row[0]), bytes(row[1])


def _set_snapshot(
    conn: sa.Connection, version: int, state: bytes, digest: bytes | None = None
) -> None:
    """Replace a snapshot's state, keeping its version and head hash (and its digest, unless
    one is given: an attacker who recomputes it)."""
    sets = "state = :state" + (", digest = :digest" if digest is not None else "")
    conn.execute(
        sa.text(f"UPDATE eventctx_snapshots SET {sets} WHERE session_id = 's' AND version = :v"),
        {"state": state, "digest": digest, "v": version},
    )


def _forged_digest(conn: sa.Connection, version: int, state: bytes) -> bytes:
    """The unkeyed digest of ``state`` as the snapshot at ``version``: anyone can compute it."""
    head = conn.execute(
        sa.text("SELECT head_hash FROM eventctx_snapshots WHERE version = :v"), {"v": version}
    ).scalar_one()
    return snapshot_digest("s", version, FOLD_VERSION, bytes(head), state, sha256)


def _edited_state(state: bytes) -> bytes:
    raw = orjson.loads(state)
    raw["data"]["k3"] = "edited"
    return orjson.dumps(raw)


def _restored(url: str, chain_key: str | None = None) -> dict[str, object]:
    with ContextManager(url, cleanup_interval=None, chain_key=chain_key) as m:
        return m.get_context("s").to_dict()


@pytest.fixture
def written(db_url: str) -> Iterator[str]:
    _write(db_url)
    yield db_url


@pytest.mark.parametrize(
    "damage",
    ["edited", "garbage", "wrong shape", "truncated", "edited, digest recomputed"],
)
def test_a_damaged_snapshot_is_never_returned_and_verify_names_it(
    written: str, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    engine = sa.create_engine(written)
    with engine.begin() as conn:
        version, state = _newest_snapshot(conn)
        assert 1 < version < 31
        damaged = {
            "edited": _edited_state(state),
            "garbage": b"\x00\xffnot json at all",
            "wrong shape": b'{"unexpected": []}',
            "truncated": state[: len(state) // 2],
            "edited, digest recomputed": _edited_state(state),
        }[damage]
        digest = None
        if damage.endswith("recomputed"):  # what anyone with write access can do, unkeyed
            digest = _forged_digest(conn, version, damaged)
        _set_snapshot(conn, version, damaged, digest)
    engine.dispose()

    with Inspector(written) as inspector:
        result = inspector.verify("s")
        assert not result.ok and result.version == version, result
        assert f"snapshot at version {version}" in (result.error or "")
        everything = inspector.verify()
        assert [(r.session_id, r.ok, r.version) for r in everything] == [("s", False, version)]
    if damage.endswith("recomputed"):
        return  # unkeyed, only verify can tell (restore trusts a digest anyone can compute)
    with caplog.at_level(logging.WARNING, logger="eventctx"):
        assert _restored(written) == _truth()  # from the log, never the damaged snapshot
    assert "restoring from the log" in caplog.text


def test_a_keyed_snapshot_edited_with_a_recomputed_digest_is_caught_by_restore(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    _write(db_url, KEY)
    engine = sa.create_engine(db_url)
    with engine.begin() as conn:
        version, state = _newest_snapshot(conn)
        edited = _edited_state(state)
        _set_snapshot(conn, version, edited, _forged_digest(conn, version, edited))
    engine.dispose()
    with caplog.at_level(logging.WARNING, logger="eventctx"):
        assert _restored(db_url, KEY) == _truth()
    assert f"snapshot at version {version} is not what was written" in caplog.text


def _edit_event(url: str, version: int, payload: bytes) -> None:
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        suffix = " ON eventctx_events" if engine.dialect.name == "postgresql" else ""
        conn.exec_driver_sql(f"DROP TRIGGER eventctx_events_no_update{suffix}")
        conn.execute(
            sa.text(
                "UPDATE eventctx_events SET payload = :p WHERE session_id = 's' AND version = :v"
            ),
            {"p": payload, "v": version},
        )
    engine.dispose()


@pytest.mark.parametrize("payload", [b'{"value":"edited"}', b"\xff{not json"])
def test_restore_checks_the_tail_it_folds(written: str, payload: bytes) -> None:
    # Version 31, the last, is past the newest snapshot: in the tail a restore folds.
    _edit_event(written, 31, payload)
    with pytest.raises(IntegrityError, match="session 's' version 31") as raised:
        _restored(written)
    assert raised.value.session_id == "s" and raised.value.version == 31
    with Inspector(written) as inspector:  # the read side names it too
        result = inspector.verify("s")
        assert not result.ok and result.version == 31
        if not payload.startswith(b"{"):  # not JSON: reading it says where, never crashes
            with pytest.raises(IntegrityError, match="session 's' version 31: the stored"):
                list(inspector.history("s"))


def test_an_event_edited_under_a_snapshot_is_caught_by_verify(written: str) -> None:
    _edit_event(written, 5, b'{"value":"edited"}')
    assert _restored(written) == _truth()  # the snapshot covers it, and is right
    with Inspector(written) as inspector:
        result = inspector.verify("s")
        assert not result.ok and result.version == 5


def _rewrite_chain(url: str) -> None:
    """What someone who can write the tables but lacks the key can do: edit an event, then
    recompute every hash (unkeyed), the head row and the chain mode."""
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        suffix = " ON eventctx_events" if engine.dialect.name == "postgresql" else ""
        conn.exec_driver_sql(f"DROP TRIGGER eventctx_events_no_update{suffix}")
        rows = conn.execute(
            sa.text(
                "SELECT version, type, key, phase, execution_id, recorded_at, payload "
                "FROM eventctx_events WHERE session_id = 's' ORDER BY version"
            )
        ).all()
        prev = bytes(32)
        for version, type_, key, phase, run_id, at, stored in rows:
            payload = b'{"value":"rewritten"}' if version == 5 else bytes(stored)
            digest = chain_hash(prev, "s", version, type_, key, phase, run_id, at, payload)
            conn.execute(
                sa.text(
                    "UPDATE eventctx_events SET payload = :p, hash = :h, prev_hash = :prev "
                    "WHERE session_id = 's' AND version = :v"
                ),
                {"p": payload, "h": digest, "prev": prev, "v": version},
            )
            prev = digest
        conn.execute(sa.text("UPDATE eventctx_sessions SET head_hash = :h"), {"h": prev})
        conn.execute(sa.text("DELETE FROM eventctx_snapshots"))
        conn.execute(sa.text("UPDATE eventctx_schema SET chain = 'sha256', key_check = NULL"))
    engine.dispose()


def test_a_rewritten_unkeyed_chain_passes_verify(written: str) -> None:
    """The limit of an unkeyed chain (docs/security.md): only an externally recorded head
    catches a rewrite."""
    _rewrite_chain(written)
    with EventStore.open(written) as store:
        assert store.verify("s") == 31


def test_a_keyed_chain_rewritten_without_the_key_is_caught(db_url: str) -> None:
    _write(db_url, KEY)
    with EventStore.open(db_url, chain_key=KEY) as store:
        assert store.verify("s") == 31
    _rewrite_chain(db_url)
    with pytest.raises(ChainKeyError, match="not keyed"):
        EventStore.open(db_url, chain_key=KEY)  # the auditor, who holds the key


def test_a_keyed_database_needs_its_key(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _write(db_url, KEY)
    with pytest.raises(ChainKeyError, match="keyed: give its key"):
        EventStore.open(db_url)
    with pytest.raises(ChainKeyError, match="not this database's key"):
        EventStore.open(db_url, chain_key="another key, sixteen bytes or more")
    monkeypatch.setenv("EVENTCTX_CHAIN_KEY", KEY)
    with EventStore.open(db_url) as store:  # from the environment
        assert store.verify("s") == 31
    assert _restored(db_url) == _truth()


def test_a_keyed_chain_differs_from_the_unkeyed_one(db_url: str, tmp_path: object) -> None:
    _write(db_url, KEY)
    with EventStore.open(db_url, chain_key=KEY) as store:
        first = next(iter(store.read("s")))
    unkeyed = chain_hash(
        bytes(32),
        "s",
        1,
        first.type,
        None,
        None,
        None,
        first.recorded_at_us,
        orjson.dumps(first.payload, option=orjson.OPT_SORT_KEYS),
    )
    assert first.hash != unkeyed
