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
* ``shared_async``: ``shared`` with an ``async def`` tool that awaits
  ``db.arun(...)`` three times (the ecosystem issue's async tool), run next to
  ``shared`` in every round and reported as ``shared_async / shared`` per round;
* ``cpu`` / ``cpu_scoped``: the same graph with a tool that does no I/O, bare and
  wrapped: the CPU ceiling, measured in the same run;
* ``global_noop`` / ``cpu_noop``: ``global`` and ``cpu`` with a no-op LangChain callback
  handler attached: the floor any callback handler costs, to show how much of
  ``shared``'s cost over ``global`` is LangChain's callback machinery.

Compared modes run back to back in every round, their order flipped every round
(ABBA); ratios are taken per round and their median reported.  The run names what
binds it: the budget (budget / (3 x 10 ms)), the executor (sync tools, and ``arun``,
wait in asyncio's default executor: min(budget, threads) / (3 x 10 ms)) or the CPU
(the ``cpu`` mode's rate).  The throughput target of ``shared`` against ``global`` is
0.97x when the executor has at least as many threads as the budget (the budget binds,
not the executor), else 0.95x; its CPU per execution must stay within 1.03x.

Round trips per execution come from a counting phase after the timed rounds (so
logging never slows them): the app role's new sessions log every statement
(``common.ServerStatementLog``), each I/O mode runs ``--count-k`` executions on fresh
engines and managers to open its pool, and the next ``--count-k`` are counted from the
server log (``--count-slow-k`` for ``naive`` and ``per_execution``).  psycopg2 sends
each statement as one simple query, so statements = round trips.

``--cold``: the cold storm.  The process runs no warm-up round and no storm before
round 0; ``global`` is a SQLDatabase built (so reflected) before timing and kept as
built; every ``shared`` round is cold: a brand-new manager is created at the start of
its timed window, with the package's defaults (so nothing is reflected and no
connection is open), and closed after the round.  ``shared_warm_schema`` is the same
with ``warm_schema=True``.  A fresh process is approximated, not reproduced: the
imports are done before timing, and rounds after a process's first find process-wide
state warm (modules imported lazily on first use, LangGraph's and SQLAlchemy's
process-level caches, the allocator); the manager, its pool, its engine's compiled
cache and its schema cache are new each round.  Target: ``shared`` >= 0.95x ``global``.

Run: ``python benchmarks/bench_storm.py`` (``--k``, ``--rounds``, ``--budget``,
``--executor-threads``, ``--modes``, ``--cold``, ``--count-k``, ``--count-slow-k``,
``--profile MODE``).
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    BackendSampler,
    BenchServer,
    ServerStatementLog,
    Verdict,
    backend_sampler,
    bench_server,
    console,
    error_text,
    full_gc,
    machine_info,
    median,
    noop_handler,
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
MODES = (
    "cpu",
    "cpu_noop",
    "cpu_scoped",
    "naive",
    "global",
    "global_noop",
    "per_execution",
    "shared",
    "shared_async",
)
#: modes run with a no-op callback handler attached (the callback machinery's floor)
NOOP_MODES = ("cpu_noop", "global_noop")
#: ``--cold``: a global SQLDatabase built before timing against managers made in the timed
#: window, with the package's defaults and with ``warm_schema=True``; ``cpu`` (run last in
#: every round, so no storm precedes round 0's compared modes) says whether the CPU binds
COLD_MODES = ("global", "shared", "shared_warm_schema", "cpu")
SERVER_MAX_CONNECTIONS = 30
SLOW_MODES = ("naive", "per_execution")
#: scoped modes whose graph is wrapped and whose manager must hold nothing afterwards
SCOPED_MODES = ("shared", "shared_async", "shared_warm_schema")
#: compared modes, run back to back in every round, the order flipped every round (ABBA)
GROUPS = (
    ("cpu", "cpu_noop", "cpu_scoped"),
    ("global", "global_noop", "shared", "shared_async", "shared_warm_schema"),
)
#: ``shared`` over ``global``: CPU per execution at most this (the budget-bound storm)
CPU_TARGET = 1.03
#: ``--cold``: ``shared`` (a manager made in the timed window) over ``global`` (built before)
COLD_TARGET = 0.95
COLD_NOTE = (
    "fresh process approximated in-process: no warm-up round, and every shared round makes "
    "a brand-new manager inside its timed window (nothing reflected, no pool, no connection), "
    "closed after it; global's SQLDatabase is built (reflected) before timing and kept as "
    "built. Imports are done before timing, and rounds after the process's first find "
    "process-wide state (lazily imported modules, library-level caches) warm"
)
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
    if mode in ("cpu", "cpu_noop", "cpu_scoped"):

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

    elif mode in ("global", "global_noop"):

        @tool
        def run_sql() -> str:
            """Run the queries through the one global SQLDatabase."""
            t0 = time.perf_counter()
            for _ in range(QUERIES_PER_TOOL):
                global_db.run(SLEEP_SQL)
            TOOL_SECONDS.append(time.perf_counter() - t0)
            return "ok"

    elif mode == "shared_async":

        @tool
        async def run_sql(config: RunnableConfig) -> str:
            """Run the queries through this execution's scoped SQLDatabase, awaiting arun()."""
            t0 = time.perf_counter()
            db = lsc.get_scoped_sql_database(config)
            for _ in range(QUERIES_PER_TOOL):
                await db.arun(SLEEP_SQL)
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


async def _storm(
    make_graph: Callable[[], Any], k: int, executor_threads: int | None
) -> dict[str, Any]:
    """K concurrent ``ainvoke``; the wall clock starts before ``make_graph()`` is called."""
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
    graph = make_graph()  # cold modes: the manager is made here, inside the timing
    await asyncio.gather(*(one() for _ in range(k)))
    wall = time.perf_counter() - t0
    return {"wall": wall, "latencies": latencies, "errors": errors}


class ModeSetup:
    """One mode's graph, and its manager or global engine, made the way the timed run wants.

    Warm runs (the default) make everything before timing: a scoped ``shared`` manager
    reflects the schema first, as ``global`` builds its SQLDatabase before timing, and
    both pools are emptied so every mode opens its connections in the timed window.
    With ``cold``, a scoped mode's manager is made by :meth:`make_graph`, which the
    storm calls inside its timed window, and ``global`` keeps its SQLDatabase as built.
    """

    def __init__(self, mode: str, url: str, budget: int, cold: bool = False) -> None:
        self.mode = mode
        self.url = url
        self.budget = budget
        self.cold = cold
        self.manager: lsc.ExecutionConnectionManager | None = None
        self.global_engine: Any = None
        self.scoped = mode in ("per_execution", "cpu_scoped", *SCOPED_MODES)
        global_db = None
        if mode in ("global", "global_noop"):
            self.global_engine = create_engine(
                url,
                pool_size=budget,
                max_overflow=0,
                pool_timeout=60,
                pool_recycle=1800,
                pool_pre_ping=True,
            )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                global_db = SQLDatabase(self.global_engine)
            if not cold:
                self.global_engine.dispose()  # start cold on connections, like the others
        self.graph = build_graph(make_tool(mode, url, global_db))
        if mode in NOOP_MODES:
            self.graph = self.graph.with_config(callbacks=[noop_handler()])
        if self.scoped and not cold:
            self.manager = self._configure()
            if mode in SCOPED_MODES:
                # reflect the schema once before timing, as `global` builds its
                # SQLDatabase before timing; then start cold on connections
                with lsc.ExecutionScope(manager=self.manager):
                    lsc.get_scoped_sql_database(manager=self.manager)
                self.manager.pool_for().dispose()
            self.graph = lsc.with_scoped_connections(self.graph, manager=self.manager)

    @property
    def idle_backends(self) -> int:
        """App backends this mode holds before its run (cold ``global``: its reflection's)."""
        return 1 if self.cold and self.mode == "global" else 0

    def _configure(self) -> lsc.ExecutionConnectionManager:
        if self.cold:  # the package's defaults, but for the budget (and warm_schema)
            options: dict[str, Any] = {"max_connections": self.budget}
            if self.mode == "shared_warm_schema":
                options["warm_schema"] = True
            return lsc.configure(self.url, **options)
        return lsc.configure(
            self.url,
            strategy="per_execution" if self.mode == "per_execution" else "shared",
            max_connections=self.budget,
            pool_timeout=60,
            cache_reflection=self.mode != "per_execution",
        )

    def make_graph(self) -> Any:
        """The graph to run; a cold scoped mode makes its brand-new manager here."""
        if self.scoped and self.manager is None:
            self.manager = self._configure()
            return lsc.with_scoped_connections(self.graph, manager=self.manager)
        return self.graph

    def settle(self) -> tuple[int | None, int | None]:
        """Wait for releases to finish; (connections in use, open scopes) after the run."""
        if self.manager is not None:
            self.manager.drain(timeout=30)
            stats = self.manager.get_stats()
            return (
                int(stats["connections_in_use"]),
                int(stats["active_executions"]) + int(stats["draining_executions"]),
            )
        if self.global_engine is not None:
            return int(self.global_engine.pool.checkedout()), None
        return None, None

    def close(self) -> None:
        if self.manager is not None:
            self.manager.close()
        if self.global_engine is not None:
            self.global_engine.dispose()
        full_gc()  # naive: collect the engines nobody disposed


def run_mode(
    mode: str,
    server: BenchServer,
    sampler: BackendSampler,
    k: int,
    budget: int,
    executor_threads: int | None,
    profile: bool = False,
    cold: bool = False,
) -> dict[str, Any]:
    """Run K concurrent executions in ``mode`` and measure it from the server side."""
    setup = ModeSetup(mode, server.url(), budget, cold)
    server.wait_app_backends(setup.idle_backends)
    profiler = None
    if profile:
        from pyinstrument import Profiler

        profiler = Profiler(async_mode="disabled")
        profiler.start()
    TOOL_SECONDS.clear()
    cpu0 = time.process_time()
    with sampler:
        result = asyncio.run(_storm(setup.make_graph, k, executor_threads))
    cpu_s = time.process_time() - cpu0 - sampler.cpu_seconds
    if profiler is not None:
        profiler.stop()
        out = Path(__file__).resolve().parent / "results" / f"storm_profile_{mode}.txt"
        out.write_text(profiler.output_text(unicode=False, color=False, show_all=False))
        console.print(f"[dim]profile written to {out}[/dim]")
    in_use_after, open_scopes_after = setup.settle()
    backends_after = server.app_backends()
    setup.close()
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
        "samples": len(sampler.samples),
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


def round_order(modes: list[str], rnd: int, slow_rounds: int, cold: bool = False) -> list[str]:
    """This round's modes: compared ones adjacent, their order alternating (ABBA).

    ``shared_async`` and ``shared_warm_schema`` sit next to ``shared`` either way round.
    With ``cold``, the ``cpu`` group comes last, so nothing runs before round 0's
    compared modes.
    """
    order: list[str] = []
    for group in GROUPS[::-1] if cold else GROUPS:
        present = [m for m in group if m in modes]
        order += present if rnd % 2 == 0 else present[::-1]
    if rnd < slow_rounds:
        order += [m for m in ("naive", "per_execution") if m in modes]
    return order


def paired_ratio(
    runs: list[dict[str, Any]], a: str, b: str, key: str = "exec_per_s"
) -> list[float]:
    """Per round, ``key`` (exec/s) of ``a`` over ``b`` (both run back to back in that round)."""
    out = []
    for rnd in sorted({r["round"] for r in runs}):
        by = {r["mode"]: r for r in runs if r["round"] == rnd}
        if a in by and b in by and by[b][key]:
            out.append(round(by[a][key] / by[b][key], 3))
    return out


def summarize(runs: list[dict[str, Any]], modes: list[str]) -> dict[str, dict[str, Any]]:
    """Per mode: medians of throughput and latency, worst case of failures and peaks."""
    out: dict[str, dict[str, Any]] = {}
    for mode in modes:
        rs = [r for r in runs if r["mode"] == mode]
        if not rs:
            continue
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


def count_round_trips(
    server: BenchServer,
    modes: list[str],
    k: int,
    slow_k: int,
    budget: int,
    executor_threads: int | None,
) -> dict[str, dict[str, Any]]:
    """Round trips per execution of each I/O mode, from the server's statement log.

    A phase of its own, after the timed rounds: the app role's new sessions log every
    statement, so every engine and manager here is made after ``enable()``.  Each mode
    runs one storm of K first (its pool opens its connections, its first-connect
    queries run) and the next K are counted: the steady state, which is what a long
    storm's executions see.  psycopg2 sends each statement as one simple query, so
    statements = round trips.
    """
    log = ServerStatementLog(server)
    out: dict[str, dict[str, Any]] = {}
    log.enable()
    try:
        for mode in modes:
            n = slow_k if mode in SLOW_MODES else k
            if mode in ("cpu", "cpu_noop", "cpu_scoped", "global_noop") or n <= 0:
                continue
            setup = ModeSetup(mode, server.url(), budget)
            try:
                asyncio.run(_storm(setup.make_graph, n, executor_threads))
                setup.settle()
                with log:
                    result = asyncio.run(_storm(setup.make_graph, n, executor_threads))
                    setup.settle()
            finally:
                setup.close()
            server.wait_app_backends(0, timeout=10)
            ok = len(result["latencies"])
            counts: collections.Counter[str] = collections.Counter()
            for text, c in log.counts().items():  # reflection's queries are long: cut them
                counts[text if len(text) <= 60 else text[:57] + "..."] += c
            out[mode] = {
                "k": n,
                "succeeded": ok,
                "round_trips": log.total(),
                "per_exec": round(log.total() / ok, 2) if ok else None,
                "statements_per_exec": {text: round(c / ok, 2) for text, c in counts.most_common(8)}
                if ok
                else {},
            }
            console.print(
                f"  count {mode:>13}: {out[mode]['per_exec']} round trips/exec "
                f"({log.total()} statements, {ok}/{n} ok)"
            )
    finally:
        log.disable()
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
    parser.add_argument(
        "--modes",
        default="",
        help=f"comma-separated modes (default: all; {', '.join(MODES)}; "
        f"with --cold: {', '.join(COLD_MODES)})",
    )
    parser.add_argument(
        "--cold",
        action="store_true",
        help="the cold storm: global built before timing against a new manager made inside "
        "every shared round's timing (no warm-up, no reflection ahead)",
    )
    parser.add_argument(
        "--count-k",
        type=int,
        default=50,
        help="K per mode of the round-trip counting phase, after the timed rounds (50; 0: off)",
    )
    parser.add_argument(
        "--count-slow-k",
        type=int,
        default=10,
        help="K of naive and per_execution in the counting phase (10; 0: not counted)",
    )
    parser.add_argument("--profile", default="", help="profile one mode with pyinstrument")
    parser.add_argument("--out", default="", help="results file name (storm; storm_cold)")
    args = parser.parse_args(argv)
    allowed = COLD_MODES if args.cold else MODES
    modes = [m.strip() for m in args.modes.split(",") if m.strip()] or list(allowed)
    unknown = set(modes) - set(allowed)
    if unknown:
        parser.error(
            f"unknown mode(s) {sorted(unknown)}{' with --cold' if args.cold else ''}; "
            f"choose from {', '.join(allowed)}"
        )
    if args.budget > SERVER_MAX_CONNECTIONS - 4:
        parser.error(
            f"--budget {args.budget} leaves no room on a server with max_connections="
            f"{SERVER_MAX_CONNECTIONS} (3 superuser-reserved slots and the sampler's)"
        )
    out_name = args.out or ("storm_cold" if args.cold else "storm")
    info = machine_info()
    print_machine(info)
    default_threads = min(32, (os.cpu_count() or 1) + 4)
    threads = args.executor_threads or default_threads
    # the budget binds rather than the executor when every connection can have a thread
    throughput_target = COLD_TARGET if args.cold else (0.97 if threads >= args.budget else 0.95)
    slow = [m for m in modes if m in SLOW_MODES]
    console.print(
        f"storm{' --cold' if args.cold else ''}: K={args.k}"
        + (f" ({', '.join(slow)}: {min(args.slow_k, args.k)})" if slow else "")
        + f", {args.rounds} round(s), budget={args.budget} of "
        f"max_connections={SERVER_MAX_CONNECTIONS}, executor threads={threads}"
    )
    if args.cold:
        console.print(f"[dim]{COLD_NOTE}[/dim]")
    runs: list[dict[str, Any]] = []
    round_trips: dict[str, dict[str, Any]] = {}
    with bench_server(max_connections=SERVER_MAX_CONNECTIONS) as server:
        sampler = backend_sampler(server)
        try:
            for rnd in range(args.rounds):
                for mode in round_order(modes, rnd, args.slow_rounds, args.cold):
                    r = run_mode(
                        mode,
                        server,
                        sampler,
                        min(args.slow_k, args.k) if mode in SLOW_MODES else args.k,
                        args.budget,
                        args.executor_threads or None,
                        profile=args.profile == mode and rnd == args.rounds - 1,
                        cold=args.cold,
                    )
                    r["round"] = rnd
                    runs.append(r)
                    console.print(
                        f"  round {rnd} {mode:>18}: {r['succeeded']}/{r['k']} ok, "
                        f"{r['exec_per_s']:.1f} exec/s, peak {r['peak_backends']} backends, "
                        f"tool p50 {r['tool_p50_ms']} ms, CPU {r['cpu_ms_per_exec']} ms/exec"
                    )
            if args.count_k > 0 and not args.cold:
                # after the timed rounds, so logging never touches them
                round_trips = count_round_trips(
                    server,
                    modes,
                    min(args.count_k, args.k),
                    min(args.count_slow_k, args.count_k),
                    args.budget,
                    args.executor_threads or None,
                )
        finally:
            sampler.close()
            server_version = server.server_version()
    info["postgresql"] = server_version
    summary = summarize(runs, modes)
    modes = [m for m in modes if m in summary]
    budget_ceiling = args.budget / (QUERIES_PER_TOOL * QUERY_SECONDS)
    executor_ceiling = min(args.budget, threads) / (QUERIES_PER_TOOL * QUERY_SECONDS)
    cpu_ceiling = summary.get("cpu", {}).get("exec_per_s") or None
    ceilings: dict[str, Any] = {"budget": budget_ceiling, "executor": executor_ceiling}
    if cpu_ceiling:
        ceilings["cpu"] = cpu_ceiling
    binding = min(ceilings, key=lambda c: ceilings[c])
    binding_text = binding + ("" if cpu_ceiling else " (of budget and executor; CPU not measured)")
    global_rate = summary.get("global", {}).get("exec_per_s")
    global_cpu = summary.get("global", {}).get("cpu_ms_per_exec")
    for mode, s in summary.items():
        s["of_budget_ceiling"] = round(s["exec_per_s"] / budget_ceiling, 3)
        s["of_executor_ceiling"] = round(s["exec_per_s"] / executor_ceiling, 3)
        s["of_cpu_ceiling"] = round(s["exec_per_s"] / cpu_ceiling, 3) if cpu_ceiling else None
        s["vs_global"] = round(s["exec_per_s"] / global_rate, 3) if global_rate else None
        s["cpu_vs_global"] = round(s["cpu_ms_per_exec"] / global_cpu, 3) if global_cpu else None
        s["round_trips_per_exec"] = round_trips.get(mode, {}).get("per_exec")
    # the compared modes ran back to back in every round: the median of their per-round
    # ratios cancels most of the noise of a shared machine
    ratios = {
        "shared_vs_global_per_round": paired_ratio(runs, "shared", "global"),
        "shared_vs_global_cpu_per_round": paired_ratio(runs, "shared", "global", "cpu_ms_per_exec"),
        "shared_async_vs_shared_per_round": paired_ratio(runs, "shared_async", "shared"),
        "shared_async_vs_shared_cpu_per_round": paired_ratio(
            runs, "shared_async", "shared", "cpu_ms_per_exec"
        ),
        "shared_warm_schema_vs_global_per_round": paired_ratio(
            runs, "shared_warm_schema", "global"
        ),
        "cpu_scoped_vs_cpu_per_round": paired_ratio(runs, "cpu_scoped", "cpu"),
        "cpu_noop_vs_cpu_per_round": paired_ratio(runs, "cpu_noop", "cpu"),
        "cpu_noop_vs_cpu_cpu_per_round": paired_ratio(runs, "cpu_noop", "cpu", "cpu_ms_per_exec"),
        "cpu_scoped_vs_cpu_noop_per_round": paired_ratio(runs, "cpu_scoped", "cpu_noop"),
        "cpu_scoped_vs_cpu_noop_cpu_per_round": paired_ratio(
            runs, "cpu_scoped", "cpu_noop", "cpu_ms_per_exec"
        ),
        "shared_vs_global_noop_per_round": paired_ratio(runs, "shared", "global_noop"),
        "shared_vs_global_noop_cpu_per_round": paired_ratio(
            runs, "shared", "global_noop", "cpu_ms_per_exec"
        ),
    }
    per_round_ratio = ratios["shared_vs_global_per_round"]
    per_round_cpu = ratios["shared_vs_global_cpu_per_round"]
    async_ratio = ratios["shared_async_vs_shared_per_round"]
    warm_schema_ratio = ratios["shared_warm_schema_vs_global_per_round"]
    if per_round_ratio:
        summary["shared"]["vs_global"] = median(per_round_ratio)
    if per_round_cpu:
        summary["shared"]["cpu_vs_global"] = median(per_round_cpu)
    if warm_schema_ratio:
        summary["shared_warm_schema"]["vs_global"] = median(warm_schema_ratio)
    if async_ratio:
        summary["shared_async"]["vs_shared"] = median(async_ratio)
    if ratios["shared_async_vs_shared_cpu_per_round"]:
        summary["shared_async"]["cpu_vs_shared"] = median(
            ratios["shared_async_vs_shared_cpu_per_round"]
        )
    if ratios["cpu_scoped_vs_cpu_per_round"]:
        summary["cpu_scoped"]["of_cpu_ceiling"] = median(ratios["cpu_scoped_vs_cpu_per_round"])

    def cell(x: Any) -> Any:
        return "-" if x is None else x

    rows = []
    for mode in modes:
        s = summary[mode]
        rows.append(
            (
                mode,
                f"{s['succeeded']}/{s['k'] * s['rounds']}",
                s["failed"],
                s["peak_backends"],
                cell(s["in_use_after"]),
                s["backends_after"],
                s["backends_after_cleanup"],
                s["exec_per_s"],
                s["p50_ms"],
                s["p99_ms"],
                s["of_budget_ceiling"],
                s["of_executor_ceiling"],
                cell(s["of_cpu_ceiling"]),
                cell(s["vs_global"]),
                s["cpu_ms_per_exec"],
                cell(s["cpu_vs_global"]),
                cell(s["round_trips_per_exec"]),
            )
        )
    console.print(
        table(
            f"storm{' --cold' if args.cold else ''}: K={args.k} concurrent ainvoke x "
            f"{args.rounds} rounds, budget {args.budget}, server max_connections="
            f"{SERVER_MAX_CONNECTIONS} (medians of rounds; x global and CPU x global of shared, "
            "x CPU ceil of cpu_scoped: medians of paired per-round ratios; round trips: "
            + ("not counted with --cold)" if args.cold else "a separate counting phase)"),
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
                "x budget ceil",
                "x executor ceil",
                "x CPU ceil",
                "x global",
                "CPU ms/exec",
                "CPU x global",
                "round trips/exec",
            ],
            rows,
        )
    )
    for mode in modes:
        for text, n in summary[mode]["errors"].items():
            console.print(f"  [red]{mode}[/red] failed {n}x: {text}")
    for name, values in ratios.items():
        if values:
            console.print(f"  {name}: {values} (median {median(values):.3f})")
    for mode, rt in round_trips.items():
        console.print(
            f"  round trips/exec {mode}: {rt['per_exec']} = "
            + ", ".join(f"{text!r} x{c:g}" for text, c in rt["statements_per_exec"].items())
        )
    console.print(
        table(
            "ceilings (exec/s)",
            ["ceiling", "exec/s", "how"],
            [
                ("budget", budget_ceiling, f"budget {args.budget} / (3 x 10 ms)"),
                (
                    "executor",
                    executor_ceiling,
                    f"min(budget, {threads} executor threads) / (3 x 10 ms): sync tools "
                    "and arun() under ainvoke run in asyncio's default executor",
                ),
                ("cpu", cpu_ceiling or "-", "same graph, no-I/O tool, measured in this run"),
            ],
        )
    )
    console.print(f"binding ceiling: [bold]{binding_text}[/bold]")
    verdicts: list[Verdict] = []
    label = "cold " if args.cold else ""
    for mode in SCOPED_MODES:
        if mode not in summary:
            continue
        s = summary[mode]
        verdicts += [
            Verdict(
                f"{label}{mode}: no failures", "0 failed", f"{s['failed']} failed", s["failed"] == 0
            ),
            Verdict(
                f"{label}{mode}: peak <= budget",
                f"<= {args.budget}",
                str(s["peak_backends"]),
                s["peak_backends"] <= args.budget,
            ),
            Verdict(
                f"{label}{mode}: nothing held after",
                "0 in use, 0 open scopes, 0 backends after close",
                f"{s['in_use_after']} in use, {s['backends_after_cleanup']} backends after close "
                f"({s['backends_after']} idle pooled before close)",
                s["in_use_after"] == 0
                and s["backends_after_cleanup"] == 0
                and all(r["open_scopes_after"] == 0 for r in runs if r["mode"] == mode),
            ),
        ]
    why = f"{threads} executor threads {'>=' if threads >= args.budget else '<'} budget"
    if args.cold:
        cold_ratios = (("shared", per_round_ratio), ("shared_warm_schema", warm_schema_ratio))
        for mode, values in cold_ratios:
            if values:
                verdicts.append(
                    Verdict(
                        f"cold {mode}: throughput vs global built before timing",
                        f">= {COLD_TARGET}x",
                        f"{median(values):.3f}x (per round {values})",
                        median(values) >= COLD_TARGET,
                        note=f"binding: {binding_text}",
                    )
                )
    else:
        if per_round_ratio:
            verdicts.append(
                Verdict(
                    "shared: throughput vs global",
                    f">= {throughput_target}x ({why})",
                    f"{median(per_round_ratio):.3f}x (per round {per_round_ratio})",
                    median(per_round_ratio) >= throughput_target,
                    note=f"binding: {binding_text}",
                )
            )
        if per_round_cpu:
            verdicts.append(
                Verdict(
                    "shared: CPU ms per execution vs global",
                    f"<= {CPU_TARGET}x",
                    f"{median(per_round_cpu):.3f}x (per round {per_round_cpu})",
                    median(per_round_cpu) <= CPU_TARGET,
                )
            )
        floor = ratios["shared_vs_global_noop_per_round"]
        floor_cpu = ratios["shared_vs_global_noop_cpu_per_round"]
        if floor and floor_cpu:
            verdicts.append(
                Verdict(
                    "diagnostic: shared vs global with a no-op handler (the callback floor)",
                    f"throughput >= {throughput_target}x, CPU <= {CPU_TARGET}x",
                    f"{median(floor):.3f}x, CPU {median(floor_cpu):.3f}x (per round {floor}, "
                    f"CPU {floor_cpu})",
                    median(floor) >= throughput_target and median(floor_cpu) <= CPU_TARGET,
                    note="what the package adds over any LangChain callback handler",
                    data={"value": median(floor_cpu)},
                )
            )
    print_verdicts(verdicts)
    write_result(
        out_name,
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
                "modes": modes,
                "cold": args.cold,
                "cold_note": COLD_NOTE if args.cold else None,
                "throughput_target": throughput_target,
                "cpu_target": None if args.cold else CPU_TARGET,
                "count_k": 0 if args.cold else min(args.count_k, args.k),
                "count_slow_k": 0 if args.cold else min(args.count_slow_k, args.count_k),
            },
            "ceilings": {**ceilings, "binding": binding},
            "binding": binding_text,
            "summary": summary,
            **ratios,
            "round_trips": round_trips,
            "runs": runs,
            "verdicts": [v.as_dict() for v in verdicts],
        },
    )
    return 0 if all(v.ok for v in verdicts) else 1


if __name__ == "__main__":
    raise SystemExit(main())
