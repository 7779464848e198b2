"""The command line: tables for people, --json for scripts, one-line errors."""

from __future__ import annotations

import os
import random
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any
from unittest.mock import ANY

import orjson
import pytest
import sqlalchemy as sa

from eventctx import ContextManager, EventStore, NewEvent
from eventctx.cli import main
from eventctx.store.schema import SCHEMA_VERSION


def test_history_sessions_verify(db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    with ContextManager(db_url) as manager:
        manager.create_context("s").update({"a": 1, "b": [2]})
    assert main(["--url", db_url, "--json", "history", "s"]) == 0
    history = orjson.loads(capsys.readouterr().out)
    assert [(e["version"], e["type"], e["key"]) for e in history] == [
        (1, "ContextCreated", None),
        (2, "KeySet", "a"),
        (3, "KeySet", "b"),
    ]
    assert history[2]["payload"] == {"value": [2]}
    assert main(["--url", db_url, "--json", "sessions"]) == 0
    assert [s["session_id"] for s in orjson.loads(capsys.readouterr().out)] == ["s"]
    assert main(["--url", db_url, "verify"]) == 0
    assert "s: 3 events verified" in capsys.readouterr().out
    assert main(["--url", db_url, "history", "s"]) == 0
    assert "KeySet" in capsys.readouterr().out


def test_unknown_session_is_an_error(db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    EventStore.open(db_url).close()  # an eventctx database, without sessions
    assert main(["--url", db_url, "history", "nope"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("eventctx: session 'nope' does not exist") and err.count("\n") == 1


def test_bad_url_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--url", "mysql://x/y", "sessions"]) == 1
    assert "unsupported database" in capsys.readouterr().err


def test_demo_tells_the_story(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'demo.db'}"
    for _ in range(2):  # a second run starts afresh
        out = subprocess.run(
            [sys.executable, "-m", "eventctx", "--url", url, "demo"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    assert "killed pid" in out and "with SIGKILL" in out
    assert "status completed" in out
    timeline = [line.split()[:3] for line in out.splitlines() if line.startswith("  ")]
    assert ["execution", "1", "interrupted"] in timeline
    assert ["execution", "2", "completed"] in timeline
    assert sum(1 for row in timeline if row[:2] == ["analysis", "1"]) == 1  # not run again
    assert "plan                   planning at v8           execution, report" in out
    assert 'report = "Share context between phases: 2/3 checks passed' in out
    assert "hash chain verified" in out and str(tmp_path / "demo.db") in out


def run_cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m eventctx ARGS`` as a real process (EVENTCTX_URL unset unless in ``env``)."""
    base = {k: v for k, v in os.environ.items() if k != "EVENTCTX_URL"}
    return subprocess.run(
        [sys.executable, "-m", "eventctx", *args],
        check=False,
        capture_output=True,
        text=True,
        env={**base, **(env or {})},
        cwd=cwd,
        timeout=120,
    )


def assert_one_line(err: str, starts: str = "eventctx: ") -> None:
    assert err.startswith(starts) and err.count("\n") == 1, err
    assert "Traceback" not in err


READ_COMMANDS = [["sessions"], ["history", "s"], ["otel", "s"], ["verify"], ["verify", "s"]]


def _command_id(command: list[str]) -> str:
    return "-".join(command)


@pytest.mark.parametrize("command", READ_COMMANDS, ids=_command_id)
def test_read_commands_leave_a_missing_path_missing(tmp_path: Path, command: list[str]) -> None:
    path = tmp_path / "typo.db"
    done = run_cli("--url", f"sqlite:///{path}", *command)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == f"eventctx: no database at {path}\n"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", READ_COMMANDS, ids=_command_id)
def test_read_commands_leave_a_foreign_sqlite_file_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    path = tmp_path / "app.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total INTEGER)")
        conn.execute("INSERT INTO invoices VALUES (1, 100)")
    conn.close()
    before = path.read_bytes()
    assert main(["--url", f"sqlite:///{path}", *command]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "eventctx: not an eventctx database (no eventctx tables)\n"
    assert path.read_bytes() == before
    assert list(tmp_path.iterdir()) == [path]  # no journal, no WAL files


@pytest.mark.parametrize("command", READ_COMMANDS, ids=_command_id)
def test_read_commands_create_no_table_in_an_empty_postgresql_schema(
    pg_url: str, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    assert main(["--url", pg_url, *command]) == 1
    assert capsys.readouterr().err == "eventctx: not an eventctx database (no eventctx tables)\n"
    engine = sa.create_engine(pg_url, poolclass=sa.pool.NullPool)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT current_schema()").scalar() is not None
        assert sa.inspect(conn).get_table_names() == []
    engine.dispose()


def test_read_commands_refuse_another_schema_version(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "v1.db"
    path.write_bytes((Path(__file__).parent / "data" / "eventctx-v1.sqlite").read_bytes())
    before = path.read_bytes()
    for command in READ_COMMANDS:
        assert main(["--url", f"sqlite:///{path}", *command]) == 1
        assert_one_line(capsys.readouterr().err, "eventctx: database schema version 1 is older")
    assert path.read_bytes() == before


# Escape sequences that would clear the screen, set the window title, move the cursor; a line
# break; and C1 controls (CSI, NEL) and DEL.
SESSION = "evil\x1b[2J\nid"
KEY = "k\x1b]0;owned\x07ey"
PHASE = "ph\x9base"
TEXT = "caf\u00e9 \u65e5\u672c \x7f\x85"


def _is_control(char: str) -> bool:
    return ord(char) < 0x20 or 0x7F <= ord(char) < 0xA0


def test_tables_escape_control_characters(db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    with EventStore.open(db_url) as store:
        store.append(SESSION, [NewEvent.create("ContextCreated", {"ttl_ms": None})])
        store.append(SESSION, [NewEvent.create("KeySet", {"value": TEXT}, key=KEY, phase=PHASE)])
    for command in (["sessions"], ["history", SESSION], ["verify"], ["verify", SESSION]):
        assert main(["--url", db_url, *command]) == 0
        out = capsys.readouterr().out
        assert not [c for line in out.split("\n") for c in line if _is_control(c)], out
        assert command[0] == "history" or "evil\\x1b[2J\\nid" in out
    assert main(["--url", db_url, "history", SESSION]) == 0
    row = capsys.readouterr().out.split("\n")[2]
    assert "k\\x1b]0;owned\\x07ey" in row and "ph\\x9base" in row
    assert "caf\u00e9 \u65e5\u672c \\x7f\\x85" in row  # other unicode as it is
    assert main(["--url", db_url, "--json", "history", SESSION]) == 0  # JSON: exact
    assert orjson.loads(capsys.readouterr().out)[1] == {
        **orjson.loads(orjson.dumps({"key": KEY, "phase": PHASE, "payload": {"value": TEXT}})),
        "version": 2,
        "recorded_at": ANY,
        "type": "KeySet",
        "execution_id": None,
    }


def test_errors_escape_control_characters(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--url", f"sqlite:///{tmp_path}/x\x1b[2J\n.db", "sessions"]) == 1
    assert capsys.readouterr().err == f"eventctx: no database at {tmp_path}/x\\x1b[2J\\n.db\n"


@pytest.mark.parametrize(
    ("args", "env", "says"),
    [
        (["--url", "not a url", "sessions"], {}, "'not a url' is not a database URL"),
        (["history", "s"], {"EVENTCTX_URL": "nope"}, "'nope' is not a database URL"),
        (["--url", "mysql://x/y", "verify"], {}, "unsupported database"),
        # The driver is looked up when the engine is made: an error eventctx does not translate.
        (["--url", "sqlite+nosuchdriver:///x.db", "compact"], {}, "unexpected NoSuchModuleError"),
    ],
    ids=["not-a-url", "env-nope", "unsupported", "unknown-driver"],
)
def test_a_bad_url_is_one_line_not_a_traceback(
    tmp_path: Path, args: list[str], env: dict[str, str], says: str
) -> None:
    done = run_cli(*args, env=env, cwd=tmp_path)
    assert done.returncode == 1 and done.stdout == ""
    assert_one_line(done.stderr, f"eventctx: {says}")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", [["sessions"], ["compact"], ["demo"], ["upgrade"]])
def test_an_empty_url_is_a_usage_error(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    command: list[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["--url", "", *command]) == 2
    assert_one_line(capsys.readouterr().err, "eventctx: --url is empty")
    assert list(tmp_path.iterdir()) == []  # no ./eventctx.db (nor a demo database)


def test_upgrade_says_from_which_version(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "old.sqlite"
    path.write_bytes((Path(__file__).with_name("data") / "eventctx-v1.sqlite").read_bytes())
    url = f"sqlite:///{path}"
    assert main(["--url", url, "upgrade"]) == 0
    assert capsys.readouterr().out == (
        f"{url}: upgraded the schema from version 1 to {SCHEMA_VERSION}\n"
    )
    assert main(["--url", url, "--json", "upgrade"]) == 0
    assert orjson.loads(capsys.readouterr().out) == {
        "url": url,
        "schema_version": SCHEMA_VERSION,
        "upgraded_from": None,
    }
    assert main(["--url", url, "upgrade"]) == 0
    assert capsys.readouterr().out == f"{url}: schema version {SCHEMA_VERSION} is current\n"


def test_an_unexpected_error_is_one_line(
    db_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    EventStore.open(db_url).close()

    def broken(self: EventStore) -> list[Any]:
        raise RuntimeError("first line\nsecond line")

    monkeypatch.setattr(EventStore, "sessions", broken)
    assert main(["--url", db_url, "sessions"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "eventctx: unexpected RuntimeError: first line\\nsecond line\n"


def _long_session(db_url: str) -> None:
    """A session whose history (a line per key) is far more than a pipe holds."""
    with ContextManager(db_url) as manager:
        manager.create_context("s").update({f"key-{i:05}": "x" * 40 for i in range(5000)})


@pytest.mark.parametrize("as_json", [False, True], ids=["table", "json"])
def test_a_closed_pipe_ends_quietly(db_url: str, as_json: bool) -> None:
    """`eventctx history s | head -1`: the reader goes away after one line."""
    _long_session(db_url)
    args = ["--url", db_url, *(["--json"] if as_json else []), "history", "s"]
    with subprocess.Popen(
        [sys.executable, "-m", "eventctx", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        assert proc.stdout.readline()
        proc.stdout.close()
        assert proc.wait(timeout=60) == 1
        assert proc.stderr.read() == b""


def test_a_closed_pipe_ends_quietly_in_process(
    db_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _long_session(db_url)
    read_end, write_end = os.pipe()
    os.close(read_end)
    with os.fdopen(write_end, "w") as pipe:
        monkeypatch.setattr(sys, "stdout", pipe)
        assert main(["--url", db_url, "history", "s"]) == 1
        pipe.write("more output, later\n")
        pipe.flush()  # it goes to devnull now: no second BrokenPipeError
    assert capsys.readouterr().err == ""


def _drop_update_trigger(conn: sa.Connection) -> None:
    on = " ON eventctx_events" if conn.dialect.name == "postgresql" else ""
    conn.exec_driver_sql(f"DROP TRIGGER eventctx_events_no_update{on}")


def test_verify_reports_every_bad_session(db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    with ContextManager(db_url) as manager:
        for sid in ("a", "b", "c", "d", "e"):
            manager.create_context(sid).update({f"k{i}": i for i in range(4)})  # versions 1-5
    engine = sa.create_engine(db_url, poolclass=sa.pool.NullPool)
    with engine.begin() as conn:
        _drop_update_trigger(conn)
        tamper = "UPDATE eventctx_events SET {} WHERE session_id = :s AND version = :v"
        conn.execute(sa.text(tamper.format("payload = :p")), {"s": "a", "v": 2, "p": b"{}"})
        conn.execute(
            sa.text("DELETE FROM eventctx_events WHERE session_id = :s AND version = :v"),
            {"s": "b", "v": 3},
        )
        conn.execute(sa.text(tamper.format("hash = prev_hash")), {"s": "c", "v": 4})
        conn.exec_driver_sql("UPDATE eventctx_sessions SET version = 3 WHERE session_id = 'd'")
    engine.dispose()
    expected = {
        "a": "version 2: stored hash does not match",
        "b": "version 4: expected version 3 (a gap)",
        "c": "version 4: stored hash does not match",
        "d": "log ends at version 5 but the head row says 3",
    }
    assert main(["--url", db_url, "verify"]) == 1
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    for sid, says in expected.items():
        assert [line for line in lines if line.startswith(f"{sid}: FAILED: ") and says in line]
    assert "e: 5 events verified" in lines
    assert captured.err == "eventctx: 4 of 5 sessions failed: a, b, c, d\n"
    assert main(["--url", db_url, "--json", "verify"]) == 1
    report = orjson.loads(capsys.readouterr().out)["sessions"]
    assert report["e"] == 5
    assert all(says in report[sid] for sid, says in expected.items())


def test_verify_runs_the_database_check(db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    with ContextManager(db_url) as manager:
        manager.create_context("s").set("a", 1)
    check = "ok" if db_url.startswith("sqlite") else "not available on postgresql"
    assert main(["--url", db_url, "--json", "verify"]) == 0
    assert orjson.loads(capsys.readouterr().out) == {"database_check": check, "sessions": {"s": 2}}
    assert main(["--url", db_url, "verify"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "s: 2 events verified",
        f"database check: {check}",
    ]


def _damaged(path: Path, how: str) -> None:
    """A database of 20 sessions, then damaged: 4 KiB of garbage over page 3 (which the chain
    check reads) or over a table it does not read, or an index that lost its entries."""
    with ContextManager(f"sqlite:///{path}") as manager:
        for n in range(20):
            manager.create_context(f"s{n}").update({f"k{i}": "v" * 50 for i in range(5)})
    with sqlite3.connect(path) as conn:
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        root = dict(conn.execute("SELECT name, rootpage FROM sqlite_master").fetchall())
        if how == "index":  # the sessions' key index now points at the empty snapshots' one
            conn.execute("PRAGMA writable_schema = ON")
            index = "sqlite_autoindex_eventctx_{}_1"
            conn.execute(
                "UPDATE sqlite_master SET rootpage = ? WHERE name = ?",
                (root[index.format("snapshots")], index.format("sessions")),
            )
    conn.close()
    if how != "index":
        page = 3 if how == "page 3" else root["eventctx_leases"]
        with path.open("r+b") as f:
            f.seek((page - 1) * page_size)
            f.write(random.Random(page).randbytes(4096))


@pytest.mark.parametrize("how", ["page 3", "unread table", "index"])
def test_verify_finds_damage_in_the_database_file(tmp_path: Path, how: str) -> None:
    path = tmp_path / "damaged.db"
    _damaged(path, how)
    done = run_cli("--url", f"sqlite:///{path}", "verify")
    assert done.returncode == 1 and "verified" not in done.stdout
    assert_one_line(done.stderr)
    as_json = run_cli("--url", f"sqlite:///{path}", "--json", "verify")
    assert as_json.returncode == 1 and "verified" not in as_json.stdout
    assert_one_line(as_json.stderr)
    if how == "index":  # the check reports what it found; the chains are not read
        assert "eventctx: the database's own integrity check found damage" in done.stderr
        assert done.stdout.startswith("database check FAILED:\n")
        assert "  wrong # of entries in index sqlite_autoindex_eventctx_sessions_1\n" in done.stdout
        report = orjson.loads(as_json.stdout)
        assert report["sessions"] is None
        assert (
            "wrong # of entries in index sqlite_autoindex_eventctx_sessions_1"
            in (report["database_check"])
        )
