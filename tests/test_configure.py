"""The process-default manager (langgraph_scoped_conn.configure): configure(),
get_connection_manager() and what replaces what.

A refused configure() leaves the working default; ``DATABASE_URL`` is read at use time
when no URL is given; the default manager reads ``SCOPED_CONN_*`` on first use; a new
configure() closes the previous default, and one over live scopes names both call sites.
Everything runs against the real PostgreSQL of the test session.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable

import pytest

import langgraph_scoped_conn as lsc
from langgraph_scoped_conn import ExecutionConnectionManager
from langgraph_scoped_conn.errors import ConfigurationError, ScopeUnavailableError
from tests.conftest import (
    Database,
    assert_clean,
    backend_pid,
    eventually,
    live_pids,
    uninstall_default,
)

pytestmark = pytest.mark.usefixtures("no_scoped_conn_env")  # no SCOPED_CONN_* options


# -- configure() and the default it replaces ---------------------------------------------


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


# -- the default manager on first use ---------------------------------------------------


def test_the_default_manager_reads_the_environment_on_first_use(
    pg_db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SCOPED_CONN_DATABASE_URL", pg_db.url)
    monkeypatch.setenv("SCOPED_CONN_MAX_CONNECTIONS", "2")
    monkeypatch.setenv("SCOPED_CONN_DEBUG", "yes")
    previous = uninstall_default()
    try:
        mgr = lsc.get_connection_manager()
        try:
            assert mgr.settings.max_connections == 2
            assert mgr.settings.debug is True
            with lsc.ExecutionScope("first-use"):
                db = lsc.create_execution_scoped_sql_database_sync()
                assert db.run("select count(*) from customers") == "[(50,)]"
            assert mgr.get_stats()["max_connections"] == 2
            assert_clean(mgr)
        finally:
            mgr.close()
            uninstall_default(mgr)
    finally:
        if previous is not None:
            lsc.manager.swap_default_manager(previous)


# -- a second configure() over live scopes -----------------------------------------------


def test_reconfiguring_over_live_scopes_names_both_call_sites(
    pg_db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    made: list[ExecutionConnectionManager] = []
    try:
        made.append(lsc.configure(pg_db.url))
        made.append(lsc.configure(pg_db.url))  # no live scope: nothing to say
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        first_line = inspect.currentframe().f_lineno - 2  # type: ignore[union-attr]
        live = made[-1].open_execution("still-running")
        made.append(lsc.configure(pg_db.url))
        second_line = inspect.currentframe().f_lineno - 1  # type: ignore[union-attr]
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1
        message = warnings[0].getMessage()
        assert f"test_configure.py:{first_line}" in message, message
        assert f"test_configure.py:{second_line}" in message, message
        assert "still-running" in message, message
        assert live.state != "open"  # released with the manager it belonged to
    finally:
        for mgr in made:
            mgr.close()
            uninstall_default(mgr)
