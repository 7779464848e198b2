"""Write docs/cli.md: every ``eventctx`` command with its real output on the demo database
(``python -m tools.cli_doc``; run it again when a command's output changes)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
S = "code-review-42"

INTRO = """# The `eventctx` command line

`eventctx [--url URL] [--json] COMMAND …` (also `python -m eventctx`). The database is `--url`,
else `$EVENTCTX_URL`, else `sqlite:///eventctx.db`; a keyed database takes its key from
`$EVENTCTX_CHAIN_KEY`. Global options come before the command.

- Tables are for people: aligned, times absolute (UTC) and relative, long values shortened,
  control characters escaped, colour only on a terminal and never with `NO_COLOR`.
- `--json` prints one JSON document (a list for listings) for scripts; `history --jsonl` and
  `tail --json` print JSON Lines.
- Exit status: 0 ok, 1 failure, 2 usage. Every error is one line on stderr, never a traceback.
- The read commands open the database read-only: they never create a file or a table, record
  activity or take a write lock. Only `fork`, `rerun`, `import`,
  `compact` and `upgrade` write.
- Times are ISO 8601 with an offset (`2026-11-27T10:00:00Z`) or a time ago: `90s`, `15m`,
  `2h`, `7d`.

Every output below is real: `python -m tools.cli_doc` runs the demo and then each command on
its database.
"""

FIXES = """import eventctx


def execution(_):
    \"\"\"The execution phase with the security review fixed.\"\"\"
    ctx = eventctx.current_context()
    for check in ctx.get("plan")["checks"]:
        ctx.set(f"check.{check}", {"files": 2, "passed": True})
    return {"passed": 3}
"""
"""A changed ``execution`` phase for the rerun example (``$ cat fixes.py`` in the page)."""

COMMANDS: list[tuple[str, str, list[str]]] = [
    ("sessions", "The live sessions.", ["sessions"]),
    (
        "history",
        "A session's events, filtered by `--phase`, `--type` (repeatable), `--since`, `--until`, "
        "`--limit`; `--jsonl` for JSON Lines.",
        ["history", S, "--limit", "8"],
    ),
    ("show", "The current context, with the writer of each key.", ["show", S]),
    (
        "replay",
        "The context after `--version N`, or as of `--at TIME`.",
        ["replay", S, "--version", "8"],
    ),
    (
        "blame",
        "Who wrote each key (or `KEY`) last: phase, attempt, run, version, time.",
        ["blame", S],
    ),
    ("readers", "The phase attempts that read `KEY`, and how they ended.", ["readers", S, "files"]),
    ("diff", "How the context changed from `V1` to `V2`.", ["diff", S, "4", "17"]),
    ("runs", "A session's runs, with their phases and attempts.", ["runs", S]),
    (
        "stats",
        "Per phase: attempts, failures, retries and duration percentiles (`--phase`, "
        "`--since`, `--session`).",
        ["stats"],
    ),
    (
        "fork",
        "Copy a session's history up to `--version` into a new session.",
        ["fork", S, "what-if", "--version", "8"],
    ),
    (
        "diff-sessions",
        "Two sessions' runs side by side, and the first phase that diverges.",
        ["diff-sessions", S, "what-if"],
    ),
    (
        "rerun",
        "Run `PHASE` again with other code (`--module MODULE:FUNCTION`, importable from the "
        "working directory) in a fork at the state just before the recorded attempt, and "
        "compare.",
        ["rerun", S, "execution", "--module", "fixes:execution"],
    ),
    (
        "tail",
        "A session's last `-n` events; `-f` prints new ones as they are committed, from any "
        "process, until Ctrl-C (exit 0).",
        ["tail", S, "-n", "3"],
    ),
    (
        "verify",
        "Check hash chains and snapshots (one session, or all and the database file); "
        "`--print-head` and `--expect-head` record and check heads kept elsewhere "
        "(docs/security.md).",
        ["verify"],
    ),
    (
        "compact",
        "Remove sessions past their ttl, once (`--dry-run` lists them; `--archive DIR` exports "
        "each to DIR first, docs/retention.md).",
        ["compact", "--dry-run"],
    ),
    (
        "metrics",
        "Phase durations and counts from the log (`--format table|json|prometheus`, `--phase`, "
        "`--since`); docs/observability.md.",
        ["metrics"],
    ),
    (
        "otel",
        "A session's runs as OpenTelemetry spans (one JSON document), or sent over OTLP/HTTP "
        "with `--endpoint URL`; docs/observability.md.",
        [],
    ),
    (
        "timeline",
        "Write a session's timeline to `-o FILE.html`: one self-contained page (no network) "
        "with its runs, phase attempts and key writes; click a write to see the context at "
        "that version. docs/debugging.md shows one.",
        [],
    ),
    (
        "export",
        "Write a session's log as JSON Lines, to stdout or `-o FILE` (gzip when it ends in "
        "`.gz`); the format is in docs/retention.md.",
        ["export", S, "-o", f"{S}.jsonl.gz"],
    ),
    (
        "import",
        "Load a session from a file `export` wrote (`-` for stdin), verifying its chain first; "
        "`--as NEW` imports it under another id, re-chained.",
        ["import", f"{S}.jsonl.gz", "--as", "restored"],
    ),
    ("upgrade", "Migrate an older database schema to this version.", ["upgrade"]),
    ("demo", "Run the demo (default database `sqlite:///eventctx-demo.db`).", []),
]


def main() -> None:
    """Run the demo in a temporary directory, then each command, and write the page."""
    with tempfile.TemporaryDirectory() as directory:
        url = f"sqlite:///{directory}/demo.db"
        env = {k: v for k, v in os.environ.items() if k not in ("EVENTCTX_URL", "NO_COLOR")}
        env["NO_COLOR"] = "1"
        subprocess.run(
            [sys.executable, "-m", "eventctx", "--url", url, "demo"],
            env=env,
            check=True,
            capture_output=True,
        )
        Path(directory, "fixes.py").write_text(FIXES)
        parts = [INTRO]
        for name, what, args in COMMANDS:
            parts.append(f"## `{name}`\n\n{what}\n")
            if name == "rerun":
                parts.append(f"```console\n$ cat fixes.py\n{FIXES}```\n")
            if args:
                done = subprocess.run(
                    [sys.executable, "-m", "eventctx", "--url", url, *args],
                    env=env,
                    capture_output=True,
                    text=True,
                    check=False,
                    cwd=directory,
                )
                shown = " ".join(args)
                parts.append(f"```console\n$ eventctx {shown}\n{done.stdout}{done.stderr}```\n")
        DOC.write_text("\n".join(parts))


if __name__ == "__main__":
    main()
