"""reset: what the session reset (``DISCARD ALL`` on check-in) costs per checkout.

A connection that goes back to the shared PostgreSQL pool after a checkout that may
have changed session state is reset with ``DISCARD ALL`` on check-in; the guarded
read-only path marks its checkout clean and pays no reset.  Variants, interleaved
iteration by iteration in one process against one server (the order flips every
iteration):

* ``unscoped_warm``: ``SQLDatabase.run("select 1")`` on one global SQLDatabase over a
  warm engine with the package's pool settings (``pool_pre_ping=True``), the yardstick;
* ``read_only``: inside an open ExecutionScope,
  ``get_scoped_sql_database(read_only=True).run("select 1")``: the guarded path, a
  checkout left clean;
* ``write``: the same with ``read_only=False``: a checkout that may change session state;
* ``dirty``: write mode, ``run("set work_mem = '8MB'; select 1")``: a checkout that
  really leaves session state behind;
* ``discard_all``: the reset alone, ``DISCARD ALL`` on a raw psycopg2 connection in
  autocommit, made dirty (``set work_mem = '8MB'``, untimed) before each call.

Only the ``run()`` call (``discard_all``: the ``DISCARD ALL``) is timed; opening and
closing the scope and getting the SQLDatabase are not: the reset runs inside ``run()``,
when the connection is checked in.  The reset's share of a call is ``discard_all``'s
median over the call's median (per iteration too); ``write - read_only`` is reported
beside it, though the two paths differ in more than the reset.

Round trips are counted on the server (``common.ServerStatementLog``): in a separate
counting phase the app role's new sessions log every statement, and each variant's
statements per call are read back from the server log; the resets sent are its
``DISCARD ALL`` lines.  psycopg2 sends every statement, ``BEGIN`` included, as one simple
query, so statements = round trips.  The timing phase runs with logging off, on fresh
managers.  A check then proves the reset: on a one-connection manager, one execution
dirties its connection and the next one, on the same backend, must see ``work_mem``
back at its default (``show work_mem``); a plain engine, which only rolls back, is
shown keeping the dirt.

Run: ``python benchmarks/bench_reset.py`` (``--n``, ``--count``).  It runs on older
commits too (no ``session_resets`` there): ``compare_commits.py`` uses that.
"""

from __future__ import annotations

import argparse
import ast
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import psycopg2
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
from sqlalchemy import create_engine

import langgraph_scoped_conn as lsc

QUERY = "select 1"
DIRT = "set work_mem = '8MB'"
DIRTY_QUERY = f"{DIRT}; {QUERY}"
VARIANTS = ("unscoped_warm", "read_only", "write", "dirty", "discard_all")
SCOPED = {"read_only": QUERY, "write": QUERY, "dirty": DIRTY_QUERY}
RESET = "DISCARD ALL"


class Runner:
    """The variants over one server, with their own engine, manager and raw connection."""

    def __init__(self, server: BenchServer) -> None:
        url = server.url()
        self.engine, self.db = global_sql_database(url, **PACKAGE_POOL_SETTINGS)
        self.manager = lsc.ExecutionConnectionManager(url, max_connections=5)
        self.raw = psycopg2.connect(server.conninfo("lsc-bench-raw"))
        self.raw.autocommit = True

    def once(self, variant: str) -> float:
        """One call of ``variant``; returns the microseconds of the timed part."""
        if variant == "unscoped_warm":
            t0 = time.perf_counter_ns()
            out = self.db.run(QUERY)
            t1 = time.perf_counter_ns()
        elif variant == "discard_all":
            with self.raw.cursor() as cur:
                cur.execute(DIRT)
                t0 = time.perf_counter_ns()
                cur.execute(RESET)
                t1 = time.perf_counter_ns()
            out = "[(1,)]"
        else:
            with lsc.ExecutionScope(manager=self.manager):
                db = lsc.get_scoped_sql_database(
                    manager=self.manager, read_only=variant == "read_only"
                )
                t0 = time.perf_counter_ns()
                out = db.run(SCOPED[variant])
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
        self.raw.close()


def count_statements(log: ServerStatementLog, runner: Runner, variant: str, n: int) -> dict:
    """Run ``variant`` ``n`` times in a counted block: its statements and resets per call."""
    resets0 = runner.resets()
    with log:
        for _ in range(n):
            runner.once(variant)
    resets1 = runner.resets()
    seen = log.counts()
    statements = {k: round(v / n, 2) for k, v in seen.most_common()}
    untimed = seen[DIRT] if variant == "discard_all" else 0  # its set-up, not timed
    resets = None  # the manager's count: none for the raw connection, nor on old code
    if resets0 is not None and resets1 is not None and variant != "discard_all":
        resets = resets1 - resets0
    return {
        "round_trips_per_call": round((log.total() - untimed) / n, 2),
        "statements_per_call": statements,
        "server_resets_per_call": round(seen[RESET] / n, 2),
        "session_resets_per_call": None if resets is None else round(resets / n, 2),
    }


def _rows(db: Any, sql: str) -> list[tuple[Any, ...]]:
    """``db.run(sql)``'s rows (SQLDatabase.run returns their repr)."""
    return list(ast.literal_eval(db.run(sql)))


def check_dirty_reset(server: BenchServer) -> dict[str, Any]:
    """Dirty a connection in one execution; does the next execution on it see the default?"""
    raw = psycopg2.connect(server.conninfo("lsc-bench-check"))
    try:
        with raw.cursor() as cur:
            cur.execute("show work_mem")
            default = cur.fetchone()[0]
    finally:
        raw.close()
    probe = "select pg_backend_pid(), current_setting('work_mem')"
    manager = lsc.ExecutionConnectionManager(server.url(), max_connections=1)
    try:
        with lsc.ExecutionScope(manager=manager):
            db = lsc.get_scoped_sql_database(manager=manager, read_only=False)
            ((pid_dirty, set_to),) = _rows(db, f"{DIRT}; {probe}")
        with lsc.ExecutionScope(manager=manager):
            db = lsc.get_scoped_sql_database(manager=manager, read_only=False)
            ((seen,),) = _rows(db, "show work_mem")
            ((pid_next,),) = _rows(db, "select pg_backend_pid()")
    finally:
        manager.close()
    # the control: a plain engine of one connection only rolls back on check-in
    engine = create_engine(server.url(), pool_size=1, max_overflow=0)
    try:
        with engine.connect() as c:
            pid_plain = c.exec_driver_sql("select pg_backend_pid()").scalar()
            c.exec_driver_sql(DIRT)
            c.commit()
        with engine.connect() as c:
            plain_seen = c.exec_driver_sql("show work_mem").scalar()
            plain_pid_next = c.exec_driver_sql("select pg_backend_pid()").scalar()
    finally:
        engine.dispose()
    return {
        "default": default,
        "set_to": set_to,
        "seen_by_next_execution": seen,
        "same_backend": pid_dirty == pid_next,
        "reset": set_to != default and seen == default and pid_dirty == pid_next,
        "plain_engine_seen_next": plain_seen,
        "plain_engine_same_backend": pid_plain == plain_pid_next,
    }


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
    #: per-iteration ratios: to unscoped_warm, and the reset alone to each scoped call
    paired: dict[str, list[float]] = {v: [] for v in VARIANTS if v != "unscoped_warm"}
    reset_paired: dict[str, list[float]] = {"write": [], "dirty": []}
    counted: dict[str, dict[str, Any]] = {}
    with bench_server(max_connections=100) as server:
        # counting phase: new sessions of the app role log every statement
        log = ServerStatementLog(server)
        log.enable()
        try:
            runner = Runner(server)
            try:
                for _ in range(20):
                    for v in VARIANTS:
                        runner.once(v)
                for v in VARIANTS:
                    counted[v] = count_statements(log, runner, v, args.count)
            finally:
                runner.close()
        finally:
            log.disable()
        server.wait_app_backends(0)
        # timing phase: fresh sessions, no statement logging
        runner = Runner(server)
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
                for v, ratios in reset_paired.items():
                    ratios.append(this["discard_all"] / this[v])
            resets1 = runner.resets()
        finally:
            runner.close()
        server.wait_app_backends(0)
        check = check_dirty_reset(server)
        server_version = server.server_version()
    info["postgresql"] = server_version
    base = median(samples["unscoped_warm"])
    summary: dict[str, dict[str, Any]] = {}
    for v, xs in samples.items():
        summary[v] = {
            **summarize_us(xs),
            "vs_unscoped_warm": round(median(xs) / base, 3),
            "median_paired_vs_unscoped_warm": round(median(paired[v]), 3) if v in paired else 1.0,
            **counted.get(v, {}),
        }
    med = {v: s["median_us"] for v, s in summary.items()}
    write_over_read = round(med["write"] / med["read_only"], 3)
    reset_cost = {
        "discard_all_us": med["discard_all"],
        "share_of_dirty": round(med["discard_all"] / med["dirty"], 3),
        "share_of_dirty_paired": round(median(reset_paired["dirty"]), 3),
        "share_of_write": round(med["discard_all"] / med["write"], 3),
        "share_of_write_paired": round(median(reset_paired["write"]), 3),
        "write_minus_read_only_us": round(med["write"] - med["read_only"], 1),
        "write_minus_read_only_of_write": round(
            (med["write"] - med["read_only"]) / med["write"], 3
        ),
        "dirty_minus_write_us": round(med["dirty"] - med["write"], 1),
    }
    rows = [
        (
            v,
            s["median_us"],
            s["p10_us"],
            s["p90_us"],
            f"{s['vs_unscoped_warm']:.3f}x",
            s["round_trips_per_call"],
            s["server_resets_per_call"],
            "-" if s["session_resets_per_call"] is None else s["session_resets_per_call"],
        )
        for v, s in summary.items()
    ]
    console.print(
        table(
            f"reset: one call per checkout, microseconds ({args.n} interleaved iterations)",
            [
                "variant",
                "median",
                "p10",
                "p90",
                "x unscoped warm",
                "round trips",
                "DISCARD ALL (server)",
                "resets (stats)",
            ],
            rows,
        )
    )
    for v in VARIANTS:
        stmts = ", ".join(f"{k} x{c:g}" for k, c in counted[v]["statements_per_call"].items())
        console.print(f"[dim]{v}: {stmts}[/dim]")
    console.print(
        table(
            "the reset's cost (DISCARD ALL alone on a dirty raw connection)",
            ["measure", "value"],
            [
                ("DISCARD ALL, median us", reset_cost["discard_all_us"]),
                (
                    "share of a dirty call (medians; paired)",
                    f"{reset_cost['share_of_dirty']:.3f}; "
                    f"{reset_cost['share_of_dirty_paired']:.3f}",
                ),
                (
                    "share of a write call (medians; paired)",
                    f"{reset_cost['share_of_write']:.3f}; "
                    f"{reset_cost['share_of_write_paired']:.3f}",
                ),
                (
                    "write - read_only, us (of write)",
                    f"{reset_cost['write_minus_read_only_us']:g} "
                    f"({reset_cost['write_minus_read_only_of_write']:.3f})",
                ),
                ("dirty - write, us", reset_cost["dirty_minus_write_us"]),
                ("write / read_only", f"{write_over_read:.3f}x"),
            ],
        )
    )
    console.print(
        f"dirty check: work_mem default {check['default']}, set to {check['set_to']}, the next "
        f"execution on the same backend ({check['same_backend']}) sees "
        f"{check['seen_by_next_execution']}; a plain engine's next checkout sees "
        f"{check['plain_engine_seen_next']} (same backend: {check['plain_engine_same_backend']})"
    )
    ro, dirty = summary["read_only"], summary["dirty"]
    verdicts = [
        Verdict(
            "reset: clean path (read_only) sends no reset",
            "0 DISCARD ALL per call (server log)",
            f"{ro['server_resets_per_call']:g} per call; stats "
            f"{'-' if ro['session_resets_per_call'] is None else ro['session_resets_per_call']}",
            ro["server_resets_per_call"] == 0 and not ro["session_resets_per_call"],
        ),
        Verdict(
            "reset: a dirty checkout is reset",
            f"DISCARD ALL sent; the next execution sees work_mem {check['default']}",
            f"{dirty['server_resets_per_call']:g} per call; next execution sees "
            f"{check['seen_by_next_execution']} (set {check['set_to']}, same backend "
            f"{'yes' if check['same_backend'] else 'no'})",
            dirty["server_resets_per_call"] >= 1 and check["reset"],
        ),
    ]
    print_verdicts(verdicts)
    timed_resets = None if resets0 is None or resets1 is None else resets1 - resets0
    write_result(
        args.out,
        {
            "benchmark": "reset",
            "machine": info,
            "params": {
                "n": args.n,
                "warmup": args.warmup,
                "count": args.count,
                "query": QUERY,
                "dirty_query": DIRTY_QUERY,
            },
            "summary": summary,
            "write_over_read_only": write_over_read,
            "reset_cost": reset_cost,
            "dirty_check": check,
            "session_resets_timed_phase": timed_resets,
            "verdicts": [v.as_dict() for v in verdicts],
        },
    )
    return 0 if all(v.ok for v in verdicts) else 1


if __name__ == "__main__":
    raise SystemExit(main())
