"""One execution's cap (langgraph_scoped_conn.execution): ``max_connections_per_execution``.

A checkout past the cap is refused with a clear error before it reaches the server, other
executions are not limited by it, a returned connection makes room; a thread waiting on
the cap is woken when its scope ends.  Checked against pg_stat_activity.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import text

import langgraph_scoped_conn as lsc
from langgraph_scoped_conn import ExecutionConnectionManager
from langgraph_scoped_conn.errors import ExecutionConnectionLimitError, ScopedConnectionError
from tests.conftest import Database, backend_pid, eventually, live_pids


def test_cap_per_execution_raises_a_clear_error(
    configure_default: Callable[..., ExecutionConnectionManager], pg_db: Database
) -> None:
    configure_default(max_connections=5, max_connections_per_execution=2, pool_timeout=0.3)
    with lsc.ExecutionScope("greedy"):
        engine = lsc.create_execution_scoped_engine_sync()
        first, second = engine.connect(), engine.connect()
        pids = {backend_pid(first), backend_pid(second)}
        with pytest.raises(ExecutionConnectionLimitError) as caught:
            engine.connect()
        message = str(caught.value)
        assert "'greedy' already holds 2 connections" in message
        assert "max_connections_per_execution=2" in message
        assert isinstance(caught.value, ScopedConnectionError)
        assert set(live_pids(pg_db)) == pids  # the refused one never reached the server
        # other executions are not limited by it
        with lsc.ExecutionScope("other"), lsc.create_execution_scoped_engine_sync().connect() as c:
            assert backend_pid(c) not in pids
        second.close()
        with engine.connect() as third:  # a returned connection makes room again
            assert third.execute(text("select 1")).scalar_one() == 1
        first.close()
    assert lsc.get_connection_stats()["leaks_reclaimed"] == 0


def test_scope_end_wakes_a_thread_waiting_on_the_cap(
    configure_default: Callable[..., ExecutionConnectionManager], pg_db: Database
) -> None:
    """A waiter on max_connections_per_execution is woken when the scope ends.

    It runs on in a worker thread (like a sync node after a cancel), so its new
    connection is tracked as draining and released when returned, instead of the
    waiter sleeping for the whole pool_timeout and then holding an untracked one.
    """
    manager = configure_default(max_connections_per_execution=1, pool_timeout=600)
    outcome: list[object] = []
    holding, release = threading.Event(), threading.Event()
    queued = threading.Event()

    def waiter(engine: Any) -> None:
        queued.set()
        try:
            with engine.connect() as conn:
                outcome.append(backend_pid(conn))
                holding.set()
                release.wait(60)
        except BaseException as exc:
            outcome.append(exc)
            holding.set()

    with lsc.ExecutionScope("capped"):
        engine = lsc.create_execution_scoped_engine_sync()
        first = engine.connect()
        first_pid = backend_pid(first)
        thread = threading.Thread(target=waiter, args=(engine,))
        thread.start()
        queued.wait(30)
        execution = manager.execution("capped")
        assert execution is not None
        for _ in range(3000):  # until the worker is parked on the cap (no time bound)
            if execution._cond._waiters:  # type: ignore[attr-defined]
                break
            time.sleep(0.01)
    # the scope ended: `first` was reclaimed, and the waiter got its connection at once
    assert holding.wait(60), "the waiter was not woken by the end of its scope"
    assert isinstance(outcome[0], int), outcome
    eventually(lambda: first_pid not in live_pids(pg_db), "the reclaimed backend is gone")
    assert live_pids(pg_db)[outcome[0]] == "idle in transaction"
    stats = manager.get_stats()
    assert stats["draining_executions"] == 1  # tracked until the worker returns it
    assert stats["connections_in_use"] == 1
    release.set()
    thread.join(60)
    manager.drain()
    assert manager.get_stats()["draining_executions"] == 0
    assert manager.get_stats()["connections_in_use"] == 0
