"""acquire: time to get a scoped SQLDatabase and run its first query in a new execution.

Variants, interleaved iteration by iteration in one process against one server (the
fast ones every iteration, their order flipped every iteration):

* ``unscoped_warm``: ``SQLDatabase.run("select 1")`` on one global SQLDatabase whose
  engine has the package's pool settings (``pool_pre_ping=True``) and a warm pool;
* ``unscoped_warm_no_ping``: the same over an engine with SQLAlchemy's defaults
  (``pool_pre_ping=False``), for reference;
* ``engine_no_ping``: a plain global SQLAlchemy engine without pre-ping, no
  SQLDatabase: ``with engine.connect() as c: c.exec_driver_sql("select 1").fetchall()``;
* ``psycopg_pool``: psycopg 3's ``psycopg_pool.ConnectionPool``, warm:
  ``with pool.connection() as c: c.execute("select 1").fetchall()``;
* ``shared``: open an ExecutionScope, ``create_execution_scoped_sql_database_sync()``,
  run ``select 1``, close the scope (the package's default strategy);
* ``shared_read_only``: the same with ``get_scoped_sql_database(read_only=True)``, the
  guarded read-only path, on its own manager;
* ``per_execution_cached``: ``strategy="per_execution"`` with the reflection cache;
* ``per_execution``: ``strategy="per_execution", cache_reflection=False``, the guide's
  design: a new engine, a new connection and a full schema reflection per execution.

The first four are the anchors: ``shared`` is reported against each of them, as the
ratio of medians and as the median of the per-iteration ratios (both sides timed in
the same iteration).

Round trips are counted on the server, in a counting phase before the timing one: the
app role's new sessions log every statement (``common.ServerStatementLog``), every
variant gets fresh engines, pools and managers, is warmed and then run ``--count``
times (the slow ones ``--count-slow``) in a block of its own; its statements per
iteration are its round trips (psycopg2 sends every statement, ``BEGIN`` included, as
one simple query; psycopg 3's are logged one line each too).  Connection set-up
(startup, authentication) is no statement and is not counted: that matters only for
``per_execution``, which connects anew every execution.  The timing phase runs with
logging off, on fresh objects again.

Run: ``python benchmarks/bench_acquire.py`` (``--n``, ``--count``, ``--slow-every``,
``--profile``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    PACKAGE_POOL_SETTINGS,
    BenchServer,
    ServerStatementLog,
    Verdict,
    bench_server,
    console,
    global_sql_database,
    machine_info,
    median,
    print_machine,
    print_verdicts,
    summarize_us,
    table,
    write_result,
)
from psycopg_pool import ConnectionPool
from sqlalchemy import create_engine

import langgraph_scoped_conn as lsc

QUERY = "select 1"
FAST = (
    "unscoped_warm",
    "unscoped_warm_no_ping",
    "engine_no_ping",
    "psycopg_pool",
    "shared",
    "shared_read_only",
)
SLOW = ("per_execution_cached", "per_execution")
#: what ``shared`` is reported against, each in the same run
ANCHORS = ("unscoped_warm", "unscoped_warm_no_ping", "engine_no_ping", "psycopg_pool")
TARGET_VS_UNSCOPED_WARM = 1.3
READ_ONLY_MAX_ROUND_TRIPS = 3
PARTS = ("open scope", "get SQLDatabase", "first query", "close scope")


def _scoped_once(
    manager: lsc.ExecutionConnectionManager, parts: dict[str, list[float]] | None
) -> None:
    t0 = time.perf_counter_ns()
    with lsc.ExecutionScope(manager=manager):
        t1 = time.perf_counter_ns()
        db = lsc.create_execution_scoped_sql_database_sync()
        t2 = time.perf_counter_ns()
        out = db.run(QUERY)
        t3 = time.perf_counter_ns()
    t4 = time.perf_counter_ns()
    if out != "[(1,)]":
        raise AssertionError(f"unexpected result {out!r}")
    if parts is not None:
        parts["open scope"].append((t1 - t0) / 1e3)
        parts["get SQLDatabase"].append((t2 - t1) / 1e3)
        parts["first query"].append((t3 - t2) / 1e3)
        parts["close scope"].append((t4 - t3) / 1e3)


class Variants:
    """Every variant's engine, pool or manager over one server, made warm by use."""

    def __init__(self, server: BenchServer) -> None:
        url = server.url()
        self.engine_ping, self.db_ping = global_sql_database(url, **PACKAGE_POOL_SETTINGS)
        self.engine_plain, self.db_plain = global_sql_database(url, pool_size=5)
        self.engine_bare = create_engine(url, pool_size=5, pool_pre_ping=False)
        self.pg_pool = ConnectionPool(
            server.conninfo("lsc-bench-psycopg-pool"), min_size=5, max_size=5, open=True
        )
        self.pg_pool.wait()
        self.managers = {
            "shared": lsc.ExecutionConnectionManager(url, max_connections=5),
            "shared_read_only": lsc.ExecutionConnectionManager(url, max_connections=5),
            "per_execution_cached": lsc.ExecutionConnectionManager(url, strategy="per_execution"),
            "per_execution": lsc.ExecutionConnectionManager(
                url, strategy="per_execution", cache_reflection=False
            ),
        }

    def once(self, variant: str, parts: dict[str, list[float]] | None = None) -> float:
        """Run ``variant`` once; its microseconds (``parts``: shared's breakdown)."""
        t0 = time.perf_counter_ns()
        if variant == "unscoped_warm":
            out = self.db_ping.run(QUERY)
        elif variant == "unscoped_warm_no_ping":
            out = self.db_plain.run(QUERY)
        elif variant == "engine_no_ping":
            with self.engine_bare.connect() as c:
                out = str(c.exec_driver_sql(QUERY).fetchall())
        elif variant == "psycopg_pool":
            with self.pg_pool.connection() as c:
                out = str(c.execute(QUERY).fetchall())
        elif variant == "shared_read_only":
            manager = self.managers[variant]
            with lsc.ExecutionScope(manager=manager):
                out = lsc.get_scoped_sql_database(manager=manager, read_only=True).run(QUERY)
        else:
            _scoped_once(self.managers[variant], parts if variant == "shared" else None)
            out = "[(1,)]"
        elapsed = (time.perf_counter_ns() - t0) / 1e3
        if variant in SLOW:
            # per_execution disposes its engine on a background thread; let it finish
            # (untimed) so it does not compete for the GIL with the next variants, and
            # so its statements are all sent before a counting block ends
            self.managers[variant].drain(timeout=30)
        if out != "[(1,)]":
            raise AssertionError(f"{variant}: unexpected result {out!r}")
        return elapsed

    def close(self) -> None:
        for m in self.managers.values():
            m.close()
        self.pg_pool.close()
        for engine in (self.engine_ping, self.engine_plain, self.engine_bare):
            engine.dispose()


def count_round_trips(server: BenchServer, count: int, count_slow: int) -> dict[str, Any]:
    """Statements per iteration of every variant, read from the server's log."""
    log = ServerStatementLog(server)
    log.enable()
    counted: dict[str, Any] = {}
    try:
        variants = Variants(server)  # after enable(): its sessions log their statements
        try:
            for v in FAST + SLOW:
                for _ in range(20 if v in FAST else 2):
                    variants.once(v)
            for v in FAST + SLOW:
                n = count if v in FAST else count_slow
                with log:
                    for _ in range(n):
                        variants.once(v)
                counted[v] = {
                    "round_trips": round(log.total() / n, 2),
                    "statements": {k: round(c / n, 2) for k, c in log.counts().most_common()},
                    "count": n,
                }
        finally:
            variants.close()
    finally:
        log.disable()
    server.wait_app_backends(0)
    return counted


def _statements(counted: dict[str, Any], most: int = 6, width: int = 60) -> str:
    """The statements of one iteration, each cut to ``width``, the ``most`` first."""
    items = list(counted["statements"].items())
    text = ", ".join(
        f"{k if len(k) <= width else k[: width - 3] + '...'} x{c:g}" for k, c in items[:most]
    )
    return text + (f" (+{len(items) - most} more)" if len(items) > most else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=3000, help="iterations of the fast variants")
    parser.add_argument(
        "--slow-every", type=int, default=15, help="run the per_execution variants every Nth round"
    )
    parser.add_argument("--warmup", type=int, default=200, help="untimed iterations first")
    parser.add_argument("--count", type=int, default=100, help="iterations per variant counted")
    parser.add_argument(
        "--count-slow", type=int, default=5, help="iterations per per_execution variant counted"
    )
    parser.add_argument("--profile", action="store_true", help="pyinstrument the shared variant")
    parser.add_argument("--out", default="acquire", help="results file name (acquire)")
    args = parser.parse_args(argv)
    info = machine_info()
    print_machine(info)
    samples: dict[str, list[float]] = {v: [] for v in FAST + SLOW}
    #: shared / anchor, both timed in the same iteration
    paired: dict[str, list[float]] = {a: [] for a in ANCHORS}
    parts: dict[str, list[float]] = {k: [] for k in PARTS}
    with bench_server(max_connections=100) as server:
        counted = count_round_trips(server, args.count, args.count_slow)
        variants = Variants(server)
        try:
            for i in range(args.warmup):
                for v in FAST:
                    variants.once(v)
                if i % 50 == 0:
                    for v in SLOW:
                        variants.once(v)
            profiler = None
            if args.profile:
                from pyinstrument import Profiler

                profiler = Profiler(interval=0.0001)
            for i in range(args.n):
                order = FAST if i % 2 == 0 else FAST[::-1]
                this: dict[str, float] = {}
                for v in order:
                    if v == "shared" and profiler is not None:
                        profiler.start()
                        this[v] = variants.once(v, parts)
                        profiler.stop()
                    else:
                        this[v] = variants.once(v, parts)
                for v, us in this.items():
                    samples[v].append(us)
                for a, ratios in paired.items():
                    ratios.append(this["shared"] / this[a])
                if i % args.slow_every == 0:
                    for v in SLOW if i % 2 == 0 else SLOW[::-1]:
                        samples[v].append(variants.once(v))
            if profiler is not None:
                out_path = Path(__file__).resolve().parent / "results" / "acquire_profile.txt"
                out_path.write_text(profiler.output_text(unicode=False, color=False))
                console.print(f"[dim]profile written to {out_path}[/dim]")
        finally:
            variants.close()
            server_version = server.server_version()
    info["postgresql"] = server_version
    summary: dict[str, dict[str, Any]] = {}
    base = median(samples["unscoped_warm"])
    for v, xs in samples.items():
        summary[v] = {
            **summarize_us(xs),
            "vs_unscoped_warm": round(median(xs) / base, 3),
            "round_trips": counted[v]["round_trips"],
            "statements_per_iteration": counted[v]["statements"],
        }
    shared = summary["shared"]
    shared_med = shared["median_us"]
    per_exec_over_shared = round(summary["per_execution"]["median_us"] / shared_med, 1)
    rows = [
        (
            v,
            s["n"],
            s["median_us"],
            s["p10_us"],
            s["p90_us"],
            s["p99_us"],
            f"{s['vs_unscoped_warm']:.2f}x",
            f"{s['median_us'] / shared_med:.2f}x",
            s["round_trips"],
        )
        for v, s in summary.items()
    ]
    console.print(
        table(
            "acquire: new execution -> SQLDatabase -> first `select 1` (microseconds; "
            "round trips per execution counted on the server)",
            [
                "variant",
                "n",
                "median",
                "p10",
                "p90",
                "p99",
                "x unscoped warm",
                "x shared",
                "round trips",
            ],
            rows,
        )
    )
    for v in FAST + SLOW:
        console.print(f"[dim]{v} ({counted[v]['count']} counted): {_statements(counted[v])}[/dim]")
    anchors = {
        a: {
            "anchor_median_us": summary[a]["median_us"],
            "shared_median_us": shared_med,
            "shared_over_anchor": round(shared_med / summary[a]["median_us"], 3),
            "shared_over_anchor_paired": round(median(paired[a]), 3),
            "anchor_round_trips": summary[a]["round_trips"],
            "shared_round_trips": shared["round_trips"],
        }
        for a in ANCHORS
    }
    console.print(
        table(
            "shared against each anchor, same run (ratio of medians; median of the "
            "per-iteration ratios)",
            [
                "anchor",
                "anchor us",
                "shared us",
                "shared / anchor",
                "paired",
                "anchor round trips",
                "shared round trips",
            ],
            [
                (
                    a,
                    x["anchor_median_us"],
                    x["shared_median_us"],
                    f"{x['shared_over_anchor']:.2f}x",
                    f"{x['shared_over_anchor_paired']:.2f}x",
                    x["anchor_round_trips"],
                    x["shared_round_trips"],
                )
                for a, x in anchors.items()
            ],
        )
    )
    breakdown = {k: round(median(xs), 1) for k, xs in parts.items()}
    console.print(
        table(
            "shared: where the time goes (median microseconds)",
            ["part", "us"],
            list(breakdown.items()),
        )
    )
    ratio_base = shared["vs_unscoped_warm"]
    ro_trips = summary["shared_read_only"]["round_trips"]
    verdicts = [
        Verdict(
            "shared vs unscoped warm run",
            f"<= {TARGET_VS_UNSCOPED_WARM}x",
            f"{ratio_base:.2f}x ({shared_med:.0f} vs {base:.0f} us; paired "
            f"{anchors['unscoped_warm']['shared_over_anchor_paired']:.2f}x)",
            ratio_base <= TARGET_VS_UNSCOPED_WARM,
        ),
        Verdict(
            "round trips: shared first plain query",
            "<= unscoped warm run's",
            f"{shared['round_trips']:g} vs {summary['unscoped_warm']['round_trips']:g}",
            shared["round_trips"] <= summary["unscoped_warm"]["round_trips"],
        ),
        Verdict(
            "round trips: read-only query (shared_read_only)",
            f"<= {READ_ONLY_MAX_ROUND_TRIPS}",
            f"{ro_trips:g}",
            ro_trips <= READ_ONLY_MAX_ROUND_TRIPS,
        ),
        Verdict(
            "per_execution (no cache) vs shared",
            ">= 50x slower",
            f"{per_exec_over_shared:.1f}x",
            per_exec_over_shared >= 50,
        ),
    ]
    print_verdicts(verdicts)
    write_result(
        args.out,
        {
            "benchmark": "acquire",
            "machine": info,
            "params": {
                "n": args.n,
                "slow_every": args.slow_every,
                "warmup": args.warmup,
                "count": args.count,
                "count_slow": args.count_slow,
                "query": QUERY,
            },
            "summary": summary,
            "anchors": anchors,
            "shared_breakdown_us": breakdown,
            "per_execution_over_shared": per_exec_over_shared,
            "verdicts": [v.as_dict() for v in verdicts],
        },
    )
    return 0 if all(v.ok for v in verdicts) else 1


if __name__ == "__main__":
    raise SystemExit(main())
