"""LangGraph integration: one scope per root run on every run path, asserted from the server.

Every test runs real graphs (StateGraph, ToolNode, Send, subgraphs, interrupt with
InMemorySaver, RetryPolicy, ToolRuntime) against the throwaway PostgreSQL from
conftest, and checks ``pg_stat_activity`` as well as the package's own counters.
The invocation mode is a fixture parameter (``mode``, from conftest; the driver is
``tests/modes.py``), not a copy of the test.
"""

from __future__ import annotations

import asyncio
import functools
import json
import operator
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
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
from sqlalchemy import event as sa_event
from sqlalchemy import text

import langgraph_scoped_conn as lsc
import langgraph_scoped_conn.session as session_module
from langgraph_scoped_conn import ExecutionConnectionManager
from tests.conftest import Database, eventually
from tests.modes import ALL_MODES, ASYNC_MODES, SYNC_MODES, Mode

APP = "langgraph_scoped_conn%"

# -- invocation modes ----------------------------------------------------------------
# The driver is tests/modes.py's Mode; conftest's ``mode`` fixture runs a test once per
# mode.  ``any_mode`` is the same set under another name.


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
    eventually(
        lambda: pg_db.backends(APP) == stats["connections_idle"], "only pooled backends remain"
    )
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


def test_sync_nodes_run_in_worker_threads_and_still_resolve(
    manager: ExecutionConnectionManager, pg_db: Database
) -> None:
    recorder = Recorder()
    graph = lsc.with_scoped_connections(build_example_graph(recorder))
    Mode("ainvoke").run(graph, [{"tag": "t"}])
    main = threading.get_ident()
    threads = {s.thread for s in recorder.sights}
    assert threads - {main}, "expected sync nodes to run in asyncio's executor threads"
    assert len({s.execution_id for s in recorder.sights}) == 1
    assert_released(manager, pg_db)


# -- the execution id ------------------------------------------------------------------


def one_node_graph(recorder: Recorder, body: Callable[[Any], None] | None = None) -> Any:
    def work(state: State, config: RunnableConfig) -> State:
        db = lsc.get_scoped_sql_database(config)
        recorder.saw(state["tag"], "work", db)
        count_orders(db)
        if body is not None:
            body(db)
        return {"seen": ["work"]}

    builder = StateGraph(State)
    builder.add_node("work", work)
    builder.add_edge(START, "work")
    builder.add_edge("work", END)
    return builder.compile()


def test_caller_run_id_is_the_execution_id(
    mode: Mode, manager: ExecutionConnectionManager, pg_db: Database
) -> None:
    recorder = Recorder()
    graph = lsc.with_scoped_connections(one_node_graph(recorder))
    ids = [uuid.uuid4(), uuid.uuid4()]
    mode.run(graph, [{"tag": "a"}, {"tag": "b"}], [{"run_id": i} for i in ids])
    seen = {s.tag: s.execution_id for s in recorder.sights}
    assert seen == {"a": str(ids[0]), "b": str(ids[1])}
    assert_released(manager, pg_db)


def test_root_run_id_is_the_execution_id_when_none_is_given(
    manager: ExecutionConnectionManager, pg_db: Database
) -> None:
    recorder = Recorder()
    graph = lsc.with_scoped_connections(one_node_graph(recorder))
    root_ids = []

    async def main() -> None:
        async for event in graph.astream_events({"tag": "a"}, version="v2"):
            if event["event"] == "on_chain_start" and not event["parent_ids"]:
                root_ids.append(event["run_id"])

    asyncio.run(main())
    assert [s.execution_id for s in recorder.sights] == root_ids
    assert_released(manager, pg_db)


def test_server_run_id_is_the_execution_id_and_survives_a_retry(
    any_mode: Mode, manager: ExecutionConnectionManager, pg_db: Database
) -> None:
    """LangGraph Server puts its run id in configurable (and metadata); a retry reuses it."""
    recorder = Recorder()
    graph = lsc.with_scoped_connections(one_node_graph(recorder))
    server_run = str(uuid.uuid4())
    cfg: RunnableConfig = {
        "configurable": {"run_id": server_run, "thread_id": "th"},
        "metadata": {"run_id": server_run},
    }
    before = opened(manager)
    any_mode.run(graph, [{"tag": "first"}], [cfg])
    any_mode.run(graph, [{"tag": "retry"}], [cfg])
    assert [s.execution_id for s in recorder.sights] == [server_run, server_run]
    assert opened(manager) - before == 2  # the retry is a new scope with the same id
    assert_released(manager, pg_db)


def test_server_run_id_in_configurable_only(
    manager: ExecutionConnectionManager, pg_db: Database
) -> None:
    recorder = Recorder()
    graph = lsc.with_scoped_connections(one_node_graph(recorder))
    server_run = str(uuid.uuid4())
    graph.invoke({"tag": "x"}, {"configurable": {"run_id": server_run}})
    assert [s.execution_id for s in recorder.sights] == [server_run]
    assert_released(manager, pg_db)


def test_execution_id_callable_overrides_run_ids(
    mode: Mode, manager: ExecutionConnectionManager, pg_db: Database
) -> None:
    recorder = Recorder()
    seen_runs: list[dict[str, Any]] = []

    def by_thread(run: Any) -> str:
        seen_runs.append(dict(run))
        return f"conv-{run['configurable']['thread_id']}"

    graph = lsc.with_scoped_connections(one_node_graph(recorder), execution_id=by_thread)
    cfgs: list[RunnableConfig] = [
        {"run_id": uuid.uuid4(), "configurable": {"thread_id": t, "run_id": str(uuid.uuid4())}}
        for t in ("t1", "t2")
    ]
    mode.run(graph, [{"tag": "a"}, {"tag": "b"}], cfgs)
    assert {s.tag: s.execution_id for s in recorder.sights} == {"a": "conv-t1", "b": "conv-t2"}
    assert len(seen_runs) == 2  # called once per root run, never for child runs
    assert all(isinstance(r["run_id"], uuid.UUID) for r in seen_runs)
    assert_released(manager, pg_db)


# -- the wrapper -------------------------------------------------------------------------


def test_with_scoped_connections_three_ways(
    manager: ExecutionConnectionManager, pg_db: Database
) -> None:
    recorder = Recorder()

    direct = lsc.with_scoped_connections(one_node_graph(recorder))

    @lsc.with_scoped_connections
    def factory(config: RunnableConfig | None = None) -> Any:
        return one_node_graph(recorder)

    @lsc.with_scoped_connections(execution_id=lambda run: "fixed-id")
    def factory_with_options() -> Any:
        return one_node_graph(recorder)

    @lsc.with_scoped_connections
    async def async_factory() -> Any:
        return one_node_graph(recorder)

    graphs = [direct, factory(), factory_with_options(), asyncio.run(async_factory())]
    for g in graphs:
        assert isinstance(g, Pregel)
        assert type(g) is type(one_node_graph(recorder))
    assert factory.__name__ == "factory"
    before = opened(manager)
    for i, g in enumerate(graphs):
        g.invoke({"tag": f"g{i}"})
    assert opened(manager) - before == 4
    assert {s.tag: s.execution_id for s in recorder.sights}["g2"] == "fixed-id"
    # wrapping twice does not add a second handler (and so no second scope)
    twice = lsc.with_scoped_connections(direct)
    before = opened(manager)
    twice.invoke({"tag": "twice"})
    assert opened(manager) - before == 1
    assert_released(manager, pg_db)


def test_with_scoped_connections_rejects_a_builder_with_a_clear_error() -> None:
    builder = StateGraph(State)
    with pytest.raises(TypeError, match=r"Call \.compile\(\) first"):
        lsc.with_scoped_connections(builder)  # type: ignore[call-overload]

    @lsc.with_scoped_connections
    def bad_factory() -> Any:
        return builder

    with pytest.raises(TypeError, match=r"return builder\.compile\(\)"):
        bad_factory()


def test_wrapped_graph_inside_another_runnable_gets_one_scope_per_run(
    mode: Mode, manager: ExecutionConnectionManager, pg_db: Database
) -> None:
    recorder = Recorder()
    wrapped = lsc.with_scoped_connections(build_example_graph(recorder))

    def call(x: State) -> Any:
        return wrapped.invoke(x)

    async def acall(x: State) -> Any:
        return await wrapped.ainvoke(x)

    outer = RunnableLambda(call, afunc=acall)
    before = opened(manager)
    mode.run(outer, [{"tag": "a"}, {"tag": "b"}])
    assert opened(manager) - before == 2
    by_tag = recorder.by_tag()
    assert all(len({s.execution_id for s in v}) == 1 for v in by_tag.values())
    assert_released(manager, pg_db)


def test_wrapped_graph_as_subgraph_of_an_unwrapped_graph_gets_one_scope(
    mode: Mode, manager: ExecutionConnectionManager, pg_db: Database
) -> None:
    recorder = Recorder()
    wrapped = lsc.with_scoped_connections(build_example_graph(recorder))
    outer_builder = StateGraph(State)
    outer_builder.add_node("inner_graph", wrapped)
    outer_builder.add_edge(START, "inner_graph")
    outer_builder.add_edge("inner_graph", END)
    outer = outer_builder.compile()
    before = opened(manager)
    mode.run(outer, [{"tag": "a"}, {"tag": "b"}])
    assert opened(manager) - before == 2
    by_tag = recorder.by_tag()
    assert sorted(by_tag) == ["a", "b"]
    assert all(len({s.execution_id for s in v}) == 1 for v in by_tag.values())
    assert_released(manager, pg_db)


def test_wrapped_graph_inside_a_wrapped_graph_shares_the_outer_scope(
    manager: ExecutionConnectionManager, pg_db: Database
) -> None:
    recorder = Recorder()
    inner = lsc.with_scoped_connections(build_example_graph(recorder))
    outer_builder = StateGraph(State)
    outer_builder.add_node("inner_graph", inner)
    outer_builder.add_edge(START, "inner_graph")
    outer_builder.add_edge("inner_graph", END)
    outer = lsc.with_scoped_connections(outer_builder.compile())
    before = opened(manager)
    outer.invoke({"tag": "a"}, {"run_id": (rid := uuid.uuid4())})
    assert opened(manager) - before == 1
    assert {s.execution_id for s in recorder.sights} == {str(rid)}
    assert_released(manager, pg_db)


# -- lookups ---------------------------------------------------------------------------


def test_guide_api_without_arguments_works_inside_a_tool(
    any_mode: Mode, manager: ExecutionConnectionManager, pg_db: Database
) -> None:
    got: list[tuple[str, str]] = []

    @tool
    async def guide_tool(tag: str) -> str:
        """Use the guide's API with no arguments."""
        db = await lsc.create_execution_scoped_sql_database()
        got.append((tag, db._engine.execution_id))
        return await asyncio.to_thread(count_orders, db)

    @tool
    def guide_tool_sync(tag: str) -> str:
        """Use the guide's sync API with no arguments."""
        db = lsc.create_execution_scoped_sql_database_sync()
        got.append((tag, db._engine.execution_id))
        return count_orders(db)

    def agent(state: State) -> State:
        calls = [{"name": "guide_tool_sync", "args": {"tag": state["tag"]}, "id": "c1"}]
        if any_mode.is_async:
            calls.append({"name": "guide_tool", "args": {"tag": state["tag"]}, "id": "c2"})
        return {"messages": [AIMessage(content="", tool_calls=calls)]}

    builder = StateGraph(State)
    builder.add_node("agent", agent)
    builder.add_node("tools", ToolNode([guide_tool, guide_tool_sync]))
    builder.add_edge(START, "agent")
    builder.add_edge("agent", "tools")
    builder.add_edge("tools", END)
    graph = lsc.with_scoped_connections(builder.compile())
    ids = [uuid.uuid4(), uuid.uuid4()]
    results = any_mode.run(graph, [{"tag": "a"}, {"tag": "b"}], [{"run_id": i} for i in ids])
    for r in results:
        assert all("500" in m.content for m in r["messages"][1:])
    per_tool = 2 if any_mode.is_async else 1
    assert sorted(got) == sorted([("a", str(ids[0]))] * per_tool + [("b", str(ids[1]))] * per_tool)
    assert_released(manager, pg_db)


def test_lookup_outside_a_run_names_the_fix(manager: ExecutionConnectionManager) -> None:
    with pytest.raises(lsc.NoActiveScopeError, match="with_scoped_connections"):
        lsc.get_scoped_sql_database({})
    with pytest.raises(lsc.NoActiveScopeError, match="get_scoped_engine"):
        lsc.get_scoped_engine()
    with pytest.raises(TypeError, match="RunnableConfig"):
        lsc.get_scoped_engine(42)


def test_unwrapped_graph_gets_no_silent_connection(
    manager: ExecutionConnectionManager, pg_db: Database
) -> None:
    recorder = Recorder()
    with pytest.raises(lsc.NoActiveScopeError):
        one_node_graph(recorder).invoke({"tag": "x"})
    assert pg_db.backends(APP) == 0


# -- endings ---------------------------------------------------------------------------

LEAKED: list[Any] = []


@pytest.fixture
def leaked() -> Iterator[list[Any]]:
    """Connections a node 'forgot' to close; the scope must have closed them."""
    LEAKED.clear()
    yield LEAKED
    LEAKED.clear()


def leak_a_connection(config: RunnableConfig) -> None:
    conn = lsc.get_scoped_engine(config).connect()
    conn.execute(text("select 1"))
    LEAKED.append(conn)


class NodeFailed(Exception):
    pass


def test_node_error_releases_the_scope_and_closes_a_leaked_connection(
    mode: Mode, manager: ExecutionConnectionManager, pg_db: Database, leaked: list[Any]
) -> None:
    def failing(state: State, config: RunnableConfig) -> State:
        leak_a_connection(config)
        raise NodeFailed(state["tag"])

    builder = StateGraph(State)
    builder.add_node("failing", failing)
    builder.add_edge(START, "failing")
    graph = lsc.with_scoped_connections(builder.compile())
    inputs = [{"tag": "a"}, {"tag": "b"}] if mode.is_batch else [{"tag": "a"}]
    with pytest.raises(NodeFailed):
        mode.run(graph, inputs)
    stats = assert_released(manager, pg_db)
    assert stats["leaks_reclaimed"] >= 1
    assert stats["leaks_reclaimed"] == len(leaked)
    assert all(c.invalidated for c in leaked)
    with pytest.raises(lsc.ScopeClosedError):  # no use-after-release through the old handle
        leaked[0].execute(text("select 1"))


#: a child process: a wrapped graph's run whose event loop is closed while its node
#: waits, so LangGraph never reports its end; then drain().  The run's coroutines are
#: never finished, and their finalizers complain when collected, so this runs in a child
#: that prints what it saw, waits for the parent to check the server, and exits at once.
ORPHANED_RUN = """
import asyncio, json, logging, os, sys
from typing import TypedDict
from sqlalchemy import text
from langgraph.graph import START, StateGraph
import langgraph_scoped_conn as lsc

class State(TypedDict):
    tag: str

warnings = []
class Seen(logging.Handler):
    def emit(self, record):
        warnings.append(record.getMessage())
logging.getLogger("langgraph_scoped_conn").addHandler(Seen(logging.WARNING))
manager = lsc.configure(sys.argv[1], max_connections=2)
leaked = []

async def stuck(state, config):
    conn = lsc.get_scoped_engine(config).connect()
    leaked.append((conn, conn.execute(text("select pg_backend_pid()")).scalar()))
    await asyncio.Event().wait()  # never set

builder = StateGraph(State)
builder.add_node("stuck", stuck)
builder.add_edge(START, "stuck")
graph = lsc.with_scoped_connections(builder.compile())
loop = asyncio.new_event_loop()
task = loop.create_task(graph.ainvoke({"tag": "orphan"}))

async def until_started():
    while not leaked:
        await asyncio.sleep(0)

loop.run_until_complete(until_started())
open_before = manager.active_executions()
loop.close()  # the run's task never finishes: no end reaches the handler
if sys.argv[2] == "reap":  # the debug app's reaper (max_scope_lifetime is an hour)
    manager.reap()
    open_after_reap = manager.active_executions()
else:
    open_after_reap = []
drained = manager.drain(timeout=30)
stats = manager.get_stats()
print(json.dumps({
    "open_before": len(open_before), "after_reap": len(open_after_reap), "drained": drained,
    "backend": leaked[0][1],
    "invalidated": leaked[0][0].invalidated, "active": stats["active_executions"],
    "in_use": stats["connections_in_use"], "reclaimed": stats["leaks_reclaimed"],
    "warnings": [w for w in warnings if "event loop closed" in w],
}), flush=True)
sys.stdin.readline()  # the parent checks the server meanwhile
os._exit(0)  # skip the never-finished coroutines' finalizers
"""


@pytest.mark.parametrize("how", ["drain", "reap"])
def test_a_run_whose_event_loop_closed_before_its_end_is_released(
    how: str, pg_db: Database
) -> None:
    # asyncio.run cancels the runs still going when its main coroutine ends (the other
    # runs of an abatch after one run's error), and LangGraph reports a run's error from
    # a shielded task that the same shutdown may cancel before its first step: then the
    # handler never hears of the end (CI saw it once in ~2,000 abatch runs; 2 of 100
    # asyncio.run(graph.abatch(...)) of two failing runs here). Deterministically: the
    # run's loop is closed while its node waits, so its end is never reported either.
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCOPED_CONN_")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    with subprocess.Popen(
        [sys.executable, "-c", ORPHANED_RUN, pg_db.url, how],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    ) as child:
        try:
            assert child.stdout is not None and child.stdin is not None
            line = child.stdout.readline()
            assert line, child.communicate(timeout=60)[1][-3000:]
            seen = json.loads(line)
            # the server: the leaked connection's backend is gone while the child lives
            alive = pg_db.query(
                "select count(*) from pg_stat_activity where pid = %s", seen["backend"]
            )
            child.communicate("\n", timeout=60)
            assert child.returncode == 0
        finally:
            if child.poll() is None:
                child.kill()
    assert (seen["open_before"], seen["after_reap"]) == (1, 0)
    assert seen["drained"] is True
    assert (seen["active"], seen["in_use"], seen["reclaimed"]) == (0, 0, 1)
    assert seen["invalidated"] is True
    assert alive == [(0,)]
    assert len(seen["warnings"]) == 1 and "releasing the execution" in seen["warnings"][0]


def test_graph_recursion_error_releases_the_scope(
    mode: Mode, manager: ExecutionConnectionManager, pg_db: Database
) -> None:
    from langgraph.errors import GraphRecursionError

    recorder = Recorder()

    def loop(state: State, config: RunnableConfig) -> State:
        db = lsc.get_scoped_sql_database(config)
        recorder.saw(state["tag"], "loop", db)
        count_orders(db)
        return {"seen": ["loop"]}

    builder = StateGraph(State)
    builder.add_node("loop", loop)
    builder.add_edge(START, "loop")
    builder.add_edge("loop", "loop")
    graph = lsc.with_scoped_connections(builder.compile())
    before = opened(manager)
    with pytest.raises(GraphRecursionError):
        mode.run(graph, [{"tag": "a"}], [{"recursion_limit": 4}])
    assert opened(manager) - before == 1
    assert len(recorder.sights) == 4
    assert len({s.execution_id for s in recorder.sights}) == 1
    assert_released(manager, pg_db)


def holding_graph(started: asyncio.Event | None = None) -> Any:
    """leak (sync, worker thread) → wait (async, never finishes unless cancelled)."""

    def leak(state: State, config: RunnableConfig) -> State:
        leak_a_connection(config)
        return {"seen": ["leak"]}

    async def wait(state: State) -> State:
        assert started is not None
        started.set()
        await asyncio.Event().wait()
        return {"seen": ["never"]}

    builder = StateGraph(State)
    builder.add_node("leak", leak)
    builder.add_node("wait", wait)
    builder.add_edge(START, "leak")
    builder.add_edge("leak", "wait")
    builder.add_edge("wait", END)
    return lsc.with_scoped_connections(builder.compile())


@pytest.mark.parametrize("how", ["cancel", "wait_for"])
@pytest.mark.parametrize("mode_name", ASYNC_MODES)
def test_async_cancel_and_timeout_release_the_scope(
    mode_name: str,
    how: str,
    manager: ExecutionConnectionManager,
    pg_db: Database,
    leaked: list[Any],
) -> None:
    mode = Mode(mode_name)
    during: list[int] = []

    async def main() -> None:
        started = asyncio.Event()
        graph = holding_graph(started)
        run = mode.arun(graph, [{"tag": "a"}], [{}])
        if how == "cancel":
            task = asyncio.ensure_future(run)
            await started.wait()
            during.append(manager.get_stats()["active_executions"])
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        else:

            async def run_after_start() -> None:
                await run

            # the timeout fires once the graph is parked in `wait`; no timing is asserted
            task = asyncio.ensure_future(run_after_start())
            await started.wait()
            during.append(manager.get_stats()["active_executions"])
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(task, timeout=0.05)
        await manager.adrain()

    asyncio.run(main())
    assert during == [1]
    stats = assert_released(manager, pg_db)
    assert len(leaked) == 1 and leaked[0].invalidated
    assert stats["leaks_reclaimed"] == 1


@pytest.mark.parametrize("mode_name", ["stream", "astream"])
def test_break_out_of_a_stream_then_close_releases_the_scope(
    mode_name: str, manager: ExecutionConnectionManager, pg_db: Database, leaked: list[Any]
) -> None:
    recorder = Recorder()
    graph = lsc.with_scoped_connections(build_example_graph(recorder))
    before = opened(manager)
    open_while_streaming: list[int] = []

    if mode_name == "stream":
        stream = graph.stream({"tag": "s"}, stream_mode="updates")
        for _chunk in stream:
            open_while_streaming.append(manager.get_stats()["active_executions"])
            break
        stream.close()
    else:

        async def main() -> None:
            astream = graph.astream({"tag": "s"}, stream_mode="updates")
            async for _chunk in astream:
                open_while_streaming.append(manager.get_stats()["active_executions"])
                break
            await astream.aclose()
            await manager.adrain()

        asyncio.run(main())
    assert open_while_streaming == [1]
    assert opened(manager) - before == 1
    assert {s.where for s in recorder.sights} == {"node(config)"}  # stopped after `agent`
    assert_released(manager, pg_db)


def test_interrupt_closes_the_scope_and_resume_gets_a_new_one(
    mode: Mode, manager: ExecutionConnectionManager, pg_db: Database
) -> None:
    from langgraph.checkpoint.memory import InMemorySaver
    from langgraph.types import Command, interrupt

    recorder = Recorder()
    open_at_interrupt: list[int] = []

    def ask(state: State, config: RunnableConfig) -> State:
        db = lsc.get_scoped_sql_database(config)
        recorder.saw(state["tag"], "ask", db)
        count_orders(db)
        open_at_interrupt.append(manager.get_stats()["active_executions"])
        answer = interrupt("approve?")
        return {"seen": [f"answer:{answer}"]}

    builder = StateGraph(State)
    builder.add_node("ask", ask)
    builder.add_edge(START, "ask")
    builder.add_edge("ask", END)
    graph = lsc.with_scoped_connections(builder.compile(checkpointer=InMemorySaver()))
    tags = ["a", "b"] if mode.is_batch else ["a"]
    cfgs: list[RunnableConfig] = [{"configurable": {"thread_id": f"th-{t}"}} for t in tags]
    before = opened(manager)

    first = mode.run(graph, [{"tag": t} for t in tags], cfgs)
    if mode.name in ("invoke", "ainvoke", "batch", "abatch"):
        assert all("__interrupt__" in r for r in first)
    assert opened(manager) - before == len(tags)
    assert_released(manager, pg_db)  # closed at the interrupt
    at_interrupt = {s.tag: s.execution_id for s in recorder.sights}

    second = mode.run(graph, [Command(resume="yes") for _ in tags], cfgs)
    assert [r["seen"] for r in second] == [["answer:yes"]] * len(tags)
    assert opened(manager) - before == 2 * len(tags)
    resumed = {s.tag: s.execution_id for s in recorder.sights[len(tags) :]}
    assert set(resumed) == set(tags)
    for t in tags:
        assert resumed[t] != at_interrupt[t]
    assert all(n >= 1 for n in open_at_interrupt)
    assert_released(manager, pg_db)


def test_retry_policy_retries_stay_in_one_scope(
    mode: Mode, manager: ExecutionConnectionManager, pg_db: Database
) -> None:
    from langgraph.types import RetryPolicy

    recorder = Recorder()
    attempts: dict[str, int] = {}
    lock = threading.Lock()

    def flaky(state: State, config: RunnableConfig) -> State:
        db = lsc.get_scoped_sql_database(config)
        recorder.saw(state["tag"], "flaky", db)
        count_orders(db)
        with lock:
            attempts[state["tag"]] = attempts.get(state["tag"], 0) + 1
            n = attempts[state["tag"]]
        if n < 3:
            raise NodeFailed(f"attempt {n}")
        return {"seen": [f"ok after {n}"]}

    builder = StateGraph(State)
    policy = RetryPolicy(max_attempts=3, initial_interval=0.001, jitter=False, retry_on=NodeFailed)
    builder.add_node("flaky", flaky, retry_policy=policy)
    builder.add_edge(START, "flaky")
    builder.add_edge("flaky", END)
    graph = lsc.with_scoped_connections(builder.compile())
    tags = ["a", "b"] if mode.is_batch else ["a"]
    before = opened(manager)
    results = mode.run(graph, [{"tag": t} for t in tags])
    assert [r["seen"] for r in results] == [["ok after 3"]] * len(tags)
    assert opened(manager) - before == len(tags)
    for sights in recorder.by_tag().values():
        assert len(sights) == 3
        assert len({s.execution_id for s in sights}) == 1
        assert len({id(s.database) for s in sights}) == 1
    assert_released(manager, pg_db)


def test_sync_node_outliving_its_cancelled_run_keeps_a_working_connection(
    manager: ExecutionConnectionManager, pg_db: Database, leaked: list[Any]
) -> None:
    checked_out, gate = threading.Event(), threading.Event()
    outcome: dict[str, Any] = {}

    def slow(state: State, config: RunnableConfig) -> State:
        engine = lsc.get_scoped_engine(config)
        db = lsc.get_scoped_sql_database(config)
        try:
            with engine.connect() as conn:
                outcome["pid"] = conn.execute(text("select pg_backend_pid()")).scalar()
                checked_out.set()
                gate.wait(timeout=60)
                # the run was cancelled meanwhile: the connection still works
                outcome["pid_after"] = conn.execute(text("select pg_backend_pid()")).scalar()
                outcome["count_after"] = count_orders(db)
                late = engine.connect()  # leaked after the run ended: closed once we return
                outcome["late_pid"] = late.execute(text("select pg_backend_pid()")).scalar()
                LEAKED.append(late)
        except BaseException as exc:
            outcome["error"] = exc
        return {"seen": ["slow"]}

    builder = StateGraph(State)
    builder.add_node("slow", slow)
    builder.add_edge(START, "slow")
    graph = lsc.with_scoped_connections(builder.compile())
    mid: dict[str, Any] = {}

    async def main() -> None:
        task = asyncio.ensure_future(graph.ainvoke({"tag": "s"}))
        assert await asyncio.to_thread(checked_out.wait, 60)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        mid["stats"] = manager.get_stats()
        mid["server_pids"] = await asyncio.to_thread(
            pg_db.query,
            "select pid from pg_stat_activity where datname = current_database() "
            "and application_name like %s",
            APP,
        )
        gate.set()
        # leaving asyncio.run waits for the executor thread running `slow` to return

    asyncio.run(main())
    assert mid["stats"]["active_executions"] == 0  # the run's scope ended at the cancel
    assert mid["stats"]["draining_executions"] == 1  # ...but its connection was not torn away
    assert mid["stats"]["connections_in_use"] == 1
    assert (outcome["pid"],) in mid["server_pids"]
    assert "error" not in outcome, outcome.get("error")
    assert outcome["pid_after"] == outcome["pid"]
    assert outcome["count_after"] == "[(500,)]"
    stats = assert_released(manager, pg_db)
    assert stats["leaks_reclaimed"] == 1  # only the late leak; the `with` one came back
    assert leaked[0].invalidated

    def server_pids() -> set[object]:
        rows = pg_db.query(
            "select pid from pg_stat_activity where datname = current_database() "
            "and application_name like %s",
            APP,
        )
        return {r[0] for r in rows}

    eventually(lambda: outcome["late_pid"] not in server_pids(), "the late leak's backend")


# -- a scope that cannot be opened -----------------------------------------------------


def lookup_graph(errors: list[tuple[str, BaseException]]) -> Any:
    """Tools and a node that try every lookup and record what they got."""

    def attempt(where: str, get: Callable[[], Any]) -> None:
        try:
            db = get()
            count_orders(db)
        except Exception as exc:
            errors.append((where, exc))
        else:
            errors.append((where, AssertionError("a connection was handed out")))

    @tool
    def with_config(config: RunnableConfig) -> str:
        """config lookup."""
        attempt("tool(config)", lambda: lsc.get_scoped_sql_database(config))
        return "done"

    @tool
    def with_runtime(runtime: ToolRuntime) -> str:
        """ToolRuntime lookup."""
        attempt("tool(runtime)", lambda: lsc.get_scoped_sql_database(runtime))
        return "done"

    @tool
    def guide() -> str:
        """the guide's API."""
        attempt("tool(guide)", lsc.create_execution_scoped_sql_database_sync)
        attempt("tool(engine)", lsc.get_scoped_engine)
        return "done"

    def agent(state: State, config: RunnableConfig) -> State:
        attempt("node", lambda: lsc.get_scoped_sql_database(config))
        calls = [
            {"name": n, "args": {}, "id": f"c{i}"}
            for i, n in enumerate(["with_config", "with_runtime", "guide"])
        ]
        return {"messages": [AIMessage(content="", tool_calls=calls)]}

    builder = StateGraph(State)
    builder.add_node("agent", agent)
    builder.add_node("tools", ToolNode([with_config, with_runtime, guide]))
    builder.add_edge(START, "agent")
    builder.add_edge("agent", "tools")
    builder.add_edge("tools", END)
    return builder.compile()


def assert_all_unavailable(errors: list[tuple[str, BaseException]], runs: int) -> None:
    wheres = ["node", "tool(config)", "tool(runtime)", "tool(guide)", "tool(engine)"]
    assert sorted(w for w, _ in errors) == sorted(wheres * runs)
    for where, exc in errors:
        assert isinstance(exc, lsc.ScopeUnavailableError), (where, exc)
        assert "could not be opened" in str(exc)


def test_execution_id_callable_that_raises_gives_tools_a_clear_error(
    mode: Mode, manager: ExecutionConnectionManager, pg_db: Database
) -> None:
    def broken(run: Any) -> str:
        raise RuntimeError(f"cannot derive an id from {pg_db.url}")

    errors: list[tuple[str, BaseException]] = []
    graph = lsc.with_scoped_connections(lookup_graph(errors), execution_id=broken)
    runs = 2 if mode.is_batch else 1
    mode.run(graph, [{"tag": "x"}] * runs)
    assert_all_unavailable(errors, runs)
    password = "s3cr3t-Sup3ruser-pw"
    assert all(password not in str(exc) for _, exc in errors)
    assert all("RuntimeError" in str(exc) for _, exc in errors)
    stats = manager.get_stats()
    assert stats["scope_open_failures"] == runs
    assert stats["scopes_opened"] == 0
    assert stats["connections_opened"] == 0
    assert pg_db.backends(APP) == 0  # no silent global connection
    assert_released(manager, pg_db)


def test_closed_manager_gives_tools_a_clear_error(
    mode: Mode, manager: ExecutionConnectionManager, pg_db: Database
) -> None:
    other = ExecutionConnectionManager(pg_db.url, application_name="lsc-closed")
    other.close()
    errors: list[tuple[str, BaseException]] = []
    graph = lsc.with_scoped_connections(lookup_graph(errors), manager=other)
    runs = 2 if mode.is_batch else 1
    mode.run(graph, [{"tag": "x"}] * runs)
    assert_all_unavailable(errors, runs)
    assert all("closed" in str(exc) for _, exc in errors)
    assert other.tracked_runs() == 0
    assert manager.get_stats()["scopes_opened"] == 0  # no fallback to the default manager
    assert pg_db.backends() == 0


def test_sync_run_paths_never_create_an_event_loop(
    monkeypatch: pytest.MonkeyPatch, manager: ExecutionConnectionManager, pg_db: Database
) -> None:
    from langchain_core.callbacks import AsyncCallbackHandler

    created: list[str] = []
    original = asyncio.BaseEventLoop.__init__

    def spy(self: asyncio.BaseEventLoop) -> None:
        created.append(threading.current_thread().name)
        original(self)

    monkeypatch.setattr(asyncio.BaseEventLoop, "__init__", spy)
    recorder = Recorder()
    graph = lsc.with_scoped_connections(build_example_graph(recorder))
    for name in SYNC_MODES:
        Mode(name).run(graph, [{"tag": name}])

    def failing(state: State, config: RunnableConfig) -> State:
        leak_a_connection(config)
        raise NodeFailed

    builder = StateGraph(State)
    builder.add_node("failing", failing)
    builder.add_edge(START, "failing")
    with pytest.raises(NodeFailed):
        lsc.with_scoped_connections(builder.compile()).invoke({"tag": "f"})
    LEAKED.clear()
    assert created == []
    handler = lsc.ScopedConnectionHandler()
    assert not isinstance(handler, AsyncCallbackHandler)
    assert handler.run_inline
    assert len(recorder.by_tag()) == len(SYNC_MODES)
    assert_released(manager, pg_db)


# -- langgraph dev's blocking-call checker ----------------------------------------------


@pytest.fixture
def blockbuster_like_langgraph_dev() -> Iterator[Callable[[], Any]]:
    """Returns an activator of blockbuster configured exactly as `langgraph dev` does.

    langgraph-runtime-inmem's ``_enable_blockbuster`` scans every module
    (``excluded_modules=[]``), allows a few known calls (``os.stat``, file reads and
    writes, ``threading.Lock.acquire`` ...) and raises ``BlockingError`` on any other
    blocking call made on the event loop's thread.
    """
    queue = pytest.importorskip("langgraph_runtime_inmem.queue")
    active: list[Any] = []

    def activate() -> Any:
        bb = queue._enable_blockbuster()
        active.append(bb)
        return bb

    yield activate
    for bb in active:
        bb.deactivate()


def test_blocking_call_checker_never_fires_on_our_code(
    blockbuster_like_langgraph_dev: Callable[[], Any],
    manager: ExecutionConnectionManager,
    pg_db: Database,
    leaked: list[Any],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from blockbuster import BlockingError

    recorder = Recorder()
    example = lsc.with_scoped_connections(build_example_graph(recorder))

    @tool
    async def guide_tool(tag: str) -> str:
        """The guide's async API, as an async tool under langgraph dev uses it."""
        db = await lsc.create_execution_scoped_sql_database()
        recorder.saw(tag, "async tool", db)
        return await asyncio.to_thread(count_orders, db)

    def agent(state: State) -> State:
        calls = [{"name": "guide_tool", "args": {"tag": state["tag"]}, "id": "c1"}]
        return {"messages": [AIMessage(content="", tool_calls=calls)]}

    def leak_then_fail(state: State, config: RunnableConfig) -> State:
        leak_a_connection(config)
        raise NodeFailed

    b = StateGraph(State)
    b.add_node("agent", agent)
    b.add_node("tools", ToolNode([guide_tool]))
    b.add_node("fail", leak_then_fail)
    b.add_edge(START, "agent")
    b.add_edge("agent", "tools")
    b.add_edge("tools", "fail")
    async_tools = lsc.with_scoped_connections(b.compile())
    outcomes: list[str] = []
    # blockbuster cannot see I/O inside psycopg2's C code, so also record the thread of
    # every pool event that does I/O: none may run on the event loop's thread
    io_threads: list[tuple[str, int]] = []
    pool = manager.pool_for().engine.pool
    io_events = ("connect", "checkout", "checkin", "reset", "close", "close_detached")
    listeners = [
        (name, functools.partial(lambda n, *a: io_threads.append((n, threading.get_ident())), name))
        for name in (*io_events, "invalidate", "soft_invalidate")
    ]
    for name, fn in listeners:
        sa_event.listen(pool, name, fn)
    # a reclaim closes the driver's connection through session.close_and_wait, whether the
    # pool invalidates the record (the node's thread is gone) or abandons it (the thread
    # that checked it out is alive, as an executor's worker is): record that one's thread too
    close_and_wait = session_module.close_and_wait

    def recorded_close_and_wait(driver: Any) -> None:
        io_threads.append(("close_and_wait", threading.get_ident()))
        close_and_wait(driver)

    monkeypatch.setattr(session_module, "close_and_wait", recorded_close_and_wait)
    loop_thread: list[int] = []

    async def main() -> None:
        loop_thread.append(threading.get_ident())
        bb = blockbuster_like_langgraph_dev()
        try:
            with pytest.raises(BlockingError):  # the checker is really on
                time.sleep(0.001)  # noqa: ASYNC251
            await example.ainvoke({"tag": "ainvoke"})
            await example.abatch([{"tag": "abatch1"}, {"tag": "abatch2"}])
            async for _ in example.astream_events({"tag": "events"}, version="v2"):
                pass
            astream = example.astream({"tag": "break"})
            async for _ in astream:
                break
            await astream.aclose()
            with pytest.raises(NodeFailed):
                await async_tools.ainvoke({"tag": "async-tool"})
            outcomes.append("error")
            for how in ("cancel", "wait_for"):
                started = asyncio.Event()
                task = asyncio.ensure_future(holding_graph(started).ainvoke({"tag": how}))
                await started.wait()
                if how == "cancel":
                    task.cancel()
                    with pytest.raises(asyncio.CancelledError):
                        await task
                else:
                    with pytest.raises(TimeoutError):
                        await asyncio.wait_for(task, timeout=0.05)
                outcomes.append(how)
            await manager.adrain()
        finally:
            bb.deactivate()

    try:
        asyncio.run(main())
    finally:
        for name, fn in listeners:
            sa_event.remove(pool, name, fn)
    assert outcomes == ["error", "cancel", "wait_for"]
    assert {n for n, _ in io_threads} >= {"connect", "checkout", "checkin"}
    assert [n for n, _ in io_threads].count("close_and_wait") >= 3  # the three leaks
    assert [n for n, t in io_threads if t == loop_thread[0]] == []
    assert not [r for r in caplog.records if "BlockingError" in r.getMessage()]
    assert sorted(recorder.by_tag()) == sorted(
        ["ainvoke", "abatch1", "abatch2", "events", "break", "async-tool"]
    )
    stats = assert_released(manager, pg_db)
    assert stats["leaks_reclaimed"] == len(leaked) == 3
    assert all(c.invalidated for c in leaked)


# -- load ------------------------------------------------------------------------------


def test_hundred_concurrent_ainvoke_runs_stay_within_the_budget(
    manager: ExecutionConnectionManager, pg_db: Database
) -> None:
    recorder = Recorder()
    graph = lsc.with_scoped_connections(build_example_graph(recorder))  # one shared handler
    runs = 100
    before = opened(manager)

    async def main() -> list[Any]:
        return await asyncio.gather(
            *(graph.ainvoke({"tag": f"r{i}"}) for i in range(runs)), return_exceptions=True
        )

    with pg_db.sampler() as sampler:
        results = asyncio.run(main())
    failures = [r for r in results if isinstance(r, BaseException)]
    assert failures == []
    assert all(sorted(set(r["seen"])) == ["agent", "branch", "inner"] for r in results)
    assert opened(manager) - before == runs
    by_tag = recorder.by_tag()
    assert len(by_tag) == runs
    assert all(len({s.execution_id for s in v}) == 1 for v in by_tag.values())
    assert len({v[0].execution_id for v in by_tag.values()}) == runs
    assert sampler.samples and max(sampler.samples) <= manager.settings.max_connections
    stats = assert_released(manager, pg_db)
    assert stats["peak_connections"] <= manager.settings.max_connections
    assert stats["leaks_reclaimed"] == 0
