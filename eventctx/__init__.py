"""eventctx: event-sourced, thread-safe phase context for plugins, in SQLite or PostgreSQL.

Every context mutation is an immutable, hash-chained event; the current context is a fold of
the events on top of the latest snapshot. See README.md and docs/ for the tour.
"""

from eventctx.compaction import CompactionReport
from eventctx.context import KeyInfo, PluginContext, current_context, use_context
from eventctx.errors import (
    ChainKeyError,
    ConcurrencyError,
    ContextKeyError,
    ContextTypeError,
    EventCtxError,
    HistoryRemovedError,
    IntegrityError,
    InvalidInputError,
    OutcomeUnknownError,
    PhaseError,
    RunInProgressError,
    SchemaError,
    SerializationError,
    SessionExistsError,
    SessionExpiredError,
    SessionNotFoundError,
    StorageError,
)
from eventctx.events import NewEvent, RecordedEvent
from eventctx.findings import (
    ContextDiff,
    KeyRead,
    KeyWrite,
    PhaseStats,
    ReplayStep,
    RerunReport,
    Run,
    SessionDiff,
    VerifyResult,
)
from eventctx.inspect import Inspector
from eventctx.manager import ContextManager, SessionInfo
from eventctx.phases import (
    AttemptResult,
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
    "AttemptResult",
    "ChainKeyError",
    "CompactionReport",
    "ConcurrencyError",
    "ContextAwarePhase",
    "ContextDiff",
    "ContextKeyError",
    "ContextManager",
    "ContextTypeError",
    "EventCtxError",
    "EventStore",
    "HistoryRemovedError",
    "Inspector",
    "IntegrityError",
    "InvalidInputError",
    "KeyInfo",
    "KeyRead",
    "KeyWrite",
    "NewEvent",
    "OutcomeUnknownError",
    "PhaseContextHelper",
    "PhaseError",
    "PhaseStats",
    "PluginContext",
    "PluginRunner",
    "Provenance",
    "RecordedEvent",
    "ReplayStep",
    "RerunReport",
    "RetryPolicy",
    "Run",
    "RunInProgressError",
    "RunResult",
    "SchemaError",
    "SerializationError",
    "SessionDiff",
    "SessionExistsError",
    "SessionExpiredError",
    "SessionHead",
    "SessionInfo",
    "SessionNotFoundError",
    "State",
    "StorageError",
    "VerifyResult",
    "current_context",
    "helper",
    "use_context",
    "wrap_phases_with_context",
]
