"""ExecutionConnectionManager (langgraph_scoped_conn.manager): reaping and closing.

Reaping: ``reap()`` releases only the scopes older than ``max_scope_lifetime`` (or
``max_age``), the check also runs when a scope opens, and nothing is reaped without a
lifetime.  Closing: ``close()`` / ``aclose()`` release every scope and pool.  Checked
against pg_stat_activity.  (The HTTP cleanup route and the app's reaper lifespan are in
test_http.py.)
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import text

import langgraph_scoped_conn as lsc
from langgraph_scoped_conn import ExecutionConnectionManager
from langgraph_scoped_conn.errors import ScopeClosedError, ScopeUnavailableError
from tests.conftest import Database, app_backends, backend_pid, eventually, live_pids

LOGGER = "langgraph_scoped_conn"


# -- reaping -------------------------------------------------------------------------------


def test_reaper_releases_only_scopes_older_than_max_scope_lifetime(
    configure_default: Callable[..., ExecutionConnectionManager],
    pg_db: Database,
    caplog: pytest.LogCaptureFixture,
) -> None:
    manager = configure_default(max_scope_lifetime=60)
    with contextlib.ExitStack() as stack:
        stack.enter_context(lsc.ExecutionScope("old"))
        old_engine = lsc.create_execution_scoped_engine_sync()
        old_conn = old_engine.connect()
        old_pid = backend_pid(old_conn)
        stack.enter_context(lsc.ExecutionScope("young"))
        young_conn = lsc.create_execution_scoped_engine_sync().connect()
        young_pid = backend_pid(young_conn)
        old = manager.execution("old")
        assert old is not None
        old.created -= 120  # as if opened two minutes ago (no sleeping in tests)
        assert manager.reap() == ["old"]
        assert manager.reap() == []  # nothing else is old enough
        stats = lsc.get_connection_stats()
        assert set(stats["executions"]) == {"young"}
        assert stats["scopes_reaped"] == 1
        pids = live_pids(pg_db)
        assert old_pid not in pids
        assert pids[young_pid] == "idle in transaction"
        assert young_conn.execute(text("select 3")).scalar_one() == 3
        with pytest.raises(ScopeClosedError):
            old_engine.connect()
        assert any("reaped execution old" in r.getMessage() for r in caplog.records)
        young_conn.close()
    # leaving the reaped scope later is harmless and does not count twice
    stats = lsc.get_connection_stats()
    assert stats["active_executions"] == 0
    assert stats["scopes_reaped"] == 1
    assert stats["scopes_closed"] == stats["scopes_opened"] == 2


def test_reaper_runs_when_scopes_open(
    configure_default: Callable[..., ExecutionConnectionManager], pg_db: Database
) -> None:
    manager = configure_default(max_scope_lifetime=60)
    forgotten = manager.open_execution("forgotten")  # never released by its owner
    conn = manager.engine_for(forgotten).connect()
    pid = backend_pid(conn)
    forgotten.created -= 120
    manager._registry._last_upkeep -= 120  # the periodic check is due
    with lsc.ExecutionScope("next"):
        # the open hands upkeep to a release thread instead of reaping inline
        assert manager.drain()
        assert set(lsc.get_connection_stats()["executions"]) == {"next"}
    eventually(lambda: pid not in live_pids(pg_db), "the reaped scope's backend is gone")
    assert lsc.get_connection_stats()["scopes_reaped"] == 1


def test_no_reaping_without_max_scope_lifetime(
    configure_default: Callable[..., ExecutionConnectionManager],
) -> None:
    manager = configure_default(max_scope_lifetime=None)
    with lsc.ExecutionScope("ancient"):
        execution = manager.execution("ancient")
        assert execution is not None
        execution.created -= 10**6
        assert manager.reap() == []
        assert manager.reap(max_age=1) == ["ancient"]  # an explicit age still works


def test_reap_releases_only_scopes_past_their_lifetime(
    configure_default: Any, pg_db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    mgr = configure_default(max_connections=3, max_scope_lifetime=600)
    caplog.set_level(logging.WARNING, logger=LOGGER)
    with lsc.ExecutionScope("orphan") as orphan:
        old_conn = lsc.create_execution_scoped_engine_sync().connect()
        old_conn.execute(text("select 1"))
        with lsc.ExecutionScope("live"):
            live_conn = lsc.create_execution_scoped_engine_sync().connect()
            live_conn.execute(text("select 1"))
            execution = mgr.execution(orphan.execution_id)
            assert execution is not None
            execution.created -= 3600  # as if opened an hour ago and never ended

            assert mgr.reap() == ["orphan"]

            stats = mgr.get_stats()
            assert list(stats["executions"]) == ["live"]
            assert stats["scopes_reaped"] == 1
            assert stats["connections_in_use"] == 1
            assert len(app_backends(pg_db, "langgraph_scoped_conn%")) == 1
            assert live_conn.execute(text("select 2")).scalar() == 2  # untouched
            live_conn.close()
        assert old_conn.invalidated
        with pytest.raises(lsc.ScopeClosedError):
            old_conn.execute(text("select 1"))  # no silent reconnect outside the budget
    messages = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert any("reaped execution orphan" in m for m in messages)
    assert mgr.get_stats()["scopes_reaped"] == 1


def test_scopes_past_their_lifetime_are_reaped_when_the_next_one_opens(
    configure_default: Any, pg_db: Database
) -> None:
    mgr = configure_default(max_connections=3, max_scope_lifetime=0.2)
    orphan = mgr.open_execution("never-released")
    conn = mgr.engine_for(orphan).connect()
    conn.execute(text("select 1"))
    time.sleep(0.3)  # past the lifetime (and past the reap interval of lifetime/4)

    with lsc.ExecutionScope("next"):
        assert mgr.drain()  # the open handed the reaping to a release thread
        assert mgr.active_executions() == ["next"]
    stats = mgr.get_stats()
    assert stats["scopes_reaped"] == 1 and stats["leaks_reclaimed"] == 1
    eventually(
        lambda: len(app_backends(pg_db, "langgraph_scoped_conn%")) == stats["connections_idle"],
        "only pooled backends remain",
    )
    mgr.release_execution(orphan)  # a late release of a reaped scope is harmless


# -- closing -------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["close", "aclose"])
async def test_manager_close_releases_every_scope_and_pool(
    configure_default: Callable[..., ExecutionConnectionManager], pg_db: Database, how: str
) -> None:
    manager = configure_default(max_connections=6)
    stack = contextlib.ExitStack()
    stack.enter_context(lsc.ExecutionScope("left-open"))
    engine = lsc.create_execution_scoped_engine_sync()
    held = engine.connect()
    backend_pid(held)
    for i in range(3):
        async with lsc.ExecutionScope(f"done{i}"):
            db = await lsc.create_execution_scoped_sql_database()
            db.run("select 1")
    assert len(live_pids(pg_db)) >= 2  # one held, the others idle in the pool
    if how == "close":
        manager.close()
    else:
        await manager.aclose()
    eventually(lambda: live_pids(pg_db) == {}, "no backend after close")
    stats = manager.get_stats()
    assert stats["active_executions"] == 0
    assert stats["connections_in_use"] == 0
    assert stats["connections_idle"] == 0
    with pytest.raises(ScopeUnavailableError, match="closed"), lsc.ExecutionScope("after"):
        pass
    with pytest.raises(ScopeClosedError):
        held.execute(text("select 1"))
    stack.close()  # the scope's own exit afterwards is harmless
    assert live_pids(pg_db) == {}
