"""The demo's table: one column per mode, one row per measure, and a legend line per row.

Only rows that mean something for the database at hand are shown: a SQLite file has
no connection limit and no server to count backends, so it gets neither row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from langgraph_scoped_conn.demo.runner import NAIVE_MAX_OVERFLOW, NAIVE_POOL_SIZE, RunReport

__all__ = ["Row", "legend", "mode_title", "rows_for", "strategy_line", "summary_table", "verdict"]

#: (label, the cell of a report, what the row means)
Row = tuple[str, Callable[[RunReport], str], str]


def mode_title(mode: str, budget: int) -> str:
    """A mode's name and what it does, for column titles and chart labels."""
    if mode == "naive":
        return f"naive: engine per run (pool {NAIVE_POOL_SIZE}+{NAIVE_MAX_OVERFLOW})"
    return f"scoped: one pool of {budget}"


def rows_for(
    reports: Sequence[RunReport], *, is_postgres: bool, free: int | None, leaks: bool
) -> list[Row]:
    """The rows worth showing for these reports (``free``: the server's free slots)."""
    rows: list[Row] = [
        ("runs answered", lambda r: f"{r.succeeded} / {r.executions}", "ended with the answer"),
    ]
    if is_postgres:
        slots = f"; it had {free} free slots" if free is not None else ""
        rows.append(
            (
                "refused: too many clients",
                lambda r: str(r.too_many_clients),
                f"failed because the server refused to connect them{slots}",
            )
        )
    if any(r.failed - r.too_many_clients for r in reports):
        rows.append(
            (
                "other failures",
                lambda r: str(r.failed - r.too_many_clients),
                "failed for another reason (listed below)",
            )
        )
    rows.append(
        (
            "connections opened",
            lambda r: str(r.connections_opened),
            "logins (on PostgreSQL a server process each); a pool reuses them",
        )
    )
    if is_postgres:
        rows.append(
            (
                "peak server backends",
                lambda r: "-" if r.peak_backends is None else str(r.peak_backends),
                "most open at once, counted by the server (pg_stat_activity)",
            )
        )
    else:
        rows.append(
            (
                "peak open connections",
                lambda r: str(r.peak_connections),
                "most open at once, counted by the client",
            )
        )
    rows.append(
        (
            "idle in the pool after the runs",
            lambda r: str(r.idle_after_runs),
            "kept open for the next runs: not leaks; closed when the demo ends",
        )
    )
    if leaks:
        rows.append(
            (
                "leaks reclaimed",
                lambda r: str(r.leaks_reclaimed) if r.mode == "scoped" else "-",
                "connections a tool never gave back, closed when its run ended",
            )
        )
    rows.append(
        ("time", lambda r: f"{r.seconds:.1f} s", "from the first run's start to the last's end")
    )
    return rows


def summary_table(reports: Sequence[RunReport], rows: Sequence[Row], budget: int) -> Any:
    """A rich ``Table`` of ``rows``, one column per report."""
    from rich.table import Table

    table = Table()
    table.add_column("")
    for report in reports:
        name, _, what = mode_title(report.mode, budget).partition(": ")
        table.add_column(f"{name}\n{what}", justify="right")
    for label, cell, _ in rows:
        table.add_row(label, *(cell(r) for r in reports))
    return table


def legend(rows: Sequence[Row]) -> Any:
    """A rich grid with one line per row: what it counts (wrapped beside the label)."""
    from rich.table import Table

    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    for label, _, meaning in rows:
        grid.add_row(label, meaning)
    return grid


def strategy_line(scoped: RunReport, strategy_option: str) -> str:
    """Which strategy the scoped pool used, and why (the core's reason when it gives one)."""
    chosen = scoped.strategy or "unknown"
    if scoped.strategy_reason:
        return f"scoped strategy: {chosen} ({scoped.strategy_reason})"
    if strategy_option == "auto":
        return f"scoped strategy: {chosen} (auto-detected from the URL's host, port and parameters)"
    return f"scoped strategy: {chosen} (set with --strategy {strategy_option})"


def verdict(naive: RunReport | None, scoped: RunReport, budget: int) -> str:
    """One sentence on what the runs showed."""
    held = scoped.peak_backends if scoped.peak_backends is not None else scoped.peak_connections
    outcome = f"failed {scoped.failed} time(s)" if scoped.failed else "all answered"
    scoped_part = (
        f"the scoped runs {outcome}, holding at most {held} connection(s) (budget {budget})"
    )
    if naive is None:
        return scoped_part[0].upper() + scoped_part[1:] + "."
    if naive.too_many_clients:
        return (
            f"The naive runs wanted a connection each: the server refused "
            f"{naive.too_many_clients} of {naive.executions}. Then {scoped_part}."
        )
    return f"The naive runs opened {naive.connections_opened} connection(s); {scoped_part}."
