"""acquire: a new execution's first query, and a second one in it, against the from_uri global.

Variants, interleaved iteration by iteration in one process against one server, the
order flipped every iteration; each timed by the wall clock and by the process's CPU
time (so the package's own cost shows apart from the network's):

* ``global_from_uri``: ``db.run("select 1")`` on ``SQLDatabase.from_uri(url)``, warm;
* ``psycopg_pool``: psycopg 3's ``ConnectionPool``, warm, for reference: the floor of a
  checkout and a query;
* ``first``: open an ``ExecutionScope``, ``get_scoped_sql_database()`` (write mode),
  ``run("select 1")``, close the scope: a new execution's first query, whole;
* ``second``: in an execution whose first query already ran (untimed), a second
  ``get_scoped_sql_database().run("select 1")``, as a second tool call makes it;
* ``read_only``: ``first`` with ``read_only=True``, the guarded path.

Round trips are statements counted in the server's log, in a phase of their own before
the timing (psycopg2 sends each statement, ``BEGIN`` included, as one query).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from psycopg_pool import ConnectionPool

import langgraph_scoped_conn as lsc
from benchmarks import harness

QUERY = "select 1"
VARIANTS = ("global_from_uri", "psycopg_pool", "first", "second", "read_only")
SIZES = {
    "n": (3000, 500, "timed iterations"),
    "warmup": (200, 50, "untimed iterations first"),
    "count": (100, 20, "iterations counted in the server log per variant"),
}

#: one timed call: (wall ns, CPU ns)
Timed = tuple[int, int]


class Variants:
    """Every variant over one server, each with its own warm pool or manager."""

    def __init__(self, server: harness.BenchServer) -> None:
        self.db = harness.from_uri(server.url())
        self.pg_pool = ConnectionPool(server.conninfo(), min_size=5, max_size=5, open=True)
        self.pg_pool.wait()
        self.manager = lsc.ExecutionConnectionManager(server.url(), max_connections=5)
        self.run: dict[str, Callable[[], Timed]] = {v: getattr(self, v) for v in VARIANTS}

    def _timed(self, call: Callable[[], Any]) -> Timed:
        w0, c0 = time.perf_counter_ns(), time.process_time_ns()
        out = call()
        timed = time.perf_counter_ns() - w0, time.process_time_ns() - c0
        if str(out) != "[(1,)]":
            raise AssertionError(f"unexpected result {out!r}")
        return timed

    def global_from_uri(self) -> Timed:
        return self._timed(lambda: self.db.run(QUERY))

    def psycopg_pool(self) -> Timed:
        def call() -> Any:
            with self.pg_pool.connection() as c:
                return c.execute(QUERY).fetchall()

        return self._timed(call)

    def _execution(self, read_only: bool = False) -> Any:
        with lsc.ExecutionScope(manager=self.manager):
            return lsc.get_scoped_sql_database(manager=self.manager, read_only=read_only).run(QUERY)

    def first(self) -> Timed:
        return self._timed(self._execution)

    def read_only(self) -> Timed:
        return self._timed(lambda: self._execution(read_only=True))

    def second(self) -> Timed:
        with lsc.ExecutionScope(manager=self.manager):
            lsc.get_scoped_sql_database(manager=self.manager).run(QUERY)
            return self._timed(lambda: lsc.get_scoped_sql_database(manager=self.manager).run(QUERY))

    def close(self) -> None:
        self.manager.close()
        self.pg_pool.close()
        self.db._engine.dispose()


def count_round_trips(server: harness.BenchServer, n: int) -> dict[str, float]:
    """Statements per timed call of each variant (``second``: its whole execution's, less
    ``first``'s), from the server log, on variants made after logging is on."""
    log = harness.ServerStatementLog(server)
    log.enable()
    variants = Variants(server)
    counted = {}
    try:
        for v in VARIANTS:
            variants.run[v]()
            with log:
                for _ in range(n):
                    variants.run[v]()
            counted[v] = log.total() / n
    finally:
        variants.close()
        log.disable()
    counted["second"] -= counted["first"]
    server.wait_app_backends(0)
    return counted


def time_variants(server: harness.BenchServer, n: int, warmup: int) -> dict[str, list[Timed]]:
    """``n`` interleaved iterations of every variant, after ``warmup`` untimed ones."""
    variants = Variants(server)
    samples: dict[str, list[Timed]] = {v: [] for v in VARIANTS}
    try:
        for _ in range(warmup):
            for v in VARIANTS:
                variants.run[v]()
        for i in range(n):
            for v in VARIANTS if i % 2 == 0 else VARIANTS[::-1]:
                samples[v].append(variants.run[v]())
    finally:
        variants.close()
    return samples


def summarize(samples: dict[str, list[Timed]], round_trips: dict[str, float]) -> dict[str, Any]:
    """The table (medians, µs), the ratios to ``global_from_uri``, the round trips."""
    wall = {v: harness.median([w / 1e3 for w, _ in xs]) for v, xs in samples.items()}
    cpu = {v: harness.median([c / 1e3 for _, c in xs]) for v, xs in samples.items()}
    table = [
        {
            "variant": v,
            "n": len(samples[v]),
            "wall_us": round(wall[v], 1),
            "wall_p90_us": round(harness.percentile([w / 1e3 for w, _ in samples[v]], 90), 1),
            "cpu_us": round(cpu[v], 1),
            "wall_vs_global": round(wall[v] / wall["global_from_uri"], 3),
            "cpu_vs_global": round(cpu[v] / cpu["global_from_uri"], 3),
            "round_trips": round(round_trips[v], 2),
        }
        for v in VARIANTS
    ]
    by = {r["variant"]: r for r in table}
    return {
        "table": table,
        "ratios": {
            v: {"wall": by[v]["wall_vs_global"], "cpu": by[v]["cpu_vs_global"]}
            for v in ("first", "second", "read_only", "psycopg_pool")
        },
        "round_trips": {v: by[v]["round_trips"] for v in VARIANTS},
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = harness.parse(harness.arguments(__doc__, SIZES), argv)
    machine = harness.machine_info()
    with harness.bench_server() as server:
        round_trips = count_round_trips(server, args.count)
        samples = time_variants(server, args.n, args.warmup)
    return harness.finish("acquire", args, machine, summarize(samples, round_trips))


if __name__ == "__main__":
    raise SystemExit(main())
