"""Storage: one EventStore over SQLAlchemy 2 Core, with small per-backend dialect modules."""

from eventctx.store.core import EventStore
from eventctx.store.heads import Fence, Head, LeaseHolder, SessionHead
from eventctx.store.statements import EventRow

__all__ = ["EventRow", "EventStore", "Fence", "Head", "LeaseHolder", "SessionHead"]
