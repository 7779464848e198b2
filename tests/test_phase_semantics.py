"""Phase semantics users expect (attempt isolation, timings, retries, context parity) and the
small defects found with them."""

from __future__ import annotations

import threading
import uuid
from typing import Any

import pytest
import sqlalchemy as sa

import eventctx
from eventctx import (
    ContextManager,
    ContextTypeError,
    EventStore,
    Inspector,
    NewEvent,
    PluginContext,
    PluginRunner,
    runlog,
)


def test_type_errors_use_the_right_article(manager: ContextManager) -> None:
    ctx = manager.create_context("s")
    ctx.set("flag", True)
    with pytest.raises(ContextTypeError, match="holds a bool, not an int"):
        ctx.get_int("flag")


@pytest.mark.parametrize("scheme", ["postgresql", "postgres"])
def test_plain_postgresql_urls_use_psycopg(pg_url: str, scheme: str) -> None:
    url = sa.make_url(pg_url).set(drivername=scheme).render_as_string(hide_password=False)
    with EventStore.open(url) as store:
        store.append("s", [NewEvent.create("ContextCreated")])
        assert store.session("s") is not None
        assert store.engine.url.drivername == "postgresql+psycopg"


def _flaky(fail_times: int, outside: PluginContext | None = None) -> Any:
    calls: list[int] = []

    def build(_: Any) -> str:
        calls.append(1)
        ctx = eventctx.current_context()
        ctx.set(f"attempt-{len(calls)}", True)
        ctx.set("result", f"from attempt {len(calls)}")
        if outside is not None and len(calls) == 1:  # another thread writes meanwhile
            writer = threading.Thread(target=outside.set, args=("note", "outside the phase"))
            writer.start()
            writer.join()
        if len(calls) <= fail_times:
            raise ConnectionError(f"attempt {len(calls)} failed")
        return "built"

    return build


def test_only_the_successful_attempts_writes_count(manager: ContextManager) -> None:
    ctx = manager.create_context("s")
    ctx.set("result", "before the run")
    result = PluginRunner(manager, [_flaky(2)], retries=2).run("s")
    assert result.status == "completed"
    assert ctx.to_dict() == {"result": "from attempt 3", "attempt-3": True}
    events = list(manager.store.read("s"))
    written = [e.key for e in events if e.type == "KeySet" and e.phase == "build"]
    assert written == ["attempt-1", "result", "attempt-2", "result", "attempt-3", "result"]
    insp = Inspector(manager.store)
    states = [step.state.data for step in insp.replay("s") if step.event.type == "PhaseFailed"]
    assert states == [{"result": "before the run"}] * 2  # each failure rolled back
    blame = insp.blame("s", "result")["result"]
    assert blame.attempt == 3 and blame.previous == "before the run"
    history = insp.key_history("s", "result")
    assert [(w.attempt, w.rolled_back) for w in history] == [
        (None, False),
        (1, True),
        (2, True),
        (3, False),
    ]
    with ContextManager(manager.store) as fresh:  # a restore folds the same
        assert fresh.get_context("s").to_dict() == ctx.to_dict()


def test_a_write_outside_the_phase_during_a_failed_attempt_stands(
    manager: ContextManager,
) -> None:
    outside = manager.create_context("s")
    PluginRunner(manager, [_flaky(1, outside)], retries=1).run("s")
    assert outside.to_dict() == {
        "note": "outside the phase",
        "attempt-2": True,
        "result": "from attempt 2",
    }


def test_an_interrupted_attempts_writes_are_rolled_back_on_resume(
    manager: ContextManager,
) -> None:
    ctx = manager.create_context("s")
    run = uuid.uuid4().hex
    ctx.writer.append(
        [
            runlog.run_started(run, None, ["build"]),
            runlog.phase_started(run, "build", 1),
            NewEvent.create(
                "KeySet", {"value": "half"}, key="result", phase="build", execution_id=run
            ),
        ]
    )
    seen: list[Any] = []

    def build(_: Any) -> str:
        seen.append(eventctx.current_context().get("result"))
        return "ok"

    assert PluginRunner(manager, [build]).run("s", resume=True).status == "completed"
    assert seen == [None]  # the next attempt does not see the dead one's half-finished work


def test_isolation_can_be_turned_off(manager: ContextManager) -> None:
    ctx = manager.create_context("s")
    PluginRunner(manager, [_flaky(1)], retries=1, isolate_attempts=False).run("s")
    assert ctx.to_dict() == {"attempt-1": True, "attempt-2": True, "result": "from attempt 2"}
