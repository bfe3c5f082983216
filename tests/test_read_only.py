"""The read-only guard for SQL written by a model, on a real PostgreSQL and on SQLite.

Every hostile input must be refused with a clear error (``UnsafeQueryError`` from the
guard, or ``ReadOnlyViolationError`` from the read-only transaction), come back as
``"Error: ..."`` text from ``run_no_throw`` (what SQL tools hand to the model), and
leave a checksum of the data and of the schema unchanged.
"""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from langchain_core.runnables import RunnableConfig
from langchain_core.tools import tool
from langgraph.graph import END, START, StateGraph
from sqlalchemy.exc import DBAPIError
from typing_extensions import TypedDict

import langgraph_scoped_conn as lsc
from langgraph_scoped_conn.errors import ReadOnlyViolationError, UnsafeQueryError
from langgraph_scoped_conn.guard import check_read_only_sql, split_statements
from langgraph_scoped_conn.registry import ExecutionConnectionManager
from tests.conftest import Database, assert_clean, eventually

PG_CHECKSUM = """
select md5(string_agg(x, '|' order by x)) from (
  select 'c' || c::text as x from customers c
  union all select 'o' || o::text from orders o
  union all select 't' || relname || ':' || relkind::text from pg_class
   where relnamespace = 'public'::regnamespace
) s
"""

UNSAFE = UnsafeQueryError
READ_ONLY = ReadOnlyViolationError

#: (id, query, error class, words the message must contain)
HOSTILE_PG: list[tuple[str, str, type[Exception], str]] = [
    ("drop", "DROP TABLE orders", UNSAFE, "DROP statements are refused"),
    ("update", "UPDATE orders SET amount = 0", UNSAFE, "UPDATE statements are refused"),
    ("insert", "INSERT INTO customers VALUES (999, 'x', 'y')", UNSAFE, "INSERT statements"),
    ("delete", "delete from orders", UNSAFE, "DELETE statements are refused"),
    ("truncate", "TRUNCATE orders CASCADE", UNSAFE, "TRUNCATE statements"),
    ("grant", "GRANT ALL ON orders TO public", UNSAFE, "GRANT statements"),
    ("copy", "COPY orders TO PROGRAM 'true'", UNSAFE, "COPY statements"),
    ("do-block", "DO $$ BEGIN DELETE FROM orders; END $$", UNSAFE, "DO statements"),
    ("call", "CALL cleanup()", UNSAFE, "CALL statements"),
    ("two statements", "SELECT 1; DROP TABLE orders", UNSAFE, "holds 2 statements"),
    ("commit then drop", "COMMIT; DROP TABLE orders", UNSAFE, "holds 2 statements"),
    ("rollback then delete", "ROLLBACK; DELETE FROM orders;", UNSAFE, "holds 2 statements"),
    (
        "set read-write then delete",
        "SET default_transaction_read_only=off; DELETE FROM orders",
        UNSAFE,
        "holds 2 statements",
    ),
    (
        "set session read-write then drop",
        "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE; DROP TABLE orders",
        UNSAFE,
        "holds 2 statements",
    ),
    ("set read-write alone", "SET default_transaction_read_only = off", UNSAFE, "SET statements"),
    ("set transaction", "SET TRANSACTION READ WRITE", UNSAFE, "SET statements"),
    ("begin", "BEGIN; DELETE FROM orders; COMMIT", UNSAFE, "holds 3 statements"),
    ("commit alone", "commit", UNSAFE, "COMMIT statements"),
    ("very long", "SELECT " + " + ".join(["1"] * 10_000), UNSAFE, "above the limit"),
    (
        "very long hiding a drop",
        "SELECT 1 " + "/* padding */ " * 2_000 + "; DROP TABLE orders",
        UNSAFE,
        "above the limit",
    ),
    ("block comment hides ;", "SELECT 1 /* ; */ ; DROP TABLE orders", UNSAFE, "holds 2"),
    ("nested comment hides ;", "SELECT 1 /* /* ; */ ; */ ; DROP TABLE orders", UNSAFE, "holds 2"),
    ("line comment hides ;", "SELECT 1 -- ;\n; DROP TABLE orders", UNSAFE, "holds 2"),
    ("string hides ;", "SELECT ';' ; DROP TABLE orders", UNSAFE, "holds 2 statements"),
    ("identifier hides ;", 'SELECT 1 AS ";" ; DROP TABLE orders', UNSAFE, "holds 2"),
    ("dollar quote hides ;", "SELECT $$;$$; DROP TABLE orders", UNSAFE, "holds 2 statements"),
    ("tagged dollar quote", "SELECT $q$ ; $q$ ; DROP TABLE orders", UNSAFE, "holds 2"),
    ("unterminated comment", "SELECT 1 /* ; DROP TABLE orders", UNSAFE, "inside a /* comment"),
    ("unterminated string", "SELECT '; DROP TABLE orders", UNSAFE, "inside a string"),
    ("unterminated dollar", "SELECT $x$; DROP TABLE orders", UNSAFE, "inside a $x$"),
    ("nul byte", "SELECT 1\x00; DROP TABLE orders", UNSAFE, "NUL character"),
    ("empty", "  ;  -- nothing\n", UNSAFE, "the query is empty"),
    # A backslash before a quote is read differently by E'' strings, by a type name that
    # ends in "e" (name'\'), and with standard_conforming_strings=off.  Each of these
    # slipped a COMMIT past an earlier version of the guard.
    (
        "backslash quote after a type name",
        "SELECT name'\\'; COMMIT; DROP TABLE orders; --'",
        UNSAFE,
        "backslash before a quote",
    ),
    (
        "E string backslash quote",
        "SELECT E'\\'; COMMIT; DROP TABLE orders; --'",
        UNSAFE,
        "backslash before a quote",
    ),
    # "$" continues an identifier, so a$$$ is one identifier, not a$ and a $$ quote.
    (
        "dollar inside an identifier",
        "SELECT 1 AS a$$$; COMMIT; DROP TABLE orders; SELECT 1 AS b$$",
        UNSAFE,
        "holds 4 statements",
    ),
    (
        "carriage return ends a line comment",
        "SELECT 1 --x\r; COMMIT; DROP TABLE orders",
        UNSAFE,
        "holds 3 statements",
    ),
    # Single statements that look like reads but write: the read-only transaction refuses.
    (
        "data-modifying CTE",
        "WITH d AS (DELETE FROM orders RETURNING *) SELECT count(*) FROM d",
        READ_ONLY,
        "cannot execute SELECT in a read-only transaction",
    ),
    (
        "data-modifying CTE in parentheses",
        "(WITH u AS (UPDATE customers SET name = 'x' RETURNING 1) SELECT * FROM u)",
        READ_ONLY,
        "in a read-only transaction",
    ),
    ("select into", "SELECT * INTO stolen FROM customers", READ_ONLY, "SELECT INTO"),
    ("explain analyze", "EXPLAIN ANALYZE DELETE FROM orders", READ_ONLY, "DELETE"),
    ("select for update", "SELECT * FROM orders FOR UPDATE", READ_ONLY, "FOR UPDATE"),
    (
        "set_config read-write",
        "SELECT set_config('transaction_read_only', 'off', true)",
        READ_ONLY,
        "read-write mode",
    ),
]


def _checksum(db: Database) -> str:
    return str(db.query(PG_CHECKSUM)[0][0])


@pytest.mark.parametrize(
    ("query", "error", "words"),
    [pytest.param(q, e, w, id=i) for i, q, e, w in HOSTILE_PG],
)
def test_hostile_query_is_refused_on_postgres(
    manager: ExecutionConnectionManager,
    pg_db: Database,
    query: str,
    error: type[Exception],
    words: str,
) -> None:
    before = _checksum(pg_db)
    with lsc.ExecutionScope():
        db = lsc.get_scoped_sql_database(read_only=True)
        with pytest.raises(error) as caught:
            db.run(query)
        message = str(caught.value)
        assert words in message, message
        assert "read-only" in message or "query" in message, message
        answer = db.run_no_throw(query)
        assert isinstance(answer, str)
        assert answer.startswith("Error: "), answer
        assert words in answer, answer
        # the connection is still good for the next query of the same run
        assert db.run("select count(*) from orders") == "[(500,)]"
    assert _checksum(pg_db) == before
    assert pg_db.query("select count(*) from orders")[0][0] == 500
    assert manager.get_stats()["connections_in_use"] == 0
    idle = manager.get_stats()["connections_idle"]
    eventually(lambda: pg_db.backends("langgraph_scoped_conn%") == idle, "only pooled remain")


def test_reads_run_in_a_read_only_transaction_with_a_timeout(
    manager: ExecutionConnectionManager, pg_db: Database
) -> None:
    with lsc.ExecutionScope():
        db = lsc.get_scoped_sql_database(read_only=True, statement_timeout=1.5)
        assert db.read_only
        assert db.run("select current_setting('transaction_read_only')") == "[('on',)]"
        assert db.run("show statement_timeout") == "[('1500ms',)]"
        assert db.run("TABLE customers LIMIT 1") == "[(1, 'customer 1', 'Oslo')]"
        assert db.run("VALUES (1), (2)") == "[(1,), (2,)]"
        assert "Seq Scan" in db.run("EXPLAIN SELECT * FROM orders")
        assert db.run("SELECT ';' AS semi, $$;$$ AS dollar -- a comment; DROP\n") == (
            "[(';', ';')]"
        )
        assert db.run("SELECT 'O''Brien' AS a, E'tab\\there' AS b, '\\\\' AS c") == (
            "[(\"O'Brien\", 'tab\\there', '\\\\\\\\')]"
        )
        # the same SQLDatabase of this run, not another one
        assert lsc.get_scoped_sql_database(read_only=True, statement_timeout=1.5) is db
        writable = lsc.get_scoped_sql_database()
        assert not writable.read_only
        assert writable.run("select current_setting('transaction_read_only')") == "[('off',)]"


def test_session_settings_changed_by_a_query_are_rolled_back(
    manager: ExecutionConnectionManager, pg_db: Database
) -> None:
    with lsc.ExecutionScope():
        db = lsc.get_scoped_sql_database(read_only=True)
        db.run("select set_config('application_name', 'pwned', false)")
        db.run("select set_config('statement_timeout', '0', false)")
        db.run("select set_config('default_transaction_read_only', 'off', false)")
        # the pooled connection keeps none of it: every read-only statement is rolled back
        assert db.run("select current_setting('application_name')") == (
            "[('langgraph_scoped_conn',)]"
        )
        assert db.run("show statement_timeout") == "[('30s',)]"
    rows = pg_db.query(
        "select application_name from pg_stat_activity where datname = current_database() "
        "and application_name <> 'lsc-test-admin' and backend_type = 'client backend'"
    )
    assert rows, "the pooled connection is gone"
    assert {r[0] for r in rows} == {"langgraph_scoped_conn"}


def test_session_advisory_locks_do_not_outlive_the_statement(
    manager: ExecutionConnectionManager, pg_db: Database
) -> None:
    """pg_advisory_lock is allowed in a read-only transaction and survives its rollback."""
    locks = "select count(*) from pg_locks where locktype = 'advisory'"
    with lsc.ExecutionScope():
        db = lsc.get_scoped_sql_database(read_only=True)
        db.run("select pg_advisory_lock(42)")
        assert pg_db.query(locks) == [(0,)]
        db.run("select query_to_xml('select pg_try_advisory_lock_shared(43)', false, false, '')")
        assert pg_db.query(locks) == [(0,)]
        # a lock taken by a statement that then fails is dropped too
        assert db.run_no_throw("select pg_advisory_lock(44), 1/0").startswith("Error: ")
        assert pg_db.query(locks) == [(0,)]
        assert db.run("select 1") == "[(1,)]"
    assert pg_db.query(locks) == [(0,)]


def test_statement_timeout_stops_a_slow_read(
    manager: ExecutionConnectionManager, pg_db: Database
) -> None:
    with lsc.ExecutionScope():
        db = lsc.get_scoped_sql_database(read_only=True, statement_timeout=0.2)
        with pytest.raises(DBAPIError, match="statement timeout"):
            db.run("select pg_sleep(30)")
        answer = db.run_no_throw("select pg_sleep(30)")
        assert answer.startswith("Error: ") and "statement timeout" in answer
        assert db.run("select 1") == "[(1,)]"
    assert (
        pg_db.query(
            "select count(*) from pg_stat_activity where query like '%pg_sleep(30)%'"
            " and state = 'active' and pid <> pg_backend_pid()"
        )[0][0]
        == 0
    )


def test_manager_wide_read_only_default(pg_db: Database) -> None:
    mgr = ExecutionConnectionManager(pg_db.url, read_only=True, max_connections=2)
    before = _checksum(pg_db)
    try:
        with lsc.ExecutionScope(manager=mgr):
            db = lsc.get_scoped_sql_database(manager=mgr)
            assert db.read_only
            assert "Error: " in db.run_no_throw("DELETE FROM orders")
            with pytest.raises(ReadOnlyViolationError):
                db.run("WITH d AS (DELETE FROM orders RETURNING 1) SELECT 1")
            # an explicit read_only=False overrides the default for trusted code
            assert not lsc.get_scoped_sql_database(manager=mgr, read_only=False).read_only
        assert_clean(mgr)
    finally:
        mgr.close()
    assert _checksum(pg_db) == before


def test_read_only_refuses_non_text_statements(manager: ExecutionConnectionManager) -> None:
    from sqlalchemy import text

    with lsc.ExecutionScope():
        db = lsc.get_scoped_sql_database(read_only=True)
        with pytest.raises(ReadOnlyViolationError, match="SQL text only"):
            db.run(text("select 1"))


class _State(TypedDict):
    query: str
    answer: str


@tool
def _sql_tool(query: str, config: RunnableConfig) -> str:
    """Run one read-only SQL query."""
    return str(lsc.get_scoped_sql_database(config, read_only=True).run_no_throw(query))


def _graph() -> Any:
    def node(state: _State, config: RunnableConfig) -> dict[str, str]:
        return {"answer": _sql_tool.invoke({"query": state["query"]}, config)}

    builder = StateGraph(_State)
    builder.add_node("sql", node)
    builder.add_edge(START, "sql")
    builder.add_edge("sql", END)
    return lsc.with_scoped_connections(builder.compile())


async def test_a_tool_in_a_real_graph_hands_refusals_to_the_model(
    manager: ExecutionConnectionManager, pg_db: Database
) -> None:
    graph = _graph()
    before = _checksum(pg_db)
    answers = {}
    for _, query, _, words in HOSTILE_PG:
        out = await graph.ainvoke({"query": query, "answer": ""})
        answers[query] = out["answer"]
        assert out["answer"].startswith("Error: "), (query, out["answer"])
        assert words in out["answer"], (query, out["answer"])
    ok = graph.invoke({"query": "select count(*) from customers", "answer": ""})
    assert ok["answer"] == "[(50,)]"
    assert _checksum(pg_db) == before
    manager.drain()
    assert manager.get_stats()["connections_in_use"] == 0


# -- SQLite ---------------------------------------------------------------------------

HOSTILE_SQLITE: list[tuple[str, str, type[Exception], str]] = [
    ("drop", "DROP TABLE orders", UNSAFE, "DROP statements"),
    ("update", "UPDATE orders SET amount = 0", UNSAFE, "UPDATE statements"),
    ("insert", "INSERT INTO customers VALUES (999, 'x', 'y')", UNSAFE, "INSERT statements"),
    ("two statements", "SELECT 1; DROP TABLE orders", UNSAFE, "holds 2 statements"),
    ("commit then drop", "COMMIT; DROP TABLE orders", UNSAFE, "holds 2 statements"),
    ("query_only off", "PRAGMA query_only = OFF", UNSAFE, "PRAGMA statements"),
    ("pragma then delete", "PRAGMA query_only=0; DELETE FROM orders", UNSAFE, "holds 2"),
    ("attach", "ATTACH DATABASE '/tmp/x.db' AS x", UNSAFE, "ATTACH statements"),
    ("vacuum into", "VACUUM INTO '/tmp/copy.db'", UNSAFE, "VACUUM statements"),
    ("very long", "SELECT " + " + ".join(["1"] * 10_000), UNSAFE, "above the limit"),
    ("comment hides ;", "SELECT 1 /* ; */ ; DELETE FROM orders", UNSAFE, "holds 2"),
    (
        "CTE then delete",
        "WITH x AS (SELECT 1) DELETE FROM orders WHERE id IN (SELECT * FROM x)",
        READ_ONLY,
        "refused",
    ),
    ("select into", "SELECT * INTO stolen FROM customers", DBAPIError, "syntax error"),
]


@pytest.fixture
def sqlite_manager(tmp_path: Path) -> Iterator[tuple[ExecutionConnectionManager, Path]]:
    path = tmp_path / f"agent-{uuid.uuid4().hex[:6]}.db"
    con = sqlite3.connect(path)
    con.executescript(
        "create table customers (id int primary key, name text not null, city text not null);"
        "create table orders (id int primary key, customer_id int, amount real, created text);"
        "insert into customers values (1, 'a', 'Lima'), (2, 'b', 'Oslo');"
        "insert into orders values (1, 1, 10.5, '2024-01-01'), (2, 2, 3.5, '2024-01-02');"
    )
    con.commit()
    con.close()
    mgr = ExecutionConnectionManager(f"sqlite:///{path}", read_only=True, max_connections=2)
    try:
        yield mgr, path
        assert_clean(mgr)
    finally:
        mgr.close()


def _sqlite_checksum(path: Path) -> str:
    con = sqlite3.connect(path)
    try:
        rows = con.execute(
            "select 'c' || id || name || city from customers union all "
            "select 'o' || id || customer_id || amount || created from orders union all "
            "select 't' || name from sqlite_master order by 1"
        ).fetchall()
    finally:
        con.close()
    return "|".join(r[0] for r in rows)


@pytest.mark.parametrize(
    ("query", "error", "words"),
    [pytest.param(q, e, w, id=i) for i, q, e, w in HOSTILE_SQLITE],
)
def test_hostile_query_is_refused_on_sqlite(
    sqlite_manager: tuple[ExecutionConnectionManager, Path],
    query: str,
    error: type[Exception],
    words: str,
) -> None:
    mgr, path = sqlite_manager
    before = _sqlite_checksum(path)
    with lsc.ExecutionScope(manager=mgr):
        db = lsc.get_scoped_sql_database(manager=mgr)
        assert db.read_only
        with pytest.raises(error) as caught:
            db.run(query)
        assert words in str(caught.value), str(caught.value)
        answer = db.run_no_throw(query)
        assert answer.startswith("Error: "), answer
        assert db.run("select count(*) from orders") == "[(2,)]"
    assert _sqlite_checksum(path) == before


def test_sqlite_query_only_is_switched_off_after_each_statement(
    sqlite_manager: tuple[ExecutionConnectionManager, Path],
) -> None:
    mgr, path = sqlite_manager
    with lsc.ExecutionScope(manager=mgr):
        ro = lsc.get_scoped_sql_database(manager=mgr)
        assert ro.run("select name from customers where id = 1") == "[('a',)]"
        # trusted code of the same run writes through the same pooled connection
        rw = lsc.get_scoped_sql_database(manager=mgr, read_only=False)
        rw.run("update customers set name = 'z' where id = 1")
    assert mgr.get_stats()["connections_opened"] == 1
    con = sqlite3.connect(path)
    try:
        assert con.execute("select name from customers where id = 1").fetchone() == ("z",)
    finally:
        con.close()


# -- the guard alone --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("select 1", ["select 1"]),
        ("select 1;", ["select 1"]),
        ("select 1; select 2", ["select 1", "select 2"]),
        ("select ';'", ["select ';'"]),
        ("select 'it''s'; select 2", ["select 'it''s'", "select 2"]),
        ('select 1 as "a;b"', ['select 1 as "a;b"']),
        ("select $$a;b$$", ["select $$a;b$$"]),
        ("select $t$ $$ ; $t$", ["select $t$ $$ ; $t$"]),
        ("select $1", ["select $1"]),
        ("select a$b from t; select 2", ["select a$b from t", "select 2"]),
        ("select 1 -- c;\n", ["select 1"]),
        ("select /* a /* b; */ c; */ 1", ["select   1"]),
        ("select E'\\\\'; select 2", ["select E'\\\\'", "select 2"]),
        ("select 'C:\\\\tmp'", ["select 'C:\\\\tmp'"]),
    ],
)
def test_split_statements(sql: str, expected: list[str]) -> None:
    assert split_statements(sql) == expected


def test_guard_error_names_the_limit_and_what_to_do() -> None:
    with pytest.raises(UnsafeQueryError, match=r"30001 characters long.*limit of 30000"):
        check_read_only_sql("x" * 30_001, max_length=30_000)
    with pytest.raises(UnsafeQueryError, match="must be a string"):
        check_read_only_sql(b"select 1")  # type: ignore[arg-type]
    assert check_read_only_sql("  (select 1)  ;") == "(select 1)"
