"""What the benchmarks report: each one's table columns, and the figures with their targets.

Defined once, used three times: each benchmark prints its table and checks its targets
on the console (``harness.finish``), ``render.py`` writes ``RESULTS.md`` and the README's
one table from the result files.

A result file is one JSON object.  Its ``table`` is a list of rows (dicts) shown with
``COLUMNS[benchmark]``, and any other list of rows under ``key`` with
``COLUMNS["<benchmark>.<key>"]``.  A :class:`Figure` reads one value from it by a dotted path; a
list found there is a per-round series and stands for its median, so every ratio is
taken within one run.  A figure with a target says whether its value holds it.
"""

from __future__ import annotations

import operator
import statistics
from dataclasses import dataclass
from typing import Any

#: every benchmark, in the plan's order (``run_all.py``), with what it measures
BENCHMARKS = {
    "storm": "K concurrent runs of a 3-tool-call agent graph: the package against "
    "`SQLDatabase.from_uri`, sync and async, at 6 and 20 executor threads, budgets 20 and 10",
    "acquire": "a new execution's first query, and a second one in it, against the from_uri "
    "global: wall, CPU and round trips",
    "overhead": "invoke of a trivial graph, wrapped against bare and a no-op callback handler",
    "memory": "K executions open at once, then closed: RSS against the from_uri global, "
    "and the allocations still alive (tracemalloc)",
    "reset": "what the session reset on check-in costs, and that a dirty connection is reset",
    "soak": "executions one after another: RSS and the registry's maps do not grow",
    "pgbouncer": "4 processes through a real PgBouncer, the pool choice, and budget sizing",
    "checkpoint": "K runs paused and resumed with AsyncPostgresSaver and a SQL tool, budget 4: "
    "the package's checkpointer against LangGraph's from_conn_string and a psycopg_pool beside it",
}
#: storm rows: (executor threads, budget); a budget of 10 under 20 threads is saturated
STORM_ROWS = ((20, 20), (20, 10), (6, 20), (6, 10))
#: storm: each scoped mode and the global anchor it is judged against
STORM_PAIRS = (("shared", "global_from_uri"), ("shared_async", "global_from_uri_async"))


@dataclass(frozen=True)
class Column:
    """One column of a benchmark's table: its header and the row key it shows."""

    header: str
    key: str


def _columns(spec: str) -> list[Column]:
    """``"header=key | key | ..."``: a column per item; a key alone is its own header."""
    items = [item.strip().rpartition("=") for item in spec.split("|")]
    return [Column(header or key, key) for header, _, key in items]


COLUMNS: dict[str, list[Column]] = {
    "storm": _columns(
        "threads x budget=row | mode | ok | failed | exec/s=exec_per_s | p50 ms=p50_ms"
        " | p99 ms=p99_ms | CPU ms/run=cpu_ms_per_run | CPU ÷ wall=cpu_per_wall"
        " | checkouts waited=waited_share | executor queue mean=queue_mean"
        " | executor queue max=queue_max | peak backends=peak_backends | held after=held_after"
    ),
    "acquire": _columns(
        "variant | n | wall µs=wall_us | wall p90 µs=wall_p90_us | CPU µs=cpu_us"
        " | wall x global=wall_vs_global | CPU x global=cpu_vs_global | round trips=round_trips"
    ),
    "overhead": _columns("variant | µs/invoke=us | p10 µs=p10_us | p90 µs=p90_us | x bare=vs_bare"),
    "reset": _columns(
        "variant | µs=us | p90 µs=p90_us | x global=vs_global | round trips=round_trips"
        " | resets per call=resets"
    ),
    "soak": _columns(
        "executions | s=elapsed_s | RSS MB=rss_mb | tracked runs=tracked_runs"
        " | open=open_executions | draining | pending releases=pending_releases | pools"
        " | reflection cache=reflection_cache | checked out=checked_out"
    ),
    "memory": _columns(
        "round | mode | ok | RSS before MB=rss_before_mb | RSS peak MB=rss_peak_mb"
        " | RSS after close MB=rss_after_mb | retained MB=retained_mb"
        " | RSS after a second pass MB=rss_second_mb"
    ),
    "memory.allocations": _columns("alive after close, by=by | where | KB=kb | count"),
    "pgbouncer": _columns(
        "mode=name | ok | failed | peak server backends=peak_server"
        " | peak PgBouncer clients=peak_clients | exec/s=exec_per_s | p50 ms=p50_ms"
        " | p99 ms=p99_ms | held after=left_in_use"
    ),
    "pgbouncer.pool_choice": _columns(
        "target | budget pool ms=pool_ms | new connection ms=new_ms | new / pool=new_over_pool"
    ),
    "checkpoint": _columns(
        "round | checkpointer=name | ok | failed | budget | peak backends=peak_backends"
        " | peak checkpointer backends=peak_saver | over budget=over_budget | s=elapsed_s"
        " | p50 ms=p50_ms | p99 ms=p99_ms | first error=first_error"
    ),
    "pgbouncer.sizing": _columns(
        "scenario=name | budget | predicted peak=predicted_peak | measured peak=peak_server"
        " | ok | failed | first error=first_error"
    ),
}

_OPS = {">=": operator.ge, "<=": operator.le, "==": operator.eq}


@dataclass(frozen=True)
class Figure:
    """One reported value of one benchmark, with its target (``"<op> <number>"``) if any."""

    bench: str
    label: str
    path: str
    target: str = ""
    readme: bool = False  # one of the README table's rows

    def value(self, result: dict[str, Any] | None) -> Any:
        """The value in ``result`` (a per-round list: its median); None if not recorded."""
        value: Any = result
        for key in self.path.split("."):
            if not isinstance(value, dict) or key not in value:
                return None
            value = value[key]
        if isinstance(value, list):
            numbers = [v for v in value if isinstance(v, int | float)]
            return statistics.median(numbers) if numbers else None
        return value

    def holds(self, value: Any) -> bool | None:
        """Whether ``value`` holds the target (None: no target, or no number)."""
        if not self.target or not isinstance(value, int | float):
            return None
        op, bound = self.target.split()
        return bool(_OPS[op](value, float(bound)))


def _storm() -> list[Figure]:
    out = []
    for threads, budget in STORM_ROWS:
        row, where = f"{threads}x{budget}", f"{threads} threads, budget {budget}"
        judged = threads == 20
        for mode, anchor in STORM_PAIRS:
            ratios = f"ratios.{row}.{mode}"
            out += [
                Figure(
                    "storm",
                    f"`{mode}` / `{anchor}` throughput, {where}",
                    f"{ratios}.throughput",
                    ">= 0.95" if judged else "",
                    readme=judged,
                ),
                Figure(
                    "storm",
                    f"`{mode}` / `{anchor}` CPU per run, {where}",
                    f"{ratios}.cpu",
                    "<= 1.05" if judged else "",
                    readme=judged,
                ),
            ]
        out += [
            Figure("storm", f"`shared` CPU per run / the floor's, {where}", f"ratios.{row}.floor"),
            Figure("storm", f"what binds `shared`, {where}", f"binds.{row}"),
        ]
    return [
        *out,
        Figure("storm", "scoped runs that failed", "checks.failed", "== 0"),
        Figure("storm", "scoped runs: peak backends over the budget", "checks.over_budget", "== 0"),
        Figure("storm", "scoped runs: connections or scopes held after", "checks.held", "== 0"),
    ]


FIGURES: list[Figure] = [
    *_storm(),
    Figure(
        "acquire",
        "new execution's first query / `global_from_uri`, wall",
        "ratios.first.wall",
        "<= 1.0",
        readme=True,
    ),
    Figure(
        "acquire",
        "second query in the same execution / `global_from_uri`, wall",
        "ratios.second.wall",
        "<= 0.95",
        readme=True,
    ),
    Figure("acquire", "new execution's first query / `global_from_uri`, CPU", "ratios.first.cpu"),
    Figure("acquire", "second query / `global_from_uri`, CPU", "ratios.second.cpu"),
    Figure("acquire", "round trips, `global_from_uri` query", "round_trips.global_from_uri"),
    Figure(
        "acquire",
        "round trips, new execution's first query",
        "round_trips.first",
        "<= 3",
    ),
    Figure("acquire", "round trips, first read-only query", "round_trips.read_only", "<= 3"),
    Figure(
        "overhead",
        "wrapped/bare - no-op handler/bare (margin)",
        "margin",
        "<= 0.03",
        readme=True,
    ),
    Figure("overhead", "no-op handler / bare (the callback floor)", "ratios.noop_handler"),
    Figure("overhead", "scope_only / bare (execution without the run map)", "ratios.scope_only"),
    Figure("overhead", "wrapped / bare", "ratios.wrapped"),
    Figure(
        "memory",
        "K executions open at once, then closed: RSS after, `shared` - `global_from_uri`, MB",
        "rss_after_over_global_mb",
        "<= 10",
        readme=True,
    ),
    Figure("memory", "`shared` retained after close, MB", "retained_mb.shared"),
    Figure("memory", "global retained after close, MB", "retained_mb.global_from_uri"),
    Figure(
        "memory",
        "`shared`: a second pass grows RSS by, MB (0: the first pass's memory is reused)",
        "second_pass_growth_mb.shared",
    ),
    Figure(
        "memory", "`shared`, traced pass: Python memory at its peak, MB", "traced.traced_peak_mb"
    ),
    Figure(
        "memory",
        "`shared`, traced pass: Python memory still allocated after close, MB",
        "traced.traced_after_mb",
    ),
    Figure("reset", "resets per clean (read-only) call", "resets.read_only", "== 0"),
    Figure(
        "reset",
        "resets per write-mode `select 1` (provably stateless)",
        "resets.write",
        "== 0",
    ),
    Figure("reset", "resets per dirty write call (a `SET` left behind)", "resets.dirty", "== 1"),
    Figure("reset", "a dirty checkout is reset before the next execution", "dirty_reset", "== 1"),
    Figure("reset", "the reset (`session.reset_session`) alone, µs", "reset_cost.reset_us"),
    Figure("reset", "the reset's share of a dirty write call", "reset_cost.share_of_dirty"),
    Figure("reset", "write call / `global_from_uri` query", "ratios.write"),
    Figure("reset", "read-only call / `global_from_uri` query", "ratios.read_only"),
    Figure("soak", "RSS growth after warm-up, MB", "rss_growth_mb", "<= 5"),
    Figure("soak", "registry maps larger at the end than after warm-up", "maps_grown", "== 0"),
    Figure("soak", "Execution objects alive at the end", "live_executions", "== 0"),
    Figure("soak", "failed executions", "errors", "== 0"),
    Figure("pgbouncer", "failed runs through PgBouncer", "checks.bouncer_failed", "== 0"),
    Figure(
        "pgbouncer",
        "peak server backends through PgBouncer (pool 5)",
        "checks.bouncer_peak",
        "<= 5",
    ),
    Figure("pgbouncer", "executions or connections held after", "checks.held", "== 0"),
    Figure(
        "pgbouncer", "control: psycopg's prepare_threshold=5 fails", "checks.control_failed", ">= 1"
    ),
    Figure("pgbouncer", "direct: peak backends over 4 x budget", "checks.direct_over", "== 0"),
    Figure("pgbouncer", "sizing: failures within the formula", "checks.sizing_failed", "== 0"),
    Figure(
        "pgbouncer",
        "sizing: failures at 2x the formula (no target: this load has not reached the slots)",
        "checks.oversized_failed",
    ),
    Figure("checkpoint", "package: failed runs", "checks.package_failed", "== 0"),
    Figure(
        "checkpoint",
        "package: peak backends, tools and checkpointer (budget 4)",
        "checks.package_peak",
        "<= 4",
    ),
    Figure(
        "checkpoint",
        "from_conn_string beside the package: peak backends (what the user pays)",
        "checks.from_conn_string_peak",
    ),
    Figure(
        "checkpoint",
        "AsyncConnectionPool(max_size=20) beside the package: peak backends",
        "checks.psycopg_pool_peak",
    ),
]


def tables(bench: str, result: dict[str, Any]) -> list[tuple[str, list[Column], list[Any]]]:
    """The tables of one result: (title, columns, rows), the main one first."""
    out = []
    for name, columns in COLUMNS.items():
        if name == bench or name.startswith(f"{bench}."):
            key = name.partition(".")[2] or "table"
            if result.get(key):
                out.append((name, columns, result[key]))
    return out


def figures(bench: str) -> list[Figure]:
    """The figures of one benchmark."""
    return [f for f in FIGURES if f.bench == bench]


def fmt(x: Any) -> str:
    """A number as the tables show it: 3 significant digits, thousands grouped."""
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        if abs(x) >= 100:
            return f"{x:,.0f}"
        return f"{x:.1f}" if abs(x) >= 10 else f"{x:.3g}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)
