"""The fuzz suite: arbitrary keys, values, session ids and durations are stored and read back
exactly, or refused with a precise EventCtxError and nothing appended; a neighbour writing
meanwhile is never affected."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eventctx import ContextManager, EventCtxError, EventStore, NewEvent

EXAMPLES = int(os.environ.get("EVENTCTX_FUZZ_EXAMPLES", "60"))
COMMANDS = ["--json", "history", "sessions", "verify"]
TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=40)  # surrogates too
LEAF = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | TEXT
    | st.binary(max_size=5)
)
VALUES = st.recursive(
    LEAF,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(TEXT | st.integers(), inner, max_size=3)
        | st.tuples(inner)
    ),
    max_leaves=10,
)
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture
def fuzzed(db_url: str) -> Iterator[ContextManager]:
    with ContextManager(db_url, cleanup_interval=None) as manager:
        yield manager


class Neighbour:
    """Another caller writing to its own session the whole time; it must never fail."""

    def __init__(self, manager: ContextManager) -> None:
        self.ctx = manager.get_or_create_context("neighbour")
        self.errors: list[BaseException] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        i = 0
        while not self.stop.is_set():
            try:
                self.ctx.set(f"n{i % 5}", i)
            except BaseException as exc:
                self.errors.append(exc)
            i += 1

    def __enter__(self) -> Neighbour:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        assert not self.errors, self.errors[:3]


def _canonical(value: Any) -> Any:
    """What a stored value reads back as: tuples become lists."""
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items()}
    return value


@FUZZ
@given(key=TEXT, value=VALUES)
def test_any_key_and_value_round_trip_or_are_refused(
    fuzzed: ContextManager, key: str, value: Any
) -> None:
    ctx = fuzzed.get_or_create_context("fuzz")
    with Neighbour(fuzzed):
        before = ctx.version
        try:
            ctx.set(key, value)
        except EventCtxError:
            assert ctx.version == before  # refused: nothing appended
            assert fuzzed.store.session("fuzz").version == before  # type: ignore[union-attr]
            return
    assert ctx.version == before + 1
    assert ctx.get(key) == _canonical(value)
    with ContextManager(fuzzed.store) as fresh:  # and from the log, in another manager
        assert fresh.get_context("fuzz").get(key) == _canonical(value)


@FUZZ
@given(key=TEXT, value=VALUES, phase=st.none() | TEXT)
def test_a_key_set_event_is_what_create_makes(key: str, value: Any, phase: str | None) -> None:
    """``NewEvent.key_set``, the path of every context write, makes the event ``create``
    makes, and refuses what it refuses with the same error."""

    def made(make: Callable[[], NewEvent]) -> NewEvent | tuple[type, str]:
        try:
            return make()
        except EventCtxError as exc:
            return type(exc), str(exc)

    short = made(lambda: NewEvent.key_set(key, value, phase=phase, execution_id="run"))
    assert short == made(
        lambda: NewEvent.create(
            "KeySet", {"value": value}, key=key, phase=phase, execution_id="run"
        )
    )


@FUZZ
@given(session_id=TEXT)
def test_any_session_id_round_trips_or_is_refused(fuzzed: ContextManager, session_id: str) -> None:
    try:
        ctx = fuzzed.create_context(session_id)
    except EventCtxError:
        with contextlib.suppress(EventCtxError):  # the lookup refuses it just the same
            assert fuzzed.store.session(session_id) is None
        return
    ctx.set("k", session_id)
    assert fuzzed.get_context(session_id).get("k") == session_id
    assert fuzzed.store.verify(session_id) == 2
    fuzzed.delete_context(session_id, purge=True)


@FUZZ
@given(
    ttl=st.one_of(
        st.timedeltas(),
        st.integers(),
        st.floats(allow_nan=False),
        st.none(),
        st.just(timedelta.max),
    )
)
def test_any_ttl_is_stored_or_refused(fuzzed: ContextManager, ttl: Any) -> None:
    try:
        ctx = fuzzed.create_context("ttl", ttl=ttl)
    except EventCtxError:
        assert fuzzed.store.session("ttl") is None
        return
    try:
        assert fuzzed.sessions()  # listing never breaks
        ctx.set("k", 1)
        fuzzed.cleanup_expired()  # nor compaction
    finally:
        fuzzed.delete_context("ttl", purge=True)


@FUZZ
@given(
    args=st.lists(TEXT | st.sampled_from(["--json", "history", "sessions", "verify"]), max_size=4)
)
def test_any_command_line_ends_in_one_line_or_output(
    db_url: str, args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    from eventctx.cli import main  # noqa: PLC0415

    EventStore.open(db_url).close()
    try:
        code = main(["--url", db_url, *args])
    except SystemExit as exc:  # argparse's usage errors
        code = int(exc.code or 0)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert code in (0, 1, 2)
