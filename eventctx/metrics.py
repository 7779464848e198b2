"""Metrics of phases and runs, computed from the log, and a Prometheus collector for them.

``log_metrics(store)`` reads the log once and counts its history: how long phase attempts took
(a histogram per phase, with percentiles), how many ended, failed and were retries, runs by
how they ended, events by type. ``ContextManager.metrics()`` gives a manager's live counters
(``LiveMetrics``). ``PrometheusCollector`` exposes both to Prometheus; it needs the optional
``prometheus-client`` (``pip install eventctx[prometheus]``), nothing else here does.
"""

from __future__ import annotations

import importlib.util
import statistics
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final

from eventctx.counters import Bins, Histogram, LiveMetrics
from eventctx.errors import InvalidInputError
from eventctx.events import to_us
from eventctx.retention import ENDS, Kept, end_status, every_base
from eventctx.runlog import INTERRUPTED
from eventctx.store import EventStore

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from eventctx.manager import ContextManager

__all__ = [
    "DURATION_BUCKETS",
    "Histogram",
    "LiveMetrics",
    "LogMetrics",
    "PhaseMetrics",
    "PrometheusCollector",
    "as_document",
    "as_table",
    "log_metrics",
    "prometheus_text",
]

DURATION_BUCKETS: Final = (
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
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1800.0,
    3600.0,
    7200.0,
    14400.0,
)
"""Upper bounds (seconds) of the phase duration buckets: a millisecond to four hours, about
three buckets per tenfold (longer attempts land in the +Inf bucket)."""

_RUN_ENDS: Final = {"RunCompleted": "completed", "RunFailed": "failed"}


@dataclass(frozen=True, slots=True)
class PhaseMetrics:
    """The ended attempts of one phase.

    ``failures`` includes interrupted attempts (their process died); those have no duration,
    so ``durations`` and the percentiles hold the completed and failed ones only.
    """

    attempts: int
    failures: int
    retries: int
    """Attempts after the first of their phase in a run."""
    durations: Histogram
    """Seconds, in ``DURATION_BUCKETS``."""
    p50_s: float | None
    """Percentiles in seconds, interpolated between the closest ranks (None: no duration)."""
    p95_s: float | None
    p99_s: float | None


@dataclass(frozen=True, slots=True)
class LogMetrics:
    """What the log holds (optionally for one phase, since a time): per phase attempts and
    durations, runs by how they ended, events by type."""

    phases: dict[str, PhaseMetrics] = field(default_factory=dict)
    """By phase name, sorted."""
    runs: dict[str, int] | None = field(default_factory=dict)
    """Runs ended, by status ("completed", "failed"); None for one phase (runs have none)."""
    events: dict[str, int] = field(default_factory=dict)
    """Events by type, sorted."""
    phase: str | None = None
    """The phase counted, or None for all."""
    since: datetime | None = None
    """The earliest time counted, or None for the whole log."""


def log_metrics(
    store: EventStore, *, phase: str | None = None, since: datetime | None = None
) -> LogMetrics:
    """Count the log's history in one streamed pass over the events of every session (of
    ``phase`` only, recorded at or after ``since``, both filtered in the database).

    Cost: every matching event travels once; memory per phase attempt (for the percentiles).
    Compaction removes expired sessions' events, so the counts drop when it does; the phase
    attempts retention folded into live sessions' bases still count.
    """
    if since is not None and not isinstance(since, datetime):
        raise InvalidInputError(f"since must be a datetime, not {type(since).__name__}")
    try:
        since_us = None if since is None else to_us(since)
    except ValueError as exc:
        raise InvalidInputError(f"since: {exc}") from None
    counts: dict[str, list[int]] = {}  # phase -> [attempts, failures, retries]
    durations: dict[str, list[float]] = {}
    runs = {"completed": 0, "failed": 0}
    events: dict[str, int] = {}

    def attempt(name: str, number: int, status: str, duration_ms: float | None) -> None:
        count = counts.setdefault(name, [0, 0, 0])
        count[0] += 1
        count[1] += status != "completed"
        count[2] += number > 1
        if status != INTERRUPTED and duration_ms is not None:
            durations.setdefault(name, []).append(duration_ms / 1000)

    bases = every_base(store)
    for kept in bases.values():  # the attempts retention folded into a base
        for _, at, _, name, number, status, ms, _ in Kept.of(kept).ends:
            if (phase is None or name == phase) and (since_us is None or at >= since_us):
                attempt(name, number, status, ms)
    for event in store.find(phase=phase, since_us=since_us):
        base = bases.get(event.session_id)
        if base is not None and event.version <= base.version:
            continue  # being removed by retention: counted from its base
        kind = event.type
        events[kind] = events.get(kind, 0) + 1
        if kind in _RUN_ENDS:
            runs[_RUN_ENDS[kind]] += 1
        elif kind in ENDS:
            payload = event.payload
            attempt(str(event.phase), payload["attempt"], end_status(event), payload["duration_ms"])
    return LogMetrics(
        {
            name: _phase_metrics(count, durations.get(name, []))
            for name, count in sorted(counts.items())
        },
        None if phase is not None else runs,
        dict(sorted(events.items())),
        phase,
        since,
    )


def _phase_metrics(count: list[int], seconds: list[float]) -> PhaseMetrics:
    """A phase's metrics from its [attempts, failures, retries] and its attempts' durations;
    percentiles interpolate linearly between the closest ranks."""
    bins = Bins(DURATION_BUCKETS)
    for value in seconds:
        bins.observe(value)
    cuts: list[float | None] = [seconds[0] if seconds else None] * 99  # one: every percentile
    if len(seconds) > 1:
        cuts = [*statistics.quantiles(seconds, n=100, method="inclusive")]
    p50, p95, p99 = cuts[49], cuts[94], cuts[98]
    return PhaseMetrics(count[0], count[1], count[2], bins.freeze(), p50, p95, p99)


# --- rendering ---------------------------------------------------------------------------------


def as_document(metrics: LogMetrics) -> dict[str, Any]:
    """The metrics as one JSON-ready document (histogram buckets cumulative, keyed by their
    upper bound as Prometheus writes it)."""
    return {
        "phase": metrics.phase,
        "since": None if metrics.since is None else metrics.since.isoformat(),
        "runs": metrics.runs,
        "events": metrics.events,
        "phases": {
            name: {
                "attempts": p.attempts,
                "failures": p.failures,
                "retries": p.retries,
                "p50_s": p.p50_s,
                "p95_s": p.p95_s,
                "p99_s": p.p99_s,
                "duration_seconds": {
                    "count": p.durations.count,
                    "sum": p.durations.sum,
                    "buckets": {_le(b): n for b, n in p.durations.cumulative()},
                },
            }
            for name, p in metrics.phases.items()
        },
    }


def as_table(metrics: LogMetrics) -> list[str]:
    """The metrics as aligned columns for people: one row per phase, then runs and events."""
    phases = [
        (name, p.attempts, p.failures, p.retries, *map(_duration, (p.p50_s, p.p95_s, p.p99_s)))
        for name, p in metrics.phases.items()
    ]
    lines = _aligned([("PHASE", "ATTEMPTS", "FAILURES", "RETRIES", "P50", "P95", "P99"), *phases])
    if not phases:
        lines.append("(no phase attempt ended)")
    if metrics.runs is not None:
        lines += ["", "runs: " + ", ".join(f"{n} {status}" for status, n in metrics.runs.items())]
    if metrics.events:
        lines += ["", *_aligned([("EVENT TYPE", "COUNT"), *metrics.events.items()])]
    return lines


def _aligned(rows: list[tuple[object, ...]]) -> list[str]:
    """Rows as lines: the first column left-aligned to its widest cell, the others
    right-aligned in 8 characters, two spaces apart."""
    width = max(len(str(row[0])) for row in rows)
    return [
        f"{first!s:<{width}}  " + "  ".join(f"{cell!s:>8}" for cell in cells)
        for first, *cells in rows
    ]


def _duration(seconds: float | None) -> str:
    """``seconds`` for a table cell: ms below a second, s below a minute, then m and h."""
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.1f}ms"
    if seconds < 60:
        return f"{seconds:.2f}s"
    minutes, rest = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{rest:02d}s"
    return f"{minutes // 60}h{minutes % 60:02d}m"


def _le(bound: float) -> str:
    """A bucket's upper bound as Prometheus writes it."""
    return "+Inf" if bound == float("inf") else repr(float(bound))


# --- Prometheus ------------------------------------------------------------------------------


def _require_prometheus() -> None:
    """Raise an ImportError that says how to install prometheus-client when it is missing
    (it is imported where used: importing this module never needs it)."""
    if importlib.util.find_spec("prometheus_client") is None:
        raise ImportError(
            "eventctx's Prometheus collector needs prometheus-client: "
            "pip install 'eventctx[prometheus]'"
        )


class PrometheusCollector:
    """A Prometheus collector of the log's metrics, and of a manager's live counters when
    given a ContextManager; register it with ``prometheus_client.REGISTRY.register``.

    Each scrape runs ``log_metrics`` (one pass over the log, or over one ``phase`` and what
    was recorded ``since``): scrape a large log at a matching interval. Needs
    ``prometheus-client`` (ImportError here otherwise).
    """

    def __init__(
        self,
        source: ContextManager | EventStore,
        *,
        phase: str | None = None,
        since: datetime | None = None,
    ) -> None:
        """Collect from ``source``: a store (log metrics) or a manager (and its counters)."""
        _require_prometheus()
        self._manager = None if isinstance(source, EventStore) else source
        self._store = source if isinstance(source, EventStore) else source.store
        self._phase, self._since = phase, since

    def describe(self) -> list[Metric]:
        """The metric families, without samples: registering reads no database."""
        return self._families(LogMetrics(), self._live())

    def collect(self) -> list[Metric]:
        """The metric families with their current values."""
        found = log_metrics(self._store, phase=self._phase, since=self._since)
        return self._families(found, self._live())

    def _live(self) -> LiveMetrics | None:
        return None if self._manager is None else self._manager.metrics()

    @staticmethod
    def _families(log: LogMetrics, live: LiveMetrics | None) -> list[Metric]:
        from prometheus_client.core import (  # noqa: PLC0415
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        durations = HistogramMetricFamily(
            "eventctx_phase_duration_seconds",
            "Duration of phase attempts that completed or failed (from the log).",
            labels=["phase"],
        )
        per_phase = {
            "attempts": "Phase attempts ended, interrupted ones included (from the log).",
            "failures": "Phase attempts that failed or were interrupted (from the log).",
            "retries": "Phase attempts after the first in their run (from the log).",
        }
        counters = {
            what: CounterMetricFamily(f"eventctx_phase_{what}_total", text, labels=["phase"])
            for what, text in per_phase.items()
        }
        for name, p in log.phases.items():
            durations.add_metric([name], _buckets(p.durations), p.durations.sum)
            for what, family in counters.items():
                family.add_metric([name], getattr(p, what))
        runs = CounterMetricFamily(
            "eventctx_runs_total", "Runs ended, by status (from the log).", labels=["status"]
        )
        for status, n in (log.runs or {}).items():
            runs.add_metric([status], n)
        events = CounterMetricFamily(
            "eventctx_events_total", "Events in the log, by type.", labels=["type"]
        )
        for kind, n in log.events.items():
            events.add_metric([kind], n)
        families: list[Metric] = [durations, *counters.values(), runs, events]
        if live is None:
            return families
        appends = HistogramMetricFamily(
            "eventctx_append_duration_seconds",
            "Duration of this manager's committed appends (_count counts them).",
        )
        appends.add_metric([], _buckets(live.append_seconds), live.append_seconds.sum)
        totals = {
            "contexts_created": live.contexts_created,
            "contexts_restored": live.contexts_restored,
            "contexts_expired": live.contexts_expired,
            "snapshots": live.snapshots,
            "cleanups": live.cleanups,
        }
        return [
            *families,
            GaugeMetricFamily(
                "eventctx_contexts_active",
                "Contexts held in this manager's cache.",
                value=live.contexts_active,
            ),
            appends,
            *(
                CounterMetricFamily(
                    f"eventctx_{what}_total", f"{what.replace('_', ' ')} by this manager.", n
                )
                for what, n in totals.items()
            ),
        ]


def _buckets(histogram: Histogram) -> list[tuple[str, float]]:
    return [(_le(bound), n) for bound, n in histogram.cumulative()]


def prometheus_text(
    store: EventStore, *, phase: str | None = None, since: datetime | None = None
) -> str:
    """The store's log metrics in the Prometheus text exposition format."""
    _require_prometheus()
    from prometheus_client import CollectorRegistry, generate_latest  # noqa: PLC0415

    registry = CollectorRegistry(auto_describe=False)
    registry.register(PrometheusCollector(store, phase=phase, since=since))
    return generate_latest(registry).decode()
