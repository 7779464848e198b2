"""The ``eventctx`` command: inspect and maintain a store from the shell.

Global options come before the command. Tables are for people; ``--json`` prints one JSON
document for scripts. Every command but demo, fork, rerun, import, compact and upgrade opens
the database read-only: it never creates a file or a table. Errors are one line on stderr, never a
traceback; the exit status is 0 on success, 1 on failure and 2 for a usage error.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import version as _package_version
from itertools import islice
from pathlib import Path
from typing import Any, Final, NoReturn

import orjson

from eventctx import cli_inspect, demo, exchange, otel
from eventctx.cli_inspect import parse_time
from eventctx.compaction import compact
from eventctx.errors import EventCtxError, IntegrityError, InvalidInputError
from eventctx.inspect import Inspector
from eventctx.manager import DEFAULT_URL
from eventctx.metrics import as_document, as_table, log_metrics, prometheus_text
from eventctx.render import Progress, json_bytes, printable, table
from eventctx.store import EventStore
from eventctx.store.schema import SCHEMA_VERSION

DEMO_URL = "sqlite:///eventctx-demo.db"


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line on stderr (exit 2)."""

    def error(self, message: str) -> NoReturn:
        print(f"eventctx: {printable(message)} (see eventctx --help)", file=sys.stderr)
        raise SystemExit(2)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="eventctx", description=__doc__)
    parser.add_argument(
        "--version", action="version", version=f"eventctx {_package_version('eventctx')}"
    )
    parser.add_argument("--url", help=f"database URL (default: $EVENTCTX_URL, else {DEFAULT_URL})")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("demo", help=f"run the demo (default database {DEMO_URL})")
    commands.add_parser("sessions", help="list live sessions")
    history = commands.add_parser("history", help="print a session's events")
    history.add_argument("session")
    history.add_argument("--phase", help="only events of this phase")
    history.add_argument("--type", action="append", help="only events of this type (repeatable)")
    for bound in ("--since", "--until"):
        history.add_argument(bound, type=parse_time, help="ISO 8601 with offset, or ago: 2h, 7d")
    history.add_argument("--limit", type=int, help="at most this many events")
    history.add_argument("--jsonl", action="store_true", help="JSON Lines: one event per line")
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
    export = commands.add_parser(
        "export", help="write a session's log as JSON Lines (gzip for .gz), to stdout or -o FILE"
    )
    export.add_argument("session")
    export.add_argument("-o", "--output", metavar="FILE", help="the file to write (else stdout)")
    load = commands.add_parser("import", help="load a session from a file eventctx export wrote")
    load.add_argument("file", metavar="FILE", help="the file to read (- for stdin)")
    load.add_argument(
        "--as", dest="as_session", metavar="NEW", help="import under another id, re-chained"
    )
    compact = commands.add_parser(
        "compact", help="remove sessions past their ttl (and with --retain old history), once"
    )
    compact.add_argument("--dry-run", action="store_true", help="only list what would go")
    compact.add_argument(
        "--retain",
        metavar="AGE",
        type=cli_inspect.parse_duration,
        help="also fold events older than AGE (90s, 15m, 2h, 30d) of live sessions into their "
        "base and remove them",
    )
    compact.add_argument(
        "--archive", metavar="DIR", help="export each session to DIR (durably) before removing it"
    )
    commands.add_parser("upgrade", help="migrate the database schema to this version")
    cli_inspect.add_commands(commands)
    metrics = commands.add_parser("metrics", help="phase durations and counts, from the log")
    metrics.add_argument(
        "--format",
        choices=("table", "json", "prometheus"),
        default="table",
        action=_Format,
        help="a table (default), one JSON document, or Prometheus text exposition",
    )
    metrics.add_argument("--phase", metavar="P", help="only the events of phase P")
    metrics.add_argument(
        "--since", metavar="TIME", type=parse_time, help="ISO 8601 with offset, or ago: 90s, 2h, 7d"
    )
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
        if args.command in cli_inspect.COMMANDS:
            return _inspect(url, args)
        opener, command = _COMMANDS[args.command]
        with opener(url) as store, Progress(f"eventctx {args.command}", lambda: store.rows_read):
            document, lines = command(store, args)
            if getattr(args, "jsonl", False):
                _write(b"".join(json_bytes(item, indent=False) + b"\n" for item in document))
            elif document is not None or lines:  # else the command wrote its own output
                _emit(args.json, document, lines)
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
    print(f"eventctx: {printable(message)}", file=sys.stderr)
    return status


def _inspect(url: str, args: argparse.Namespace) -> int:
    """Run a debugging or audit command through an Inspector on the store opened read-only
    (``fork`` and ``rerun`` open it for writing while they write)."""
    with EventStore.open(url, read_only=True) as store:
        with Progress(f"eventctx {args.command}", lambda: store.rows_read):
            document, lines = cli_inspect.COMMANDS[args.command](Inspector(store), args)
        if args.command != "tail":
            _emit(args.json, document, lines)
            return 0
        if args.json:  # JSON Lines, so that -f can go on with more
            _write(b"".join(json_bytes(e, indent=False) + b"\n" for e in document))
        else:
            print("\n".join(lines))
        sys.stdout.flush()
        if not args.follow:
            return 0
        head = store.session(args.session)
        after = document[-1].version if document else (head.version if head else 0)
        return cli_inspect.follow(store, args.session, after, args.json)


def _write(data: bytes) -> None:
    """All of ``data`` to stdout: a pipe may take part of a large write, an error showing only
    on the next."""
    view = memoryview(data)
    while view:
        view = view[sys.stdout.buffer.write(view) :]


def _emit(as_json: bool, document: Any, lines: list[str]) -> None:
    """Print ``document`` as JSON, or ``lines`` (escaped by whoever made them: they may hold
    colour); flushed here, so that a reader that went away is noticed inside ``main``."""
    if as_json:
        _write(json_bytes(document) + b"\n")
    else:
        print("\n".join(lines))
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
        f"{printable(h.session_id):<30} {d['version']:>7}  {d['last_activity']:<32} "
        f"{d['expires_at'] or '-'}"
        for h, d in zip(live, doc, strict=True)
    ]
    return doc, lines


def _history(store: EventStore, args: argparse.Namespace) -> tuple[Any, list[str]]:
    events = Inspector(store).history(
        args.session, since=args.since, until=args.until, types=args.type, phase=args.phase
    )
    if args.limit is not None:
        events = islice(events, max(args.limit, 0))
    found = list(events)
    doc = [
        {
            "version": e.version,
            "recorded_at": e.recorded_at,
            "type": e.type,
            "key": e.key,
            "phase": e.phase,
            "execution_id": e.execution_id,
            "payload": e.payload,
        }
        for e in found
    ]
    return doc, table(cli_inspect.EVENT_HEADERS, cli_inspect.event_rows(found))


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
                ["database check FAILED:", *(printable(f"  {finding}") for finding in damage)],
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
            base = store.base(sid)
            line = (
                f"{sid}: {result.events} events verified"
                + ("" if base is None else f" from the retention base at version {base.version}")
                + (
                    f", {result.snapshots} snapshot{'s' * (result.snapshots > 1)} checked"
                    if result.snapshots
                    else ""
                )
            )
            head = store.session(sid)
            if head is not None:
                heads.append(
                    {"session_id": sid, "version": head.version, "hash": head.head_hash.hex()}
                )
        lines.append(printable(line))
    for sid in expected:  # a head was recorded for a session that is gone
        sessions[sid] = f"FAILED: session {sid!r} does not exist, yet a head was recorded for it"
        failed.append(sid)
        lines.append(printable(f"{sid}: {sessions[sid]}"))
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
    base = store.base(session_id)
    if base is not None and version <= base.version:
        if version < base.version:
            return (
                f"session {session_id!r}: the recorded head at version {version} cannot be "
                f"checked: retention folded versions up to {base.version} into the base"
            )
        if base.head_hash.hex() != digest:
            return (
                f"session {session_id!r} version {version}: the base's hash "
                f"{base.head_hash.hex()} is not the recorded head {digest}: the history up to "
                "there was rewritten"
            )
        return None
    found = store.read_versions(session_id, [version])
    if not found:
        return f"session {session_id!r} has no version {version}, yet its head was recorded there"
    if found[0].hash.hex() != digest:
        return (
            f"session {session_id!r} version {version}: hash {found[0].hash.hex()} is not the "
            f"recorded head {digest}: the history up to there was rewritten"
        )
    return None


def _export(store: EventStore, args: argparse.Namespace) -> tuple[Any, list[str]]:
    if args.output is None:
        exchange.export_session(store, args.session, sys.stdout.buffer)
        sys.stdout.flush()
        return None, []
    done = exchange.export_session(store, args.session, args.output)
    doc = {"session_id": done.session_id, "events": done.events, "file": args.output}
    return doc, [printable(f"exported {done.events} events of {done.session_id} to {args.output}")]


def _import(store: EventStore, args: argparse.Namespace) -> tuple[Any, list[str]]:
    source = sys.stdin.buffer if args.file == "-" else args.file
    done = exchange.import_session(store, source, args.as_session)
    doc = {"session_id": done.session_id, "events": done.events, "head_hash": done.head_hash.hex()}
    return doc, [printable(f"imported {done.events} events as {done.session_id} from {args.file}")]


def _compact(store: EventStore, args: argparse.Namespace) -> tuple[Any, list[str]]:
    report = compact(store, dry_run=args.dry_run, archive=args.archive, retain=args.retain)
    doc = {
        "dry_run": report.dry_run,
        "sessions": report.sessions,
        "sessions_removed": report.sessions_removed,
        "events_removed": report.events_removed,
        "snapshots_removed": report.snapshots_removed,
        "kept": report.kept,
        "skipped": report.skipped,
        "archived": report.archived,
        "trimmed": report.trimmed,
        "events_trimmed": report.events_trimmed,
        "duration_s": round(report.duration_s, 6),
    }
    verb = "would remove" if report.dry_run else "removed"
    lines = [
        f"{verb} {report.sessions_removed} expired sessions ({report.events_removed} events, "
        f"{report.snapshots_removed} snapshots) in {report.duration_s:.3f}s"
    ]
    if report.kept:
        lines.append(f"kept {report.kept} sessions written while the job ran")
    if report.archived:
        lines.append(f"archived {len(report.archived)} sessions first, e.g. {report.archived[0]}")
    if args.retain is not None:
        verb = "would fold" if report.dry_run else "folded"
        lines.append(
            f"{verb} {report.events_trimmed} events of {len(report.trimmed)} live sessions "
            "into their bases"
        )
    if report.skipped:
        lines.append(printable(f"skipped: {report.skipped}"))
    return doc, lines


def _metrics(store: EventStore, args: argparse.Namespace) -> tuple[Any, list[str]]:
    if args.format == "prometheus":
        try:
            text = prometheus_text(store, phase=args.phase, since=args.since)
        except ImportError as exc:  # the optional dependency: say how to install it
            raise EventCtxError(str(exc)) from None
        return None, text.splitlines()
    found = log_metrics(store, phase=args.phase, since=args.since)
    return as_document(found), as_table(found)


class _Format(argparse.Action):
    """``metrics --format``: json prints the document as ``--json`` does, the others do not."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, values)
        namespace.json = values == "json"


def _upgrade(store: EventStore, args: argparse.Namespace) -> tuple[Any, list[str]]:
    url, found = store.url.render_as_string(), store.upgraded_from
    done = (
        f"schema version {SCHEMA_VERSION} is current"
        if found is None
        else f"upgraded the schema from version {found} to {SCHEMA_VERSION}"
    )
    document = {"url": url, "schema_version": SCHEMA_VERSION, "upgraded_from": found}
    return document, [f"{url}: {done}"]


_Opener = Callable[[str], EventStore]
_Command = Callable[[EventStore, argparse.Namespace], tuple[Any, list[str]]]
_READ_ONLY: Final[_Opener] = functools.partial(EventStore.open, read_only=True)

_COMMANDS: Final[dict[str, tuple[_Opener, _Command]]] = {
    "sessions": (_READ_ONLY, _sessions),
    "history": (_READ_ONLY, _history),
    "otel": (_READ_ONLY, _otel),
    "verify": (_READ_ONLY, _verify),
    "metrics": (_READ_ONLY, _metrics),
    "export": (_READ_ONLY, _export),
    "import": (EventStore.open, _import),
    "compact": (EventStore.open, _compact),
    "upgrade": (EventStore.upgrade, _upgrade),
}
"""Each command: how it opens the store (the read commands read-only) and what it runs."""


if __name__ == "__main__":
    sys.exit(main())
