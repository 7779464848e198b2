"""The ``eventctx`` command: inspect and maintain a store from the shell.

Global options come before the command. Tables are for people; ``--json`` prints one JSON
document for scripts. The read commands (sessions, history, verify) open the database read-only:
they never create a file or a table. Errors are one line on stderr, never a traceback; the exit
status is 0 on success, 1 on failure and 2 for a usage error.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, Final

import orjson

from eventctx import demo
from eventctx.compaction import compact
from eventctx.errors import EventCtxError, IntegrityError, SessionNotFoundError
from eventctx.manager import DEFAULT_URL
from eventctx.store import EventStore

DEMO_URL = "sqlite:///eventctx-demo.db"

_ESCAPES: Final = {c: repr(chr(c))[1:-1] for c in (*range(0x20), *range(0x7F, 0xA0))}
"""C0 controls, DEL and C1 controls, each as its Python escape (``\\x1b``, ``\\n``)."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eventctx", description=__doc__)
    parser.add_argument("--url", help=f"database URL (default: $EVENTCTX_URL, else {DEFAULT_URL})")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("demo", help=f"run the demo (default database {DEMO_URL})")
    commands.add_parser("sessions", help="list live sessions")
    history = commands.add_parser("history", help="print a session's events")
    history.add_argument("session")
    verify = commands.add_parser(
        "verify", help="check one session's hash chain, or every chain and the database file"
    )
    verify.add_argument("session", nargs="?")
    compact = commands.add_parser("compact", help="remove sessions past their ttl, once")
    compact.add_argument("--dry-run", action="store_true", help="only list what would go")
    commands.add_parser("upgrade", help="migrate the database schema to this version")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 failure, 2 usage)."""
    try:
        args = _parser().parse_args(argv)
        if args.url == "":  # else an empty $EVENTCTX_URL in a script would quietly pick the default
            return _fail(f"--url is empty: give a database URL, e.g. {DEFAULT_URL}", status=2)
        if args.command == "demo":
            demo.run(args.url or DEMO_URL)
            return 0
        url = args.url or os.environ.get("EVENTCTX_URL") or DEFAULT_URL
        opener, command = _COMMANDS[args.command]
        with opener(url) as store:
            _emit(args.json, *command(store, args))
        return 0
    except BrokenPipeError:
        # The reader went away (`eventctx history S | head -1`). As Python's docs advise (signal,
        # "Note on SIGPIPE"), stdout goes to devnull so that the flush at exit fails no more.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 1
    except EventCtxError as exc:
        return _fail(str(exc))
    except Exception as exc:  # a last resort: a bug or the unforeseen is still one line
        return _fail(f"unexpected {type(exc).__name__}: {exc}")


def _fail(message: str, status: int = 1) -> int:
    """Print ``message`` as one line on stderr and return the exit status ``status``."""
    print(f"eventctx: {_printable(message)}", file=sys.stderr)
    return status


def _printable(text: str) -> str:
    """``text`` with control characters escaped: a stored string can neither drive the terminal
    (escape sequences) nor break a line of a table. Other characters are left alone."""
    return text.translate(_ESCAPES)


def _emit(as_json: bool, document: Any, lines: list[str]) -> None:
    """Print ``document`` as JSON, or ``lines`` (control characters escaped); flushed here, so
    that a reader that went away is noticed inside ``main``."""
    if as_json:
        data = memoryview(orjson.dumps(document, option=orjson.OPT_INDENT_2) + b"\n")
        while data:  # a pipe may take part of a large write, an error showing only on the next
            data = data[sys.stdout.buffer.write(data) :]
    else:
        print("\n".join(map(_printable, lines)))
    sys.stdout.flush()


def _sessions(store: EventStore, args: argparse.Namespace) -> tuple[Any, list[str]]:
    live = [h for h in store.sessions() if h.live]
    doc = [
        {
            "session_id": h.session_id,
            "version": h.version,
            "created_at": h.created_at.isoformat(),
            "last_activity": h.last_activity.isoformat(),
            "expires_at": h.expires_at.isoformat() if h.expires_at else None,
        }
        for h in live
    ]
    lines = [f"{'SESSION':<30} {'VERSION':>7}  {'LAST ACTIVITY':<32} EXPIRES"]
    lines += [
        f"{_printable(h.session_id):<30} {d['version']:>7}  {d['last_activity']:<32} "
        f"{d['expires_at'] or '-'}"
        for h, d in zip(live, doc, strict=True)
    ]
    return doc, lines


def _history(store: EventStore, args: argparse.Namespace) -> tuple[Any, list[str]]:
    if store.session(args.session) is None:
        raise SessionNotFoundError(f"session {args.session!r} does not exist")
    doc, lines = (
        [],
        [f"{'VERSION':>7}  {'RECORDED AT':<32} {'TYPE':<15} {'PHASE':<12} KEY / PAYLOAD"],
    )
    for e in store.read(args.session):
        doc.append(
            {
                "version": e.version,
                "recorded_at": e.recorded_at.isoformat(),
                "type": e.type,
                "key": e.key,
                "phase": e.phase,
                "execution_id": e.execution_id,
                "payload": e.payload,
            }
        )
        payload = _printable(orjson.dumps(e.payload).decode())
        payload = payload if len(payload) <= 60 else payload[:57] + "..."
        phase = _printable(e.phase or "-")
        lines.append(
            f"{e.version:>7}  {e.recorded_at.isoformat():<32} {_printable(e.type):<15} "
            f"{phase:<12} {_printable(e.key) + ' ' if e.key else ''}{payload}"
        )
    return doc, lines


def _verify(store: EventStore, args: argparse.Namespace) -> tuple[Any, list[str]]:
    if args.session:
        n = store.verify(args.session)
        return {args.session: n}, [f"{args.session}: {n} events verified"]
    damage = store.integrity_check()
    if damage:  # the chains of a damaged file say little, and reading them may fail midway
        _emit(
            args.json,
            {"database_check": damage, "sessions": None},
            ["database check FAILED:", *(f"  {finding}" for finding in damage)],
        )
        raise IntegrityError(
            f"the database's own integrity check found damage ({len(damage)} findings); "
            "hash chains not checked: restore it from a backup"
        )
    sessions: dict[str, Any] = {}
    failed = []
    for sid, found in store.verify_all():  # one streamed pass; a failure never stops it
        if isinstance(found, int):
            sessions[sid] = found
        elif isinstance(found, IntegrityError):
            sessions[sid] = f"FAILED: {found}"
            failed.append(sid)
        else:
            sessions[sid] = "being removed"  # compaction is (or was) removing it
    check = "ok" if damage == [] else f"not available on {store.dialect_name}"
    lines = [
        f"{sid}: {n} events verified" if isinstance(n, int) else f"{sid}: {n}"
        for sid, n in sessions.items()
    ]
    lines = [*(lines or ["no sessions"]), f"database check: {check}"]
    doc = {"database_check": check, "sessions": sessions}
    if failed:
        _emit(args.json, doc, lines)
        raise IntegrityError(
            f"{len(failed)} of {len(sessions)} sessions failed: {', '.join(failed)}"
        )
    return doc, lines


def _compact(store: EventStore, args: argparse.Namespace) -> tuple[Any, list[str]]:
    report = compact(store, dry_run=args.dry_run)
    doc = {
        "dry_run": report.dry_run,
        "sessions": report.sessions,
        "sessions_removed": report.sessions_removed,
        "events_removed": report.events_removed,
        "snapshots_removed": report.snapshots_removed,
        "kept": report.kept,
        "skipped": report.skipped,
        "duration_s": round(report.duration_s, 6),
    }
    verb = "would remove" if report.dry_run else "removed"
    lines = [
        f"{verb} {report.sessions_removed} expired sessions ({report.events_removed} events, "
        f"{report.snapshots_removed} snapshots) in {report.duration_s:.3f}s"
    ]
    if report.kept:
        lines.append(f"kept {report.kept} sessions written while the job ran")
    if report.skipped:
        lines.append(f"skipped: {report.skipped}")
    return doc, lines


def _upgrade(store: EventStore, args: argparse.Namespace) -> tuple[Any, list[str]]:
    return {"url": store.url.render_as_string()}, [
        f"{store.url.render_as_string()}: schema is current"
    ]


_Opener = Callable[[str], EventStore]
_Command = Callable[[EventStore, argparse.Namespace], tuple[Any, list[str]]]
_READ_ONLY: Final[_Opener] = functools.partial(EventStore.open, read_only=True)

_COMMANDS: Final[dict[str, tuple[_Opener, _Command]]] = {
    "sessions": (_READ_ONLY, _sessions),
    "history": (_READ_ONLY, _history),
    "verify": (_READ_ONLY, _verify),
    "compact": (EventStore.open, _compact),
    "upgrade": (EventStore.upgrade, _upgrade),
}
"""Each command: how it opens the store (the read commands read-only) and what it runs."""


if __name__ == "__main__":
    sys.exit(main())
