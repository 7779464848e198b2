"""Live counters of a ContextManager, and the histograms they and the log-derived metrics share.

The counters are bumped where things happen (an append, a restore, a cleanup) under one lock:
an uncontended lock costs a fraction of a microsecond, an append tens of them at least, and no
count is lost however many threads write. ``ContextManager.metrics()`` reads them as a
``LiveMetrics``.
"""

from __future__ import annotations

import math
import threading
from bisect import bisect_left
from dataclasses import dataclass
from typing import Final, Literal, get_args

__all__ = ["APPEND_BUCKETS", "Bins", "Counters", "Histogram", "LiveMetrics"]

APPEND_BUCKETS: Final = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)
"""Upper bounds (seconds) of the append latency buckets: a grouped SQLite commit to a slow,
contended PostgreSQL one."""

Count = Literal["created", "restored", "expired", "snapshots", "cleanups"]


@dataclass(frozen=True, slots=True)
class Histogram:
    """Observations sorted into buckets: ``counts[i]`` of them were at most ``bounds[i]`` (and
    above the bound before it); the last count is of those above every bound. ``sum`` is the
    total of the observations."""

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    sum: float

    @property
    def count(self) -> int:
        """How many observations there were."""
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations at most it) per bucket, ending with (inf, count): the
        form Prometheus exposes."""
        running, result = 0, []
        for bound, count in zip((*self.bounds, math.inf), self.counts, strict=True):
            running += count
            result.append((bound, running))
        return result


class Bins:
    """A histogram being filled (not thread-safe: its owner serializes ``observe``)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        """Count ``value`` in the first bucket whose bound is at least ``value``."""
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def freeze(self) -> Histogram:
        """The histogram as it stands."""
        return Histogram(self.bounds, tuple(self.counts), self.sum)


@dataclass(frozen=True, slots=True)
class LiveMetrics:
    """What one ContextManager did since it was built (``contexts_active``: now).

    Counts only this manager's work, in this process; the log's history is in
    ``eventctx.metrics.log_metrics``.
    """

    contexts_active: int
    """Contexts held in the manager's cache (dropped when nothing references them)."""
    contexts_created: int
    """Sessions created (``create_context``, ``get_or_create_context``, ``clone``)."""
    contexts_restored: int
    """Contexts restored from the store by ``get_context`` (not found in the cache)."""
    contexts_expired: int
    """Sessions its cleanups removed."""
    appends: int
    """Append transactions committed (writes, creations, deletions)."""
    append_seconds: Histogram
    """How long each committed append took, from the call to the commit."""
    snapshots: int
    """Snapshots taken after appends."""
    cleanups: int
    """Cleanups run (scheduled or called; dry runs aside)."""


class Counters:
    """The live counts of one manager, shared with its contexts. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[Count, int] = dict.fromkeys(get_args(Count), 0)
        self._appends = Bins(APPEND_BUCKETS)

    def add(self, what: Count, n: int = 1) -> None:
        """Count ``n`` more of ``what``."""
        with self._lock:
            self._counts[what] += n

    def appended(self, seconds: float) -> None:
        """Count a committed append that took ``seconds``."""
        with self._lock:
            self._appends.observe(seconds)

    def read(self, contexts_active: int) -> LiveMetrics:
        """The counts as they stand, with the number of contexts the manager holds."""
        with self._lock:
            counts, appends = dict(self._counts), self._appends.freeze()
        return LiveMetrics(
            contexts_active,
            counts["created"],
            counts["restored"],
            counts["expired"],
            appends.count,
            appends,
            counts["snapshots"],
            counts["cleanups"],
        )
