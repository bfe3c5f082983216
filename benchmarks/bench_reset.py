"""reset: what the session reset on check-in costs, and that it happens.

A connection that goes back to the shared pool after a checkout that may have changed
session state is reset (``session.RESET_SQL``: what ``DISCARD ALL`` does, statement by
statement, in one round trip) when its owner changes or ends; the guarded
read-only path and provably stateless write-mode statements leave it clean and pay no
reset.  Variants, interleaved iteration by iteration, the
order flipped every iteration; only the ``run()`` call is timed (the reset runs inside
it, at check-in):

* ``global_from_uri``: ``run("select 1")`` on ``SQLDatabase.from_uri(url)``, the yardstick;
* ``read_only`` / ``write``: ``get_scoped_sql_database(read_only=...).run("select 1")``
  in an open execution; a write-mode lone ``select 1`` provably leaves no session state
  (``stateless.py``), so it pays no reset either;
* ``dirty``: write mode, ``run("set work_mem = '8MB'; select 1")``: session state left
  behind, reset when the connection goes back at the execution's end;
* ``reset``: the package's reset alone (``session.reset_session``: ``RESET_SQL`` and a
  new random seed) on a raw psycopg2 connection dirtied (untimed) before each call.

Resets sent are ``RESET_SQL`` (or ``DISCARD ALL``) lines in the server's log, counted in
a phase of their own.  Then a check: on a one-connection manager, an execution dirties its
connection and the next one, on the same backend, must see ``work_mem`` back at its default.
"""

from __future__ import annotations

import ast
import time
from collections.abc import Callable, Sequence
from typing import Any

import psycopg2

import langgraph_scoped_conn as lsc
from benchmarks import harness
from langgraph_scoped_conn.session import RESET_SQL, reset_session

QUERY = "select 1"
DIRT = "set work_mem = '8MB'"
VARIANTS = ("global_from_uri", "read_only", "write", "dirty", "reset")
#: how a reset starts in the server's log (whitespace folded, as ServerStatementLog does)
RESETS = (" ".join(RESET_SQL.split()), "DISCARD ALL")
SIZES = {
    "n": (3000, 500, "timed iterations"),
    "warmup": (200, 50, "untimed iterations first"),
    "count": (200, 50, "calls per variant counted in the server log"),
}


class Variants:
    """The variants over one server: a global database, a manager, a raw connection."""

    def __init__(self, server: harness.BenchServer) -> None:
        self.db = harness.from_uri(server.url())
        self.manager = lsc.ExecutionConnectionManager(server.url(), max_connections=5)
        self.raw = psycopg2.connect(server.conninfo("lsc-bench-raw"))
        self.raw.autocommit = True
        self.run: dict[str, Callable[[], float]] = {
            "global_from_uri": lambda: self._timed(self.db.run, QUERY),
            "read_only": lambda: self._scoped(True, QUERY),
            "write": lambda: self._scoped(False, QUERY),
            "dirty": lambda: self._scoped(False, f"{DIRT}; {QUERY}"),
            "reset": self._reset,
        }

    def _timed(self, run: Callable[[str], Any], sql: str) -> float:
        t0 = time.perf_counter_ns()
        out = run(sql)
        us = (time.perf_counter_ns() - t0) / 1e3
        if out != "[(1,)]":
            raise AssertionError(f"unexpected result {out!r}")
        return us

    def _scoped(self, read_only: bool, sql: str) -> float:
        with lsc.ExecutionScope(manager=self.manager):
            db = lsc.get_scoped_sql_database(manager=self.manager, read_only=read_only)
            return self._timed(db.run, sql)

    def _reset(self) -> float:
        with self.raw.cursor() as cur:
            cur.execute(DIRT)
        t0 = time.perf_counter_ns()
        if not reset_session(self.raw):
            raise AssertionError("the reset failed")
        return (time.perf_counter_ns() - t0) / 1e3

    def close(self) -> None:
        self.manager.close()
        self.db._engine.dispose()
        self.raw.close()


def count(server: harness.BenchServer, n: int) -> dict[str, dict[str, float]]:
    """Per call of each variant: statements sent (its set-up excluded) and resets."""
    log = harness.ServerStatementLog(server)
    log.enable()
    variants = Variants(server)
    out = {}
    try:
        for v in VARIANTS:
            variants.run[v]()
            with log:
                for _ in range(n):
                    variants.run[v]()
            untimed = log.counts[DIRT] if v == "reset" else 0
            out[v] = {
                "round_trips": (log.total() - untimed) / n,
                "resets": sum(c for s, c in log.counts.items() if s.startswith(RESETS)) / n,
            }
    finally:
        variants.close()
        log.disable()
    server.wait_app_backends(0)
    return out


def time_variants(server: harness.BenchServer, n: int, warmup: int) -> dict[str, list[float]]:
    variants = Variants(server)
    samples: dict[str, list[float]] = {v: [] for v in VARIANTS}
    try:
        for _ in range(warmup):
            for v in VARIANTS:
                variants.run[v]()
        for i in range(n):
            for v in VARIANTS if i % 2 == 0 else VARIANTS[::-1]:
                samples[v].append(variants.run[v]())
    finally:
        variants.close()
    server.wait_app_backends(0)
    return samples


def dirty_is_reset(server: harness.BenchServer) -> bool:
    """Does the next execution on a dirtied backend see ``work_mem``'s default?"""
    manager = lsc.ExecutionConnectionManager(server.url(), max_connections=1)
    probe = "select pg_backend_pid(), current_setting('work_mem')"
    seen = []
    try:
        for sql in (f"{DIRT}; {probe}", probe):
            with lsc.ExecutionScope(manager=manager):
                db = lsc.get_scoped_sql_database(manager=manager, read_only=False)
                seen.append(ast.literal_eval(db.run(sql))[0])
    finally:
        manager.close()
    (pid_dirty, set_to), (pid_next, next_sees) = seen
    harness.console.print(f"dirty check: set {set_to}, the next execution sees {next_sees}")
    return pid_dirty == pid_next and set_to == "8MB" and next_sees != "8MB"


def summarize(samples: dict[str, list[float]], counted: dict[str, dict[str, float]]) -> dict:
    us = {v: harness.median(xs) for v, xs in samples.items()}
    table = [
        {
            "variant": v,
            "us": round(us[v], 1),
            "p90_us": round(harness.percentile(samples[v], 90), 1),
            "vs_global": round(us[v] / us["global_from_uri"], 3),
            **counted[v],
        }
        for v in VARIANTS
    ]
    return {
        "table": table,
        "ratios": {r["variant"]: r["vs_global"] for r in table},
        "resets": {v: counted[v]["resets"] for v in VARIANTS},
        "reset_cost": {
            "reset_us": round(us["reset"], 1),
            "share_of_dirty": round(us["reset"] / us["dirty"], 3),
        },
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = harness.parse(harness.arguments(__doc__, SIZES), argv)
    machine = harness.machine_info()
    with harness.bench_server() as server:
        counted = count(server, args.count)
        samples = time_variants(server, args.n, args.warmup)
        reset = dirty_is_reset(server)
    result = summarize(samples, counted) | {"dirty_reset": reset}
    return harness.finish("reset", args, machine, result)


if __name__ == "__main__":
    raise SystemExit(main())
