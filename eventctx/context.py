"""PluginContext: one session's key-value context, read from memory, every write appended.

Writes are blind (appended at the session's head, last writer wins) unless an
``expected_version`` makes them conditional. Each is committed before it returns. Reads come
from the folded state in memory, so they never touch the database and never go backwards;
another process's writes show up on this object's next write, on ``refresh()`` or when the
manager hands it out again.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, suppress
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Final, TypeVar

import orjson
from pydantic import BaseModel, ValidationError

from eventctx.clock import check_count, check_duration
from eventctx.counters import Counters
from eventctx.errors import (
    ContextKeyError,
    ContextTypeError,
    EventCtxError,
    IntegrityError,
    InvalidInputError,
    SessionExpiredError,
    SessionNotFoundError,
)
from eventctx.events import NewEvent, RecordedEvent, from_us
from eventctx.snapshots import SnapshotPolicy, restore
from eventctx.state import RunState, State, advance
from eventctx.store import EventStore, Fence, Head, SessionHead
from eventctx.store.commit import Inbox
from eventctx.store.heads import check_text, expired_at

__all__ = [
    "KeyInfo",
    "Limits",
    "PhaseScope",
    "PluginContext",
    "Runtime",
    "SessionWriter",
    "current_context",
    "use_context",
]

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")
_MISSING: Final = object()


class _Same:
    def __repr__(self) -> str:
        return "<this session's ttl>"


_SAME: Final = _Same()
_SIZE_LIMITED: Final = frozenset(
    {"KeySet", "MetadataSet", "RunStarted", "RunResumed", "PhaseCompleted"}
)
"""Events that carry a caller's value (``max_value_bytes`` applies); the runner's own
records of failures do not."""
_CONTAINERS: Final = (dict, list)


@dataclass(frozen=True, slots=True)
class Limits:
    """Size limits on what a context accepts."""

    max_key_length: int = 1024
    max_value_bytes: int = 16 * 1024 * 1024


class Gate:
    """Lets operations run until closed; closing waits for those in flight to finish.

    ``with gate:`` is one operation (a plain context manager: it is on every write's path).
    """

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._cond = threading.Condition(self._mutex)
        self._inflight = 0
        self.closed = False

    def check(self) -> None:
        """Raise if closed."""
        if self.closed:
            raise EventCtxError("manager stopped: start a new ContextManager to continue")

    def __enter__(self) -> None:
        with self._mutex:
            self.check()
            self._inflight += 1

    def __exit__(self, *exc: object) -> None:
        with self._mutex:
            self._inflight -= 1
            if self.closed and not self._inflight:  # only ``close`` waits for none in flight
                self._cond.notify_all()

    def close(self) -> None:
        """Refuse new operations and wait for those in flight."""
        with self._cond:
            self.closed = True
            self._cond.wait_for(lambda: self._inflight == 0)


@dataclass(frozen=True, slots=True)
class Runtime:
    """What every context of one manager shares."""

    store: EventStore
    gate: Gate
    limits: Limits
    snapshot_every: int
    create: Callable[[list[NewEvent], str], PluginContext]
    """Appends a new session's first events and hands out its context (the manager's)."""
    counters: Counters = field(default_factory=Counters)
    """The manager's live counts (``ContextManager.metrics()``)."""

    def append(
        self,
        session_id: str,
        events: Sequence[NewEvent],
        *,
        expected_version: int | None = None,
        head: Head | None = None,
        inbox: Inbox | None = None,
        fence: Fence | None = None,
    ) -> list[RecordedEvent]:
        """``store.append``, counted and timed when it commits."""
        started = time.perf_counter()
        recorded = self.store.append(
            session_id,
            events,
            expected_version=expected_version,
            head=head,
            inbox=inbox,
            fence=fence,
        )
        self.counters.appended(time.perf_counter() - started)
        return recorded


@dataclass(slots=True)
class PhaseScope:
    """The phase running in this task: writes carry its name and execution id, and the keys
    it reads of its session are collected for its end event."""

    session_id: str
    phase: str
    execution_id: str
    keys_read: set[str] = field(default_factory=set)
    previous: str | None = None
    """The phase before this one in the run."""
    fence: Fence | None = None
    """The run lease the phase's writes are fenced with."""


_phase: ContextVar[PhaseScope | None] = ContextVar("eventctx_phase", default=None)
_current: ContextVar[PluginContext | None] = ContextVar("eventctx_context", default=None)


@contextmanager
def _bound(var: ContextVar[T | None], value: T) -> Iterator[T]:
    """Set ``var`` to ``value`` for the duration of the block."""
    token = var.set(value)
    try:
        yield value
    finally:
        var.reset(token)


def phase_scope(scope: PhaseScope) -> AbstractContextManager[PhaseScope]:
    """Mark ``scope`` as the running phase for the duration of the block."""
    return _bound(_phase, scope)


def active_phase() -> PhaseScope | None:
    """The phase running in this task, if any."""
    return _phase.get()


def use_context(ctx: PluginContext) -> AbstractContextManager[PluginContext]:
    """Make ``ctx`` what ``current_context()`` returns inside the block (per thread and task)."""
    return _bound(_current, ctx)


def current_context() -> PluginContext:
    """The context made current by ``use_context`` (or by the runner inside a phase)."""
    ctx = _current.get()
    if ctx is None:
        raise EventCtxError("no current context: wrap the call in eventctx.use_context(ctx)")
    return ctx


def _copy(value: Any) -> Any:
    """An independent copy of a stored value (scalars are immutable and returned as they are)."""
    if type(value) in _CONTAINERS:
        return orjson.loads(orjson.dumps(value))
    return value


class PluginContext:
    """A session's shared key-value context. Thread-safe; get one from a ContextManager."""

    def __init__(
        self, runtime: Runtime, session_id: str, state: State, policy: SnapshotPolicy
    ) -> None:
        """Wrap a restored ``state``; ContextManager builds these, one per session."""
        self._runtime = runtime
        self._session_id = session_id
        self._state = state
        self._policy = policy
        self._lock = threading.RLock()
        self._gone: EventCtxError | None = None
        self._seen_activity_us = 0
        self._inbox: deque[list[RecordedEvent]] = deque()
        """This object's appends, once committed, in commit order, waiting to be folded."""

    def __repr__(self) -> str:
        state = self._state  # not len(self): a repr must work after stop() too
        return f"<PluginContext {self._session_id!r} v{state.version}, {len(state.data)} keys>"

    @property
    def session_id(self) -> str:
        """The session this context belongs to."""
        return self._session_id

    @property
    def version(self) -> int:
        """Version of the last event this object reflects."""
        return self._state.version

    # --- reading ------------------------------------------------------------------------------

    def _usable(self) -> None:
        self._runtime.gate.check()
        if self._gone is not None:
            raise type(self._gone)(*self._gone.args)

    def _lookup(self, key: str) -> Any:
        self._usable()
        scope = _phase.get()
        if scope is not None and scope.session_id == self._session_id:
            scope.keys_read.add(key)
        return self._state.data.get(key, _MISSING)

    def _read_all(self) -> dict[str, Any]:
        """The data, for a read that depends on every key (recorded as reading them all)."""
        self._usable()
        data = self._state.data
        scope = _phase.get()
        if scope is not None and scope.session_id == self._session_id:
            scope.keys_read.update(data)
        return data

    def get(self, key: str, default: Any = None) -> Any:
        """The value of ``key`` (a copy: mutating it never changes the context), or ``default``."""
        value = self._lookup(key)
        return default if value is _MISSING else _copy(value)

    def __getitem__(self, key: str) -> Any:
        value = self._lookup(key)
        if value is _MISSING:
            raise ContextKeyError(f"key {key!r} is not in session {self._session_id!r}")
        return _copy(value)

    def __contains__(self, key: object) -> bool:
        if type(key) is not str:
            self._usable()
            return False
        return self._lookup(key) is not _MISSING

    def __len__(self) -> int:
        with self._lock:
            return len(self._read_all())

    def keys(self) -> list[str]:
        """The keys, in the order they were first set."""
        with self._lock:
            return list(self._read_all())

    def to_dict(self) -> dict[str, Any]:
        """A copy of the whole context."""
        with self._lock:
            result: dict[str, Any] = orjson.loads(orjson.dumps(self._read_all()))
        return result

    def to_json(self) -> bytes:
        """The whole context as canonical JSON bytes (sorted keys)."""
        with self._lock:
            return orjson.dumps(self._read_all(), option=orjson.OPT_SORT_KEYS)

    def info(self, key: str) -> KeyInfo:
        """What the log says of ``key``: when it was created and last updated, who wrote it
        last (phase, execution, attempt), at which version, and its JSON type. Derived from
        the fold: no read of the database, no write."""
        self._lookup(key)
        with self._lock:
            value = self._state.data.get(key, _MISSING)
            written = self._state.provenance.get(key)
        if value is _MISSING or written is None:
            raise ContextKeyError(f"key {key!r} is not in session {self._session_id!r}")
        return KeyInfo(
            key,
            from_us(written.created_us),
            from_us(written.recorded_at_us),
            written.phase,
            written.execution_id,
            written.attempt,
            written.version,
            _json_type(value),
        )

    def _typed(self, key: str, default: Any, kinds: tuple[type, ...], name: str) -> Any:
        value = self._lookup(key)
        if value is _MISSING:
            if default is _MISSING:
                raise ContextKeyError(f"key {key!r} is not in session {self._session_id!r}")
            return default
        if type(value) not in kinds:
            raise ContextTypeError(
                f"key {key!r} holds {_a(type(value).__name__)}, not {_a(name)}: {_preview(value)}"
            )
        return _copy(value)

    def get_int(self, key: str, default: Any = _MISSING) -> int:
        """The int at ``key`` (a bool is not an int here); ContextKeyError/ContextTypeError."""
        result: int = self._typed(key, default, (int,), "int")
        return result

    def get_float(self, key: str, default: Any = _MISSING) -> float:
        """The number at ``key`` as a float (ints are widened)."""
        value = self._typed(key, default, (float, int), "float")
        return float(value) if type(value) is int else value

    def get_str(self, key: str, default: Any = _MISSING) -> str:
        """The str at ``key``."""
        result: str = self._typed(key, default, (str,), "str")
        return result

    def get_bool(self, key: str, default: Any = _MISSING) -> bool:
        """The bool at ``key``."""
        result: bool = self._typed(key, default, (bool,), "bool")
        return result

    def get_list(self, key: str, default: Any = _MISSING) -> list[Any]:
        """A copy of the list at ``key``."""
        result: list[Any] = self._typed(key, default, (list,), "list")
        return result

    def get_dict(self, key: str, default: Any = _MISSING) -> dict[str, Any]:
        """A copy of the dict at ``key``."""
        result: dict[str, Any] = self._typed(key, default, (dict,), "dict")
        return result

    def get_model(self, key: str, model: type[M]) -> M:
        """The value at ``key`` validated as ``model``; ContextTypeError when it doesn't fit."""
        value = self._lookup(key)
        if value is _MISSING:
            raise ContextKeyError(f"key {key!r} is not in session {self._session_id!r}")
        try:
            return model.model_validate(value)
        except ValidationError as exc:
            raise ContextTypeError(
                f"key {key!r} does not validate as {model.__name__}: {exc.error_count()} errors, "
                f"first: {exc.errors()[0]['msg']}"
            ) from exc

    def _run_value(self, kind: str, execution_id: str, key: str, default: Any) -> Any:
        """A copy of a phase output or metadata value of one run (for the phase helper)."""
        self._usable()
        per_run = self._state.outputs if kind == "outputs" else self._state.metadata
        value = per_run.get(execution_id, {}).get(key, _MISSING)
        return default if value is _MISSING else _copy(value)

    # --- writing ------------------------------------------------------------------------------

    def _key(self, key: object) -> str:
        if type(key) is not str:
            raise InvalidInputError(f"context keys are str, not {type(key).__name__}")
        limit = self._runtime.limits.max_key_length
        if not key or len(key) > limit:
            raise InvalidInputError(
                f"context keys are 1 to {limit} characters (got {len(key)}); "
                "raise ContextManager(max_key_length=…) for longer ones"
            )
        return check_text(key, "context key")

    def _key_sets(self, items: Iterable[tuple[object, Any]]) -> list[NewEvent]:
        """A KeySet event per (key, value), in the phase running in this task, if any."""
        phase, run = _running(self._session_id)
        key_set = NewEvent.key_set
        return [
            key_set(self._key(key), value, phase=phase, execution_id=run) for key, value in items
        ]

    def set(self, key: str, value: Any) -> None:
        """Store ``value`` at ``key``; committed when this returns."""
        self._write(self._key_sets(((key, value),)))

    def __setitem__(self, key: str, value: Any) -> None:
        self.set(key, value)

    def update(self, values: Mapping[str, Any], expected_version: int | None = None) -> None:
        """Store every item in one transaction; with ``expected_version``, only if the session's
        head is still there (else ConcurrencyError and nothing is written)."""
        if not isinstance(values, Mapping):
            raise InvalidInputError(f"update takes a mapping of keys to values, not {values!r}")
        if expected_version is not None:
            check_count(expected_version, "expected_version", minimum=0)
        events = self._key_sets(values.items())
        if events:
            self._write(events, expected_version)

    def delete(self, key: str) -> bool:
        """Remove ``key``; False (and nothing appended) when it is absent."""
        self._key(key)
        self._usable()
        if key not in self._state.data:
            return False
        self._write([NewEvent.create("KeyDeleted", key=key, **_envelope(self._session_id))])
        return True

    def __delitem__(self, key: str) -> None:
        if not self.delete(key):
            raise ContextKeyError(f"key {key!r} is not in session {self._session_id!r}")

    def clear(self) -> None:
        """Remove every key (one event)."""
        self._write([NewEvent.create("ContextCleared", **_envelope(self._session_id))])

    def from_json(self, data: bytes | str) -> None:
        """Replace the whole context by the JSON object ``data`` (what ``to_json`` gives), in
        one transaction: a ContextCleared, then one KeySet per key."""
        try:
            values = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise InvalidInputError(f"from_json needs a JSON object: {exc}") from None
        if type(values) is not dict:
            raise InvalidInputError(f"from_json needs a JSON object, not {type(values).__name__}")
        events = [NewEvent.create("ContextCleared", **_envelope(self._session_id))]
        events += self._key_sets(values.items())
        self._write(events)

    def clone(self, session_id: str, ttl: timedelta | _Same | None = _SAME) -> PluginContext:
        """A new session starting from this context's data (not its runs' outputs or
        metadata), its first event naming this session and version as its parent. Writing to
        either never affects the other. ``ttl`` defaults to this session's."""
        runtime = self._runtime
        with runtime.gate:
            with self._lock:
                self._usable()
                state = self._state
                ttl_ms = state.ttl_ms if isinstance(ttl, _Same) else _ttl_ms(ttl)
                parent = {"session_id": self._session_id, "version": state.version}
                data = dict(state.data)
            created = NewEvent.create("ContextCreated", {"ttl_ms": ttl_ms, "parent": parent})
            events = [
                created,
                *(NewEvent.key_set(k, v) for k, v in data.items()),
            ]
            return runtime.create(events, session_id)

    def refresh(self) -> None:
        """Catch up with writes other processes appended since this object last saw the log."""
        with self._runtime.gate, self._lock:
            self._usable()
            self._sync(self._runtime.store.session(self._session_id))

    @property
    def writer(self) -> SessionWriter:
        """The interface the runner, the phases and the manager write this session through."""
        return SessionWriter(self)

    def _write(
        self,
        events: list[NewEvent],
        expected_version: int | None = None,
        fence: Fence | None = None,
    ) -> list[RecordedEvent]:
        """Append ``events`` (fenced by the running phase's lease, or by ``fence``) and fold
        them in before returning.

        The lock is not held while the append waits for its group to commit. The committer
        puts every caller's events in this context's inbox in commit order; whoever takes
        the lock first folds all that is there, so folds happen in version order.
        """
        runtime = self._runtime
        limit = runtime.limits.max_value_bytes
        size = 0
        for event in events:  # values, run inputs, phase outputs and metadata alike
            encoded = len(event.data)
            size += encoded
            if encoded > limit and event.type in _SIZE_LIMITED:
                what = f"value for key {event.key!r}" if event.key else f"{event.type} payload"
                raise InvalidInputError(
                    f"{what} is {encoded} bytes encoded, over the {limit}-byte limit; "
                    "raise ContextManager(max_value_bytes=…) or store a reference instead"
                )
        if fence is None:
            scope = _phase.get()
            if scope is not None and scope.session_id == self._session_id:
                fence = scope.fence
        with runtime.gate:
            with self._lock:
                self._usable()
                state = self._state
                head = Head(state.version, state.head_hash, state.recorded_at_us)
            try:
                recorded = runtime.append(
                    self._session_id,
                    events,
                    expected_version=expected_version,
                    head=head,
                    inbox=self._inbox,
                    fence=fence,
                )
            except SessionNotFoundError as exc:
                if self._outlived_ttl():  # compaction removed it: say why
                    raise SessionExpiredError(
                        f"session {self._session_id!r} expired and was removed; "
                        "nothing was written. Create it again to go on"
                    ) from exc
                raise
            with self._lock:
                self._fold_inbox()
                # No snapshot of a session deleted meanwhile.
                if self._gone is None and self._policy.after_append(
                    runtime.store, self._session_id, self._state, len(events), size
                ):
                    runtime.counters.add("snapshots")
            return recorded

    def _fold_inbox(self) -> None:
        """Fold every committed append waiting in the inbox, in commit order (under the lock)."""
        inbox = self._inbox
        while inbox:
            self._fold_committed(inbox.popleft())

    def _fold_committed(self, recorded: Sequence[RecordedEvent]) -> None:
        """Fold events appended through this object, checking they chain onto the state."""
        first, last = recorded[0], recorded[-1]
        state = self._state
        if first.version == state.version + 1 and first.prev_hash == state.head_hash:
            advance(state, recorded)  # the usual case: right after what this object saw
            return
        if first.version > state.version + 1:  # another writer got in first
            with suppress(IntegrityError, SessionNotFoundError):  # purged since: see below
                self._catch_up(first.version - 1, first.prev_hash)
            if self._state.head_hash == first.prev_hash:
                advance(self._state, recorded)
                return
        elif last.version <= state.version and self._on_the_log():
            return  # a catch-up (refresh, get_context) already folded them
        # The session was purged and created anew elsewhere: this state is of another history.
        self._reload()

    def _on_the_log(self) -> bool:
        """Whether the event this state ends at is still in the log (else it was purged)."""
        version = self._state.version
        found = self._runtime.store.read_versions(self._session_id, [version])
        return bool(found) and found[0].hash == self._state.head_hash

    def _outlived_ttl(self) -> bool:
        """Whether the session's ttl ran out since the last activity this object saw."""
        seen = max(self._state.recorded_at_us, self._seen_activity_us)
        return expired_at(seen, self._state.ttl_ms, self._runtime.store.clock())

    def _catch_up(self, version: int, head_hash: bytes) -> None:
        """Bring the state to ``version`` (whose chain hash is ``head_hash``) from the log; the
        events must chain onto the state, else it is restored afresh."""
        store = self._runtime.store
        with suppress(IntegrityError):  # a gap, or another history: the log changed under us
            advance(self._state, store.read(self._session_id, self._state.version + 1, version))
        if self._state.version != version or self._state.head_hash != head_hash:
            self._restore_at(version, head_hash)

    def _restore_at(self, version: int, head_hash: bytes | None = None) -> None:
        """Replace the state by the one restored from the store at ``version``."""
        self._state = restore(self._runtime.store, self._session_id, version, head_hash)[0]

    def _reload(self) -> None:
        """Restore the state afresh at the session's current head; called under the lock."""
        head = self._runtime.store.session(self._session_id)
        if head is not None and head.live:
            self._restore_at(head.version, head.head_hash)
        else:  # purged (or deleted) since: this state is of a history that is gone
            self._forget(f"session {self._session_id!r} was deleted or removed")

    def _sync(self, head: SessionHead | None, *, fresh: bool = True) -> None:
        """Follow the head row ``head``; called under the lock.

        ``fresh`` says ``head`` was read under this lock; one read before may be older than
        what this object has folded since, and is read again before anything moves back.
        """
        self._fold_inbox()
        if not fresh and head is not None and head.version < self._state.version:
            head = self._runtime.store.session(self._session_id)
        if head is None or not head.live:
            self._forget(f"session {self._session_id!r} was deleted or removed")
            raise SessionNotFoundError(f"session {self._session_id!r} was deleted or removed")
        self._seen_activity_us = max(self._seen_activity_us, head.last_activity_us)
        if head.version > self._state.version:
            self._catch_up(head.version, head.head_hash)
        elif head.version < self._state.version or head.head_hash != self._state.head_hash:
            self._restore_at(head.version, head.head_hash)  # purged and created anew elsewhere

    def _forget(self, reason: str, expired: bool = False) -> None:
        """Mark the session gone: every later call raises SessionNotFoundError(reason)
        (SessionExpiredError if it expired)."""
        with self._lock:
            self._gone = (SessionExpiredError if expired else SessionNotFoundError)(reason)


class SessionWriter:
    """A context's narrow interface for the layers above it (runner, phases, manager):
    appends, optionally fenced by a run lease, and the run state they fold to."""

    __slots__ = ("_ctx",)

    def __init__(self, ctx: PluginContext) -> None:
        self._ctx = ctx

    @property
    def session_id(self) -> str:
        """The session written to."""
        return self._ctx.session_id

    @property
    def store(self) -> EventStore:
        """The store the session lives in."""
        return self._ctx._runtime.store

    def append(
        self,
        events: list[NewEvent],
        *,
        fence: Fence | None = None,
        expected_version: int | None = None,
    ) -> list[RecordedEvent]:
        """Append ``events`` and fold them into the context; see ``EventStore.append``."""
        return self._ctx._write(events, expected_version, fence)

    def check_key(self, key: object) -> str:
        """``key`` if the context accepts it as a key, else InvalidInputError."""
        return self._ctx._key(key)

    def run(self) -> RunState | None:
        """A copy of the session's latest run, as folded."""
        ctx = self._ctx
        with ctx._lock:
            ctx._usable()
            run = ctx._state.run
            return None if run is None else run.copy()

    def output(self, execution_id: str, phase: str, default: Any = None) -> Any:
        """A copy of the output ``phase`` returned in run ``execution_id``."""
        return self._ctx._run_value("outputs", execution_id, phase, default)

    def metadata(self, execution_id: str, key: str, default: Any = None) -> Any:
        """A copy of helper metadata ``key`` of run ``execution_id``."""
        return self._ctx._run_value("metadata", execution_id, key, default)

    def refresh(self) -> None:
        """See everything appended to the session so far."""
        self._ctx.refresh()

    def follow(self, head: SessionHead) -> None:
        """Catch up with ``head``, a head row read before the context's lock was taken."""
        ctx = self._ctx
        with ctx._lock:
            ctx._sync(head, fresh=False)

    def close(self, reason: str, *, expired: bool = False) -> None:
        """Mark the session gone: every later call on the context raises with ``reason``."""
        self._ctx._forget(reason, expired)


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """Metadata of one key, derived from the log."""

    key: str
    created_at: datetime
    """When the key was last set while absent (its current life began)."""
    updated_at: datetime
    phase: str | None
    execution_id: str | None
    attempt: int | None
    version: int
    json_type: str  # "null" | "boolean" | "integer" | "number" | "string" | "array" | "object"


_JSON_TYPES: Final = {
    type(None): "null",
    bool: "boolean",
    int: "integer",
    float: "number",
    str: "string",
    list: "array",
    dict: "object",
}


def _json_type(value: Any) -> str:
    return _JSON_TYPES.get(type(value), "object")


def _ttl_ms(ttl: timedelta | None) -> int | None:
    """A session's ttl in ms (None: for ever), checked: at most ``clock.MAX_DURATION``."""
    if ttl is None:
        return None
    return max(1, int(check_duration(ttl, "ttl") / timedelta(milliseconds=1)))


def _running(session_id: str) -> tuple[str | None, str | None]:
    """The phase and execution id of the phase of ``session_id`` running in this task, if
    any: the envelope of what it writes."""
    scope = _phase.get()
    if scope is None or scope.session_id != session_id:
        return None, None
    return scope.phase, scope.execution_id


def _envelope(session_id: str) -> dict[str, Any]:
    phase, execution_id = _running(session_id)
    return {"phase": phase, "execution_id": execution_id}


def _a(noun: str) -> str:
    """``noun`` with its indefinite article."""
    return f"{'an' if noun[:1] in 'aeiou' else 'a'} {noun}"


def _preview(value: Any) -> str:
    text = orjson.dumps(value).decode()
    return text if len(text) <= 60 else text[:57] + "..."
