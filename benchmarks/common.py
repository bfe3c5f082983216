"""Shared plumbing of the benchmarks: a throwaway PostgreSQL, machine facts, sampling, output.

Every benchmark starts its own PostgreSQL (``langgraph_scoped_conn.testing``) on a free loopback
port, creates a non-superuser role ``app`` for the code under test (so the server's
``superuser_reserved_connections`` stay free for the backend sampler), prints rich
tables and writes one JSON file into ``benchmarks/results/``.
"""

from __future__ import annotations

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
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from langchain_core.callbacks import BaseCallbackHandler

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import psycopg2  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from langgraph_scoped_conn.testing import (  # noqa: E402
    SAMPLE_SQL,
    SUPERUSER,
    SUPERUSER_PASSWORD,
    BackendSampler,
    PostgresCluster,
    count_backends,
)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
APP_USER = "app"
APP_PASSWORD = "bench-App-pw-9f3c"  # a throwaway cluster's password; never printed
BENCH_DB = "bench"
#: every benchmark server's log_line_prefix: names the user, so ServerStatementLog can
#: pick out the app role's statements
LOG_LINE_PREFIX = "%m [%p] user=%u "

console = Console(width=None if sys.stdout.isatty() else 160)


# -- the server ------------------------------------------------------------------------


@dataclass
class BenchServer:
    """A running cluster with the ``bench`` database and the ``app`` role."""

    cluster: PostgresCluster

    def url(self, driver: str = "psycopg2") -> str:
        """The app role's URL (contains the password: never print it, use ``safe_url``)."""
        return self.cluster.url(BENCH_DB, user=APP_USER, password=APP_PASSWORD, driver=driver)

    @property
    def safe_url(self) -> str:
        return self.cluster.url(BENCH_DB, user=APP_USER, password="***")

    def conninfo(self, application_name: str = "lsc-bench") -> str:
        """The app role's libpq conninfo, for psycopg 2 or 3 (contains the password)."""
        return (
            f"host=127.0.0.1 port={self.cluster.port} user={APP_USER} "
            f"password={APP_PASSWORD} dbname={BENCH_DB} application_name={application_name}"
        )

    def admin(self) -> Any:
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
        """Client backends of the app role right now."""
        conn = self.admin()
        try:
            return count_backends(conn, user=APP_USER)
        finally:
            conn.close()

    def wait_app_backends(self, at_most: int = 0, timeout: float = 15.0) -> int:
        """Wait until at most ``at_most`` app backends remain (closing ones take a moment)."""
        deadline = time.monotonic() + timeout
        n = self.app_backends()
        while n > at_most and time.monotonic() < deadline:
            time.sleep(0.05)
            n = self.app_backends()
        return n

    def server_version(self) -> str:
        return self.cluster.psql("show server_version")


@contextlib.contextmanager
def bench_server(max_connections: int = 100, **extra_conf: str) -> Iterator[BenchServer]:
    """Start a throwaway cluster with the sample schema and an ``app`` role; destroy it after."""
    extra_conf.setdefault("log_line_prefix", f"'{LOG_LINE_PREFIX}'")
    with PostgresCluster.running(max_connections=max_connections, extra_conf=extra_conf) as c:
        c.psql(f"create role {APP_USER} login password '{APP_PASSWORD}'")
        c.psql(f"create database {BENCH_DB} owner {APP_USER}")
        c.psql(f"set role {APP_USER}; {SAMPLE_SQL}", database=BENCH_DB)
        yield BenchServer(c)


#: a log entry starts with log_line_prefix's timestamp; the lines after it until the next
#: one are the rest of a multi-line statement
_LOG_ENTRY = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", re.MULTILINE)
#: a simple query ("statement: ...") or an extended one's execute ("execute <unnamed>: ...",
#: psycopg 3), each one statement the client sent and waited for
_STATEMENT = re.compile(r"user=(\S*) LOG:  (?:statement|execute [^:]*): (.*)", re.DOTALL)


class ServerStatementLog:
    """Counts the statements (= round trips for psycopg2's simple queries) the app role sends,
    read from the server log.

    ``enable()`` makes the app role's *new* sessions log every statement
    (``log_statement = 'all'``): create the engines, managers or pools to be counted after
    it.  Each ``with log:`` block counts what the app role sent between its entry and its
    exit.  There is no sleeping on timing: the exit sends a marker statement
    (``select 'lsc-marker-<uuid>'``) on a new app-role connection and reads the log until
    the marker's line is there.  A backend writes a statement's log line before it runs
    it, so every statement answered before the exit is logged before the marker; only
    work still running on other threads at the exit may land after it.  The marker's
    connection is one more app backend for a moment, after the measured block.

    psycopg2 sends every statement, ``BEGIN`` and ``COMMIT`` included, as one simple query,
    so its statements are its round trips; psycopg 3's extended-protocol statements are
    logged as ``execute`` lines and counted the same way.
    """

    def __init__(self, server: BenchServer, timeout: float = 30.0) -> None:
        self.server = server
        self.timeout = timeout
        self._start = 0
        self._counts: Counter[str] = Counter()

    # -- logging on and off for the app role's new sessions

    def enable(self) -> None:
        """``ALTER ROLE app SET log_statement = 'all'`` (new sessions only)."""
        self._alter("set log_statement = 'all'")

    def disable(self) -> None:
        """``ALTER ROLE app RESET log_statement``."""
        self._alter("reset log_statement")

    def _alter(self, what: str) -> None:
        conn = self.server.admin()
        try:
            with conn.cursor() as cur:
                cur.execute("show log_line_prefix")
                prefix = cur.fetchone()[0]
                if "user=%u " not in prefix:
                    raise RuntimeError(
                        f"log_line_prefix {prefix!r} does not name the user as 'user=%u ': "
                        "start the server with common.bench_server()"
                    )
                cur.execute(f"alter role {APP_USER} {what}")
        finally:
            conn.close()

    # -- one counted block

    def __enter__(self) -> ServerStatementLog:
        self._counts = Counter()
        self._start = self.server.cluster.logfile.stat().st_size
        return self

    def __exit__(self, *exc: object) -> None:
        marker = f"lsc-marker-{uuid.uuid4().hex}"
        self._send_marker(marker)
        text = self._read_until(marker)
        counts: Counter[str] = Counter()
        for entry in _entries(text):
            m = _STATEMENT.search(entry)
            if m and m.group(1) == APP_USER:
                counts[" ".join(m.group(2).split())] += 1
        self._counts = counts

    def _send_marker(self, marker: str) -> None:
        conn = psycopg2.connect(self.server.conninfo("lsc-bench-marker"))
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(f"select '{marker}'")
                cur.fetchall()
        finally:
            conn.close()

    def _read_until(self, marker: str) -> str:
        """The log from the entry position up to (not including) the marker's entry."""
        needle = f"select '{marker}'".encode()
        deadline = time.monotonic() + self.timeout
        with self.server.cluster.logfile.open("rb") as f:
            f.seek(self._start)
            data = b""
            while True:
                data += f.read()
                at = data.find(needle)
                if at >= 0:
                    line_start = data.rfind(b"\n", 0, at) + 1
                    return data[:line_start].decode("utf-8", "replace")
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"the marker statement did not reach the server log "
                        f"{self.server.cluster.logfile} within {self.timeout:g} s "
                        "(was enable() called before the marker's session?)"
                    )
                time.sleep(0.01)

    def counts(self) -> Counter[str]:
        """Normalised statement text -> times the app role sent it in the last block."""
        return Counter(self._counts)

    def total(self) -> int:
        """All statements the app role sent in the last block."""
        return sum(self._counts.values())


def _entries(text: str) -> list[str]:
    """Split log text into entries (a line with the prefix and its continuation lines)."""
    starts = [m.start() for m in _LOG_ENTRY.finditer(text)]
    return [text[a:b] for a, b in zip(starts, [*starts[1:], len(text)], strict=True)]


def backend_sampler(server: BenchServer, interval: float = 0.005) -> BackendSampler:
    """Samples the app role's backend count from pg_stat_activity on its own thread.

    The sampler connects as the superuser, so it uses a reserved slot and never
    competes with the code under test for the app's connection slots.  It connects
    now and keeps its connection for every ``with sampler:`` block until ``close()``.
    """
    return BackendSampler(server.admin, user=APP_USER, interval=interval).open()


# -- the unscoped anchors ---------------------------------------------------------------

#: the package's pool settings on a PostgreSQL engine, for the unscoped global anchors
PACKAGE_POOL_SETTINGS: dict[str, Any] = {
    "pool_size": 5,
    "pool_pre_ping": True,
    "pool_recycle": 1800,
}


def sql_database_class() -> Any:
    """langchain_community's ``SQLDatabase``, its import-time sunset notice silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from langchain_community.utilities.sql_database import SQLDatabase
    return SQLDatabase


def global_sql_database(url: str, **engine_kwargs: Any) -> tuple[Any, Any]:
    """(engine, SQLDatabase over it): the unscoped global database the package replaces.

    ``engine_kwargs`` go to ``create_engine`` (``**PACKAGE_POOL_SETTINGS`` for the
    package's pool settings; none for SQLAlchemy's defaults).
    """
    from sqlalchemy import create_engine

    engine = create_engine(url, **engine_kwargs)
    cls = sql_database_class()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return engine, cls(engine)


# -- machine, versions, output -----------------------------------------------------------


def machine_info() -> dict[str, Any]:
    """Date, machine (nproc, CPU model, RAM) and the versions that matter."""
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    ram_gb = 0.0
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                ram_gb = round(int(line.split()[1]) / 1024 / 1024, 1)
                break
    versions = {"python": platform.python_version()}
    for dist in (
        "langgraph-scoped-conn",
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
        "ram_gb": ram_gb,
        "platform": platform.platform(),
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
        "versions": versions,
    }


def code_version() -> str:
    """The commit of the checkout whose package this process imports (``+dirty`` if edited)."""
    import langgraph_scoped_conn

    package = Path(langgraph_scoped_conn.__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(package), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(package), "status", "--porcelain", "--", "."],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return f"unknown ({package})"
    return f"{commit}{'+dirty' if dirty else ''} ({package.parent})"


def write_result(name: str, payload: dict[str, Any]) -> Path:
    """Write ``payload`` to ``benchmarks/results/<name>.json`` and return the path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")
    tmp.replace(path)
    console.print(f"[dim]wrote {path.relative_to(REPO_ROOT)}[/dim]")
    return path


def print_machine(info: dict[str, Any]) -> None:
    v = info["versions"]
    console.print(
        f"[bold]{info['date']}[/bold]  {info['nproc']} CPU ({info['cpu']}), "
        f"{info['ram_gb']} GB RAM, load {info['load_avg_at_start']}, code {info['code']}\n"
        + ", ".join(f"{k} {val}" for k, val in v.items())
    )


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> Table:
    t = Table(title=title, title_justify="left")
    for i, col in enumerate(columns):
        t.add_column(col, justify="left" if i == 0 else "right", overflow="fold")
    for row in rows:
        t.add_row(*(fmt(x) for x in row))
    return t


def fmt(x: Any) -> str:
    if isinstance(x, float):
        if x == 0:
            return "0"
        if abs(x) >= 100:
            return f"{x:,.0f}"
        if abs(x) >= 10:
            return f"{x:.1f}"
        return f"{x:.3g}" if abs(x) < 1 else f"{x:.2f}"
    return str(x)


def percentile(values: Sequence[float], p: float) -> float:
    """The ``p``-th percentile (0-100) by linear interpolation; 0.0 for no values."""
    if not values:
        return 0.0
    s = sorted(values)
    k = (len(s) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else 0.0


def summarize_us(values: Sequence[float]) -> dict[str, Any]:
    """n, median, p10, p90 and p99 of microsecond samples, rounded to 0.1 us."""
    return {
        "n": len(values),
        "median_us": round(median(values), 1),
        "p10_us": round(percentile(values, 10), 1),
        "p90_us": round(percentile(values, 90), 1),
        "p99_us": round(percentile(values, 99), 1),
    }


_BACKGROUND = re.compile(r"\s*\(Background on this error at: [^)]*\)")
_PASSWORDS = re.compile(r"(://[^:/@\s]*:)[^@\s]*@")


def error_text(exc: BaseException, limit: int = 160) -> str:
    """A short one-line, password-free description of ``exc`` for grouping failures."""
    from langgraph_scoped_conn.settings import redact_url

    text = f"{type(exc).__name__}: {exc}"
    text = _BACKGROUND.sub("", redact_url(text)).replace(APP_PASSWORD, "***")
    text = _PASSWORDS.sub(r"\1***@", " ".join(text.split()))
    return text[:limit]


@dataclass
class Verdict:
    """One target: what it asks, what was measured and whether it holds."""

    name: str
    target: str
    measured: str
    ok: bool
    note: str = ""
    data: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "target": self.target,
            "measured": self.measured,
            "ok": self.ok,
            "note": self.note,
            "data": self.data,
        }


def print_verdicts(verdicts: Sequence[Verdict]) -> None:
    rows = [
        (v.name, v.target, v.measured, "[green]holds[/green]" if v.ok else "[red]MISSED[/red]")
        for v in verdicts
    ]
    console.print(table("Targets", ["target", "asks", "measured", "verdict"], rows))
    for v in verdicts:
        if v.note:
            console.print(f"[dim]{v.name}: {v.note}[/dim]")


def rss_mb() -> float:
    """Resident set size of this process in MB (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def full_gc() -> None:
    for _ in range(3):
        gc.collect()


class NoopHandler(BaseCallbackHandler):
    """A LangChain callback handler that does nothing, dispatched like the package's.

    What any callback handler costs (LangChain builds callback managers and run ids for
    every run once one is present): the floor the package's handler is measured against.
    """

    run_inline = True
    ignore_llm = True
    ignore_chat_model = True
    ignore_retry = True
    ignore_custom_event = True


def noop_handler() -> NoopHandler:
    """A new :class:`NoopHandler`."""
    return NoopHandler()
