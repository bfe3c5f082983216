"""Wrapped graphs and LangGraph's own AsyncPostgresSaver, as a user's langgraph.json serves them.

``tests/test_own_saver.py`` runs ``langgraph dev`` with::

    "graphs": {"flat": "./tests/own_saver_agent.py:flat",
               "nested": "./tests/own_saver_agent.py:nested"},
    "checkpointer": {"path": "./tests/own_saver_agent.py:checkpointer"}

The checkpointer is ``AsyncPostgresSaver.from_conn_string`` on ``LSC_TEST_SAVER_URL``,
with nothing of this package on its connections.  Both graphs are wrapped with
``with_scoped_connections``; their tool takes the run's database from
``config["configurable"]["sql_database"]``.  ``nested`` runs the same tool graph as a
subgraph invoked inside a node, which inherits the node's config and the parent's
checkpointer, so its checkpoints are saved with the node's config too.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

# module level: the tool's and node's annotations are resolved from these globals
from langchain_core.runnables import RunnableConfig
from langgraph.graph import MessagesState

__all__ = ["ANSWER", "QUESTION", "build_graph", "checkpointer", "flat", "nested"]

#: The input of a run: the tool call a model would make, so no model is needed.
QUESTION: dict[str, Any] = {
    "messages": [
        {
            "role": "ai",
            "content": "",
            "tool_calls": [{"name": "count_orders", "args": {}, "id": "call-1"}],
        }
    ]
}
#: The tool's answer on ``SAMPLE_SQL``'s 500 orders, through the run's proxy.
ANSWER = "ScopedSQLDatabaseProxy [(500,)]"


def build_graph(kind: str, checkpointer: Any = None) -> Any:
    """``flat``: START -> tools -> END; ``nested``: a node that invokes that as a subgraph."""
    from langchain_core.runnables import RunnableLambda
    from langchain_core.tools import tool
    from langgraph.graph import END, START, StateGraph
    from langgraph.prebuilt import ToolNode

    from langgraph_scoped_conn import with_scoped_connections

    @tool
    def count_orders(config: RunnableConfig) -> str:
        """Count the orders."""
        db = config["configurable"]["sql_database"]
        return f"{type(db).__name__} {db.run_no_throw('select count(*) from orders')}"

    tools = StateGraph(MessagesState)
    tools.add_node("tools", ToolNode([count_orders]))
    tools.add_edge(START, "tools")
    tools.add_edge("tools", END)
    if kind == "flat":
        return with_scoped_connections(tools.compile(checkpointer=checkpointer))
    if kind != "nested":
        raise ValueError(kind)
    subgraph = tools.compile()  # no checkpointer of its own: it uses the parent's

    def outer(state: MessagesState, config: RunnableConfig) -> Any:
        return subgraph.invoke(state, config)

    async def aouter(state: MessagesState, config: RunnableConfig) -> Any:
        return await subgraph.ainvoke(state, config)

    builder = StateGraph(MessagesState)
    builder.add_node("outer", RunnableLambda(outer, afunc=aouter))
    builder.add_edge(START, "outer")
    builder.add_edge("outer", END)
    return with_scoped_connections(builder.compile(checkpointer=checkpointer))


flat = build_graph("flat")
nested = build_graph("nested")


@asynccontextmanager
async def checkpointer() -> AsyncIterator[Any]:
    """LangGraph's own AsyncPostgresSaver, as its documentation builds it."""
    from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver

    async with AsyncPostgresSaver.from_conn_string(os.environ["LSC_TEST_SAVER_URL"]) as saver:
        await saver.setup()
        yield saver
