"""reset: what the session reset (``DISCARD ALL`` on check-in) costs per checkout.

A connection that goes back to the shared PostgreSQL pool after a checkout that may
have changed session state is reset with ``DISCARD ALL`` on check-in; the guarded
read-only path marks its checkout clean and pays no reset.  Variants, interleaved
iteration by iteration in one process against one server (the order flips every
iteration):

* ``unscoped_warm``: ``SQLDatabase.run("select 1")`` on one global SQLDatabase over a
  warm engine with the package's pool settings (``pool_pre_ping=True``), the yardstick;
* ``read_only``: inside an open ExecutionScope,
  ``get_scoped_sql_database(read_only=True).run("select 1")``: the guarded path;
* ``write``: the same with ``read_only=False``: a checkout that may change session state.

Only the ``run()`` call is timed (opening and closing the scope, and getting the
SQLDatabase, are not): the reset runs inside it, when the connection is checked in.

Round trips are counted on the server: in a separate counting phase the app role's
sessions log every statement (``ALTER ROLE app SET log_statement = 'all'``, for new
sessions only, so that phase uses its own managers) and the statements each variant
sent are read back from the server log.  psycopg2 sends every statement, ``BEGIN``
included, as one simple query, so statements = round trips.  The timing phase runs
with logging off, on fresh managers.

Run: ``python benchmarks/bench_reset.py`` (``--n``, ``--count``).  It runs on older
commits too (no ``session_resets`` there): ``compare_commits.py`` uses that.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    ServerStatementLog,
    bench_server,
    console,
    machine_info,
    median,
    percentile,
    print_machine,
    table,
    write_result,
)
from sqlalchemy import create_engine

import langgraph_scoped_conn as lsc

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from langchain_community.utilities.sql_database import SQLDatabase

QUERY = "select 1"
VARIANTS = ("unscoped_warm", "read_only", "write")


class Runner:
    """The three variants over one server, with their own engine and manager."""

    def __init__(self, url: str) -> None:
        self.engine = create_engine(url, pool_size=5, pool_pre_ping=True, pool_recycle=1800)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            self.db = SQLDatabase(self.engine)
        self.manager = lsc.ExecutionConnectionManager(url, max_connections=5)

    def once(self, variant: str) -> float:
        """One call of ``variant``; returns the microseconds of the timed part."""
        if variant == "unscoped_warm":
            t0 = time.perf_counter_ns()
            out = self.db.run(QUERY)
            t1 = time.perf_counter_ns()
        else:
            with lsc.ExecutionScope(manager=self.manager):
                db = lsc.get_scoped_sql_database(
                    manager=self.manager, read_only=variant == "read_only"
                )
                t0 = time.perf_counter_ns()
                out = db.run(QUERY)
                t1 = time.perf_counter_ns()
        if out != "[(1,)]":
            raise AssertionError(f"{variant}: unexpected result {out!r}")
        return (t1 - t0) / 1e3

    def resets(self) -> int | None:
        """The manager's ``session_resets`` (None on code that has no session reset)."""
        value = self.manager.get_stats().get("session_resets")
        return int(value) if value is not None else None

    def close(self) -> None:
        self.manager.close()
        self.engine.dispose()


def count_statements(
    log: ServerStatementLog, runner: Runner, variant: str, n: int
) -> tuple[float, dict[str, float], int | None]:
    """Run ``variant`` ``n`` times; (statements per call, per-statement counts, resets)."""
    resets0 = runner.resets()
    with log:
        for _ in range(n):
            runner.once(variant)
    resets1 = runner.resets()
    seen = log.counts()
    per_call = {k: round(v / n, 2) for k, v in seen.most_common()}
    resets = None if resets0 is None or resets1 is None else resets1 - resets0
    return log.total() / n, per_call, resets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=3000, help="timed iterations per variant")
    parser.add_argument("--warmup", type=int, default=200, help="untimed iterations first")
    parser.add_argument("--count", type=int, default=200, help="calls per variant when counting")
    parser.add_argument("--out", default="reset", help="results file name (reset)")
    args = parser.parse_args(argv)
    info = machine_info()
    print_machine(info)
    samples: dict[str, list[float]] = {v: [] for v in VARIANTS}
    paired: dict[str, list[float]] = {"read_only": [], "write": []}  # per-iteration ratios
    counted: dict[str, dict[str, Any]] = {}
    with bench_server(max_connections=100) as server:
        url = server.url()
        log = ServerStatementLog(server)
        # counting phase: new sessions of the app role log every statement
        log.enable()
        runner = Runner(url)
        try:
            for _ in range(20):
                for v in VARIANTS:
                    runner.once(v)
            for v in VARIANTS:
                per_call, statements, resets = count_statements(log, runner, v, args.count)
                counted[v] = {
                    "round_trips_per_call": round(per_call, 2),
                    "statements_per_call": statements,
                    "session_resets_per_call": None
                    if resets is None
                    else round(resets / args.count, 2),
                }
        finally:
            runner.close()
        log.disable()
        server.wait_app_backends(0)
        # timing phase: fresh sessions, no statement logging
        runner = Runner(url)
        try:
            for _ in range(args.warmup):
                for v in VARIANTS:
                    runner.once(v)
            resets0 = runner.resets()
            for i in range(args.n):
                order = VARIANTS if i % 2 == 0 else VARIANTS[::-1]
                this = {v: runner.once(v) for v in order}
                for v, us in this.items():
                    samples[v].append(us)
                for v, ratios in paired.items():
                    ratios.append(this[v] / this["unscoped_warm"])
            resets1 = runner.resets()
        finally:
            runner.close()
        server_version = server.server_version()
    info["postgresql"] = server_version
    base = median(samples["unscoped_warm"])
    summary: dict[str, dict[str, Any]] = {}
    for v, xs in samples.items():
        summary[v] = {
            "n": len(xs),
            "median_us": round(median(xs), 1),
            "p10_us": round(percentile(xs, 10), 1),
            "p90_us": round(percentile(xs, 90), 1),
            "vs_unscoped_warm": round(median(xs) / base, 3),
            "median_paired_vs_unscoped_warm": round(median(paired[v]), 3) if v in paired else 1.0,
            **counted.get(v, {}),
        }
    write_over_read = round(summary["write"]["median_us"] / summary["read_only"]["median_us"], 3)
    rows = [
        (
            v,
            s["median_us"],
            s["p10_us"],
            s["p90_us"],
            f"{s['vs_unscoped_warm']:.3f}x",
            s.get("round_trips_per_call", "-"),
            "-" if s.get("session_resets_per_call") is None else s["session_resets_per_call"],
        )
        for v, s in summary.items()
    ]
    console.print(
        table(
            f"reset: one `select 1` per checkout, microseconds ({args.n} interleaved iterations)",
            ["variant", "median", "p10", "p90", "x unscoped warm", "round trips", "resets"],
            rows,
        )
    )
    for v in VARIANTS:
        stmts = ", ".join(f"{k} x{c:g}" for k, c in counted[v]["statements_per_call"].items())
        console.print(f"[dim]{v}: {stmts}[/dim]")
    console.print(f"write / read_only: [bold]{write_over_read:.3f}x[/bold] (ratio of medians)")
    timed_resets = None if resets0 is None or resets1 is None else resets1 - resets0
    write_result(
        args.out,
        {
            "benchmark": "reset",
            "machine": info,
            "params": {"n": args.n, "warmup": args.warmup, "count": args.count, "query": QUERY},
            "summary": summary,
            "write_over_read_only": write_over_read,
            "session_resets_timed_phase": timed_resets,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
