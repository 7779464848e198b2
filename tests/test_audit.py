"""Audit trust: what restore returns and what verify reports hold against a snapshot or an
event edited, damaged or rewritten behind eventctx's back, and (with a chain key) against a
whole chain recomputed by someone without the key."""

from __future__ import annotations

import logging
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import sqlalchemy as sa

from eventctx import ChainKeyError, ContextManager, EventStore, Inspector, IntegrityError
from eventctx.events import chain_hash, keyed_hasher, sha256, snapshot_digest
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
    head, follows, provenance = state.partition(b"\n")
    raw = orjson.loads(head)
    raw["data"]["k3"] = "edited"
    return orjson.dumps(raw) + follows + provenance


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


def test_a_keyed_chain_is_hmac_under_the_key(db_url: str) -> None:
    """Each stored hash is the HMAC of its stored fields under the key, not their sha256."""
    _write(db_url, KEY)
    keyed = keyed_hasher(KEY.encode())
    with EventStore.open(db_url, chain_key=KEY) as store:
        rows = list(store.chain_rows("s", 2**62))
    assert len(rows) == 31
    for version, type_, key, phase, run_id, payload, at, digest, prev in rows:
        fields = (bytes(prev), "s", version, type_, key, phase, run_id, at, bytes(payload))
        assert bytes(digest) == chain_hash(*fields, keyed)
        assert bytes(digest) != chain_hash(*fields, sha256)


# --- the same, through the command line (real processes) ------------------------------------


def _cli(*args: str, key: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("EVENTCTX_URL", "EVENTCTX_CHAIN_KEY")}
    if key is not None:
        env["EVENTCTX_CHAIN_KEY"] = key
    return subprocess.run(
        [sys.executable, "-m", "eventctx", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def _no_traceback(done: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in done.stderr and len(done.stderr.splitlines()) <= 1, done.stderr


@pytest.mark.parametrize("damage", ["snapshot edited", "event edited", "payload not JSON"])
def test_verify_names_the_damage_and_fails(written: str, damage: str) -> None:
    engine = sa.create_engine(written)
    with engine.begin() as conn:
        version, state = _newest_snapshot(conn)
        if damage == "snapshot edited":
            _set_snapshot(conn, version, _edited_state(state))
    engine.dispose()
    if damage == "event edited":
        version = 7
        _edit_event(written, version, b'{"value":"edited"}')
    elif damage == "payload not JSON":
        version = 31
        _edit_event(written, version, b"\xff")
    for args in (("verify",), ("verify", "s")):
        done = _cli("--url", written, *args)
        _no_traceback(done)
        assert done.returncode == 1
        assert "s: FAILED: session 's'" in done.stdout and f"version {version}" in done.stdout
    history = _cli("--url", written, "history", "s")
    _no_traceback(history)
    if damage == "payload not JSON":
        assert history.returncode == 1 and "session 's' version 31" in history.stderr


def test_verify_with_a_key_and_without(db_url: str) -> None:
    _write(db_url, KEY)
    done = _cli("--url", db_url, "verify", key=KEY)
    assert done.returncode == 0 and "s: 31 events verified, 1 snapshot checked" in done.stdout
    for key in (None, "not the key, but sixteen bytes long"):
        refused = _cli("--url", db_url, "verify", key=key)
        _no_traceback(refused)
        assert refused.returncode == 1 and "chain" in refused.stderr
    _rewrite_chain(db_url)
    caught = _cli("--url", db_url, "verify", key=KEY)
    _no_traceback(caught)
    assert caught.returncode == 1 and "not keyed" in caught.stderr


def test_a_recorded_head_catches_a_rewritten_unkeyed_chain(written: str, tmp_path: Path) -> None:
    printed = _cli("--url", written, "verify", "--print-head")
    assert printed.returncode == 0
    version, digest, session = printed.stdout.split()
    assert (version, session) == ("31", "s") and len(digest) == 64
    heads = tmp_path / "heads.txt"
    heads.write_text(printed.stdout)
    with ContextManager(written, cleanup_interval=None) as manager:
        manager.get_context("s").set("later", 1)  # a session that grew still matches
    for spec in (f"31:{digest}", f"@{heads}"):
        assert _cli("--url", written, "verify", "s", "--expect-head", spec).returncode == 0
    assert _cli("--url", written, "verify", "--expect-head", f"@{heads}").returncode == 0
    _rewrite_chain(written)
    assert _cli("--url", written, "verify").returncode == 0  # the limit of an unkeyed chain
    caught = _cli("--url", written, "verify", "--expect-head", f"@{heads}")
    _no_traceback(caught)
    assert caught.returncode == 1
    assert "version 31: hash" in caught.stdout and "is not the recorded head" in caught.stdout
    bad = _cli("--url", written, "verify", "s", "--expect-head", "x:y")
    _no_traceback(bad)
    assert bad.returncode == 1 and "positive integer" in bad.stderr


def test_a_column_of_the_wrong_type_is_named_not_a_crash(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'typed.db'}"
    _write(url)
    with sqlite3.connect(tmp_path / "typed.db") as conn:
        conn.execute("DROP TRIGGER eventctx_events_no_update")
        conn.execute("UPDATE eventctx_events SET payload = 'text' WHERE version = 6")
    done = _cli("--url", url, "verify")
    _no_traceback(done)
    assert done.returncode == 1 and "s: FAILED: session 's' version 6" in done.stdout
