"""Statements one ``run()`` sends, counted in the server's own statement log.

A dedicated cluster logs every statement (``log_statement = 'all'``) with the client's
``application_name`` in front (``log_line_prefix = '%a:'``), so each count is what the
server received, not what the package thinks it sent.  Before the change: a read-only
query cost 7 statements (``SELECT 1`` pre-ping, ``BEGIN``, ``SET TRANSACTION READ ONLY``,
``SET LOCAL statement_timeout``, the query, the unlock, ``ROLLBACK``) and a plain one
5 (pre-ping, ``BEGIN``, the query, ``COMMIT``, ``DISCARD ALL``), against 3 for an
unscoped ``SQLDatabase.run`` on a global engine.

The last tests check, on the shared cluster, what the shorter paths must keep:
transactions that commit or roll back as before, and connections handed back in the
state they were taken.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import create_engine, text

import langgraph_scoped_conn as lsc
import langgraph_scoped_conn.engine as engine_module
from langgraph_scoped_conn import ExecutionConnectionManager
from langgraph_scoped_conn.errors import UnsafeQueryError
from langgraph_scoped_conn.session import RESET_SQL
from langgraph_scoped_conn.testing import SAMPLE_SQL, PostgresCluster
from tests.conftest import Database, eventually

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from langchain_community.utilities import SQLDatabase

DRIVERS = ("psycopg2", "psycopg")
APP = "langgraph_scoped_conn"
QUERY = "select count(*) from customers"


class StatementLog:
    """The statements the server logged, by application name, from an offset of its log."""

    def __init__(self, cluster: PostgresCluster) -> None:
        self.cluster = cluster

    def count(self, app: str, action: Callable[[], Any]) -> list[str]:
        """Run ``action`` and return the statements ``app``'s backends sent meanwhile."""
        start = self.cluster.logfile.stat().st_size
        action()  # each statement is logged before it runs, so before its reply arrives
        with self.cluster.logfile.open("rb") as f:
            f.seek(start)
            lines = f.read().decode(errors="replace").splitlines()
        prefix = f"{app}:LOG:  "
        out = []
        for line in lines:
            if line.startswith(prefix):
                message = line[len(prefix) :]
                if message.startswith(("statement: ", "execute ")):
                    out.append(message.split(": ", 1)[1])
        return out


@pytest.fixture(scope="module")
def logged() -> Iterator[tuple[PostgresCluster, StatementLog]]:
    with PostgresCluster.running(
        extra_conf={"log_statement": "all", "log_line_prefix": "%a:"}
    ) as cluster:
        cluster.psql("create database rt")
        cluster.psql(SAMPLE_SQL, database="rt")
        yield cluster, StatementLog(cluster)


@pytest.fixture
def rt_manager(
    logged: tuple[PostgresCluster, StatementLog], request: pytest.FixtureRequest
) -> Iterator[ExecutionConnectionManager]:
    cluster, _ = logged
    mgr = ExecutionConnectionManager(
        cluster.url("rt", driver=request.param), max_connections=1, pool_timeout=10
    )
    try:
        yield mgr
    finally:
        mgr.close()


def _scoped_run(mgr: ExecutionConnectionManager, sql: str, **options: Any) -> Any:
    """One new execution that runs ``sql`` once through its SQLDatabase."""
    with lsc.ExecutionScope(manager=mgr):
        return lsc.get_scoped_sql_database(manager=mgr, **options).run(sql)


@pytest.mark.parametrize("rt_manager", DRIVERS, indirect=True)
def test_read_only_query_costs_three_statements(
    rt_manager: ExecutionConnectionManager, logged: tuple[PostgresCluster, StatementLog]
) -> None:
    _, log = logged
    for _ in range(6):  # warm, and past psycopg 3's prepare threshold (5)
        assert _scoped_run(rt_manager, QUERY, read_only=True) == "[(50,)]"
    sent = log.count(APP, lambda: _scoped_run(rt_manager, QUERY, read_only=True))
    assert len(sent) <= 3, sent
    # the query runs as a cursor, its rows fetched within the caps; the fetch names it
    assert sent == [
        f"BEGIN READ ONLY; SET LOCAL statement_timeout = 30000; "
        f"DECLARE lsc_result NO SCROLL CURSOR FOR {QUERY}",
        f"FETCH FORWARD 100 FROM lsc_result /* {QUERY} */",
        "ROLLBACK; SELECT pg_advisory_unlock_all()",
    ]
    assert rt_manager.get_stats().get("session_resets", 0) == 0


@pytest.mark.parametrize("rt_manager", DRIVERS, indirect=True)
def test_plain_query_of_a_new_execution_costs_no_more_than_an_unscoped_run(
    rt_manager: ExecutionConnectionManager, logged: tuple[PostgresCluster, StatementLog]
) -> None:
    cluster, log = logged
    driver = rt_manager.settings.resolve_url().split("+", 1)[1].split(":", 1)[0]
    engine = create_engine(
        cluster.url("rt", driver=driver), connect_args={"application_name": "rt-unscoped"}
    )
    try:
        unscoped = SQLDatabase(engine)
        unscoped.run(QUERY)  # warm
        bare = log.count("rt-unscoped", lambda: unscoped.run(QUERY))
    finally:
        engine.dispose()
    assert bare == ["BEGIN", QUERY, "COMMIT"]

    _scoped_run(rt_manager, QUERY)  # warm: reflection, the catalog, the pool's connection
    sent = log.count(APP, lambda: _scoped_run(rt_manager, QUERY))
    assert len(sent) <= len(bare), sent
    # the lone statement commits on its own, and provably changed nothing in the session
    # (built-in functions, a plain table): no reset as the execution ends
    assert sent == [QUERY], sent
    # a statement that may change the session pays the reset as the execution ends
    write = "update customers set city = city where id = 1"
    sent = log.count(APP, lambda: _scoped_run(rt_manager, write))
    assert sent[0] == write and sent[1].startswith(RESET_SQL) and len(sent) == 2, sent


@pytest.mark.parametrize("rt_manager", DRIVERS, indirect=True)
def test_a_schema_and_several_statements_keep_their_transaction(
    rt_manager: ExecutionConnectionManager, logged: tuple[PostgresCluster, StatementLog]
) -> None:
    _, log = logged
    _scoped_run(rt_manager, QUERY)
    _scoped_run(rt_manager, QUERY, schema="public")  # reflects the schema for this option
    sent = log.count(APP, lambda: _scoped_run(rt_manager, QUERY, schema="public"))
    assert len(sent) == 5, sent
    assert sent[0] == "BEGIN" and sent[-3:-1] == [QUERY, "COMMIT"], sent
    assert sent[-1].startswith(RESET_SQL), sent
    assert "set_config('search_path'" in sent[1], sent
    sent = log.count(APP, lambda: _scoped_run(rt_manager, "select 1; select 2"))
    assert sent[:3] == ["BEGIN", "select 1; select 2", "COMMIT"], sent
    assert len(sent) == 4 and sent[3].startswith(RESET_SQL), sent


@pytest.mark.parametrize("rt_manager", DRIVERS, indirect=True)
def test_pre_ping_only_after_the_idle_threshold(
    rt_manager: ExecutionConnectionManager,
    logged: tuple[PostgresCluster, StatementLog],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, log = logged
    psycopg2 = str(rt_manager.settings.resolve_url()).startswith("postgresql+psycopg2")
    ping = "SELECT 1" if psycopg2 else ";"
    _scoped_run(rt_manager, QUERY, read_only=True)
    assert ping not in log.count(APP, lambda: _scoped_run(rt_manager, QUERY, read_only=True))

    with lsc.ExecutionScope(manager=rt_manager):
        handle = lsc.get_scoped_engine(manager=rt_manager)._lsc_handle
    assert handle.pre_ping_idle == engine_module.PRE_PING_IDLE == 5.0
    monkeypatch.setattr(handle, "pre_ping_idle", 0.0)  # every connection counts as idle
    sent = log.count(APP, lambda: _scoped_run(rt_manager, QUERY, read_only=True))
    assert sent[0] == ping, sent
    assert len(sent) == 4


@pytest.mark.parametrize("rt_manager", DRIVERS, indirect=True)
def test_a_terminated_idle_connection_is_replaced_before_use(
    rt_manager: ExecutionConnectionManager, logged: tuple[PostgresCluster, StatementLog]
) -> None:
    """The server's goodbye on an idle socket is seen without a ping (well inside the threshold)."""
    cluster, _ = logged

    def backends() -> int:
        return int(
            cluster.psql(
                "select count(*) from pg_stat_activity where datname = 'rt' "
                f"and application_name = '{APP}'"
            )
        )

    assert _scoped_run(rt_manager, QUERY) == "[(50,)]"
    opened = rt_manager.get_stats()["connections_opened"]
    cluster.psql(
        "select pg_terminate_backend(pid) from pg_stat_activity "
        f"where datname = 'rt' and application_name = '{APP}'"
    )
    eventually(lambda: backends() == 0, "the terminated backend exited")
    # without the check the stale connection would be handed out and this would raise
    assert _scoped_run(rt_manager, QUERY, read_only=True) == "[(50,)]"
    assert _scoped_run(rt_manager, QUERY) == "[(50,)]"
    assert rt_manager.get_stats()["connections_opened"] == opened + 1


# -- what the shorter paths keep (shared cluster) ---------------------------------------


@pytest.fixture(params=DRIVERS)
def one_conn(
    request: pytest.FixtureRequest,
    pg_db: Database,
    configure_default: Callable[..., ExecutionConnectionManager],
) -> ExecutionConnectionManager:
    """A default manager with one connection, so every run reuses the same session."""
    return configure_default(pg_db.url_with(request.param), max_connections=1, pool_timeout=10)


def _session_state() -> dict[str, Any]:
    with lsc.ExecutionScope():
        engine = lsc.get_scoped_engine()
        raw = engine.raw_connection()
        try:
            autocommit = raw.dbapi_connection.autocommit  # type: ignore[union-attr]
        finally:
            raw.close()
        with engine.connect() as conn:
            row = conn.execute(
                text(
                    "select current_setting('transaction_read_only'), "
                    "current_setting('statement_timeout'), "
                    "(select count(*) from pg_locks where locktype = 'advisory' "
                    " and pid = pg_backend_pid())"
                )
            ).one()
            conn.rollback()
    return {"autocommit": autocommit, "read_only": row[0], "timeout": row[1], "locks": row[2]}


CLEAN = {"autocommit": False, "read_only": "off", "timeout": "0", "locks": 0}


def test_read_only_runs_leave_the_session_as_they_found_it(
    one_conn: ExecutionConnectionManager,
) -> None:
    with lsc.ExecutionScope():
        db = lsc.get_scoped_sql_database(read_only=True, statement_timeout=0.2)
        # the guard refuses a session advisory lock before it reaches the server
        assert db.run_no_throw("select pg_advisory_lock(7), 1").startswith("Error: ")
        assert db.run("select count(*) from orders") == "[(500,)]"
        assert db.run_no_throw("select pg_sleep(5)").startswith("Error: ")  # timed out
        assert db.run_no_throw("select nextval('no_such_seq')").startswith("Error: ")
        with pytest.raises(UnsafeQueryError):
            db.run("delete from orders")
        assert db.run("select 2") == "[(2,)]"
    assert _session_state() == CLEAN
    assert one_conn.get_stats()["connections_opened"] == 1


def test_a_lone_plain_statement_commits_or_fails_alone(
    one_conn: ExecutionConnectionManager, pg_db: Database
) -> None:
    with lsc.ExecutionScope():
        db = lsc.get_scoped_sql_database()
        assert db.run("insert into customers values (51, 'new', 'Lima')") == ""
        assert db.run_no_throw("insert into customers values (51, 'dup', 'Oslo')").startswith(
            "Error: "
        )
        # several statements: one transaction, all or nothing
        failed = db.run_no_throw(
            "insert into customers values (52, 'a', 'Pune'); "
            "insert into customers values (51, 'dup', 'Oslo')"
        )
        assert failed.startswith("Error: ")
        assert db.run("update customers set city = 'Oslo' where id = 51 returning city") == (
            "[('Oslo',)]"
        )
    assert pg_db.query("select id, city from customers where id > 50") == [(51, "Oslo")]
    assert _session_state() == CLEAN
