"""Command line: ``python -m langgraph_scoped_conn demo`` (also ``langgraph-scoped-conn demo``).

The demo starts an embedded PostgreSQL with a low ``max_connections`` and runs N
concurrent executions of the example SQL agent twice: the naive way (an engine per
run), which the server refuses with ``too many clients already``, and the scoped way
(one pool under a budget), which finishes every run.  It shows a progress bar, a
table with a legend and the server's backends over time (see
:mod:`langgraph_scoped_conn.demo.command`).  Needs the ``demo`` extra (rich); the PNG
needs the ``plot`` extra (matplotlib).  This module only parses the command line.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main"]

_RICH_MISSING = (
    "the demo needs rich for its progress bar and table; install it with:\n"
    "    pip install 'langgraph-scoped-conn[demo]'\n"
    "(from a clone of the repository: pip install '.[demo]')"
)
_MAX_EXECUTIONS = 10_000
_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_STRATEGIES = ("auto", "shared", "pooler")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command != "demo":
        parser.print_help(sys.stderr)
        return 2
    problem = _conflict(args)
    if problem:
        return _fail(problem)
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
        help="run N concurrent SQL agent runs the naive way and the scoped way, side by side",
        description=(
            "Start an embedded PostgreSQL with a low max_connections, run N concurrent "
            "executions of the example SQL agent (offline scripted model) the naive way (an "
            "engine per run) and the scoped way (one pool under a budget), and show what the "
            "server saw: a table and its backends over time. The server and its directory "
            "are removed at the end."
        ),
    )
    demo.add_argument(
        "-n",
        "--executions",
        type=_bounded_int("--executions", 1, _MAX_EXECUTIONS),
        metavar="N",
        default=50,
        help="concurrent runs per mode (default 50)",
    )
    demo.add_argument(
        "--max-connections",
        type=_bounded_int("--max-connections", 1, 1000),
        metavar="N",
        default=5,
        help="the connection budget the scoped runs share (default 5)",
    )
    demo.add_argument(
        "--server-max-connections",
        type=_bounded_int("--server-max-connections", 5, 1000),
        default=None,
        metavar="N",
        help="max_connections of the embedded PostgreSQL (default 20; the sampler takes one)",
    )
    where = demo.add_mutually_exclusive_group()
    where.add_argument(
        "--sqlite",
        action="store_true",
        help="run on the SQLite sample instead (no server, so no connection limit to hit)",
    )
    where.add_argument(
        "--database-url",
        metavar="URL",
        default=None,
        help=(
            "run on this PostgreSQL instead (DATABASE_URL is not read). The demo refuses a "
            "schema holding tables it did not create; see --schema. The naive runs are off "
            "there unless --compare"
        ),
    )
    demo.add_argument(
        "--schema",
        metavar="NAME",
        type=_schema_name,
        default=None,
        help=(
            "with --database-url: load the sample into this schema; one the demo creates (or "
            "created before) is dropped at the end"
        ),
    )
    demo.add_argument(
        "--compare",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=(
            "also run the naive way before the scoped way (default: on, except with --database-url)"
        ),
    )
    demo.add_argument(
        "--strategy",
        choices=_STRATEGIES,
        default="auto",
        help="the scoped pool's strategy (default auto: picked from the URL's host and port)",
    )
    demo.add_argument(
        "--leak-every",
        metavar="K",
        type=_bounded_int("--leak-every", 0, _MAX_EXECUTIONS),
        default=0,
        help=(
            "make every K-th run's query tool check out a connection and never return it, "
            "to show the scope reclaiming it (default 0: no leaks)"
        ),
    )
    demo.add_argument(
        "--png",
        metavar="PATH",
        type=Path,
        default=None,
        help=(
            "where to save the chart (needs the plot extra; default demo-backends.png in the "
            "cache directory, $LSC_CACHE_DIR or ~/.cache/langgraph_scoped_conn)"
        ),
    )
    demo.add_argument(
        "--report-json",
        metavar="PATH",
        type=Path,
        default=None,
        help="also write the reports, the stats and the sampled backends as JSON to PATH",
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


def _schema_name(text: str) -> str:
    if not _SCHEMA_NAME.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"--schema must be a lowercase SQL name (letters, digits, _; at most 63), got {text!r}"
        )
    if text.startswith("pg_") or text in ("public", "information_schema"):
        raise argparse.ArgumentTypeError(
            f"--schema {text!r} is not the demo's to create or drop; pick a new name"
        )
    return text


def _conflict(args: argparse.Namespace) -> str | None:
    if args.schema and not args.database_url:
        return "--schema goes with --database-url (the embedded server is the demo's own)"
    if args.server_max_connections is not None and (args.sqlite or args.database_url):
        return "--server-max-connections sets the embedded server; it does not apply here"
    return None


def _fail(message: str, code: int = 2) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def _demo(args: argparse.Namespace) -> int:
    try:
        import rich  # noqa: F401
    except ImportError:
        return _fail(_RICH_MISSING, 1)

    from langgraph_scoped_conn.demo.command import DemoFailed, DemoOptions, run_demo
    from langgraph_scoped_conn.demo.data import default_sample_path

    options = DemoOptions(
        executions=args.executions,
        max_connections=args.max_connections,
        server_max_connections=args.server_max_connections or 20,
        database_url=args.database_url,
        schema=args.schema,
        sqlite=args.sqlite,
        compare=args.compare,
        strategy=args.strategy,
        leak_every=args.leak_every,
        report_json=args.report_json,
        png=args.png or default_sample_path().parent / "demo-backends.png",
    )
    try:
        return run_demo(options)
    except DemoFailed as exc:
        return _fail(str(exc), exc.code)
    except KeyboardInterrupt:
        return _fail("interrupted; the demo's server and connections were cleaned up", 130)


if __name__ == "__main__":
    sys.exit(main())
