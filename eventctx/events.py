"""Event types, the value rules, the canonical encoding and the hash chain; no I/O.

A payload is encoded once, canonically (orjson, sorted keys), and those exact bytes are both
stored and hashed, so a row verifies byte for byte wherever it is copied to.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, Final, NamedTuple

import orjson
from pydantic import BaseModel, ConfigDict, JsonValue

from eventctx.errors import SerializationError

__all__ = [
    "EVENT_MODELS",
    "GENESIS_HASH",
    "MAX_DEPTH",
    "RUN_EVENTS",
    "Hasher",
    "NewEvent",
    "RecordedEvent",
    "base_digest",
    "chain_hash",
    "check_value",
    "encode_payload",
    "events_json_schema",
    "from_us",
    "key_check",
    "keyed_hasher",
    "sha256",
    "snapshot_digest",
    "to_us",
]

INT_MIN: Final = -(2**63)
INT_MAX: Final = 2**63 - 1
MAX_DEPTH: Final = 128
"""How deeply values may nest (lists and dicts): deeper ones are refused before anything is
written, so that every state holding them can be encoded as a snapshot."""
_BLOCK: Final = 64  # sha256's block size, for HMAC
GENESIS_HASH: Final = bytes(32)
"""The ``prev_hash`` of a session's first event."""

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


# --- payload models: the documented shape of every event type --------------------------------


class _Payload(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ContextCreated(_Payload):
    """A session starts (or starts again after a delete); ``ttl_ms`` None means never expires.
    A clone names the session and version it was cloned from (``parent``)."""

    ttl_ms: int | None = None
    parent: dict[str, JsonValue] | None = None


class KeySet(_Payload):
    """``key`` (an envelope column) now holds ``value``."""

    value: JsonValue


class KeyDeleted(_Payload):
    """``key`` (an envelope column) was removed."""


class ContextCleared(_Payload):
    """Every key was removed."""


class ContextDeleted(_Payload):
    """The session was deleted; its history stays until compaction or purge."""


class MetadataSet(_Payload):
    """A phase helper stored ``value`` as metadata ``key`` (envelope column) of its execution."""

    value: JsonValue


class RunStarted(_Payload):
    """A run (execution id in the envelope) starts with ``input`` over ``phases``."""

    input: JsonValue
    phases: list[str]


class RunResumed(_Payload):
    """Another process continues the run (after its last one stopped) with ``input``;
    ``previous_ended_at_us`` is when the previous process last recorded anything of it."""

    input: JsonValue
    previous_ended_at_us: int


class RunCompleted(_Payload):
    """Every phase of the run completed. ``duration_ms`` spans the run from its first start
    to now, across processes; ``segments_ms`` is the time spent in each process."""

    duration_ms: float
    segments_ms: list[float] = []


class RunFailed(_Payload):
    """The run stopped at ``phase`` after its last attempt failed (durations as for
    RunCompleted)."""

    phase: str | None
    error_type: str
    message: str
    duration_ms: float
    segments_ms: list[float] = []


class PhaseStarted(_Payload):
    """Attempt ``attempt`` (from 1) of the phase in the envelope starts. If ``isolated``, its
    writes count only if it completes: when it fails (or is found interrupted) the context is
    folded back to what it was before it; its events stay in the log."""

    attempt: int
    isolated: bool = False


class PhaseCompleted(_Payload):
    """The phase returned ``output``; ``keys_read`` are the context keys it read."""

    output: JsonValue
    duration_ms: float
    attempt: int
    keys_read: list[str]


class PhaseFailed(_Payload):
    """An attempt of the phase raised (``error_type`` "interrupted" when its process died).

    ``duration_ms`` of an interrupted attempt runs to its last recorded event and is a lower
    bound (``lower_bound``), or None when nothing was recorded after it started. ``retry``
    says whether another attempt follows, after ``retry_after_ms``.
    """

    error_type: str
    message: str
    traceback: str
    duration_ms: float | None
    attempt: int
    keys_read: list[str]
    lower_bound: bool = False
    retry: bool = False
    retry_after_ms: float | None = None


class CheckpointSaved(_Payload):
    """A LangGraph checkpoint ``checkpoint_id`` of namespace ``ns`` (child of ``parent_id``).

    ``checkpoint`` (its fields but id and channel values) and ``metadata`` are stored as
    ``[kind, value]``; ``channels`` maps each channel whose value changed to ``[version,
    kind]``: ``"json"`` (the value is plain JSON), ``"empty"`` (no value), or the serializer's
    type name (the value is base64 text). The values of the graph's channels follow as
    ``KeySet`` events of the same batch; LangGraph's own channels (``branch:…``, ``__…__``)
    carry theirs inline, as ``[version, kind, value]``. With ``delta``, the checkpoint is
    stored on its parent's: ``channel_versions``, when left out, is the parent's with
    ``channels`` on top, and ``versions_seen`` holds only the entries that moved."""

    checkpoint_id: str
    ns: str
    parent_id: str | None
    checkpoint: list[JsonValue]
    metadata: list[JsonValue]
    channels: dict[str, list[JsonValue]]
    delta: bool = False


class WritesSaved(_Payload):
    """Pending writes of task ``task_id`` (at ``task_path``) against checkpoint
    ``checkpoint_id`` of namespace ``ns``: ``[channel, index, kind, value]`` each, kinds as in
    CheckpointSaved."""

    checkpoint_id: str
    ns: str
    task_id: str
    task_path: str
    writes: list[list[JsonValue]]


class CheckpointsRemoved(_Payload):
    """LangGraph checkpoints (``[ns, checkpoint_id]`` each) and their pending writes no longer
    exist for the thread; their events stay in the log."""

    checkpoints: list[list[str]]


EVENT_MODELS: Final[dict[str, type[_Payload]]] = {
    model.__name__: model
    for model in (
        ContextCreated,
        KeySet,
        KeyDeleted,
        ContextCleared,
        ContextDeleted,
        MetadataSet,
        RunStarted,
        RunResumed,
        RunCompleted,
        RunFailed,
        PhaseStarted,
        PhaseCompleted,
        PhaseFailed,
        CheckpointSaved,
        WritesSaved,
        CheckpointsRemoved,
    )
}
"""Payload model of each event type, by type name."""

RUN_EVENTS: Final = frozenset(
    {
        "RunStarted",
        "RunResumed",
        "RunCompleted",
        "RunFailed",
        "PhaseStarted",
        "PhaseCompleted",
        "PhaseFailed",
    }
)
"""The events a run records about itself and its phases."""


# --- values -----------------------------------------------------------------------------------


def check_value(value: Any, key: str) -> None:
    """Raise SerializationError unless ``value`` is JSON as eventctx defines it.

    Allowed: None, bool, 64-bit int, finite float, str (valid unicode: no lone surrogates),
    lists and tuples, dicts with str keys, and pydantic models, nested at most ``MAX_DEPTH``
    levels. The error names the key, the offending path and why.
    """
    if not _valid(value, 0):
        raise _explain(value, key, "", 0) or _refuse(key, "", "the value is not JSON")


def _valid(value: Any, depth: int) -> bool:
    """The fast check: no allocation, no messages (``_explain`` finds out why). Strings are
    checked for lone surrogates when they are encoded. Containers test their str, bool, None,
    int and float members in place: most members are leaves, and a call each is most of
    the cost."""
    kind = type(value)
    if kind is str or kind is bool or value is None:
        return True
    if kind is int:
        return bool(INT_MIN <= value <= INT_MAX)
    if kind is float:
        return bool(value - value == 0.0)  # false for NaN and ±Inf
    if depth >= MAX_DEPTH:
        return False
    if kind is dict:
        for name in value:
            if type(name) is not str:
                return False
        members = value.values()
    elif kind is list or kind is tuple:
        members = value
    elif isinstance(value, BaseModel):
        return _valid(value.model_dump(mode="json"), depth)
    else:
        return False
    for member in members:
        of = type(member)
        if not (
            of is str
            or of is bool
            or member is None
            or (of is int and INT_MIN <= member <= INT_MAX)
            or (of is float and member - member == 0.0)
            or _valid(member, depth + 1)
        ):
            return False
    return True


def _explain(value: Any, key: str, path: str, depth: int) -> SerializationError | None:
    """The error for the first part of ``value`` that breaks the rules, or None."""
    kind = type(value)
    if kind in (dict, list, tuple) and depth >= MAX_DEPTH:
        return _refuse(key, path, f"it nests deeper than {MAX_DEPTH} levels")
    if kind is int and not INT_MIN <= value <= INT_MAX:
        return _refuse(key, path, f"int {value} is outside the signed 64-bit range")
    if kind is float and not math.isfinite(value):
        return _refuse(key, path, f"float {value!r} is not finite; store None or a string instead")
    if kind is dict:
        for k, v in value.items():
            if type(k) is not str:
                return _refuse(key, path, f"dict key {k!r} is a {type(k).__name__}, not a str")
            found = _explain(v, key, f"{path}[{k!r}]", depth + 1)
            if found:
                return found
        return None
    if kind is list or kind is tuple:
        for i, v in enumerate(value):
            found = _explain(v, key, f"{path}[{i}]", depth + 1)
            if found:
                return found
        return None
    if isinstance(value, BaseModel):
        return _explain(value.model_dump(mode="json"), key, path, depth)
    if kind in (str, bool, int, float, type(None)):
        return None
    return _refuse(
        key,
        path,
        f"{kind.__module__}.{kind.__qualname__} is not JSON "
        "(use None, bool, int, float, str, list, dict with str keys, or a pydantic model)",
    )


def _refuse(key: str, path: str, why: str) -> SerializationError:
    where = f"{key!r}{path}" if path else repr(key)
    return SerializationError(f"cannot store value for key {where}: {why}")


def _model_json(value: Any) -> Any:
    """orjson's fallback: a pydantic model as its JSON form (already checked)."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    raise TypeError(f"{type(value).__name__} is not JSON")  # unreachable after check_value


# --- encoding ---------------------------------------------------------------------------------


def encode_payload(payload: Mapping[str, Any]) -> bytes:
    """The canonical bytes of a checked payload: compact JSON, sorted keys, models as JSON."""
    return orjson.dumps(payload, default=_model_json, option=orjson.OPT_SORT_KEYS)


def to_us(at: datetime) -> int:
    """Microseconds since the Unix epoch of an aware datetime; naive datetimes are refused."""
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError(f"datetime {at.isoformat()} is naive; pass an aware one (e.g. tz=UTC)")
    return (at - _EPOCH) // timedelta(microseconds=1)


def from_us(us: int) -> datetime:
    """The UTC datetime of a microsecond timestamp."""
    return _EPOCH + timedelta(microseconds=us)


Hasher = Callable[[bytes], bytes]
"""The chain's hash function: sha256, or HMAC-SHA256 under the application's key."""


def sha256(data: bytes) -> bytes:
    """The unkeyed chain's hash."""
    return hashlib.sha256(data).digest()


def keyed_hasher(key: bytes) -> Hasher:
    """HMAC-SHA256 (RFC 2104) under ``key``: a chain only the key's holders can compute. The
    padded key's two blocks are hashed once here, so each event costs what sha256 does."""
    if len(key) > _BLOCK:
        key = hashlib.sha256(key).digest()
    key = key.ljust(_BLOCK, b"\0")
    inner = hashlib.sha256(bytes(b ^ 0x36 for b in key))
    outer = hashlib.sha256(bytes(b ^ 0x5C for b in key))

    def hmac_sha256(data: bytes) -> bytes:
        h = inner.copy()
        h.update(data)
        o = outer.copy()
        o.update(h.digest())
        return o.digest()

    return hmac_sha256


def key_check(hasher: Hasher) -> bytes:
    """A value that shows whether a key is the one a database was keyed with, without
    revealing the key (it is never stored)."""
    return hasher(b"eventctx chain key check")


def chain_hash(
    prev_hash: bytes,
    session_id: str,
    version: int,
    type_: str,
    key: str | None,
    phase: str | None,
    execution_id: str | None,
    recorded_at_us: int,
    payload: bytes,
    hasher: Hasher = sha256,
) -> bytes:
    """The hash of the previous hash and every canonical field but the (store-local)
    position."""
    header = orjson.dumps([session_id, version, type_, key, phase, execution_id, recorded_at_us])
    return hasher(prev_hash + header + payload)


def snapshot_digest(
    session_id: str,
    version: int,
    fold_version: int,
    head_hash: bytes,
    state: bytes,
    hasher: Hasher = sha256,
) -> bytes:
    """The digest stored with a snapshot: a restore uses a snapshot only if it still matches."""
    return hasher(orjson.dumps([session_id, version, fold_version]) + head_hash + state)


def base_digest(
    session_id: str,
    version: int,
    fold_version: int,
    head_hash: bytes,
    state: bytes,
    history: bytes,
    hasher: Hasher = sha256,
) -> bytes:
    """The digest stored with a retention base: its state and the history kept of the removed
    events, bound to the session and the chain hash it continues from."""
    lengths = orjson.dumps(["base", session_id, version, fold_version, len(state)])
    return hasher(lengths + head_hash + state + history)


# --- event envelopes --------------------------------------------------------------------------


class NewEvent(NamedTuple):
    """An event about to be appended: its type, envelope columns and canonical payload bytes.

    ``payload`` is the payload as stored (plain JSON, an independent copy of what the caller
    passed) and ``data`` its canonical encoding; build one with :meth:`create` (or
    :meth:`key_set`) so they agree. A tuple, as ``RecordedEvent`` is: an ``update`` makes one
    per key.
    """

    type: str
    payload: dict[str, Any]
    data: bytes
    key: str | None = None
    phase: str | None = None
    execution_id: str | None = None

    @classmethod
    def create(
        cls,
        type_: str,
        payload: Mapping[str, Any] | None = None,
        *,
        key: str | None = None,
        phase: str | None = None,
        execution_id: str | None = None,
    ) -> NewEvent:
        """Check and encode ``payload``; SerializationError names the offending key."""
        if type_ not in EVENT_MODELS and not type_.isidentifier():
            raise ValueError(f"event type {type_!r} is not an identifier")
        payload = payload or {}
        for name, value in payload.items():
            check_value(value, key if key is not None else name)
        return _encoded(cls, type_, payload, key, phase, execution_id)

    @classmethod
    def key_set(
        cls, key: str, value: Any, *, phase: str | None = None, execution_id: str | None = None
    ) -> NewEvent:
        """``create("KeySet", {"value": value}, key=key, …)``, the event of every context
        write, made without the general case's steps."""
        check_value(value, key)
        return _encoded(cls, "KeySet", {"value": value}, key, phase, execution_id)


def _encoded(
    cls: type[NewEvent],
    type_: str,
    payload: Mapping[str, Any],
    key: str | None,
    phase: str | None,
    execution_id: str | None,
) -> NewEvent:
    """The event of a checked ``payload``, encoded (SerializationError names the key)."""
    try:
        data = encode_payload(payload)
    except orjson.JSONEncodeError as exc:  # a str with a lone surrogate is not unicode text
        raise SerializationError(
            f"cannot store value for key {key if key is not None else '?'!r}: {exc}"
        ) from None
    # Decoding the bytes gives the payload as stored: plain JSON, and an independent copy.
    return tuple.__new__(cls, (type_, orjson.loads(data), data, key, phase, execution_id))


class RecordedEvent(NamedTuple):
    """An event as stored: its global position, session version and envelope.

    A tuple, so that reading and folding millions of them stays cheap.
    """

    position: int
    session_id: str
    version: int
    type: str
    key: str | None
    phase: str | None
    execution_id: str | None
    payload: dict[str, Any]
    recorded_at_us: int
    hash: bytes
    """sha256 chaining this event to the session's previous one (see ``chain_hash``)."""
    prev_hash: bytes
    """The previous event's ``hash`` (``GENESIS_HASH`` for a session's first): the chain link
    the fold checks, so events are only ever folded onto the state they were appended to."""

    @property
    def recorded_at(self) -> datetime:
        """When the event was appended, in UTC."""
        return from_us(self.recorded_at_us)


def events_json_schema() -> dict[str, Any]:
    """JSON Schema of a recorded event: the envelope, with each type's payload schema."""
    variants = []
    defs: dict[str, Any] = {}
    for name, model in EVENT_MODELS.items():
        payload = model.model_json_schema(ref_template="#/$defs/{model}")
        defs.update(payload.pop("$defs", {}))
        defs[name] = payload
        variants.append(
            {
                "type": "object",
                "properties": {
                    "type": {"const": name},
                    "payload": {"$ref": f"#/$defs/{name}"},
                },
            }
        )
    nullable_str = {"type": ["string", "null"]}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "eventctx recorded event",
        "type": "object",
        "required": ["session_id", "version", "type", "payload", "recorded_at"],
        "properties": {
            "position": {"type": "integer", "description": "global, monotonic within a store"},
            "session_id": {"type": "string", "minLength": 1, "maxLength": 512},
            "version": {"type": "integer", "minimum": 1},
            "type": {"type": "string", "enum": list(EVENT_MODELS)},
            "key": nullable_str,
            "phase": nullable_str,
            "execution_id": nullable_str,
            "payload": {"type": "object"},
            "recorded_at": {"type": "string", "format": "date-time"},
        },
        "oneOf": variants,
        "$defs": defs,
    }
