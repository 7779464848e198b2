"""A LangGraph checkpoint saver whose checkpoints are events of the thread's session.

A thread is a session (its id the thread id). ``put`` appends, in one transaction, a
``CheckpointSaved`` event (stored as a delta on its parent's, with LangGraph's own channels
inline), then for each node that ran since the parent a ``PhaseStarted``/``PhaseCompleted``
pair around ``KeySet`` events of the graph's channels it changed (``phase`` the node,
``execution_id`` the run), and ``KeySet`` events of the channels no node wrote. ``put_writes``
appends a ``WritesSaved`` event. A checkpoint is rebuilt from the versions its channels are at.
"""

from __future__ import annotations

import asyncio
import builtins
import os
import random
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from types import TracebackType
from typing import Any, Final

from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import (
    WRITES_IDX_MAP,
    BaseCheckpointSaver,
    ChannelVersions,
    Checkpoint,
    CheckpointMetadata,
    CheckpointTuple,
    get_checkpoint_id,
    get_checkpoint_metadata,
)
from langgraph.checkpoint.serde.base import SerializerProtocol

from eventctx.errors import (
    ConcurrencyError,
    InvalidInputError,
    SessionExistsError,
    SessionNotFoundError,
)
from eventctx.events import NewEvent, RecordedEvent, encode_payload
from eventctx.inspect import Inspector
from eventctx.integrations.langgraph import codec
from eventctx.integrations.langgraph.threads import (
    CheckpointRef,
    ThreadIndex,
    WriteRef,
    channel_key,
)
from eventctx.manager import DEFAULT_URL
from eventctx.store import EventStore
from eventctx.store.heads import check_session_id

__all__ = ["EventCtxSaver"]

_PULL: Final = "~__pregel_pull, "
"""How LangGraph's task path of a node's task starts (the node's name follows)."""
_STRATEGIES: Final = ("keep_latest", "delete")
_TRIES: Final = 50
"""How many times a write is built again after other writers moved the thread first."""
_Pick = Callable[[str, str, CheckpointRef, ThreadIndex], bool]
"""Picks checkpoints to remove: (namespace, checkpoint id, checkpoint, thread index)."""


class EventCtxSaver(BaseCheckpointSaver[str]):
    """LangGraph checkpoints, metadata and pending writes as eventctx events.

    ``store`` is an EventStore (shared, not closed here) or a URL (opened here and closed by
    :meth:`close`); None means ``$EVENTCTX_URL``, else ``sqlite:///eventctx.db``. Thread-safe;
    the async methods run the store calls in a worker thread, never on the event loop.
    """

    def __init__(
        self,
        store: EventStore | str | None = None,
        *,
        serde: SerializerProtocol | None = None,
        cached_threads: int = 256,
    ) -> None:
        super().__init__(serde=serde)
        self._owns = not isinstance(store, EventStore)
        self.store = (
            store
            if isinstance(store, EventStore)
            else EventStore.open(store or os.environ.get("EVENTCTX_URL") or DEFAULT_URL)
        )
        self._threads: OrderedDict[str, ThreadIndex] = OrderedDict()
        self._threads_lock = threading.Lock()
        self._cached_threads = cached_threads

    # --- lifecycle -----------------------------------------------------------------------------

    def close(self) -> None:
        """Close the store if this saver opened it."""
        if self._owns:
            self.store.close()

    def __enter__(self) -> EventCtxSaver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> EventCtxSaver:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.close)

    # --- writing -------------------------------------------------------------------------------

    def put(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        """Save a checkpoint with the values of the channels in ``new_versions``."""
        thread_id, ns, parent_id = _address(config)
        meta = get_checkpoint_metadata(config, metadata)
        values = checkpoint["channel_values"]
        channels: dict[str, builtins.list[Any]] = {}
        stored: dict[str, Any] = {}
        for channel in sorted(new_versions):
            channels[channel] = [new_versions[channel], codec.EMPTY]
            if channel in values:
                kind, value = codec.encode(self.serde, values[channel])
                channels[channel][1:] = [kind, value] if codec.bookkeeping(channel) else [kind]
                if not codec.bookkeeping(channel):
                    stored[channel] = value
        fields = {k: v for k, v in checkpoint.items() if k not in ("channel_values", "id")}
        metadata_kind, metadata_value = codec.encode(self.serde, meta)

        def build(index: ThreadIndex) -> builtins.list[NewEvent]:
            execution_id = _lineage(index, ns, parent_id, checkpoint["id"], meta)
            parent = index.checkpoints.get(ns, {}).get(parent_id) if parent_id else None
            kind, value = codec.encode(self.serde, fields)
            delta = None
            if parent is not None and kind == codec.JSON:
                delta = _from_parent(value, parent, new_versions)
            saved = {
                "checkpoint_id": checkpoint["id"],
                "ns": ns,
                "parent_id": parent_id,
                "checkpoint": [kind, value if delta is None else delta],
                "metadata": [metadata_kind, metadata_value],
                "channels": channels,
                "delta": delta is not None,
            }
            events = []
            if execution_id not in index.runs:
                events.append(
                    NewEvent.create(
                        "RunStarted", {"input": None, "phases": []}, execution_id=execution_id
                    )
                )
            events.append(_event("CheckpointSaved", saved, None, None, execution_id))
            named: set[str] = set()
            seen = checkpoint.get("versions_seen") or {}
            for run in index.node_runs(ns, parent_id, seen, stored, self.store.clock()):
                phase = partial(NewEvent.create, phase=run.node, execution_id=execution_id)
                events.append(phase("PhaseStarted", {"attempt": 1}))
                events.extend(
                    _key_set(ns, c, stored[c], run.node, execution_id) for c in run.channels
                )
                named.update(run.channels)
                duration_ms = max(0, run.ended_us - run.started_us) / 1000
                events.append(
                    phase(
                        "PhaseCompleted",
                        {"output": None, "duration_ms": duration_ms, "attempt": 1, "keys_read": []},
                    )
                )
            events.extend(
                _key_set(ns, c, stored[c], None, execution_id) for c in stored if c not in named
            )
            return events

        self._write(thread_id, build)
        return {
            "configurable": {
                "thread_id": config["configurable"]["thread_id"],
                "checkpoint_ns": ns,
                "checkpoint_id": checkpoint["id"],
            }
        }

    def put_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str = "",
    ) -> None:
        """Save a task's writes against a checkpoint; a regular write already saved for the
        same task and index is kept, a special one (error, interrupt, …) replaced."""
        thread_id, ns, checkpoint_id = _address(config)
        if checkpoint_id is None:
            raise InvalidInputError("put_writes needs a config with a checkpoint_id")
        node = task_path[len(_PULL) :] if task_path.startswith(_PULL) else None
        encoded = [
            (channel, WRITES_IDX_MAP.get(channel, i), *codec.encode(self.serde, value))
            for i, (channel, value) in enumerate(writes)
        ]

        def build(index: ThreadIndex) -> builtins.list[NewEvent]:
            found = index.writes.get((ns, checkpoint_id), {})
            rows = [list(row) for row in encoded if row[1] < 0 or (task_id, row[1]) not in found]
            if not rows:
                return []
            ref = index.checkpoints.get(ns, {}).get(checkpoint_id)
            payload = {
                "checkpoint_id": checkpoint_id,
                "ns": ns,
                "task_id": task_id,
                "task_path": task_path,
                "writes": rows,
            }
            execution_id = None if ref is None else ref.execution_id
            return [_event("WritesSaved", payload, None, node, execution_id)]

        self._write(thread_id, build)

    def _write(
        self,
        thread_id: str,
        build: Callable[[ThreadIndex], builtins.list[NewEvent]],
        *,
        fresh: bool = False,
    ) -> None:
        """Append the events ``build`` makes from the thread's index, on condition that the
        thread is still what the index folded (creating its session when it has none); when
        another writer got there first, fold what it wrote and build again. ``fresh`` reads
        the log first even when the index has folded the thread before (for a build that
        may find nothing to do)."""
        with self._thread(thread_id, fresh=fresh) as index:
            for _ in range(_TRIES):
                events = build(index)
                if not events:
                    return
                if not index.live:
                    events = [NewEvent.create("ContextCreated", {"ttl_ms": None}), *events]
                expected = index.version if index.live else None
                try:
                    recorded = self.store.append(thread_id, events, expected_version=expected)
                except (ConcurrencyError, SessionExistsError, SessionNotFoundError):
                    index.refresh(self.store)
                    continue
                if index.follows(recorded):
                    index.advance(recorded)
                else:
                    index.refresh(self.store)
                return
        raise ConcurrencyError(
            f"thread {thread_id!r} changed under each of {_TRIES} tries to write to it; "
            "nothing was written: try again"
        )

    # --- reading -------------------------------------------------------------------------------

    def get_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        """The checkpoint ``config`` names, or the thread's latest in its namespace."""
        thread_id, ns, checkpoint_id = _address(config)
        with self._thread(thread_id) as index:
            saved = index.checkpoints.get(ns, {})
            if checkpoint_id is None:
                checkpoint_id = max(saved, default=None)
            ref = saved.get(checkpoint_id) if checkpoint_id is not None else None
            if ref is None or checkpoint_id is None:
                return None
            plans = [self._plan(index, ns, checkpoint_id, ref)]
        found = self._tuples(config["configurable"]["thread_id"], thread_id, plans)
        return found[0] if found else None

    def list(
        self,
        config: RunnableConfig | None,
        *,
        filter: dict[str, Any] | None = None,
        before: RunnableConfig | None = None,
        limit: int | None = None,
    ) -> Iterator[CheckpointTuple]:
        """Checkpoints newest first: of ``config``'s thread (and namespace and checkpoint id,
        when given) or of every thread, whose metadata holds ``filter``, before ``before``'s
        checkpoint id, at most ``limit``."""
        if config is None:
            threads: builtins.list[Any] = sorted(
                {e.session_id for e in self.store.find(types={"CheckpointSaved"})}
            )
            conf: dict[str, Any] = {}
        else:
            _address(config)  # InvalidInputError for a config without a valid thread id
            conf = dict(config["configurable"])
            threads = [conf["thread_id"]]
        before_id = get_checkpoint_id(before) if before else None
        wanted_id = conf.get("checkpoint_id")
        left = limit
        for thread in threads:
            if left is not None and left <= 0:
                return
            thread_id = _thread_id(thread)
            with self._thread(thread_id) as index:
                plans: builtins.list[_Plan] = []
                found = sorted(
                    (
                        (checkpoint_id, ns, ref)
                        for ns, saved in index.checkpoints.items()
                        if "checkpoint_ns" not in conf or conf["checkpoint_ns"] == ns
                        for checkpoint_id, ref in saved.items()
                    ),
                    key=lambda item: item[0],
                    reverse=True,
                )
                for checkpoint_id, ns, ref in found:
                    if left is not None and len(plans) >= left:
                        break
                    if wanted_id and checkpoint_id != wanted_id:
                        continue
                    if before_id and checkpoint_id >= before_id:
                        continue
                    if filter and any(ref.metadata.get(k) != v for k, v in filter.items()):
                        continue
                    plans.append(self._plan(index, ns, checkpoint_id, ref))
            if left is not None:
                left -= len(plans)
            yield from self._tuples(thread, thread_id, plans)

    def _plan(self, index: ThreadIndex, ns: str, checkpoint_id: str, ref: CheckpointRef) -> _Plan:
        """What to read to rebuild a checkpoint, taken while the index is locked."""
        blobs = {
            channel: index.blobs[(ns, channel, version)]
            for channel, version in ref.channel_versions.items()
            if (ns, channel, version) in index.blobs
        }
        return _Plan(ns, checkpoint_id, ref, blobs, index.pending(ns, checkpoint_id))

    def _tuples(
        self, thread: Any, thread_id: str, plans: builtins.list[_Plan]
    ) -> builtins.list[CheckpointTuple]:
        """Read what ``plans`` need in one go and rebuild their checkpoint tuples."""
        versions = {v for plan in plans for v in plan.versions()}
        events = {e.version: e for e in self.store.read_versions(thread_id, versions)}
        return [t for plan in plans if (t := self._tuple(thread, plan, events)) is not None]

    def _tuple(
        self, thread: Any, plan: _Plan, events: dict[int, RecordedEvent]
    ) -> CheckpointTuple | None:
        saved = events.get(plan.ref.version)
        if saved is None:  # removed meanwhile
            return None
        decode = partial(codec.decode, self.serde)
        checkpoint = decode(*saved.payload["checkpoint"])
        checkpoint["id"] = plan.checkpoint_id
        checkpoint["channel_versions"] = dict(plan.ref.channel_versions)
        checkpoint["versions_seen"] = {n: dict(v) for n, v in plan.ref.versions_seen.items()}
        checkpoint["channel_values"] = {
            channel: decode(kind, _blob(events[version].payload, channel, inline))
            for channel, (version, kind, inline) in plan.blobs.items()
            if kind != codec.EMPTY and version in events
        }
        pending = [
            (w.task_id, w.channel, decode(*events[w.version].payload["writes"][w.slot][2:]))
            for w in plan.writes
            if w.version in events
        ]

        def address(checkpoint_id: str) -> RunnableConfig:
            return {
                "configurable": {
                    "thread_id": thread,
                    "checkpoint_ns": plan.ns,
                    "checkpoint_id": checkpoint_id,
                }
            }

        return CheckpointTuple(
            config=address(plan.checkpoint_id),
            checkpoint=checkpoint,
            metadata=decode(*saved.payload["metadata"]),
            parent_config=address(plan.ref.parent_id) if plan.ref.parent_id else None,
            pending_writes=pending,
        )

    # --- removing and copying ------------------------------------------------------------------

    def delete_thread(self, thread_id: str) -> None:
        """Remove the thread's session and every event of it (nothing if there is none)."""
        session_id = _thread_id(thread_id)
        with self._thread(session_id) as index:
            if self.store.session(session_id) is not None:
                self.store.purge(session_id)
            index.reset()

    def delete_for_runs(self, run_ids: Sequence[str]) -> None:
        """Remove the checkpoints (and their pending writes) of runs ``run_ids`` from every
        thread: a ``CheckpointsRemoved`` event, the history stays in the log."""
        runs = {str(r) for r in run_ids}
        threads = {
            e.session_id
            for run_id in sorted(runs)
            for e in self.store.find(types={"CheckpointSaved"}, execution_id=run_id)
        }
        for thread_id in sorted(threads):
            self._remove(
                thread_id,
                lambda ns, checkpoint_id, ref, index: _run_of(ref) in runs,
            )

    def prune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        """``keep_latest``: remove every checkpoint but each namespace's latest (a
        ``CheckpointsRemoved`` event); ``delete``: remove the threads as delete_thread does."""
        if strategy not in _STRATEGIES:
            raise InvalidInputError(
                f"unknown prune strategy {strategy!r}: use one of {', '.join(_STRATEGIES)}"
            )
        for thread in thread_ids:
            if strategy == "delete":
                self.delete_thread(thread)
                continue
            self._remove(
                _thread_id(thread),
                lambda ns, checkpoint_id, ref, index: checkpoint_id != max(index.checkpoints[ns]),
            )

    def _remove(self, thread_id: str, doomed: _Pick) -> None:
        """Append a CheckpointsRemoved for the checkpoints ``doomed(ns, id, ref, index)``
        picks, if any."""

        def build(index: ThreadIndex) -> builtins.list[NewEvent]:
            picked = [
                [ns, checkpoint_id]
                for ns, saved in index.checkpoints.items()
                for checkpoint_id, ref in saved.items()
                if doomed(ns, checkpoint_id, ref, index)
            ]
            if not picked:
                return []
            return [NewEvent.create("CheckpointsRemoved", {"checkpoints": picked})]

        self._write(thread_id, build, fresh=True)

    def copy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        """Copy a thread's whole history into a new thread: ``Inspector.fork`` of its session
        (re-chained; SessionExistsError if the target exists, SessionNotFoundError if the source
        does not)."""
        source, target = _thread_id(source_thread_id), _thread_id(target_thread_id)
        with self._thread(target) as index, Inspector(self.store) as insp:
            insp.fork(source, target)
            index.refresh(self.store)

    def get_next_version(self, current: str | None, channel: None) -> str:
        """A version above ``current`` that no other branch of the thread will reuse (a run
        resumed from an earlier checkpoint counts up from its versions again): the count,
        zero-padded so that versions compare as text, and 32 random bits."""
        number = 0 if current is None else int(str(current).split(".")[0])
        return f"{number + 1:010}.{random.getrandbits(32):08x}"

    # --- async: the same calls in a worker thread ----------------------------------------------

    async def aget_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        """:meth:`get_tuple` off the event loop."""
        return await asyncio.to_thread(self.get_tuple, config)

    async def alist(
        self,
        config: RunnableConfig | None,
        *,
        filter: dict[str, Any] | None = None,
        before: RunnableConfig | None = None,
        limit: int | None = None,
    ) -> AsyncIterator[CheckpointTuple]:
        """:meth:`list` off the event loop."""

        def listed() -> builtins.list[CheckpointTuple]:
            return list(self.list(config, filter=filter, before=before, limit=limit))

        for item in await asyncio.to_thread(listed):
            yield item

    async def aput(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        """:meth:`put` off the event loop."""
        return await asyncio.to_thread(self.put, config, checkpoint, metadata, new_versions)

    async def aput_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str = "",
    ) -> None:
        """:meth:`put_writes` off the event loop."""
        await asyncio.to_thread(self.put_writes, config, writes, task_id, task_path)

    async def adelete_thread(self, thread_id: str) -> None:
        """:meth:`delete_thread` off the event loop."""
        await asyncio.to_thread(self.delete_thread, thread_id)

    async def adelete_for_runs(self, run_ids: Sequence[str]) -> None:
        """:meth:`delete_for_runs` off the event loop."""
        await asyncio.to_thread(self.delete_for_runs, run_ids)

    async def acopy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        """:meth:`copy_thread` off the event loop."""
        await asyncio.to_thread(self.copy_thread, source_thread_id, target_thread_id)

    async def aprune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        """:meth:`prune` off the event loop."""
        await asyncio.to_thread(partial(self.prune, thread_ids, strategy=strategy))

    # --- the thread indexes --------------------------------------------------------------------

    @contextmanager
    def _thread(self, thread_id: str, *, fresh: bool = True) -> Iterator[ThreadIndex]:
        """The thread's index, locked and brought up to date with the log (unless not
        ``fresh`` and the index has folded the thread before: a conditional write checks)."""
        with self._threads_lock:
            index = self._threads.get(thread_id)
            if index is None:
                index = ThreadIndex(thread_id, partial(codec.decode, self.serde))
                self._threads[thread_id] = index
                if len(self._threads) > self._cached_threads:
                    self._threads.popitem(last=False)
            self._threads.move_to_end(thread_id)
        with index.lock:
            if fresh or not index.version:
                index.refresh(self.store)
            yield index


@dataclass(frozen=True, slots=True)
class _Plan:
    """The events a checkpoint tuple is rebuilt from, taken while the thread's index is
    locked: its CheckpointSaved (``ref``), its channels' values and its pending writes."""

    ns: str
    checkpoint_id: str
    ref: CheckpointRef
    blobs: dict[str, tuple[int, str, bool]]
    writes: builtins.list[WriteRef]

    def versions(self) -> Iterator[int]:
        """The versions of the events to read."""
        yield self.ref.version
        yield from (version for version, _, _ in self.blobs.values())
        yield from (w.version for w in self.writes)


def _run_of(ref: CheckpointRef) -> str | None:
    """The run id in a checkpoint's metadata, as a str."""
    run_id = ref.metadata.get("run_id")
    return None if run_id is None else str(run_id)


def _thread_id(thread: Any) -> str:
    """The session id of a LangGraph thread id (InvalidInputError if it cannot be one)."""
    return check_session_id(str(thread) if isinstance(thread, int | str) else thread)


def _lineage(
    index: ThreadIndex, ns: str, parent_id: str | None, checkpoint_id: str, meta: Mapping[str, Any]
) -> str:
    """The execution id of a checkpoint's events: the run id in its metadata; else its
    parent's (a run interrupted and resumed, perhaps in another process, stays one execution);
    else, for a new input or a first checkpoint, its own id."""
    if meta.get("run_id") is not None:
        return str(meta["run_id"])
    parent = index.checkpoints.get(ns, {}).get(parent_id) if parent_id else None
    if parent is None or meta.get("source") == "input":
        return checkpoint_id
    return parent.execution_id


def _event(
    type_: str,
    payload: dict[str, Any],
    key: str | None,
    phase: str | None,
    execution_id: str | None,
) -> NewEvent:
    """An event of a payload the codec made: plain JSON already (``is_plain``), so it is
    encoded once and not checked or copied again (it may share values with the caller's)."""
    return NewEvent(type_, payload, encode_payload(payload), key, phase, execution_id)


def _blob(payload: dict[str, Any], channel: str, inline: bool) -> Any:
    """A channel's stored value: in its KeySet, or (``inline``) in the CheckpointSaved."""
    return payload["channels"][channel][2] if inline else payload["value"]


def _key_set(ns: str, channel: str, value: Any, node: str | None, execution_id: str) -> NewEvent:
    """The event holding a channel's new value (already encoded)."""
    return _event("KeySet", {"value": value}, channel_key(ns, channel), node, execution_id)


def _from_parent(
    fields: dict[str, Any], parent: CheckpointRef, new: ChannelVersions
) -> dict[str, Any] | None:
    """A checkpoint's fields stored as a delta on its parent's: ``channel_versions`` left out
    when it is the parent's with ``new`` on top, and only the ``versions_seen`` entries that
    moved; None when a node the parent saw is gone (then they are stored whole)."""
    seen = fields.get("versions_seen")
    if not isinstance(seen, dict) or not set(parent.versions_seen) <= set(seen):
        return None
    delta = dict(fields)
    if delta.get("channel_versions") == {**parent.channel_versions, **new}:
        del delta["channel_versions"]
    delta["versions_seen"] = {
        node: versions
        for node, versions in seen.items()
        if parent.versions_seen.get(node) != versions
    }
    return delta


def _address(config: RunnableConfig) -> tuple[str, str, str | None]:
    """(session id, namespace, checkpoint id) of a config."""
    conf = config.get("configurable") or {}
    if conf.get("thread_id") is None:
        raise InvalidInputError("a LangGraph config needs configurable.thread_id")
    return _thread_id(conf["thread_id"]), conf.get("checkpoint_ns") or "", conf.get("checkpoint_id")
