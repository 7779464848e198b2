"""The eventctx exception tree; every error eventctx raises is one of these.

    EventCtxError
    ├── ConcurrencyError          the session head moved (conditional write) or a version clashed
    ├── SessionNotFoundError      no such session, or it was deleted
    ├── SessionExistsError        create_context on a live session
    ├── SessionExpiredError       the session outlived its ttl
    ├── RunInProgressError        another runner holds the session's run lease
    ├── PhaseError                raised by a phase to say whether retrying it can help
    ├── SchemaError               the database has another schema version
    ├── IntegrityError            a hash chain or a stored row does not verify
    ├── HistoryRemovedError       (also LookupError) asked about events retention removed
    ├── StorageError              the database failed (connection, disk, lock timeout)
    │   └── OutcomeUnknownError   the connection failed during COMMIT and could not be checked
    ├── InvalidInputError         (also ValueError) a bad session id, key, or oversized value
    ├── ContextKeyError           (also KeyError) a missing key
    ├── ContextTypeError          (also TypeError) a stored value of another type
    └── SerializationError        (also TypeError) a value that is not JSON as eventctx defines it

Driver exceptions are translated into this tree in one place (``eventctx.store.dialect``) and
chained with ``raise … from exc``, so the original stays in ``__cause__``.
"""

from __future__ import annotations


class EventCtxError(Exception):
    """Root of every error eventctx raises."""


class ConcurrencyError(EventCtxError):
    """The session's head is not at the expected version; re-read and retry."""


class SessionNotFoundError(EventCtxError):
    """The session does not exist (or was deleted)."""


class SessionExistsError(EventCtxError):
    """The session already exists."""


class SessionExpiredError(EventCtxError):
    """The session outlived its ttl and was (or is being) removed."""


class RunInProgressError(EventCtxError):
    """Another runner holds the session's run lease."""


class PhaseError(EventCtxError):
    """Raised by a phase to say whether retrying it can help (``retryable``); the runner reads
    a ``retryable`` attribute on any exception the same way."""

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


class SchemaError(EventCtxError):
    """The database's schema version is not the one this eventctx speaks."""


class ChainKeyError(EventCtxError):
    """The database's hash chains are keyed and no key, or another key, was given; or a key
    was given for a database whose chains are not keyed."""


class IntegrityError(EventCtxError):
    """Stored events fail verification: a broken hash chain, a gap, or a corrupted row."""

    def __init__(
        self, message: str, *, session_id: str | None = None, version: int | None = None
    ) -> None:
        super().__init__(message)
        self.session_id = session_id
        """The session whose log failed, when known."""
        self.version = version
        """The first version that failed, when known."""


class HistoryRemovedError(EventCtxError, LookupError):
    """The question is about the part of a session's history that retention folded into its
    base and removed (``base_version``: the oldest version that can still be answered)."""

    def __init__(self, message: str, *, session_id: str, base_version: int) -> None:
        super().__init__(message)
        self.session_id = session_id
        self.base_version = base_version


class StorageError(EventCtxError):
    """The database failed to carry out an operation; nothing of it was committed."""


class OutcomeUnknownError(StorageError):
    """The connection failed while committing and the outcome could not be checked: the write
    may or may not be stored. Read the session before writing it again."""


class InvalidInputError(EventCtxError, ValueError):
    """An argument breaks a documented rule (session id, key, size limits); nothing was written."""


class ContextKeyError(EventCtxError, KeyError):
    """The key is not in the context."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the message readable
        return str(self.args[0]) if self.args else ""


class ContextTypeError(EventCtxError, TypeError):
    """The stored value is not of the requested type."""


class SerializationError(EventCtxError, TypeError):
    """A value cannot be stored: it is not JSON as eventctx defines it."""
