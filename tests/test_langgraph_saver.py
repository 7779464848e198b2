"""EventCtxSaver beyond the conformance suite: exact round trips of values that are not JSON,
the event loop left free while the store works, and refusals."""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("langgraph.checkpoint.base", reason="needs eventctx[langgraph]")

from langgraph.checkpoint.conformance.test_utils import (
    generate_checkpoint,
    generate_config,
    generate_metadata,
)

from eventctx import EventStore, Inspector, InvalidInputError
from eventctx.compaction import compact
from eventctx.integrations.langgraph import EventCtxSaver

VALUES: dict[str, Any] = {
    "json": {"files": ["a.go"], "score": 0.5, "ok": True, "none": None},
    "tuple": (1, "two", (3.0,)),
    "set": {1, 2, 3},
    "bytes": b"\x00\xff",
    "when": datetime(2026, 1, 31, 17, 0, tzinfo=UTC),
    "decimal": Decimal("1.10"),
    "nan": float("nan"),
    "int_keys": {1: "one"},
    "surrogate": "\ud800",
}


@pytest.fixture
def saver(tmp_path: Path) -> Any:
    with EventCtxSaver(f"sqlite:///{tmp_path / 'lg.db'}") as saver:
        yield saver


def test_values_round_trip_exactly_and_json_stays_readable(saver: EventCtxSaver) -> None:
    versions = dict.fromkeys(VALUES, 1)
    checkpoint = generate_checkpoint(channel_values=VALUES, channel_versions=versions)
    stored = saver.put(generate_config("t"), checkpoint, generate_metadata(extra=(1, 2)), versions)
    saver.put_writes(stored, [("w", {1, 2}), ("j", [1, "a"])], "task-1")
    found = saver.get_tuple(stored)
    assert found is not None
    values = found.checkpoint["channel_values"]
    serde = saver.serde
    for name, value in VALUES.items():
        # exactly what LangGraph's serializer gives back (it makes tuples lists), or the value
        # itself for plain JSON
        expected = value if name == "json" else serde.loads_typed(serde.dumps_typed(value))
        if name == "nan":
            assert values[name] != values[name]
            continue
        assert values[name] == expected, name
        assert type(values[name]) is type(expected), name
    assert found.metadata["extra"] == [1, 2]
    assert found.pending_writes == [("task-1", "w", {1, 2}), ("task-1", "j", [1, "a"])]
    with Inspector(saver.store) as insp:
        blame = insp.blame("t")
    assert blame["json"].value == VALUES["json"]  # plain JSON is stored as itself
    assert isinstance(blame["tuple"].value, str)  # the serializer's bytes, as base64 text


def test_async_methods_leave_the_event_loop_free(
    saver: EventCtxSaver, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()
    append = saver.store.append

    def slow_append(*args: Any, **kwargs: Any) -> Any:
        release.wait(5)
        return append(*args, **kwargs)

    monkeypatch.setattr(saver.store, "append", slow_append)

    async def main() -> float:
        config = generate_config("t")
        put = asyncio.create_task(
            saver.aput(config, generate_checkpoint(), generate_metadata(), {})
        )
        started = time.perf_counter()
        await asyncio.sleep(0.05)  # runs while the append waits in its worker thread
        ticked = time.perf_counter() - started
        release.set()
        await put
        return ticked

    assert asyncio.run(main()) < 1


def test_a_checkpoint_written_by_another_saver_is_seen(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'lg.db'}"
    with EventCtxSaver(url) as first, EventCtxSaver(url) as second:
        one = first.put(generate_config("t"), generate_checkpoint(), generate_metadata(), {})
        assert second.get_tuple(generate_config("t")) is not None
        two = second.put(one, generate_checkpoint(), generate_metadata(step=1), {})
        # `first` folded the thread before `second` wrote: its conditional append folds
        # what `second` wrote and goes on top.
        first.put_writes(two, [("ch", 1)], "task")
        found = first.get_tuple(generate_config("t"))
        assert found is not None
        assert found.config == two
        assert found.pending_writes == [("task", "ch", 1)]
        assert first.store.verify("t") > 0


def test_refusals(saver: EventCtxSaver) -> None:
    with pytest.raises(InvalidInputError, match="checkpoint_id"):
        saver.put_writes(generate_config("t"), [("ch", 1)], "task")
    store = saver.store
    with EventCtxSaver(store) as shared:
        shared.close()
    assert isinstance(store.sessions(), list)  # a store passed in is not closed by the saver
    with pytest.raises(InvalidInputError):
        saver.delete_thread(None)  # type: ignore[arg-type]
    assert isinstance(store, EventStore)


def test_retention_leaves_threads_whole(saver: EventCtxSaver) -> None:
    config = generate_config("t")
    for step in range(3):
        checkpoint = generate_checkpoint(channel_values={"n": step}, channel_versions={"n": step})
        config = saver.put(config, checkpoint, generate_metadata(step=step), {"n": step})
    time.sleep(0.01)
    report = compact(saver.store, retain=timedelta(microseconds=1))
    assert report.trimmed == {} and saver.store.base("t") is None
    assert len(list(saver.list(generate_config("t")))) == 3
