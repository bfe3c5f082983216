"""The example SQL agent: a model/tools loop with an optional human approval step.

``agent`` asks the chat model for the next step; ``tools`` is a ``ToolNode`` with
three tools (list tables, show schema, run a read-only query) that reach the
database through :func:`~langgraph_scoped_conn.get_scoped_sql_database`, so every
connection belongs to the run.  When the input sets ``require_approval``, every
query first goes through ``approve``, which calls ``langgraph.types.interrupt``
and waits for a human to resume the run with ``Command(resume=True)`` (run it) or
``Command(resume="reason")`` (refuse it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal, NotRequired, TypedDict

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AnyMessage, SystemMessage, ToolMessage
from langchain_core.runnables import RunnableConfig
from langchain_core.tools import BaseTool, tool
from langgraph.graph import START, StateGraph
from langgraph.graph.message import add_messages
from langgraph.graph.state import CompiledStateGraph
from langgraph.prebuilt import ToolNode, ToolRuntime
from langgraph.types import Checkpointer, Command, interrupt

from langgraph_scoped_conn.demo.model import (
    LIST_TABLES_TOOL,
    QUERY_TOOL,
    SCHEMA_TOOL,
    load_chat_model,
)

__all__ = ["SYSTEM_PROMPT", "SQLAgentState", "build_sql_agent", "make_sql_tools"]

SYSTEM_PROMPT = (
    "You answer questions about a SQL database. First list the tables, then look at the "
    "schema of the relevant ones, then run one read-only SELECT query, then answer from "
    "its result and show the SQL you ran."
)

#: Returns the SQLDatabase a tool call should use, given the tool's runtime.
DatabaseProvider = Callable[[ToolRuntime], Any]


class SQLAgentState(TypedDict):
    """The agent's state: the conversation, and whether queries need a human's approval."""

    messages: Annotated[list[AnyMessage], add_messages]
    require_approval: NotRequired[bool]


def scoped_database(
    database_url: str | None = None, *, read_only: bool = True, schema: str | None = None
) -> DatabaseProvider:
    """A provider of this run's scoped SQLDatabase (the manager's URL when ``None``).

    ``schema`` names the PostgreSQL schema the tools see (``None``: the connection's own).
    """
    from langgraph_scoped_conn.scope import get_scoped_sql_database

    options: dict[str, Any] = {"read_only": read_only}
    if schema is not None:
        options["schema"] = schema

    def provide(runtime: ToolRuntime) -> Any:
        return get_scoped_sql_database(runtime, database_url=database_url, **options)

    return provide


def make_sql_tools(database: DatabaseProvider) -> list[BaseTool]:
    """The three SQL tools, each getting its SQLDatabase from ``database``."""

    @tool(LIST_TABLES_TOOL)
    def list_tables(runtime: ToolRuntime) -> str:
        """List the tables in the database, comma separated."""
        return ", ".join(database(runtime).get_usable_table_names())

    @tool(SCHEMA_TOOL)
    def table_schema(table_names: str, runtime: ToolRuntime) -> str:
        """Show the CREATE TABLE statement and three sample rows of each table.

        Args:
            table_names: comma separated table names, e.g. "sales, stores".
        """
        names = [t.strip() for t in table_names.split(",") if t.strip()]
        return str(database(runtime).get_table_info_no_throw(names))

    @tool(QUERY_TOOL)
    def run_query(query: str, runtime: ToolRuntime) -> str:
        """Run one read-only SQL query and return its rows; errors come back as text.

        Args:
            query: a single SELECT statement.
        """
        return str(database(runtime).run_no_throw(query))

    return [list_tables, table_schema, run_query]


def build_sql_agent(
    model: BaseChatModel | None = None,
    *,
    database_url: str | None = None,
    database: DatabaseProvider | None = None,
    checkpointer: Checkpointer = None,
    name: str = "sql_agent",
) -> CompiledStateGraph[SQLAgentState, None, SQLAgentState, SQLAgentState]:
    """Build the SQL agent graph (not yet wrapped with ``with_scoped_connections``).

    Args:
        model: the chat model; :func:`~langgraph_scoped_conn.demo.load_chat_model` when
            ``None`` (the offline scripted model unless ``LSC_CHAT_MODEL`` is set).
        database_url: the database the tools query; ``None`` uses the URL of the
            manager the run belongs to (``configure(...)`` or ``DATABASE_URL``).
        database: a provider of the SQLDatabase per tool call, replacing the scoped
            one (the demo's ``--compare`` passes the naive one).
        checkpointer: a checkpointer, needed to resume after the approval interrupt
            outside LangGraph Server.
        name: the graph's name.

    Returns:
        The compiled graph.  Wrap it with :func:`~langgraph_scoped_conn.with_scoped_connections`.
    """
    chat_model = model if model is not None else load_chat_model()
    tools = make_sql_tools(database or scoped_database(database_url))
    bound = chat_model.bind_tools(tools)

    def agent(state: SQLAgentState, config: RunnableConfig) -> dict[str, Any]:
        response = bound.invoke([SystemMessage(SYSTEM_PROMPT), *state["messages"]], config)
        return {"messages": [response]}

    def route(state: SQLAgentState) -> Literal["tools", "approve", "__end__"]:
        last = state["messages"][-1]
        if not isinstance(last, AIMessage) or not last.tool_calls:
            return "__end__"
        if state.get("require_approval") and any(c["name"] == QUERY_TOOL for c in last.tool_calls):
            return "approve"
        return "tools"

    def approve(state: SQLAgentState) -> Command[Literal["tools", "agent"]]:
        last = state["messages"][-1]
        assert isinstance(last, AIMessage)
        queries = [c["args"].get("query") for c in last.tool_calls if c["name"] == QUERY_TOOL]
        decision = interrupt({"action": "approve the SQL query", "queries": queries})
        if decision is True or (isinstance(decision, str) and decision.lower() in ("yes", "y")):
            return Command(goto="tools")
        reason = decision if isinstance(decision, str) and decision else "not approved"
        refusals = [
            ToolMessage(
                f"Rejected by the reviewer: {reason}", tool_call_id=str(c["id"]), name=c["name"]
            )
            for c in last.tool_calls
        ]
        return Command(goto="agent", update={"messages": refusals})

    builder = StateGraph(SQLAgentState)
    builder.add_node("agent", agent)
    builder.add_node("tools", ToolNode(tools))
    builder.add_node("approve", approve)
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", route)
    builder.add_edge("tools", "agent")
    return builder.compile(checkpointer=checkpointer, name=name)
