"""Server restarts (``make stress`` only): a throw-away PostgreSQL server, made by this suite
with initdb in a temporary directory (never the shared one), is stopped in immediate mode
(as a crash would) and started again, again and again, while writer processes and a runner
process keep working through the outages. Afterwards every write is in the log as its caller
was told, the chains verify, every phase attempt has its end event, every run completed, and
the processes were writing again after the last restart without being restarted themselves.

The server's binaries are found with ``pg_config`` or under /usr/lib/postgresql; as root,
the server runs as the ``postgres`` user. ``EVENTCTX_RESTARTS`` sets the number of restarts."""

from __future__ import annotations

import glob
import os
import pwd
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_pg_faults import check_attempts, check_ledger

from eventctx import ContextManager

WORKERS = str(Path(__file__).with_name("workers.py"))
RESTARTS = int(os.environ.get("EVENTCTX_RESTARTS", "8"))


def _bindir() -> Path | None:
    pg_config = shutil.which("pg_config")
    if pg_config:
        found = Path(subprocess.check_output([pg_config, "--bindir"], text=True).strip())
        if (found / "initdb").exists():
            return found
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(candidates[-1]).parent if candidates else None


class ThrowawayServer:
    """A PostgreSQL server of its own in ``directory``, on a free local port."""

    def __init__(self, bindir: Path, directory: Path) -> None:
        self.bindir, self.data, self.log = bindir, directory / "data", directory / "server.log"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.as_user: list[str] = []
        if os.geteuid() == 0:  # the server refuses to run as root
            self.as_user = ["runuser", "-u", "postgres", "--"]
            os.chown(directory, pwd.getpwnam("postgres").pw_uid, -1)
        self._tool("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-N")
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _tool(self, name: str, *args: str) -> None:
        # Output to a file, not a pipe: the server inherits pg_ctl's descriptors and would
        # hold a pipe open.
        out = self.data.parent / "tools.log"
        with out.open("a") as sink:
            done = subprocess.run(
                [*self.as_user, str(self.bindir / name), *args],
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
                timeout=60,
                check=False,
            )
        assert done.returncode == 0, f"{name} failed: {out.read_text()[-2000:]}"

    def start(self) -> None:
        options = f"-p {self.port} -k {self.data.parent} -c listen_addresses=127.0.0.1"
        data, log = str(self.data), str(self.log)
        self._tool("pg_ctl", "-D", data, "-l", log, "-o", options, "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        self._tool("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")


@pytest.fixture
def server() -> Iterator[ThrowawayServer]:
    bindir = _bindir()
    if bindir is None:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl) on this machine")
    if os.geteuid() == 0 and not shutil.which("runuser"):
        pytest.skip("running as root without runuser: the server cannot be started")
    # Not under pytest's temporary root: the server's user must be able to reach it.
    with tempfile.TemporaryDirectory(prefix="eventctx-pg-") as directory:
        made = ThrowawayServer(bindir, Path(directory))
        made.start()
        try:
            yield made
        finally:
            made.stop("immediate")


def _worker(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, WORKERS, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_work_goes_on_through_server_restarts(server: ThrowawayServer, tmp_path: Path) -> None:
    stop_file = str(tmp_path / "stop")
    with ContextManager(server.url, cleanup_interval=None):
        pass  # the schema, made before the workers race to make it
    writers = {f"w{n}": _worker("ledger-writer", server.url, f"w{n}", stop_file) for n in (0, 1)}
    runner = _worker("outage-runner", server.url, stop_file)
    # Each is at work (its first line printed) before the first outage.
    first = {name: child.stdout.readline() for name, child in [*writers.items(), ("r", runner)]}
    rng = random.Random(7)
    down_s = 0.0
    for _ in range(RESTARTS):
        time.sleep(rng.uniform(0.5, 1.5))
        server.stop("immediate")  # as a crash: no checkpoint, connections cut
        pause = rng.uniform(0.1, 1.0)
        down_s += pause
        time.sleep(pause)
        server.start()
    restarted_at = time.monotonic()
    time.sleep(2.0)
    Path(stop_file).touch()
    outputs = {name: child.communicate(timeout=120) for name, child in writers.items()}
    outputs = {name: (first[name] + out, err) for name, (out, err) in outputs.items()}
    runner_out, runner_err = runner.communicate(timeout=120)
    runner_out = first["r"] + runner_out
    for name, (_, err) in outputs.items():
        assert writers[name].returncode == 0, err  # no traceback: every error was precise
    assert runner.returncode == 0, runner_err

    outcomes: Counter[str] = Counter()
    runs: Counter[str] = Counter()
    with ContextManager(server.url, cleanup_interval=None) as manager:
        store = manager.store
        for name, (out, _) in outputs.items():
            lines = [line.split() for line in out.splitlines()]
            ledger = {key: outcome for outcome, key in lines}
            outcomes += check_ledger(store, name, ledger)
            assert lines[-1][0] == "ok"  # writing again after the last restart
            assert manager.get_context(name).version == store.verify(name)
        completed = []
        for line in runner_out.splitlines():
            word, what = line.split()
            runs[word if word != "error" else what] += 1
            if word == "completed":
                completed.append(what)
        attempts = 0
        for session_id in completed:
            attempts += check_attempts(store, session_id)
            data = manager.get_context(session_id).to_dict()
            assert data == {f"{p}-{i}": i for p in ("one", "two", "three") for i in range(10)}
    print(
        f"\n{RESTARTS} immediate restarts ({down_s:.1f} s down in all); writes: "
        f"{dict(outcomes)}; runs: {dict(runs)}; phase attempts: {attempts}; "
        f"{time.monotonic() - restarted_at:.1f} s after the last restart"
    )
    assert outcomes["ok"] > 100 and runs["completed"] >= RESTARTS // 2
    assert "RunInProgressError" not in runs  # a lease it could not release never blocked it
