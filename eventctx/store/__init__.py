"""Storage: one EventStore over SQLAlchemy 2 Core, with small per-backend dialect modules."""

from eventctx.store.core import EventStore
from eventctx.store.heads import Fence, Head, LeaseHolder, SessionHead

__all__ = ["EventStore", "Fence", "Head", "LeaseHolder", "SessionHead"]
