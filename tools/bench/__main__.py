"""``make bench``: every benchmark in one run, side by side with the raw drivers and
eventsourcing; prints the tables, rewrites docs/performance.md and its two plots, and exits 1
when a target is missed."""

from __future__ import annotations

import os
import platform
import sqlite3
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import sqlalchemy as sa

from tools.bench import (
    append,
    audit,
    compaction,
    langgraph,
    maintenance,
    readside,
    restore,
    retention,
    throughput,
    writers,
)
from tools.bench.common import PG_URL, ROUNDS, Figure, pg_available, table

DOCS = Path(__file__).resolve().parents[2] / "docs"


WRITE_GOALS = {"SQLite": (0.5, 2.0), "PostgreSQL": (0.6, 2.5)}
"""(× the raw driver, × eventsourcing) each write workload must reach, by backend."""
FOLD_VS_RAW = 1.3
"""A full fold takes at most this × the raw driver's select + orjson."""
FOLD_VS_PEER = 10
"""... and is at least this × faster than eventsourcing's replay without snapshots."""
RESTORE_FLAT = 1.5
"""Restore of the largest session ≤ this × the smallest's."""
REPLAY_MIB = 32
WRITER_GOALS = {
    "postgresql threads own sessions": 2.5,
    "postgresql threads one session": 2.0,
    "sqlite FULL threads one session": 1.5,
    "sqlite threads one session": 1.0,
}
"""Four writer threads ≥ this × one thread."""


def _x(a: float, b: float) -> str:
    return f"{a / b:.2f}×"


def _throughput_section(
    results: dict[str, dict[str, Figure]],
) -> tuple[str, list[tuple[str, str, bool]]]:
    rows, targets = [], []
    for name, trio in results.items():
        ours, raw, peer = trio["eventctx"], trio["raw"], trio["eventsourcing"]
        rows.append(
            [
                name,
                ours.cell(),
                raw.cell(),
                peer.cell(),
                _x(ours.median, raw.median),
                _x(ours.median, peer.median),
            ]
        )
        raw_goal, peer_goal = WRITE_GOALS["PostgreSQL" if "PostgreSQL" in name else "SQLite"]
        targets.append(
            (
                f"{name}: ≥ {raw_goal}× raw",
                _x(ours.median, raw.median),
                ours.median >= raw_goal * raw.median,
            )
        )
        targets.append(
            (
                f"{name}: ≥ {peer_goal}× eventsourcing",
                _x(ours.median, peer.median),
                ours.median >= peer_goal * peer.median,
            )
        )
    text = table(
        "Writes: committed events per second",
        ["workload", "eventctx", "raw driver", "eventsourcing", "vs raw", "vs eventsourcing"],
        rows,
    )
    return text, targets


def _ms(fig: Figure | None) -> str:
    return "—" if fig is None else fig.cell()


def _restore_section(results: dict[str, Any]) -> tuple[str, list[tuple[str, str, bool]]]:
    rows, targets = [], []
    by_backend: dict[str, dict[int, Any]] = {}
    for name, r in results.items():
        if name == "memory":
            continue
        backend = name.split()[0]
        by_backend.setdefault(backend, {})[r["events"]] = r
        rows.append(
            [
                name + " events",
                _ms(r["snapshots"]),
                _ms(r["full fold"]),
                _ms(r["raw"]),
                _ms(r["eventsourcing snapshots"]),
                _ms(r["eventsourcing full"]),
            ]
        )
    for backend, sizes in by_backend.items():
        for n, r in sorted(sizes.items()):
            ours, peer = r["snapshots"].median, r["eventsourcing snapshots"].median
            targets.append(
                (
                    f"cold restore {n:,}, {backend}: ≤ eventsourcing's snapshot restore",
                    f"{ours:.2f} ms vs {peer:.2f} ms",
                    ours <= peer,
                )
            )
        small, large = sizes[min(sizes)], sizes[max(sizes)]
        ratio = large["snapshots"].median / small["snapshots"].median
        targets.append(
            (
                f"restore flat, {backend}: {max(sizes):,} ≤ {RESTORE_FLAT}× {min(sizes):,} events",
                f"{ratio:.2f}×",
                ratio <= RESTORE_FLAT,
            )
        )
        for n in (10_000, 100_000):
            if n in sizes:
                r = sizes[n]
                vs_raw = r["full fold"].median / r["raw"].median
                targets.append(
                    (
                        f"full fold {n:,}, {backend}: ≤ {FOLD_VS_RAW}× raw select + orjson",
                        f"{vs_raw:.2f}×",
                        vs_raw <= FOLD_VS_RAW,
                    )
                )
                peer = r["eventsourcing full"]
                if peer is not None:
                    faster = peer.median / r["full fold"].median
                    targets.append(
                        (
                            f"full fold {n:,}, {backend}: ≥ {FOLD_VS_PEER}× faster than "
                            "eventsourcing",
                            f"{faster:.1f}×",
                            faster >= FOLD_VS_PEER,
                        )
                    )
    mem = results["memory"]
    targets.append(
        (
            f"replaying 1M events adds < {REPLAY_MIB} MiB over the state",
            f"{mem['added_mib']:.1f} MiB",
            mem["added_mib"] < REPLAY_MIB,
        )
    )
    text = table(
        "Restore and fold: milliseconds (median, min–max)",
        [
            "session",
            "eventctx restore (snapshots)",
            "eventctx full fold",
            "raw select + orjson",
            "eventsourcing (snapshots)",
            "eventsourcing (no snapshots)",
        ],
        rows,
    )
    text += (
        f"\nReplaying the 1M-event session in a fresh process: peak RSS {mem['peak_mib']:.1f} MiB, "
        f"{mem['added_mib']:.1f} MiB above the {mem['before_mib']:.1f} MiB it started with "
        f"(the folded state itself encodes to {mem['state_mib']:.2f} MiB).\n"
    )
    return text, targets


def _writers_section(results: dict[str, Any]) -> tuple[str, list[tuple[str, str, bool]]]:
    rows = [
        [name, f"{r['rate']:,.0f} ev/s", f"{r['p99_ms']:.2f} ms"] for name, r in results.items()
    ]
    targets = []
    for setup, goal in WRITER_GOALS.items():
        one, four = results.get(f"{setup} 1"), results.get(f"{setup} 4")
        if one and four:
            gain = four["rate"] / one["rate"]
            targets.append(
                (f"4 writers, {setup}: ≥ {goal}× one thread", f"{gain:.2f}×", gain >= goal)
            )
    return table(
        "Concurrent writers (ctx.set)", ["writers", "throughput", "p99 latency"], rows
    ), targets


def _plot_writers(results: dict[str, Any], path: Path) -> None:
    backends = sorted({r["backend"] for r in results.values()})
    fig, axes = plt.subplots(1, len(backends), figsize=(6 * len(backends), 4), squeeze=False)
    for ax, backend in zip(axes[0], backends, strict=True):
        for kind in ("threads", "processes"):
            for shared in (True, False):
                points = sorted(
                    (r["writers"], r["rate"])
                    for r in results.values()
                    if r["backend"] == backend and r["kind"] == kind and r["shared"] == shared
                )
                label = f"{kind}, {'one session' if shared else 'own sessions'}"
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        ax.set(
            title=f"ctx.set throughput, {backend}",
            xlabel="writers",
            ylabel="events / s",
            xticks=list(writers.WRITERS),
        )
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_restore(results: dict[str, Any], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = {
        "snapshots": "eventctx restore (snapshots)",
        "full fold": "eventctx full fold",
        "raw": "raw select + orjson",
        "eventsourcing snapshots": "eventsourcing (snapshots)",
        "eventsourcing full": "eventsourcing (no snapshots)",
    }
    for backend, style in (("SQLite", "-"), ("PostgreSQL", "--")):
        rows = sorted(
            (r for n, r in results.items() if n.startswith(backend)), key=lambda r: r["events"]
        )
        if not rows:
            continue
        for key, label in series.items():
            points = [(r["events"], r[key].median) for r in rows if r[key] is not None]
            ax.plot(
                [p[0] for p in points],
                [p[1] for p in points],
                style,
                marker="o",
                label=f"{label}, {backend}",
            )
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="events in the session",
        ylabel="ms",
        title="Restore time vs history length",
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    pg = "not reachable"
    if pg_available():
        with sa.create_engine(PG_URL).connect() as conn:
            pg = str(conn.exec_driver_sql("SHOW server_version").scalar())
    return (
        f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, "
        f"SQLite {sqlite3.sqlite_version}, PostgreSQL {pg}"
    )


def main() -> int:
    started = time.perf_counter()
    sections: list[str] = []
    targets: list[tuple[str, str, bool]] = []
    print("measuring writes…", file=sys.stderr)
    text, found = _throughput_section(throughput.run())
    sections.append(text)
    targets += found
    print("measuring restore and fold…", file=sys.stderr)
    restore_results = restore.run()
    text, found = _restore_section(restore_results)
    sections.append(text)
    targets += found
    print("measuring concurrent writers…", file=sys.stderr)
    writer_results = writers.run()
    text, found = _writers_section(writer_results)
    sections.append(text)
    targets += found
    print("measuring the store's append and compaction…", file=sys.stderr)
    sections.append(append.run())
    sections.append(compaction.run())
    sections.append(retention.run())
    print("measuring the read side and maintenance at scale…", file=sys.stderr)
    sections.append(readside.run())
    sections.append(maintenance.run())
    sections.append(audit.run())
    print("measuring LangGraph checkpointing…", file=sys.stderr)
    text, found = langgraph.run()
    sections.append(text)
    targets += found
    _plot_writers(writer_results, DOCS / "bench-writers.png")
    _plot_restore(restore_results, DOCS / "bench-restore.png")
    target_rows = [[name, got, "met" if ok else "**missed**"] for name, got, ok in targets]
    body = "\n".join(sections)
    report = (
        "# Performance\n\n"
        f"Measured by `make bench` (`python -m tools.bench`) on {datetime.now(UTC):%Y-%m-%d}: "
        f"{_machine()}. Every figure is the median of {ROUNDS} rounds after a warm-up, min–max in "
        "brackets (a restore or fold figure: of as many runs as fit in "
        f"{restore.TIMED_S:g} s, at least {ROUNDS} and at most {restore.TIMED_MAX}); eventctx, "
        "the raw driver and eventsourcing (configured as fairly as we know how: explicit event "
        "classes, the same `synchronous` setting) run in the same process and take turns: a "
        "round of each at a time for a write figure, a run of each at a time for a session's "
        "restore and fold figures. "
        f"The run took {(time.perf_counter() - started) / 60:.1f} minutes.\n\n"
        + table("Targets", ["target", "measured", ""], target_rows)
        + "\n"
        + body
        + "\n![throughput vs writers](bench-writers.png)\n\n"
        + "![restore time vs history length](bench-restore.png)\n"
        + (DOCS / "performance-notes.md").read_text()
    )
    (DOCS / "performance.md").write_text(report)
    print(report)
    missed = [name for name, _, ok in targets if not ok]
    if missed:
        print(f"\n{len(missed)} target(s) missed: {'; '.join(missed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
