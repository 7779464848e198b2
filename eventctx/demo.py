"""The demo: a code-review plugin whose run is killed mid-phase and resumed by another process.

``eventctx demo`` (``make demo``) runs it on ``eventctx-demo.db`` in the current directory:
a child process runs analysis → planning → execution → report and is killed with SIGKILL
inside ``execution``; this process resumes the run (analysis and planning are not run again,
their stored outputs are fed on) and then prints what someone debugging it wants to see.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import orjson
import sqlalchemy as sa

import eventctx
from eventctx.events import RecordedEvent
from eventctx.manager import ContextManager
from eventctx.runner import PluginRunner
from eventctx.state import fold

SESSION = "code-review-42"
_CRASH = "EVENTCTX_DEMO_CRASH"


def analysis(review: dict[str, Any]) -> dict[str, Any]:
    """Find the files of the change and their language."""
    time.sleep(0.03)
    files = [f"{review['repo']}/cmd/main.go", f"{review['repo']}/pkg/plugin/context.go"]
    eventctx.current_context().set("files", files)
    eventctx.helper().set_metadata("language", "go")
    return {"files": len(files), "lines_changed": 412}


def planning(review: dict[str, Any]) -> dict[str, Any]:
    """Plan the checks from what analysis found."""
    h = eventctx.helper()
    ctx = h.context
    checks = ["vet", "test"] if h.get_metadata("language") == "go" else ["lint"]
    if h.get_output("analysis")["lines_changed"] > 200:
        checks.append("security-review")
    ctx.set("plan", {"checks": checks, "files": ctx.get_list("files")})
    time.sleep(0.02)
    return {"checks": len(checks)}


def execution(review: dict[str, Any]) -> dict[str, Any]:
    """Run each planned check; the demo's first run dies in here."""
    ctx = eventctx.current_context()
    plan = ctx.get_dict("plan")
    for i, check in enumerate(plan["checks"]):
        time.sleep(0.02)
        ctx.set(
            f"check.{check}", {"passed": check != "security-review", "files": len(plan["files"])}
        )
        if i == 0 and os.environ.get(_CRASH) == "1":
            print("inside execution", flush=True)
            time.sleep(600)  # the parent kills this process here
    return {"checks_run": len(plan["checks"])}


def report(review: dict[str, Any]) -> str:
    """Summarise the checks for the reviewer."""
    ctx = eventctx.current_context()
    checks = ctx.get_dict("plan")["checks"]
    failed = [c for c in checks if not ctx.get_dict(f"check.{c}")["passed"]]
    summary = f"{review['title']}: {len(checks) - len(failed)}/{len(checks)} checks passed"
    if failed:
        summary += f"; needs attention: {', '.join(failed)}"
    ctx.set("report", summary)
    return summary


PHASES = [analysis, planning, execution, report]
REVIEW = {"repo": "acme/plugin-host", "title": "Share context between phases"}


def run(url: str, out: Callable[[str], None] = print) -> None:
    """Crash a run in a child process, resume it here, and show the story."""
    with ContextManager(url) as manager:
        if manager.store.session(SESSION) is not None:
            manager.delete_context(SESSION, purge=True)  # each demo starts afresh
    out(f"1. A child process runs the code-review plugin on session {SESSION!r}")
    out("   (analysis → planning → execution → report) and is killed inside 'execution'.")
    child = subprocess.Popen(
        [sys.executable, "-m", "eventctx.demo", "crash", url],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, _CRASH: "1"},
    )
    assert child.stdout is not None
    if child.stdout.readline().strip() != "inside execution":
        child.kill()
        raise eventctx.EventCtxError("the demo's child process did not reach 'execution'")
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    out(f"   killed pid {child.pid} with SIGKILL.\n")

    with ContextManager(url) as manager:
        out("2. This process resumes the run:")
        result = PluginRunner(manager, PHASES).run(SESSION, resume=True)
        out(f"   status {result.status}; report: {result.outputs['report']!r}\n")
        events = list(manager.store.read(SESSION))
        ctx = manager.get_context(SESSION)
        _timeline(events, out)
        _keys(events, out)
        out("Final context")
        for key, value in ctx.to_dict().items():
            out(f"  {key} = {orjson.dumps(value).decode()}")
        verified = manager.store.verify(SESSION)
    path = sa.make_url(url).database or url
    out(f"\n{verified} events, hash chain verified. Database: {os.path.abspath(path)}")
    out(f"Explore it: eventctx --url {url} history {SESSION}")
    out(f"       and: show, blame, runs, stats, tail -f, timeline {SESSION} -o timeline.html")


def _timeline(events: list[RecordedEvent], out: Callable[[str], None]) -> None:
    runs = [e.execution_id for e in events if e.type == "RunStarted"]
    out(f"Phase timeline (execution {runs[-1]})")
    out(f"  {'PHASE':<10} {'ATTEMPT':>7}  {'STATUS':<12} {'DURATION':>10}  DETAIL")
    for e in events:
        if e.type == "PhaseCompleted":
            status, detail = "completed", orjson.dumps(e.payload["output"]).decode()
        elif e.type == "PhaseFailed":
            status, detail = e.payload["error_type"], e.payload["message"]
            status = "interrupted" if status == "interrupted" else f"failed ({status})"
        else:
            continue
        ms = e.payload["duration_ms"]
        duration = "-" if ms is None else f"{'≥' if status == 'interrupted' else ''}{ms:.1f} ms"
        out(f"  {e.phase:<10} {e.payload['attempt']:>7}  {status:<12} {duration:>10}  {detail}")
    out("")


def _keys(events: list[RecordedEvent], out: Callable[[str], None]) -> None:
    readers: dict[str, list[str]] = {}
    for e in events:
        if e.type in ("PhaseCompleted", "PhaseFailed"):
            for key in e.payload["keys_read"]:
                readers.setdefault(key, [])
                if e.phase not in readers[key]:
                    readers[key].append(str(e.phase))
    provenance = fold(events).provenance  # the last write of each key
    out("Which phase wrote and read each key")
    out(f"  {'KEY':<22} {'WRITTEN BY':<24} READ BY")
    for key, p in provenance.items():
        writer = f"{p.phase or '(outside a phase)'} at v{p.version}"
        out(f"  {key:<22} {writer:<24} {', '.join(readers.get(key, [])) or '-'}")
    out("")


def _crash(url: str) -> None:
    with ContextManager(url) as manager:
        PluginRunner(manager, PHASES).run(SESSION, input=REVIEW)


if __name__ == "__main__":
    if sys.argv[1:2] == ["crash"]:
        _crash(sys.argv[2])
    else:
        raise SystemExit("usage: python -m eventctx.demo crash URL")
