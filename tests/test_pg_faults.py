"""Faults on PostgreSQL: the server terminates a store's connections in the middle of writes
and of phases. Whatever a caller was told holds: a write that returned is in the log once, a
``StorageError`` means it is not, an ``OutcomeUnknownError`` means it is there at most once;
the chain verifies, each phase attempt keeps its end event, and the run resumes to completion.
Server restarts, against a throw-away server, are in ``tests/stress_server_restart.py``."""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import psycopg
import sqlalchemy as sa

import eventctx
from eventctx import (
    ContextManager,
    EventCtxError,
    EventStore,
    OutcomeUnknownError,
    PluginRunner,
    RetryPolicy,
    StorageError,
)

Ledger = dict[str, str]  # key -> "ok" | "refused" | "unknown"


def record(ledger: Ledger, key: str, write: Callable[[], object]) -> None:
    """Make one write and note what the caller was told about it."""
    try:
        write()
    except OutcomeUnknownError:
        ledger[key] = "unknown"
    except StorageError:
        ledger[key] = "refused"
    else:
        ledger[key] = "ok"


def check_ledger(store: EventStore, session_id: str, ledger: Ledger) -> Counter[str]:
    """Each write is in the log as its caller was told; the chain verifies. Returns outcomes."""
    stored = Counter(e.key for e in store.read(session_id) if e.type == "KeySet")
    for key, outcome in ledger.items():
        if outcome == "ok":
            assert stored[key] == 1, f"{key} returned but is stored {stored[key]} times"
        elif outcome == "refused":
            assert stored[key] == 0, f"{key} raised StorageError but is stored"
        else:
            assert stored[key] <= 1, f"{key} is stored {stored[key]} times"
    head = store.session(session_id)
    assert head is not None and store.verify(session_id) == head.version
    return Counter(ledger.values())


def check_attempts(store: EventStore, session_id: str) -> int:
    """Every phase attempt has exactly one end event; returns the attempts."""
    starts: Counter[tuple[str, str | None, int]] = Counter()
    ends: Counter[tuple[str, str | None, int]] = Counter()
    for event in store.read(session_id):
        if event.type in ("PhaseStarted", "PhaseCompleted", "PhaseFailed"):
            ident = (str(event.execution_id), event.phase, event.payload["attempt"])
            (starts if event.type == "PhaseStarted" else ends)[ident] += 1
    assert starts == ends and set(starts.values()) == {1}
    return sum(starts.values())


@contextmanager
def terminating(url: str, every: float) -> Iterator[list[int]]:
    """Terminate the connections named by ``url``'s application_name every ``every`` seconds
    while the block runs; yields a one-item list counting them."""
    name = sa.make_url(url).query["application_name"]
    killed = [0]
    done = threading.Event()

    def kill() -> None:
        with psycopg.connect("host=127.0.0.1 user=postgres dbname=test", autocommit=True) as db:
            while not done.wait(every):
                row = db.execute(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE application_name = %s",
                    (name,),
                ).fetchone()
                killed[0] += row[0] if row else 0

    killer = threading.Thread(target=kill)
    killer.start()
    try:
        yield killed
    finally:
        done.set()
        killer.join()


def named(url: str) -> str:
    """``url`` with an application_name of its own, so its connections can be found."""
    name = f"eventctx-fault-{uuid.uuid4().hex[:8]}"
    return sa.make_url(url).update_query_dict({"application_name": name}).render_as_string(False)


def test_writes_while_the_server_terminates_connections(pg_url: str) -> None:
    url = named(pg_url)
    ledgers: dict[str, Ledger] = {f"w{n}": {} for n in range(3)}
    failures: list[BaseException] = []

    def writer(manager: ContextManager, session_id: str, until: float) -> None:
        ledger, i = ledgers[session_id], 0
        try:
            ctx = manager.create_context(session_id)
            while time.monotonic() < until:
                i += 1
                if i % 4:
                    record(ledger, f"k{i}", partial(ctx.set, f"k{i}", i))
                else:  # a two-key update: both or neither
                    record(ledger, f"k{i}", partial(ctx.update, {f"k{i}": i, f"k{i}b": i}))
        except BaseException as exc:  # handed to the test thread
            failures.append(exc)

    with ContextManager(url, cleanup_interval=None, snapshot_every=10) as manager:
        with terminating(url, every=0.05) as killed:
            until = time.monotonic() + 3
            threads = [threading.Thread(target=writer, args=(manager, s, until)) for s in ledgers]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        assert not failures, failures
        outcomes: Counter[str] = Counter()
        for session_id, ledger in ledgers.items():
            outcomes += check_ledger(manager.store, session_id, ledger)
            stored = Counter(e.key for e in manager.store.read(session_id))
            assert all(stored[f"k{i}"] == stored[f"k{i}b"] for i in range(4, len(ledger), 4))
            ctx = manager.get_context(session_id)  # the cached context agrees with the log
            with ContextManager(url, cleanup_interval=None) as fresh:
                assert ctx.to_dict() == fresh.get_context(session_id).to_dict()
    print(f"\n{killed[0]} connections terminated; writes: {dict(outcomes)}")
    assert killed[0] >= 20 and outcomes["ok"] > 100
    assert set(outcomes) == {"ok"}  # the server is up: a dropped connection cost no error


def _slow_writes(_: Any) -> int:
    ctx = eventctx.current_context()
    phase = eventctx.helper().phase
    for i in range(20):
        ctx.set(f"{phase}-{i}", i)
        time.sleep(0.005)
    return 20


def test_runs_while_the_server_terminates_connections(pg_url: str) -> None:
    url = named(pg_url)
    phases = [
        eventctx.ContextAwarePhase(_slow_writes, name=name)
        for name in ("analysis", "planning", "execution")
    ]
    retry = RetryPolicy(attempts=3, retry_if=lambda e: isinstance(e, StorageError))
    runs: Counter[str] = Counter()
    with ContextManager(url, cleanup_interval=None) as manager:
        runner = PluginRunner(manager, phases, retries=retry)
        with terminating(url, every=0.04) as killed:
            for n in range(6):
                for _ in range(30):  # the caller's loop: resume until it completes
                    try:
                        result = runner.run(f"r{n}", input={"n": n}, resume=True)
                    except EventCtxError as exc:
                        runs[type(exc).__name__] += 1
                        continue
                    runs[result.status] += 1
                    if result.status == "completed":
                        break
        attempts = 0
        for n in range(6):
            session_id = f"r{n}"
            assert manager.store.verify(session_id) == manager.get_context(session_id).version
            attempts += check_attempts(manager.store, session_id)
            data = manager.get_context(session_id).to_dict()
            expected = {f"{p.name}-{i}": i for p in phases for i in range(20)}
            assert data == expected  # failed attempts left nothing behind
    print(f"\n{killed[0]} connections terminated; runs: {dict(runs)}; attempts: {attempts}")
    assert killed[0] >= 10 and runs == {"completed": 6}  # no error reached the caller
