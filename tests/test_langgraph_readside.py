"""The read side on LangGraph threads: blame names nodes, stats time them, threads diff and
fork like copy_thread, and the command line reads a thread by its id."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("langgraph.graph", reason="needs eventctx[langgraph]")

from langgraph.types import Command

from eventctx import Inspector, InvalidInputError, RecordedEvent
from eventctx.cli import main
from eventctx.integrations.langgraph import EventCtxSaver

sys.path.insert(0, str(Path(__file__).parent))
from langgraph_graph import DEADLINE, build

NODES = ["__start__", "analyse", "approve", "plan", "report"]


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Two reviewed threads: "a" approved, "b" (another change) rejected."""
    url = f"sqlite:///{tmp_path_factory.mktemp('lg') / 'threads.db'}"
    with EventCtxSaver(url) as saver:
        graph = build(saver)
        for thread, change, verdict in (("a", "main.go util.go", "approved"), ("b", "x.go", "no")):
            config = {"configurable": {"thread_id": thread}}
            graph.invoke({"change": change, "notes": []}, config)
            graph.invoke(Command(resume=verdict), config)
    yield url


def test_blame_names_the_node_that_wrote_each_channel(url: str) -> None:
    with Inspector(url) as insp:
        blame = insp.blame("a")
    assert blame["change"].phase == "__start__"
    assert blame["files"].phase == "analyse"
    assert blame["files"].value == ["main.go", "util.go"]  # JSON stays readable
    assert blame["deadline"].phase == "plan"
    assert blame["verdict"].phase == "approve"
    assert blame["notes"].phase == "report"
    assert blame["notes"].previous[-1] == "verdict: approved"
    # one execution across the interrupt and the resume
    assert len({w.execution_id for w in blame.values()}) == 1


def test_phase_stats_per_node(url: str) -> None:
    with Inspector(url) as insp:
        stats = insp.phase_stats("a")
        assert sorted(stats) == NODES
        assert all(s.count == 1 and s.failures == 0 for s in stats.values())
        assert all(s.max_ms is not None and s.max_ms >= 0 for s in stats.values())
        assert sorted(insp.phase_stats()) == NODES  # over every thread
        assert insp.phase_stats()["report"].count == 2


def test_diff_sessions_of_two_threads(url: str) -> None:
    with Inspector(url) as insp:
        diff = insp.diff_sessions("a", "b")
    assert diff.first_divergence == "__start__"
    phases = {p.phase: p for p in diff.phases}
    assert set(phases) == set(NODES)
    assert phases["approve"].keys["verdict"] == ("approved", "no")
    assert phases["analyse"].keys["files"] == (["main.go", "util.go"], ["x.go"])


def _shape(events: Iterator[RecordedEvent]) -> list[tuple[object, ...]]:
    return [(e.version, e.type, e.key, e.phase, e.execution_id, e.payload) for e in events]


def test_fork_is_copy_thread(url: str) -> None:
    with EventCtxSaver(url) as saver:
        saver.copy_thread("a", "copied")
        with Inspector(saver.store) as insp:
            insp.fork("a", "forked")
            assert _shape(insp.history("copied")) == _shape(insp.history("forked"))
            assert insp.verify("copied").ok
        state = build(saver).get_state({"configurable": {"thread_id": "copied"}})
        assert state.values["verdict"] == "approved"
        assert state.values["deadline"] == DEADLINE
        with pytest.raises(Exception, match="exists"):
            saver.copy_thread("a", "copied")


def test_cli_history_and_blame_on_a_thread(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--url", url, "history", "a"]) == 0
    out = capsys.readouterr().out
    assert "CheckpointSaved" in out
    assert "WritesSaved" in out
    assert main(["--url", url, "blame", "a"]) == 0
    out = capsys.readouterr().out
    assert "analyse" in out
    assert "approve" in out
    assert main(["--url", url, "stats"]) == 0
    assert "report" in capsys.readouterr().out


def test_a_thread_id_that_is_no_session_id_is_refused(url: str) -> None:
    with EventCtxSaver(url) as saver:
        for bad in ("", "a\0b", "x" * 513):
            with pytest.raises(InvalidInputError, match="session id"):
                saver.get_tuple({"configurable": {"thread_id": bad}})
        with pytest.raises(InvalidInputError, match="thread_id"):
            saver.get_tuple({"configurable": {}})
        with pytest.raises(InvalidInputError, match="thread_id"):
            list(saver.list({}))
        with pytest.raises(InvalidInputError, match="prune strategy"):
            saver.prune(["a"], strategy="all")
