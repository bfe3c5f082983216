"""Bounded results (langgraph_scoped_conn.results) and what a read-only call hands back.

Reproduction: one read-only SELECT of 2,000,000 rows grew the process by about 1.3 GB
and handed 149 M characters back to the model, in memory every other run shares.  Now
the rows are fetched through a cursor, a batch at a time, up to ``max_result_rows`` and
``max_result_bytes``; the rows past the cap stay on the server, and the text says the
result was cut.
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable

import pytest

import langgraph_scoped_conn as lsc
from langgraph_scoped_conn import ConfigurationError, ExecutionConnectionManager
from tests.conftest import Database

DRIVERS = ["psycopg2", "psycopg"]
HUGE = "select g, repeat('x', 60) as pad from generate_series(1, 2000000) g"


@pytest.mark.parametrize("driver", DRIVERS)
def test_two_million_rows_never_reach_the_process(
    driver: str, pg_db: Database, configure_default: Callable[..., ExecutionConnectionManager]
) -> None:
    configure_default(pg_db.url_with(driver), read_only=True)
    tracemalloc.start()
    try:
        with lsc.ExecutionScope():
            answer = lsc.get_scoped_sql_database().run(HUGE)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert answer.startswith("[(1, 'xxx")
    assert "Result cut" in answer and "max_result_rows=1000" in answer
    assert answer.count("), (") == 999  # exactly the cap's 1,000 rows
    assert peak < 20 * 2**20, peak  # a few MB, not the ~1.3 GB of every row


@pytest.mark.parametrize("driver", DRIVERS)
def test_the_byte_cap_cuts_wide_rows(
    driver: str, pg_db: Database, configure_default: Callable[..., ExecutionConnectionManager]
) -> None:
    configure_default(pg_db.url_with(driver), read_only=True, max_result_bytes=50_000)
    with lsc.ExecutionScope():
        db = lsc.get_scoped_sql_database(sample_rows_in_table_info=0)
        answer = db.run("select g, repeat('y', 1000) from generate_series(1, 500) g")
        # a single huge value cannot be split: the first row always comes back
        one = db.run("select repeat('z', 200000)")
    rows = answer.split("\n(Result cut")[0].count("(")
    assert 1 <= rows < 60, rows  # about 50 KB of ~1 KB rows
    assert "max_result_bytes=50000" in answer
    assert one.startswith("[('zzz") and "Result cut" not in one


def test_small_results_are_whole_and_say_nothing(
    pg_db: Database, configure_default: Callable[..., ExecutionConnectionManager]
) -> None:
    configure_default(pg_db.url, read_only=True, max_result_rows=50)
    with lsc.ExecutionScope():
        db = lsc.get_scoped_sql_database()
        assert db.run("select count(*) from orders") == "[(500,)]"
        exactly = db.run("select id from customers order by id")  # 50 rows: the cap
        over = db.run("select id from orders order by id")
        one = db._execute("select id from orders order by id", "one")
        frozen = db._execute("select id from orders order by id", "cursor")
    assert exactly.count("(") == 50 and "Result cut" not in exactly
    assert over.count("(") == 50 + 1 and "max_result_rows=50" in over  # + the note's "("
    assert one == [{"id": 1}]
    assert len(frozen.data) == 50


def test_write_mode_is_not_capped(
    pg_db: Database, configure_default: Callable[..., ExecutionConnectionManager]
) -> None:
    configure_default(pg_db.url, max_result_rows=10)
    with lsc.ExecutionScope():
        answer = lsc.get_scoped_sql_database().run("select id from orders")
    assert answer.count("(") == 500 and "Result cut" not in answer


@pytest.mark.parametrize(
    ("option", "value"),
    [("max_result_rows", 0), ("max_result_bytes", -1), ("max_result_rows", 10**9)],
)
def test_bad_caps_are_refused(
    option: str, value: int, pg_db: Database, manager: ExecutionConnectionManager
) -> None:
    with pytest.raises(ConfigurationError, match=option):
        lsc.ExecutionConnectionManager(pg_db.url, **{option: value})
    with lsc.ExecutionScope(), pytest.raises(ConfigurationError, match=option):
        lsc.get_scoped_sql_database(**{option: value})
    assert manager.get_stats()["connections_in_use"] == 0


# -- functions the user allows ------------------------------------------------------------


def test_allow_functions_lets_a_named_volatile_function_through(pg_db: Database) -> None:
    pg_db.query(
        "create function next_ticket() returns int language sql volatile as 'select 7';"
        "create function other_volatile() returns int language sql volatile as 'select 8'"
    )
    plain = lsc.ExecutionConnectionManager(pg_db.url, read_only=True)
    allowing = lsc.ExecutionConnectionManager(
        pg_db.url, read_only=True, allow_functions=["public.next_ticket"]
    )
    try:
        with lsc.ExecutionScope(manager=plain):
            db = lsc.get_scoped_sql_database(manager=plain)
            assert db.run_no_throw("select next_ticket()").startswith(
                "Error: next_ticket() is volatile"
            )
        with lsc.ExecutionScope(manager=allowing):
            db = lsc.get_scoped_sql_database(manager=allowing)
            assert db.run("select public.next_ticket()") == "[(7,)]"
            assert db.run("select next_ticket()") == "[(7,)]"
            assert "is volatile" in db.run_no_throw("select other_volatile()")
    finally:
        plain.close()
        allowing.close()


def test_allow_functions_takes_names_only(pg_db: Database) -> None:
    for bad in ("next_ticket()", "drop table x", ["a.b.c"]):
        with pytest.raises(ConfigurationError, match="allow_functions"):
            lsc.ExecutionConnectionManager(
                pg_db.url, allow_functions=bad if isinstance(bad, list) else [bad]
            )
    with pytest.raises(ConfigurationError, match="allow_functions"):
        lsc.ExecutionConnectionManager(pg_db.url, allow_functions="next_ticket")


# -- run_no_throw: text for every error -----------------------------------------------------


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("read_only", [True, False])
def test_run_no_throw_returns_text_for_a_lone_surrogate(
    driver: str,
    read_only: bool,
    pg_db: Database,
    configure_default: Callable[..., ExecutionConnectionManager],
) -> None:
    """Reproduction: a lone surrogate raised UnicodeEncodeError instead of 'Error: ...'."""
    configure_default(pg_db.url_with(driver), read_only=read_only)
    with lsc.ExecutionScope():
        db = lsc.get_scoped_sql_database()
        answer = db.run_no_throw("select 'a\udcffb'")
        assert isinstance(answer, str) and answer.startswith("Error: "), answer
        assert db.run("select 1") == "[(1,)]"  # the connection is still good
