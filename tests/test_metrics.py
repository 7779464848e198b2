"""Metrics: counted from the log (and checked against it), a manager's live counters, the
Prometheus collector, and ``eventctx metrics``."""

from __future__ import annotations

import gc
import math
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import eventctx
from eventctx import ContextManager, EventStore, Inspector, PluginRunner, runlog
from eventctx.cli import main
from eventctx.cli_inspect import parse_time
from eventctx.metrics import (
    DURATION_BUCKETS,
    PrometheusCollector,
    log_metrics,
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


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m eventctx ARGS`` as a real process."""
    return subprocess.run(
        [sys.executable, "-m", "eventctx", *args],
        check=False,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=120,
    )


def assert_one_line(err: str) -> None:
    assert err.startswith("eventctx: ") and err.count("\n") == 1, err
    assert "Traceback" not in err


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


def test_parse_time() -> None:
    now = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    assert parse_time("90s", now) == now - timedelta(seconds=90)
    assert parse_time("2h", now) == now - timedelta(hours=2)
    assert parse_time("7d", now) == now - timedelta(days=7)
    assert parse_time("2024-05-01T10:00:00Z") == datetime(2024, 5, 1, 10, tzinfo=UTC)
    at = parse_time("2024-05-01T10:00:00+02:00")
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
    gc.collect()  # contexts are held weakly: none may be collected between the two reads
    gc.disable()
    try:
        found = samples(generate_latest(registry).decode())
        live = manager.metrics()
    finally:
        gc.enable()
    check_log_samples(found, manager.store)
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


def test_eventctx_metrics_prometheus_parses_and_matches_the_log(db_url: str) -> None:
    with ContextManager(db_url, cleanup_interval=None) as manager:
        record_runs(manager)
    done = run_cli("--url", db_url, "metrics", "--format", "prometheus")
    assert done.returncode == 0, done.stderr
    with EventStore.open(db_url, read_only=True) as store:
        check_log_samples(samples(done.stdout), store)


def test_the_collector_needs_prometheus_client(
    manager: ContextManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install 'eventctx\[prometheus\]'"):
        PrometheusCollector(manager)
    assert log_metrics(manager.store).phases == {}  # the rest works without it


def test_importing_eventctx_metrics_needs_no_prometheus_client(db_url: str) -> None:
    with ContextManager(db_url, cleanup_interval=None) as manager:
        record_runs(manager)
    script = (
        "import sys; sys.modules['prometheus_client'] = None\n"
        "import eventctx.metrics\n"
        "from eventctx.cli import main\n"
        "assert main(['--url', sys.argv[1], 'metrics']) == 0\n"
        "sys.exit(main(['--url', sys.argv[1], 'metrics', '--format', 'prometheus']))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, db_url], capture_output=True, text=True, check=False
    )
    assert done.returncode == 1 and "flaky" in done.stdout
    assert_one_line(done.stderr)
    assert "pip install 'eventctx[prometheus]'" in done.stderr


# --- the command -----------------------------------------------------------------------------


def test_eventctx_metrics_json_and_table(db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    with ContextManager(db_url, cleanup_interval=None) as manager:
        record_runs(manager)
    assert main(["--url", db_url, "metrics", "--format", "json"]) == 0
    doc = orjson.loads(capsys.readouterr().out)
    counted = {p: (m["attempts"], m["failures"], m["retries"]) for p, m in doc["phases"].items()}
    assert counted == EXPECTED and doc["runs"] == EXPECTED_RUNS
    flaky_seconds = doc["phases"]["flaky"]["duration_seconds"]
    assert flaky_seconds["count"] == flaky_seconds["buckets"]["+Inf"] == 4
    assert main(["--url", db_url, "--json", "metrics"]) == 0  # --json means the same
    assert orjson.loads(capsys.readouterr().out) == doc

    assert main(["--url", db_url, "metrics"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["PHASE", "ATTEMPTS", "FAILURES", "RETRIES", "P50", "P95", "P99"]
    rows = {line.split()[0]: line.split()[1:4] for line in table[1:4]}
    assert rows == {p: [str(n) for n in counts] for p, counts in EXPECTED.items()}
    assert len({len(line) for line in table[:4]}) == 1  # aligned columns
    assert "runs: 2 completed, 1 failed" in table

    assert main(["--url", db_url, "--json", "metrics", "--phase", "broken", "--since", "1h"]) == 0
    doc = orjson.loads(capsys.readouterr().out)
    assert list(doc["phases"]) == ["broken"] and doc["runs"] is None and doc["phase"] == "broken"
    assert main(["--url", db_url, "metrics", "--since", "2999-01-01T00:00:00Z"]) == 0
    assert "(no phase attempt ended)" in capsys.readouterr().out


def test_eventctx_metrics_errors(tmp_path: Path, db_url: str) -> None:
    EventStore.open(db_url).close()
    unknown = run_cli("--url", db_url, "metrics", "--format", "xml")
    assert unknown.returncode == 2 and "invalid choice: 'xml'" in unknown.stderr
    for since in ("yesterday", "2024-05-01T10:00:00", "99999999999d"):
        bad = run_cli("--url", db_url, "metrics", "--since", since)
        assert bad.returncode == 2 and bad.stdout == "", since
        assert_one_line(bad.stderr)
        assert bad.stderr.startswith(f"eventctx: argument --since: '{since}'")
    missing = tmp_path / "typo.db"
    gone = run_cli("--url", f"sqlite:///{missing}", "metrics")
    assert gone.returncode == 1 and gone.stdout == ""
    assert gone.stderr == f"eventctx: no database at {missing}\n"
    assert not missing.exists()
