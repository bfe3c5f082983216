"""Write-mode statements that provably leave no session state skip the reset
(``langgraph_scoped_conn.stateless``); every other one still pays it.

A dedicated cluster logs every statement (``log_statement = 'all'``) with the client's
``application_name`` in front, so whether a reset ran between two executions is read
from the server's own log.  With a budget of one connection every execution gets the
same backend, and the next owner reads that session's state itself (``current_setting``,
``pg_locks``, its temp schema, ``currval``...).  The manager connects as a role without
superuser rights (``agent``), as an application does, so row-level security applies.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

import langgraph_scoped_conn as lsc
from langgraph_scoped_conn import ExecutionConnectionManager, invalidate_schema_cache
from langgraph_scoped_conn.guard import FunctionCatalog
from langgraph_scoped_conn.session import RESET_SQL
from langgraph_scoped_conn.sql_database import ScopedSQLDatabase
from langgraph_scoped_conn.stateless import CATALOG_SQL, DatabaseCatalog, leaves_no_state
from langgraph_scoped_conn.testing import SAMPLE_SQL, PostgresCluster
from tests.test_read_only import BENIGN_PG, SESSION_STATE

DRIVERS = ("psycopg2", "psycopg")
QUERY = "select count(*) from orders where amount > 50"
#: A STABLE user function may change the session: set_config is allowed in it, and no
#: ROLLBACK undoes it in autocommit mode.
SNEAKY = """
create function {name} returns int language plpgsql stable as $$
begin perform set_config('search_path', 'sneaky', false); return 1; end $$;
"""
SEQUENCE = "create sequence seq;"
SETUP_SQL = (
    SAMPLE_SQL
    + SNEAKY.format(name="sneaky()")
    # a function named like a built-in, in public: lower(1) resolves to it
    + SNEAKY.format(name="public.lower(integer)")
    + SEQUENCE
    + """
create view sneaky_view as select sneaky() as s;
create table guarded (a int);
insert into guarded values (1);
alter table guarded enable row level security;
create policy everyone on guarded using (sneaky() = 1);
create role agent login password 'agent';
grant select, insert, update, delete on all tables in schema public to agent;
grant usage on sequence seq to agent;
"""
)
#: What the next owner reads of the session it was handed.
PROBE = """
select pg_backend_pid() as pid, current_setting('search_path') as search_path,
  current_setting('application_name') as application_name,
  current_setting('work_mem') as work_mem,
  (select count(*) from pg_locks where locktype = 'advisory' and pid = pg_backend_pid())
     as advisory_locks,
  to_regclass('pg_temp.scratch') is not null as temp_table,
  (select count(*) from pg_listening_channels()) as channels,
  random() as first_random
"""


@pytest.fixture(scope="module")
def cluster() -> Iterator[PostgresCluster]:
    with PostgresCluster.running(
        extra_conf={"log_statement": "all", "log_line_prefix": "%a:"}
    ) as running:
        running.psql("create database sl")
        running.psql(SETUP_SQL, database="sl")
        yield running


def log_during(cluster: PostgresCluster, action: Callable[[], Any]) -> list[tuple[str, str]]:
    """``(how, statement)`` of each statement logged while ``action`` ran: ``how`` is
    ``statement`` (simple query), or the prepared statement's name (``<unnamed>``...)."""
    start = cluster.logfile.stat().st_size
    action()
    with cluster.logfile.open("rb") as f:
        f.seek(start)
        lines = f.read().decode(errors="replace").splitlines()
    out = []
    for line in lines:  # "<application_name>:LOG:  statement: <sql>" or "...execute <name>: <sql>"
        message = line.split(":LOG:  ", 1)[-1]
        if message.startswith("statement: "):
            out.append(("statement", message.removeprefix("statement: ")))
        elif message.startswith("execute "):
            name, sql = message.removeprefix("execute ").split(": ", 1)
            out.append((name, sql))
    return out


def resets(logged: list[tuple[str, str]]) -> int:
    """Resets in ``logged``, whatever the session's application_name was then."""
    return sum(1 for _, sql in logged if sql.startswith(RESET_SQL))


@pytest.fixture(params=DRIVERS)
def mgr(request: pytest.FixtureRequest, cluster: PostgresCluster) -> Iterator[Any]:
    """One connection as ``agent``, warm: the schema reflected and the catalog read."""
    url = cluster.url("sl", user="agent", password="agent", driver=request.param)
    manager = ExecutionConnectionManager(url, max_connections=1, pool_timeout=10)
    try:
        assert run(manager, "select 1") == ["[(1,)]"]
        yield manager
        assert manager.get_stats()["connections_opened"] == 1, "the session was replaced"
    finally:
        manager.close()


def run(manager: ExecutionConnectionManager, *statements: str) -> list[Any]:
    """One new execution that runs each statement once in write mode."""
    with lsc.ExecutionScope(manager=manager):
        db = lsc.get_scoped_sql_database(manager=manager)
        return [db.run_no_throw(sql) for sql in statements]


def read_state(manager: ExecutionConnectionManager) -> dict[str, Any]:
    """The session state the current execution's connection holds (budget 1: the one)."""
    engine = lsc.get_scoped_engine(manager=manager)
    with engine.connect() as conn:
        state = dict(conn.execute(text(PROBE)).mappings().one())
        conn.rollback()
        try:
            conn.execute(text("select pg_catalog.currval('public.seq')"))
            state["currval"] = "defined"
        except DBAPIError as exc:
            assert "not yet defined in this session" in str(exc.orig), exc
            state["currval"] = "not defined"
        conn.rollback()
    return state


def probe(manager: ExecutionConnectionManager) -> dict[str, Any]:
    """The session state the next execution finds, read by that execution."""
    with lsc.ExecutionScope(manager=manager):
        return read_state(manager)


# -- a clean statement pays no reset ---------------------------------------------------


def test_a_clean_write_mode_query_pays_no_reset_when_the_connection_changes_hands(
    mgr: ExecutionConnectionManager, cluster: PostgresCluster
) -> None:
    """Execution A's query, then B's on the same backend: no reset anywhere between.

    Six runs each, so psycopg 3 prepares the query on the server (on its 5th): the
    statement it prepared in A is still there in B, and B runs it by that name.
    """
    pids: list[Any] = []

    def a_then_b() -> None:
        for _ in range(2):  # A, then B
            with lsc.ExecutionScope(manager=mgr):
                db = lsc.get_scoped_sql_database(manager=mgr)
                assert [db.run(QUERY) for _ in range(6)] == ["[(235,)]"] * 6
                pids.append(db.run("select pg_backend_pid()"))

    logged = log_during(cluster, a_then_b)
    assert resets(logged) == 0, logged
    assert pids[0] == pids[1], "B did not get A's backend: nothing was tested"
    assert [sql for _, sql in logged] == ([QUERY] * 6 + ["select pg_backend_pid()"]) * 2
    if "psycopg2" not in str(mgr.settings.resolve_url()):
        names = {how for how, _ in logged if how.startswith("_pg3_")}
        assert len(names) == 1, logged  # one server-side prepared statement...
        name = names.pop()
        assert name in [how for how, _ in logged[:6]], logged  # ...made in A
        # B ran all six by that name: the statement A prepared was still valid in B
        assert [how for how, _ in logged[7:13]] == [name] * 6, logged
        assert run(mgr, "select name from pg_prepared_statements") == [f"[('{name}',)]"]
    assert mgr.get_stats().get("session_resets", 0) == 0


@pytest.mark.parametrize(
    "sql",
    [
        "SHOW search_path",
        "EXPLAIN SELECT * FROM orders",
        "EXPLAIN (ANALYZE, COSTS OFF) SELECT count(*) FROM orders",
        "WITH big AS (SELECT * FROM orders WHERE amount > 90) SELECT count(*) FROM big",
        "VALUES (1, 'a')",
        "TABLE customers LIMIT 1",
        "select now(), current_setting('work_mem'), upper('x'), gen_random_uuid() is not null",
        "select count(*) from information_schema.columns where table_name = 'orders'",
    ],
)
def test_other_clean_statements_pay_no_reset(
    sql: str, mgr: ExecutionConnectionManager, cluster: PostgresCluster
) -> None:
    """SHOW and EXPLAIN now take the one-statement path too, and stay clean."""
    answers: list[Any] = []
    logged = log_during(cluster, lambda: answers.extend(run(mgr, sql)))
    assert not str(answers[0]).startswith("Error"), answers
    assert [s for _, s in logged] == [sql], logged  # and no reset


# -- everything else still leaves the connection marked --------------------------------


#: (statement in write mode, what the next owner would see if it were not reset)
DIRTY: list[tuple[str, dict[str, Any]]] = [
    ("SET work_mem = '77MB'", {"work_mem": "77MB"}),
    ("select set_config('application_name', 'x', false)", {"application_name": "x"}),
    ("select pg_advisory_lock(1)", {"advisory_locks": 1}),
    ("select sneaky()", {"search_path": "sneaky"}),  # a user STABLE function
    ("select lower(1)", {"search_path": "sneaky"}),  # public.lower, named like a built-in
    ("select * from sneaky_view", {"search_path": "sneaky"}),  # a view calls it
    ("select * from guarded", {"search_path": "sneaky"}),  # a row-level policy calls it
    ("select nextval('seq')", {"currval": "defined"}),
    ("select setseed(0.5)", {"first_random": "seeded"}),
    ("CREATE TEMP TABLE scratch (a int)", {"temp_table": True}),
    ("LISTEN x", {"channels": 1}),
    ("select 1 / 0", {}),  # failed: kept marked, whatever it was
]


@pytest.mark.parametrize(("sql", "leftover"), DIRTY, ids=[sql for sql, _ in DIRTY])
def test_a_statement_that_may_change_the_session_is_still_reset(
    sql: str,
    leftover: dict[str, Any],
    mgr: ExecutionConnectionManager,
    cluster: PostgresCluster,
) -> None:
    seeded = float(cluster.psql("select setseed(0.5); select random()").split()[-1])
    baseline = probe(mgr)
    answers: list[Any] = []
    logged = log_during(cluster, lambda: answers.extend(run(mgr, "select pg_backend_pid()", sql)))
    assert resets(logged) == 1, logged  # as A ended (a sync scope resets inline)
    assert str(answers[1]).startswith("Error: ") is (sql == "select 1 / 0"), answers
    after = probe(mgr)
    assert str(after.pop("pid")) == answers[0].strip("[(,)]") == str(baseline.pop("pid"))
    assert after.pop("first_random") != seeded
    baseline.pop("first_random")
    assert after == baseline  # the next owner sees the defaults
    # and the statement does leave what the probe looks for, when nothing resets it
    with lsc.ExecutionScope(manager=mgr):
        lsc.get_scoped_sql_database(manager=mgr).run_no_throw(sql)
        inside = read_state(mgr)
    if inside["first_random"] == seeded:
        inside["first_random"] = "seeded"
    assert {key: inside[key] for key in leftover} == leftover, inside


def test_user_code_behind_an_operator_a_cast_or_a_domain_keeps_every_statement_marked(
    cluster: PostgresCluster,
) -> None:
    """A statement reaches such code without naming it, so no statement is clean there."""
    cluster.psql("create database hidden")
    cluster.psql(SNEAKY.format(name="sneaky_op(int, int)") + SEQUENCE, database="hidden")
    mgr = ExecutionConnectionManager(cluster.url("hidden"), max_connections=1, pool_timeout=10)
    try:
        assert run(mgr, "select 1") == ["[(1,)]"]  # warm: the catalog is read
        assert resets(log_during(cluster, lambda: run(mgr, "select 1"))) == 0
        cases = [
            (
                "create operator ### (leftarg = int, rightarg = int, function = sneaky_op)",
                "select 1 ### 2",
                "drop operator ### (int, int)",
            ),
            (
                "create domain checked as int check (sneaky_op(value, 0) = 1)",
                "select 1::checked",
                "drop domain checked",
            ),
            (
                "create type mood as enum ('ok'); create function mood_int(mood) returns int "
                "language plpgsql immutable as 'begin return sneaky_op(1, 1); end'; "
                "create cast (mood as int) with function mood_int(mood)",
                "select 'ok'::mood::int",
                "drop cast (mood as int); drop function mood_int(mood); drop type mood",
            ),
        ]
        for create, uses_it, drop in cases:
            cluster.psql(create, database="hidden")
            invalidate_schema_cache(mgr)  # after a migration, as documented
            for sql in ("select 1", uses_it):
                answers: list[Any] = []
                logged = log_during(cluster, lambda sql=sql: answers.extend(run(mgr, sql)))
                assert resets(logged) == 1, (create, sql, logged)
                assert not str(answers[0]).startswith("Error"), answers
            assert probe(mgr)["search_path"] == '"$user", public'
            cluster.psql(drop, database="hidden")
            invalidate_schema_cache(mgr)
            assert resets(log_during(cluster, lambda: run(mgr, "select 1"))) == 0
    finally:
        mgr.close()


@pytest.mark.parametrize("driver", DRIVERS)
def test_the_catalog_is_read_once_per_url_and_a_failed_read_only_keeps_the_reset(
    driver: str, cluster: PostgresCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = cluster.url("sl", user="agent", password="agent", driver=driver)
    manager = ExecutionConnectionManager(url, max_connections=1, pool_timeout=10)
    try:
        logged = log_during(cluster, lambda: [run(manager, "select 1") for _ in range(3)])
        reads = [sql for _, sql in logged if sql == CATALOG_SQL]
        assert len(reads) == 1, logged  # on the first write-mode statement, in autocommit
        assert resets(logged) == 0
        invalidate_schema_cache(manager)  # forget it; reading it again now fails

        def fail(*args: Any) -> None:
            raise RuntimeError("no catalog")

        monkeypatch.setattr(ScopedSQLDatabase, "_read_catalog", fail)
        answers: list[Any] = []
        logged = log_during(cluster, lambda: answers.extend(run(manager, "select 1")))
        assert answers == ["[(1,)]"]  # the statement ran as before...
        assert resets(logged) == 1  # ...and its connection stayed marked
    finally:
        manager.close()


@pytest.mark.parametrize("sql", [q for q, _ in BENIGN_PG], ids=[q[:40] for q, _ in BENIGN_PG])
def test_a_benign_query_in_write_mode_hands_the_next_owner_the_session_it_found(
    sql: str, mgr: ExecutionConnectionManager
) -> None:
    """Reset or not, what the next owner finds is what the run before found: every
    setting (``pg_settings``), temp tables, prepared statements, cursors, channels, locks."""

    def session_state() -> tuple[Any, ...]:
        with lsc.ExecutionScope(manager=mgr), lsc.get_scoped_engine(manager=mgr).connect() as c:
            row = tuple(c.exec_driver_sql(SESSION_STATE).one())
            c.rollback()
            return row

    before = session_state()
    answer = run(mgr, sql)[0]
    assert not str(answer).startswith("Error"), answer
    assert session_state() == before


# -- the classification itself, without a server ----------------------------------------

FUNCTIONS = [
    ("pg_catalog", "count", "i"),
    ("pg_catalog", "lower", "i"),
    ("pg_catalog", "upper", "i"),
    ("pg_catalog", "now", "s"),
    ("pg_catalog", "random", "v"),
    ("pg_catalog", "clock_timestamp", "v"),
    ("pg_catalog", "set_config", "v"),
    ("pg_catalog", "nextval", "v"),
    ("pg_catalog", "query_to_xml", "s"),
    ("public", "upper", "i"),  # a shadow
    ("public", "report", "s"),
]
RELATIONS = [("orders", "y"), ("pg_tables", "y"), ("a_view", "n"), ("mixed", "n")]


def catalog(allowed: tuple[str, ...] = (), hidden: int = 0) -> DatabaseCatalog:
    rows: list[tuple[str, str | None, str | None, str]] = [("f", *f) for f in FUNCTIONS]
    rows += [("r", None, name, safe) for name, safe in RELATIONS]
    rows.append(("h", None, None, str(hidden)))
    return DatabaseCatalog(rows, allowed)


@pytest.mark.parametrize(
    ("sql", "clean"),
    [
        ("select 1", True),
        ("  SELECT count(*) FROM orders;", True),
        ("select now(), lower('X'), pg_catalog.upper('x')", True),
        ("select clock_timestamp()", True),  # harmless volatile
        ("select random()", False),  # advances the session's seeded sequence
        ("select upper('x')", False),  # public.upper may come first
        ("select public.report()", False),
        ("select report()", False),
        ("select set_config('a.b', 'c', false)", False),
        ("select nextval('s')", False),
        ("select no_such_function()", False),  # not in the catalog: refused by the guard
        ("select query_to_xml('select 1', true, true, '')", False),
        ("select * from a_view", False),
        ("select * from public.mixed", False),
        ("select * from not_yet_known", False),
        ("with t as (select 1) select * from t", True),
        ("with a_view as (select 1) select * from a_view", False),  # may be the view
        ("with t as (select 1) select * from public.t", False),
        ("select * from pg_tables", True),
        ("explain select * from orders", True),
        ("explain analyze select * from orders", True),  # runs the same query
        ("explain analyze select random()", False),
        ("show work_mem", True),
        ("select * from orders for update", False),
        ("select 1 into scratch", False),
        ("with d as (delete from orders returning *) select * from d", False),
        ("insert into orders values (1)", False),
        ("update orders set amount = 0", False),
        ("set work_mem = '1MB'", False),
        ("select 1; select 2", False),
        ("/* a comment first */ select 1", False),  # not parsed: only a keyword first
    ],
)
def test_what_is_classified_clean(sql: str, clean: bool) -> None:
    assert leaves_no_state(sql, catalog(), 20_000) is clean


def test_allowed_functions_hidden_code_and_the_length_cap_keep_it_marked() -> None:
    assert leaves_no_state("select lower('x')", catalog(), 20_000)
    assert not leaves_no_state("select lower('x')", catalog(allowed=("lower",)), 20_000)
    assert not leaves_no_state("select lower('x')", catalog(allowed=("pg_catalog.lower",)), 20_000)
    assert not leaves_no_state("select 1", catalog(hidden=1), 20_000)
    assert not leaves_no_state("select 1", catalog(), 5)  # refused by the guard: too long
    functions = FunctionCatalog([("pg_catalog", "lower", "i"), ("public", "lower", "v")])
    assert functions.builtin("pg_catalog", "lower")
    assert not functions.builtin(None, "lower")
    assert not functions.builtin("public", "lower")


def test_answers_are_kept_with_the_catalog_for_statements_sent_again() -> None:
    known = catalog()
    assert leaves_no_state("select 1", known, 20_000)
    assert not leaves_no_state("select random()", known, 20_000)
    assert not leaves_no_state("insert into orders values (1)", known, 20_000)  # no parse
    assert known.memo == {("select 1", 20_000): True, ("select random()", 20_000): False}
    for i in range(300):
        leaves_no_state(f"select {i}", known, 20_000)
    assert 0 < len(known.memo) <= 256
    long = "select 1" + " " * 5000
    assert leaves_no_state(long, known, 20_000)
    assert (long, 20_000) not in known.memo
