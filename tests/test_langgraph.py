"""LangGraph integration: one scope per root run on every run path, asserted from the server.

Every test runs real graphs (StateGraph, ToolNode, Send, subgraphs, interrupt with
InMemorySaver, RetryPolicy, ToolRuntime) against the throwaway PostgreSQL from
conftest, and checks ``pg_stat_activity`` as well as the package's own counters.
The invocation mode is a fixture parameter (``mode``), not a copy of the test.
"""

from __future__ import annotations

import asyncio
import operator
import threading
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any, TypedDict

import pytest
from langchain_core.messages import AIMessage, AnyMessage
from langchain_core.runnables import RunnableConfig, RunnableLambda
from langchain_core.tools import tool
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages
from langgraph.prebuilt import ToolNode, ToolRuntime
from langgraph.pregel import Pregel
from langgraph.types import Send
from sqlalchemy import text

import langgraph_scoped_conn as lsc
from langgraph_scoped_conn.registry import ExecutionConnectionManager
from tests.conftest import Database

APP = "langgraph_scoped_conn%"

# -- invocation modes ----------------------------------------------------------------

SYNC_MODES = ("invoke", "stream", "batch")
ASYNC_MODES = ("ainvoke", "astream", "abatch", "astream_events")
ALL_MODES = ("invoke", "ainvoke", "stream", "astream", "batch", "abatch", "astream_events")


@dataclass
class Mode:
    """Runs a graph the way one invocation mode does; async modes get their own loop."""

    name: str

    @property
    def is_async(self) -> bool:
        return self.name in ASYNC_MODES

    @property
    def is_batch(self) -> bool:
        return self.name in ("batch", "abatch")

    def run(
        self, graph: Any, inputs: list[Any], configs: list[RunnableConfig] | None = None
    ) -> list[Any]:
        """Run every input as its own root run (one batch call for the batch modes)."""
        configs = configs or [{} for _ in inputs]
        if self.is_async:
            return asyncio.run(self.arun(graph, inputs, configs))
        if self.name == "batch":
            return list(graph.batch(inputs, configs))
        out = []
        for inp, cfg in zip(inputs, configs, strict=True):
            if self.name == "invoke":
                out.append(graph.invoke(inp, cfg))
            else:
                last = None
                for chunk in graph.stream(inp, cfg, stream_mode="values"):
                    last = chunk
                out.append(last)
        return out

    async def arun(self, graph: Any, inputs: list[Any], configs: list[RunnableConfig]) -> list[Any]:
        if self.name == "abatch":
            return list(await graph.abatch(inputs, configs))
        out = []
        for inp, cfg in zip(inputs, configs, strict=True):
            if self.name == "ainvoke":
                out.append(await graph.ainvoke(inp, cfg))
            elif self.name == "astream":
                last = None
                async for chunk in graph.astream(inp, cfg, stream_mode="values"):
                    last = chunk
                out.append(last)
            else:
                result = None
                async for event in graph.astream_events(inp, cfg, version="v2"):
                    if event["event"] == "on_chain_end" and not event["parent_ids"]:
                        result = event["data"]["output"]
                out.append(result)
        return out


@pytest.fixture(params=ALL_MODES)
def mode(request: pytest.FixtureRequest) -> Mode:
    return Mode(request.param)


@pytest.fixture(params=ALL_MODES)
def any_mode(request: pytest.FixtureRequest) -> Mode:
    return Mode(request.param)


# -- what nodes and tools saw ------------------------------------------------------


@dataclass
class Sight:
    """One node or tool resolving its execution."""

    tag: str
    where: str
    execution_id: str
    database: Any
    thread: int


@dataclass
class Recorder:
    sights: list[Sight] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def saw(self, tag: str, where: str, database: Any) -> None:
        engine = database._engine
        assert isinstance(engine, lsc.ScopedEngine)
        with self.lock:
            self.sights.append(
                Sight(tag, where, engine.execution_id, database, threading.get_ident())
            )

    def by_tag(self) -> dict[str, list[Sight]]:
        out: dict[str, list[Sight]] = {}
        for s in self.sights:
            out.setdefault(s.tag, []).append(s)
        return out


def query(database: Any) -> int:
    """Use a real connection: the answer comes from the server."""
    return int(database._engine.connect().__enter__().execute(text("select 1")).scalar())


def count_orders(database: Any) -> str:
    return str(database.run("select count(*) from orders"))


class State(TypedDict, total=False):
    tag: str
    messages: Annotated[list[AnyMessage], add_messages]
    seen: Annotated[list[str], operator.add]


def build_example_graph(recorder: Recorder) -> Any:
    """A ToolNode SQL agent without an LLM: agent → tools → subgraph → Send fan-out → done."""

    @tool
    def run_query(tag: str, config: RunnableConfig) -> str:
        """Count orders (resolves the execution from the tool's config)."""
        db = lsc.get_scoped_sql_database(config)
        recorder.saw(tag, "tool(config)", db)
        return count_orders(db)

    @tool
    def run_query_runtime(tag: str, runtime: ToolRuntime) -> str:
        """Count orders (resolves the execution from ToolRuntime)."""
        db = lsc.get_scoped_sql_database(runtime)
        recorder.saw(tag, "tool(runtime)", db)
        return count_orders(db)

    def agent(state: State, config: RunnableConfig) -> State:
        db = lsc.get_scoped_sql_database(config)
        recorder.saw(state["tag"], "node(config)", db)
        calls = [
            {"name": "run_query", "args": {"tag": state["tag"]}, "id": "call-1"},
            {"name": "run_query_runtime", "args": {"tag": state["tag"]}, "id": "call-2"},
        ]
        return {"messages": [AIMessage(content="", tool_calls=calls)], "seen": ["agent"]}

    def inner(state: State) -> State:
        db = lsc.get_scoped_sql_database()  # no argument: LangGraph's current config
        recorder.saw(state["tag"], "subgraph node", db)
        count_orders(db)
        return {"seen": ["inner"]}

    sub = StateGraph(State)
    sub.add_node("inner", inner)
    sub.add_edge(START, "inner")
    sub.add_edge("inner", END)

    def fan_out(state: State) -> list[Send]:
        return [Send("branch", {"tag": state["tag"], "seen": [f"b{i}"]}) for i in range(3)]

    def branch(state: State, config: RunnableConfig) -> State:
        db = lsc.get_scoped_sql_database(config)
        recorder.saw(state["tag"], "send branch", db)
        count_orders(db)
        return {"seen": ["branch"]}

    builder = StateGraph(State)
    builder.add_node("agent", agent)
    builder.add_node("tools", ToolNode([run_query, run_query_runtime]))
    builder.add_node("sub", sub.compile())
    builder.add_node("branch", branch)
    builder.add_edge(START, "agent")
    builder.add_edge("agent", "tools")
    builder.add_edge("tools", "sub")
    builder.add_conditional_edges("sub", fan_out, ["branch"])
    builder.add_edge("branch", END)
    return builder.compile()


# -- server-side checks ----------------------------------------------------------------


def assert_released(mgr: ExecutionConnectionManager, pg_db: Database) -> dict[str, Any]:
    """No scope, no checked-out connection, and the server agrees."""
    mgr.drain(timeout=10)
    stats = mgr.get_stats()
    assert stats["active_executions"] == 0, stats["executions"]
    assert stats["draining_executions"] == 0
    assert stats["connections_in_use"] == 0
    assert mgr.tracked_runs() == 0
    # every backend of ours that the server still has is an idle pooled connection
    busy = pg_db.query(
        "select count(*) from pg_stat_activity where datname = current_database() "
        "and application_name like %s and state <> 'idle'",
        APP,
    )
    assert busy == [(0,)]
    assert pg_db.backends(APP) == stats["connections_idle"]
    assert pg_db.backends(APP) <= mgr.settings.max_connections
    return stats


def opened(mgr: ExecutionConnectionManager) -> int:
    return int(mgr.get_stats()["scopes_opened"])


# -- run modes -------------------------------------------------------------------------


def test_each_root_run_gets_one_scope_shared_by_every_node_kind(
    mode: Mode, manager: ExecutionConnectionManager, pg_db: Database
) -> None:
    recorder = Recorder()
    graph = lsc.with_scoped_connections(build_example_graph(recorder))
    before = opened(manager)

    results = mode.run(graph, [{"tag": "r1"}, {"tag": "r2"}])

    assert [sorted(set(r["seen"])) for r in results] == [["agent", "branch", "inner"]] * 2
    assert opened(manager) - before == 2  # one per root run (per batch input), none per subgraph
    seen = recorder.by_tag()
    assert sorted(seen) == ["r1", "r2"]
    executions = set()
    for sights in seen.values():
        assert {s.where for s in sights} == {
            "node(config)",
            "tool(config)",
            "tool(runtime)",
            "subgraph node",
            "send branch",
        }
        assert len({s.execution_id for s in sights}) == 1, sights
        assert len({id(s.database) for s in sights}) == 1  # the same object for the whole run
        executions.add(sights[0].execution_id)
    assert len(executions) == 2
    assert seen["r1"][0].database is not seen["r2"][0].database
    assert_released(manager, pg_db)
