"""What a LangGraph thread's events say: its checkpoints, where each channel value and pending
write is stored, and which runs it has seen. A pure fold, kept up to date from the log."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from langgraph.checkpoint.base import writes_sort_key
from langgraph.checkpoint.serde.types import INTERRUPT

from eventctx.events import GENESIS_HASH, RecordedEvent
from eventctx.store import EventStore

__all__ = ["CheckpointRef", "NodeRun", "ThreadIndex", "WriteRef", "channel_key"]

Decoder = Callable[[str, Any], Any]
"""``(kind, stored) -> value``: the codec's ``decode`` bound to a serializer."""


def channel_key(ns: str, channel: str) -> str:
    """The context key of ``channel`` in namespace ``ns``: the channel name at the root."""
    return f"{ns}/{channel}" if ns else channel


@dataclass(slots=True)
class CheckpointRef:
    """A stored checkpoint: the version of its CheckpointSaved event and what lists need."""

    version: int
    parent_id: str | None
    execution_id: str
    metadata: dict[str, Any]
    channel_versions: dict[str, Any]
    versions_seen: dict[str, Any]
    saved_us: int


@dataclass(slots=True)
class WriteRef:
    """A pending write: the WritesSaved event (``version``) and its place (``slot``) in it."""

    task_id: str
    task_path: str
    channel: str
    idx: int
    version: int
    slot: int
    node: str | None
    written_us: int

    def sort_key(self) -> tuple[str, str, int]:
        """The order LangGraph applies a super-step's writes in."""
        return writes_sort_key(self.task_path, self.task_id, self.idx)


@dataclass(slots=True)
class NodeRun:
    """A node's task that wrote against a checkpoint: when it started and last wrote, and
    the channels whose new values it is named for."""

    node: str
    started_us: int
    ended_us: int
    channels: list[str] = field(default_factory=list)


@dataclass(slots=True)
class ThreadIndex:
    """The fold of one thread's events (up to ``version``, whose hash is ``head_hash``)."""

    thread_id: str
    decode: Decoder
    version: int = 0
    head_hash: bytes = GENESIS_HASH
    live: bool = False
    checkpoints: dict[str, dict[str, CheckpointRef]] = field(default_factory=dict)
    blobs: dict[tuple[str, str, Any], tuple[int, str, bool]] = field(default_factory=dict)
    """(ns, channel, version) -> (version of the event holding it, kind, whether inline: in
    the CheckpointSaved rather than a KeySet)."""
    writes: dict[tuple[str, str], dict[tuple[str, int], WriteRef]] = field(default_factory=dict)
    runs: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)
    _saved: tuple[str, dict[str, list[Any]]] | None = None

    def reset(self) -> None:
        """Forget everything: the thread starts again (or never existed)."""
        self.version, self.head_hash, self.live = 0, GENESIS_HASH, False
        self._clear()

    def _clear(self) -> None:
        self.checkpoints.clear()
        self.blobs.clear()
        self.writes.clear()
        self.runs.clear()
        self._saved = None

    def refresh(self, store: EventStore) -> None:
        """Fold whatever the log holds beyond what this index has seen (one head read when
        nothing is new); a history that is not the one folded so far is folded afresh."""
        head = store.session(self.thread_id)
        if head is None:
            self.reset()
            return
        if head.version == self.version and head.head_hash == self.head_hash:
            return
        if self.version and head.version > self.version:
            events = list(store.read(self.thread_id, self.version + 1))
            if events and events[0].prev_hash == self.head_hash:
                self.advance(events)
                return
        self.reset()
        self.advance(store.read(self.thread_id))

    def follows(self, events: list[RecordedEvent]) -> bool:
        """Whether ``events`` (just appended) continue exactly what this index has folded."""
        return (
            bool(events)
            and events[0].prev_hash == self.head_hash
            and (events[0].version == self.version + 1)
        )

    def advance(self, events: Iterable[RecordedEvent]) -> None:
        """Fold ``events``, which follow the index's version."""
        for event in events:
            kind = event.type
            if kind == "KeySet":
                self._key_set(event)
            elif kind == "CheckpointSaved":
                self._checkpoint_saved(event)
            elif kind == "WritesSaved":
                self._writes_saved(event)
            elif kind == "CheckpointsRemoved":
                for ns, checkpoint_id in event.payload["checkpoints"]:
                    self.checkpoints.get(ns, {}).pop(checkpoint_id, None)
                    self.writes.pop((ns, checkpoint_id), None)
            elif kind in ("ContextCreated", "ContextDeleted"):
                self._clear()
                self.live = kind == "ContextCreated"
            elif kind == "RunStarted" and event.execution_id:
                self.runs.add(event.execution_id)
            self.version, self.head_hash = event.version, event.hash

    def _checkpoint_saved(self, event: RecordedEvent) -> None:
        p = event.payload
        ns, checkpoint = p["ns"], self.decode(*p["checkpoint"])
        channel_versions = checkpoint.get("channel_versions")
        versions_seen = checkpoint.get("versions_seen") or {}
        parent = self.checkpoints.get(ns, {}).get(p["parent_id"]) if p.get("delta") else None
        if parent is not None:  # stored as a delta on the parent's
            if channel_versions is None:
                new = {channel: saved[0] for channel, saved in p["channels"].items()}
                channel_versions = {**parent.channel_versions, **new}
            versions_seen = {**parent.versions_seen, **versions_seen}
        self.checkpoints.setdefault(ns, {})[p["checkpoint_id"]] = CheckpointRef(
            event.version,
            p["parent_id"],
            event.execution_id or p["checkpoint_id"],
            self.decode(*p["metadata"]),
            dict(channel_versions or {}),
            versions_seen,
            event.recorded_at_us,
        )
        for channel, saved in p["channels"].items():
            if len(saved) == 3:  # a bookkeeping channel's value, inline
                self.blobs[(ns, channel, saved[0])] = (event.version, saved[1], True)
        if event.execution_id:
            self.runs.add(event.execution_id)
        self._saved = (ns, p["channels"])

    def _key_set(self, event: RecordedEvent) -> None:
        """A channel value saved with the checkpoint just folded (other KeySets are not ours)."""
        if self._saved is None or event.key is None:
            return
        ns, channels = self._saved
        prefix = f"{ns}/" if ns else ""
        if not event.key.startswith(prefix):
            return
        saved = channels.get(event.key[len(prefix) :])
        if saved is not None:
            version, kind = saved
            self.blobs[(ns, event.key[len(prefix) :], version)] = (event.version, kind, False)

    def _writes_saved(self, event: RecordedEvent) -> None:
        p = event.payload
        found = self.writes.setdefault((p["ns"], p["checkpoint_id"]), {})
        for slot, (channel, idx, _, _) in enumerate(p["writes"]):
            if idx >= 0 and (p["task_id"], idx) in found:
                continue  # a regular write is saved once; special ones are replaced
            found[(p["task_id"], idx)] = WriteRef(
                p["task_id"],
                p["task_path"],
                channel,
                idx,
                event.version,
                slot,
                event.phase,
                event.recorded_at_us,
            )
        self._saved = None

    def pending(self, ns: str, checkpoint_id: str) -> list[WriteRef]:
        """The pending writes of a checkpoint, in LangGraph's order."""
        return sorted(self.writes.get((ns, checkpoint_id), {}).values(), key=WriteRef.sort_key)

    def node_runs(
        self,
        ns: str,
        parent_id: str | None,
        versions_seen: dict[str, Any],
        changed: Iterable[str],
        now_us: int,
    ) -> list[NodeRun]:
        """The nodes that ran between checkpoint ``parent_id`` and the next one (whose
        ``versions_seen`` is given): those whose seen versions moved (LangGraph's interrupt
        bookkeeping is no node). A node starts when the
        parent was saved or at the last write from outside the nodes (a resume), and ends at
        its last write (``now_us`` if its writes have not arrived: LangGraph saves them in the
        background). Each ``changed`` channel is named for the last node, in LangGraph's
        order, whose writes hold it, or for the only node that ran."""
        parent = self.checkpoints.get(ns, {}).get(parent_id) if parent_id else None
        if parent is None or parent_id is None:
            return []
        ran = [
            node
            for node, seen in versions_seen.items()
            if node != INTERRUPT and parent.versions_seen.get(node) != seen
        ]
        refs = self.writes.get((ns, parent_id), {}).values()
        runs = {node: NodeRun(node, parent.saved_us, now_us) for node in ran}
        outside = parent.saved_us  # the last time something outside the nodes wrote
        written: set[str] = set()
        for ref in sorted(refs, key=lambda r: (r.version, r.slot)):
            if ref.node is None:
                outside = max(outside, ref.written_us)
            elif ref.node in runs:
                run = runs[ref.node]
                if ref.node not in written:
                    run.started_us = outside
                    written.add(ref.node)
                run.ended_us = ref.written_us
        for node in runs.keys() - written:
            runs[node].started_us = outside
        owners = {r.channel: r.node for r in sorted(refs, key=WriteRef.sort_key) if r.node in runs}
        for channel in changed:
            owner = owners.get(channel) or (ran[0] if len(ran) == 1 else None)
            if owner is not None:
                runs[owner].channels.append(channel)
        return list(runs.values())
