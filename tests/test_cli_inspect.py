"""The debugging and audit commands, each run as a real process on both backends: tables for
people, ``--json`` that parses, one-line errors, and ``tail -f`` following another process."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

import eventctx
from eventctx import ContextManager, PluginRunner, RetryPolicy
from eventctx.render import Progress
from tests.conftest import interruptible

S = "review"


def analysis(_: Any) -> dict[str, int]:
    eventctx.current_context().set("files", ["a.go", "b.go"])
    return {"files": 2}


_FLAKY: list[int] = []


def checks(_: Any) -> str:
    ctx = eventctx.current_context()
    ctx.set("vet", "ok")
    if not _FLAKY:
        _FLAKY.append(1)
        raise TimeoutError("first try times out")
    ctx.set("files-seen", len(ctx.get("files")))
    return "2 checks"


@pytest.fixture
def url(db_url: str) -> Iterator[str]:
    _FLAKY.clear()
    with ContextManager(db_url, cleanup_interval=None) as manager:
        runner = PluginRunner(manager, [analysis, checks], retries=RetryPolicy(attempts=2))
        assert runner.run(S, input={"repo": "x"}).status == "completed"
        manager.get_context(S).set("note\x1b[31m", "line\nbreak")  # escaped in tables
    yield db_url


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "EVENTCTX_URL"}
    env["PYTHONPATH"] = os.pathsep.join([str(cwd or "."), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-m", "eventctx", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=120,
        check=False,
    )


def ok(*args: str, cwd: Path | None = None) -> str:
    done = cli(*args, cwd=cwd)
    assert done.returncode == 0 and not done.stderr, done.stderr
    return done.stdout


def as_json(url: str, *args: str) -> Any:
    return orjson.loads(ok("--url", url, "--json", *args))


def test_show_replay_blame_readers_diff(url: str) -> None:
    shown = ok("--url", url, "show", S)
    assert "files" in shown and "analysis" in shown and "vet" in shown
    assert "note\\x1b[31m" in shown and '"line\\nbreak"' in shown and "\x1b" not in shown
    doc = as_json(url, "show", S)
    assert doc["data"]["files-seen"] == 2 and doc["writers"]["files"]["phase"] == "analysis"

    early = as_json(url, "replay", S, "--version", "4")
    assert early["version"] == 4 and early["data"] == {"files": ["a.go", "b.go"]}
    at = as_json(url, "replay", S, "--at", "2099-01-01T00:00:00Z")
    assert at["data"] == doc["data"]

    blame = as_json(url, "blame", S, "vet")
    assert [(w["key"], w["phase"], w["attempt"]) for w in blame] == [("vet", "checks", 2)]
    assert "checks" in ok("--url", url, "blame", S)

    readers = as_json(url, "readers", S, "files")
    assert [(r["phase"], r["attempt"]) for r in readers] == [("checks", 2)]

    diff = as_json(url, "diff", S, "1", str(doc["version"]))
    assert set(diff["added"]) == set(doc["data"]) and not diff["removed"]


def test_runs_stats_history_and_tail(url: str) -> None:
    runs = as_json(url, "runs", S)
    assert [r["status"] for r in runs] == ["completed"]
    assert [a["status"] for a in runs[0]["phase_runs"]["checks"]["attempts"]] == [
        "failed",
        "completed",
    ]
    assert "checks×2" in ok("--url", url, "runs", S)
    stats = as_json(url, "stats")
    assert stats["checks"]["count"] == 2 and stats["checks"]["failures"] == 1
    assert stats["checks"]["retries"] == 1 and stats["analysis"]["count"] == 1
    assert as_json(url, "stats", "--phase", "analysis").keys() == {"analysis"}
    assert "P95 MS" in ok("--url", url, "stats", "--since", "1h")

    history = as_json(url, "history", S, "--type", "PhaseFailed")
    assert [e["phase"] for e in history] == ["checks"]
    assert len(as_json(url, "history", S, "--limit", "3")) == 3
    lines = ok("--url", url, "history", S, "--phase", "analysis", "--jsonl").splitlines()
    assert {orjson.loads(line)["phase"] for line in lines} == {"analysis"}
    assert as_json(url, "history", S, "--until", "2000-01-01T00:00:00Z") == []

    tail = ok("--url", url, "tail", S, "-n", "2").splitlines()
    assert len(tail) == 3 and "KeySet" in tail[-1] and "note" in tail[-1]


def test_fork_and_rerun(url: str, tmp_path: Path) -> None:
    assert "forked" in ok("--url", url, "fork", S, "copy", "--version", "4")
    assert as_json(url, "show", "copy")["data"] == {"files": ["a.go", "b.go"]}
    (tmp_path / "fixes.py").write_text(
        textwrap.dedent(
            """
            import eventctx

            def checks(_):
                eventctx.current_context().set("vet", "better")
                return "fixed"
            """
        )
    )
    report = orjson.loads(
        ok("--url", url, "--json", "rerun", S, "checks", "--module", "fixes:checks", cwd=tmp_path)
    )
    assert report["status"] == "completed" and report["output"] == "fixed"
    assert report["keys"]["vet"] == ["ok", "better"]
    text = ok("--url", url, "rerun", S, "checks", "--module", "fixes:checks", cwd=tmp_path)
    assert "output: changed" in text


@pytest.mark.parametrize(
    ("args", "status", "says"),
    [
        (("show", "nope"), 1, "does not exist"),
        (("replay", S, "--version", "x"), 2, "not a version"),
        (("replay", S, "--at", "soon"), 2, "not a time"),
        (("replay", S, "--version", "999"), 1, "999"),
        (("blame", S, "never"), 1, "never written"),
        (("diff", S, "1"), 2, "required"),
        (("stats", "--since", "yesterday"), 2, "not a time"),
        (("fork", S, S), 1, "exists"),
        (("rerun", S, "checks", "--module", "no_such_module:f"), 1, "No module named"),
        (("rerun", S, "checks", "--module", "nocolon"), 1, "MODULE:FUNCTION"),
        (("tail", "nope"), 1, "does not exist"),
        (("nosuchcommand",), 2, "invalid choice"),
    ],
)
def test_errors_are_one_line(url: str, args: tuple[str, ...], status: int, says: str) -> None:
    done = cli("--url", url, *args)
    assert done.returncode == status, done
    assert len(done.stderr.splitlines()) == 1 and says in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_version() -> None:
    assert ok("--version").startswith("eventctx ")


def test_tail_follows_another_process_and_ends_cleanly_on_ctrl_c(url: str) -> None:
    follower = subprocess.Popen(
        [*interruptible("eventctx"), "--url", url, "--json", "tail", S, "-n", "0", "-f"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(1.5)  # it is following now
        writer = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from eventctx import ContextManager\n"
                "with ContextManager(sys.argv[1], cleanup_interval=None) as m:\n"
                "    m.get_context(sys.argv[2]).set('live', 1)\n",
                url,
                S,
            ],
            check=True,
            timeout=60,
        )
        assert writer.returncode == 0
        written = time.monotonic()
        assert follower.stdout is not None
        line = follower.stdout.readline()
        assert time.monotonic() - written < 1.0, "not printed within a second"
        event = orjson.loads(line)
        assert event["type"] == "KeySet" and event["key"] == "live"
        follower.send_signal(signal.SIGINT)
        _, err = follower.communicate(timeout=10)
        assert follower.returncode == 0 and "Traceback" not in err
    finally:
        if follower.poll() is None:
            follower.kill()


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_long_command_shows_its_progress_on_a_terminal_only() -> None:
    rows = iter(range(0, 10**9, 5000))
    terminal = _Terminal()
    with Progress("eventctx verify", lambda: next(rows), terminal, delay=0.0):
        time.sleep(0.7)
    shown = terminal.getvalue()
    assert "eventctx verify: 0 rows read, 0 s" in shown and "5,000 rows read" in shown
    assert shown.endswith("\r\x1b[K")  # erased at the end
    quick = _Terminal()
    with Progress("eventctx show", lambda: 0, quick, delay=1.0):
        pass  # a command that ends sooner shows nothing
    piped = io.StringIO()
    with Progress("eventctx stats", lambda: 0, piped, delay=0.0):
        time.sleep(0.2)
    assert quick.getvalue() == piped.getvalue() == ""
