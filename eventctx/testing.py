"""Test helpers shipped with eventctx: the conformance suite of the read interface.

Another implementation of :class:`eventctx.store.log.EventLog` shows it behaves like eventctx's
own by subclassing :class:`EventLogConformance` in a pytest module and supplying one fixture,
``event_log``: an object with the EventLog methods and ``EventStore.append`` (the suite writes
through it). Every test uses fresh session ids.

    class TestMyStore(EventLogConformance):
        @pytest.fixture
        def event_log(self) -> Iterator[MyStore]:
            with MyStore.open(...) as store:
                yield store
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from itertools import pairwise
from typing import Any, Protocol

import pytest

from eventctx.errors import SessionNotFoundError
from eventctx.events import GENESIS_HASH, NewEvent, RecordedEvent
from eventctx.state import FOLD_VERSION, fold
from eventctx.store.log import EventLog

__all__ = ["AppendableLog", "EventLogConformance"]


class AppendableLog(EventLog, Protocol):
    """What the suite needs: the read interface, and a way to write events."""

    def append(
        self, session_id: str, events: Sequence[NewEvent], **options: Any
    ) -> list[RecordedEvent]: ...

    def save_snapshot(
        self, session_id: str, version: int, fold_version: int, head_hash: bytes, state: bytes
    ) -> None: ...


def _session() -> str:
    return f"conformance-{uuid.uuid4().hex[:12]}"


def _created() -> NewEvent:
    return NewEvent.create("ContextCreated", {"ttl_ms": None})


def _set(key: str, value: object) -> NewEvent:
    return NewEvent.create("KeySet", {"value": value}, key=key, phase="p", execution_id="e")


class EventLogConformance:
    """Behaviours every EventLog must have; subclass it and provide ``event_log``."""

    def test_read_returns_what_was_appended_in_version_order(
        self, event_log: AppendableLog
    ) -> None:
        sid = _session()
        written = event_log.append(sid, [_created(), *(_set(f"k{i}", i) for i in range(5))])
        read = list(event_log.read(sid))
        assert read == written
        assert [e.version for e in read] == list(range(1, 7))
        assert read[3].phase == "p" and read[3].execution_id == "e"
        assert read[3].payload == {"value": 2}

    def test_read_honours_its_version_range(self, event_log: AppendableLog) -> None:
        sid = _session()
        event_log.append(sid, [_created(), *(_set(f"k{i}", i) for i in range(9))])
        assert [e.version for e in event_log.read(sid, 3, 5)] == [3, 4, 5]
        assert [e.version for e in event_log.read(sid, 9)] == [9, 10]
        assert list(event_log.read(sid, 11)) == []
        with pytest.raises(SessionNotFoundError):  # an unknown session is an error
            list(event_log.read(_session()))

    def test_events_chain_and_fold(self, event_log: AppendableLog) -> None:
        sid = _session()
        event_log.append(sid, [_created(), _set("a", 1)])
        event_log.append(sid, [_set("b", 2), _set("a", 3)])
        events = list(event_log.read(sid))
        assert events[0].prev_hash == GENESIS_HASH
        assert all(e.prev_hash == p.hash for p, e in pairwise(events))
        state = fold(events)
        head = event_log.session(sid)
        assert head is not None and head.live
        assert (head.version, head.head_hash) == (state.version, state.head_hash)
        assert state.data == {"a": 3, "b": 2}

    def test_sessions_lists_every_head(self, event_log: AppendableLog) -> None:
        ids = sorted(_session() for _ in range(3))
        for sid in ids:
            event_log.append(sid, [_created()])
        listed = [h.session_id for h in event_log.sessions()]
        assert [sid for sid in listed if sid in ids] == ids
        assert event_log.session(_session()) is None

    def test_read_after_follows_the_global_log(self, event_log: AppendableLog) -> None:
        start = max((e.position for e in event_log.read_after(0, 1_000_000)), default=0)
        a, b = _session(), _session()
        first = event_log.append(a, [_created(), _set("x", 1)])
        second = event_log.append(b, [_created()])
        third = event_log.append(a, [_set("y", 2)])
        expected = [*first, *second, *third]
        followed: list[RecordedEvent] = []
        last = start
        while page := event_log.read_after(last, 2):  # small pages: paging must not skip
            assert len(page) <= 2
            followed.extend(page)
            last = page[-1].position
        assert followed == expected
        assert [e.position for e in followed] == sorted(e.position for e in followed)

    def test_read_versions_are_point_reads(self, event_log: AppendableLog) -> None:
        sid = _session()
        written = event_log.append(sid, [_created(), *(_set(f"k{i}", i) for i in range(5))])
        assert event_log.read_versions(sid, [5, 2, 2, 99]) == [written[1], written[4]]
        assert event_log.read_versions(sid, []) == []

    def test_find_applies_every_filter(self, event_log: AppendableLog) -> None:
        sid, other = _session(), _session()
        event_log.append(sid, [_created(), _set("a", 1), _set("b", 2)])
        event_log.append(other, [_created(), _set("a", 3)])
        outside = NewEvent.create("KeySet", {"value": 4}, key="a")
        last = event_log.append(sid, [outside, NewEvent.create("KeyDeleted", key="b")])
        assert [e.version for e in event_log.find(sid, key="a")] == [2, 4]
        assert [e.version for e in event_log.find(sid, types={"KeyDeleted"})] == [5]
        assert [e.version for e in event_log.find(sid, phase="p", key="a")] == [2]
        assert [e.version for e in event_log.find(sid, execution_id="e")] == [2, 3]
        assert [e.version for e in event_log.find(sid, from_version=3, to_version=4)] == [3, 4]
        at = last[0].recorded_at_us
        assert [e.version for e in event_log.find(sid, since_us=at)] == [4, 5]
        assert [e.version for e in event_log.find(sid, until_us=at - 1)] == [1, 2, 3]
        across = [e for e in event_log.find(key="a") if e.session_id in (sid, other)]
        assert [(e.session_id, e.version) for e in across] == [(sid, 2), (other, 2), (sid, 4)]

    def test_latest_snapshot_respects_version_fold_and_chain(
        self, event_log: AppendableLog
    ) -> None:
        sid = _session()
        events = event_log.append(sid, [_created(), *(_set(f"k{i}", i) for i in range(4))])
        for version in (2, 4):
            state = fold(events[:version])
            event_log.save_snapshot(sid, version, FOLD_VERSION, state.head_hash, state.encode())
        newest = event_log.latest_snapshot(sid, FOLD_VERSION)
        assert newest is not None and newest[0] == 4 and newest[1] == events[3].hash
        below = event_log.latest_snapshot(sid, FOLD_VERSION, 3)
        assert below is not None and below[0] == 2
        assert event_log.latest_snapshot(sid, FOLD_VERSION, 1) is None
        assert event_log.latest_snapshot(sid, FOLD_VERSION + 1) is None
        elsewhere = fold(events[:3])  # a snapshot whose hash is not the log's at its version
        event_log.save_snapshot(sid, 5, FOLD_VERSION, elsewhere.head_hash, elsewhere.encode())
        newest = event_log.latest_snapshot(sid, FOLD_VERSION)
        assert newest is not None and newest[0] == 4
        # A snapshot above the log's head (of a longer history, purged since): no event there.
        event_log.save_snapshot(sid, 9, FOLD_VERSION, events[3].hash, state.encode())
        newest = event_log.latest_snapshot(sid, FOLD_VERSION)
        assert newest is not None and newest[0] == 4

    def test_a_whole_log_has_no_retention_base(self, event_log: AppendableLog) -> None:
        sid = _session()
        event_log.append(sid, [_created(), _set("a", 1)])
        assert event_log.base(sid) is None
