"""The demo command end to end (subprocess), and the pieces it is built from.

The demo runs in a subprocess exactly as a user runs it; its table, stats JSON and
exit code are checked, and for PostgreSQL the server's pg_stat_activity is checked
afterwards.  The sample data, the scripted model and the CLI's errors are checked
in-process.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from sqlalchemy import create_engine, text

from langgraph_scoped_conn.demo import ScriptedSQLChatModel, build_query, ensure_sample_database
from langgraph_scoped_conn.demo.data import SALES_ROWS, sample_rows
from langgraph_scoped_conn.demo.runner import is_too_many_clients
from langgraph_scoped_conn.errors import ConfigurationError
from langgraph_scoped_conn.testing import SUPERUSER_PASSWORD, PostgresCluster, free_port
from tests.conftest import eventually

REPO = Path(__file__).resolve().parents[1]


def run_demo(*args: str, cache: Path, env: dict[str, str] | None = None, timeout: float = 240):
    full_env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    full_env.update(
        {"LSC_CACHE_DIR": str(cache), "COLUMNS": "200", "PYTHONWARNINGS": "error", **(env or {})}
    )
    full_env.pop("LSC_CHAT_MODEL", None)
    return subprocess.run(
        [sys.executable, "-m", "langgraph_scoped_conn", "demo", *args],
        check=False,
        capture_output=True,
        text=True,
        env=full_env,
        cwd=REPO,
        timeout=timeout,
    )


def table_value(output: str, label: str, column: int = 0) -> int:
    """The number in the demo table's row ``label`` (column 0 scoped, 1 naive)."""
    for line in output.splitlines():
        cells = [c.strip() for c in re.split(r"[│|┃]", line) if c.strip()]
        if cells and cells[0] == label:
            return int(cells[1 + column])
    raise AssertionError(f"no table row {label!r} in:\n{output}")


def stats_json(output: str) -> dict:
    start = output.index("\n{", output.index("Stats of the scoped run")) + 1
    stats, _ = json.JSONDecoder().raw_decode(output, start)
    return stats


def test_demo_on_the_embedded_sqlite_default(tmp_path: Path) -> None:
    proc = run_demo("-n", "20", cache=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "embedded SQLite sample" in out
    assert (tmp_path / "store-v1.sqlite").exists()
    assert table_value(out, "executions") == 20
    assert table_value(out, "succeeded") == 20
    assert table_value(out, "failed") == 0
    assert table_value(out, "leaks reclaimed") == 0
    # one budget of 5 (the default) served 20 runs x 3 queries
    assert 1 <= table_value(out, "peak connections") <= 5
    assert table_value(out, "connections opened") <= 5
    stats = stats_json(out)
    assert stats["scopes_opened"] == stats["scopes_closed"] == 20
    assert stats["active_executions"] == 0
    assert stats["connections_in_use"] == 0
    assert table_value(out, "connections returned to a pool") == stats["checkins"]
    assert stats["checkins"] == stats["checkouts"]
    assert table_value(out, "connections closed") == stats["connections_closed"]
    assert table_value(out, "connections reused") == stats["connections_reused"] > 0


def test_demo_on_postgres_holds_nothing_afterwards(tmp_path: Path, pg_db) -> None:
    # every 5th run's query tool forgets a connection: 4 leaks the scopes must reclaim.
    # The budget is above the number of leaks: a leaky run may need another connection
    # before it ends, and with 3 slots three leaky runs could hold them all and wait on
    # each other (under CPU load they did, failing runs after pool_timeout)
    proc = run_demo(
        "-n", "20", "--max-connections", "5", "--leak-every", "5",
        "--database-url", pg_db.url, cache=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert SUPERUSER_PASSWORD not in out + proc.stderr
    assert "postgres:***@" in out
    assert table_value(out, "succeeded") == 20
    assert table_value(out, "failed") == 0
    assert table_value(out, "peak connections") <= 5
    assert table_value(out, "leaks reclaimed") == 4
    assert proc.stderr.count("closing it so the server slot is freed") == 4
    stats = stats_json(out)
    assert stats["leaks_reclaimed"] == 4
    assert stats["max_connections"] == 5
    assert stats["pools"][0]["dialect"] == "postgresql"
    assert stats["scopes_closed"] == 20
    # the sample data was loaded into the database, once
    assert pg_db.query("select count(*) from sales") == [(SALES_ROWS,)]
    # server side: no backend of the demo is left (the process has exited)
    eventually(lambda: pg_db.backends() == 0, "no backend of the demo is left")


@pytest.mark.slow
def test_compare_shows_too_many_clients_only_for_the_naive_way(tmp_path: Path) -> None:
    with PostgresCluster.running(max_connections=8) as cluster:
        cluster.psql("create database demo")
        report_path = tmp_path / "report.json"
        proc = run_demo(
            "-n", "20", "--compare", "--max-connections", "4",
            "--database-url", cluster.url("demo"), "--report-json", str(report_path),
            cache=tmp_path,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        out = proc.stdout
        # the scoped run: no failure, never above its budget
        assert table_value(out, "failed", 0) == 0
        assert table_value(out, "failed with 'too many clients'", 0) == 0
        assert table_value(out, "peak connections", 0) <= 4
        # the naive run: the server refused it
        naive_refused = table_value(out, "failed with 'too many clients'", 1)
        assert naive_refused > 0
        assert "too many clients" in out
        assert table_value(out, "connections opened", 1) > table_value(out, "connections opened")
        report = json.loads(report_path.read_text())
        assert report["scoped"]["succeeded"] == 20
        assert report["naive"]["too_many_clients"] == naive_refused
        assert report["naive"]["connections_refused"] > 0
        assert SUPERUSER_PASSWORD not in out + proc.stderr + report_path.read_text()
        held = cluster.psql(
            "select count(*) from pg_stat_activity where datname = 'demo' "
            "and backend_type = 'client backend'"
        )
        assert held == "0"


def test_unreachable_database_url_fails_clearly(tmp_path: Path) -> None:
    url = f"postgresql://someone:hunter2-secret@127.0.0.1:{free_port()}/nowhere"
    proc = run_demo("-n", "2", "--database-url", url, cache=tmp_path)
    assert proc.returncode == 2
    assert "cannot reach or prepare the database" in proc.stderr
    assert "someone:***@127.0.0.1" in proc.stderr
    assert "hunter2-secret" not in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-n", "0"], "--executions must be between 1 and 10000, got 0"),
        (["-n", "many"], "--executions must be a whole number, got 'many'"),
        (["--max-connections", "0"], "--max-connections must be between 1 and 1000"),
    ],
)
def test_bad_arguments_are_named(args: list[str], message: str) -> None:
    from langgraph_scoped_conn.__main__ import main

    with pytest.raises(SystemExit) as exc:
        main(["demo", *args])
    assert exc.value.code == 2
    # argparse printed the message; run again capturing it
    proc = subprocess.run(
        [sys.executable, "-m", "langgraph_scoped_conn", "demo", *args],
        check=False,
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 2
    assert message in proc.stderr


def test_invalid_url_is_a_configuration_error(tmp_path: Path) -> None:
    proc = run_demo("--database-url", "not a url", cache=tmp_path)
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
    assert "--compare" in proc.stdout


# -- the sample data -----------------------------------------------------------------


def test_sample_rows_are_deterministic() -> None:
    first, second = sample_rows(), sample_rows()
    assert first == second
    assert len(first["sales"]) == SALES_ROWS
    assert sum(len(rows) for rows in first.values()) > 3000
    total = sum(row["amount"] for row in first["sales"])
    assert str(total) == "178704.84"  # the same on every machine


def test_loading_into_postgres_is_idempotent(pg_db) -> None:
    assert ensure_sample_database(pg_db.url) == pg_db.url
    assert ensure_sample_database(pg_db.url) == pg_db.url
    assert pg_db.query("select count(*), sum(amount) from sales")[0] == (
        SALES_ROWS,
        Decimal("178704.84"),
    )
    # the test fixture's own tables are untouched
    assert pg_db.query("select count(*) from orders") == [(500,)]


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


def test_too_many_clients_is_recognised_through_causes() -> None:
    try:
        try:
            raise OSError("FATAL:  sorry, too many clients already")
        except OSError as inner:
            raise RuntimeError("tool failed") from inner
    except RuntimeError as outer:
        assert is_too_many_clients(outer)
    assert not is_too_many_clients(RuntimeError("boom"))
