"""The public surface is deliberate: ``eventctx.__all__`` is pinned here."""

from __future__ import annotations

import eventctx

EXPECTED = {
    "OutcomeUnknownError",
    "KeyInfo",
    "AttemptResult",
    "PhaseError",
    "VerifyResult",
    "SessionDiff",
    "Run",
    "RerunReport",
    "ReplayStep",
    "PhaseStats",
    "KeyWrite",
    "KeyRead",
    "Inspector",
    "ContextDiff",
    "CompactionReport",
    "ChainKeyError",
    "ConcurrencyError",
    "ContextAwarePhase",
    "ContextKeyError",
    "ContextManager",
    "ContextTypeError",
    "EventCtxError",
    "EventStore",
    "HistoryRemovedError",
    "IntegrityError",
    "InvalidInputError",
    "NewEvent",
    "PhaseContextHelper",
    "PluginContext",
    "PluginRunner",
    "Provenance",
    "RecordedEvent",
    "RetryPolicy",
    "RunResult",
    "RunInProgressError",
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
}


def test_all_is_pinned() -> None:
    assert set(eventctx.__all__) == EXPECTED
    assert len(eventctx.__all__) == len(EXPECTED)


def test_every_name_resolves() -> None:
    for name in eventctx.__all__:
        assert getattr(eventctx, name) is not None


def test_errors_form_one_tree() -> None:
    errors = [getattr(eventctx, n) for n in EXPECTED if n.endswith("Error")]
    assert all(issubclass(e, eventctx.EventCtxError) for e in errors)
    assert issubclass(eventctx.ContextKeyError, KeyError)
    assert issubclass(eventctx.ContextTypeError, TypeError)
    assert issubclass(eventctx.SerializationError, TypeError)
    assert issubclass(eventctx.InvalidInputError, ValueError)
