"""Metrics: counted from the log (and checked against it), a manager's live counters, the
Prometheus collector."""

from __future__ import annotations

import math
import sys
import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import eventctx
from eventctx import ContextManager, EventStore, Inspector, PluginRunner, runlog
from eventctx.metrics import (
    DURATION_BUCKETS,
    PrometheusCollector,
    log_metrics,
    parse_since,
)

ENDS = {"PhaseCompleted", "PhaseFailed"}
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


# --- phases, and the runs they make --------------------------------------------------------


def fetch(run_input: object) -> dict[str, int]:
    time.sleep(0.01)
    eventctx.current_context().set("fetched", True)
    return {"items": 3}


def flaky(run_input: object) -> str:
    """Fails the first attempt of each run; the retry succeeds."""
    eventctx.current_context().set("tried", True)
    if "flaky" not in eventctx.helper().errors():
        raise RuntimeError("first attempt fails")
    return "ok"


def broken(run_input: object) -> None:
    raise ValueError("always fails")


def record_runs(manager: ContextManager) -> None:
    """Two runs that complete after a retry of ``flaky``, one that fails in ``broken``."""
    retrying = PluginRunner(manager, [fetch, flaky], retries=1)
    assert retrying.run("a", input={"n": 1}).status == "completed"
    assert retrying.run("b", input={"n": 2}).status == "completed"
    failing = PluginRunner(manager, [fetch, broken], retries=1)
    assert failing.run("c", input={"n": 3}).status == "failed"


# Counted by hand from record_runs: attempts, failures, retries per phase.
EXPECTED = {"broken": (2, 2, 1), "fetch": (3, 0, 0), "flaky": (4, 2, 2)}
EXPECTED_RUNS = {"completed": 2, "failed": 1}


def ends_per_phase(store: EventStore) -> Counter[str]:
    """Phase attempts in the log, counted from their end events."""
    return Counter(str(e.phase) for e in store.find(types=ENDS))


def events_per_type(store: EventStore) -> Counter[str]:
    return Counter(e.type for s in store.sessions() for e in store.read(s.session_id))


def samples(text: str) -> Samples:
    """Every sample of a Prometheus text exposition, by name and labels."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def check_log_samples(found: Samples, store: EventStore) -> None:
    """The log-derived samples agree with the log and with the hand counts."""
    ends = ends_per_phase(store)
    assert set(ends) == set(EXPECTED)
    for phase, (attempts, failures, retries) in EXPECTED.items():
        label = frozenset({("phase", phase)})
        assert found["eventctx_phase_duration_seconds_count", label] == ends[phase] == attempts
        assert found["eventctx_phase_attempts_total", label] == attempts
        assert found["eventctx_phase_failures_total", label] == failures
        assert found["eventctx_phase_retries_total", label] == retries
        inf = frozenset({("phase", phase), ("le", "+Inf")})
        assert found["eventctx_phase_duration_seconds_bucket", inf] == attempts
        total = sum(e.payload["duration_ms"] / 1000 for e in store.find(types=ENDS, phase=phase))
        assert found["eventctx_phase_duration_seconds_sum", label] == pytest.approx(total)
        les = sorted(
            float(dict(labels)["le"])
            for name, labels in found
            if name == "eventctx_phase_duration_seconds_bucket" and ("phase", phase) in labels
        )
        assert les == [*DURATION_BUCKETS, math.inf]
    for status, n in EXPECTED_RUNS.items():
        assert found["eventctx_runs_total", frozenset({("status", status)})] == n
    by_type = {
        dict(labels)["type"]: value
        for (name, labels), value in found.items()
        if name == "eventctx_events_total"
    }
    assert by_type == events_per_type(store)


# --- from the log --------------------------------------------------------------------------


def test_log_metrics_count_what_the_runs_recorded(manager: ContextManager) -> None:
    record_runs(manager)
    found = log_metrics(manager.store)
    counted = {p: (m.attempts, m.failures, m.retries) for p, m in found.phases.items()}
    assert counted == EXPECTED
    assert found.runs == EXPECTED_RUNS
    assert found.events == events_per_type(manager.store)
    stats = Inspector(manager.store).phase_stats()  # the Inspector's own percentiles
    for phase, metrics in found.phases.items():
        assert metrics.durations.count == metrics.attempts
        assert metrics.durations.bounds == DURATION_BUCKETS
        assert metrics.p50_s == pytest.approx(stats[phase].p50_ms / 1000)
        assert metrics.p95_s == pytest.approx(stats[phase].p95_ms / 1000)
        assert metrics.p99_s == pytest.approx(stats[phase].p99_ms / 1000)
    fetched = found.phases["fetch"].durations
    assert fetched.counts[DURATION_BUCKETS.index(0.01)] == 0  # it sleeps 10 ms, so more
    assert sum(fetched.counts[DURATION_BUCKETS.index(0.025) :]) == 3


def test_one_phase_and_since_filter_the_log(manager: ContextManager) -> None:
    record_runs(manager)
    flaky_only = log_metrics(manager.store, phase="flaky")
    assert list(flaky_only.phases) == ["flaky"] and flaky_only.phases["flaky"].attempts == 4
    assert flaky_only.runs is None  # runs belong to no phase
    in_flaky = Counter(e.type for e in manager.store.find(phase="flaky"))
    assert flaky_only.events == in_flaky and in_flaky["KeySet"] == 4
    later = datetime.now(UTC)
    assert log_metrics(manager.store, since=later).phases == {}
    PluginRunner(manager, [fetch]).run("d")
    recent = log_metrics(manager.store, since=later)
    assert list(recent.phases) == ["fetch"] and recent.runs == {"completed": 1, "failed": 0}
    with pytest.raises(eventctx.InvalidInputError, match="naive"):
        log_metrics(manager.store, since=datetime(2024, 1, 1))


def test_an_interrupted_attempt_counts_but_has_no_duration(manager: ContextManager) -> None:
    ctx = manager.create_context("crashed")
    ctx.writer.append(  # what a process that died inside ``fetch`` left behind
        [runlog.run_started("e1", None, ["fetch"]), runlog.phase_started("e1", "fetch", 1)]
    )
    assert PluginRunner(manager, [fetch]).run("crashed", resume=True).status == "completed"
    fetched = log_metrics(manager.store).phases["fetch"]
    assert (fetched.attempts, fetched.failures, fetched.retries) == (2, 1, 1)
    assert fetched.durations.count == 1  # the interrupted attempt's time is unknown


def test_parse_since() -> None:
    now = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    assert parse_since("90s", now) == now - timedelta(seconds=90)
    assert parse_since("2h", now) == now - timedelta(hours=2)
    assert parse_since("7d", now) == now - timedelta(days=7)
    assert parse_since("2024-05-01T10:00:00Z") == datetime(2024, 5, 1, 10, tzinfo=UTC)
    at = parse_since("2024-05-01T10:00:00+02:00")
    assert at == datetime(2024, 5, 1, 8, tzinfo=UTC)


# --- live counters ---------------------------------------------------------------------------


def test_manager_metrics_count_exactly(db_url: str) -> None:
    with ContextManager(db_url, cleanup_interval=None, snapshot_every=5) as manager:
        fresh = manager.metrics()
        assert (fresh.appends, fresh.contexts_created, fresh.contexts_active) == (0, 0, 0)
        a = manager.create_context("a")
        for i in range(12):
            a.set("k", i)
        a.update({"x": 1, "y": 2})  # one append, two events
        short = manager.create_context("short", ttl=timedelta(milliseconds=50))
        a.clone("copy")  # created, in one append
        manager.delete_context("copy")
        time.sleep(0.1)
        manager.cleanup_expired(dry_run=True)  # not a cleanup run
        assert manager.cleanup_expired().sessions == ["short"]
        del short
        live = manager.metrics()
        assert live.contexts_created == 3
        assert live.appends == 1 + 12 + 1 + 1 + 1 + 1  # creates, sets, update, clone, delete
        assert live.append_seconds.count == live.appends
        assert 0 < live.append_seconds.sum < 60
        assert (live.contexts_expired, live.cleanups, live.contexts_restored) == (1, 1, 0)
        assert live.contexts_active == 1  # "a"; "copy" and "short" are gone
        snapshots = sum(len(manager.store.snapshots(s)) for s in ("a", "copy"))
        assert live.snapshots == snapshots > 0
    with ContextManager(db_url, cleanup_interval=None) as other:
        held = other.get_context("a")
        assert other.get_context("a") is held  # from the cache: restored once
        live = other.metrics()
        assert (live.contexts_restored, live.contexts_created, live.appends) == (1, 0, 0)
        assert live.contexts_active == 1
        held.set("z", 0)
        assert other.metrics().appends == 1


def test_concurrent_appends_are_all_counted(manager: ContextManager) -> None:
    writes, threads = 50, 4
    shared = manager.create_context("shared")
    before = manager.metrics().appends
    start = threading.Barrier(threads)

    def write(n: int) -> None:
        own = manager.create_context(f"own-{n}")
        start.wait()
        for i in range(writes):
            (shared if i % 2 else own).set(f"k{n}", i)

    workers = [threading.Thread(target=write, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    live = manager.metrics()
    assert live.appends - before == threads * writes + threads  # the writes, and the creates
    assert live.append_seconds.count == live.appends
    assert shared.version == 1 + threads * writes // 2


# --- Prometheus ------------------------------------------------------------------------------


def test_the_collector_exposes_the_log_and_the_manager(manager: ContextManager) -> None:
    record_runs(manager)
    registry = CollectorRegistry()  # auto_describe: it asks describe() when registered
    registry.register(PrometheusCollector(manager))
    found = samples(generate_latest(registry).decode())
    check_log_samples(found, manager.store)
    live = manager.metrics()
    none: frozenset[tuple[str, str]] = frozenset()
    assert found["eventctx_contexts_created_total", none] == live.contexts_created == 3
    assert found["eventctx_append_duration_seconds_count", none] == live.appends
    assert found["eventctx_contexts_active", none] == live.contexts_active
    assert found["eventctx_cleanups_total", none] == 0
    store_only = CollectorRegistry()
    store_only.register(PrometheusCollector(manager.store))
    names = {name for name, _ in samples(generate_latest(store_only).decode())}
    assert "eventctx_phase_attempts_total" in names
    assert not any(n.startswith(("eventctx_contexts", "eventctx_append")) for n in names)


def test_the_collector_needs_prometheus_client(
    manager: ContextManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install 'eventctx\[prometheus\]'"):
        PrometheusCollector(manager)
    assert log_metrics(manager.store).phases == {}  # the rest works without it
