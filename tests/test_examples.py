"""examples/sql_agent/graph.py: the wrapped SQL agent under every invocation mode.

The module is imported from its file as ``langgraph dev`` would, with the offline
scripted model, against the test PostgreSQL (``DATABASE_URL``) or the embedded
SQLite sample.  Connections are checked from pg_stat_activity.
"""

from __future__ import annotations

import asyncio
import importlib.util
import socket
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.types import Command

import langgraph_scoped_conn as lsc
from langgraph_scoped_conn.configure import swap_default_manager
from langgraph_scoped_conn.demo.data import SALES_ROWS
from tests.conftest import installed_default
from tests.modes import Mode

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "sql_agent" / "graph.py"
COUNT_ANSWER = f"Result: [({SALES_ROWS},)]\n\nSQL: SELECT COUNT(*) AS count FROM sales"


def load_example() -> ModuleType:
    """Import examples/sql_agent/graph.py afresh, as langgraph dev does from langgraph.json."""
    name = f"lsc_example_{uuid.uuid4().hex[:8]}"
    spec = importlib.util.spec_from_file_location(name, EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(name, None)
    return module


@pytest.fixture
def example_on_postgres(pg_db, manager, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.setenv("DATABASE_URL", pg_db.url)
    monkeypatch.delenv("LSC_CHAT_MODEL", raising=False)
    return load_example()


@pytest.fixture
def own_default_manager() -> Iterator[None]:
    """Close a process-default manager the test created (the SQLite example makes one)."""
    before = installed_default()
    yield
    after = installed_default()
    if after is not None and after is not before:
        after.close()
        swap_default_manager(before)


@pytest.mark.parametrize("mode", ["invoke", "ainvoke", "stream", "astream"], indirect=True)
async def test_example_graph_answers_on_postgres(
    example_on_postgres: ModuleType, manager, pg_db, mode: Mode
) -> None:
    graph = example_on_postgres.graph
    state = await mode.final(graph, {"messages": [("user", "How many sales are there?")]})
    assert state["messages"][-1].content == COUNT_ANSWER
    names = [m.name for m in state["messages"] if m.type == "tool"]
    assert names == ["sql_db_list_tables", "sql_db_schema", "sql_db_query"]
    manager.drain()  # the run's end resets its connection's session on a release thread
    stats = manager.get_stats()
    assert stats["scopes_opened"] == stats["scopes_closed"] == 1
    assert stats["active_executions"] == 0
    assert stats["connections_in_use"] == 0
    assert stats["checkouts"] >= 2  # the tools went through the scoped pool
    # server side: only the manager's pool, within its budget of 5, and none mid-query
    assert 1 <= pg_db.backends("langgraph_scoped_conn%") <= 5
    active = pg_db.query(
        "select count(*) from pg_stat_activity where datname = current_database() "
        "and application_name like 'langgraph_scoped_conn%' and state <> 'idle'"
    )
    assert active == [(0,)]


async def test_concurrent_runs_share_the_budget(example_on_postgres: ModuleType, manager, pg_db):
    graph = example_on_postgres.graph
    questions = ["How many sales are there?", "How many products by category?"] * 8
    states = await asyncio.gather(*(graph.ainvoke({"messages": [("user", q)]}) for q in questions))
    assert all(s["messages"][-1].content.startswith("Result:") for s in states)
    stats = manager.get_stats()
    assert stats["scopes_closed"] == 16
    assert stats["peak_connections"] <= 5
    assert pg_db.backends("langgraph_scoped_conn%") <= 5


async def test_read_only_refuses_writes(example_on_postgres: ModuleType, pg_db) -> None:
    state = await example_on_postgres.graph.ainvoke(
        {"messages": [("user", "sql: delete from sales")]}
    )
    assert "refused in read-only mode" in state["messages"][-1].content
    assert pg_db.query("select count(*) from sales") == [(SALES_ROWS,)]


@pytest.mark.parametrize("decision", [True, "too expensive"])
async def test_approval_interrupt_and_resume(
    example_on_postgres: ModuleType, manager, pg_db, decision: Any
) -> None:
    graph = example_on_postgres.graph.copy(update={"checkpointer": InMemorySaver()})
    config = {"configurable": {"thread_id": f"t-{uuid.uuid4().hex}"}}
    first = await graph.ainvoke(
        {"messages": [("user", "How many stores are there?")], "require_approval": True}, config
    )
    (pending,) = first["__interrupt__"]
    assert pending.value["queries"] == ["SELECT COUNT(*) AS count FROM stores"]
    # while a human decides, the run holds no scope and no connection
    assert manager.get_stats()["active_executions"] == 0
    assert manager.get_stats()["connections_in_use"] == 0
    final = await graph.ainvoke(Command(resume=decision), config)
    answer = final["messages"][-1].content
    if decision is True:
        assert answer.startswith("Result: [(12,)]")
    else:
        assert answer == "I did not run the query: Rejected by the reviewer: too expensive"
    assert manager.get_stats()["scopes_closed"] == 2
    assert pg_db.backends("langgraph_scoped_conn%") <= 5


@pytest.mark.parametrize("mode", ["invoke", "ainvoke"], indirect=True)
async def test_example_runs_offline_on_the_sqlite_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, own_default_manager: None, mode: Mode
) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.delenv("LSC_CHAT_MODEL", raising=False)
    monkeypatch.setenv("LSC_CACHE_DIR", str(tmp_path))
    example = load_example()
    assert (tmp_path / "store-v1.sqlite").exists()

    def no_network(self: socket.socket, address: Any) -> None:
        raise AssertionError(f"the offline example tried to connect to {address!r}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    state = await mode.final(example.graph, {"messages": [("user", "How many sales are there?")]})
    assert state["messages"][-1].content == COUNT_ANSWER
    stats = lsc.get_connection_manager().get_stats()
    assert stats["active_executions"] == 0
    assert stats["pools"][0]["dialect"] == "sqlite"


# -- examples/sql_toolkit: the LangChain tutorial with the proxy -------------------------

TOOLKIT_EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "sql_toolkit" / "graph.py"


def load_toolkit_example() -> ModuleType:
    """Import examples/sql_toolkit/graph.py afresh, as langgraph dev does."""
    name = f"lsc_toolkit_example_{uuid.uuid4().hex[:8]}"
    spec = importlib.util.spec_from_file_location(name, TOOLKIT_EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(name, None)
    return module


async def test_toolkit_example_on_postgres(pg_db, manager, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", pg_db.url)
    monkeypatch.delenv("LSC_CHAT_MODEL", raising=False)
    example = load_toolkit_example()
    assert isinstance(example.db, lsc.ScopedSQLDatabaseProxy)
    assert "postgresql query" in example.system_prompt  # the dialect, read without a run
    assert {t.name for t in example.tools} == {
        "sql_db_query",
        "sql_db_schema",
        "sql_db_list_tables",
        "sql_db_query_checker",
    }
    questions = ["How many sales are there?", "How many stores are there?"] * 4
    states = await asyncio.gather(
        *(example.graph.ainvoke({"messages": [("user", q)]}) for q in questions)
    )
    assert [s["messages"][-1].content for s in states[:2]] == [
        COUNT_ANSWER,
        "Result: [(12,)]\n\nSQL: SELECT COUNT(*) AS count FROM stores",
    ]
    stats = manager.get_stats()
    assert stats["scopes_opened"] == stats["scopes_closed"] == 8
    assert stats["checkouts"] >= 16  # the toolkit's tools used the scoped pool
    assert pg_db.backends("%") == pg_db.backends("langgraph_scoped_conn%") <= 5
    # read_only=True on the proxy: the toolkit's query tool refuses a write
    state = await example.graph.ainvoke({"messages": [("user", "sql: delete from sales")]})
    assert "Error:" in state["messages"][-1].content
    assert pg_db.query("select count(*) from sales") == [(SALES_ROWS,)]


async def test_toolkit_example_runs_offline_on_the_sqlite_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, own_default_manager: None
) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.delenv("LSC_CHAT_MODEL", raising=False)
    monkeypatch.setenv("LSC_CACHE_DIR", str(tmp_path))
    example = load_toolkit_example()

    def no_network(self: socket.socket, address: Any) -> None:
        raise AssertionError(f"the offline example tried to connect to {address!r}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    state = await example.graph.ainvoke({"messages": [("user", "How many sales are there?")]})
    assert state["messages"][-1].content == COUNT_ANSWER
    stats = lsc.get_connection_manager().get_stats()
    assert stats["scopes_closed"] == 1 and stats["active_executions"] == 0
    assert stats["pools"][0]["dialect"] == "sqlite"
