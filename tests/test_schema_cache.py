"""The reflected-schema cache (langgraph_scoped_conn.schema_cache): one reflection per
manager, URL and SQLDatabase options.

Counted with a SQLAlchemy ``before_cursor_execute`` listener: later executions reflect
nothing, other options or another URL reflect once, ``invalidate_schema_cache()`` makes the
next one reflect again, one call's options never become the default, and ``warm_schema``
reflects at configure time (warning without the password when it cannot connect).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import OperationalError

import langgraph_scoped_conn as lsc
from langgraph_scoped_conn import ExecutionConnectionManager, invalidate_schema_cache
from langgraph_scoped_conn.testing import free_port
from tests.conftest import Database


@contextlib.contextmanager
def count_statements() -> Iterator[list[str]]:
    """Every statement any engine sends, via a SQLAlchemy before_cursor_execute listener."""
    seen: list[str] = []

    def listener(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement)

    event.listen(Engine, "before_cursor_execute", listener)
    try:
        yield seen
    finally:
        event.remove(Engine, "before_cursor_execute", listener)


def test_sql_database_reflection_is_cached_per_url_and_options(
    manager: ExecutionConnectionManager, pg_db: Database
) -> None:
    with count_statements() as seen:
        with lsc.ExecutionScope("first"):
            db = lsc.create_execution_scoped_sql_database_sync()
        first = len(seen)
        assert first >= 5, "the first SQLDatabase reflects the schema"
        for i in range(5):
            with lsc.ExecutionScope(f"again{i}"):
                db = lsc.create_execution_scoped_sql_database_sync()
                assert sorted(db.get_usable_table_names()) == ["customers", "orders"]
        assert len(seen) == first, seen[first:]  # no reflection for later executions
        with lsc.ExecutionScope("query"):
            db = lsc.create_execution_scoped_sql_database_sync()
            assert db.run("select count(*) from orders") == "[(500,)]"
            assert "CREATE TABLE customers" in db.get_table_info(["customers"])
        after_query = len(seen)
        # other options: one new reflection, then cached again
        for i in range(3):
            with lsc.ExecutionScope(f"subset{i}"):
                db = lsc.create_execution_scoped_sql_database_sync(include_tables=["customers"])
                assert db.get_usable_table_names() == ["customers"]
            if i == 0:
                subset = len(seen)
                assert subset > after_query
        assert len(seen) == subset
        # another URL (psycopg 3 driver) is reflected on its own
        with lsc.ExecutionScope("pg3"):
            lsc.create_execution_scoped_sql_database_sync(pg_db.url_with("psycopg"))
        assert len(seen) > subset
        other_url = len(seen)
        # after a migration, invalidate_schema_cache() makes the next one reflect again
        pg_db.query("create table products (id int primary key)")
        invalidate_schema_cache(manager)
        with lsc.ExecutionScope("migrated"):
            db = lsc.create_execution_scoped_sql_database_sync()
            assert "products" in db.get_usable_table_names()
        assert len(seen) > other_url
    assert lsc.get_connection_stats()["executions"] == {}


def test_options_of_one_sql_database_never_become_the_default(
    manager: ExecutionConnectionManager, pg_db: Database
) -> None:
    # the defaults (no options) are kept ready after the first one; a first call with
    # options must not be what later plain calls get
    with lsc.ExecutionScope("guarded"):
        guarded = lsc.get_scoped_sql_database(read_only=True, statement_timeout=1.0)
        assert guarded.read_only
        with pytest.raises(lsc.UnsafeQueryError):
            guarded.run("delete from orders")
    for i in range(3):  # the first plain one builds the defaults, the others reuse them
        with lsc.ExecutionScope(f"plain{i}"):
            db = lsc.get_scoped_sql_database()
            assert not db.read_only
            assert db._engine.execution_id == f"plain{i}"
            db.run(f"insert into customers (id, name, city) values ({1000 + i}, 'x', 'y')")
    assert pg_db.query("select count(*) from customers where id >= 1000") == [(3,)]
    with lsc.ExecutionScope("subset"):
        subset = lsc.get_scoped_sql_database(include_tables=["customers"])
        assert subset.get_usable_table_names() == ["customers"]
        assert sorted(lsc.get_scoped_sql_database().get_usable_table_names()) == [
            "customers",
            "orders",
        ]
    pg_db.query("create table products (id int primary key)")
    invalidate_schema_cache(manager)
    with lsc.ExecutionScope("migrated"):
        assert "products" in lsc.get_scoped_sql_database().get_usable_table_names()


def test_warm_schema_reflects_at_configure_so_the_first_run_does_not(
    configure_default: Callable[..., ExecutionConnectionManager], pg_db: Database
) -> None:
    with count_statements() as seen:
        manager = configure_default(warm_schema=True, max_connections=3)
        assert manager.drain(), "the background reflection did not finish"
        warmed = len(seen)
        assert warmed >= 5, "warm_schema=True reflected nothing"
        # the server saw the warming connection; it is pooled (idle), not held
        assert pg_db.backends("langgraph_scoped_conn%") == 1
        assert manager.get_stats()["active_executions"] == 0
        with lsc.ExecutionScope("first-run"):
            db = lsc.get_scoped_sql_database()
            assert sorted(db.get_usable_table_names()) == ["customers", "orders"]
        assert len(seen) == warmed, seen[warmed:]  # no reflection in the first run


def test_warm_schema_that_cannot_connect_warns_without_the_password(
    configure_default: Callable[..., ExecutionConnectionManager],
    pg_db: Database,
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = make_url(pg_db.url).set(port=free_port(), password="s3cret-Warm")
    with caplog.at_level(logging.WARNING, logger="langgraph_scoped_conn"):
        manager = configure_default(
            url.render_as_string(hide_password=False), warm_schema=True, pool_timeout=2
        )
        assert manager.drain()
    warnings = [r.getMessage() for r in caplog.records if "warm_schema" in r.getMessage()]
    assert warnings, [r.getMessage() for r in caplog.records]
    assert all("s3cret-Warm" not in m for m in warnings), warnings
    with lsc.ExecutionScope("after-failed-warm"), pytest.raises(OperationalError) as raised:
        lsc.get_scoped_sql_database()  # the first SQLDatabase reflects (and fails) itself
    assert "s3cret-Warm" not in str(raised.value)
