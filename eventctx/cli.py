"""The ``eventctx`` command: inspect and maintain a store from the shell.

Global options come before the command. Tables are for people; ``--json`` prints one JSON
document for scripts. The read commands (sessions, history, verify) open the database read-only:
they never create a file or a table. Errors are one line on stderr, never a traceback; the exit
status is 0 on success, 1 on failure and 2 for a usage error.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

import orjson

from eventctx import demo, otel
from eventctx.compaction import compact
from eventctx.errors import EventCtxError, IntegrityError, InvalidInputError, SessionNotFoundError
from eventctx.inspect import Inspector
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
    spans = commands.add_parser(
        "otel", help="print a session's runs as OpenTelemetry spans (JSON), or send them over OTLP"
    )
    spans.add_argument("session")
    spans.add_argument(
        "--endpoint",
        metavar="URL",
        help="an OTLP/HTTP traces URL, e.g. http://localhost:4318/v1/traces",
    )
    verify = commands.add_parser(
        "verify", help="check one session's hash chain, or every chain and the database file"
    )
    verify.add_argument("session", nargs="?")
    verify.add_argument(
        "--print-head",
        action="store_true",
        help="once verified, print each session's head (VERSION HASH SESSION) to record elsewhere",
    )
    verify.add_argument(
        "--expect-head",
        metavar="VERSION:HASH|@FILE",
        help="the recorded head(s) to check against: the event at VERSION must still have HASH",
    )
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


def _otel(store: EventStore, args: argparse.Namespace) -> tuple[Any, list[str]]:
    spans = otel.recorded_spans(store, args.session)
    if args.endpoint:
        otel.send_otlp(spans, args.endpoint)
        return {"endpoint": args.endpoint, "spans": len(spans)}, [
            f"sent {len(spans)} spans to {args.endpoint}"
        ]
    doc = [otel.span_document(span) for span in spans]
    return doc, json.dumps(doc, indent=2).splitlines()  # ASCII: nothing in it needs escaping


def _verify(store: EventStore, args: argparse.Namespace) -> tuple[Any, list[str]]:
    expected = _expected_heads(args.expect_head, args.session)
    inspector = Inspector(store)
    check: str | None = None
    if args.session:
        results = [inspector.verify(args.session)]
    else:
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
        check = "ok" if damage == [] else f"not available on {store.dialect_name}"
        results = inspector.verify()
    sessions: dict[str, Any] = {}
    heads: list[dict[str, Any]] = []
    failed, lines = [], []
    for result in results:
        sid = result.session_id
        problem = (
            result.error if not result.ok else _head_problem(store, sid, expected.pop(sid, None))
        )
        if result.being_removed:
            sessions[sid], line = "being removed", f"{sid}: being removed"
        elif problem is not None:
            sessions[sid], line = f"FAILED: {problem}", f"{sid}: FAILED: {problem}"
            failed.append(sid)
        else:
            sessions[sid] = result.events
            line = f"{sid}: {result.events} events verified" + (
                f", {result.snapshots} snapshot{'s' * (result.snapshots > 1)} checked"
                if result.snapshots
                else ""
            )
            head = store.session(sid)
            if head is not None:
                heads.append(
                    {"session_id": sid, "version": head.version, "hash": head.head_hash.hex()}
                )
        lines.append(line)
    for sid in expected:  # a head was recorded for a session that is gone
        sessions[sid] = f"FAILED: session {sid!r} does not exist, yet a head was recorded for it"
        failed.append(sid)
        lines.append(f"{sid}: {sessions[sid]}")
    doc: dict[str, Any] = {"sessions": sessions}
    if check is not None:
        doc["database_check"] = check
        lines = [*(lines or ["no sessions"]), f"database check: {check}"]
    if failed:
        _emit(args.json, doc, lines)
        raise IntegrityError(
            f"{len(failed)} of {len(sessions)} sessions failed: {', '.join(failed)}"
        )
    if args.print_head:
        return heads, [f"{h['version']} {h['hash']} {h['session_id']}" for h in heads]
    return doc, lines


def _expected_heads(spec: str | None, session_id: str | None) -> dict[str, tuple[int, str]]:
    """The recorded heads ``--expect-head`` names: ``VERSION:HASH`` for the session given,
    or ``@FILE`` with lines as ``--print-head`` prints them (or its ``--json`` list)."""
    if spec is None:
        return {}
    if not spec.startswith("@"):
        if session_id is None:
            raise InvalidInputError("--expect-head VERSION:HASH needs a session; or give @FILE")
        version, _, digest = spec.partition(":")
        return {session_id: (_head_version(version, spec), digest.lower())}
    try:
        text = Path(spec[1:]).read_text()
    except OSError as exc:
        raise InvalidInputError(f"--expect-head: cannot read {spec[1:]}: {exc.strerror}") from None
    if text.lstrip().startswith("["):
        try:
            rows = [(h["version"], h["hash"], h["session_id"]) for h in orjson.loads(text)]
        except (orjson.JSONDecodeError, TypeError, KeyError) as exc:
            raise InvalidInputError(f"--expect-head: {spec[1:]} is not a list of heads") from exc
    else:
        rows = []
        for line in filter(str.strip, text.splitlines()):
            version, _, rest = line.partition(" ")
            digest, _, sid = rest.partition(" ")
            if not sid:
                raise InvalidInputError(
                    f"--expect-head: {spec[1:]} has a line that is not VERSION HASH SESSION"
                )
            rows.append((version, digest, sid))
    heads = {str(sid): (_head_version(str(v), spec), str(h).lower()) for v, h, sid in rows}
    if session_id is not None:
        heads = {session_id: heads[session_id]} if session_id in heads else {}
    return heads


def _head_version(text: str, spec: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise InvalidInputError(f"--expect-head {spec!r}: the version must be a positive integer")
    return int(text)


def _head_problem(
    store: EventStore, session_id: str, expected: tuple[int, str] | None
) -> str | None:
    """Why a verified session does not match its recorded head, or None."""
    if expected is None:
        return None
    version, digest = expected
    found = store.read_versions(session_id, [version])
    if not found:
        return f"session {session_id!r} has no version {version}, yet its head was recorded there"
    if found[0].hash.hex() != digest:
        return (
            f"session {session_id!r} version {version}: hash {found[0].hash.hex()} is not the "
            f"recorded head {digest}: the history up to there was rewritten"
        )
    return None


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
    "otel": (_READ_ONLY, _otel),
    "verify": (_READ_ONLY, _verify),
    "compact": (EventStore.open, _compact),
    "upgrade": (EventStore.upgrade, _upgrade),
}
"""Each command: how it opens the store (the read commands read-only) and what it runs."""


if __name__ == "__main__":
    sys.exit(main())
