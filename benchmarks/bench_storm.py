"""storm: K concurrent ``ainvoke`` of an agent graph that makes three separate tool calls.

Each run is agent -> tools -> agent -> tools -> agent -> tools -> agent, every tool call
one ``select pg_sleep(0.005)``.  Modes, all in one process against one server, each
built fresh (the schema reflected, no connection open) before its timed window:

* ``global_from_uri``: ``SQLDatabase.from_uri(url)`` exactly as the tutorial makes it
  (SQLAlchemy's defaults: no pre-ping, pool 5 + overflow 10), a sync tool calling ``db.run``;
* ``global_from_uri_async``: the same database, an ``async def`` tool that awaits
  ``asyncio.to_thread(db.run, ...)``, as a user of an async agent would;
* ``shared``: the package, ``configure(url, max_connections=budget)`` and the graph
  wrapped, a sync tool calling ``get_scoped_sql_database(config).run``;
* ``shared_async``: the same with an ``async def`` tool awaiting ``.arun``;
* ``floor``: the no-I/O twin (the tool returns at once) with a no-op callback handler:
  the graph's own CPU, the storm's physical floor.

Rows: executor threads x budget, 20x20, 20x10 (saturated: twice as many threads as
connections), 6x20 and 6x10.  Every round runs every row's modes back to back, their
order flipped every round; each ratio is taken per round and its median reported.
What binds is measured, not assumed: CPU ÷ wall (process CPU, the samplers' own
subtracted), the share of the package's checkouts that waited (``checkout_waits`` /
``checkouts``; SQLAlchemy's pool counts none) and the executor's queue length, sampled.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.runnables import RunnableConfig
from langchain_core.tools import BaseTool, tool
from langgraph.graph import START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode, tools_condition

import langgraph_scoped_conn as lsc
from benchmarks import harness
from benchmarks.figures import STORM_PAIRS, STORM_ROWS

SLEEP_SQL = "select pg_sleep(0.005)"
TOOL_CALLS = 3
MODES = ("floor", "global_from_uri", "global_from_uri_async", "shared", "shared_async")
SCOPED = ("shared", "shared_async")
#: from_uri's pool may open 15, the budget 20; 3 reserved for the samplers
SERVER_MAX_CONNECTIONS = 30
#: the table shows the median over rounds of these, the worst round of the others
MEDIANS = ("exec_per_s", "p50_ms", "p99_ms", "cpu_ms_per_run", "cpu_per_wall", "queue_mean")
WORST = ("queue_max", "peak_backends")
SCOPED_WORST = ("waited_share", "held_after")
SIZES = {
    "k": (500, 100, "concurrent runs per mode"),
    "rounds": (3, 2, "interleaved rounds"),
}


def build_graph(run_sql: BaseTool) -> Any:
    """The agent asks for ``run_sql`` until it has ``TOOL_CALLS`` answers, one call per step."""

    async def agent(state: MessagesState) -> dict[str, Any]:
        answers = sum(isinstance(m, ToolMessage) for m in state["messages"])
        if answers == TOOL_CALLS:
            return {"messages": [AIMessage("done")]}
        call = {"name": "run_sql", "args": {}, "id": f"call-{answers}", "type": "tool_call"}
        return {"messages": [AIMessage("", tool_calls=[call])]}

    builder = StateGraph(MessagesState)
    builder.add_node("agent", agent)
    builder.add_node("tools", ToolNode([run_sql], handle_tool_errors=False))
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", tools_condition)
    builder.add_edge("tools", "agent")
    return builder.compile()


def make_tool(mode: str, db: Any = None, sql: str = SLEEP_SQL) -> BaseTool:
    """The tool of ``mode`` (``db``: the global SQLDatabase of the global modes)."""
    if mode == "floor":

        @tool
        def run_sql() -> str:
            """Nothing: the no-I/O twin."""
            return "ok"

    elif mode == "global_from_uri":

        @tool
        def run_sql() -> str:
            """One query through the global SQLDatabase."""
            db.run(sql)
            return "ok"

    elif mode == "global_from_uri_async":

        @tool
        async def run_sql() -> str:
            """One query through the global SQLDatabase, in a worker thread."""
            await asyncio.to_thread(db.run, sql)
            return "ok"

    elif mode == "shared":

        @tool
        def run_sql(config: RunnableConfig) -> str:
            """One query through this run's scoped SQLDatabase."""
            lsc.get_scoped_sql_database(config).run(sql)
            return "ok"

    else:

        @tool
        async def run_sql(config: RunnableConfig) -> str:
            """One query through this run's scoped SQLDatabase, awaiting ``arun``."""
            await lsc.get_scoped_sql_database(config).arun(sql)
            return "ok"

    return run_sql


@dataclass
class Setup:
    """One mode, ready to time: its graph and the manager or engine behind it."""

    graph: Any
    manager: lsc.ExecutionConnectionManager | None = None
    engine: Any = None

    def close(self) -> None:
        if self.manager is not None:
            self.manager.close()
        if self.engine is not None:
            self.engine.dispose()


def prepare(mode: str, url: str, budget: int, sql: str = SLEEP_SQL) -> Setup:
    """Build ``mode`` with its schema reflected and no connection open."""
    if mode == "floor":
        graph = build_graph(make_tool(mode)).with_config(callbacks=[harness.NoopHandler()])
        return Setup(graph)
    if mode.startswith("global"):
        db = harness.from_uri(url)  # reflects, as the tutorial's does at start-up
        db._engine.dispose()
        return Setup(build_graph(make_tool(mode, db, sql)), engine=db._engine)
    manager = lsc.configure(url, max_connections=budget)
    with lsc.ExecutionScope(manager=manager):
        lsc.get_scoped_sql_database(manager=manager)  # reflects, as from_uri does
    manager.pool_for().dispose()
    graph = lsc.with_scoped_connections(build_graph(make_tool(mode, sql=sql)), manager=manager)
    return Setup(graph, manager=manager)


async def storm(graph: Any, k: int, executor: ThreadPoolExecutor) -> dict[str, Any]:
    """K concurrent ``ainvoke``: wall seconds, each success's latency, failures by text."""
    asyncio.get_running_loop().set_default_executor(executor)
    latencies: list[float] = []
    errors: Counter[str] = Counter()

    async def one() -> None:
        t0 = time.perf_counter()
        try:
            out = await graph.ainvoke({"messages": [HumanMessage("how many orders?")]})
        except Exception as exc:
            errors[harness.error_text(exc)] += 1
            return
        answers = [m.content for m in out["messages"] if isinstance(m, ToolMessage)]
        if answers != ["ok"] * TOOL_CALLS:
            errors["wrong result"] += 1
            return
        latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(k)))
    return {"wall": time.perf_counter() - t0, "latencies": latencies, "errors": errors}


def run_mode(
    server: harness.BenchServer, mode: str, threads: int, budget: int, k: int
) -> dict[str, Any]:
    """Time one mode in one row; measure what bound it."""
    setup = prepare(mode, server.url(), budget)
    before = setup.manager.get_stats() if setup.manager else {}
    executor = ThreadPoolExecutor(threads, thread_name_prefix="storm")
    backends = server.backend_sampler()
    queue = harness.Sampler(executor._work_queue.qsize, 0.002)  # our own executor's queue
    scoped: dict[str, Any] = {"waited_share": None, "held_after": None}
    try:
        cpu0 = time.process_time()
        with backends, queue:
            result = asyncio.run(storm(setup.graph, k, executor))
        cpu = time.process_time() - cpu0 - backends.cpu_seconds - queue.cpu_seconds
        if setup.manager is not None:
            setup.manager.drain(timeout=30)
            s = setup.manager.get_stats()
            checkouts = s["checkouts"] - before["checkouts"]
            waits = s["checkout_waits"] - before["checkout_waits"]
            scoped = {
                "waited_share": round(waits / checkouts, 3) if checkouts else 0.0,
                "held_after": s["connections_in_use"]
                + s["active_executions"]
                + s["draining_executions"],
            }
    finally:
        setup.close()
        backends.close()
    server.wait_app_backends(0)
    lat, wall = result["latencies"], result["wall"]
    return {
        "row": f"{threads}x{budget}",
        "mode": mode,
        "ok": len(lat),
        "failed": sum(result["errors"].values()),
        "errors": dict(result["errors"].most_common(3)),
        "exec_per_s": round(len(lat) / wall, 2),
        "p50_ms": round(harness.percentile(lat, 50) * 1000, 1),
        "p99_ms": round(harness.percentile(lat, 99) * 1000, 1),
        "cpu_ms_per_run": round(cpu * 1000 / k, 3),
        "cpu_per_wall": round(cpu / wall, 3),
        "queue_mean": round(queue.mean, 2),
        "queue_max": queue.peak,
        "peak_backends": backends.peak,
        **scoped,
    }


def order(rnd: int) -> list[str]:
    """This round's modes: the floor first, then the others, their order flipped every round."""
    return list(MODES) if rnd % 2 == 0 else [MODES[0], *MODES[:0:-1]]


def run_rounds(server: harness.BenchServer, k: int, rounds: int) -> list[dict[str, Any]]:
    """Every round: every row, every mode; one record per (round, row, mode)."""
    runs = []
    for rnd in range(rounds):
        for threads, budget in STORM_ROWS:
            for mode in order(rnd):
                r = run_mode(server, mode, threads, budget, k) | {"round": rnd}
                harness.console.print(
                    f"round {rnd} {r['row']:>5} {mode:>22}: {r['ok']}/{k} ok, "
                    f"{r['exec_per_s']:.0f} exec/s, CPU {r['cpu_ms_per_run']:.2f} ms/run, "
                    f"CPU/wall {r['cpu_per_wall']:.2f}, queue {r['queue_mean']:.1f}, "
                    f"waited {r['waited_share']}, peak {r['peak_backends']}"
                )
                runs.append(r)
    return runs


def per_round(runs: Sequence[dict[str, Any]], row: str, a: str, b: str, key: str) -> list[float]:
    """``key`` of mode ``a`` over mode ``b`` in ``row``, one ratio per round."""
    by = {(r["round"], r["mode"]): r[key] for r in runs if r["row"] == row}
    rounds = sorted({rnd for rnd, _ in by})
    return [round(by[n, a] / by[n, b], 3) for n in rounds if by.get((n, b))]


def binds(runs: Sequence[dict[str, Any]], row: str) -> str:
    """What bound ``shared`` in ``row``, from its measures (medians over rounds).

    CPU when the process kept a core busy (CPU ÷ wall >= 0.85: the GIL allows about one)
    or ran at 80% of the no-I/O floor's rate (on a machine shared with other work, CPU ÷
    wall stays low however CPU-bound the run); else the budget when a quarter of the
    checkouts waited; else the executor when tasks queued for a thread; else I/O.
    """
    rows = [r for r in runs if r["row"] == row and r["mode"] == "shared"]
    cpu = harness.median([r["cpu_per_wall"] for r in rows])
    of_floor = harness.median(per_round(runs, row, "shared", "floor", "exec_per_s"))
    waited = harness.median([r["waited_share"] for r in rows])
    queue = harness.median([r["queue_mean"] for r in rows])
    if cpu >= 0.85 or of_floor >= 0.8:
        what = "CPU"
    elif waited >= 0.25:
        what = "budget"
    elif queue >= 1:
        what = "executor"
    else:
        what = "I/O"
    measures = f"CPU/wall {cpu:.2f}, {of_floor:.0%} of the floor's rate"
    return f"{what} ({measures}, waited {waited:.0%}, queue {queue:.1f})"


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The table (medians over rounds), the per-round ratios, what bound, the checks."""
    table, ratios, bound = [], {}, {}
    for threads, budget in STORM_ROWS:
        row = f"{threads}x{budget}"
        for mode in MODES:
            rs = [r for r in runs if r["row"] == row and r["mode"] == mode]
            table.append(
                rs[0]
                | {k: harness.median([r[k] for r in rs]) for k in MEDIANS}
                | {k: max(r[k] for r in rs) for k in WORST}
                | {k: sum(r[k] for r in rs) for k in ("ok", "failed")}
                | ({k: max(r[k] for r in rs) for k in SCOPED_WORST} if mode in SCOPED else {})
            )
        ratios[row] = {
            mode: {
                "throughput": per_round(runs, row, mode, anchor, "exec_per_s"),
                "cpu": per_round(runs, row, mode, anchor, "cpu_ms_per_run"),
            }
            for mode, anchor in STORM_PAIRS
        }
        ratios[row]["floor"] = per_round(runs, row, "shared", "floor", "cpu_ms_per_run")
        bound[row] = binds(runs, row)
    scoped = [r for r in runs if r["mode"] in SCOPED]
    budget_of = {f"{t}x{b}": b for t, b in STORM_ROWS}
    checks = {
        "failed": sum(r["failed"] for r in scoped),
        "over_budget": sum(r["peak_backends"] > budget_of[r["row"]] for r in scoped),
        "held": sum(r["held_after"] for r in scoped),
    }
    return {"table": table, "ratios": ratios, "binds": bound, "checks": checks}


def main(argv: Sequence[str] | None = None) -> int:
    args = harness.parse(harness.arguments(__doc__, SIZES), argv)
    machine = harness.machine_info()
    harness.console.print(f"storm: K={args.k}, {args.rounds} rounds, rows {STORM_ROWS}")
    with harness.bench_server(SERVER_MAX_CONNECTIONS) as server:
        runs = run_rounds(server, args.k, args.rounds)
    for r in runs:
        for text, n in r["errors"].items():
            harness.console.print(f"[red]round {r['round']} {r['row']} {r['mode']}: {n}x {text}")
    return harness.finish("storm", args, machine, {**summarize(runs), "runs": runs})


if __name__ == "__main__":
    raise SystemExit(main())
