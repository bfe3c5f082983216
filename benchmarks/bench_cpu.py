"""cpu: the package's own CPU per execution, on an SQLite file (no network), as ratios.

Variants, interleaved round by round in one process (the order flips every round):

* ``global_warm``: ``SQLDatabase(create_engine(url)).run(query)``, the database built
  once before timing (the unscoped global pool this package replaces);
* ``scoped_first``: ``with ExecutionScope(): get_scoped_sql_database().run(query)``,
  a whole new execution with its first query (open, SQLDatabase, checkout, query,
  release);
* ``scoped_second``: a second ``get_scoped_sql_database().run(query)`` in an open
  execution (the scope is opened and its first query run outside the timing).

Each call is timed with ``time.thread_time_ns`` (CPU time of this thread: the
machine's other load does not count) and ``perf_counter_ns``.  The targets (issue
"fewer round trips and less CPU per checkout", goal 1) are ``scoped_first /
global_warm <= 1.15`` and ``scoped_second / global_warm <= 1.15``, medians of CPU time.

Run: ``python benchmarks/bench_cpu.py`` (``--rounds``, ``--per-round``, ``--profile``).
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    RESULTS_DIR,
    Verdict,
    console,
    global_sql_database,
    machine_info,
    median,
    percentile,
    print_machine,
    print_verdicts,
    table,
    write_result,
)

import langgraph_scoped_conn as lsc

TARGET = 1.15
VARIANTS = ("global_warm", "scoped_first", "scoped_second")
QUERY = "select id, name from items where id = 3"


def make_db(path: Path) -> str:
    conn = sqlite3.connect(path)
    conn.execute("create table items (id integer primary key, name text not null)")
    conn.executemany("insert into items values (?, ?)", [(i, f"item {i}") for i in range(20)])
    conn.commit()
    conn.close()
    return f"sqlite:///{path}"


def make_runners(url: str) -> dict[str, Callable[[], tuple[int, int]]]:
    """One callable per variant: runs it once, returns (cpu ns, wall ns)."""
    _, global_db = global_sql_database(url)  # SQLAlchemy's defaults, as a plain app has
    expected = global_db.run(QUERY)
    cpu, wall = time.thread_time_ns, time.perf_counter_ns

    def global_warm() -> tuple[int, int]:
        c0, w0 = cpu(), wall()
        out = global_db.run(QUERY)
        c1, w1 = cpu(), wall()
        assert out == expected, out
        return c1 - c0, w1 - w0

    def scoped_first() -> tuple[int, int]:
        c0, w0 = cpu(), wall()
        with lsc.ExecutionScope():
            out = lsc.get_scoped_sql_database().run(QUERY)
        c1, w1 = cpu(), wall()
        assert out == expected, out
        return c1 - c0, w1 - w0

    def scoped_second() -> tuple[int, int]:
        with lsc.ExecutionScope():
            lsc.get_scoped_sql_database().run(QUERY)
            c0, w0 = cpu(), wall()
            out = lsc.get_scoped_sql_database().run(QUERY)
            c1, w1 = cpu(), wall()
        assert out == expected, out
        return c1 - c0, w1 - w0

    return {
        "global_warm": global_warm,
        "scoped_first": scoped_first,
        "scoped_second": scoped_second,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=40, help="interleaved rounds")
    parser.add_argument("--per-round", type=int, default=200, help="calls per variant per round")
    parser.add_argument("--warmup", type=int, default=500, help="untimed calls per variant")
    parser.add_argument("--profile", action="store_true", help="cProfile scoped_first")
    parser.add_argument("--out", default="cpu", help="results file name (cpu)")
    args = parser.parse_args(argv)
    info = machine_info()
    print_machine(info)

    with tempfile.TemporaryDirectory(prefix="lsc-bench-cpu-") as tmp:
        url = make_db(Path(tmp) / "bench.db")
        manager = lsc.configure(url)
        try:
            runners = make_runners(url)
            for v in VARIANTS:
                for _ in range(args.warmup):
                    runners[v]()
            manager.drain()
            cpu_us: dict[str, list[float]] = {v: [] for v in VARIANTS}  # per round medians
            wall_us: dict[str, list[float]] = {v: [] for v in VARIANTS}
            paired: dict[str, list[float]] = {"scoped_first": [], "scoped_second": []}
            for r in range(args.rounds):
                order = VARIANTS if r % 2 == 0 else tuple(reversed(VARIANTS))
                this: dict[str, float] = {}
                for v in order:
                    run = runners[v]
                    samples = [run() for _ in range(args.per_round)]
                    this[v] = median([c / 1e3 for c, _ in samples])
                    cpu_us[v].append(this[v])
                    wall_us[v].append(median([w / 1e3 for _, w in samples]))
                for v, ratios in paired.items():
                    ratios.append(this[v] / this["global_warm"])
            profile_text = _profile(runners["scoped_first"]) if args.profile else None
            opened = manager.counters.get("scopes_opened")
        finally:
            manager.close()

    med = {v: median(cpu_us[v]) for v in VARIANTS}
    rows = [
        (
            f"`{v}`",
            med[v],
            percentile(cpu_us[v], 10),
            percentile(cpu_us[v], 90),
            median(wall_us[v]),
            med[v] / med["global_warm"],
        )
        for v in VARIANTS
    ]
    console.print(
        table(
            f"CPU per call on an SQLite file, microseconds ({args.rounds} rounds x "
            f"{args.per_round} calls, interleaved; per-round medians)",
            ["variant", "CPU median", "CPU p10", "CPU p90", "wall median", "x global warm"],
            rows,
        )
    )
    verdicts = []
    for v, per_round in paired.items():
        ratios = sorted(per_round)
        spread = f"rounds {ratios[0]:.3f}-{ratios[-1]:.3f}, p10-p90 " + (
            f"{percentile(ratios, 10):.3f}-{percentile(ratios, 90):.3f}"
        )
        measured = median(ratios)
        verdicts.append(
            Verdict(
                f"cpu: {v}",
                f"{v} / global_warm <= {TARGET:.2f}x",
                f"{measured:.3f}x ({spread})",
                measured <= TARGET,
                data={"value": measured, "per_round": per_round},
            )
        )
    print_verdicts(verdicts)
    if profile_text:
        console.print(profile_text)
    write_result(
        args.out,
        {
            "benchmark": "cpu",
            "machine": info,
            "params": {
                "rounds": args.rounds,
                "per_round": args.per_round,
                "warmup": args.warmup,
                "query": QUERY,
                "database": "SQLite file, 20 rows",
            },
            "cpu_us": {
                v: {
                    "median": med[v],
                    "p10": percentile(cpu_us[v], 10),
                    "p90": percentile(cpu_us[v], 90),
                    "wall_median": median(wall_us[v]),
                }
                for v in VARIANTS
            },
            "ratios": {v: median(paired[v]) for v in paired},
            "ratios_per_round": paired,
            "scopes_opened": opened,
            "verdicts": [v.as_dict() for v in verdicts],
        },
    )
    return 0


def _profile(run: Callable[[], Any], n: int = 20000) -> str:
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(n):
        run()
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(30)
    path = RESULTS_DIR / "cpu_profile.txt"
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path.write_text(out.getvalue())
    return out.getvalue()


if __name__ == "__main__":
    raise SystemExit(main())
