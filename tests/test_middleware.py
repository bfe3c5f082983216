"""ScopedConnectionMiddleware under langchain's create_agent, against a real PostgreSQL.

A scripted chat model makes the tool calls, so every run is deterministic.  What each
test shows from the outside: the error comes back to the model as an error ToolMessage
and the run succeeds (without the middleware the run fails); the tool call id is in the
connection's ``application_name`` on the server and in the leak report (without the
middleware it is not).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from langchain.agents import create_agent
from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.tools import BaseTool, tool
from langgraph.prebuilt import ToolRuntime
from sqlalchemy import text

import langgraph_scoped_conn as lsc
from langgraph_scoped_conn import ExecutionConnectionManager
from langgraph_scoped_conn.errors import ConnectionBudgetExceededError
from tests.conftest import Database

MODES = ["invoke", "ainvoke"]


class ToolCallingModel(BaseChatModel):
    """Asks for ``calls`` (tool name, args) in one message, then answers with the results."""

    calls: Sequence[tuple[str, dict[str, Any]]] = ()

    @property
    def _llm_type(self) -> str:
        return "tool-calling-script"

    def bind_tools(self, tools: Any, **kwargs: Any) -> ToolCallingModel:
        return self

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        results = [m for m in messages if isinstance(m, ToolMessage)]
        if results:
            answer = " | ".join(f"{m.tool_call_id}:{m.status}:{m.content}" for m in results)
            message = AIMessage(content=answer)
        else:
            tool_calls = [
                {"name": name, "args": args, "id": f"call-{name}-{i}", "type": "tool_call"}
                for i, (name, args) in enumerate(self.calls)
            ]
            message = AIMessage(content="", tool_calls=tool_calls)
        return ChatResult(generations=[ChatGeneration(message=message)])


def agent(
    tools: list[BaseTool], calls: Sequence[tuple[str, dict[str, Any]]], *, middleware: bool = True
) -> Any:
    """create_agent over ``tools`` with the scripted model, wrapped with the handler."""
    model = ToolCallingModel(calls=calls)
    extra = [lsc.ScopedConnectionMiddleware()] if middleware else []
    return lsc.with_scoped_connections(create_agent(model, tools, middleware=extra))


async def run(graph: Any, mode: str) -> dict[str, Any]:
    inputs = {"messages": [("user", "go")]}
    if mode == "invoke":
        return await asyncio.to_thread(graph.invoke, inputs)  # type: ignore[no-any-return]
    return await graph.ainvoke(inputs)  # type: ignore[no-any-return]


def tool_messages(state: dict[str, Any]) -> list[ToolMessage]:
    return [m for m in state["messages"] if isinstance(m, ToolMessage)]


# -- errors become tool results ----------------------------------------------------------


@tool
def count_orders(runtime: ToolRuntime) -> str:
    """Count the orders."""
    with lsc.get_scoped_engine(runtime).connect() as conn:
        return str(conn.execute(text("select count(*) from orders")).scalar_one())


@pytest.mark.parametrize("mode", MODES)
async def test_budget_error_reaches_the_model_as_an_error_tool_message(
    mode: str, configure_default: Callable[..., ExecutionConnectionManager]
) -> None:
    configure_default(max_connections=1, pool_timeout=0.5)
    with lsc.ExecutionScope("holds-the-budget"):
        held = lsc.get_scoped_engine().connect()  # the budget's only connection
        try:
            with pytest.raises(ConnectionBudgetExceededError):  # without the middleware
                await run(agent([count_orders], [("count_orders", {})], middleware=False), mode)

            state = await run(agent([count_orders], [("count_orders", {})]), mode)
        finally:
            held.close()
    [message] = tool_messages(state)
    assert message.status == "error"
    assert message.tool_call_id == "call-count_orders-0"
    assert "The database is busy" in str(message.content)
    assert "holds-the-budget" not in str(message.content)  # another execution's id: not shown
    assert state["messages"][-1].content.startswith("call-count_orders-0:error:")


@tool
def run_sql(query: str, runtime: ToolRuntime) -> str:
    """Run a read-only query."""
    return str(lsc.get_scoped_sql_database(runtime, read_only=True).run(query))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("query", "error", "said"),
    [
        ("delete from orders", "UnsafeQueryError", "DELETE statements are refused"),
        ("select nextval('order_ids')", "ReadOnlyViolationError", "read-only transaction"),
    ],
)
async def test_read_only_refusals_reach_the_model_and_the_run_goes_on(
    mode: str,
    query: str,
    error: str,
    said: str,
    pg_db: Database,
    configure_default: Callable[..., ExecutionConnectionManager],
    caplog: pytest.LogCaptureFixture,
) -> None:
    pg_db.query("create sequence order_ids")
    configure_default(max_connections=2, allow_functions=["nextval"])
    calls = [("run_sql", {"query": query})]
    with pytest.raises(getattr(lsc, error)):  # without the middleware the run fails
        await run(agent([run_sql], calls, middleware=False), mode)

    with caplog.at_level(logging.WARNING, logger="langgraph_scoped_conn"):
        state = await run(agent([run_sql], calls), mode)
    [message] = tool_messages(state)
    assert message.status == "error"
    assert said in str(message.content), message.content
    assert "Only queries that read data may run" in str(message.content)
    assert f"call call-run_sql-0) failed with {error}" in caplog.text
    assert pg_db.query("select count(*) from orders") == [(500,)]


# -- the tool call id on the connection --------------------------------------------------


def own_application_name(runtime: ToolRuntime) -> str:
    with lsc.get_scoped_engine(runtime).connect() as conn:
        return str(conn.execute(text("select current_setting('application_name')")).scalar_one())


@tool
def whoami(runtime: ToolRuntime) -> str:
    """The connection's application_name, as the server has it."""
    return own_application_name(runtime)


@tool
async def awhoami(runtime: ToolRuntime) -> str:
    """The same, from an async tool (the query runs on a worker thread)."""
    return await asyncio.to_thread(own_application_name, runtime)


@pytest.mark.parametrize("mode", MODES)
async def test_each_tool_call_names_its_connection_on_the_server(
    mode: str, configure_default: Callable[..., ExecutionConnectionManager]
) -> None:
    """Tool calls of one step run at once (ToolNode's executor threads, or tasks), each in
    its own context; an async tool (ainvoke only) passes it on to its worker thread."""
    configure_default(max_connections=4, tag_connections=True)
    calls = [("whoami", {}), ("whoami", {})]
    if mode == "ainvoke":
        calls.append(("awhoami", {}))
    state = await run(agent([whoami, awhoami], calls), mode)
    names = {m.tool_call_id: str(m.content) for m in tool_messages(state)}
    assert set(names) == {f"call-{name}-{i}" for i, (name, _) in enumerate(calls)}
    for call_id, name in names.items():
        assert name.startswith("langgraph_scoped_conn:") and name.endswith(f":{call_id}"), names

    state = await run(agent([whoami, awhoami], calls, middleware=False), mode)
    assert not any("call-" in str(m.content) for m in tool_messages(state))


leaked: list[Any] = []


@tool
def leaky(runtime: ToolRuntime) -> str:
    """Check a connection out and never return it."""
    conn = lsc.get_scoped_engine(runtime).connect()
    leaked.append(conn)
    return "ok"


@pytest.mark.parametrize("wrapped", [True, False], ids=["handler", "scope"])
async def test_leak_report_names_the_tool_call(
    wrapped: bool,
    configure_default: Callable[..., ExecutionConnectionManager],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With the handler, or inside a bare ExecutionScope, where only the middleware knows."""
    manager = configure_default(max_connections=2)
    leaked.clear()
    model = ToolCallingModel(calls=[("leaky", {})])

    def build(middleware: bool) -> Any:
        graph = create_agent(
            model, [leaky], middleware=[lsc.ScopedConnectionMiddleware()] if middleware else []
        )
        return lsc.with_scoped_connections(graph) if wrapped else graph

    async def leak(graph: Any) -> None:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="langgraph_scoped_conn"):
            if wrapped:
                await graph.ainvoke({"messages": [("user", "go")]})
            else:
                async with lsc.ExecutionScope():
                    await graph.ainvoke({"messages": [("user", "go")]})
            await manager.adrain()

    await leak(build(middleware=True))
    assert "tool 'leaky' (call call-leaky-0)" in caplog.text, caplog.text
    if not wrapped:  # the handler names it from its own records; a bare scope cannot
        await leak(build(middleware=False))
        assert "while a connection was still checked out" in caplog.text
        assert "call-leaky-0" not in caplog.text
    assert manager.get_stats()["leaks_reclaimed"] == len(leaked)
