"""A multi-node LangGraph graph with a human-review interrupt, on an EventCtxSaver; run as
``python langgraph_graph.py URL THREAD`` it runs a thread up to the interrupt and prints the
interrupt's value as JSON (the first half of a run another process resumes)."""

from __future__ import annotations

import json
import operator
import sys
from datetime import UTC, datetime
from typing import Annotated, Any, TypedDict

from langgraph.graph import END, START, StateGraph
from langgraph.graph.state import CompiledStateGraph
from langgraph.types import interrupt

from eventctx.integrations.langgraph import EventCtxSaver

DEADLINE = datetime(2026, 1, 31, 17, 0, tzinfo=UTC)
"""A value that is not JSON: it must come back as the same datetime."""


class Review(TypedDict, total=False):
    """The state of a code review: the input, the notes each step adds, the verdict."""

    change: str
    files: list[str]
    notes: Annotated[list[str], operator.add]
    deadline: datetime
    verdict: str


def analyse(state: Review) -> dict[str, Any]:
    """Find the files the change touches."""
    return {"files": sorted(state["change"].split()), "notes": ["analysed"]}


def plan(state: Review) -> dict[str, Any]:
    """Plan the review and set its deadline."""
    return {"notes": [f"plan: {len(state['files'])} files"], "deadline": DEADLINE}


def approve(state: Review) -> dict[str, Any]:
    """Wait for a person's verdict (an interrupt), then record it."""
    verdict = interrupt({"question": "approve?", "files": state["files"]})
    return {"verdict": verdict, "notes": [f"verdict: {verdict}"]}


def report(state: Review) -> dict[str, Any]:
    """Close the review."""
    return {"notes": [f"report: {state['verdict']}"]}


def build(saver: EventCtxSaver) -> CompiledStateGraph[Any, Any, Any, Any]:
    """analyse → plan → approve (interrupts) → report, checkpointed by ``saver``."""
    graph = StateGraph(Review)
    for node in (analyse, plan, approve, report):
        graph.add_node(node.__name__, node)
    graph.add_edge(START, "analyse")
    graph.add_edge("analyse", "plan")
    graph.add_edge("plan", "approve")
    graph.add_edge("approve", "report")
    graph.add_edge("report", END)
    return graph.compile(checkpointer=saver)


def first_half(url: str, thread_id: str) -> None:
    """Run the thread until the graph waits for the verdict; print the question."""
    with EventCtxSaver(url) as saver:
        result = build(saver).invoke(
            {"change": "main.go util.go", "notes": []},
            {"configurable": {"thread_id": thread_id}},
        )
    print(json.dumps(result["__interrupt__"][0].value))


if __name__ == "__main__":
    first_half(sys.argv[1], sys.argv[2])
