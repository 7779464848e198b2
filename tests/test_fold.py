"""Property tests of the fold: snapshot + tail == full fold, at every version, on every backend."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eventctx import ContextManager, EventStore, PluginContext, RecordedEvent, runlog
from eventctx.context import PhaseScope, phase_scope
from eventctx.errors import IntegrityError
from eventctx.snapshots import fold_log, restore
from eventctx.state import FOLD_VERSION, State, apply, decode_state, fold, state_document

KEYS = st.sampled_from(["a", "b", "c", "plan", "ключ"])
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=12,
)
WRITES = st.one_of(
    st.tuples(st.just("set"), KEYS, JSON),
    st.tuples(st.just("update"), st.dictionaries(KEYS, JSON, max_size=3)),
    st.tuples(st.just("delete"), KEYS),
    st.tuples(st.just("clear")),
)
OPS = st.lists(
    st.one_of(
        WRITES,
        st.tuples(st.just("recreate")),
        # A phase attempt: its writes, whether it completes, whether it is isolated.
        st.tuples(st.just("attempt"), st.lists(WRITES, max_size=4), st.booleans(), st.booleans()),
    ),
    min_size=1,
    max_size=25,
)


@pytest.fixture
def store(db_url: str) -> Iterator[EventStore]:
    with EventStore.open(db_url) as s:
        yield s


def _write(ctx: PluginContext, model: dict[str, Any], op: tuple[Any, ...]) -> None:
    if op[0] == "set":
        ctx.set(op[1], op[2])
        model[op[1]] = op[2]
    elif op[0] == "update":
        ctx.update(op[1])
        model.update(op[1])
    elif op[0] == "delete":
        present = op[1] in model
        model.pop(op[1], None)
        assert ctx.delete(op[1]) is present
    else:
        ctx.clear()
        model.clear()


def _attempt(ctx: PluginContext, model: dict[str, Any], op: tuple[Any, ...], n: int) -> None:
    """A phase attempt writing ``op[1]``; a failed isolated one leaves the data as before."""
    _, writes, completes, isolated = op
    run = f"run-{n}"
    before = dict(model)
    ctx.writer.append([runlog.phase_started(run, "p", 1, isolated=isolated)])
    with phase_scope(PhaseScope(ctx.session_id, "p", run)):
        for write in writes:
            _write(ctx, model, write)
    if completes:
        ctx.writer.append([runlog.phase_completed(run, "p", 1, None, 1.0, set())])
        return
    ctx.writer.append([runlog.phase_failed(run, "p", 1, ValueError("no"), 1.0, set())])
    if isolated:
        model.clear()
        model.update(before)


def _run(manager: ContextManager, session_id: str, ops: list[tuple[Any, ...]]) -> dict[str, Any]:
    """Apply ``ops`` through a context; return the data a model dict says it should hold."""
    ctx = manager.create_context(session_id)
    model: dict[str, Any] = {}
    for n, op in enumerate(ops):
        if op[0] == "attempt":
            _attempt(ctx, model, op, n)
        elif op[0] == "recreate":
            manager.delete_context(session_id)
            ctx = manager.create_context(session_id)
            model.clear()
        else:
            _write(ctx, model, op)
        assert ctx.to_dict() == model
    return model


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=OPS, every=st.integers(min_value=1, max_value=6), data=st.data())
def test_snapshot_plus_tail_equals_full_fold(
    store: EventStore, ops: list[Any], every: int, data: st.DataObject
) -> None:
    session_id = f"prop-{uuid.uuid4().hex}"
    manager = ContextManager(store, snapshot_every=every)  # the policy takes some snapshots
    model = _run(manager, session_id, ops)
    events = list(store.read(session_id))
    full = fold(events)
    assert full.data == model and full.version == len(events)
    extra = data.draw(st.sets(st.integers(min_value=1, max_value=len(events)), max_size=4))
    for version in extra:  # and snapshots at arbitrary versions
        state = fold(events[:version])
        store.save_snapshot(session_id, version, FOLD_VERSION, state.head_hash, state.encode())
    for version in range(1, len(events) + 1):
        expected = fold(events[:version])
        restored, _, _ = restore(store, session_id, version, events[version - 1].hash)
        assert restored == expected
        assert decode_state(expected.encode()) == expected
    with ContextManager(store) as fresh:
        assert fresh.get_context(session_id).to_dict() == model


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=OPS)
def test_the_fold_only_read_equals_the_fold_of_events(store: EventStore, ops: list[Any]) -> None:
    session_id = f"prop-{uuid.uuid4().hex}"
    model = _run(ContextManager(store), session_id, ops)
    events = list(store.read(session_id))
    assert fold_log(store, session_id).data == model
    for version in range(1, len(events) + 1):
        assert fold_log(store, session_id, version) == fold(events[:version])


def test_the_fold_only_read_refuses_a_payload_that_is_not_json(db_url: str) -> None:
    with ContextManager(db_url, cleanup_interval=None) as manager:
        manager.create_context("s").update({"a": 1, "b": 2})
        store = manager.store
        ev = sa.table("eventctx_events", sa.column("session_id"), sa.column("version"))
        with store.engine.begin() as conn:  # bypass the no-update trigger: replace the row
            row = (
                conn.execute(
                    sa.text("SELECT * FROM eventctx_events WHERE session_id = 's' AND version = 3")
                )
                .mappings()
                .one()
            )
            conn.execute(sa.delete(ev).where(ev.c.session_id == "s", ev.c.version == 3))
            broken = dict(row) | {"payload": b"{not json"}
            broken.pop("position")
            conn.execute(sa.insert(sa.table("eventctx_events", *map(sa.column, broken))), broken)
        with pytest.raises(IntegrityError, match=r"'s': the stored payload of key 'b'"):
            fold_log(store, "s")


def _event(version: int, type_: str, key: str | None, payload: dict[str, Any]) -> RecordedEvent:
    return RecordedEvent(
        version,
        "s",
        version,
        type_,
        key,
        "p",
        "e",
        payload,
        version * 10,
        bytes([version]) * 32,
        bytes([version - 1]) * 32,  # the previous event's hash (the genesis hash for the first)
    )


@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("KeySet"), KEYS, JSON.map(lambda v: {"value": v})),
            st.tuples(st.just("KeyDeleted"), KEYS, st.just({})),
            st.tuples(st.just("ContextCleared"), st.none(), st.just({})),
        ),
        max_size=30,
    ),
    st.data(),
)
def test_fold_is_pure_and_apply_agrees(
    ops: list[tuple[str, str | None, dict[str, Any]]], data: st.DataObject
) -> None:
    events = [_event(i + 1, t, k, p) for i, (t, k, p) in enumerate(ops)]
    step = State()
    for event in events:
        before = step.copy()
        after = apply(step, event)
        assert step == before  # apply never mutates its input
        step = after
    assert step == fold(events)
    cut = data.draw(st.integers(min_value=0, max_value=len(events)))
    base = fold(events[:cut])
    snapshot = base.copy()
    assert fold(events[cut:], base) == step
    assert base == snapshot  # fold never mutates its base
    assert fold(events[cut:], decode_state(base.encode())) == step


def _document(state: State) -> bytes:
    """``state`` as snapshots held it before the provenance moved after the state's JSON:
    one JSON document."""
    return orjson.dumps(state_document(state.encode()))


def test_a_snapshot_written_as_one_document_still_restores(store: EventStore) -> None:
    with ContextManager(store, cleanup_interval=None, snapshot_every=10**6) as manager:
        ctx = manager.create_context("s")
        ctx.update({"a": 1, "b": [2]})
        ctx.delete("a")
        ctx.set("c", {"d": None})
    events = list(store.read("s"))
    at = fold(events[:3])
    assert decode_state(_document(at)) == at
    store.save_snapshot("s", 3, FOLD_VERSION, at.head_hash, _document(at))
    restored, size, tail = restore(store, "s", len(events))
    assert (size, tail) == (len(_document(at)), len(events) - 3)
    assert restored == fold(events)
    assert restored.provenance["a"].op == "delete"


def test_a_decoded_state_decodes_its_provenance_once_on_first_read() -> None:
    events = [
        _event(1, "KeySet", "a", {"value": 1}),
        _event(2, "KeySet", "b", {"value": 2}),
        _event(3, "KeyDeleted", "a", {}),
    ]
    state = fold(events)
    decoded = decode_state(state.encode())
    assert decoded._provenance is None  # a restore that only reads data never decodes it
    copy = decoded.copy()
    start = threading.Barrier(8)
    seen: list[dict[str, Any]] = []

    def read() -> None:
        start.wait()
        seen.append(decoded.provenance)

    threads = [threading.Thread(target=read) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(found is seen[0] for found in seen) and seen[0] == state.provenance
    assert decoded == state
    copy.provenance.pop("b")  # a copy made while encoded decodes its own
    assert "b" in decoded.provenance and "b" not in copy.provenance


def test_a_restore_from_a_snapshot_at_the_head_decodes_no_provenance(store: EventStore) -> None:
    with ContextManager(store, cleanup_interval=None) as manager:
        manager.create_context("s").update({"a": 1, "b": 2})
    at_head = fold(store.read("s"))
    store.save_snapshot("s", 3, FOLD_VERSION, at_head.head_hash, at_head.encode())
    with ContextManager(store, cleanup_interval=None) as manager:
        ctx = manager.get_context("s")
        assert ctx.to_dict() == {"a": 1, "b": 2}
        assert ctx._state._provenance is None
        assert ctx.info("b").version == 3
        ctx.set("a", 4)
        assert ctx._state == fold(store.read("s"))
