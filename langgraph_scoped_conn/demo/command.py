"""``python -m langgraph_scoped_conn demo``: the naive and the scoped way, side by side.

The demo picks a database (an embedded PostgreSQL by default), runs N concurrent
agent runs the naive way (an engine per run) and then the scoped way (one pool) while
a sampler counts the server's backends, and prints a progress bar, one table with a
legend, and the backends over time as a chart (and a PNG with the ``plot`` extra).
Imported only when the demo runs: it needs rich (the ``demo`` extra).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from langgraph_scoped_conn.demo.chart import PLOT_MISSING, Series, series_of, terminal_chart
from langgraph_scoped_conn.demo.database import (
    DemoDatabase,
    embedded_database,
    embedded_unavailable,
    existing_database,
    free_slots,
    sqlite_database,
)
from langgraph_scoped_conn.demo.runner import (
    NAIVE_APPLICATION,
    SCOPED_APPLICATION,
    RunReport,
    run_naive,
    run_scoped,
)
from langgraph_scoped_conn.demo.sampler import BackendSampler
from langgraph_scoped_conn.demo.summary import (
    legend,
    mode_title,
    rows_for,
    strategy_line,
    summary_table,
    verdict,
)

__all__ = ["DemoOptions", "run_demo"]

#: How often the sampler reads pg_stat_activity, in seconds.
SAMPLE_INTERVAL = 0.01


@dataclasses.dataclass(frozen=True)
class DemoOptions:
    """The demo's command-line options (see ``python -m langgraph_scoped_conn demo --help``)."""

    executions: int = 50
    max_connections: int = 5
    server_max_connections: int = 20
    database_url: str | None = None
    schema: str | None = None
    sqlite: bool = False
    compare: bool | None = None  # None: on, except against --database-url
    strategy: str = "auto"
    leak_every: int = 0
    report_json: Path | None = None
    png: Path | None = None


@dataclasses.dataclass(frozen=True)
class _Phase:
    """One mode's report, and when its runs started and the server let go of them."""

    report: RunReport
    start: float
    end: float


class DemoFailed(Exception):
    """The demo could not run; the message says why and what to do."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


def run_demo(options: DemoOptions, console: Console | None = None) -> int:
    """Run the demo and return the exit code (0: every scoped run answered within budget).

    Raises:
        DemoFailed: the database could not be started, reached or prepared, or refused,
            or it has fewer free connection slots than the budget.
    """
    console = console or Console()
    with _terminate_cleanly(), _database(options, console) as database:
        compare = options.compare if options.compare is not None else database.kind != "server"
        sampler = (
            BackendSampler(database.sampler_url, interval=SAMPLE_INTERVAL)
            if database.sampler_url
            else None
        )
        with sampler or contextlib.nullcontext():
            free = free_slots(database)  # with the sampler's own connection already open
            if free is not None and free < options.max_connections:
                raise DemoFailed(
                    f"the server has {free} free connection slots, fewer than the budget "
                    f"--max-connections {options.max_connections}: the scoped runs would be "
                    "refused too; lower --max-connections"
                    + (" or raise --server-max-connections" if database.kind == "embedded" else "")
                )
            _print_header(console, options, database, compare, free)
            naive, scoped = asyncio.run(_run(options, database, compare, sampler, console))
    return _report(
        console, options, database, free=free, naive=naive, scoped=scoped, sampler=sampler
    )


@contextlib.contextmanager
def _database(options: DemoOptions, console: Console) -> Iterator[DemoDatabase]:
    """The chosen database, with its errors turned into :class:`DemoFailed`."""
    from sqlalchemy.exc import SQLAlchemyError

    from langgraph_scoped_conn.errors import ConfigurationError
    from langgraph_scoped_conn.redaction import redact_url

    try:
        with _choose(options, console) as database:
            yield database
    except ConfigurationError as exc:
        raise DemoFailed(str(exc)) from None
    except (SQLAlchemyError, OSError) as exc:
        reason = (str(getattr(exc, "orig", None) or exc).strip().splitlines() or [""])[0]
        where = redact_url(options.database_url) if options.database_url else "the demo database"
        raise DemoFailed(
            f"cannot reach or prepare {where}: {redact_url(reason)}\n"
            "check --database-url, or leave it out to use the embedded PostgreSQL"
        ) from None


def _choose(
    options: DemoOptions, console: Console
) -> contextlib.AbstractContextManager[DemoDatabase]:
    if options.sqlite:
        return sqlite_database()
    if options.database_url:
        return existing_database(options.database_url, options.schema)
    missing = embedded_unavailable()
    if missing is not None:
        console.print(
            f"No embedded PostgreSQL here ({missing}): running on SQLite instead.",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
        return sqlite_database()
    return embedded_database(options.server_max_connections)


def _print_header(
    console: Console, options: DemoOptions, database: DemoDatabase, compare: bool, free: int | None
) -> None:
    modes = "the naive way, then the scoped way" if compare else "the scoped way"
    console.print(
        f"[bold]{options.executions}[/] concurrent SQL agent runs, {modes}, on {database.shown}.",
        highlight=False,
    )
    if free is not None:
        console.print(
            f"The server has {free} free connection slots for them; the scoped runs share "
            f"a budget of {options.max_connections}.",
            highlight=False,
        )
    if database.kind == "server" and not compare:
        console.print(
            "The naive runs are off on a server you named: they open a connection per run "
            "and could take every slot from its other clients. Add --compare to run them.",
            style="dim",
            highlight=False,
        )
    if database.kind == "sqlite" and compare:
        console.print(
            "SQLite has no connection limit: nothing refuses the naive runs here; "
            "compare the connections they open.",
            style="dim",
            highlight=False,
        )


async def _run(
    options: DemoOptions,
    database: DemoDatabase,
    compare: bool,
    sampler: BackendSampler | None,
    console: Console,
) -> tuple[_Phase | None, _Phase]:
    columns = (
        TextColumn("{task.description:<6}"),
        BarColumn(bar_width=24),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as progress:
        tasks = {
            mode: progress.add_task(mode, total=options.executions, status="")
            for mode in (("naive", "scoped") if compare else ("scoped",))
        }

        def show(report: RunReport) -> None:
            parts = []
            if sampler is not None:
                app = NAIVE_APPLICATION if report.mode == "naive" else SCOPED_APPLICATION
                parts.append(f"{sampler.latest(app):>3} backends")
            if report.too_many_clients:
                parts.append(f"{report.too_many_clients} refused")
            if report.failed - report.too_many_clients:
                parts.append(f"{report.failed - report.too_many_clients} failed")
            progress.update(tasks[report.mode], completed=report.finished, status=", ".join(parts))

        naive = None
        if compare:
            start = time.monotonic()
            report = await run_naive(
                database.url,
                options.executions,
                schema=database.schema,
                progress=show,
                leak_every=options.leak_every,
            )
            naive = _Phase(report, start, await _settled(sampler, NAIVE_APPLICATION))
        start = time.monotonic()
        report = await run_scoped(
            database.url,
            options.executions,
            max_connections=options.max_connections,
            strategy=options.strategy,
            schema=database.schema,
            progress=show,
            leak_every=options.leak_every,
        )
        scoped = _Phase(report, start, await _settled(sampler, SCOPED_APPLICATION))
    return naive, scoped


async def _settled(sampler: BackendSampler | None, application: str) -> float:
    """When the server has let go of every backend of ``application`` (monotonic seconds)."""
    if sampler is not None:
        await asyncio.to_thread(sampler.wait_until_gone, application)
    return time.monotonic()


def _report(
    console: Console,
    options: DemoOptions,
    database: DemoDatabase,
    *,
    free: int | None,
    naive: _Phase | None,
    scoped: _Phase,
    sampler: BackendSampler | None,
) -> int:
    phases = [p for p in (naive, scoped) if p is not None]
    series: list[Series] = []
    if sampler is not None:
        for phase in phases:
            app = NAIVE_APPLICATION if phase.report.mode == "naive" else SCOPED_APPLICATION
            refused = phase.report.too_many_clients
            s = series_of(
                sampler.between(phase.start, phase.end),
                app,
                phase.start,
                mode=phase.report.mode,
                label=mode_title(phase.report.mode, options.max_connections)
                + (f", {refused} runs refused" if refused else ""),
            )
            phase.report.peak_backends = s.peak
            series.append(s)
    reports = [p.report for p in phases]
    rows = rows_for(
        reports, is_postgres=database.is_postgres, free=free, leaks=options.leak_every > 0
    )
    console.print(summary_table(reports, rows, options.max_connections))
    console.print(legend(rows), style="dim", highlight=False)
    console.print()
    console.print(strategy_line(scoped.report, options.strategy), highlight=False)
    for report in reports:
        for error, runs in report.errors.items():
            console.print(
                f"{report.mode}: {runs} run(s) failed with: {error}", markup=False, highlight=False
            )
    console.print(verdict(naive.report if naive else None, scoped.report, options.max_connections))
    png = _draw(console, options, database, series, free=free, sampler=sampler)
    if options.report_json:
        _write_json(options, database, free=free, reports=reports, series=series, png=png)
    return _exit_code(options, scoped.report)


def _draw(
    console: Console,
    options: DemoOptions,
    database: DemoDatabase,
    series: list[Series],
    *,
    free: int | None,
    sampler: BackendSampler | None,
) -> Path | None:
    """The chart in the terminal, and as a PNG at ``--png`` when matplotlib is installed."""
    if not series:
        return None
    if sampler is not None and sampler.error is not None:
        console.print(f"(the sampler stopped early: {sampler.error})", style="dim")
    console.print()
    console.print(
        f"[bold]Server backends over time[/] (pg_stat_activity every "
        f"{SAMPLE_INTERVAL * 1000:.0f} ms; each mode timed from its first run)",
        highlight=False,
    )
    styles = {"naive": "red", "scoped": "green"}
    width = max(min(console.width - 24, 72), 20)
    lines = terminal_chart(series, limit=free, budget=options.max_connections, width=width)
    style = None
    for line in lines:
        style = next((styles[s.mode] for s in series if line.startswith(s.label)), style)
        console.print(line, style=style, markup=False, highlight=False)
    if options.png is None:
        return None
    try:
        from langgraph_scoped_conn.demo.chart import write_png

        title = (
            f"{options.executions} concurrent SQL agent runs on PostgreSQL "
            f"{database.server_version} (max_connections={database.max_connections})"
        )
        path = write_png(
            options.png, series, limit=free, budget=options.max_connections, title=title
        )
    except ImportError:
        console.print(
            f"To also save it as a PNG: {PLOT_MISSING}", style="dim", markup=False, highlight=False
        )
        return None
    console.print(f"Saved the chart as {path}", highlight=False)
    return path


def _write_json(
    options: DemoOptions,
    database: DemoDatabase,
    *,
    free: int | None,
    reports: list[RunReport],
    series: list[Series],
    png: Path | None,
) -> None:
    assert options.report_json is not None
    payload: dict[str, Any] = {
        "database": {
            "kind": database.kind,
            "shown": database.shown,
            "server_version": database.server_version,
            "max_connections": database.max_connections,
            "free_slots": free,
        },
        "budget": options.max_connections,
        "naive": None,
        "backends": {s.mode: [[round(t, 4), n] for t, n in s.points] for s in series},
        "png": str(png) if png else None,
    }
    for report in reports:
        payload[report.mode] = report.as_dict()
    options.report_json.parent.mkdir(parents=True, exist_ok=True)
    options.report_json.write_text(json.dumps(payload, indent=2, default=str), encoding="utf-8")


def _exit_code(options: DemoOptions, scoped: RunReport) -> int:
    if scoped.failed:
        print(
            f"error: {scoped.failed} scoped run(s) failed: {'; '.join(scoped.errors)}",
            file=sys.stderr,
        )
        return 1
    if scoped.peak_backends is not None and scoped.peak_backends > options.max_connections:
        print(
            f"error: the server saw {scoped.peak_backends} scoped connections at once, "
            f"above the budget of {options.max_connections}",
            file=sys.stderr,
        )
        return 1
    return 0


@contextlib.contextmanager
def _terminate_cleanly() -> Iterator[None]:
    """Handle SIGTERM as Ctrl-C, whose unwinding removes the server; exit 143 after it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    terminated: list[int] = []

    def stop(signum: int, frame: FrameType | None) -> None:
        terminated.append(signum)
        signal.raise_signal(signal.SIGINT)  # asyncio.run cancels its tasks for SIGINT

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    except KeyboardInterrupt:
        if terminated:
            raise DemoFailed(
                "terminated; the demo's server and connections were cleaned up", 128 + terminated[0]
            ) from None
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
