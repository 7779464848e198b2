"""The command line's debugging and audit commands: each is one Inspector call, shown as a
table for people or one JSON document for scripts (``eventctx.cli`` runs them)."""

from __future__ import annotations

import argparse
import importlib
import re
import signal
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from eventctx.errors import InvalidInputError, SessionNotFoundError
from eventctx.events import RecordedEvent
from eventctx.inspect import Inspector
from eventctx.render import Style, json_bytes, shorten, table, when
from eventctx.store import EventStore
from eventctx.timeline import write_timeline

__all__ = ["COMMANDS", "add_commands", "event_rows", "parse_time"]

Result = tuple[Any, list[str]]
"""What a command returns: the JSON document, and the lines of its table."""

_AGO: Final = re.compile(r"(\d+)([smhd])")
_UNITS: Final = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_duration(text: str) -> timedelta:
    """A duration from the command line: ``90s``, ``15m``, ``2h`` or ``30d``."""
    found = _AGO.fullmatch(text.strip())
    if found is None or int(found[1]) == 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 90s, 15m, 2h or 30d")
    try:
        return timedelta(**{_UNITS[found[2]]: int(found[1])})
    except OverflowError:
        raise argparse.ArgumentTypeError(f"{text!r} is too long") from None


def parse_time(text: str, now: datetime | None = None) -> datetime:
    """A time from the command line: ISO 8601 with a UTC offset (``2026-11-27T10:00:00Z``),
    or a time ago (``90s``, ``15m``, ``2h``, ``7d`` before ``now``). Anything else is a usage
    error (exit 2): a time without an offset would mean a different instant on each machine."""
    ago = _AGO.fullmatch(text.strip())
    if ago is not None:
        try:
            return (now or datetime.now(UTC)) - timedelta(**{_UNITS[ago[2]]: int(ago[1])})
        except OverflowError:
            raise argparse.ArgumentTypeError(f"{text!r} is too long ago") from None
    try:
        at = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a time: give ISO 8601 with an offset (2026-11-27T10:00:00Z) "
            "or a time ago (90s, 15m, 2h, 7d)"
        ) from None
    if at.tzinfo is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} has no UTC offset: add one (…Z or …+02:00) so it means one instant"
        )
    return at


def _version(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a version (a positive integer)")
    return int(text)


def add_commands(commands: Any) -> None:
    """Add the debugging and audit commands to the ``eventctx`` parser's subcommands."""
    show = commands.add_parser("show", help="the current context, with each key's writer")
    show.add_argument("session")
    replay = commands.add_parser("replay", help="the context as of a version or a time")
    replay.add_argument("session")
    point = replay.add_mutually_exclusive_group()
    point.add_argument("--version", type=_version, help="after this version")
    point.add_argument("--at", type=parse_time, help="as of this time (ISO 8601, or 10m ago)")
    blame = commands.add_parser("blame", help="who wrote each key (or KEY) last")
    blame.add_argument("session")
    blame.add_argument("key", nargs="?")
    readers = commands.add_parser("readers", help="the phase attempts that read KEY")
    readers.add_argument("session")
    readers.add_argument("key")
    diff = commands.add_parser("diff", help="how the context changed from V1 to V2")
    diff.add_argument("session")
    diff.add_argument("v1", type=_version)
    diff.add_argument("v2", type=_version)
    sessions = commands.add_parser("diff-sessions", help="two sessions' runs, phase by phase")
    sessions.add_argument("first")
    sessions.add_argument("second")
    runs = commands.add_parser("runs", help="a session's runs, phases and attempts")
    runs.add_argument("session")
    stats = commands.add_parser("stats", help="per-phase attempts, failures, retries, p50/p95/p99")
    stats.add_argument("--phase")
    stats.add_argument("--since", type=parse_time, help="ISO 8601 with offset, or ago: 90s, 2h, 7d")
    stats.add_argument("--session")
    fork = commands.add_parser("fork", help="copy a session's history up to a version into NEW")
    fork.add_argument("session")
    fork.add_argument("new")
    fork.add_argument("--version", type=_version, help="the last version copied (default: now)")
    rerun = commands.add_parser("rerun", help="run PHASE again, in a fork, with other code")
    rerun.add_argument("session")
    rerun.add_argument("phase")
    rerun.add_argument("--module", required=True, metavar="M:F", help="module:function to run")
    rerun.add_argument("--execution", help="the run (default: the last one with PHASE)")
    tail = commands.add_parser("tail", help="a session's last events; -f follows it live")
    tail.add_argument("session")
    tail.add_argument("-n", type=int, default=10, help="how many events first (default 10)")
    tail.add_argument("-f", "--follow", action="store_true", help="print new events as they come")
    timeline = commands.add_parser(
        "timeline", help="write a session's timeline as one self-contained HTML page"
    )
    timeline.add_argument("session")
    timeline.add_argument("-o", "--output", required=True, metavar="FILE.html", help="the page")


def event_rows(events: Iterator[RecordedEvent] | list[RecordedEvent]) -> list[list[str]]:
    """Table rows of events: version, time, type, phase, key and the payload shortened."""
    return [
        [
            str(e.version),
            when(e.recorded_at),
            e.type,
            e.phase or "-",
            e.key or "",
            shorten(e.payload),
        ]
        for e in events
    ]


EVENT_HEADERS: Final = ["VERSION", "RECORDED", "TYPE", "PHASE", "KEY", "PAYLOAD"]


def _show(insp: Inspector, args: argparse.Namespace) -> Result:
    state = insp.state_at(args.session)
    writers = insp.blame(args.session)
    doc = {
        "session_id": args.session,
        "version": state.version,
        "data": state.data,
        "writers": {k: w for k, w in writers.items() if k in state.data},
    }
    rows = [
        [k, shorten(v), w.phase or "-", w.version, when(w.recorded_at)]
        for k, v in state.data.items()
        for w in [writers[k]]
    ]
    lines = [f"session {args.session} at version {state.version}, {len(rows)} keys"]
    return doc, [*lines, *table(["KEY", "VALUE", "WRITTEN BY", "VERSION", "WHEN"], rows)]


def _replay(insp: Inspector, args: argparse.Namespace) -> Result:
    state = insp.state_at(args.session, args.version, args.at)
    doc = {"session_id": args.session, "version": state.version, "data": state.data}
    rows = [[k, shorten(v)] for k, v in state.data.items()]
    head = f"session {args.session} after version {state.version}"
    return doc, [head, *table(["KEY", "VALUE"], rows)]


def _blame(insp: Inspector, args: argparse.Namespace) -> Result:
    writes = insp.blame(args.session, args.key)
    rows = [
        [
            w.key,
            w.op,
            w.phase or "-",
            w.attempt or "-",
            (w.execution_id or "-")[:12],
            w.version,
            when(w.recorded_at),
            shorten(w.value, 40),
        ]
        for w in writes.values()
    ]
    headers = ["KEY", "OP", "PHASE", "ATTEMPT", "EXECUTION", "VERSION", "WHEN", "VALUE"]
    return list(writes.values()), table(headers, rows)


def _readers(insp: Inspector, args: argparse.Namespace) -> Result:
    reads = insp.readers(args.session, args.key)
    rows = [
        [r.phase, r.attempt, r.execution_id[:12], r.version, r.status, when(r.recorded_at)]
        for r in reads
    ]
    headers = ["PHASE", "ATTEMPT", "EXECUTION", "VERSION", "STATUS", "WHEN"]
    return reads, table(headers, rows, Style())


def _diff(insp: Inspector, args: argparse.Namespace) -> Result:
    found = insp.diff(args.session, args.v1, args.v2)
    rows = [["+", k, "", shorten(v, 40)] for k, v in found.added.items()]
    rows += [["-", k, shorten(v, 40), ""] for k, v in found.removed.items()]
    rows += [["~", k, shorten(a, 40), shorten(b, 40)] for k, (a, b) in found.changed.items()]
    return found, table(["", "KEY", f"AT {args.v1}", f"AT {args.v2}"], rows)


def _diff_sessions(insp: Inspector, args: argparse.Namespace) -> Result:
    found = insp.diff_sessions(args.first, args.second)
    rows = [
        [
            p.phase,
            f"{p.status[0]} / {p.status[1]}",
            " / ".join("-" if d is None else f"{d:.1f}" for d in p.duration_ms),
            "same" if p.output[0] == p.output[1] else "differs",
            ", ".join(sorted(p.keys)) or "-",
            "<- first divergence" if p.phase == found.first_divergence else "",
        ]
        for p in found.phases
    ]
    headers = ["PHASE", "STATUS", "MS", "OUTPUT", "KEYS THAT DIFFER", ""]
    verdict = found.first_divergence or "none: the runs agree"
    return found, [*table(headers, rows), f"first divergence: {verdict}"]


def _runs(insp: Inspector, args: argparse.Namespace) -> Result:
    found = insp.runs(args.session)
    rows = []
    for run in found:
        tries = ", ".join(
            f"{name}×{len(pr.attempts)}" if len(pr.attempts) > 1 else name
            for name, pr in run.phase_runs.items()
        )
        ms = "-" if run.duration_ms is None else f"{run.duration_ms:.1f}"
        rows.append([run.execution_id[:12], run.status, when(run.started_at), ms, tries or "-"])
    headers = ["EXECUTION", "STATUS", "STARTED", "MS", "PHASES (×attempts)"]
    return found, table(headers, rows, Style())


def _stats(insp: Inspector, args: argparse.Namespace) -> Result:
    found = insp.phase_stats(args.session, args.phase, args.since)
    rows = [
        [
            name,
            s.count,
            s.failures,
            s.retries,
            *(f"{v:.1f}" for v in (s.p50_ms, s.p95_ms, s.p99_ms, s.max_ms)),
        ]
        for name, s in found.items()
    ]
    headers = ["PHASE", "ATTEMPTS", "FAILURES", "RETRIES", "P50 MS", "P95 MS", "P99 MS", "MAX MS"]
    return found, table(headers, rows) if rows else ["no phase attempts recorded"]


def _fork(insp: Inspector, args: argparse.Namespace) -> Result:
    version = insp.fork(args.session, args.new, args.version)
    doc = {"session_id": args.new, "from": args.session, "version": version}
    return doc, [f"forked {args.session} at version {version} into {args.new}"]


def _rerun(insp: Inspector, args: argparse.Namespace) -> Result:
    report = insp.rerun(
        args.session, args.phase, _function(args.module), execution_id=args.execution
    )
    rows = [[k, shorten(a, 40), shorten(b, 40)] for k, (a, b) in report.keys.items()]
    lines = [
        f"rerun of {report.phase} (attempt {report.attempt} of {report.execution_id[:12]}) "
        f"in fork {report.fork_id}",
        f"status: recorded {report.recorded_status}, now {report.status}"
        + (f" ({type(report.error).__name__}: {report.error})" if report.error else ""),
        f"output: {'changed' if report.output_changed else 'the same'}: {shorten(report.output)}",
        *(table(["KEY", "RECORDED", "NOW"], rows) if rows else ["keys: the same"]),
    ]
    return report, lines


def _function(spec: str) -> Callable[[Any], Any]:
    """The function ``module:name`` names (importable from the working directory)."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise InvalidInputError(f"--module {spec!r}: give MODULE:FUNCTION, e.g. myplugin:planning")
    if "" not in sys.path:
        sys.path.insert(0, "")
    try:
        found = getattr(importlib.import_module(module), name)
    except Exception as exc:  # an import runs arbitrary code: any failure is the module's
        raise InvalidInputError(
            f"--module {spec!r}: {type(exc).__name__}: {exc}".splitlines()[0]
        ) from None
    if not callable(found):
        raise InvalidInputError(f"--module {spec!r} is not callable")
    return found  # type: ignore[no-any-return]


def _tail(insp: Inspector, args: argparse.Namespace) -> Result:
    """The last ``-n`` events; with ``-f``, printed as they come (see ``follow``)."""
    head = insp.store.session(args.session)
    if head is None:
        raise SessionNotFoundError(f"session {args.session!r} does not exist")
    last = head.version
    events = list(insp.store.read(args.session, max(1, last - max(args.n, 0) + 1)))
    if args.n <= 0:
        events = []
    return events, table(EVENT_HEADERS, event_rows(events))


def _timeline(insp: Inspector, args: argparse.Namespace) -> Result:
    path = write_timeline(insp, args.session, args.output)
    return {"session_id": args.session, "path": str(path)}, [f"wrote {path}"]


def follow(store: EventStore, session_id: str, after: int, as_json: bool, poll: float = 0.2) -> int:
    """Print each event of ``session_id`` after version ``after`` as it is committed (read-only
    polls, no lock held), until Ctrl-C or SIGTERM: exit status 0."""
    stop: list[bool] = []

    def quit_(*_: Any) -> None:
        stop.append(True)

    previous = signal.signal(signal.SIGTERM, quit_)
    try:
        while not stop:
            for event in store.read(session_id, after + 1):
                after = event.version
                if as_json:
                    sys.stdout.buffer.write(json_bytes(event, indent=False) + b"\n")
                else:
                    sys.stdout.write(table(EVENT_HEADERS, event_rows([event]))[1] + "\n")
            sys.stdout.flush()
            time.sleep(poll)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


COMMANDS: Final[dict[str, Callable[[Inspector, argparse.Namespace], Result]]] = {
    "show": _show,
    "replay": _replay,
    "blame": _blame,
    "readers": _readers,
    "diff": _diff,
    "diff-sessions": _diff_sessions,
    "runs": _runs,
    "stats": _stats,
    "fork": _fork,
    "rerun": _rerun,
    "tail": _tail,
    "timeline": _timeline,
}
"""Each command's Inspector call; ``fork`` and ``rerun`` are the ones that write."""
