"""Wrapped graphs and LangGraph's own AsyncPostgresSaver, as a user's langgraph.json serves them.

``tests/test_own_saver.py`` runs ``langgraph dev`` with::

    "graphs": {"flat": "./tests/own_saver_agent.py:flat",
               "nested": "./tests/own_saver_agent.py:nested"},
    "checkpointer": {"path": "./tests/own_saver_agent.py:checkpointer"}

(and the ``_hidden`` / ``_none`` twins of both).  The checkpointer is
``AsyncPostgresSaver.from_conn_string`` on ``LSC_TEST_SAVER_URL``, with nothing of this
package on its connections.  Every graph is wrapped with ``with_scoped_connections``;
the tool takes the run's database from ``config["configurable"][key]`` (``key`` per
``KEYS``), or asks ``get_scoped_sql_database(config)`` for it.  ``nested`` runs the same
tool graph as a subgraph invoked inside a node, which inherits the node's config and the
parent's checkpointer, so its checkpoints are saved with the node's config too.
"""

from __future__ import annotations

import functools
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

# module level: the tool's and node's annotations are resolved from these globals
from langchain_core.runnables import RunnableConfig
from langgraph.graph import MessagesState

__all__ = [
    "ANSWER",
    "KEYS",
    "QUESTION",
    "build_graph",
    "checkpointer",
    "flat",
    "flat_hidden",
    "flat_none",
    "nested",
    "nested_hidden",
    "nested_none",
]

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
#: The tool's answer on ``SAMPLE_SQL``'s 500 orders.
ANSWER = "[(500,)]"
#: graph name -> with_scoped_connections' sql_database_key: the default, a key LangGraph
#: Server keeps out of checkpoint metadata, and none (the tool asks for the database)
KEYS: dict[str, str | None] = {"": "sql_database", "_hidden": "__sql_database", "_none": None}


def build_graph(kind: str, checkpointer: Any = None, key: str | None = "sql_database") -> Any:
    """``flat``: START -> tools -> END; ``nested``: a node that invokes that as a subgraph.

    The tool takes the run's database from ``config["configurable"][key]`` (a
    ``ScopedSQLDatabaseProxy``), or from ``get_scoped_sql_database(config)`` when ``key``
    is ``None``.
    """
    from langchain_core.runnables import RunnableLambda
    from langchain_core.tools import tool
    from langgraph.graph import END, START, StateGraph
    from langgraph.prebuilt import ToolNode

    from langgraph_scoped_conn import (
        ScopedSQLDatabaseProxy,
        get_scoped_sql_database,
        with_scoped_connections,
    )

    wrap = functools.partial(with_scoped_connections, sql_database_key=key)

    @tool
    def count_orders(config: RunnableConfig) -> str:
        """Count the orders."""
        if key is None:
            assert not any(
                isinstance(v, ScopedSQLDatabaseProxy) for v in config["configurable"].values()
            )
            db = get_scoped_sql_database(config)
        else:
            db = config["configurable"][key]
            assert isinstance(db, ScopedSQLDatabaseProxy), db
        return str(db.run_no_throw("select count(*) from orders"))

    tools = StateGraph(MessagesState)
    tools.add_node("tools", ToolNode([count_orders]))
    tools.add_edge(START, "tools")
    tools.add_edge("tools", END)
    if kind == "flat":
        return wrap(tools.compile(checkpointer=checkpointer))
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
    return wrap(builder.compile(checkpointer=checkpointer))


flat = build_graph("flat")
nested = build_graph("nested")
flat_hidden = build_graph("flat", key="__sql_database")
nested_hidden = build_graph("nested", key="__sql_database")
flat_none = build_graph("flat", key=None)
nested_none = build_graph("nested", key=None)


@asynccontextmanager
async def checkpointer() -> AsyncIterator[Any]:
    """LangGraph's own AsyncPostgresSaver, as its documentation builds it."""
    from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver

    async with AsyncPostgresSaver.from_conn_string(os.environ["LSC_TEST_SAVER_URL"]) as saver:
        await saver.setup()
        yield saver
