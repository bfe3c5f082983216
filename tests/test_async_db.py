"""``await db.arun(...)``: SQL from async tools that does not block the loop (real PostgreSQL).

``ScopedSQLDatabase.arun`` / ``arun_no_throw`` / ``aget_table_info`` run the sync method
in a worker thread (``asyncio.to_thread``), so the loop keeps serving other runs while
the database works; they draw from the same budget.  A sync ``run()`` on the loop's
thread still works, and logs one WARNING per manager pointing to ``arun``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import pytest

import langgraph_scoped_conn as lsc
from langgraph_scoped_conn import ExecutionConnectionManager
from langgraph_scoped_conn.errors import ScopeClosedError
from tests.conftest import Database


async def _ticker(ticks: list[float], stop: asyncio.Event) -> None:
    """Record a tick every 10 ms for as long as the loop lets it run."""
    while not stop.is_set():
        await asyncio.sleep(0.01)
        ticks.append(time.monotonic())


async def test_arun_keeps_the_event_loop_running(manager: ExecutionConnectionManager) -> None:
    async with lsc.ExecutionScope("ticking"):
        db = lsc.get_scoped_sql_database()
        await db.arun("select 1")  # warm: the pool's first connection is opened here
        ticks: list[float] = []
        stop = asyncio.Event()
        ticker = asyncio.create_task(_ticker(ticks, stop))
        await asyncio.sleep(0)  # let the ticker start
        started = time.monotonic()
        assert await db.arun("select pg_sleep(0.4)") == "[('',)]"
        ended = time.monotonic()
        stop.set()
        await ticker
    during = [t for t in ticks if started <= t <= ended]
    # A liveness check, not a speed bound: a query run on the loop's thread leaves no
    # tick at all while it sleeps 400 ms; a loop that runs gets ~40 ticks of 10 ms.
    # Five is far below that, so a slow or loaded machine does not fail it.
    assert len(during) >= 5, f"the loop ticked {len(during)} times during a 0.4 s query"


async def test_fifty_async_tools_share_the_budget(
    manager: ExecutionConnectionManager, pg_db: Database
) -> None:
    assert manager.settings.max_connections == 5
    async with lsc.ExecutionScope("warm-up"):  # reflect the schema before the burst
        await lsc.get_scoped_sql_database().arun("select 1")

    async def tool(i: int) -> str:
        async with lsc.ExecutionScope(f"tool-{i}"):
            result: str = await lsc.get_scoped_sql_database().arun(
                "select pg_sleep(0.05), :i AS i", parameters={"i": i}
            )
            return result

    with pg_db.sampler() as sampler:
        results = await asyncio.gather(*(tool(i) for i in range(50)))
    assert results == [f"[('', {i})]" for i in range(50)]
    # sync run() on the loop would serialize them on one connection: peak 1
    assert sampler.peak > 1, sampler.samples
    assert max(sampler.samples) <= 5
    assert manager.get_stats()["peak_connections"] <= 5


async def test_sync_run_on_the_loop_warns_once(
    manager: ExecutionConnectionManager, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="langgraph_scoped_conn")
    async with lsc.ExecutionScope("blocking"):
        db = lsc.get_scoped_sql_database()
        assert db.run("select 1") == "[(1,)]"
        assert db.run("select 2") == "[(2,)]"
        assert db.run_no_throw("select 3") == "[(3,)]"
        warnings = [r for r in caplog.records if "on the event loop thread" in r.getMessage()]
        assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
        assert warnings[0].levelno == logging.WARNING
        assert "await db.arun(" in warnings[0].getMessage()
        assert await db.arun("select 4") == "[(4,)]"  # a worker thread: no warning
    assert [r for r in caplog.records if "on the event loop thread" in r.getMessage()] == warnings


def test_sync_run_off_the_loop_does_not_warn(
    manager: ExecutionConnectionManager, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="langgraph_scoped_conn")
    with lsc.ExecutionScope("sync"):
        assert lsc.get_scoped_sql_database().run("select 1") == "[(1,)]"
    assert not [r for r in caplog.records if "event loop" in r.getMessage()]


async def test_arun_outside_the_scope_raises_like_run(manager: ExecutionConnectionManager) -> None:
    async with lsc.ExecutionScope("ended"):
        db = lsc.get_scoped_sql_database()
        assert await db.arun("select 1") == "[(1,)]"
    with pytest.raises(ScopeClosedError):
        await db.arun("select 1")
    with pytest.raises(ScopeClosedError):
        await asyncio.to_thread(db.run, "select 1")


async def test_arun_no_throw_and_aget_table_info(manager: ExecutionConnectionManager) -> None:
    async with lsc.ExecutionScope("others"):
        db = lsc.get_scoped_sql_database(read_only=True)
        error: Any = await db.arun_no_throw("select * from no_such_table")
        assert error.startswith("Error: ") and "no_such_table" in error
        refused: Any = await db.arun_no_throw("delete from orders")
        assert refused.startswith("Error: ")
        assert await db.arun("select count(*) from orders") == "[(500,)]"
        info = await db.aget_table_info(["customers"])
        assert "CREATE TABLE customers" in info
        plain = lsc.get_scoped_sql_database(read_only=False)  # the guard reads no :params
        rows: Any = await plain.arun(
            "select id, city from customers where id = :id",
            parameters={"id": 2},
            include_columns=True,
        )
        assert rows == "[{'id': 2, 'city': 'Pune'}]"
