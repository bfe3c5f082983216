"""The performance figures across the three runs, one row each, for the README.

Every value comes from the ``<name>.run<i>.json`` files in ``benchmarks/results/``
(``python benchmarks/run_all.py --repeat 3``); a figure a run did not record is ``-``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"

Get = Callable[[dict[str, Any]], Any]


def _at(*path: str) -> Get:
    def get(d: dict[str, Any]) -> Any:
        for key in path:
            if not isinstance(d, dict) or key not in d:
                return None
            d = d[key]
        return d

    return get


def _median(values: list[float] | None) -> float | None:
    if not values:
        return None
    s = sorted(values)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def _per_round(key: str) -> Get:
    return lambda d: _median(d.get(key))


#: (benchmark, figure, target, how to read it from a run, the verdict: value -> holds)
FIGURES: list[tuple[str, str, str, Get, Callable[[float], bool] | None]] = [
    (
        "acquire",
        "round trips, unscoped warm `SQLDatabase.run`",
        "-",
        _at("summary", "unscoped_warm", "round_trips"),
        None,
    ),
    (
        "acquire",
        "round trips, new execution's first plain query",
        "<= unscoped's",
        _at("summary", "shared", "round_trips"),
        lambda v: v <= 4,
    ),
    (
        "acquire",
        "round trips, read-only query",
        "<= 3",
        _at("summary", "shared_read_only", "round_trips"),
        lambda v: v <= 3,
    ),
    (
        "acquire",
        "`shared` / unscoped warm `SQLDatabase` (pre-ping engine)",
        "<= 1.3x",
        _at("anchors", "unscoped_warm", "shared_over_anchor"),
        lambda v: v <= 1.3,
    ),
    (
        "acquire",
        "`shared` / plain engine without pre-ping",
        "-",
        _at("anchors", "engine_no_ping", "shared_over_anchor"),
        None,
    ),
    (
        "acquire",
        "`shared` / psycopg_pool `ConnectionPool`",
        "-",
        _at("anchors", "psycopg_pool", "shared_over_anchor"),
        None,
    ),
    (
        "cpu",
        "new execution + first query / warm global (SQLite, CPU)",
        "<= 1.15x",
        _at("ratios", "scoped_first"),
        lambda v: v <= 1.15,
    ),
    (
        "cpu",
        "second query / warm global (SQLite, CPU)",
        "<= 1.15x",
        _at("ratios", "scoped_second"),
        lambda v: v <= 1.15,
    ),
    (
        "storm_executor20",
        "`shared` / `global` throughput, 20 executor threads",
        ">= 0.97x",
        _per_round("shared_vs_global_per_round"),
        lambda v: v >= 0.97,
    ),
    (
        "storm_executor20",
        "`shared` / `global` CPU ms per execution",
        "<= 1.03x",
        _per_round("shared_vs_global_cpu_per_round"),
        lambda v: v <= 1.03,
    ),
    (
        "storm_executor20",
        "`shared` / `global` + no-op handler, CPU (the floor)",
        "-",
        _per_round("shared_vs_global_noop_cpu_per_round"),
        None,
    ),
    (
        "storm_executor20",
        "`cpu_scoped` / `cpu_noop` CPU (no I/O: handler only)",
        "-",
        _per_round("cpu_scoped_vs_cpu_noop_cpu_per_round"),
        None,
    ),
    (
        "storm_executor20",
        "`shared_async` (`await db.arun`) / `shared` throughput",
        "-",
        _per_round("shared_async_vs_shared_per_round"),
        None,
    ),
    (
        "storm_executor20",
        "round trips per execution, `global`",
        "-",
        _at("summary", "global", "round_trips_per_exec"),
        None,
    ),
    (
        "storm_executor20",
        "round trips per execution, `shared`",
        "-",
        _at("summary", "shared", "round_trips_per_exec"),
        None,
    ),
    ("storm_executor20", "what binds", "-", _at("binding"), None),
    (
        "storm",
        "`shared` / `global` throughput, 6 executor threads",
        ">= 0.95x",
        _per_round("shared_vs_global_per_round"),
        lambda v: v >= 0.95,
    ),
    (
        "storm",
        "`shared` / `global` CPU ms per execution, 6 threads",
        "<= 1.03x",
        _per_round("shared_vs_global_cpu_per_round"),
        lambda v: v <= 1.03,
    ),
    (
        "storm",
        "`shared_async` / `shared` throughput, 6 threads",
        "-",
        _per_round("shared_async_vs_shared_per_round"),
        None,
    ),
    ("storm", "what binds", "-", _at("binding"), None),
    (
        "storm_cold",
        "cold `shared` / `global` built before timing",
        ">= 0.95x",
        _per_round("shared_vs_global_per_round"),
        lambda v: v >= 0.95,
    ),
    (
        "storm_cold",
        "cold `shared` with `warm_schema=True` / `global`",
        ">= 0.95x",
        _per_round("shared_warm_schema_vs_global_per_round"),
        lambda v: v >= 0.95,
    ),
    (
        "overhead",
        "wrapped/bare - no-op handler/bare (margin)",
        "<= +0.02",
        _at("margin_over_noop_handler"),
        lambda v: v <= 0.02,
    ),
    (
        "overhead",
        "no-op handler / bare (the callback floor)",
        "-",
        _at("ratio_noop_handler_over_bare"),
        None,
    ),
    (
        "overhead",
        "scope_only / bare (execution open+release, no run map)",
        "-",
        _at("ratio_scope_only_over_bare"),
        None,
    ),
    (
        "reset",
        "`DISCARD ALL` alone, us (dirty connection's reset)",
        "-",
        _at("reset_cost", "discard_all_us"),
        None,
    ),
    (
        "reset",
        "reset's share of a dirty write call, paired",
        "-",
        _at("reset_cost", "share_of_dirty_paired"),
        None,
    ),
    (
        "reset",
        "resets sent per clean (read-only) call",
        "0",
        _at("summary", "read_only", "server_resets_per_call"),
        lambda v: v == 0,
    ),
]


def _runs(results: Path, name: str) -> list[dict[str, Any]]:
    found = []
    for path in sorted(results.glob(f"{name}.run*.json")):
        if re.fullmatch(rf"{re.escape(name)}\.run\d+\.json", path.name):
            found.append(json.loads(path.read_text()))
    return found


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v == int(v):
            return str(int(v))
        if abs(v) >= 10:
            return f"{v:.1f}"
        return f"{v:+.3f}" if abs(v) < 0.5 else f"{v:.3f}"
    return str(v)


def figures_table(results: Path = RESULTS) -> str:
    """One markdown row per figure: its target, each run's value, the spread, the verdict."""
    rows = [
        "| benchmark | figure | target | run 1 | run 2 | run 3 | spread | verdict |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    cache: dict[str, list[dict[str, Any]]] = {}
    for name, label, target, get, holds in FIGURES:
        runs = cache.setdefault(name, _runs(results, name))
        values = [get(d) for d in runs][:3]
        cells = [_fmt(v) for v in values] + ["-"] * (3 - len(values))
        numbers = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
        spread = f"{_fmt(min(numbers))} to {_fmt(max(numbers))}" if len(numbers) > 1 else "-"
        if holds is None or not numbers:
            verdict = "-"
        else:
            missed = sum(not holds(v) for v in numbers)
            verdict = "holds" if not missed else f"**missed** ({missed} of {len(numbers)})"
        rows.append(
            f"| {name} | {label} | {target} | " + " | ".join(cells) + f" | {spread} | {verdict} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    print(figures_table())
