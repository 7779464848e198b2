"""Child-process programs for tests that really race and really kill: ``python workers.py CMD``."""

from __future__ import annotations

import os
import sys
import time
from datetime import timedelta

import eventctx
from eventctx import ContextManager, EventStore, NewEvent, PluginRunner
from eventctx.compaction import compact
from eventctx.store import Head


def append_many(url: str, session_id: str, count: int, tag: str) -> None:
    """Append ``count`` single-event transactions, half with a (possibly stale) head hint."""
    store = EventStore.open(url)
    head: Head | None = None
    for i in range(count):
        event = NewEvent.create("KeySet", {"value": i}, key=f"{tag}-{i}")
        recorded = store.append(session_id, [event], head=head if i % 2 else None)
        last = recorded[-1]
        head = Head(last.version, b"stale" if i % 3 == 0 else last.hash, last.recorded_at_us)
    store.close()


def context_set(url: str, session_id: str, count: int, tag: str) -> None:
    """``count`` blind ``ctx.set`` calls on one session, each its own committed event."""
    with ContextManager(url) as manager:
        ctx = manager.get_or_create_context(session_id)
        for i in range(count):
            ctx.set(f"{tag}-{i}", {"writer": tag, "i": i})


def context_dump(url: str, session_id: str) -> None:
    """Print the restored context as JSON, then its version on a line of its own."""
    with ContextManager(url) as manager:
        ctx = manager.get_context(session_id)
        sys.stdout.buffer.write(ctx.to_json() + b"\n" + str(ctx.version).encode() + b"\n")


def context_ack(url: str, session_id: str) -> None:
    """Set keys until killed, printing each index once its write has returned."""
    with ContextManager(url) as manager:
        ctx = manager.get_or_create_context(session_id)
        i = 0
        while True:
            ctx.set(f"k{i}", i)
            print(i, flush=True)
            i += 1


def analysis(run_input: dict[str, object]) -> dict[str, object]:
    """Phase 1 of the crash test: writes a key and returns an output."""
    eventctx.current_context().set("language", "go")
    eventctx.helper().set_metadata("files", 3)
    return {"files": 3, "input": run_input}


def planning(run_input: dict[str, object]) -> dict[str, object]:
    """Phase 2: commits a write, then hangs when EVENTCTX_TEST_HANG=1 (to be killed)."""
    h = eventctx.helper()
    ctx = h.context
    ctx.set("planned-from", h.get_output("analysis"))
    if os.environ.get("EVENTCTX_TEST_HANG") == "1":
        print("hanging", flush=True)
        time.sleep(600)
    ctx.set("plan", ["lint", "test"])
    return {"steps": 2, "language": ctx.get("language"), "files": h.get_metadata("files")}


def run_plugin(url: str, session_id: str) -> None:
    """Run analysis → planning on a session (the child that gets killed)."""
    with ContextManager(url) as manager:
        PluginRunner(manager, [analysis, planning]).run(session_id, input={"repo": "x"})


def contested(_: object) -> str:
    """The phase of the paused runner: says it is in, waits (paused meanwhile), then writes."""
    print("in-phase", flush=True)
    time.sleep(1.0)
    eventctx.current_context().set("winner", "paused runner")
    return "paused runner"


def run_contested(url: str, session_id: str) -> None:
    """Run ``contested`` under a short lease; print how the run ended."""
    with ContextManager(url) as manager:
        runner = PluginRunner(manager, [contested], lease=timedelta(seconds=1))
        try:
            result = runner.run(session_id, input={})
        except eventctx.RunInProgressError as exc:
            print(f"RunInProgressError: {exc}", flush=True)
            return
        print(f"finished: {result.status}", flush=True)


def crash_writer(url: str, session_id: str) -> None:
    """Write until killed (sets and two-key updates, snapshots often), printing each version
    once the write that made it has returned."""
    with ContextManager(url, snapshot_every=7, cleanup_interval=None) as manager:
        ctx = manager.get_or_create_context(session_id, ttl=None)
        i = ctx.version
        while True:  # a bounded set of keys: the state stays small, snapshots keep coming
            i += 1
            if i % 3:
                ctx.set(f"k{i % 20}", {"i": i, "pad": "x" * (i % 50)})
            else:
                ctx.update({f"u{i % 10}a": i, f"u{i % 10}b": i})
            print(ctx.version, flush=True)


def crash_runner(url: str, session_id: str) -> None:
    """Run three phases (resuming whatever run is open) until done or killed."""
    with ContextManager(url, cleanup_interval=None) as manager:
        runner = PluginRunner(manager, [step_one, step_two, step_three])
        print(runner.run(session_id, input={"n": 1}, resume=True).status, flush=True)


def step_one(_: object) -> int:
    eventctx.current_context().set("one", 1)
    return 1


def step_two(_: object) -> int:
    ctx = eventctx.current_context()
    ctx.set("two", ctx.get("one", 0) + 1)
    return 2


def step_three(_: object) -> int:
    eventctx.current_context().set("three", 3)
    return 3


def ledger_writer(url: str, session_id: str, stop_file: str) -> None:
    """Write until ``stop_file`` exists, through outages, printing what each write was told:
    ``ok KEY``, ``refused KEY`` (StorageError) or ``unknown KEY`` (OutcomeUnknownError)."""
    with ContextManager(url, snapshot_every=10, cleanup_interval=None) as manager:
        ctx = manager.get_or_create_context(session_id, ttl=None)
        i = 0
        while not os.path.exists(stop_file):
            i += 1
            key = f"k{i}"
            try:
                if i % 4:
                    ctx.set(key, i)
                else:
                    ctx.update({key: i, f"{key}b": i})
            except eventctx.OutcomeUnknownError:
                print("unknown", key, flush=True)
            except eventctx.StorageError:
                print("refused", key, flush=True)
                time.sleep(0.05)
            else:
                print("ok", key, flush=True)


def outage_runner(url: str, stop_file: str) -> None:
    """Run sessions r0, r1, … through outages until ``stop_file`` exists, resuming each until
    it completes; print ``completed SESSION`` or the error a run raised."""
    with ContextManager(url, cleanup_interval=None) as manager:
        runner = PluginRunner(manager, [slow_one, slow_two, slow_three])
        n = 0
        while not os.path.exists(stop_file):
            session_id = f"r{n}"
            try:
                result = runner.run(session_id, input={"n": n}, resume=True)
            except eventctx.EventCtxError as exc:
                print("error", type(exc).__name__, flush=True)
                time.sleep(0.05)
                continue
            print(result.status, session_id, flush=True)
            n += result.status == "completed"


def _slow_writes(name: str) -> int:
    ctx = eventctx.current_context()
    for i in range(10):
        ctx.set(f"{name}-{i}", i)
        time.sleep(0.01)
    return 10


def slow_one(_: object) -> int:
    return _slow_writes("one")


def slow_two(_: object) -> int:
    return _slow_writes("two")


def slow_three(_: object) -> int:
    return _slow_writes("three")


def compact_all(url: str) -> None:
    """Run one compaction in small chunks (the crash suite kills it between chunks)."""
    with EventStore.open(url) as store:
        compact(store, chunk_events=500)


def open_store(url: str) -> None:
    """Open (creating) the store at ``url``."""
    EventStore.open(url).close()


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    if command == "append":
        append_many(args[0], args[1], int(args[2]), args[3])
    elif command == "ctx-set":
        context_set(args[0], args[1], int(args[2]), args[3])
    elif command == "ctx-dump":
        context_dump(args[0], args[1])
    elif command == "ctx-ack":
        context_ack(args[0], args[1])
    elif command == "run-plugin":
        run_plugin(args[0], args[1])
    elif command == "run-contested":
        run_contested(args[0], args[1])
    elif command == "crash-writer":
        crash_writer(args[0], args[1])
    elif command == "crash-runner":
        crash_runner(args[0], args[1])
    elif command == "ledger-writer":
        ledger_writer(args[0], args[1], args[2])
    elif command == "outage-runner":
        outage_runner(args[0], args[1])
    elif command == "compact":
        compact_all(args[0])
    elif command == "open":
        open_store(args[0])
    else:
        raise SystemExit(f"unknown command {command}")
