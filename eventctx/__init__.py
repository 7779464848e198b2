"""eventctx: event-sourced, thread-safe phase context for plugins, in SQLite or PostgreSQL."""

from eventctx.errors import (
    ConcurrencyError,
    ContextKeyError,
    ContextTypeError,
    EventCtxError,
    IntegrityError,
    InvalidInputError,
    RunInProgressError,
    SchemaError,
    SerializationError,
    SessionExistsError,
    SessionExpiredError,
    SessionNotFoundError,
    StorageError,
)
from eventctx.events import NewEvent, RecordedEvent
from eventctx.store import EventStore, SessionHead

__all__ = [
    "ConcurrencyError",
    "ContextKeyError",
    "ContextTypeError",
    "EventCtxError",
    "EventStore",
    "IntegrityError",
    "InvalidInputError",
    "NewEvent",
    "RecordedEvent",
    "RunInProgressError",
    "SchemaError",
    "SerializationError",
    "SessionExistsError",
    "SessionExpiredError",
    "SessionHead",
    "SessionNotFoundError",
    "StorageError",
]
