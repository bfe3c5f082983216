"""Core: ExecutionScope cleanup, isolation and nesting, asserted from pg_stat_activity."""

from __future__ import annotations

import asyncio
import operator
import re
import threading
from collections.abc import Callable
from typing import Annotated, Any, TypedDict

import pytest
from langgraph.graph import END, START, StateGraph
from sqlalchemy import text

import langgraph_scoped_conn as lsc
from langgraph_scoped_conn import ExecutionConnectionManager
from langgraph_scoped_conn.errors import NoActiveScopeError
from tests.conftest import Database, backend_pid, eventually, live_pids


def test_single_execution_releases_everything(
    manager: ExecutionConnectionManager, pg_db: Database
) -> None:
    with lsc.ExecutionScope("one") as scope:
        db = lsc.create_execution_scoped_sql_database_sync()
        assert db.run("select count(*) from orders") == "[(500,)]"
        engine = lsc.create_execution_scoped_engine_sync()
        conn = engine.connect()
        leaked_pid = backend_pid(conn)
        assert scope.execution_id == "one"
        stats = lsc.get_connection_stats()
        assert stats["executions"]["one"]["sql_databases"] == 1
        assert stats["executions"]["one"]["connections_in_use"] == 1
        assert live_pids(pg_db)[leaked_pid] == "idle in transaction"
    stats = lsc.get_connection_stats()
    assert stats["active_executions"] == 0
    assert stats["executions"] == {}
    assert stats["connections_in_use"] == 0
    assert stats["leaks_reclaimed"] == 1
    # the leaked connection's backend is gone; the idle pooled one may remain
    eventually(lambda: leaked_pid not in live_pids(pg_db), "the leaked backend is gone")
    pids = live_pids(pg_db)
    assert set(pids.values()) <= {"idle"}
    assert len(pids) == stats["connections_idle"]


def test_exception_propagates_unchanged_and_scope_is_released(
    manager: ExecutionConnectionManager, pg_db: Database
) -> None:
    class Boom(Exception):
        pass

    boom = Boom("from the graph")
    pids: list[int] = []
    with pytest.raises(Boom) as caught, lsc.ExecutionScope("err"):
        conn = lsc.create_execution_scoped_engine_sync().connect()
        pids.append(backend_pid(conn))
        lsc.create_execution_scoped_sql_database_sync().run("select 1")
        raise boom
    assert caught.value is boom
    assert caught.value.__context__ is None  # cleanup raised nothing of its own
    stats = lsc.get_connection_stats()
    assert stats["active_executions"] == 0
    assert stats["connections_in_use"] == 0
    eventually(lambda: pids[0] not in live_pids(pg_db), "the leaked backend is gone")
    assert "idle in transaction" not in live_pids(pg_db).values()


async def test_async_exception_is_released_too(
    manager: ExecutionConnectionManager, pg_db: Database
) -> None:
    pids: list[int] = []
    with pytest.raises(KeyError):
        async with lsc.ExecutionScope("aerr"):
            engine = await lsc.create_execution_scoped_engine()
            pids.append(backend_pid(engine.connect()))
            raise KeyError("x")
    assert lsc.get_connection_stats()["active_executions"] == 0
    await manager.adrain()
    assert pids[0] not in live_pids(pg_db)


async def test_fifty_async_executions_are_isolated(
    configure_default: Callable[..., ExecutionConnectionManager], pg_db: Database
) -> None:
    manager = configure_default(max_connections=50, pool_timeout=30)
    n = 50
    seen: dict[str, dict[str, Any]] = {}
    active: list[int] = []
    pids: dict[str, int] = {}
    server_view: list[dict[int, str]] = []
    arrived = [0, 0]
    all_open, all_seen = asyncio.Event(), asyncio.Event()

    async def run(i: int) -> None:
        eid = f"a{i}"
        async with lsc.ExecutionScope(eid):
            for _ in range(i % 3 + 1):
                await lsc.create_execution_scoped_sql_database()
            engine = await lsc.create_execution_scoped_engine()
            conn = engine.connect()  # held across awaits: one server backend per execution
            pids[eid] = backend_pid(conn)
            arrived[0] += 1
            if arrived[0] == n:
                server_view.append(await asyncio.to_thread(live_pids, pg_db))
                all_open.set()
            await all_open.wait()
            stats = lsc.get_connection_stats()
            seen[eid] = stats["executions"][eid]
            active.append(stats["active_executions"])
            arrived[1] += 1
            if arrived[1] == n:
                all_seen.set()
            await all_seen.wait()
            conn.close()

    await asyncio.gather(*(run(i) for i in range(n)))
    assert {k: v["sql_databases"] for k, v in seen.items()} == {
        f"a{i}": i % 3 + 1 for i in range(n)
    }
    # each SQLDatabase has its engine, plus the explicit one
    assert {k: v["sql_engines"] for k, v in seen.items()} == {f"a{i}": i % 3 + 2 for i in range(n)}
    assert all(v["connections_in_use"] == 1 for v in seen.values())
    assert active == [n] * n
    # the server saw 50 distinct backends, each inside its execution's transaction
    assert len(set(pids.values())) == n
    assert all(server_view[0][pid] == "idle in transaction" for pid in pids.values())
    stats = lsc.get_connection_stats()
    assert stats["active_executions"] == 0
    assert stats["executions"] == {}
    assert stats["total_tracked_connections"] == 0
    assert stats["leaks_reclaimed"] == 0
    await manager.adrain()
    assert set(live_pids(pg_db).values()) <= {"idle"}


def test_ten_threads_are_isolated(
    configure_default: Callable[..., ExecutionConnectionManager], pg_db: Database
) -> None:
    manager = configure_default(max_connections=10, pool_timeout=30)
    n = 10
    barrier = threading.Barrier(n + 1, timeout=60)
    seen: dict[str, dict[str, Any]] = {}
    pids: dict[str, int] = {}
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        eid = f"t{i}"
        try:
            with lsc.ExecutionScope(eid):
                assert lsc.current_execution() is not None
                assert lsc.current_execution().execution_id == eid  # type: ignore[union-attr]
                for _ in range(i % 3 + 1):
                    lsc.create_execution_scoped_sql_database_sync()
                lsc.track_connection(_Closable())
                with lsc.create_execution_scoped_engine_sync().connect() as conn:
                    pids[eid] = backend_pid(conn)
                    barrier.wait()  # every thread holds its connection now
                    seen[eid] = lsc.get_connection_stats()["executions"][eid]
                    barrier.wait()  # the main thread looked at the server
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    barrier.wait()
    during = live_pids(pg_db)
    stats_during = lsc.get_connection_stats()
    barrier.wait()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert stats_during["active_executions"] == n
    assert set(stats_during["executions"]) == {f"t{i}" for i in range(n)}
    assert seen == {
        f"t{i}": {
            "sql_engines": i % 3 + 2,
            "sql_databases": i % 3 + 1,
            "custom_connections": 1,
            "connections_in_use": 1,
            "age_seconds": seen[f"t{i}"]["age_seconds"],
            "state": "open",
        }
        for i in range(n)
    }
    assert len(set(pids.values())) == n
    assert all(during[pid] == "idle in transaction" for pid in pids.values())
    stats = lsc.get_connection_stats()
    assert stats["executions"] == {}
    assert stats["connections_in_use"] == 0
    assert _Closable.closed >= n
    manager.drain()
    assert set(live_pids(pg_db).values()) <= {"idle"}


class _Closable:
    closed = 0

    def __init__(self) -> None:
        self.calls: list[str] = []

    def close(self) -> None:
        self.calls.append("close")
        type(self).closed += 1


def test_nested_scope_with_same_id_joins_the_outer(
    manager: ExecutionConnectionManager, pg_db: Database
) -> None:
    with lsc.ExecutionScope("outer") as outer:
        engine = lsc.create_execution_scoped_engine_sync()
        conn = engine.connect()
        with lsc.ExecutionScope("outer") as inner:
            assert inner.execution_id == "outer"
            assert lsc.current_execution() is outer._execution
            lsc.create_execution_scoped_sql_database_sync()
            assert lsc.get_connection_stats()["active_executions"] == 1
        # leaving the inner block released nothing
        assert lsc.get_connection_stats()["executions"]["outer"]["sql_databases"] == 1
        assert backend_pid(conn) in live_pids(pg_db)
        assert conn.execute(text("select 1")).scalar_one() == 1
        conn.close()
    assert lsc.get_connection_stats()["active_executions"] == 0


def test_nested_scope_with_another_id_is_separate(
    manager: ExecutionConnectionManager, pg_db: Database
) -> None:
    with lsc.ExecutionScope("outer") as outer:
        outer_conn = lsc.create_execution_scoped_engine_sync().connect()
        outer_pid = backend_pid(outer_conn)
        with lsc.ExecutionScope("inner"):
            inner_pid = backend_pid(lsc.create_execution_scoped_engine_sync().connect())
            stats = lsc.get_connection_stats()
            assert set(stats["executions"]) == {"outer", "inner"}
            assert stats["executions"]["inner"]["connections_in_use"] == 1
            assert stats["executions"]["outer"]["connections_in_use"] == 1
        # the inner one is gone (its leaked connection with it), the outer one is current again
        assert lsc.current_execution() is outer._execution
        assert set(lsc.get_connection_stats()["executions"]) == {"outer"}
        pids = live_pids(pg_db)
        assert inner_pid not in pids
        assert pids[outer_pid] == "idle in transaction"
        outer_conn.close()


def test_scope_makes_up_an_id(manager: ExecutionConnectionManager) -> None:
    scope = lsc.ExecutionScope()
    with pytest.raises(RuntimeError, match="inside the scope"):
        _ = scope.execution_id
    with scope:
        assert re.fullmatch(r"[0-9a-f]{32}", scope.execution_id)
        assert scope.execution_id in lsc.get_connection_stats()["executions"]
    with lsc.ExecutionScope() as other:
        assert other.execution_id != scope.execution_id
    with pytest.raises(RuntimeError, match="entered twice"), scope:
        pass


class _State(TypedDict):
    rows: Annotated[list[str], operator.add]
    log: Annotated[list[str], operator.add]


def _graph() -> Any:
    async def async_node(state: _State) -> dict[str, Any]:
        db = await lsc.create_execution_scoped_sql_database()
        return {"rows": [db.run("select count(*) from customers")]}

    def sync_node(state: _State) -> dict[str, Any]:
        # a sync node under ainvoke runs in an executor thread: the scope follows it
        db = lsc.create_execution_scoped_sql_database_sync()
        execution = lsc.current_execution()
        assert execution is not None
        stats = lsc.get_connection_stats()["executions"][execution.execution_id]
        return {
            "rows": [db.run("select count(*) from orders")],
            "log": [f"{execution.execution_id}:{stats['sql_databases']}"],
        }

    builder = StateGraph(_State)
    builder.add_node("async_node", async_node)
    builder.add_node("sync_node", sync_node)
    builder.add_edge(START, "async_node")
    builder.add_edge("async_node", "sync_node")
    builder.add_edge("sync_node", END)
    return builder.compile()


async def test_sync_with_scope_around_ainvoke(
    manager: ExecutionConnectionManager, pg_db: Database
) -> None:
    """The guide's form: ``with ExecutionScope(id): await graph.ainvoke(...)``."""
    graph = _graph()
    results = []
    for i in range(2):
        with lsc.ExecutionScope(f"user1_conv{i}"):
            results.append(await graph.ainvoke({"rows": [], "log": []}))
            assert lsc.get_connection_stats()["executions"][f"user1_conv{i}"]["sql_databases"] == 2
    assert results[0]["rows"] == ["[(50,)]", "[(500,)]"]
    assert [r["log"] for r in results] == [["user1_conv0:2"], ["user1_conv1:2"]]
    await manager.adrain()
    stats = lsc.get_connection_stats()
    assert stats["active_executions"] == 0
    assert stats["connections_in_use"] == 0
    assert stats["leaks_reclaimed"] == 0
    assert set(live_pids(pg_db).values()) <= {"idle"}


async def test_wrapped_runs_joining_one_long_scope_do_not_grow_the_run_map(
    manager: ExecutionConnectionManager,
) -> None:
    """Runs that join an enclosing scope forget their run ids when each run ends."""
    graph = lsc.with_scoped_connections(_graph())
    sizes = []
    async with lsc.ExecutionScope("long-lived"):
        for _ in range(5):
            await graph.ainvoke({"rows": [], "log": []})
            sizes.append(manager.tracked_runs())
        assert lsc.get_connection_stats()["active_executions"] == 1
    assert sizes == [0] * 5
    assert manager.tracked_runs() == 0


def test_create_outside_a_scope_says_how_to_open_one(manager: ExecutionConnectionManager) -> None:
    for create in (
        lsc.create_execution_scoped_engine_sync,
        lsc.create_execution_scoped_sql_database_sync,
        lambda: lsc.track_connection(_Closable()),
    ):
        with pytest.raises(NoActiveScopeError, match=r"ExecutionScope\(") as caught:
            create()
        assert "outside an execution scope" in str(caught.value)


async def test_async_create_outside_a_scope(manager: ExecutionConnectionManager) -> None:
    with pytest.raises(NoActiveScopeError, match="create_execution_scoped_sql_database"):
        await lsc.create_execution_scoped_sql_database()
    with pytest.raises(NoActiveScopeError, match="create_execution_scoped_engine"):
        await lsc.create_execution_scoped_engine()


class _Disposable:
    def __init__(self, log: list[str]) -> None:
        self.log = log

    def dispose(self) -> None:
        self.log.append("dispose")


class _AsyncClosable:
    def __init__(self, log: list[str]) -> None:
        self.log = log

    async def aclose(self) -> None:
        await asyncio.sleep(0)
        self.log.append("aclose")


class _Closer:
    def __init__(self, log: list[str], name: str = "close") -> None:
        self.log = log
        self.name = name

    def close(self) -> None:
        self.log.append(self.name)


def test_track_connection_closes_close_and_dispose_objects(
    manager: ExecutionConnectionManager,
) -> None:
    log: list[str] = []
    with lsc.ExecutionScope("tracked"):
        closer = _Closer(log)
        assert lsc.track_connection(closer) is closer
        lsc.track_connection(_Disposable(log))
        lsc.track_connection(_Closer(log, "last"))
        assert lsc.get_connection_stats()["executions"]["tracked"]["custom_connections"] == 3
        assert lsc.get_connection_stats()["total_tracked_connections"] == 3
        assert log == []
    assert log == ["last", "dispose", "close"]  # closed in reverse order of tracking


async def test_track_connection_awaits_aclose_objects(manager: ExecutionConnectionManager) -> None:
    log: list[str] = []
    async with lsc.ExecutionScope("a"):
        lsc.track_connection(_AsyncClosable(log))
        lsc.track_connection(_Closer(log))
    assert log == ["close", "aclose"]
    # the guide's sync form inside async code: closed on a release thread, on this loop
    with lsc.ExecutionScope("b"):
        lsc.track_connection(_AsyncClosable(log))
    assert await manager.adrain()
    for _ in range(100):  # the aclose() coroutine runs on this loop once we yield to it
        if len(log) == 3:
            break
        await asyncio.sleep(0.01)
    assert log == ["close", "aclose", "aclose"]


def test_track_connection_refuses_objects_without_close(
    manager: ExecutionConnectionManager,
) -> None:
    with lsc.ExecutionScope("x"), pytest.raises(TypeError, match="close"):
        lsc.track_connection(object())


async def test_close_database_connections_is_a_deprecated_no_op(
    manager: ExecutionConnectionManager, pg_db: Database
) -> None:
    async with lsc.ExecutionScope("kept"):
        conn = (await lsc.create_execution_scoped_engine()).connect()
        pid = backend_pid(conn)
        before = lsc.get_connection_stats()
        with pytest.warns(DeprecationWarning, match="does nothing"):
            await lsc.close_database_connections()
        after = lsc.get_connection_stats()

        def without_age(stats: dict[str, Any]) -> dict[str, Any]:
            return {
                eid: {k: v for k, v in e.items() if k != "age_seconds"}
                for eid, e in stats["executions"].items()
            }

        assert without_age(after) == without_age(before)
        assert after["connections_in_use"] == 1
        assert live_pids(pg_db)[pid] == "idle in transaction"
        assert conn.execute(text("select 2")).scalar_one() == 2
        conn.close()
