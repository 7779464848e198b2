"""Export and import: byte-for-byte round trips across backends, refusals that leave the
target unchanged, --as, gzip, keyed chains, the command line, and bounded memory."""

from __future__ import annotations

import base64
import gzip
import io
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
import sqlalchemy as sa

import eventctx
from eventctx import (
    ChainKeyError,
    ContextManager,
    EventCtxError,
    EventStore,
    IntegrityError,
    InvalidInputError,
    PluginRunner,
    RetryPolicy,
    SessionExistsError,
)
from eventctx.compaction import compact
from eventctx.exchange import export_session, import_session
from eventctx.store.statements import EVENT_COLUMNS
from tests.conftest import _pg_schema, require_pg

S = "review ‘42’"
_FAILED_ONCE: list[str] = []


def analysis(inp: Any) -> Any:
    ctx = eventctx.current_context()
    ctx.update({"files": ["a.go", "b.go"], "score": 0.1 + 0.2, "unicode": "é\u2028\x00"})
    eventctx.helper().set_metadata("language", "go")
    return {"files": 2}


def checks(inp: Any) -> Any:
    ctx = eventctx.current_context()
    ctx.set("checks", {"z": 1, "a": [None, True, 1e300]})
    if not _FAILED_ONCE:
        _FAILED_ONCE.append("x")
        raise TimeoutError("first try times out")
    ctx.delete("score")
    return "done"


def record(url: str, session_id: str = S) -> None:
    """A real run: run and phase events, a retried phase, metadata, a delete."""
    _FAILED_ONCE.clear()
    with ContextManager(url, cleanup_interval=None) as manager:
        runner = PluginRunner(manager, [analysis, checks], retries=RetryPolicy(attempts=2))
        assert runner.run(session_id, input={"repo": "x"}).status == "completed"
        manager.get_context(session_id).set("after", {"k": "v"})


def rows(url: str, session_id: str = S) -> list[tuple[Any, ...]]:
    """Every stored column of a session's events but the store-local position."""
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    ev = sa.table("eventctx_events", *(sa.column(n) for n in EVENT_COLUMNS))
    try:
        with engine.connect() as conn:
            found = conn.execute(
                sa.select(ev).where(ev.c.session_id == session_id).order_by(ev.c.version)
            )
            return [tuple(bytes(v) if isinstance(v, memoryview) else v for v in r) for r in found]
    finally:
        engine.dispose()


def state(url: str, session_id: str = S) -> dict[str, Any]:
    with ContextManager(url, cleanup_interval=None) as manager:
        return manager.get_context(session_id).to_dict()


def exported(url: str, session_id: str = S) -> bytes:
    out = io.BytesIO()
    with EventStore.open(url, read_only=True) as store:
        export_session(store, session_id, out)
    return out.getvalue()


def imported(url: str, source: Any, as_session: str | None = None) -> None:
    with EventStore.open(url) as store:
        import_session(store, source, as_session)


def verified(url: str, session_id: str = S) -> int:
    with EventStore.open(url) as store:
        return store.verify(session_id)


@contextmanager
def other_backend(db_url: str, tmp_path: Path) -> Iterator[str]:
    """A fresh database on the other backend than ``db_url``'s."""
    if db_url.startswith("sqlite"):
        require_pg()
        with _pg_schema() as url:
            yield url
    else:
        yield f"sqlite:///{tmp_path / 'other.db'}"


def test_export_then_import_into_the_other_backend(db_url: str, tmp_path: Path) -> None:
    record(db_url)
    data = exported(db_url)
    header = orjson.loads(data.splitlines()[0])
    assert header["format"] == "eventctx-session" and header["events"] == len(rows(db_url))
    with other_backend(db_url, tmp_path) as target:
        imported(target, io.BytesIO(data))
        assert rows(target) == rows(db_url)  # every column, payload bytes and hashes included
        assert state(target) == state(db_url)
        assert verified(target) == verified(db_url) == header["events"]
        assert exported(target) == data


def test_sqlite_to_postgresql_to_sqlite_is_byte_for_byte(pg_url: str, tmp_path: Path) -> None:
    first, last = f"sqlite:///{tmp_path / 'a.db'}", f"sqlite:///{tmp_path / 'b.db'}"
    record(first)
    imported(pg_url, io.BytesIO(exported(first)))
    imported(last, io.BytesIO(exported(pg_url)))
    assert rows(first) == rows(pg_url) == rows(last)
    assert exported(first) == exported(pg_url) == exported(last)
    with EventStore.open(first) as a, EventStore.open(last) as b:
        head_a, head_b = a.session(S), b.session(S)
        assert head_a is not None and head_b is not None
        assert (head_a.version, head_a.head_hash, head_a.ttl_ms, head_a.created_at_us) == (
            head_b.version,
            head_b.head_hash,
            head_b.ttl_ms,
            head_b.created_at_us,
        )


def _edit(data: bytes, line: int, change: Callable[[dict[str, Any]], None]) -> bytes:
    lines = data.splitlines(keepends=True)
    item = orjson.loads(lines[line])
    change(item)
    lines[line] = orjson.dumps(item) + b"\n"
    return b"".join(lines)


def _payload(data: bytes) -> bytes:
    """The file with the first payload that names a.go naming x.go instead."""
    lines = data.splitlines(keepends=True)
    for number, line in enumerate(lines[1:], start=1):
        item = orjson.loads(line)
        payload = base64.b64decode(item["payload_b64"])
        if b"a.go" in payload:
            item["payload_b64"] = base64.b64encode(payload.replace(b"a.go", b"x.go")).decode()
            lines[number] = orjson.dumps(item) + b"\n"
            return b"".join(lines)
    raise AssertionError("no payload names a.go")


def _without_last_lines(data: bytes) -> bytes:
    return b"".join(data.splitlines(keepends=True)[:-2])


def _hash(item: dict[str, Any]) -> None:
    item["hash"] = "00" + item["hash"][2:]


DAMAGE: dict[str, tuple[Callable[[bytes], bytes], type[EventCtxError], str]] = {
    "truncated by bytes": (lambda d: d[:-40], IntegrityError, "not JSON"),
    "truncated by lines": (_without_last_lines, IntegrityError, "truncated"),
    "payload edited": (_payload, IntegrityError, "does not match"),
    "hash edited": (lambda d: _edit(d, 3, _hash), IntegrityError, "does not match"),
    "unknown format_version": (
        lambda d: _edit(d, 0, lambda h: h.update(format_version=3)),
        InvalidInputError,
        "format_version 3",
    ),
    "not JSON": (lambda d: b"session,version\ns,1\n", InvalidInputError, "not an eventctx"),
    "gzip cut short": (lambda d: gzip.compress(d)[:-30], IntegrityError, "compressed stream"),
}


def _contents(url: str) -> list[tuple[str, int, int]]:
    """Each session of a store: its id, head version and events stored."""
    with EventStore.open(url, read_only=True) as store:
        return [(h.session_id, h.version, len(rows(url, h.session_id))) for h in store.sessions()]


@pytest.mark.parametrize("damage", [*DAMAGE, "session exists"])
def test_a_refused_file_leaves_the_target_unchanged(
    db_url: str, tmp_path: Path, damage: str
) -> None:
    source = f"sqlite:///{tmp_path / 'source.db'}"
    record(source)
    data = exported(source)
    with ContextManager(db_url, cleanup_interval=None) as manager:
        manager.create_context("bystander").set("k", 1)
    if damage == "session exists":
        imported(db_url, io.BytesIO(data))
        kind, words, bad = SessionExistsError, "exists", data
    else:
        edit, kind, words = DAMAGE[damage]
        bad = edit(data)
    path = tmp_path / ("bad.jsonl.gz" if damage == "gzip cut short" else "bad.jsonl")
    path.write_bytes(bad)
    before = _contents(db_url)
    with pytest.raises(kind, match=words) as raised:
        imported(db_url, path)
    assert "\n" not in str(raised.value)
    assert _contents(db_url) == before


def test_import_as_a_new_session_is_rechained_and_verifies(db_url: str, tmp_path: Path) -> None:
    record(db_url)
    imported(db_url, io.BytesIO(exported(db_url)), as_session="copy")
    original, copy = rows(db_url), rows(db_url, "copy")
    assert [r[1:8] for r in copy] == [r[1:8] for r in original]  # same events, same times
    assert {r[8] for r in copy}.isdisjoint(r[8] for r in original)  # its own chain
    assert verified(db_url, "copy") == len(original)
    assert state(db_url, "copy") == state(db_url)


def test_gzip_files(db_url: str, tmp_path: Path) -> None:
    record(db_url)
    path = tmp_path / "s.jsonl.gz"
    with EventStore.open(db_url, read_only=True) as store:
        done = export_session(store, S, path)
    assert path.read_bytes()[:2] == b"\x1f\x8b"
    assert gzip.decompress(path.read_bytes()) == exported(db_url)
    target = f"sqlite:///{tmp_path / 't.db'}"
    imported(target, path)
    assert rows(target) == rows(db_url) and verified(target) == done.events


def test_a_keyed_chain_verifies_only_with_its_key(tmp_path: Path) -> None:
    key, other = "k" * 32, "o" * 32
    source = f"sqlite:///{tmp_path / 'keyed.db'}"
    with EventStore.open(source, chain_key=key) as store:
        manager = ContextManager(store, cleanup_interval=None)
        with manager:
            manager.create_context(S).set("a", 1)
        data = io.BytesIO()
        export_session(store, S, data)
    assert orjson.loads(data.getvalue().splitlines()[0])["chain"] == "hmac-sha256"
    plain = f"sqlite:///{tmp_path / 'plain.db'}"
    with EventStore.open(plain) as store, pytest.raises(ChainKeyError, match="same key"):
        import_session(store, io.BytesIO(data.getvalue()))
    wrong = f"sqlite:///{tmp_path / 'wrong.db'}"
    with EventStore.open(wrong, chain_key=other) as store:
        with pytest.raises(IntegrityError, match="verifies only with the same key"):
            import_session(store, io.BytesIO(data.getvalue()))
        assert store.sessions() == []
    right = f"sqlite:///{tmp_path / 'right.db'}"
    with EventStore.open(right, chain_key=key) as store:
        import_session(store, io.BytesIO(data.getvalue()))
        assert store.verify(S) == 2


def cli(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if k not in ("EVENTCTX_URL", "EVENTCTX_CHAIN_KEY")}
    return subprocess.run(
        [sys.executable, "-m", "eventctx", *args],
        input=stdin,
        capture_output=True,
        env=env,
        timeout=120,
        check=False,
    )


def failed(done: subprocess.CompletedProcess[bytes]) -> str:
    """The one-line error of a command that failed."""
    err = done.stderr.decode()
    assert done.returncode == 1 and not done.stdout, err
    assert err.startswith("eventctx: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


def test_command_line(db_url: str, tmp_path: Path) -> None:
    record(db_url)
    n = len(rows(db_url))
    done = cli("--url", db_url, "export", S)
    assert done.returncode == 0 and not done.stderr and done.stdout == exported(db_url)
    path = tmp_path / "s.jsonl.gz"
    done = cli("--url", db_url, "export", S, "-o", str(path))
    assert done.returncode == 0 and done.stdout.decode().startswith(f"exported {n} events")
    target = f"sqlite:///{tmp_path / 'target.db'}"
    done = cli("--url", target, "import", str(path))
    assert done.returncode == 0 and not done.stderr
    assert done.stdout.decode() == f"imported {n} events as {S} from {path}\n"
    done = cli("--url", target, "--json", "import", "-", "--as", "copy", stdin=exported(db_url))
    assert orjson.loads(done.stdout)["session_id"] == "copy"
    assert rows(target) == rows(db_url) and verified(target, "copy") == n
    assert "exists" in failed(cli("--url", target, "import", str(path)))
    assert "No such file" in failed(cli("--url", target, "import", str(tmp_path / "nope")))
    assert "does not exist" in failed(cli("--url", db_url, "export", "nope"))
    path.write_bytes(gzip.compress(exported(db_url)[:-40]))
    assert "not JSON" in failed(cli("--url", target, "import", str(path), "--as", "x"))


MEMORY_CHILD = textwrap.dedent(
    """
    import io, resource, sys
    from eventctx import EventStore, NewEvent
    from eventctx.exchange import export_session, import_session

    source, target, path, events = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    with EventStore.open(source) as store:
        store.append("big", [NewEvent.create("ContextCreated", {"ttl_ms": None})])
        value = {"value": {"summary": "x" * 80, "files": ["a.go", "b.go"], "score": 0.75}}
        for start in range(1, events, 1000):
            batch = [NewEvent.create("KeySet", value, key=f"k{i % 200}")
                     for i in range(start, min(start + 1000, events))]
            store.append("big", batch)
    with EventStore.open(source) as store, EventStore.open(target) as into:
        store.append("small", [NewEvent.create("ContextCreated", {"ttl_ms": None})])
        warm = io.BytesIO()
        export_session(store, "small", warm)  # loads every module the big run uses
        import_session(into, io.BytesIO(warm.getvalue()))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        export_session(store, "big", path)
        import_session(into, path)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        assert into.verify("big") == events
    print((after - before) // 1024)
    """
)


def test_export_and_import_stream_in_bounded_memory(tmp_path: Path) -> None:
    """200k events through a file and back keep the peak RSS growth small."""
    events = 200_000
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            MEMORY_CHILD,
            f"sqlite:///{tmp_path / 'a.db'}",
            f"sqlite:///{tmp_path / 'b.db'}",
            str(tmp_path / "big.jsonl.gz"),
            str(events),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) < 60, f"peak RSS grew by {done.stdout.strip()} MiB"


# --- the archive: cleanup never destroys the only copy -----------------------------------------


def _expired_session(url: str, session_id: str = "old") -> list[tuple[Any, ...]]:
    """A session with a run and writes, past its ttl; returns its rows as stored."""
    with ContextManager(url, cleanup_interval=None) as manager:
        ctx = manager.create_context(session_id, ttl=timedelta(milliseconds=300))
        ctx.update({f"k{i}": i for i in range(30)})
        PluginRunner(manager, [lambda _: "done"]).run(session_id)
        rows = _rows(manager.store, session_id)
    time.sleep(0.4)
    return rows


def _rows(store: EventStore, session_id: str) -> list[tuple[Any, ...]]:
    return [tuple(r) for r in store.chain_rows(session_id, 2**62)]


def test_cleanup_archives_each_expired_session_before_removing_it(
    db_url: str, tmp_path: Path
) -> None:
    rows = _expired_session(db_url)
    archive = tmp_path / "archive"
    with ContextManager(db_url, cleanup_interval=None, archive=archive) as manager:
        report = manager.cleanup_expired()
        assert report.sessions == ["old"] and manager.store.session("old") is None
        assert [Path(p).name for p in report.archived] == [p.name for p in archive.iterdir()]
        (archived,) = archive.iterdir()
        assert archived.name.startswith("old.") and archived.name.endswith(".jsonl.gz")
        import_session(manager.store, archived)  # the archived session imports back whole
        assert _rows(manager.store, "old") == rows
        assert manager.store.verify("old") == len(rows)


def test_a_session_that_cannot_be_archived_is_not_removed(db_url: str, tmp_path: Path) -> None:
    rows = _expired_session(db_url)
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("a file where the archive directory should be")
    with EventStore.open(db_url) as store:
        report = compact(store, archive=blocked)
        assert report.sessions == [] and "could not archive" in (report.skipped or "")
        assert _rows(store, "old") == rows  # frozen, whole, not removed
        done = compact(store, archive=tmp_path / "archive")  # the next run archives it
        assert done.sessions == ["old"] and len(done.archived) == 1


def test_compact_archive_on_the_command_line(db_url: str, tmp_path: Path) -> None:
    _expired_session(db_url)
    archive = tmp_path / "archive"
    out = subprocess.run(
        [sys.executable, "-m", "eventctx", "--url", db_url, "compact", "--archive", str(archive)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert out.returncode == 0 and "removed 1 expired sessions" in out.stdout, out.stderr
    assert "archived 1 sessions first" in out.stdout and len(list(archive.iterdir())) == 1
