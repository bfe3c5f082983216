"""soak: many executions one after another; memory and the registry's maps must not grow.

Each execution opens an ``ExecutionScope``, gets a scoped SQLDatabase and runs one
query; every ``--graph-every``-th one instead runs a wrapped graph whose node does the
same through its config (so the handler's run-id maps are exercised).  After a warm-up,
RSS (after a full collection) and the manager's map sizes are sampled at checkpoints.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Sequence
from typing import Any, TypedDict

from langchain_core.runnables import RunnableConfig
from langgraph.graph import END, START, StateGraph

import langgraph_scoped_conn as lsc
from benchmarks import harness

SIZES = {
    "n": (100_000, 10_000, "executions"),
    "graph_every": (10, 10, "every Nth execution is a wrapped graph run"),
    "checkpoints": (10, 5, "samples after the warm-up (the first 10%%)"),
}
#: grow-only maps: larger at the end than after the warm-up is a leak
MAPS = (
    "tracked_runs",
    "open_executions",
    "draining",
    "pending_releases",
    "pools",
    "reflection_cache",
    "checked_out",
)


class State(TypedDict):
    result: str


def build_graph(manager: lsc.ExecutionConnectionManager) -> Any:
    def query(state: State, config: RunnableConfig) -> dict[str, Any]:
        return {"result": lsc.get_scoped_sql_database(config).run("select 1")}

    builder = StateGraph(State)
    builder.add_node("query", query)
    builder.add_edge(START, "query")
    builder.add_edge("query", END)
    return lsc.with_scoped_connections(builder.compile(), manager=manager)


def checkpoint(manager: lsc.ExecutionConnectionManager, done: int, t0: float) -> dict[str, Any]:
    """RSS after a full collection and the size of every per-run structure the manager keeps.

    The reflection cache has no public size: read privately.
    """
    manager.drain(timeout=30)
    harness.full_gc()
    stats = manager.get_stats()
    return {
        "executions": done,
        "elapsed_s": round(time.perf_counter() - t0, 1),
        "rss_mb": round(harness.rss_mb(), 2),
        "tracked_runs": manager.tracked_runs(),
        "open_executions": stats["active_executions"],
        "draining": stats["draining_executions"],
        "pending_releases": stats["pending_releases"],
        "pools": len(stats["pools"]),
        "reflection_cache": len(manager.schema_cache._templates),
        "checked_out": stats["connections_in_use"],
    }


def one(graph: Any, graph_run: bool) -> bool:
    """One execution; whether it answered right (a failure is counted, not raised)."""
    try:
        if graph_run:
            return bool(graph.invoke({"result": ""})["result"] == "[(1,)]")
        with lsc.ExecutionScope():
            return bool(lsc.get_scoped_sql_database().run("select 1") == "[(1,)]")
    except Exception as exc:
        harness.console.print(f"[red]{harness.error_text(exc)}[/red]")
        return False


def soak(url: str, n: int, graph_every: int, checkpoints: int) -> dict[str, Any]:
    manager = lsc.configure(url, max_connections=5)
    graph = build_graph(manager)
    warmup = max(n // 10, 100)
    step = max((n - warmup) // checkpoints, 1)
    points, errors, t0 = [], 0, time.perf_counter()
    try:
        for i in range(n):
            errors += not one(graph, graph_every > 0 and i % graph_every == 0)
            done = i + 1
            if done == warmup or (done > warmup and (done - warmup) % step == 0):
                points.append(checkpoint(manager, done, t0))
    finally:
        manager.close()
    live = sum(
        type(o).__name__ == "Execution" and type(o).__module__.startswith("langgraph_scoped_conn")
        for o in gc.get_objects()
    )
    first, last = points[0], points[-1]
    return {
        "table": points,
        "rss_growth_mb": round(last["rss_mb"] - first["rss_mb"], 2),
        "maps_grown": sum(last[k] > first[k] for k in MAPS),
        "live_executions": live,
        "errors": errors,
        "executions_per_s": round(n / (time.perf_counter() - t0), 1),
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = harness.parse(harness.arguments(__doc__, SIZES), argv)
    machine = harness.machine_info()
    with harness.bench_server() as server:
        result = soak(server.url(), args.n, args.graph_every, args.checkpoints)
        result["backends_after_close"] = server.wait_app_backends(0)
    return harness.finish("soak", args, machine, result)


if __name__ == "__main__":
    raise SystemExit(main())
