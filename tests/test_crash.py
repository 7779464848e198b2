"""The crash suite: real processes killed with SIGKILL at random moments and at named fault
points, on every backend. After every kill: each version the child printed (its write had
returned) is in the database, no update is half there, versions are gapless and the chain
verifies, snapshots agree with the full fold, and an interrupted run resumes to completion."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest

from eventctx import ContextManager, EventStore, PluginRunner
from eventctx.cli import main
from eventctx.compaction import compact
from eventctx.snapshots import restore
from eventctx.state import FOLD_VERSION, fold

WORKERS = str(Path(__file__).with_name("workers.py"))
RANDOM_KILLS = int(os.environ.get("EVENTCTX_CRASH_KILLS", "42"))
WRITE_POINTS = ("append.before_commit", "append.after_commit", "snapshot.before_save")
RUN_POINTS = ("run.after_phase_started", "run.before_phase_end")


def _child(command: str, url: str, fault: str | None = None) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k != "EVENTCTX_FAULT"}
    if fault:
        env["EVENTCTX_FAULT"] = fault
    return subprocess.Popen(
        [sys.executable, WORKERS, command, url, "c"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )


def _acknowledged(child: subprocess.Popen[str], kill_after: float | None) -> list[int]:
    """Versions the child printed before it died (killed ``kill_after`` seconds after its first
    write returned, or by its own fault point)."""
    assert child.stdout is not None
    first = ""
    if kill_after is not None:
        first = child.stdout.readline()  # it is writing now
        time.sleep(kill_after)
        os.kill(child.pid, signal.SIGKILL)
    out, _ = child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL
    return [int(line) for line in (first + out).split()]


def _check(store: EventStore, printed: list[int]) -> int:
    """Every invariant of a session after a crash; returns the events checked."""
    head = store.session("c")
    assert head is not None
    assert all(v <= head.version for v in printed), "an acknowledged write was lost"
    assert store.verify("c") == head.version  # gapless, chain intact, head row agrees
    events = list(store.read("c"))
    for event, after in zip(events, [*events[1:], None], strict=True):
        match = re.fullmatch(r"u(\d+)a", event.key or "")
        if match:  # an update's two keys: one append, one time, one after the other
            assert after is not None, f"an update is half there at version {event.version}"
            assert after.key == f"u{match[1]}b" and after.payload == event.payload
            assert after.recorded_at_us == event.recorded_at_us
    snapshot = store.latest_snapshot("c", FOLD_VERSION)
    if snapshot is not None:
        assert restore(store, "c", snapshot[0])[0] == fold(events[: snapshot[0]])
    assert restore(store, "c", head.version)[0] == fold(events)
    return len(events)


def test_writers_killed_at_random_and_at_fault_points(db_url: str) -> None:
    rng = random.Random(1)
    kills = checked = acknowledged = 0
    plan: list[tuple[str | None, float | None]] = [
        (None, rng.uniform(0.0, 0.2)) for _ in range(RANDOM_KILLS)
    ]
    plan += [(f"{p}@{rng.randint(3, 40)}", None) for p in WRITE_POINTS for _ in range(3)]
    rng.shuffle(plan)
    EventStore.open(db_url).close()  # created once, not raced by the first child
    for fault, after in plan:
        printed = _acknowledged(_child("crash-writer", db_url, fault), after)
        kills += 1
        acknowledged += len(printed)
        with EventStore.open(db_url) as store:
            checked += _check(store, printed)
    print(f"\n{kills} kills, {acknowledged} acknowledged writes, {checked} events checked")
    assert kills >= 50 and acknowledged > 0


@pytest.mark.parametrize("fault", RUN_POINTS)
def test_a_run_killed_mid_phase_resumes_to_completion(db_url: str, fault: str) -> None:
    killed = 0
    for n in (1, 2, 3):  # die further on each time (a process that gets to the end is fine)
        child = _child("crash-runner", db_url, f"{fault}@{n}")
        child.communicate(timeout=60)
        assert child.returncode in (0, -signal.SIGKILL)
        killed += child.returncode == -signal.SIGKILL
    assert killed >= 2
    with ContextManager(db_url, cleanup_interval=None) as manager:
        from workers import step_one, step_three, step_two  # noqa: PLC0415

        result = PluginRunner(manager, [step_one, step_two, step_three]).run("c", resume=True)
        assert result.status == "completed", result.error
        assert manager.get_context("c").to_dict() == {"one": 1, "two": 2, "three": 3}
        assert manager.store.verify("c") == manager.get_context("c").version


def _half_removed(db_url: str) -> None:
    """A large expired session that a compactor was killed in the middle of removing."""
    with ContextManager(db_url, cleanup_interval=None) as manager:
        big = manager.create_context("big", ttl=timedelta(milliseconds=500))
        for start in range(0, 3000, 300):
            big.update({f"k{i}": i for i in range(start, start + 300)})
        if manager.store.session("other") is None:
            manager.create_context("other", ttl=None).set("a", 1)
    time.sleep(0.6)
    child = subprocess.Popen(
        [sys.executable, WORKERS, "compact", db_url],
        env={**os.environ, "EVENTCTX_FAULT": "compaction.mid_session@2"},
    )
    child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    with EventStore.open(db_url) as store:
        head = store.session("big")
        assert head is not None and head.status == "expiring"  # half removed


def test_a_compactor_killed_mid_session_is_finished_promptly(
    db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _half_removed(db_url)
    assert main(["--url", db_url, "verify"]) == 0  # not "tampered"; the others checked
    out = capsys.readouterr().out
    assert "big: being removed" in out and "other: 2 events verified" in out
    started = time.monotonic()
    with ContextManager(db_url, cleanup_interval=None) as manager:
        again = manager.get_or_create_context("big")  # no waiting out the dead one's lease
        assert again.version == 1 and again.to_dict() == {}
    assert time.monotonic() - started < 5
    with EventStore.open(db_url) as store:  # once more: the next compactor finishes it at once
        store.purge("big")
    _half_removed(db_url)
    with EventStore.open(db_url) as store:
        report = compact(store)
        assert report.sessions == ["big"] and report.skipped is None
        assert store.session("big") is None
