"""checkpoint: one budget for the whole agent, against a checkpointer beside the package.

K concurrent runs of a graph whose SQL tool (ToolNode, 1 query) runs after an approval
``interrupt``; every run is paused, then resumed (``Command(resume=True)``), checkpointed
by LangGraph's ``AsyncPostgresSaver``.  The tools' budget is ``--budget``.  The saver is:

* ``package``: ``lsc.apostgres_checkpointer()``, its one connection set aside from the
  budget (the tools get ``budget - 1``);
* ``from_conn_string``: ``AsyncPostgresSaver.from_conn_string``, a connection of its own
  beside the package's budget;
* ``psycopg_pool``: ``AsyncPostgresSaver(AsyncConnectionPool(max_size=20))`` as LangGraph's
  docs show it, beside the budget (psycopg_pool opens ``min_size=4`` connections).

The app role's backends are sampled from ``pg_stat_activity`` every 10 ms: the peak is
what the process costs the server, which the budget alone does not say for the last two.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.runnables import RunnableConfig
from langchain_core.tools import tool
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode
from langgraph.types import Command, interrupt

import langgraph_scoped_conn as lsc
from benchmarks import harness
from benchmarks.harness import APP_USER
from langgraph_scoped_conn.testing import BackendSampler

SIZES = {
    "runs": (30, 30, "concurrent runs, each paused and resumed"),
    "budget": (4, 4, "max_connections of the package"),
    "rounds": (3, 1, "rounds of every mode, interleaved"),
}
MODES = ("package", "from_conn_string", "psycopg_pool")
SAVER_APP = "lsc-bench-checkpointer"


def build_graph(checkpointer: Any) -> Any:
    """agent -> approve (interrupt) -> tools (SQL) -> agent -> end, wrapped."""

    @tool
    def count_orders(customer_id: int, config: RunnableConfig) -> str:
        """Count the orders of one customer."""
        db = lsc.get_scoped_sql_database(config)
        return str(db.run(f"select count(*) from orders where customer_id = {customer_id}"))

    def agent(state: MessagesState) -> dict[str, Any]:
        last = state["messages"][-1]
        if isinstance(last, ToolMessage):
            return {"messages": [AIMessage(content=f"orders: {last.content}")]}
        customer = int(str(last.content))
        call = {"name": "count_orders", "args": {"customer_id": customer}, "id": f"c{customer}"}
        return {"messages": [AIMessage(content="", tool_calls=[call])]}

    def route(state: MessagesState) -> str:
        last = state["messages"][-1]
        return "approve" if isinstance(last, AIMessage) and last.tool_calls else END

    def approve(state: MessagesState) -> dict[str, Any]:
        interrupt({"run": "count_orders"})
        return {}

    builder = StateGraph(MessagesState)
    builder.add_node("agent", agent)
    builder.add_node("approve", approve)
    builder.add_node("tools", ToolNode([count_orders]))
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", route, ["approve", END])
    builder.add_edge("approve", "tools")
    builder.add_edge("tools", "agent")
    return lsc.with_scoped_connections(builder.compile(checkpointer=checkpointer))


def expected(customer: int) -> str:
    count = sum(1 for g in range(1, 501) if 1 + g % 50 == customer)
    return f"orders: [({count},)]"


@contextlib.asynccontextmanager
async def saver(mode: str, server: harness.BenchServer) -> AsyncIterator[Any]:
    from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver

    if mode == "package":
        async with lsc.apostgres_checkpointer() as package_saver:
            yield package_saver
        return
    conninfo = server.conninfo(SAVER_APP)
    if mode == "from_conn_string":
        async with AsyncPostgresSaver.from_conn_string(conninfo) as own:
            yield own
        return
    from psycopg.rows import dict_row
    from psycopg_pool import AsyncConnectionPool

    kwargs = {"autocommit": True, "prepare_threshold": 0, "row_factory": dict_row}
    async with AsyncConnectionPool(conninfo, max_size=20, kwargs=kwargs, open=False) as pool:
        yield AsyncPostgresSaver(pool)  # type: ignore[arg-type]


async def run_mode(
    mode: str, server: harness.BenchServer, runs: int, budget: int
) -> dict[str, Any]:
    manager = lsc.configure(server.url(), max_connections=budget, pool_timeout=120)
    backends = server.backend_sampler(interval=0.01)
    saver_backends = BackendSampler(  # the saver's own, by application_name
        server.admin, user=APP_USER, application_name_like="%checkpointer", interval=0.01
    ).open()
    errors: list[str] = []
    latencies: list[float] = []
    prefix = uuid.uuid4().hex[:8]

    async def one(graph: Any, i: int) -> None:
        customer = 1 + i % 50
        config = {"configurable": {"thread_id": f"{prefix}-{i}"}}
        t0 = time.perf_counter()
        try:
            paused = await graph.ainvoke({"messages": [("user", str(customer))]}, config)
            assert "__interrupt__" in paused, "the run did not pause for approval"
            done = await graph.ainvoke(Command(resume=True), config)
            answer = done["messages"][-1].content
            assert answer == expected(customer), f"wrong answer {answer!r}"
        except Exception as exc:
            errors.append(harness.error_text(exc))
            return
        latencies.append(time.perf_counter() - t0)

    try:
        with backends, saver_backends:
            async with saver(mode, server) as checkpointer:
                await checkpointer.setup()
                graph = build_graph(checkpointer)
                t0 = time.perf_counter()
                await asyncio.gather(*(one(graph, i) for i in range(runs)))
                elapsed = time.perf_counter() - t0
    finally:
        backends.close()
        saver_backends.close()
        manager.close()
        server.wait_app_backends()
    return {
        "name": mode,
        "ok": len(latencies),
        "failed": len(errors),
        "budget": budget,
        "peak_backends": backends.peak,
        "peak_saver": saver_backends.peak,
        "over_budget": max(backends.peak - budget, 0),
        "elapsed_s": round(elapsed, 2),
        "p50_ms": round(harness.median(latencies) * 1000, 1),
        "p99_ms": round(harness.percentile(latencies, 99) * 1000, 1),
        "first_error": errors[0] if errors else "",
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = harness.parse(harness.arguments(__doc__, SIZES), argv)
    machine = harness.machine_info()
    table: list[dict[str, Any]] = []
    checks: dict[str, list[int]] = {f"{m}_peak": [] for m in MODES}
    checks |= {f"{m}_failed": [] for m in MODES}
    with harness.bench_server() as server:
        for round_ in range(1, args.rounds + 1):
            for mode in MODES:
                row = asyncio.run(run_mode(mode, server, args.runs, args.budget))
                row["round"] = round_
                table.append(row)
                checks[f"{mode}_peak"].append(row["peak_backends"])
                checks[f"{mode}_failed"].append(row["failed"])
    result = {"table": table, "checks": {k: max(v) for k, v in checks.items()}}
    return harness.finish("checkpoint", args, machine, result)


if __name__ == "__main__":
    raise SystemExit(main())
