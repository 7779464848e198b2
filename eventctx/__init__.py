"""eventctx: event-sourced, thread-safe phase context for plugins, in SQLite or PostgreSQL.

Every context mutation is an immutable, hash-chained event; the current context is a fold of
the events on top of the latest snapshot. See README.md and docs/ for the tour.
"""

from eventctx.compaction import CompactionReport
from eventctx.context import PluginContext, current_context, use_context
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
from eventctx.manager import ContextManager, SessionInfo
from eventctx.phases import (
    ContextAwarePhase,
    PhaseContextHelper,
    RetryPolicy,
    helper,
    wrap_phases_with_context,
)
from eventctx.runner import PluginRunner, RunResult
from eventctx.state import Provenance, State
from eventctx.store import EventStore, SessionHead

__all__ = [
    "CompactionReport",
    "ConcurrencyError",
    "ContextAwarePhase",
    "ContextKeyError",
    "ContextManager",
    "ContextTypeError",
    "EventCtxError",
    "EventStore",
    "IntegrityError",
    "InvalidInputError",
    "NewEvent",
    "PhaseContextHelper",
    "PluginContext",
    "PluginRunner",
    "Provenance",
    "RecordedEvent",
    "RetryPolicy",
    "RunInProgressError",
    "RunResult",
    "SchemaError",
    "SerializationError",
    "SessionExistsError",
    "SessionExpiredError",
    "SessionHead",
    "SessionInfo",
    "SessionNotFoundError",
    "State",
    "StorageError",
    "current_context",
    "helper",
    "use_context",
    "wrap_phases_with_context",
]
