"""LangGraph values (channels, writes, checkpoints, metadata) as JSON that round-trips.

Plain JSON stays as it is, so ``blame`` and ``history`` show it; anything else goes through the
saver's serializer (``dumps_typed``) and is stored as base64 text under the serializer's type
name, so it comes back exactly as the serializer returns it.
"""

from __future__ import annotations

import base64
from typing import Any, Final

from langgraph.checkpoint.serde.base import SerializerProtocol

from eventctx.events import INT_MAX, INT_MIN, MAX_DEPTH

__all__ = ["EMPTY", "JSON", "bookkeeping", "decode", "encode", "is_plain"]

JSON: Final = "json"
"""The kind of a value stored as itself."""
EMPTY: Final = "empty"
"""The kind of a channel that has no value at that version."""


def bookkeeping(channel: str) -> bool:
    """Whether a channel is LangGraph's own (``branch:to:node``, ``__start__``, …) rather than
    the graph's state: its value is kept inside the CheckpointSaved event, not a KeySet."""
    return channel.startswith("branch:") or (channel.startswith("__") and channel.endswith("__"))


def is_plain(value: Any, depth: int = 0) -> bool:
    """Whether ``value`` is JSON that decodes to an equal value of the same types: exact
    None/bool/int (64-bit)/finite float/str/list/dict with str keys, not subclasses or tuples,
    nested at most ``MAX_DEPTH`` levels. (Leaves are checked in the loops: every value of a
    checkpoint goes through here.)"""
    kind = type(value)
    if kind is list:
        if depth >= MAX_DEPTH:
            return False
        for item in value:  # noqa: SIM110 (a loop is twice as fast as all() here)
            if not (_leaf(item) or is_plain(item, depth + 1)):
                return False
        return True
    if kind is dict:
        if depth >= MAX_DEPTH:
            return False
        for k, v in value.items():
            if type(k) is not str or not (k.isascii() or _unicode(k)):
                return False
            if not (_leaf(v) or is_plain(v, depth + 1)):
                return False
        return True
    return _leaf(value)


def _leaf(value: Any) -> bool:
    """Whether ``value`` is a plain JSON scalar (False for containers and anything else)."""
    kind = type(value)
    if kind is str:
        return value.isascii() or _unicode(value)
    if kind is int:
        return bool(INT_MIN <= value <= INT_MAX)
    if kind is float:
        return bool(value - value == 0.0)  # false for NaN and ±Inf
    return kind is bool or value is None


def _unicode(text: str) -> bool:
    """Whether ``text`` is valid unicode (no lone surrogates), as JSON needs."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def encode(serde: SerializerProtocol, value: Any) -> tuple[str, Any]:
    """``(kind, json)``: the value itself for plain JSON, else the serializer's bytes."""
    if is_plain(value):
        return JSON, value
    kind, data = serde.dumps_typed(value)
    return kind, base64.b64encode(data).decode("ascii")


def decode(serde: SerializerProtocol, kind: str, stored: Any) -> Any:
    """The value ``encode`` was given."""
    if kind == JSON:
        return stored
    return serde.loads_typed((kind, base64.b64decode(stored)))
