"""One live execution per run (langgraph_scoped_conn.runs).

Reproductions: two concurrent invocations with the same ``config["run_id"]`` left an
execution open, holding 2 leaked connections, until ``max_scope_lifetime``; and with the
execution id taken from ``thread_id``, a second client naming the same thread joined the
first client's live execution (its SQLDatabase, its per-run cap).  Now a colliding id
gets a clear error naming it, and everything is released at each run's end.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from typing import Any

import pytest
from langchain_core.runnables import RunnableConfig
from langgraph.graph import END, START, StateGraph
from sqlalchemy import text
from typing_extensions import TypedDict

import langgraph_scoped_conn as lsc
from langgraph_scoped_conn import ExecutionConnectionManager
from tests.conftest import Database, eventually


class State(TypedDict, total=False):
    name: str
    out: str


def holding_graph(entered: threading.Barrier, **wrap: Any) -> Any:
    """A node that takes a connection, waits for the other run, then queries."""

    def node(state: State, config: RunnableConfig) -> State:
        try:
            db = lsc.get_scoped_sql_database(config)
            engine = lsc.get_scoped_engine(config)
            with engine.connect() as conn:
                conn.execute(text("select 1"))
                entered.wait()
                return {"out": f"{id(db)}:{db.run('select count(*) from orders')}"}
        except lsc.ScopedConnectionError as exc:
            entered.abort()
            return {"out": f"error: {exc}"}

    builder = StateGraph(State)
    builder.add_node("node", node)
    builder.add_edge(START, "node")
    builder.add_edge("node", END)
    return lsc.with_scoped_connections(builder.compile(), **wrap)


def assert_released(mgr: ExecutionConnectionManager, pg_db: Database) -> None:
    assert mgr.drain(30)
    stats = mgr.get_stats()
    assert stats["active_executions"] == 0
    assert stats["connections_in_use"] == 0
    assert mgr.tracked_runs() == 0
    eventually(
        lambda: (
            not pg_db.query(
                "select 1 from pg_stat_activity where datname = current_database() "
                "and application_name like 'langgraph_scoped_conn%' and state <> 'idle'"
            )
        ),
        "no package backend is busy",
    )


def test_two_live_invocations_with_one_run_id_get_a_clear_error_and_leak_nothing(
    manager: ExecutionConnectionManager, pg_db: Database
) -> None:
    entered = threading.Barrier(2, timeout=10)
    graph = holding_graph(entered)
    run_id = uuid.uuid4()

    async def main() -> list[Any]:
        config: RunnableConfig = {"run_id": run_id}
        return await asyncio.gather(
            graph.ainvoke({"name": "a"}, config),
            graph.ainvoke({"name": "b"}, config),
            return_exceptions=True,
        )

    results = asyncio.run(main())
    outs = [r["out"] if isinstance(r, dict) else f"error: {r}" for r in results]
    errors = [o for o in outs if o.startswith("error")]
    assert errors, outs  # they never silently share one execution
    assert any(str(run_id) in e for e in errors), errors  # the error names the id
    assert_released(manager, pg_db)
    stats = manager.get_stats()
    assert stats["scopes_opened"] == stats["scopes_closed"]


def test_an_execution_id_from_thread_id_cannot_join_another_live_run(
    manager: ExecutionConnectionManager, pg_db: Database
) -> None:
    opened, release_first = threading.Event(), threading.Event()

    def node(state: State, config: RunnableConfig) -> State:
        try:
            db = lsc.get_scoped_sql_database(config)
        except lsc.ScopedConnectionError as exc:
            return {"out": f"error: {exc}"}
        opened.set()
        release_first.wait(30)  # the first run stays live while the second starts
        return {"out": db.run("select count(*) from orders")}

    builder = StateGraph(State)
    builder.add_node("node", node)
    builder.add_edge(START, "node")
    builder.add_edge("node", END)
    graph = lsc.with_scoped_connections(
        builder.compile(), execution_id=lambda run: run["configurable"]["thread_id"]
    )
    config: RunnableConfig = {"configurable": {"thread_id": "t-1"}}
    outs: dict[str, Any] = {}
    worker = threading.Thread(target=lambda: outs.update(first=graph.invoke({}, config)))
    worker.start()
    assert opened.wait(30)
    second = graph.invoke({}, config)  # a second client names the same thread
    release_first.set()
    worker.join(30)
    assert second["out"].startswith("error: ") and "'t-1'" in second["out"], second
    assert "already used by a live run" in second["out"]
    assert outs["first"]["out"] == "[(500,)]"  # the first run was not disturbed
    assert_released(manager, pg_db)


def test_runs_share_an_execution_on_purpose_inside_one_scope(
    manager: ExecutionConnectionManager, pg_db: Database
) -> None:
    """An enclosing ExecutionScope is the way to share: both runs join it."""
    entered = threading.Barrier(2, timeout=10)
    graph = holding_graph(entered)

    async def main() -> list[Any]:
        async with lsc.ExecutionScope("shared-on-purpose"):
            return await asyncio.gather(graph.ainvoke({"name": "a"}), graph.ainvoke({"name": "b"}))

    results = asyncio.run(main())
    dbs = {r["out"].split(":")[0] for r in results}
    assert len(dbs) == 1  # the same SQLDatabase: one execution
    assert all(r["out"].endswith("[(500,)]") for r in results)
    assert_released(manager, pg_db)


def test_a_reused_run_id_fails_the_lookups_of_nodes_already_running_too() -> None:
    """From the second invocation's start, every node of both runs gets the error: the
    first run's node that started before it could otherwise still take connections from
    an execution the second run's end may release under it.  No I/O: the manager's URL
    is never connected to."""
    mgr = ExecutionConnectionManager("postgresql+psycopg2://nobody@127.0.0.1:1/unused")
    try:
        root, early_node, late_node = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
        execution = mgr.open_execution(str(root), root_run=root)
        assert mgr.link_run(early_node, root)
        assert mgr.execution_for_run(early_node) is execution
        with pytest.raises(lsc.ScopeUnavailableError, match=str(root)):
            mgr.open_execution(str(root), root_run=root)
        assert mgr.link_run(late_node, root)
        grandchild = uuid.uuid4()  # a tool started by the node that was already running
        assert mgr.link_run(grandchild, early_node)
        for run in (root, early_node, late_node, grandchild):
            with pytest.raises(lsc.ScopeUnavailableError, match="already used by a live run"):
                mgr.execution_for_run(run)
        mgr.end_run(root)  # the first invocation's end releases the execution
        assert mgr.active_executions() == []
        with pytest.raises(lsc.ScopeUnavailableError, match="already used by a live run"):
            mgr.execution_for_run(early_node)  # the other invocation is still live
        mgr.end_run(root)  # the second's end forgets the run and its children
        assert mgr.tracked_runs() == 0 and mgr.active_executions() == []
        assert not mgr.link_run(uuid.uuid4(), root)  # the id is free again
    finally:
        mgr.close()


@pytest.mark.parametrize("reuse", ["same execution id", "same run id"])
def test_sequential_runs_may_reuse_an_id_once_the_first_ended(
    manager: ExecutionConnectionManager, pg_db: Database, reuse: str
) -> None:
    entered = threading.Barrier(1)
    if reuse == "same execution id":
        graph = holding_graph(entered, execution_id=lambda run: "same-id")
        configs: list[RunnableConfig] = [{"run_id": uuid.uuid4()} for _ in range(3)]
    else:
        graph = holding_graph(entered)
        run_id = uuid.uuid4()
        configs = [{"run_id": run_id} for _ in range(3)]
    for config in configs:
        assert graph.invoke({"name": "a"}, config)["out"].endswith("[(500,)]")
    assert_released(manager, pg_db)


def test_a_burst_of_runs_gives_its_grown_tables_back_once_none_is_live() -> None:
    """A dict keeps its largest table after its entries are deleted: 2,000 concurrent
    runs left the run index and the registry holding empty tables of 100+ KB each until
    the next burst.  Measured on the real tables around a real concurrent ``abatch``
    (no timer: the event loop's order alone decides how many runs are live at once)."""
    import sys

    mgr = ExecutionConnectionManager("postgresql+psycopg2://nobody@127.0.0.1:1/unused")
    runs, registry = mgr._runs, mgr._registry
    peak = {"runs": 0, "executions": 0}

    async def node(state: State) -> State:
        await asyncio.sleep(0)  # let every other run start
        peak["runs"] = max(peak["runs"], sys.getsizeof(runs._runs))
        peak["executions"] = max(peak["executions"], sys.getsizeof(registry._executions))
        return {"out": "ok"}

    builder = StateGraph(State)
    builder.add_node("first", node)
    builder.add_node("second", node)
    builder.add_edge(START, "first")
    builder.add_edge("first", "second")
    builder.add_edge("second", END)
    graph = lsc.with_scoped_connections(builder.compile(), manager=mgr)
    try:
        out = asyncio.run(graph.abatch([{"name": str(i)} for i in range(2000)]))
        assert [o["out"] for o in out] == ["ok"] * 2000
        assert mgr.tracked_runs() == 0 and mgr.active_executions() == []
        assert peak["runs"] > 100_000 and peak["executions"] > 50_000, peak  # they did grow
        for table in (runs._runs, runs._names, runs._roots, runs._roots_of):
            assert sys.getsizeof(table) < 1024, table
        assert sys.getsizeof(registry._executions) < 1024
        # and the index works as before afterwards
        assert asyncio.run(graph.ainvoke({"name": "again"}))["out"] == "ok"
        assert mgr.tracked_runs() == 0
    finally:
        mgr.close()
