"""storm: K concurrent ``ainvoke`` of a real ToolNode graph against max_connections=30.

The tool runs ``select pg_sleep(0.01)`` three times through a SQLDatabase.  Modes,
interleaved round by round in one process against one server:

* ``naive``: ``SQLDatabase.from_uri`` on every tool call, never disposed (what users
  write today);
* ``global``: one unscoped SQLDatabase whose engine has a pool of the same budget
  (the guide's "old way": the best speed, no cleanup guarantee);
* ``per_execution``: the guide's design, ``strategy="per_execution"`` with a fresh
  engine and schema reflection per execution (``cache_reflection=False``);
* ``shared``: this package's default, one budget pool for every execution;
* ``cpu`` / ``cpu_scoped``: the same graph with a tool that does no I/O, bare and
  wrapped: the CPU ceiling, measured in the same run.

Run: ``python benchmarks/bench_storm.py`` (``--k``, ``--rounds``, ``--budget``,
``--executor-threads``, ``--modes``, ``--profile MODE``).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    BackendSampler,
    BenchServer,
    Verdict,
    bench_server,
    console,
    error_text,
    full_gc,
    machine_info,
    median,
    percentile,
    print_machine,
    print_verdicts,
    table,
    write_result,
)
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.runnables import RunnableConfig
from langchain_core.tools import BaseTool, tool
from langgraph.graph import START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode, tools_condition
from sqlalchemy import create_engine

import langgraph_scoped_conn as lsc

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from langchain_community.utilities.sql_database import SQLDatabase

SLEEP_SQL = "select pg_sleep(0.01)"
QUERIES_PER_TOOL = 3
QUERY_SECONDS = 0.010
MODES = ("cpu", "cpu_scoped", "naive", "global", "per_execution", "shared")
SERVER_MAX_CONNECTIONS = 30
SLOW_MODES = ("naive", "per_execution")
#: Wall time of each tool call inside its executor thread (global and scoped modes).
TOOL_SECONDS: list[float] = []


def build_graph(run_sql: BaseTool) -> Any:
    """agent -> tools (ToolNode with ``run_sql``) -> agent -> end: 7 runs per execution."""

    async def agent(state: MessagesState) -> dict[str, Any]:
        if isinstance(state["messages"][-1], ToolMessage):
            return {"messages": [AIMessage("done")]}
        call = {"name": "run_sql", "args": {}, "id": "call-1", "type": "tool_call"}
        return {"messages": [AIMessage("", tool_calls=[call])]}

    builder = StateGraph(MessagesState)
    builder.add_node("agent", agent)
    builder.add_node("tools", ToolNode([run_sql], handle_tool_errors=False))
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", tools_condition)
    builder.add_edge("tools", "agent")
    return builder.compile()


def make_tool(mode: str, url: str, global_db: Any = None) -> BaseTool:
    if mode in ("cpu", "cpu_scoped"):

        @tool
        def run_sql() -> str:
            """Run the queries (no I/O: the CPU ceiling)."""
            return "ok"

    elif mode == "naive":

        @tool
        def run_sql() -> str:
            """Run the queries through a SQLDatabase made on every call."""
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                db = SQLDatabase.from_uri(url)
            for _ in range(QUERIES_PER_TOOL):
                db.run(SLEEP_SQL)
            return "ok"

    elif mode == "global":

        @tool
        def run_sql() -> str:
            """Run the queries through the one global SQLDatabase."""
            t0 = time.perf_counter()
            for _ in range(QUERIES_PER_TOOL):
                global_db.run(SLEEP_SQL)
            TOOL_SECONDS.append(time.perf_counter() - t0)
            return "ok"

    else:

        @tool
        def run_sql(config: RunnableConfig) -> str:
            """Run the queries through this execution's scoped SQLDatabase."""
            t0 = time.perf_counter()
            db = lsc.get_scoped_sql_database(config)
            for _ in range(QUERIES_PER_TOOL):
                db.run(SLEEP_SQL)
            TOOL_SECONDS.append(time.perf_counter() - t0)
            return "ok"

    return run_sql


async def _storm(graph: Any, k: int, executor_threads: int | None) -> dict[str, Any]:
    if executor_threads:
        loop = asyncio.get_running_loop()
        loop.set_default_executor(
            concurrent.futures.ThreadPoolExecutor(executor_threads, thread_name_prefix="storm")
        )
    latencies: list[float] = []
    errors: collections.Counter[str] = collections.Counter()

    async def one() -> None:
        t0 = time.perf_counter()
        try:
            out = await graph.ainvoke({"messages": [HumanMessage("how many orders?")]})
        except Exception as exc:
            errors[error_text(exc)] += 1
            return
        tool_msgs = [m for m in out["messages"] if isinstance(m, ToolMessage)]
        if not tool_msgs or tool_msgs[0].content != "ok" or out["messages"][-1].content != "done":
            errors["wrong result"] += 1
            return
        latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(k)))
    wall = time.perf_counter() - t0
    return {"wall": wall, "latencies": latencies, "errors": errors}


def run_mode(
    mode: str,
    server: BenchServer,
    sampler: BackendSampler,
    k: int,
    budget: int,
    executor_threads: int | None,
    profile: bool = False,
) -> dict[str, Any]:
    """Run K concurrent executions in ``mode`` and measure it from the server side."""
    url = server.url()
    manager = None
    global_engine = None
    global_db = None
    if mode in ("per_execution", "shared", "cpu_scoped"):
        manager = lsc.configure(
            url,
            strategy="per_execution" if mode == "per_execution" else "shared",
            max_connections=budget,
            pool_timeout=60,
            cache_reflection=mode != "per_execution",
        )
        if mode == "shared":
            # reflect the schema once before timing, as `global` builds its SQLDatabase
            # before timing; then start cold on connections like the other modes
            with lsc.ExecutionScope(manager=manager):
                lsc.get_scoped_sql_database(manager=manager)
            manager.pool_for().dispose()
    if mode == "global":
        global_engine = create_engine(
            url,
            pool_size=budget,
            max_overflow=0,
            pool_timeout=60,
            pool_recycle=1800,
            pool_pre_ping=True,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            global_db = SQLDatabase(global_engine)
        global_engine.dispose()  # start cold, like the other modes
    graph = build_graph(make_tool(mode, url, global_db))
    if manager is not None:
        graph = lsc.with_scoped_connections(graph, manager=manager)
    server.wait_app_backends(0)
    profiler = None
    if profile:
        from pyinstrument import Profiler

        profiler = Profiler(async_mode="disabled")
        profiler.start()
    TOOL_SECONDS.clear()
    cpu0 = time.process_time()
    with sampler:
        result = asyncio.run(_storm(graph, k, executor_threads))
    cpu_s = time.process_time() - cpu0 - sampler.cpu_seconds
    if profiler is not None:
        profiler.stop()
        out = Path(__file__).resolve().parent / "results" / f"storm_profile_{mode}.txt"
        out.write_text(profiler.output_text(unicode=False, color=False, show_all=False))
        console.print(f"[dim]profile written to {out}[/dim]")
    in_use_after: int | None = None
    open_scopes_after: int | None = None
    if manager is not None:
        manager.drain(timeout=30)
        stats = manager.get_stats()
        in_use_after = int(stats["connections_in_use"])
        open_scopes_after = int(stats["active_executions"]) + int(stats["draining_executions"])
    elif global_engine is not None:
        in_use_after = int(global_engine.pool.checkedout())  # type: ignore[attr-defined]
    backends_after = server.app_backends()
    if manager is not None:
        manager.close()
    if global_engine is not None:
        global_engine.dispose()
    full_gc()  # naive: collect the engines nobody disposed
    backends_after_cleanup = server.wait_app_backends(0, timeout=10)
    lat = result["latencies"]
    errors: collections.Counter[str] = result["errors"]
    return {
        "mode": mode,
        "k": k,
        "succeeded": len(lat),
        "failed": sum(errors.values()),
        "errors": dict(errors.most_common(5)),
        "peak_backends": sampler.peak,
        "samples": sampler.samples,
        "in_use_after": in_use_after,
        "open_scopes_after": open_scopes_after,
        "backends_after": backends_after,
        "backends_after_cleanup": backends_after_cleanup,
        "wall_s": round(result["wall"], 3),
        "exec_per_s": round(len(lat) / result["wall"], 2) if result["wall"] else 0.0,
        "p50_ms": round(percentile(lat, 50) * 1000, 1),
        "p99_ms": round(percentile(lat, 99) * 1000, 1),
        "cpu_ms_per_exec": round(cpu_s * 1000 / k, 3),
        "sampler_cpu_ms": round(sampler.cpu_seconds * 1000, 1),
        "tool_p50_ms": round(percentile(TOOL_SECONDS, 50) * 1000, 2) if TOOL_SECONDS else None,
    }


def round_order(modes: list[str], rnd: int, slow_rounds: int) -> list[str]:
    """This round's modes: compared pairs adjacent, their order alternating (ABBA)."""
    order: list[str] = []
    for pair in (("cpu", "cpu_scoped"), ("global", "shared")):
        present = [m for m in pair if m in modes]
        order += present if rnd % 2 == 0 else present[::-1]
    if rnd < slow_rounds:
        order += [m for m in ("naive", "per_execution") if m in modes]
    return order


def paired_ratio(runs: list[dict[str, Any]], a: str, b: str) -> list[float]:
    """Per round, exec/s of ``a`` over ``b`` (both run back to back in that round)."""
    out = []
    for rnd in sorted({r["round"] for r in runs}):
        by = {r["mode"]: r for r in runs if r["round"] == rnd}
        if a in by and b in by and by[b]["exec_per_s"]:
            out.append(round(by[a]["exec_per_s"] / by[b]["exec_per_s"], 3))
    return out


def summarize(runs: list[dict[str, Any]], modes: list[str]) -> dict[str, dict[str, Any]]:
    """Per mode: medians of throughput and latency, worst case of failures and peaks."""
    out: dict[str, dict[str, Any]] = {}
    for mode in modes:
        rs = [r for r in runs if r["mode"] == mode]
        errors: collections.Counter[str] = collections.Counter()
        for r in rs:
            errors.update(r["errors"])
        out[mode] = {
            "rounds": len(rs),
            "k": rs[0]["k"],
            "succeeded": sum(r["succeeded"] for r in rs),
            "failed": sum(r["failed"] for r in rs),
            "errors": dict(errors.most_common(3)),
            "peak_backends": max(r["peak_backends"] for r in rs),
            "in_use_after": max((r["in_use_after"] or 0) for r in rs)
            if rs[0]["in_use_after"] is not None
            else None,
            "backends_after": max(r["backends_after"] for r in rs),
            "backends_after_cleanup": max(r["backends_after_cleanup"] for r in rs),
            "exec_per_s": median([r["exec_per_s"] for r in rs]),
            "p50_ms": median([r["p50_ms"] for r in rs]),
            "p99_ms": median([r["p99_ms"] for r in rs]),
            "cpu_ms_per_exec": median([r["cpu_ms_per_exec"] for r in rs]),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, default=1000, help="concurrent runs per mode (1000)")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds (4)")
    parser.add_argument(
        "--slow-rounds",
        type=int,
        default=1,
        help="rounds that also run naive and per_execution (1; they only show failures)",
    )
    parser.add_argument(
        "--slow-k",
        type=int,
        default=300,
        help="K for naive and per_execution, which run at a few exec/s (300; 1000 = full)",
    )
    parser.add_argument("--budget", type=int, default=20, help="pool budget (20 of the 30)")
    parser.add_argument(
        "--executor-threads",
        type=int,
        default=0,
        help="size of asyncio's default executor (0: asyncio's default, min(32, nproc+4))",
    )
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated modes")
    parser.add_argument("--profile", default="", help="profile one mode with pyinstrument")
    parser.add_argument("--out", default="storm", help="results file name (storm)")
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = set(modes) - set(MODES)
    if unknown:
        parser.error(f"unknown mode(s) {sorted(unknown)}; choose from {', '.join(MODES)}")
    if args.budget > SERVER_MAX_CONNECTIONS - 4:
        parser.error(
            f"--budget {args.budget} leaves no room on a server with max_connections="
            f"{SERVER_MAX_CONNECTIONS} (3 superuser-reserved slots and the sampler's)"
        )
    info = machine_info()
    print_machine(info)
    default_threads = min(32, (os.cpu_count() or 1) + 4)
    threads = args.executor_threads or default_threads
    console.print(
        f"storm: K={args.k} (naive, per_execution: {min(args.slow_k, args.k)}), "
        f"{args.rounds} round(s), budget={args.budget} of "
        f"max_connections={SERVER_MAX_CONNECTIONS}, executor threads={threads}"
    )
    runs: list[dict[str, Any]] = []
    with bench_server(max_connections=SERVER_MAX_CONNECTIONS) as server:
        sampler = BackendSampler(server)
        try:
            for rnd in range(args.rounds):
                for mode in round_order(modes, rnd, args.slow_rounds):
                    r = run_mode(
                        mode,
                        server,
                        sampler,
                        min(args.slow_k, args.k) if mode in SLOW_MODES else args.k,
                        args.budget,
                        args.executor_threads or None,
                        profile=args.profile == mode and rnd == args.rounds - 1,
                    )
                    r["round"] = rnd
                    runs.append(r)
                    console.print(
                        f"  round {rnd} {mode:>13}: {r['succeeded']}/{r['k']} ok, "
                        f"{r['exec_per_s']:.1f} exec/s, peak {r['peak_backends']} backends, "
                        f"tool p50 {r['tool_p50_ms']} ms, CPU {r['cpu_ms_per_exec']} ms/exec"
                    )
        finally:
            sampler.close()
            server_version = server.server_version()
    info["postgresql"] = server_version
    summary = summarize(runs, modes)
    server_ceiling = args.budget / (QUERIES_PER_TOOL * QUERY_SECONDS)
    executor_ceiling = min(args.budget, threads) / (QUERIES_PER_TOOL * QUERY_SECONDS)
    cpu_ceiling = summary.get("cpu", {}).get("exec_per_s") or None
    ceilings = {"server": server_ceiling, "executor": executor_ceiling}
    if cpu_ceiling:
        ceilings["cpu"] = cpu_ceiling
    binding = min(ceilings, key=lambda c: ceilings[c])
    global_rate = summary.get("global", {}).get("exec_per_s")
    global_cpu = summary.get("global", {}).get("cpu_ms_per_exec")
    for s in summary.values():
        s["of_server_ceiling"] = round(s["exec_per_s"] / server_ceiling, 3)
        s["of_executor_ceiling"] = round(s["exec_per_s"] / executor_ceiling, 3)
        s["of_cpu_ceiling"] = round(s["exec_per_s"] / cpu_ceiling, 3) if cpu_ceiling else None
        s["vs_global"] = round(s["exec_per_s"] / global_rate, 3) if global_rate else None
        s["cpu_vs_global"] = round(s["cpu_ms_per_exec"] / global_cpu, 3) if global_cpu else None
    # the compared pairs ran back to back in every round: the median of their per-round
    # ratios cancels most of the noise of a shared machine
    per_round_ratio = paired_ratio(runs, "shared", "global")
    handler_ratio = paired_ratio(runs, "cpu_scoped", "cpu")
    if per_round_ratio:
        summary["shared"]["vs_global"] = median(per_round_ratio)
    if handler_ratio:
        summary["cpu_scoped"]["of_cpu_ceiling"] = median(handler_ratio)

    rows = []
    for mode in modes:
        s = summary[mode]
        rows.append(
            (
                mode,
                f"{s['succeeded']}/{s['k'] * s['rounds']}",
                s["failed"],
                s["peak_backends"],
                "-" if s["in_use_after"] is None else s["in_use_after"],
                s["backends_after"],
                s["backends_after_cleanup"],
                s["exec_per_s"],
                s["p50_ms"],
                s["p99_ms"],
                s["of_server_ceiling"],
                s["of_executor_ceiling"],
                s["of_cpu_ceiling"] if s["of_cpu_ceiling"] is not None else "-",
                s["vs_global"] if s["vs_global"] is not None else "-",
                s["cpu_ms_per_exec"],
                s["cpu_vs_global"] if s["cpu_vs_global"] is not None else "-",
            )
        )
    console.print(
        table(
            f"storm: K={args.k} concurrent ainvoke x {args.rounds} rounds, budget {args.budget}, "
            f"server max_connections={SERVER_MAX_CONNECTIONS} (medians of rounds; "
            "x global of shared and x CPU ceil of cpu_scoped: median of paired per-round ratios)",
            [
                "mode",
                "ok",
                "failed",
                "peak backends",
                "in use after",
                "backends after",
                "after cleanup",
                "exec/s",
                "p50 ms",
                "p99 ms",
                "x server ceil",
                "x executor ceil",
                "x CPU ceil",
                "x global",
                "CPU ms/exec",
                "CPU x global",
            ],
            rows,
        )
    )
    for mode in modes:
        for text, n in summary[mode]["errors"].items():
            console.print(f"  [red]{mode}[/red] failed {n}x: {text}")
    console.print(
        table(
            "ceilings (exec/s)",
            ["ceiling", "exec/s", "how"],
            [
                ("server", server_ceiling, f"budget {args.budget} / (3 x 10 ms)"),
                (
                    "executor",
                    executor_ceiling,
                    f"min(budget, {threads} executor threads) / (3 x 10 ms): sync tools "
                    "under ainvoke run in asyncio's default executor",
                ),
                ("cpu", cpu_ceiling or "-", "same graph, no-I/O tool, measured in this run"),
            ],
        )
    )
    console.print(f"binding ceiling: [bold]{binding}[/bold]")
    verdicts: list[Verdict] = []
    if "shared" in summary:
        s = summary["shared"]
        verdicts += [
            Verdict("shared: no failures", "0 failed", f"{s['failed']} failed", s["failed"] == 0),
            Verdict(
                "shared: peak <= budget",
                f"<= {args.budget}",
                str(s["peak_backends"]),
                s["peak_backends"] <= args.budget,
            ),
            Verdict(
                "shared: nothing held after",
                "0 in use, 0 open scopes, 0 backends after close",
                f"{s['in_use_after']} in use, {s['backends_after_cleanup']} backends after close "
                f"({s['backends_after']} idle pooled before close)",
                s["in_use_after"] == 0
                and s["backends_after_cleanup"] == 0
                and all(r["open_scopes_after"] == 0 for r in runs if r["mode"] == "shared"),
            ),
        ]
        if s["vs_global"] is not None:
            verdicts.append(
                Verdict(
                    "shared: throughput vs global",
                    ">= 0.95x",
                    f"{s['vs_global']:.3f}x (per round {per_round_ratio})",
                    s["vs_global"] >= 0.95,
                )
            )
    print_verdicts(verdicts)
    write_result(
        args.out,
        {
            "benchmark": "storm",
            "machine": info,
            "params": {
                "k": args.k,
                "slow_k": min(args.slow_k, args.k),
                "rounds": args.rounds,
                "slow_rounds": args.slow_rounds,
                "budget": args.budget,
                "server_max_connections": SERVER_MAX_CONNECTIONS,
                "superuser_reserved_connections": 3,
                "executor_threads": threads,
                "queries_per_tool": QUERIES_PER_TOOL,
                "query": SLEEP_SQL,
            },
            "ceilings": {**ceilings, "binding": binding},
            "summary": summary,
            "shared_vs_global_per_round": per_round_ratio,
            "cpu_scoped_vs_cpu_per_round": handler_ratio,
            "runs": runs,
            "verdicts": [v.as_dict() for v in verdicts],
        },
    )
    return 0 if all(v.ok for v in verdicts) else 1


if __name__ == "__main__":
    raise SystemExit(main())
