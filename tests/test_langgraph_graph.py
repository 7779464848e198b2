"""A real LangGraph graph on EventCtxSaver: interrupted in one process, resumed in another,
then travelled back in time, on each backend."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("langgraph.graph", reason="needs eventctx[langgraph]")

from langgraph.types import Command

from eventctx import Inspector
from eventctx.integrations.langgraph import EventCtxSaver

sys.path.insert(0, str(Path(__file__).parent))
from langgraph_graph import DEADLINE, build

GRAPH = str(Path(__file__).with_name("langgraph_graph.py"))


def test_interrupt_in_one_process_resume_in_another(db_url: str) -> None:
    child = subprocess.run(
        [sys.executable, GRAPH, db_url, "review-1"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert child.returncode == 0, child.stderr
    assert json.loads(child.stdout) == {"question": "approve?", "files": ["main.go", "util.go"]}

    config = {"configurable": {"thread_id": "review-1"}}
    with EventCtxSaver(db_url) as saver:
        graph = build(saver)
        waiting = graph.get_state(config)
        assert waiting.next == ("approve",)
        assert waiting.values["deadline"] == DEADLINE
        final = asyncio.run(graph.ainvoke(Command(resume="approved"), config))
        assert final["verdict"] == "approved"
        assert final["deadline"] == DEADLINE  # not JSON: through the serializer, exactly
        assert final["notes"] == [
            "analysed",
            "plan: 2 files",
            "verdict: approved",
            "report: approved",
        ]

        # Time travel: replay from the checkpoint taken before `plan` ran (a new branch whose
        # parent is that checkpoint), and give the review another verdict; the old branch stays.
        history = list(graph.get_state_history(config))
        at_plan = next(s for s in history if s.next == ("plan",))
        again = graph.invoke(None, at_plan.config)
        assert again["__interrupt__"][0].value["question"] == "approve?"
        forked = graph.invoke(Command(resume="rejected"), config)
        assert forked["notes"][-1] == "report: rejected"
        latest = graph.get_state(config)
        assert latest.values["verdict"] == "rejected"
        branch = list(graph.get_state_history(config))
        assert len(branch) > len(history)
        assert at_plan.config["configurable"]["checkpoint_id"] in {
            s.parent_config["configurable"]["checkpoint_id"] for s in branch if s.parent_config
        }
        old = graph.get_state(history[0].config)
        assert old.values["verdict"] == "approved"

    with Inspector(db_url) as insp:
        blame = insp.blame("review-1")
        assert blame["files"].phase == "analyse"
        assert blame["verdict"].phase == "approve"
        assert blame["verdict"].value == "rejected"
        assert insp.verify("review-1").ok
