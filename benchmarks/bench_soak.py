"""soak: many executions in one process; memory and the registry's maps must not grow.

Each execution opens an ExecutionScope, gets a scoped SQLDatabase and runs one
query, then closes; every ``--graph-every``-th execution instead runs a wrapped
LangGraph graph whose node does the same through ``get_scoped_sql_database(config)``
(so the handler's run-id maps are exercised).  After a warm-up, RSS (after a full
``gc.collect()``) and the sizes of the registry's maps are sampled at checkpoints.

Run: ``python benchmarks/bench_soak.py`` (``--n``, ``--graph-every``, ``--warmup``).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path
from typing import Any, TypedDict

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    Verdict,
    bench_server,
    console,
    full_gc,
    machine_info,
    print_machine,
    print_verdicts,
    rss_mb,
    table,
    write_result,
)
from langchain_core.runnables import RunnableConfig
from langgraph.graph import END, START, StateGraph

import langgraph_scoped_conn as lsc
from langgraph_scoped_conn import lookup as lsc_lookup
from langgraph_scoped_conn.sql_database import schema_cache

RSS_LIMIT_MB = 5.0


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


def map_sizes(manager: lsc.ExecutionConnectionManager) -> dict[str, int]:
    """Sizes of every per-run or per-execution structure the manager keeps.

    Public measures where there are some (``tracked_runs()`` counts every entry of the
    run index: runs, their children, tool names and root runs; ``get_stats()``); the
    reflection cache and the lookup's set of managers have no public size.
    """
    stats = manager.get_stats()
    return {
        "tracked_runs": manager.tracked_runs(),
        "open_executions": stats["active_executions"],
        "draining": stats["draining_executions"],
        "pending_releases": stats["pending_releases"],
        "pools": len(stats["pools"]),
        "reflection_cache": len(schema_cache(manager)._templates),
        "registered_managers": len(lsc_lookup._managers),
        "checked_out": stats["connections_in_use"],
    }


def live_executions() -> int:
    """Execution objects the garbage collector still sees (by class, wherever it lives)."""
    return sum(
        1
        for o in gc.get_objects()
        if type(o).__name__ == "Execution"
        and type(o).__module__.startswith("langgraph_scoped_conn")
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000, help="executions (100000)")
    parser.add_argument(
        "--graph-every", type=int, default=10, help="every Nth execution is a wrapped graph run"
    )
    parser.add_argument(
        "--warmup", type=int, default=0, help="warm-up executions (default: 10%% of --n)"
    )
    parser.add_argument("--checkpoints", type=int, default=10, help="samples after warm-up")
    parser.add_argument("--out", default="soak", help="results file name (soak)")
    args = parser.parse_args(argv)
    warmup = args.warmup or max(args.n // 10, 100)
    if warmup >= args.n:
        parser.error(f"--warmup {warmup} must be below --n {args.n}")
    info = machine_info()
    print_machine(info)
    console.print(
        f"soak: {args.n} executions ({warmup} warm-up), every {args.graph_every}th "
        "through a wrapped graph"
    )
    checkpoints: list[dict[str, Any]] = []
    errors = 0
    with bench_server(max_connections=100) as server:
        manager = lsc.configure(server.url(), max_connections=5)
        graph = build_graph(manager)
        step = max((args.n - warmup) // args.checkpoints, 1)
        t_start = time.perf_counter()
        graph_runs = scope_runs = 0
        try:
            for i in range(args.n):
                try:
                    if args.graph_every and i % args.graph_every == 0:
                        out = graph.invoke({"result": ""})["result"]
                        graph_runs += 1
                    else:
                        with lsc.ExecutionScope():
                            out = lsc.create_execution_scoped_sql_database_sync().run("select 1")
                        scope_runs += 1
                    if out != "[(1,)]":
                        errors += 1
                except Exception as exc:  # count and go on: a soak reports, it does not stop
                    errors += 1
                    if errors <= 3:
                        console.print(f"[red]execution {i} failed: {type(exc).__name__}[/red]")
                done = i + 1
                if done == warmup or (done > warmup and (done - warmup) % step == 0):
                    manager.drain(timeout=30)
                    full_gc()
                    point = {
                        "executions": done,
                        "elapsed_s": round(time.perf_counter() - t_start, 1),
                        "rss_mb": round(rss_mb(), 2),
                        **map_sizes(manager),
                    }
                    if done == warmup or done == args.n:
                        point["live_executions"] = live_executions()
                    checkpoints.append(point)
            elapsed = time.perf_counter() - t_start
            backends_end = server.app_backends()
            stats = manager.get_stats()
        finally:
            manager.close()
        backends_closed = server.wait_app_backends(0)
        server_version = server.server_version()
    info["postgresql"] = server_version
    first, last = checkpoints[0], checkpoints[-1]
    growth = round(last["rss_mb"] - first["rss_mb"], 2)
    keys = [k for k in first if k not in ("executions", "elapsed_s", "rss_mb")]
    grown = {
        k: (first.get(k), last.get(k))
        for k in keys
        if k != "live_executions" and last.get(k, 0) > first.get(k, 0)
    }
    cols = ["executions", "elapsed_s", "rss_mb", *keys]
    console.print(
        table(
            f"soak: {args.n} executions in one process (first row: end of warm-up)",
            cols,
            [[p.get(c, "") for c in cols] for p in checkpoints],
        )
    )
    console.print(
        f"{args.n / elapsed:.0f} executions/s ({scope_runs} scopes, {graph_runs} graph runs), "
        f"{errors} errors; app backends at end {backends_end} "
        f"(budget 5), after close {backends_closed}"
    )
    verdicts = [
        Verdict(
            "RSS growth after warm-up",
            f"<= {RSS_LIMIT_MB} MB",
            f"{growth:+.2f} MB ({first['rss_mb']:.1f} -> {last['rss_mb']:.1f})",
            growth <= RSS_LIMIT_MB,
        ),
        Verdict(
            "registry maps do not grow",
            "no map larger at the end than after warm-up",
            "none grew" if not grown else f"grew: {grown}",
            not grown
            and last["tracked_runs"] == 0
            and last["open_executions"] == 0
            and last["draining"] == 0,
        ),
        Verdict(
            "no Execution objects kept alive",
            "0 live at the end",
            str(last.get("live_executions")),
            last.get("live_executions") == 0,
        ),
        Verdict("no failed executions", "0", str(errors), errors == 0),
        Verdict(
            "server: at most the budget, nothing after close",
            "<= 5 during, 0 after close",
            f"{backends_end} at end, {backends_closed} after close",
            backends_end <= 5 and backends_closed == 0,
        ),
    ]
    print_verdicts(verdicts)
    write_result(
        args.out,
        {
            "benchmark": "soak",
            "machine": info,
            "params": {"n": args.n, "warmup": warmup, "graph_every": args.graph_every},
            "elapsed_s": round(elapsed, 1),
            "executions_per_s": round(args.n / elapsed, 1),
            "scope_runs": scope_runs,
            "graph_runs": graph_runs,
            "errors": errors,
            "rss_growth_mb": growth,
            "checkpoints": checkpoints,
            "final_stats_counters": {
                k: v for k, v in stats.items() if isinstance(v, int | float) and k != "executions"
            },
            "verdicts": [v.as_dict() for v in verdicts],
        },
    )
    return 0 if all(v.ok for v in verdicts) else 1


if __name__ == "__main__":
    raise SystemExit(main())
