"""The command line: tables for people, --json for scripts, one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from eventctx import ContextManager
from eventctx.cli import main


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
