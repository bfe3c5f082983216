"""Core: ExecutionScope cleanup, isolation and the budget, asserted from pg_stat_activity."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import text

import langgraph_scoped_conn as lsc
from langgraph_scoped_conn.registry import ExecutionConnectionManager
from tests.conftest import Database


def test_single_execution_releases_everything(
    manager: ExecutionConnectionManager, pg_db: Database
) -> None:
    with lsc.ExecutionScope("one") as scope:
        db = lsc.create_execution_scoped_sql_database_sync()
        assert db.run("select count(*) from orders") == "[(500,)]"
        engine = lsc.create_execution_scoped_engine_sync()
        conn = engine.connect()
        conn.execute(text("select 1"))
        assert scope.execution_id == "one"
        stats = lsc.get_connection_stats()
        assert stats["executions"]["one"]["sql_databases"] == 1
        assert stats["executions"]["one"]["connections_in_use"] == 1
        assert pg_db.backends("langgraph_scoped_conn%") >= 1
    stats = lsc.get_connection_stats()
    assert stats["active_executions"] == 0
    assert stats["connections_in_use"] == 0
    assert stats["leaks_reclaimed"] == 1
    # the leaked connection's backend is gone; the idle pooled one may remain
    assert pg_db.backends("langgraph_scoped_conn%") == stats["connections_idle"]


def test_exception_propagates_and_scope_is_released(manager: ExecutionConnectionManager) -> None:
    class Boom(Exception):
        pass

    with pytest.raises(Boom), lsc.ExecutionScope("err"):
        lsc.create_execution_scoped_engine_sync().connect()
        raise Boom
    assert lsc.get_connection_stats()["active_executions"] == 0
    assert lsc.get_connection_stats()["connections_in_use"] == 0


async def test_fifty_async_executions_are_isolated(manager: ExecutionConnectionManager) -> None:
    seen: dict[str, int] = {}
    active: list[int] = []
    arrived = [0, 0]
    all_open, all_seen = asyncio.Event(), asyncio.Event()

    async def run(i: int) -> None:
        async with lsc.ExecutionScope(f"a{i}"):
            for _ in range(i % 3 + 1):
                await lsc.create_execution_scoped_sql_database()
            arrived[0] += 1
            if arrived[0] == 50:
                all_open.set()
            await all_open.wait()
            stats = lsc.get_connection_stats()
            seen[f"a{i}"] = stats["executions"][f"a{i}"]["sql_databases"]
            active.append(stats["active_executions"])
            arrived[1] += 1
            if arrived[1] == 50:
                all_seen.set()
            await all_seen.wait()

    await asyncio.gather(*(run(i) for i in range(50)))
    assert seen == {f"a{i}": i % 3 + 1 for i in range(50)}
    assert active == [50] * 50
    assert lsc.get_connection_stats()["active_executions"] == 0
