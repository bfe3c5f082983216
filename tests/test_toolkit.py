"""The agents people build: SQLDatabaseToolkit and a prebuilt agent, made at import time.

The toolkit below is built when this module is imported, before any manager or run
exists, exactly as LangChain's SQL agent tutorial builds it, with a
``ScopedSQLDatabaseProxy`` as its ``db``.  The same tools then serve
``langgraph.prebuilt.create_react_agent`` and ``langchain.agents.create_agent``
graphs wrapped with ``with_scoped_connections``, on a real PostgreSQL; connection
counts are read from pg_stat_activity.  Also here: the run's SQLDatabase under
``config["configurable"]["sql_database"]`` (with checkpointers, interrupt and
resume, and LangGraph Server's JSON encoding), a LangGraph ``Runtime`` as the lookup
argument, and the proxy under a real ``langgraph dev``.
"""

from __future__ import annotations

import asyncio
import copy
import json
import operator
import os
import pickle
import threading
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypedDict

import httpx
import pytest
from langchain.agents import create_agent
from langchain.agents.middleware import before_model
from langchain_community.agent_toolkits import SQLDatabaseToolkit
from langchain_community.utilities.sql_database import SQLDatabase
from langchain_core.messages import AIMessage
from langchain_core.runnables import RunnableConfig
from langchain_core.tools import tool
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode, ToolRuntime
from langgraph.runtime import Runtime
from langgraph.types import Command, interrupt
from sqlalchemy.engine import make_url

import langgraph_scoped_conn as lsc
from langgraph_scoped_conn import NoActiveScopeError, ScopedSQLDatabaseProxy
from langgraph_scoped_conn.demo import ScriptedSQLChatModel
from langgraph_scoped_conn.testing import free_port
from tests.conftest import Database, assert_clean, eventually
from tests.devserver import langgraph_dev

REPO = Path(__file__).resolve().parent.parent
EXAMPLE_CONFIG = REPO / "examples" / "sql_toolkit" / "langgraph.json"

# -- built at import time, as the tutorial does: no manager, no run, no connection --------

MODEL = ScriptedSQLChatModel()
PROXY = ScopedSQLDatabaseProxy()
READ_ONLY_PROXY = ScopedSQLDatabaseProxy(read_only=True)
TOOLS = SQLDatabaseToolkit(db=PROXY, llm=MODEL).get_tools()
READ_ONLY_TOOLS = SQLDatabaseToolkit(db=READ_ONLY_PROXY, llm=MODEL).get_tools()

ORDERS_ANSWER = "Result: [(500,)]\n\nSQL: SELECT COUNT(*) AS count FROM orders"
CUSTOMERS_ANSWER = "Result: [(50,)]\n\nSQL: SELECT COUNT(*) AS count FROM customers"
TOOL_SEQUENCE = ["sql_db_list_tables", "sql_db_schema", "sql_db_query"]


def build_agent(kind: str, tools: list[Any] = TOOLS, **kwargs: Any) -> Any:
    """The prebuilt agent ``kind`` over ``tools``, not yet wrapped."""
    if kind == "create_agent":
        return create_agent(MODEL, tools, **kwargs)
    from langgraph.prebuilt import create_react_agent

    with warnings.catch_warnings():  # "create_react_agent has moved to langchain.agents"
        warnings.simplefilter("ignore", DeprecationWarning)
        return create_react_agent(MODEL, tools, **kwargs)


def tool_named(tools: list[Any], name: str) -> Any:
    return next(t for t in tools if t.name == name)


def all_backends(pg_db: Database) -> int:
    """Every client backend on the test database, not only the package's."""
    return pg_db.backends("%")


# -- the toolkit under a prebuilt agent ------------------------------------------------


@pytest.mark.parametrize("kind", ["create_react_agent", "create_agent"])
async def test_thirty_concurrent_runs_share_a_budget_of_three(
    kind: str, configure_default: Any, pg_db: Database
) -> None:
    manager = configure_default(max_connections=3, pool_timeout=60)
    graph = lsc.with_scoped_connections(build_agent(kind))
    questions = ["How many orders are there?", "How many customers are there?"] * 15
    with pg_db.sampler(app_like="%") as sampler:
        states = await asyncio.gather(
            *(graph.ainvoke({"messages": [("user", q)]}) for q in questions)
        )
    for question, state in zip(questions, states, strict=True):
        expected = ORDERS_ANSWER if "orders" in question else CUSTOMERS_ANSWER
        assert state["messages"][-1].content == expected
        assert [m.name for m in state["messages"] if m.type == "tool"] == TOOL_SEQUENCE
    # every backend the server saw (not just the package's) stayed within the budget
    assert sampler.samples, "the sampler never read pg_stat_activity"
    assert 1 <= sampler.peak <= 3, sampler.peak
    stats = manager.get_stats()
    assert stats["scopes_opened"] == stats["scopes_closed"] == 30
    assert stats["checkouts"] >= 60  # the tools' queries went through the scoped pool
    assert stats["peak_connections"] <= 3
    assert_clean(manager)
    assert stats["connections_in_use"] == 0
    assert pg_db.backends("langgraph_scoped_conn%") == all_backends(pg_db) <= 3


def test_proxy_is_a_sqldatabase_that_connects_to_nothing_outside_a_run(
    configure_default: Any, pg_db: Database
) -> None:
    manager = configure_default(max_connections=3)
    assert isinstance(PROXY, SQLDatabase)
    assert PROXY.dialect == "postgresql"  # read from the URL
    assert ScopedSQLDatabaseProxy(pg_db.url).dialect == "postgresql"
    assert ScopedSQLDatabaseProxy("sqlite:///nowhere.db").dialect == "sqlite"
    with pytest.raises(NoActiveScopeError):
        tool_named(TOOLS, "sql_db_list_tables").invoke({"tool_input": ""})
    with pytest.raises(NoActiveScopeError):
        tool_named(TOOLS, "sql_db_query").invoke({"query": "select 1"})
    with pytest.raises(NoActiveScopeError):
        tool_named(TOOLS, "sql_db_schema").invoke({"table_names": "orders"})
    for call in (
        lambda: PROXY.run("select 1"),
        lambda: PROXY.run_no_throw("select 1"),
        PROXY.get_usable_table_names,
        PROXY.get_table_names,
        PROXY.get_table_info,
        PROXY.get_table_info_no_throw,
        PROXY.get_context,
        lambda: PROXY.table_info,
        lambda: PROXY._execute("select 1"),
        lambda: PROXY._engine,
    ):
        with pytest.raises(NoActiveScopeError):
            call()
    # serialisers ask for these outside any run: a plain "no", not an error
    assert not hasattr(PROXY, "model_dump")
    assert not hasattr(PROXY, "_asdict")
    assert all_backends(pg_db) == 0
    assert manager.get_stats()["connections_opened"] == 0

    # the first run connects; afterwards the proxy is inert again
    graph = lsc.with_scoped_connections(build_agent("create_agent"))
    state = graph.invoke({"messages": [("user", "How many orders are there?")]})
    assert state["messages"][-1].content == ORDERS_ANSWER
    assert manager.get_stats()["connections_opened"] >= 1
    with pytest.raises(NoActiveScopeError):
        PROXY.run("select 1")


def test_proxy_repr_copy_and_pickle_show_and_hold_no_password(pg_db: Database) -> None:
    password = make_url(pg_db.url).password
    assert password
    proxy = ScopedSQLDatabaseProxy(pg_db.url, read_only=True, include_tables=["orders"])
    shown = repr(proxy)
    assert password not in shown and "***" in shown and "read_only=True" in shown
    assert password not in repr(ScopedSQLDatabaseProxy(make_url(pg_db.url)))
    assert copy.copy(proxy) is proxy and copy.deepcopy(proxy) is proxy
    manager_bound = ScopedSQLDatabaseProxy(manager=lsc.ExecutionConnectionManager(pg_db.url))
    try:
        restored = pickle.loads(pickle.dumps(manager_bound))  # the manager stays behind
        assert isinstance(restored, ScopedSQLDatabaseProxy)
        assert restored._lsc_manager is None
    finally:
        manager_bound._lsc_manager.close()  # type: ignore[union-attr]
    with pytest.raises(lsc.ConfigurationError, match="not_an_option"):
        ScopedSQLDatabaseProxy(not_an_option=1)


def test_the_query_checker_tool_reads_the_dialect_without_a_run(
    configure_default: Any, pg_db: Database
) -> None:
    configure_default()
    checker = tool_named(TOOLS, "sql_db_query_checker")
    prompts: list[str] = []

    class Recorder(ScriptedSQLChatModel):
        def _generate(self, messages: Any, *args: Any, **kwargs: Any) -> Any:
            prompts.append(str(messages[-1].content))
            return super()._generate(messages, *args, **kwargs)

    recording = checker.model_copy()
    recording.llm_chain = recording.llm_chain.model_copy(update={"llm": Recorder()})
    recording.invoke({"query": "select count(*) from orders"})
    assert prompts and "postgresql query" in prompts[0]
    assert all_backends(pg_db) == 0


async def test_each_run_resolves_its_own_scoped_database(configure_default: Any) -> None:
    configure_default(max_connections=3)
    barrier = threading.Barrier(2, timeout=30)
    seen: list[tuple[Any, Any, str]] = []

    def look(state: MessagesState, config: RunnableConfig) -> dict[str, Any]:
        behind = PROXY.resolve()
        assert behind is lsc.get_scoped_sql_database(config)  # the run's own object
        assert behind is PROXY.resolve()  # and the same one for the whole run
        assert PROXY.run("select count(*) from orders") == "[(500,)]"
        assert PROXY.read_only is False and READ_ONLY_PROXY.read_only is True
        assert READ_ONLY_PROXY.resolve() is not behind  # other options, another object
        barrier.wait()  # both runs are live at once
        seen.append((behind, lsc.current_execution(), behind._engine.execution_id))
        return {}

    builder = StateGraph(MessagesState)
    builder.add_node("look", look)
    builder.add_edge(START, "look")
    graph = lsc.with_scoped_connections(builder.compile())
    await asyncio.gather(graph.ainvoke({"messages": []}), graph.ainvoke({"messages": []}))
    (db_a, _, exec_a), (db_b, _, exec_b) = seen
    assert db_a is not db_b
    assert exec_a != exec_b


@pytest.mark.parametrize("kind", ["create_react_agent", "create_agent"])
async def test_read_only_proxy_refuses_delete_through_the_query_tool(
    kind: str, configure_default: Any, pg_db: Database
) -> None:
    configure_default(max_connections=3)
    graph = lsc.with_scoped_connections(build_agent(kind, READ_ONLY_TOOLS))
    state = await graph.ainvoke({"messages": [("user", "sql: DELETE FROM orders")]})
    (tool_message,) = [m for m in state["messages"] if m.type == "tool"]
    assert tool_message.name == "sql_db_query"
    assert tool_message.content.startswith("Error:")
    assert "read-only" in tool_message.content or "refused" in tool_message.content
    assert pg_db.query("select count(*) from orders") == [(500,)]
    # the writable proxy's tool does delete: the refusal above came from read_only=True
    writable = lsc.with_scoped_connections(build_agent(kind))
    await writable.ainvoke({"messages": [("user", "sql: DELETE FROM orders WHERE id = 1")]})
    assert pg_db.query("select count(*) from orders") == [(499,)]


# -- the run's SQLDatabase in config["configurable"]["sql_database"] ------------------


class CountState(TypedDict):
    counts: Annotated[list[str], operator.add]


def counting_graph(checkpointer: Any) -> Any:
    """count (from config) -> interrupt -> count again, wrapped."""

    def count(state: CountState, config: RunnableConfig) -> dict[str, Any]:
        db = config["configurable"]["sql_database"]
        assert isinstance(db, ScopedSQLDatabaseProxy)
        assert db.resolve() is lsc.get_scoped_sql_database(config)
        return {"counts": [db.run("select count(*) from orders")]}

    def gate(state: CountState) -> dict[str, Any]:
        return {"counts": [f"approved {interrupt('count again?')}"]}

    builder = StateGraph(CountState)
    builder.add_node("first", count)
    builder.add_node("gate", gate)
    builder.add_node("second", count)
    builder.add_edge(START, "first")
    builder.add_edge("first", "gate")
    builder.add_edge("gate", "second")
    builder.add_edge("second", END)
    return lsc.with_scoped_connections(builder.compile(checkpointer=checkpointer))


def test_tool_takes_the_run_database_from_its_config(configure_default: Any) -> None:
    manager = configure_default(max_connections=3)

    @tool
    def count_orders(config: RunnableConfig, runtime: ToolRuntime) -> str:
        """Count the orders."""
        db = config["configurable"]["sql_database"]
        assert db is runtime.config["configurable"]["sql_database"]
        assert db.resolve() is lsc.get_scoped_sql_database(config)
        assert db.resolve(runtime) is db.resolve() is PROXY.resolve(runtime)
        return f"{type(db).__name__} {db.run_no_throw('select count(*) from orders')}"

    builder = StateGraph(MessagesState)
    builder.add_node("tools", ToolNode([count_orders]))
    builder.add_edge(START, "tools")
    graph = lsc.with_scoped_connections(builder.compile())
    call = AIMessage("", tool_calls=[{"name": "count_orders", "args": {}, "id": "c1"}])
    state = graph.invoke({"messages": [call]})
    assert state["messages"][-1].content == "ScopedSQLDatabaseProxy [(500,)]"
    assert manager.get_stats()["scopes_closed"] == 1

    # the user's own value wins, at invoke time and in the compiled graph's config
    mine = object()
    seen: list[Any] = []

    def node(state: MessagesState, config: RunnableConfig) -> dict[str, Any]:
        seen.append(config["configurable"]["sql_database"])
        return {}

    plain = StateGraph(MessagesState)
    plain.add_node("node", node)
    plain.add_edge(START, "node")
    compiled = plain.compile()
    lsc.with_scoped_connections(compiled).invoke(
        {"messages": []}, {"configurable": {"sql_database": mine}}
    )
    lsc.with_scoped_connections(compiled.with_config(configurable={"sql_database": mine})).invoke(
        {"messages": []}
    )
    assert seen == [mine, mine]


@pytest.mark.parametrize("bad", ["", 3, b"sql_database"])
def test_a_bad_sql_database_key_is_refused_by_name(bad: Any) -> None:
    builder = StateGraph(MessagesState)
    builder.add_node("node", lambda state: {})
    builder.add_edge(START, "node")
    with pytest.raises(TypeError, match=r"sql_database_key=\.\.\.\) takes a non-empty"):
        lsc.with_scoped_connections(builder.compile(), sql_database_key=bad)
    with pytest.raises(TypeError, match="sql_database_key"):
        lsc.with_scoped_connections(sql_database_key=bad)


def postgres_saver_url(pg_db: Database) -> str:
    return make_url(pg_db.url).set(drivername="postgresql").render_as_string(hide_password=False)


@pytest.mark.parametrize("saver", ["memory", "postgres"])
def test_config_database_survives_checkpointing_interrupt_and_resume(
    saver: str, configure_default: Any, pg_db: Database
) -> None:
    from langgraph_api.serde import json_dumpb  # how LangGraph Server encodes stream events

    manager = configure_default(max_connections=3)
    password = make_url(pg_db.url).password
    assert password
    with _checkpointer(saver, pg_db) as checkpointer:
        graph = counting_graph(checkpointer)
        config: RunnableConfig = {"configurable": {"thread_id": f"t-{uuid.uuid4().hex}"}}
        events = list(graph.stream({"counts": []}, config, stream_mode=["debug", "values"]))
        assert graph.get_state(config).next == ("gate",)
        assert manager.get_stats()["active_executions"] == 0  # waiting holds no scope
        events += list(graph.stream(Command(resume="yes"), config, stream_mode=["debug", "values"]))
        final = graph.get_state(config).values
        assert final["counts"] == ["[(500,)]", "approved yes", "[(500,)]"]
        assert manager.get_stats()["scopes_closed"] == 2
        # the debug stream carries the run's config; it encodes, and shows no password
        encoded = b"".join(json_dumpb(event) for event in events)
        assert b'"sql_database"' in encoded
        assert password.encode() not in encoded
        # checkpoint metadata keeps only plain values: no proxy, no password
        for snapshot in checkpointer.list(config):
            assert "sql_database" not in snapshot.metadata
            assert password not in repr(snapshot.metadata)


@dataclass
class _Saver:
    saver: Any

    def __enter__(self) -> Any:
        return self.saver

    def __exit__(self, *exc: object) -> None:
        pass


def _checkpointer(kind: str, pg_db: Database) -> Any:
    if kind == "memory":
        return _Saver(InMemorySaver())
    from contextlib import contextmanager

    from langgraph.checkpoint.postgres import PostgresSaver

    @contextmanager
    def postgres() -> Iterator[Any]:
        with PostgresSaver.from_conn_string(postgres_saver_url(pg_db)) as saver:
            saver.setup()
            yield saver

    return postgres()


# -- a LangGraph Runtime as the lookup argument ----------------------------------------


@dataclass
class Ctx:
    user: str


def test_runtime_argument_in_a_node(configure_default: Any) -> None:
    configure_default(max_connections=3)
    seen: dict[str, Any] = {}

    def node(state: MessagesState, config: RunnableConfig, runtime: Runtime[Ctx]) -> dict[str, Any]:
        assert runtime.context.user == "ada"
        db = lsc.get_scoped_sql_database(runtime, read_only=True)
        assert db is lsc.get_scoped_sql_database(config, read_only=True)
        assert lsc.get_scoped_engine(runtime) is lsc.get_scoped_engine(config)
        assert PROXY.resolve(runtime) is PROXY.resolve(config)
        seen["count"] = db.run("select count(*) from orders")
        return {}

    builder = StateGraph(MessagesState, context_schema=Ctx)
    builder.add_node("node", node)
    builder.add_edge(START, "node")
    graph = lsc.with_scoped_connections(builder.compile())
    graph.invoke({"messages": []}, context=Ctx(user="ada"))
    assert seen == {"count": "[(500,)]"}
    with pytest.raises(TypeError, match="Runtime"):
        lsc.get_scoped_sql_database(object())


async def test_runtime_argument_in_create_agent_middleware(configure_default: Any) -> None:
    configure_default(max_connections=3)
    counts: list[str] = []

    @before_model
    def count_first(state: Any, runtime: Runtime[Any]) -> None:
        if not counts:
            counts.append(lsc.get_scoped_sql_database(runtime).run("select count(*) from orders"))

    graph = lsc.with_scoped_connections(create_agent(MODEL, TOOLS, middleware=[count_first]))
    state = await graph.ainvoke({"messages": [("user", "How many orders are there?")]})
    assert state["messages"][-1].content == ORDERS_ANSWER
    assert counts == ["[(500,)]"]


# -- under a real `langgraph dev` -------------------------------------------------------


@dataclass
class ToolkitServer:
    url: str
    log: Path


@pytest.fixture
def toolkit_dev_server(pg_db: Database, tmp_path: Path) -> Iterator[ToolkitServer]:
    from tests.test_studio import _langgraph_cli

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LANGSMITH_", "LANGCHAIN_"))}
    env.pop("LSC_CHAT_MODEL", None)
    env.update(
        DATABASE_URL=pg_db.url,
        SCOPED_CONN_DEBUG_TOKEN="toolkit-test-token",
        LANGGRAPH_CLI_NO_ANALYTICS="1",
        LANGSMITH_TRACING="false",
        PYTHONUNBUFFERED="1",
    )
    log = tmp_path / "langgraph-dev.log"
    # `langgraph dev` resolves graph paths against its working directory and keeps its
    # state under ./.langgraph_api: run the example's langgraph.json from a fresh directory
    (tmp_path / "examples").symlink_to(REPO / "examples", target_is_directory=True)
    config = json.loads(EXAMPLE_CONFIG.read_text())
    config["dependencies"] = [str(REPO)]
    config["graphs"] = {
        name: "./examples/sql_toolkit/" + spec.removeprefix("./")
        for name, spec in config["graphs"].items()
    }
    (tmp_path / "langgraph.json").write_text(json.dumps(config))
    cmd = [
        *_langgraph_cli(),
        "dev",
        "--no-browser",
        "--no-reload",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--config",
        str(tmp_path / "langgraph.json"),
    ]
    url = f"http://127.0.0.1:{port}"
    with langgraph_dev(cmd, cwd=tmp_path, env=env, log=log, url=url):
        yield ToolkitServer(url, log)


@pytest.mark.studio
@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_toolkit_example_under_langgraph_dev(
    toolkit_dev_server: ToolkitServer, pg_db: Database
) -> None:
    from langgraph_sdk import get_client

    question = {"messages": [{"role": "user", "content": "How many sales are there?"}]}
    async with get_client(url=toolkit_dev_server.url) as client:
        thread = await client.threads.create()
        result = await client.runs.wait(thread["thread_id"], "sql_toolkit", input=question)
        assert result["messages"][-1]["content"].startswith("Result: [(3000,)]")

        # the stream modes that carry the run's config (debug, checkpoints) encode it
        thread = await client.threads.create()
        chunks = [
            chunk
            async for chunk in client.runs.stream(
                thread["thread_id"],
                "sql_toolkit",
                input=question,
                stream_mode=["values", "debug", "checkpoints"],
            )
        ]
        assert not [c for c in chunks if c.event == "error"], chunks
        carried = [
            c for c in chunks if c.event != "values" and '"sql_database"' in json.dumps(c.data)
        ]
        assert carried, "no debug/checkpoints event carried the run's configurable"
        values = [c.data for c in chunks if c.event == "values"]
        assert values[-1]["messages"][-1]["content"].startswith("Result: [(3000,)]")

        # interrupt before the tools, then resume from the server's checkpoint
        thread = await client.threads.create()
        paused = await client.runs.wait(
            thread["thread_id"], "sql_toolkit", input=question, interrupt_before=["tools"]
        )
        assert paused["messages"][-1]["tool_calls"][0]["name"] == "sql_db_list_tables"
        resumed = paused
        for _ in range(3):  # list tables, schema, query: each pauses before the tools
            resumed = await client.runs.wait(
                thread["thread_id"], "sql_toolkit", input=None, interrupt_before=["tools"]
            )
        assert resumed["messages"][-1]["content"].startswith("Result: [(3000,)]")

    def released() -> bool:
        body = httpx.get(
            toolkit_dev_server.url + "/api/memory/debug/connections/status", timeout=10
        ).json()
        stats = body["data"]["connection_stats"]
        return stats["active_executions"] == 0 and stats["connections_in_use"] == 0

    await asyncio.to_thread(eventually, released, "every run's scope was released")
    assert stats_opened(toolkit_dev_server) >= 6
    log = toolkit_dev_server.log.read_text(errors="replace")
    assert "not JSON serializable" not in log and "BlockingError" not in log
    password = make_url(pg_db.url).password
    assert password and password not in log
    assert pg_db.backends("langgraph_scoped_conn%") <= 10


def stats_opened(server: ToolkitServer) -> int:
    body = httpx.get(server.url + "/api/memory/debug/connections/status", timeout=10).json()
    return int(body["data"]["connection_stats"]["scopes_opened"])
