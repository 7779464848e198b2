"""eventctx as a LangGraph checkpointer: ``EventCtxSaver`` (the ``eventctx[langgraph]`` extra).

Checkpoints, their metadata and pending writes are events of the thread's session, so the
read side (``Inspector``, ``eventctx history/blame/stats``) works on LangGraph threads.
"""

from eventctx.integrations.langgraph.saver import EventCtxSaver

__all__ = ["EventCtxSaver"]
