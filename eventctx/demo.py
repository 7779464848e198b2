"""The demo: a session written by one process and restored by another, then its history.

``eventctx demo`` runs it on ``eventctx-demo.db`` in the current directory (or ``--url``).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

import orjson

from eventctx.manager import ContextManager
from eventctx.store import EventStore

SESSION = "review-42"


def run(url: str, out: Callable[[str], None] = print) -> None:
    """Write a session, restore it in a child process, print its history and its context."""
    with ContextManager(url) as manager:
        if manager.store.session(SESSION) is not None:
            manager.delete_context(SESSION, purge=True)  # each demo starts afresh
        ctx = manager.create_context(SESSION)
        ctx.set("language", "go")
        ctx.update({"files": ["cmd/main.go", "pkg/plugin/context.go"], "draft": True})
        ctx.set("plan", {"steps": ["lint", "test", "review"], "reviewers": 2})
        ctx.delete("draft")
        out(f"wrote session {SESSION!r} up to version {ctx.version} in {url}")

    child = subprocess.run(
        [sys.executable, "-m", "eventctx.demo", "restore", url, SESSION],
        capture_output=True,
        check=True,
    )
    restored_version, restored_json = child.stdout.split(b"\n", 1)
    out(f"a second process restored it from the database at version {int(restored_version)}\n")

    out("history")
    with EventStore.open(url) as store:
        for event in store.read(SESSION):
            value = event.payload.get("value", "")
            shown = orjson.dumps(value).decode() if "value" in event.payload else ""
            out(
                f"  v{event.version:<3} {event.recorded_at:%H:%M:%S.%f}  {event.type:<15}"
                f" {event.key or '':<9} {shown}"
            )
        out(f"  hash chain verified over {store.verify(SESSION)} events\n")
    out("restored context")
    for key, value in orjson.loads(restored_json).items():
        out(f"  {key} = {orjson.dumps(value).decode()}")
    out(f"\ndatabase: {url}  (try: eventctx --url {url} history {SESSION})")


def _restore(url: str, session_id: str) -> None:
    with ContextManager(url) as manager:
        ctx = manager.get_context(session_id)
        sys.stdout.buffer.write(b"%d\n" % ctx.version + ctx.to_json())


if __name__ == "__main__":
    if sys.argv[1:2] == ["restore"]:
        _restore(sys.argv[2], sys.argv[3])
    else:
        raise SystemExit("usage: python -m eventctx.demo restore URL SESSION")
