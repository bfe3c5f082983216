"""acquire: time to get a scoped SQLDatabase and run its first query in a new execution.

Variants, interleaved iteration by iteration in one process against one server:

* ``unscoped_warm``: ``SQLDatabase.run("select 1")`` on one global SQLDatabase whose
  engine has the package's pool settings (``pool_pre_ping=True``) and a warm pool;
* ``unscoped_warm_no_ping``: the same over an engine with SQLAlchemy's defaults
  (``pool_pre_ping=False``), for reference;
* ``shared``: open an ExecutionScope, ``create_execution_scoped_sql_database_sync()``,
  run ``select 1``, close the scope (the package's default strategy);
* ``per_execution_cached``: ``strategy="per_execution"`` with the reflection cache;
* ``per_execution``: ``strategy="per_execution", cache_reflection=False``, the guide's
  design: a new engine, a new connection and a full schema reflection per execution.

Run: ``python benchmarks/bench_acquire.py`` (``--n``, ``--slow-every``, ``--profile``).
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
    Verdict,
    bench_server,
    console,
    machine_info,
    median,
    percentile,
    print_machine,
    print_verdicts,
    table,
    write_result,
)
from sqlalchemy import create_engine

import langgraph_scoped_conn as lsc

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from langchain_community.utilities.sql_database import SQLDatabase

QUERY = "select 1"
FAST = ("unscoped_warm", "unscoped_warm_no_ping", "shared")
SLOW = ("per_execution_cached", "per_execution")


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=3000, help="iterations of the fast variants")
    parser.add_argument(
        "--slow-every", type=int, default=15, help="run the per_execution variants every Nth round"
    )
    parser.add_argument("--warmup", type=int, default=200, help="untimed iterations first")
    parser.add_argument("--profile", action="store_true", help="pyinstrument the shared variant")
    parser.add_argument("--out", default="acquire", help="results file name (acquire)")
    args = parser.parse_args(argv)
    info = machine_info()
    print_machine(info)
    samples: dict[str, list[float]] = {v: [] for v in FAST + SLOW}
    parts: dict[str, list[float]] = {
        k: [] for k in ("open scope", "get SQLDatabase", "first query", "close scope")
    }
    with bench_server(max_connections=100) as server:
        url = server.url()
        engine_ping = create_engine(url, pool_size=5, pool_pre_ping=True, pool_recycle=1800)
        engine_plain = create_engine(url, pool_size=5)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            db_ping = SQLDatabase(engine_ping)
            db_plain = SQLDatabase(engine_plain)
        shared = lsc.ExecutionConnectionManager(url, max_connections=5)
        per_exec_cached = lsc.ExecutionConnectionManager(url, strategy="per_execution")
        per_exec = lsc.ExecutionConnectionManager(
            url, strategy="per_execution", cache_reflection=False
        )
        managers = {
            "shared": shared,
            "per_execution_cached": per_exec_cached,
            "per_execution": per_exec,
        }

        def once(variant: str, record: bool) -> None:
            if variant == "unscoped_warm":
                t0 = time.perf_counter_ns()
                out = db_ping.run(QUERY)
            elif variant == "unscoped_warm_no_ping":
                t0 = time.perf_counter_ns()
                out = db_plain.run(QUERY)
            else:
                t0 = time.perf_counter_ns()
                _scoped_once(managers[variant], parts if record and variant == "shared" else None)
                out = "[(1,)]"
            elapsed = (time.perf_counter_ns() - t0) / 1e3
            if variant in SLOW:
                # per_execution disposes its engine on a background thread; let it finish
                # (untimed) so it does not compete for the GIL with the next variants
                managers[variant].drain(timeout=30)
            if out != "[(1,)]":
                raise AssertionError(f"{variant}: unexpected result {out!r}")
            if record:
                samples[variant].append(elapsed)

        try:
            for i in range(args.warmup):
                for v in FAST:
                    once(v, record=False)
                if i % 50 == 0:
                    for v in SLOW:
                        once(v, record=False)
            profiler = None
            if args.profile:
                from pyinstrument import Profiler

                profiler = Profiler(interval=0.0001)
            for i in range(args.n):
                order = FAST if i % 2 == 0 else FAST[::-1]
                for v in order:
                    if v == "shared" and profiler is not None:
                        profiler.start()
                        once(v, record=True)
                        profiler.stop()
                    else:
                        once(v, record=True)
                if i % args.slow_every == 0:
                    for v in SLOW if i % 2 == 0 else SLOW[::-1]:
                        once(v, record=True)
            if profiler is not None:
                out_path = Path(__file__).resolve().parent / "results" / "acquire_profile.txt"
                out_path.write_text(profiler.output_text(unicode=False, color=False))
                console.print(f"[dim]profile written to {out_path}[/dim]")
        finally:
            for m in managers.values():
                m.close()
            engine_ping.dispose()
            engine_plain.dispose()
            server_version = server.server_version()
    info["postgresql"] = server_version
    summary: dict[str, dict[str, Any]] = {}
    base = median(samples["unscoped_warm"])
    for v, xs in samples.items():
        summary[v] = {
            "n": len(xs),
            "median_us": round(median(xs), 1),
            "p10_us": round(percentile(xs, 10), 1),
            "p90_us": round(percentile(xs, 90), 1),
            "p99_us": round(percentile(xs, 99), 1),
            "vs_unscoped_warm": round(median(xs) / base, 3),
        }
    shared_med = summary["shared"]["median_us"]
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
        )
        for v, s in summary.items()
    ]
    console.print(
        table(
            "acquire: new execution -> SQLDatabase -> first `select 1` (microseconds)",
            ["variant", "n", "median", "p10", "p90", "p99", "x unscoped warm", "x shared"],
            rows,
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
    ratio_base = summary["shared"]["vs_unscoped_warm"]
    verdicts = [
        Verdict(
            "shared vs unscoped warm run",
            "<= 1.3x",
            f"{ratio_base:.2f}x ({shared_med:.0f} vs {base:.0f} us)",
            ratio_base <= 1.3,
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
            "params": {"n": args.n, "slow_every": args.slow_every, "query": QUERY},
            "summary": summary,
            "shared_breakdown_us": breakdown,
            "per_execution_over_shared": per_exec_over_shared,
            "verdicts": [v.as_dict() for v in verdicts],
        },
    )
    return 0 if all(v.ok for v in verdicts) else 1


if __name__ == "__main__":
    raise SystemExit(main())
