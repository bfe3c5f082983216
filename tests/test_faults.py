"""The fault matrix, each fault on a real PostgreSQL.

Every test ends the same way: no connection held by an execution (seen from
``pg_stat_activity``, not only from our counters), no open scope, and a clear error
for the caller.  Faults that need a server of their own (a restart, a low
``max_connections``) start a throwaway cluster; the others use the shared one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg2
import pytest
from langchain_core.runnables import RunnableConfig
from langchain_core.tools import tool
from langgraph.graph import END, START, StateGraph
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, OperationalError
from typing_extensions import TypedDict

import langgraph_scoped_conn as lsc
from langgraph_scoped_conn import ExecutionConnectionManager
from langgraph_scoped_conn.testing import SAMPLE_SQL, SUPERUSER_PASSWORD, PostgresCluster
from tests.conftest import Database, assert_clean
from tests.modes import Mode

APP = "langgraph_scoped_conn"


def _no_password(*texts: object) -> None:
    for t in texts:
        assert SUPERUSER_PASSWORD not in str(t), "the password leaked into an error"


def _eventually(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Wait for the server to catch up (a closed socket's backend exits a moment later)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"never true: {what}")
        time.sleep(0.02)


def _server_backends(cluster: PostgresCluster, database: str, app: str = APP) -> int:
    return int(
        cluster.psql(
            "select count(*) from pg_stat_activity where backend_type = 'client backend' "
            f"and datname = '{database}' and application_name like '{app}%'"
        )
    )


def _assert_nothing_held(
    mgr: ExecutionConnectionManager, backends: Callable[[], int], *, stale_idle: bool = False
) -> None:
    """No open scope, no connection in use, and the server sees only the idle pool.

    With ``stale_idle`` (right after a restart) the pool may still count idle
    connections whose backends are gone; pre-ping replaces them at the next checkout.
    """
    assert_clean(mgr)
    stats = mgr.get_stats()
    assert stats["connections_in_use"] == 0
    assert stats["executions"] == {}
    if stale_idle:
        assert backends() <= stats["connections_idle"]
        return
    _eventually(
        lambda: backends() == mgr.get_stats()["connections_idle"],
        f"server backends ({backends()}) == idle pool connections "
        f"({mgr.get_stats()['connections_idle']}): {mgr.get_stats()['pools']}",
    )


@contextlib.contextmanager
def _cluster_db(**kwargs: Any) -> Iterator[tuple[PostgresCluster, str]]:
    with PostgresCluster.running(**kwargs) as cluster:
        cluster.psql("create database faults")
        cluster.psql(SAMPLE_SQL, database="faults")
        yield cluster, cluster.url("faults")


class _State(TypedDict, total=False):
    note: str
    out: str


def _one_node_graph(fn: Callable[..., Any], manager: ExecutionConnectionManager) -> Any:
    builder = StateGraph(_State)
    builder.add_node("work", fn)
    builder.add_edge(START, "work")
    builder.add_edge("work", END)
    return lsc.with_scoped_connections(builder.compile(), manager=manager)


# -- PostgreSQL restarts mid-run ------------------------------------------------------


def test_restart_mid_run_then_next_run_recovers_through_pre_ping() -> None:
    with _cluster_db(max_connections=20) as (cluster, url):
        mgr = ExecutionConnectionManager(url, max_connections=3, pool_timeout=5)
        backends = lambda: _server_backends(cluster, "faults")  # noqa: E731
        pids_before: set[int] = set()

        def node(state: _State, config: RunnableConfig) -> _State:
            engine = lsc.get_scoped_engine(config, manager=mgr)
            with engine.connect() as conn:
                pids_before.add(conn.execute(text("select pg_backend_pid()")).scalar_one())
                cluster.restart()  # the server goes away while this run holds a connection
                conn.execute(text("select count(*) from orders"))
            return {"out": "unreachable"}

        graph = _one_node_graph(node, mgr)
        try:
            # warm the pool: two idle connections that the restart makes stale
            with lsc.ExecutionScope(manager=mgr):
                engine = lsc.get_scoped_engine(manager=mgr)
                with engine.connect() as a, engine.connect() as b:
                    for c in (a, b):
                        pids_before.add(c.execute(text("select pg_backend_pid()")).scalar_one())
            with pytest.raises(OperationalError) as caught:
                graph.invoke({})
            message = str(caught.value)
            assert "terminating connection" in message or "server closed" in message, message
            _no_password(message, repr(caught.value))
            _assert_nothing_held(mgr, backends, stale_idle=True)

            # the next run is never handed a stale connection: every query succeeds
            # on its first try, on backends started after the restart
            opened = mgr.get_stats()["connections_opened"]
            with lsc.ExecutionScope(manager=mgr):
                engine = lsc.get_scoped_engine(manager=mgr)
                with engine.connect() as a, engine.connect() as b:
                    pids_after = {
                        c.execute(text("select pg_backend_pid()")).scalar_one() for c in (a, b)
                    }
                    assert a.execute(text("select count(*) from orders")).scalar_one() == 500
            assert not pids_after & pids_before
            assert mgr.get_stats()["connections_opened"] >= opened + 2
            _assert_nothing_held(mgr, backends)

            # a restart between runs, with only idle connections: pre-ping replaces them
            cluster.restart()
            assert backends() == 0
            with lsc.ExecutionScope(manager=mgr):
                db = lsc.get_scoped_sql_database(manager=mgr)
                assert db.run("select count(*) from customers") == "[(50,)]"
            _assert_nothing_held(mgr, backends)
        finally:
            mgr.close()
        assert backends() == 0


def test_without_pre_ping_a_stale_connection_would_be_handed_out() -> None:
    """The control for the test above: it is pre-ping that saves the next run."""
    with _cluster_db(max_connections=20) as (cluster, url):
        mgr = ExecutionConnectionManager(url, max_connections=2, pool_pre_ping=False)
        try:
            with lsc.ExecutionScope(manager=mgr):
                # read-only: the connection goes back clean, so the next execution gets it
                # without a session reset (a reset on a dead connection replaces it too)
                lsc.get_scoped_sql_database(manager=mgr, read_only=True).run("select 1")
            cluster.restart()
            with lsc.ExecutionScope(manager=mgr):
                db = lsc.get_scoped_sql_database(manager=mgr)
                with pytest.raises(OperationalError):
                    db.run("select 1")
                assert db.run("select 1") == "[(1,)]"  # the pool was invalidated and refilled
            _assert_nothing_held(mgr, lambda: _server_backends(cluster, "faults"))
        finally:
            mgr.close()


# -- pg_terminate_backend hits a connection a tool is using ------------------------------


def test_terminate_backend_under_a_running_tool(
    manager: ExecutionConnectionManager, pg_db: Database
) -> None:
    @tool
    def slow_report(days: int, config: RunnableConfig) -> str:
        """A slow query."""
        db = lsc.get_scoped_sql_database(config)
        return str(db.run(f"select pg_sleep({days}), 'report'"))

    def node(state: _State, config: RunnableConfig) -> _State:
        return {"out": slow_report.invoke({"days": 60}, config)}

    graph = _one_node_graph(node, manager)
    outcome: dict[str, BaseException | object] = {}

    def run() -> None:
        try:
            outcome["result"] = graph.invoke({})
        except BaseException as exc:
            outcome["error"] = exc

    worker = threading.Thread(target=run)
    worker.start()
    find = (
        "select pid from pg_stat_activity where state = 'active' "
        "and query like 'select pg_sleep(60)%%' and datname = current_database()"
    )
    _eventually(lambda: bool(pg_db.query(find)), "the tool's query is running")
    (pid,) = pg_db.query(find)[0]
    assert pg_db.query("select pg_terminate_backend(%s)", pid) == [(True,)]
    worker.join(30)
    assert not worker.is_alive()
    error = outcome.get("error")
    assert isinstance(error, OperationalError), outcome
    assert "terminating connection due to administrator command" in str(
        error
    ) or "server closed the connection unexpectedly" in str(error), str(error)
    _no_password(error, repr(error))
    _assert_nothing_held(manager, lambda: pg_db.backends(f"{APP}%"))
    # the pool threw the dead connection away; the next run gets a live one
    with lsc.ExecutionScope():
        assert lsc.get_scoped_sql_database().run("select count(*) from orders") == "[(500,)]"
    _assert_nothing_held(manager, lambda: pg_db.backends(f"{APP}%"))


# -- the server is at max_connections -----------------------------------------------------


def test_server_full_gives_a_clear_error_and_recovers() -> None:
    with _cluster_db(max_connections=10) as (cluster, url):
        mgr = ExecutionConnectionManager(url, max_connections=3, pool_timeout=5)
        fillers: list[Any] = []
        try:
            # another client takes every slot the server has
            while True:
                try:
                    fillers.append(
                        psycopg2.connect(
                            host="127.0.0.1",
                            port=cluster.port,
                            user="postgres",
                            password=SUPERUSER_PASSWORD,
                            dbname="faults",
                            application_name="other-client",
                        )
                    )
                except psycopg2.OperationalError as exc:
                    assert "too many clients" in str(exc)
                    break
                assert len(fillers) <= 10
            observer = fillers[0]
            observer.autocommit = True

            def backends(app: str = APP) -> int:
                with observer.cursor() as cur:
                    cur.execute(
                        "select count(*) from pg_stat_activity where application_name like %s",
                        (f"{app}%",),
                    )
                    return int(cur.fetchone()[0])

            # every caller gets the server's refusal at once, never a hang or a leak,
            # and failed attempts do not use up the budget (more attempts than slots)
            for attempt in range(3 * 3):
                with lsc.ExecutionScope(manager=mgr):
                    with pytest.raises(OperationalError, match="too many clients already") as c:
                        if attempt % 2:
                            lsc.get_scoped_engine(manager=mgr).connect()
                        else:  # reflection of the first SQLDatabase needs a connection too
                            lsc.get_scoped_sql_database(manager=mgr).run("select 1")
                    _no_password(c.value, repr(c.value))
            assert mgr.get_stats()["checkout_timeouts"] == 0
            _assert_nothing_held(mgr, backends)
            assert backends() == 0

            # slots free up: the whole budget works again, concurrently
            for conn in fillers[1:]:
                conn.close()
            del fillers[1:]
            barrier = threading.Barrier(3)
            counts: list[object] = []

            def run(i: int) -> None:
                with lsc.ExecutionScope(f"after-{i}", manager=mgr):
                    engine = lsc.get_scoped_engine(manager=mgr)
                    with engine.connect() as conn:
                        barrier.wait(10)
                        counts.append(conn.execute(text("select count(*) from orders")).scalar())
                        barrier.wait(10)

            threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            assert counts == [500, 500, 500]
            assert mgr.get_stats()["connections_opened"] == 3
            _assert_nothing_held(mgr, backends)
        finally:
            mgr.close()
            for conn in fillers:
                conn.close()


# -- statement_timeout fires inside a tool ------------------------------------------------


@pytest.mark.parametrize("read_only", [True, False])
def test_statement_timeout_inside_a_tool(
    manager: ExecutionConnectionManager, pg_db: Database, read_only: bool
) -> None:
    @tool
    def slow(config: RunnableConfig) -> str:
        """A query that runs too long."""
        if read_only:
            db = lsc.get_scoped_sql_database(config, read_only=True, statement_timeout=0.2)
            return str(db.run("select pg_sleep(30)"))
        engine = lsc.get_scoped_engine(config)
        with engine.begin() as conn:
            conn.execute(text("set local statement_timeout = 200"))
            conn.execute(text("select pg_sleep(30)"))
        return "unreachable"

    def node(state: _State, config: RunnableConfig) -> _State:
        return {"out": slow.invoke({}, config)}

    graph = _one_node_graph(node, manager)
    with pytest.raises(DBAPIError, match="canceling statement due to statement timeout") as c:
        graph.invoke({})
    _no_password(c.value, repr(c.value))
    assert (
        pg_db.query(
            "select count(*) from pg_stat_activity where state = 'active' "
            "and query like 'select pg_sleep(30)%%'"
        )[0][0]
        == 0
    )
    _assert_nothing_held(manager, lambda: pg_db.backends(f"{APP}%"))
    # a cancelled statement does not kill the connection: the pool reuses it
    idle = manager.get_stats()["connections_idle"]
    with lsc.ExecutionScope():
        assert lsc.get_scoped_sql_database().run("show statement_timeout") == "[('0',)]"
    assert manager.get_stats()["connections_idle"] == idle


# -- a tracked resource's close() raises ------------------------------------------------


def test_failing_close_does_not_stop_the_other_releases(
    manager: ExecutionConnectionManager, pg_db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken:
        def close(self) -> None:
            raise RuntimeError("disk on fire")

    def raw(app: str) -> Any:
        return psycopg2.connect(
            pg_db.url.replace("postgresql+psycopg2", "postgresql"), application_name=app
        )

    caplog.set_level(logging.WARNING, logger="langgraph_scoped_conn")
    with lsc.ExecutionScope("broken-close"):
        first = lsc.track_connection(raw("lsc-tracked-1"))
        lsc.track_connection(Broken())
        last = lsc.track_connection(raw("lsc-tracked-2"))
        engine = lsc.get_scoped_engine()
        held = engine.connect()  # left checked out on purpose
        held.execute(text("select 1"))
        assert lsc.get_scoped_sql_database().run("select 1") == "[(1,)]"
        assert pg_db.backends("lsc-tracked-%") == 2
    assert first.closed and last.closed
    assert held.invalidated or held.closed
    _eventually(lambda: pg_db.backends("lsc-tracked-%") == 0, "tracked connections closed")
    stats = manager.get_stats()
    assert stats["release_errors"] == 1
    assert stats["leaks_reclaimed"] == 1
    logged = [r.getMessage() for r in caplog.records if "disk on fire" in r.getMessage()]
    assert len(logged) == 1, caplog.text
    assert "broken-close" in logged[0] and "Broken" in logged[0]
    _assert_nothing_held(manager, lambda: pg_db.backends(f"{APP}%"))


# -- 1000 runs, every third cancelled at a seeded random point ---------------------------


class _Gate:
    """Where a run to be cancelled stops, and how the test lets it go on."""

    def __init__(self, loop: asyncio.AbstractEventLoop, point: str) -> None:
        self.loop = loop
        self.point = point
        self.reached: asyncio.Future[None] = loop.create_future()
        self.release = threading.Event()

    def _signal(self) -> None:
        if not self.reached.done():
            self.reached.set_result(None)

    def hit_sync(self, here: str) -> None:
        if here == self.point:
            self.loop.call_soon_threadsafe(self._signal)
            self.release.wait(30)

    async def hit_async(self, here: str) -> None:
        if here == self.point:
            self._signal()
            await asyncio.Event().wait()  # only a cancel gets us out


CANCEL_POINTS = (
    "async-before",  # before the async node checks anything out
    "async-holding",  # the async node holds a connection (inside `with`)
    "async-leaking",  # the async node holds a connection it never closes
    "sync-before",
    "sync-holding",  # the sync node, in an executor thread, holds a connection
    "sync-after",  # the sync node has returned its connection
)


def _cancel_graph(manager: ExecutionConnectionManager) -> Any:
    class S(TypedDict, total=False):
        n: int
        gate: Any
        total: int

    async def fetch(state: S, config: RunnableConfig) -> S:
        # Blocking calls go to a thread, as an async node should do with a sync driver.
        # Each thread call checks out and uses its connection in one go: a connection
        # held across two thread calls could wait for a thread that is itself waiting
        # for a connection (the default executor has only cpu + 4 threads).
        gate: _Gate | None = state.get("gate")
        engine = lsc.get_scoped_engine(config, manager=manager)
        if gate:
            await gate.hit_async("async-before")
        query = text("select count(*) from orders where id <= :n")

        def connect_and_count() -> tuple[Any, int]:
            conn = engine.connect()
            return conn, conn.execute(query, {"n": 1 + state["n"] % 500}).scalar_one()

        conn, total = await asyncio.to_thread(connect_and_count)
        try:
            if gate:
                await gate.hit_async("async-holding")
        finally:
            conn.close()
        if gate and gate.point == "async-leaking":
            _leaked, _ = await asyncio.to_thread(connect_and_count)  # never closed
            await gate.hit_async("async-leaking")
        return {"total": total}

    def report(state: S, config: RunnableConfig) -> S:
        gate: _Gate | None = state.get("gate")
        if gate:
            gate.hit_sync("sync-before")
        db = lsc.get_scoped_sql_database(config, manager=manager, read_only=True)
        engine = lsc.get_scoped_engine(config, manager=manager)
        with engine.connect() as conn:
            conn.execute(text("select 1"))
            if gate:
                gate.hit_sync("sync-holding")
        db.run("select count(*) from customers")
        if gate:
            gate.hit_sync("sync-after")
        return {"total": state["total"] + 1}

    builder = StateGraph(S)
    builder.add_node("fetch", fetch)
    builder.add_node("report", report)
    builder.add_edge(START, "fetch")
    builder.add_edge("fetch", "report")
    builder.add_edge("report", END)
    return lsc.with_scoped_connections(builder.compile(), manager=manager)


async def test_thousand_runs_every_third_cancelled(pg_db: Database) -> None:
    rng = random.Random(20240607)
    mgr = ExecutionConnectionManager(
        pg_db.url, max_connections=5, max_connections_per_execution=3, pool_timeout=30
    )
    graph = _cancel_graph(mgr)
    loop = asyncio.get_running_loop()
    done = cancelled = 0
    points: dict[str, int] = dict.fromkeys(CANCEL_POINTS, 0)

    async def one(i: int) -> None:
        nonlocal done, cancelled
        if i % 3 != 2:
            out = await Mode(rng.choice(("ainvoke", "astream"))).final(graph, {"n": i})
            assert out["total"] == min(1 + i % 500, 500) + 1
            done += 1
            return
        gate = _Gate(loop, rng.choice(CANCEL_POINTS))
        points[gate.point] += 1
        task = asyncio.ensure_future(graph.ainvoke({"n": i, "gate": gate}))
        await asyncio.wait({task, gate.reached}, return_when=asyncio.FIRST_COMPLETED)
        assert gate.reached.done(), f"run {i} finished before reaching {gate.point}"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        gate.release.set()  # a sync node keeps running in its thread after the cancel
        cancelled += 1

    try:
        for start in range(0, 1000, 25):
            await asyncio.gather(*(one(i) for i in range(start, start + 25)))
            stats = mgr.get_stats()
            assert stats["peak_connections"] <= 5
        await mgr.adrain(30)
        _eventually(lambda: mgr.get_stats()["draining_executions"] == 0, "stragglers drained")
        assert (done, cancelled) == (667, 333)
        assert all(points.values()), points
        stats = mgr.get_stats()
        assert stats["scopes_opened"] == stats["scopes_closed"] == 1000
        assert stats["checkout_timeouts"] == 0
        assert stats["leaks_reclaimed"] >= points["async-leaking"]
        assert stats["peak_connections"] <= 5
        _assert_nothing_held(mgr, lambda: pg_db.backends(f"{APP}%"))
        assert pg_db.backends(f"{APP}%") <= 5
    finally:
        await mgr.aclose()
    assert pg_db.backends(f"{APP}%") == 0
