"""What every benchmark shares: the server, the sampling, machine facts, the command line, output.

A benchmark starts its own PostgreSQL with :func:`bench_server` (the support package
``langgraph_scoped_conn.testing``; a non-superuser role ``app`` for the code under test,
so the superuser-reserved slots stay free for the samplers), measures, and ends with
:func:`finish`, which prints its tables and figures (both defined in ``figures.py``)
and writes ``results/<name>.json``.
Run a benchmark from the repository root as a module, ``python -m benchmarks.bench_storm``:
the package is then imported from this checkout, never from an installed copy.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import psycopg2
from langchain_core.callbacks import BaseCallbackHandler
from rich.console import Console
from rich.table import Table

from benchmarks.figures import Column, figures, fmt, tables
from langgraph_scoped_conn.testing import (
    SAMPLE_SQL,
    SUPERUSER,
    SUPERUSER_PASSWORD,
    BackendSampler,
    PostgresCluster,
    count_backends,
    find_binaries,
)

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"
APP_USER = "app"
APP_PASSWORD = "bench-App-pw-9f3c"  # a throwaway cluster's password; never printed
BENCH_DB = "bench"
#: names the user on every log line, so ServerStatementLog can pick the app's statements
LOG_LINE_PREFIX = "%m [%p] user=%u "

console = Console(width=None if sys.stdout.isatty() else 180)


# -- the server ----------------------------------------------------------------------------


@dataclass
class BenchServer:
    """A running cluster with the ``bench`` database and the ``app`` role."""

    cluster: PostgresCluster

    def url(self, driver: str = "psycopg2") -> str:
        """The app role's URL (it holds the password: never print it)."""
        return self.cluster.url(BENCH_DB, user=APP_USER, password=APP_PASSWORD, driver=driver)

    def conninfo(self, application_name: str = "lsc-bench") -> str:
        """The app role's libpq conninfo (it holds the password)."""
        return (
            f"host=127.0.0.1 port={self.cluster.port} user={APP_USER} password={APP_PASSWORD} "
            f"dbname={BENCH_DB} application_name={application_name}"
        )

    def admin(self) -> Any:
        """A superuser connection in autocommit (it takes a reserved slot)."""
        conn = psycopg2.connect(
            host="127.0.0.1",
            port=self.cluster.port,
            user=SUPERUSER,
            password=SUPERUSER_PASSWORD,
            dbname="postgres",
            application_name="lsc-bench-admin",
        )
        conn.autocommit = True
        return conn

    def app_backends(self) -> int:
        """The app role's client backends right now."""
        conn = self.admin()
        try:
            return count_backends(conn, user=APP_USER)
        finally:
            conn.close()

    def wait_app_backends(self, at_most: int = 0, timeout: float = 15.0) -> int:
        """Wait until at most ``at_most`` app backends remain (closing takes a moment)."""
        deadline = time.monotonic() + timeout
        while (n := self.app_backends()) > at_most and time.monotonic() < deadline:
            time.sleep(0.05)
        return n

    def backend_sampler(self, interval: float = 0.005) -> BackendSampler:
        """A sampler of the app role's backends over a superuser connection (a reserved slot),
        open until its ``close()``."""
        return BackendSampler(self.admin, user=APP_USER, interval=interval).open()


@contextlib.contextmanager
def bench_server(max_connections: int = 100) -> Iterator[BenchServer]:
    """A throwaway cluster with the sample schema owned by ``app``; destroyed afterwards."""
    conf = {"log_line_prefix": f"'{LOG_LINE_PREFIX}'"}
    with PostgresCluster.running(max_connections=max_connections, extra_conf=conf) as c:
        c.psql(f"create role {APP_USER} login password '{APP_PASSWORD}'")
        c.psql(f"create database {BENCH_DB} owner {APP_USER}")
        c.psql(f"set role {APP_USER}; {SAMPLE_SQL}", database=BENCH_DB)
        yield BenchServer(c)


class Sampler:
    """Calls ``read()`` every ``interval`` seconds on its own thread inside a ``with`` block.

    What the support package's ``BackendSampler`` does for backends, for any other value
    (an executor's queue, this process's RSS); ``cpu_seconds`` is the thread's own CPU.
    """

    def __init__(self, read: Callable[[], float], interval: float = 0.005) -> None:
        self.read = read
        self.interval = interval
        self.samples: list[float] = []
        self.cpu_seconds = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Sampler:
        self.samples, self.cpu_seconds = [], 0.0
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        t0 = time.thread_time()
        while not self._stop.is_set():
            self.samples.append(self.read())
            self._stop.wait(self.interval)
        self.cpu_seconds = time.thread_time() - t0

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    @property
    def peak(self) -> float:
        return max(self.samples, default=0)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.samples) if self.samples else 0.0


# -- round trips, from the server's statement log ----------------------------------------

#: a log entry starts with log_line_prefix's timestamp; the lines up to the next are its rest
_LOG_ENTRY = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", re.MULTILINE)
#: a simple query ("statement: ...") or an extended one's execute (psycopg 3)
_STATEMENT = re.compile(r"user=(\S*) LOG:  (?:statement|execute [^:]*): (.*)", re.DOTALL)


class ServerStatementLog:
    """Counts the statements the app role sends (psycopg2: its round trips), from the server log.

    ``enable()`` makes the app role's *new* sessions log every statement: make the
    engines and managers to count after it.  Each ``with log:`` block counts what the
    app sent between entry and exit; the exit sends a marker statement on a new
    connection and reads the log up to it, so nothing is left to timing.
    """

    def __init__(self, server: BenchServer, timeout: float = 30.0) -> None:
        self.server = server
        self.timeout = timeout
        self._start = 0
        self.counts: Counter[str] = Counter()

    def enable(self) -> None:
        self._alter("set log_statement = 'all'")

    def disable(self) -> None:
        self._alter("reset log_statement")

    def _alter(self, what: str) -> None:
        conn = self.server.admin()
        try:
            with conn.cursor() as cur:
                cur.execute(f"alter role {APP_USER} {what}")
        finally:
            conn.close()

    def __enter__(self) -> ServerStatementLog:
        self.counts = Counter()
        self._start = self.server.cluster.logfile.stat().st_size
        return self

    def __exit__(self, *exc: object) -> None:
        marker = f"lsc-marker-{uuid.uuid4().hex}"
        conn = psycopg2.connect(self.server.conninfo("lsc-bench-marker"))
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(f"select '{marker}'")
        finally:
            conn.close()
        text = self._read_until(f"select '{marker}'".encode())
        starts = [m.start() for m in _LOG_ENTRY.finditer(text)]
        for a, b in zip(starts, [*starts[1:], len(text)], strict=True):
            m = _STATEMENT.search(text[a:b])
            if m and m.group(1) == APP_USER:
                self.counts[" ".join(m.group(2).split())] += 1

    def _read_until(self, needle: bytes) -> str:
        deadline = time.monotonic() + self.timeout
        with self.server.cluster.logfile.open("rb") as f:
            f.seek(self._start)
            data = b""
            while (at := data.find(needle)) < 0:
                if time.monotonic() > deadline:
                    raise RuntimeError("the marker statement never reached the server log")
                time.sleep(0.01)
                data += f.read()
            return data[: data.rfind(b"\n", 0, at) + 1].decode("utf-8", "replace")

    def total(self) -> int:
        return sum(self.counts.values())


# -- what the benchmarks compare ----------------------------------------------------------


def from_uri(url: str) -> Any:
    """``SQLDatabase.from_uri(url)``, exactly as the tutorial makes it (sunset notice silenced)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from langchain_community.utilities.sql_database import SQLDatabase

        return SQLDatabase.from_uri(url)


class NoopHandler(BaseCallbackHandler):
    """A callback handler that does nothing, dispatched like the package's: the callback floor."""

    run_inline = True
    ignore_chain = False
    ignore_retriever = False
    ignore_agent = False
    ignore_llm = True
    ignore_chat_model = True
    ignore_retry = True
    ignore_custom_event = True


# -- measuring ----------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else 0.0


def percentile(values: Sequence[float], p: float) -> float:
    """The ``p``-th percentile (0-100), linearly interpolated; 0.0 for no values."""
    if not values:
        return 0.0
    s = sorted(values)
    k = (len(s) - 1) * p / 100
    lo = int(k)
    return s[lo] + (s[min(lo + 1, len(s) - 1)] - s[lo]) * (k - lo)


def rss_mb() -> float:
    """This process's resident set size in MB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def full_gc() -> None:
    for _ in range(3):
        gc.collect()


def error_text(exc: BaseException, limit: int = 160) -> str:
    """A short, password-free line for grouping failures."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split()).replace(APP_PASSWORD, "***")
    return re.sub(r"\(Background on this error at: [^)]*\)", "", text)[:limit]


# -- machine facts -------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    """Date, CPU, RAM, load, the code's commit and the versions that matter."""
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "unknown",
    )
    mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    server = find_binaries()
    versions = {"python": platform.python_version()}
    for dist in (
        "langgraph",
        "langchain-core",
        "langchain-community",
        "sqlalchemy",
        "psycopg2-binary",
        "psycopg",
    ):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[dist] = metadata.version(dist)
    return {
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "code": code_version(),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "ram_gb": round(mem_kb / 1024 / 1024, 1),
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
        "versions": versions | {"postgresql": f"{server.version} ({server.source})"},
    }


def code_version() -> str:
    """The commit of the package this process imports (``+dirty`` if it is edited)."""
    import langgraph_scoped_conn

    package = Path(langgraph_scoped_conn.__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(package), *args], capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        # the support package is not measured (compare_commits.py copies it into old commits)
        dirty = git("status", "--porcelain", ".", ":!testing")
        commit = git("rev-parse", "--short", "HEAD")
    except (OSError, subprocess.CalledProcessError):
        return f"unknown ({package})"
    return f"{commit}{'+dirty' if dirty else ''} ({package.parent})"


# -- the command line and the result --------------------------------------------------------


def arguments(
    doc: str | None, sizes: dict[str, tuple[float, float, str]]
) -> argparse.ArgumentParser:
    """A parser with ``--<size>`` per entry (full value, ``--quick`` value, help), ``--quick``,
    ``--out`` and ``--results``; :func:`parse` fills in the sizes."""
    parser = argparse.ArgumentParser(
        description=(doc or "").split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    for name, (full, quick, text) in sizes.items():
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            type=type(full),
            default=None,
            help=f"{text} ({full:g}; --quick: {quick:g})",
        )
    parser.add_argument(
        "--quick", action="store_true", help="small sizes, results in results/quick"
    )
    parser.add_argument("--out", default="", help="result file name (default: the benchmark's)")
    parser.add_argument("--results", default="", help="result directory (default: results/)")
    parser.set_defaults(_sizes=sizes)
    return parser


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse ``argv``; a size not given takes its full value, or its quick one with ``--quick``."""
    args = parser.parse_args(argv)
    for name, (full, quick, _) in args._sizes.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    del args._sizes
    return args


def results_dir(args: argparse.Namespace) -> Path:
    if args.results:
        return Path(args.results)
    return RESULTS_DIR / "quick" if args.quick else RESULTS_DIR


def table(title: str, columns: Sequence[Column | str], rows: Sequence[Any]) -> Table:
    """A rich table: ``columns`` are figures' Columns over dict rows, or headers over tuples."""
    t = Table(title=title, title_justify="left")
    for i, col in enumerate(columns):
        header = col.header if isinstance(col, Column) else col
        t.add_column(header, justify="left" if i == 0 else "right", overflow="fold")
    for row in rows:
        cells = [row.get(c.key) for c in columns] if isinstance(row, dict) else row
        t.add_row(*(fmt(x) for x in cells))
    return t


def finish(
    name: str, args: argparse.Namespace, machine: dict[str, Any], result: dict[str, Any]
) -> int:
    """Print the benchmark's tables and figures, write its result file; 3 if a target missed."""
    result = {"benchmark": name, "machine": machine, "params": vars(args), **result}
    for title, columns, rows in tables(name, result):
        console.print(table(f"{title} ({machine['code']})", columns, rows))
    rows, missed = [], 0
    for f in figures(name):
        value = f.value(result)
        holds = f.holds(value)
        missed += holds is False
        verdict = {None: "", True: "[green]holds[/green]", False: "[red]MISSED[/red]"}[holds]
        rows.append((f.label, f.target or "-", value, verdict))
    console.print(table(f"{name}: figures", ["figure", "target", "measured", "verdict"], rows))
    out = results_dir(args) / f"{args.out or name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    console.print(f"[dim]wrote {out}[/dim]")
    return 3 if missed else 0
