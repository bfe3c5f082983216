"""Command line: ``python -m langgraph_scoped_conn demo`` (also ``langgraph-scoped-conn demo``).

The demo runs N concurrent executions of the example SQL agent through one scoped
budget pool, on the embedded SQLite sample or on ``--database-url``/``DATABASE_URL``,
then prints a table and the stats JSON.  ``--compare`` also runs the naive way
(``SQLDatabase.from_uri`` per tool call, never disposed) and shows the difference.
Needs the ``demo`` extra (rich).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["main"]

_RICH_MISSING = (
    "the demo needs rich for its progress bar and tables; install it with:\n"
    "    pip install 'langgraph-scoped-conn[demo]'"
)
_MAX_EXECUTIONS = 10_000


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command != "demo":
        parser.print_help(sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    return _demo(args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="langgraph-scoped-conn",
        description="Execution-scoped database connections for LangGraph.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="run N concurrent SQL agent executions and show what the connections did",
        description=(
            "Run N concurrent executions of the example SQL agent (offline scripted model) "
            "through one scoped connection budget, then print a table and the stats JSON. "
            "The database is the embedded SQLite sample unless --database-url or "
            "DATABASE_URL names one; the sample store/sales tables are loaded if missing."
        ),
    )
    demo.add_argument(
        "-n",
        "--executions",
        type=_bounded_int("--executions", 1, _MAX_EXECUTIONS),
        default=50,
        help="concurrent executions to run (default 50)",
    )
    demo.add_argument(
        "--database-url",
        default=None,
        help="SQLAlchemy URL to run against (default: DATABASE_URL, else the SQLite sample)",
    )
    demo.add_argument(
        "--max-connections",
        type=_bounded_int("--max-connections", 1, 1000),
        default=5,
        help="the connection budget the scoped executions share (default 5)",
    )
    demo.add_argument(
        "--compare",
        action="store_true",
        help="also run the naive way (SQLDatabase.from_uri per tool call) and compare",
    )
    demo.add_argument(
        "--leak-every",
        metavar="K",
        type=_bounded_int("--leak-every", 0, _MAX_EXECUTIONS),
        default=0,
        help=(
            "make every K-th execution's query tool check out a connection and never return "
            "it, to show leaks being reclaimed (default 0: no leaks)"
        ),
    )
    demo.add_argument(
        "--report-json",
        metavar="PATH",
        default=None,
        help="also write both reports (and the stats) as JSON to PATH",
    )
    demo.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    return parser


def _bounded_int(name: str, low: int, high: int) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{name} must be a whole number, got {text!r}"
            ) from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(
                f"{name} must be between {low} and {high}, got {value}"
            )
        return value

    return parse


def _fail(message: str, code: int = 2) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def _demo(args: argparse.Namespace) -> int:
    try:
        from rich.console import Console
    except ImportError:
        return _fail(_RICH_MISSING, 1)

    from sqlalchemy.exc import SQLAlchemyError

    from langgraph_scoped_conn.demo.data import ensure_sample_database
    from langgraph_scoped_conn.errors import ConfigurationError
    from langgraph_scoped_conn.redaction import redact_url

    requested = args.database_url or os.environ.get("DATABASE_URL") or None
    shown = redact_url(requested) if requested else "the embedded SQLite sample"
    try:
        url = ensure_sample_database(requested)
    except ConfigurationError as exc:
        return _fail(str(exc))
    except (SQLAlchemyError, OSError) as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        return _fail(
            f"cannot reach or prepare the database {shown}: {redact_url(reason)}\n"
            "check --database-url (or DATABASE_URL), or leave it unset to use the SQLite sample"
        )

    console = Console()
    if not requested:
        shown = f"the embedded SQLite sample ({url.removeprefix('sqlite:///')})"
    console.print(
        f"Running [bold]{args.executions}[/] concurrent SQL agent executions on {shown}, "
        f"budget max_connections={args.max_connections}"
    )
    try:
        scoped, naive = asyncio.run(_run(args, url, console))
    except KeyboardInterrupt:
        return _fail("interrupted; every connection was released", 130)

    _print_table(console, scoped, naive, args.max_connections)
    print("Stats of the scoped run (get_connection_stats()):")
    print(json.dumps(scoped.stats, indent=2, sort_keys=True, default=str))
    if args.report_json:
        reports = {"scoped": scoped.as_dict(), "naive": naive.as_dict() if naive else None}
        with open(args.report_json, "w", encoding="utf-8") as f:
            json.dump(reports, f, indent=2, default=str)
    if scoped.failed:
        return _fail(
            f"{scoped.failed} scoped execution(s) failed: {'; '.join(scoped.errors)}", code=1
        )
    return 0


async def _run(args: argparse.Namespace, url: str, console: Any) -> tuple[Any, Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from langgraph_scoped_conn.demo.runner import run_naive, run_scoped

    columns = ("{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("scoped executions", total=args.executions)
        scoped = await run_scoped(
            url,
            args.executions,
            max_connections=args.max_connections,
            progress=lambda done, _total: progress.update(task, completed=done),
            leak_every=args.leak_every,
        )
        naive = None
        if args.compare:
            naive_task = progress.add_task("naive executions ", total=args.executions)
            naive = await run_naive(
                url,
                args.executions,
                progress=lambda done, _total: progress.update(naive_task, completed=done),
                leak_every=args.leak_every,
            )
    return scoped, naive


def _print_table(console: Any, scoped: Any, naive: Any, budget: int) -> None:
    from rich.table import Table

    table = Table(title="Connections per mode")
    table.add_column("measure")
    table.add_column("scoped", justify="right")
    if naive is not None:
        table.add_column("naive (from_uri per call)", justify="right")
    from langgraph_scoped_conn.demo.runner import ROWS

    for label, key in ROWS:
        row = [label, str(getattr(scoped, key))]
        if naive is not None:
            row.append(str(getattr(naive, key)))
        table.add_row(*row)
    console.print(table)
    if naive is None:
        return
    for error in naive.errors[:3]:
        console.print(f"naive error: {error}", markup=False, highlight=False)
    if naive.too_many_clients:
        console.print(
            f"The naive run failed {naive.too_many_clients} execution(s) with 'too many clients'; "
            f"the scoped run never held more than {scoped.peak_connections} connection(s) "
            f"(budget {budget})."
        )
    else:
        console.print(
            f"The naive run opened {naive.connections_opened} connection(s) and left "
            f"{naive.open_after_runs} open; the scoped run opened {scoped.connections_opened}."
        )


if __name__ == "__main__":
    sys.exit(main())
