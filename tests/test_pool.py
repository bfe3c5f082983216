"""The budget pool (langgraph_scoped_conn.pool): its line, its deadlock check, its reserve.

Reproduction: a budget deadlock that completed without a new waiter (the threads that
held the connections moved on, while their executions waited for another) was only
ended by ``pool_timeout``.  The head of the line now looks again while it waits.
"""

from __future__ import annotations

import contextvars
import threading
from typing import Any

import pytest
from sqlalchemy import text

import langgraph_scoped_conn as lsc
from langgraph_scoped_conn import ConnectionBudgetExceededError, ExecutionConnectionManager
from tests.conftest import Database, eventually


def test_a_deadlock_that_completes_without_a_new_waiter_fails_before_pool_timeout(
    pg_db: Database,
) -> None:
    mgr = ExecutionConnectionManager(
        pg_db.url, max_connections=2, max_connections_per_execution=2, pool_timeout=120
    )
    kept: list[Any] = []  # the held connections stay referenced: nobody returns them
    holders_may_go = threading.Event()
    outcome: dict[str, Any] = {}
    scopes = {name: lsc.ExecutionScope(name, manager=mgr) for name in ("dl-a", "dl-b")}
    for scope in scopes.values():  # entered in a copy of the context: the waiters exit
        contextvars.copy_context().run(scope.__enter__)  # them, and this one stays clean
    holding = threading.Barrier(3, timeout=30)

    def holder(name: str) -> None:
        """Checks a connection out for ``name``, then moves on without returning it."""
        engine = mgr.engine_for(mgr.execution(name))  # type: ignore[arg-type]
        conn = engine.connect()
        conn.execute(text("select 1"))
        kept.append(conn)
        holding.wait()
        holders_may_go.wait(30)  # alive until the waiters are in line

    def waiter(name: str) -> None:
        engine = mgr.engine_for(mgr.execution(name))  # type: ignore[arg-type]
        try:
            with engine.connect() as conn:
                outcome[name] = conn.execute(text("select 2")).scalar()
        except BaseException as exc:
            outcome[name] = exc
        finally:  # the run ends (on the error too), releasing what it held
            scopes[name].__exit__(None, None, None)

    holders = [threading.Thread(target=holder, args=(n,)) for n in scopes]
    for t in holders:
        t.start()
    holding.wait()
    waiters = [threading.Thread(target=waiter, args=(n,)) for n in scopes]
    for t in waiters:
        t.start()
    eventually(lambda: mgr.get_stats()["requests_waiting"] == 2, "both executions wait")
    # the holders' threads end: the cycle is now complete, and no new waiter arrives
    holders_may_go.set()
    for t in holders:
        t.join(30)
    for t in waiters:
        t.join(60)  # far less than pool_timeout=120
    try:
        assert not any(t.is_alive() for t in waiters), "the deadlock waited for pool_timeout"
        errors = [v for v in outcome.values() if isinstance(v, ConnectionBudgetExceededError)]
        assert len(errors) == 1, outcome  # one fails at once, naming the cycle ...
        assert "dl-a" in str(errors[0]) and "dl-b" in str(errors[0]), errors[0]
        assert "waiting" in str(errors[0])
        assert sorted(map(str, outcome.values())).count("2") == 1  # ... the other goes on
    finally:
        mgr.close()
    assert mgr.get_stats()["connections_in_use"] == 0


def test_slots_set_aside_shrink_the_tools_budget_and_come_back(
    pg_db: Database, configure_default: Any
) -> None:
    mgr = configure_default(pg_db.url, max_connections=3, pool_timeout=5)
    handle = mgr.pool_for()
    with lsc.ExecutionScope():  # three idle connections in the pool
        engine = lsc.get_scoped_engine()
        conns = [engine.connect() for _ in range(3)]
        for c in conns:
            c.execute(text("select 1"))
            c.close()
    assert mgr.get_stats()["connections_idle"] == 3
    handle.reserve(2, timeout=5)
    try:
        stats = mgr.get_stats()
        assert stats["pools"][0]["connections_reserved"] == 2
        assert stats["connections_idle"] == 1  # the idle ones beyond the new capacity closed
        eventually(lambda: pg_db.backends() == 1, "the server sees one backend")
        with lsc.ExecutionScope():
            engine = lsc.get_scoped_engine()
            with (
                engine.connect(),
                pytest.raises(ConnectionBudgetExceededError, match="set aside"),
            ):
                engine.execution_options().connect()
    finally:
        handle.unreserve(2)
    with lsc.ExecutionScope():
        engine = lsc.get_scoped_engine()
        conns = [engine.connect() for _ in range(3)]  # the whole budget again
        for c in conns:
            c.close()


def test_setting_aside_the_whole_budget_is_refused(pg_db: Database, configure_default: Any) -> None:
    mgr = configure_default(pg_db.url, max_connections=2)
    with pytest.raises(lsc.ConfigurationError, match="need at least one"):
        mgr.pool_for().reserve(2, timeout=1)
    assert mgr.get_stats()["pools"][0]["connections_reserved"] == 0
