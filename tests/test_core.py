"""Core: configuration, URLs and drivers.

Every claim is checked against the real server (pg_stat_activity), not only against
the package's own counters.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

import langgraph_scoped_conn as lsc
from langgraph_scoped_conn import ExecutionConnectionManager
from langgraph_scoped_conn.errors import (
    ConfigurationError,
    ScopeClosedError,
    ScopeUnavailableError,
)
from tests.conftest import Database, backend_pid, eventually, live_pids, uninstall_default

# -- configuration ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"max_conections": 5}, "unknown option(s) max_conections"),
        ({"strategy": "pooled"}, "strategy='pooled' is not known"),
        ({"max_connections": 0}, "max_connections=0"),
        ({"max_connections": -3}, "max_connections=-3"),
        ({"max_connections": True}, "max_connections=True"),
        ({"max_connections": "10"}, "max_connections='10'"),
        ({"max_connections": 2.5}, "max_connections=2.5"),
        ({"max_connections_per_execution": 0}, "max_connections_per_execution=0"),
        ({"pool_timeout": 0}, "pool_timeout=0"),
        ({"pool_timeout": -1.0}, "pool_timeout=-1.0"),
        ({"pool_timeout": math.nan}, "pool_timeout=nan"),
        ({"pool_timeout": math.inf}, "pool_timeout=inf"),
        ({"pool_timeout": "20"}, "pool_timeout='20'"),
        ({"max_scope_lifetime": 0}, "max_scope_lifetime=0"),
        ({"statement_timeout": -5}, "statement_timeout=-5"),
        ({"pool_recycle": 0}, "pool_recycle=0"),
        ({"engine_options": {"pool_size": 50}}, "engine_options may not set pool_size"),
        ({"engine_options": "pool_size=50"}, "engine_options must be a dict"),
        ({"application_name": "x" * 41}, "application_name"),
    ],
)
def test_bad_options_are_named_and_keep_the_old_default(
    options: dict[str, Any], named: str
) -> None:
    old = lsc.configure("postgresql://app@127.0.0.1:1/app")  # nothing connects yet
    try:
        with pytest.raises(ConfigurationError) as caught:
            lsc.configure("postgresql://app@127.0.0.1:1/app", **options)
        assert named in str(caught.value)
        assert isinstance(caught.value, ValueError)
        assert lsc.get_connection_manager() is old
        with lsc.ExecutionScope("still-open"):
            pass
    finally:
        old.close()
        uninstall_default()


def test_a_refused_configure_leaves_the_working_default(
    manager: ExecutionConnectionManager, pg_db: Database
) -> None:
    for options in ({"max_connections": 0}, {"strategy": "nope"}, {"pool_size": 3}):
        with pytest.raises(ConfigurationError):
            lsc.configure(pg_db.url, **options)
        with pytest.raises(ConfigurationError):
            lsc.configure("postgresql://app:pw@127.0.0.1:x/db")
    assert lsc.get_connection_manager() is manager
    with lsc.ExecutionScope("still-works"):
        assert lsc.create_execution_scoped_sql_database_sync().run("select 1") == "[(1,)]"


@pytest.mark.parametrize(
    ("url", "named"),
    [
        ("postgresql://app:{pw}@127.0.0.1:notaport/db", "port that is not a number"),
        ("app:{pw}@127.0.0.1/db", "could not parse database URL"),
        ("://app:{pw}@127.0.0.1/db", "could not parse database URL"),
        ("postgresql+nodriver://app:{pw}@127.0.0.1/db", "no SQLAlchemy dialect/driver"),
    ],
)
def test_bad_urls_are_refused_without_showing_the_password(url: str, named: str) -> None:
    secret = f"Sekr1t-{uuid.uuid4().hex[:8]}"
    old = lsc.configure("postgresql://app@127.0.0.1:1/app")
    try:
        with pytest.raises(ConfigurationError) as caught:
            lsc.configure(url.format(pw=secret))
        assert named in str(caught.value)
        assert secret not in str(caught.value)
        assert secret not in repr(caught.value)
        assert lsc.get_connection_manager() is old
    finally:
        old.close()
        uninstall_default()


def test_no_url_anywhere_is_a_clear_error(
    configure_default: Callable[..., ExecutionConnectionManager],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    lsc.configure()  # options only: a URL may still come with each call
    try:
        with lsc.ExecutionScope("nourl"):
            with pytest.raises(ConfigurationError, match="no database URL") as caught:
                lsc.create_execution_scoped_engine_sync()
            assert "configure(database_url=...)" in str(caught.value)
            assert "DATABASE_URL" in str(caught.value)
    finally:
        lsc.get_connection_manager().close()
        uninstall_default()


def test_database_url_env_fallback(
    configure_default: Callable[..., ExecutionConnectionManager],
    pg_db: Database,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DATABASE_URL", pg_db.url)
    lsc.configure(None)  # no URL given: DATABASE_URL is read at use time
    try:
        with lsc.ExecutionScope("env"):
            conn = lsc.create_execution_scoped_engine_sync().connect()
            assert backend_pid(conn) in live_pids(pg_db)
            conn.close()
    finally:
        lsc.get_connection_manager().close()
        uninstall_default()


def test_postgres_scheme_and_url_objects_are_accepted(
    configure_default: Callable[..., ExecutionConnectionManager], pg_db: Database
) -> None:
    heroku_style = "postgres://" + pg_db.url.split("://", 1)[1]
    configure_default(heroku_style)
    url_object = make_url(pg_db.url)
    with lsc.ExecutionScope("schemes"):
        db = lsc.create_execution_scoped_sql_database_sync()
        assert db.run("select count(*) from customers") == "[(50,)]"
        # a sqlalchemy URL object keeps its password (str() of it would hide it)
        with lsc.create_execution_scoped_engine_sync(url_object).connect() as conn:
            assert backend_pid(conn) in live_pids(pg_db)
    assert lsc.get_connection_stats()["pools"][0]["url"].startswith("postgresql://")


def test_psycopg3_through_its_sqlalchemy_url(
    configure_default: Callable[..., ExecutionConnectionManager], pg_db: Database
) -> None:
    configure_default(pg_db.url_with("psycopg"), max_connections=3)
    with lsc.ExecutionScope("pg3"):
        db = lsc.create_execution_scoped_sql_database_sync()
        assert db.run("select count(*) from orders") == "[(500,)]"
        engine = lsc.create_execution_scoped_engine_sync()
        assert engine.dialect.driver == "psycopg"
        leaked = engine.connect()
        pid = backend_pid(leaked)
        assert live_pids(pg_db)[pid] == "idle in transaction"
    stats = lsc.get_connection_stats()
    assert stats["leaks_reclaimed"] == 1
    assert stats["pools"][0]["url"].startswith("postgresql+psycopg://")
    eventually(lambda: pid not in live_pids(pg_db), "the leaked psycopg 3 backend is gone")
    with pytest.raises(ScopeClosedError):
        leaked.execute(text("select 1"))


# -- the previous default ------------------------------------------------------------


def test_configure_closes_the_previous_default(
    configure_default: Callable[..., ExecutionConnectionManager], pg_db: Database
) -> None:
    first = configure_default()
    with lsc.ExecutionScope("x"):
        lsc.create_execution_scoped_sql_database_sync().run("select 1")
    assert live_pids(pg_db) != {}
    second = configure_default(max_connections=3)
    assert lsc.get_connection_manager() is second is not first
    eventually(lambda: live_pids(pg_db) == {}, "the old pool was disposed")
    with pytest.raises(ScopeUnavailableError):
        first.open_execution("late")
