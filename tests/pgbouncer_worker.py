"""The multi-process workload run through PgBouncer: what each spawned worker process runs.

:func:`run_worker` runs K/4 executions of a wrapped LangGraph graph whose SQL tool
queries through PgBouncer.  It lives in a module of its own, not in a test module, so
``multiprocessing`` (spawn) can import it cheaply and ``benchmarks/bench_pgbouncer.py``
can reuse it; the PgBouncer itself is ``langgraph_scoped_conn.testing.PgBouncer``.
"""

from __future__ import annotations

import os
import time
from typing import Any

# module level: the tool's and node's annotations are resolved from these globals
from langchain_core.runnables import RunnableConfig
from langgraph.graph import MessagesState

__all__ = ["build_graph", "expected_answer", "run_worker"]

#: Each tool call runs this many statements, like the storm benchmark's tool.
QUERIES_PER_TOOL_CALL = 3


def build_graph(checkpointer: Any = None) -> Any:
    """A wrapped ToolNode graph: agent -> SQL tool (3 queries) -> agent -> end."""
    from langchain_core.messages import AIMessage, ToolMessage
    from langchain_core.tools import tool
    from langgraph.graph import END, START, StateGraph
    from langgraph.prebuilt import ToolNode, tools_condition

    from langgraph_scoped_conn import get_scoped_sql_database, with_scoped_connections

    @tool
    def count_orders(customer_id: int, config: RunnableConfig) -> str:
        """Count the orders of one customer."""
        db = get_scoped_sql_database(config)
        result = ""
        for _ in range(QUERIES_PER_TOOL_CALL):
            # the same text again and again: psycopg 3 would prepare it server-side
            result = db.run(f"select count(*) from orders where customer_id = {customer_id}")
        return result

    def agent(state: MessagesState) -> dict[str, Any]:
        last = state["messages"][-1]
        if isinstance(last, ToolMessage):
            return {"messages": [AIMessage(content=f"orders: {last.content}")]}
        customer = int(str(last.content))
        call = {"name": "count_orders", "args": {"customer_id": customer}, "id": f"c{customer}"}
        return {"messages": [AIMessage(content="", tool_calls=[call])]}

    builder = StateGraph(MessagesState)
    builder.add_node("agent", agent)
    builder.add_node("tools", ToolNode([count_orders]))
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", tools_condition, ["tools", END])
    builder.add_edge("tools", "agent")
    return with_scoped_connections(builder.compile(checkpointer=checkpointer))


def expected_answer(customer_id: int) -> str:
    """The graph's answer for ``customer_id`` on the sample schema (500 orders, 50 customers)."""
    count = sum(1 for g in range(1, 501) if 1 + g % 50 == customer_id)
    return f"orders: [({count},)]"


def run_worker(
    worker: int,
    url: str,
    runs: int,
    concurrency: int,
    max_connections: int,
    barrier: Any = None,
    results: Any = None,
    options: dict[str, Any] | None = None,
    checkpointer_conninfo: str | None = None,
    checkpointer_pool_size: int = 0,
) -> dict[str, Any]:
    """Run ``runs`` executions of the graph with ``concurrency`` in flight; report the outcome.

    Meant to be the target of a spawned process: it configures its own process-default
    manager on ``url`` (the strategy is detected from the URL), waits at ``barrier`` so
    every worker starts together, and puts its report on ``results`` when given.  The
    report never contains the URL.

    With ``checkpointer_conninfo``, the graph also checkpoints every step with
    langgraph-checkpoint-postgres' ``AsyncPostgresSaver`` over a psycopg
    ``AsyncConnectionPool`` of ``checkpointer_pool_size`` connections (its tables must
    exist already), as a deployed agent does: that pool counts against the server's
    max_connections too.
    """
    import asyncio

    import langgraph_scoped_conn as lsc

    manager = lsc.configure(url, max_connections=max_connections, **(options or {}))
    try:
        report = asyncio.run(
            _session(
                worker,
                runs,
                concurrency,
                barrier,
                checkpointer_conninfo,
                checkpointer_pool_size,
            )
        )
        manager.drain(timeout=30)
        stats = manager.get_stats()
        report.update(
            worker=worker,
            pid=os.getpid(),
            strategy=stats["strategy"],
            active_executions=stats["active_executions"],
            connections_in_use=stats["connections_in_use"],
            peak_open=stats["peak_connections"],
            checkout_waits=stats["checkout_waits"],
            tracked_runs=manager.tracked_runs(),
        )
    finally:
        manager.close()
    if results is not None:
        results.put(report)
    return report


async def _session(
    worker: int,
    runs: int,
    concurrency: int,
    barrier: Any,
    checkpointer_conninfo: str | None,
    checkpointer_pool_size: int,
) -> dict[str, Any]:
    import asyncio

    from langgraph_scoped_conn.settings import redact_url

    saver_pool: Any = None
    try:
        checkpointer = None
        if checkpointer_conninfo:
            from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
            from psycopg.rows import dict_row
            from psycopg_pool import AsyncConnectionPool

            saver_pool = AsyncConnectionPool(
                checkpointer_conninfo,
                min_size=1,
                max_size=checkpointer_pool_size,
                kwargs={"autocommit": True, "prepare_threshold": 0, "row_factory": dict_row},
                open=False,
            )
            await saver_pool.open(wait=True)
            checkpointer = AsyncPostgresSaver(saver_pool)
        graph = build_graph(checkpointer)
        # warm the imports and the reflection cache before the clock starts
        config = {"configurable": {"thread_id": f"w{worker}-warm"}}
        await graph.ainvoke({"messages": [("user", "1")]}, config)
    except BaseException:
        if barrier is not None:
            barrier.abort()  # the parent and the other workers stop waiting at once
        if saver_pool is not None:
            await saver_pool.close()
        raise

    errors: dict[str, int] = {}
    wrong = 0
    latencies: list[float] = []
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        nonlocal wrong
        customer = 1 + (worker + i) % 5  # few distinct texts: each repeats on a connection
        config = {"configurable": {"thread_id": f"w{worker}-{i}"}}
        async with gate:
            start = time.perf_counter()
            try:
                out = await graph.ainvoke({"messages": [("user", str(customer))]}, config)
            except Exception as exc:
                key = redact_url(f"{type(exc).__name__}: {exc}").splitlines()[0][:200]
                errors[key] = errors.get(key, 0) + 1
                return
            latencies.append(time.perf_counter() - start)
            if out["messages"][-1].content != expected_answer(customer):
                wrong += 1

    try:
        if barrier is not None:
            await asyncio.to_thread(barrier.wait, 180)
        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(runs)))
        elapsed = time.perf_counter() - started
    finally:
        if saver_pool is not None:
            await saver_pool.close()
    return {
        "ok": len(latencies) - wrong,
        "wrong": wrong,
        "failed": sum(errors.values()),
        "errors": errors,
        "elapsed": elapsed,
        "latencies": latencies,
    }
