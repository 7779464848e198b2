"""Storage: one EventStore over SQLAlchemy 2 Core, with small per-backend dialect modules."""

from eventctx.store.core import EventStore, Head, SessionHead

__all__ = ["EventStore", "Head", "SessionHead"]
